package engine

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkEncryption: the cost of encryption at rest where it is paid,
// the engine: a 3-replica volume (replica servers on TCP, the engine's
// node's own replica in process, files in a temporary directory) with
// aes-256-gcm and the same volume plain, side by side in one run. Each
// job runs in alternating windows on the two volumes (pairs, the plain one
// first in odd pairs); it reports each side's IOPS of the last pair and the
// median of the pairs' ratios (encrypted ÷ plain). Targets
// (docs/encryption.md): at least 0.8 for 4 KiB, 0.6 for 1 MiB.
func BenchmarkEncryption(b *testing.B) {
	const (
		size   = 256 * mib
		window = 1500 * time.Millisecond
		pairs  = 3
	)
	jobs := []struct {
		name  string
		bs    int
		depth int
		write bool
		seq   bool
	}{
		{"4k-randwrite-qd32", 4096, 32, true, false},
		{"4k-randread-qd32", 4096, 32, false, false},
		{"1m-write-qd8", 1 << 20, 8, true, true},
		{"1m-read-qd8", 1 << 20, 8, false, true},
	}
	r := newRig(b, 3)
	r.checksums = true
	plainVol := r.createVolume("plain", size, 3, 0, "n1")
	plain := r.openLocal(plainVol.ID, "n1")
	encVol, key := r.createEncrypted("sealed", size)
	enc, err := Open(r.ctx(), Config{VolumeID: encVol.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 10 * time.Second,
		DataKey: key, Local: r.servers["n1"].srv})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = enc.Close(context.Background()) })
	ctx := r.ctx()
	// Filled, so that reads read data (and the encrypted one opens it).
	for _, e := range []*Engine{plain, enc} {
		p := make([]byte, 1<<20)
		for off := uint64(0); off < size; off += 1 << 20 {
			for i := range p {
				p[i] = byte(off>>20) + byte(i)
			}
			if err := e.WriteAt(ctx, p, off, false); err != nil {
				b.Fatal(err)
			}
		}
	}
	for _, job := range jobs {
		b.Run(job.name, func(b *testing.B) {
			run := func(e *Engine) float64 {
				var ops atomic.Int64
				var next atomic.Uint64
				deadline := time.Now().Add(window)
				var wg sync.WaitGroup
				for w := range job.depth {
					wg.Add(1)
					go func() {
						defer wg.Done()
						rng := rand.New(rand.NewPCG(uint64(w), 1))
						p := make([]byte, job.bs)
						for i := range p {
							p[i] = byte(rng.Uint32())
						}
						for time.Now().Before(deadline) {
							var off uint64
							if job.seq {
								off = next.Add(uint64(job.bs)) % size / uint64(job.bs) * uint64(job.bs)
							} else {
								off = rng.Uint64N(size/uint64(job.bs)) * uint64(job.bs)
							}
							var err error
							if job.write {
								err = e.WriteAt(ctx, p, off, false)
							} else {
								err = e.ReadAt(ctx, p, off)
							}
							if err != nil {
								b.Error(err)
								return
							}
							ops.Add(1)
						}
					}()
				}
				wg.Wait()
				return float64(ops.Load()) / window.Seconds()
			}
			var ratios []float64
			var p, s float64
			for i := range pairs {
				if i%2 == 0 {
					p, s = run(plain), run(enc)
				} else {
					s, p = run(enc), run(plain)
				}
				ratios = append(ratios, s/p)
			}
			slices.Sort(ratios)
			unit := "IOPS"
			if job.bs >= 1<<20 {
				unit, p, s = "MiB/s", p*float64(job.bs)/mib, s*float64(job.bs)/mib
			}
			b.ReportMetric(p, "plain-"+unit)
			b.ReportMetric(s, "aes-"+unit)
			b.ReportMetric(ratios[len(ratios)/2], "ratio")
			b.Logf("%s: plain %.0f %s, aes-256-gcm %.0f %s; ratios %v (median %.2f)", job.name, p, unit, s, unit, fmtRatios(ratios), ratios[len(ratios)/2])
		})
	}
}

func fmtRatios(rs []float64) string {
	out := ""
	for i, r := range rs {
		if i > 0 {
			out += " "
		}
		out += fmt.Sprintf("%.2f", r)
	}
	return out
}
