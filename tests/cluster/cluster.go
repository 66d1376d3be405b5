// Package cluster starts real volume-store clusters inside a test process:
// n meta agents (replication/meta.StartAgent) on loopback addresses, each
// with its own data dir (real bolt files, real file snapshots) and real TCP
// for raft and the meta API. Tests kill, restart and partition members and read what the
// members hold; t.Cleanup stops everything a cluster started.
//
// One Cluster serves one test. Its methods are safe for concurrent use, with
// one rule: Kill and Restart of the same member must not race each other.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cairn-csi/cairn/internal/loopback"
	"github.com/cairn-csi/cairn/replication/meta"
)

// DiskCapacity is the data disk every member reports (all of it free), so
// placement always has room and heartbeats never carry a capacity change.
const DiskCapacity = 100 << 30

// Default timings: small enough for fast failovers, large enough for a
// loaded two-core machine running with -race.
const (
	defaultTimeoutMultiplier = 0.2
	defaultHeartbeatInterval = 100 * time.Millisecond
	defaultNodeDownAfter     = time.Second
	// leaderWait bounds Leader and MakeCluster's wait for an agreed leader.
	leaderWait = 10 * time.Second
	// convergeWait bounds the waits for node states and replicated state.
	convergeWait = 30 * time.Second
)

type config struct {
	timeoutMultiplier float64
	snapshotThreshold uint64
	trailingLogs      uint64
	snapshotInterval  time.Duration
	heartbeatInterval time.Duration
	nodeDownAfter     time.Duration
	logLevel          zapcore.Level
	streamLogs        bool        // also write every line to t.Log
	extra             *zap.Logger // also write every line here
	nop               bool        // log nothing, keep nothing
}

// Option changes how MakeCluster configures its members.
type Option func(*config)

// WithSnapshotThreshold sets raft's SnapshotThreshold (log entries between
// automatic snapshots).
func WithSnapshotThreshold(n uint64) Option { return func(c *config) { c.snapshotThreshold = n } }

// WithTrailingLogs sets how many log entries raft keeps behind a snapshot.
func WithTrailingLogs(n uint64) Option { return func(c *config) { c.trailingLogs = n } }

// WithSnapshotInterval sets how often raft checks whether to snapshot.
func WithSnapshotInterval(d time.Duration) Option { return func(c *config) { c.snapshotInterval = d } }

// WithTimeoutMultiplier scales raft's default timeouts (default 0.2).
func WithTimeoutMultiplier(f float64) Option { return func(c *config) { c.timeoutMultiplier = f } }

// WithHeartbeatInterval sets how often members report to the leader
// (default 100ms).
func WithHeartbeatInterval(d time.Duration) Option {
	return func(c *config) { c.heartbeatInterval = d }
}

// WithNodeDownAfter sets how long the leader waits for a heartbeat before it
// marks a node down (default 1s). Tests that must not see nodes go down while
// members restart set it far above the test's length.
func WithNodeDownAfter(d time.Duration) Option { return func(c *config) { c.nodeDownAfter = d } }

// WithLogLevel sets the lowest level recorded (default Info).
func WithLogLevel(l zapcore.Level) Option { return func(c *config) { c.logLevel = l } }

// WithTestLogger also streams every line to the test's log as it is written
// (zaptest); by default lines are kept in memory and written to a file only
// when the test fails.
func WithTestLogger() Option { return func(c *config) { c.streamLogs = true } }

// WithLogger also writes every line to l.
func WithLogger(l *zap.Logger) Option { return func(c *config) { c.extra = l } }

// WithNopLogger logs nothing at all: Logs stays empty and a failing test
// gets no log file.
func WithNopLogger() Option { return func(c *config) { c.nop = true } }

// Cluster is a running set of in-process store members.
type Cluster struct {
	t    testing.TB
	cfg  config
	log  *zap.Logger
	logs *observer.ObservedLogs
	tl   *guardedT

	// Fixed per member for the cluster's life, so a restarted member comes
	// back with the same identity, data dir and addresses.
	ids       []string
	dirs      []string
	raftAddrs []string
	apiAddrs  []string

	mu       sync.Mutex
	agents   []*meta.Agent   // nil while a member is down
	watchers []chan struct{} // closed to stop a member's fatal-error watcher
	wg       sync.WaitGroup  // fatal-error watchers
	cut      [][]bool        // cut[i][j]: raft link between i and j is cut
	closed   bool
}

// MakeCluster starts n members that form one cluster (BootstrapExpect n),
// waits for an agreed leader and for all n nodes to be registered and up.
// Everything stops in t.Cleanup.
func MakeCluster(t testing.TB, n int, opts ...Option) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("cluster: need at least one member, got %d", n)
	}
	cfg := config{
		timeoutMultiplier: defaultTimeoutMultiplier,
		heartbeatInterval: defaultHeartbeatInterval,
		nodeDownAfter:     defaultNodeDownAfter,
		logLevel:          zapcore.InfoLevel,
	}
	for _, o := range opts {
		o(&cfg)
	}
	c := &Cluster{t: t, cfg: cfg}
	c.setupLogging()
	c.agents = make([]*meta.Agent, n)
	c.watchers = make([]chan struct{}, n)
	c.cut = make([][]bool, n)
	for i := range n {
		c.ids = append(c.ids, fmt.Sprintf("n%d", i))
		c.dirs = append(c.dirs, t.TempDir())
		c.cut[i] = make([]bool, n)
	}
	t.Cleanup(c.close)

	if err := c.startAll(); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	c.Leader(t)
	c.WaitNodesUp(t, n)
	return c
}

// startAll picks ports for every member and starts them all; on failure it
// stops the ones it started.
func (c *Cluster) startAll() error {
	n := len(c.ids)
	// Each member on a loopback address of its own, so that its ports are
	// still free when it restarts (see package loopback).
	addrs, err := loopback.Addrs(n, 2)
	if err != nil {
		return err
	}
	c.raftAddrs, c.apiAddrs = nil, nil
	for _, a := range addrs {
		c.raftAddrs = append(c.raftAddrs, a[0])
		c.apiAddrs = append(c.apiAddrs, a[1])
	}
	for i := range n {
		if err := c.start(i, false); err != nil {
			for j := range i {
				_ = c.Kill(j)
			}
			return fmt.Errorf("start member %d: %w", i, err)
		}
	}
	return nil
}

// setupLogging builds the members' logger: an in-memory observer (for Logs
// and for the file written when the test fails), plus the test log or a
// caller's logger when asked.
func (c *Cluster) setupLogging() {
	if c.cfg.nop {
		c.log = zap.NewNop()
		_, c.logs = observer.New(zapcore.FatalLevel + 1)
		return
	}
	var core zapcore.Core
	core, c.logs = observer.New(c.cfg.logLevel)
	cores := []zapcore.Core{core}
	if c.cfg.streamLogs {
		c.tl = &guardedT{TB: c.t}
		cores = append(cores, zaptest.NewLogger(c.tl, zaptest.Level(c.cfg.logLevel)).Core())
	}
	if c.cfg.extra != nil {
		cores = append(cores, c.cfg.extra.Core())
	}
	c.log = zap.New(zapcore.NewTee(cores...))
}

// N is the number of members.
func (c *Cluster) N() int { return len(c.ids) }

// NodeID is member i's node (and raft server) id.
func (c *Cluster) NodeID(i int) string { return c.ids[i] }

// Index returns the member index of a node id, or -1.
func (c *Cluster) Index(nodeID string) int {
	for i, id := range c.ids {
		if id == nodeID {
			return i
		}
	}
	return -1
}

// RaftAddr is member i's raft address.
func (c *Cluster) RaftAddr(i int) string { return c.raftAddrs[i] }

// APIAddr is member i's meta API address.
func (c *Cluster) APIAddr(i int) string { return c.apiAddrs[i] }

// APIAddrs returns every member's meta API address.
func (c *Cluster) APIAddrs() []string { return append([]string(nil), c.apiAddrs...) }

// DataDir is member i's data dir.
func (c *Cluster) DataDir(i int) string { return c.dirs[i] }

// Logs returns every line the members logged at or above the log level.
func (c *Cluster) Logs() *observer.ObservedLogs { return c.logs }

// Agent returns member i, or nil while it is down.
func (c *Cluster) Agent(i int) *meta.Agent {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.agents[i]
}

// Up lists the members that run.
func (c *Cluster) Up() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []int
	for i, a := range c.agents {
		if a != nil {
			out = append(out, i)
		}
	}
	return out
}

func (c *Cluster) agentConfig(i int) meta.AgentConfig {
	return meta.AgentConfig{
		Store: meta.StoreConfig{
			NodeID:            c.ids[i],
			DataDir:           c.dirs[i],
			RaftBind:          c.raftAddrs[i],
			TimeoutMultiplier: c.cfg.timeoutMultiplier,
			SnapshotThreshold: c.cfg.snapshotThreshold,
			TrailingLogs:      c.cfg.trailingLogs,
			SnapshotInterval:  c.cfg.snapshotInterval,
			Logger:            c.log,
		},
		APIBind:           c.apiAddrs[i],
		BootstrapExpect:   len(c.ids),
		Peers:             c.APIAddrs(),
		HeartbeatInterval: c.cfg.heartbeatInterval,
		NodeDownAfter:     c.cfg.nodeDownAfter,
		DiskUsage:         func() (uint64, uint64, error) { return DiskCapacity, DiskCapacity, nil },
	}
}

// Start starts member i (which must be down) with its id, data dir and
// addresses, and re-applies the raft links cut by Partition. A port that is
// briefly still taken is retried for a few seconds. It is Restart for
// goroutines other than the test's.
func (c *Cluster) Start(i int) error { return c.start(i, true) }

func (c *Cluster) start(i int, retryBusyPort bool) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return errors.New("cluster is closed")
	}
	if c.agents[i] != nil {
		c.mu.Unlock()
		return fmt.Errorf("member %d is already running", i)
	}
	c.mu.Unlock()

	var a *meta.Agent
	var err error
	deadline := time.Now().Add(5 * time.Second)
	for {
		a, err = meta.StartAgent(c.agentConfig(i))
		if err == nil || !retryBusyPort || !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return err
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		_ = a.Close()
		return errors.New("cluster is closed")
	}
	c.agents[i] = a
	var blocked []string
	for j, cut := range c.cut[i] {
		if cut {
			blocked = append(blocked, c.raftAddrs[j])
		}
	}
	if len(blocked) > 0 {
		a.Store().Partition(blocked...)
	}
	stop := make(chan struct{})
	c.watchers[i] = stop
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		select {
		case err := <-a.Fatal():
			c.t.Errorf("cluster: member %s stopped itself: %v", c.ids[i], err)
		case <-stop:
		}
	}()
	return nil
}

// Restart starts member i again after Kill: same id, same data dir, same raft
// and API ports. The member rejoins from its data dir.
func (c *Cluster) Restart(t testing.TB, i int) {
	t.Helper()
	if err := c.Start(i); err != nil {
		t.Fatalf("cluster: restart member %d: %v", i, err)
	}
}

// Kill stops member i the way a crash looks to the rest of the cluster: its
// store and API go away without leaving the raft configuration. Killing a
// member that is down does nothing.
func (c *Cluster) Kill(i int) error {
	c.mu.Lock()
	a, stop := c.agents[i], c.watchers[i]
	c.agents[i], c.watchers[i] = nil, nil
	c.mu.Unlock()
	if a == nil {
		return nil
	}
	close(stop)
	if err := a.Close(); err != nil {
		return fmt.Errorf("close member %d: %w", i, err)
	}
	return nil
}

// Partition cuts the raft links between the members of group and all other
// members, both ways. The meta API stays reachable: followers can still
// forward to a leader and clients can still reach every member. Links stay
// cut across restarts until Heal.
func (c *Cluster) Partition(group []int) {
	in := map[int]bool{}
	for _, i := range group {
		in[i] = true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for a := range c.ids {
		for b := range c.ids {
			if in[a] != in[b] {
				c.cut[a][b] = true
			}
		}
	}
	for i, ag := range c.agents {
		if ag == nil {
			continue
		}
		var blocked []string
		for j := range c.ids {
			if in[i] != in[j] {
				blocked = append(blocked, c.raftAddrs[j])
			}
		}
		ag.Store().Partition(blocked...)
	}
}

// Heal restores every raft link cut by Partition.
func (c *Cluster) Heal() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i := range c.cut {
		for j := range c.cut[i] {
			c.cut[i][j] = false
		}
	}
	for _, a := range c.agents {
		if a != nil {
			a.Store().Heal()
		}
	}
}

// leaderNow returns the index of the single agreed leader, or -1 and what
// each member sees. Agreed: exactly one running member leads, and every
// running member whose raft link to it is not cut names it as leader.
func (c *Cluster) leaderNow() (int, string) {
	c.mu.Lock()
	agents := append([]*meta.Agent(nil), c.agents...)
	cut := make([][]bool, len(c.cut))
	for i := range c.cut {
		cut[i] = append([]bool(nil), c.cut[i]...)
	}
	c.mu.Unlock()

	var views []string
	leader := -1
	leaders := 0
	for i, a := range agents {
		if a == nil {
			views = append(views, fmt.Sprintf("%s: down", c.ids[i]))
			continue
		}
		id, _ := a.Store().Leader()
		st := a.Store().Stats()
		views = append(views, fmt.Sprintf("%s: %s term %s, leader %q", c.ids[i], st["state"], st["term"], id))
		if a.Store().IsLeader() {
			leader = i
			leaders++
		}
	}
	desc := strings.Join(views, "; ")
	if leaders != 1 {
		return -1, desc
	}
	for i, a := range agents {
		if a == nil || i == leader || cut[i][leader] {
			continue
		}
		if id, _ := a.Store().Leader(); id != c.ids[leader] {
			return -1, desc
		}
	}
	return leader, desc
}

// WaitLeader waits until the running members agree on a single leader and
// returns its index. It is Leader for goroutines other than the test's.
func (c *Cluster) WaitLeader(ctx context.Context) (int, error) {
	var desc string
	for {
		var l int
		if l, desc = c.leaderNow(); l >= 0 {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("no agreed leader (%v): %s", ctx.Err(), desc)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Leader waits up to 10s for a single agreed leader and returns its index.
func (c *Cluster) Leader(t testing.TB) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), leaderWait)
	defer cancel()
	l, err := c.WaitLeader(ctx)
	if err != nil {
		t.Fatalf("cluster: %v", err)
	}
	return l
}

// Client returns a meta client over every member's API address, closed in
// t.Cleanup.
func (c *Cluster) Client(t testing.TB) *meta.Client {
	t.Helper()
	return c.ClientOf(t, c.apiAddrs...)
}

// MemberClient returns a meta client that talks to member i only.
func (c *Cluster) MemberClient(t testing.TB, i int) *meta.Client {
	t.Helper()
	return c.ClientOf(t, c.apiAddrs[i])
}

// ClientOf returns a meta client over the given API addresses.
func (c *Cluster) ClientOf(t testing.TB, addrs ...string) *meta.Client {
	t.Helper()
	cl, err := meta.NewClient(addrs)
	if err != nil {
		t.Fatalf("cluster: meta client: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// waitState polls a linearizable read through any member until ok accepts
// the state, or fails the test after convergeWait.
func (c *Cluster) waitState(t testing.TB, what string, ok func(*meta.State) bool) *meta.State {
	t.Helper()
	cl, err := meta.NewClient(c.apiAddrs)
	if err != nil {
		t.Fatalf("cluster: meta client: %v", err)
	}
	defer cl.Close()
	deadline := time.Now().Add(convergeWait)
	var last *meta.State
	var lastErr error
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := cl.State(ctx, true)
		cancel()
		if err == nil {
			last = st
			if ok(st) {
				return st
			}
		} else {
			lastErr = err
		}
		time.Sleep(20 * time.Millisecond)
	}
	var nodes []string
	if last != nil {
		for _, n := range last.SortedNodes() {
			nodes = append(nodes, fmt.Sprintf("%s=%s", n.ID, n.State))
		}
	}
	t.Fatalf("cluster: %s: not after %v (nodes %v, last read error %v)", what, convergeWait, nodes, lastErr)
	return nil
}

// WaitNodesUp waits until at least n nodes are registered and up, as a
// linearizable read sees it.
func (c *Cluster) WaitNodesUp(t testing.TB, n int) {
	t.Helper()
	c.waitState(t, fmt.Sprintf("%d nodes up", n), func(s *meta.State) bool {
		up := 0
		for _, node := range s.Nodes {
			if node.State == meta.NodeUp {
				up++
			}
		}
		return up >= n
	})
}

// WaitNodeState waits until member i's node is in state want, as a
// linearizable read sees it.
func (c *Cluster) WaitNodeState(t testing.TB, i int, want meta.NodeState) {
	t.Helper()
	c.waitState(t, fmt.Sprintf("node %s %s", c.ids[i], want), func(s *meta.State) bool {
		n, ok := s.Nodes[c.ids[i]]
		return ok && n.State == want
	})
}

// MemberState is one member's local view: its FSM's applied index and a copy
// of its state.
type MemberState struct {
	Index        int
	AppliedIndex uint64
	State        *meta.State
}

// LocalState reads member i's own FSM (no raft round trip), or returns false
// while the member is down.
func (c *Cluster) LocalState(i int) (MemberState, bool) {
	a := c.Agent(i)
	if a == nil {
		return MemberState{}, false
	}
	fsm := a.Store().FSM()
	var st *meta.State
	fsm.View(func(s *meta.State) { st = s.Clone() })
	return MemberState{Index: i, AppliedIndex: a.Store().AppliedIndex(), State: st}, true
}

// WaitConverged waits until every running member has applied the same index
// and holds the same state, and returns that state. Call it with all raft
// links healed: a cut-off member cannot catch up.
func (c *Cluster) WaitConverged(t testing.TB) *meta.State {
	t.Helper()
	deadline := time.Now().Add(convergeWait)
	var views []MemberState
	for time.Now().Before(deadline) {
		views = views[:0]
		for _, i := range c.Up() {
			if v, ok := c.LocalState(i); ok {
				views = append(views, v)
			}
		}
		same := len(views) > 0
		for _, v := range views[min(1, len(views)):] {
			same = same && v.AppliedIndex == views[0].AppliedIndex && reflect.DeepEqual(v.State, views[0].State)
		}
		if same {
			return views[0].State
		}
		time.Sleep(20 * time.Millisecond)
	}
	var desc []string
	for _, v := range views {
		desc = append(desc, fmt.Sprintf("%s: applied %d, %d volumes, %d nodes", c.ids[v.Index], v.AppliedIndex, len(v.State.Volumes), len(v.State.Nodes)))
	}
	t.Fatalf("cluster: members did not converge within %v: %s", convergeWait, strings.Join(desc, "; "))
	return nil
}

// close stops every member and the watchers, and, when the test failed,
// writes the members' log to a file that outlives the test.
func (c *Cluster) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	// Members stop one after another; a parallel close would race raft's
	// elections on the survivors for nothing.
	for i := range c.ids {
		if err := c.Kill(i); err != nil {
			c.t.Errorf("cluster: %v", err)
		}
	}
	c.wg.Wait()
	if c.tl != nil {
		c.tl.stop()
	}
	if c.t.Failed() && c.logs.Len() > 0 {
		c.dumpLogs()
	}
}

// dumpLogs writes every observed line to a temporary file and names it.
func (c *Cluster) dumpLogs() {
	name := strings.NewReplacer("/", "_", " ", "_").Replace(c.t.Name())
	f, err := os.CreateTemp("", "cairn-cluster-"+name+"-*.log")
	if err != nil {
		c.t.Logf("cluster: cannot write member logs: %v", err)
		return
	}
	enc := zapcore.NewConsoleEncoder(zap.NewDevelopmentEncoderConfig())
	for _, e := range c.logs.All() {
		buf, err := enc.EncodeEntry(e.Entry, e.Context)
		if err != nil {
			continue
		}
		_, _ = f.Write(buf.Bytes())
		buf.Free()
	}
	if err := f.Close(); err != nil {
		c.t.Logf("cluster: writing member logs: %v", err)
		return
	}
	c.t.Logf("cluster: member logs (%d lines) in %s", c.logs.Len(), f.Name())
}

// guardedT passes log lines to the test until the cluster has stopped:
// goroutines that outlive a member's Close (closing connections, say) must
// not log to a test that has ended.
type guardedT struct {
	testing.TB
	mu   sync.Mutex
	done bool
}

func (g *guardedT) Logf(format string, args ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.done {
		g.TB.Logf(format, args...)
	}
}

func (g *guardedT) Errorf(format string, args ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.done {
		g.TB.Errorf(format, args...)
	}
}

func (g *guardedT) Fail() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.done {
		g.TB.Fail()
	}
}

func (g *guardedT) stop() {
	g.mu.Lock()
	g.done = true
	g.mu.Unlock()
}
