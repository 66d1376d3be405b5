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
	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
)

// Config configures the export manager.
type Config struct {
	NodeID string
	// FSM is this node's copy of the store's state, watched for attachments.
	FSM *meta.FSM
	// Engines opens and closes the exports' engines.
	Engines *attach.Registry
	Logger  *zap.Logger
	// Registerer, if set, gets each export's NBD metrics (cairn_nbd_*,
	// labelled with the volume) while the export runs.
	Registerer prometheus.Registerer
}

// Manager keeps the node's NBD exports in line with the store.
//
// Each start or stop runs in a goroutine of its own, so that an engine
// slow to open (a silent replica: up to openTimeout) or to close holds up
// only its own volume's export.
type Manager struct {
	cfg Config
	log *zap.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// kick asks the watch loop for another reconcile: a start or stop has
	// ended, and the store may have changed for that volume meanwhile.
	kick chan struct{}

	// mu guards the fields below. It is held only to read or change them,
	// never across an engine's open or close or an NBD server's stop.
	mu      sync.Mutex
	closed  bool
	exports map[string]*running // volume id → export
	busy    map[string]bool     // volume ids with a start or stop running
}

// openTimeout bounds an export's engine open; a failure is retried at a
// later reconcile.
const openTimeout = 30 * time.Second

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
	m := &Manager{cfg: cfg, log: cfg.Logger.Named("export").With(zap.String("node_id", cfg.NodeID)),
		kick: make(chan struct{}, 1), exports: map[string]*running{}, busy: map[string]bool{}}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	m.wg.Add(1)
	go func() { defer m.wg.Done(); m.loop() }()
	return m
}

// Close stops every export (flushing each engine) and the watch. A start
// still opening its engine gives up (its context ends).
func (m *Manager) Close() {
	m.cancel()
	m.mu.Lock()
	m.closed = true
	stopping := m.exports
	m.exports = map[string]*running{}
	m.mu.Unlock()
	for id, r := range stopping {
		m.stop(id, r, "node agent stopping")
	}
	m.wg.Wait() // the watch loop, the starts and stops, each export's serve and fence watch
}

func (m *Manager) loop() {
	for {
		changed := m.cfg.FSM.Changed()
		m.reconcile()
		select {
		case <-m.ctx.Done():
			return
		case <-changed:
		case <-m.kick:
		case <-time.After(2 * time.Second):
		}
	}
}

// change is what one volume's export needs: stop the running one, start
// a new one, or both in that order.
type change struct {
	old   *running
	why   string
	start *meta.Volume
}

// reconcile starts the exports the store asks for and stops the others. A
// volume whose start or stop still runs is left alone until it ends.
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
	changes := map[string]*change{}
	for id, r := range m.exports {
		v, ok := want[id]
		select {
		case <-r.done:
			ok = false // the engine was fenced: a newer attachment exists
		default:
		}
		if !ok || v.Attachment.NBDSocket != r.socket {
			delete(m.exports, id)
			changes[id] = &change{old: r, why: "attachment changed"}
		}
	}
	for id, v := range want {
		if _, ok := m.exports[id]; ok || m.busy[id] {
			continue
		}
		c := changes[id]
		if c == nil {
			c = &change{}
			changes[id] = c
		}
		c.start = v
	}
	for id, c := range changes {
		m.busy[id] = true
		m.wg.Add(1)
		go func() { defer m.wg.Done(); m.apply(id, c) }()
	}
}

// apply stops and starts one volume's export as c says, then records the
// new export (or stops it again, if the manager closed meanwhile).
func (m *Manager) apply(id string, c *change) {
	if c.old != nil {
		m.stop(id, c.old, c.why)
	}
	var r *running
	if c.start != nil {
		r = m.start(c.start)
	}
	m.mu.Lock()
	delete(m.busy, id)
	closed := m.closed
	if r != nil && !closed {
		m.exports[id] = r
	}
	m.mu.Unlock()
	if r != nil && closed {
		m.stop(id, r, "node agent stopping")
		return
	}
	// Reconciles skipped this volume while it was busy: look again now.
	// Not after a failed start, which the next change or the periodic
	// reconcile retries (an immediate retry would spin on a fast failure).
	if r != nil || c.start == nil {
		select {
		case m.kick <- struct{}{}:
		default:
		}
	}
}

// start opens the engine and serves it; nil if it cannot (retried at a
// later reconcile).
func (m *Manager) start(v *meta.Volume) *running {
	log := m.log.With(zap.String("volume_id", v.ID), zap.String("socket", v.Attachment.NBDSocket))
	ctx, cancel := context.WithTimeout(m.ctx, openTimeout)
	defer cancel()
	e, err := m.cfg.Engines.Open(ctx, v.ID)
	if err != nil {
		if !errors.Is(err, engine.ErrNotAttached) && m.ctx.Err() == nil {
			log.Warn("cannot start engine for export", zap.Error(err))
		}
		return nil
	}
	lis, err := nbd.ListenUnix(v.Attachment.NBDSocket)
	if err != nil {
		log.Warn("cannot listen on NBD socket", zap.Error(err))
		_ = m.cfg.Engines.Release(ctx, e)
		return nil
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
	log.Info("volume exported over NBD", zap.Uint64("epoch", r.epoch), zap.Uint64("size", e.Size()))
	return r
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

// stop closes the NBD server, then flushes and closes the engine. The
// caller has taken r out of m.exports.
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
	err := m.cfg.Engines.Release(ctx, r.engine)
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
