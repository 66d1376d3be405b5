package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/zapr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"k8s.io/klog/v2"

	"github.com/cairn-csi/cairn/driver/csi"
	"github.com/cairn-csi/cairn/driver/export"
	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/storagenode"
)

// nodeOptions configures `cairn node`.
type nodeOptions struct {
	// ID names this node; it is also its raft server id.
	ID string
	// DataDir holds the raft log, snapshots and (later) replicas.
	DataDir string
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
	// RebuildRate paces rebuild copies ("100Mi" bytes per second; "0" unpaced).
	RebuildRate string
	// ReplicaDeadline: see engine.Config.ReplicaDeadline.
	ReplicaDeadline time.Duration
	// ScrubInterval: see engine.Config.ScrubInterval.
	ScrubInterval time.Duration
	// StaleReplicaTimeout is how long a replica's node may be down before the
	// replica is replaced elsewhere (volumes may override it).
	StaleReplicaTimeout time.Duration
	// TombstoneRetention is how long the store keeps a deleted volume
	// before it purges it (0: meta.DefaultTombstoneRetention).
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
	// LogLevel and LogFormat shape the logs.
	LogLevel, LogFormat string
}

func (o *nodeOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.ID, "id", "", "node id, unique in the cluster (required)")
	fs.StringVar(&o.DataDir, "data-dir", "", "directory for the raft log, snapshots and replicas (required)")
	fs.StringVar(&o.RaftAddr, "raft-addr", "127.0.0.1:7001", "raft transport listen address")
	fs.StringVar(&o.RaftAdvertise, "raft-advertise", "", "raft address peers dial (default: --raft-addr)")
	fs.StringVar(&o.APIAddr, "api-addr", "127.0.0.1:7002", "meta API listen address")
	fs.StringVar(&o.APIAdvertise, "api-advertise", "", "meta API address others dial (default: --api-addr)")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", "127.0.0.1:9102", "address serving Prometheus /metrics (empty: off)")
	fs.BoolVar(&o.Pprof, "pprof", false, "serve Go's /debug/pprof profiles on --metrics-addr")
	fs.StringVar(&o.DataAddr, "data-addr", "127.0.0.1:7003", "replica server listen address (engines on other nodes dial it)")
	fs.StringVar(&o.RebuildRate, "rebuild-rate", "200Mi", "rebuild copy rate in bytes per second (0: unpaced)")
	fs.DurationVar(&o.ReplicaDeadline, "replica-deadline", engine.DefaultReplicaDeadline, "once the write quorum has answered, how long a write waits for a replica that has not before ejecting it (it comes back through a delta rebuild; each such ejection doubles that replica's deadline for a while, so a slow but alive replica is not ejected again and again; negative: wait the full I/O timeout)")
	fs.DurationVar(&o.ScrubInterval, "scrub-interval", 7*24*time.Hour, "how often the engine of an attached volume reads and verifies every block of every replica, repairing what it can (docs/integrity.md; 0: only on demand, cairn ctl volume scrub)")
	fs.DurationVar(&o.StaleReplicaTimeout, "stale-replica-timeout", 10*time.Minute, "replace a replica whose node stays down this long")
	fs.DurationVar(&o.TombstoneRetention, "tombstone-retention", meta.DefaultTombstoneRetention, "how long the store keeps a deleted volume before the leader purges it")
	fs.StringVar(&o.Zone, "zone", "", "topology zone of this node")
	fs.StringVar(&o.Region, "region", "", "topology region of this node")
	fs.IntVar(&o.BootstrapExpect, "bootstrap-expect", 0, "form a new cluster once this many members (this one and --peers) are reachable")
	fs.StringSliceVar(&o.Peers, "peers", nil, "meta API addresses of the other first members (with --bootstrap-expect)")
	fs.StringSliceVar(&o.Join, "join", nil, "meta API address(es) of a running cluster to join")
	fs.Float64Var(&o.RaftTimeoutMultiplier, "raft-timeout-multiplier", 1, "scale raft's heartbeat, election and lease timeouts (1 = defaults of hashicorp/raft)")
	fs.DurationVar(&o.HeartbeatInterval, "heartbeat-interval", time.Second, "how often this node reports itself to the leader")
	fs.DurationVar(&o.NodeDownAfter, "node-down-after", 10*time.Second, "how long without heartbeats before the leader marks a node down")
	fs.StringVar(&o.CSIEndpoint, "csi-endpoint", "", "CSI endpoint for kubelet, e.g. unix:///csi/csi.sock (empty: no CSI node service)")
	fs.StringSliceVar(&o.CSIAllowedRoots, "csi-allowed-roots", []string{"/var/lib/kubelet"}, "directories CSI staging and target paths must be under")
	fs.Int64Var(&o.MaxVolumes, "max-volumes", 0, "most volumes staged on this node (0: no limit)")
	fs.IntVar(&o.IOSchedDepth, "iosched-depth", 256, "volume I/Os the scheduler lets run at once on this node; the rest queue in its order (smaller: stronger isolation, less throughput)")
	fs.IntVar(&o.IOSchedSpareWhileReserved, "iosched-spare-while-reserved", 2, "while a volume with a reservation (minIOPS) is busy, run at most this many I/Os of volumes beyond their reservations at once, so the reserved volume sees a nearly idle node (0: no bound; larger: more throughput for the others, less protection)")
	fs.Float64Var(&o.IOSchedLatencyTolerance, "iosched-latency-tolerance", 1.25, "while a volume with a reservation (minIOPS) is busy, slow down the I/Os of volumes beyond their reservations whenever its 99th-percentile I/O time exceeds this multiple of its time on a quiet node (0: off; at least 1)")
	fs.BoolVar(&o.NoIOSched, "no-iosched", false, "bypass the I/O schedulers: no QoS limits, no disk fairness or rebuild priority (for measuring what scheduling buys)")
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.LogFormat, "log-format", "json", "json or console")
}

// Validate fails fast with a message naming the flag.
func (o *nodeOptions) Validate() error {
	var errs []string
	if o.ID == "" {
		errs = append(errs, "--id is required")
	} else if strings.ContainsAny(o.ID, " /\t\n") {
		errs = append(errs, fmt.Sprintf("--id %q must not contain spaces or slashes", o.ID))
	}
	if o.DataDir == "" {
		errs = append(errs, "--data-dir is required")
	}
	if _, err := parseSize(o.RebuildRate); err != nil {
		errs = append(errs, fmt.Sprintf("--rebuild-rate: %v", err))
	}
	if o.StaleReplicaTimeout <= 0 {
		errs = append(errs, "--stale-replica-timeout must be positive")
	}
	if o.IOSchedDepth < 1 {
		// Not 0 for iosched's default: the reserved quarter is computed
		// from the flag, and would be 0 of a default depth.
		errs = append(errs, fmt.Sprintf("--iosched-depth %d: want at least 1", o.IOSchedDepth))
	}
	for flag, addr := range map[string]string{"--raft-addr": o.RaftAddr, "--api-addr": o.APIAddr, "--data-addr": o.DataAddr} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Sprintf("%s %q: %v", flag, addr, err))
		}
	}
	if o.BootstrapExpect < 0 || o.BootstrapExpect > 7 {
		errs = append(errs, fmt.Sprintf("--bootstrap-expect %d: want 1 to 7", o.BootstrapExpect))
	}
	if o.BootstrapExpect > 0 && len(o.Join) > 0 {
		errs = append(errs, "--bootstrap-expect and --join exclude each other")
	}
	if o.BootstrapExpect > 1 && len(o.Peers) < o.BootstrapExpect-1 {
		errs = append(errs, fmt.Sprintf("--bootstrap-expect %d needs at least %d --peers", o.BootstrapExpect, o.BootstrapExpect-1))
	}
	if o.RaftTimeoutMultiplier <= 0 || o.RaftTimeoutMultiplier > 20 {
		errs = append(errs, fmt.Sprintf("--raft-timeout-multiplier %v: want a number in (0, 20]", o.RaftTimeoutMultiplier))
	}
	if o.HeartbeatInterval <= 0 {
		errs = append(errs, "--heartbeat-interval must be positive")
	}
	if o.NodeDownAfter < 2*o.HeartbeatInterval {
		errs = append(errs, fmt.Sprintf("--node-down-after %v must be at least twice --heartbeat-interval %v", o.NodeDownAfter, o.HeartbeatInterval))
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func newNodeCommand() *cobra.Command {
	o := &nodeOptions{}
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Run a node agent: volume store member, meta API and metrics",
		Example: `  # first member of a new 3-node cluster
  cairn node --id node-1 --data-dir /var/lib/cairn --raft-addr 10.0.0.1:7001 \
    --api-addr 10.0.0.1:7002 --bootstrap-expect 3 --peers 10.0.0.2:7002,10.0.0.3:7002
  # a member added later
  cairn node --id node-4 --data-dir /var/lib/cairn --join 10.0.0.1:7002`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := bindEnv(cmd.Flags()); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return runNode(o)
		},
	}
	o.AddFlags(cmd.Flags())
	return cmd
}

func runNode(o *nodeOptions) error {
	// The components add node_id to their lines themselves, so they get
	// base; this function's own lines (and the CSI server's) get log.
	base, err := newLogger(o.LogLevel, o.LogFormat)
	if err != nil {
		return err
	}
	defer func() { _ = base.Sync() }()
	log := base.With(zap.String("node_id", o.ID))
	// k8s.io/mount-utils (the CSI node plugin's mounts) logs through klog,
	// which would write its own text lines into this JSON log.
	klog.SetLogger(zapr.NewLogger(log.Named("klog")))

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(engine.Collectors()...)
	agent, err := meta.StartAgent(meta.AgentConfig{
		Store: meta.StoreConfig{
			NodeID: o.ID, DataDir: o.DataDir,
			RaftBind: o.RaftAddr, RaftAdvertise: o.RaftAdvertise,
			TimeoutMultiplier: o.RaftTimeoutMultiplier,
			Logger:            base,
		},
		APIBind: o.APIAddr, APIAdvertise: o.APIAdvertise,
		Zone: o.Zone, Region: o.Region, DataAddr: o.DataAddr,
		StaleReplicaTimeout: o.StaleReplicaTimeout, TombstoneRetention: o.TombstoneRetention,
		BootstrapExpect: o.BootstrapExpect, Peers: o.Peers, Join: o.Join,
		HeartbeatInterval: o.HeartbeatInterval, NodeDownAfter: o.NodeDownAfter,
		Registerer: reg,
	})
	if err != nil {
		return err
	}
	rate, _ := parseSize(o.RebuildRate)
	// One scheduler for every volume I/O on this node. Its depth bounds the
	// I/Os in flight across all volumes; QoS limits apply per volume. A
	// quarter of the depth is kept for volumes under their reservation
	// (minIOPS), so that a flood on spare capacity cannot make them wait
	// for a slot; and while such a volume is busy, the flood runs only a
	// few I/Os at once, because on a node whose CPUs serve both, every
	// flood I/O in flight slows the reserved volume's I/Os down too.
	//
	// A reserved volume may have up to reservationBurst I/Os served under
	// its reservation back to back: applications send I/O a few at a time
	// (a queue depth of 4 to 8), and with strict spacing all but the first
	// of such a burst would queue behind the flood.
	//
	// The latency guard (--iosched-latency-tolerance) goes further: it
	// slows the flood's rate, not only its concurrency, while the reserved
	// volume's I/Os take longer than on a quiet node. It acts here only:
	// the disk scheduler holds no reservations.
	const reservationBurst = 8
	sched, err := iosched.New(iosched.Config{Depth: o.IOSchedDepth, ReservedSlots: o.IOSchedDepth / 4,
		SpareSlotsWhileReserved: o.IOSchedSpareWhileReserved, ReservationBurst: reservationBurst,
		LatencyTolerance: o.IOSchedLatencyTolerance,
		Observer:         newSchedMetrics(reg), Disabled: o.NoIOSched})
	if err != nil {
		agent.Close()
		return fmt.Errorf("--iosched-depth %d, --iosched-spare-while-reserved %d, --iosched-latency-tolerance %v: %w",
			o.IOSchedDepth, o.IOSchedSpareWhileReserved, o.IOSchedLatencyTolerance, err)
	}
	defer sched.Close()
	reg.MustRegister(newTokenCollector(sched))
	// A second scheduler for the replica server's disk I/O: operations on
	// this node's replicas, from the engines of every node (this node's
	// own in process). It holds no QoS limits (the engines charged those
	// once); it shares the disk fairly across volumes and lets rebuild and
	// scrub yield to foreground I/O.
	//
	// Its depth is the number of disk operations that run at once. 32 is
	// the command queue of a SATA or SAS disk and about where an NVMe drive
	// stops gaining throughput from more parallel small I/O: beyond what
	// the device can overlap, more concurrency only moves the waiting into
	// the kernel and the device, which serve it in arrival order, blind to
	// volumes and classes. It is also half of what one engine connection
	// may have in flight (64), so a single busy engine makes a queue form
	// here, where fairness and class priority can act; a depth as large as
	// the QoS scheduler's would let a flood take the whole disk before any
	// ordering applied.
	const diskSchedDepth = 32
	diskSched, err := iosched.New(iosched.Config{Depth: diskSchedDepth, ReservedSlots: diskSchedDepth / 4,
		SpareSlotsWhileReserved: min(o.IOSchedSpareWhileReserved, diskSchedDepth-diskSchedDepth/4),
		ReservationBurst:        reservationBurst,
		Observer:                newDiskSchedMetrics(reg), Disabled: o.NoIOSched})
	if err != nil {
		agent.Close()
		return err
	}
	defer diskSched.Close()
	self, err := meta.NewClient([]string{agent.APIAddr()})
	if err != nil {
		agent.Close()
		return err
	}
	defer self.Close()
	storage, err := storagenode.Start(storagenode.Config{
		NodeID: o.ID, DataDir: o.DataDir, Listen: o.DataAddr, FSM: agent.Store().FSM(), Meta: self,
		Logger: base, RebuildBytesPerSecond: rate, Registerer: reg, Sched: sched, DiskSched: diskSched,
	})
	if err != nil {
		agent.Close()
		return err
	}
	exports := export.Start(export.Config{NodeID: o.ID, FSM: agent.Store().FSM(), Meta: self, Logger: base, RebuildBytesPerSecond: rate,
		ReplicaDeadline: o.ReplicaDeadline, ScrubInterval: o.ScrubInterval, Sched: sched, Local: storage.Server(), Registerer: reg})
	var csiNode *csi.Node
	var csiSrv *csi.Server
	if o.CSIEndpoint != "" {
		lis, err := csi.Listen(o.CSIEndpoint)
		if err != nil {
			exports.Close()
			storage.Close()
			agent.Close()
			return fmt.Errorf("--csi-endpoint: %w", err)
		}
		csiNode = csi.NewNode(csi.NodeConfig{NodeID: o.ID, Zone: o.Zone, MaxVolumes: o.MaxVolumes,
			StateDir: filepath.Join(o.DataDir, "csi"), AllowedRoots: o.CSIAllowedRoots, Meta: self, Logger: base,
			RebuildBytesPerSecond: rate, ReplicaDeadline: o.ReplicaDeadline, ScrubInterval: o.ScrubInterval, Sched: sched, Local: storage.Server()})
		csiSrv = csi.Serve(log, lis, &csi.Identity{Version: version, Meta: self, Local: true}, nil, csiNode)
	}
	var metricsSrv *http.Server
	if o.MetricsAddr != "" {
		lis, err := net.Listen("tcp", o.MetricsAddr)
		if err != nil {
			exports.Close()
			storage.Close()
			agent.Close()
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		if o.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		metricsSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = metricsSrv.Serve(lis) }()
	}
	log.Info("node agent running", zap.String("api_addr", agent.APIAddr()), zap.String("raft_addr", agent.Store().RaftAddr()),
		zap.String("metrics_addr", o.MetricsAddr), zap.String("version", version))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	var runErr error
	select {
	case s := <-sig:
		log.Info("shutting down", zap.String("signal", s.String()))
	case runErr = <-agent.Fatal():
	}
	if metricsSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = metricsSrv.Shutdown(ctx)
		cancel()
	}
	if csiSrv != nil {
		csiSrv.Stop()
		csiNode.Close()
	}
	exports.Close()
	if err := storage.Close(); err != nil && runErr == nil {
		runErr = err
	}
	if err := agent.Close(); err != nil && runErr == nil {
		runErr = err
	}
	return runErr
}
