// Command fiobench measures block I/O through Cairn's NBD exports with fio's
// nbd engine, side by side with nbdkit's file plugin serving a plain file on
// the same disk, and prints one table.
//
// It builds bin/cairn, starts a 3-node dev cluster (`cairn dev up`) in a
// temporary directory, creates (a) a 1-replica and (b) a 3-replica volume,
// exports both on node-1 (`cairn ctl volume export --nbd`), and starts (c)
// `nbdkit --unix SOCK --foreground file FILE` on a plain file of the same size
// in the same directory. Each target is filled once (1 MiB sequential writes
// over the whole device), then every workload runs for -runtime on (a), (b)
// and (c) in turn. It also measures node-1's RSS with -idle-volumes exported
// idle volumes.
//
// Two more tables come from alternating pairs of runs: the cost of checksums,
// (b) against (d), its 3-replica volume without checksums; and the cost of
// mutual TLS, (b) against (f), a 3-replica volume on a second 3-node dev
// cluster started with `cairn dev up --tls` (every port speaks mutual TLS;
// the first cluster's nodes run with --insecure), measured -tls-pairs times
// at 4k random write qd32 and 1M sequential write. The second cluster runs
// only for those pairs.
//
// It never fails on a number: it exits 1 only when something could not be set
// up or a fio run failed, 2 on bad flags, 130 after Ctrl-C. The clusters,
// nbdkit and the temporary directory are removed in every case.
//
//	go run ./tests/bench/fiobench [-runtime 8s] [-workloads LIST] [-idle-volumes 10] [-checksum-pairs 5] [-tls-pairs 3] [-node-arg FLAG]... [-perf DIR] [-keep] [-v]
package main

import (
	"bytes"
	"context"
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
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

// workload is one fio job shape.
type workload struct {
	name    string // short name for -workloads and file names
	label   string // table label
	rw      string // fio --rw
	bs      string // fio --bs
	iodepth int
	write   bool // report fio's write section (else read)
}

var workloads = []workload{
	{name: "randread-4k-qd1", label: "4k randread qd1", rw: "randread", bs: "4k", iodepth: 1},
	{name: "randread-4k-qd32", label: "4k randread qd32", rw: "randread", bs: "4k", iodepth: 32},
	{name: "randwrite-4k-qd1", label: "4k randwrite qd1", rw: "randwrite", bs: "4k", iodepth: 1, write: true},
	{name: "randwrite-4k-qd32", label: "4k randwrite qd32", rw: "randwrite", bs: "4k", iodepth: 32, write: true},
	{name: "read-1m-qd8", label: "1M seq read qd8", rw: "read", bs: "1M", iodepth: 8},
	{name: "write-1m-qd8", label: "1M seq write qd8", rw: "write", bs: "1M", iodepth: 8, write: true},
}

// fill is the pass that writes every target once before the measured runs,
// so that reads hit real data. It runs over the whole device, not for a time.
var fill = workload{name: "fill", label: "fill: 1M seq write qd8, once", rw: "write", bs: "1M", iodepth: 8, write: true}

// goal is one target of the issue: IOPS of target `of` at `wl` at least
// `ratio` times nbdkit's.
type goal struct {
	of    string // "a" or "b"
	wl    string // workload name
	ratio float64
}

var goals = []goal{
	{of: "a", wl: "randread-4k-qd32", ratio: 0.5},
	{of: "a", wl: "randwrite-4k-qd32", ratio: 0.5},
	{of: "b", wl: "randread-4k-qd32", ratio: 0.5},
	{of: "b", wl: "randwrite-4k-qd32", ratio: 0.2},
	{of: "b", wl: "write-1m-qd8", ratio: 0.25},
}

// pairGoal is a workload measured in pairs of runs (see measurePairs) and
// the least median IOPS ratio of the pairs that is its goal (0: none).
type pairGoal struct {
	wl    string // workload name
	ratio float64
}

// checksumGoals are the targets of end-to-end checksums (docs/integrity.md):
// IOPS of the 3-replica volume with checksumAlgorithm crc32c (b) at least
// ratio times those of the same volume with checksumAlgorithm none (d).
var checksumGoals = []pairGoal{
	{"randwrite-4k-qd32", 0.9},
	{"randread-4k-qd32", 0.9},
	{"write-1m-qd8", 0.85},
	{"read-1m-qd8", 0.85},
}

// tlsWorkloads are those of the cost of mutual TLS, (f) against (b). The
// issue (15) asks to report it and sets no goal.
var tlsWorkloads = []pairGoal{
	{wl: "randwrite-4k-qd32"},
	{wl: "write-1m-qd8"},
}

// rssGoalMiB is the bound on the node agent's RSS with
// idle exported volumes.
const rssGoalMiB = 200

type options struct {
	runtime      time.Duration
	size         string
	workloads    []workload
	idleVolumes  int
	idleSize     string
	idleReplicas int
	settle       time.Duration
	// checksumPairs is how many (b, d) pairs of each checksum workload
	// are measured; the first pair is the main table's.
	checksumPairs int
	// tlsPairs is how many (b, f) pairs of each TLS workload are
	// measured on a second cluster with mutual TLS (0: none).
	tlsPairs int
	perfDir  string
	benchkit.Flags
}

func main() { os.Exit(run()) }

func run() int {
	var o options
	var wlFlag string
	flag.DurationVar(&o.runtime, "runtime", 8*time.Second, "fio --runtime of each measured run")
	flag.StringVar(&o.size, "size", "1Gi", "size of each benchmarked device (cairn ctl --size syntax)")
	flag.StringVar(&wlFlag, "workloads", "", "comma-separated workload names to run (default: all): "+workloadNames())
	flag.IntVar(&o.idleVolumes, "idle-volumes", 10, "idle volumes to export on node-1 for the RSS measurement (0: skip it)")
	flag.StringVar(&o.idleSize, "idle-size", "64Mi", "size of each idle volume")
	flag.IntVar(&o.idleReplicas, "idle-replicas", 3, "replicas of each idle volume")
	flag.DurationVar(&o.settle, "settle", time.Second, "pause after sync(2) before each run")
	flag.IntVar(&o.checksumPairs, "checksum-pairs", 5, "runs of each checksum workload on (b) and on (d), in alternating order, for the cost-of-checksums table (1: only the main table's)")
	flag.IntVar(&o.tlsPairs, "tls-pairs", 3, "runs of 4k randwrite qd32 and 1M seq write on (b) and on (f), a 3-replica volume on a second dev cluster with mutual TLS, in alternating order, for the cost-of-TLS table (0: skip it)")
	flag.StringVar(&o.perfDir, "perf", "", "record `perf record -g` of the serving processes during each run into this directory")
	o.Register("cluster data, plain file, sockets")
	flag.Parse()
	if flag.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "fiobench: unexpected arguments %q\n", flag.Args())
		return 2
	}
	if o.runtime < time.Second || o.idleVolumes < 0 || o.idleReplicas < 1 || o.settle < 0 || o.checksumPairs < 1 || o.tlsPairs < 0 {
		fmt.Fprintln(os.Stderr, "fiobench: -runtime must be at least 1s; -idle-volumes, -settle and -tls-pairs not negative; -idle-replicas and -checksum-pairs at least 1")
		return 2
	}
	if _, err := benchkit.ParseSize(o.size); err != nil {
		fmt.Fprintf(os.Stderr, "fiobench: -size %q: %v\n", o.size, err)
		return 2
	}
	var err error
	if o.workloads, err = selectWorkloads(wlFlag); err != nil {
		fmt.Fprintf(os.Stderr, "fiobench: -workloads: %v\n", err)
		return 2
	}

	ctx, stop := benchkit.SignalContext()
	defer stop()

	b := &bench{o: o, progress: os.Stderr}
	err = b.run(ctx)
	b.cleanup()
	return benchkit.ExitCode(ctx, "fiobench", err)
}

func workloadNames() string { return benchkit.Names(workloads, workloadName) }

func workloadName(w workload) string { return w.name }

func selectWorkloads(list string) ([]workload, error) {
	return benchkit.Select(workloads, workloadName, list, "workload")
}

// target is one NBD export under test.
type target struct {
	key   string // "a", "b", "c"
	label string
	sock  string
	// file holds the data reads are served from: node-1's replica (the
	// engine reads its local replica first) or nbdkit's plain file.
	file string
	// pids are the processes that serve it, whose CPU time is reported.
	pids []proc
	// cl is the dev cluster that serves a Cairn target; nil for nbdkit.
	cl *cluster
}

type proc struct {
	name string
	pid  int
}

// bench holds everything the run started, so cleanup can undo it.
type bench struct {
	o        options
	progress io.Writer

	root, bin string // repository root and bin/cairn
	tmp       string // temporary directory; removed by cleanup
	// main is the dev cluster of (a), (b), (d), (e) and the idle volumes,
	// in tmp/cluster; its nodes run with --insecure.
	main cluster
	// tls is the dev cluster of (f), in tmp/cluster-tls, with mutual TLS
	// on every port; it runs only for the cost-of-TLS pairs.
	tls       cluster
	nbdkit    *exec.Cmd
	sizeBytes uint64
}

// cluster is a 3-node dev cluster that the run started.
type cluster struct {
	dir string // its directory, once `dev up` ran; "" once it is down
	// tlsDir is cairn ctl's --tls-dir (DIR/pki/ctl, made by `dev up
	// --tls`); "" for a plaintext cluster.
	tlsDir   string
	servers  string // meta API addresses, comma-separated
	nodes    []benchkit.Node
	exported []string // volume ids attached by us, unexported by cleanup
}

// ctl is the argument list of `cairn ctl` on c, connection flags first,
// then args.
func (c *cluster) ctl(args ...string) []string {
	out := []string{"ctl", "--server", c.servers}
	if c.tlsDir != "" {
		out = append(out, "--tls-dir", c.tlsDir)
	}
	return append(out, args...)
}

func (c *cluster) load() (err error) {
	c.nodes, c.servers, err = benchkit.LoadDevNodes(c.dir)
	return err
}

type result struct {
	wl     workload
	tgt    *target
	iops   float64
	mibps  float64
	p50    float64 // ns
	p99    float64 // ns
	err    error
	cpu    map[string]float64 // process name → % of one core
	fioCPU float64
	// cswRate is the serving processes' context switches per second in
	// the middle of the run (0: not measured).
	cswRate float64
	// machine is what all CPUs did during the run, from /proc/stat.
	machine cpuShare
	elapsed time.Duration
	// cached is the share of the target's data file in the page cache when
	// the run started (read workloads only; -1: not measured).
	cached float64
	// ops is what the replica servers of all nodes executed during the run
	// (Cairn targets only), from their cairn_replica_op_duration_seconds.
	ops map[string]opStat
}

// opStat is a count and the summed duration of one replica op.
type opStat struct {
	count float64
	sum   float64 // seconds
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.progress, "fiobench: "+format+"\n", args...)
}

func (b *bench) run(ctx context.Context) error {
	for _, tool := range []string{"go", "fio", "nbdkit"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (make deps installs fio and nbdkit)", tool)
		}
	}
	if b.o.perfDir != "" {
		if _, err := exec.LookPath("perf"); err != nil {
			return errors.New("-perf: perf is not installed")
		}
		if err := os.MkdirAll(b.o.perfDir, 0o755); err != nil {
			return fmt.Errorf("-perf: %w", err)
		}
		abs, err := filepath.Abs(b.o.perfDir)
		if err != nil {
			return err
		}
		b.o.perfDir = abs
	}
	size, _ := benchkit.ParseSize(b.o.size)
	b.sizeBytes = size

	var err error
	if b.root, b.bin, err = benchkit.BuildCairn(ctx, "fiobench", b.o.Verbose, b.logf); err != nil {
		return err
	}

	if b.tmp, err = os.MkdirTemp(b.o.Parent, "cairn-fiobench-"); err != nil {
		return err
	}
	if n := len(filepath.Join(b.tmp, "idle-10.sock")); n > 100 {
		return fmt.Errorf("-dir %s: socket paths would be %d bytes, unix sockets allow 107", b.o.Parent, n)
	}
	// The second cluster starts after the main runs: fail now if its
	// longest socket path, its controller's CSI socket, cannot be bound.
	if n := len(filepath.Join(b.tmp, "cluster-tls", "controller", "csi.sock")); b.o.tlsPairs > 0 && n > 107 {
		return fmt.Errorf("-dir %s: the TLS cluster's socket paths would be %d bytes, unix sockets allow 107 (or -tls-pairs 0)", b.o.Parent, n)
	}
	b.main.dir = filepath.Join(b.tmp, "cluster")
	if b.main.nodes, b.main.servers, err = benchkit.DevUp(ctx, b.root, b.bin, b.main.dir, b.o.NodeArgs, b.o.Verbose, b.logf); err != nil {
		return err
	}
	n1 := b.main.nodes[0]
	rssFresh, _ := procStatusKiB(n1.PID, "VmRSS")

	// The RSS measurement comes first, on a node that has done no I/O; the
	// idle volumes are unexported again so that their engines' background
	// loops do not run during the fio runs.
	var idle []string
	var rssIdle rssSample
	if b.o.idleVolumes > 0 {
		b.logf("creating and exporting %d idle %s volumes (%d replicas) on %s", b.o.idleVolumes, b.o.idleSize, b.o.idleReplicas, n1.ID)
		for i := 1; i <= b.o.idleVolumes; i++ {
			v, err := b.createVolume(ctx, &b.main, fmt.Sprintf("idle-%d", i), b.o.idleSize, b.o.idleReplicas)
			if err != nil {
				return err
			}
			idle = append(idle, v.ID)
		}
		if rssIdle, err = b.measureIdle(ctx, idle, n1); err != nil {
			return err
		}
	}

	b.logf("creating and exporting the 1-replica and 3-replica %s volumes on %s", b.o.size, n1.ID)
	var cairn []*target // (a), (b), (d), (e)
	for _, t := range []struct {
		key, label string
		replicas   int
		extra      []string
	}{
		{"a", "(a) cairn 1 replica", 1, nil},
		{"b", "(b) cairn 3 replicas", 3, nil},
		{"d", "(d) cairn 3 replicas, no checksums", 3, []string{"--checksum-algorithm", "none"}},
		{"e", "(e) cairn 3 replicas, asynchronous", 3, []string{"--param", "replicationMode=asynchronous"}},
	} {
		tgt, err := b.newTarget(ctx, &b.main, t.key, t.label, t.replicas, t.extra...)
		if err != nil {
			return err
		}
		cairn = append(cairn, tgt)
	}
	tA, tB, tD, tE := cairn[0], cairn[1], cairn[2], cairn[3]
	tC := &target{key: "c", label: "(c) nbdkit file", sock: filepath.Join(b.tmp, "c.sock")}
	if err := b.startNbdkit(ctx, tC); err != nil {
		return err
	}
	targets := []*target{tA, tB, tD, tE, tC}

	if b.o.perfDir != "" {
		b.logf("perf profiles go to %s", b.o.perfDir)
	}
	b.printHeader(os.Stdout)

	var results []*result
	for _, t := range targets {
		b.logf("fill %s", t.label)
		r := b.runFio(ctx, fill, t)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		results = append(results, r)
	}
	for _, wl := range b.o.workloads {
		for _, t := range targets {
			b.logf("%s on %s", wl.label, t.label)
			r := b.runFio(ctx, wl, t)
			if ctx.Err() != nil {
				printTable(os.Stdout, results)
				return ctx.Err()
			}
			results = append(results, r)
		}
	}
	pairs, err := b.measurePairs(ctx, "checksums", checksumGoals, b.o.checksumPairs, tB, tD, results)
	if err != nil {
		printTable(os.Stdout, results)
		return err
	}
	// A failure to set up the second cluster or (f) leaves the other
	// tables to print; run returns it at the end.
	var tlsPairs []pair
	var tlsErr error
	if b.o.tlsPairs > 0 {
		tlsPairs, tlsErr = b.measureTLS(ctx, tB)
		if ctx.Err() != nil {
			printTable(os.Stdout, results)
			return ctx.Err()
		}
		if tlsErr != nil {
			b.logf("cost of mutual TLS: %v", tlsErr)
		}
	}
	hwm, _ := procStatusKiB(n1.PID, "VmHWM")
	rssAfter, _ := procStatusKiB(n1.PID, "VmRSS")

	var rssLater rssSample
	if len(idle) > 0 {
		b.logf("unexporting the benchmark volumes and exporting the %d idle volumes again", len(idle))
		for _, id := range append([]string(nil), b.main.exported...) { // unexport edits b.main.exported
			if err := b.unexport(ctx, &b.main, id); err != nil {
				return err
			}
		}
		if rssLater, err = b.measureIdle(ctx, idle, n1); err != nil {
			return err
		}
	}

	fmt.Println()
	printTable(os.Stdout, results)
	fmt.Println()
	printCPU(os.Stdout, results)
	fmt.Println()
	printOps(os.Stdout, results)
	fmt.Println()
	printGoals(os.Stdout, results)
	fmt.Println()
	printChecksumGoals(os.Stdout, pairs)
	if b.o.tlsPairs > 0 {
		fmt.Println()
		if tlsErr != nil {
			fmt.Printf("cost of mutual TLS: not measured: %v\n", tlsErr)
		} else {
			printTLSCost(os.Stdout, tlsPairs)
		}
	}
	fmt.Println()
	printAsync(os.Stdout, results)
	fmt.Println()
	printRSS(os.Stdout, n1.ID, b.o, rssFresh, rssIdle, rssLater, hwm, rssAfter)

	// Every fio run, including the pairs' runs that are not in results.
	var failed []string
	seen := map[*result]bool{}
	note := func(r *result) {
		if r != nil && r.err != nil && !seen[r] {
			seen[r] = true
			failed = append(failed, fmt.Sprintf("%s on %s: %v", r.wl.label, r.tgt.label, r.err))
		}
	}
	for _, r := range results {
		note(r)
	}
	for _, p := range append(append([]pair(nil), pairs...), tlsPairs...) {
		note(p.x)
		note(p.base)
	}
	var errs []error
	if tlsErr != nil {
		errs = append(errs, fmt.Errorf("cost of mutual TLS: %w", tlsErr))
	}
	if len(failed) > 0 {
		errs = append(errs, fmt.Errorf("%d fio runs failed:\n  %s", len(failed), strings.Join(failed, "\n  ")))
	}
	return errors.Join(errs...)
}

// rssSample is node-1's memory with the idle volumes exported.
type rssSample struct {
	rssKiB  uint64
	metrics map[string]float64 // selected Go runtime metrics from /metrics
}

// measureIdle exports ids on n, waits for the node to settle, reads its RSS
// and Go memory metrics, and unexports them again.
func (b *bench) measureIdle(ctx context.Context, ids []string, n benchkit.Node) (rssSample, error) {
	var s rssSample
	for i, id := range ids {
		if err := b.export(ctx, &b.main, id, filepath.Join(b.tmp, fmt.Sprintf("idle-%d.sock", i+1))); err != nil {
			return s, err
		}
	}
	// Idle: engines started, their first clean point and watch ticks done.
	if err := benchkit.Sleep(ctx, 5*time.Second); err != nil {
		return s, err
	}
	var err error
	if s.rssKiB, err = procStatusKiB(n.PID, "VmRSS"); err != nil {
		return s, fmt.Errorf("%s: %w", n.ID, err)
	}
	s.metrics = scrapeMetrics(ctx, n.Metrics, "go_memstats_heap_inuse_bytes", "go_memstats_heap_idle_bytes",
		"go_memstats_heap_released_bytes", "go_memstats_stack_inuse_bytes", "go_goroutines", "go_threads")
	for _, id := range ids {
		if err := b.unexport(ctx, &b.main, id); err != nil {
			return s, err
		}
	}
	return s, nil
}

// cmd runs a command from the repository root and returns its stdout.
func (b *bench) cmd(ctx context.Context, name string, args ...string) ([]byte, error) {
	return benchkit.Command(ctx, b.root, b.o.Verbose, b.logf, name, args...)
}

// createVolume creates a volume on c with a replica on its node-1.
func (b *bench) createVolume(ctx context.Context, c *cluster, name, size string, replicas int, extra ...string) (*benchkit.Volume, error) {
	args := c.ctl("volume", "create", name,
		"--size", size, "--replicas", strconv.Itoa(replicas), "-o", "json",
		// nbdkit serves a local file; give the Cairn volume a replica on the
		// exporting node too, so reads are local in both.
		"--preferred-node", c.nodes[0].ID)
	out, err := b.cmd(ctx, b.bin, append(args, extra...)...)
	if err != nil {
		return nil, err
	}
	var v benchkit.Volume
	if err := json.Unmarshal(out, &v); err != nil || v.ID == "" {
		return nil, fmt.Errorf("volume create %s: no id in %q", name, out)
	}
	return &v, nil
}

// export exports volume id of c over NBD on sock, on c's node-1.
func (b *bench) export(ctx context.Context, c *cluster, id, sock string) error {
	c.exported = append(c.exported, id)
	_, err := b.cmd(ctx, b.bin, c.ctl("volume", "export", id, "--node", c.nodes[0].ID, "--nbd", sock)...)
	return err
}

func (b *bench) unexport(ctx context.Context, c *cluster, id string) error {
	if _, err := b.cmd(ctx, b.bin, c.ctl("volume", "unexport", id)...); err != nil {
		return err
	}
	for i, e := range c.exported {
		if e == id {
			c.exported = append(c.exported[:i], c.exported[i+1:]...)
			break
		}
	}
	return nil
}

// newTarget creates a -size volume of replicas replicas on c, named
// bench-KEY, with a replica on c's node-1, and exports it there on
// tmp/KEY.sock; c's node agents serve it.
func (b *bench) newTarget(ctx context.Context, c *cluster, key, label string, replicas int, extra ...string) (*target, error) {
	t := &target{key: key, label: label, sock: filepath.Join(b.tmp, key+".sock"), cl: c}
	v, err := b.createVolume(ctx, c, "bench-"+key, b.o.size, replicas, extra...)
	if err != nil {
		return nil, err
	}
	if t.file = benchkit.ReplicaFile(v, c.nodes[0]); t.file == "" {
		return nil, fmt.Errorf("volume %s has no replica on %s", v.ID, c.nodes[0].ID)
	}
	if err := b.export(ctx, c, v.ID, t.sock); err != nil {
		return nil, err
	}
	if _, err := os.Stat(t.file); err != nil {
		return nil, fmt.Errorf("%s: replica data file: %w", t.label, err)
	}
	for _, n := range c.nodes {
		t.pids = append(t.pids, proc{n.ID, n.PID})
	}
	return t, nil
}

// startNbdkit serves a sparse plain file of the benchmark size, in the same
// directory as the cluster's data, with nbdkit's file plugin.
func (b *bench) startNbdkit(ctx context.Context, t *target) error {
	img := filepath.Join(b.tmp, "plain.img")
	t.file = img
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	if err := f.Truncate(int64(b.sizeBytes)); err != nil {
		_ = f.Close() // the truncate error is the one to report
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	args := []string{"--unix", t.sock, "--foreground", "file", img}
	if b.o.Verbose {
		b.logf("$ nbdkit %s", strings.Join(args, " "))
	}
	c := exec.Command("nbdkit", args...)
	c.SysProcAttr = benchkit.OwnGroup()
	logf, err := os.Create(filepath.Join(b.tmp, "nbdkit.log"))
	if err != nil {
		return err
	}
	defer logf.Close() // nbdkit holds its own descriptor
	c.Stdout, c.Stderr = logf, logf
	if err := c.Start(); err != nil {
		return fmt.Errorf("start nbdkit: %w", err)
	}
	b.nbdkit = c
	t.pids = []proc{{"nbdkit", c.Process.Pid}}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if fi, err := os.Stat(t.sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nbdkit did not create %s within 10s: %s", t.sock, readTail(filepath.Join(b.tmp, "nbdkit.log")))
		}
		if err := benchkit.Sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
}

// runFio runs one fio job against t and measures the CPU time of t's
// serving processes and of the machine meanwhile.
func (b *bench) runFio(ctx context.Context, wl workload, t *target) *result {
	r := &result{wl: wl, tgt: t, cpu: map[string]float64{}, cached: -1}
	if !wl.write {
		// Reads are to measure the serving software, not the disk: the
		// machine's page cache may have dropped one target's data and kept
		// another's (the fills ran in turn), so read the file in first.
		if err := benchkit.Warm(ctx, t.file); err != nil {
			r.err = fmt.Errorf("read %s into the page cache: %w", t.file, err)
			return r
		}
	}
	syscall.Sync() // leave no dirty pages of the previous run to write back
	if err := benchkit.Sleep(ctx, b.o.settle); err != nil {
		r.err = err
		return r
	}
	if !wl.write {
		r.cached, _ = residency(t.file)
	}
	out := filepath.Join(b.tmp, fmt.Sprintf("fio-%s-%s.json", wl.name, t.key))
	args := []string{
		"--name=" + wl.name, "--ioengine=nbd", "--uri=nbd+unix:///?socket=" + t.sock,
		"--rw=" + wl.rw, "--bs=" + wl.bs, "--iodepth=" + strconv.Itoa(wl.iodepth),
		"--size=" + strconv.FormatUint(b.sizeBytes, 10),
		"--output-format=json", "--output=" + out,
	}
	if wl.name != fill.name {
		args = append(args, benchkit.FioTimed(b.o.runtime)...)
	}
	fctx, cancel := context.WithTimeout(ctx, b.o.runtime+10*time.Minute)
	defer cancel()
	c := benchkit.FioCommand(fctx, b.o.Verbose, b.logf, args...)
	var stderr bytes.Buffer
	c.Stderr = &stderr

	perf := b.startPerf(wl, t)
	var ops0 map[string]opStat
	if t.cl != nil {
		ops0 = replicaOps(ctx, t.cl.nodes)
	}
	before := make(map[string]uint64)
	for _, p := range t.pids {
		before[p.name], _ = benchkit.ProcCPUTicks(p.pid)
	}
	m0, _ := benchkit.MachineCPU()
	start := time.Now()
	cswDone := make(chan float64, 1)
	cswCtx, cswStop := context.WithCancel(fctx) // ends when fio does
	defer cswStop()
	if wl.name != fill.name && b.o.runtime >= 3*time.Second {
		// Context switches are counted per thread, and nbdkit's threads
		// end with the connection: count them between 1 s after the start
		// and 1 s before the end, while the connection is up.
		go func() {
			window := b.o.runtime - 2*time.Second
			if benchkit.Sleep(cswCtx, time.Second) != nil {
				cswDone <- 0
				return
			}
			n0 := sumContextSwitches(t.pids)
			if benchkit.Sleep(cswCtx, window) != nil {
				cswDone <- 0
				return
			}
			cswDone <- float64(sumContextSwitches(t.pids)-n0) / window.Seconds()
		}()
	} else {
		cswDone <- 0
	}
	err := c.Run()
	r.elapsed = time.Since(start)
	cswStop()
	r.cswRate = <-cswDone
	m1, _ := benchkit.MachineCPU()
	for _, p := range t.pids {
		after, perr := benchkit.ProcCPUTicks(p.pid)
		if perr == nil {
			r.cpu[p.name] = 100 * float64(after-before[p.name]) / benchkit.ClockTicks / r.elapsed.Seconds()
		}
	}
	b.stopPerf(perf)
	if ops0 != nil {
		r.ops = map[string]opStat{}
		for op, v := range replicaOps(ctx, t.cl.nodes) {
			r.ops[op] = opStat{count: v.count - ops0[op].count, sum: v.sum - ops0[op].sum}
		}
	}
	if c.ProcessState != nil {
		r.fioCPU = 100 * (c.ProcessState.UserTime() + c.ProcessState.SystemTime()).Seconds() / r.elapsed.Seconds()
	}
	r.machine = cpuSince(m1, m0)
	if err != nil {
		r.err = fmt.Errorf("fio: %w: %s", err, strings.TrimSpace(stderr.String()))
		return r
	}
	job, err := benchkit.ReadFioJob(out, stderr.String())
	if err != nil {
		r.err = err
		return r
	}
	s := job.Read
	if wl.write {
		s = job.Write
	}
	r.iops, r.mibps = s.IOPS, s.BWBytes/(1<<20)
	r.p50, r.p99 = s.ClatNs.Percentile["50.000000"], s.ClatNs.Percentile["99.000000"]
	return r
}

// residency returns the share (%) of path's pages in the page cache.
func residency(path string) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return -1, err
	}
	defer f.Close() // read only
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		return -1, err
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return -1, err
	}
	defer func() { _ = unix.Munmap(m) }() // a read-only mapping
	page := os.Getpagesize()
	vec := make([]byte, (len(m)+page-1)/page)
	// x/sys/unix has no Mincore wrapper.
	if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
		return -1, errno
	}
	in := 0
	for _, v := range vec {
		in += int(v & 1)
	}
	return 100 * float64(in) / float64(len(vec)), nil
}

// replicaOps sums the replica servers' per-op counts and durations over
// nodes. /metrics is plain HTTP also on a cluster with mutual TLS.
func replicaOps(ctx context.Context, nodes []benchkit.Node) map[string]opStat {
	out := map[string]opStat{}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for _, n := range nodes {
		body, err := benchkit.HTTPGet(ctx, "http://"+n.Metrics+"/metrics")
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(body), "\n") {
			for _, kind := range []string{"_sum", "_count"} {
				rest, ok := strings.CutPrefix(line, "cairn_replica_op_duration_seconds"+kind+`{op="`)
				if !ok {
					continue
				}
				op, val, ok := strings.Cut(rest, `"} `)
				v, err := strconv.ParseFloat(strings.TrimSpace(val), 64)
				if !ok || err != nil {
					continue
				}
				st := out[op]
				if kind == "_sum" {
					st.sum += v
				} else {
					st.count += v
				}
				out[op] = st
			}
		}
	}
	return out
}

// startPerf records the serving processes of t during one run, if -perf.
func (b *bench) startPerf(wl workload, t *target) *exec.Cmd {
	if b.o.perfDir == "" {
		return nil
	}
	var pids []string
	for _, p := range t.pids {
		pids = append(pids, strconv.Itoa(p.pid))
	}
	out := filepath.Join(b.o.perfDir, fmt.Sprintf("%s-%s.perf.data", wl.name, t.key))
	c := exec.Command("perf", "record", "-q", "-F", "999", "-g", "-p", strings.Join(pids, ","), "-o", out)
	c.Stdout, c.Stderr = io.Discard, io.Discard
	c.SysProcAttr = benchkit.OwnGroup()
	if err := c.Start(); err != nil {
		b.logf("perf: %v", err)
		return nil
	}
	time.Sleep(200 * time.Millisecond) // let perf attach before fio starts
	return c
}

func (b *bench) stopPerf(c *exec.Cmd) {
	if c == nil {
		return
	}
	_ = c.Process.Signal(syscall.SIGINT) // perf writes its file on SIGINT
	done := make(chan struct{})
	go func() { _ = c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = c.Process.Kill()
		<-done
	}
}

// cleanup undoes whatever run started, with its own deadlines: it also runs
// after Ctrl-C, when run's context is done.
func (b *bench) cleanup() {
	b.downCluster(&b.tls)
	b.downCluster(&b.main)
	if b.nbdkit != nil {
		_ = b.nbdkit.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = b.nbdkit.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			_ = b.nbdkit.Process.Kill()
			<-done
		}
	}
	benchkit.RemoveTemp(b.tmp, b.o.Keep, b.logf)
}

// downCluster unexports the volumes the run exported on c and brings c
// down (`dev down`), if `dev up` ran, with deadlines of its own: it also
// runs after Ctrl-C, when run's context is done. c.dir is "" afterwards,
// so a second call does nothing.
func (b *bench) downCluster(c *cluster) {
	if c.dir == "" {
		return
	}
	defer func() { c.dir = "" }()
	if _, err := os.Stat(filepath.Join(c.dir, "cluster.json")); err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if c.nodes == nil {
		_ = c.load() // interrupted right after dev up
	}
	// Detach first, so that every engine flushes and stops while all
	// nodes are up.
	for _, id := range append([]string(nil), c.exported...) {
		if err := b.unexport(ctx, c, id); err != nil {
			b.logf("cleanup: %v", err)
		}
	}
	benchkit.DevDown(ctx, b.root, b.bin, c.dir, b.o.Keep, b.o.Verbose, b.logf, c.nodes)
}

func (b *bench) printHeader(w io.Writer) {
	fmt.Fprintf(w, "fiobench: fio's nbd engine against Cairn NBD exports and nbdkit's file plugin\n")
	fmt.Fprintf(w, "machine:  %s\n", benchkit.Machine())
	fmt.Fprintf(w, "disk:     %s on %s (cluster data dirs and the plain file)\n", b.tmp, fsType(b.tmp))
	fmt.Fprintf(w, "cairn:    %s\n", benchkit.Version(b.root))
	if len(b.o.NodeArgs) > 0 {
		fmt.Fprintf(w, "nodes:    every node agent runs with %s\n", strings.Join(b.o.NodeArgs, " "))
	}
	fmt.Fprintf(w, "tools:    %s, %s\n", benchkit.FirstLine("fio (version unknown)", "fio", "--version"), benchkit.FirstLine("nbdkit (version unknown)", "nbdkit", "--version"))
	fmt.Fprintf(w, "targets:  (a) %s volume, 1 replica (node-1), exported on node-1\n", b.o.size)
	fmt.Fprintf(w, "          (b) %s volume, 3 replicas (node-1..3, write quorum per store), exported on node-1\n", b.o.size)
	fmt.Fprintf(w, "          (c) nbdkit --unix SOCK --foreground file %s (%s sparse file)\n", filepath.Join(b.tmp, "plain.img"), b.o.size)
	fmt.Fprintf(w, "          (d) as (b) with checksumAlgorithm none (every volume else has crc32c, the default)\n")
	fmt.Fprintf(w, "          (e) as (b) with replicationMode asynchronous\n")
	if b.o.tlsPairs > 0 {
		fmt.Fprintf(w, "          (f) as (b) on a second 3-node dev cluster (dev up --tls): every port speaks mutual TLS, where\n")
		fmt.Fprintf(w, "              the nodes of (a)..(e) run with --insecure; it runs only for the cost-of-TLS pairs\n")
	}
	fmt.Fprintf(w, "runs:     each target filled once (1M seq write qd8 over the whole device), then every workload\n")
	fmt.Fprintf(w, "          on (a), (b), (d), (e), (c) in turn, %v each (time_based, norandommap); sync(2) + %v pause before each run\n", b.o.runtime, b.o.settle)
	if wls := b.tlsSelected(); b.o.tlsPairs > 0 && len(wls) > 0 {
		fmt.Fprintf(w, "          then (f) filled once and %d pairs of (f) and (b) at %s, in alternating order\n", b.o.tlsPairs, strings.Join(wls, ", "))
	}
}

func printTable(w io.Writer, results []*result) {
	nbdkit := map[string]*result{}
	for _, r := range results {
		if r.tgt.key == "c" && r.err == nil {
			nbdkit[r.wl.name] = r
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "workload\ttarget\tIOPS\tMiB/s\tp50\tp99\tIOPS vs (c)\tin page cache\t")
	prev := ""
	for _, r := range results {
		wl := r.wl.label
		if wl == prev {
			wl = ""
		} else if prev != "" {
			fmt.Fprintln(tw, "\t\t\t\t\t\t\t\t")
		}
		prev = r.wl.label
		if r.err != nil {
			fmt.Fprintf(tw, "%s\t%s\tERROR\t\t\t\t\t\t\n", wl, r.tgt.label)
			continue
		}
		ratio := ""
		if c := nbdkit[r.wl.name]; c != nil && r.tgt.key != "c" && c.iops > 0 {
			ratio = fmt.Sprintf("%.2f", r.iops/c.iops)
		}
		cached := ""
		if r.cached >= 0 {
			cached = fmt.Sprintf("%.0f%%", r.cached)
		}
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.1f\t%s\t%s\t%s\t%s\t\n", wl, r.tgt.label, r.iops, r.mibps, benchkit.Dur(r.p50), benchkit.Dur(r.p99), ratio, cached)
	}
	tw.Flush()
	fmt.Fprintln(w, "p50, p99: fio completion latency (clat) percentiles; in page cache: share of the file the reads come from")
	fmt.Fprintln(w, "(node-1's replica, nbdkit's plain file) that was in the page cache when the run started, after reading it in")
}

func printCPU(w io.Writer, results []*result) {
	fmt.Fprintf(w, "CPU during each run, %% of one core (%d cores = %d%%): the serving processes and fio from /proc/PID/stat;\n", runtime.NumCPU(), 100*runtime.NumCPU())
	fmt.Fprintln(w, "from /proc/stat: other tasks = user+system time of all tasks minus those columns (other work on the machine,")
	fmt.Fprintln(w, "kernel threads such as writeback), irq = hard and soft interrupts, steal = taken by the hypervisor.")
	fmt.Fprintln(w, "Per I/O: CPU time of the serving processes (node-1..3 or nbdkit) per I/O done, and their threads' context")
	fmt.Fprintln(w, "switches per I/O (counted from 1 s after the start to 1 s before the end); less sensitive to other work on")
	fmt.Fprintln(w, "the machine than IOPS:")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "workload\ttarget\tnode-1\tnode-2\tnode-3\tnbdkit\tfio\tother tasks\tirq\tsteal\tiowait\tidle\tCPU/IO\tcsw/IO\t")
	prev := ""
	var contended int
	for _, r := range results {
		wl := r.wl.label
		if wl == prev {
			wl = ""
		}
		prev = r.wl.label
		cell := func(name string) string {
			v, ok := r.cpu[name]
			if !ok {
				return "-"
			}
			return fmt.Sprintf("%.0f", v)
		}
		m := r.machine
		other := m.task - r.fioCPU
		for _, v := range r.cpu {
			other -= v
		}
		other = max(other, 0)
		if other > contendedShare {
			contended++
		}
		idle := max(float64(100*runtime.NumCPU())-m.task-m.irq-m.steal-m.iowait, 0)
		perIO, cswIO := "-", "-"
		if ios := r.iops * r.elapsed.Seconds(); r.err == nil && ios > 0 {
			var serving float64
			for _, v := range r.cpu {
				serving += v
			}
			perIO = benchkit.Dur(1e9 * serving / 100 * r.elapsed.Seconds() / ios)
		}
		if r.err == nil && r.iops > 0 && r.cswRate > 0 {
			cswIO = fmt.Sprintf("%.1f", r.cswRate/r.iops)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%s\t%s\t\n", wl, r.tgt.label,
			cell("node-1"), cell("node-2"), cell("node-3"), cell("nbdkit"), r.fioCPU, other, m.irq, m.steal, m.iowait, idle, perIO, cswIO)
	}
	tw.Flush()
	if contended > 0 {
		fmt.Fprintf(w, "WARNING: in %d of %d runs other tasks used more than %.0f%% of a core: the machine was shared, and the\n", contended, len(results), contendedShare)
		fmt.Fprintln(w, "numbers above are lower and noisier than on a quiet machine. Compare only runs made side by side.")
	}
}

// contendedShare is the CPU (% of one core) used by tasks other than the
// benchmark's above which printCPU warns that the machine was not quiet.
const contendedShare = 25.0

func printOps(w io.Writer, results []*result) {
	fmt.Fprintln(w, "replica server requests during each Cairn run, all nodes: count per second and mean time in the server")
	fmt.Fprintln(w, "(cairn_replica_op_duration_seconds; the time from decoding a request to its reply being queued):")
	opNames := []string{"read", "write", "flush", "mark_clean"}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	hdr := "workload\ttarget\t"
	for _, op := range opNames {
		hdr += op + "/s\tmean\t"
	}
	fmt.Fprintln(tw, hdr)
	prev := ""
	for _, r := range results {
		if r.ops == nil {
			continue
		}
		wl := r.wl.label
		if wl == prev {
			wl = ""
		}
		prev = r.wl.label
		line := wl + "\t" + r.tgt.label + "\t"
		for _, op := range opNames {
			st := r.ops[op]
			if st.count <= 0 {
				line += "-\t-\t"
				continue
			}
			line += fmt.Sprintf("%.0f\t%s\t", st.count/r.elapsed.Seconds(), benchkit.Dur(1e9*st.sum/st.count))
		}
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
}

func printGoals(w io.Writer, results []*result) {
	find := func(key, wl string) *result {
		for _, r := range results {
			if r.tgt.key == key && r.wl.name == wl && r.err == nil {
				return r
			}
		}
		return nil
	}
	fmt.Fprintln(w, "targets of the issue (IOPS of the Cairn export / IOPS of nbdkit):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\tworkload\tratio\tgoal\t\t")
	for _, g := range goals {
		var wl workload
		for _, x := range workloads {
			if x.name == g.wl {
				wl = x
			}
		}
		name := map[string]string{"a": "(a) 1 replica", "b": "(b) 3 replicas"}[g.of]
		r, c := find(g.of, g.wl), find("c", g.wl)
		if r == nil || c == nil || c.iops == 0 {
			fmt.Fprintf(tw, "%s\t%s\t-\t≥ %.2f\tnot measured\t\n", name, wl.label, g.ratio)
			continue
		}
		ratio := r.iops / c.iops
		verdict := "not met"
		if ratio >= g.ratio {
			verdict = "met"
		}
		fmt.Fprintf(tw, "%s\t%s\t%.2f\t≥ %.2f\t%s\t\n", name, wl.label, ratio, g.ratio, verdict)
	}
	tw.Flush()
}

// printAsync compares asynchronous replication (e) with synchronous (b)
// and with one replica (a), the same run: an asynchronous volume
// acknowledges once its own replica has a write, so it should approach
// (a) on writes.
func printAsync(w io.Writer, results []*result) {
	find := func(key, wl string) *result {
		for _, r := range results {
			if r.tgt.key == key && r.wl.name == wl && r.err == nil {
				return r
			}
		}
		return nil
	}
	fmt.Fprintln(w, "replicationMode (3 replicas): IOPS of asynchronous (e) / synchronous (b), and / 1 replica (a):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "workload\tasync IOPS\tsync IOPS\t1-replica IOPS\tasync/sync\tasync/1-replica\t")
	for _, wl := range workloads {
		if !wl.write {
			continue
		}
		e, b, a := find("e", wl.name), find("b", wl.name), find("a", wl.name)
		if e == nil || b == nil || a == nil || b.iops == 0 || a.iops == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\tnot measured\t\t\n", wl.label)
			continue
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%.0f\t%.2f\t%.2f\t\n", wl.label, e.iops, b.iops, a.iops, e.iops/b.iops, e.iops/a.iops)
	}
	tw.Flush()
}

// pair is one measurement of a workload on two targets, one run right
// after the other: x, the side whose cost is measured, and base, the
// reference. Its figure is the IOPS ratio x/base.
type pair struct {
	wl      workload
	x, base *result
}

// cpuPerIO is the serving processes' CPU time per I/O of r, in ns (0:
// unknown).
func cpuPerIO(r *result) float64 {
	ios := r.iops * r.elapsed.Seconds()
	if r.err != nil || ios <= 0 {
		return 0
	}
	var serving float64
	for _, v := range r.cpu {
		serving += v
	}
	return 1e9 * serving / 100 * r.elapsed.Seconds() / ios
}

// selected returns the workload named name if -workloads selected it.
func (b *bench) selected(name string) (workload, bool) {
	for _, w := range b.o.workloads {
		if w.name == name {
			return w, true
		}
	}
	return workload{}, false
}

// measurePairs measures each workload of goals that -workloads selected n
// times on x and on base, and returns the pairs in that order. With main
// (the main table's results), the first pair of each workload is the main
// table's runs (x, then base) and n-1 more are run; without, all n are run.
// Pair i runs in the order (x, base) for an even i and (base, x) for an odd
// one, so that a drift of the machine over time (page cache, writeback,
// neighbours) favours neither side. Noise on a shared machine moves a single
// pair by ±20 %; the median of several pairs is the figure to go by. what
// names the cost measured in progress messages.
func (b *bench) measurePairs(ctx context.Context, what string, goals []pairGoal, n int, x, base *target, main []*result) ([]pair, error) {
	find := func(key, wl string) *result {
		for _, r := range main {
			if r.tgt.key == key && r.wl.name == wl {
				return r
			}
		}
		return nil
	}
	var pairs []pair
	for _, g := range goals {
		wl, ok := b.selected(g.wl)
		if !ok {
			continue // not selected with -workloads
		}
		i := 0
		if main != nil {
			pairs = append(pairs, pair{wl: wl, x: find(x.key, wl.name), base: find(base.key, wl.name)})
			i = 1
		}
		for ; i < n; i++ {
			order := []*target{x, base}
			if i%2 == 1 {
				order = []*target{base, x}
			}
			p := pair{wl: wl}
			for _, t := range order {
				b.logf("cost of %s, pair %d of %d: %s on %s", what, i+1, n, wl.label, t.label)
				r := b.runFio(ctx, wl, t)
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				if t == x {
					p.x = r
				} else {
					p.base = r
				}
			}
			pairs = append(pairs, p)
		}
	}
	return pairs, nil
}

// tlsSelected names the workloads of tlsWorkloads that -workloads selected.
func (b *bench) tlsSelected() []string {
	var out []string
	for _, g := range tlsWorkloads {
		if _, ok := b.selected(g.wl); ok {
			out = append(out, g.wl)
		}
	}
	return out
}

// measureTLS starts the second dev cluster, with mutual TLS on every port,
// in tmp/cluster-tls (its node agents get the same -node-arg flags as the
// first cluster's), creates (f), a 3-replica volume like (b), exports it on
// that cluster's node-1, fills it once, measures -tls-pairs pairs of (f)
// and (b) for each of tlsWorkloads, and brings the cluster down again. Each
// cluster idles while the other one's target runs.
func (b *bench) measureTLS(ctx context.Context, tB *target) ([]pair, error) {
	if len(b.tlsSelected()) == 0 {
		b.logf("cost of mutual TLS: -workloads selects none of %s; not measured", benchkit.Names(tlsWorkloads, func(g pairGoal) string { return g.wl }))
		return nil, nil
	}
	c := &b.tls
	c.dir = filepath.Join(b.tmp, "cluster-tls")
	defer b.downCluster(c)
	b.logf("starting a second 3-node dev cluster, with mutual TLS, in %s", c.dir)
	// As benchkit.DevUp: Ctrl-C does not cancel dev up, which, killed
	// halfway, could leave node agents running that no cluster.json names.
	args := benchkit.DevUpTLSArgs(c.dir, b.o.NodeArgs)
	if _, err := b.cmd(context.WithoutCancel(ctx), b.bin, args...); err != nil {
		return nil, fmt.Errorf("dev up --tls: %w", err)
	}
	if err := c.load(); err != nil {
		return nil, err
	}
	c.tlsDir = filepath.Join(c.dir, "pki", "ctl")
	b.logf("creating and exporting the 3-replica %s volume on %s of the TLS cluster", b.o.size, c.nodes[0].ID)
	tF, err := b.newTarget(ctx, c, "f", "(f) cairn 3 replicas, mutual TLS", 3)
	if err != nil {
		return nil, err
	}
	b.logf("fill %s", tF.label)
	if r := b.runFio(ctx, fill, tF); r.err != nil {
		return nil, fmt.Errorf("fill %s: %w", tF.label, r.err)
	}
	return b.measurePairs(ctx, "mutual TLS", tlsWorkloads, b.o.tlsPairs, tF, tB, nil)
}

// pairTable is how printPairs shows pairs of x and base.
type pairTable struct {
	intro     []string // the lines above the table
	x, base   string   // the two sides in the column heads
	baseFirst bool     // base's IOPS and CPU columns before x's
	// rows are the workloads in table order; the table has goal columns
	// if one of them has a goal.
	rows []pairGoal
}

// printPairs prints, for each workload of t.rows that pairs measured, the
// median IOPS of each side, every pair's IOPS ratio x/base, their median
// (against the goal, if any) and the median CPU time per I/O of the serving
// processes on each side.
func printPairs(w io.Writer, t pairTable, pairs []pair) {
	for _, l := range t.intro {
		fmt.Fprintln(w, l)
	}
	withGoal := false
	for _, g := range t.rows {
		withGoal = withGoal || g.ratio > 0
	}
	sides := func(x, base string) []string {
		if t.baseFirst {
			return []string{base, x}
		}
		return []string{x, base}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(label string, iops []string, ratios, median string, goal, cpu []string) {
		cols := append(append([]string{label}, iops...), ratios, median)
		if withGoal {
			cols = append(cols, goal...)
		}
		cols = append(cols, cpu...)
		fmt.Fprintln(tw, strings.Join(cols, "\t")+"\t")
	}
	line("workload", sides(t.x+" IOPS", t.base+" IOPS"), "pair ratios", "median", []string{"goal", ""}, sides("CPU/IO "+t.x, "CPU/IO "+t.base))
	for _, g := range t.rows {
		var ps []pair
		var label string
		for _, p := range pairs {
			if p.wl.name == g.wl {
				ps, label = append(ps, p), p.wl.label
			}
		}
		if len(ps) == 0 {
			continue
		}
		var ratios, xIOPS, baseIOPS, cpuX, cpuBase []float64
		var cells []string
		for _, p := range ps {
			if p.x == nil || p.base == nil || p.x.err != nil || p.base.err != nil || p.base.iops == 0 {
				cells = append(cells, "-")
				continue
			}
			ratios = append(ratios, p.x.iops/p.base.iops)
			xIOPS, baseIOPS = append(xIOPS, p.x.iops), append(baseIOPS, p.base.iops)
			cpuX, cpuBase = append(cpuX, cpuPerIO(p.x)), append(cpuBase, cpuPerIO(p.base))
			cells = append(cells, fmt.Sprintf("%.2f", p.x.iops/p.base.iops))
		}
		goal := []string{"", ""}
		if g.ratio > 0 {
			goal[0] = fmt.Sprintf("≥ %.2f", g.ratio)
		}
		if len(ratios) == 0 {
			median := "-"
			if withGoal {
				goal[1] = "not measured"
			} else {
				median = "not measured"
			}
			line(label, []string{"-", "-"}, strings.Join(cells, " "), median, goal, []string{"", ""})
			continue
		}
		m := benchkit.Median(ratios)
		if g.ratio > 0 {
			goal[1] = "not met"
			if m >= g.ratio {
				goal[1] = "met"
			}
		}
		line(label, sides(fmt.Sprintf("%.0f", benchkit.Median(xIOPS)), fmt.Sprintf("%.0f", benchkit.Median(baseIOPS))),
			strings.Join(cells, " "), fmt.Sprintf("%.2f", m), goal,
			sides(benchkit.Dur(benchkit.Median(cpuX)), benchkit.Dur(benchkit.Median(cpuBase))))
	}
	tw.Flush()
}

// printChecksumGoals compares the 3-replica volume with checksums (b) and
// without (d): every pair's IOPS ratio, and their median against the goal.
func printChecksumGoals(w io.Writer, pairs []pair) {
	printPairs(w, pairTable{
		intro: []string{
			"cost of checksums (3 replicas: checksumAlgorithm crc32c (b) / none (d)): the IOPS ratio of each pair of",
			"runs (in alternating order), their median against the goal; IOPS and CPU per I/O of the nodes are medians:",
		},
		x: "crc32c", base: "none", rows: checksumGoals,
	}, pairs)
}

// printTLSCost compares the 3-replica volume on the cluster with mutual
// TLS (f) with (b) on the plaintext one: every pair's IOPS ratio f/b and
// their median. There is no goal.
func printTLSCost(w io.Writer, pairs []pair) {
	printPairs(w, pairTable{
		intro: []string{
			"cost of mutual TLS (3 replicas: plaintext --insecure (b) / mutual TLS (f)): the IOPS ratio TLS/plaintext (f/b)",
			"of each pair of runs (in alternating order) and their median; IOPS and CPU per I/O of the nodes are medians:",
		},
		x: "TLS", base: "plaintext", baseFirst: true, rows: tlsWorkloads,
	}, pairs)
	fmt.Fprintln(w, "(no target; issue 15 asks to report it)")
}

func printRSS(w io.Writer, node string, o options, fresh uint64, idle, later rssSample, hwm, afterBench uint64) {
	fmt.Fprintf(w, "%s agent memory (VmRSS from /proc/PID/status; target ≤ %d MiB with %d idle exported volumes):\n", node, rssGoalMiB, o.idleVolumes)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "state\tVmRSS\tGo heap in use\theap idle, not released\tstacks\tgoroutines\tthreads\tgoal\t")
	fmt.Fprintf(tw, "cluster up, no volumes\t%s\t\t\t\t\t\t\t\n", mib(fresh*1024))
	row := func(label string, s rssSample) {
		if s.rssKiB == 0 {
			return
		}
		m := s.metrics
		verdict := "not met"
		if float64(s.rssKiB)/1024 <= rssGoalMiB {
			verdict = "met"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", label, mib(s.rssKiB*1024),
			mibOpt(m, "go_memstats_heap_inuse_bytes"), mibOpt(m, "go_memstats_heap_idle_bytes", "go_memstats_heap_released_bytes"),
			mibOpt(m, "go_memstats_stack_inuse_bytes"), numOpt(m, "go_goroutines"), numOpt(m, "go_threads"), verdict)
	}
	row(fmt.Sprintf("%d idle %s volumes exported, before the fio runs", o.idleVolumes, o.idleSize), idle)
	fmt.Fprintf(tw, "end of the fio runs (2 volumes exported)\t%s\t\t\t\t\t\t\t\n", mib(afterBench*1024))
	fmt.Fprintf(tw, "peak so far (VmHWM)\t%s\t\t\t\t\t\t\t\n", mib(hwm*1024))
	row(fmt.Sprintf("%d idle volumes exported again, after the fio runs", o.idleVolumes), later)
	tw.Flush()
}

func mib(bytes uint64) string {
	if bytes == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f MiB", float64(bytes)/(1<<20))
}

// mibOpt prints metric a (minus b, if given) in MiB, or "-".
func mibOpt(m map[string]float64, a string, b ...string) string {
	v, ok := m[a]
	if !ok {
		return "-"
	}
	for _, x := range b {
		v -= m[x]
	}
	return fmt.Sprintf("%.1f MiB", v/(1<<20))
}

func numOpt(m map[string]float64, a string) string {
	v, ok := m[a]
	if !ok {
		return "-"
	}
	return strconv.FormatFloat(v, 'f', 0, 64)
}

func sumContextSwitches(ps []proc) uint64 {
	var sum uint64
	for _, p := range ps {
		n, _ := contextSwitches(p.pid)
		sum += n
	}
	return sum
}

// contextSwitches sums the voluntary and involuntary context switches of
// pid's threads. Threads that ended are not counted; Go and nbdkit keep
// theirs.
func contextSwitches(pid int) (uint64, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0, err
	}
	var sum uint64
	for _, t := range tasks {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/status", pid, t.Name()))
		if err != nil {
			continue // the thread ended
		}
		for _, line := range strings.Split(string(raw), "\n") {
			for _, f := range []string{"voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"} {
				if v, ok := strings.CutPrefix(line, f); ok {
					n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
					sum += n
				}
			}
		}
	}
	return sum, nil
}

// procStatusKiB reads a "kB" field (VmRSS, VmHWM) of /proc/PID/status.
func procStatusKiB(pid int, field string) (uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no %s", pid, field)
}

// cpuShare is CPU time in % of one core.
type cpuShare struct{ task, irq, steal, iowait float64 }

// cpuSince returns what the CPUs did from t0 to t, in % of one core.
func cpuSince(t, t0 benchkit.CPUTimes) cpuShare {
	total := float64(t.Total - t0.Total)
	if total <= 0 {
		return cpuShare{}
	}
	cores := 100 * float64(runtime.NumCPU()) / total
	return cpuShare{
		task: cores * float64(t.Task-t0.Task), irq: cores * float64(t.IRQ-t0.IRQ),
		steal: cores * float64(t.Steal-t0.Steal), iowait: cores * float64(t.IOWait-t0.IOWait),
	}
}

// scrapeMetrics reads the named samples (without labels) from a Prometheus
// text endpoint; missing ones are left out.
func scrapeMetrics(ctx context.Context, addr string, names ...string) map[string]float64 {
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	return benchkit.ScrapeMetrics(ctx, addr, func(key string) bool { return want[key] })
}

func readTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 500 {
		s = "…" + s[len(s)-500:]
	}
	return s
}

// fsType names the file system holding dir (from /proc/self/mountinfo), or
// "an unknown file system".
func fsType(dir string) string {
	typ, src := benchkit.Mount(dir)
	if typ == "" {
		return "an unknown file system"
	}
	return typ + " (" + src + ")"
}
