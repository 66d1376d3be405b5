package meta

import (
	"context"
	"testing"
	"time"
)

// startTestAgent starts a one-member cluster on loopback TCP and returns a
// client of its meta API once this node is registered (so volumes can be
// placed on it).
func startTestAgent(t *testing.T, tweak func(*AgentConfig)) (*Agent, *Client) {
	t.Helper()
	cfg := AgentConfig{
		Store: StoreConfig{
			NodeID: "n1", DataDir: t.TempDir(), RaftBind: "127.0.0.1:0", TimeoutMultiplier: 0.2,
		},
		APIBind:           "127.0.0.1:0",
		BootstrapExpect:   1,
		HeartbeatInterval: 50 * time.Millisecond,
		NodeDownAfter:     time.Second,
		DiskUsage:         func() (uint64, uint64, error) { return 100 * gib, 100 * gib, nil },
	}
	if tweak != nil {
		tweak(&cfg)
	}
	a, err := StartAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	c, err := NewClient([]string{a.APIAddr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	waitUntil(t, 10*time.Second, "node n1 registered", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s, err := c.State(ctx, true)
		return err == nil && s.Nodes["n1"] != nil && s.Nodes["n1"].State == NodeUp
	})
	return a, c
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func testCreate(t *testing.T, ctx context.Context, c *Client, name string) *Volume {
	t.Helper()
	res, err := c.Apply(ctx, &CreateVolume{Name: name, SizeBytes: gib, Replicas: 1})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return res.Volume
}
