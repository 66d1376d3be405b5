package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// RebuildStats says what one rebuild did. The byte counts include the
// snapshot layers (rebuild_chain.go): the total is the volume's size once
// for the head and once per snapshot of the source, and what an earlier
// pass compared when one had to run again.
type RebuildStats struct {
	ReplicaID     string
	BytesTotal    uint64
	BytesCompared uint64
	BytesCopied   uint64
	// LayerBytesCopied is the part of BytesCopied that went into snapshot
	// layers; LayersCarried the layers built on the target, LayersDropped
	// those removed from it (the source no longer had them).
	LayerBytesCopied uint64
	LayersCarried    int
	LayersDropped    int
	// Passes is 1, or more when the source's snapshots changed meanwhile.
	Passes   int
	Duration time.Duration
}

// rebuildTarget returns the member a rebuild should start on now: the first
// rebuilding member, unless a rebuild runs or none can. Called with e.mu
// held, for reading or writing.
func (e *Engine) rebuildTarget() *member {
	if e.rebuilding.Load() || e.closed || e.fenced || e.healthyCount() == 0 || e.extentSize == 0 {
		return nil
	}
	for _, m := range e.members {
		if m.replica.State == meta.ReplicaRebuilding && m.client != nil {
			return m
		}
	}
	return nil
}

// maybeRebuild starts the rebuild of rebuildTarget, if any. Called with e.mu
// held for writing.
func (e *Engine) maybeRebuild() {
	target := e.rebuildTarget()
	if target == nil {
		return
	}
	e.rebuilding.Store(true)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer e.rebuilding.Store(false)
		stats, err := e.rebuild(e.bg, target)
		if err != nil {
			if e.bg.Err() == nil {
				e.log.Warn("rebuild stopped", zap.String("replica_id", target.replica.ID), zap.Error(err))
				e.ejectLostTarget(target)
			}
			return
		}
		e.log.Info("rebuild done", zap.String("replica_id", stats.ReplicaID), zap.Uint64("bytes_compared", stats.BytesCompared),
			zap.Uint64("bytes_copied", stats.BytesCopied), zap.Uint64("layer_bytes_copied", stats.LayerBytesCopied),
			zap.Int("layers_carried", stats.LayersCarried), zap.Int("layers_dropped", stats.LayersDropped),
			zap.Int("passes", stats.Passes), zap.Duration("took", stats.Duration))
		if e.cfg.OnRebuilt != nil {
			e.cfg.OnRebuilt(stats)
		}
	}()
}

// ejectLostTarget ejects a rebuild target whose connection is gone (its
// replica server restarted, or its node died). Writes eject such a replica,
// but with none coming every later rebuild would fail at once on the dead
// connection, for ever; failed, it comes back through the store's
// reconciler as rebuilding and is dialled again.
func (e *Engine) ejectLostTarget(target *member) {
	ctx, cancel := context.WithTimeout(e.bg, e.cfg.IOTimeout)
	defer cancel()
	e.mu.RLock()
	c := target.client
	e.mu.RUnlock()
	if c == nil {
		return
	}
	if _, err := c.Info(ctx); !errors.Is(err, replica.ErrClosed) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.usable() != nil || !slices.Contains(e.members, target) {
		return
	}
	if err := e.eject(ctx, []*member{target}, "rebuild target unreachable"); err != nil && ctx.Err() == nil {
		e.log.Warn("could not eject an unreachable rebuild target", zap.String("replica_id", target.replica.ID), zap.Error(err))
	}
}

// rebuild makes the target equal to a healthy source: first its chain of
// snapshot layers (carryChain, rebuild_chain.go), then its head: every
// extent of the volume, compared by checksum with the source's and copied
// where it differs, at most RebuildBytesPerSecond. The target takes every
// new write meanwhile. At the end, under the write lock, the target's
// snapshots are checked against the source's (a snapshot taken or deleted
// meanwhile reached only the healthy replicas: then it all runs again),
// and the target is flushed and marked healthy through the store (epoch
// CAS).
//
// The compare and copy requests are marked as rebuild traffic, so the disk
// scheduler of every replica server they reach (the source's and the
// target's, local or remote) lets them yield to foreground I/O there.
func (e *Engine) rebuild(ctx context.Context, target *member) (RebuildStats, error) {
	copyCtx := replica.WithClass(ctx, iosched.Rebuild)
	start := time.Now()
	// The size when the rebuild starts: an expansion meanwhile grows the
	// target with every member, and its new range only ever holds writes
	// the target took too.
	size := e.size.Load()
	st := RebuildStats{ReplicaID: target.replica.ID}
	extents := (size + e.extentSize - 1) / e.extentSize
	e.log.Info("rebuild started", zap.String("replica_id", target.replica.ID), zap.String("node", target.replica.Node),
		zap.Uint64("extents", extents))
	lastReport := time.Time{}
	report := func(done bool) {
		if !done && time.Since(lastReport) < time.Second {
			return
		}
		lastReport = time.Now()
		_, err := e.cfg.Meta.Apply(ctx, &meta.RebuildProgressUpdate{VolumeID: e.cfg.VolumeID, ReplicaID: target.replica.ID,
			BytesTotal: st.BytesTotal, BytesCompared: st.BytesCompared, BytesCopied: min(st.BytesCopied, st.BytesTotal), Done: done})
		if err != nil && ctx.Err() == nil {
			e.log.Debug("rebuild progress not recorded", zap.Error(err))
		}
	}
	var avoid []string // sources whose layers failed their checksums
	for {
		st.Passes++
		src := e.rebuildSource(avoid)
		if src == nil {
			return st, fmt.Errorf("no healthy source (passed over %v): %w", avoid, ErrIO)
		}
		// What the passes before compared, and this one's head (carryChain
		// adds its layers): a pass cut short leaves no gap that the
		// progress could never fill.
		st.BytesTotal = st.BytesCompared + size
		err := e.carryChain(copyCtx, target, src.replica.ID, size, &st, report)
		if err == nil {
			err = e.rebuildHead(copyCtx, target, size, &st, report)
		}
		finished := false
		if err == nil {
			finished, err = e.finishRebuild(ctx, target, src.replica.ID, start, &st, report)
		}
		switch {
		case finished || err != nil && !errors.Is(err, errChainMoved) && !errors.Is(err, errSourceCorrupt):
			return st, err
		case st.Passes >= maxRebuildPasses:
			return st, fmt.Errorf("no pass could finish in %d (%v): %w", st.Passes, err, ErrIO)
		case errors.Is(err, errSourceCorrupt):
			avoid = append(avoid, src.replica.ID)
			e.log.Warn("rebuild runs again from another source: a layer of its source fails its checksums",
				zap.String("replica_id", target.replica.ID), zap.String("source", src.replica.ID), zap.Error(err))
			continue
		}
		e.log.Info("rebuild runs again: snapshots were taken or deleted meanwhile", zap.String("replica_id", target.replica.ID),
			zap.Int("pass", st.Passes+1), zap.NamedError("reason", err))
	}
}

// rebuildWindow is how many extents a rebuild compares and copies at once
// while the node has no foreground I/O. One at a time, each extent waited
// for two checksum round trips, a read and a write before the next began,
// and the copy ran at a fraction of what the disks and the network allow
// (tests/bench/rebuildbench). Beside foreground I/O the rebuild keeps to
// one extent at a time: its reads of the source do not go through the
// scheduler, and four at once doubled the p99 of a volume beside it
// (tests/bench/noisybench, scenario 4).
const rebuildWindow = 4

// rebuildQuiet is how long the node's scheduler must have seen no
// foreground request before the rebuild copies more than one extent at a
// time.
const rebuildQuiet = 200 * time.Millisecond

// wideRebuild reports whether the rebuild may copy rebuildWindow extents
// at once: the node has had no foreground I/O for rebuildQuiet.
func (e *Engine) wideRebuild() bool {
	return e.cfg.Sched == nil || e.cfg.Sched.ForegroundIdle(rebuildQuiet)
}

// rebuildHead compares and copies every extent of the volume's first size
// bytes, as the target's head shows them, rebuildWindow extents at a time
// while the node has no foreground I/O, one at a time while it has.
// Each extent is copied under its own range lock (copyExtent), so the
// order does not matter. The first error stops the others.
func (e *Engine) rebuildHead(ctx context.Context, target *member, size uint64, st *RebuildStats, report func(bool)) error {
	extents := (size + e.extentSize - 1) / e.extentSize
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu       sync.Mutex // guards next, firstErr, st and report
		next     uint64
		firstErr error
		wg       sync.WaitGroup
	)
	for w := range min(uint64(rebuildWindow), extents) {
		wg.Go(func() {
			for {
				// Only the first copier runs while foreground I/O does.
				for w > 0 && !e.wideRebuild() {
					mu.Lock()
					over := firstErr != nil || next >= extents
					mu.Unlock()
					if over {
						return
					}
					select {
					case <-ctx.Done():
						return
					case <-time.After(rebuildQuiet / 4):
					}
				}
				mu.Lock()
				if firstErr != nil || next >= extents {
					mu.Unlock()
					return
				}
				x := next
				next++
				mu.Unlock()
				n := min(e.extentSize, size-x*e.extentSize)
				copied, err := e.copyExtent(ctx, target, x, n)
				if err == nil {
					err = e.paceRebuild(ctx, copied)
				}
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = err
						cancel()
					}
					mu.Unlock()
					return
				}
				st.BytesCompared += n
				st.BytesCopied += copied
				report(false)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return firstErr
}

// finishRebuild ends a pass under the write lock: if the target's
// snapshots are the source's, it is flushed and marked healthy (done);
// if not, the pass must run again (not done, no error).
func (e *Engine) finishRebuild(ctx context.Context, target *member, srcID string, start time.Time, st *RebuildStats, report func(bool)) (bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if err := e.usable(); err != nil {
		return false, err
	}
	if agree, err := e.chainsAgree(ctx, target, srcID); err != nil || !agree {
		return false, err
	}
	// Foreground, not rebuild class: this flush holds the engine's write
	// lock, so every I/O of the volume waits for it; it must not wait
	// behind other volumes' foreground I/O as well.
	if err := target.client.Flush(ctx, e.epoch); err != nil {
		return false, fmt.Errorf("flush rebuilt replica: %w", err)
	}
	if _, err := e.cfg.Meta.Apply(ctx, &meta.SetReplicaState{VolumeID: e.cfg.VolumeID, ReplicaID: target.replica.ID,
		State: meta.ReplicaHealthy, ExpectEpoch: e.epoch}); err != nil {
		return false, fmt.Errorf("mark %s healthy: %w", target.replica.ID, err)
	}
	st.Duration = time.Since(start)
	report(true)
	return true, e.reconfigure(ctx)
}

// copyExtent makes extent x of target, n bytes long, equal to a healthy
// source's. It returns the bytes copied (0 when they were equal).
//
// The compare and the copy each hold the extent's range (rangeLocks: no
// write to it is in flight, so none can land between the read of the
// source and the write to the target and leave the target with old data)
// and the engine's read lock (the epoch cannot move meanwhile), but the copy's
// turn at the node's scheduler is taken between the two, with no lock
// held: writers hold scheduler slots while they wait for the extent, so
// waiting for a slot with the extent locked could wait for ever.
func (e *Engine) copyExtent(ctx context.Context, target *member, x, n uint64) (uint64, error) {
	var same bool
	compare := func(src *member) error {
		a, err := src.client.Checksums(ctx, e.epoch, x, 1)
		if err != nil {
			return fmt.Errorf("checksum of extent %d on %s: %w", x, src.replica.ID, err)
		}
		b, err := target.client.Checksums(ctx, e.epoch, x, 1)
		if errors.Is(err, replica.ErrChecksum) {
			// The target's own copy fails its checksums (a write torn
			// while it was away): it differs, and the copy replaces it.
			same = false
			return nil
		}
		if err != nil {
			return fmt.Errorf("checksum of extent %d on %s: %w", x, target.replica.ID, err)
		}
		same = a[0] == b[0]
		return nil
	}
	err := e.withExtent(ctx, x, n, compare)
	if errors.Is(err, replica.ErrChecksum) {
		// The source has a corrupt block: repair the healthy replicas
		// from a copy that verifies (as a scrub does), then compare again.
		// A block that verifies nowhere stops the rebuild here.
		repaired, lost, ferr := e.fixExtent(ctx, x*e.extentSize, n)
		if ferr != nil {
			return 0, ferr
		}
		e.log.Warn("rebuild found a corrupt block on its source; repaired from a verified copy", zap.String("replica_id", target.replica.ID),
			zap.Uint64("extent", x), zap.Uint64("repaired", repaired), zap.Int("unrecoverable", len(lost)))
		if len(lost) > 0 {
			e.markAbnormal(ctx, lost)
			return 0, fmt.Errorf("extent %d: %d block(s) verify on no healthy replica: %w", x, len(lost), ErrIO)
		}
		err = e.withExtent(ctx, x, n, compare)
	}
	if err != nil || same {
		return 0, err
	}
	done, err := e.admit(ctx, iosched.Write, n, iosched.Rebuild)
	if err != nil {
		return 0, err
	}
	defer done()
	// Writes that came in since the compare reached the target too; copying
	// the source's current contents is right whatever they were.
	var copied uint64
	err = e.withExtent(ctx, x, n, func(src *member) error {
		data, err := src.client.ReadExtent(ctx, e.epoch, x)
		if err != nil {
			return fmt.Errorf("read extent %d from %s: %w", x, src.replica.ID, err)
		}
		if err := e.writeCopy(ctx, target, data, x*e.extentSize); err != nil {
			return fmt.Errorf("write extent %d to %s: %w", x, target.replica.ID, err)
		}
		copied = uint64(len(data))
		return nil
	})
	return copied, err
}

// withExtent runs fn with extent x's range (n bytes) and the engine's read
// lock held, giving it a healthy source replica (the local one if healthy).
// The range is taken first, as writes take theirs (see Engine.mutate).
func (e *Engine) withExtent(ctx context.Context, x, n uint64, fn func(src *member) error) error {
	unlock, err := e.locks.lock(ctx, x*e.extentSize, n)
	if err != nil {
		return err
	}
	defer unlock()
	e.mu.RLock()
	defer e.mu.RUnlock()
	if err := e.usable(); err != nil {
		return err
	}
	src := e.source()
	if src == nil {
		return fmt.Errorf("no healthy source: %w", ErrIO)
	}
	return fn(src)
}

// followStore watches the volume in the store (meta.Client.Watch) and wakes
// watchLoop at each change of it. The watch comes from whichever member the
// client reaches and may lag the leader, so it only says when to look:
// watchLoop then reads the volume linearizably.
func (e *Engine) followStore(ctx context.Context) {
	_ = e.cfg.Meta.Watch(ctx, meta.WatchRequest{VolumeID: e.cfg.VolumeID}, func(ev *meta.WatchEvent) error {
		if len(ev.Volumes) > 0 || len(ev.Removed) > 0 {
			select {
			case e.changed <- struct{}{}:
			default:
			}
		}
		return nil
	})
}

// watchLoop follows the store: when the volume's epoch moves (the leader's
// reconciler put a replica back to rebuilding or replaced one, or another
// engine took over), the engine reconfigures, and it starts rebuilds. It
// looks every WatchInterval, and at once when followStore reports a change.
func (e *Engine) watchLoop(ctx context.Context) {
	t := time.NewTicker(e.cfg.WatchInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-e.changed:
		}
		// One volume, read linearizably: it renews the lease below, which
		// must be the store's own word that the volume is still ours, not
		// a lagging member's copy (see checkLease).
		v, err := e.cfg.Meta.Volume(ctx, e.cfg.VolumeID)
		if err != nil {
			continue
		}
		if a := v.Attachment; (e.cfg.Maintenance && a == nil) || (!e.cfg.Maintenance && a != nil && a.Node == e.cfg.NodeID) {
			e.confirmed.Store(time.Now().UnixNano()) // renew the lease
		}
		// Most ticks change nothing: look under the read lock, and take the
		// write lock only for a change. A waiting writer holds up every new
		// reader (I/O), and I/O may hold the read lock a while: a rebuild
		// copy waits for the disks with it. A rebuild to start is a
		// change: it must start under the write lock (maybeRebuild).
		e.maybeScrub(ctx, v)
		if v.ReplicaBytes() > e.size.Load() {
			// The volume was expanded (cairn ctl, CSI, or while this
			// engine was opening): grow the replicas, then the size. An
			// NBD export's new connections see it then.
			if err := e.growTo(ctx, v.ReplicaBytes()); err != nil && ctx.Err() == nil {
				e.log.Warn("grow to the volume's new size failed; will retry", zap.Uint64("size", v.ReplicaBytes()), zap.Error(err))
			}
		}
		e.mu.RLock()
		change := e.usable() == nil && (v.Epoch > e.epoch || e.qosChanged(v) || e.rebuildTarget() != nil)
		e.mu.RUnlock()
		if !change {
			continue
		}
		e.mu.Lock()
		if e.usable() == nil {
			e.applyQoS(v) // limits changed live (set-qos, ControllerModifyVolume)
		}
		if e.usable() == nil && v.Epoch > e.epoch {
			if err := e.reconfigure(ctx); err != nil && ctx.Err() == nil {
				e.log.Warn("reconfigure after a store change failed", zap.Error(err))
			}
		}
		if e.usable() == nil {
			e.maybeRebuild()
		}
		e.mu.Unlock()
	}
}
