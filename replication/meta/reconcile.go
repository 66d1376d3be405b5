package meta

import (
	"context"
	"time"

	"go.uber.org/zap"
)

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
