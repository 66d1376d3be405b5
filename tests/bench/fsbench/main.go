// Command fsbench measures file I/O on Cairn volumes the way pods use them:
// published through the dev cluster's CSI services, so ext4 (or xfs) on a
// loop device over the FUSE file that node-1's agent serves. It runs fio on
// a file in each mount, side by side with the same file system on a loop
// device over a plain file on the same disk, and prints tables.
//
// It builds bin/cairn, starts a 3-node dev cluster (`cairn dev up`) in a
// temporary directory, creates and publishes on node-1 (`cairn dev csi
// create`, `publish`) a 1-replica volume (1r), a 3-replica volume (3r) and a
// 3-replica volume with encryption=aes-256-gcm (3r-aes), and attaches a
// sparse plain file of the same size in the same directory with `losetup
// --direct-io=on`, formats and mounts it (plain). fio lays out one file in
// each mount with 1 MiB sequential writes, then every job runs for -runtime
// on all targets back to back, in an order that rotates from one job (or
// pair) to the next.
//
// It never fails on a number: it exits 1 only when something could not be set
// up, a fio run failed or cleanup left something behind, 2 on bad flags, 130
// after Ctrl-C. Volumes, mounts, loop devices, the cluster and the temporary
// directory are removed in every case.
//
//	go run ./tests/bench/fsbench [-runtime 8s] [-workloads LIST] [-targets LIST] [-fs ext4|xfs] [-pairs 1] [-keep] [-v]
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

// workload is one fio job.
type workload struct {
	name  string // for -workloads, the tables and file names
	fio   string // its fio options
	write bool   // report fio's write section (else read)
	// aesGoal is the bound on IOPS of 3r-aes / 3r: encryption may
	// cost at most 20% at 4 KiB and 40% at 1 MiB.
	aesGoal float64
}

var workloads = []workload{
	{name: "randwrite-4k-qd1", fio: "--rw=randwrite --bs=4k --iodepth=1", write: true, aesGoal: 0.8},
	{name: "randwrite-4k-qd32", fio: "--rw=randwrite --bs=4k --iodepth=32", write: true, aesGoal: 0.8},
	{name: "randread-4k-qd1", fio: "--rw=randread --bs=4k --iodepth=1", aesGoal: 0.8},
	{name: "randread-4k-qd32", fio: "--rw=randread --bs=4k --iodepth=32", aesGoal: 0.8},
	{name: "write-1m-qd8", fio: "--rw=write --bs=1M --iodepth=8", write: true, aesGoal: 0.6},
	{name: "read-1m-qd8", fio: "--rw=read --bs=1M --iodepth=8", aesGoal: 0.6},
}

// fill lays out fio's file once on each target before the measured runs,
// so that reads read written data. It writes the whole file, not for a time.
var fill = workload{name: "fill", fio: "--rw=write --bs=1M --iodepth=8", write: true}

// volumeSpec is one Cairn target: a volume created and published through
// CSI.
type volumeSpec struct {
	key       string
	replicas  int
	encrypted bool // encryption=aes-256-gcm, with a random passphrase
}

var volumeSpecs = []volumeSpec{
	{key: "1r", replicas: 1},
	{key: "3r", replicas: 3},
	{key: "3r-aes", replicas: 3, encrypted: true},
}

// plainKey names the reference target, always measured.
const plainKey = "plain"

type options struct {
	runtime   time.Duration
	size      string
	fileSize  string
	workloads []workload
	volumes   []volumeSpec // Cairn targets selected with -targets
	fs        string
	settle    time.Duration
	pairs     int
	benchkit.Flags
}

func main() { os.Exit(run()) }

func run() int {
	var o options
	var wlFlag, tgFlag string
	flag.DurationVar(&o.runtime, "runtime", 8*time.Second, "fio --runtime of each measured run")
	flag.StringVar(&o.size, "size", "1Gi", "size of each volume and of the plain file (cairn dev csi --size syntax)")
	flag.StringVar(&o.fileSize, "file-size", "512Mi", "size of the file fio works on in each mount")
	flag.StringVar(&wlFlag, "workloads", "", "comma-separated fio jobs to run (default: all): "+benchkit.Names(workloads, workloadName))
	flag.StringVar(&tgFlag, "targets", "", "comma-separated Cairn targets to measure (default: all): "+benchkit.Names(volumeSpecs, volumeKey)+"; plain is always measured")
	flag.StringVar(&o.fs, "fs", "ext4", "file system of every target: ext4 or xfs")
	flag.DurationVar(&o.settle, "settle", time.Second, "pause after sync(2) before each run")
	flag.IntVar(&o.pairs, "pairs", 1, "runs of each job on every target (order rotated each time); ratios are the median over them")
	o.Register("cluster data, plain file, mounts")
	flag.Parse()
	if err := o.check(flag.Args(), wlFlag, tgFlag); err != nil {
		fmt.Fprintf(os.Stderr, "fsbench: %v\n", err)
		return 2
	}

	ctx, stop := benchkit.SignalContext()
	defer stop()

	b := &bench{o: o, progress: os.Stderr}
	start := time.Now()
	err := b.run(ctx)
	if cerr := b.cleanup(); err == nil {
		err = cerr
	}
	b.logf("took %s", time.Since(start).Round(time.Second))
	return benchkit.ExitCode(ctx, "fsbench", err)
}

// check validates the flags and fills in the selected workloads and
// targets.
func (o *options) check(args []string, wlFlag, tgFlag string) error {
	if len(args) != 0 {
		return fmt.Errorf("unexpected arguments %q", args)
	}
	if o.runtime < time.Second || o.settle < 0 || o.pairs < 1 {
		return errors.New("-runtime must be at least 1s, -settle not negative, -pairs at least 1")
	}
	if o.fs != "ext4" && o.fs != "xfs" {
		return fmt.Errorf("-fs %q: want ext4 or xfs", o.fs)
	}
	size, err := benchkit.ParseSize(o.size)
	if err != nil {
		return fmt.Errorf("-size %q: %v", o.size, err)
	}
	fsize, err := benchkit.ParseSize(o.fileSize)
	if err != nil {
		return fmt.Errorf("-file-size %q: %v", o.fileSize, err)
	}
	if fsize >= size {
		return fmt.Errorf("-file-size %s must be smaller than -size %s (the file system needs room too)", o.fileSize, o.size)
	}
	if o.workloads, err = benchkit.Select(workloads, workloadName, wlFlag, "workload"); err != nil {
		return fmt.Errorf("-workloads: %v", err)
	}
	if o.volumes, err = selectVolumes(tgFlag); err != nil {
		return fmt.Errorf("-targets: %v", err)
	}
	return nil
}

func workloadName(w workload) string { return w.name }
func volumeKey(v volumeSpec) string  { return v.key }

// selectVolumes returns the Cairn targets named in list; "plain" may be
// named too and is left out (it is always measured).
func selectVolumes(list string) ([]volumeSpec, error) {
	if list == "" {
		return volumeSpecs, nil
	}
	var names []string
	for _, name := range strings.Split(list, ",") {
		if name = strings.TrimSpace(name); name != plainKey && name != "" {
			names = append(names, name)
		}
	}
	if len(names) == 0 {
		return nil, nil // only plain
	}
	return benchkit.Select(volumeSpecs, volumeKey, strings.Join(names, ","), "target")
}

// target is one mounted file system under test.
type target struct {
	key   string // 1r, 3r, 3r-aes, plain
	label string // what it is, for the header
	mnt   string // where it is mounted
	volID string // the Cairn volume ("" for plain)
}

func (t *target) cairn() bool { return t.volID != "" }

// bench is one run of fsbench: what it set up, for the runs and for
// cleanup to undo, and what it measured.
type bench struct {
	o        options
	progress io.Writer

	root, bin  string // repository root and bin/cairn
	tmp        string // temporary directory; removed by cleanup
	clusterDir string // tmp/cluster, once `dev up` ran
	servers    string // meta API addresses, comma-separated
	nodes      []benchkit.Node
	created    []string // volume ids, deleted by cleanup
	published  []string // volume ids published on node-1 (or being), unpublished by cleanup
	plainImg   string   // the plain target's file; cleanup detaches its loop devices
	plainMnt   string   // where the plain target is mounted; cleanup unmounts it
	passphrase string   // of 3r-aes; kept out of logs and errors
	fileBytes  uint64

	targets []*target
	rounds  []*round
}

// round is one job run on every target back to back.
type round struct {
	wl    workload
	order []*target
	res   map[string]*result // by target key
}

type result struct {
	fio benchkit.FioStat // the read or the write side, as the job does
	// cpuPerIO is the node agents' CPU time per I/O, in ns (0: not
	// measured, e.g. for plain).
	cpuPerIO float64
	err      error
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.progress, "fsbench: "+format+"\n", args...)
}

// node1 is the node every volume is published on.
const node1 = "node-1"

func (b *bench) run(ctx context.Context) error {
	mkfs := "mkfs." + b.o.fs
	for _, tool := range []string{"go", "fio", "losetup", mkfs} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s is not installed (make deps installs fio, e2fsprogs and xfsprogs)", tool)
		}
	}
	b.fileBytes, _ = benchkit.ParseSize(b.o.fileSize)
	var err error
	if b.root, b.bin, err = benchkit.BuildCairn(ctx, "fsbench", b.o.Verbose, b.logf); err != nil {
		return err
	}
	if b.tmp, err = os.MkdirTemp(b.o.Parent, "cairn-fsbench-"); err != nil {
		return err
	}
	b.clusterDir = filepath.Join(b.tmp, "cluster")
	if b.nodes, b.servers, err = benchkit.DevUp(ctx, b.root, b.bin, b.clusterDir, b.o.NodeArgs, b.o.Verbose, b.logf); err != nil {
		return err
	}

	for _, spec := range b.o.volumes {
		t, err := b.publishVolume(ctx, spec)
		if err != nil {
			return err
		}
		b.targets = append(b.targets, t)
	}
	plain, err := b.mountPlain(ctx)
	if err != nil {
		return err
	}
	b.targets = append(b.targets, plain)

	b.printHeader(os.Stdout)
	for _, t := range b.targets {
		b.logf("laying out %s/fio.dat on %s (%s, 1M sequential writes)", t.mnt, t.key, b.o.fileSize)
		if r := b.runFio(ctx, fill, t); r.err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("fill %s: %w", t.key, r.err)
		}
	}

	n := len(b.targets)
	for _, wl := range b.o.workloads {
		for p := 0; p < b.o.pairs; p++ {
			rd := &round{wl: wl, res: map[string]*result{}}
			// Rotate the order from one round to the next, so that a drift
			// of the machine over a round (writeback, a neighbour starting)
			// favours no target.
			shift := len(b.rounds)
			for i := range n {
				rd.order = append(rd.order, b.targets[(i+shift)%n])
			}
			b.rounds = append(b.rounds, rd)
			for _, t := range rd.order {
				b.logf("%s (%d of %d) on %s", wl.name, p+1, b.o.pairs, t.key)
				rd.res[t.key] = b.runFio(ctx, wl, t)
				if ctx.Err() != nil {
					delete(rd.res, t.key) // killed, not measured
					b.printTables(os.Stdout)
					return ctx.Err()
				}
			}
		}
	}
	b.printTables(os.Stdout)

	var failed []string
	for _, rd := range b.rounds {
		for _, t := range rd.order {
			if r := rd.res[t.key]; r != nil && r.err != nil {
				failed = append(failed, fmt.Sprintf("%s on %s: %v", rd.wl.name, t.key, r.err))
			}
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d fio runs failed:\n  %s", len(failed), strings.Join(failed, "\n  "))
	}
	return nil
}

// cmd runs a command from the repository root and returns its stdout.
func (b *bench) cmd(ctx context.Context, name string, args ...string) ([]byte, error) {
	return benchkit.Command(ctx, b.root, b.o.Verbose, b.logf, name, args...)
}

// csi runs `cairn dev csi ARGS` and returns its output's first line. The
// passphrase never shows in the log or an error. Ctrl-C does not cancel
// it (it takes well under a second): its effect, a volume created or
// published, is then known to cleanup.
func (b *bench) csi(ctx context.Context, args ...string) (string, error) {
	args = append([]string{"dev", "csi", "--dir", b.clusterDir}, args...)
	redact := func(s string) string {
		if b.passphrase == "" {
			return s
		}
		return strings.ReplaceAll(s, b.passphrase, "…")
	}
	if b.o.Verbose {
		b.logf("$ %s", redact(b.bin+" "+strings.Join(args, " ")))
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
	defer cancel()
	out, err := benchkit.Command(ctx, b.root, false, b.logf, b.bin, args...)
	if err != nil {
		return "", errors.New(redact(err.Error()))
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line, nil
}

// publishVolume creates the volume of spec and publishes it on node-1 with
// -fs, as the provisioner and kubelet would.
func (b *bench) publishVolume(ctx context.Context, spec volumeSpec) (*target, error) {
	if err := ctx.Err(); err != nil {
		return nil, err // csi is not cancelled: start nothing after Ctrl-C
	}
	args := []string{"create", "fsbench-" + spec.key, "--size", b.o.size, "--param", "replicas=" + strconv.Itoa(spec.replicas)}
	var secret []string
	if spec.encrypted {
		if b.passphrase == "" {
			key := make([]byte, 32)
			if _, err := rand.Read(key); err != nil {
				return nil, err
			}
			b.passphrase = hex.EncodeToString(key)
		}
		secret = []string{"--secret", "encryptionPassphrase=" + b.passphrase}
		args = append(append(args, "--param", "encryption=aes-256-gcm"), secret...)
	}
	b.logf("creating and publishing %s on %s (%s, %d replicas)", spec.key, node1, b.o.fs, spec.replicas)
	id, err := b.csi(ctx, args...)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", spec.key, err)
	}
	if !strings.HasPrefix(id, "vol-") {
		return nil, fmt.Errorf("create %s: no volume id in %q", spec.key, id)
	}
	b.created = append(b.created, id)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b.published = append(b.published, id)
	mnt, err := b.csi(ctx, append([]string{"publish", id, "--node", node1, "--fs-type", b.o.fs}, secret...)...)
	if err != nil {
		return nil, fmt.Errorf("publish %s: %w", spec.key, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if typ, src := benchkit.Mount(mnt); typ != b.o.fs || !strings.HasPrefix(src, "/dev/loop") {
		return nil, fmt.Errorf("publish %s: %s is %q on %q, want %s on a loop device", spec.key, mnt, typ, src, b.o.fs)
	}
	label := fmt.Sprintf("%s volume, replicas=%d (on %s)", b.o.size, spec.replicas, b.placement(ctx, id))
	if spec.encrypted {
		label += ", encryption=aes-256-gcm"
	}
	return &target{key: spec.key, label: label, mnt: mnt, volID: id}, nil
}

// placement names the nodes that hold id's replicas: `dev csi create` has
// no topology, so a 1-replica volume's replica may be on a node other than
// node-1, where it is published.
func (b *bench) placement(ctx context.Context, id string) string {
	out, err := b.cmd(ctx, b.bin, "ctl", "--server", b.servers, "volume", "get", id, "-o", "json")
	var v benchkit.Volume
	if err == nil {
		err = json.Unmarshal(out, &v)
	}
	if err != nil {
		return "unknown nodes"
	}
	var on []string
	for _, r := range v.Replicas {
		on = append(on, r.Node)
	}
	sort.Strings(on)
	return strings.Join(on, ", ")
}

// mountPlain makes the reference target: a sparse file of -size in the
// temporary directory (the disk of the replicas), attached to a loop device
// with direct I/O as Cairn's FUSE file is, formatted and mounted.
func (b *bench) mountPlain(ctx context.Context) (*target, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	b.plainImg = filepath.Join(b.tmp, "plain.img")
	size, _ := benchkit.ParseSize(b.o.size)
	f, err := os.Create(b.plainImg)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(int64(size)); err != nil {
		_ = f.Close() // the truncate error is the one to report
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	b.logf("attaching %s to a loop device, %s, mounting it", b.plainImg, "mkfs."+b.o.fs)
	// Not cancelled by Ctrl-C, so that the device is attached or not;
	// cleanup detaches every loop device on plainImg anyway.
	out, err := b.cmd(context.WithoutCancel(ctx), "losetup", "--direct-io=on", "--find", "--show", b.plainImg)
	if err != nil {
		return nil, err
	}
	dev := strings.TrimSpace(string(out))
	if _, err := b.cmd(ctx, "mkfs."+b.o.fs, "-q", dev); err != nil {
		return nil, err
	}
	mnt := filepath.Join(b.tmp, plainKey)
	if err := os.Mkdir(mnt, 0o755); err != nil {
		return nil, err
	}
	b.plainMnt = mnt
	if err := unix.Mount(dev, mnt, b.o.fs, 0, ""); err != nil {
		return nil, fmt.Errorf("mount %s on %s: %w", dev, mnt, err)
	}
	label := fmt.Sprintf("losetup --direct-io=on %s (%s sparse file), mkfs.%s -q, mounted at %s", dev, b.o.size, b.o.fs, mnt)
	return &target{key: plainKey, label: label, mnt: mnt}, nil
}

// runFio runs one fio job on the file in t's mount and measures the node
// agents' CPU time meanwhile.
func (b *bench) runFio(ctx context.Context, wl workload, t *target) *result {
	r := &result{}
	syscall.Sync() // leave no dirty pages of the previous run to write back
	if err := benchkit.Sleep(ctx, b.o.settle); err != nil {
		r.err = err
		return r
	}
	out := filepath.Join(b.tmp, fmt.Sprintf("fio-%s-%s-%d.json", wl.name, t.key, len(b.rounds)))
	args := append([]string{"--name=" + wl.name, "--filename=" + filepath.Join(t.mnt, "fio.dat"),
		"--size=" + strconv.FormatUint(b.fileBytes, 10), "--direct=1", "--ioengine=libaio"}, strings.Fields(wl.fio)...)
	args = append(args, "--output-format=json", "--output="+out)
	if wl.name != fill.name {
		args = append(args, benchkit.FioTimed(b.o.runtime)...)
	}
	// The fill of a slow target takes a while: no time limit of its own.
	fctx, cancel := context.WithTimeout(ctx, b.o.runtime+10*time.Minute)
	defer cancel()
	c := benchkit.FioCommand(fctx, b.o.Verbose, b.logf, args...)
	var stderr strings.Builder
	c.Stderr = &stderr

	var before []uint64
	if t.cairn() {
		before = b.nodeTicks()
	}
	err := c.Run()
	var ticks float64
	if before != nil {
		after := b.nodeTicks()
		for i := range before {
			if before[i] == 0 || after[i] < before[i] {
				ticks = -1 // a node's agent could not be read
				break
			}
			ticks += float64(after[i] - before[i])
		}
	}
	var job *benchkit.FioJob
	if err == nil {
		job, err = benchkit.ReadFioJob(out, stderr.String())
	} else {
		err = fmt.Errorf("fio: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	switch {
	case err != nil:
		r.err = err
	case wl.write:
		r.fio = job.Write
	default:
		r.fio = job.Read
	}
	if ios := r.fio.TotalIOs; ticks >= 0 && ios > 0 {
		r.cpuPerIO = ticks * 1e9 / benchkit.ClockTicks / float64(ios)
	}
	return r
}

// nodeTicks returns utime+stime of each node agent (0 where it cannot be
// read).
func (b *bench) nodeTicks() []uint64 {
	out := make([]uint64, len(b.nodes))
	for i, n := range b.nodes {
		out[i], _ = benchkit.ProcCPUTicks(n.PID)
	}
	return out
}

// cleanup undoes whatever run started, with its own deadlines: it also runs
// after Ctrl-C, when run's context is done. It returns an error if
// something of the run is left: a mount, a loop device or a node agent.
func (b *bench) cleanup() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if b.clusterDir != "" {
		if _, err := os.Stat(filepath.Join(b.clusterDir, "cluster.json")); err == nil {
			if b.nodes == nil {
				b.nodes, b.servers, _ = benchkit.LoadDevNodes(b.clusterDir) // interrupted right after dev up
			}
			// Unpublish and delete while all nodes are up, so that every
			// engine flushes and closes; dev down would unmount what is left.
			for _, id := range b.published {
				if _, err := b.csi(ctx, "unpublish", id, "--node", node1); err != nil {
					b.logf("cleanup: %v", err)
				}
			}
			for _, id := range b.created {
				if _, err := b.csi(ctx, "delete", id); err != nil {
					b.logf("cleanup: %v", err)
				}
			}
			benchkit.DevDown(ctx, b.root, b.bin, b.clusterDir, b.o.Keep, b.o.Verbose, b.logf, b.nodes)
		}
	}
	if err := b.removePlain(ctx); err != nil {
		b.logf("cleanup: %v", err)
	}
	left := b.leftovers()
	if len(left) > 0 {
		// Removing the directory would reach into what is still mounted.
		return fmt.Errorf("cleanup left behind (and kept %s): %s", b.tmp, strings.Join(left, "; "))
	}
	benchkit.RemoveTemp(b.tmp, b.o.Keep, b.logf)
	return nil
}

// removePlain unmounts the plain target and detaches every loop device on
// its file.
func (b *bench) removePlain(ctx context.Context) error {
	var errs []string
	if b.plainMnt != "" && len(mountsUnder(b.plainMnt)) > 0 {
		if err := unmount(ctx, b.plainMnt); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if b.plainImg != "" {
		for _, dev := range loopsOn(func(file string) bool { return file == b.plainImg }) {
			if _, err := b.cmd(ctx, "losetup", "-d", dev); err != nil {
				errs = append(errs, err.Error())
			}
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// unmount unmounts mnt, retrying while it is busy (a killed fio's last
// I/Os), for up to 10 s.
func unmount(ctx context.Context, mnt string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := unix.Unmount(mnt, 0)
		if err == nil || !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			if err != nil {
				return fmt.Errorf("unmount %s: %w", mnt, err)
			}
			return nil
		}
		if benchkit.Sleep(ctx, 200*time.Millisecond) != nil {
			return fmt.Errorf("unmount %s: %w", mnt, err)
		}
	}
}

// leftovers lists what of the run is still there after cleanup: mounts
// and loop devices under the temporary directory, running node agents.
func (b *bench) leftovers() []string {
	if b.tmp == "" {
		return nil
	}
	var out []string
	for _, m := range mountsUnder(b.tmp) {
		out = append(out, "mount "+m)
	}
	for _, dev := range loopsOn(func(file string) bool { return strings.HasPrefix(file, b.tmp+"/") }) {
		out = append(out, "loop device "+dev)
	}
	for _, n := range b.nodes {
		if n.PID > 0 && benchkit.IsNodeAgent(n) {
			out = append(out, fmt.Sprintf("%s's agent (pid %d)", n.ID, n.PID))
		}
	}
	return out
}

// mountsUnder lists the mount points at or below dir, from
// /proc/self/mountinfo.
func mountsUnder(dir string) []string {
	raw, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(raw), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			out = append(out, f[4])
		}
	}
	return out
}

// loopsOn lists the loop devices whose backing file match accepts.
func loopsOn(match func(file string) bool) []string {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, bf := range files {
		raw, err := os.ReadFile(bf)
		if err != nil {
			continue
		}
		file := strings.TrimSuffix(strings.TrimSpace(string(raw)), " (deleted)")
		if match(file) {
			out = append(out, "/dev/"+filepath.Base(filepath.Dir(filepath.Dir(bf))))
		}
	}
	return out
}

func (b *bench) printHeader(w io.Writer) {
	fsType, src := benchkit.Mount(b.tmp)
	fmt.Fprintf(w, "fsbench: fio on a file in Cairn volumes published through CSI (%s on a loop device over node-1's FUSE file)\n", b.o.fs)
	fmt.Fprintf(w, "         and in the same file system on a loop device over a plain file\n")
	fmt.Fprintf(w, "date:     %s\n", time.Now().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(w, "machine:  %s\n", benchkit.Machine())
	fmt.Fprintf(w, "disk:     %s on %s (%s): cluster data dirs and the plain file\n", b.tmp, fsType, src)
	fmt.Fprintf(w, "cairn:    %s\n", benchkit.Version(b.root))
	if len(b.o.NodeArgs) > 0 {
		fmt.Fprintf(w, "nodes:    every node agent runs with %s\n", strings.Join(b.o.NodeArgs, " "))
	}
	fmt.Fprintf(w, "tools:    %s\n", benchkit.FirstLine("fio (version unknown)", "fio", "--version"))
	for i, t := range b.targets {
		head := "targets:"
		if i > 0 {
			head = ""
		}
		pub := ""
		if t.cairn() {
			pub = ", published on " + node1
		}
		fmt.Fprintf(w, "%-9s %-7s %s%s\n", head, t.key, t.label, pub)
	}
	fmt.Fprintf(w, "runs:     fio --direct=1 --ioengine=libaio on MNT/fio.dat (%s), laid out once with 1M sequential writes;\n", b.o.fileSize)
	fmt.Fprintf(w, "          each job %d time(s) on all targets back to back, in an order rotated each time; %v each\n", b.o.pairs, b.o.runtime)
	fmt.Fprintf(w, "          (time_based, norandommap); sync(2) + %v pause before each run\n", b.o.settle)
}

// stats are the medians of one job on one target over its rounds.
type stats struct {
	n, failed   int // rounds measured, rounds whose run failed
	iops, mibps float64
	p50, p99    float64
	cpuPerIO    float64   // 0: not measured
	ratios      []float64 // IOPS / the reference's, in round order
	ratio       float64   // their median (0: none)
}

// collect returns the medians of target key over rounds, with the IOPS
// ratio of each round to target ref in the same round.
func collect(rounds []*round, key, ref string) stats {
	var s stats
	var iops, mibps, p50, p99, cpu []float64
	for _, rd := range rounds {
		r := rd.res[key]
		if r == nil {
			continue
		}
		if r.err != nil {
			s.failed++
			continue
		}
		pct := r.fio.ClatNs.Percentile
		iops, mibps = append(iops, r.fio.IOPS), append(mibps, r.fio.BWBytes/(1<<20))
		p50, p99 = append(p50, pct["50.000000"]), append(p99, pct["99.000000"])
		if r.cpuPerIO > 0 {
			cpu = append(cpu, r.cpuPerIO)
		}
		if o := rd.res[ref]; o != nil && o.err == nil && o.fio.IOPS > 0 {
			s.ratios = append(s.ratios, r.fio.IOPS/o.fio.IOPS)
		}
	}
	if s.n = len(iops); s.n == 0 {
		return s
	}
	s.iops, s.mibps = benchkit.Median(iops), benchkit.Median(mibps)
	s.p50, s.p99 = benchkit.Median(p50), benchkit.Median(p99)
	if len(cpu) > 0 {
		s.cpuPerIO = benchkit.Median(cpu)
	}
	if len(s.ratios) > 0 {
		s.ratio = benchkit.Median(append([]float64(nil), s.ratios...)) // Median sorts; keep the round order
	}
	return s
}

func (b *bench) roundsOf(wl workload) []*round {
	var out []*round
	for _, rd := range b.rounds {
		if rd.wl.name == wl.name {
			out = append(out, rd)
		}
	}
	return out
}

func (b *bench) printTables(w io.Writer) {
	fmt.Fprintln(w)
	b.printTable(w)
	fmt.Fprintln(w)
	b.printEncryption(w)
}

// ratioCells prints the median ratio and, with more than one round, each
// round's.
func ratioCells(ratios []float64, median float64, pairs int) string {
	if len(ratios) == 0 {
		return "-"
	}
	s := fmt.Sprintf("%.2f", median)
	if pairs > 1 {
		var each []string
		for _, r := range ratios {
			each = append(each, fmt.Sprintf("%.2f", r))
		}
		s += " (" + strings.Join(each, " ") + ")"
	}
	return s
}

func (b *bench) printTable(w io.Writer) {
	med := ""
	if b.o.pairs > 1 {
		med = fmt.Sprintf("; medians of %d runs, each round's ratio in brackets", b.o.pairs)
	}
	fmt.Fprintf(w, "fio on MNT/fio.dat (%s, %s): IOPS vs plain in the same round%s;\n", b.o.fileSize, b.o.fs, med)
	fmt.Fprintln(w, "p50, p99: completion latency (clat); CPU/IO: CPU time of the three node agents per I/O")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "job\ttarget\tIOPS\tMiB/s\tp50\tp99\tvs plain\tCPU/IO\t")
	for i, wl := range b.o.workloads {
		rounds := b.roundsOf(wl)
		if len(rounds) == 0 {
			continue
		}
		if i > 0 {
			fmt.Fprintln(tw, "\t\t\t\t\t\t\t\t")
		}
		label := wl.name
		for _, t := range b.targets {
			s := collect(rounds, t.key, plainKey)
			switch {
			case s.n == 0 && s.failed > 0:
				fmt.Fprintf(tw, "%s\t%s\tERROR\t\t\t\t\t\t\n", label, t.key)
			case s.n == 0:
				fmt.Fprintf(tw, "%s\t%s\tnot run\t\t\t\t\t\t\n", label, t.key)
			default:
				ratio := ratioCells(s.ratios, s.ratio, b.o.pairs)
				if t.key == plainKey {
					ratio = "1.00"
				}
				fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.1f\t%s\t%s\t%s\t%s\t\n", label, t.key, s.iops, s.mibps,
					benchkit.Dur(s.p50), benchkit.Dur(s.p99), ratio, benchkit.Dur(s.cpuPerIO))
			}
			label = ""
		}
	}
	tw.Flush()
}

// printEncryption holds 3r-aes against 3r, round by round.
func (b *bench) printEncryption(w io.Writer) {
	fmt.Fprintln(w, "cost of encryption: IOPS of 3r-aes / 3r in the same round (median), against the issue's targets;")
	fmt.Fprintln(w, "CPU/IO of the node agents (median):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "job\t3r IOPS\t3r-aes IOPS\t3r-aes / 3r\ttarget\t\tCPU/IO 3r\tCPU/IO 3r-aes\t")
	for _, wl := range b.o.workloads {
		goal := wl.aesGoal
		rounds := b.roundsOf(wl)
		aes, plain := collect(rounds, "3r-aes", "3r"), collect(rounds, "3r", "3r")
		if aes.n == 0 || plain.n == 0 || len(aes.ratios) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t≥ %.1f\tnot measured\t\t\t\n", wl.name, goal)
			continue
		}
		verdict := "not met"
		if aes.ratio >= goal {
			verdict = "met"
		}
		fmt.Fprintf(tw, "%s\t%.0f\t%.0f\t%s\t≥ %.1f\t%s\t%s\t%s\t\n", wl.name, plain.iops, aes.iops,
			ratioCells(aes.ratios, aes.ratio, b.o.pairs), goal, verdict, benchkit.Dur(plain.cpuPerIO), benchkit.Dur(aes.cpuPerIO))
	}
	tw.Flush()
}
