package meta_test

import (
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/cluster"
)

// Scenario: a node dies, a replica of it fails, and then the leader dies
// too, before it marked the node down.
// Invariant: the new leader does not take the dead node for alive: it
// starts no rebuild on it (an engine would stall for its I/O timeout
// dialling it) and marks it down NodeDownAfter after the election. The
// leader change alone marks no live node down and touches no replica on
// one.
func TestDeadNodeNotAliveAfterLeaderChange(t *testing.T) {
	const hb, downAfter = 200 * time.Millisecond, 2 * time.Second
	c := cluster.MakeCluster(t, 5, cluster.WithHeartbeatInterval(hb), cluster.WithNodeDownAfter(downAfter))
	cl := c.Client(t)
	c.WaitNodesUp(t, 5)
	leader := c.Leader(t)
	res, err := cl.Apply(ctxFor(t, 10*time.Second), &meta.CreateVolume{Name: "v", SizeBytes: volumeSize, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	v := res.Volume
	// dead: a member with a replica of v that is not the leader.
	dead, deadRep := -1, ""
	for _, r := range v.Replicas {
		if i := c.Index(r.Node); i != leader {
			dead, deadRep = i, r.ID
			break
		}
	}
	if err := c.Kill(dead); err != nil {
		t.Fatal(err)
	}
	// Past three heartbeats the old leader no longer counts it alive; it is
	// still up in the store until downAfter.
	time.Sleep(4 * hb)
	res, err = cl.Apply(ctxFor(t, 10*time.Second), &meta.SetReplicaState{VolumeID: v.ID, ReplicaID: deadRep, State: meta.ReplicaFailed, ExpectEpoch: v.Epoch})
	if err != nil {
		t.Fatal(err)
	}
	failedEpoch := res.Volume.Epoch
	if err := c.Kill(leader); err != nil {
		t.Fatal(err)
	}
	live := map[string]bool{}
	for _, i := range c.Up() {
		live[c.NodeID(i)] = true
	}
	c.Leader(t)
	elected := time.Now()
	deadID := c.NodeID(dead)
	// Until the dead node is down, and as long again after it, its replica
	// stays failed, and every live node stays up.
	var downSeen time.Time
	for downSeen.IsZero() || time.Since(downSeen) < downAfter {
		if time.Since(elected) > 5*downAfter {
			t.Fatalf("node %s not marked down %v after the election", deadID, time.Since(elected))
		}
		st, err := cl.State(ctxFor(t, 5*time.Second), true)
		if err != nil {
			t.Fatal(err)
		}
		for id := range live {
			if n := st.Nodes[id]; n == nil || n.State != meta.NodeUp {
				t.Fatalf("live node %s is %v after the leader change", id, n)
			}
		}
		cur := st.Volumes[v.ID]
		for _, r := range cur.Replicas {
			switch {
			case r.ID == deadRep && r.State != meta.ReplicaFailed:
				t.Fatalf("replica %s on dead node %s is %s %v after the election: the new leader took the node for alive",
					r.ID, deadID, r.State, time.Since(elected))
			case r.ID != deadRep && r.State != meta.ReplicaHealthy:
				t.Fatalf("replica %s on live node %s is %s after the leader change", r.ID, r.Node, r.State)
			}
		}
		if cur.Epoch != failedEpoch {
			t.Fatalf("volume epoch moved from %d to %d across the leader change", failedEpoch, cur.Epoch)
		}
		if downSeen.IsZero() && st.Nodes[deadID].State == meta.NodeDown {
			downSeen = time.Now()
			t.Logf("dead node %s marked down %d ms after the election", deadID, downSeen.Sub(elected).Milliseconds())
			if d := downSeen.Sub(elected); d < downAfter/2 {
				t.Fatalf("dead node marked down %v after the election, before any node could have been silent for %v", d, downAfter)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}
