// Package benchkit holds the helpers that the benchmark programs under
// tests/bench share: running commands and dev clusters, fio's JSON output,
// /proc and /metrics readers, signal handling and number formatting.
package benchkit

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ExitInterrupted is the exit code after Ctrl-C (128 + SIGINT).
const ExitInterrupted = 130

// ClockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat. It
// is 100 on every Linux architecture Go supports.
const ClockTicks = 100

// SignalContext returns a context that is cancelled by the first Ctrl-C or
// SIGTERM; a second Ctrl-C kills the process the default way. Call stop when
// done.
func SignalContext() (ctx context.Context, stop context.CancelFunc) {
	ctx, stop = signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills the process the default way
	}()
	return ctx, stop
}

// Sleep waits for d or until ctx is done, whichever comes first, and
// returns ctx's error in the second case.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Flags are the flags of every benchmark program that runs a dev cluster
// in a temporary directory.
type Flags struct {
	Parent   string   // -dir: where to make the temporary directory
	NodeArgs []string // -node-arg: extra flags for every node agent (cairn dev up --node-arg)
	Keep     bool     // -keep: keep the temporary directory
	Verbose  bool     // -v: log every command run
}

// NodeShare is the --gomaxprocs every node agent of a benchmark's 3-node
// dev cluster gets by default: its share of this machine's CPUs, at least
// one. The three agents stand for three machines; each assuming all the
// CPUs made their idle threads spin and wake each other (see cmd/cairn's
// --gomaxprocs), which a real node, alone on its machine, does not pay.
func NodeShare() int { return max(1, runtime.NumCPU()/3) }

// Register defines -dir, -node-arg, -keep and -v on the default flag set;
// holds says what the temporary directory holds. Every node agent gets
// --gomaxprocs=NodeShare() unless a -node-arg sets it.
func (f *Flags) Register(holds string) {
	f.NodeArgs = []string{fmt.Sprintf("--gomaxprocs=%d", NodeShare())}
	flag.StringVar(&f.Parent, "dir", os.TempDir(), "where to make the temporary directory ("+holds+")")
	flag.Func("node-arg", fmt.Sprintf("pass this flag to every node agent (cairn dev up --node-arg); repeatable, e.g. -node-arg=--iosched-depth=32 (default --gomaxprocs=%d: each agent's share of the CPUs)", NodeShare()), func(v string) error {
		f.NodeArgs = append(f.NodeArgs, v)
		return nil
	})
	flag.BoolVar(&f.Keep, "keep", false, "keep the temporary directory (node logs, fio JSON) instead of removing it")
	flag.BoolVar(&f.Verbose, "v", false, "print every command run")
}

// ModuleRoot finds the repository root (the directory of go.mod); prog names
// the calling program in the error for a run outside the module.
func ModuleRoot(ctx context.Context, prog string) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("run %s inside the cairn module (go run ./tests/bench/%s)", prog, prog)
	}
	return filepath.Dir(mod), nil
}

// OwnGroup puts a child in its own process group, so that a Ctrl-C in the
// terminal reaches only this program, which then stops the children in
// order (fio first, the cluster last).
func OwnGroup() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setpgid: true} }

// Command runs name with args in dir, in its own process group, and returns
// its stdout. With verbose, it first logs the command line with logf. A
// failure's error quotes the command's stderr (or, if empty, its stdout).
func Command(ctx context.Context, dir string, verbose bool, logf func(format string, args ...any), name string, args ...string) ([]byte, error) {
	if verbose {
		logf("$ %s %s", name, strings.Join(args, " "))
	}
	c := exec.CommandContext(ctx, name, args...)
	c.Dir = dir
	c.SysProcAttr = OwnGroup()
	var out, errb bytes.Buffer
	c.Stdout, c.Stderr = &out, &errb
	if err := c.Run(); err != nil {
		msg := strings.TrimSpace(errb.String())
		if msg == "" {
			msg = strings.TrimSpace(out.String())
		}
		return nil, fmt.Errorf("%s %s: %w: %s", filepath.Base(name), strings.Join(args, " "), err, msg)
	}
	return out.Bytes(), nil
}

// BuildCairn builds bin/cairn in the module prog runs in (see ModuleRoot)
// and returns the module root and the binary's path.
func BuildCairn(ctx context.Context, prog string, verbose bool, logf func(format string, args ...any)) (root, bin string, err error) {
	if root, err = ModuleRoot(ctx, prog); err != nil {
		return "", "", err
	}
	bin = filepath.Join(root, "bin", "cairn")
	logf("building %s", bin)
	if _, err := Command(ctx, root, verbose, logf, "go", "build", "-o", bin, "./cmd/cairn"); err != nil {
		return "", "", fmt.Errorf("build: %w", err)
	}
	return root, bin, nil
}

// Select returns the entries of all that list names, comma-separated, in
// list's order; all of them for an empty list. name gives an entry's name,
// what the kind of entry in errors ("workload").
func Select[T any](all []T, name func(T) string, list, what string) ([]T, error) {
	if list == "" {
		return all, nil
	}
	var out []T
	for _, want := range strings.Split(list, ",") {
		found := false
		for _, e := range all {
			if name(e) == strings.TrimSpace(want) {
				out, found = append(out, e), true
			}
		}
		if !found {
			return nil, fmt.Errorf("unknown %s %q (have %s)", what, want, Names(all, name))
		}
	}
	return out, nil
}

// Names joins the names of all's entries with commas.
func Names[T any](all []T, name func(T) string) string {
	var s []string
	for _, e := range all {
		s = append(s, name(e))
	}
	return strings.Join(s, ",")
}

// FioCommand returns a command that runs fio with args (logged with logf
// if verbose) in a process group of its own. When ctx is done, fio gets
// SIGTERM, on which it stops its jobs and exits within a moment; killing
// it would not stop them: each job runs in a process of its own, in a
// session of its own (fio calls setsid), which would go on with its I/O
// until its runtime is over and keep its file system busy or its
// connection open. SIGKILL follows if fio has not exited after 10 s.
func FioCommand(ctx context.Context, verbose bool, logf func(format string, args ...any), args ...string) *exec.Cmd {
	if verbose {
		logf("$ fio %s", strings.Join(args, " "))
	}
	c := exec.CommandContext(ctx, "fio", args...)
	c.SysProcAttr = OwnGroup()
	c.Cancel = func() error { return c.Process.Signal(syscall.SIGTERM) }
	c.WaitDelay = 10 * time.Second
	return c
}

// FioTimed are fio's options for a run of d (whole seconds) that picks
// random offsets afresh: no random map, no repeated seed.
func FioTimed(d time.Duration) []string {
	return []string{"--time_based", "--runtime=" + strconv.Itoa(int(d/time.Second)), "--norandommap", "--randrepeat=0"}
}

// GitDescribe returns `git describe --always --dirty` run in dir.
func GitDescribe(dir string) (string, error) {
	c := exec.Command("git", "describe", "--always", "--dirty")
	c.Dir = dir
	out, err := c.Output()
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// Version names the commit of the checkout at root (git describe) and
// whether its working tree differed from it, for a header that says what
// bin/cairn was built from.
func Version(root string) string {
	v, err := GitDescribe(root)
	if err != nil {
		return "unknown version (not a git checkout)"
	}
	c := exec.Command("git", "status", "--porcelain", "--", ".")
	c.Dir = root
	if st, err := c.Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		v += fmt.Sprintf(" (%d paths differ from the commit: built from the working tree)", len(strings.Split(strings.TrimSpace(string(st)), "\n")))
	}
	return v
}

// RemoveTemp removes the temporary directory dir, or with keep only logs
// where it is; errors are logged with logf. An empty dir is left alone.
func RemoveTemp(dir string, keep bool, logf func(format string, args ...any)) {
	if dir == "" {
		return
	}
	if keep {
		logf("kept %s", dir)
	} else if err := os.RemoveAll(dir); err != nil {
		logf("cleanup: %v", err)
	}
}

// Node is what a dev cluster's cluster.json says about one node agent.
type Node struct {
	ID      string `json:"id"`
	DataDir string `json:"data_dir"`
	Agent   string `json:"agent"`
	Metrics string `json:"metrics"`
	PID     int    `json:"pid"`
	Log     string `json:"log"`
}

// DevUpArgs is the argument list of `cairn dev up` for a 3-node cluster in
// dir whose node agents all get nodeArgs (--node-arg). The cluster runs in
// plaintext (--insecure): the benchmarks' ctl calls carry no certificate,
// and their tables compare with earlier plaintext runs; fiobench measures
// mutual TLS on a cluster of its own (DevUpTLSArgs).
func DevUpArgs(dir string, nodeArgs []string) []string {
	return devUpArgs(dir, nodeArgs, "--insecure")
}

// DevUpTLSArgs is DevUpArgs for a cluster with mutual TLS on every port.
func DevUpTLSArgs(dir string, nodeArgs []string) []string {
	return devUpArgs(dir, nodeArgs, "--tls")
}

func devUpArgs(dir string, nodeArgs []string, security string) []string {
	args := []string{"dev", "up", "--nodes", "3", "--dir", dir, security}
	for _, a := range nodeArgs {
		args = append(args, "--node-arg="+a)
	}
	return args
}

// LoadCluster reads dir/cluster.json and returns its nodes and their meta
// API addresses, comma-separated (for `cairn ctl --server`).
func LoadCluster(dir string) (nodes []Node, servers string, err error) {
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		return nil, "", err
	}
	var c struct {
		Nodes []Node `json:"nodes"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, "", fmt.Errorf("cluster.json: %w", err)
	}
	var agents []string
	for _, n := range c.Nodes {
		agents = append(agents, n.Agent)
	}
	return c.Nodes, strings.Join(agents, ","), nil
}

// LoadDevNodes is LoadCluster for a cluster that DevUpArgs started: it
// checks that there are three nodes.
func LoadDevNodes(dir string) (nodes []Node, servers string, err error) {
	if nodes, servers, err = LoadCluster(dir); err != nil {
		return nil, "", err
	}
	if len(nodes) != 3 {
		return nil, "", fmt.Errorf("cluster.json lists %d nodes, want 3", len(nodes))
	}
	return nodes, servers, nil
}

// DevUp starts a 3-node dev cluster in dir with `bin dev up`, run from
// root, every node agent with nodeArgs, and returns its nodes as
// LoadDevNodes does. Ctrl-C does not cancel it: killed halfway, dev up
// could leave node agents running that no cluster.json names.
func DevUp(ctx context.Context, root, bin, dir string, nodeArgs []string, verbose bool, logf func(format string, args ...any)) (nodes []Node, servers string, err error) {
	logf("starting a 3-node dev cluster in %s", dir)
	if _, err := Command(context.WithoutCancel(ctx), root, verbose, logf, bin, DevUpArgs(dir, nodeArgs)...); err != nil {
		return nil, "", fmt.Errorf("dev up: %w", err)
	}
	return LoadDevNodes(dir)
}

// DevDown runs `bin dev down` on the dev cluster in dir, from root, keeping
// its data with keep. If that fails it logs why and kills those of nodes'
// agents that still run.
func DevDown(ctx context.Context, root, bin, dir string, keep, verbose bool, logf func(format string, args ...any), nodes []Node) {
	if _, err := Command(ctx, root, verbose, logf, bin, "dev", "down", "--dir", dir, "--keep-data="+strconv.FormatBool(keep)); err != nil {
		logf("cleanup: %v; killing the node agents", err)
		KillNodeAgents(nodes)
	}
}

// IsNodeAgent checks that n.PID still is this node's agent (pids get
// reused).
func IsNodeAgent(n Node) bool {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", n.PID))
	return err == nil && bytes.Contains(cmdline, []byte("\x00--id\x00"+n.ID+"\x00"))
}

// KillNodeAgents sends SIGKILL to those of nodes' agents that still run.
func KillNodeAgents(nodes []Node) {
	for _, n := range nodes {
		if n.PID > 0 && IsNodeAgent(n) {
			_ = syscall.Kill(n.PID, syscall.SIGKILL)
		}
	}
}

// Volume is the part of `cairn ctl volume create/get -o json` that the
// benchmarks read.
type Volume struct {
	ID       string `json:"id"`
	Replicas []struct {
		ID    string `json:"id"`
		Node  string `json:"node"`
		State string `json:"state"`
	} `json:"replicas"`
}

// ReplicaFile is the data file of v's replica on node n, or "" if n holds
// none.
func ReplicaFile(v *Volume, n Node) string {
	for _, r := range v.Replicas {
		if r.Node == n.ID {
			return filepath.Join(n.DataDir, "replicas", r.ID, "data")
		}
	}
	return ""
}

// FioStat is one direction (read or write) of a fio job's JSON output.
type FioStat struct {
	IOPS     float64 `json:"iops"`
	BWBytes  float64 `json:"bw_bytes"`
	TotalIOs uint64  `json:"total_ios"`
	ClatNs   struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

// FioJob is the part of one job of fio's JSON output that is read.
type FioJob struct {
	Error int     `json:"error"`
	Read  FioStat `json:"read"`
	Write FioStat `json:"write"`
}

// ReadFioJob reads the output file of a fio run with --output-format=json
// and one job, and returns that job. stderr is fio's standard error, quoted
// when the job reports an error. Anything before the JSON (fio's nbd engine
// writes a line there with --thread) is skipped.
func ReadFioJob(path, stderr string) (*FioJob, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if i := bytes.IndexByte(raw, '{'); i > 0 {
		raw = raw[i:]
	}
	var out struct {
		Jobs []FioJob `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &out); err != nil || len(out.Jobs) != 1 {
		return nil, fmt.Errorf("cannot parse %s: %v", path, err)
	}
	job := out.Jobs[0]
	if job.Error != 0 {
		return nil, fmt.Errorf("fio job error %d (%s): %s", job.Error, syscall.Errno(job.Error), strings.TrimSpace(stderr))
	}
	return &job, nil
}

// Warm reads path once, so that its pages are in the page cache.
func Warm(ctx context.Context, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close() // read only
	buf := make([]byte, 1<<20)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		_, err := f.Read(buf)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// HTTPGet returns the body of a GET of url, which must answer 200 OK.
func HTTPGet(ctx context.Context, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return io.ReadAll(resp.Body)
}

// ScrapeMetrics reads the Prometheus text page http://addr/metrics (within
// 5 s) and returns the samples whose key, the line up to its last space
// (name and labels), keep accepts. On any error, and for an empty addr, it
// returns an empty map.
func ScrapeMetrics(ctx context.Context, addr string, keep func(key string) bool) map[string]float64 {
	out := map[string]float64{}
	if addr == "" {
		return out
	}
	all, err := Scrape(ctx, addr)
	if err != nil {
		return out
	}
	for k, v := range all {
		if keep(k) {
			out[k] = v
		}
	}
	return out
}

// Scrape reads the Prometheus text page http://addr/metrics (within 5 s)
// and returns every sample by its key: the line up to its last space, that
// is the name and the labels as Prometheus writes them (sorted by name),
// e.g. `cairn_iosched_tokens{bucket="iops",volume_id="vol-1"}`.
func Scrape(ctx context.Context, addr string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	body, err := HTTPGet(ctx, "http://"+addr+"/metrics")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		i := strings.LastIndexByte(line, ' ')
		if i <= 0 || line[0] == '#' {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out, sc.Err()
}

// ProcCPUTicks returns utime+stime of pid, in clock ticks.
func ProcCPUTicks(pid int) (uint64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the parenthesised command name: state is field 3, utime
	// field 14, stime field 15.
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(raw[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime or stime", pid)
	}
	return ut + st, nil
}

// CPUTimes is the "cpu" line of /proc/stat (all CPUs), in clock ticks.
type CPUTimes struct {
	Total  uint64 // all states
	Task   uint64 // user + nice + system (guest time is in user)
	Busy   uint64 // all but idle and iowait
	IRQ    uint64 // irq + softirq
	Steal  uint64
	IOWait uint64
}

// MachineCPU reads the "cpu" line of /proc/stat.
func MachineCPU() (CPUTimes, error) {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return CPUTimes{}, err
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return CPUTimes{}, errors.New("/proc/stat: no cpu line")
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal; guest is in user
	for i := range v {
		v[i], _ = strconv.ParseUint(f[i+1], 10, 64)
	}
	total := v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7]
	return CPUTimes{
		Total: total, Task: v[0] + v[1] + v[2], Busy: total - v[3] - v[4],
		IRQ: v[5] + v[6], Steal: v[7], IOWait: v[4],
	}, nil
}

// Kernel names the running kernel ("Linux 6.1.0"), or the OS if unknown.
func Kernel() string {
	raw, err := os.ReadFile("/proc/sys/kernel/osrelease")
	if err != nil {
		return runtime.GOOS
	}
	return "Linux " + strings.TrimSpace(string(raw))
}

// Machine describes this machine for a header: host name, CPUs, CPU
// model, kernel, load average and memory.
func Machine() string {
	host, _ := os.Hostname()
	loadAvg := ""
	if la := LoadAvg(); la != "" {
		loadAvg = ", load average " + la
	}
	return fmt.Sprintf("%s, %d CPUs, %s, %s%s, %s", host, runtime.NumCPU(), CPUModel(), Kernel(), loadAvg, MemInfo())
}

// CPUModel is the first CPU's model name from /proc/cpuinfo, or the
// architecture if unknown.
func CPUModel() string {
	raw, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return runtime.GOARCH
}

// MemInfo describes the machine's memory ("23.5 GiB RAM (22.9 GiB
// available)") from /proc/meminfo.
func MemInfo() string {
	total, err1 := procMemKiB("MemTotal")
	avail, err2 := procMemKiB("MemAvailable")
	if err1 != nil || err2 != nil {
		return "memory unknown"
	}
	return fmt.Sprintf("%.1f GiB RAM (%.1f GiB available)", float64(total)/(1<<20), float64(avail)/(1<<20))
}

func procMemKiB(field string) (uint64, error) {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("/proc/meminfo has no %s", field)
}

// LoadAvg returns the 1, 5 and 15 minute load averages as "X Y Z", or ""
// where /proc/loadavg cannot be read.
func LoadAvg() string {
	raw, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(raw))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// FirstLine returns the first line of what name with args prints on stdout
// (a tool's version, say), or unknown if it cannot be run.
func FirstLine(unknown, name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return unknown
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return line
}

// Mount returns the file system type and source of the mount holding dir
// (from /proc/self/mountinfo), or "" and "" if unknown.
func Mount(dir string) (fstype, source string) {
	if d, err := filepath.EvalSymlinks(dir); err == nil {
		dir = d
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", ""
	}
	defer f.Close()
	best := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, sf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(sf) < 2 {
			continue
		}
		mp := pf[4]
		if (dir == mp || strings.HasPrefix(dir, strings.TrimSuffix(mp, "/")+"/")) && len(mp) >= len(best) {
			best, fstype, source = mp, sf[0], sf[1]
		}
	}
	return fstype, source
}

// Median of xs (not empty); sorts xs.
func Median(xs []float64) float64 {
	sort.Float64s(xs)
	n := len(xs)
	if n%2 == 1 {
		return xs[n/2]
	}
	return (xs[n/2-1] + xs[n/2]) / 2
}

// Dur prints nanoseconds as µs below 1 ms and as ms above, and "-" for 0.
func Dur(ns float64) string {
	switch {
	case ns <= 0:
		return "-"
	case ns < 1e6:
		return fmt.Sprintf("%.0fµs", ns/1e3)
	default:
		return fmt.Sprintf("%.2fms", ns/1e6)
	}
}

// HumanBytes writes b as GiB or MiB (KiB below a MiB), for tables.
func HumanBytes(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", b>>10)
}

// ParseSize reads 512, 64Mi, 1Gi (binary suffixes, as cairn ctl --size).
func ParseSize(s string) (uint64, error) {
	mult := uint64(1)
	for _, u := range []struct {
		suffix string
		m      uint64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.m
			break
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n == 0 || n > math.MaxUint64/mult {
		return 0, errors.New("want a positive size such as 1Gi or 64Mi")
	}
	return n * mult, nil
}

// ExitCode reports on stderr how a run of prog ended, after its cleanup,
// and returns its exit code: ExitInterrupted once ctx is done (Ctrl-C), 1
// after err, else 0.
func ExitCode(ctx context.Context, prog string, err error) int {
	switch {
	case ctx.Err() != nil:
		fmt.Fprintf(os.Stderr, "%s: interrupted; cleaned up\n", prog)
		return ExitInterrupted
	case err != nil:
		fmt.Fprintf(os.Stderr, "%s: %v\n", prog, err)
		return 1
	}
	return 0
}
