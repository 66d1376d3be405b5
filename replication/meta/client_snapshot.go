package meta

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Snapshots through the store (docs/snapshots.md, "The control plane"):
// the client records what it wants, the node serving the volume does it,
// and the client waits for the record to say so.

// snapshotPoll is how often TakeSnapshot looks at the record.
const snapshotPoll = 50 * time.Millisecond

// Snapshot returns snapshot id as the leader knows it (hidden ones too):
// ErrNotFound if there is none.
func (c *Client) Snapshot(ctx context.Context, id string) (*Snapshot, error) {
	st, err := c.State(ctx, true)
	if err != nil {
		return nil, err
	}
	sn, ok := st.Snapshots[id]
	if !ok {
		return nil, fmt.Errorf("snapshot %q: %w", id, ErrNotFound)
	}
	return sn, nil
}

// TakeSnapshot asks for a snapshot of volume vol named name and waits
// until it is ready or ctx ends. The same name and volume give the same
// snapshot, so a retry after any failure finds the first attempt's. When
// ctx ends first it returns the snapshot as recorded so far (not ready;
// its Error says what the last attempt met) with ctx's error.
func (c *Client) TakeSnapshot(ctx context.Context, vol, name string) (*Snapshot, error) {
	sn, err := c.RequestSnapshot(ctx, vol, name)
	if err != nil {
		return nil, err
	}
	for !sn.ReadyToUse {
		select {
		case <-ctx.Done():
			if sn.Error != "" {
				return sn, fmt.Errorf("snapshot %s of %s not taken yet (last attempt: %s): %w", sn.ID, vol, sn.Error, ctx.Err())
			}
			return sn, fmt.Errorf("snapshot %s of %s not taken yet: %w", sn.ID, vol, ctx.Err())
		case <-time.After(snapshotPoll):
		}
		st, err := c.State(ctx, false)
		if err != nil {
			continue // a member restarting; ctx bounds the wait
		}
		now, ok := st.Snapshots[sn.ID]
		if !ok {
			// The member that answered may not have the record yet (a
			// read that is not linearizable can lag): ask the leader.
			if st, err = c.State(ctx, true); err != nil {
				continue
			}
			now, ok = st.Snapshots[sn.ID]
		}
		if !ok || now.Deleting {
			return nil, fmt.Errorf("snapshot %s of %s was deleted while it was being taken: %w", sn.ID, vol, ErrNotFound)
		}
		sn = now
	}
	return sn, nil
}

// RequestSnapshot asks for a snapshot of volume vol named name and returns
// its record at once, not ready yet (or as a retry finds it), once the
// volume's snapshot limits allow it (checkSnapshotLimit).
func (c *Client) RequestSnapshot(ctx context.Context, vol, name string) (*Snapshot, error) {
	st, err := c.State(ctx, true)
	if err != nil {
		return nil, err
	}
	if err := st.checkSnapshotLimit(vol, name); err != nil {
		return nil, err
	}
	res, err := c.Apply(ctx, &CreateSnapshot{Name: name, SourceVolumeID: vol})
	if err != nil {
		return nil, err
	}
	return res.Snapshot, nil
}

// CheckUserSnapshotName refuses the names a user's snapshot of volume vol
// may not have (ErrInvalidArgument): the store would hide one in Cairn's
// own form, and the schedule's retention would delete one in the form of
// a scheduled snapshot of its volume. The CSI controller and cairn ctl
// both ask it.
func CheckUserSnapshotName(vol, name string) error {
	switch {
	case strings.TrimSpace(vol) == "":
		return fmt.Errorf("the volume id is empty: %w", ErrInvalidArgument)
	case strings.TrimSpace(name) == "" || name != strings.TrimSpace(name):
		return fmt.Errorf("snapshot name %q: want a name without leading or trailing spaces: %w", name, ErrInvalidArgument)
	case strings.HasPrefix(name, HiddenSnapshotPrefix):
		return fmt.Errorf("snapshot name %q: names starting with %q are Cairn's own (hidden from users): %w", name, HiddenSnapshotPrefix, ErrInvalidArgument)
	}
	if _, ok := ScheduledSlot(&Snapshot{Name: name, SourceVolumeID: vol}); ok {
		return fmt.Errorf("snapshot name %q is the form of the volume's scheduled snapshots (snapshotSchedule), which retention deletes; choose another: %w",
			name, ErrInvalidArgument)
	}
	return nil
}

// DeleteSnapshot deletes snapshot id: it disappears for users at once and
// its space comes back in the background. A snapshot already gone is a
// success. A snapshot whose volume is gone has no layers left to remove:
// its record is forgotten at once.
func (c *Client) DeleteSnapshot(ctx context.Context, id string) error {
	res, err := c.Apply(ctx, &MarkSnapshotDeleting{SnapshotID: id})
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if _, err := c.Volume(ctx, res.Snapshot.SourceVolumeID); errors.Is(err, ErrNotFound) {
		if _, err := c.Apply(ctx, &DeleteSnapshot{SnapshotID: id}); err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	return nil
}

// RetireVolume deletes volume id, or hides it while snapshots of it remain
// (RetireVolume). It sends RetireVolume, which decides atomically in the
// store, without reading the whole state first: at 10 000 volumes that
// read held deletes to 9 per second (scalebench). Only if
// the store cannot take RetireVolume yet, during a rolling upgrade (the
// gate refuses it while a member's build does not read it, or an older
// leader cannot decode it), a volume without snapshots is deleted by
// DeleteVolume, so that deleting works then too.
func (c *Client) RetireVolume(ctx context.Context, id string) (*Volume, error) {
	res, err := c.Apply(ctx, &RetireVolume{VolumeID: id})
	if err == nil || !errors.Is(err, ErrFailedPrecondition) && !errors.Is(err, ErrBadCommand) {
		return res.Volume, err
	}
	// Also the answer for an attached volume: DeleteVolume says the same.
	st, serr := c.State(ctx, true)
	if serr != nil {
		return nil, serr
	}
	if st.hasSnapshots(id) {
		return nil, err
	}
	res, err = c.Apply(ctx, &DeleteVolume{VolumeID: id})
	return res.Volume, err
}

// checkSnapshotLimit refuses a new snapshot named name of volume vol once
// the volume has as many as its snapshotLimit allows, or its chain is at
// ChainDepthHardLimit as last reported (RecordUsage) (ResourceExhausted);
// a retry of one already recorded passes. It is checked before asking the
// store, not in apply, so that a store member of an older build cannot
// disagree: requests at the same time may each pass it, and the replicas'
// own bound on their chain (replication/layer) is the hard one.
func (s *State) checkSnapshotLimit(vol, name string) error {
	v, ok := s.Volumes[vol]
	if !ok {
		return nil // the store says what is wrong
	}
	spec, err := v.Spec()
	if err != nil {
		return nil
	}
	n, pending := 0, 0
	for _, sn := range s.Snapshots {
		if sn.SourceVolumeID != vol || sn.Deleting {
			continue
		}
		if sn.Name == name {
			return nil
		}
		n++
		if !sn.ReadyToUse {
			pending++ // not in the depth the replicas reported yet
		}
	}
	if n >= spec.Limit() {
		return fmt.Errorf("volume %s has %d snapshots, as many as its snapshotLimit (%d) allows: delete one first: %w",
			vol, n, spec.Limit(), ErrResourceExhausted)
	}
	if v.Usage != nil && v.Usage.Depth+pending >= ChainDepthHardLimit {
		return fmt.Errorf("volume %s's chain has %d layers (with the snapshots being taken), at the hard limit of %d: "+
			"the layers it shares with the snapshot it was restored from are being flattened (cairn ctl volume get shows the progress), "+
			"or delete some of its snapshots: %w", vol, v.Usage.Depth+pending, ChainDepthHardLimit, ErrResourceExhausted)
	}
	return nil
}

// ChainDepthHardLimit bounds the layers of a volume's chain (its replicas'
// head included) that a new snapshot may add to (docs/snapshots.md, "Chain
// depth and flattening"): room for the most snapshots a volume may keep
// (volspec's snapshotLimit, at most 128), a flattened base and the head,
// and for layers inherited from a restore that wait to be flattened. The
// replicas' own bound (replication/layer, 256) is above it.
const ChainDepthHardLimit = 192

// CloneSnapshotName is the name of the hidden snapshot a clone named
// volume is restored from.
func CloneSnapshotName(volume string) string { return HiddenSnapshotPrefix + "clone-" + volume }

// ContentSource values of restored volumes.
const (
	SourceSnapshotPrefix = "snapshot:"
	SourceVolumePrefix   = "volume:"
)

// ParseContentSource splits a volume's ContentSource into its kind
// ("snapshot" or "volume") and id.
func ParseContentSource(s string) (kind, id string) {
	switch {
	case strings.HasPrefix(s, SourceSnapshotPrefix):
		return "snapshot", strings.TrimPrefix(s, SourceSnapshotPrefix)
	case strings.HasPrefix(s, SourceVolumePrefix):
		return "volume", strings.TrimPrefix(s, SourceVolumePrefix)
	}
	return "", s
}

// Restore creates volume c (its ContentSource unset) from snapshot
// snapID, or, with fromVolume set, as a clone of volume fromVolume: a
// hidden snapshot is taken (ctx bounds the wait), restored and deleted
// again (its layers stay shared with the clone). A retry finds the volume
// made by the first attempt.
func (c *Client) Restore(ctx context.Context, cv CreateVolume, snapID, fromVolume string) (*Volume, error) {
	if err := checkRestorable(cv); err != nil {
		return nil, err
	}
	if fromVolume == "" {
		cv.ContentSource = SourceSnapshotPrefix + snapID
		res, err := c.Apply(ctx, &RestoreVolume{CreateVolume: cv, SnapshotID: snapID})
		return res.Volume, err
	}
	cv.ContentSource = SourceVolumePrefix + fromVolume
	st, err := c.State(ctx, true)
	if err != nil {
		return nil, err
	}
	if v := st.volumeByName(cv.Name); v != nil {
		// A retry after the clone was made (its hidden snapshot may be
		// gone by now): the store compares it with the request.
		res, err := c.Apply(ctx, &RestoreVolume{CreateVolume: cv, SnapshotID: "-"})
		return res.Volume, err
	}
	sn, err := c.TakeSnapshot(ctx, fromVolume, CloneSnapshotName(cv.Name))
	if err != nil {
		return nil, err
	}
	res, err := c.Apply(ctx, &RestoreVolume{CreateVolume: cv, SnapshotID: sn.ID})
	if err != nil {
		// Nothing uses the temporary snapshot: it goes (a retry takes
		// another).
		return nil, errors.Join(err, c.DeleteSnapshot(ctx, sn.ID))
	}
	// The clone's replicas hold the layers by hard links once their nodes
	// made them; the node removing the snapshot waits for that.
	if err := c.DeleteSnapshot(ctx, sn.ID); err != nil {
		return res.Volume, fmt.Errorf("clone %s made; its temporary snapshot %s stays until deleted: %w", res.Volume.ID, sn.ID, err)
	}
	return res.Volume, nil
}
