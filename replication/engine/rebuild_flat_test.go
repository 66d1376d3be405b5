package engine

import (
	"slices"
	"testing"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// recordSnapshot records snapshot id of volume vol in the store, ready and
// held by the replicas holders, as the node that took it does.
func (r *rig) recordSnapshot(vol, id string, holders []string) {
	r.t.Helper()
	if _, err := r.meta.Apply(r.ctx(), &meta.CreateSnapshot{ID: id, Name: "vs-" + id, SourceVolumeID: vol}); err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.meta.Apply(r.ctx(), &meta.SetSnapshotReady{SnapshotID: id, Replicas: holders}); err != nil {
		r.t.Fatal(err)
	}
}

// restoreVolume restores snapshot snap into a new volume of replicas
// replicas, size bytes, attached to n1. As the nodes do
// (replication/storagenode), a replica placed on a node that holds the
// snapshot's layers is made from them by hard links and its generation
// recorded; the others are made blank, to be rebuilt.
func (r *rig) restoreVolume(name, snap string, size uint64, replicas int) *meta.Volume {
	r.t.Helper()
	ctx := r.ctx()
	res, err := r.meta.Apply(ctx, &meta.RestoreVolume{SnapshotID: snap,
		CreateVolume: meta.CreateVolume{ID: "vol-" + name, Name: name, SizeBytes: size, Replicas: replicas,
			ContentSource: meta.SourceSnapshotPrefix + snap}})
	if err != nil {
		r.t.Fatal(err)
	}
	for _, rep := range res.Volume.Replicas {
		srv := r.servers[rep.Node].srv
		if rep.Source == "" {
			if _, err := srv.CreateWith(rep.ID, size, replica.CreateOptions{Checksums: r.checksums}); err != nil {
				r.t.Fatal(err)
			}
			continue
		}
		rr, err := srv.CreateFromSnapshot(rep.ID, rep.Source, snap, size)
		if err != nil {
			r.t.Fatal(err)
		}
		_, err = r.meta.Apply(ctx, &meta.SetReplicaGeneration{VolumeID: res.Volume.ID, ReplicaID: rep.ID, Generation: rr.Generation()})
		if err != nil {
			r.t.Fatal(err)
		}
	}
	return r.attach(res.Volume.ID, "n1")
}

// TestRebuildCarriesARestoreFlattened: a one-replica volume with snapshots
// s1 and s2 is restored from s2 into three replicas. The one on the
// source's node shares s1 and s2 by hard link; the two others, placed where
// the layers are not, are rebuilt with one layer, s2 flattened (holding
// what s2 shows), and only the volume's data copied once. All three read
// the same, s2 reads as it did, and the chains count as agreeing. The
// volume then takes a snapshot of its own, and the node that shares the
// layers dies: its replacement, rebuilt from a flattened replica, gets the
// flattened chain too.
func TestRebuildCarriesARestoreFlattened(t *testing.T) {
	r := newRig(t, 4)
	r.checksums = true
	const size = 16 * mib
	src := r.createVolume("flatsrc", size, 1, 0, "n1")
	holderNode := src.Replicas[0].Node
	e, _ := r.openWatching(src.ID)
	_, b, _, _ := r.chainVolume(e, size, 5)
	held := []string{src.Replicas[0].ID}
	r.recordSnapshot(src.ID, "s1", held)
	r.recordSnapshot(src.ID, "s2", held)

	v := r.restoreVolume("flatrestored", "s2", size, 3)
	var blank []string
	for _, rep := range v.Replicas {
		if rep.Source == "" {
			blank = append(blank, rep.ID)
		} else if rep.Node != holderNode {
			t.Fatalf("a replica made from the layers on %s, not on the holder %s", rep.Node, holderNode)
		}
	}
	if len(blank) != 2 {
		t.Fatalf("the restore made %d blank replicas, want 2: %+v", len(blank), v.Replicas)
	}
	re, rebuilt := r.openWatching(v.ID)
	for _, id := range blank {
		st := waitRebuilt(t, rebuilt, id)
		if st.LayersCarried != 1 || st.LayerBytesCopied > size {
			t.Fatalf("rebuild of %s carried %d layers and %d bytes of them, want 1 layer (s2 flattened) of at most %d", id, st.LayersCarried, st.LayerBytesCopied, size)
		}
	}
	r.healthyIdentical(v.ID, b)
	for _, rep := range r.volume(v.ID).Replicas {
		rr, _ := r.replicaOn(v.ID, rep.Node)
		want := []string{"s2"}
		if rep.Node == holderNode {
			want = []string{"s1", "s2"}
		}
		if got := rr.LayerIDs(); !slices.Equal(got, want) {
			t.Fatalf("replica %s on %s has layers %v, want %v", rep.ID, rep.Node, got, want)
		}
		expectSnapshotData(t, rr, "s2", b)
	}

	// A snapshot of the restored volume, more writes, then the holder's
	// node dies and its replica is replaced on the fourth node.
	_, write := r.modelWriter(re, size, 6)
	write(3*mib, 100<<10)
	if err := re.Snapshot(r.ctx(), "o1"); err != nil {
		t.Fatal(err)
	}
	var lost string
	for _, rep := range r.volume(v.ID).Replicas {
		if rep.Node == holderNode {
			lost = rep.Node
		}
	}
	r.heartbeat(slices.DeleteFunc([]string{"n1", "n2", "n3", "n4"}, func(n string) bool { return n == lost })...)
	r.kill(lost)
	r.failReplica(v.ID, lost)
	fresh := r.replaceReplica(v.ID, lost)
	waitRebuilt(t, rebuilt, fresh.ID)
	rr, _ := r.replicaOn(v.ID, fresh.Node)
	if got := rr.LayerIDs(); !slices.Equal(got, []string{"s2", "o1"}) {
		t.Fatalf("the replacement has layers %v, want [s2 o1]", got)
	}
	expectSnapshotData(t, rr, "s2", b)
}

// volume reads volume id from the store.
func (r *rig) volume(id string) *meta.Volume {
	r.t.Helper()
	v, err := r.meta.Volume(r.ctx(), id)
	if err != nil {
		r.t.Fatal(err)
	}
	return v
}

// expectSnapshotData checks that snapshot id reads as want on replica rr.
func expectSnapshotData(t *testing.T, rr *replica.Replica, id string, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if err := rr.ReadSnapshotAt(rr.Epoch(), id, got, 0); err != nil {
		t.Fatalf("replica %s: read snapshot %s: %v", rr.ID(), id, err)
	}
	if i := firstDiff(got, want); i < len(want) {
		t.Fatalf("replica %s: snapshot %s differs at byte %d", rr.ID(), id, i)
	}
}
