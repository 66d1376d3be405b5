//go:build linux

package fuse

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// fioResult is the part of fio's JSON output the benchmarks report.
type fioResult struct {
	Jobs []struct {
		Read  fioSide `json:"read"`
		Write fioSide `json:"write"`
	} `json:"jobs"`
}

type fioSide struct {
	IOPS    float64 `json:"iops"`
	BWBytes float64 `json:"bw_bytes"`
	ClatNS  struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

// fioRuntime is how long each fio run lasts: CAIRN_FIO_RUNTIME seconds, 10
// by default.
func fioRuntime() int {
	if v, err := strconv.Atoi(os.Getenv("CAIRN_FIO_RUNTIME")); err == nil && v > 0 {
		return v
	}
	return 10
}

// runFio runs one fio job on dev and returns the side that moved data.
func runFio(tb testing.TB, dev, rw, bs string, iodepth int) fioSide {
	tb.Helper()
	fio := needTool(tb, "fio")
	rt := fioRuntime()
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rt+60)*time.Second)
	defer cancel()
	args := []string{
		"--name=bench", "--filename=" + dev, "--rw=" + rw, "--bs=" + bs,
		"--iodepth=" + strconv.Itoa(iodepth), "--direct=1", "--ioengine=libaio",
		"--runtime=" + strconv.Itoa(rt), "--time_based", "--ramp_time=1",
		"--randrepeat=0", "--norandommap", "--output-format=json",
	}
	out, err := exec.CommandContext(ctx, fio, args...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		tb.Fatalf("fio %v: %v\n%s\n%s", args, err, out, stderr)
	}
	var r fioResult
	if err := json.Unmarshal(out, &r); err != nil || len(r.Jobs) != 1 {
		tb.Fatalf("fio output: %v\n%s", err, out)
	}
	if rw == "randread" || rw == "read" {
		return r.Jobs[0].Read
	}
	return r.Jobs[0].Write
}

// report records one fio job as metrics named after it (randwrite-4k-iops …).
func report(b *testing.B, rw, bs string, r fioSide) {
	p99 := r.ClatNS.Percentile["99.000000"] / 1e3
	prefix := rw + "-" + bs + "-"
	b.ReportMetric(r.IOPS, prefix+"iops")
	b.ReportMetric(r.BWBytes/1e6, prefix+"MB/s")
	b.ReportMetric(p99, prefix+"p99-µs")
	b.Logf("%s %s qd32: %.0f IOPS, %.1f MB/s, p99 %.0f µs", rw, bs, r.IOPS, r.BWBytes/1e6, p99)
}

// BenchmarkFio measures the loop device over a memory backend with fio
// (libaio, O_DIRECT, CAIRN_FIO_RUNTIME seconds per job): the default mount,
// the mount without async direct I/O and with go-fuse's default
// MaxBackground, and a loop device over a tmpfs file as the ceiling. Run it
// without -race: go test -run '^$' -bench Fio ./driver/frontend/fuse
// It reports; it never fails on a number.
func BenchmarkFio(b *testing.B) {
	const size = 1 << 30
	jobs := []struct{ rw, bs string }{{"randwrite", "4k"}, {"randread", "4k"}, {"write", "1m"}}
	for _, cfg := range []struct {
		name string
		tn   tuning
	}{
		{"fuse-asyncdio-bg128", defaultTuning},
		{"fuse-syncdio-bg12", tuning{asyncDIO: false, maxBackground: 12}},
	} {
		b.Run(cfg.name, func(b *testing.B) {
			s := mountTuned(b, cfg.tn)
			path, err := s.Add("bench", newMemBackend(size))
			if err != nil {
				b.Fatal(err)
			}
			dev := attachT(b, path)
			for range b.N {
				for _, j := range jobs {
					report(b, j.rw, j.bs, runFio(b, dev, j.rw, j.bs, 32))
				}
			}
		})
	}
	b.Run("loop-on-tmpfs", func(b *testing.B) {
		requireRoot(b)
		dir, err := os.MkdirTemp("/dev/shm", "cairn-fuse-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = os.RemoveAll(dir) })
		path := filepath.Join(dir, "bench.img")
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			b.Fatal(err)
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
		dev := attachT(b, path)
		for range b.N {
			for _, j := range jobs {
				report(b, j.rw, j.bs, runFio(b, dev, j.rw, j.bs, 32))
			}
		}
	})
}
