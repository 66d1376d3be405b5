// Command metabench measures committed writes per second and commit latency
// of the meta store (replication/meta) on a 3-member cluster running in this
// process: real TCP on loopback addresses, real bolt raft logs in temporary
// data dirs, hashicorp/raft's default timings.
//
// Each step runs N goroutines, each with its own meta.Client, that loop
// Client.Apply(NodeHeartbeat): a real write through the meta API and raft.
// Clients are given all three API addresses; followers forward to the leader.
// It prints one table row per step and never fails on a number: it exits
// non-zero only if the cluster does not form, more than 1% of the writes of a
// step fail, or the leader applied fewer entries than were acknowledged.
//
//	go run ./tests/bench/metabench [-clients 1,8,64] [-duration 5s] [-warmup 1s] [-direct 64] [-v]
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

const (
	members = 3
	// benchNode is the node whose heartbeat the clients write.
	benchNode = "node-1"
	// capacity is the capacity every member reports and every write sets.
	// Free bytes vary per write but stay within 1% of capacity of what the
	// agents' own heartbeat loops report, so those loops do not write too
	// (recordHeartbeat only commits a change above 1% or every 30 s).
	capacity = uint64(1) << 40
	baseFree = capacity / 2
	freeStep = uint64(1) << 20 // free bytes move in 1 MiB steps, at most 1 GiB
)

type options struct {
	clients     []int
	direct      []int
	duration    time.Duration
	warmup      time.Duration
	callTimeout time.Duration
	formTimeout time.Duration
	verbose     bool
	cpuProfile  string
}

func main() { os.Exit(run()) }

func run() int {
	var o options
	var clientsFlag, directFlag string
	flag.StringVar(&clientsFlag, "clients", "1,8,64", "comma-separated numbers of concurrent clients, one step each")
	flag.StringVar(&directFlag, "direct", "64", `client counts for which to add a "direct to leader" step (empty: none)`)
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "measured time per step")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured time at the start of each step")
	flag.DurationVar(&o.callTimeout, "call-timeout", 10*time.Second, "deadline of each Apply call")
	flag.DurationVar(&o.formTimeout, "form-timeout", 30*time.Second, "how long to wait for the cluster to form")
	flag.BoolVar(&o.verbose, "v", false, "log the members' warnings and errors to stderr")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the steps (cluster and clients) to this file")
	flag.Parse()
	var err error
	if o.clients, err = parseCounts(clientsFlag); err != nil || len(o.clients) == 0 {
		fmt.Fprintf(os.Stderr, "metabench: -clients %q: want a list of positive numbers (%v)\n", clientsFlag, err)
		return 2
	}
	if o.direct, err = parseCounts(directFlag); err != nil {
		fmt.Fprintf(os.Stderr, "metabench: -direct %q: %v\n", directFlag, err)
		return 2
	}
	if o.duration <= 0 || o.warmup < 0 || o.callTimeout <= 0 {
		fmt.Fprintln(os.Stderr, "metabench: -duration and -call-timeout must be positive, -warmup not negative")
		return 2
	}

	ctx, stop := benchkit.SignalContext()
	defer stop()

	log := zap.NewNop()
	if o.verbose {
		cfg := zap.NewProductionConfig()
		cfg.Level = zap.NewAtomicLevelAt(zap.WarnLevel)
		cfg.Encoding = "console"
		cfg.EncoderConfig.EncodeTime = zapcore.ISO8601TimeEncoder
		if log, err = cfg.Build(); err != nil {
			fmt.Fprintf(os.Stderr, "metabench: logger: %v\n", err)
			return 1
		}
		defer func() { _ = log.Sync() }()
	}

	cl, err := startCluster(log)
	defer cl.close()
	if err != nil {
		fmt.Fprintf(os.Stderr, "metabench: start cluster: %v\n", err)
		return 1
	}
	formed, err := cl.waitReady(ctx, o.formTimeout)
	if err != nil {
		if ctx.Err() != nil {
			fmt.Fprintln(os.Stderr, "metabench: interrupted while the cluster was forming")
			return benchkit.ExitInterrupted
		}
		fmt.Fprintf(os.Stderr, "metabench: cluster did not form: %v\n", err)
		return 1
	}

	printHeader(os.Stdout, cl, o, formed)

	type plan struct {
		clients int
		direct  bool
	}
	var plans []plan
	for _, c := range o.clients {
		plans = append(plans, plan{c, false})
	}
	for _, c := range o.direct {
		plans = append(plans, plan{c, true})
	}

	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			fmt.Fprintf(os.Stderr, "metabench: -cpuprofile: %v\n", err)
			return 2
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintf(os.Stderr, "metabench: -cpuprofile: %v\n", err)
			return 2
		}
		defer pprof.StopCPUProfile()
	}

	var results []*stepResult
	code := 0
	for _, p := range plans {
		if ctx.Err() != nil {
			break
		}
		r := cl.runStep(ctx, p.clients, p.direct, o)
		results = append(results, r)
		fmt.Fprintf(os.Stderr, "  done: %s\n", r.label())
	}
	fmt.Println()
	printTable(os.Stdout, results)
	fmt.Println()

	for _, r := range results {
		calls := r.totalOK + r.totalErr
		switch {
		case r.verifyErr != nil:
			fmt.Printf("FAIL %s: %v\n", r.label(), r.verifyErr)
			code = 1
		default:
			lag := "not within 2s"
			if r.followerLag >= 0 {
				lag = r.followerLag.Round(time.Millisecond).String() + " after the last write"
			}
			fmt.Printf("ok   %s: leader's applied index grew by %d >= %d acknowledged writes; all members applied it %s\n",
				r.label(), r.idxAfter-r.idxBefore, r.totalOK, lag)
		}
		if calls > 0 && float64(r.totalErr) > 0.01*float64(calls) {
			fmt.Printf("FAIL %s: %d of %d writes failed (more than 1%%); first error: %v\n", r.label(), r.totalErr, calls, r.firstErr)
			code = 1
		} else if r.totalErr > 0 {
			fmt.Printf("note %s: %d of %d writes failed; first error: %v\n", r.label(), r.totalErr, calls, r.firstErr)
		}
	}
	if ctx.Err() == nil {
		if err := cl.checkState(ctx); err != nil {
			fmt.Printf("FAIL final read: %v\n", err)
			code = 1
		} else {
			fmt.Printf("ok   final linearizable read: %s holds the capacity the clients wrote\n", benchNode)
		}
	}
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "metabench: interrupted; the table holds the steps run so far")
		if code == 0 {
			code = benchkit.ExitInterrupted
		}
	}
	return code
}

// parseCounts parses "1,8,64".
func parseCounts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// cluster is the in-process 3-member cluster.
type cluster struct {
	root     string
	agents   []*meta.Agent
	apiAddrs []string
}

// startCluster starts the members (benchkit.StartMembers).
func startCluster(log *zap.Logger) (*cluster, error) {
	m, err := benchkit.StartMembers(log, "metabench", members, "node-", func(c *meta.AgentConfig) {
		c.DiskUsage = func() (uint64, uint64, error) { return capacity, baseFree, nil }
	})
	return &cluster{root: m.Root, agents: m.Agents, apiAddrs: m.APIAddrs}, err
}

// close stops every member (in parallel) and removes the data dirs.
func (cl *cluster) close() {
	if cl == nil {
		return
	}
	done := make(chan struct{})
	go func() {
		var wg sync.WaitGroup
		for _, a := range cl.agents {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := a.Close(); err != nil {
					fmt.Fprintf(os.Stderr, "metabench: close %s: %v\n", a.Store().NodeID(), err)
				}
			}()
		}
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		fmt.Fprintln(os.Stderr, "metabench: members did not stop within 20s; removing their data dirs anyway")
	}
	if cl.root != "" {
		if err := os.RemoveAll(cl.root); err != nil {
			fmt.Fprintf(os.Stderr, "metabench: remove %s: %v\n", cl.root, err)
		}
	}
}

// waitReady polls Status until a leader exists, the raft configuration has
// all members and every member has registered its node.
func (cl *cluster) waitReady(ctx context.Context, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := meta.NewClient(cl.apiAddrs)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	last := "no answer yet"
	for {
		for _, a := range cl.agents {
			select {
			case err := <-a.Fatal():
				return 0, fmt.Errorf("%s stopped: %w", a.Store().NodeID(), err)
			default:
			}
		}
		sctx, scancel := context.WithTimeout(ctx, time.Second)
		st, err := c.Status(sctx)
		scancel()
		if err == nil {
			registered := 0
			for _, n := range st.Nodes {
				if strings.HasPrefix(n.ID, "node-") {
					registered++
				}
			}
			if st.Leader != "" && st.ClusterID != "" && len(st.Members) == members && registered == members && cl.leader() != nil {
				return time.Since(start), nil
			}
			last = fmt.Sprintf("leader %q, %d raft members, %d nodes registered", st.Leader, len(st.Members), registered)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("%w after %v (last status: %s)", ctx.Err(), time.Since(start).Round(time.Millisecond), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// leader returns the member that leads, or nil.
func (cl *cluster) leader() *meta.Agent {
	for _, a := range cl.agents {
		if a.Store().IsLeader() {
			return a
		}
	}
	return nil
}

// maxApplied returns the highest FSM applied index of the members.
func (cl *cluster) maxApplied() uint64 {
	var m uint64
	for _, a := range cl.agents {
		m = max(m, a.Store().FSM().AppliedIndex())
	}
	return m
}

// stepResult is one row of the table.
type stepResult struct {
	clients      int
	direct       bool
	viaFollower  int             // clients whose first address is a follower
	lats         []time.Duration // successful calls that ended in the window
	windowErrs   int
	window       time.Duration
	totalOK      int // successful calls of the whole step (warmup and tail too)
	totalErr     int
	firstErr     error
	idxBefore    uint64
	idxAfter     uint64
	verifyErr    error
	followerLag  time.Duration // from the step's end until every member applied idxAfter; -1: not within 2s
	interrupted  bool
	leaderChange bool
}

func (r *stepResult) label() string {
	if r.direct {
		return fmt.Sprintf("%d clients direct to leader", r.clients)
	}
	return fmt.Sprintf("%d clients via all members", r.clients)
}

// runStep runs n clients for warmup+duration. Latencies and throughput count
// the calls that ended inside the measured window; errors count every call.
func (cl *cluster) runStep(ctx context.Context, n int, direct bool, o options) *stepResult {
	r := &stepResult{clients: n, direct: direct}
	lead := cl.leader()
	leadIdx := -1
	for i, a := range cl.agents {
		if a == lead {
			leadIdx = i
		}
	}
	clients := make([]*meta.Client, n)
	for i := range clients {
		var addrs []string
		if direct && lead != nil {
			addrs = []string{lead.APIAddr()}
		} else {
			// A client sticks to the first address that answers, and
			// every member answers. Rotate the list so that client i starts
			// at member leader+1+i: the clients spread over all members, and
			// a single client goes through a follower, as 2 in 3 real
			// clients do.
			first := (leadIdx + 1 + i) % members
			if leadIdx < 0 {
				first = i % members
			}
			addrs = append(append([]string{}, cl.apiAddrs[first:]...), cl.apiAddrs[:first]...)
			if first != leadIdx {
				r.viaFollower++
			}
		}
		c, err := meta.NewClient(addrs)
		if err != nil {
			panic("BUG: NewClient with addresses failed: " + err.Error())
		}
		clients[i] = c
	}
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()

	r.idxBefore = cl.maxApplied()
	start := time.Now()
	mStart := start.Add(o.warmup)
	mEnd := mStart.Add(o.duration)

	type workerOut struct {
		lats              []time.Duration
		windowErrs        int
		ok, errs          int
		firstErr          error
		firstErrAt        time.Time
		interruptedInCall bool
	}
	outs := make([]workerOut, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := &outs[i]
			w.lats = make([]time.Duration, 0, 4096)
			for seq := uint64(0); ; seq++ {
				if ctx.Err() != nil || !time.Now().Before(mEnd) {
					return
				}
				free := baseFree + ((uint64(i)*7919+seq)%1024)*freeStep
				cctx, cancel := context.WithTimeout(ctx, o.callTimeout)
				t0 := time.Now()
				_, err := clients[i].Apply(cctx, &meta.NodeHeartbeat{NodeID: benchNode, CapacityBytes: capacity, FreeBytes: free})
				t1 := time.Now()
				cancel()
				if err != nil && ctx.Err() != nil {
					w.interruptedInCall = true // Ctrl-C, not the store's failure
					return
				}
				inWindow := !t1.Before(mStart) && !t1.After(mEnd)
				if err != nil {
					w.errs++
					if w.firstErr == nil {
						w.firstErr, w.firstErrAt = err, t1
					}
					if inWindow {
						w.windowErrs++
					}
					continue
				}
				w.ok++
				if inWindow {
					w.lats = append(w.lats, t1.Sub(t0))
				}
			}
		}()
	}
	wg.Wait()
	end := time.Now()
	r.window = o.duration
	if end.Before(mEnd) { // interrupted
		r.window = max(end.Sub(mStart), 0)
		r.interrupted = true
	}
	var firstAt time.Time
	for _, w := range outs {
		r.lats = append(r.lats, w.lats...)
		r.windowErrs += w.windowErrs
		r.totalOK += w.ok
		r.totalErr += w.errs
		if w.firstErr != nil && (r.firstErr == nil || w.firstErrAt.Before(firstAt)) {
			r.firstErr, firstAt = w.firstErr, w.firstErrAt
		}
		r.interrupted = r.interrupted || w.interruptedInCall
	}
	slices.Sort(r.lats)

	// Every acknowledged write was applied on the leader before Apply
	// returned, so the leader's applied index must have grown by at least
	// that many entries (more: agents' heartbeats, raft's own entries).
	after := cl.leader()
	r.leaderChange = after != lead
	if after != nil {
		r.idxAfter = after.Store().FSM().AppliedIndex()
	} else {
		r.idxAfter = cl.maxApplied()
	}
	if grew := r.idxAfter - r.idxBefore; grew < uint64(r.totalOK) {
		r.verifyErr = fmt.Errorf("leader's applied index grew by %d (%d → %d) but %d writes were acknowledged",
			grew, r.idxBefore, r.idxAfter, r.totalOK)
	}
	r.followerLag = cl.waitAllApplied(ctx, r.idxAfter, 2*time.Second)
	return r
}

// waitAllApplied returns how long it takes until every member has applied
// idx, or -1 if that does not happen within limit. With no writes coming, a
// follower learns the last commit index only from the leader's next
// replication round, which hashicorp/raft sends every CommitTimeout
// (50-100 ms by default) while idle.
func (cl *cluster) waitAllApplied(ctx context.Context, idx uint64, limit time.Duration) time.Duration {
	start := time.Now()
	for time.Since(start) < limit && ctx.Err() == nil {
		lowest := uint64(math.MaxUint64)
		for _, a := range cl.agents {
			lowest = min(lowest, a.Store().FSM().AppliedIndex())
		}
		if lowest >= idx {
			return time.Since(start)
		}
		time.Sleep(time.Millisecond)
	}
	return -1
}

// checkState reads the state linearizably once and checks that the writes
// landed on the node they were addressed to.
func (cl *cluster) checkState(ctx context.Context) error {
	c, err := meta.NewClient(cl.apiAddrs)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.State(ctx, true)
	if err != nil {
		return err
	}
	n, ok := st.Nodes[benchNode]
	if !ok {
		return fmt.Errorf("%s is missing from the state", benchNode)
	}
	if n.CapacityBytes != capacity || n.FreeBytes < baseFree || n.FreeBytes >= baseFree+1024*freeStep {
		return fmt.Errorf("%s has capacity %d, free %d; the clients wrote capacity %d, free in [%d, %d)",
			benchNode, n.CapacityBytes, n.FreeBytes, capacity, baseFree, baseFree+1024*freeStep)
	}
	return nil
}

func printHeader(w io.Writer, cl *cluster, o options, formed time.Duration) {
	host, _ := os.Hostname()
	fmt.Fprintf(w, "metabench: committed meta-store writes on a %d-member cluster in one process\n", members)
	fmt.Fprintf(w, "machine:   %s, %d CPUs (GOMAXPROCS %d), %s/%s, %s%s\n",
		host, runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.GOOS, runtime.GOARCH, runtime.Version(), loadAvg())
	fmt.Fprintf(w, "cluster:   real TCP on loopback addresses, bolt raft logs on %s (temp dir), default raft timings, formed in %v\n",
		fsType(cl.root), formed.Round(time.Millisecond))
	fmt.Fprintf(w, "write:     meta.Client.Apply(NodeHeartbeat{%s}), one client per goroutine, %v call timeout\n", benchNode, o.callTimeout)
	fmt.Fprintf(w, "steps:     clients %s; %v warmup + %v measured each\n", joinInts(o.clients), o.warmup, o.duration)
	if lead := cl.leader(); lead != nil {
		fmt.Fprintf(w, "leader:    %s (%s)\n", lead.Store().NodeID(), lead.APIAddr())
	}
}

func printTable(w io.Writer, results []*stepResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "clients\ttarget\tvia follower\twrites/s\tp50\tp99\tp99.9\tmax\terrors\t")
	for _, r := range results {
		target := "any member"
		if r.direct {
			target = "leader"
		}
		rate := "-"
		if r.window > 0 {
			rate = fmt.Sprintf("%.0f", float64(len(r.lats))/r.window.Seconds())
		}
		errs := strconv.Itoa(r.totalErr)
		if r.interrupted {
			errs += " (interrupted)"
		}
		if r.leaderChange {
			errs += " (leader changed)"
		}
		fmt.Fprintf(tw, "%d\t%s\t%d/%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
			r.clients, target, r.viaFollower, r.clients, rate,
			ms(pct(r.lats, 0.50)), ms(pct(r.lats, 0.99)), ms(pct(r.lats, 0.999)), ms(pct(r.lats, 1)), errs)
	}
	tw.Flush()
	fmt.Fprintln(w, "writes/s and latencies: successful calls that ended in the measured window; errors: all calls of the step")
}

// pct returns the p-quantile (nearest rank) of sorted, or -1 if empty.
func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return -1
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) string {
	if d < 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
}

func joinInts(v []int) string {
	s := make([]string, len(v))
	for i, n := range v {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// loadAvg returns ", load average X Y Z" (other work on the machine skews
// the numbers), or "" where /proc/loadavg does not exist.
func loadAvg() string {
	if la := benchkit.LoadAvg(); la != "" {
		return ", load average " + la
	}
	return ""
}

// fsType names the file system holding dir (from /proc/self/mountinfo; fsync
// cost, and so commit latency, depends on it), or "an unknown file system".
func fsType(dir string) string {
	if typ, _ := benchkit.Mount(dir); typ != "" {
		return typ
	}
	return "an unknown file system"
}
