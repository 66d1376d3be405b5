package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// BenchmarkFioRandWrite measures 4 KiB random writes at queue depth 32 with
// fio's nbd engine, through this server on a file backend and, for
// comparison, through nbdkit's file plugin on the same kind of file. Run it
// once per target:
//
//	go test -run '^$' -bench FioRandWrite -benchtime 1x ./driver/frontend/nbd
//
// CAIRN_NBD_BENCH_SECONDS sets fio's runtime (default 10).
func BenchmarkFioRandWrite(b *testing.B) {
	fio, err := exec.LookPath("fio")
	if err != nil {
		b.Skip("fio is not installed")
	}
	runtime := 10
	if v := os.Getenv("CAIRN_NBD_BENCH_SECONDS"); v != "" {
		if runtime, err = strconv.Atoi(v); err != nil {
			b.Fatalf("CAIRN_NBD_BENCH_SECONDS: %v", err)
		}
	}
	const size = 1 << 30

	b.Run("cairn", func(b *testing.B) {
		l, path := benchListener(b)
		s := NewServer(nil, testExport, newFileBackend(b, size), Options{})
		done := make(chan error, 1)
		go func() { done <- s.Serve(l) }()
		defer func() {
			if err := s.Close(); err != nil {
				b.Error(err)
			}
			<-done
		}()
		runFio(b, fio, path, runtime)
	})

	b.Run("nbdkit", func(b *testing.B) {
		nbdkit, err := exec.LookPath("nbdkit")
		if err != nil {
			b.Skip("nbdkit is not installed")
		}
		img := newFileBackend(b, size).f.Name()
		dir := b.TempDir()
		path := filepath.Join(dir, "nbdkit.sock")
		pidfile := filepath.Join(dir, "nbdkit.pid") // written once nbdkit listens
		cmd := exec.Command(nbdkit, "--foreground", "--unix", path, "--pidfile", pidfile, "file", img)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() {
			_ = cmd.Process.Kill() // the benchmark is over; its exit status says nothing
			_ = cmd.Wait()
		}()
		for deadline := time.Now().Add(10 * time.Second); ; {
			if _, err := os.Stat(pidfile); err == nil {
				break
			}
			if time.Now().After(deadline) {
				b.Fatal("nbdkit did not start")
			}
			time.Sleep(20 * time.Millisecond)
		}
		runFio(b, fio, path, runtime)
	})
}

func benchListener(b *testing.B) (net.Listener, string) {
	path := filepath.Join(b.TempDir(), "cairn.sock")
	l, err := ListenUnix(path)
	if err != nil {
		b.Fatal(err)
	}
	return l, path
}

// runFio runs the 4k QD32 random-write job b.N times and reports IOPS.
func runFio(b *testing.B, fio, socket string, seconds int) {
	var iops, p99 float64
	b.ResetTimer()
	for range b.N {
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(seconds+60)*time.Second)
		out, err := exec.CommandContext(ctx, fio,
			"--name=randwrite", "--ioengine=nbd", "--uri="+nbdURI(socket),
			"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=1G",
			fmt.Sprintf("--runtime=%d", seconds), "--time_based", "--ramp_time=1",
			"--output-format=json").Output()
		cancel()
		if err != nil {
			b.Fatalf("fio: %v\n%s", err, out)
		}
		// fio prints a line of its own before the JSON.
		if i := bytes.IndexByte(out, '{'); i > 0 {
			out = out[i:]
		}
		var res struct {
			Jobs []struct {
				Write struct {
					IOPS  float64 `json:"iops"`
					ClatN struct {
						Percentile map[string]float64 `json:"percentile"`
					} `json:"clat_ns"`
				} `json:"write"`
			} `json:"jobs"`
		}
		if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) != 1 {
			b.Fatalf("fio output: %v\n%s", err, out)
		}
		iops += res.Jobs[0].Write.IOPS
		p99 += res.Jobs[0].Write.ClatN.Percentile["99.000000"] / 1e3
	}
	b.ReportMetric(iops/float64(b.N), "IOPS")
	b.ReportMetric(p99/float64(b.N), "p99-µs")
	b.ReportMetric(0, "ns/op")
}

// nullBackend does nothing, so BenchmarkPipelined measures the server alone.
type nullBackend struct{ size uint64 }

func (b nullBackend) Size() uint64                                          { return b.size }
func (nullBackend) ReadAt(context.Context, []byte, uint64) error            { return nil }
func (nullBackend) WriteAt(context.Context, []byte, uint64, bool) error     { return nil }
func (nullBackend) Flush(context.Context) error                             { return nil }
func (nullBackend) Trim(context.Context, uint64, uint64) error              { return nil }
func (nullBackend) WriteZeroes(context.Context, uint64, uint64, bool) error { return nil }

// BenchmarkPipelined sends 4 KiB requests 32 at a time over a unix socket to
// a server on a backend that does nothing; allocs/op counts the server's
// allocations per request (the client here allocates nothing per request).
func BenchmarkPipelined(b *testing.B) {
	for _, typ := range []uint16{cmdWrite, cmdRead} {
		b.Run(opNames[opOf(typ)], func(b *testing.B) {
			const depth, size = 32, 4096
			_, path := startServer(b, nullBackend{size: 1 << 30}, Options{})
			c := dialExport(b, path, testExport)
			req := appendRequestHeader(nil, request{typ: typ, length: size})
			if typ == cmdWrite {
				req = append(req, make([]byte, size)...)
			}
			replyLen := replyHeaderLen
			if typ == cmdRead {
				replyLen += size
			}
			replies := make([]byte, replyLen)
			inFlight := make(chan struct{}, depth)
			done := make(chan error, 1)
			b.ReportAllocs()
			b.SetBytes(size)
			b.ResetTimer()
			go func() {
				for range b.N {
					if _, err := io.ReadFull(c.nc, replies); err != nil {
						done <- err
						return
					}
					<-inFlight
				}
				done <- nil
			}()
			for range b.N {
				inFlight <- struct{}{}
				if _, err := c.nc.Write(req); err != nil {
					b.Fatal(err)
				}
			}
			if err := <-done; err != nil {
				b.Fatal(err)
			}
		})
	}
}
