package engine

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
)

// BenchmarkRebuildCopyRate: the rate at which a rebuild fills a blank
// replica on a new node, over TCP, for a 64 MiB volume full of data, side
// by side:
//   - in=head: the data is in the head (no snapshot), copied extent by
//     extent as without snapshots;
//   - in=layer: the data is in a sealed layer (one snapshot, nothing
//     written since): the layer is carried, and the head has nothing to
//     copy;
//   - in=flattened: a restore. A one-replica volume holds the data in two
//     layers (a snapshot, half the volume written again, a second
//     snapshot); it is restored from the second into two replicas, one
//     made by hard links on the source's node, the other blank on another
//     node, which its rebuild fills with the two layers flattened into one
//     (docs/snapshots.md, "Chain depth and flattening").
//
// Reports MB/s of data copied and the rebuild's time.
func BenchmarkRebuildCopyRate(b *testing.B) {
	for _, in := range []string{"head", "layer", "flattened"} {
		b.Run("in="+in, func(b *testing.B) {
			var copied uint64
			var took time.Duration
			for i := range b.N {
				b.StopTimer()
				r := newRig(b, 4)
				r.checksums = true
				var st RebuildStats
				if in == "flattened" {
					st = r.restoreElsewhere(b, i)
				} else {
					st = r.replaceAfterLoss(b, i, in == "layer")
				}
				copied += st.BytesCopied
				took += st.Duration
				b.StartTimer()
			}
			b.ReportMetric(float64(copied)/took.Seconds()/1e6, "MB/s")
			b.ReportMetric(took.Seconds()/float64(b.N), "rebuild-s")
		})
	}
}

// replaceAfterLoss writes a 64 MiB 3-replica volume full (and snapshots it
// if snapshot), loses a node of a replica, and returns the stats of the
// rebuild of its replacement on the fourth node.
func (r *rig) replaceAfterLoss(b *testing.B, i int, snapshot bool) RebuildStats {
	v := r.createVolume(fmt.Sprint("rate", i), 64*mib, 3, 0, "n1")
	var lost string
	for _, rep := range v.Replicas {
		if rep.Node != "n1" {
			lost = rep.Node
		}
	}
	r.heartbeat(slices.DeleteFunc([]string{"n1", "n2", "n3", "n4"}, func(n string) bool { return n == lost })...)
	e, rebuilt := r.openWatching(v.ID)
	_, write := r.modelWriter(e, v.SizeBytes, uint64(i))
	for off := uint64(0); off < v.SizeBytes; off += mib {
		write(off, mib)
	}
	if snapshot {
		if err := e.Snapshot(r.ctx(), "s1"); err != nil {
			b.Fatal(err)
		}
	}
	r.kill(lost)
	r.failReplica(v.ID, lost)
	b.StartTimer()
	fresh := r.replaceReplica(v.ID, lost)
	st := waitRebuilt(b, rebuilt, fresh.ID)
	b.StopTimer()
	return st
}

// restoreElsewhere makes a one-replica 64 MiB volume whose data lies in
// two snapshots' layers, restores the second into two replicas, and
// returns the stats of the rebuild of the one placed where the layers are
// not.
func (r *rig) restoreElsewhere(b *testing.B, i int) RebuildStats {
	src := r.createVolume(fmt.Sprint("flatsrc", i), 64*mib, 1, 0, "n1")
	e, _ := r.openWatching(src.ID)
	_, write := r.modelWriter(e, src.SizeBytes, uint64(i))
	for off := uint64(0); off < src.SizeBytes; off += mib {
		write(off, mib)
	}
	if err := e.Snapshot(r.ctx(), "s1"); err != nil {
		b.Fatal(err)
	}
	for off := uint64(0); off < src.SizeBytes; off += 2 * mib {
		write(off, mib)
	}
	if err := e.Snapshot(r.ctx(), "s2"); err != nil {
		b.Fatal(err)
	}
	r.recordSnapshot(src.ID, "s1", []string{src.Replicas[0].ID})
	r.recordSnapshot(src.ID, "s2", []string{src.Replicas[0].ID})
	b.StartTimer()
	v := r.restoreVolume(fmt.Sprint("flat", i), "s2", src.SizeBytes, 2)
	_, rebuilt := r.openWatching(v.ID)
	for _, rep := range v.Replicas {
		if rep.Source == "" {
			st := waitRebuilt(b, rebuilt, rep.ID)
			b.StopTimer()
			if st.LayersCarried != 1 {
				b.Fatalf("the rebuild carried %d layers, want s2 flattened", st.LayersCarried)
			}
			return st
		}
	}
	b.Fatalf("no replica of the restore was placed where the layers are not: %+v", v.Replicas)
	return RebuildStats{}
}

// failReplica marks the replica of volume id on node failed in the store,
// as an engine that found it gone would (unless one did already).
func (r *rig) failReplica(id, node string) {
	r.t.Helper()
	for {
		v, err := r.meta.Volume(r.ctx(), id)
		if err != nil {
			r.t.Fatal(err)
		}
		i := slices.IndexFunc(v.Replicas, func(rep meta.Replica) bool { return rep.Node == node })
		if i < 0 || v.Replicas[i].State != meta.ReplicaHealthy {
			return
		}
		_, err = r.meta.Apply(r.ctx(), &meta.SetReplicaState{VolumeID: id, ReplicaID: v.Replicas[i].ID,
			State: meta.ReplicaFailed, ExpectEpoch: v.Epoch})
		if err != nil && !errors.Is(err, meta.ErrEpochMismatch) {
			r.t.Fatal(err)
		}
	}
}
