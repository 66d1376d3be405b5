package main

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

// The compression part (docs/compression.md): two 1-replica volumes on
// the same disk, P without compression and Z with compression lz4, take
// the same fio jobs one after the other, on compressible data (fio's
// --buffer_compress_percentage), before any volume with deduplication
// exists. The targets are Z ÷ P: 4k random writes ≥ 0.5, 4k random
// reads ≥ 0.7, 1 MiB sequential writes and reads ≥ 0.6.

// recompressEvery is the node's --recompress-interval here: long enough
// that few passes fall in the timed jobs, short enough to wait for two.
const recompressEvery = 20 * time.Second

// compressible is fio's data for the writes: each 4 KiB buffer three
// quarters a repeated pattern, a quarter random, made anew for every I/O.
var compressible = []string{"--buffer_compress_percentage=75", "--buffer_compress_chunk=4096", "--refill_buffers"}

// compressJob is one fio job run on both volumes.
type compressJob struct {
	name   string
	args   []string
	timed  bool
	mibs   bool    // compare MiB/s (else IOPS)
	target float64 // Z ÷ P at least
}

var compressJobs = []compressJob{
	{name: "1M write QD8 (fill)", args: append([]string{"--rw=write", "--bs=1M", "--iodepth=8"}, compressible...), mibs: true, target: 0.6},
	{name: "1M read QD8", args: []string{"--rw=read", "--bs=1M", "--iodepth=8"}, timed: true, mibs: true, target: 0.6},
	{name: "4k randread QD32", args: []string{"--rw=randread", "--bs=4k", "--iodepth=32"}, timed: true, target: 0.7},
	{name: "4k randwrite QD32", args: append([]string{"--rw=randwrite", "--bs=4k", "--iodepth=32"}, compressible...), timed: true, target: 0.5},
}

// incompressibleJob runs last, once recompression was measured: the
// issue asks that incompressible data cost no space and at most a few
// percent of speed.
var incompressibleJob = compressJob{name: "1M write QD8, random data", args: []string{"--rw=write", "--bs=1M", "--iodepth=8", "--refill_buffers"},
	mibs: true, target: 0.95}

// compressResult is what compression measured.
type compressResult struct {
	p, z                 []*result
	pBytes, zBytes       int64 // on disk after the fill
	pAfter, zAfter       int64 // on disk after every job (the random writes last)
	zRecompressed        int64 // Z on disk once two recompression passes ran after the jobs
	pRandom, zRandom     int64 // on disk after incompressibleJob
	pID, zID, pDir, zDir string
}

// compression runs the jobs on P and Z side by side.
func (b *bench) compression(ctx context.Context) (*compressResult, error) {
	cr := &compressResult{}
	var err error
	if cr.pID, err = b.createWith(ctx, "plain", "type="+diskType); err != nil {
		return nil, err
	}
	if cr.zID, err = b.createWith(ctx, "lz4", "type="+diskType, "compression=lz4"); err != nil {
		return nil, err
	}
	sockP, sockZ := filepath.Join(b.tmp, "p.sock"), filepath.Join(b.tmp, "z.sock")
	if err := b.export(ctx, cr.pID, sockP); err != nil {
		return nil, err
	}
	if err := b.export(ctx, cr.zID, sockZ); err != nil {
		return nil, err
	}
	run := func(i int, j compressJob) error {
		args := j.args
		if j.timed {
			args = append(append([]string(nil), args...), benchkit.FioTimed(b.o.runtime)...)
		}
		for _, v := range []struct {
			name, sock string
			out        *[]*result
		}{{"P", sockP, &cr.p}, {"Z", sockZ, &cr.z}} {
			b.logf("compression: %s on %s", j.name, v.name)
			r, err := b.fio(ctx, fmt.Sprintf("c%d-%s", i, v.name), v.sock, args...)
			if err != nil {
				return err
			}
			*v.out = append(*v.out, r)
		}
		return nil
	}
	for i, j := range compressJobs {
		if err := run(i, j); err != nil {
			return nil, err
		}
		if i == 0 {
			if cr.pDir, err = replicaDir(b.mnt, cr.pID); err == nil {
				cr.zDir, err = replicaDir(b.mnt, cr.zID)
			}
			if err != nil {
				return nil, err
			}
			cr.pBytes, cr.zBytes = dirAllocated(cr.pDir), dirAllocated(cr.zDir)
		}
	}
	cr.pAfter, cr.zAfter = dirAllocated(cr.pDir), dirAllocated(cr.zDir)
	b.logf("compression: waiting for two recompression passes (every %s)", recompressEvery)
	node := b.nodes[0]
	if err := waitPasses(ctx, node, 2); err != nil {
		return nil, err
	}
	cr.zRecompressed = dirAllocated(cr.zDir)
	if err := run(len(compressJobs), incompressibleJob); err != nil {
		return nil, err
	}
	for _, id := range []string{cr.pID, cr.zID} {
		if err := b.unexport(ctx, id); err != nil {
			return nil, err
		}
	}
	// Measured once a recompression pass synced Z (fio does not flush):
	// the slots the random data replaced are punched then, and the
	// deduplication part after this sees a file system that holds still.
	if err := waitPasses(ctx, node, 1); err != nil {
		return nil, err
	}
	cr.pRandom, cr.zRandom = dirAllocated(cr.pDir), dirAllocated(cr.zDir)
	return cr, nil
}

// print writes the compression table.
func (cr *compressResult) print(b *bench) error {
	w := os.Stdout
	fmt.Fprintf(w, "\ncompression: P and Z, %s 1-replica volumes of type %s, P without compression, Z with lz4; data written by fio with --buffer_compress_percentage=75, then random (last job)\n\n", b.o.size, diskType)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "job\tP\tZ\tZ ÷ P\ttarget\t\t")
	for i, j := range append(compressJobs, incompressibleJob) {
		p, z := cr.p[i], cr.z[i]
		pv, zv, unit := p.iops, z.iops, "IOPS"
		if j.mibs {
			pv, zv, unit = p.mibs, z.mibs, "MiB/s"
		}
		ratio := zv / pv
		verdict := "met"
		if ratio < j.target {
			verdict = "NOT met"
		}
		fmt.Fprintf(tw, "%s\t%.0f %s\t%.0f %s\t%.2f\t≥ %g\t%s\t\n", j.name, pv, unit, zv, unit, ratio, j.target, verdict)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "\non disk after the fill: P %s, Z %s (%.2fx); after every job (4k random writes last): P %s, Z %s (%.2fx)\n",
		benchkit.HumanBytes(uint64(cr.pBytes)), benchkit.HumanBytes(uint64(cr.zBytes)), float64(cr.zBytes)/float64(cr.pBytes),
		benchkit.HumanBytes(uint64(cr.pAfter)), benchkit.HumanBytes(uint64(cr.zAfter)), float64(cr.zAfter)/float64(cr.pAfter))
	fmt.Fprintf(w, "Z after two recompression passes (--recompress-interval=%s): %s (%.2fx P)\n", recompressEvery,
		benchkit.HumanBytes(uint64(cr.zRecompressed)), float64(cr.zRecompressed)/float64(cr.pAfter))
	fmt.Fprintf(w, "after the random data (the last job), once a recompression pass synced Z: P %s, Z %s (%.3fx)\n",
		benchkit.HumanBytes(uint64(cr.pRandom)), benchkit.HumanBytes(uint64(cr.zRandom)), float64(cr.zRandom)/float64(cr.pRandom))
	return nil
}

// waitPasses waits until node n has finished k more recompression passes.
func waitPasses(ctx context.Context, n benchkit.Node, k float64) error {
	for p0 := metric(ctx, n, "cairn_recompress_passes_total"); metric(ctx, n, "cairn_recompress_passes_total") < p0+k; {
		if err := benchkit.Sleep(ctx, time.Second); err != nil {
			return err
		}
	}
	return nil
}

// replicaDir finds the directory of the one replica of volume id under
// the data directory root.
func replicaDir(root, id string) (string, error) {
	var found string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && strings.HasPrefix(d.Name(), id+"-r") {
			found = path
			return filepath.SkipAll
		}
		return nil
	})
	if err == nil && found == "" {
		err = fmt.Errorf("no replica of %s under %s", id, root)
	}
	return found, err
}

// dirAllocated is the disk space the files under dir take (after a sync).
func dirAllocated(dir string) int64 {
	syscall.Sync()
	var n int64
	_ = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		var st syscall.Stat_t
		if syscall.Stat(path, &st) == nil {
			n += st.Blocks * 512
		}
		return nil
	})
	return n
}
