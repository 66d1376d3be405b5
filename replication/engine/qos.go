package engine

import (
	"context"
	"fmt"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// applyQoS gives the node's scheduler this volume's limits, when they
// changed. Called with e.mu held for writing.
func (e *Engine) applyQoS(v *meta.Volume) {
	q, changed, err := e.pendingQoS(v)
	if err != nil {
		e.log.Warn("volume has bad QoS parameters; keeping the old limits", zap.Error(err))
		return
	}
	if !changed {
		return
	}
	l := iosched.Limits{MaxIOPS: q.MaxIOPS, MinIOPS: q.MinIOPS, MaxBytesPerSec: q.MaxBytesPerSec, BurstDuration: q.BurstDuration,
		Weight: q.Weight()}
	if err := e.cfg.Sched.SetLimits(e.cfg.VolumeID, l); err != nil {
		e.log.Warn("scheduler refused the volume's limits", zap.Error(err))
		return
	}
	e.qos = q
	e.qosSet.Store(true)
	e.log.Info("QoS limits set", zap.Uint64("max_iops", q.MaxIOPS), zap.Uint64("min_iops", q.MinIOPS),
		zap.Uint64("max_bytes_per_sec", q.MaxBytesPerSec), zap.Duration("burst", q.BurstDuration), zap.String("class", q.Class))
}

// qosChanged says whether v's QoS parameters differ from the limits last
// given to the scheduler (bad parameters count as no change: applyQoS
// would keep the old limits anyway). Called with e.mu held.
func (e *Engine) qosChanged(v *meta.Volume) bool {
	_, changed, err := e.pendingQoS(v)
	return err == nil && changed
}

// pendingQoS parses v's QoS parameters and says whether they differ from
// the limits last given to the scheduler (never, without a scheduler).
func (e *Engine) pendingQoS(v *meta.Volume) (q volspec.QoS, changed bool, err error) {
	if e.cfg.Sched == nil {
		return q, false, nil
	}
	s, err := v.Spec()
	if err != nil {
		return q, false, err
	}
	return s.QoS, !e.qosSet.Load() || s.QoS != e.qos, nil
}

// admit waits until the node's scheduler lets this I/O go (QoS limits,
// reservations, deadlines) and returns the function that ends it.
func (e *Engine) admit(ctx context.Context, op iosched.Op, bytes uint64, class iosched.Class) (func(), error) {
	if e.cfg.Sched == nil || !e.qosSet.Load() {
		return func() {}, nil
	}
	t, err := e.cfg.Sched.Acquire(ctx, iosched.Request{Volume: e.cfg.VolumeID, Op: op, Bytes: bytes, Class: class})
	if err != nil {
		return nil, fmt.Errorf("scheduler: %w", err)
	}
	return t.Done, nil
}
