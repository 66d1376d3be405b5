package meta

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// policy is the reconciler's timings from the agent's configuration.
func (a *Agent) policy() repairPolicy {
	return repairPolicy{
		HeartbeatInterval:   a.cfg.HeartbeatInterval,
		NodeDownAfter:       a.cfg.NodeDownAfter,
		StaleReplicaTimeout: a.cfg.StaleReplicaTimeout,
	}
}

// reconcile is the leader's loop: every tick it marks down the nodes whose
// heartbeats stopped, then takes the replica repair steps (see repair.go).
// It runs only while this member leads.
func (a *Agent) reconcile(ctx context.Context) {
	a.mu.Lock()
	a.live.lead()
	a.lastHB = map[string]time.Time{}
	a.tombs = tombstones{}
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
		now := time.Now()
		var downs []*SetNodeState
		a.mu.Lock()
		a.store.FSM().View(func(s *State) {
			a.live.observe(s, now)
			downs = planNodeDowns(s, a.live, a.policy(), now)
		})
		a.mu.Unlock()
		for _, c := range downs {
			if _, err := a.store.Apply(ctx, c); err != nil {
				a.log.Warn("cannot mark node down", zap.String("node", c.NodeID), zap.Error(err))
				continue
			}
			a.log.Warn("node marked down: no heartbeat", zap.String("node", c.NodeID), zap.Duration("after", a.cfg.NodeDownAfter))
		}
		a.repairReplicas(ctx)
		a.purgeTombstones(ctx)
	}
}

// purgeTombstones forgets the volumes deleted longer than the retention ago
// (see purge.go).
func (a *Agent) purgeTombstones(ctx context.Context) {
	now := time.Now()
	var purges []*PurgeVolume
	a.mu.Lock()
	a.store.FSM().View(func(s *State) {
		a.tombs.observe(s, now)
		purges = planPurges(s, a.tombs, a.cfg.TombstoneRetention, now)
	})
	a.mu.Unlock()
	for _, c := range purges {
		if _, err := a.store.Apply(ctx, c); err != nil {
			a.log.Info("tombstone purge not taken", zap.String("volume_id", c.VolumeID), zap.Error(err))
			continue
		}
		a.log.Info("deleted volume purged", zap.String("volume_id", c.VolumeID), zap.Duration("retention", a.cfg.TombstoneRetention))
	}
}

// repairReplicas plans the replica repair steps on the state as it is now
// (after the node-down marks just committed) and applies them.
func (a *Agent) repairReplicas(ctx context.Context) {
	now := time.Now()
	var steps []repairStep
	a.mu.Lock()
	a.store.FSM().View(func(s *State) {
		a.live.observe(s, now)
		steps = planRepairs(s, a.live, a.policy(), now)
	})
	a.live.noteRepairs(steps, now)
	a.mu.Unlock()
	for _, st := range steps {
		res, err := a.store.Apply(ctx, st.Cmd)
		if err != nil {
			// Epoch moved (an engine acted) or no room elsewhere: try again
			// next tick.
			a.log.Info("replica repair step not taken", zap.String("volume_id", st.VolumeID), zap.String("replica_id", st.ReplicaID), zap.String("step", st.What), zap.Error(err))
			continue
		}
		a.log.Warn("replica repair", zap.String("volume_id", st.VolumeID), zap.String("replica_id", st.ReplicaID), zap.String("step", st.What), zap.Uint64("epoch", res.Volume.Epoch))
	}
}
