package storagenode

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// The node's part in snapshots (docs/snapshots.md, "The control plane").
// The store records what users ask for; the node that serves a volume does
// it and records the outcome:
//   - a snapshot requested and not ready: take it through the volume's
//     engine (a consistent cut on every healthy replica), then record the
//     replicas that hold it (SetSnapshotReady), or why it failed;
//   - a snapshot marked deleting: remove its layers from the replicas,
//     then forget the record (DeleteSnapshot). Not while a volume restored
//     from it still waits for a replica to be made from those layers.
//
// The node serving a volume is the one it is attached to, or, for a volume
// attached nowhere, the node of its first healthy replica on a node that
// is up, through a maintenance engine (as rebuilds of unattached volumes
// do). Every node runs this after each change of its copy of the store; a
// copy that lags only delays the work, and a job that fails is tried again
// at a later pass. Two nodes that both think they serve a volume (one of
// them behind) cannot both succeed: their engines fence each other.

// snapshotTakeTimeout bounds one attempt to take a snapshot: the engine's
// open, the cut (milliseconds of paused writes, but a flush of what is
// dirty first), and the record.
const snapshotTakeTimeout = 2 * time.Minute

// Backoff of a snapshot job that failed: the next attempt waits this long,
// doubling with each failure up to snapshotRetryMax. An attempt is not
// free: for a volume attached nowhere it opens a maintenance engine, which
// advances the volume's epoch through the store. A deletion kept waiting
// by a shared layer would otherwise do so at every pass.
const (
	snapshotRetryMin = time.Second
	snapshotRetryMax = 5 * time.Minute
)

// snapshotSettle is how long a job that succeeded is not run again while
// this node's copy of the store does not show its outcome yet.
const snapshotSettle = 10 * time.Second

// retry is when a failed snapshot job may run again, and how long it waited.
type retry struct {
	after time.Time
	wait  time.Duration
}

// failed returns the retry after one more failure: the wait doubled, from
// snapshotRetryMin up to snapshotRetryMax.
func (r retry) failed() retry {
	r.wait = min(max(2*r.wait, snapshotRetryMin), snapshotRetryMax)
	r.after = time.Now().Add(r.wait)
	return r
}

// snapshotJob is one snapshot to take or to delete.
type snapshotJob struct {
	snap   meta.Snapshot
	vol    *meta.Volume
	delete bool
}

// servingNode returns the node that takes and deletes v's snapshots ("" if
// none can now).
func servingNode(s *meta.State, v *meta.Volume) string {
	if v.Attachment != nil {
		return v.Attachment.Node
	}
	r, _ := firstHealthy(s, v)
	return r.Node
}

// firstHealthy returns v's first healthy replica on a node that is up.
func firstHealthy(s *meta.State, v *meta.Volume) (meta.Replica, bool) {
	for _, r := range v.Replicas {
		if n := s.Nodes[r.Node]; r.State == meta.ReplicaHealthy && n != nil && n.State == meta.NodeUp {
			return r, true
		}
	}
	return meta.Replica{}, false
}

// snapshotJobs returns the snapshot work this node should do, from its
// copy of the store.
func (n *Node) snapshotJobs() []snapshotJob {
	var jobs []snapshotJob
	n.cfg.FSM.View(func(s *meta.State) {
		for _, sn := range s.Snapshots {
			if sn.ReadyToUse && !sn.Deleting {
				continue
			}
			v := s.Volumes[sn.SourceVolumeID]
			if v == nil || v.State == meta.VolumeDeleted || servingNode(s, v) != n.cfg.NodeID {
				continue
			}
			if sn.Deleting && s.RestorePending(sn.ID) {
				continue
			}
			j := snapshotJob{snap: *sn, vol: v.Clone(), delete: sn.Deleting}
			j.snap.Replicas = slices.Clone(sn.Replicas)
			jobs = append(jobs, j)
		}
	})
	slices.SortFunc(jobs, func(a, b snapshotJob) int { return cmp.Compare(a.snap.CreatedAt, b.snap.CreatedAt) })
	return jobs
}

// runSnapshots starts the snapshot jobs this node should do, that are not
// running and whose backoff after a failure is over. At most one job per volume runs at a time: a volume's
// engine takes one cut at a time anyway, and a deletion merges while the
// next waits.
func (n *Node) runSnapshots() {
	jobs := n.snapshotJobs()
	n.mu.Lock()
	for id := range n.snapRetry { // forget the backoff of work that is gone
		if !slices.ContainsFunc(jobs, func(j snapshotJob) bool { return j.snap.ID == id }) {
			delete(n.snapRetry, id)
		}
	}
	n.mu.Unlock()
	for _, j := range jobs {
		n.mu.Lock()
		if n.snapJobs[j.vol.ID] || n.ctx.Err() != nil || time.Now().Before(n.snapRetry[j.snap.ID].after) {
			n.mu.Unlock()
			continue
		}
		n.snapJobs[j.vol.ID] = true
		n.wg.Add(1)
		n.mu.Unlock()
		go func() {
			defer n.wg.Done()
			defer func() {
				n.mu.Lock()
				delete(n.snapJobs, j.vol.ID)
				n.mu.Unlock()
				n.kick()
			}()
			ok := n.runSnapshotJob(j)
			n.mu.Lock()
			if ok {
				// Done: not again while this node's copy of the store
				// has not caught up with the record (it would cut the
				// snapshot a second time, pausing writes for nothing).
				// The entry goes once the job is no longer listed.
				n.snapRetry[j.snap.ID] = retry{after: time.Now().Add(snapshotSettle)}
			} else {
				n.snapRetry[j.snap.ID] = n.snapRetry[j.snap.ID].failed()
			}
			n.mu.Unlock()
		}()
	}
}

// kick makes the realizer run again soon (a finished job may have left
// more work on its volume).
func (n *Node) kick() {
	select {
	case n.again <- struct{}{}:
	default:
	}
}

// runSnapshotJob takes or deletes one snapshot, and reports whether it
// did.
func (n *Node) runSnapshotJob(j snapshotJob) bool {
	log := n.log.With(zap.String("volume_id", j.vol.ID), zap.String("snapshot", j.snap.ID), zap.String("name", j.snap.Name),
		zap.Uint64("epoch", j.vol.Epoch))
	ctx, cancel := context.WithCancel(n.ctx)
	defer cancel()
	if !j.delete {
		var cancelTake context.CancelFunc
		ctx, cancelTake = context.WithTimeout(ctx, snapshotTakeTimeout)
		defer cancelTake()
	}
	e, release, err := n.engineFor(ctx, j.vol)
	if err != nil {
		n.snapshotFailed(log, j, err)
		return false
	}
	defer release()
	if j.delete {
		return n.deleteSnapshot(ctx, log, e, j)
	}
	start := time.Now()
	holders, err := e.TakeSnapshot(ctx, j.snap.ID)
	if err != nil {
		n.snapshotFailed(log, j, err)
		return false
	}
	if _, err := n.cfg.Meta.Apply(ctx, &meta.SetSnapshotReady{SnapshotID: j.snap.ID, Replicas: holders}); err != nil {
		// The replicas hold it; the next attempt takes it again (which
		// finds it taken) and records it.
		log.Warn("snapshot taken but not recorded; will record it at the next attempt", zap.Error(err))
		return false
	}
	n.snapshotsTaken.Inc()
	log.Info("snapshot taken and recorded ready", zap.Strings("replicas", holders), zap.Duration("took", time.Since(start)))
	return true
}

// deleteSnapshot removes a deleted snapshot's layers from the volume's
// replicas and forgets its record; it reports whether it did.
func (n *Node) deleteSnapshot(ctx context.Context, log *zap.Logger, e *engine.Engine, j snapshotJob) bool {
	start := time.Now()
	log.Info("removing a deleted snapshot's layers from the replicas")
	err := e.DeleteSnapshot(ctx, j.snap.ID)
	if errors.Is(err, replica.ErrInvalidArgument) {
		// A later layer is shared with a restored volume: merging into it
		// would change that volume. The snapshot stays, hidden, until the
		// sharing ends (docs/snapshots.md).
		log.Info("deleted snapshot kept for now: the layer it would merge into is shared with a restored volume", zap.Error(err))
		return false
	}
	if err != nil {
		n.snapshotFailed(log, j, err)
		return false
	}
	// engine.DeleteSnapshot reaches the healthy replicas only. One that
	// sealed the snapshot and is away now (ejected, rebuilding) would keep
	// the layer for good once the record is gone: keep the record, and
	// delete again once it is back. A replica replaced meanwhile is no
	// longer the volume's and does not count.
	v, err := n.cfg.Meta.Volume(ctx, j.vol.ID)
	if err != nil {
		n.snapshotFailed(log, j, err)
		return false
	}
	for _, r := range v.Replicas {
		if slices.Contains(j.snap.Replicas, r.ID) && r.State != meta.ReplicaHealthy {
			log.Info("snapshot's layers removed from the healthy replicas; waiting for a replica that holds it too to come back",
				zap.String("replica_id", r.ID), zap.String("state", string(r.State)))
			return false
		}
	}
	if _, err := n.cfg.Meta.Apply(ctx, &meta.DeleteSnapshot{SnapshotID: j.snap.ID}); err != nil && !errors.Is(err, meta.ErrNotFound) {
		log.Warn("snapshot layers removed but its record not forgotten; will try again", zap.Error(err))
		return false
	}
	n.snapshotsDeleted.Inc()
	log.Info("deleted snapshot's layers removed and its record forgotten", zap.Duration("took", time.Since(start)))
	return true
}

// snapshotFailed reports a failed job; it is tried again at a later pass.
// The reason of a failed take is recorded in the snapshot (what users see
// while they wait), once per distinct reason.
func (n *Node) snapshotFailed(log *zap.Logger, j snapshotJob, err error) {
	if n.ctx.Err() != nil {
		return
	}
	log.Warn("snapshot job failed; will try again", zap.Bool("delete", j.delete), zap.Error(err))
	if j.delete || j.snap.Error == err.Error() {
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if _, rerr := n.cfg.Meta.Apply(ctx, &meta.SetSnapshotReady{SnapshotID: j.snap.ID, Error: err.Error()}); rerr != nil {
		log.Debug("cannot record why the snapshot failed", zap.Error(rerr))
	}
}

// engineFor returns an engine of v to take or delete a snapshot with: the
// one this node has open (its frontend's, or a rebuild's), or, for a
// volume attached nowhere, a new maintenance engine, released by the
// returned function. A volume attached here is served by its frontend's
// engine only: one opened beside it (while a staging or an export opens
// its own, during a takeover) would claim the replicas with the same
// epoch, and its close would take the volume's QoS entry from the other.
// Until the frontend's engine is open, the job fails and is tried again.
func (n *Node) engineFor(ctx context.Context, v *meta.Volume) (*engine.Engine, func(), error) {
	if e := n.engines.Find(v.ID); e != nil {
		return e, func() {}, nil
	}
	if v.Attachment != nil {
		return nil, nil, fmt.Errorf("volume %s is attached to %s and no engine serves it there yet (not staged or exported yet): the snapshot is taken once one does",
			v.ID, v.Attachment.Node)
	}
	e, err := n.engines.OpenMaintenance(ctx, v.ID, nil)
	if err != nil {
		return nil, nil, err
	}
	return e, func() {
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := n.engines.Release(cctx, e); err != nil {
			n.log.Debug("engine of a snapshot job released with an error", zap.String("volume_id", v.ID), zap.Error(err))
		}
	}, nil
}
