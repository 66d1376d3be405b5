package meta

import (
	"slices"
	"strings"
	"testing"
)

// TestTypedPlacement: a volume of a disk type goes only on nodes with a
// disk of that type, and uses only its space; default volumes use only the
// default disks; a type no node has enough of is ResourceExhausted naming
// the type; replacements and expansions stay on the type; a restore keeps
// its source's type; SetNodeDisks refuses bad types.
func TestTypedPlacement(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 10)
	hdd := map[string]DiskSpace{"hdd": {CapacityBytes: 3 * gib, FreeBytes: 3 * gib}}
	for _, n := range []string{"n1", "n2", "n3"} {
		h.must(&SetNodeDisks{NodeID: n, Disks: hdd})
	}
	h.fails(&SetNodeDisks{NodeID: "n1", Disks: map[string]DiskSpace{"default": {}}}, ErrInvalidArgument)
	h.fails(&SetNodeDisks{NodeID: "n1", Disks: map[string]DiskSpace{"HDD": {}}}, ErrInvalidArgument)
	typed := func(id string, replicas int, size uint64) *AdmitVolume {
		return &AdmitVolume{CreateVolume: CreateVolume{ID: id, Name: "pvc-" + id, SizeBytes: size, Replicas: replicas,
			Parameters: map[string]string{"type": "hdd"}}}
	}
	if got := replicaNodes(h.must(typed("t1", 3, 2*gib)).Volume); !slices.Equal(got, []string{"n1", "n2", "n3"}) {
		t.Fatalf("t1 on %v, want the three nodes with hdd disks", got)
	}
	// 1 GiB of hdd left on each: 2 GiB more fits nowhere, and says why.
	err := h.fails(typed("t2", 1, 2*gib), ErrResourceExhausted)
	if !strings.Contains(err.Error(), `type "hdd"`) {
		t.Fatalf("refusal %q does not name the type", err)
	}
	// A type no node has.
	h.fails(&AdmitVolume{CreateVolume: CreateVolume{ID: "t3", Name: "pvc-t3", SizeBytes: gib, Replicas: 1,
		Parameters: map[string]string{"type": "nvme-ssd"}}}, ErrResourceExhausted)
	// A plain CreateVolume places on the default disks whatever its type,
	// as a member of a build before disk types does (clients send typed
	// volumes as AdmitVolume).
	if got := replicaNodes(h.must(&CreateVolume{ID: "p1", Name: "pvc-p1", SizeBytes: 10 * gib, Replicas: 1,
		Parameters: map[string]string{"type": "nvme-ssd"}}).Volume); len(got) != 1 {
		t.Fatalf("p1 on %v", got)
	}
	h.must(&DeleteVolume{VolumeID: "p1"})
	// Default volumes still have all 10 GiB of each default disk.
	if got := replicaNodes(h.must(&CreateVolume{ID: "d1", Name: "pvc-d1", SizeBytes: 10 * gib, Replicas: 4}).Volume); len(got) != 4 {
		t.Fatalf("d1 on %v", got)
	}
	// Growing t1 by 1 GiB fits the hdd disks exactly; by more, it does not.
	h.must(&ExpandVolume{VolumeID: "t1", SizeBytes: 3 * gib})
	h.fails(&ExpandVolume{VolumeID: "t1", SizeBytes: 4 * gib}, ErrResourceExhausted)
	// A replacement of t1's replica on n1 needs an hdd disk with room: n4
	// has none.
	h.must(&SetNodeState{NodeID: "n1", State: NodeDown, Time: 1})
	t1 := h.volume("t1")
	rid := t1.Replicas[slices.IndexFunc(t1.Replicas, func(r Replica) bool { return r.Node == "n1" })].ID
	h.setReplica("t1", rid, ReplicaFailed)
	t1 = h.volume("t1")
	h.fails(&ReplaceReplica{VolumeID: "t1", ReplicaID: rid, ExpectEpoch: t1.Epoch}, ErrResourceExhausted)
	h.must(&SetNodeDisks{NodeID: "n4", Disks: map[string]DiskSpace{"hdd": {CapacityBytes: 4 * gib, FreeBytes: 4 * gib}}})
	if got := replicaNodes(h.must(&ReplaceReplica{VolumeID: "t1", ReplicaID: rid, ExpectEpoch: t1.Epoch}).Volume); !slices.Contains(got, "n4") {
		t.Fatalf("t1's replacement on %v, want n4", got)
	}
	if got := h.state().DiskSpace("n4", "hdd"); got.FreeBytes != 4*gib || got.CapacityBytes != 4*gib {
		t.Fatalf("DiskSpace(n4, hdd) = %+v", got)
	}
	h.must(&SetNodeDisks{NodeID: "n4"})
	if h.state().Nodes["n4"].Disks != nil {
		t.Fatal("SetNodeDisks with no disks left the old ones")
	}
}
