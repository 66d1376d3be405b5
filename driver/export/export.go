// Package export serves attached volumes over NBD on a node, as the volume
// store's attachments say: a volume attached to this node with an NBD socket
// gets an engine and an NBD server on that unix socket; when the attachment
// goes away or moves, the export stops (flushing first). This is what
// `cairn ctl volume export` asks for.
package export

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/driver/frontend/nbd"
	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Config configures the export manager.
type Config struct {
	NodeID string
	FSM    *meta.FSM
	Meta   *meta.Client
	Logger *zap.Logger
	// RebuildBytesPerSecond paces rebuilds done by the engines (0: unpaced).
	RebuildBytesPerSecond uint64
	// ReplicaDeadline is the engines' engine.Config.ReplicaDeadline (0: its default).
	ReplicaDeadline time.Duration
	// ScrubInterval is the engines' engine.Config.ScrubInterval (0: scrub only when asked).
	ScrubInterval time.Duration
	// Sched is the node's I/O scheduler (nil: none).
	Sched *iosched.Scheduler
	// Local is this node's replica server, for in-process access to the
	// local replica (nil: over TCP like the others).
	Local *replica.Server
	// Registerer, if set, gets each export's NBD metrics (cairn_nbd_*,
	// labelled with the volume) while the export runs.
	Registerer prometheus.Registerer
}

// Manager keeps the node's NBD exports in line with the store.
type Manager struct {
	cfg Config
	log *zap.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	closed  bool
	exports map[string]*running // volume id → export
}

type running struct {
	socket string
	epoch  uint64
	engine *engine.Engine
	server *nbd.Server
	done   chan struct{} // closed when the engine is fenced
	stop   chan struct{} // closed when the export stops
}

// Start begins watching the store.
func Start(cfg Config) *Manager {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	m := &Manager{cfg: cfg, log: cfg.Logger.Named("export").With(zap.String("node_id", cfg.NodeID)), exports: map[string]*running{}}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.wg.Add(1)
	go func() { defer m.wg.Done(); m.loop() }()
	return m
}

// Close stops every export (flushing each engine) and the watch.
func (m *Manager) Close() {
	m.cancel()
	m.mu.Lock()
	m.closed = true
	for id, r := range m.exports {
		m.stop(id, r, "node agent stopping")
	}
	m.mu.Unlock()
	m.wg.Wait() // the watch loop, and each export's serve and fence watch
}

func (m *Manager) loop() {
	for {
		changed := m.cfg.FSM.Changed()
		m.reconcile()
		select {
		case <-m.ctx.Done():
			return
		case <-changed:
		case <-time.After(2 * time.Second):
		}
	}
}

// reconcile starts the exports the store asks for and stops the others.
func (m *Manager) reconcile() {
	want := map[string]*meta.Volume{}
	m.cfg.FSM.View(func(s *meta.State) {
		for _, v := range s.SortedVolumes() {
			if a := v.Attachment; a != nil && a.Node == m.cfg.NodeID && a.NBDSocket != "" {
				want[v.ID] = v.Clone()
			}
		}
	})
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	for id, r := range m.exports {
		v, ok := want[id]
		select {
		case <-r.done:
			ok = false // the engine was fenced: a newer attachment exists
		default:
		}
		if !ok || v.Attachment.NBDSocket != r.socket {
			m.stop(id, r, "attachment changed")
		}
	}
	for id, v := range want {
		if _, ok := m.exports[id]; ok {
			continue
		}
		m.start(v)
	}
}

// start opens the engine and serves it. Called with m.mu held; a failure
// is retried at the next reconcile.
func (m *Manager) start(v *meta.Volume) {
	log := m.log.With(zap.String("volume_id", v.ID), zap.String("socket", v.Attachment.NBDSocket))
	ctx, cancel := context.WithTimeout(m.ctx, 30*time.Second)
	defer cancel()
	e, err := engine.Open(ctx, engine.Config{VolumeID: v.ID, NodeID: m.cfg.NodeID, Meta: m.cfg.Meta, Logger: m.cfg.Logger,
		RebuildBytesPerSecond: m.cfg.RebuildBytesPerSecond, ReplicaDeadline: m.cfg.ReplicaDeadline, ScrubInterval: m.cfg.ScrubInterval, Sched: m.cfg.Sched, Local: m.cfg.Local})
	if err != nil {
		if !errors.Is(err, engine.ErrNotAttached) {
			log.Warn("cannot start engine for export", zap.Error(err))
		}
		return
	}
	lis, err := nbd.ListenUnix(v.Attachment.NBDSocket)
	if err != nil {
		log.Warn("cannot listen on NBD socket", zap.Error(err))
		_ = e.Close(ctx)
		return
	}
	srv := nbd.NewServer(log.Named("nbd"), "", e, nbd.Options{ReadOnly: v.Attachment.ReadOnly,
		MetricLabels: map[string]string{"volume_id": v.ID}})
	m.register(srv)
	r := &running{socket: v.Attachment.NBDSocket, epoch: e.Epoch(), engine: e, server: srv, done: make(chan struct{}), stop: make(chan struct{})}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		select {
		case <-e.Fenced():
			close(r.done)
			m.log.Warn("export fenced by a newer attachment", zap.String("volume_id", v.ID))
		case <-r.stop:
		}
	}()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		_ = srv.Serve(lis)
	}()
	m.exports[v.ID] = r
	log.Info("volume exported over NBD", zap.Uint64("epoch", r.epoch), zap.Uint64("size", e.Size()))
}

// register adds srv's metrics to the registry. A failure (a collector of
// the same volume still registered) costs the metrics, not the export.
func (m *Manager) register(srv *nbd.Server) {
	if m.cfg.Registerer == nil {
		return
	}
	for _, c := range srv.Metrics().Collectors() {
		if err := m.cfg.Registerer.Register(c); err != nil {
			m.log.Warn("cannot register NBD metrics", zap.Error(err))
		}
	}
}

// stop closes the NBD server, then flushes and closes the engine. Called
// with m.mu held.
func (m *Manager) stop(id string, r *running, why string) {
	close(r.stop)
	_ = r.server.Close()
	if m.cfg.Registerer != nil {
		for _, c := range r.server.Metrics().Collectors() {
			m.cfg.Registerer.Unregister(c)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := r.engine.Close(ctx)
	delete(m.exports, id)
	m.log.Info("export stopped", zap.String("volume_id", id), zap.String("reason", why), zap.Error(err))
}

// Exports lists the volume ids exported here.
func (m *Manager) Exports() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for id := range m.exports {
		out = append(out, id)
	}
	return out
}
