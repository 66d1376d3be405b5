// Package storagenode runs the storage side of one node: the replica server
// that holds this node's replicas, and the realizer that makes the replicas
// on disk match what the volume store says (create the ones placed here that
// may be made blank, report and fail the ones whose data this disk lost,
// delete the ones the store dropped; see identity.go) and rebuilds replicas
// of volumes that no engine serves.
package storagenode

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"

	"github.com/cairn-csi/cairn/internal/pki"
)

// Config configures a storage node.
type Config struct {
	// NodeID is this node's id in the store.
	NodeID string
	// DataDir is the node's data dir; replicas live in DataDir/replicas.
	DataDir string
	// Listen is the replica server's TCP address.
	Listen string
	// TLS, if set, is this node's identity: the replica server speaks
	// mutual TLS (replica.ServerConfig.TLS; nil: plaintext).
	TLS *pki.Credentials
	// FSM is this node's copy of the store's state: the realizer reads it,
	// and runs at each of its changes.
	FSM *meta.FSM
	// Meta reaches the store for writes, and for the linearizable reads
	// that confirm a replica may be deleted.
	Meta *meta.Client
	// Logger receives the node's lines.
	Logger *zap.Logger
	// Registerer receives the replica server's metrics (nil: none).
	Registerer prometheus.Registerer
	// DiskSched is the replica server's disk scheduler (nil: none): every
	// data operation on this node's replicas, from engines anywhere, waits
	// for it. It must not be the QoS scheduler of the engines
	// (attach.Config.Sched): it holds no QoS limits (see
	// replica.ServerConfig.Sched).
	DiskSched *iosched.Scheduler
	// DiskDirs are the node's data directories of disk types other than
	// the default, by type: replicas of volumes of that type live in
	// DIR/replicas (disks.go).
	DiskDirs map[string]string
	// ReservableIOPS is what this node's disks can promise to guaranteed
	// volumes (meta.SetNodeReservable; 0: nothing). The node records it in
	// the store while the store says otherwise (reservable.go).
	ReservableIOPS uint64
	// ChainSoftLimit is the chain depth (layers, the head included) past
	// which this node flattens the layers a restored replica inherited
	// (flatten.go); 0: DefaultChainSoftLimit, negative: never.
	ChainSoftLimit int
	// DedupInterval is how often the node runs its deduplication passes
	// (dedup.go); 0: DefaultDedupInterval, negative: never (the data
	// directories are still probed and recorded).
	DedupInterval time.Duration
	// RecompressInterval is how often the node stores compressed again
	// the extents that small writes left raw (recompress.go); 0:
	// DefaultRecompressInterval, negative: never.
	RecompressInterval time.Duration
}

// Node is a running storage node.
type Node struct {
	cfg    Config
	log    *zap.Logger
	server *replica.Server
	lis    net.Listener
	// engines opens the maintenance engines (set by Start).
	engines *attach.Registry
	// grows counts the replicas the realizer grew (grow).
	grows prometheus.Counter
	// snapshotsTaken and snapshotsDeleted count the snapshot jobs done
	// here (snapshots.go).
	snapshotsTaken, snapshotsDeleted prometheus.Counter
	// flattens counts the flattens done here, flattenProgress shows the
	// running one (flatten.go).
	flattens        prometheus.Counter
	flattenProgress *prometheus.GaugeVec
	// again wakes the realizer early (a snapshot job finished).
	again chan struct{}
	// dedupNow starts the deduplication passes early (DedupNow);
	// dedupMetrics count them (dedup.go).
	dedupNow     chan struct{}
	dedupMetrics dedupMetrics
	recompress   recompressMetrics

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	rebuilds  map[string]context.CancelFunc // volume id → running maintenance rebuild
	snapJobs  map[string]bool               // volume id → a snapshot job runs (snapshots.go)
	snapRetry map[string]retry              // snapshot id → backoff after a failed job
	// flattening: a flatten runs; flattenRetry: replica id → backoff after
	// a failed one; flatteningNow: replica id → the running one's progress,
	// for recordUsage (flatten.go).
	flattening    bool
	flattenRetry  map[string]retry
	flatteningNow map[string]meta.LayerProgress
	// dedupFound: replica id → what the last deduplication pass of its
	// disk found it shares and saves (dedup.go).
	dedupFound map[string]sharing

	// reported remembers the lost replicas already reported at Error level
	// that stay as they are (the last healthy replica of their volume), so
	// that each is reported once, not at every pass. Used by the realizer
	// goroutine only.
	reported map[string]bool

	// here is the realizer's view of the volumes with a replica on this
	// node, kept from its FSM's watch (meta.FSM.WatchEvent): a pass costs
	// what changed and what lives here, not every volume in the store.
	// Used by the realizer goroutine only.
	here placedVolumes
}

// placedVolumes follows the volumes with a replica on one node.
type placedVolumes struct {
	index uint64
	vols  map[string]*meta.Volume
}

// update applies the changes of f since the last update.
func (p *placedVolumes) update(f *meta.FSM, node string) {
	ev := f.WatchEvent(p.index, node, "")
	if ev == nil {
		return
	}
	if ev.Reset {
		p.vols = map[string]*meta.Volume{}
	}
	for _, v := range ev.Volumes {
		p.vols[v.ID] = v
	}
	for _, id := range ev.Removed {
		delete(p.vols, id)
	}
	p.index = ev.Index
}

// storeEpoch is the epoch this node's copy of the store gives the volume of
// replica id: the replica server refuses claims far above it.
func (n *Node) storeEpoch(id string) (epoch uint64, known bool) {
	vid := meta.VolumeOfReplica(id)
	n.cfg.FSM.View(func(s *meta.State) {
		if v, ok := s.Volumes[vid]; ok {
			epoch, known = v.Epoch, true
		}
	})
	return epoch, known
}

// placed is one replica the store places on this node, with its volume.
type placed struct {
	vol *meta.Volume
	rep meta.Replica
}

// New opens the replica server's listener and the server, without serving
// yet: the node's engine registry needs the server (its Local) before Start
// can be given the registry.
func New(cfg Config) (*Node, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("replica server listen on %s: %w", cfg.Listen, err)
	}
	log := cfg.Logger.With(zap.String("node_id", cfg.NodeID))
	n := &Node{cfg: cfg, log: log.Named("storage"), lis: lis, rebuilds: map[string]context.CancelFunc{}, reported: map[string]bool{},
		snapJobs: map[string]bool{}, snapRetry: map[string]retry{}, again: make(chan struct{}, 1),
		dedupNow: make(chan struct{}, 1), dedupMetrics: newDedupMetrics(), recompress: newRecompressMetrics(),
		flattenRetry: map[string]retry{}, flatteningNow: map[string]meta.LayerProgress{}, dedupFound: map[string]sharing{},
		flattens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_storage_flattens_total",
			Help: "Replicas this node flattened: the layers a restore shared with its source replaced by one of the replica's own.",
		}),
		flattenProgress: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cairn_storage_flatten_progress_ratio",
			Help: "Progress of the flatten running on a replica of this node, from 0 to 1 (absent when none runs).",
		}, []string{"volume_id", "replica_id"}),
		grows: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_storage_replica_grows_total",
			Help: "Replicas this node grew to their volume's new size (expanded while no engine served them, or while the node was down).",
		}),
		snapshotsTaken: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_storage_snapshots_taken_total",
			Help: "Snapshots this node took for the store (of volumes it serves) and recorded ready.",
		}),
		snapshotsDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_storage_snapshots_deleted_total",
			Help: "Deleted snapshots whose layers this node removed from their volume's replicas.",
		})}
	typed := map[string]string{}
	for t, dir := range cfg.DiskDirs {
		typed[t] = filepath.Join(dir, "replicas")
		if err := os.MkdirAll(typed[t], 0o755); err != nil {
			lis.Close()
			return nil, fmt.Errorf("data directory of disk type %s: %w", t, err)
		}
	}
	var epochOf func(string) (uint64, bool)
	if cfg.FSM != nil {
		epochOf = n.storeEpoch
	}
	n.server = replica.NewServerWithConfig(replica.ServerConfig{
		Logger: log, DataDir: filepath.Join(cfg.DataDir, "replicas"), TypedDirs: typed,
		Sched: cfg.DiskSched, VolumeOf: meta.VolumeOfReplica, TLS: cfg.TLS, EpochOf: epochOf,
	})
	if cfg.Registerer != nil {
		cs := append(n.server.Collectors(), n.grows, n.snapshotsTaken, n.snapshotsDeleted, n.flattens, n.flattenProgress, &usageCollector{server: n.server})
		for _, c := range append(append(cs, n.dedupMetrics.collectors()...), n.recompress.collectors()...) {
			if err := cfg.Registerer.Register(c); err != nil {
				lis.Close()
				return nil, err
			}
		}
	}
	n.ctx, n.cancel = context.WithCancel(context.Background())
	return n, nil
}

// Start serves the replicas and starts realizing the store's state; the
// maintenance rebuilds open their engines through engines.
func (n *Node) Start(engines *attach.Registry) {
	n.engines = engines
	n.wg.Add(3)
	go func() { defer n.wg.Done(); n.dedupLoop() }()
	n.wg.Add(1)
	go func() { defer n.wg.Done(); n.recompressLoop() }()
	go func() {
		defer n.wg.Done()
		if err := n.server.Serve(n.lis); err != nil && !errors.Is(err, replica.ErrServerClosed) {
			n.log.Error("replica server stopped", zap.Error(err))
		}
	}()
	go func() { defer n.wg.Done(); n.realizeLoop() }()
}

// Addr is the replica server's address.
func (n *Node) Addr() string { return n.lis.Addr().String() }

// Server is the replica server.
func (n *Node) Server() *replica.Server { return n.server }

// Close stops the realizer, the rebuilds and the replica server (or, if
// Start never ran, the listener and the server).
func (n *Node) Close() error {
	n.cancel()
	err := n.server.Close() // ends Serve; rebuilds here fail and stop
	if n.engines == nil {
		_ = n.lis.Close() // nothing served it; its error says nothing more
	}
	n.wg.Wait()
	return err
}

// realizeLoop runs realize after every change of the store's state (and
// every few seconds, to retry what failed).
func (n *Node) realizeLoop() {
	var lastUsage, lastDisks time.Time
	for {
		changed := n.cfg.FSM.Changed()
		n.realize()
		n.runSnapshots()
		n.runFlattens()
		n.recordReservable()
		n.recordFeatures()
		if time.Since(lastDisks) >= usageInterval && n.recordDisks() {
			lastDisks = time.Now()
		}
		if time.Since(lastUsage) >= usageInterval {
			n.recordUsage()
			n.recordSpace()
			lastUsage = time.Now()
		}
		select {
		case <-n.ctx.Done():
			return
		case <-changed:
		case <-n.again:
		case <-time.After(3 * time.Second):
		}
	}
}

// desired returns the replicas the store places on this node (by id), the
// unattached volumes with a replica rebuilding here, and the minIOPS
// reservation of each volume with a replica here. It reads this node's own
// copy of the store (its FSM, through its watch), which woke the realizer:
// realizing costs the leader nothing. That copy can be far behind right after a restart (raft
// replays the log only once the leader tells it the commit index). Acting on
// it is safe for what realize does with the store, each a compare-and-set
// that a stale copy fails (recording a generation, failing a replica) or
// that an engine re-reads linearizably (a maintenance rebuild), and for a
// blank copy made for a replica placed here; not for deleting a replica,
// which could be the one holding the data: dropped asks the leader first.
func (n *Node) desired() (map[string]placed, []*meta.Volume, map[string]uint64) {
	want := map[string]placed{}
	var rebuild []*meta.Volume
	reserve := map[string]uint64{}
	n.here.update(n.cfg.FSM, n.cfg.NodeID)
	for _, id := range slices.Sorted(maps.Keys(n.here.vols)) {
		v := n.here.vols[id] // the watch's own copy: nothing refers into the FSM
		for _, r := range v.Replicas {
			if r.Node != n.cfg.NodeID {
				continue
			}
			want[r.ID] = placed{vol: v, rep: r}
			if r.State == meta.ReplicaRebuilding && v.Attachment == nil {
				rebuild = append(rebuild, v)
			}
			// Bad parameters reserve nothing here; the engine says why.
			if spec, err := v.Spec(); err == nil && spec.QoS.MinIOPS > 0 {
				reserve[v.ID] = spec.QoS.MinIOPS
			}
		}
	}
	return want, rebuild, reserve
}

// dropped confirms with the leader, by a linearizable read of the volume,
// that the store no longer places replica id on this node: its volume is
// gone or deleted, or has no replica of that id here. This node's copy of
// the store may say so only because it is behind (see desired).
func (n *Node) dropped(id string) bool {
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	v, err := n.cfg.Meta.Volume(ctx, meta.VolumeOfReplica(id))
	if errors.Is(err, meta.ErrNotFound) {
		return true
	}
	if err != nil {
		if n.ctx.Err() == nil {
			n.log.Debug("cannot confirm a replica was dropped; will retry", zap.String("replica_id", id), zap.Error(err))
		}
		return false
	}
	for _, r := range v.Replicas {
		if r.ID == id && r.Node == n.cfg.NodeID {
			return false
		}
	}
	return true
}

// realize brings each replica placed here in line with the store (see
// decide), deletes dropped ones, gives the disk scheduler the volumes'
// reservations, and starts rebuilds of unattached volumes.
func (n *Node) realize() {
	want, rebuild, reserve := n.desired()
	n.server.SetReservations(reserve)
	have, err := n.server.List()
	if err != nil {
		n.log.Warn("cannot list replicas", zap.Error(err))
		if have == nil {
			// The replicas directory cannot be read: nothing can be told
			// about what is on disk, so nothing is created or failed.
			return
		}
	}
	onDisk := map[string]replica.Info{}
	for _, info := range have {
		onDisk[info.ID] = info
		if _, ok := want[info.ID]; ok || !n.dropped(info.ID) {
			continue
		}
		// The store (as of a linearizable read) no longer places this
		// replica here: its volume was deleted or it was replaced.
		if err := n.server.Delete(info.ID); err != nil {
			n.log.Warn("cannot delete replica", zap.String("replica_id", info.ID), zap.Error(err))
			continue
		}
		n.log.Info("replica deleted", zap.String("replica_id", info.ID))
	}
	for id, p := range want {
		info, present := onDisk[id]
		if !present && n.unopenable(id) {
			// Its directory is there but List could not open it (busy, out
			// of descriptors, an I/O error; said above): not a lost copy.
			// Neither a blank copy nor an ejection; an engine that cannot
			// open it either ejects it through its claim.
			continue
		}
		act := decide(p.rep.State, p.rep.Generation, present, info.Generation)
		switch act {
		case actCreate:
			n.create(p)
		case actRecord:
			n.record(p, info.Generation)
		case actFail:
			n.fail(p, present, info.Generation)
		}
		if present && (act == actNone || act == actRecord) && info.Size < p.vol.ReplicaBytes() {
			n.grow(p, info.Size)
		}
	}
	for _, v := range rebuild {
		n.startRebuild(v)
	}
}

// create makes a blank copy of replica p (with a new generation) and
// records its generation.
func (n *Node) create(p placed) {
	if p.rep.Source != "" {
		n.restore(p)
		return
	}
	spec, _ := p.vol.Spec() // a bad spec reads as the default type; the engine says what is wrong
	r, err := n.server.CreateWith(p.rep.ID, p.vol.ReplicaBytes(), replica.CreateOptions{Checksums: p.vol.Checksummed(), DiskType: spec.DiskType,
		Compression: spec.Compression != ""})
	if err != nil {
		n.log.Warn("cannot create replica", zap.String("volume_id", p.vol.ID), zap.String("replica_id", p.rep.ID), zap.Error(err))
		return
	}
	n.log.Info("replica created", zap.String("volume_id", p.vol.ID), zap.String("replica_id", p.rep.ID),
		zap.String("state", string(p.rep.State)), zap.Uint64("size", p.vol.ReplicaBytes()), zap.String("generation", r.Generation()),
		zap.Bool("checksums", r.Checksummed()))
	n.record(p, r.Generation())
}

// restore makes replica p of a restored volume from the snapshot's layers
// in replica p.rep.Source on this node, by hard links (RestoreVolume), and
// records its generation. If the source replica or its snapshot is not
// here any more, the replica is failed, to be rebuilt from the volume's
// other replicas; never made blank: it stands for the snapshot's data.
func (n *Node) restore(p placed) {
	log := n.log.With(zap.String("volume_id", p.vol.ID), zap.String("replica_id", p.rep.ID),
		zap.String("source", p.rep.Source), zap.String("snapshot", p.vol.RestoredFrom))
	r, err := n.server.CreateFromSnapshot(p.rep.ID, p.rep.Source, p.vol.RestoredFrom, p.vol.ReplicaBytes())
	switch {
	case errors.Is(err, replica.ErrNotFound):
		log.Error("cannot restore a replica here: its source replica or the snapshot is not on this node", zap.Error(err))
		n.fail(p, false, "")
		return
	case err != nil:
		log.Warn("cannot restore replica from a snapshot; will retry", zap.Error(err))
		return
	}
	log.Info("replica restored from a snapshot", zap.Uint64("size", r.Size()), zap.String("generation", r.Generation()))
	n.record(p, r.Generation())
}

// grow brings replica p, found at size from, to its volume's size: the
// volume was expanded while no engine served it, or while this node was
// down. An engine grows its replicas itself (and again at every claim, so
// a replica never serves at another size than its volume's); this makes a
// replica of an unattached volume ready before the next attach, and one
// that missed an expansion ready for its rebuild. The size comes from this
// node's copy of the store, which may lag but never names a size the store
// did not record: sizes only grow.
func (n *Node) grow(p placed, from uint64) {
	log := n.log.With(zap.String("volume_id", p.vol.ID), zap.String("replica_id", p.rep.ID), zap.Uint64("epoch", p.vol.Epoch),
		zap.Uint64("previous_size", from), zap.Uint64("size", p.vol.ReplicaBytes()))
	r, err := n.server.Get(p.rep.ID)
	if err == nil {
		err = r.GrowTo(p.vol.ReplicaBytes())
	}
	if err != nil {
		log.Warn("cannot grow replica to its volume's size; will retry", zap.Error(err))
		return
	}
	n.grows.Inc()
	log.Info("replica grown to its volume's size")
}

// record asks the store to record gen as the generation of replica p. A
// refusal (someone recorded another meanwhile, the replica changed state)
// is looked at again at the next pass, from a fresh read.
func (n *Node) record(p placed, gen string) {
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	log := n.log.With(zap.String("volume_id", p.vol.ID), zap.String("replica_id", p.rep.ID))
	_, err := n.cfg.Meta.Apply(ctx, &meta.SetReplicaGeneration{VolumeID: p.vol.ID, ReplicaID: p.rep.ID, Generation: gen, Expect: p.rep.Generation})
	if err != nil {
		log.Debug("replica generation not recorded; will look again", zap.String("generation", gen), zap.Error(err))
		return
	}
	log.Info("replica generation recorded", zap.String("generation", gen), zap.String("previous_generation", p.rep.Generation),
		zap.String("state", string(p.rep.State)))
}

// fail reports that this disk no longer holds the copy of replica p that
// the store trusts with the volume's data (it is missing, or another copy
// is there), and marks the replica failed so that it is rebuilt from one
// that holds the data. The last healthy replica of a volume cannot be
// failed: it stays as it is, and no blank copy is made in its place.
func (n *Node) fail(p placed, present bool, found string) {
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	log := n.log.With(zap.String("volume_id", p.vol.ID), zap.String("replica_id", p.rep.ID), zap.Uint64("epoch", p.vol.Epoch),
		zap.Bool("on_disk", present), zap.String("generation_recorded", p.rep.Generation), zap.String("generation_found", found))
	res, err := n.cfg.Meta.Apply(ctx, &meta.SetReplicaState{VolumeID: p.vol.ID, ReplicaID: p.rep.ID, State: meta.ReplicaFailed, ExpectEpoch: p.vol.Epoch})
	switch {
	case err == nil:
		log.Error("replica lost its data on this node (its directory is missing or holds another copy); marked failed, to be rebuilt from a replica that holds the data",
			zap.Uint64("new_epoch", res.Volume.Epoch))
	case errors.Is(err, meta.ErrQuorumLost):
		if !n.reported[p.rep.ID] {
			n.reported[p.rep.ID] = true
			log.Error("replica lost its data on this node, and it is the volume's last healthy replica: left as it is, no blank copy made; the volume's data is not on this node any more", zap.Error(err))
		}
	default:
		log.Debug("cannot mark a replica that lost its data failed; will retry", zap.Error(err))
	}
}

// startRebuild runs a maintenance engine for an unattached volume until the
// rebuild of its replica here is done. If the volume is attached meanwhile,
// the new engine claims a higher epoch, this one is fenced and stops, and the
// attached engine finishes the rebuild.
func (n *Node) startRebuild(v *meta.Volume) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.rebuilds[v.ID]; ok || n.ctx.Err() != nil {
		return
	}
	ctx, cancel := context.WithCancel(n.ctx)
	n.rebuilds[v.ID] = cancel
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		defer func() {
			n.mu.Lock()
			delete(n.rebuilds, v.ID)
			n.mu.Unlock()
			cancel()
		}()
		done := make(chan engine.RebuildStats, 1)
		e, err := n.engines.OpenMaintenance(ctx, v.ID, func(s engine.RebuildStats) { done <- s })
		if err != nil {
			n.log.Info("maintenance rebuild not started", zap.String("volume_id", v.ID), zap.Error(err))
			return
		}
		select {
		case <-done:
		case <-ctx.Done():
		case <-e.Fenced():
		}
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		if err := n.engines.Release(cctx, e); errors.Is(err, attach.ErrBusy) {
			n.log.Warn("maintenance engine left open: another open or close of the volume runs", zap.String("volume_id", v.ID))
		}
		ccancel()
	}()
}

// unopenable reports whether replica id has a directory in one of this
// node's data directories although the replica server could not open it.
func (n *Node) unopenable(id string) bool { return n.server.Has(id) }
