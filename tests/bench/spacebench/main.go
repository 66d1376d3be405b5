// Command spacebench measures what compression and deduplication cost and
// buy: compression side by side with a volume without it (compress.go,
// docs/compression.md), and for deduplication (docs/deduplication.md) how
// fast a node's pass hashes, how much a foreground volume's latency
// suffers while it runs, and the space before and after.
//
// It builds bin/cairn, makes an xfs with reflinks (mkfs.xfs -m reflink=1)
// on a loop device over a sparse file in a temporary directory, and starts
// a 1-node dev cluster whose data directory of disk type xfs is that file
// system, its node agent running a pass every second
// (--dedup-interval=1s, so that one is always running once there is
// something to share). Volumes are 1-replica, of type xfs, exported on the
// node over NBD; fio's nbd engine drives them.
//
//   - A, the foreground: a -size volume without deduplication, filled, then
//     read with 4k random reads at iodepth 4, --rate_iops at 20% of what it
//     does unthrottled (as noisybench's A), once before any volume with
//     deduplication exists (no pass has work) and once while passes run;
//   - D1..Dn: -copies volumes with deduplication, each written with the
//     same -size of random data (nbdcopy), the passes' work.
//
// It prints A's latency percentiles and IOPS in both runs with the p99
// ratio (target of the issue: at most 2x), the passes' hashing rate in
// MiB/s with A running and without, and the file system's use before and
// after the passes.
//
// It never fails on a number: it exits 1 only when something could not be
// set up or a fio run failed, 2 on bad flags, 130 after Ctrl-C. The
// cluster, the mount, the loop device and the temporary directory are
// removed in every case.
//
//	go run ./tests/bench/spacebench [-size 1Gi] [-copies 4] [-runtime 15s] [-keep] [-v]
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

const (
	prog      = "spacebench"
	rateShare = 0.20
	diskType  = "xfs"
)

type options struct {
	benchkit.Flags
	size    string
	copies  int
	runtime time.Duration
}

type bench struct {
	o         options
	sizeBytes uint64
	tmp       string
	bin, root string
	clusterD  string
	mnt, dev  string
	nodes     []benchkit.Node
	servers   string
	exported  []string
}

func main() { os.Exit(run()) }

func run() int {
	var o options
	o.Register("the xfs image, the cluster, fio's JSON")
	flag.StringVar(&o.size, "size", "1Gi", "size of the foreground volume and of each deduplicated volume")
	flag.IntVar(&o.copies, "copies", 4, "volumes with deduplication written with the same data")
	flag.DurationVar(&o.runtime, "runtime", 15*time.Second, "length of each timed fio run")
	flag.Parse()
	b := &bench{o: o}
	var err error
	if b.sizeBytes, err = benchkit.ParseSize(o.size); err != nil || b.sizeBytes < 64<<20 || o.copies < 2 || o.runtime < 3*time.Second {
		fmt.Fprintf(os.Stderr, "%s: want -size of at least 64Mi, -copies of at least 2, -runtime of at least 3s\n", prog)
		return 2
	}
	ctx, stop := benchkit.SignalContext()
	defer stop()
	err = b.run(ctx)
	b.cleanup()
	return benchkit.ExitCode(ctx, prog, err)
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s: %s\n", prog, fmt.Sprintf(format, args...))
}

func (b *bench) cmd(ctx context.Context, name string, args ...string) ([]byte, error) {
	return benchkit.Command(ctx, b.root, b.o.Verbose, b.logf, name, args...)
}

func (b *bench) ctl(args ...string) []string {
	return append([]string{"ctl", "--server", b.servers}, args...)
}

// result is one fio run of A.
type result struct {
	iops, mibs     float64
	p50, p99, p999 float64 // ns
	hashedMiBs     float64 // the passes' hashing rate meanwhile
}

func (b *bench) run(ctx context.Context) error {
	for _, tool := range []string{"go", "fio", "nbdcopy", "mkfs.xfs", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (make deps installs fio, libnbd-bin and xfsprogs)", tool)
		}
	}
	var err error
	if b.root, b.bin, err = benchkit.BuildCairn(ctx, prog, b.o.Verbose, b.logf); err != nil {
		return err
	}
	if b.tmp, err = os.MkdirTemp(b.o.Parent, "cairn-spacebench-"); err != nil {
		return err
	}
	if err := b.makeXFS(ctx); err != nil {
		return err
	}
	args := []string{"dev", "up", "--nodes", "1", "--dir", b.clusterD, "--insecure", "--disk-types", diskType,
		"--node-arg=--dedup-interval=1s", "--node-arg=--recompress-interval=" + recompressEvery.String()}
	for _, a := range b.o.NodeArgs {
		args = append(args, "--node-arg="+a)
	}
	b.logf("starting a 1-node dev cluster in %s, its %s data directory on %s", b.clusterD, diskType, b.dev)
	if _, err := b.cmd(context.WithoutCancel(ctx), b.bin, args...); err != nil {
		return fmt.Errorf("dev up: %w", err)
	}
	if b.nodes, b.servers, err = benchkit.LoadCluster(b.clusterD); err != nil {
		return err
	}
	node := b.nodes[0]

	// The node records its typed disk, and what its probe found, after
	// it starts.
	var a string
	for deadline := time.Now().Add(30 * time.Second); ; {
		if a, err = b.createVolume(ctx, "foreground", false); err == nil {
			break
		}
		if time.Now().After(deadline) || !strings.Contains(err.Error(), "resource exhausted") {
			return err
		}
		if err := benchkit.Sleep(ctx, time.Second); err != nil {
			return err
		}
	}
	sockA := filepath.Join(b.tmp, "a.sock")
	if err := b.export(ctx, a, sockA); err != nil {
		return err
	}
	b.logf("filling the foreground volume (%s)", b.o.size)
	if _, err := b.fio(ctx, "fill", sockA, "--rw=write", "--bs=1M", "--iodepth=8"); err != nil {
		return err
	}
	b.logf("A unthrottled, %s", b.o.runtime)
	free, err := b.fio(ctx, "free", sockA, append([]string{"--rw=randread", "--bs=4k", "--iodepth=4"}, benchkit.FioTimed(b.o.runtime)...)...)
	if err != nil {
		return err
	}
	rate := int(free.iops * rateShare)
	b.logf("A alone at %d IOPS (%.0f%% of %.0f)", rate, rateShare*100, free.iops)
	alone, err := b.measureRuns(ctx, "alone", sockA, node, rate)
	if err != nil {
		return err
	}

	// Compression, before any volume with deduplication gives the
	// passes work.
	comp, err := b.compression(ctx)
	if err != nil {
		return err
	}

	used0 := fsUsed(b.mnt)
	data := filepath.Join(b.tmp, "data.img")
	if err := randomFile(data, b.sizeBytes); err != nil {
		return err
	}
	for i := 1; i <= b.o.copies; i++ {
		v, err := b.createVolume(ctx, fmt.Sprintf("dedup-%d", i), true)
		if err != nil {
			return err
		}
		sock := filepath.Join(b.tmp, fmt.Sprintf("d%d.sock", i))
		if err := b.export(ctx, v, sock); err != nil {
			return err
		}
		b.logf("writing %s into %s (nbdcopy)", b.o.size, v)
		if _, err := b.cmd(ctx, "nbdcopy", "--flush", data, "nbd+unix:///?socket="+sock); err != nil {
			return err
		}
		if err := b.unexport(ctx, v); err != nil {
			return err
		}
	}
	written := fsUsed(b.mnt) - used0
	if err := os.Remove(data); err != nil {
		return err
	}
	b.logf("A while the passes run, %s", b.o.runtime)
	during, err := b.measureRuns(ctx, "during", sockA, node, rate)
	if err != nil {
		return err
	}
	b.logf("the passes alone, %s", b.o.runtime)
	h0 := metric(ctx, node, "cairn_dedup_hashed_bytes_total")
	t0 := time.Now()
	if err := benchkit.Sleep(ctx, b.o.runtime); err != nil {
		return err
	}
	passAlone := (metric(ctx, node, "cairn_dedup_hashed_bytes_total") - h0) / (1 << 20) / time.Since(t0).Seconds()
	p0 := metric(ctx, node, "cairn_dedup_passes_total")
	for metric(ctx, node, "cairn_dedup_passes_total") < p0+2 {
		if err := benchkit.Sleep(ctx, time.Second); err != nil {
			return err
		}
	}
	after := fsUsed(b.mnt) - used0
	saved := metric(ctx, node, "cairn_replica_dedup_saved_bytes")

	w := os.Stdout
	fmt.Fprintf(w, "spacebench %s, %s, %d CPUs, kernel %s\n", benchkit.Version(b.root), benchkit.CPUModel(), runtime.NumCPU(), benchkit.Kernel())
	fmt.Fprintf(w, "node-1: data directory of type %s on xfs (reflink=1) on %s; a pass every second; agent %s\n", diskType, b.dev, strings.Join(b.o.NodeArgs, " "))
	fmt.Fprintf(w, "A: %s volume, 4k randread iodepth 4 at %d IOPS (%.0f%% of the %.0f it does unthrottled), medians of %d runs each; %d volumes with deduplication of the same %s\n\n",
		b.o.size, rate, rateShare*100, free.iops, measureRepeats, b.o.copies, b.o.size)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tA IOPS\tA p50\tA p99\tA p99.9\tpass hashing MiB/s\t")
	fmt.Fprintf(tw, "A alone (no pass has work)\t%.0f\t%s\t%s\t%s\t%.0f\t\n", alone.iops, benchkit.Dur(alone.p50), benchkit.Dur(alone.p99), benchkit.Dur(alone.p999), alone.hashedMiBs)
	fmt.Fprintf(tw, "A while passes run\t%.0f\t%s\t%s\t%s\t%.0f\t\n", during.iops, benchkit.Dur(during.p50), benchkit.Dur(during.p99), benchkit.Dur(during.p999), during.hashedMiBs)
	fmt.Fprintf(tw, "passes alone\t\t\t\t\t%.0f\t\n", passAlone)
	if err := tw.Flush(); err != nil {
		return err
	}
	ratio := during.p99 / alone.p99
	verdict := "met"
	if ratio > 2 {
		verdict = "NOT met"
	}
	fmt.Fprintf(w, "\nA's p99 while the passes run: %.2fx alone (target at most 2x: %s)\n", ratio, verdict)
	fmt.Fprintf(w, "space on the xfs: %d x %s written took %s; after the passes %s (%.2fx one copy); the replicas report %s saved\n",
		b.o.copies, b.o.size, benchkit.HumanBytes(uint64(written)), benchkit.HumanBytes(uint64(after)), float64(after)/float64(b.sizeBytes),
		benchkit.HumanBytes(uint64(saved)))
	return comp.print(b)
}

// measureRepeats is how many runs of A measureRuns makes.
const measureRepeats = 3

// measureRuns runs A's paced job (4k random reads at iodepth 4, rate IOPS)
// on sock measureRepeats times, each a third of -runtime (at least 3 s),
// and keeps the median of each figure: one run's p99 on this VM moves by
// a third from run to run. It also measures the node's hashing rate over
// the same time.
func (b *bench) measureRuns(ctx context.Context, name, sock string, n benchkit.Node, rate int) (*result, error) {
	per := max(b.o.runtime/measureRepeats, 3*time.Second)
	args := append([]string{"--rw=randread", "--bs=4k", "--iodepth=4", "--rate_iops=" + strconv.Itoa(rate)}, benchkit.FioTimed(per)...)
	h0 := metric(ctx, n, "cairn_dedup_hashed_bytes_total")
	t0 := time.Now()
	var iops, p50, p99, p999 []float64
	for i := range measureRepeats {
		r, err := b.fio(ctx, fmt.Sprintf("%s-%d", name, i), sock, args...)
		if err != nil {
			return nil, err
		}
		iops, p50, p99, p999 = append(iops, r.iops), append(p50, r.p50), append(p99, r.p99), append(p999, r.p999)
	}
	return &result{iops: benchkit.Median(iops), p50: benchkit.Median(p50), p99: benchkit.Median(p99), p999: benchkit.Median(p999),
		hashedMiBs: (metric(ctx, n, "cairn_dedup_hashed_bytes_total") - h0) / (1 << 20) / time.Since(t0).Seconds()}, nil
}

func (b *bench) fio(ctx context.Context, name, sock string, args ...string) (*result, error) {
	out := filepath.Join(b.tmp, "fio-"+name+".json")
	all := append([]string{"--name=" + name, "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + sock,
		"--size=" + strconv.FormatUint(b.sizeBytes, 10), "--output-format=json", "--output=" + out}, args...)
	c := benchkit.FioCommand(ctx, b.o.Verbose, b.logf, all...)
	var stderr bytes.Buffer
	c.Stderr = &stderr
	if err := c.Run(); err != nil {
		return nil, fmt.Errorf("fio %s: %w: %s", name, err, strings.TrimSpace(stderr.String()))
	}
	job, err := benchkit.ReadFioJob(out, stderr.String())
	if err != nil {
		return nil, err
	}
	st := job.Read
	if st.TotalIOs == 0 {
		st = job.Write
	}
	pc := st.ClatNs.Percentile
	return &result{iops: st.IOPS, mibs: st.BWBytes / (1 << 20), p50: pc["50.000000"], p99: pc["99.000000"], p999: pc["99.900000"]}, nil
}

func (b *bench) createVolume(ctx context.Context, name string, dedup bool) (string, error) {
	return b.createWith(ctx, name, "type="+diskType, "deduplication="+strconv.FormatBool(dedup))
}

// createWith creates a 1-replica -size volume with the parameters given
// as key=value.
func (b *bench) createWith(ctx context.Context, name string, params ...string) (string, error) {
	args := b.ctl("volume", "create", name, "--size", b.o.size, "--replicas", "1", "-o", "json")
	for _, p := range params {
		args = append(args, "--param", p)
	}
	out, err := b.cmd(ctx, b.bin, args...)
	if err != nil {
		return "", err
	}
	var v benchkit.Volume
	if err := json.Unmarshal(out, &v); err != nil || v.ID == "" {
		return "", fmt.Errorf("volume create %s: no id in %q", name, out)
	}
	return v.ID, nil
}

func (b *bench) export(ctx context.Context, id, sock string) error {
	b.exported = append(b.exported, id)
	_, err := b.cmd(ctx, b.bin, b.ctl("volume", "export", id, "--node", b.nodes[0].ID, "--nbd", sock)...)
	return err
}

func (b *bench) unexport(ctx context.Context, id string) error {
	if _, err := b.cmd(ctx, b.bin, b.ctl("volume", "unexport", id)...); err != nil {
		return err
	}
	for i, e := range b.exported {
		if e == id {
			b.exported = append(b.exported[:i], b.exported[i+1:]...)
			break
		}
	}
	return nil
}

// makeXFS makes the xfs the node's typed data directory lives on.
func (b *bench) makeXFS(ctx context.Context) error {
	img := filepath.Join(b.tmp, "xfs.img")
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	size := int64(b.sizeBytes)*int64(b.o.copies+4) + 2<<30
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	out, err := b.cmd(ctx, "losetup", "--find", "--show", img)
	if err != nil {
		return err
	}
	b.dev = strings.TrimSpace(string(out))
	if _, err := b.cmd(ctx, "mkfs.xfs", "-q", "-m", "reflink=1", b.dev); err != nil {
		return err
	}
	b.clusterD = filepath.Join(b.tmp, "cluster")
	b.mnt = filepath.Join(b.clusterD, "node-1", "disk-"+diskType)
	if err := os.MkdirAll(b.mnt, 0o755); err != nil {
		return err
	}
	return syscall.Mount(b.dev, b.mnt, "xfs", 0, "")
}

// cleanup stops the cluster (dev down unmounts what is mounted under its
// directory, the xfs too), then unmounts the xfs if it is still mounted,
// frees the loop device and removes the temporary directory.
func (b *bench) cleanup() {
	ctx := context.Background()
	for _, id := range append([]string(nil), b.exported...) {
		if err := b.unexport(ctx, id); err != nil {
			b.logf("cleanup: %v", err)
		}
	}
	if b.nodes != nil {
		benchkit.DevDown(ctx, b.root, b.bin, b.clusterD, b.o.Keep, b.o.Verbose, b.logf, b.nodes)
	}
	if b.mnt != "" {
		if mi, _ := os.ReadFile("/proc/self/mountinfo"); bytes.Contains(mi, []byte(" "+b.mnt+" ")) {
			if err := syscall.Unmount(b.mnt, 0); err != nil {
				b.logf("cleanup: unmount %s: %v", b.mnt, err)
			}
		}
	}
	if b.dev != "" {
		if _, err := b.cmd(ctx, "losetup", "-d", b.dev); err != nil {
			b.logf("cleanup: %v", err)
		}
	}
	if b.tmp != "" {
		benchkit.RemoveTemp(b.tmp, b.o.Keep, b.logf)
	}
}

// metric is the sum of the samples of name on n's /metrics (0 if none).
func metric(ctx context.Context, n benchkit.Node, name string) float64 {
	m := benchkit.ScrapeMetrics(ctx, n.Metrics, func(key string) bool {
		return key == name || strings.HasPrefix(key, name+"{")
	})
	var sum float64
	for _, v := range m {
		sum += v
	}
	return sum
}

// fsUsed is what the file system at dir has in use, after a sync.
func fsUsed(dir string) int64 {
	syscall.Sync()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// randomFile writes n random bytes to path.
func randomFile(path string, n uint64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.CopyN(f, rand.Reader, int64(n)); err != nil {
		f.Close()
		return err
	}
	return errors.Join(f.Sync(), f.Close())
}
