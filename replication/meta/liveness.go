package meta

import "time"

// liveness is what the leader knows of the nodes' heartbeats. It lives in
// the leader's memory only: most heartbeats are never committed (see
// recordHeartbeat), and the one that is carries the clock of the leader of
// its day, up to 30 s old. So a new leader knows nothing of any node's
// recent heartbeats, and the rule after a leader change is:
//
//   - A node is alive (heard) only once it has sent a heartbeat to this
//     leader. A new leader never assumes it: a node that died together with
//     the old leader must not pass for alive, or the reconciler would start
//     a rebuild on it and the volume's engine would stall for its I/O
//     timeout dialling a dead replica server.
//   - A node not heard yet is not dead either. Its node-down clock runs from
//     when this leader first knew of it (its election, for the nodes already
//     registered then), so it is marked down NodeDownAfter after the
//     election unless it heartbeats. NodeDownAfter is at least two
//     heartbeat intervals, so a live node always heartbeats in time: a
//     leader change alone never marks a node down, and so never makes its
//     replicas stale or replaced.
//
// Not safe for concurrent use; the Agent guards it with its mutex.
type liveness struct {
	// heard is the time of the last heartbeat this member received as
	// leader, per node. Kept across terms: an old time says nothing alive.
	heard map[string]time.Time
	// known is when this leader first knew of each node (start of the grace
	// period of a node it has not heard).
	known map[string]time.Time
	// downAt is when this leader first saw each down node down.
	downAt map[string]time.Time
	// rebuilds counts, per replica id, the reconciler's restarts of its
	// rebuild since it was last healthy (see planRepairs).
	rebuilds map[string]rebuildRestarts
}

func newLiveness() *liveness {
	l := &liveness{heard: map[string]time.Time{}}
	l.lead()
	return l
}

// lead starts a new term of leadership: everything but the heartbeats heard
// is forgotten, and the nodes are seen afresh at the next observe.
func (l *liveness) lead() {
	l.known = map[string]time.Time{}
	l.downAt = map[string]time.Time{}
	l.rebuilds = map[string]rebuildRestarts{}
}

// heartbeat records a heartbeat of node id received at now.
func (l *liveness) heartbeat(id string, now time.Time) { l.heard[id] = now }

// observe brings l up to date with s at now: nodes this leader had not
// known start their grace period, down nodes their stale-replica clock, and
// the rebuild restarts of replicas that are gone or healthy are forgotten.
func (l *liveness) observe(s *State, now time.Time) {
	for id, n := range s.Nodes {
		if _, ok := l.known[id]; !ok {
			l.known[id] = now
		}
		if n.State == NodeDown {
			if _, ok := l.downAt[id]; !ok {
				l.downAt[id] = now
			}
		} else {
			delete(l.downAt, id)
		}
	}
	unhealthy := map[string]bool{}
	for _, v := range s.Volumes {
		if v.State == VolumeDeleted {
			continue
		}
		for _, r := range v.Replicas {
			if r.State != ReplicaHealthy {
				unhealthy[r.ID] = true
			}
		}
	}
	for id := range l.rebuilds {
		if !unhealthy[id] {
			delete(l.rebuilds, id)
		}
	}
}

// alive says whether node id sent this leader a heartbeat within window
// before now.
func (l *liveness) alive(id string, now time.Time, window time.Duration) bool {
	t, ok := l.heard[id]
	return ok && now.Sub(t) < window
}

// silentFor is how long node id has not been heard from as far as this
// leader can tell: since its last heartbeat, or since the leader first knew
// of it if that is later.
func (l *liveness) silentFor(id string, now time.Time) time.Duration {
	since := l.known[id]
	if t, ok := l.heard[id]; ok && t.After(since) {
		since = t
	}
	return now.Sub(since)
}

// downFor is how long node id has been down as this leader saw it, and
// whether it is down.
func (l *liveness) downFor(id string, now time.Time) (time.Duration, bool) {
	t, ok := l.downAt[id]
	if !ok {
		return 0, false
	}
	return now.Sub(t), true
}
