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
// replacement replica on a new node, over TCP, for a 64 MiB volume full of
// data, side by side: held by the head (no snapshot: the extents are
// copied as today) and held by a sealed layer (one snapshot, nothing
// written since: the layer is carried, extent by extent, and the head has
// nothing to copy). Reports MB/s of data copied and the rebuild's time.
func BenchmarkRebuildCopyRate(b *testing.B) {
	for _, snapshot := range []bool{false, true} {
		name := "in=head"
		if snapshot {
			name = "in=layer"
		}
		b.Run(name, func(b *testing.B) {
			var copied uint64
			var took time.Duration
			for i := range b.N {
				b.StopTimer()
				r := newRig(b, 4)
				r.checksums = true
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
				copied += st.BytesCopied
				took += st.Duration
				b.StartTimer()
			}
			b.ReportMetric(float64(copied)/took.Seconds()/1e6, "MB/s")
			b.ReportMetric(took.Seconds()/float64(b.N), "rebuild-s")
		})
	}
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
