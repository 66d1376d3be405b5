package engine

import (
	"context"
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/replica"
)

// Online expansion (docs/expansion.md).
//
// The volume store records a volume's new size first (ExpandVolume). The
// engine follows: it grows every member replica to that size, and only
// once all of them have it does it raise its own size, which I/O is
// checked against and the frontends read. So no write ever goes past the
// end of a member, and every member takes the writes of the new range.
// A member that fails to grow is ejected like one that fails a write;
// the store rebuilds it, and the engine grows it again before it serves.
//
// The engine learns of the new size three ways: Expand (the CSI node's
// NodeExpandVolume, which then grows the frontend and the file system),
// its watch loop (an NBD export, a `cairn ctl volume expand`), and every
// reconfigure (a claim after an attach, a takeover, a returning replica):
// a replica that missed the expansion while its node was down is grown
// there, before the engine serves any I/O with it.

// Expansion metrics (registered with the others: Collectors).
var (
	metricReplicaGrows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_replica_grows_total",
		Help: "Replicas an engine asked to grow to a volume's new size, by result (ok, failed).",
	}, []string{"result"})
	metricExpansions = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "cairn_engine_volume_expansions_total",
		Help: "Times an engine took a volume's new, larger size into service (every replica grown).",
	})
)

// Expand brings the engine to the size the store records for its volume:
// every member replica is grown to it, then the engine's own size. It
// returns the engine's size afterwards. A size the engine already has is
// a success that does nothing. The frontend's device is grown by its
// owner afterwards (the CSI node service: FUSE file, loop device, file
// system).
func (e *Engine) Expand(ctx context.Context) (uint64, error) {
	v, err := e.cfg.Meta.Volume(ctx, e.cfg.VolumeID) // linearizable: the store's size, not a lagging copy's
	if err != nil {
		return e.Size(), fmt.Errorf("read volume %s: %w", e.cfg.VolumeID, err)
	}
	if err := e.growTo(ctx, v.ReplicaBytes()); err != nil {
		return e.Size(), err
	}
	return e.Size(), nil
}

// growTo grows every member to size, then the engine's size. The grows run
// under the read lock, so I/O within the old size goes on meanwhile (each
// replica pauses its own requests only for its grow: a few fsyncs); the
// write lock is taken only to eject a member that failed. A member added
// meanwhile by a reconfigure is grown there.
func (e *Engine) growTo(ctx context.Context, size uint64) error {
	e.growMu.Lock()
	defer e.growMu.Unlock()
	for attempt := 0; ; attempt++ {
		e.mu.RLock()
		if err := e.usable(); err != nil {
			e.mu.RUnlock()
			return err
		}
		old := e.size.Load()
		if size <= old {
			e.mu.RUnlock()
			return nil
		}
		failed, err := e.growMembers(ctx, size)
		if err == nil && len(failed) == 0 {
			e.size.Store(size)
			epoch := e.epoch
			e.mu.RUnlock()
			metricExpansions.Inc()
			e.log.Info("volume grown", zap.Uint64("previous_size", old), zap.Uint64("size", size), zap.Uint64("epoch", epoch))
			return nil
		}
		e.mu.RUnlock()
		if errors.Is(err, ErrFenced) {
			e.mu.Lock()
			e.setFenced()
			e.mu.Unlock()
		}
		if err != nil {
			return err
		}
		if attempt == 2 {
			return fmt.Errorf("volume %s: replicas keep failing to grow to %d bytes: %w", e.cfg.VolumeID, size, ErrIO)
		}
		e.mu.Lock()
		err = e.usable()
		if err == nil {
			err = e.eject(ctx, failed, "grow failed")
		}
		e.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// growMembers grows the members smaller than size and returns those that
// failed (to be ejected), or an error when the engine turns out fenced. A
// member larger than size fails too: the store's size only grows and
// replicas grow only to it, so such a replica is not this volume's.
//
// The grows are sent to every such member at once and each is waited for
// up to IOTimeout, without the replica deadline that cuts a silent member
// out of a write: a grow does a few fsyncs, which a loaded disk can take
// more than the deadline over, and ejecting a replica for that would cost
// a whole rebuild. Called with e.mu held (either way; for reading together
// with e.growMu).
func (e *Engine) growMembers(ctx context.Context, size uint64) ([]*member, error) {
	var grow, failed []*member
	for _, m := range e.members {
		switch {
		case m.client == nil:
			failed = append(failed, m)
		case m.size > size:
			e.log.Warn("replica larger than its volume", zap.String("replica_id", m.replica.ID), zap.String("node", m.replica.Node),
				zap.Uint64("replica_size", m.size), zap.Uint64("size", size), zap.Uint64("epoch", e.epoch))
			failed = append(failed, m)
		case m.size < size:
			grow = append(grow, m)
		}
	}
	if len(grow) == 0 {
		return failed, nil
	}
	gctx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
	defer cancel()
	errs := make([]error, len(grow))
	done := make(chan struct{}, len(grow))
	for i, m := range grow {
		go func() {
			errs[i] = m.client.Grow(gctx, e.epoch, size)
			done <- struct{}{}
		}()
	}
	for range grow {
		<-done
	}
	for i, err := range errs {
		m := grow[i]
		log := e.log.With(zap.String("replica_id", m.replica.ID), zap.String("node", m.replica.Node), zap.Uint64("epoch", e.epoch),
			zap.Uint64("previous_size", m.size), zap.Uint64("size", size))
		switch {
		case err == nil:
			metricReplicaGrows.WithLabelValues("ok").Inc()
			log.Info("replica grown")
			m.size = size
		case errors.Is(err, replica.ErrFenced):
			// The caller records it (setFenced wants the write lock).
			return nil, fmt.Errorf("grow %s with epoch %d: %w", m.replica.ID, e.epoch, ErrFenced)
		default:
			metricReplicaGrows.WithLabelValues("failed").Inc()
			log.Warn("replica failed to grow", zap.Error(err))
			failed = append(failed, m)
		}
	}
	return failed, nil
}
