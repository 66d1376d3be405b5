package dataplane

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

// followerLag is the part of a replica's recorded lag the test reads.
type followerLag struct {
	Writes    uint64 `json:"writes"`
	Resyncing bool   `json:"resyncing"`
	Applied   uint64 `json:"applied"`
}

// lagOf reads volume id's replica on node: its state and recorded lag.
func (c *devCluster) lagOf(id, node string) (string, *followerLag) {
	c.t.Helper()
	r := c.ctl("volume", "get", id, "-o", "json", "--timeout", "10s")
	if r.code != 0 {
		return "", nil
	}
	var v struct {
		Replicas []struct {
			Node  string       `json:"node"`
			State string       `json:"state"`
			Lag   *followerLag `json:"lag"`
		} `json:"replicas"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		c.t.Fatal(err)
	}
	for _, rep := range v.Replicas {
		if rep.Node == node {
			return rep.State, rep.Lag
		}
	}
	return "", nil
}

// nodeState is a node's state in the store (up, down, ...).
func (c *devCluster) nodeState(id string) string {
	c.t.Helper()
	var st struct {
		Nodes []struct {
			ID    string `json:"id"`
			State string `json:"state"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(c.mustCtl("status", "-o", "json")), &st); err != nil {
		c.t.Fatal(err)
	}
	for _, n := range st.Nodes {
		if n.ID == id {
			return n.State
		}
	}
	return ""
}

// TestAsyncVolumeOnACluster (the design's replicationMode: asynchronous):
// writes stream on while a follower's node is frozen, its lag is recorded
// and it catches up; unexported, every replica is healthy and identical.
// When the engine's node dies, attaching elsewhere is refused naming the
// promote command, a promote without --accept-data-loss is refused, and
// with it the most advanced follower serves every write it had.
func TestAsyncVolumeOnACluster(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("async", volSizeArg, "--replicas", "3", "--param", "replicationMode=asynchronous")
	if v.WriteQuorum != 1 {
		t.Fatalf("write quorum %d, want 1", v.WriteQuorum)
	}
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	m := newModel(volSize)
	w := startWriter(t, m, conn, 'A', 21, 8, true)
	w.waitAcked(t, 100, 60*time.Second, "writes before the freeze")
	for _, n := range []string{"node-2", "node-3"} {
		c.waitVolume(v.ID, 30*time.Second, n+" follows", func(volumeJSON) error {
			if st, _ := c.lagOf(v.ID, n); st != "following" {
				return fmt.Errorf("replica on %s is %q", n, st)
			}
			return nil
		})
	}

	c.stop("node-3")
	frozen := time.Now()
	before := w.acked.Load()
	w.waitAcked(t, before+100, 30*time.Second, "writes acknowledged while node-3 is frozen")
	var seen *followerLag
	eventually(t, 20*time.Second, "node-3's lag recorded", func() error {
		st, lag := c.lagOf(v.ID, "node-3")
		if st != "following" || lag == nil || (lag.Writes == 0 && !lag.Resyncing) {
			return fmt.Errorf("replica on node-3: %s, lag %+v", st, lag)
		}
		seen = lag
		return nil
	})
	t.Logf("%d writes acknowledged in %v with node-3 frozen; recorded lag %+v", w.acked.Load()-before, time.Since(frozen).Round(time.Millisecond), *seen)
	c.cont("node-3")
	eventually(t, 60*time.Second, "node-3 catches up", func() error {
		st, lag := c.lagOf(v.ID, "node-3")
		if st != "following" || lag == nil || lag.Writes > 0 || lag.Resyncing || lag.Applied <= seen.Applied {
			return fmt.Errorf("replica on node-3: %s, lag %+v", st, lag)
		}
		return nil
	})
	w.stop()
	if err := w.err(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	c.mustCtl("volume", "unexport", v.ID)
	c.waitVolume(v.ID, 60*time.Second, "every replica healthy after the unexport", allHealthy)
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}

	// The engine's node dies with every follower caught up.
	sock, _ = c.export(v.ID, "node-1", 20*time.Second)
	conn = c.dial(sock, 10*time.Second)
	w = startWriter(t, m, conn, 'B', 22, 8, true)
	w.waitAcked(t, 100, 60*time.Second, "writes before node-1 dies")
	w.stop()
	if err := w.err(); err != nil {
		t.Fatalf("writer: %v", err)
	}
	for _, n := range []string{"node-2", "node-3"} {
		eventually(t, 30*time.Second, n+" has every write", func() error {
			if st, lag := c.lagOf(v.ID, n); st != "following" || lag == nil || lag.Writes > 0 || lag.Resyncing {
				return fmt.Errorf("replica on %s: %s, lag %+v", n, st, lag)
			}
			return nil
		})
	}
	c.kill("node-1")
	eventually(t, 30*time.Second, "node-1 marked down", func() error {
		if st := c.nodeState("node-1"); st != "down" {
			return fmt.Errorf("node-1 is %q", st)
		}
		return nil
	})
	r := c.ctl("volume", "export", v.ID, "--node", "node-2", "--nbd", c.socket("node-2"), "--wait", "5s")
	if r.code == 0 || !strings.Contains(r.stderr, "volume promote "+v.ID+" --accept-data-loss") {
		t.Fatalf("export on node-2 with node-1 down: exit %d, %s%s; want a refusal naming the promote command", r.code, r.stdout, r.stderr)
	}
	t.Logf("refused: %s", strings.TrimSpace(r.stderr))
	r = c.ctl("volume", "promote", v.ID)
	if r.code == 0 || !strings.Contains(r.stderr, "--accept-data-loss") {
		t.Fatalf("promote without --accept-data-loss: exit %d, %s%s", r.code, r.stdout, r.stderr)
	}
	out := c.mustCtl("volume", "promote", v.ID, "--accept-data-loss")
	if !strings.Contains(out, "recovery point: 0 writes") {
		t.Fatalf("promote printed %q, want the recovery point of a follower that had everything", out)
	}
	t.Logf("%s", strings.TrimSpace(out))
	sock2, _ := c.export(v.ID, "node-2", 30*time.Second)
	checkModel(t, m, c.dial(sock2, 10*time.Second), "read back on node-2 after the promotion")
}
