package meta

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/zap"
)

// form bootstraps or joins the cluster unless the data dir held raft
// state when the store opened, in which case raft itself reconnects to the
// old peers.
func (a *Agent) form() {
	if a.store.HadStateAtOpen() {
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
		c, err := NewClient([]string{addr}, WithTLS(a.cfg.TLS))
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
	c, err := NewClient(addrs, WithTLS(a.cfg.TLS))
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
				if c, err = NewClient([]string{addr}, WithTLS(a.cfg.TLS)); err != nil {
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
