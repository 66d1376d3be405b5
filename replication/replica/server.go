package replica

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/bits"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/iosched"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/internal/workers"
)

// Per-connection limits.
const (
	// maxInFlight bounds the requests of one connection executing at once;
	// the reader stops reading when it is reached (back-pressure).
	maxInFlight = 64
	// connByteBudget bounds the payload bytes (request and reply) one
	// connection holds in memory at once. A single request larger than the
	// budget is admitted alone.
	connByteBudget = 64 << 20
	// maxErrorMessage bounds the message in an error reply.
	maxErrorMessage = 4 << 10
)

// Server hosts the replicas stored under one data directory and serves the
// replica protocol to engines.
type Server struct {
	log     *zap.Logger
	dataDir string
	// tls: ServerConfig.TLS.
	tls *pki.Credentials
	// epochOf: ServerConfig.EpochOf.
	epochOf func(replicaID string) (uint64, bool)
	// typedDirs: ServerConfig.TypedDirs.
	typedDirs map[string]string
	// deleting: replica id → the progress of the snapshot deletion running
	// on it (guarded by mu).
	deleting map[string]DeleteProgress
	metrics  *serverMetrics
	sched    *iosched.Scheduler
	volumeOf func(replicaID string) string
	// workers run the connections' requests (internal/workers).
	workers *workers.Pool

	// ctx ends at Close, so that requests waiting for the disk scheduler
	// give up instead of holding Close back.
	ctx    context.Context
	cancel context.CancelFunc

	// lifeMu serialises creating, opening and deleting replicas, and is held
	// across their disk I/O for that purpose. Lock order: lifeMu, then mu.
	lifeMu sync.Mutex

	mu        sync.Mutex // guards the fields below; never held across I/O
	replicas  map[string]*Replica
	listeners map[net.Listener]struct{}
	conns     map[*serverConn]struct{}
	closed    bool
	wg        sync.WaitGroup // connection goroutines started by Serve

	// schedVols counts the open replicas of each volume registered with
	// the disk scheduler (one, but for tests that put two replicas of a
	// volume on one server); reserve is each volume's reservation.
	schedVols map[string]int
	reserve   map[string]uint64
}

// ServerConfig configures a Server.
type ServerConfig struct {
	// Logger receives the server's lines (nil: none).
	Logger *zap.Logger
	// DataDir holds the replicas, one directory each: those on the
	// node's default disk.
	DataDir string
	// TypedDirs hold the replicas on the node's disks of other types, by
	// type (disk types: replication/meta disktypes.go).
	TypedDirs map[string]string
	// Sched, if set, is the node's disk scheduler: every data operation on
	// a replica waits for it (see Replica.Admit). It must be a scheduler of
	// its own, not the one the engines charge QoS limits to: the server
	// registers each volume with no limits, only a reservation
	// (SetReservations), so that a volume's limits, charged once by its
	// engine, are not charged again on every replica's disk.
	Sched *iosched.Scheduler
	// VolumeOf maps a replica id to its volume's id, the scheduler's unit
	// of fairness and the label of its metrics (nil: the replica id).
	VolumeOf func(replicaID string) string
	// EpochOf, if set, returns the epoch the store gives the volume of a
	// replica, as this node's copy of the store knows it (false: not
	// known). A CLAIM over the network above that epoch plus one is then
	// refused: a bogus claim cannot fence a replica's writers for good.
	// The node's copy may lag the leader by a moment, so a claim above it
	// waits up to claimCatchUp for it to catch up first.
	EpochOf func(replicaID string) (uint64, bool)
	// TLS, if set, is this node's identity: every connection then speaks
	// mutual TLS, node certificates may do everything, ctl certificates
	// only read checksums and state (cairn ctl volume verify), and no
	// other is served (nil: plaintext, anyone).
	TLS *pki.Credentials
}

// NewServer returns a server for the replicas under dataDir, without disk
// scheduling. Replicas already on disk are opened on first use (Get, List,
// or a client's OPEN).
func NewServer(log *zap.Logger, dataDir string) *Server {
	return NewServerWithConfig(ServerConfig{Logger: log, DataDir: dataDir})
}

// NewServerWithConfig returns a server configured by cfg.
func NewServerWithConfig(cfg ServerConfig) *Server {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.VolumeOf == nil {
		cfg.VolumeOf = func(id string) string { return id }
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		log:       cfg.Logger.Named("replica"),
		dataDir:   cfg.DataDir,
		typedDirs: maps.Clone(cfg.TypedDirs),
		metrics:   newServerMetrics(),
		sched:     cfg.Sched,
		volumeOf:  cfg.VolumeOf,
		tls:       cfg.TLS,
		epochOf:   cfg.EpochOf,
		ctx:       ctx,
		cancel:    cancel,
		replicas:  make(map[string]*Replica),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*serverConn]struct{}),
		schedVols: make(map[string]int),
		reserve:   make(map[string]uint64),
		deleting:  make(map[string]DeleteProgress),
		workers:   workers.New(workerIdle),
	}
}

// workerIdle is how long a request worker waits for the next request
// before it ends.
const workerIdle = 10 * time.Second

// schedAttach gives a replica that is about to be published its way into
// the disk scheduler, registering its volume there if it is the first of
// its volume. Called with s.mu held.
func (s *Server) schedAttach(r *Replica) {
	if s.sched == nil {
		return
	}
	vol := s.volumeOf(r.id)
	r.adm = admission{sched: s.sched, volume: vol, waiting: s.metrics.waiting}
	if s.schedVols[vol] == 0 {
		if err := s.sched.SetLimits(vol, iosched.Limits{MinIOPS: s.reserve[vol]}); err != nil {
			// Only a closed scheduler refuses these limits; the replica's
			// requests then fail with ErrClosed, as the node is stopping.
			s.log.Warn("disk scheduler refused a volume", zap.String("volume_id", vol), zap.String("replica_id", r.id), zap.Error(err))
		} else {
			s.log.Debug("volume registered with the disk scheduler", zap.String("volume_id", vol),
				zap.String("replica_id", r.id), zap.Uint64("min_iops", s.reserve[vol]))
		}
	}
	s.schedVols[vol]++
}

// schedDetach undoes schedAttach for a replica taken out of s.replicas:
// once the last replica of its volume is gone, the volume leaves the
// scheduler and its queued requests fail. Called with s.mu held.
func (s *Server) schedDetach(r *Replica) {
	if r.adm.sched == nil {
		return
	}
	vol := r.adm.volume
	if s.schedVols[vol]--; s.schedVols[vol] > 0 {
		return
	}
	delete(s.schedVols, vol)
	s.sched.RemoveVolume(vol)
}

// SetReservations gives each volume in minIOPS its reservation in the disk
// scheduler (I/Os per second it is served ahead of volumes only using spare
// capacity), replacing the reservations set before: volumes not in the map
// reserve nothing. Without a disk scheduler it does nothing.
//
// The engine's scheduler already holds a volume to its reservation among
// the I/Os of its own node; this one holds it on the disks of its replicas,
// where the I/Os of engines on every node meet.
func (s *Server) SetReservations(minIOPS map[string]uint64) {
	if s.sched == nil {
		return
	}
	next := make(map[string]uint64, len(minIOPS))
	for vol, n := range minIOPS {
		if n > 0 {
			next[vol] = n
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.reserve
	s.reserve = next
	for vol := range s.schedVols {
		if prev[vol] == next[vol] {
			continue
		}
		if err := s.sched.SetLimits(vol, iosched.Limits{MinIOPS: next[vol]}); err != nil {
			s.log.Warn("disk scheduler refused a reservation", zap.String("volume_id", vol), zap.Uint64("min_iops", next[vol]), zap.Error(err))
			continue
		}
		s.log.Info("disk reservation changed", zap.String("volume_id", vol), zap.Uint64("min_iops", next[vol]))
	}
}

// Create creates replica id of size bytes. It is idempotent: a replica with
// that id and size is returned as it is; one with another size gives
// ErrExists.
func (s *Server) Create(id string, size uint64) (*Replica, error) {
	return s.CreateWith(id, size, CreateOptions{})
}

// CreateWith is Create with the options a new replica gets (an existing
// one keeps its own).
func (s *Server) CreateWith(id string, size uint64, opts CreateOptions) (*Replica, error) {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if r, err := s.lookup(id); err != nil || r != nil {
		if r != nil && r.Size() != size {
			return nil, fmt.Errorf("replica %s: %w: it has size %d, asked for %d", id, ErrExists, r.Size(), size)
		}
		return r, err
	}
	root, err := s.dirFor(opts.DiskType)
	if err != nil {
		return nil, err
	}
	if have := s.dirOf(id); have != root && dirExists(filepath.Join(have, id)) {
		return nil, fmt.Errorf("replica %s: %w: it is on the disk of another type (%s)", id, ErrExists, have)
	}
	r, err := OpenWith(root, id, size, 0, opts)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.schedAttach(r)
	s.replicas[id] = r
	s.mu.Unlock()
	s.log.Info("replica ready", zap.String("replica_id", id), zap.Uint64("size", size), zap.Uint64("epoch", r.Epoch()),
		zap.String("generation", r.Generation()), zap.Bool("checksums", r.Checksummed()))
	s.logUncleanStop(r)
	return r, nil
}

// logUncleanStop says what opening r settled of the writes that a stop
// without a Flush left (Replica.UncleanStop), if anything: after a process
// crash every block is kept; blocks that fell back read their old
// contents, which an operator looking for lost writes wants to know.
func (s *Server) logUncleanStop(r *Replica) {
	st, ok := r.UncleanStop()
	if !ok {
		return
	}
	log := s.log.Info
	if st.FellBack > 0 {
		log = s.log.Warn
	}
	log("replica opened after an unclean stop: settled its unflushed writes",
		zap.String("volume_id", s.volumeOf(r.id)), zap.String("replica_id", r.id),
		zap.Bool("same_boot", st.SameBoot), zap.Bool("checksums", r.Checksummed()),
		zap.Uint64("pending_blocks", st.Pending), zap.Uint64("kept_blocks", st.Kept),
		zap.Uint64("fell_back_blocks", st.FellBack), zap.Uint64("dirty_extents_added", st.DirtyAdded))
}

// CreateFromSnapshot creates replica id holding snapshot snapID of replica
// src, in a volume of size bytes (0: src's size), sharing src's layers by
// hard links (see the package function CreateFromSnapshot), and serves it.
// A replica id that exists → ErrExists.
func (s *Server) CreateFromSnapshot(id, src, snapID string, size uint64) (*Replica, error) {
	source, err := s.Get(src)
	if err != nil {
		return nil, err
	}
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	if r, err := s.lookup(id); err != nil || r != nil {
		if r != nil {
			return nil, fmt.Errorf("replica %s: %w", id, ErrExists)
		}
		return nil, err
	}
	// On the source's disk: the layers are hard links.
	if err := CreateFromSnapshot(filepath.Dir(source.dir), id, source, snapID, size); err != nil {
		return nil, err
	}
	r, err := s.getLocked(id)
	if err != nil {
		return nil, err
	}
	s.log.Info("replica restored from a snapshot", zap.String("replica_id", id), zap.String("source", src),
		zap.String("snapshot", snapID), zap.Uint64("size", r.Size()), zap.String("generation", r.Generation()))
	return r, nil
}

// DeleteSnapshot deletes snapshot id of r, one of this server's replicas
// (Replica.DeleteSnapshot), showing its progress in the server's metrics
// and its log: for an engine anywhere (OpDeleteSnapshot) and for the one
// on this node, which reaches r in process.
func (s *Server) DeleteSnapshot(r *Replica, epoch uint64, id string) error {
	start := time.Now()
	vol := s.volumeOf(r.ID())
	log := s.log.With(zap.String("volume_id", vol), zap.String("replica_id", r.ID()), zap.String("snapshot", id), zap.Uint64("epoch", epoch))
	progress := s.metrics.deleteProgress.WithLabelValues(vol, id)
	defer s.metrics.deleteProgress.DeleteLabelValues(vol, id)
	s.setDeleting(r.ID(), &DeleteProgress{Snapshot: id, TotalBytes: r.Size()})
	defer s.setDeleting(r.ID(), nil)
	quarter := 0
	err := r.DeleteSnapshot(epoch, id, func(done, total uint64) {
		progress.Set(float64(done) / float64(total))
		s.setDeleting(r.ID(), &DeleteProgress{Snapshot: id, DoneBytes: done, TotalBytes: total})
		if q := int(4 * done / total); q > quarter && q < 4 {
			quarter = q
			log.Info("deleting a snapshot", zap.Int("percent", 25*q), zap.Duration("elapsed", time.Since(start)))
		}
	})
	if err != nil {
		return err
	}
	log.Info("snapshot deleted", zap.Duration("took", time.Since(start)))
	return nil
}

// DeleteProgress is how far a snapshot deletion running on a replica has
// gone, in bytes of the volume.
type DeleteProgress struct {
	Snapshot              string
	DoneBytes, TotalBytes uint64
}

// Deleting returns the progress of the snapshot deletion running on
// replica id, if one is.
func (s *Server) Deleting(id string) (DeleteProgress, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.deleting[id]
	return p, ok
}

// setDeleting records (nil: forgets) the progress of a deletion on
// replica id.
func (s *Server) setDeleting(id string, p *DeleteProgress) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p == nil {
		delete(s.deleting, id)
		return
	}
	s.deleting[id] = *p
}

// lookup returns an open replica, nil if it is not open, or ErrServerClosed.
func (s *Server) lookup(id string) (*Replica, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrServerClosed
	}
	return s.replicas[id], nil
}

// Get returns replica id, opening it from disk if needed; ErrNotFound if
// there is no such replica.
func (s *Server) Get(id string) (*Replica, error) {
	if r, err := s.lookup(id); err != nil || r != nil {
		return r, err
	}
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	return s.getLocked(id)
}

// getLocked is Get with lifeMu held.
func (s *Server) getLocked(id string) (*Replica, error) {
	if r, err := s.lookup(id); err != nil || r != nil {
		return r, err
	}
	r, err := Open(s.dirOf(id), id, 0, 0)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.schedAttach(r)
	s.replicas[id] = r
	s.mu.Unlock()
	s.log.Info("replica opened", zap.String("replica_id", id), zap.Uint64("epoch", r.Epoch()), zap.String("generation", r.Generation()))
	s.logUncleanStop(r)
	return r, nil
}

// Delete closes replica id and removes its files. Deleting a replica that
// does not exist succeeds. Connections using it get errors from then on.
func (s *Server) Delete(id string) error {
	if err := validateID(id); err != nil {
		return err
	}
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	r, err := s.lookup(id)
	if err != nil {
		return err
	}
	if r != nil {
		s.mu.Lock()
		delete(s.replicas, id)
		s.schedDetach(r) // its queued requests fail now rather than after the removal
		s.mu.Unlock()
		err = r.Remove()
	} else {
		err = removeReplicaDir(filepath.Join(s.dirOf(id), id))
	}
	if err != nil {
		return err
	}
	s.log.Info("replica deleted", zap.String("replica_id", id))
	return nil
}

// List opens every replica under the data directory and describes them,
// sorted by id. A replica that cannot be opened is left out and its error
// joined into the returned error. On the way it removes what an
// interrupted create or delete left (see isLeftover).
func (s *Server) List() ([]Info, error) {
	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	var errs []error
	for _, root := range s.roots() {
		entries, err := os.ReadDir(root)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		errs = append(errs, s.openAll(root, entries)...)
	}
	return s.listOpen(errs)
}

// openAll opens the replicas among the entries of root (one of the data
// directories), removing leftovers of interrupted creates and deletes.
// Callers hold lifeMu.
func (s *Server) openAll(root string, entries []fs.DirEntry) []error {
	var errs []error
	for _, e := range entries {
		if e.IsDir() && isLeftover(e.Name()) {
			// No create or delete runs (lifeMu). Left, such a directory
			// would hold its hard links to another replica's layers for
			// ever, and those layers could never be merged or freed.
			if err := os.RemoveAll(filepath.Join(root, e.Name())); err != nil {
				errs = append(errs, fmt.Errorf("remove leftover %s: %w", e.Name(), err))
			} else {
				s.log.Info("removed the leftover of an interrupted replica create or delete", zap.String("dir", e.Name()))
			}
			continue
		}
		if !e.IsDir() || isHiddenEntry(e.Name()) || validateID(e.Name()) != nil {
			continue // not a replica: lost+found …
		}
		if _, err := s.getLocked(e.Name()); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// listOpen describes the open replicas, sorted by id, with errs joined.
func (s *Server) listOpen(errs []error) ([]Info, error) {
	s.mu.Lock()
	rs := make([]*Replica, 0, len(s.replicas))
	for _, r := range s.replicas {
		rs = append(rs, r)
	}
	s.mu.Unlock()
	infos := make([]Info, 0, len(rs))
	for _, r := range rs {
		infos = append(infos, r.Info())
	}
	sort.Slice(infos, func(i, j int) bool { return infos[i].ID < infos[j].ID })
	return infos, errors.Join(errs...)
}

// Serve accepts connections on l until Close, then returns ErrServerClosed.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	backoff := time.Duration(0)
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of descriptors and the like: wait and go on, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("replica server: accept failed", zap.Error(err), zap.Duration("retry_in", backoff))
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetNoDelay(true) // latency matters more than packet count here; failure is harmless
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			_ = nc.Close() // never served: nothing to lose
			return ErrServerClosed
		}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.handleConn(nc)
		}()
	}
}

// Close stops accepting, closes every connection, waits for every goroutine
// the server started and closes the replicas.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.cancel()
	var errs []error
	for l := range s.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for c := range s.conns {
		_ = c.nc.Close() // unblocks the connection's reader; its handlers still finish
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.workers.Close() // the connections' handlers have all returned

	s.lifeMu.Lock()
	defer s.lifeMu.Unlock()
	s.mu.Lock()
	rs := s.replicas
	s.replicas = map[string]*Replica{}
	for _, r := range rs {
		s.schedDetach(r)
	}
	s.mu.Unlock()
	for _, r := range rs {
		if err := r.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Collectors returns the server's Prometheus metrics.
func (s *Server) Collectors() []prometheus.Collector {
	return append(s.metrics.collectors(), snapshotCollector{s})
}

// snapshotCollector reports, at each scrape, how many snapshots each open
// replica holds (cheap: the chain's list, no map is read).
type snapshotCollector struct{ s *Server }

var snapshotsDesc = prometheus.NewDesc("cairn_replica_snapshots",
	"Snapshots held by a replica (being deleted not counted).", []string{"volume", "replica"}, nil)

func (c snapshotCollector) Describe(ch chan<- *prometheus.Desc) { ch <- snapshotsDesc }

func (c snapshotCollector) Collect(ch chan<- prometheus.Metric) {
	c.s.mu.Lock()
	rs := make([]*Replica, 0, len(c.s.replicas))
	for _, r := range c.s.replicas {
		rs = append(rs, r)
	}
	c.s.mu.Unlock()
	for _, r := range rs {
		ch <- prometheus.MustNewConstMetric(snapshotsDesc, prometheus.GaugeValue, float64(len(r.Snapshots())), c.s.volumeOf(r.ID()), r.ID())
	}
}

// serverConn is one client connection. Its reader goroutine decodes requests
// and runs each on one of the server's workers (at most maxInFlight at once
// per connection); replies go through one writer goroutine, in whatever
// order they complete.
type serverConn struct {
	s   *Server
	nc  net.Conn
	log *zap.Logger
	br  *bufio.Reader
	// readOnly: the peer's certificate is not a node's; it may only look
	// (readOnlyOps).
	readOnly bool

	// replica is set by OPEN in the reader goroutine, before any handler
	// that uses it starts.
	replica *Replica

	out      chan reply
	handlers sync.WaitGroup
	inFlight chan struct{}
	budget   byteBudget

	fencedLogged atomic.Bool
	dropped      atomic.Int64 // requests dropped from the disk queue when the connection ended

	// ctx ends when the reader sees the connection end (or the server
	// closes): requests still waiting for the disk scheduler then give up
	// instead of running later. Their client has been told the connection
	// failed, and an engine that reconnects at the same epoch must not have
	// an older write of the dead connection land after its newer one.
	ctx    context.Context
	cancel context.CancelFunc
	// parked is set while the reader waits for an in-flight slot or byte
	// budget. It reads nothing then, so it would not see the peer go away
	// and ctx would not end: a request that gets the disk meanwhile asks
	// the socket itself (peerGone), and so does the reader when it wakes.
	parked atomic.Bool
}

// reply is one reply frame on its way to the writer. release runs once it
// is written (or dropped).
type reply struct {
	hdr     ReplyHeader
	payload []byte
	buf     *[]byte // pooled buffer holding payload, if any
	cost    uint64  // byte budget to give back
}

// handleConn serves nc until the peer goes away or the server closes, and
// returns once every goroutine it started has ended.
func (s *Server) handleConn(nc net.Conn) {
	readOnly := false
	if s.tls != nil {
		tc := tls.Server(nc, s.tls.ServerConfig())
		id, err := handshakeTLS(tc)
		if err == nil && id.Role != pki.RoleNode {
			readOnly = true
			err = pki.Allow(id, "open replicas", pki.RoleNode, pki.RoleCtl)
		}
		if err != nil {
			s.log.Warn("replica connection refused", zap.Stringer("remote", nc.RemoteAddr()), zap.Error(err))
			_ = nc.Close() // nothing was read from it
			return
		}
		nc = tc
	}
	c := &serverConn{
		readOnly: readOnly,
		s:        s,
		nc:       nc,
		log:      s.log.With(zap.Stringer("remote", nc.RemoteAddr())),
		br:       bufio.NewReaderSize(nc, 64<<10),
		out:      make(chan reply, 2*maxInFlight),
		inFlight: make(chan struct{}, maxInFlight),
	}
	c.budget.init(connByteBudget)
	c.ctx, c.cancel = context.WithCancel(s.ctx)
	defer c.cancel()
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = nc.Close() // never served
		return
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()

	writerDone := make(chan struct{})
	writerLog := c.log // the writer's own copy: OPEN replaces c.log in the reader
	go func() {
		defer close(writerDone)
		c.writeLoop(writerLog)
	}()
	c.readLoop()
	c.cancel() // requests still queued for the disk are dropped, not run
	c.handlers.Wait()
	if n := c.dropped.Load(); n > 0 {
		c.log.Info("connection ended with requests queued for the disk; dropped them", zap.Int64("dropped", n))
	}
	close(c.out)
	<-writerDone
	_ = nc.Close() // replies are written or the peer is gone; nothing left to lose

	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// readLoop decodes requests until the connection ends or its framing breaks.
func (c *serverConn) readLoop() {
	hdr := make([]byte, RequestHeaderLen)
	for {
		if _, err := io.ReadFull(c.br, hdr); err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.log.Debug("replica connection: read failed", zap.Error(err))
			}
			return
		}
		h, err := DecodeRequestHeader(hdr)
		if err != nil {
			c.log.Warn("replica connection: bad frame, closing", zap.Error(err))
			c.sendError(h.Handle, err)
			return
		}
		if err := c.admit(h); err != nil {
			if _, derr := io.CopyN(io.Discard, c.br, int64(h.PayloadLen)); derr != nil {
				return
			}
			c.sendError(h.Handle, err)
			continue
		}
		cost := uint64(h.PayloadLen) + c.replyCost(h)
		if c.budget.acquire(cost, &c.parked) && peerGone(c.nc) {
			c.budget.release(cost)
			return
		}
		var payload *[]byte
		var trailer []byte
		if h.PayloadLen > 0 {
			// A WRITE's piece checksums are read apart from its data, so
			// that the data buffer is the size of the data: a 1 MiB write
			// does not take a 2 MiB buffer for its 1 KiB of checksums.
			dataLen := int(h.PayloadLen)
			if h.Op == OpWrite && h.Flags&(FlagSums|FlagPair) != 0 {
				dataLen = int(h.Length)
				trailer = make([]byte, int(h.PayloadLen)-dataLen)
			}
			payload = getBuf(dataLen)
			_, err := io.ReadFull(c.br, *payload)
			if err == nil && len(trailer) > 0 {
				_, err = io.ReadFull(c.br, trailer)
			}
			if err != nil {
				putBuf(payload)
				c.budget.release(cost)
				c.log.Debug("replica connection: read payload failed", zap.Error(err))
				return
			}
		}
		if h.Op == OpOpen {
			// Inline: it changes the connection's state for what follows.
			c.send(c.open(h, *payload, cost))
			putBuf(payload)
			continue
		}
		if !c.takeSlot() {
			putBuf(payload)
			c.budget.release(cost)
			return
		}
		c.handlers.Add(1)
		c.s.workers.Go(func() {
			defer c.handlers.Done()
			defer func() { <-c.inFlight }()
			c.send(c.execute(h, payload, trailer, cost))
		})
	}
}

// takeSlot waits for an in-flight slot and reports whether the peer is
// still there once it has one (see parked).
func (c *serverConn) takeSlot() bool {
	select {
	case c.inFlight <- struct{}{}:
		return true
	default:
	}
	c.parked.Store(true)
	c.inFlight <- struct{}{}
	c.parked.Store(false)
	if peerGone(c.nc) {
		<-c.inFlight
		return false
	}
	return true
}

// peerGone reports whether the peer of a TCP connection has closed it: its
// FIN or RST has arrived, whatever the reader has yet to read. For other
// connections it reports false.
func peerGone(nc net.Conn) bool {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	gone := false
	_ = raw.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		// The kernel's TCP states: CLOSE_WAIT once the peer's FIN is in,
		// CLOSE after a reset.
		gone = err == nil && (info.State == unix.BPF_TCP_CLOSE_WAIT || info.State == unix.BPF_TCP_CLOSE)
	})
	return gone
}

// admit applies the rules that do not depend on the replica's state.
func (c *serverConn) admit(h RequestHeader) error {
	if err := ValidateRequest(h); err != nil {
		return err
	}
	if c.readOnly && !readOnlyOps[h.Op] {
		return fmt.Errorf("%w: %s needs a node certificate (%v)", ErrInvalidArgument, h.Op, pki.ErrPermissionDenied)
	}
	switch {
	case h.Op == OpOpen && c.replica != nil:
		return fmt.Errorf("%w: this connection already opened replica %s", ErrInvalidArgument, c.replica.ID())
	case h.Op != OpOpen && h.Op != OpPing && c.replica == nil:
		return fmt.Errorf("%w: %s before OPEN: open a replica first", ErrInvalidArgument, h.Op)
	}
	return nil
}

// claimCatchUp bounds how long a claim above the store's epoch waits for
// this node's copy of the store to catch up with the leader.
const claimCatchUp = 3 * time.Second

// checkClaim refuses a claim of epoch on replica id above the store's epoch
// of its volume plus one (see ServerConfig.EpochOf).
func (s *Server) checkClaim(ctx context.Context, id string, epoch uint64) error {
	if s.epochOf == nil {
		return nil
	}
	deadline := time.Now().Add(claimCatchUp)
	for {
		store, known := s.epochOf(id)
		if known && epoch <= store+1 {
			return nil
		}
		if time.Now().After(deadline) {
			if !known {
				return fmt.Errorf("%w: claim of epoch %d: the store has no volume for replica %s", ErrInvalidArgument, epoch, id)
			}
			return fmt.Errorf("%w: claim of epoch %d: the store's epoch for replica %s's volume is %d, and a claim may be at most one above it", ErrInvalidArgument, epoch, id, store)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// readOnlyOps are what a connection with a ctl certificate may send: enough
// for comparing replicas (verify), nothing that changes one or fences its
// writer.
var readOnlyOps = map[Op]bool{OpOpen: true, OpPing: true, OpInfo: true, OpChecksums: true}

// handshakeTLS completes a server-side handshake within tlsHandshakeTimeout
// and returns the peer's identity.
func handshakeTLS(tc *tls.Conn) (pki.Identity, error) {
	ctx, cancel := context.WithTimeout(context.Background(), tlsHandshakeTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return pki.Identity{}, err
	}
	return pki.PeerIdentity(tc.ConnectionState())
}

// tlsHandshakeTimeout bounds a TLS handshake on the replica port.
const tlsHandshakeTimeout = 10 * time.Second

// replyCost estimates the reply payload of a valid request, for the budget.
func (c *serverConn) replyCost(h RequestHeader) uint64 {
	switch h.Op {
	case OpRead:
		return uint64(h.Length)
	case OpReadExtent:
		return c.replica.ExtentSize()
	case OpChecksums, OpLayerSums:
		return 4 * uint64(h.Length)
	case OpLayerRead:
		return layerExtentMax(c.replica.ExtentSize())
	case OpDirty:
		if h.Length == 0 {
			return MaxPayload
		}
		return 8 * uint64(h.Length)
	}
	return 0
}

func (c *serverConn) open(h RequestHeader, payload []byte, cost uint64) reply {
	id := string(payload)
	r, err := c.s.Get(id)
	if err == nil && h.Offset != 0 && h.Offset != r.Size() {
		err = fmt.Errorf("%w: replica %s has size %d, client expects %d", ErrInvalidArgument, id, r.Size(), h.Offset)
	}
	if err != nil {
		return c.errorReply(h, err, cost)
	}
	c.replica = r
	c.log = c.log.With(zap.String("replica_id", id))
	c.log.Debug("replica connection opened")
	return reply{hdr: ReplyHeader{Handle: h.Handle}, payload: AppendInfo(nil, r.Info()), cost: cost}
}

// execute runs one request against the connection's replica, once the
// disk scheduler lets it go. The ticket is given back before the reply is
// queued: a slot of the disk is never held waiting for the network.
func (c *serverConn) execute(h RequestHeader, payload *[]byte, trailer []byte, cost uint64) reply {
	start := time.Now()
	var rep reply
	var t iosched.Ticket
	var err error
	if scheduled(h.Op) { // not PING, which may come before OPEN set c.replica
		t, err = c.replica.admit(c.ctx, h.Op, uint64(h.Length), classOfFlags(h.Flags))
		if err == nil && (c.ctx.Err() != nil || c.parked.Load() && peerGone(c.nc)) {
			// Granted as the connection ended (or after it did, unseen
			// by the parked reader): drop it, and the rest with it.
			t.Done()
			c.cancel()
			err = c.ctx.Err()
		}
		if err != nil && c.ctx.Err() != nil {
			// Dropped with its connection: not a failure of the disk,
			// and nobody reads the reply. Counted and logged once.
			c.dropped.Add(1)
			putBuf(payload)
			return reply{hdr: ReplyHeader{Status: StatusIOError, Handle: h.Handle}, cost: cost}
		}
	}
	if err == nil {
		rep, err = c.do(h, payload, trailer)
		t.Done()
	}
	putBuf(payload)
	c.s.metrics.observe(h.Op, time.Since(start), err)
	if err != nil {
		return c.errorReply(h, err, cost)
	}
	rep.hdr.Handle = h.Handle
	rep.cost = cost
	return rep
}

func (c *serverConn) do(h RequestHeader, payload *[]byte, trailer []byte) (reply, error) {
	r := c.replica
	fua := h.Flags&FlagFUA != 0
	switch h.Op {
	case OpPing:
		return reply{}, nil
	case OpClaim:
		if err := c.s.checkClaim(c.ctx, r.ID(), h.Epoch); err != nil {
			c.log.Warn("claim refused", zap.Uint64("epoch", h.Epoch), zap.Error(err))
			return reply{}, err
		}
		prev := r.Epoch()
		if err := r.Claim(h.Epoch); err != nil {
			return reply{}, err
		}
		if h.Epoch != prev {
			c.log.Info("replica claimed", zap.Uint64("epoch", h.Epoch), zap.Uint64("previous_epoch", prev))
		}
		return reply{}, nil
	case OpRead:
		if err := r.precheck(h.Epoch, h.Offset, uint64(h.Length)); err != nil {
			return reply{}, err
		}
		buf := getBuf(int(h.Length))
		var p []byte
		if buf != nil {
			p = *buf
		}
		if err := r.ReadAt(h.Epoch, p, h.Offset); err != nil {
			putBuf(buf)
			return reply{}, err
		}
		return reply{payload: p, buf: buf}, nil
	case OpWrite:
		var p []byte
		if payload != nil {
			p = *payload
		}
		if h.Flags&FlagPair != 0 {
			pair, err := DecodePair(h, trailer)
			if err != nil {
				return reply{}, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
			}
			return reply{}, r.WritePair(h.Epoch, p, h.Offset, pair, fua)
		}
		if h.Flags&FlagSums == 0 {
			return reply{}, r.WriteAt(h.Epoch, p, h.Offset, fua)
		}
		pieces, err := DecodeUint32s(trailer)
		if err != nil {
			return reply{}, err
		}
		return reply{}, r.WriteAtSums(h.Epoch, p, h.Offset, fua, pieces)
	case OpRehash:
		return reply{}, r.Rehash(h.Epoch, h.Offset, uint64(h.Length))
	case OpFlush:
		return reply{}, r.Flush(h.Epoch)
	case OpTrim, OpWriteZeroes:
		var err error
		if h.Op == OpTrim {
			err = r.Trim(h.Epoch, h.Offset, uint64(h.Length))
		} else {
			err = r.WriteZeroes(h.Epoch, h.Offset, uint64(h.Length))
		}
		if err == nil && fua {
			err = r.Flush(h.Epoch)
		}
		return reply{}, err
	case OpChecksums:
		sums, err := r.Checksums(h.Epoch, h.Offset, uint64(h.Length))
		if err != nil {
			return reply{}, err
		}
		return reply{payload: AppendUint32s(make([]byte, 0, 4*len(sums)), sums)}, nil
	case OpReadExtent:
		buf := getBuf(int(r.ExtentSize()))
		p, err := r.readExtentInto(h.Epoch, h.Offset, *buf)
		if err != nil {
			putBuf(buf)
			return reply{}, err
		}
		return reply{payload: p, buf: buf}, nil
	case OpDirty:
		limit := int(h.Length)
		if limit == 0 {
			limit = MaxDirtyPerReply
		}
		list := r.dirtyExtentsFrom(h.Offset, limit)
		return reply{payload: AppendUint64s(make([]byte, 0, 8*len(list)), list)}, nil
	case OpMarkClean:
		return reply{}, r.MarkClean(h.Epoch, h.Offset)
	case OpGrow:
		prev := r.Size()
		if err := r.Grow(h.Epoch, h.Offset); err != nil {
			return reply{}, err
		}
		if h.Offset > prev {
			c.log.Info("replica grown", zap.String("volume_id", c.s.volumeOf(r.ID())), zap.Uint64("epoch", h.Epoch),
				zap.Uint64("previous_size", prev), zap.Uint64("size", h.Offset))
		}
		return reply{}, nil
	case OpSnapshot:
		id := string(*payload)
		if err := r.Snapshot(h.Epoch, id); err != nil {
			return reply{}, err
		}
		c.log.Info("snapshot taken", zap.String("volume_id", c.s.volumeOf(r.ID())), zap.String("snapshot", id), zap.Uint64("epoch", h.Epoch))
		return reply{}, nil
	case OpPrepareSnap:
		return reply{}, r.PrepareSnapshot(h.Epoch)
	case OpDeleteSnapshot:
		return reply{}, c.s.DeleteSnapshot(r, h.Epoch, string(*payload))
	case OpReadSnapshot:
		buf := getBuf(int(h.Length))
		var p []byte
		if buf != nil {
			p = *buf
		}
		if err := r.ReadSnapshotAt(h.Epoch, string(*payload), p, h.Offset); err != nil {
			putBuf(buf)
			return reply{}, err
		}
		return reply{payload: p, buf: buf}, nil
	case OpLayers:
		ls, err := r.Layers(h.Epoch)
		if err != nil {
			return reply{}, err
		}
		return reply{payload: AppendLayerInfos(nil, ls)}, nil
	case OpLayerSums:
		var sums []uint32
		var err error
		switch {
		case h.Flags&FlagLayerBuild != 0:
			sums, err = r.BuildSums(h.Epoch, string(*payload), h.Offset, uint64(h.Length))
		case h.Flags&FlagLayerFlat != 0:
			sums, err = r.FlatSums(h.Epoch, string(*payload), h.Offset, uint64(h.Length))
		default:
			sums, err = r.LayerSums(h.Epoch, string(*payload), h.Offset, uint64(h.Length))
		}
		if err != nil {
			return reply{}, err
		}
		return reply{payload: AppendUint32s(make([]byte, 0, 4*len(sums)), sums)}, nil
	case OpLayerRead:
		buf := getBuf(int(layerExtentMax(r.ExtentSize())))
		p, err := r.ReadLayerExtent(h.Epoch, string(*payload), h.Offset, h.Flags&FlagLayerFlat != 0, *buf)
		if err != nil {
			putBuf(buf)
			return reply{}, err
		}
		return reply{payload: p, buf: buf}, nil
	case OpLayerBegin:
		return reply{}, r.BeginLayer(h.Epoch, string(*payload), h.Offset)
	case OpLayerWrite:
		p := *payload
		n := int(p[0])
		if n == 0 || 1+n+int(h.Length) != len(p) {
			return reply{}, fmt.Errorf("%w: layer_write: snapshot id of %d bytes in a payload of %d with %d bytes of data", ErrInvalidArgument, n, len(p), h.Length)
		}
		return reply{}, r.WriteLayerExtent(h.Epoch, string(p[1:1+n]), h.Offset, p[1+n:])
	case OpLayerSeal:
		id := string(*payload)
		if err := r.SealLayer(h.Epoch, id); err != nil {
			return reply{}, err
		}
		c.log.Info("layer published", zap.String("volume_id", c.s.volumeOf(r.ID())), zap.String("snapshot", id), zap.Uint64("epoch", h.Epoch))
		return reply{}, nil
	case OpLayerDrop:
		id := string(*payload)
		if err := r.DropLayer(h.Epoch, id); err != nil {
			return reply{}, err
		}
		c.log.Info("layer dropped", zap.String("volume_id", c.s.volumeOf(r.ID())), zap.String("snapshot", id), zap.Uint64("epoch", h.Epoch))
		return reply{}, nil
	case OpInfo:
		if h.Flags&FlagGeneration != 0 {
			return reply{payload: AppendInfoGeneration(nil, r.Info())}, nil
		}
		return reply{payload: AppendInfo(nil, r.Info())}, nil
	}
	// ValidateRequest admitted an op this switch does not know.
	panic(fmt.Sprintf("BUG: replica server has no handler for op %d", h.Op))
}

func (c *serverConn) errorReply(h RequestHeader, err error, cost uint64) reply {
	if errors.Is(err, ErrFenced) {
		c.s.metrics.fenced.Inc()
		if c.fencedLogged.CompareAndSwap(false, true) {
			c.log.Warn("replica fenced a request from an older epoch", zap.Uint64("epoch", h.Epoch), zap.Stringer("op", h.Op), zap.Error(err))
		}
	} else if errors.Is(err, ErrChecksum) {
		c.s.metrics.checksum.Inc()
		vol := ""
		if c.replica != nil {
			vol = c.s.volumeOf(c.replica.ID())
		}
		c.log.Warn("replica checksum mismatch", zap.String("volume_id", vol), zap.Stringer("op", h.Op), zap.Uint64("epoch", h.Epoch), zap.Error(err))
	} else if statusOf(err) == StatusIOError {
		c.log.Warn("replica request failed", zap.Stringer("op", h.Op), zap.Uint64("epoch", h.Epoch), zap.Error(err))
	}
	msg := err.Error()
	if len(msg) > maxErrorMessage {
		msg = msg[:maxErrorMessage]
	}
	return reply{hdr: ReplyHeader{Status: statusOf(err), Handle: h.Handle}, payload: []byte(msg), cost: cost}
}

// sendError replies to a request that was not admitted.
func (c *serverConn) sendError(handle uint64, err error) {
	c.s.metrics.rejected.Inc()
	c.send(c.errorReply(RequestHeader{Handle: handle}, err, 0))
}

func (c *serverConn) send(r reply) {
	r.hdr.PayloadLen = uint32(len(r.payload))
	c.out <- r
}

// writeLoop writes replies until out is closed. It flushes when no reply is
// waiting, so replies that complete together share a write. After a write
// error it keeps draining out, so no handler ever blocks.
func (c *serverConn) writeLoop(log *zap.Logger) {
	bw := bufio.NewWriterSize(c.nc, 64<<10)
	hdr := make([]byte, 0, ReplyHeaderLen)
	var err error
	for r := range c.out {
		if err == nil {
			_, err = bw.Write(AppendReplyHeader(hdr[:0], r.hdr))
			if err == nil && len(r.payload) > 0 {
				_, err = bw.Write(r.payload)
			}
			if err == nil && len(c.out) == 0 {
				err = bw.Flush()
			}
			if err != nil {
				log.Debug("replica connection: write failed", zap.Error(err))
				_ = c.nc.Close() // stop the reader too: the peer cannot get replies
			}
		}
		putBuf(r.buf)
		c.budget.release(r.cost)
	}
	if err == nil {
		if err := bw.Flush(); err != nil {
			log.Debug("replica connection: write failed", zap.Error(err))
		}
	}
}

// byteBudget is a counting semaphore over bytes.
type byteBudget struct {
	mu    sync.Mutex
	cond  *sync.Cond
	used  uint64
	limit uint64
}

func (b *byteBudget) init(limit uint64) {
	b.limit = limit
	b.cond = sync.NewCond(&b.mu)
}

// acquire waits until n more bytes fit; a request larger than the whole
// budget is admitted when nothing else is held. While it waits, parked is
// set; it reports whether it waited.
func (b *byteBudget) acquire(n uint64, parked *atomic.Bool) bool {
	if n == 0 {
		return false
	}
	b.mu.Lock()
	waited := false
	for b.used > 0 && b.used+n > b.limit {
		if !waited {
			waited = true
			parked.Store(true)
		}
		b.cond.Wait()
	}
	b.used += n
	b.mu.Unlock()
	if waited {
		parked.Store(false)
	}
	return waited
}

func (b *byteBudget) release(n uint64) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	b.mu.Unlock()
	b.cond.Broadcast()
}

// Buffer pools by power-of-two size class, 4 KiB to MaxPayload.
const (
	minBufShift = 12
	bufClasses  = 26 - minBufShift // 1<<25 == MaxPayload
)

var bufPools [bufClasses]sync.Pool

func bufClass(n int) int { return max(0, bits.Len(uint(n-1))-minBufShift) }

// getBuf returns a buffer of length n (nil for 0).
func getBuf(n int) *[]byte {
	if n <= 0 {
		return nil
	}
	class := bufClass(n)
	if class >= bufClasses {
		b := make([]byte, n)
		return &b
	}
	if v := bufPools[class].Get(); v != nil {
		b := v.(*[]byte)
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, 1<<(class+minBufShift))
	return &b
}

func putBuf(b *[]byte) {
	if b == nil {
		return
	}
	c := cap(*b)
	class := bufClass(c)
	if class < bufClasses && c == 1<<(class+minBufShift) {
		bufPools[class].Put(b)
	}
}

// serverMetrics are one server's Prometheus metrics.
type serverMetrics struct {
	ops      *prometheus.CounterVec
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec
	fenced   prometheus.Counter
	rejected prometheus.Counter
	waiting  prometheus.Gauge
	checksum prometheus.Counter
	// deleteProgress is the share of the volume a snapshot deletion has
	// gone through, while it runs.
	deleteProgress *prometheus.GaugeVec

	opsByOp      [opLimit]prometheus.Counter
	durationByOp [opLimit]prometheus.Observer
}

func newServerMetrics() *serverMetrics {
	m := &serverMetrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_replica_ops_total",
			Help: "Requests executed by the replica server, by op.",
		}, []string{"op"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cairn_replica_op_duration_seconds",
			Help:    "Time the replica server took to execute a request, by op, including its wait for the disk scheduler.",
			Buckets: prometheus.ExponentialBuckets(20e-6, 2, 18),
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_replica_op_errors_total",
			Help: "Requests that failed, by op and status.",
		}, []string{"op", "status"}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_replica_fenced_total",
			Help: "Requests refused because their epoch was older than the replica's.",
		}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_replica_rejected_requests_total",
			Help: "Requests refused before execution: malformed, unknown op, or before OPEN.",
		}),
		checksum: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_replica_checksum_errors_total",
			Help: "Requests refused for a checksum mismatch: a write damaged on the wire, or a stored block that no longer matches its sum.",
		}),
		waiting: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cairn_replica_sched_waiting_requests",
			Help: "Data operations (from the network and in process) waiting for the disk scheduler.",
		}),
		deleteProgress: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cairn_replica_snapshot_delete_progress_ratio",
			Help: "Share of the volume a running snapshot deletion has gone through (0 to 1), by volume and snapshot.",
		}, []string{"volume", "snapshot"}),
	}
	for op := Op(1); op < opLimit; op++ {
		m.opsByOp[op] = m.ops.WithLabelValues(op.String())
		m.durationByOp[op] = m.duration.WithLabelValues(op.String())
	}
	return m
}

func (m *serverMetrics) observe(op Op, d time.Duration, err error) {
	m.opsByOp[op].Inc()
	m.durationByOp[op].Observe(d.Seconds())
	if err != nil {
		m.errors.WithLabelValues(op.String(), statusOf(err).String()).Inc()
	}
}

func (m *serverMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.ops, m.duration, m.errors, m.fenced, m.rejected, m.waiting, m.checksum, m.deleteProgress}
}

// roots lists the server's data directories: the default one, then those
// of the other disk types by type.
func (s *Server) roots() []string {
	out := []string{s.dataDir}
	for _, t := range slices.Sorted(maps.Keys(s.typedDirs)) {
		out = append(out, s.typedDirs[t])
	}
	return out
}

// dirFor is the data directory of disk type t ("": the default one).
func (s *Server) dirFor(t string) (string, error) {
	if t == "" {
		return s.dataDir, nil
	}
	if d, ok := s.typedDirs[t]; ok {
		return d, nil
	}
	return "", fmt.Errorf("%w: this node has no data directory of disk type %q", ErrInvalidArgument, t)
}

// dirOf is the data directory that holds replica id: the first that has
// it, else the default one.
func (s *Server) dirOf(id string) string {
	for _, root := range s.roots() {
		if dirExists(filepath.Join(root, id)) {
			return root
		}
	}
	return s.dataDir
}

// Has reports whether replica id has a directory in one of the server's
// data directories, opened or not.
func (s *Server) Has(id string) bool {
	return validateID(id) == nil && dirExists(filepath.Join(s.dirOf(id), id))
}

func dirExists(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.IsDir()
}
