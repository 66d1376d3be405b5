package meta

import (
	"time"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// The leader's reconciler is two pure planners over the replicated state and
// the leader's liveness view (liveness.go): planNodeDowns and planRepairs.
// They read no clock and change nothing; reconcile.go applies what they
// plan, one command at a time, each a compare-and-set that fails harmlessly
// when the state moved meanwhile.

// repairPolicy holds the timings the planners apply.
type repairPolicy struct {
	// HeartbeatInterval is how often nodes report to the leader; a node
	// heard within three of them counts as alive.
	HeartbeatInterval time.Duration
	// NodeDownAfter is how long a node may stay silent before it is marked
	// down.
	NodeDownAfter time.Duration
	// StaleReplicaTimeout is how long a replica may sit on a down node
	// before it is replaced (a volume's staleReplicaTimeout overrides it).
	StaleReplicaTimeout time.Duration
}

// aliveWindow is how recent a heartbeat must be for the reconciler to start
// a rebuild on its node: right after a crash the node is still "up" in the
// store until NodeDownAfter passes.
func (p repairPolicy) aliveWindow() time.Duration { return 3 * p.HeartbeatInterval }

// staleTimeout is how long v's replicas may sit on a down node: the
// volume's staleReplicaTimeout (read by volspec, so a bare number is
// minutes, as CreateVolume accepts it), else the cluster's.
func (p repairPolicy) staleTimeout(v *Volume) time.Duration {
	if s, err := v.Spec(); err == nil && s.StaleReplicaTimeout > 0 {
		return s.StaleReplicaTimeout
	}
	return p.StaleReplicaTimeout
}

// ParamStaleReplicaTimeout is the volume parameter overriding
// AgentConfig.StaleReplicaTimeout.
const ParamStaleReplicaTimeout = volspec.KeyStaleReplicaTimeout

// repairStep is one command the reconciler proposes, with what it is for.
type repairStep struct {
	Cmd                 Command
	What                string
	VolumeID, ReplicaID string
}

// planNodeDowns marks down, in id order, every node that is up in s and
// that the leader has not heard from for longer than NodeDownAfter.
func planNodeDowns(s *State, l *liveness, p repairPolicy, now time.Time) []*SetNodeState {
	var out []*SetNodeState
	for _, n := range s.SortedNodes() {
		if n.State == NodeUp && l.silentFor(n.ID, now) > p.NodeDownAfter {
			out = append(out, &SetNodeState{NodeID: n.ID, State: NodeDown, Time: now.UnixNano()})
		}
	}
	return out
}

// planRepairs is the replica reconciler. For each live volume, in id order,
// it plans at most one step (each step moves the epoch, so a second one
// planned on the same epoch would fail):
//   - a failed or stale replica whose node is up and alive (heard within
//     aliveWindow) starts rebuilding;
//   - a replica whose node has been down longer than the volume's
//     staleReplicaTimeout is marked stale (if healthy and not the last
//     healthy one) and then replaced by a new replica, placed on another
//     node, that rebuilds.
//
// The engine of an attached volume, or the node hosting the new replica,
// does the copying; see replication/engine.
//
// A replica that fails again right after its rebuild was started (its node
// heartbeats, but the engine cannot reach its replica server: a partition
// of the data port, a full disk) is restarted after 2 s, then 4 s, 8 s …
// up to a minute, not at every tick: each restart costs the engine a claim
// that times out, and the volume a new epoch. noteRepairs records the
// restarts planned.
func planRepairs(s *State, l *liveness, p repairPolicy, now time.Time) []repairStep {
	var steps []repairStep
	for _, v := range s.SortedVolumes() {
		if st, ok := planVolumeRepair(s, v, l, p, now); ok {
			steps = append(steps, st)
		}
	}
	return steps
}

// planVolumeRepair is planRepairs for one volume.
func planVolumeRepair(s *State, v *Volume, l *liveness, p repairPolicy, now time.Time) (repairStep, bool) {
	for _, r := range v.Replicas {
		n, ok := s.Nodes[r.Node]
		if !ok {
			continue
		}
		if n.State == NodeUp && l.alive(r.Node, now, p.aliveWindow()) && (r.State == ReplicaFailed || r.State == ReplicaStale) {
			if now.Before(l.rebuilds[r.ID].next) {
				continue
			}
			return repairStep{&SetReplicaState{VolumeID: v.ID, ReplicaID: r.ID, State: ReplicaRebuilding, ExpectEpoch: v.Epoch},
				"rebuild replica on returned node", v.ID, r.ID}, true
		}
		down, isDown := l.downFor(r.Node, now)
		if !isDown || down < p.staleTimeout(v) {
			continue
		}
		if r.State == ReplicaHealthy {
			if v.HealthyReplicas() > 1 {
				return repairStep{&SetReplicaState{VolumeID: v.ID, ReplicaID: r.ID, State: ReplicaStale, ExpectEpoch: v.Epoch},
					"mark replica on long-down node stale", v.ID, r.ID}, true
			}
			continue // the last healthy copy stays until its node returns
		}
		return repairStep{&ReplaceReplica{VolumeID: v.ID, ReplicaID: r.ID, ExpectEpoch: v.Epoch},
			"replace replica on long-down node", v.ID, r.ID}, true
	}
	return repairStep{}, false
}

// noteRepairs records in l the rebuild restarts among steps, planned at now.
func (l *liveness) noteRepairs(steps []repairStep, now time.Time) {
	for _, st := range steps {
		if c, ok := st.Cmd.(*SetReplicaState); ok && c.State == ReplicaRebuilding {
			l.rebuilds[c.ReplicaID] = l.rebuilds[c.ReplicaID].restarted(now)
		}
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
