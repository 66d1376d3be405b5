package meta

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// readySnapshot records snapshot id of volume vol as taken by every one of
// its replicas.
func (h *harness) readySnapshot(id, vol string) *Snapshot {
	h.t.Helper()
	h.must(&CreateSnapshot{ID: id, Name: "vs-" + id, SourceVolumeID: vol, CreatedAt: 2})
	var holders []string
	for _, r := range h.volume(vol).Replicas {
		holders = append(holders, r.ID)
	}
	return h.must(&SetSnapshotReady{SnapshotID: id, Replicas: holders}).Snapshot
}

func TestApplySetSnapshotReady(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	h.createVolume("v1", 1, 3)
	h.must(&CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"})
	h.fails(&SetSnapshotReady{SnapshotID: "nope", Replicas: []string{"v1-r1"}}, ErrNotFound)
	h.fails(&SetSnapshotReady{SnapshotID: "s1"}, ErrInvalidArgument)

	res := h.must(&SetSnapshotReady{SnapshotID: "s1", Error: "replica v1-r2 unreachable"})
	if res.Snapshot.ReadyToUse || res.Snapshot.Error != "replica v1-r2 unreachable" {
		t.Fatalf("after an error: %+v, want not ready with the error", res.Snapshot)
	}
	res = h.must(&SetSnapshotReady{SnapshotID: "s1", Replicas: []string{"v1-r3", "v1-r1"}})
	if want := []string{"v1-r1", "v1-r3"}; !res.Snapshot.ReadyToUse || res.Snapshot.Error != "" || !reflect.DeepEqual(res.Snapshot.Replicas, want) {
		t.Fatalf("after ready: %+v, want ready, no error, replicas %v", res.Snapshot, want)
	}
	// A repeated report keeps the first; an error after ready is refused.
	h.must(&SetSnapshotReady{SnapshotID: "s1", Replicas: []string{"v1-r2"}})
	h.fails(&SetSnapshotReady{SnapshotID: "s1", Error: "late"}, ErrFailedPrecondition)
	if got := h.state().Snapshots["s1"]; !reflect.DeepEqual(got.Replicas, []string{"v1-r1", "v1-r3"}) || got.Error != "" {
		t.Fatalf("the first report should stand: %+v", got)
	}
}

func TestApplySnapshotDeletingFreesName(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	h.createVolume("v1", 1, 3)
	h.readySnapshot("s1", "v1")
	h.fails(&MarkSnapshotDeleting{SnapshotID: "nope"}, ErrNotFound)
	if res := h.must(&MarkSnapshotDeleting{SnapshotID: "s1"}); !res.Snapshot.Deleting || !res.Snapshot.Hidden() {
		t.Fatalf("marked snapshot: %+v, want deleting and hidden", res.Snapshot)
	}
	h.must(&MarkSnapshotDeleting{SnapshotID: "s1"}) // idempotent
	// The user's name is free again at once, while the layers go.
	res := h.must(&CreateSnapshot{ID: "s2", Name: "vs-s1", SourceVolumeID: "v1"})
	if res.Snapshot.ID != "s2" {
		t.Fatalf("a new snapshot under a deleted one's name got %+v", res.Snapshot)
	}
	if (&Snapshot{Name: HiddenSnapshotPrefix + "clone-x"}).Hidden() != true {
		t.Fatal("a snapshot Cairn takes for itself should be hidden")
	}
}

func TestApplyRetireVolume(t *testing.T) {
	t.Run("no snapshots: deleted", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		h.createVolume("v1", 1, 3)
		if res := h.must(&RetireVolume{VolumeID: "v1"}); res.Volume.State != VolumeDeleted || res.Volume.Hidden {
			t.Fatalf("retired volume without snapshots: %+v, want deleted", res.Volume)
		}
		h.fails(&RetireVolume{VolumeID: "v1"}, ErrNotFound)
	})
	t.Run("with snapshots: hidden until the last goes", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		v := h.createVolume("v1", 1, 3)
		h.readySnapshot("s1", "v1")
		h.readySnapshot("s2", "v1")
		h.attach("v1", "n1")
		h.fails(&RetireVolume{VolumeID: "v1"}, ErrFailedPrecondition)
		h.must(&DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: h.volume("v1").Epoch})
		res := h.must(&RetireVolume{VolumeID: "v1"})
		if !res.Volume.Hidden || res.Volume.State == VolumeDeleted {
			t.Fatalf("retired volume with snapshots: %+v, want hidden, not deleted", res.Volume)
		}
		h.must(&RetireVolume{VolumeID: "v1"}) // idempotent
		h.must(&DeleteVolume{VolumeID: "v1"}) // an old caller's delete keeps it too
		if got := h.volume("v1"); got.State == VolumeDeleted {
			t.Fatal("DeleteVolume of a hidden volume deleted it under its snapshots")
		}
		// Hidden: its name is free, and it can be neither attached, grown
		// nor snapshotted.
		h.createVolume("v2", 1, 3)
		if got := h.must(&CreateVolume{ID: "v3", Name: v.Name, SizeBytes: gib, Replicas: 1}).Volume; got.ID != "v3" {
			t.Fatalf("a volume under a hidden one's name: %+v", got)
		}
		h.fails(&AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: h.volume("v1").Epoch}, ErrNotFound)
		h.fails(&ExpandVolume{VolumeID: "v1", SizeBytes: 2 * gib}, ErrNotFound)
		h.fails(&CreateSnapshot{ID: "s3", Name: "vs-3", SourceVolumeID: "v1"}, ErrNotFound)

		h.must(&MarkSnapshotDeleting{SnapshotID: "s1"})
		if res := h.must(&DeleteSnapshot{SnapshotID: "s1"}); res.Volume != nil {
			t.Fatalf("deleting one of two snapshots changed the volume: %+v", res.Volume)
		}
		epoch := h.volume("v1").Epoch
		res = h.must(&DeleteSnapshot{SnapshotID: "s2"})
		if res.Volume == nil || res.Volume.State != VolumeDeleted || res.Volume.Epoch != epoch+1 {
			t.Fatalf("the last snapshot's deletion: volume %+v, want deleted at epoch %d", res.Volume, epoch+1)
		}
	})
}

func TestApplyRestoreVolume(t *testing.T) {
	restore := func(id, name string, size uint64, replicas int) *RestoreVolume {
		return &RestoreVolume{CreateVolume: CreateVolume{ID: id, Name: name, SizeBytes: size, Replicas: replicas,
			ContentSource: "snapshot:s1", CreatedAt: 5}, SnapshotID: "s1"}
	}
	h := newHarness(t)
	h.cluster(4, 10)
	src := h.createVolume("v1", 1, 2)
	h.must(&CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"})
	h.fails(restore("r1", "pvc-r1", gib, 2), ErrFailedPrecondition) // not ready yet
	h.must(&SetSnapshotReady{SnapshotID: "s1", Replicas: []string{src.Replicas[0].ID, src.Replicas[1].ID}})
	h.fails(restore("r1", "pvc-r1", gib/2, 2), ErrInvalidArgument) // smaller than the snapshot
	h.fails(&RestoreVolume{CreateVolume: CreateVolume{ID: "r1", Name: "pvc-r1", SizeBytes: gib, Replicas: 2}, SnapshotID: "s1"}, ErrInvalidArgument)
	h.fails(&RestoreVolume{CreateVolume: CreateVolume{ID: "r1", Name: "pvc-r1", SizeBytes: gib, Replicas: 2, ContentSource: "snapshot:x"}, SnapshotID: "x"}, ErrNotFound)
	noSums := restore("r1", "pvc-r1", gib, 2)
	noSums.Parameters = map[string]string{"checksumAlgorithm": "none"} // the source keeps checksums
	h.fails(noSums, ErrInvalidArgument)

	// Three replicas from a snapshot two replicas hold: two made from the
	// layers on their nodes, one placed elsewhere to be rebuilt.
	v := h.must(restore("r1", "pvc-r1", 2*gib, 3)).Volume
	if v.State != VolumeAvailable || v.SizeBytes != 2*gib || v.ContentSource != "snapshot:s1" || len(v.Replicas) != 3 {
		t.Fatalf("restored volume: %+v", v)
	}
	nodes := map[string]bool{}
	for i, r := range v.Replicas {
		nodes[r.Node] = true
		switch {
		case i < 2 && (r.State != ReplicaHealthy || r.Source != src.Replicas[i].ID || r.Node != src.Replicas[i].Node):
			t.Errorf("replica %d: %+v, want healthy on %s made from %s", i, r, src.Replicas[i].Node, src.Replicas[i].ID)
		case i == 2 && (r.State != ReplicaRebuilding || r.Source != ""):
			t.Errorf("replica %d: %+v, want rebuilding with no source", i, r)
		}
	}
	if len(nodes) != 3 {
		t.Fatalf("restored replicas share nodes: %+v", v.Replicas)
	}
	// Idempotent by name; the same name with another source or size is taken.
	if again := h.must(restore("r2", "pvc-r1", 2*gib, 3)).Volume; again.ID != "r1" {
		t.Fatalf("a retried restore made %s, want r1", again.ID)
	}
	h.fails(restore("r2", "pvc-r1", 3*gib, 3), ErrAlreadyExists)

	// A snapshot whose holders are gone cannot be restored here.
	h.must(&MarkSnapshotDeleting{SnapshotID: "s1"})
	h.fails(restore("r3", "pvc-r3", gib, 1), ErrNotFound)
}

func TestSnapshotLimit(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 1, Parameters: map[string]string{"snapshotLimit": "2"}})
	h.readySnapshot("s1", "v1")
	h.readySnapshot("s2", "v1")
	s := h.state()
	if err := s.checkSnapshotLimit("v1", "vs-s3"); !errors.Is(err, ErrResourceExhausted) || !strings.Contains(err.Error(), "snapshotLimit (2)") {
		t.Fatalf("a third snapshot with snapshotLimit 2: %v, want ResourceExhausted naming the limit", err)
	}
	if err := s.checkSnapshotLimit("v1", "vs-s2"); err != nil {
		t.Fatalf("a retry of a recorded snapshot is refused: %v", err)
	}
	h.must(&MarkSnapshotDeleting{SnapshotID: "s1"})
	if err := h.state().checkSnapshotLimit("v1", "vs-s3"); err != nil {
		t.Fatalf("a deleting snapshot still counts: %v", err)
	}
	if err := h.state().checkSnapshotLimit("nope", "x"); err != nil {
		t.Fatalf("an unknown volume is the store's to refuse: %v", err)
	}
}

// A replica placed after the snapshot (it received the snapshot's layers
// with its rebuild) serves a restore too, after those that sealed it.
func TestApplyRestoreUsesRebuiltReplicas(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	src := h.createVolume("v1", 1, 3)
	h.must(&CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"})
	h.must(&SetSnapshotReady{SnapshotID: "s1", Replicas: []string{src.Replicas[2].ID}})
	v := h.must(&RestoreVolume{CreateVolume: CreateVolume{ID: "r1", Name: "pvc-r1", SizeBytes: gib, Replicas: 3,
		ContentSource: "snapshot:s1"}, SnapshotID: "s1"}).Volume
	want := []string{src.Replicas[2].ID, src.Replicas[0].ID, src.Replicas[1].ID}
	for i, r := range v.Replicas {
		if r.Source != want[i] || r.State != ReplicaHealthy {
			t.Fatalf("replica %d: %+v, want healthy made from %s (sealing replicas first)", i, r, want[i])
		}
	}
}

func TestApplyRecordUsage(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	v := h.createVolume("v1", 1, 3)
	h.createVolume("v2", 1, 3)
	h.readySnapshot("s1", "v1")
	h.readySnapshot("s2", "v2")
	h.fails(&RecordUsage{VolumeID: "v1", ReplicaID: "nope"}, ErrNotFound)
	h.fails(&RecordUsage{VolumeID: "nope", ReplicaID: "x"}, ErrNotFound)
	res := h.must(&RecordUsage{VolumeID: "v1", ReplicaID: v.Replicas[0].ID, AllocatedBytes: 9 << 20,
		Snapshots: map[string]SnapshotSpace{"s1": {HeldBytes: 8 << 20, AloneBytes: 1 << 20}, "s2": {HeldBytes: 1}}})
	if u := res.Volume.Usage; u == nil || u.AllocatedBytes != 9<<20 || u.ReplicaID != v.Replicas[0].ID {
		t.Fatalf("volume usage %+v", u)
	}
	s := h.state()
	if sp := s.Snapshots["s1"].Space; sp == nil || *sp != (SnapshotSpace{HeldBytes: 8 << 20, AloneBytes: 1 << 20}) {
		t.Fatalf("s1 space %+v", sp)
	}
	if s.Snapshots["s2"].Space != nil {
		t.Fatal("a report for one volume changed another volume's snapshot")
	}
}

// TestChainDepthHardLimit: once the depth a replica reported, with the
// snapshots still being taken, reaches ChainDepthHardLimit, a new snapshot
// is refused with a message naming the limit; below it, it passes; the
// report records the depth and a flatten's progress.
func TestChainDepthHardLimit(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	v := h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 1}).Volume
	rep := v.Replicas[0].ID
	h.must(&CreateSnapshot{ID: "s-pending", Name: "vs-pending", SourceVolumeID: "v1"})
	report := func(depth int, f *LayerProgress) {
		h.must(&RecordUsage{VolumeID: "v1", ReplicaID: rep, AllocatedBytes: 1, Depth: depth, Flatten: f})
	}
	report(ChainDepthHardLimit-2, nil)
	if err := h.state().checkSnapshotLimit("v1", "vs-new"); err != nil {
		t.Fatalf("depth %d with one snapshot being taken: %v", ChainDepthHardLimit-2, err)
	}
	report(ChainDepthHardLimit-1, &LayerProgress{Layer: "s0", DoneBytes: 1 << 20, TotalBytes: gib})
	h.must(&RecordUsage{VolumeID: "v1", ReplicaID: rep, AllocatedBytes: 1, Depth: ChainDepthHardLimit - 1,
		Flatten: &LayerProgress{Layer: "s0", DoneBytes: 1 << 20, TotalBytes: gib}, Merge: &LayerProgress{Layer: "s9", DoneBytes: 5, TotalBytes: gib}})
	if m := h.state().Volumes["v1"].Clone().Usage.Merge; m == nil || m.Layer != "s9" || m.DoneBytes != 5 {
		t.Fatalf("recorded merge progress %+v", m)
	}
	err := h.state().checkSnapshotLimit("v1", "vs-new")
	if !errors.Is(err, ErrResourceExhausted) || !strings.Contains(err.Error(), fmt.Sprintf("hard limit of %d", ChainDepthHardLimit)) {
		t.Fatalf("depth %d with one snapshot being taken: %v, want ResourceExhausted naming the hard limit", ChainDepthHardLimit-1, err)
	}
	u := h.state().Volumes["v1"].Clone().Usage
	if u.Depth != ChainDepthHardLimit-1 || u.Flatten == nil || u.Flatten.DoneBytes != 1<<20 {
		t.Fatalf("recorded usage %+v", u)
	}
}
