package meta

import (
	"slices"
	"strings"
	"testing"
)

// TestDedupPlacement: a volume with deduplication goes only on nodes whose
// data directory can share blocks; too few of them is ResourceExhausted
// naming each directory that cannot and why, and the nodes that never
// said; replacements stay on such nodes; volumes without it go anywhere;
// the create of such a volume is gated as SetNodeDedup.
func TestDedupPlacement(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 10)
	h.must(&SetNodeDedup{NodeID: "n1", Disks: map[string]string{"": ""}})
	h.must(&SetNodeDedup{NodeID: "n2", Disks: map[string]string{"": ""}})
	h.must(&SetNodeDedup{NodeID: "n3", Disks: map[string]string{"": "data directory /var/lib/cairn/replicas (ext4) cannot share blocks between files: no reflinks"}})
	h.fails(&SetNodeDedup{NodeID: "n9", Disks: map[string]string{"": ""}}, ErrNotFound)
	h.fails(&SetNodeDedup{NodeID: "n1", Disks: map[string]string{"HDD": ""}}, ErrInvalidArgument)
	// As the client sends it (CreateCommand): a plain CreateVolume.
	dedup := func(id string, replicas int) *CreateVolume {
		return &CreateVolume{ID: id, Name: "pvc-" + id, SizeBytes: gib, Replicas: replicas,
			Parameters: map[string]string{"deduplication": "true"}}
	}
	if got := replicaNodes(h.must(dedup("d1", 2)).Volume); !slices.Equal(got, []string{"n1", "n2"}) {
		t.Fatalf("d1 on %v, want n1 and n2, the nodes that can share blocks", got)
	}
	err := h.fails(dedup("d2", 3), ErrResourceExhausted)
	for _, want := range []string{"deduplication", "/var/lib/cairn/replicas (ext4)", "node n3", "node n4 has not said"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	if got := replicaNodes(h.must(&CreateVolume{ID: "p1", Name: "pvc-p1", SizeBytes: gib, Replicas: 4}).Volume); len(got) != 4 {
		t.Fatalf("a volume without deduplication on %v, want every node", got)
	}
	// d1's replica on n1 is replaced on a node that can share: none is
	// left (n2 has one), until n4 says it can.
	h.must(&SetNodeState{NodeID: "n1", State: NodeDown, Time: 1})
	d1 := h.volume("d1")
	rid := d1.Replicas[slices.IndexFunc(d1.Replicas, func(r Replica) bool { return r.Node == "n1" })].ID
	h.setReplica("d1", rid, ReplicaFailed)
	d1 = h.volume("d1")
	h.fails(&ReplaceReplica{VolumeID: "d1", ReplicaID: rid, ExpectEpoch: d1.Epoch}, ErrResourceExhausted)
	h.must(&SetNodeDedup{NodeID: "n4", Disks: map[string]string{"": ""}})
	if got := replicaNodes(h.must(&ReplaceReplica{VolumeID: "d1", ReplicaID: rid, ExpectEpoch: d1.Epoch}).Volume); !slices.Contains(got, "n4") {
		t.Fatalf("d1's replacement on %v, want n4", got)
	}
	for _, c := range []Command{dedup("x", 1), &AdmitVolume{CreateVolume: *dedup("y", 1)}, &RestoreVolume{CreateVolume: *dedup("z", 1)}} {
		if typ, gated := gatedType(c); typ != CmdSetNodeDedup || !gated {
			t.Errorf("%T with deduplication gated as %d (%v), want %d", c, typ, gated, CmdSetNodeDedup)
		}
	}
}

// TestRecordReplicaSpace: a node's report lands on the replica's record
// and survives a clone of the state; an unknown replica is NotFound.
func TestRecordReplicaSpace(t *testing.T) {
	h := newHarness(t)
	h.cluster(2, 10)
	v := h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 2}).Volume
	sp := ReplicaSpace{AllocatedBytes: 300 << 20, SharedBytes: 256 << 20, DedupSavedBytes: 200 << 20}
	h.must(&RecordReplicaSpace{VolumeID: "v1", ReplicaID: v.Replicas[1].ID, Space: sp})
	h.fails(&RecordReplicaSpace{VolumeID: "v1", ReplicaID: "v1-r9", Space: sp}, ErrNotFound)
	got := h.state().Clone().Volumes["v1"].Replicas
	if got[0].Space != nil || got[1].Space == nil || *got[1].Space != sp {
		t.Fatalf("replicas' space %v and %v, want none and %+v", got[0].Space, got[1].Space, sp)
	}
	if p := got[1].Space.PhysicalBytes(); p != 100<<20 {
		t.Errorf("PhysicalBytes = %d, want 100 MiB", p)
	}
	if p := (ReplicaSpace{AllocatedBytes: 1, DedupSavedBytes: 5}).PhysicalBytes(); p != 0 {
		t.Errorf("PhysicalBytes of a late report = %d, want 0", p)
	}
}

// TestNodesNamedByOwnRecords: a node's records of its disks, reservable
// IOPS and deduplication support speak for the node they name (so the meta
// API refuses them from another node's certificate), also inside a
// client's Request envelope.
func TestNodesNamedByOwnRecords(t *testing.T) {
	for _, c := range []Command{
		&SetNodeDisks{NodeID: "n2"}, &SetNodeReservable{NodeID: "n2", IOPS: 1},
		&SetNodeDedup{NodeID: "n2", Disks: map[string]string{"": ""}},
		&Request{ID: "r1", Command: mustEncode(t, &SetNodeDedup{NodeID: "n2"})},
	} {
		if got := nodesNamedBy(mustEncode(t, c)); !slices.Equal(got, []string{"n2"}) {
			t.Errorf("%T names %v, want [n2]", c, got)
		}
	}
}
