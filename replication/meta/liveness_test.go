package meta

import (
	"context"
	"testing"
	"time"
)

// TestLeaderChangeLiveness follows a new leader's first seconds. Node n2
// died with the old leader, after a replica of it failed; n1 lives and
// heartbeats every interval. The new leader must not take n2 for alive
// (no rebuild started on it) and must not mark n1 down; it marks n2 down
// once n2 has been silent for NodeDownAfter counted from the election.
func TestLeaderChangeLiveness(t *testing.T) {
	p := testPolicy
	elected := time.Unix(100000, 0)
	s := NewState()
	s.Nodes["n1"] = &Node{ID: "n1", State: NodeUp}
	s.Nodes["n2"] = &Node{ID: "n2", State: NodeUp}
	s.Volumes["v1"] = planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))
	s.Volumes["v2"] = planVol("v2", nil, rep("v2-r1", "n2", ReplicaHealthy), rep("v2-r2", "n1", ReplicaFailed))

	l := newLiveness()
	l.lead()
	l.observe(s, elected)
	if l.alive("n1", elected, p.aliveWindow()) || l.alive("n2", elected, p.aliveWindow()) {
		t.Fatal("a new leader takes nodes it has not heard for alive")
	}
	var rebuiltOnN1 bool
	for now := elected; !now.After(elected.Add(p.NodeDownAfter)); now = now.Add(p.HeartbeatInterval / 2) {
		if now.Sub(elected)%p.HeartbeatInterval == p.HeartbeatInterval/2 {
			l.heartbeat("n1", now) // n1's heartbeats land between the ticks
		}
		l.observe(s, now)
		if downs := planNodeDowns(s, l, p, now); len(downs) != 0 {
			t.Fatalf("%v after the election: %s marked down", now.Sub(elected), downs[0].NodeID)
		}
		for _, st := range planRepairs(s, l, p, now) {
			if st.ReplicaID == "v1-r2" {
				t.Fatalf("%v after the election: rebuild planned on dead node n2", now.Sub(elected))
			}
			if st.ReplicaID == "v2-r2" {
				rebuiltOnN1 = true
				if now.Before(elected.Add(p.HeartbeatInterval / 2)) {
					t.Fatalf("rebuild on n1 planned at %v, before n1 was heard", now.Sub(elected))
				}
			}
		}
	}
	if !rebuiltOnN1 {
		t.Fatal("failed replica on live node n1 not rebuilt once n1 was heard")
	}
	after := elected.Add(p.NodeDownAfter + time.Millisecond)
	l.observe(s, after)
	downs := planNodeDowns(s, l, p, after)
	if len(downs) != 1 || downs[0].NodeID != "n2" {
		t.Fatalf("after NodeDownAfter: marked down %s, want n2 alone", dumpJSON(downs))
	}
}

// TestReregisteredNodeStaysUp: a node marked down that registers again (it
// restarted) is up until it has been silent for NodeDownAfter from its
// registration, not marked down again at the leader's next tick because
// its silence counted from before it died.
func TestReregisteredNodeStaysUp(t *testing.T) {
	a, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	n2 := Node{ID: "n2", RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:1", DataAddr: "127.0.0.1:1", CapacityBytes: gib, FreeBytes: gib}
	state := func() NodeState {
		var st NodeState
		a.Store().FSM().View(func(s *State) {
			if n := s.Nodes["n2"]; n != nil {
				st = n.State
			}
		})
		return st
	}
	if _, err := c.Apply(ctx, &RegisterNode{Node: n2}); err != nil {
		t.Fatal(err)
	}
	// n2 never heartbeats: it is marked down after NodeDownAfter (1 s).
	waitUntil(t, 10*time.Second, "silent n2 marked down", func() bool { return state() == NodeDown })
	time.Sleep(500 * time.Millisecond) // its silence is now well past NodeDownAfter
	if _, err := c.Apply(ctx, &RegisterNode{Node: n2}); err != nil {
		t.Fatal(err)
	}
	registered := time.Now()
	for time.Since(registered) < 600*time.Millisecond {
		if st := state(); st != NodeUp {
			t.Fatalf("%v after registering again n2 is %v, want up until it is silent for NodeDownAfter", time.Since(registered), st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	waitUntil(t, 10*time.Second, "n2, silent again, marked down", func() bool { return state() == NodeDown })
}
