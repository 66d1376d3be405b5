package meta

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cairn-csi/cairn/replication/volspec"
)

func utc(s string) time.Time {
	t, err := time.Parse("2006-01-02 15:04:05", s)
	if err != nil {
		panic(err)
	}
	return t
}

func TestScheduledSnapshotName(t *testing.T) {
	slot := utc("2026-12-05 06:00:00")
	name := ScheduledSnapshotName("vol-1", slot)
	if name != "sched-vol-1-202612050600" {
		t.Fatalf("name %q", name)
	}
	if got, ok := ScheduledSlot(&Snapshot{Name: name, SourceVolumeID: "vol-1"}); !ok || !got.Equal(slot) {
		t.Fatalf("ScheduledSlot(%q) = %v, %v; want %v", name, got, ok, slot)
	}
	// A slot in another zone names the same UTC minute.
	if n := ScheduledSnapshotName("vol-1", slot.In(time.FixedZone("x", 3600))); n != name {
		t.Fatalf("name in another zone %q, want %q", n, name)
	}
	for _, sn := range []Snapshot{
		{Name: name, SourceVolumeID: "vol-2"}, // another volume's name
		{Name: "snapshot-7c1e", SourceVolumeID: "vol-1"},
		{Name: "sched-vol-1-20261205060", SourceVolumeID: "vol-1"},
		{Name: "sched-vol-1-2026120506000", SourceVolumeID: "vol-1"},
		{Name: "sched-vol-1-202613050600", SourceVolumeID: "vol-1"}, // month 13
		{Name: "sched-vol-1-2026120506xx", SourceVolumeID: "vol-1"},
		{Name: "sched-vol-1-backup-before-upgrade", SourceVolumeID: "vol-1"},
	} {
		if _, ok := ScheduledSlot(&sn); ok {
			t.Errorf("%q of %s taken for a scheduled snapshot", sn.Name, sn.SourceVolumeID)
		}
	}
}

// scheduleState is a state with one volume per schedule (vol-a, vol-b …),
// created at created.
func scheduleState(created time.Time, params ...map[string]string) *State {
	s := NewState()
	for i, p := range params {
		id := fmt.Sprintf("vol-%c", 'a'+i)
		s.Volumes[id] = &Volume{ID: id, Name: id, State: VolumeAvailable, Parameters: p, CreatedAt: created.UnixNano(),
			ReplicaCount: 1, Replicas: []Replica{{ID: id + "-r1", Node: "n1", State: ReplicaHealthy}}}
	}
	return s
}

// addScheduled records volume vol's scheduled snapshot of slot.
func addScheduled(s *State, vol, slot string, ready bool) *Snapshot {
	name := ScheduledSnapshotName(vol, utc(slot))
	sn := &Snapshot{ID: "id-" + name, Name: name, SourceVolumeID: vol, ReadyToUse: ready}
	s.Snapshots[sn.ID] = sn
	return sn
}

// describe renders steps as "create NAME", "retention NAME" … for comparison.
func describe(steps []scheduleStep) []string {
	var out []string
	for _, st := range steps {
		switch c := st.Cmd.(type) {
		case *CreateSnapshot:
			out = append(out, "create "+c.Name)
		case *MarkSnapshotDeleting:
			out = append(out, st.Reason+" "+st.Snapshot)
		case *DeleteSnapshot:
			out = append(out, "forget "+st.Snapshot)
		default:
			out = append(out, fmt.Sprintf("%T", c))
		}
	}
	return out
}

func TestPlanSchedules(t *testing.T) {
	hourly := map[string]string{volspec.KeySnapshotSchedule: "0 * * * *"}
	keep2 := map[string]string{volspec.KeySnapshotSchedule: "0 * * * *", volspec.KeySnapshotRetain: "2"}
	created := utc("2026-12-05 09:30:00")
	cases := []struct {
		name  string
		setup func(s *State, taken map[string]time.Time)
		now   string
		want  []string
	}{
		{name: "before the first slot after creation: nothing", now: "2026-12-05 09:59:59",
			setup: func(s *State, _ map[string]time.Time) {}},
		{name: "the slot before creation is not taken", now: "2026-12-05 09:45:00",
			setup: func(s *State, _ map[string]time.Time) {}},
		{name: "a due slot is asked for", now: "2026-12-05 10:00:00",
			setup: func(s *State, _ map[string]time.Time) {},
			want:  []string{"create sched-vol-a-202612051000"}},
		{name: "recorded already: not again", now: "2026-12-05 10:59:00",
			setup: func(s *State, _ map[string]time.Time) { addScheduled(s, "vol-a", "2026-12-05 10:00:00", false) }},
		{name: "five missed slots: the latest, once", now: "2026-12-05 15:20:00",
			setup: func(s *State, _ map[string]time.Time) { addScheduled(s, "vol-a", "2026-12-05 10:00:00", true) },
			want:  []string{"create sched-vol-a-202612051500"}},
		{name: "deleting by its user still counts as taken", now: "2026-12-05 10:30:00",
			setup: func(s *State, _ map[string]time.Time) {
				addScheduled(s, "vol-a", "2026-12-05 10:00:00", true).Deleting = true
			}},
		{name: "forgotten, but this leader asked for it", now: "2026-12-05 10:30:00",
			setup: func(s *State, taken map[string]time.Time) { taken["vol-a"] = utc("2026-12-05 10:00:00") }},
		{name: "a volume not serving is not snapshotted", now: "2026-12-05 10:00:00",
			setup: func(s *State, _ map[string]time.Time) { s.Volumes["vol-a"].State = VolumeProvisioning }},
		{name: "no schedule: nothing, and a user's snapshot is left alone", now: "2026-12-06 10:00:00",
			setup: func(s *State, _ map[string]time.Time) {
				s.Volumes["vol-a"].Parameters = nil
				s.Snapshots["u"] = &Snapshot{ID: "u", Name: "nightly", SourceVolumeID: "vol-a", ReadyToUse: true}
			}},
		{name: "retention keeps the newest ready ones, never a user's", now: "2026-12-05 14:30:00",
			setup: func(s *State, _ map[string]time.Time) {
				s.Volumes["vol-a"].Parameters = keep2
				for _, h := range []string{"10", "11", "12", "13", "14"} {
					addScheduled(s, "vol-a", "2026-12-05 "+h+":00:00", true)
				}
				s.Snapshots["u"] = &Snapshot{ID: "u", Name: "before-upgrade", SourceVolumeID: "vol-a", ReadyToUse: true}
				s.Snapshots["u2"] = &Snapshot{ID: "u2", Name: "sched-by-hand", SourceVolumeID: "vol-a", ReadyToUse: true}
			},
			want: []string{"retention sched-vol-a-202612051200", "retention sched-vol-a-202612051100", "retention sched-vol-a-202612051000"}},
		{name: "a ready snapshot is not deleted for one not ready yet", now: "2026-12-05 12:30:00",
			setup: func(s *State, _ map[string]time.Time) {
				s.Volumes["vol-a"].Parameters = map[string]string{volspec.KeySnapshotSchedule: "0 * * * *", volspec.KeySnapshotRetain: "1"}
				addScheduled(s, "vol-a", "2026-12-05 10:00:00", true)
				addScheduled(s, "vol-a", "2026-12-05 11:00:00", false)
				addScheduled(s, "vol-a", "2026-12-05 12:00:00", false)
			},
			// 12:00 is being taken; 11:00 never was and holds nothing 12:00
			// will not; 10:00 is the one usable snapshot.
			want: []string{"superseded sched-vol-a-202612051100"}},
		{name: "deleting ones do not count toward retention", now: "2026-12-05 12:30:00",
			setup: func(s *State, _ map[string]time.Time) {
				s.Volumes["vol-a"].Parameters = keep2
				addScheduled(s, "vol-a", "2026-12-05 10:00:00", true)
				addScheduled(s, "vol-a", "2026-12-05 11:00:00", true)
				addScheduled(s, "vol-a", "2026-12-05 12:00:00", true).Deleting = true
			}},
		{name: "a hidden volume's scheduled snapshots go", now: "2026-12-05 12:30:00",
			setup: func(s *State, _ map[string]time.Time) {
				s.Volumes["vol-a"].Hidden = true
				addScheduled(s, "vol-a", "2026-12-05 11:00:00", true)
				addScheduled(s, "vol-a", "2026-12-05 12:00:00", true)
				s.Snapshots["u"] = &Snapshot{ID: "u", Name: "keep-me", SourceVolumeID: "vol-a", ReadyToUse: true}
			},
			want: []string{"volume_deleted sched-vol-a-202612051200", "volume_deleted sched-vol-a-202612051100"}},
		{name: "a deleted or purged volume's snapshots are forgotten, scheduled or not", now: "2026-12-05 10:30:00",
			setup: func(s *State, _ map[string]time.Time) {
				s.Volumes["vol-a"].State = VolumeDeleted
				addScheduled(s, "vol-a", "2026-12-05 10:00:00", true)
				addScheduled(s, "vol-gone", "2026-12-05 09:00:00", true)
				s.Snapshots["u"] = &Snapshot{ID: "u", Name: "orphan", SourceVolumeID: "vol-gone"}
			},
			want: []string{"forget sched-vol-a-202612051000", "forget sched-vol-gone-202612050900", "forget orphan"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := scheduleState(created, hourly)
			taken := map[string]time.Time{}
			c.setup(s, taken)
			got := describe(planSchedules(s, taken, utc(c.now)))
			if !slices.Equal(got, c.want) {
				t.Fatalf("planned %q\nwant    %q", got, c.want)
			}
		})
	}
}

// TestPlanSchedulesBounded: a thousand volumes due at once are asked for a
// tick's worth at a time, and none is asked for twice meanwhile.
func TestPlanSchedulesBounded(t *testing.T) {
	params := make([]map[string]string, 3*maxScheduleStepsPerTick)
	for i := range params {
		params[i] = map[string]string{volspec.KeySnapshotSchedule: "0 0 * * *"}
	}
	s := scheduleState(utc("2026-12-04 12:00:00"), params...)
	now := utc("2026-12-05 00:00:30")
	taken := map[string]time.Time{}
	seen := map[string]bool{}
	for range 3 {
		steps := planSchedules(s, taken, now)
		if len(steps) != maxScheduleStepsPerTick {
			t.Fatalf("planned %d steps, want %d", len(steps), maxScheduleStepsPerTick)
		}
		for _, st := range steps {
			if seen[st.Snapshot] {
				t.Fatalf("%s asked for twice", st.Snapshot)
			}
			seen[st.Snapshot] = true
			taken[st.VolumeID] = st.Slot
		}
	}
	if steps := planSchedules(s, taken, now); len(steps) != 0 {
		t.Fatalf("after every volume was served: %q", describe(steps))
	}
}

// fakeClock is a clock a test moves; safe for the schedule loop to read.
type fakeClock struct{ ns atomic.Int64 }

func (c *fakeClock) set(t time.Time)      { c.ns.Store(t.UnixNano()) }
func (c *fakeClock) now() time.Time       { return time.Unix(0, c.ns.Load()).UTC() }
func newFakeClock(t time.Time) *fakeClock { c := &fakeClock{}; c.set(t); return c }

// scheduleRig is a one-member store whose schedule runs every 20 ms on a
// clock the test moves.
type scheduleRig struct {
	a     *Agent
	c     *Client
	ctx   context.Context
	clock *fakeClock
}

func newScheduleRig(t *testing.T, start time.Time) *scheduleRig {
	clock := newFakeClock(start)
	a, c := startTestAgent(t, func(cfg *AgentConfig) {
		cfg.Clock = clock.now
		cfg.ScheduleInterval = 20 * time.Millisecond
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return &scheduleRig{a: a, c: c, ctx: ctx, clock: clock}
}

// createScheduled creates a volume with schedule expr, created at the
// clock's time (the schedule starts after its creation).
func createScheduled(t *testing.T, ctx context.Context, c *Client, clock *fakeClock, name string, params map[string]string) *Volume {
	t.Helper()
	spec, err := volspec.Parse(params)
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Apply(ctx, &CreateVolume{Name: name, SizeBytes: gib, Replicas: 1, Parameters: spec.Params(), CreatedAt: clock.now().UnixNano()})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return res.Volume
}

// scheduledOf returns volume vol's scheduled snapshots, by name.
func scheduledOf(t *testing.T, ctx context.Context, c *Client, vol string) map[string]*Snapshot {
	t.Helper()
	st, err := c.State(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*Snapshot{}
	for _, sn := range st.Snapshots {
		if _, ok := ScheduledSlot(sn); ok && sn.SourceVolumeID == vol {
			out[sn.Name] = sn
		}
	}
	return out
}

// moveTo sets the clock to now and waits until volume vol's scheduled
// snapshot of slot is recorded.
func moveTo(t *testing.T, ctx context.Context, c *Client, clock *fakeClock, now, slot time.Time, vol string) *Snapshot {
	t.Helper()
	clock.set(now)
	name := ScheduledSnapshotName(vol, slot)
	var sn *Snapshot
	waitUntil(t, 10*time.Second, name, func() bool { sn = scheduledOf(t, ctx, c, vol)[name]; return sn != nil })
	return sn
}

// settle lets the schedule loop run a good number of ticks.
func settle() { time.Sleep(300 * time.Millisecond) }

// TestScheduleTakesDueSlotOnce: on a real store, a due slot gets one
// snapshot record, however many ticks pass and when a new leader's loop
// (with nothing in memory) looks again; the next slot gets the next one.
func TestScheduleTakesDueSlotOnce(t *testing.T) {
	r := newScheduleRig(t, utc("2026-12-05 10:30:00"))
	a, c, ctx, clock := r.a, r.c, r.ctx, r.clock
	v := createScheduled(t, ctx, c, clock, "data", map[string]string{volspec.KeySnapshotSchedule: "0 * * * *"})
	requested := testutil.ToFloat64(a.store.metrics.scheduledSnapshots)

	settle()
	if got := scheduledOf(t, ctx, c, v.ID); len(got) != 0 {
		t.Fatalf("before the first slot: %v", got)
	}
	first := moveTo(t, ctx, c, clock, utc("2026-12-05 11:00:05"), utc("2026-12-05 11:00:00"), v.ID).Name
	settle()
	// A second loop, as a new leader's, with an empty memory.
	a.scheduleTick(ctx, &scheduler{taken: map[string]time.Time{}})
	got := scheduledOf(t, ctx, c, v.ID)
	if len(got) != 1 || got[first] == nil {
		t.Fatalf("after many ticks at 11:00: %v, want %s alone", names(got), first)
	}
	if sn := got[first]; sn.Deleting || sn.SizeBytes != v.SizeBytes || sn.CreatedAt != utc("2026-12-05 11:00:05").UnixNano() {
		t.Fatalf("record %+v: want a live request of the volume's size, made at the loop's clock", sn)
	}
	if n := testutil.ToFloat64(a.store.metrics.scheduledSnapshots) - requested; n != 1 {
		t.Fatalf("cairn_meta_scheduled_snapshots_total rose by %v, want 1", n)
	}

	moveTo(t, ctx, c, clock, utc("2026-12-05 12:00:00"), utc("2026-12-05 12:00:00"), v.ID)
	settle()
	if got := scheduledOf(t, ctx, c, v.ID); len(got) != 2 {
		t.Fatalf("after the 12:00 slot: %v, want the 11:00 and 12:00 ones", names(got))
	}
}

// TestScheduleMissedSlotsTakenOnce: after the schedule could not run over
// five slots (the leader was down), one snapshot is taken, of the latest.
func TestScheduleMissedSlotsTakenOnce(t *testing.T) {
	r := newScheduleRig(t, utc("2026-12-05 10:30:00"))
	c, ctx, clock := r.c, r.ctx, r.clock
	v := createScheduled(t, ctx, c, clock, "data", map[string]string{volspec.KeySnapshotSchedule: "0 * * * *"})
	want := moveTo(t, ctx, c, clock, utc("2026-12-05 15:20:00"), utc("2026-12-05 15:00:00"), v.ID).Name
	settle()
	if got := scheduledOf(t, ctx, c, v.ID); len(got) != 1 {
		t.Fatalf("after five missed slots: %v, want %s alone", names(got), want)
	}
}

// TestScheduleRetention: with snapshotRetain 2, once the node has taken
// each slot's snapshot, the older scheduled ones are marked deleting, the
// newest two stay, and the user's snapshots of the volume are never touched.
func TestScheduleRetention(t *testing.T) {
	r := newScheduleRig(t, utc("2026-12-05 09:55:00"))
	a, c, ctx, clock := r.a, r.c, r.ctx, r.clock
	v := createScheduled(t, ctx, c, clock, "data", map[string]string{
		volspec.KeySnapshotSchedule: "*/10 * * * *", volspec.KeySnapshotRetain: "2"})
	other := createScheduled(t, ctx, c, clock, "other", nil)
	retired := testutil.ToFloat64(a.store.metrics.scheduledDeletions.WithLabelValues(retireRetention))

	// The node's part: take what is asked for (SetSnapshotReady).
	ready := func(sn *Snapshot) {
		t.Helper()
		if _, err := c.Apply(ctx, &SetSnapshotReady{SnapshotID: sn.ID, Replicas: []string{v.Replicas[0].ID}}); err != nil {
			t.Fatal(err)
		}
	}
	user, err := c.Apply(ctx, &CreateSnapshot{Name: "before-upgrade", SourceVolumeID: v.ID})
	if err != nil {
		t.Fatal(err)
	}
	ready(user.Snapshot)
	// A user's snapshot named like a scheduled one, of another volume.
	if _, err := c.Apply(ctx, &CreateSnapshot{Name: ScheduledSnapshotName(v.ID, utc("2026-12-05 09:00:00")), SourceVolumeID: other.ID}); err != nil {
		t.Fatal(err)
	}

	var slots []string
	for _, slot := range []string{"10:00", "10:10", "10:20", "10:30"} {
		at := utc("2026-12-05 " + slot + ":00")
		sn := moveTo(t, ctx, c, clock, at.Add(time.Second), at, v.ID)
		ready(sn)
		slots = append(slots, sn.Name)
	}
	waitUntil(t, 10*time.Second, "retention", func() bool {
		got := scheduledOf(t, ctx, c, v.ID)
		return got[slots[0]].Deleting && got[slots[1]].Deleting
	})
	settle()
	st, err := c.State(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	got := scheduledOf(t, ctx, c, v.ID)
	for i, name := range slots {
		if want := i < 2; got[name].Deleting != want {
			t.Errorf("%s deleting %v, want %v", name, got[name].Deleting, want)
		}
	}
	for _, sn := range st.Snapshots {
		if _, sched := ScheduledSlot(sn); !sched && sn.Deleting {
			t.Errorf("user snapshot %s (%s of %s) marked deleting", sn.ID, sn.Name, sn.SourceVolumeID)
		}
	}
	if n := testutil.ToFloat64(a.store.metrics.scheduledDeletions.WithLabelValues(retireRetention)) - retired; n != 2 {
		t.Fatalf("retention deletions rose by %v, want 2", n)
	}
}

// TestScheduleRefusesBadCron: the store's CreateVolume refuses a bad
// schedule, naming the parameter and the field, and records nothing.
func TestScheduleRefusesBadCron(t *testing.T) {
	_, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for expr, field := range map[string]string{
		"0 25 * * *":  "field 2 (hour)",
		"61 * * * *":  "field 1 (minute)",
		"0 0 32 * *":  "field 3 (day of month)",
		"0 0 * * MOO": "field 5 (day of week)",
		"0 */6 * *":   "4 fields, want 5",
	} {
		_, err := c.Apply(ctx, &CreateVolume{Name: "bad", SizeBytes: gib, Replicas: 1,
			Parameters: map[string]string{volspec.KeySnapshotSchedule: expr}})
		if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), `"snapshotSchedule"`) || !strings.Contains(err.Error(), field) {
			t.Errorf("schedule %q: %v; want an invalid-argument error naming snapshotSchedule and %s", expr, err, field)
		}
	}
	_, err := c.Apply(ctx, &CreateVolume{Name: "bad", SizeBytes: gib, Replicas: 1,
		Parameters: map[string]string{volspec.KeySnapshotSchedule: "0 * * * *", volspec.KeySnapshotRetain: "0"}})
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), `"snapshotRetain"`) {
		t.Errorf("snapshotRetain 0: %v; want an invalid-argument error naming snapshotRetain", err)
	}
	st, err := c.State(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.SortedVolumes()) != 0 {
		t.Fatalf("refused creates left volumes: %v", st.SortedVolumes())
	}
}

func names(m map[string]*Snapshot) []string { return slices.Sorted(maps.Keys(m)) }
