package meta

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
)

// AgentConfig configures a store member with its meta API, cluster
// formation, heartbeats and (while leading) the reconciler.
type AgentConfig struct {
	Store StoreConfig
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

	mu       sync.Mutex
	peers    map[string]*Client // leader API address → client
	lastSeen map[string]time.Time
	lastHB   map[string]time.Time // last committed heartbeat per node
	downAt   map[string]time.Time // when the leader saw each down node go down
	// rebuilds remembers, per replica id, the reconciler's restarts of its
	// rebuild since it was last healthy (see repairReplicas).
	rebuilds map[string]rebuildRestarts
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
	if cfg.DiskUsage == nil {
		dir := cfg.Store.DataDir
		cfg.DiskUsage = func() (uint64, uint64, error) { return statfs(dir) }
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
		peers: map[string]*Client{}, lastSeen: map[string]time.Time{}, lastHB: map[string]time.Time{}, rebuilds: map[string]rebuildRestarts{},
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
	a.srv = grpc.NewServer(grpc.ForceServerCodec(jsonCodec{}), grpc.MaxRecvMsgSize(maxMessageBytes))
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

// form bootstraps or joins the cluster unless the data dir already holds
// raft state, in which case raft itself reconnects to the old peers.
func (a *Agent) form() {
	if a.store.HasState() {
		a.log.Info("rejoining from data dir")
		a.checkPeersCluster(append(append([]string{}, a.cfg.Join...), a.cfg.Peers...))
		return
	}
	self := raft.Server{ID: raft.ServerID(a.store.NodeID()), Address: raft.ServerAddress(a.store.RaftAddr()), Suffrage: raft.Voter}
	switch {
	case len(a.cfg.Join) > 0:
		a.joinLoop(a.cfg.Join)
	case a.cfg.BootstrapExpect == 1:
		if err := a.store.Bootstrap([]raft.Server{self}); err != nil {
			a.fail(err)
		}
	case a.cfg.BootstrapExpect > 1:
		a.bootstrapLoop(self)
	default:
		a.log.Info("no bootstrap or join given; waiting to be added by a leader")
	}
}

// checkPeersCluster stops this member when a reachable peer belongs to
// another cluster than the one recorded in the data dir: a data dir copied
// from elsewhere must not silently run as its own cluster.
func (a *Agent) checkPeersCluster(addrs []string) {
	local := a.store.LocalClusterID()
	if local == "" {
		return
	}
	for _, addr := range addrs {
		if addr == a.APIAddr() {
			continue
		}
		c, err := NewClient([]string{addr})
		if err != nil {
			continue
		}
		ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
		info, err := c.Info(ctx)
		cancel()
		c.Close()
		if err == nil && info.ClusterID != "" && info.ClusterID != local {
			a.fail(fmt.Errorf("data dir %s belongs to cluster %s, but %s (%s) is in cluster %s: %w",
				a.cfg.Store.DataDir, local, addr, info.NodeID, info.ClusterID, ErrClusterMismatch))
			return
		}
	}
}

// joinLoop asks the cluster to add this member until it succeeds.
func (a *Agent) joinLoop(addrs []string) {
	c, err := NewClient(addrs)
	if err != nil {
		a.fail(err)
		return
	}
	defer c.Close()
	for {
		ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
		resp, err := c.Join(ctx, &JoinRequest{
			NodeID: a.store.NodeID(), RaftAddr: a.store.RaftAddr(), APIAddr: a.APIAddr(),
			ClusterID: a.store.LocalClusterID(),
		})
		cancel()
		if err == nil {
			a.log.Info("joined cluster", zap.String("cluster_id", resp.ClusterID))
			return
		}
		if errors.Is(err, ErrClusterMismatch) {
			a.fail(err)
			return
		}
		a.log.Info("join not yet possible; retrying", zap.Strings("join", addrs), zap.Error(err))
		if !a.sleep(time.Second) {
			return
		}
	}
}

// bootstrapLoop waits until BootstrapExpect fresh members are reachable and
// bootstraps all of them with the same configuration, or joins when it finds
// that a cluster already exists: a peer that leads, follows a leader, knows
// a cluster id or holds raft state.
func (a *Agent) bootstrapLoop(self raft.Server) {
	// The first members are this node and its peers. When more peers are
	// listed than that, the list itself names the first members: a node
	// not on it joins them instead of guessing a configuration of its own
	// (two different first configurations would make two clusters).
	others := map[string]bool{}
	listed := false
	for _, p := range a.cfg.Peers {
		if p == a.APIAddr() {
			listed = true
		} else {
			others[p] = true
		}
	}
	switch {
	case len(others)+1 == a.cfg.BootstrapExpect:
	case listed && len(others)+1 > a.cfg.BootstrapExpect:
		a.fail(fmt.Errorf("--peers names %d members, --bootstrap-expect %d: list exactly the first members", len(others)+1, a.cfg.BootstrapExpect))
		return
	case !listed && len(others) >= a.cfg.BootstrapExpect:
		a.log.Info("not one of the first members named in --peers; joining them")
		a.joinLoop(a.cfg.Peers)
		return
	default:
		a.fail(fmt.Errorf("--bootstrap-expect %d needs %d peers, --peers names %d", a.cfg.BootstrapExpect, a.cfg.BootstrapExpect-1, len(others)))
		return
	}
	clients := map[string]*Client{}
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for {
		servers := []raft.Server{self}
		for _, addr := range a.cfg.Peers {
			if addr == a.APIAddr() {
				continue
			}
			c, ok := clients[addr]
			if !ok {
				var err error
				if c, err = NewClient([]string{addr}); err != nil {
					a.fail(err)
					return
				}
				clients[addr] = c
			}
			ctx, cancel := context.WithTimeout(a.ctx, time.Second)
			info, err := c.Info(ctx)
			cancel()
			if err != nil {
				continue
			}
			// A peer with raft state belongs to a cluster even while it
			// has no leader and, until its log is replayed, no cluster id
			// (every member restarting at once). This member has none: its
			// data dir is new or was lost. Bootstrapping here would start a
			// second history beside the cluster's; joining it is what
			// catches this member up.
			if info.Leader != "" || info.ClusterID != "" || info.HasState {
				a.log.Info("found a running cluster; joining it", zap.String("peer", addr),
					zap.String("peer_leader", info.Leader), zap.Bool("peer_has_state", info.HasState))
				a.joinLoop([]string{addr})
				return
			}
			if info.NodeID == string(self.ID) {
				a.fail(fmt.Errorf("peer %s has the same node id %q as this member", addr, self.ID))
				return
			}
			servers = append(servers, raft.Server{ID: raft.ServerID(info.NodeID), Address: raft.ServerAddress(info.RaftAddr), Suffrage: raft.Voter})
		}
		if len(servers) == a.cfg.BootstrapExpect {
			// Every first member computes the same sorted list.
			sort.Slice(servers, func(i, j int) bool { return servers[i].ID < servers[j].ID })
			a.log.Info("bootstrapping cluster", zap.Int("members", len(servers)))
			if err := a.store.Bootstrap(servers); err != nil {
				a.fail(err)
			}
			return
		}
		if a.store.raft.Leader() != "" {
			return // another member bootstrapped us in
		}
		if !a.sleep(300 * time.Millisecond) {
			return
		}
	}
}

// heartbeatLoop registers this node and keeps reporting it alive; it also
// binds the data dir to the cluster once the cluster id is known.
func (a *Agent) heartbeatLoop() {
	registered := false
	for a.sleep(a.cfg.HeartbeatInterval) {
		var clusterID string
		a.store.FSM().View(func(s *State) { clusterID = s.ClusterID })
		if clusterID != "" {
			if err := a.store.RecordClusterID(clusterID); err != nil {
				a.fail(err)
				return
			}
		}
		capacity, free, err := a.cfg.DiskUsage()
		if err != nil {
			a.log.Warn("cannot read data disk usage", zap.Error(err))
		}
		ctx, cancel := context.WithTimeout(a.ctx, a.cfg.HeartbeatInterval*2)
		if !registered {
			_, err = a.applyForwarded(ctx, &RegisterNode{Node: Node{
				ID: a.store.NodeID(), RaftAddr: a.store.RaftAddr(), APIAddr: a.APIAddr(),
				DataAddr: a.cfg.DataAddr,
				Zone:     a.cfg.Zone, Region: a.cfg.Region, CapacityBytes: capacity, FreeBytes: free,
			}}, false)
			if err == nil {
				registered = true
				a.log.Info("node registered")
			}
		} else {
			_, err = a.heartbeat(ctx, &HeartbeatRequest{NodeID: a.store.NodeID(), CapacityBytes: capacity, FreeBytes: free})
			if errors.Is(err, ErrNotFound) {
				registered = false
			}
		}
		cancel()
		if err != nil && a.ctx.Err() == nil {
			a.log.Debug("heartbeat failed", zap.Error(err))
		}
	}
}

// statfs returns the capacity and free bytes of the file system holding dir.
func statfs(dir string) (uint64, uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	return st.Blocks * uint64(st.Bsize), st.Bavail * uint64(st.Bsize), nil
}

// reconcile is the leader's loop: it marks nodes down whose heartbeats
// stopped. It runs only while this member leads.
func (a *Agent) reconcile(ctx context.Context) {
	// A new leader has no heartbeat history: give every node a full period.
	now := time.Now()
	a.mu.Lock()
	a.lastSeen = map[string]time.Time{}
	a.lastHB = map[string]time.Time{}
	a.downAt = map[string]time.Time{}
	a.rebuilds = map[string]rebuildRestarts{}
	a.store.FSM().View(func(s *State) {
		for id := range s.Nodes {
			a.lastSeen[id] = now
		}
	})
	a.mu.Unlock()
	tick := min(max(a.cfg.NodeDownAfter/4, 50*time.Millisecond), time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		var stale []string
		a.mu.Lock()
		a.store.FSM().View(func(s *State) {
			for _, n := range s.SortedNodes() {
				seen, ok := a.lastSeen[n.ID]
				if !ok {
					a.lastSeen[n.ID] = time.Now()
					continue
				}
				if n.State == NodeUp && time.Since(seen) > a.cfg.NodeDownAfter {
					stale = append(stale, n.ID)
				}
			}
		})
		a.mu.Unlock()
		for _, id := range stale {
			_, err := a.store.Apply(ctx, &SetNodeState{NodeID: id, State: NodeDown, Time: time.Now().UnixNano()})
			if err != nil {
				a.log.Warn("cannot mark node down", zap.String("node", id), zap.Error(err))
				continue
			}
			a.log.Warn("node marked down: no heartbeat", zap.String("node", id), zap.Duration("after", a.cfg.NodeDownAfter))
		}
		a.repairReplicas(ctx)
	}
}

// staleTimeout is how long v's replicas may sit on a down node.
func (a *Agent) staleTimeout(v *Volume) time.Duration {
	if s, ok := v.Parameters[ParamStaleReplicaTimeout]; ok {
		if d, err := time.ParseDuration(s); err == nil && d > 0 {
			return d
		}
	}
	return a.cfg.StaleReplicaTimeout
}

// ParamStaleReplicaTimeout is the volume parameter overriding
// AgentConfig.StaleReplicaTimeout (a Go duration such as "10m").
const ParamStaleReplicaTimeout = "staleReplicaTimeout"

// repairReplicas is the leader's replica reconciler. For each live volume it
// takes at most one step per tick (each step moves the epoch):
//   - a failed or stale replica whose node is up starts rebuilding;
//   - a replica whose node has been down longer than the volume's
//     staleReplicaTimeout is marked stale (if healthy) and then replaced by a
//     new replica, placed on another node, that rebuilds.
//
// The engine of an attached volume, or the node hosting the new replica,
// does the copying; see replication/engine.
//
// A replica that fails again right after its rebuild was started (its node
// heartbeats, but the engine cannot reach its replica server: a partition
// of the data port, a full disk) is restarted after 2 s, then 4 s, 8 s …
// up to a minute, not at every tick: each restart costs the engine a claim
// that times out, and the volume a new epoch.
func (a *Agent) repairReplicas(ctx context.Context) {
	type step struct {
		cmd  Command
		what string
		v, r string
	}
	var steps []step
	now := time.Now()
	a.mu.Lock()
	a.store.FSM().View(func(s *State) {
		for id, n := range s.Nodes {
			if n.State == NodeDown {
				if _, ok := a.downAt[id]; !ok {
					a.downAt[id] = now
				}
			} else {
				delete(a.downAt, id)
			}
		}
		for _, v := range s.SortedVolumes() {
			for _, r := range v.Replicas {
				n, ok := s.Nodes[r.Node]
				if !ok {
					continue
				}
				// Only a node heard from just now: right after a crash the
				// node is still "up" until its heartbeats time out.
				fresh := now.Sub(a.lastSeen[r.Node]) < 3*a.cfg.HeartbeatInterval
				if r.State == ReplicaHealthy {
					delete(a.rebuilds, r.ID)
				}
				if n.State == NodeUp && fresh && (r.State == ReplicaFailed || r.State == ReplicaStale) {
					if rr := a.rebuilds[r.ID]; now.Before(rr.next) {
						continue
					}
					steps = append(steps, step{&SetReplicaState{VolumeID: v.ID, ReplicaID: r.ID, State: ReplicaRebuilding, ExpectEpoch: v.Epoch}, "rebuild replica on returned node", v.ID, r.ID})
					a.rebuilds[r.ID] = a.rebuilds[r.ID].restarted(now)
					break
				}
				since, down := a.downAt[r.Node]
				if !down || now.Sub(since) < a.staleTimeout(v) {
					continue
				}
				if r.State == ReplicaHealthy {
					if v.HealthyReplicas() > 1 {
						steps = append(steps, step{&SetReplicaState{VolumeID: v.ID, ReplicaID: r.ID, State: ReplicaStale, ExpectEpoch: v.Epoch}, "mark replica on long-down node stale", v.ID, r.ID})
						break
					}
					continue // the last healthy copy stays until its node returns
				}
				steps = append(steps, step{&ReplaceReplica{VolumeID: v.ID, ReplicaID: r.ID, ExpectEpoch: v.Epoch}, "replace replica on long-down node", v.ID, r.ID})
				break
			}
		}
	})
	a.mu.Unlock()
	for _, st := range steps {
		res, err := a.store.Apply(ctx, st.cmd)
		if err != nil {
			// Epoch moved (an engine acted) or no room elsewhere: try again
			// next tick.
			a.log.Info("replica repair step not taken", zap.String("volume_id", st.v), zap.String("replica_id", st.r), zap.String("step", st.what), zap.Error(err))
			continue
		}
		a.log.Warn("replica repair", zap.String("volume_id", st.v), zap.String("replica_id", st.r), zap.String("step", st.what), zap.Uint64("epoch", res.Volume.Epoch))
	}
}

// rebuildRestarts counts the rebuild restarts of one replica and says when
// the next may be.
type rebuildRestarts struct {
	count int
	next  time.Time
}

// Bounds of the wait between two restarts of one replica's rebuild.
const (
	firstRebuildRetry = 2 * time.Second
	maxRebuildRetry   = time.Minute
)

func (r rebuildRestarts) restarted(now time.Time) rebuildRestarts {
	wait := firstRebuildRetry
	for i := 0; i < r.count && wait < maxRebuildRetry; i++ {
		wait *= 2
	}
	return rebuildRestarts{count: r.count + 1, next: now.Add(min(wait, maxRebuildRetry))}
}

// recordHeartbeat runs on the leader for every heartbeat. Liveness stays in
// memory; the log only sees state changes and capacity changes (or one
// heartbeat per 30 s), so heartbeats do not flood the log.
func (a *Agent) recordHeartbeat(ctx context.Context, req *HeartbeatRequest) error {
	var node *Node
	a.store.FSM().View(func(s *State) {
		if n, ok := s.Nodes[req.NodeID]; ok {
			c := *n
			node = &c
		}
	})
	if node == nil {
		return fmt.Errorf("node %q is not registered: %w", req.NodeID, ErrNotFound)
	}
	now := time.Now()
	a.mu.Lock()
	a.lastSeen[req.NodeID] = now
	last := a.lastHB[req.NodeID]
	a.mu.Unlock()
	if node.State == NodeDown {
		if _, err := a.store.Apply(ctx, &SetNodeState{NodeID: req.NodeID, State: NodeUp, Time: now.UnixNano()}); err != nil {
			return err
		}
		a.log.Info("node back up", zap.String("node", req.NodeID))
	}
	changed := differs(node.CapacityBytes, req.CapacityBytes, node.CapacityBytes/100) ||
		differs(node.FreeBytes, req.FreeBytes, node.CapacityBytes/100)
	if changed || now.Sub(last) > 30*time.Second {
		if _, err := a.store.Apply(ctx, &NodeHeartbeat{NodeID: req.NodeID, CapacityBytes: req.CapacityBytes, FreeBytes: req.FreeBytes, Time: now.UnixNano()}); err != nil {
			return err
		}
		a.mu.Lock()
		a.lastHB[req.NodeID] = now
		a.mu.Unlock()
	}
	return nil
}

func differs(a, b, tolerance uint64) bool {
	if a > b {
		return a-b > tolerance
	}
	return b-a > tolerance
}

// leaderClient returns a client for the leader's meta API, or an error
// wrapping ErrNoLeader when no leader (or its address) is known.
func (a *Agent) leaderClient() (*Client, error) {
	id, _ := a.store.Leader()
	if id == "" {
		return nil, fmt.Errorf("no leader known: %w", ErrNoLeader)
	}
	var addr string
	a.store.FSM().View(func(s *State) {
		if n, ok := s.Nodes[id]; ok {
			addr = n.APIAddr
		}
	})
	if addr == "" {
		return nil, fmt.Errorf("leader %s has not registered its API address yet: %w", id, ErrNoLeader)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.peers[addr]
	if !ok {
		var err error
		if c, err = NewClient([]string{addr}); err != nil {
			return nil, err
		}
		a.peers[addr] = c
	}
	return c, nil
}

// forwardAttempt bounds one forwarded call to the leader. A leader that is
// frozen (SIGSTOP, a stalled VM) still holds its connections open, so
// without a bound the call would wait for the caller's whole deadline while
// the rest of the cluster elects a new leader within a few seconds.
const forwardAttempt = 3 * time.Second

// onLeader runs local when this member leads, else remote against the
// leader; a request that was itself forwarded is never forwarded again. It
// retries while there is no leader (nothing was applied), until ctx ends.
//
// repeatable says whether remote may be sent again after an attempt to
// the leader went unanswered: true for reads and for commands the store
// applies once however often they arrive. A call that is not repeatable
// ends with ErrOutcomeUnknown instead.
func (a *Agent) onLeader(ctx context.Context, forwarded, repeatable bool, local func() error, remote func(context.Context, *Client) error) error {
	for {
		var err error
		if a.store.IsLeader() {
			err = local()
		} else if forwarded {
			return fmt.Errorf("%s: %w", a.store.NodeID(), ErrNotLeader)
		} else {
			var c *Client
			if c, err = a.leaderClient(); err == nil {
				err = a.forward(ctx, c, repeatable, remote)
			}
		}
		if err == nil || !retryable(err) || errors.Is(err, ErrOutcomeUnknown) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%v: %w", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// forward runs remote against the leader within forwardAttempt. When the
// leader does not answer in time while ctx still runs, the error says so
// and is retryable (ErrNoLeader) or, for a call that is not repeatable,
// ErrOutcomeUnknown.
func (a *Agent) forward(ctx context.Context, c *Client, repeatable bool, remote func(context.Context, *Client) error) error {
	actx, cancel := context.WithTimeout(ctx, forwardAttempt)
	defer cancel()
	err := remote(actx, c)
	if err == nil || actx.Err() == nil {
		return err
	}
	// The leader did not answer in time, or the caller's own deadline came
	// first: either way the caller learns that no leader answered, not a
	// bare "context deadline exceeded" that it cannot act on.
	leader, _ := a.store.Leader()
	if !repeatable {
		return fmt.Errorf("leader %s did not answer within %v: %w", leader, forwardAttempt, ErrOutcomeUnknown)
	}
	return fmt.Errorf("leader %s did not answer within %v: %w", leader, forwardAttempt, ErrNoLeader)
}

// prepare fills in what the leader decides for a client's command: fresh
// ids and timestamps. It refuses commands that only the store issues.
func prepare(c Command) error {
	now := time.Now().UnixNano()
	switch c := c.(type) {
	case *Request:
		inner, err := Decode(c.Command)
		if err != nil {
			return err
		}
		if _, nested := inner.(*Request); nested {
			return fmt.Errorf("a request may not wrap another: %w", ErrBadCommand)
		}
		if err := prepare(inner); err != nil {
			return err
		}
		c.Command, err = Encode(inner)
		return err
	case *InitCluster:
		return fmt.Errorf("InitCluster is issued by the leader only: %w", ErrInvalidArgument)
	case *CreateVolume:
		if c.ID == "" {
			c.ID = NewVolumeID()
		}
		if c.CreatedAt == 0 {
			c.CreatedAt = now
		}
	case *CreateSnapshot:
		if c.ID == "" {
			c.ID = NewSnapshotID()
		}
		if c.CreatedAt == 0 {
			c.CreatedAt = now
		}
	case *RegisterNode:
		c.Time = now
	case *NodeHeartbeat:
		c.Time = now
	case *SetNodeState:
		c.Time = now
	}
	return nil
}

// applyForwarded commits c on the leader, forwarding if need be.
func (a *Agent) applyForwarded(ctx context.Context, c Command, forwarded bool) (Result, error) {
	var res Result
	// A Request carries its own id: the store applies it once however
	// often it is sent, so an unanswered forward may be sent again.
	_, repeatable := c.(*Request)
	err := a.onLeader(ctx, forwarded, repeatable,
		func() (err error) {
			if err = prepare(c); err != nil {
				return err
			}
			res, err = a.store.Apply(ctx, c)
			return err
		},
		func(ctx context.Context, cl *Client) error {
			b, err := Encode(c)
			if err != nil {
				return err
			}
			var resp ApplyResponse
			if err := cl.invokeOnce(ctx, "Apply", &ApplyRequest{Command: b, Forwarded: true}, &resp); err != nil {
				return err
			}
			res = resp.Result
			return fromWire(resp.Error)
		})
	return res, err
}

func (a *Agent) heartbeat(ctx context.Context, req *HeartbeatRequest) (*HeartbeatResponse, error) {
	err := a.onLeader(ctx, req.Forwarded, true,
		func() error { return a.recordHeartbeat(ctx, req) },
		func(ctx context.Context, cl *Client) error {
			fwd := *req
			fwd.Forwarded = true
			var resp HeartbeatResponse
			if err := cl.invokeOnce(ctx, "Heartbeat", &fwd, &resp); err != nil {
				return err
			}
			return fromWire(resp.Error)
		})
	return &HeartbeatResponse{Error: toWire(err)}, err
}

// The meta API handlers. Errors of the store travel inside the response
// (WireError) so that the client sees the same sentinel; a gRPC error means
// the transport failed.

func (a *Agent) apply(ctx context.Context, req *ApplyRequest) (*ApplyResponse, error) {
	c, err := Decode(req.Command)
	if err != nil {
		return &ApplyResponse{Error: toWire(err)}, nil
	}
	res, err := a.applyForwarded(ctx, c, req.Forwarded)
	return &ApplyResponse{Result: res, Error: toWire(err)}, nil
}

func (a *Agent) read(ctx context.Context, req *ReadRequest) (*ReadResponse, error) {
	if !req.Linearizable {
		return a.localRead(), nil
	}
	var out *ReadResponse
	err := a.onLeader(ctx, req.Forwarded, true,
		func() error {
			if err := a.store.ReadBarrier(ctx); err != nil {
				return err
			}
			out = a.localRead()
			return nil
		},
		func(ctx context.Context, cl *Client) error {
			var resp ReadResponse
			if err := cl.invokeOnce(ctx, "Read", &ReadRequest{Linearizable: true, Forwarded: true}, &resp); err != nil {
				return err
			}
			out = &resp
			return fromWire(resp.Error)
		})
	if err != nil {
		return &ReadResponse{Error: toWire(err)}, nil
	}
	return out, nil
}

func (a *Agent) localRead() *ReadResponse {
	var st *State
	var idx uint64
	a.store.FSM().View(func(s *State) { st = s.Clone() })
	idx = a.store.AppliedIndex()
	return &ReadResponse{State: st, AppliedIndex: idx}
}

func (a *Agent) status(ctx context.Context, _ *StatusRequest) (*StatusResponse, error) {
	resp := &StatusResponse{Self: a.store.NodeID(), AppliedIndex: a.store.AppliedIndex()}
	resp.Leader, _ = a.store.Leader()
	members, err := a.store.Members()
	if err != nil {
		resp.Error = toWire(err)
		return resp, nil
	}
	a.store.FSM().View(func(s *State) {
		resp.ClusterID = s.ClusterID
		for _, m := range members {
			sm := StatusMember{Member: m}
			if n, ok := s.Nodes[m.ID]; ok {
				sm.APIAddr = n.APIAddr
			}
			resp.Members = append(resp.Members, sm)
		}
		for _, n := range s.SortedNodes() {
			c := *n
			resp.Nodes = append(resp.Nodes, &c)
		}
	})
	return resp, nil
}

func (a *Agent) join(ctx context.Context, req *JoinRequest) (*JoinResponse, error) {
	if req.NodeID == "" || req.RaftAddr == "" || req.APIAddr == "" {
		return &JoinResponse{Error: toWire(fmt.Errorf("join needs a node id, a raft address and an API address: %w", ErrInvalidArgument))}, nil
	}
	var clusterID string
	err := a.onLeader(ctx, req.Forwarded, true,
		func() error {
			a.store.FSM().View(func(s *State) { clusterID = s.ClusterID })
			if req.ClusterID != "" && clusterID != "" && req.ClusterID != clusterID {
				return fmt.Errorf("node %s has the data dir of cluster %s; this is cluster %s: %w", req.NodeID, req.ClusterID, clusterID, ErrClusterMismatch)
			}
			return a.store.AddVoter(req.NodeID, req.RaftAddr)
		},
		func(ctx context.Context, cl *Client) error {
			fwd := *req
			fwd.Forwarded = true
			var resp JoinResponse
			if err := cl.invokeOnce(ctx, "Join", &fwd, &resp); err != nil {
				return err
			}
			clusterID = resp.ClusterID
			return fromWire(resp.Error)
		})
	return &JoinResponse{ClusterID: clusterID, Error: toWire(err)}, nil
}

func (a *Agent) info(ctx context.Context, _ *InfoRequest) (*InfoResponse, error) {
	resp := &InfoResponse{
		NodeID: a.store.NodeID(), RaftAddr: a.store.RaftAddr(), APIAddr: a.APIAddr(),
		HasState: a.store.HasState(),
	}
	a.store.FSM().View(func(s *State) { resp.ClusterID = s.ClusterID })
	resp.Leader, _ = a.store.Leader()
	return resp, nil
}
