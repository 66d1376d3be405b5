// Command noisybench measures the noisy-neighbour protection of node-1's I/O
// scheduler: how much one volume's latency suffers when another volume on the
// same node floods it, or when a rebuild runs, with the scheduler in the path
// and with it bypassed (cairn node --no-iosched). It prints one table.
//
// It builds bin/cairn and runs two 3-node dev clusters (`cairn dev up`) one
// after the other in a temporary directory, every node with extra flags
// (`cairn dev up --node-arg`): `--rebuild-rate` and `--iosched-depth` in the
// first cluster, so that the rebuild is slow enough to overlap a
// measurement, `--no-iosched` in the second (bypassing the engines' and the
// replica servers' schedulers on every node). Volumes are 3-replica and exported on node-1 over NBD; fio's nbd
// engine drives them:
//
//   - A: 4k randread, iodepth 4, --rate_iops at 20% of what A alone does
//     unthrottled (measured first, or -rate);
//   - B: 4k randrw, iodepth 64, no rate limit (the flood);
//   - C: -rebuild-size of data written while node-3 is down, so that C's
//     replica there fails and is rebuilt by node-1's engine (the rebuild
//     class) when node-3 returns.
//
// Scenarios: (1) A alone; (2) A while B floods, A holding a reservation
// (`volume set-qos --min-iops` = A's rate × 1.5), B unlimited; (1') and (3)
// the same with every node's scheduler bypassed; (4) A while C rebuilds. It
// reports A's completion-latency percentiles and IOPS, p99 against A alone
// (target of the issue: at most 2× under a flood, and the same next to a
// rebuild), what node-1's scheduler did meanwhile (from its /metrics) and
// where the CPU went.
//
// It never fails on a number: it exits 1 only when something could not be set
// up or a fio run failed, 2 on bad flags, 130 after Ctrl-C. The clusters and
// the temporary directory are removed in every case.
//
//	go run ./tests/bench/noisybench [-runtime 10s] [-rate N] [-rebuild-size 1Gi] [-rebuild-rate 80Mi] [-depth 256] [-cairn BIN] [-keep] [-v]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
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

// Shape of the workloads, fixed by the issue.
const (
	rateShare  = 0.20 // A's rate as a share of what A alone does unthrottled
	resvFactor = 1.5  // A's reservation as a multiple of its rate
	depthA     = 4
	depthB     = 64
	goalRatio  = 2.0 // p99(A with B) / p99(A alone)
)

type options struct {
	runtime     time.Duration
	calibrate   time.Duration
	rate        int
	sizeA       string
	sizeB       string
	rebuildSize string
	rebuildRate string
	depth       int
	cairn       string
	parent      string
	keep        bool
	verbose     bool
}

func main() { os.Exit(run()) }

func run() int {
	var o options
	flag.DurationVar(&o.runtime, "runtime", 10*time.Second, "length of each measured run of A")
	flag.DurationVar(&o.calibrate, "calibrate", 3*time.Second, "length of the unthrottled run of A that sets its rate (unless -rate)")
	flag.IntVar(&o.rate, "rate", 0, "A's fio --rate_iops (0: 20% of what A alone does unthrottled)")
	flag.StringVar(&o.sizeA, "size-a", "256Mi", "size of volume A (filled once, read by the measured runs)")
	flag.StringVar(&o.sizeB, "size-b", "1Gi", "size of volume B (the flood)")
	flag.StringVar(&o.rebuildSize, "rebuild-size", "1Gi", "size of volume C, all of it written while node-3 is down and then rebuilt")
	flag.IntVar(&o.depth, "depth", 256, "every node's --iosched-depth in the first cluster")
	flag.StringVar(&o.rebuildRate, "rebuild-rate", "80Mi", "every node's --rebuild-rate in the first cluster (bytes/s)")
	flag.StringVar(&o.cairn, "cairn", "", "use this cairn binary instead of building bin/cairn")
	flag.StringVar(&o.parent, "dir", os.TempDir(), "where to make the temporary directory (cluster data, sockets, fio output)")
	flag.BoolVar(&o.keep, "keep", false, "keep the temporary directory (node logs, fio JSON) instead of removing it")
	flag.BoolVar(&o.verbose, "v", false, "print every command run")
	flag.Parse()
	if flag.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "noisybench: unexpected arguments %q\n", flag.Args())
		return 2
	}
	if o.runtime < 3*time.Second || o.calibrate < time.Second || o.rate < 0 {
		fmt.Fprintln(os.Stderr, "noisybench: -runtime must be at least 3s, -calibrate at least 1s, -rate not negative")
		return 2
	}
	for name, v := range map[string]string{"-size-a": o.sizeA, "-size-b": o.sizeB, "-rebuild-size": o.rebuildSize, "-rebuild-rate": o.rebuildRate} {
		if _, err := benchkit.ParseSize(v); err != nil {
			fmt.Fprintf(os.Stderr, "noisybench: %s %q: %v\n", name, v, err)
			return 2
		}
	}

	ctx, stop := benchkit.SignalContext()
	defer stop()

	b := &bench{o: o}
	err := b.run(ctx)
	b.cleanup()
	return benchkit.ExitCode(ctx, "noisybench", err)
}

// cluster is one dev cluster started by the benchmark.
type cluster struct {
	dir      string
	servers  string // meta API addresses, comma-separated
	nodes    []benchkit.Node
	exported []string // volume ids exported by us, unexported by teardown
}

// bench holds everything the run started, so that cleanup can undo it.
type bench struct {
	o        options
	root     string // repository root
	bin      string // cairn binary
	tmp      string // temporary directory; removed by cleanup
	cl       *cluster
	rate     int     // A's --rate_iops
	calIOPS  float64 // A alone, unthrottled (0: -rate given)
	minIOPS  int     // A's reservation
	results  []*result
	rebuild  rebuildInfo
	warnings []string
}

// scenario is one measured run of A.
type scenario struct {
	key, label string
	mode       string // node-1's scheduler: "on" or "bypassed"
	baseline   string // key of the run whose p99 this one is compared with
	goal       bool   // the ≤ 2× target applies
}

type result struct {
	scenario
	a, b    *fioResult          // b: nil without a flood
	sched   map[string]volDelta // node-1's scheduler, by volume label ("A", "B", "C")
	cpu     cpuUse
	elapsed time.Duration
	err     error
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "noisybench: "+format+"\n", args...)
}

func (b *bench) warnf(format string, args ...any) {
	b.warnings = append(b.warnings, fmt.Sprintf(format, args...))
	b.logf("warning: "+format, args...)
}

func (b *bench) run(ctx context.Context) error {
	if _, err := exec.LookPath("fio"); err != nil {
		return errors.New("fio is not installed (make deps installs it)")
	}
	root, err := benchkit.ModuleRoot(ctx, "noisybench")
	if err != nil {
		return err
	}
	b.root = root
	if b.o.cairn != "" {
		if b.bin, err = filepath.Abs(b.o.cairn); err != nil {
			return err
		}
	} else {
		b.bin = filepath.Join(root, "bin", "cairn")
		b.logf("building %s", b.bin)
		if _, err := b.cmd(ctx, "go", "build", "-o", b.bin, "./cmd/cairn"); err != nil {
			return fmt.Errorf("build: %w", err)
		}
	}
	if b.tmp, err = os.MkdirTemp(b.o.parent, "cairn-noisybench-"); err != nil {
		return err
	}
	if n := len(filepath.Join(b.tmp, "c1", "a.sock")); n > 100 {
		return fmt.Errorf("-dir %s: socket paths would be %d bytes, unix sockets allow 107", b.o.parent, n)
	}
	start := time.Now()
	if err := b.scheduled(ctx); err != nil {
		return err
	}
	if err := b.bypassed(ctx); err != nil {
		return err
	}
	b.print(os.Stdout, time.Since(start))
	var failed []string
	for _, r := range b.results {
		if r.err != nil {
			failed = append(failed, fmt.Sprintf("%s: %v", r.label, r.err))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d fio runs failed:\n  %s", len(failed), strings.Join(failed, "\n  "))
	}
	return nil
}

// scheduled runs scenarios (1), (2) and (4) on a cluster whose node-1
// schedules every volume I/O.
func (b *bench) scheduled(ctx context.Context) error {
	cl, err := b.up(ctx, "c1", "--rebuild-rate", b.o.rebuildRate, "--iosched-depth", strconv.Itoa(b.o.depth))
	if err != nil {
		return err
	}
	vols, err := b.createAll(ctx, cl, map[string]string{"A": b.o.sizeA, "B": b.o.sizeB, "C": b.o.rebuildSize})
	if err != nil {
		return err
	}
	if err := b.fill(ctx, cl, "A", b.o.sizeA); err != nil {
		return err
	}
	b.rate = b.o.rate
	if b.rate == 0 {
		b.logf("calibrating: A alone, unthrottled, for %v", b.o.calibrate)
		r, err := b.fio(ctx, cl, "cal", "A", b.o.sizeA, "randread", depthA, 0, b.o.calibrate)
		if err != nil {
			return fmt.Errorf("calibration run: %w", err)
		}
		b.calIOPS = r.iops
		b.rate = max(1, int(math.Round(r.iops*rateShare)))
	}
	b.minIOPS = int(math.Round(float64(b.rate) * resvFactor))

	b.measure(ctx, cl, vols, scenario{key: "1", label: "(1) A alone", mode: "on"}, false)
	if err := b.setQoS(ctx, cl, vols["A"]); err != nil {
		return err
	}
	b.measure(ctx, cl, vols, scenario{key: "2", label: fmt.Sprintf("(2) A (min-iops %d) + B flooding", b.minIOPS), mode: "on", baseline: "1", goal: true}, true)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err := b.rebuildRun(ctx, cl, vols); err != nil {
		return err
	}
	return b.teardown(cl)
}

// bypassed runs (1') and (3) on a cluster whose nodes all bypass their
// schedulers.
func (b *bench) bypassed(ctx context.Context) error {
	cl, err := b.up(ctx, "c2", "--no-iosched")
	if err != nil {
		return err
	}
	vols, err := b.createAll(ctx, cl, map[string]string{"A": b.o.sizeA, "B": b.o.sizeB})
	if err != nil {
		return err
	}
	if err := b.fill(ctx, cl, "A", b.o.sizeA); err != nil {
		return err
	}
	b.measure(ctx, cl, vols, scenario{key: "1b", label: "(1') A alone", mode: "bypassed"}, false)
	if err := b.setQoS(ctx, cl, vols["A"]); err != nil {
		return err
	}
	b.measure(ctx, cl, vols, scenario{key: "3", label: fmt.Sprintf("(3) A (min-iops %d) + B flooding", b.minIOPS), mode: "bypassed", baseline: "1b", goal: true}, true)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return b.teardown(cl)
}

// up starts a dev cluster in tmp/name whose node agents all run with the
// extra flags (cairn dev up --node-arg). All of them, not only node-1: the
// disk schedulers of node-2 and node-3 serve the volumes' replicas too, so a
// bypassed cluster bypasses them as well.
func (b *bench) up(ctx context.Context, name string, extra ...string) (*cluster, error) {
	cl := &cluster{dir: filepath.Join(b.tmp, name)}
	b.logf("starting a 3-node dev cluster in %s; every node gets %s", cl.dir, strings.Join(extra, " "))
	// Not cancelled by Ctrl-C: killed halfway, dev up could leave node
	// agents running that no cluster.json names.
	if _, err := b.cmd(context.WithoutCancel(ctx), b.bin, benchkit.DevUpArgs(cl.dir, extra)...); err != nil {
		return nil, fmt.Errorf("dev up: %w", err)
	}
	b.cl = cl
	if err := cl.load(); err != nil {
		return nil, err
	}
	for _, n := range cl.nodes {
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", n.PID))
		if !bytes.Contains(cmdline, []byte("\x00"+strings.Join(extra, "\x00")+"\x00")) {
			return nil, fmt.Errorf("%s (pid %d) does not run with %s", n.ID, n.PID, strings.Join(extra, " "))
		}
	}
	return cl, nil // dev up returned once a leader saw every node up
}

func (cl *cluster) load() error {
	nodes, servers, err := benchkit.LoadCluster(cl.dir)
	if err != nil {
		return err
	}
	if len(nodes) != 3 || nodes[0].ID != "node-1" {
		return fmt.Errorf("cluster.json lists %d nodes, want node-1..3", len(nodes))
	}
	cl.nodes, cl.servers = nodes, servers
	return nil
}

func (b *bench) ctl(ctx context.Context, cl *cluster, args ...string) ([]byte, error) {
	return b.cmd(ctx, b.bin, append([]string{"ctl", "--server", cl.servers}, args...)...)
}

// createAll creates one 3-replica volume per label and exports it on node-1
// at tmp/cluster/label.sock.
func (b *bench) createAll(ctx context.Context, cl *cluster, sizes map[string]string) (map[string]*benchkit.Volume, error) {
	vols := map[string]*benchkit.Volume{}
	for _, label := range []string{"A", "B", "C"} {
		size, ok := sizes[label]
		if !ok {
			continue
		}
		out, err := b.ctl(ctx, cl, "volume", "create", "noisy-"+strings.ToLower(label), "--size", size, "--replicas", "3", "-o", "json")
		if err != nil {
			return nil, err
		}
		var v benchkit.Volume
		if err := json.Unmarshal(out, &v); err != nil || v.ID == "" {
			return nil, fmt.Errorf("volume create %s: no id in %q", label, out)
		}
		cl.exported = append(cl.exported, v.ID)
		if _, err := b.ctl(ctx, cl, "volume", "export", v.ID, "--node", "node-1", "--nbd", cl.sock(label)); err != nil {
			return nil, err
		}
		vols[label] = &v
	}
	return vols, nil
}

func (cl *cluster) sock(label string) string {
	return filepath.Join(cl.dir, strings.ToLower(label)+".sock")
}

// fill writes a volume once, 1 MiB sequential writes over all of it.
func (b *bench) fill(ctx context.Context, cl *cluster, label, size string) error {
	b.logf("filling %s (%s)", label, size)
	_, err := b.fio(ctx, cl, "fill-"+strings.ToLower(label), label, size, "write", 8, 0, 0)
	return err
}

// setQoS gives A its reservation and waits until node-1's engine applied it.
func (b *bench) setQoS(ctx context.Context, cl *cluster, a *benchkit.Volume) error {
	if _, err := b.ctl(ctx, cl, "volume", "set-qos", a.ID, "--min-iops", strconv.Itoa(b.minIOPS)); err != nil {
		return err
	}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		for _, l := range logLines(cl.nodes[0].Log, "QoS limits set") {
			if l.str("volume_id") == a.ID && l.num("min_iops") == float64(b.minIOPS) {
				return nil
			}
		}
		if err := benchkit.Sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("node-1 did not log applying min-iops %d to %s within 15s (see %s)", b.minIOPS, a.ID, cl.nodes[0].Log)
}

// measure runs A for -runtime, with B flooding from a second before until
// after, if flood.
func (b *bench) measure(ctx context.Context, cl *cluster, vols map[string]*benchkit.Volume, rn scenario, flood bool) *result {
	b.logf("%s, scheduler %s", rn.label, rn.mode)
	r := &result{scenario: rn}
	b.results = append(b.results, r)
	if err := benchkit.Warm(ctx, benchkit.ReplicaFile(vols["A"], cl.nodes[0])); err != nil {
		r.err = fmt.Errorf("read A's replica into the page cache: %w", err)
		return r
	}
	syscall.Sync() // leave no dirty pages of the fill to write back
	if err := benchkit.Sleep(ctx, time.Second); err != nil {
		r.err = err
		return r
	}
	var fb *fioJob
	if flood {
		var err error
		if fb, err = b.startFio(ctx, cl, "b-"+rn.key, "B", b.o.sizeB, "randrw", depthB, 0, b.o.runtime+2*time.Second); err != nil {
			r.err = err
			return r
		}
		if err := benchkit.Sleep(ctx, time.Second); err != nil {
			r.err = err
			_, _ = fb.wait()
			return r
		}
	}
	r.a, r.b, r.err = b.window(ctx, cl, vols, r, fb)
	return r
}

// window runs A for -runtime while recording node-1's scheduler metrics and
// the CPU, then collects the flood fb (if any).
func (b *bench) window(ctx context.Context, cl *cluster, vols map[string]*benchkit.Volume, r *result, fb *fioJob) (a, bres *fioResult, err error) {
	m0 := scrape(ctx, cl.nodes[0].Metrics)
	probe := startCPU(cl, fb)
	t0 := time.Now()
	ja, err := b.startFio(ctx, cl, "a-"+r.key, "A", b.o.sizeA, "randread", depthA, b.rate, b.o.runtime)
	if err == nil {
		a, err = ja.wait()
		r.cpu = probe.stop(ja.cmd)
	}
	r.elapsed = time.Since(t0)
	r.sched = schedDelta(m0, scrape(ctx, cl.nodes[0].Metrics), vols)
	if fb != nil {
		var berr error
		bres, berr = fb.wait()
		if err == nil && berr != nil {
			err = fmt.Errorf("flood on B: %w", berr)
		}
	}
	return a, bres, err
}

// rebuildRun is scenario (4): C's replica on node-3 fails while data is
// written, node-3 comes back, and A runs while node-1's engine rebuilds it.
func (b *bench) rebuildRun(ctx context.Context, cl *cluster, vols map[string]*benchkit.Volume) error {
	c := vols["C"]
	b.logf("(4) killing node-3 and writing %s to C", b.o.rebuildSize)
	if _, err := b.cmd(ctx, b.bin, "dev", "kill", "--dir", cl.dir, "node-3"); err != nil {
		return err
	}
	if _, err := b.fio(ctx, cl, "fill-c", "C", b.o.rebuildSize, "write", 8, 0, 0); err != nil {
		return fmt.Errorf("write C with node-3 down: %w", err)
	}
	if err := b.waitReplica(ctx, cl, c.ID, "node-3", "failed", 15*time.Second); err != nil {
		return err
	}
	if _, err := b.cmd(context.WithoutCancel(ctx), b.bin, "dev", "start", "--dir", cl.dir, "node-3"); err != nil {
		return err
	}
	if err := cl.load(); err != nil {
		return err
	}
	if err := b.waitReplica(ctx, cl, c.ID, "node-3", "rebuilding", 30*time.Second); err != nil {
		return err
	}
	rn := scenario{key: "4", label: fmt.Sprintf("(4) A (min-iops %d) + rebuild of C", b.minIOPS), mode: "on", baseline: "1", goal: true}
	b.logf("%s, scheduler on", rn.label)
	r := &result{scenario: rn}
	b.results = append(b.results, r)
	t0 := time.Now()
	r.a, _, r.err = b.window(ctx, cl, vols, r, nil)
	t1 := time.Now()

	rate, _ := benchkit.ParseSize(b.o.rebuildRate)
	size, _ := benchkit.ParseSize(b.o.rebuildSize)
	limit := time.Duration(3*float64(size)/float64(rate)*float64(time.Second)) + time.Minute
	b.logf("waiting for C's rebuild to finish (at most %v)", limit.Round(time.Second))
	if err := b.waitReplica(ctx, cl, c.ID, "node-3", "healthy", limit); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		b.warnf("C's rebuild did not finish: %v", err)
	}
	b.rebuild = readRebuild(cl.nodes[0].Log, c.ID, t0, t1)
	if b.rebuild.start.IsZero() {
		b.warnf("node-1's log has no \"rebuild started\" for C: the rebuild ran elsewhere or not at all")
	} else if b.rebuild.overlap < r.elapsed*8/10 {
		b.warnf("C's rebuild overlapped only %v of A's %v run: use a lower -rebuild-rate or a larger -rebuild-size",
			b.rebuild.overlap.Round(100*time.Millisecond), r.elapsed.Round(100*time.Millisecond))
	}
	return nil
}

// waitReplica polls until the replica of volume id on nodeID is in state.
func (b *bench) waitReplica(ctx context.Context, cl *cluster, id, nodeID, state string, limit time.Duration) error {
	last := "unknown"
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		out, err := b.ctl(ctx, cl, "volume", "get", id, "-o", "json")
		var v benchkit.Volume
		if err == nil && json.Unmarshal(out, &v) == nil {
			for _, r := range v.Replicas {
				if r.Node == nodeID {
					last = r.State
				}
			}
			if last == state {
				return nil
			}
		}
		if err := benchkit.Sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	return fmt.Errorf("volume %s: replica on %s is %s, not %s, after %v", id, nodeID, last, state, limit)
}

// rebuildInfo is what node-1's log says about C's rebuild.
type rebuildInfo struct {
	start, end time.Time
	took       time.Duration
	copied     float64 // bytes
	overlap    time.Duration
}

func readRebuild(logPath, id string, t0, t1 time.Time) rebuildInfo {
	var ri rebuildInfo
	for _, l := range logLines(logPath, "rebuild started") {
		if l.str("volume_id") == id {
			ri.start = l.ts()
		}
	}
	for _, l := range logLines(logPath, "rebuild done") {
		if l.str("volume_id") == id {
			ri.end = l.ts()
			ri.took = time.Duration(l.num("took") * float64(time.Second))
			ri.copied = l.num("bytes_copied")
		}
	}
	if !ri.start.IsZero() {
		end := t1
		if !ri.end.IsZero() && ri.end.Before(end) {
			end = ri.end
		}
		start := t0
		if ri.start.After(start) {
			start = ri.start
		}
		ri.overlap = max(0, end.Sub(start))
	}
	return ri
}

// logLine is one JSON line of a node agent's log.
type logLine map[string]any

func (l logLine) str(k string) string { s, _ := l[k].(string); return s }
func (l logLine) num(k string) float64 {
	f, _ := l[k].(float64)
	return f
}
func (l logLine) ts() time.Time {
	t, _ := time.Parse(time.RFC3339Nano, l.str("ts"))
	return t
}

// logLines returns the lines of a node log whose msg is msg.
func logLines(path, msg string) []logLine {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []logLine
	needle := []byte(`"msg":"` + msg + `"`)
	for _, line := range bytes.Split(raw, []byte("\n")) {
		if !bytes.Contains(line, needle) {
			continue
		}
		var l logLine
		if json.Unmarshal(line, &l) == nil {
			out = append(out, l)
		}
	}
	return out
}

// fioResult is A's or B's numbers from fio's JSON output.
type fioResult struct {
	iops           float64 // read + write
	p50, p99, p999 float64 // ns; completion latency of reads (A) or of all I/O (B: the worse of read and write)
}

type fioJob struct {
	cmd    *exec.Cmd
	out    string
	stderr bytes.Buffer
	done   chan error
}

// startFio starts fio's nbd engine on the label's socket: rw with bs 4k (1M
// for sequential writes) at depth, at most rate IOPS (0: unlimited), for d (0:
// once over the whole size).
func (b *bench) startFio(ctx context.Context, cl *cluster, name, label, size, rw string, depth, rate int, d time.Duration) (*fioJob, error) {
	sz, _ := benchkit.ParseSize(size)
	bs := "4k"
	if rw == "write" {
		bs = "1M"
	}
	j := &fioJob{out: filepath.Join(cl.dir, "fio-"+name+".json"), done: make(chan error, 1)}
	args := []string{
		"--name=" + name, "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + cl.sock(label),
		"--rw=" + rw, "--bs=" + bs, "--iodepth=" + strconv.Itoa(depth), "--size=" + strconv.FormatUint(sz, 10),
		"--percentile_list=50:99:99.9", "--output-format=json", "--output=" + j.out,
		// One process with threads rather than a parent and a forked job
		// process, so that /proc/PID/stat holds all of the job's CPU time.
		"--thread",
	}
	if d > 0 {
		args = append(args, "--time_based", fmt.Sprintf("--runtime=%dms", d.Milliseconds()), "--norandommap", "--randrepeat=0")
	}
	if rate > 0 {
		args = append(args, "--rate_iops="+strconv.Itoa(rate))
	}
	if b.o.verbose {
		b.logf("$ fio %s", strings.Join(args, " "))
	}
	j.cmd = exec.CommandContext(ctx, "fio", args...)
	j.cmd.SysProcAttr = benchkit.OwnGroup()
	j.cmd.Stderr = &j.stderr
	if err := j.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start fio: %w", err)
	}
	go func() { j.done <- j.cmd.Wait() }()
	return j, nil
}

// wait waits for the job and reads its output.
func (j *fioJob) wait() (*fioResult, error) {
	if err := <-j.done; err != nil {
		return nil, fmt.Errorf("fio: %w: %s", err, strings.TrimSpace(j.stderr.String()))
	}
	// With --thread, the nbd engine's "fio: connected to NBD server" lands
	// in the output file before the JSON; ReadFioJob skips it.
	job, err := benchkit.ReadFioJob(j.out, j.stderr.String())
	if err != nil {
		return nil, err
	}
	r := &fioResult{iops: job.Read.IOPS + job.Write.IOPS}
	for _, s := range []benchkit.FioStat{job.Read, job.Write} {
		if s.IOPS > 0 {
			p := s.ClatNs.Percentile
			r.p50, r.p99, r.p999 = max(r.p50, p["50.000000"]), max(r.p99, p["99.000000"]), max(r.p999, p["99.900000"])
		}
	}
	return r, nil
}

func (b *bench) fio(ctx context.Context, cl *cluster, name, label, size, rw string, depth, rate int, d time.Duration) (*fioResult, error) {
	j, err := b.startFio(ctx, cl, name, label, size, rw, depth, rate, d)
	if err != nil {
		return nil, err
	}
	return j.wait()
}

// metrics are the samples of a Prometheus text page, keyed by the line up
// to the value (name and labels).
type metrics map[string]float64

// scrape reads node-1's scheduler samples (cairn_iosched_*) from addr.
func scrape(ctx context.Context, addr string) metrics {
	return benchkit.ScrapeMetrics(ctx, addr, func(key string) bool { return strings.HasPrefix(key, "cairn_iosched_") })
}

// volDelta is what node-1's scheduler did for one volume during a run.
type volDelta struct {
	dispatched float64 // I/Os let through
	waits      float64 // I/Os that were queued (observed by the queue-wait histogram)
	waitSum    float64 // seconds
	waitedLong float64 // I/Os that waited more than the histogram's first bucket (50µs)
	misses     float64 // deadline misses
	throttled  float64 // seconds waited for tokens
	classes    []string
}

func schedDelta(m0, m1 metrics, vols map[string]*benchkit.Volume) map[string]volDelta {
	out := map[string]volDelta{}
	for label, v := range vols {
		var d volDelta
		sel := `volume_id="` + v.ID + `"`
		classes := map[string]bool{}
		for k, v1 := range m1 {
			if !strings.Contains(k, sel) {
				continue
			}
			dv := v1 - m0[k]
			name, _, _ := strings.Cut(k, "{")
			switch name {
			case "cairn_iosched_dispatched_total":
				d.dispatched += dv
			case "cairn_iosched_queue_wait_seconds_count":
				d.waits += dv
				if dv > 0 {
					classes[label1(k, "class")] = true
				}
			case "cairn_iosched_queue_wait_seconds_sum":
				d.waitSum += dv
			case "cairn_iosched_queue_wait_seconds_bucket":
				if label1(k, "le") == "5e-05" {
					d.waitedLong -= dv
				}
			case "cairn_iosched_deadline_misses_total":
				d.misses += dv
			case "cairn_iosched_throttled_seconds_total":
				d.throttled += dv
			}
		}
		d.waitedLong += d.waits
		for c := range classes {
			d.classes = append(d.classes, c)
		}
		out[label] = d
	}
	return out
}

// label1 returns one label's value from a sample key.
func label1(key, name string) string {
	_, rest, ok := strings.Cut(key, name+`="`)
	if !ok {
		return ""
	}
	v, _, _ := strings.Cut(rest, `"`)
	return v
}

// cpuUse is CPU time during A's run in % of one core.
type cpuUse struct {
	busy, node1, others, fio, other float64
}

type cpuProbe struct {
	m0    benchkit.CPUTimes
	t0    time.Time
	pids  map[string][]int // "node-1", "others" (node-2, node-3), "fio" (the flood)
	ticks map[int]uint64
}

func startCPU(cl *cluster, flood *fioJob) *cpuProbe {
	p := &cpuProbe{pids: map[string][]int{"node-1": {cl.nodes[0].PID}, "others": {cl.nodes[1].PID, cl.nodes[2].PID}}, ticks: map[int]uint64{}}
	if flood != nil {
		p.pids["fio"] = []int{flood.cmd.Process.Pid}
	}
	for _, ps := range p.pids {
		for _, pid := range ps {
			p.ticks[pid], _ = benchkit.ProcCPUTicks(pid)
		}
	}
	p.m0, _ = benchkit.MachineCPU()
	p.t0 = time.Now()
	return p
}

// stop ends the probe; a is A's fio, which ran for the probe's length and
// has exited (its CPU time is in its ProcessState).
func (p *cpuProbe) stop(a *exec.Cmd) cpuUse {
	secs := time.Since(p.t0).Seconds()
	m1, _ := benchkit.MachineCPU()
	group := func(name string) float64 {
		var sum float64
		for _, pid := range p.pids[name] {
			if t, err := benchkit.ProcCPUTicks(pid); err == nil && t >= p.ticks[pid] {
				sum += float64(t - p.ticks[pid])
			}
		}
		return 100 * sum / benchkit.ClockTicks / secs
	}
	u := cpuUse{busy: busyShare(m1, p.m0), node1: group("node-1"), others: group("others"), fio: group("fio")}
	if a != nil && a.ProcessState != nil {
		u.fio += 100 * (a.ProcessState.UserTime() + a.ProcessState.SystemTime()).Seconds() / secs
	}
	u.other = max(0, taskShare(m1, p.m0)-u.node1-u.others-u.fio)
	return u
}

// print writes the tables.
func (b *bench) print(w io.Writer, took time.Duration) {
	byKey := map[string]*result{}
	for _, r := range b.results {
		byKey[r.key] = r
	}
	host, _ := os.Hostname()
	fmt.Fprintln(w)
	fmt.Fprintln(w, "noisybench: volume A's latency on node-1 next to a flooding volume B and a rebuild, node-1's scheduler on and bypassed")
	fmt.Fprintf(w, "machine:   %s, %d CPUs, %s, load average %s\n", host, runtime.NumCPU(), benchkit.Kernel(), loadAvg())
	fmt.Fprintf(w, "cairn:     %s\n", b.version())
	fmt.Fprintf(w, "volumes:   3 replicas each, exported on node-1 over NBD; fio %s nbd engine\n", benchkit.FirstLine("fio", "fio", "--version"))
	if b.calIOPS > 0 {
		fmt.Fprintf(w, "A:         4k randread iodepth %d, --rate_iops %d (%.0f%% of the %.0f IOPS A alone did unthrottled), %s, filled\n",
			depthA, b.rate, 100*rateShare, b.calIOPS, b.o.sizeA)
	} else {
		fmt.Fprintf(w, "A:         4k randread iodepth %d, --rate_iops %d (-rate), %s, filled\n", depthA, b.rate, b.o.sizeA)
	}
	fmt.Fprintf(w, "B:         4k randrw (50/50) iodepth %d, no limit, %s; starts 1s before A's run, ends 1s after\n", depthB, b.o.sizeB)
	fmt.Fprintf(w, "C:         %s written while node-3 was down, rebuilt by node-1's engine at --rebuild-rate %s\n", b.o.rebuildSize, b.o.rebuildRate)
	fmt.Fprintf(w, "runs:      A for %v each; A's reservation (set-qos --min-iops %d) from (2) on; total %v\n\n", b.o.runtime, b.minIOPS, took.Round(time.Second))

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tnode-1 scheduler\tA IOPS\tA p50\tA p99\tA p99.9\tp99 vs alone\ttarget\tB IOPS\tB p99\t")
	for _, r := range b.results {
		if r.err != nil || r.a == nil {
			fmt.Fprintf(tw, "%s\t%s\tERROR\t\t\t\t\t\t\t\t\n", r.label, r.mode)
			continue
		}
		ratio, target := "", ""
		if base := byKey[r.baseline]; base != nil && base.a != nil && base.a.p99 > 0 {
			x := r.a.p99 / base.a.p99
			ratio = fmt.Sprintf("%.1f× (%s)", x, base.key)
			if r.goal {
				target = fmt.Sprintf("≤ %.0f×: met", goalRatio)
				if x > goalRatio {
					target = fmt.Sprintf("≤ %.0f×: not met", goalRatio)
				}
			}
		}
		bi, bp := "", ""
		if r.b != nil {
			bi, bp = fmt.Sprintf("%.0f", r.b.iops), benchkit.Dur(r.b.p99)
		}
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.label, r.mode, r.a.iops, benchkit.Dur(r.a.p50), benchkit.Dur(r.a.p99), benchkit.Dur(r.a.p999), ratio, target, bi, bp)
	}
	tw.Flush()
	fmt.Fprintln(w, "A p50/p99/p99.9: fio completion latency (clat) of A's reads; p99 vs alone: A's p99 over that of the run in")
	fmt.Fprintln(w, "brackets (same cluster); B: read+write IOPS of the flood and the worse p99 of its reads and writes.")
	if ri := b.rebuild; !ri.start.IsZero() {
		took := "did not finish"
		if ri.took > 0 {
			took = fmt.Sprintf("took %v, copied %.0f MiB (%.0f MiB/s)", ri.took.Round(100*time.Millisecond), ri.copied/(1<<20), ri.copied/(1<<20)/ri.took.Seconds())
		}
		fmt.Fprintf(w, "rebuild of C (node-1's log): %s; overlapped A's run (4) for %v\n", took, ri.overlap.Round(100*time.Millisecond))
	}

	fmt.Fprintln(w)
	fmt.Fprintln(w, "node-1's scheduler during A's run, from its /metrics (cairn_iosched_*; deltas over the run):")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tvolume\tdispatched/s\tscheduled/s\tmean queue wait\twaited > 50µs\tdeadline misses\tthrottled\tclasses\t")
	for _, r := range b.results {
		for _, label := range []string{"A", "B", "C"} {
			d, ok := r.sched[label]
			if !ok || (d.dispatched == 0 && d.waits == 0) {
				continue
			}
			secs := r.elapsed.Seconds()
			mean, long := "-", "-"
			if d.waits > 0 {
				mean = "0"
				if d.waitSum > 0 {
					mean = benchkit.Dur(1e9 * d.waitSum / d.waits)
				}
				long = fmt.Sprintf("%.2f%%", 100*d.waitedLong/d.waits)
			}
			fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%s\t%s\t%.0f\t%.2fs\t%s\t\n", r.key, label, d.dispatched/secs, d.waits/secs, mean, long, d.misses, d.throttled, strings.Join(d.classes, ","))
		}
	}
	tw.Flush()
	fmt.Fprintln(w, "dispatched/s: I/Os let through; scheduled/s: those that went through the scheduler's queue and were timed")
	fmt.Fprintln(w, "(bypassed: none); waited > 50µs: share of those whose queue wait exceeded the histogram's first bucket.")

	fmt.Fprintln(w)
	fmt.Fprintf(w, "CPU during A's run, %% of one core (%d cores = %d%%):\n", runtime.NumCPU(), 100*runtime.NumCPU())
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tmachine busy\tnode-1\tnode-2+3\tfio (A+B)\tother tasks\t")
	contended := 0
	for _, r := range b.results {
		c := r.cpu
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t\n", r.key, c.busy, c.node1, c.others, c.fio, c.other)
		if c.other > 25 {
			contended++
		}
	}
	tw.Flush()
	fmt.Fprintln(w, "machine busy: all CPU time but idle and iowait (/proc/stat); other tasks: user+system time of processes")
	fmt.Fprintln(w, "other than the three node agents and fio, and kernel threads.")
	if contended > 0 {
		fmt.Fprintf(w, "WARNING: in %d of %d runs other tasks used more than 25%% of a core: the machine was shared and the\n", contended, len(b.results))
		fmt.Fprintln(w, "latencies are noisier than on a quiet machine.")
	}

	// What the scheduler could have done: it orders requests only when its
	// dispatch depth is full.
	if r := byKey["2"]; r != nil && r.err == nil {
		a, bb := r.sched["A"], r.sched["B"]
		if a.waitedLong+bb.waitedLong == 0 && a.waits+bb.waits > 0 {
			fmt.Fprintf(w, "\nIn (2) no I/O of A or B waited in node-1's scheduler longer than 50µs (summed queue wait %.6fs):\n",
				a.waitSum+bb.waitSum)
			fmt.Fprintf(w, "every request was dispatched on arrival, so A's reservation never ordered anything; fio keeps at most\n")
			fmt.Fprintf(w, "%d + %d I/Os in flight, below the scheduler's dispatch depth. A's extra latency comes from below the\n", depthA, depthB)
			fmt.Fprintln(w, "scheduler (CPU, replica servers, disk), which it does not arbitrate.")
		}
	}
	for _, s := range b.warnings {
		fmt.Fprintf(w, "WARNING: %s\n", s)
	}
}

// teardown unexports the cluster's volumes and stops it.
func (b *bench) teardown(cl *cluster) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, id := range cl.exported {
		if _, err := b.ctl(ctx, cl, "volume", "unexport", id); err != nil {
			b.logf("teardown: %v", err)
		}
	}
	cl.exported = nil
	_, err := b.cmd(ctx, b.bin, "dev", "down", "--dir", cl.dir, "--keep-data="+strconv.FormatBool(b.o.keep))
	if err != nil {
		b.logf("teardown: %v; killing the node agents", err)
		benchkit.KillNodeAgents(cl.nodes)
	}
	if b.cl == cl {
		b.cl = nil
	}
	return err
}

// cleanup undoes whatever run left, with its own deadlines: it also runs
// after Ctrl-C, when run's context is done.
func (b *bench) cleanup() {
	if cl := b.cl; cl != nil {
		if _, err := os.Stat(filepath.Join(cl.dir, "cluster.json")); err == nil {
			_ = cl.load() // pids change with dev kill/start
			_ = b.teardown(cl)
		}
	}
	benchkit.RemoveTemp(b.tmp, b.o.keep, b.logf)
}

// cmd runs a command from the repository root and returns its stdout.
func (b *bench) cmd(ctx context.Context, name string, args ...string) ([]byte, error) {
	return benchkit.Command(ctx, b.root, b.o.verbose, b.logf, name, args...)
}

// version names the commit the binary was built from, if we built it.
func (b *bench) version() string {
	if b.o.cairn != "" {
		return b.bin + " (-cairn)"
	}
	v, err := benchkit.GitDescribe(b.root)
	if err != nil {
		return "unknown version (not a git checkout)"
	}
	return v
}

// busyShare and taskShare return what the CPUs did from t0 to t, in % of
// one core.
func busyShare(t, t0 benchkit.CPUTimes) float64 { return cpuShare(t, t0, t.Busy-t0.Busy) }
func taskShare(t, t0 benchkit.CPUTimes) float64 { return cpuShare(t, t0, t.Task-t0.Task) }

func cpuShare(t, t0 benchkit.CPUTimes, ticks uint64) float64 {
	total := float64(t.Total - t0.Total)
	if total <= 0 {
		return 0
	}
	return 100 * float64(runtime.NumCPU()) * float64(ticks) / total
}

// loadAvg returns the load averages "X Y Z", or "unknown".
func loadAvg() string {
	if la := benchkit.LoadAvg(); la != "" {
		return la
	}
	return "unknown"
}
