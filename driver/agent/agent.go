// Package agent assembles a node agent: the volume store member and its meta
// API, the two I/O schedulers, the storage node (replica server and
// realizer), the node's engine registry, the NBD exports, the CSI Identity
// and Node services, and the metrics endpoint. `cairn node` parses flags
// into a Config and runs Start; a test can start an agent in process the
// same way.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/driver/csi"
	"github.com/cairn-csi/cairn/driver/export"
	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/storagenode"
)

// Config configures a node agent. `cairn node` binds a flag to each field
// (cmd/cairn/node.go), where their defaults are.
type Config struct {
	// ID names this node; it is also its raft server id.
	ID string
	// DataDir holds the raft log, snapshots and replicas.
	DataDir string
	// DiskDirs are data directories of disk types other than the default,
	// by type (storagenode.Config.DiskDirs).
	DiskDirs map[string]string
	// NoDefaultDisk: DataDir holds state only; no replica of the default
	// disk type is placed here (the heartbeat reports no capacity).
	NoDefaultDisk bool
	// RaftAddr is the raft transport's listen address.
	RaftAddr string
	// RaftAdvertise is the raft address peers dial (default: RaftAddr).
	RaftAdvertise string
	// APIAddr is the meta API's listen address.
	APIAddr string
	// APIAdvertise is the meta API address others dial (default: APIAddr).
	APIAdvertise string
	// MetricsAddr serves Prometheus /metrics; empty disables it.
	MetricsAddr string
	// Pprof adds Go's /debug/pprof handlers to the metrics address, for
	// profiling a running agent (off by default: they cost nothing idle,
	// but a profile is not something to leave open to everyone).
	Pprof bool
	// DataAddr is the replica server's listen (and advertised) address.
	DataAddr string
	// RebuildBytesPerSecond paces rebuild copies while the node has
	// foreground I/O (0: unpaced; engine.Config).
	RebuildBytesPerSecond uint64
	// ReplicaDeadline: see engine.Config.ReplicaDeadline.
	ReplicaDeadline time.Duration
	// ScrubInterval: see engine.Config.ScrubInterval.
	ScrubInterval time.Duration
	// ChainSoftLimit: see storagenode.Config.ChainSoftLimit.
	ChainSoftLimit int
	// DedupInterval: see storagenode.Config.DedupInterval.
	DedupInterval time.Duration
	// RecompressInterval: see storagenode.Config.RecompressInterval.
	RecompressInterval time.Duration
	// ReservableIOPS: see storagenode.Config.ReservableIOPS.
	ReservableIOPS uint64
	// StaleReplicaTimeout is how long a replica's node may be down before the
	// replica is replaced elsewhere (volumes may override it).
	StaleReplicaTimeout time.Duration
	// TombstoneRetention is how long the store keeps a deleted volume
	// before the leader purges it (0: meta.DefaultTombstoneRetention).
	TombstoneRetention time.Duration
	// Zone and Region are topology labels used by placement.
	Zone, Region string
	// BootstrapExpect forms a new cluster of that many members.
	BootstrapExpect int
	// Peers are the meta API addresses of the other first members.
	Peers []string
	// Join lists meta API addresses of a running cluster to join.
	Join []string
	// RaftTimeoutMultiplier scales raft's timeouts (1 = library defaults).
	RaftTimeoutMultiplier float64
	// HeartbeatInterval is how often the node reports to the leader.
	HeartbeatInterval time.Duration
	// NodeDownAfter is how long without heartbeats before a node is down.
	NodeDownAfter time.Duration
	// CSIEndpoint serves the CSI Identity and Node services ("" = off).
	CSIEndpoint string
	// CSIAllowedRoots are the directories staging and target paths may be in.
	CSIAllowedRoots []string
	// MaxVolumes bounds the volumes staged on this node (0 = no limit).
	MaxVolumes int64
	// CSIStateDir holds the FUSE mount that serves the staged volumes
	// ("" = DataDir/csi). On Kubernetes it must be on a mount shared with
	// the host, so that a restarted container finds the mount again.
	CSIStateDir string
	// FDHolder is the unix socket of the node's descriptor holder (`cairn
	// fuse-holder`), which keeps the staged volumes' FUSE connection
	// across a restart of the agent ("" = none; csi.NodeConfig.Holder).
	FDHolder string
	// NoIOSched bypasses both I/O schedulers, the engines' (QoS limits stop
	// applying) and the replica server's disk scheduler (no fairness, no
	// class priority); it exists to measure what scheduling buys.
	NoIOSched bool
	// IOSchedDepth is how many volume I/Os the scheduler lets run at once
	// on this node; more wait in its queue, in its order.
	IOSchedDepth int
	// IOSchedSpareWhileReserved bounds, in both schedulers, the I/Os on
	// spare capacity in flight while a volume with a reservation is active
	// (iosched.Config.SpareSlotsWhileReserved).
	IOSchedSpareWhileReserved int
	// IOSchedLatencyTolerance turns on the QoS scheduler's latency guard
	// (iosched.Config.LatencyTolerance); 0 is off.
	IOSchedLatencyTolerance float64
	// TLS, if set, is this node's identity from the cluster CA: the meta
	// API, Raft and the replica port then speak mutual TLS and serve each
	// caller what its role allows (docs/security.md). nil runs them in
	// plaintext, open to anyone who reaches them: `cairn node` allows
	// that only with --insecure.
	TLS *pki.Credentials
	// Version is reported by the CSI Identity service and logged.
	Version string
	// Logger is the process's logger; the agent's own lines carry node_id.
	Logger *zap.Logger
}

// Agent is a running node agent.
type Agent struct {
	cfg Config
	log *zap.Logger

	// closers stop what Start started, in reverse order.
	closers []func() error

	store   *meta.Agent
	self    *meta.Client
	engines *attach.Registry
	exports *export.Manager
}

// Start starts every component of the node. On an error it stops what it
// had started.
func Start(cfg Config) (_ *Agent, err error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	// The components add node_id to their lines themselves, so they get
	// base; the agent's own lines (and the CSI server's) get log.
	base := cfg.Logger
	a := &Agent{cfg: cfg, log: base.With(zap.String("node_id", cfg.ID))}
	defer func() {
		if err != nil {
			_ = a.Close()
		}
	}()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(engine.Collectors()...)
	a.store, err = meta.StartAgent(meta.AgentConfig{
		Store: meta.StoreConfig{
			NodeID: cfg.ID, DataDir: cfg.DataDir,
			RaftBind: cfg.RaftAddr, RaftAdvertise: cfg.RaftAdvertise,
			TimeoutMultiplier: cfg.RaftTimeoutMultiplier,
			Logger:            base,
			TLS:               cfg.TLS,
		},
		TLS:     cfg.TLS,
		APIBind: cfg.APIAddr, APIAdvertise: cfg.APIAdvertise,
		Zone: cfg.Zone, Region: cfg.Region, DataAddr: cfg.DataAddr,
		StaleReplicaTimeout: cfg.StaleReplicaTimeout, TombstoneRetention: cfg.TombstoneRetention,
		BootstrapExpect: cfg.BootstrapExpect, Peers: cfg.Peers, Join: cfg.Join,
		HeartbeatInterval: cfg.HeartbeatInterval, NodeDownAfter: cfg.NodeDownAfter,
		Registerer: reg, DiskUsage: defaultDiskUsage(cfg),
	})
	if err != nil {
		return nil, err
	}
	a.closers = append(a.closers, a.store.Close)
	sched, diskSched, err := newSchedulers(cfg, reg)
	if err != nil {
		return nil, err
	}
	a.closers = append(a.closers, func() error { sched.Close(); diskSched.Close(); return nil })
	a.self, err = meta.NewClient([]string{a.store.APIAddr()}, meta.WithTLS(cfg.TLS))
	if err != nil {
		return nil, err
	}
	a.closers = append(a.closers, func() error { a.self.Close(); return nil })
	storage, err := storagenode.New(storagenode.Config{
		NodeID: cfg.ID, DataDir: cfg.DataDir, Listen: cfg.DataAddr, TLS: cfg.TLS, FSM: a.store.Store().FSM(), Meta: a.self,
		Logger: base, Registerer: reg, DiskSched: diskSched, ChainSoftLimit: cfg.ChainSoftLimit, DiskDirs: cfg.DiskDirs,
		DedupInterval: cfg.DedupInterval, RecompressInterval: cfg.RecompressInterval,
		ReservableIOPS: cfg.ReservableIOPS,
	})
	if err != nil {
		return nil, err
	}
	// Every engine of the node, whoever uses it, opens through this one
	// registry (replication/attach).
	a.engines = attach.New(attach.Config{NodeID: cfg.ID, Meta: a.self, TLS: cfg.TLS, Logger: base, RebuildBytesPerSecond: cfg.RebuildBytesPerSecond,
		ReplicaDeadline: cfg.ReplicaDeadline, ScrubInterval: cfg.ScrubInterval, Sched: sched, Local: storage.Server()})
	// The registry closes after the storage node, the last of its users to
	// stop (closers run in reverse): it closes what they left open.
	a.closers = append(a.closers, func() error { return errors.Join(storage.Close(), a.engines.Close()) })
	storage.Start(a.engines)
	a.exports = export.Start(export.Config{NodeID: cfg.ID, FSM: a.store.Store().FSM(), Engines: a.engines, Logger: base, Registerer: reg})
	a.closers = append(a.closers, func() error { a.exports.Close(); return nil })
	if cfg.CSIEndpoint != "" {
		if err := a.serveCSI(); err != nil {
			return nil, err
		}
	}
	if cfg.MetricsAddr != "" {
		if err := a.serveMetrics(reg); err != nil {
			return nil, err
		}
	}
	a.log.Info("node agent running", zap.String("api_addr", a.store.APIAddr()), zap.String("raft_addr", a.store.Store().RaftAddr()),
		zap.String("metrics_addr", cfg.MetricsAddr), zap.String("version", cfg.Version))
	return a, nil
}

// resumeTimeout bounds the opening of the engines of volumes taken over
// from an earlier agent: long enough for the store to elect a leader.
const resumeTimeout = 2 * time.Minute

// serveCSI serves the CSI Identity and Node services on the CSI endpoint.
func (a *Agent) serveCSI() error {
	lis, err := csi.Listen(a.cfg.CSIEndpoint)
	if err != nil {
		return fmt.Errorf("--csi-endpoint: %w", err)
	}
	stateDir := a.cfg.CSIStateDir
	if stateDir == "" {
		stateDir = filepath.Join(a.cfg.DataDir, "csi")
	}
	node := csi.NewNode(csi.NodeConfig{NodeID: a.cfg.ID, Zone: a.cfg.Zone, MaxVolumes: a.cfg.MaxVolumes,
		StateDir: stateDir, AllowedRoots: a.cfg.CSIAllowedRoots, Engines: a.engines,
		Holder: a.cfg.FDHolder, Logger: a.cfg.Logger})
	// Volumes an earlier agent left staged are taken over before kubelet
	// can ask anything about them.
	ctx, cancel := context.WithTimeout(context.Background(), resumeTimeout)
	err = node.Resume(ctx)
	cancel()
	if err != nil {
		node.Close()
		_ = lis.Close()
		return err
	}
	srv := csi.Serve(a.log, lis, &csi.Identity{Version: a.cfg.Version, Meta: a.self, Local: true, Log: a.log}, nil, node)
	a.closers = append(a.closers, func() error { srv.Stop(); node.Close(); return nil })
	return nil
}

// serveMetrics serves /metrics, /healthz and, if asked, /debug/pprof on
// the metrics address.
func (a *Agent) serveMetrics(reg *prometheus.Registry) error {
	lis, err := net.Listen("tcp", a.cfg.MetricsAddr)
	if err != nil {
		return fmt.Errorf("--metrics-addr: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	if a.cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	a.closers = append(a.closers, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx) // a scrape cut short loses nothing
		<-done
		return nil
	})
	return nil
}

// APIAddr is the meta API's address.
func (a *Agent) APIAddr() string { return a.store.APIAddr() }

// Fatal delivers an error that ends the agent (the store member failed).
func (a *Agent) Fatal() <-chan error { return a.store.Fatal() }

// Close stops every component, the last started first, and returns their
// errors (the storage node's, the engine registry's, the store member's).
func (a *Agent) Close() error {
	var errs []error
	for i := len(a.closers) - 1; i >= 0; i-- {
		errs = append(errs, a.closers[i]())
	}
	a.closers = nil
	return errors.Join(errs...)
}

// defaultDiskUsage is what the heartbeat reports of the default disk: nil
// (the store's agent measures DataDir), or nothing when the node has none.
func defaultDiskUsage(cfg Config) func() (uint64, uint64, error) {
	if !cfg.NoDefaultDisk {
		return nil
	}
	return func() (uint64, uint64, error) { return 0, 0, nil }
}
