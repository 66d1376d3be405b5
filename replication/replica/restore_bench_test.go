package replica

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// BenchmarkRestore: the time to make a replica from a snapshot on the node
// that holds its layers (CreateFromSnapshot: hard links and a new head),
// for a full 1 GiB and a full 16 GiB volume with 4 snapshots in the chain.
// The target: independent of the size (the two the same within
// noise). Reports p50 and p99 in ms beside ns/op.
func BenchmarkRestore(b *testing.B) {
	for _, size := range []uint64{1 << 30, 16 << 30} {
		b.Run(fmt.Sprintf("size=%dGiB", size>>30), func(b *testing.B) {
			dir := b.TempDir()
			src := fillReplica(b, dir, size)
			defer func() { _ = src.Remove() }()
			p := randBytes(SumBlockSize, 3)
			for i := range 4 {
				if err := src.WriteAt(1, p, uint64(i)<<20, false); err != nil {
					b.Fatal(err)
				}
				if err := src.Snapshot(1, fmt.Sprint("s", i)); err != nil {
					b.Fatal(err)
				}
			}
			var took []time.Duration
			n := 0
			for b.Loop() {
				id := fmt.Sprint("restored", n)
				t0 := time.Now()
				if err := CreateFromSnapshot(dir, id, src, "s2", size); err != nil {
					b.Fatal(err)
				}
				took = append(took, time.Since(t0))
				b.StopTimer()
				r, err := Open(filepath.Join(dir), id, 0, 0)
				if err != nil {
					b.Fatal(err)
				}
				if err := r.Remove(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				n++
			}
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2])/1e6, "p50-ms")
			b.ReportMetric(float64(took[len(took)*99/100])/1e6, "p99-ms")
		})
	}
}
