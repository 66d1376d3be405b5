package meta

import (
	"context"
	"errors"
	"reflect"
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

// TestGetVolume: GetVolume answers with the one volume the whole state holds
// under its id, linearizably or from the member asked, and ErrNotFound for
// an unknown or deleted volume, whose tombstone stays for the retention.
func TestGetVolume(t *testing.T) {
	_, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	v1 := testCreate(t, ctx, c, "one")
	v2 := testCreate(t, ctx, c, "two")

	got, err := c.Volume(ctx, v1.ID)
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.State(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if want := s.Volumes[v1.ID]; !reflect.DeepEqual(got, want) {
		t.Fatalf("GetVolume = %s, state holds %s", dumpJSON(got), dumpJSON(want))
	}
	var local GetVolumeResponse
	if err := c.invokeOnce(ctx, "GetVolume", &GetVolumeRequest{VolumeID: v1.ID}, &local); err != nil || local.Error != nil {
		t.Fatalf("non-linearizable GetVolume: %v %+v", err, local.Error)
	}
	if !reflect.DeepEqual(local.Volume, got) || local.AppliedIndex == 0 {
		t.Fatalf("non-linearizable GetVolume = %s at index %d, want %s", dumpJSON(local.Volume), local.AppliedIndex, dumpJSON(got))
	}

	if _, err := c.Volume(ctx, "vol-nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetVolume of an unknown volume: %v, want ErrNotFound", err)
	}
	if _, err := c.Apply(ctx, &DeleteVolume{VolumeID: v2.ID}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Volume(ctx, v2.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("GetVolume of a deleted volume: %v, want ErrNotFound", err)
	}
	// The default retention keeps the tombstone through a few reconciler ticks.
	time.Sleep(600 * time.Millisecond)
	s, err = c.State(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if v := s.Volumes[v2.ID]; v == nil || v.State != VolumeDeleted {
		t.Fatalf("tombstone of %s purged before its retention: %s", v2.ID, dumpJSON(v))
	}
}

// TestTombstonePurgedAfterRetention: the leader purges a deleted volume once
// its retention has passed, and leaves the live ones alone.
func TestTombstonePurgedAfterRetention(t *testing.T) {
	_, c := startTestAgent(t, func(cfg *AgentConfig) { cfg.TombstoneRetention = 300 * time.Millisecond })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	keep := testCreate(t, ctx, c, "keep")
	drop := testCreate(t, ctx, c, "drop")
	if _, err := c.Apply(ctx, &DeleteVolume{VolumeID: drop.ID}); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	var s *State
	waitUntil(t, 10*time.Second, "tombstone purged", func() bool {
		var err error
		s, err = c.State(ctx, true)
		return err == nil && s.Volumes[drop.ID] == nil
	})
	if d := time.Since(deleted); d < 300*time.Millisecond {
		t.Fatalf("tombstone purged %v after the delete, before its retention", d)
	}
	if v := s.Volumes[keep.ID]; v == nil || v.State != VolumeAvailable {
		t.Fatalf("live volume %s after the purge: %s", keep.ID, dumpJSON(v))
	}
	// The name is free again, as it was with the tombstone.
	testCreate(t, ctx, c, "drop")
}
