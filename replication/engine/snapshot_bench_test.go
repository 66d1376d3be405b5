package engine

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"
)

// BenchmarkSnapshotPause: the pause a snapshot puts on writes, seen by 32
// writers of 4 KiB random writes (queue depth 32) to a 3-replica volume
// over TCP: their latency with no snapshot and with one taken every 100
// ms, side by side. Reports write p50, p99 and max in µs, and the
// snapshot calls' p50 and max in ms (the time writes wait).
func BenchmarkSnapshotPause(b *testing.B) {
	for _, every := range []time.Duration{0, 100 * time.Millisecond} {
		name := "snapshots=none"
		if every > 0 {
			name = fmt.Sprintf("snapshots=every-%s", every)
		}
		b.Run(name, func(b *testing.B) {
			r := newRig(b, 3)
			r.checksums = true
			v := r.createVolume("pause", 64*mib, 3, 0, "n1")
			e := r.open(v.ID, "n1")
			ctx := r.ctx()
			var (
				mu    sync.Mutex
				lat   []time.Duration
				snaps []time.Duration
			)
			stop := make(chan struct{})
			var snapper sync.WaitGroup
			if every > 0 {
				snapper.Add(1)
				go func() {
					defer snapper.Done()
					t := time.NewTicker(every)
					defer t.Stop()
					for n := 0; ; n++ {
						select {
						case <-stop:
							return
						case <-t.C:
						}
						t0 := time.Now()
						if err := e.Snapshot(ctx, fmt.Sprint("s", n)); err != nil {
							b.Error(err)
							return
						}
						snaps = append(snaps, time.Since(t0))
						if n >= 8 { // keep the chain short: drop the oldest
							if err := e.DeleteSnapshot(ctx, fmt.Sprint("s", n-8)); err != nil {
								b.Error(err)
								return
							}
						}
					}
				}()
			}
			b.SetParallelism(16) // 32 writers on 2 CPUs
			b.RunParallel(func(pb *testing.PB) {
				rng := rand.New(rand.NewPCG(rand.Uint64(), 1))
				p := make([]byte, 4096)
				var mine []time.Duration
				for pb.Next() {
					off := rng.Uint64N(v.SizeBytes/4096) * 4096
					t0 := time.Now()
					if err := e.WriteAt(context.Background(), p, off, false); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
			close(stop)
			snapper.Wait()
			slices.Sort(lat)
			us := func(d time.Duration) float64 { return float64(d) / 1e3 }
			b.ReportMetric(us(lat[len(lat)/2]), "p50-µs")
			b.ReportMetric(us(lat[len(lat)*99/100]), "p99-µs")
			b.ReportMetric(us(lat[len(lat)-1]), "max-µs")
			if len(snaps) > 0 {
				slices.Sort(snaps)
				b.ReportMetric(float64(snaps[len(snaps)/2])/1e6, "snap-p50-ms")
				b.ReportMetric(float64(snaps[len(snaps)-1])/1e6, "snap-max-ms")
			}
		})
	}
}
