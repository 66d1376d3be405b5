package meta

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/cairn-csi/cairn/internal/pki"
)

// AgentConfig configures a store member with its meta API, cluster
// formation, heartbeats and (while leading) the reconciler.
type AgentConfig struct {
	Store StoreConfig
	// TLS, if set, is this node's identity: the meta API then speaks
	// mutual TLS and serves each caller what its role allows (auth.go),
	// and the agent's own calls to other members present it. nil serves
	// and dials in plaintext (Store.TLS is the raft transport's).
	TLS *pki.Credentials
	// APIBind is the TCP address the meta API listens on.
	APIBind string
	// APIAdvertise is the address others reach the meta API at (defaults to
	// the bound address).
	APIAdvertise string
	// Zone and Region are this node's topology labels.
	Zone, Region string
	// DataAddr is where this node's replica server listens ("" if none).
	DataAddr string
	// BootstrapExpect, with Peers (meta API addresses of the other first
	// members), forms a new cluster once that many members are reachable.
	BootstrapExpect int
	Peers           []string
	// Join lists meta API addresses of an existing cluster to join.
	Join []string
	// HeartbeatInterval is how often this node reports itself to the leader.
	HeartbeatInterval time.Duration
	// NodeDownAfter is how long the leader waits without a heartbeat before
	// it marks a node down.
	NodeDownAfter time.Duration
	// StaleReplicaTimeout is how long a replica's node may stay down before
	// the leader replaces the replica on another node; a volume's
	// "staleReplicaTimeout" parameter overrides it (default 10 minutes).
	StaleReplicaTimeout time.Duration
	// TombstoneRetention is how long a deleted volume stays in the store
	// before the leader purges it (default DefaultTombstoneRetention; see
	// purge.go).
	TombstoneRetention time.Duration
	// ScheduleInterval is how often the leader looks for scheduled
	// snapshots that are due (default DefaultScheduleInterval; see
	// schedule.go).
	ScheduleInterval time.Duration
	// Clock is the snapshot schedule's clock (default time.Now); tests set
	// it to move time past slots.
	Clock func() time.Time
	// DiskUsage reports the data disk's capacity and free bytes (defaults to
	// statfs of the data dir).
	DiskUsage func() (capacity, free uint64, err error)
	// Registerer receives the agent's metrics (nil: none).
	Registerer prometheus.Registerer
}

// Agent is one running member: the store, its meta API and its loops.
type Agent struct {
	cfg   AgentConfig
	log   *zap.Logger
	store *Store
	srv   *grpc.Server
	lis   net.Listener

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	fatal  chan error

	mu     sync.Mutex
	peers  map[string]*Client   // leader API address → client
	live   *liveness            // the leader's view of heartbeats (liveness.go)
	lastHB map[string]time.Time // last committed heartbeat per node
	tombs  tombstones           // deleted volumes the leader waits to purge (purge.go)
	// reads is, on the leader, the highest command type each node's last
	// heartbeat said its build reads (gate.go).
	reads map[string]CommandType
}

// StartAgent opens the store, serves the meta API and starts forming or
// rejoining the cluster in the background. Check Fatal for errors that stop
// the member later (a data dir of another cluster).
func StartAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = time.Second
	}
	if cfg.NodeDownAfter <= 0 {
		cfg.NodeDownAfter = 10 * time.Second
	}
	if cfg.NodeDownAfter < 2*cfg.HeartbeatInterval {
		return nil, fmt.Errorf("node-down-after %v must be at least twice the heartbeat interval %v", cfg.NodeDownAfter, cfg.HeartbeatInterval)
	}
	if cfg.StaleReplicaTimeout <= 0 {
		cfg.StaleReplicaTimeout = 10 * time.Minute
	}
	if cfg.TombstoneRetention <= 0 {
		cfg.TombstoneRetention = DefaultTombstoneRetention
	}
	if cfg.ScheduleInterval <= 0 {
		cfg.ScheduleInterval = DefaultScheduleInterval
	}
	if cfg.DiskUsage == nil {
		dir := cfg.Store.DataDir
		cfg.DiskUsage = func() (uint64, uint64, error) { return Statfs(dir) }
	}
	if cfg.Store.Logger == nil {
		cfg.Store.Logger = zap.NewNop()
	}
	lis, err := net.Listen("tcp", cfg.APIBind)
	if err != nil {
		return nil, fmt.Errorf("meta API listen on %s: %w", cfg.APIBind, err)
	}
	if cfg.APIAdvertise == "" {
		cfg.APIAdvertise = lis.Addr().String()
	}
	store, err := OpenStore(cfg.Store)
	if err != nil {
		lis.Close()
		return nil, err
	}
	a := &Agent{
		cfg: cfg, log: cfg.Store.Logger.Named("agent").With(zap.String("node_id", cfg.Store.NodeID)),
		store: store, lis: lis, fatal: make(chan error, 1),
		peers: map[string]*Client{}, live: newLiveness(), lastHB: map[string]time.Time{},
		reads: map[string]CommandType{},
	}
	if cfg.Registerer != nil {
		if err := store.Register(cfg.Registerer); err != nil {
			store.Close()
			lis.Close()
			return nil, fmt.Errorf("register metrics: %w", err)
		}
	}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	store.OnLeading(a.reconcile)
	store.OnLeading(a.runSchedules)
	srvOpts := []grpc.ServerOption{grpc.ForceServerCodec(jsonCodec{}), grpc.MaxRecvMsgSize(maxMessageBytes)}
	if cfg.TLS != nil {
		srvOpts = append(srvOpts, grpc.Creds(credentials.NewTLS(cfg.TLS.ServerConfig())),
			grpc.UnaryInterceptor(a.authorizeUnary), grpc.StreamInterceptor(a.authorizeStream))
	}
	a.srv = grpc.NewServer(srvOpts...)
	a.srv.RegisterService(&metaServiceDesc, a)
	a.wg.Add(3)
	go func() { defer a.wg.Done(); _ = a.srv.Serve(lis) }()
	go func() { defer a.wg.Done(); a.form() }()
	go func() { defer a.wg.Done(); a.heartbeatLoop() }()
	return a, nil
}

// Store returns the agent's store member.
func (a *Agent) Store() *Store { return a.store }

// APIAddr returns the meta API address others reach this member at.
func (a *Agent) APIAddr() string { return a.cfg.APIAdvertise }

// Fatal delivers an error that means this member must stop.
func (a *Agent) Fatal() <-chan error { return a.fatal }

func (a *Agent) fail(err error) {
	a.log.Error("member must stop", zap.Error(err))
	select {
	case a.fatal <- err:
	default:
	}
}

// Close stops the API, the loops and the store.
func (a *Agent) Close() error {
	a.cancel()
	a.srv.Stop()
	a.wg.Wait()
	a.mu.Lock()
	for _, c := range a.peers {
		c.Close()
	}
	a.mu.Unlock()
	return a.store.Close()
}

// sleep waits d or until the agent stops; false means stop.
func (a *Agent) sleep(d time.Duration) bool {
	select {
	case <-a.ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}
