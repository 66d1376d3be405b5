package meta

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/raftlog"

	"github.com/cairn-csi/cairn/internal/pki"
)

// StoreConfig configures one member of the volume store.
type StoreConfig struct {
	// NodeID is this member's id; it is also its raft server id.
	NodeID string
	// DataDir holds the raft log (raft.db), snapshots and identity files.
	DataDir string
	// RaftBind is the TCP address the raft transport listens on.
	RaftBind string
	// RaftAdvertise is the address peers dial; defaults to the bound address.
	RaftAdvertise string
	// TimeoutMultiplier scales raft's default heartbeat, election, lease and
	// commit timeouts (1 = hashicorp/raft defaults; tests use less).
	TimeoutMultiplier float64
	// SnapshotThreshold and TrailingLogs override raft's defaults when > 0.
	SnapshotThreshold uint64
	TrailingLogs      uint64
	// SnapshotInterval overrides raft's default when > 0.
	SnapshotInterval time.Duration
	// Logger receives every line of the store and of raft.
	Logger *zap.Logger
	// TLS, if set, has the raft transport speak mutual TLS, with node
	// certificates only (nil: plaintext).
	TLS *pki.Credentials
}

// Store is one member of the Raft-replicated volume store.
type Store struct {
	cfg      StoreConfig
	log      *zap.Logger
	raft     *raft.Raft
	fsm      *FSM
	logStore *raftboltdb.BoltStore
	snaps    raft.SnapshotStore
	// hadState: the data dir held raft state when the store opened,
	// before raft ran and could store a term or entries a peer sent.
	hadState  bool
	transport *raft.NetworkTransport
	stream    *streamLayer
	metrics   *storeMetrics

	leaderCh chan bool
	mu       sync.Mutex
	ready    bool // leader whose barrier for its term has been applied
	stop     context.CancelFunc
	wg       sync.WaitGroup
	leading  []func(ctx context.Context) // run while this member leads
	closed   bool
}

const (
	nodeIDFile    = "node-id"
	clusterIDFile = "cluster-id"
)

// OpenStore opens (or creates) the member's data dir and starts raft. It
// does not bootstrap: call Bootstrap on a fresh cluster, or have the leader
// AddVoter this member.
func OpenStore(cfg StoreConfig) (*Store, error) {
	if cfg.NodeID == "" {
		return nil, errors.New("store: node id is empty")
	}
	if cfg.DataDir == "" {
		return nil, errors.New("store: data dir is empty")
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.TimeoutMultiplier <= 0 {
		cfg.TimeoutMultiplier = 1
	}
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("store: data dir: %w", err)
	}
	if err := claimIdentity(cfg.DataDir, nodeIDFile, cfg.NodeID); err != nil {
		return nil, err
	}
	log := cfg.Logger.Named("meta").With(zap.String("node_id", cfg.NodeID))

	s := &Store{cfg: cfg, log: log, fsm: NewFSM(), leaderCh: make(chan bool, 16)}
	var err error
	s.logStore, err = raftboltdb.New(raftboltdb.Options{
		Path: filepath.Join(cfg.DataDir, "raft.db"),
		// NoFreelistSync trades a slower open for cheaper commits.
		BoltOptions: &bbolt.Options{Timeout: 2 * time.Second, NoFreelistSync: true},
	})
	if err != nil {
		return nil, fmt.Errorf("store: open raft log %s: %w (is another cairn process using this data dir?)", filepath.Join(cfg.DataDir, "raft.db"), err)
	}
	hlog := raftlog.New(cfg.Logger.Named("raft").With(zap.String("node_id", cfg.NodeID)))
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, hlog)
	s.snaps = snaps
	if err != nil {
		s.logStore.Close()
		return nil, fmt.Errorf("store: snapshot store: %w", err)
	}
	s.stream, err = newStreamLayer(cfg.RaftBind, cfg.RaftAdvertise, cfg.TLS)
	if err != nil {
		s.logStore.Close()
		return nil, fmt.Errorf("store: %w", err)
	}
	var started atomic.Pointer[raft.Raft]
	refusals := newRefusalLog(log, time.Minute)
	s.stream.setAdmitPeer(func(node string) error {
		err := admitRaftPeer(started.Load(), node)
		if err != nil {
			refusals.warn(node, "raft connection refused", zap.String("peer", node), zap.Error(err))
		}
		return err
	})
	s.transport = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: s.stream, MaxPool: 3, Timeout: 10 * time.Second, Logger: hlog,
	})

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.Logger = hlog
	rc.NotifyCh = s.leaderCh
	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) * cfg.TimeoutMultiplier) }
	rc.HeartbeatTimeout = scale(rc.HeartbeatTimeout)
	rc.ElectionTimeout = scale(rc.ElectionTimeout)
	rc.LeaderLeaseTimeout = scale(rc.LeaderLeaseTimeout)
	rc.CommitTimeout = scale(rc.CommitTimeout)
	if cfg.SnapshotThreshold > 0 {
		rc.SnapshotThreshold = cfg.SnapshotThreshold
	}
	if cfg.TrailingLogs > 0 {
		rc.TrailingLogs = cfg.TrailingLogs
	}
	if cfg.SnapshotInterval > 0 {
		rc.SnapshotInterval = cfg.SnapshotInterval
	}
	s.metrics = newStoreMetrics(s)
	// The cache keeps recent entries in memory so replication to followers
	// does not read them back from bolt.
	logs, err := raft.NewLogCache(512, s.logStore)
	if err != nil {
		s.transport.Close()
		s.logStore.Close()
		return nil, fmt.Errorf("store: log cache: %w", err)
	}
	s.hadState, _ = raft.HasExistingState(s.logStore, s.logStore, snaps) // an error reads as none: form then asks its peers
	s.raft, err = raft.NewRaft(rc, s.fsm, logs, s.logStore, snaps, s.transport)
	if err != nil {
		s.transport.Close()
		s.logStore.Close()
		return nil, fmt.Errorf("store: start raft: %w", err)
	}
	started.Store(s.raft)
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.watchLeadership(ctx) }()
	log.Info("store opened", zap.String("raft_addr", s.RaftAddr()), zap.String("data_dir", cfg.DataDir),
		zap.Uint64("raft_index", s.raft.LastIndex()))
	return s, nil
}

// claimIdentity writes value to dir/name, or checks that the file already
// says value: one data dir belongs to one node (and one cluster).
func claimIdentity(dir, name, value string) error {
	p := filepath.Join(dir, name)
	b, err := os.ReadFile(p)
	switch {
	case err == nil:
		if got := strings.TrimSpace(string(b)); got != value {
			return fmt.Errorf("data dir %s belongs to %s %q, not %q: %w", dir, strings.ReplaceAll(name, "-id", ""), got, value, ErrClusterMismatch)
		}
		return nil
	case errors.Is(err, os.ErrNotExist):
		return writeFileSync(p, []byte(value+"\n"))
	default:
		return fmt.Errorf("read %s: %w", p, err)
	}
}

// writeFileSync writes a small file durably (temp file, fsync, rename).
func writeFileSync(p string, data []byte) error {
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

// LocalClusterID returns the cluster id recorded in the data dir, or "".
func (s *Store) LocalClusterID() string {
	b, err := os.ReadFile(filepath.Join(s.cfg.DataDir, clusterIDFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// RecordClusterID binds the data dir to the cluster; a data dir of another
// cluster is an error.
func (s *Store) RecordClusterID(id string) error {
	return claimIdentity(s.cfg.DataDir, clusterIDFile, id)
}

// NodeID returns this member's id.
func (s *Store) NodeID() string { return s.cfg.NodeID }

// RaftAddr returns the address peers reach this member's raft at.
func (s *Store) RaftAddr() string { return s.stream.Addr().String() }

// FSM gives read access to the replicated state.
func (s *Store) FSM() *FSM { return s.fsm }

// HasState reports whether the data dir already holds raft state (a member
// that restarts rejoins from it without bootstrap or join).
func (s *Store) HasState() bool {
	ok, err := raft.HasExistingState(s.logStore, s.logStore, s.snaps)
	return (err == nil && ok) || s.raft.LastIndex() > 0
}

// HadStateAtOpen reports whether the data dir held raft state when the
// store opened. Unlike HasState, it cannot turn true because a peer
// reached this member first: a leader that still counts a wiped member as
// a voter sends it its term and entries as soon as raft listens, which
// made a wiped member think its empty data dir was its old one.
func (s *Store) HadStateAtOpen() bool { return s.hadState }

// Bootstrap starts a new cluster whose voters are servers. Every member of
// the first configuration may call it with the same list.
func (s *Store) Bootstrap(servers []raft.Server) error {
	err := s.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
	if err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return fmt.Errorf("bootstrap: %w", err)
	}
	return nil
}

// IsLeader reports whether this member is the raft leader.
func (s *Store) IsLeader() bool { return s.raft.State() == raft.Leader }

// Leader returns the current leader's id and raft address, if known.
func (s *Store) Leader() (id, addr string) {
	a, i := s.raft.LeaderWithID()
	return string(i), string(a)
}

// Member is one server of the raft configuration.
type Member struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	Voter    bool   `json:"voter"`
	Leader   bool   `json:"leader"`
}

// Members lists the raft configuration.
func (s *Store) Members() ([]Member, error) {
	f := s.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	leader, _ := s.Leader()
	var out []Member
	for _, srv := range f.Configuration().Servers {
		out = append(out, Member{
			ID: string(srv.ID), RaftAddr: string(srv.Address),
			Voter:  srv.Suffrage == raft.Voter,
			Leader: string(srv.ID) == leader,
		})
	}
	return out, nil
}

// AddVoter adds a member (leader only). Adding a member that is already in
// the configuration with the same address changes nothing.
func (s *Store) AddVoter(id, raftAddr string) error {
	if !s.IsLeader() {
		return ErrNotLeader
	}
	members, err := s.Members()
	if err != nil {
		return err
	}
	for _, m := range members {
		if m.ID == id && m.RaftAddr == raftAddr {
			return nil
		}
		if m.ID == id || m.RaftAddr == raftAddr {
			// A member that comes back with a new address (or an address
			// reused by a new id) replaces the old entry.
			if err := s.raft.RemoveServer(raft.ServerID(m.ID), 0, 10*time.Second).Error(); err != nil {
				return fmt.Errorf("remove old member %s: %w", m.ID, err)
			}
		}
	}
	if err := s.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, 10*time.Second).Error(); err != nil {
		return fmt.Errorf("add voter %s at %s: %w", id, raftAddr, err)
	}
	s.log.Info("member added", zap.String("member", id), zap.String("raft_addr", raftAddr))
	return nil
}

// Apply commits a command and returns its result (leader only). The result's
// error is the command's own (ErrNotFound, ErrEpochMismatch …); an error
// wrapping ErrNotLeader or ErrNoLeader means the command may or may not have
// been committed.
func (s *Store) Apply(ctx context.Context, c Command) (Result, error) {
	b, err := Encode(c)
	if err != nil {
		return Result{}, err
	}
	timeout := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return Result{}, ctx.Err()
		}
	}
	start := time.Now()
	f := s.raft.Apply(b, timeout)
	if err := waitFuture(ctx, f); err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return Result{}, fmt.Errorf("%v while committing: %w", err, ErrOutcomeUnknown)
		}
		return Result{}, raftError(err)
	}
	s.metrics.commitLatency.Observe(time.Since(start).Seconds())
	r, ok := f.Response().(*applyResult)
	if !ok {
		panic(fmt.Sprintf("BUG: FSM returned %T", f.Response()))
	}
	return r.Result, r.Err
}

// waitFuture waits for f or until ctx ends. hashicorp/raft can leave a
// future unanswered forever when it shuts down right after committing the
// entry (hashicorp/raft#498), so nothing in the store may wait on one
// without a way out: Close waits for the leader's duties, and would hang.
// When ctx ends first, the goroutine waiting on f stays until raft answers.
func waitFuture(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// raftError maps hashicorp/raft's errors onto the store's sentinels.
func raftError(err error) error {
	switch {
	case errors.Is(err, raft.ErrNotLeader):
		return fmt.Errorf("%v: %w", err, ErrNotLeader)
	case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress),
		errors.Is(err, raft.ErrEnqueueTimeout), errors.Is(err, raft.ErrRaftShutdown):
		return fmt.Errorf("%v: %w", err, ErrOutcomeUnknown)
	}
	return err
}

// ReadBarrier makes the next read of the FSM linearizable: it confirms that
// this member still leads (a quorum answered) and waits until everything
// committed before the call is applied. Leader only.
func (s *Store) ReadBarrier(ctx context.Context) error {
	s.mu.Lock()
	ready := s.ready
	s.mu.Unlock()
	if !s.IsLeader() {
		return ErrNotLeader
	}
	if !ready {
		return fmt.Errorf("leader has not yet applied its term's barrier: %w", ErrNoLeader)
	}
	idx := s.raft.CommitIndex()
	if err := s.raft.VerifyLeader().Error(); err != nil {
		return raftError(err)
	}
	if s.raft.AppliedIndex() >= idx {
		return nil
	}
	// Entries that are not commands (raft's no-op of a new term, barriers)
	// never reach the FSM, so waiting for the FSM to move could wait for
	// the next write. A barrier returns once everything before it is
	// applied.
	if err := waitFuture(ctx, s.raft.Barrier(10*time.Second)); err != nil {
		return raftError(err)
	}
	return nil
}

// AppliedIndex is the raft index of the last entry applied on this member,
// commands or not (the FSM's own count only moves with commands, and not at
// all with a restored snapshot).
func (s *Store) AppliedIndex() uint64 { return s.raft.AppliedIndex() }

// OnLeading registers fn to run in its own goroutine each time this member
// becomes leader (after its barrier); its context ends with the leadership.
// Register before the member can lead (right after OpenStore).
func (s *Store) OnLeading(fn func(ctx context.Context)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.leading = append(s.leading, fn)
}

// watchLeadership runs the leader's duties while this member leads.
func (s *Store) watchLeadership(ctx context.Context) {
	var wg sync.WaitGroup
	stopLeading := func() {}
	defer func() { stopLeading() }()
	for {
		select {
		case <-ctx.Done():
			return
		case isLeader := <-s.leaderCh:
			stopLeading()
			if !isLeader {
				s.log.Info("lost leadership")
				continue
			}
			s.log.Info("became leader", zap.Uint64("term", s.raft.CurrentTerm()))
			lctx, cancel := context.WithCancel(ctx)
			stopLeading = func() {
				cancel()
				wg.Wait()
				s.mu.Lock()
				s.ready = false
				s.mu.Unlock()
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.lead(lctx, &wg)
			}()
		}
	}
}

// lead makes the new leader ready: a barrier so every entry of earlier terms
// is applied, the cluster's identity, then the registered duties.
func (s *Store) lead(ctx context.Context, wg *sync.WaitGroup) {
	for {
		err := waitFuture(ctx, s.raft.Barrier(10*time.Second))
		if err == nil {
			break
		}
		if ctx.Err() != nil || !s.IsLeader() {
			return
		}
		s.log.Warn("leader barrier failed; retrying", zap.Error(err))
		time.Sleep(100 * time.Millisecond)
	}
	var clusterID string
	s.fsm.View(func(st *State) { clusterID = st.ClusterID })
	if clusterID == "" {
		clusterID = s.LocalClusterID()
		if clusterID == "" {
			clusterID = newID("c")
		}
		for {
			_, err := s.Apply(ctx, &InitCluster{ClusterID: clusterID, OverProvisioningRatio: 1})
			if err == nil {
				break
			}
			if ctx.Err() != nil || !s.IsLeader() {
				return
			}
			s.log.Warn("initialise cluster identity failed; retrying", zap.Error(err))
			time.Sleep(100 * time.Millisecond)
		}
		s.log.Info("cluster initialised", zap.String("cluster_id", clusterID))
	}
	s.mu.Lock()
	s.ready = true
	duties := append([]func(context.Context){}, s.leading...)
	s.mu.Unlock()
	for _, fn := range duties {
		wg.Add(1)
		go func() { defer wg.Done(); fn(ctx) }()
	}
}

// newID returns prefix + 16 random hex digits.
func newID(prefix string) string {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic("BUG: crypto/rand failed: " + err.Error())
	}
	return prefix + "-" + hex.EncodeToString(b[:])
}

// NewVolumeID returns a fresh volume id.
func NewVolumeID() string { return newID("vol") }

// NewSnapshotID returns a fresh snapshot id.
func NewSnapshotID() string { return newID("snap") }

// Partition cuts this member's raft links to the given raft addresses (fault
// tests only).
func (s *Store) Partition(raftAddrs ...string) { s.stream.Partition(raftAddrs...) }

// Heal restores all raft links cut by Partition.
func (s *Store) Heal() { s.stream.Heal() }

// Snapshot asks raft for a snapshot now (tests and operators).
func (s *Store) Snapshot() error { return s.raft.Snapshot().Error() }

// Stats returns raft's own statistics.
func (s *Store) Stats() map[string]string { return s.raft.Stats() }

// Close stops raft and closes the log. It does not leave the cluster: a
// closed member is simply down, as after a crash, and rejoins when reopened.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.stop()
	err := s.raft.Shutdown().Error()
	s.wg.Wait()
	if cerr := s.transport.Close(); err == nil {
		err = cerr
	}
	if cerr := s.logStore.Close(); err == nil {
		err = cerr
	}
	s.log.Info("store closed")
	return err
}

// admitRaftPeer decides whether node, whose node certificate a Raft
// connection presented, may speak Raft to this member: it must be a server
// of the member's latest configuration. A member with no configuration yet
// (a fresh node, before the bootstrap or before the leader that adds it
// sends the log) admits any node: its first peer is the one that makes it
// a member. A connection that arrives before raft runs is refused, and its
// peer dials again.
func admitRaftPeer(r *raft.Raft, node string) error {
	if r == nil {
		return fmt.Errorf("%w: raft is not running yet", pki.ErrPermissionDenied)
	}
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return err
	}
	servers := f.Configuration().Servers
	if len(servers) == 0 {
		return nil
	}
	for _, srv := range servers {
		if string(srv.ID) == node {
			return nil
		}
	}
	return fmt.Errorf("%w: node %s is not a member of the store (its raft configuration)", pki.ErrPermissionDenied, node)
}

// refusalLog logs a warning per key at most once per interval: a refused
// peer redials every few seconds.
type refusalLog struct {
	log      *zap.Logger
	interval time.Duration
	mu       sync.Mutex
	last     map[string]time.Time
}

func newRefusalLog(log *zap.Logger, interval time.Duration) *refusalLog {
	return &refusalLog{log: log, interval: interval, last: map[string]time.Time{}}
}

func (l *refusalLog) warn(key, msg string, fields ...zap.Field) {
	l.mu.Lock()
	now := time.Now()
	due := now.Sub(l.last[key]) >= l.interval
	if due {
		l.last[key] = now
	}
	l.mu.Unlock()
	if due {
		l.log.Warn(msg, fields...)
	}
}
