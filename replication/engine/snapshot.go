package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/replica"
)

// Snapshots of a volume (docs/snapshots.md): each healthy replica seals its
// contents as a layer; the engine makes the cut consistent across them.

// Snapshot takes a crash-consistent snapshot of the volume, id, on every
// healthy replica. It takes the write lock, so new writes wait and the ones
// in flight finish first; resolves a write that reached only some replicas;
// flushes every replica (ejecting one that fails, as a clean point does);
// then seals each healthy replica. So the snapshot holds every write
// acknowledged before Snapshot was called and none that started after it
// returned. A replica that fails to seal is ejected, to be rebuilt. Writes
// wait for the flush and the seals: milliseconds (BenchmarkSnapshotCreate
// in the replica package). A replica rebuilding meanwhile gets no snapshot
// here: its rebuild carries it (rebuild_chain.go checks the chains again,
// under the write lock, before it ends).
//
// Taking a snapshot that every replica already has (a retry of one that
// succeeded) succeeds. Whenever the snapshot fails, the replicas that
// sealed it remove it again, so that no two replicas hold different cuts
// under one id: an invalid id or a replica at its limit of layers
// (replica.ErrInvalidArgument), a fenced engine, a retry that finds it on
// some replicas only, or too few replicas left.
func (e *Engine) Snapshot(ctx context.Context, id string) error {
	_, err := e.TakeSnapshot(ctx, id)
	return err
}

// TakeSnapshot is Snapshot, and on success it also returns the ids of the
// replicas that hold the snapshot (the healthy members at the cut): the
// store records them, and a restore places its replicas on their nodes.
func (e *Engine) TakeSnapshot(ctx context.Context, id string) ([]string, error) {
	// While writes go on (the read lock), the replicas make the files of
	// their next head (PREPARE_SNAP) and the bulk of the flushing happens,
	// as for a clean point: what is left under the write lock is to sync
	// what came in meanwhile and record the new head, and writes wait that
	// much less. Errors here are left to the steps under the write lock.
	e.mu.RLock()
	if e.usable() == nil && !e.unresolvedFlush && len(e.unresolved) == 0 {
		epoch := e.epoch
		e.fanOutWith(ctx, e.members, func(ctx context.Context, m *member) error {
			if m.healthy() {
				_ = m.client.PrepareSnapshot(ctx, epoch) // optional: Snapshot makes the files if need be
			}
			return m.client.Flush(ctx, epoch)
		}, false)
	}
	e.mu.RUnlock()
	holders, undo, epoch, err := e.snapshotLocked(ctx, id)
	if len(undo) > 0 {
		// Some replicas sealed while the snapshot as a whole failed (or
		// some had sealed in an earlier attempt: another cut). None may
		// keep it: the replicas would hold different contents under one
		// id. Removed with writes going on: it changes no one's view.
		errs := eachMember(ctx, undo, func(ctx context.Context, m *member) error {
			return m.client.DeleteSnapshot(ctx, epoch, id)
		})
		for i, derr := range errs {
			if derr != nil && !errors.Is(derr, replica.ErrNotFound) {
				e.log.Warn("snapshot left on a replica after a failed snapshot", zap.String("snapshot", id),
					zap.String("replica_id", undo[i].id), zap.Error(derr))
			}
		}
	}
	if err != nil {
		return nil, err
	}
	return holders, nil
}

// snapshotLocked is Snapshot under the write lock. On success it returns
// the ids of the replicas holding the snapshot; on failure, the members
// whose copy of the snapshot must be removed.
func (e *Engine) snapshotLocked(ctx context.Context, id string) (holders []string, undo []*member, epoch uint64, err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.usable(); err != nil {
		return nil, nil, 0, err
	}
	start := time.Now()
	if err := e.resolve(ctx); err != nil {
		return nil, nil, 0, fmt.Errorf("snapshot %s: %w", id, err)
	}
	// A follower takes the snapshot too, with everything acknowledged
	// before it (follow.go).
	if err := e.drainFollowers(ctx, "before a snapshot"); err != nil {
		return nil, nil, 0, fmt.Errorf("snapshot %s: %w", id, err)
	}
	if err := e.flushOrEject(ctx, "before a snapshot"); err != nil {
		return nil, nil, 0, fmt.Errorf("snapshot %s: %w", id, err)
	}
	epoch = e.epoch
	var sealing []*member
	for _, m := range e.members {
		if m.holdsData() {
			sealing = append(sealing, m)
		}
	}
	errs := e.fanOut(ctx, sealing, func(ctx context.Context, m *member) error {
		return m.client.Snapshot(ctx, epoch, id)
	})
	var sealed, had, failed []*member
	var fatal error
	for i, err := range errs {
		switch {
		case err == nil:
			sealed = append(sealed, sealing[i])
		case errors.Is(err, replica.ErrSnapshotExists):
			had = append(had, sealing[i])
		case errors.Is(err, replica.ErrFenced), errors.Is(err, replica.ErrInvalidArgument):
			fatal = err
		default:
			e.log.Warn("replica failed to take a snapshot", zap.String("snapshot", id),
				zap.String("replica_id", sealing[i].replica.ID), zap.String("node", sealing[i].replica.Node), zap.Error(err))
			failed = append(failed, sealing[i])
		}
	}
	switch {
	case fatal != nil:
		return nil, append(sealed, had...), epoch, fmt.Errorf("snapshot %s: %w", id, fatal)
	case len(sealed) > 0 && len(had) > 0:
		// A retry found the snapshot on some replicas only: they sealed an
		// earlier cut than the others now did.
		return nil, append(sealed, had...), epoch, fmt.Errorf("snapshot %s: %d replicas had it from an earlier attempt, %d took it now; removed everywhere, take it again: %w",
			id, len(had), len(sealed), ErrIO)
	}
	if failed != nil {
		if err := e.eject(ctx, failed, "snapshot failed"); err != nil {
			return nil, append(sealed, had...), epoch, fmt.Errorf("snapshot %s: %w", id, err)
		}
		if err := e.checkQuorum(); err != nil {
			return nil, append(sealed, had...), epoch, fmt.Errorf("snapshot %s: %w", id, err)
		}
	}
	e.log.Info("snapshot taken", zap.String("snapshot", id), zap.Uint64("epoch", epoch),
		zap.Int("replicas", len(sealed)+len(had)), zap.Duration("writes_paused", time.Since(start)))
	for _, m := range append(sealed, had...) {
		holders = append(holders, m.replica.ID)
	}
	return holders, nil, epoch, nil
}

// DeleteSnapshot removes snapshot id from every healthy replica. It runs
// without the engine's lock (a deletion moves data and may take seconds;
// writes go on, and each replica keeps them apart from its merge), so a
// failover meanwhile makes the replicas refuse the old epoch: the caller
// retries. A replica without the snapshot counts as done: one whose
// deletion a retry finds finished, or one rebuilt before rebuilds carried
// the chain. A replica being rebuilt is not asked: its rebuild drops the
// snapshot once it finds it gone from its source, and does not end while a
// deletion runs. It waits as long as ctx allows, not the engine's I/O
// timeout: a deletion's time grows with the data it moves.
func (e *Engine) DeleteSnapshot(ctx context.Context, id string) error {
	e.snapDeletes.Add(1)
	defer e.snapDeletes.Add(-1)
	// Followers hold the snapshots too (snapshotLocked).
	epoch, ms, err := e.healthySnapshot(true)
	if err != nil {
		return err
	}
	start := time.Now()
	errs := eachMember(ctx, ms, func(ctx context.Context, m *member) error {
		return m.client.DeleteSnapshot(ctx, epoch, id)
	})
	for i, err := range errs {
		if err != nil && !errors.Is(err, replica.ErrNotFound) {
			return fmt.Errorf("delete snapshot %s on replica %s: %w", id, ms[i].id, err)
		}
	}
	e.log.Info("snapshot deleted", zap.String("snapshot", id), zap.Uint64("epoch", epoch), zap.Duration("took", time.Since(start)))
	return nil
}

// ReadSnapshotAt fills p from off as snapshot id holds it, from a healthy
// replica that has it, the local one first. Offsets are the replicas': an
// encrypted volume's snapshot reads as its ciphertext and entries, so it is
// refused there.
func (e *Engine) ReadSnapshotAt(ctx context.Context, id string, p []byte, off uint64) error {
	if e.seal != nil {
		return fmt.Errorf("volume %s is encrypted: its snapshots are read by restoring them: %w", e.cfg.VolumeID, ErrIO)
	}
	if err := e.checkRange(off, uint64(len(p))); err != nil {
		return err
	}
	epoch, ms, err := e.healthySnapshot(false)
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range ms {
		err := m.client.ReadSnapshotAt(ctx, epoch, id, p, off)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("replica %s: %w", m.id, err))
	}
	return fmt.Errorf("read snapshot %s: no replica could: %w", id, errors.Join(errs...))
}

// healthySnapshot returns the engine's epoch and its healthy members
// (healthyMembers: the usual source first), and with followers its
// connected followers after them, for work done without the engine's
// lock.
func (e *Engine) healthySnapshot(followers bool) (uint64, []*member, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if err := e.usable(); err != nil {
		return 0, nil, err
	}
	ms := e.healthyMembers()
	for _, m := range e.members {
		if followers && m.following() && m.client != nil {
			ms = append(ms, m)
		}
	}
	return e.epoch, ms, nil
}

// eachMember runs op on every member at once and waits for all of them,
// bounded by ctx only (unlike fanOut, which bounds every operation by the
// I/O timeout: right for I/O, not for work that grows with the data).
func eachMember(ctx context.Context, ms []*member, op func(context.Context, *member) error) []error {
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = one(ctx, m, op)
		}()
	}
	wg.Wait()
	return errs
}
