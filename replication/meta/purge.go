package meta

import (
	"sort"
	"time"
)

// DefaultTombstoneRetention is how long a deleted volume stays in the store
// by default before the leader purges it.
const DefaultTombstoneRetention = 24 * time.Hour

// maxPurgesPerTick bounds the purges of one reconciler tick, so that a
// backlog (a first leader of a build that purges, after months of deletes)
// does not hold up node-down marks and replica repairs.
const maxPurgesPerTick = 64

// A deleted volume stays in the store as a tombstone for a while: its
// DeleteVolume fenced the engines still holding it with a new epoch, and the
// realizers delete its replicas from disk (storagenode). After that nothing
// needs it, and a store that kept every volume ever created would grow with
// the history of the cluster. So the leader purges it (PurgeVolume, a
// replicated command applied alike everywhere) once it has been a tombstone
// for the retention.
//
// The FSM reads no clock, and DeleteVolume carries no time (adding one is a
// new command version; see command.go). So the retention counts from when
// the current leader first saw the tombstone: a leader change starts it
// again. A tombstone may therefore live longer than the retention, never
// shorter.

// tombstones holds when this leader first saw each deleted volume.
type tombstones map[string]time.Time

// observe records the deleted volumes of s that this leader had not seen,
// and forgets those no longer in s.
func (t tombstones) observe(s *State, now time.Time) {
	for id, v := range s.Volumes {
		if _, ok := t[id]; !ok && v.State == VolumeDeleted {
			t[id] = now
		}
	}
	for id := range t {
		if _, ok := s.Volumes[id]; !ok {
			delete(t, id)
		}
	}
}

// planPurges returns the purges of the tombstones seen longer than
// retention ago, oldest first (ties by id), at most maxPurgesPerTick.
func planPurges(s *State, t tombstones, retention time.Duration, now time.Time) []*PurgeVolume {
	var due []string
	for id, seen := range t {
		if v, ok := s.Volumes[id]; ok && v.State == VolumeDeleted && now.Sub(seen) >= retention {
			due = append(due, id)
		}
	}
	sort.Slice(due, func(i, j int) bool {
		if a, b := t[due[i]], t[due[j]]; !a.Equal(b) {
			return a.Before(b)
		}
		return due[i] < due[j]
	})
	if len(due) > maxPurgesPerTick {
		due = due[:maxPurgesPerTick]
	}
	out := make([]*PurgeVolume, 0, len(due))
	for _, id := range due {
		out = append(out, &PurgeVolume{VolumeID: id})
	}
	return out
}
