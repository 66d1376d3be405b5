package meta

import (
	"fmt"
	"reflect"
	"testing"
	"time"
)

func TestPlanPurges(t *testing.T) {
	now := time.Unix(100000, 0)
	const retention = time.Hour
	tests := []struct {
		name string
		vols map[string]VolumeState
		seen map[string]time.Duration // volume id → age of the leader's first sight
		want []string
	}{
		{
			name: "tombstone seen longer than the retention ago is purged",
			vols: map[string]VolumeState{"v1": VolumeDeleted},
			seen: map[string]time.Duration{"v1": retention},
			want: []string{"v1"},
		},
		{
			name: "tombstone seen less than the retention ago stays",
			vols: map[string]VolumeState{"v1": VolumeDeleted},
			seen: map[string]time.Duration{"v1": retention - time.Second},
		},
		{
			name: "live volume is never purged",
			vols: map[string]VolumeState{"v1": VolumeAvailable, "v2": VolumeAttached},
			seen: map[string]time.Duration{"v1": 2 * retention, "v2": 2 * retention},
		},
		{
			name: "oldest first, ties by id",
			vols: map[string]VolumeState{"a": VolumeDeleted, "b": VolumeDeleted, "c": VolumeDeleted},
			seen: map[string]time.Duration{"a": retention, "b": 3 * retention, "c": 3 * retention},
			want: []string{"b", "c", "a"},
		},
		{
			name: "volume already gone is not purged again",
			vols: map[string]VolumeState{},
			seen: map[string]time.Duration{"v1": 2 * retention},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewState()
			for id, st := range tt.vols {
				s.Volumes[id] = &Volume{ID: id, State: st}
			}
			tomb := tombstones{}
			for id, age := range tt.seen {
				tomb[id] = now.Add(-age)
			}
			var got []string
			for _, c := range planPurges(s, tomb, retention, now) {
				got = append(got, c.VolumeID)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("planPurges = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestPlanPurgesBounded: a backlog is purged a tick's worth at a time.
func TestPlanPurgesBounded(t *testing.T) {
	now := time.Unix(100000, 0)
	s := NewState()
	tomb := tombstones{}
	for i := range 3 * maxPurgesPerTick {
		id := fmt.Sprintf("v%04d", i)
		s.Volumes[id] = &Volume{ID: id, State: VolumeDeleted}
	}
	tomb.observe(s, now.Add(-2*time.Hour))
	if got := planPurges(s, tomb, time.Hour, now); len(got) != maxPurgesPerTick {
		t.Fatalf("planned %d purges, want %d", len(got), maxPurgesPerTick)
	}
}

// TestTombstonesObserve: the leader's clock for a tombstone starts when it
// first sees it, and is forgotten with the volume.
func TestTombstonesObserve(t *testing.T) {
	t0 := time.Unix(100000, 0)
	s := NewState()
	s.Volumes["v1"] = &Volume{ID: "v1", State: VolumeAvailable}
	tomb := tombstones{}
	tomb.observe(s, t0)
	if len(tomb) != 0 {
		t.Fatalf("live volume taken for a tombstone: %v", tomb)
	}
	s.Volumes["v1"].State = VolumeDeleted
	tomb.observe(s, t0.Add(time.Minute))
	tomb.observe(s, t0.Add(2*time.Minute))
	if got := tomb["v1"]; !got.Equal(t0.Add(time.Minute)) {
		t.Fatalf("tombstone first seen at %v, want %v", got, t0.Add(time.Minute))
	}
	delete(s.Volumes, "v1")
	tomb.observe(s, t0.Add(3*time.Minute))
	if len(tomb) != 0 {
		t.Fatalf("purged volume still tracked: %v", tomb)
	}
}
