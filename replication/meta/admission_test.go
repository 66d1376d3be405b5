package meta

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestAdmitVolume: guaranteed volumes are placed only on nodes that can
// still promise their minIOPS, and hold it there until deleted; a volume
// that no node set can take is refused naming the IOPS; burstable ones
// ignore reservations; a replacement is admitted too; and a guaranteed
// volume's minIOPS cannot change.
func TestAdmitVolume(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 10)
	for node, iops := range map[string]uint64{"n1": 1000, "n2": 1000, "n3": 1000, "n4": 300} {
		h.must(&SetNodeReservable{NodeID: node, IOPS: iops})
	}
	h.fails(&SetNodeReservable{NodeID: "n9", IOPS: 1}, ErrNotFound)
	guaranteed := func(id string, replicas int, minIOPS string) *AdmitVolume {
		return &AdmitVolume{CreateVolume: CreateVolume{ID: id, Name: "pvc-" + id, SizeBytes: gib, Replicas: replicas,
			Parameters: map[string]string{"qosClass": "guaranteed", "minIOPS": minIOPS}}}
	}
	g1 := h.must(guaranteed("g1", 3, "600")).Volume
	if got := replicaNodes(g1); !slices.Equal(got, []string{"n1", "n2", "n3"}) {
		t.Fatalf("g1 on %v, want n1–n3 (n4 can promise only 300)", got)
	}
	// 400 left on n1–n3, 300 on n4: a second of 500 fits nowhere.
	err := h.fails(guaranteed("g2", 1, "500"), ErrResourceExhausted)
	if !strings.Contains(err.Error(), "cannot reserve 500 IOPS") {
		t.Fatalf("refusal %q does not say why", err)
	}
	// One of 400 on three nodes fits, exactly.
	if got := replicaNodes(h.must(guaranteed("g3", 3, "400")).Volume); !slices.Equal(got, []string{"n1", "n2", "n3"}) {
		t.Fatalf("g3 on %v", got)
	}
	// A burstable volume with a reservation is not admitted: it goes anywhere.
	h.must(&CreateVolume{ID: "b1", Name: "pvc-b1", SizeBytes: gib, Replicas: 4, Parameters: map[string]string{"minIOPS": "5000"}})
	h.fails(&AdmitVolume{CreateVolume: CreateVolume{ID: "b2", Name: "pvc-b2", SizeBytes: gib, Replicas: 1}}, ErrInvalidArgument)
	// A replacement of g3's replica on n1 can go only where 400 are free:
	// nowhere now (n4 has 300), so it is refused; once n4 can promise
	// more, it goes there.
	h.must(&SetNodeState{NodeID: "n1", State: NodeDown, Time: 1})
	g3 := h.volume("g3")
	var rid string
	for _, r := range g3.Replicas {
		if r.Node == "n1" {
			rid = r.ID
		}
	}
	h.setReplica("g3", rid, ReplicaFailed)
	g3 = h.volume("g3")
	h.fails(&ReplaceReplica{VolumeID: "g3", ReplicaID: rid, ExpectEpoch: g3.Epoch}, ErrResourceExhausted)
	h.must(&SetNodeReservable{NodeID: "n4", IOPS: 1000})
	if got := replicaNodes(h.must(&ReplaceReplica{VolumeID: "g3", ReplicaID: rid, ExpectEpoch: g3.Epoch}).Volume); !slices.Contains(got, "n4") {
		t.Fatalf("g3's replacement on %v, want n4", got)
	}
	// Deleting g1 frees its 600 on n2 and n3.
	h.must(&DeleteVolume{VolumeID: "g1"})
	if _, got := h.state().placementLoad(""); got["n2"] != 400 || got["n4"] != 400 || got["n1"] != 0 {
		t.Fatalf("reserved after the delete: %v", got)
	}
	h.fails(&SetParameters{VolumeID: "g3", Parameters: map[string]string{"minIOPS": "100"}}, ErrFailedPrecondition)
	h.must(&SetParameters{VolumeID: "g3", Parameters: map[string]string{"maxIOPS": "5000"}})
}

// replicaNodes lists the nodes of v's replicas, sorted.
func replicaNodes(v *Volume) []string {
	var ns []string
	for _, r := range v.Replicas {
		ns = append(ns, r.Node)
	}
	slices.Sort(ns)
	return ns
}

// TestRestoreCannotBeGuaranteed: a restore or clone into qosClass
// guaranteed is refused before it reaches the store (its replicas go where
// the snapshot's layers are, without admission); another class passes.
func TestRestoreCannotBeGuaranteed(t *testing.T) {
	g := CreateVolume{Name: "pvc-g", Parameters: map[string]string{"qosClass": "guaranteed", "minIOPS": "100"}}
	if err := checkRestorable(g); !errors.Is(err, ErrFailedPrecondition) || !strings.Contains(err.Error(), "guaranteed") {
		t.Fatalf("a guaranteed restore: %v, want FailedPrecondition naming the class", err)
	}
	var c *Client // Restore refuses before it uses the client
	if _, err := c.Restore(context.Background(), g, "snap-1", ""); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("Client.Restore of a guaranteed volume: %v, want FailedPrecondition", err)
	}
	if err := checkRestorable(CreateVolume{Name: "pvc-b", Parameters: map[string]string{"minIOPS": "100"}}); err != nil {
		t.Fatalf("a burstable restore: %v", err)
	}
}
