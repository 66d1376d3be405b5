package meta

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// Scheduled snapshots (the StorageClass parameters snapshotSchedule and
// snapshotRetain; docs/snapshots.md, "Scheduled snapshots").
//
// The leader runs every volume's schedule: it asks for each due slot's
// snapshot with an ordinary CreateSnapshot, and the node serving the volume
// takes it as it takes any other. Nothing about the schedule is kept outside
// the snapshot records themselves: a scheduled snapshot's name holds its
// volume and its slot (ScheduledSnapshotName), CreateSnapshot is idempotent
// by name and volume, and the newest slot recorded is where the next
// leader's schedule goes on from. So a slot is asked for once whoever leads
// and however often leaders change, and a leader that was down (or a cluster
// with no leader) takes only the latest of the slots it missed (cron.Due).
//
// Like the reconciler (repair.go, purge.go), the loop is a pure planner
// over the replicated state and the leader's clock (planSchedules) and an
// applier. The clock is read in the loop only; the commands carry what they
// need, so every member applies them alike.

// ScheduledSnapshotPrefix starts the names of scheduled snapshots.
const ScheduledSnapshotPrefix = "sched-"

// slotLayout is the slot in a scheduled snapshot's name: UTC, to the minute
// (a cron slot has no seconds), sorting as the slots do.
const slotLayout = "200601021504"

// ScheduledSnapshotName is the name of volume vol's scheduled snapshot for
// slot, e.g. "sched-vol-0123456789abcdef-202612051200".
func ScheduledSnapshotName(vol string, slot time.Time) string {
	return ScheduledSnapshotPrefix + vol + "-" + slot.UTC().Format(slotLayout)
}

// ScheduledSlot returns the slot of a scheduled snapshot, and false for any
// other snapshot: one whose name is not exactly what ScheduledSnapshotName
// gives for its own volume. Retention deletes only snapshots it recognises,
// so a user's snapshot is never taken for a scheduled one unless its name
// copies the form, its volume's id and a slot.
func ScheduledSlot(sn *Snapshot) (time.Time, bool) {
	rest, ok := strings.CutPrefix(sn.Name, ScheduledSnapshotPrefix+sn.SourceVolumeID+"-")
	if !ok || len(rest) != len(slotLayout) {
		return time.Time{}, false
	}
	slot, err := time.Parse(slotLayout, rest)
	if err != nil || slot.Format(slotLayout) != rest {
		return time.Time{}, false
	}
	return slot, true
}

// DefaultScheduleInterval is how often the leader looks for due slots: a
// scheduled snapshot is asked for at most this long after its slot.
const DefaultScheduleInterval = 10 * time.Second

// maxScheduleStepsPerTick bounds the commands of one tick, so that a
// thousand volumes on one schedule do not hold the loop for long; the rest
// stay due and are taken at the next ticks.
const maxScheduleStepsPerTick = 64

// Why a scheduled snapshot is deleted (the reason label of
// cairn_meta_scheduled_snapshot_deletions_total).
const (
	// retireRetention: older than the newest snapshotRetain ready ones.
	retireRetention = "retention"
	// retireSuperseded: not taken yet when a later slot was asked for;
	// the later one holds newer data, so taking this one is pointless.
	retireSuperseded = "superseded"
	// retireVolumeDeleted: its volume was deleted by its user. Nothing in
	// Kubernetes refers to a scheduled snapshot, so none would ever delete
	// it, and it would keep the hidden volume and its space for good.
	retireVolumeDeleted = "volume_deleted"
)

// scheduleStep is one command the schedule proposes, with what it is for.
type scheduleStep struct {
	Cmd      Command
	VolumeID string
	Snapshot string // the snapshot's name
	// SnapshotID is the snapshot's id; "" for a create (the loop draws it).
	SnapshotID string
	Slot       time.Time
	// Reason is why a snapshot is deleted; "" for a create.
	Reason string
}

// schedulable reports whether v's schedule runs: a volume being filled
// (provisioning), not placed yet or failed cannot be snapshotted, and
// asking would only pile up records that wait.
func schedulable(v *Volume) bool {
	switch v.State {
	case VolumeAvailable, VolumeAttached, VolumeReleasing:
		return !v.Hidden
	}
	return false
}

// planSchedules plans, at now (UTC), the snapshot each volume's schedule
// has due and the scheduled snapshots retention deletes. taken holds the
// slot this leader last asked for per volume: it keeps a slot from being
// asked for again when its snapshot was deleted by its user and forgotten
// while the slot is still the latest (a new leader might take it once
// more: the cost of keeping nothing outside the records).
//
// For each live volume, in id order:
//   - the due slot (cron.Due after the newest of: the volume's creation,
//     the newest scheduled snapshot recorded, deleting or not, and taken)
//     is asked for, if the volume is schedulable;
//   - of its scheduled snapshots that are not deleting, newest first, the
//     newest is kept whatever its state (it is being taken), and the next
//     ready ones up to snapshotRetain in all; a ready one past that is
//     deleted (retention), and one not ready is deleted as superseded. A
//     ready snapshot is never deleted for one that is not ready yet: with
//     snapshotRetain 1, the only usable snapshot stays until the next one
//     is usable;
//   - a hidden volume's scheduled snapshots are deleted.
//
// Snapshots of a volume that is deleted or gone, scheduled or not, are
// forgotten (DeleteSnapshot), as Client.DeleteSnapshot does: no layers are
// left. Otherwise, snapshots that ScheduledSlot does not recognise are
// never touched.
func planSchedules(s *State, taken map[string]time.Time, now time.Time) []scheduleStep {
	byVolume := map[string][]*Snapshot{}
	for _, sn := range s.Snapshots {
		if _, ok := ScheduledSlot(sn); ok {
			byVolume[sn.SourceVolumeID] = append(byVolume[sn.SourceVolumeID], sn)
		}
	}
	var creates, deletes []scheduleStep
	for _, v := range s.SortedVolumes() {
		snaps := newestFirst(byVolume[v.ID])
		delete(byVolume, v.ID)
		if v.Hidden {
			for _, sn := range snaps {
				if !sn.Deleting {
					deletes = append(deletes, retireStep(sn, retireVolumeDeleted))
				}
			}
			continue
		}
		spec, err := v.Spec()
		if err != nil {
			continue // the store validates; a volume from before it did has no schedule
		}
		sched, err := spec.Schedule()
		if err != nil || sched == nil {
			continue
		}
		last := time.Unix(0, v.CreatedAt).UTC()
		if len(snaps) > 0 {
			newest, _ := ScheduledSlot(snaps[0])
			last = latest(last, newest)
		}
		last = latest(last, taken[v.ID])
		if slot, due := sched.Due(last, now); due && schedulable(v) && s.checkSnapshotLimit(v.ID, ScheduledSnapshotName(v.ID, slot)) == nil {
			name := ScheduledSnapshotName(v.ID, slot)
			creates = append(creates, scheduleStep{
				Cmd:      &CreateSnapshot{Name: name, SourceVolumeID: v.ID, CreatedAt: now.UnixNano()},
				VolumeID: v.ID, Snapshot: name, Slot: slot,
			})
		}
		deletes = append(deletes, planRetention(snaps, spec.Retain())...)
	}
	// Volumes deleted (tombstones) or purged: the snapshots left over,
	// scheduled or not (a volume deleted by DeleteVolume rather than
	// RetireVolume, by an older client or in a race with a new snapshot,
	// took their layers with it).
	orphans := map[string][]*Snapshot{}
	for _, sn := range s.Snapshots {
		if v, ok := s.Volumes[sn.SourceVolumeID]; !ok || v.State == VolumeDeleted {
			orphans[sn.SourceVolumeID] = append(orphans[sn.SourceVolumeID], sn)
		}
	}
	var forgets []scheduleStep
	for _, vol := range slices.Sorted(maps.Keys(orphans)) {
		for _, sn := range newestFirst(orphans[vol]) {
			slot, _ := ScheduledSlot(sn)
			forgets = append(forgets, scheduleStep{Cmd: &DeleteSnapshot{SnapshotID: sn.ID},
				VolumeID: vol, Snapshot: sn.Name, SnapshotID: sn.ID, Slot: slot, Reason: retireVolumeDeleted})
		}
	}
	steps := append(append(creates, deletes...), forgets...)
	if len(steps) > maxScheduleStepsPerTick {
		steps = steps[:maxScheduleStepsPerTick]
	}
	return steps
}

// planRetention is the retention of one volume's scheduled snapshots,
// newest first (see planSchedules).
func planRetention(snaps []*Snapshot, retain int) []scheduleStep {
	var out []scheduleStep
	kept, first := 0, true
	for _, sn := range snaps {
		if sn.Deleting {
			continue
		}
		switch {
		case first:
			first = false
		case !sn.ReadyToUse:
			out = append(out, retireStep(sn, retireSuperseded))
			continue
		case kept >= retain:
			out = append(out, retireStep(sn, retireRetention))
			continue
		}
		if sn.ReadyToUse {
			kept++
		}
	}
	return out
}

func retireStep(sn *Snapshot, reason string) scheduleStep {
	slot, _ := ScheduledSlot(sn)
	return scheduleStep{Cmd: &MarkSnapshotDeleting{SnapshotID: sn.ID},
		VolumeID: sn.SourceVolumeID, Snapshot: sn.Name, SnapshotID: sn.ID, Slot: slot, Reason: reason}
}

// newestFirst sorts scheduled snapshots by slot, newest first (ties, which
// only a hand-made record could make, by id).
func newestFirst(snaps []*Snapshot) []*Snapshot {
	slices.SortFunc(snaps, func(a, b *Snapshot) int {
		sa, _ := ScheduledSlot(a)
		sb, _ := ScheduledSlot(b)
		if c := sb.Compare(sa); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return snaps
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// scheduler is the leader's schedule loop's memory, for one term.
type scheduler struct {
	// taken is the slot asked for last per volume (see planSchedules).
	taken map[string]time.Time
	// blocked is the last refusal of the command gate, logged once.
	blocked string
}

// now is the schedule's clock (AgentConfig.Clock).
func (a *Agent) now() time.Time {
	if a.cfg.Clock != nil {
		return a.cfg.Clock()
	}
	return time.Now()
}

// runSchedules is the leader's schedule loop: it runs while this member
// leads, at once (a new leader takes what its predecessor missed) and then
// every ScheduleInterval.
func (a *Agent) runSchedules(ctx context.Context) {
	sc := &scheduler{taken: map[string]time.Time{}}
	t := time.NewTicker(a.cfg.ScheduleInterval)
	defer t.Stop()
	for {
		a.scheduleTick(ctx, sc)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// scheduleTick plans the schedule's steps on the state as it is and applies
// them, one command at a time.
func (a *Agent) scheduleTick(ctx context.Context, sc *scheduler) {
	now := a.now().UTC()
	var steps []scheduleStep
	a.store.FSM().View(func(s *State) {
		for id := range sc.taken {
			if v, ok := s.Volumes[id]; !ok || v.State == VolumeDeleted {
				delete(sc.taken, id)
			}
		}
		steps = planSchedules(s, sc.taken, now)
	})
	if len(steps) == 0 {
		return
	}
	// A snapshot asked for is completed and deleted through commands from
	// SetSnapshotReady on, written only once every member reads them:
	// until then, records asked for would only pile up, never ready and
	// never deleted. So the schedule waits for the gate as a whole.
	if err := a.checkMembersRead(ctx, &MarkSnapshotDeleting{}); err != nil {
		if msg := err.Error(); msg != sc.blocked && ctx.Err() == nil {
			a.log.Warn("snapshot schedules wait: not every member reads the snapshot commands", zap.Error(err))
			sc.blocked = msg
		}
		return
	}
	if sc.blocked != "" {
		a.log.Info("snapshot schedules run again: every member reads the snapshot commands")
		sc.blocked = ""
	}
	for _, st := range steps {
		if ctx.Err() != nil {
			return
		}
		a.applyScheduleStep(ctx, sc, st, now)
	}
}

func (a *Agent) applyScheduleStep(ctx context.Context, sc *scheduler, st scheduleStep, now time.Time) {
	log := a.log.With(zap.String("volume_id", st.VolumeID), zap.String("snapshot", st.Snapshot), zap.Time("slot", st.Slot))
	if c, ok := st.Cmd.(*CreateSnapshot); ok {
		c.ID = NewSnapshotID()
		res, err := a.store.Apply(ctx, c)
		if err != nil {
			// The volume went meanwhile, or leadership was lost (then the
			// next leader says what it does); the slot stays due.
			if ctx.Err() == nil {
				log.Info("scheduled snapshot not asked for", zap.Error(err))
			}
			return
		}
		sc.taken[st.VolumeID] = st.Slot
		if res.Snapshot == nil || res.Snapshot.ID != c.ID {
			log.Info("scheduled snapshot already recorded")
			return
		}
		a.store.metrics.scheduledSnapshots.Inc()
		log.Info("scheduled snapshot asked for", zap.String("snapshot_id", c.ID), zap.Duration("late", now.Sub(st.Slot)))
		return
	}
	_, err := a.store.Apply(ctx, st.Cmd)
	switch {
	case errors.Is(err, ErrNotFound):
		// Deleted meanwhile, by its user or by the node.
	case err != nil && ctx.Err() != nil:
		// Leadership lost: the next leader plans again.
	case err != nil:
		log.Info("scheduled snapshot deletion not taken", zap.String("snapshot_id", st.SnapshotID), zap.String("reason", st.Reason), zap.Error(err))
	default:
		a.store.metrics.scheduledDeletions.WithLabelValues(st.Reason).Inc()
		log.Info("scheduled snapshot deleted", zap.String("snapshot_id", st.SnapshotID), zap.String("reason", st.Reason))
	}
}
