package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/zapr"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"
	"k8s.io/klog/v2"

	"github.com/cairn-csi/cairn/driver/agent"
	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/storagenode"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// nodeOptions configures `cairn node`: the agent's Config, with the flags
// that need parsing before it can take them, and the logger's.
type nodeOptions struct {
	agent.Config
	// RebuildRate paces rebuild copies ("100Mi" bytes per second; "0"
	// unpaced): Config.RebuildBytesPerSecond.
	RebuildRate string
	// LogLevel and LogFormat shape the logs.
	LogLevel, LogFormat string
	// TLSFlags name the node's certificate; Insecure runs without.
	TLSFlags tlsOptions
	Insecure bool
	// GoMaxProcs, when above 0, sets runtime.GOMAXPROCS.
	GoMaxProcs int
}

func (o *nodeOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.ID, "id", "", "node id, unique in the cluster (required)")
	fs.StringVar(&o.DataDir, "data-dir", "", "directory for the raft log, snapshots and replicas (required); with disk types, a list of TYPE=PATH (a plain PATH is of type default), e.g. nvme-ssd=/mnt/nvme,hdd=/mnt/hdd: the first holds the node's state too")
	fs.StringVar(&o.RaftAddr, "raft-addr", "127.0.0.1:7001", "raft transport listen address")
	fs.StringVar(&o.RaftAdvertise, "raft-advertise", "", "raft address peers dial (default: --raft-addr)")
	fs.StringVar(&o.APIAddr, "api-addr", "127.0.0.1:7002", "meta API listen address")
	fs.StringVar(&o.APIAdvertise, "api-advertise", "", "meta API address others dial (default: --api-addr)")
	fs.StringVar(&o.MetricsAddr, "metrics-addr", "127.0.0.1:9102", "address serving Prometheus /metrics (empty: off)")
	fs.BoolVar(&o.Pprof, "pprof", false, "serve Go's /debug/pprof profiles on --metrics-addr")
	fs.IntVar(&o.GoMaxProcs, "gomaxprocs", 0, "CPUs the agent's Go scheduler runs on at once (0: Go's default, which follows the container's CPU limit); for several agents sharing one machine, as in a dev cluster, their share of its CPUs")
	fs.StringVar(&o.DataAddr, "data-addr", "127.0.0.1:7003", "replica server listen address (engines on other nodes dial it)")
	fs.StringVar(&o.RebuildRate, "rebuild-rate", "200Mi", "rebuild copy rate in bytes per second while the node has foreground I/O (0: unpaced); with none for 200 ms, rebuilds run unpaced")
	fs.DurationVar(&o.ReplicaDeadline, "replica-deadline", engine.DefaultReplicaDeadline, "once the write quorum has answered, how long a write waits for a replica that has not before ejecting it (it comes back through a delta rebuild; each such ejection doubles that replica's deadline for a while, so a slow but alive replica is not ejected again and again; negative: wait the full I/O timeout)")
	fs.DurationVar(&o.ScrubInterval, "scrub-interval", 7*24*time.Hour, "how often the engine of an attached volume reads and verifies every block of every replica, repairing what it can (docs/integrity.md; 0: only on demand, cairn ctl volume scrub)")
	fs.Uint64Var(&o.ReservableIOPS, "reservable-iops", 0, "IOPS this node's disks can promise to volumes of qosClass guaranteed: each is placed only where its minIOPS is still unreserved (0: none here)")
	fs.DurationVar(&o.RecompressInterval, "recompress-interval", storagenode.DefaultRecompressInterval, "how often to store compressed again the extents of volumes with compression lz4 that small writes left raw (docs/compression.md; negative: never)")
	fs.DurationVar(&o.DedupInterval, "dedup-interval", storagenode.DefaultDedupInterval, "how often to run the deduplication pass over the replicas of volumes with deduplication \"true\" (docs/deduplication.md; negative: never)")
	fs.IntVar(&o.ChainSoftLimit, "chain-soft-limit", storagenode.DefaultChainSoftLimit, "flatten the layers a restored replica shares with its source once its chain has more layers than this (docs/snapshots.md; negative: never)")
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
	fs.StringVar(&o.CSIStateDir, "csi-state-dir", "", "directory of the FUSE mount that serves the staged volumes (empty: DATA_DIR/csi); in a container, put it on a mount shared with the host so that a restarted agent finds it")
	fs.StringVar(&o.FDHolder, "fd-holder", "", "unix socket of this node's `cairn fuse-holder`, which keeps the staged volumes' FUSE connection while this agent restarts (empty: none; a restart then breaks the staged volumes)")
	fs.IntVar(&o.IOSchedDepth, "iosched-depth", 256, "volume I/Os the scheduler lets run at once on this node; the rest queue in its order (smaller: stronger isolation, less throughput)")
	fs.IntVar(&o.IOSchedSpareWhileReserved, "iosched-spare-while-reserved", 2, "while a volume with a reservation (minIOPS) is busy, run at most this many I/Os of volumes beyond their reservations at once, so the reserved volume sees a nearly idle node (0: no bound; larger: more throughput for the others, less protection)")
	fs.Float64Var(&o.IOSchedLatencyTolerance, "iosched-latency-tolerance", 1.25, "while a volume with a reservation (minIOPS) is busy, slow down the I/Os of volumes beyond their reservations whenever its 99th-percentile I/O time exceeds this multiple of its time on a quiet node (0: off; at least 1)")
	fs.BoolVar(&o.NoIOSched, "no-iosched", false, "bypass the I/O schedulers: no QoS limits, no disk fairness or rebuild priority (for measuring what scheduling buys)")
	o.TLSFlags.AddFlags(fs)
	fs.BoolVar(&o.Insecure, "insecure", false, "run Raft, the meta API and the replica port without TLS, open to anyone who can reach them (instead of --tls-dir)")
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.LogFormat, "log-format", "json", "json or console")
}

// nodeIDPattern is a Kubernetes label value of at least one character.
var nodeIDPattern = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)

// Validate fails fast with a message naming the flag.
func (o *nodeOptions) Validate() error {
	var errs []string
	if o.ID == "" {
		errs = append(errs, "--id is required")
	} else if !nodeIDPattern.MatchString(o.ID) {
		// The id is also the value of the CSI topology key that names a
		// node (driver/csi.TopologyNodeKey), so it must be a valid
		// Kubernetes label value, or kubelet refuses to register the node.
		errs = append(errs, fmt.Sprintf("--id %q: want at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", o.ID))
	}
	if o.GoMaxProcs < 0 {
		errs = append(errs, fmt.Sprintf("--gomaxprocs %d: want 0 (Go's default) or more", o.GoMaxProcs))
	}
	if o.DataDir == "" {
		errs = append(errs, "--data-dir is required")
	} else if dir, disks, noDefault, err := parseDataDirs(o.DataDir); err != nil {
		errs = append(errs, "--data-dir: "+err.Error())
	} else {
		o.DataDir, o.DiskDirs, o.NoDefaultDisk = dir, disks, noDefault
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
	if _, ok, err := o.TLSFlags.files(); err != nil {
		errs = append(errs, err.Error())
	} else if ok && o.Insecure {
		errs = append(errs, "--insecure and the --tls flags exclude each other")
	} else if !ok && !o.Insecure {
		errs = append(errs, "--tls-dir is required (the node's certificate from the cluster CA: cairn ca issue --role node --name "+o.ID+"), or --insecure to run every port in plaintext, open to anyone who can reach it")
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

// runNode runs a node agent until a signal or the store member's failure.
func runNode(o *nodeOptions) error {
	base, err := newLogger(o.LogLevel, o.LogFormat)
	if err != nil {
		return err
	}
	defer func() { _ = base.Sync() }()
	log := base.With(zap.String("node_id", o.ID))
	// k8s.io/mount-utils (the CSI node plugin's mounts) logs through klog,
	// which would write its own text lines into this JSON log.
	klog.SetLogger(zapr.NewLogger(log.Named("klog")))

	if o.GoMaxProcs > 0 {
		// Agents sharing a machine each assume all of its CPUs otherwise:
		// with three on two cores, idle threads spun looking for work and
		// woke each other (futex and nanosleep were 16% of their CPU in
		// fiobench's 3-replica 4k writes).
		prev := runtime.GOMAXPROCS(o.GoMaxProcs)
		log.Info("GOMAXPROCS set", zap.Int("gomaxprocs", o.GoMaxProcs), zap.Int("default", prev))
	}
	cfg := o.Config
	cfg.RebuildBytesPerSecond, _ = parseSize(o.RebuildRate) // checked by Validate
	if cfg.TLS, err = o.TLSFlags.load(); err != nil {
		return err
	}
	if cfg.TLS == nil {
		log.Warn("INSECURE: --insecure: Raft, the meta API and the replica port run in plaintext without authentication; anyone who reaches them can read and write every volume and reconfigure the cluster")
	} else if id := cfg.TLS.Identity(); id.Role != pki.RoleNode || id.Name != o.ID {
		return fmt.Errorf("--tls-dir: the certificate is for %s, not node/%s", id, o.ID)
	} else {
		log.Info("mutual TLS on every port", zap.Stringer("identity", id), zap.Time("expires", cfg.TLS.NotAfter()))
	}
	cfg.Version, cfg.Logger = version, base
	a, err := agent.Start(cfg)
	if err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	var runErr error
	select {
	case s := <-sig:
		log.Info("shutting down", zap.String("signal", s.String()))
	case runErr = <-a.Fatal():
	}
	if err := a.Close(); err != nil && runErr == nil {
		runErr = err
	}
	return runErr
}

// parseDataDirs reads --data-dir: a PATH (the default disk), or a list of
// TYPE=PATH and PATH (type default) entries. The directory of the node's
// state is the default disk's, else the first entry's. disks are the
// other types'; noDefault says there is no default disk.
func parseDataDirs(v string) (dir string, disks map[string]string, noDefault bool, err error) {
	if !strings.Contains(v, "=") && !strings.Contains(v, ",") {
		return v, nil, false, nil
	}
	noDefault = true
	for i, e := range strings.Split(v, ",") {
		t, path, typed := strings.Cut(strings.TrimSpace(e), "=")
		if !typed {
			t, path = volspec.DiskTypeDefault, t
		}
		switch {
		case path == "":
			return "", nil, false, fmt.Errorf("entry %q has no path", e)
		case !volspec.ValidDiskType(t):
			return "", nil, false, fmt.Errorf("disk type %q: want 1 to 63 of a-z, 0-9 and -", t)
		case t == volspec.DiskTypeDefault:
			if !noDefault {
				return "", nil, false, fmt.Errorf("two directories of type %s", t)
			}
			dir, noDefault = path, false
		default:
			if disks == nil {
				disks = map[string]string{}
			}
			if _, dup := disks[t]; dup {
				return "", nil, false, fmt.Errorf("two directories of type %s", t)
			}
			disks[t] = path
		}
		if i == 0 && dir == "" {
			dir = path
		}
	}
	return dir, disks, noDefault, nil
}
