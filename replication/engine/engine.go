// Package engine is the write path of one attached volume: it claims the
// volume's replicas with the epoch of its attachment, sends every write to
// all healthy and rebuilding replicas, ejects a failing replica through the
// volume store before it acknowledges, reads from a healthy replica (the
// local one first), and resyncs dirty extents after a crash or failover.
// An asynchronous volume's other replicas follow: they get each write after
// it was acknowledged, from a bounded queue (follow.go).
//
// Invariant: every healthy replica in the committed replica set holds every
// acknowledged write.
package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/replication/volspec"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/internal/workers"
)

// Errors of the engine.
var (
	// ErrIO is what a failed write, read or flush returns: not enough healthy
	// replicas, or the ejection of a failed one could not be committed. The
	// block frontend reports it as EIO.
	ErrIO = errors.New("volume I/O error")
	// ErrFenced: a newer engine (a later attachment) owns the volume; this
	// engine can no longer change any replica.
	ErrFenced = errors.New("engine fenced by a newer epoch")
	// ErrNotAttached: the volume is not attached to this engine's node.
	ErrNotAttached = errors.New("volume not attached to this node")
	// ErrClosed: the engine was closed.
	ErrClosed = errors.New("engine closed")
	// ErrNeedsKey: the volume is encrypted and the engine was given no
	// data key (Config.DataKey).
	ErrNeedsKey = errors.New("encrypted volume opened without its key")
)

// Config configures an engine.
type Config struct {
	// VolumeID is the volume to serve.
	VolumeID string
	// NodeID is the node this engine runs on; the volume must be attached to it.
	NodeID string
	// Meta reaches the volume store.
	Meta *meta.Client
	// TLS, if set, is this node's identity for the replica servers of
	// other nodes (mutual TLS; nil: plaintext).
	TLS *pki.Credentials
	// Logger receives the engine's lines.
	Logger *zap.Logger
	// IOTimeout bounds one replica operation; a replica slower than this is
	// treated as failed and ejected (default 10 s).
	IOTimeout time.Duration
	// ReplicaDeadline is how long an operation waits for a replica that has
	// not answered once the write quorum of healthy replicas has (default
	// 1 s; negative: wait up to IOTimeout). The silent replica is then
	// treated as failed and ejected, so one frozen or cut-off replica holds
	// a write up for about this long, not IOTimeout. A replica ejected so
	// gets twice the deadline the next time (up to IOTimeout), so a replica
	// that is slow but alive is not ejected and rebuilt again and again.
	ReplicaDeadline time.Duration
	// CleanInterval is how often the engine declares a clean point after
	// writes (default 10 s). Shorter means fewer extents to resync after a
	// crash; longer means fewer write stalls (a clean point flushes every
	// replica under the write lock) and fewer dirty-bit writes.
	CleanInterval time.Duration
	// WatchInterval is how often the engine reads its volume from the store,
	// linearizably, to renew its lease and to catch a change the store's
	// watch did not bring (default 1.5 s, under a third of the default
	// Lease). A change of the volume wakes the engine at once through the
	// watch (see watchLoop).
	WatchInterval time.Duration
	// Lease is how long a confirmation from the store that the volume is
	// still attached here stays good (default 5 s). Past it, I/O first asks
	// the store again: an engine that was frozen (SIGSTOP, a long pause)
	// while another node took the volume over learns so before it
	// acknowledges anything.
	Lease time.Duration
	// RebuildBytesPerSecond paces rebuild copies while the node has
	// foreground I/O (0: unpaced); see Engine.paceRebuild.
	RebuildBytesPerSecond uint64
	// OnRebuilt, if set, is called after each finished rebuild (tests,
	// metrics).
	OnRebuilt func(RebuildStats)
	// Local, if set, is this node's replica server: the engine calls the
	// replica on its own node in process instead of over loopback TCP.
	Local *replica.Server
	// Sched, if set, is the node's I/O scheduler: every user I/O of the
	// volume waits for it (QoS limits), rebuild copies as background work.
	Sched *iosched.Scheduler
	// ScrubInterval is how often the engine scrubs the volume (see
	// scrub.go), counted from the end of the last scrub recorded in the
	// store (0: only when asked).
	ScrubInterval time.Duration
	// Maintenance opens an engine for a volume that is not attached, to
	// rebuild its replicas: it claims the volume's current epoch and serves
	// no I/O. An attachment (a higher epoch) fences it.
	Maintenance bool
	// DataKey is the 32-byte data key of an encrypted volume, unwrapped by
	// the caller (replication/crypt); nil for a plain one. An encrypted
	// volume's engine does not open without it, but for Maintenance.
	DataKey []byte

	// wrapConn, if set, wraps every replica connection the engine makes
	// (tests: delays and lost requests on one replica).
	wrapConn func(meta.Replica, replicaConn) replicaConn
	// followWrites, if set, replaces followQueueWrites (tests: overflow).
	followWrites int
	// followWait, if set, replaces followQueueWait (tests).
	followWait time.Duration
}

// member is one replica the engine sends I/O to.
type member struct {
	// id is replica.ID, which never changes for a member: read it, not
	// replica, without e.mu (connect rewrites replica under the write
	// lock).
	id      string
	replica meta.Replica
	client  replicaConn
	local   bool
	// size is the replica's size as last seen (at OPEN, after a grow):
	// one smaller than the volume is grown before it serves (expand.go).
	// Written under e.mu held for writing, or held for reading together
	// with e.growMu.
	size uint64
}

func (m *member) healthy() bool { return m.replica.State == meta.ReplicaHealthy }

// inProcess says whether the member's replica is reached in process (the
// node's own replica server, Config.Local), not over a connection.
func (m *member) inProcess() bool {
	_, ok := m.client.(localReplica)
	return ok
}

// Engine serves one attached volume.
type Engine struct {
	cfg Config
	log *zap.Logger
	// workers send the fan-out's requests to the members behind a
	// connection (internal/workers).
	workers *workers.Pool

	// mu guards the replica set and the epoch. I/O runs under the read
	// lock; changing the set (ejection, claim, clean point) takes the write
	// lock, so no I/O with an old epoch is in flight while replicas are
	// claimed with a new one. A write takes its range in locks before mu,
	// never the other way round.
	mu      sync.RWMutex
	epoch   uint64
	members []*member
	// size is the volume's size as I/O sees it: set by the first
	// reconfigure, raised only once every member has grown to it
	// (expand.go). Read without the lock.
	size       atomic.Uint64
	growMu     sync.Mutex // one grow at a time (expand.go)
	extentSize uint64
	quorum     int
	fenced     bool
	closed     bool
	dirty      atomic.Bool // writes since the last clean point
	generation uint64      // clean point counter
	rebuilding atomic.Bool // a rebuild runs
	// paceMu guards paceNext, the time by which the rebuild copies so far
	// are due at RebuildBytesPerSecond (paceRebuild).
	paceMu   sync.Mutex
	paceNext time.Time
	// snapDeletes counts the DeleteSnapshot calls running: a rebuild does
	// not end while one runs (it goes to the healthy replicas only, not to
	// the target; rebuild_chain.go).
	snapDeletes atomic.Int32
	checksums   atomic.Bool // the volume keeps block checksums (set by reconfigure)
	// restoredFrom is the snapshot the volume was restored from (set by
	// reconfigure): a rebuild carries the layers up to it flattened to a
	// replica that has none of them (rebuild_chain.go).
	restoredFrom atomic.Pointer[string]
	scrubbing    atomic.Bool // a scrub runs
	// lastScrub is the final record of the last scrub this engine ran to
	// its end (scrub.go: a stale view of the store must not run it again).
	lastScrub atomic.Pointer[meta.ScrubProgress]
	// abnormalBlock is 1 + the first lost block of the abnormal condition
	// last recorded in the store (0: none); see markAbnormal.
	abnormalBlock atomic.Uint64
	opened        time.Time   // when Open started: the periodic scrub counts from it at first
	locks         *rangeLocks // orders overlapping writes and rebuild copies
	// seal is set, for an encrypted volume, by the first reconfigure in
	// Open, and read without the lock after (sealed.go).
	seal *sealState
	bg   context.Context // ends at Close

	// unresolved holds the extents of changing operations that ended in an
	// error after they were sent, without their failed replicas being
	// ejected: a cancelled request, a failed ejection, retries run out. The
	// replicas may differ there, and a request of such an operation may
	// still wait in a replica's queue. unresolvedFlush: a flush ended so
	// (some replica may not have made its writes durable). Both are guarded
	// by mu and cleared only by resolve, which fences and makes the
	// replicas identical; until then no write is sent and no clean point
	// clears a dirty bit.
	unresolved      map[uint64]bool
	unresolvedFlush bool
	// ejecting counts writes that saw a replica fail and are on their way
	// to the write lock to eject it.
	ejecting atomic.Int32
	// slow counts, per replica id, the ejections for missing the replica
	// deadline (see deadlineFor). Guarded by mu.
	slow map[string]slowRecord
	// releasing is set (under mu) by Close: the volume may already be
	// detached (an unexport detaches first, then the node closes the
	// engine), and resolve may then take a new epoch of the unattached
	// volume, as a maintenance engine would, to leave identical replicas.
	releasing bool
	// detached: the engine was fenced because its volume has no attachment
	// any more (not because another node took it). See cleanable.
	detached bool

	addrs     map[string]string // node id → replica server address
	stop      context.CancelFunc
	wg        sync.WaitGroup
	closeM    sync.Once
	confirmed atomic.Int64 // unix nanos of the store's last word that the volume is ours
	qos       volspec.QoS  // the limits last given to the scheduler; written under mu held for writing
	// qosSet says the scheduler knows the volume (qos is valid). Every admit
	// (user I/O and rebuild copies) reads it without e.mu, before taking it.
	qosSet     atomic.Bool
	fencedCh   chan struct{} // closed once the engine is fenced
	fencedOnce sync.Once
	// changed wakes watchLoop when the store's watch reports a change of
	// the volume (buffered: one wake-up stands for any number).
	changed chan struct{}

	// Asynchronous replication (follow.go). followers and writeSet (the
	// members that are not followers) are guarded by mu; seq numbers the
	// acknowledged writes; epochNow is epoch, for the senders, which hold
	// no lock; async and eventual are the volume's parameters.
	followers map[string]*follower
	writeSet  []*member
	seq       atomic.Uint64
	enqMu     sync.Mutex // orders enqueue's numbering and appends
	epochNow  atomic.Uint64
	async     atomic.Bool
	eventual  atomic.Bool
	started   atomic.Bool // Open's resync is done: every follower was made equal
	followWG  sync.WaitGroup
	// fctx ends the followers' senders: after Close drained them, not
	// with bg (Close's clean point still needs them).
	fctx  context.Context
	fstop context.CancelFunc
}

// setFenced records that a newer engine owns the volume. Called with e.mu
// held for writing.
func (e *Engine) setFenced() {
	e.fenced = true
	e.fencedOnce.Do(func() { close(e.fencedCh) })
}

// Fenced is closed when the engine learns that a newer engine (a later
// attachment) owns the volume; it then serves no more I/O.
func (e *Engine) Fenced() <-chan struct{} { return e.fencedCh }

// Open starts the engine: it reads the volume's attachment, claims every
// replica with its epoch, and resyncs the dirty extents.
func Open(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.IOTimeout <= 0 {
		cfg.IOTimeout = 10 * time.Second
	}
	if cfg.ReplicaDeadline == 0 {
		cfg.ReplicaDeadline = DefaultReplicaDeadline
	}
	if cfg.CleanInterval <= 0 {
		cfg.CleanInterval = 10 * time.Second
	}
	if cfg.WatchInterval <= 0 {
		cfg.WatchInterval = 1500 * time.Millisecond
	}
	if cfg.Lease <= 0 {
		cfg.Lease = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	e := &Engine{cfg: cfg, opened: time.Now(), workers: workers.New(workerIdle), locks: &rangeLocks{}, unresolved: map[uint64]bool{}, slow: map[string]slowRecord{}, fencedCh: make(chan struct{}), changed: make(chan struct{}, 1), log: cfg.Logger.Named("engine").With(zap.String("volume_id", cfg.VolumeID), zap.String("node_id", cfg.NodeID))}
	// The contexts exist before the first reconfigure: it may start the
	// followers' senders.
	bg, cancel := context.WithCancel(context.Background())
	e.bg, e.stop = bg, cancel
	e.fctx, e.fstop = context.WithCancel(context.Background())
	e.mu.Lock()
	err := e.reconfigure(ctx)
	if err == nil {
		err = e.resync(ctx)
	}
	if err == nil {
		// The resync made every member equal, followers included: from
		// now on a follower may be read and made healthy (follow.go; one
		// made later is made equal when it becomes one).
		e.started.Store(true)
	}
	e.mu.Unlock()
	if err != nil {
		e.stopFollowers()
		cancel()
		e.closeMembers()
		e.workers.Close()
		return nil, err
	}
	e.wg.Add(4)
	go func() { defer e.wg.Done(); e.cleanLoop(bg) }()
	go func() { defer e.wg.Done(); e.watchLoop(bg) }()
	go func() { defer e.wg.Done(); e.followStore(bg) }()
	go func() { defer e.wg.Done(); e.lagLoop(bg) }()
	e.mu.Lock()
	// Logged under the lock: the rebuild started here may reconfigure at once.
	e.log.Info("engine started", zap.Uint64("epoch", e.epoch), zap.Int("replicas", len(e.members)))
	e.maybeRebuild()
	e.mu.Unlock()
	return e, nil
}

// Size is the volume's size in bytes. It grows when the volume is
// expanded (Expand, and the watch loop); a frontend reads it again to see
// the new size.
func (e *Engine) Size() uint64 {
	if e.seal != nil {
		return crypt.LogicalSize(e.size.Load())
	}
	return e.size.Load()
}

// Epoch is the epoch the engine writes with.
func (e *Engine) Epoch() uint64 {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.epoch
}

// reconfigure reads the volume, checks the attachment, and connects to and
// claims every healthy and rebuilding replica with the volume's epoch. A
// healthy replica that cannot be claimed is ejected (new epoch) and the
// whole claim starts again. Called with e.mu held for writing.
func (e *Engine) reconfigure(ctx context.Context) error {
	for attempt := 0; ; attempt++ {
		if attempt > 2*meta.MaxReplicas+2 {
			return fmt.Errorf("volume %s: replica set keeps changing: %w", e.cfg.VolumeID, ErrIO)
		}
		// Linearizable (the leader answers after confirming it leads): the
		// epoch claimed below and the attachment checked here must be the
		// store's latest, not a lagging member's.
		v, err := e.cfg.Meta.Volume(ctx, e.cfg.VolumeID)
		if err != nil {
			return fmt.Errorf("read volume %s: %w", e.cfg.VolumeID, err)
		}
		unattachedOK := e.cfg.Maintenance || e.releasing && v.Attachment == nil
		switch {
		case e.cfg.Maintenance && v.Attachment != nil:
			e.setFenced()
			return fmt.Errorf("volume %s is attached to %s; its engine rebuilds: %w", v.ID, v.Attachment.Node, ErrFenced)
		case !unattachedOK && (v.Attachment == nil || v.Attachment.Node != e.cfg.NodeID):
			e.detached = v.Attachment == nil
			e.setFenced()
			return fmt.Errorf("volume %s is attached to %v, not %s: %w", v.ID, v.Attachment, e.cfg.NodeID, ErrNotAttached)
		}
		e.confirmed.Store(time.Now().UnixNano())
		if e.epoch == 0 && e.seal == nil {
			// Opening: before anything is claimed, so that an encrypted
			// volume opened without its key changes nothing.
			if err := e.openSeal(ctx, v.Encrypted()); err != nil {
				return err
			}
		}
		if e.epoch != 0 && v.Epoch < e.epoch {
			return fmt.Errorf("volume %s: store says epoch %d, engine has %d: %w", v.ID, v.Epoch, e.epoch, ErrIO)
		}
		if err := e.connect(ctx, v); err != nil {
			return err
		}
		e.epoch, e.quorum = v.Epoch, v.WriteQuorum
		e.epochNow.Store(v.Epoch)
		if s, err := v.Spec(); err == nil {
			e.async.Store(s.Async())
			e.eventual.Store(s.ConsistencyLevel == volspec.ConsistencyEventual)
		}
		e.checksums.Store(v.Checksummed())
		e.restoredFrom.Store(&v.RestoredFrom)
		failed, err := e.claimAll(ctx)
		if err != nil {
			return err
		}
		if failed == nil {
			// A replica that missed an expansion (its node was down, or
			// the engine that grew the others died first) is grown now,
			// before any I/O: replicas that disagree on the size never
			// serve together (expand.go).
			failed, err = e.growMembers(ctx, v.ReplicaBytes())
			if errors.Is(err, ErrFenced) {
				e.setFenced()
			}
			if err != nil {
				return err
			}
		}
		if failed == nil {
			if old, size := e.size.Load(), v.ReplicaBytes(); size > old {
				// Every member has this size now. I/O, the rebuilder and
				// the frontends read the size without the lock.
				e.size.Store(size)
				if old != 0 {
					metricExpansions.Inc()
					e.log.Info("volume grown", zap.Uint64("previous_size", old), zap.Uint64("size", size), zap.Uint64("epoch", v.Epoch))
				}
			}
			if changed, err := e.arrangeFollowers(ctx, v); err != nil {
				return err
			} else if changed {
				continue // claim the set with the followers' new epoch
			}
			e.applyQoS(v)
			if n := e.healthyCount(); n < e.quorum {
				e.log.Warn("fewer healthy replicas than the write quorum", zap.Int("healthy", n), zap.Int("write_quorum", e.quorum))
			}
			return nil
		}
		if err := e.eject(ctx, failed, "claim failed"); err != nil {
			return err
		}
	}
}

// connect makes e.members match the volume's healthy and rebuilding
// replicas, reusing open connections. New connections are dialled in
// parallel; once the write quorum of healthy replicas is connected, a
// replica whose server has said nothing within its replica deadline more is
// left without a connection (its claim then fails and ejects it), so an
// attach or a takeover does not wait IOTimeout for a frozen or cut-off
// node. A server that answers, even "no such replica yet", is waited for.
func (e *Engine) connect(ctx context.Context, v *meta.Volume) error {
	old := map[string]*member{}
	for _, m := range e.members {
		old[m.replica.ID] = m
	}
	type dialing struct {
		m        *member
		answered atomic.Bool // the server said something
		done     chan struct{}
		cancel   context.CancelFunc
	}
	var members []*member
	var dials []*dialing
	finished := make(chan struct{}, len(v.Replicas)) // one token per ended dial
	connected := 0                                   // healthy members with a connection
	var quorumAt time.Time                           // when connected reached the quorum
	for _, r := range v.Replicas {
		if r.State != meta.ReplicaHealthy && r.State != meta.ReplicaRebuilding && r.State != meta.ReplicaFollowing {
			continue
		}
		if m, ok := old[r.ID]; ok {
			m.replica = r
			members = append(members, m)
			delete(old, r.ID)
			if m.client != nil && m.healthy() {
				connected++
			}
			continue
		}
		m := &member{id: r.ID, replica: r, local: r.Node == e.cfg.NodeID}
		members = append(members, m)
		addr, err := e.replicaAddr(ctx, r.Node)
		if err != nil {
			e.log.Warn("cannot reach replica", zap.String("replica_id", r.ID), zap.String("node", r.Node), zap.Error(err))
			continue
		}
		dctx, cancel := context.WithCancel(ctx)
		d := &dialing{m: m, done: make(chan struct{}), cancel: cancel}
		dials = append(dials, d)
		go func() {
			defer func() { finished <- struct{}{} }()
			defer close(d.done)
			c, size, err := e.dial(dctx, addr, r, &d.answered)
			if err != nil {
				// Keep it without a connection: the claim fails and ejects it.
				e.log.Warn("cannot reach replica", zap.String("replica_id", r.ID), zap.String("node", r.Node), zap.Error(err))
				return
			}
			m.client, m.size = c, size
		}()
	}
	// Take the dials as they end. The deadline counts only once the
	// quorum is connected, and a server may answer at any time: look again
	// every few milliseconds while some are silent.
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for open := len(dials); open > 0; {
		select {
		case <-finished:
		case <-tick.C:
		}
		for i, d := range dials {
			if d == nil {
				continue
			}
			select {
			case <-d.done:
				if d.m.client != nil && d.m.healthy() {
					connected++
				}
				d.cancel()
				dials[i], open = nil, open-1
				continue
			default:
			}
			if connected < v.WriteQuorum || v.WriteQuorum <= 0 || d.answered.Load() {
				continue
			}
			if quorumAt.IsZero() {
				quorumAt = time.Now()
			}
			// A rebuilding replica counts for no quorum, and the volume
			// waits for this (under the engine's write lock): a server
			// that is up answers a dial within milliseconds, so it gets a
			// quarter of the deadline. One that misses it is ejected, and
			// the leader restarts its rebuild later (with a backoff).
			wait := e.deadlineFor(d.m)
			if !d.m.healthy() {
				wait /= 4
			}
			if time.Since(quorumAt) < wait {
				continue
			}
			d.cancel() // a silent server: the dial ends soon
			e.log.Warn("replica server silent past the deadline; not waiting for it", zap.String("replica_id", d.m.replica.ID),
				zap.String("node", d.m.replica.Node), zap.Duration("deadline", e.deadlineFor(d.m)))
			abandoned := d.m
			go func() {
				<-d.done
				if abandoned.client != nil {
					abandoned.client.Close()
				}
			}()
			for j, m := range members {
				if m == abandoned {
					members[j] = &member{id: abandoned.id, replica: abandoned.replica, local: abandoned.local}
				}
			}
			dials[i], open = nil, open-1
		}
	}
	for _, m := range old {
		if m.client != nil {
			m.client.Close()
		}
	}
	e.members = members
	e.syncFollowers()
	return nil
}

// dial connects to replica r on the replica server at addr. A healthy
// replica that its node does not hold yet is waited for, up to IOTimeout:
// nodes create the replicas placed on them when their copy of the store
// shows the new volume, and an engine attached right after CreateVolume can
// look for them first. Ejecting them would leave a brand-new volume degraded,
// or below its write quorum so that every write fails. A replica whose
// generation the store has recorded is not waited for: it existed, and its
// node has lost it.
//
// answered is set once the replica server has answered anything. The
// replica may have any size: one smaller than the volume missed an
// expansion and is grown after the claim (growMembers); the size it had
// when opened is returned.
func (e *Engine) dial(ctx context.Context, addr string, r meta.Replica, answered *atomic.Bool) (replicaConn, uint64, error) {
	dctx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
	defer cancel()
	for {
		var c replicaConn
		var size uint64
		var err error
		if e.cfg.Local != nil && r.Node == e.cfg.NodeID {
			var rr *replica.Replica
			if rr, err = e.cfg.Local.Get(r.ID); err == nil {
				c, size = localReplica{rr, e.cfg.Local}, rr.Size()
			}
		} else {
			var rc *replica.Client
			if rc, err = replica.Dial(dctx, addr, r.ID, 0, replica.WithTLS(e.cfg.TLS)); err == nil {
				c, size = rc, rc.Opened().Size
			}
		}
		if err == nil || errors.Is(err, replica.ErrNotFound) {
			answered.Store(true)
		}
		if err == nil {
			if e.cfg.wrapConn != nil {
				c = e.cfg.wrapConn(r, c)
			}
			return c, size, nil
		}
		// A replica whose generation the store recorded existed once: its
		// node has lost it, and waiting will not bring it back.
		if r.State != meta.ReplicaHealthy || !errors.Is(err, replica.ErrNotFound) || r.Generation != "" {
			return nil, 0, err // a nil interface, not a nil *replica.Client
		}
		select {
		case <-dctx.Done():
			return nil, 0, err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// replicaAddr finds a node's replica server address in the store.
func (e *Engine) replicaAddr(ctx context.Context, node string) (string, error) {
	if a, ok := e.addrs[node]; ok {
		return a, nil
	}
	// The nodes alone (a status answer), not the whole state with every
	// volume; a stale answer is fine: a wrong address fails the dial.
	st, err := e.cfg.Meta.Status(ctx)
	if err != nil {
		return "", err
	}
	e.addrs = map[string]string{}
	for _, n := range st.Nodes {
		if n.DataAddr != "" {
			e.addrs[n.ID] = n.DataAddr
		}
	}
	if a, ok := e.addrs[node]; ok {
		return a, nil
	}
	return "", fmt.Errorf("node %s has no replica server address", node)
}

// claimAll claims every member with e.epoch and returns the members that
// failed. A replica that answers ErrFenced holds a newer epoch: this engine
// is fenced.
func (e *Engine) claimAll(ctx context.Context) ([]*member, error) {
	errs := e.fanOut(ctx, e.members, func(ctx context.Context, m *member) error {
		return m.client.Claim(ctx, e.epoch)
	})
	var failed []*member
	for i, err := range errs {
		if err == nil {
			continue
		}
		if errors.Is(err, replica.ErrFenced) {
			e.setFenced()
			return nil, fmt.Errorf("claim %s with epoch %d: %w", e.members[i].replica.ID, e.epoch, ErrFenced)
		}
		e.log.Warn("claim failed", zap.String("replica_id", e.members[i].replica.ID), zap.Uint64("epoch", e.epoch), zap.Error(err))
		failed = append(failed, e.members[i])
	}
	return e.checkIdentities(ctx, failed) // identity.go: a claimed copy must be the one the store trusts
}

// DefaultReplicaDeadline is Config.ReplicaDeadline's default.
const DefaultReplicaDeadline = time.Second

// errStraggler is a member's error when it had not answered by its
// replica deadline while the write quorum had.
var errStraggler = errors.New("no answer within the replica deadline while the write quorum answered")

// slowRecord remembers a replica's ejections for missing the deadline.
type slowRecord struct {
	count int
	last  time.Time
}

// slowMemory is how long an ejection for slowness raises the replica's
// deadline: after this long without another, it starts again from the base.
const slowMemory = 30 * time.Minute

// deadlineFor is how long member m may stay silent once the quorum has
// answered: the base deadline, doubled for each recent ejection of the same
// replica for slowness, at most IOTimeout. A replica that is slow but alive
// (a disk with long latency) is ejected once, rebuilt, and then waited for
// longer instead of being ejected and rebuilt in a loop. Called with e.mu
// held.
func (e *Engine) deadlineFor(m *member) time.Duration {
	d := e.cfg.ReplicaDeadline
	if d < 0 {
		return e.cfg.IOTimeout
	}
	if r, ok := e.slow[m.replica.ID]; ok && time.Since(r.last) < slowMemory {
		for range r.count {
			if d *= 2; d >= e.cfg.IOTimeout {
				return e.cfg.IOTimeout
			}
		}
	}
	return min(d, e.cfg.IOTimeout)
}

// noteSlow records that m is being ejected for missing its deadline.
// Called with e.mu held for writing.
func (e *Engine) noteSlow(m *member) {
	r := e.slow[m.replica.ID]
	if time.Since(r.last) >= slowMemory {
		r.count = 0
	}
	r.count++
	r.last = time.Now()
	e.slow[m.replica.ID] = r
	e.log.Warn("replica missed its deadline while the write quorum answered", zap.String("replica_id", m.replica.ID),
		zap.String("node", m.replica.Node), zap.Int("times", r.count), zap.Duration("next_deadline", e.deadlineFor(m)))
}

// fanOut runs op on every member in parallel, all bounded by one
// IOTimeout; a member without a connection fails at once. Once the healthy
// members that succeeded reach the write quorum, the others get their
// replica deadline more and then fail with errStraggler (their requests
// are cancelled). The deadline counts from the quorum's answer, not from
// the start: an operation that is slow everywhere (a flush after a large
// write) does not cut the last replica the moment the quorum is in.
// Called with e.mu held.
//
// This is the hot path of every write: the calling goroutine does the op
// of the replica served in process itself when there is one (a pwrite, no
// network wait), and only the others get goroutines, started first so that
// the network round trips overlap the local write.
func (e *Engine) fanOut(ctx context.Context, ms []*member, op func(context.Context, *member) error) []error {
	return e.fanOutWith(ctx, ms, op, true)
}

// workerIdle is how long a fan-out worker waits for the next request
// before it ends.
const workerIdle = 10 * time.Second

// fanOutWith is fanOut; with patient false the members still silent when
// the quorum has answered are cut at once (an operation that only helps,
// such as a clean point's early flush, must not hold the engine's lock for
// a replica that may be gone).
func (e *Engine) fanOutWith(ctx context.Context, ms []*member, op func(context.Context, *member) error, patient bool) []error {
	errs := make([]error, len(ms))
	if len(ms) == 0 {
		return errs
	}
	octx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
	defer cancel()
	// Only a member served in process runs on this goroutine: one behind
	// a connection could not be cut at its deadline there.
	inline := -1
	for i, m := range ms {
		if m.inProcess() {
			inline = i
			break
		}
	}
	type answer struct {
		i   int
		err error
	}
	answers := make(chan answer, len(ms))
	cancels := make([]context.CancelFunc, len(ms))
	for i, m := range ms {
		if i == inline {
			continue
		}
		mctx, mcancel := context.WithCancel(octx)
		cancels[i] = mcancel
		e.workers.Go(func() { answers <- answer{i, one(mctx, m, op)} })
	}
	answered := make([]bool, len(ms))
	ok := 0 // healthy members that succeeded
	pending := len(ms)
	if inline >= 0 {
		errs[inline] = one(octx, ms[inline], op)
		answered[inline] = true
		pending--
		if errs[inline] == nil && ms[inline].healthy() {
			ok++
		}
	}
	var timer *time.Timer
	var quorumAt time.Time
	for pending > 0 {
		var expired <-chan time.Time
		if ok >= e.quorum && e.quorum > 0 {
			if quorumAt.IsZero() {
				quorumAt = time.Now()
			}
			// Wait for the most lenient of the silent members.
			var wait time.Duration
			for i, m := range ms {
				if !answered[i] && patient {
					wait = max(wait, e.deadlineFor(m)-time.Since(quorumAt))
				}
			}
			if wait <= 0 {
				break
			}
			if timer == nil {
				timer = time.NewTimer(wait)
				defer timer.Stop()
			} else {
				timer.Reset(wait)
			}
			expired = timer.C
		}
		select {
		case a := <-answers:
			errs[a.i], answered[a.i] = a.err, true
			cancels[a.i]()
			pending--
			if a.err == nil && ms[a.i].healthy() {
				ok++
			}
			continue
		case <-expired:
		}
		break
	}
	for i := range ms {
		if !answered[i] {
			errs[i] = fmt.Errorf("replica %s on %s: %w", ms[i].replica.ID, ms[i].replica.Node, errStraggler)
			cancels[i]() // its goroutine answers into the buffer and ends
		}
	}
	return errs
}

func one(ctx context.Context, m *member, op func(context.Context, *member) error) error {
	if m.client == nil {
		return errors.New("no connection")
	}
	return op(ctx, m)
}

func (e *Engine) healthyCount() int {
	n := 0
	for _, m := range e.members {
		if m.healthy() {
			n++
		}
	}
	return n
}

// eject marks failed replicas failed in the store (compare-and-set on the
// epoch), then reclaims the remaining replicas with the new epoch. Called
// with e.mu held for writing. Only after it returns nil may a write that
// failed on these replicas be acknowledged.
//
// causes, when given, holds each failed replica's error, in the order of
// failed, for the log line that says it was ejected: "write failed" alone
// does not tell a timeout from a refusal or a lost connection.
func (e *Engine) eject(ctx context.Context, failed []*member, why string, causes ...error) error {
	for i, m := range failed {
		res, err := e.cfg.Meta.Apply(ctx, &meta.SetReplicaState{
			VolumeID: e.cfg.VolumeID, ReplicaID: m.replica.ID, State: meta.ReplicaFailed, ExpectEpoch: e.epoch,
		})
		switch {
		case err == nil:
			fields := []zap.Field{zap.String("replica_id", m.replica.ID), zap.String("node", m.replica.Node),
				zap.String("reason", why), zap.Uint64("epoch", res.Volume.Epoch)}
			if len(causes) == len(failed) {
				fields = append(fields, zap.NamedError("cause", causes[i]))
			}
			e.log.Warn("replica ejected", fields...)
		case errors.Is(err, meta.ErrEpochMismatch), errors.Is(err, meta.ErrIllegalTransition), errors.Is(err, meta.ErrNotFound):
			// The set moved under us (another ejection, a takeover, or the
			// replica is already failed): reconfigure from the store.
		default:
			return fmt.Errorf("eject replica %s (%s): %v: %w", m.replica.ID, why, err, ErrIO)
		}
	}
	return e.reconfigure(ctx)
}

// checkQuorum says whether writes may be acknowledged.
func (e *Engine) checkQuorum() error {
	if n := e.healthyCount(); n < e.quorum {
		return fmt.Errorf("volume %s has %d healthy replicas, write quorum is %d: %w", e.cfg.VolumeID, n, e.quorum, ErrIO)
	}
	return nil
}

// cleanable reports why no clean point may be declared (and no unresolved
// write resolved), or nil: as usable, except that an engine being closed
// after its volume was detached may still leave its replicas identical and
// clean. Nobody else writes the volume until an attach, whose engine claims
// a newer epoch: its replicas then refuse this engine. Called with e.mu held.
func (e *Engine) cleanable() error {
	if e.fenced && e.detached && e.releasing && !e.closed {
		return nil
	}
	return e.usable()
}

// usable reports why no I/O may be done, or nil. Called with e.mu held.
func (e *Engine) usable() error {
	switch {
	case e.closed:
		return ErrClosed
	case e.fenced:
		return fmt.Errorf("volume %s: %w", e.cfg.VolumeID, ErrFenced)
	}
	return nil
}

// mutate sends one changing operation (write, trim, zeroes, flush) to every
// member, ejects the healthy ones that failed, and returns nil only when
// every healthy replica of the committed set has done it.
//
// It holds the range [off, off+n) (none for a flush, n = 0) from before the
// operation is sent until it returns, so that overlapping operations reach
// every replica in the same order (see rangeLocks). An operation that fails
// after it was sent, and whose failed replicas could not be ejected, is
// marked unresolved before its range is released: the next changing
// operation first resolves it (see resolve).
func (e *Engine) mutate(ctx context.Context, what string, off, n uint64, op func(context.Context, *member, uint64) error) (err error) {
	var spans []span
	if n > 0 {
		spans = []span{{off, off + n}}
	}
	return e.mutateSpans(ctx, what, spans, op)
}

// mutateSpans is mutate of an operation that changes several ranges at
// once (a write pair: an encrypted volume's blocks and their entries). It
// holds them all as one hold; none is a flush.
func (e *Engine) mutateSpans(ctx context.Context, what string, spans []span, op func(context.Context, *member, uint64) error) (err error) {
	if len(spans) > 0 && e.async.Load() {
		e.awaitFollowers(ctx, spans) // before any lock: follow.go
	}
	if len(spans) > 0 {
		unlock, err := e.locks.lockSpans(ctx, spans)
		if err != nil {
			return err
		}
		defer unlock()
	}
	sent := false
	defer func() {
		if err != nil && sent {
			if len(spans) == 0 {
				e.markUnresolved(what, 0, 0, err)
			}
			for _, s := range spans {
				e.markUnresolved(what, s.off, s.end-s.off, err)
			}
		}
	}()
	for attempt := 0; ; attempt++ {
		if err := e.checkLease(ctx); err != nil {
			return err
		}
		e.mu.RLock()
		if err := e.usable(); err != nil {
			e.mu.RUnlock()
			return err
		}
		if e.unresolvedFlush || len(e.unresolved) > 0 {
			e.mu.RUnlock()
			e.mu.Lock()
			err := e.resolve(ctx)
			e.mu.Unlock()
			if err != nil {
				return err
			}
			continue
		}
		if err := e.checkQuorum(); err != nil {
			e.mu.RUnlock()
			return err
		}
		// connect replaces e.members with a new slice and never changes
		// one in place, so ms stays valid after the lock is released.
		epoch, ms := e.epoch, e.writers()
		sent = true
		errs := e.fanOut(ctx, ms, func(ctx context.Context, m *member) error { return op(ctx, m, epoch) })
		e.dirty.Store(true)
		if len(spans) > 0 {
			e.repairWrites(ctx, ms, errs, spans)
		}
		failing := slices.ContainsFunc(errs, func(err error) bool { return err != nil })
		if !failing {
			// Under the same read lock and range hold (follow.go).
			e.enqueue(spans, op)
		}
		if failing {
			// Announced before the read lock goes, so that a clean point
			// that gets the write lock first steps aside (cleanPointLocked).
			e.ejecting.Add(1)
		}
		e.mu.RUnlock()
		if failing {
			defer e.ejecting.Add(-1)
		}

		// The engine may have been frozen while the requests were out: do
		// not acknowledge on an expired lease without asking the store.
		if err := e.checkLease(ctx); err != nil {
			return err
		}
		var failed, slow []*member
		var causes []error
		fencedBy := false
		for i, err := range errs {
			if err == nil {
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, replica.ErrFenced) {
				fencedBy = true
			}
			if errors.Is(err, errStraggler) {
				slow = append(slow, ms[i])
			}
			failed = append(failed, ms[i])
			causes = append(causes, err)
		}
		if failed == nil {
			return nil
		}
		if attempt >= 3 {
			return fmt.Errorf("%s keeps failing: %v: %w", what, errs, ErrIO)
		}
		e.mu.Lock()
		var err error
		switch {
		case e.epoch != epoch:
			// Another caller already changed the set; retry with it.
		case fencedBy:
			// A replica holds a newer epoch than ours: a newer engine took
			// over (or the store moved on). Check with the store.
			err = e.reconfigure(ctx)
		default:
			for _, m := range slow {
				e.noteSlow(m)
			}
			err = e.eject(ctx, failed, what+" failed", causes...)
		}
		e.mu.Unlock()
		if err != nil {
			return err
		}
		// Retry: the replicas still in the set get the operation again
		// (writes are idempotent), with the new epoch.
	}
}

// markUnresolved records that an operation on [off, off+n) (a flush when n
// is 0) ended in err after it was sent: its replicas may differ.
func (e *Engine) markUnresolved(what string, off, n uint64, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if n == 0 || e.extentSize == 0 {
		e.unresolvedFlush = true // every dirty extent
	} else {
		first, last := off/e.extentSize, (off+n-1)/e.extentSize
		for x := first; x <= last; x++ {
			e.unresolved[x] = true
		}
	}
	e.log.Warn("operation failed after it was sent; the replicas are resolved before the next write",
		zap.String("op", what), zap.Uint64("offset", off), zap.Uint64("length", n), zap.Uint64("epoch", e.epoch), zap.Error(err))
}

// resolve makes the replicas identical again after unresolved operations.
// Called with e.mu held for writing, so nothing else is in flight.
//
//  1. A new epoch from the store (AdvanceEpoch), and every member claimed
//     with it (reconfigure): a claim waits for the replica's operations in
//     progress, and a request of the abandoned operation that arrives later
//     carries the old epoch and is refused. A member that cannot be claimed
//     is ejected, so it is fenced by the store instead.
//  2. The unresolved extents (after a failed flush, every dirty extent)
//     copied from one healthy member to every member whose checksum
//     differs, then flushed everywhere.
//
// Either content is right: the operation was never acknowledged. Until
// resolve succeeds writes fail and clean points clear nothing.
func (e *Engine) resolve(ctx context.Context) error {
	if !e.unresolvedFlush && len(e.unresolved) == 0 {
		return nil
	}
	if err := e.cleanable(); err != nil {
		return err
	}
	// The extents copied below must not be overwritten on a follower by
	// an older write still in its queue.
	if err := e.drainFollowers(ctx, "resolving a failed write"); err != nil {
		return fmt.Errorf("volume %s: resolve: %w", e.cfg.VolumeID, err)
	}
	node := e.cfg.NodeID
	if e.cfg.Maintenance {
		node = ""
	}
	_, err := e.cfg.Meta.Apply(ctx, &meta.AdvanceEpoch{VolumeID: e.cfg.VolumeID, NodeID: node, ExpectEpoch: e.epoch})
	if e.releasing && node != "" && errors.Is(err, meta.ErrFailedPrecondition) {
		// Detached while we close: nobody else writes the volume until an
		// attach, which takes a newer epoch than this one and fences us.
		var v *meta.Volume
		if v, err = e.cfg.Meta.Volume(ctx, e.cfg.VolumeID); err == nil {
			_, err = e.cfg.Meta.Apply(ctx, &meta.AdvanceEpoch{VolumeID: e.cfg.VolumeID, ExpectEpoch: v.Epoch})
		}
	}
	switch {
	case err == nil, errors.Is(err, meta.ErrEpochMismatch), errors.Is(err, meta.ErrFailedPrecondition):
		// Moved on, or no longer ours: reconfigure claims the newer epoch
		// (which fences just as well) or finds the engine fenced.
	default:
		return fmt.Errorf("volume %s: new epoch to resolve a failed write: %v: %w", e.cfg.VolumeID, err, ErrIO)
	}
	if err := e.reconfigure(ctx); err != nil {
		return err
	}
	extents := make([]uint64, 0, len(e.unresolved))
	for x := range e.unresolved {
		extents = append(extents, x)
	}
	if e.unresolvedFlush {
		union, err := e.dirtyUnion(ctx)
		if err != nil {
			return err
		}
		for x := range union {
			if !e.unresolved[x] {
				extents = append(extents, x)
			}
		}
	}
	src := e.source()
	if src == nil {
		return fmt.Errorf("volume %s: no healthy replica: %w", e.cfg.VolumeID, ErrIO)
	}
	copied, err := e.syncExtents(ctx, src, extents)
	if err != nil {
		return fmt.Errorf("volume %s: resolve: %v: %w", e.cfg.VolumeID, err, ErrIO)
	}
	if err := e.flushOrEject(ctx, "resolving a failed write"); err != nil {
		return fmt.Errorf("volume %s: resolve: %w", e.cfg.VolumeID, err)
	}
	e.log.Info("failed writes resolved: replicas identical again", zap.Int("extents", len(extents)),
		zap.Uint64("bytes_copied", copied), zap.String("source", src.replica.ID), zap.Uint64("epoch", e.epoch))
	clear(e.unresolved)
	e.unresolvedFlush = false
	return nil
}

// WriteAt writes p at off on every replica; with fua it is durable when it
// returns.
func (e *Engine) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	if err := e.checkUserRange(off, uint64(len(p))); err != nil {
		return err
	}
	done, err := e.admit(ctx, iosched.Write, uint64(len(p)), iosched.Foreground)
	if err != nil {
		return err
	}
	defer done()
	if e.seal != nil {
		return e.sealedWrite(ctx, p, off, fua)
	}
	return e.writePhys(ctx, p, off, fua)
}

// writePhys writes p at off of the replicas.
func (e *Engine) writePhys(ctx context.Context, p []byte, off uint64, fua bool) error {
	if e.async.Load() {
		p = bytes.Clone(p) // the followers' queue keeps it after we return
	}
	if !e.checksums.Load() {
		return e.mutate(ctx, "write", off, uint64(len(p)), func(ctx context.Context, m *member, epoch uint64) error {
			return m.client.WriteAt(ctx, epoch, p, off, fua)
		})
	}
	// One set of piece checksums over the bytes every replica is sent.
	pieces := replica.PieceSums(make([]uint32, 0, replica.SumPieces(off, uint64(len(p)))), p, off)
	return e.mutate(ctx, "write", off, uint64(len(p)), func(ctx context.Context, m *member, epoch uint64) error {
		return m.client.WriteAtSums(ctx, epoch, p, off, fua, pieces)
	})
}

// Trim discards a range (punches holes on every replica).
func (e *Engine) Trim(ctx context.Context, off, length uint64) error {
	if err := e.checkUserRange(off, length); err != nil {
		return err
	}
	done, err := e.admit(ctx, iosched.Discard, 0, iosched.Foreground)
	if err != nil {
		return err
	}
	defer done()
	if e.seal != nil {
		return e.sealedDiscard(ctx, off, length, false)
	}
	return e.trimPhys(ctx, off, length)
}

// trimPhys punches [off, off+length) of the replicas.
func (e *Engine) trimPhys(ctx context.Context, off, length uint64) error {
	return e.mutate(ctx, "trim", off, length, func(ctx context.Context, m *member, epoch uint64) error {
		return m.client.Trim(ctx, epoch, off, length)
	})
}

// WriteZeroes zeroes a range on every replica.
func (e *Engine) WriteZeroes(ctx context.Context, off, length uint64, fua bool) error {
	if err := e.checkUserRange(off, length); err != nil {
		return err
	}
	done, err := e.admit(ctx, iosched.Discard, 0, iosched.Foreground)
	if err != nil {
		return err
	}
	if e.seal != nil {
		err = e.sealedDiscard(ctx, off, length, true)
	} else {
		err = e.zeroPhys(ctx, off, length)
	}
	done()
	if err == nil && fua {
		err = e.Flush(ctx)
	}
	return err
}

// zeroPhys zeroes [off, off+length) of the replicas.
func (e *Engine) zeroPhys(ctx context.Context, off, length uint64) error {
	return e.mutate(ctx, "write-zeroes", off, length, func(ctx context.Context, m *member, epoch uint64) error {
		return m.client.WriteZeroes(ctx, epoch, off, length)
	})
}

// Flush makes every acknowledged write durable on every healthy replica.
func (e *Engine) Flush(ctx context.Context) error {
	done, err := e.admit(ctx, iosched.Flush, 0, iosched.Foreground)
	if err != nil {
		return err
	}
	defer done()
	return e.mutate(ctx, "flush", 0, 0, func(ctx context.Context, m *member, epoch uint64) error {
		return m.client.Flush(ctx, epoch)
	})
}

// ReadAt reads from a healthy replica, the local one first; a replica that
// fails a read is ejected and another one answers.
//
// The read runs without the engine's lock: a remote source that stopped
// answering must not hold up the write that ejects it (and, behind that
// write's wait for the write lock, every other I/O). A read that was in
// flight while a write was acknowledged may return the data from before
// it, as any read concurrent with a write may. A remote source that is
// silent for its replica deadline while another healthy replica could
// answer is passed over, not ejected: a write ejects it if it is gone.
func (e *Engine) ReadAt(ctx context.Context, p []byte, off uint64) error {
	if err := e.checkUserRange(off, uint64(len(p))); err != nil {
		return err
	}
	done, err := e.admit(ctx, iosched.Read, uint64(len(p)), iosched.Foreground)
	if err != nil {
		return err
	}
	defer done()
	if e.seal != nil {
		return e.sealedRead(ctx, p, off)
	}
	return e.readPhys(ctx, p, off)
}

// readPhys reads p at off of the replicas (ReadAt).
func (e *Engine) readPhys(ctx context.Context, p []byte, off uint64) error {
	return e.readPhysFrom(ctx, p, off, false)
}

// readPhysFrom is readPhys; authenticated says the caller authenticates
// the bytes itself (an encrypted volume's ciphertext), so a replica served
// in process skips its sums (replica.ReadAtAuthenticated).
func (e *Engine) readPhysFrom(ctx context.Context, p []byte, off uint64, authenticated bool) error {
	passed := map[string]bool{} // replica ids passed over as silent
	patient := false            // every source was passed over once: wait IOTimeout now
	for attempt := 0; attempt < 3*meta.MaxReplicas; attempt++ {
		if err := e.checkLease(ctx); err != nil {
			return err
		}
		e.mu.RLock()
		if err := e.usable(); err != nil {
			e.mu.RUnlock()
			return err
		}
		epoch := e.epoch
		// One source per attempt: the local replica when healthy (no
		// network), else the first healthy one not passed over. A failed
		// source is ejected below and the next attempt picks another.
		var src *member
		others := -1 // candidates besides src
		eventual := e.eventual.Load()
		for _, m := range e.members {
			// consistencyLevel eventual: the node's own follower may
			// answer, though it may lack the latest writes.
			ok := m.healthy() || eventual && m.local && m.following() && m.client != nil && e.followerHas(m, off, uint64(len(p)))
			if ok && !passed[m.replica.ID] {
				others++
				if src == nil || m.local && !src.local {
					src = m
				}
			}
		}
		timeout := e.cfg.IOTimeout
		if src != nil && others > 0 && !patient {
			timeout = e.deadlineFor(src)
		}
		e.mu.RUnlock()
		if src == nil && len(passed) > 0 {
			// Every healthy replica was slow, none silent for good (a
			// loaded machine): ask again, waiting IOTimeout this time.
			clear(passed)
			patient = true
			continue
		}
		if src == nil {
			return fmt.Errorf("volume %s: no healthy replica to read from: %w", e.cfg.VolumeID, ErrIO)
		}
		var err error
		if l, ok := src.client.(localReplica); ok && authenticated {
			err = l.readAuthenticated(ctx, epoch, p, off)
		} else {
			err = e.readWithin(ctx, src, epoch, p, off, timeout)
		}
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, replica.ErrChecksum) {
			// The replica answered: it is not ejected, its blocks are
			// repaired from a copy that verifies (readChecked).
			return e.readChecked(ctx, p, off)
		}
		if errors.Is(err, context.DeadlineExceeded) && !patient && (others > 0 || len(passed) > 0) {
			e.log.Warn("read source silent past its deadline; reading another replica", zap.String("replica_id", src.id),
				zap.Duration("deadline", timeout), zap.Uint64("epoch", epoch))
			passed[src.id] = true
			continue
		}
		e.mu.Lock()
		if e.epoch == epoch {
			if errors.Is(err, replica.ErrFenced) {
				err = e.reconfigure(ctx)
			} else {
				err = e.eject(ctx, []*member{src}, "read failed: "+err.Error())
			}
		} else {
			err = nil // the set moved meanwhile: try again with it
		}
		e.mu.Unlock()
		if err != nil {
			return err
		}
	}
	return fmt.Errorf("volume %s: reads keep failing: %w", e.cfg.VolumeID, ErrIO)
}

// checkUserRange checks a range of the volume as users see it (Size).
func (e *Engine) checkUserRange(off, n uint64) error {
	if size := e.Size(); off > size || n > size-off {
		return fmt.Errorf("range %d+%d beyond volume size %d: %w", off, n, size, replica.ErrOutOfRange)
	}
	return nil
}

// checkRange checks a range of the replicas.
func (e *Engine) checkRange(off, n uint64) error {
	if size := e.size.Load(); off > size || n > size-off {
		return fmt.Errorf("range %d+%d beyond volume size %d: %w", off, n, size, replica.ErrOutOfRange)
	}
	return nil
}

// cleanLoop declares clean points while writes come in.
func (e *Engine) cleanLoop(ctx context.Context) {
	t := time.NewTicker(e.cfg.CleanInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := e.CleanPoint(ctx); err != nil && ctx.Err() == nil {
				e.log.Warn("clean point failed", zap.Error(err))
			}
		}
	}
}

// CleanPoint flushes every replica and clears their dirty-extent maps.
//
// The clearing needs the write lock (see cleanPointLocked), and with it
// held no write can proceed. So the bulk of the flushing happens first,
// under the read lock, while writes go on: the flush under the write lock
// then only has to sync what was written in the meantime, and the stall a
// clean point causes shrinks from the whole writeback to that remainder.
// The early flush waits for no replica beyond the write quorum (it only
// helps; holding even the read lock for a silent replica would hold up the
// ejection a write needs), and its errors are left to the flush under the
// write lock, which ejects a replica that fails it.
func (e *Engine) CleanPoint(ctx context.Context) error {
	e.mu.RLock()
	// With unresolved writes, resolve comes first, and it claims every
	// replica before it flushes: a flush to a replica that stopped
	// answering would only time out.
	if e.cleanable() == nil && e.dirty.Load() && !e.unresolvedFlush && len(e.unresolved) == 0 {
		epoch := e.epoch
		e.fanOutWith(ctx, e.members, func(ctx context.Context, m *member) error { return m.client.Flush(ctx, epoch) }, false)
	}
	e.mu.RUnlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cleanPointLocked(ctx)
}

// flushOrEject flushes every member and ejects those that fail the flush
// or stay silent past their deadline while the quorum flushed; it fails if
// the write quorum is not left, or if a replica holds a newer epoch (a
// newer engine: reconfigure finds out). Called with e.mu held for writing:
// leaving a failing replica for the next write to find would make that
// write wait for its deadline again.
func (e *Engine) flushOrEject(ctx context.Context, why string) error {
	epoch := e.epoch
	errs := e.fanOut(ctx, e.members, func(ctx context.Context, m *member) error { return m.client.Flush(ctx, epoch) })
	var failed []*member
	var causes []error
	for i, err := range errs {
		if err == nil {
			continue
		}
		if errors.Is(err, replica.ErrFenced) {
			return fmt.Errorf("flush (%s): %w", why, err)
		}
		if errors.Is(err, errStraggler) {
			e.noteSlow(e.members[i])
		}
		failed = append(failed, e.members[i])
		causes = append(causes, err)
	}
	if failed == nil {
		return nil
	}
	if err := e.eject(ctx, failed, "flush ("+why+") failed", causes...); err != nil {
		return err
	}
	return e.checkQuorum()
}

// cleanPointLocked runs with the write lock held, so that no write lands
// between the flush and the clearing: such a write would be neither durable
// nor marked dirty.
func (e *Engine) cleanPointLocked(ctx context.Context) error {
	if e.cleanable() != nil || !e.dirty.Load() {
		return nil
	}
	if e.ejecting.Load() > 0 {
		// A write is waiting for this lock to eject a replica that failed
		// it: flushing now would wait for that replica's deadline once
		// more, and the write with it. The next clean point will do.
		return nil
	}
	if len(e.followers) > 0 {
		if e.releasing {
			if err := e.drainFollowers(ctx, "closing"); err != nil {
				return fmt.Errorf("clean point: %w", err)
			}
		} else if !e.followersIdle() {
			// A write still queued for a follower is in no dirty map but
			// the healthy members': keep theirs (follow.go).
			return nil
		}
	}
	// An unresolved write may have reached some replicas only: clearing
	// the dirty bits would hide it from every later resync.
	if err := e.resolve(ctx); err != nil {
		return fmt.Errorf("clean point: %w", err)
	}
	if err := e.flushOrEject(ctx, "before a clean point"); err != nil {
		return err
	}
	e.generation++
	errs := e.fanOut(ctx, e.members, func(ctx context.Context, m *member) error {
		return m.client.MarkClean(ctx, e.epoch, e.generation)
	})
	for _, err := range errs {
		if err != nil {
			return fmt.Errorf("mark clean: %w", err)
		}
	}
	e.dirty.Store(false)
	return nil
}

// resync makes the healthy replicas identical after a crash or failover:
// only the extents that some replica marked dirty can differ, so the engine
// compares that union between one source (the local healthy replica if
// there is one) and the others and copies what differs, then declares a
// clean point. Called with e.mu held.
//
// Its I/O stays in the foreground class: it runs under the write lock
// while the volume is being attached, so every background-class wait at a
// busy disk (up to MaxBackgroundWait per request) would hold up the attach
// and every I/O behind it.
func (e *Engine) resync(ctx context.Context) error {
	union, err := e.dirtyUnion(ctx)
	if err != nil {
		return err
	}
	src := e.source()
	if src == nil {
		return fmt.Errorf("volume %s: no healthy replica: %w", e.cfg.VolumeID, ErrIO)
	}
	if len(union) == 0 {
		return nil
	}
	extents := make([]uint64, 0, len(union))
	for x := range union {
		extents = append(extents, x)
	}
	e.log.Info("resyncing dirty extents", zap.Int("extents", len(union)), zap.String("source", src.replica.ID), zap.Uint64("epoch", e.epoch))
	copied, err := e.syncExtents(ctx, src, extents)
	if err != nil {
		return fmt.Errorf("resync: %w", err)
	}
	e.dirty.Store(true)
	e.log.Info("resync done", zap.Int("extents", len(union)), zap.Uint64("bytes_copied", copied))
	return e.cleanPointLocked(ctx)
}

// source is the member that resync, resolve and rebuild copy from: the
// local replica when healthy (no network), else the first healthy one.
// Called with e.mu held.
func (e *Engine) source() *member {
	var src *member
	for _, m := range e.members {
		if m.client != nil && m.healthy() && (src == nil || m.local && !src.local) {
			src = m
		}
	}
	return src
}

// dirtyUnion returns the extents some member marked dirty, and learns the
// extent size on the way. Called with e.mu held.
func (e *Engine) dirtyUnion(ctx context.Context) (map[uint64]bool, error) {
	union := map[uint64]bool{}
	for _, m := range e.members {
		if m.client == nil {
			continue
		}
		d, err := m.client.DirtyExtents(ctx)
		if err != nil {
			return nil, fmt.Errorf("dirty extents of %s: %w", m.replica.ID, err)
		}
		for _, x := range d {
			union[x] = true
		}
		if e.extentSize == 0 {
			info, err := m.client.Info(ctx)
			if err != nil {
				return nil, fmt.Errorf("info of %s: %w", m.replica.ID, err)
			}
			e.extentSize = info.ExtentSize
		}
	}
	return union, nil
}

// syncExtents makes the given extents of every other connected member
// equal to src's: it compares checksums and copies the extents that
// differ. It returns the bytes copied. Called with e.mu held for writing,
// so no write is in flight.
func (e *Engine) syncExtents(ctx context.Context, src *member, extents []uint64) (uint64, error) {
	var copied uint64
	// A write torn by a crash may have reached the data but not the sums:
	// in these extents the data is taken as it is (it was never
	// acknowledged, or every replica has it), and its sums recomputed,
	// before the replicas are compared.
	if err := e.rehash(ctx, extents); err != nil {
		return 0, err
	}
	for _, x := range extents {
		want, err := src.client.Checksums(ctx, e.epoch, x, 1)
		if err != nil {
			return copied, fmt.Errorf("checksum of extent %d on %s: %w", x, src.replica.ID, err)
		}
		var data []byte
		for _, m := range e.members {
			if m == src || m.client == nil {
				continue
			}
			got, err := m.client.Checksums(ctx, e.epoch, x, 1)
			if err != nil {
				return copied, fmt.Errorf("checksum of extent %d on %s: %w", x, m.replica.ID, err)
			}
			if got[0] == want[0] {
				continue
			}
			if data == nil {
				if data, err = src.client.ReadExtent(ctx, e.epoch, x); err != nil {
					return copied, fmt.Errorf("read extent %d from %s: %w", x, src.replica.ID, err)
				}
			}
			if err := e.writeCopy(ctx, m, data, x*e.extentSize); err != nil {
				return copied, fmt.Errorf("write extent %d to %s: %w", x, m.replica.ID, err)
			}
			copied += uint64(len(data))
		}
	}
	return copied, nil
}

// Close flushes, declares a clean point and disconnects. It does not change
// the attachment.
func (e *Engine) Close(ctx context.Context) error {
	var err error
	e.closeM.Do(func() {
		if e.stop != nil {
			e.stop()
			e.wg.Wait()
		}
		e.mu.Lock()
		e.releasing = true
		e.mu.Unlock()
		err = e.CleanPoint(ctx)
		e.mu.Lock()
		if err == nil && e.cleanable() == nil {
			if rerr := e.releaseFollowers(ctx); rerr != nil {
				e.log.Warn("followers left following: the next engine resyncs them", zap.Error(rerr))
			}
		}
		e.closed = true
		e.mu.Unlock()
		e.stopFollowers()
		e.closeMembers()
		e.workers.Close()
		if e.cfg.Sched != nil && e.qosSet.Load() && !e.cfg.Maintenance {
			e.cfg.Sched.RemoveVolume(e.cfg.VolumeID)
		}
		e.log.Info("engine stopped")
	})
	return err
}

// stopFollowers ends the followers' senders and waits for them.
func (e *Engine) stopFollowers() {
	e.mu.Lock()
	for id, f := range e.followers {
		f.close()
		delete(e.followers, id)
	}
	e.mu.Unlock()
	e.fstop()
	e.followWG.Wait()
}

func (e *Engine) closeMembers() {
	for _, m := range e.members {
		if m.client != nil {
			m.client.Close()
		}
	}
}

// checkLease asks the store again whether the volume is still attached here
// when its last word on that is older than the lease. Only then does it
// cost a round trip; the watch loop renews the lease every WatchInterval.
func (e *Engine) checkLease(ctx context.Context) error {
	if time.Since(time.Unix(0, e.confirmed.Load())) < e.cfg.Lease {
		return nil
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.usable(); err != nil {
		return err
	}
	if time.Since(time.Unix(0, e.confirmed.Load())) < e.cfg.Lease {
		return nil // renewed while we waited for the lock
	}
	e.log.Warn("lease expired (engine paused or store unreachable); asking the store before more I/O")
	if err := e.reconfigure(ctx); err != nil {
		if e.fenced {
			return fmt.Errorf("volume %s: %v: %w", e.cfg.VolumeID, err, ErrFenced)
		}
		return fmt.Errorf("volume %s: cannot confirm the attachment: %v: %w", e.cfg.VolumeID, err, ErrIO)
	}
	return nil
}
