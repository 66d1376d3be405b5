package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Rebuild carries the chain (docs/snapshots.md): before the head, the
// target's sealed layers are made equal to a healthy source's, oldest
// first, so that a rebuilt replica holds every snapshot and a snapshot
// survives the loss of any node that held it.
//
//  1. The target's layers that the source no longer has (deleted while the
//     target was away), or that are being deleted, go: merged into their
//     child as the source did (DELETE_SNAP, which finishes an interrupted
//     deletion too), or, when the child is shared and cannot take a merge,
//     dropped (LAYER_DROP).
//  2. For each of the source's snapshots in order, position i: a target
//     layer with the same id at i whose extent sums (LAYER_SUMS, cached on
//     both sides) all equal the source's stays; otherwise the layer is built
//     aside (LAYER_BEGIN), the extents whose sums differ copied
//     (LAYER_READ → LAYER_WRITE), and published at i (LAYER_SEAL), replacing
//     a same-id layer. Positions below i never change meanwhile, so after
//     step i the target's first i+1 layers equal the source's.
//  3. The head, as before: every extent of the volume compared and copied
//     where it differs. Publishing a layer may have changed what the
//     target's head shows; this step, after every layer change, restores it.
//
// A restored volume's replicas inherit the layers of their source up to the
// snapshot they were restored from. A target that has none of those layers
// (a new replica placed where they were not, or one whose node flattened
// them) receives them flattened: one bottom layer holding everything the
// snapshot's layer shows (LAYER_SUMS and LAYER_READ with FlagLayerFlat),
// so that the copy is the volume's data once, not every inherited layer.
// The chains then differ below that layer; everywhere above they are the
// source's, position for position, and the rebuild counts them equal.
//
// Sealed layers never change with writes, so the layer steps take no range
// locks and run without the engine's lock (each replica checks the epoch
// of every request). A snapshot taken or deleted while the rebuild runs
// reaches only the healthy replicas: before it marks the target healthy,
// under the write lock (which a snapshot takes too), the rebuild checks
// that the two chains list the same snapshots and no deletion is running,
// and otherwise runs again; layers already equal cost a cached compare.

// maxRebuildPasses bounds the passes of one rebuild whose source's
// snapshots keep changing; the rebuild then stops and is started again.
const maxRebuildPasses = 5

// layerSumsBatch is how many extents' layer sums one request asks for: a
// layer not yet cached reads this much of it per request (256 MiB with
// 4 MiB extents).
const layerSumsBatch = 64

// errChainMoved: the target's or the source's chain changed under the
// rebuild (a deletion, a failover): the pass runs again.
var errChainMoved = errors.New("rebuild: a replica's chain of layers changed meanwhile")

// errSourceCorrupt: a block of one of the source's layers fails its sums
// (a layer's shadowed blocks have no repair yet): the pass runs again from
// another healthy replica, whose layers are the same snapshots.
var errSourceCorrupt = errors.New("rebuild: a layer of the source fails its checksums")

// sourceErr wraps an error of the rebuild's source, marking a checksum
// failure as errSourceCorrupt.
func sourceErr(err error, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if errors.Is(err, replica.ErrChecksum) {
		return fmt.Errorf("%s: %w: %w", msg, errSourceCorrupt, err)
	}
	return fmt.Errorf("%s: %w", msg, err)
}

// rebuildSource picks a pass's source: a healthy member, the local one
// first (as e.source()), none of avoid.
func (e *Engine) rebuildSource(avoid []string) *member {
	e.mu.RLock()
	defer e.mu.RUnlock()
	var src *member
	for _, m := range e.members {
		if m.client == nil || !m.healthy() || slices.Contains(avoid, m.replica.ID) {
			continue
		}
		if src == nil || m.local && !src.local {
			src = m
		}
	}
	return src
}

// Rebuild metrics (registered with the others: Collectors).
var (
	metricRebuildLayerBytes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_rebuild_layer_bytes_total",
		Help: "Bytes of snapshot layers that rebuilds copied to their target (held blocks with data).",
	}, []string{"volume_id"})
	metricRebuildLayers = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_rebuild_layers_total",
		Help: "Snapshot layers that rebuilds carried to (built on) or dropped from their target, by action.",
	}, []string{"volume_id", "action"})
)

// rebuildPeers returns the engine's epoch and the member of replica srcID,
// the rebuild's source, if it is still healthy; target must still be a
// member. Taken under the read lock, not held afterwards.
func (e *Engine) rebuildPeers(srcID string, target *member) (uint64, *member, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if err := e.usable(); err != nil {
		return 0, nil, err
	}
	if !slices.Contains(e.members, target) || target.client == nil {
		return 0, nil, fmt.Errorf("rebuild target %s is no longer a member: %w", target.replica.ID, ErrIO)
	}
	for _, m := range e.members {
		if m.replica.ID == srcID && m.healthy() && m.client != nil {
			return e.epoch, m, nil
		}
	}
	return 0, nil, fmt.Errorf("rebuild source %s is no longer healthy: %w", srcID, errChainMoved)
}

// layerOp runs op with the current epoch and the rebuild's source. A
// request that met a moved epoch (a reconfigure meanwhile) is sent again
// with the new one.
func (e *Engine) layerOp(srcID string, target *member, op func(epoch uint64, src *member) error) error {
	for attempt := 0; ; attempt++ {
		epoch, src, err := e.rebuildPeers(srcID, target)
		if err != nil {
			return err
		}
		err = op(epoch, src)
		if err == nil || attempt == 2 || !errors.Is(err, replica.ErrNotClaimed) && !errors.Is(err, replica.ErrFenced) {
			return err
		}
		if now, _, perr := e.rebuildPeers(srcID, target); perr != nil || now == epoch {
			return err
		}
	}
}

// snapshotIDs returns the ids of the layers that are snapshots (not being
// deleted).
func snapshotIDs(ls []replica.LayerInfo) []string {
	var ids []string
	for _, l := range ls {
		if !l.Deleting {
			ids = append(ids, l.ID)
		}
	}
	return ids
}

// chainLists reads the source's and the target's lists of sealed layers.
// unsupported: one of them predates the LAYER ops (a rolling upgrade), so
// the chain cannot be carried.
func (e *Engine) chainLists(ctx context.Context, srcID string, target *member) (src, tgt []replica.LayerInfo, unsupported bool, err error) {
	err = e.layerOp(srcID, target, func(epoch uint64, s *member) error {
		var err error
		if src, err = s.client.Layers(ctx, epoch); err != nil {
			return err
		}
		tgt, err = target.client.Layers(ctx, epoch)
		return err
	})
	if errors.Is(err, replica.ErrInvalidArgument) {
		return nil, nil, true, nil
	}
	return src, tgt, false, err
}

// carryChain is steps 1 and 2 (see above): it makes the target's sealed
// layers equal to those of replica srcID, each compared over the volume's
// first size bytes. It adds to st what it compared and copied.
func (e *Engine) carryChain(ctx context.Context, target *member, srcID string, size uint64, st *RebuildStats, report func(bool)) error {
	srcLayers, tgtLayers, unsupported, err := e.chainLists(ctx, srcID, target)
	if err != nil {
		return err
	}
	if unsupported {
		e.log.Warn("a replica server predates the LAYER ops: the rebuild carries the volume's contents, not its snapshots",
			zap.String("replica_id", target.replica.ID), zap.String("source", srcID))
		return nil
	}
	want := snapshotIDs(srcLayers)
	flat := e.flatBase(ctx, target, srcID, want, snapshotIDs(tgtLayers))
	want = want[flat:]
	st.BytesTotal += uint64(len(want)) * size
	for _, l := range tgtLayers {
		if !l.Deleting && slices.Contains(want, l.ID) {
			continue
		}
		if err := e.dropLayer(ctx, target, srcID, l.ID); err != nil {
			return err
		}
		st.LayersDropped++
	}
	for i, id := range want {
		_, tgtLayers, _, err = e.chainLists(ctx, srcID, target)
		if err != nil {
			return err
		}
		tgt := snapshotIDs(tgtLayers)
		if len(tgt) < i || !slices.Equal(tgt[:i], want[:i]) || len(tgt) != len(tgtLayers) {
			return fmt.Errorf("target %s lists %v, the rebuild made %v: %w", target.replica.ID, tgt, want[:i], errChainMoved)
		}
		asFlat := i == 0 && flat > 0
		if i < len(tgt) && tgt[i] == id {
			same, err := e.compareLayer(ctx, target, srcID, id, asFlat, size, st, report)
			if err != nil {
				return err
			}
			if same {
				continue
			}
		}
		if err := e.carryLayer(ctx, target, srcID, id, i, asFlat, size, st, report); err != nil {
			return err
		}
	}
	return nil
}

// flatBase returns the position in the source's snapshots (want) of the
// layer that the target is to hold flattened at its bottom, 0 for none:
// the volume's restore snapshot, when layers lie below it and the target
// has none of them (tgt). A source that predates flattened reads (a
// rolling upgrade) is carried layer by layer.
func (e *Engine) flatBase(ctx context.Context, target *member, srcID string, want, tgt []string) int {
	restored := ""
	if p := e.restoredFrom.Load(); p != nil {
		restored = *p
	}
	k := slices.Index(want, restored)
	if restored == "" || k < 1 || slices.ContainsFunc(want[:k], func(id string) bool { return slices.Contains(tgt, id) }) {
		return 0
	}
	err := e.layerOp(srcID, target, func(epoch uint64, src *member) error {
		_, err := src.client.LayerSums(ctx, epoch, restored, replica.LayerFlat, 0, 1)
		return err
	})
	if err != nil {
		e.log.Info("rebuild carries the restored volume's inherited layers one by one, not flattened", zap.String("replica_id", target.replica.ID),
			zap.String("source", srcID), zap.String("snapshot", restored), zap.Error(err))
		return 0
	}
	return k
}

// flattenedFrom reports whether the target's snapshots (tgt) are the
// source's (src) with the layers below its first one flattened into it: the
// chains a rebuild in flat mode makes (flatBase), or a node's flattening
// (replication/storagenode/flatten.go).
func flattenedFrom(src, tgt []string) bool {
	if len(tgt) == 0 {
		return false
	}
	k := slices.Index(src, tgt[0])
	return k >= 1 && slices.Equal(src[k:], tgt)
}

// dropLayer removes layer id from the target: merged into its child, as a
// deletion does (the child then holds what the source's does), or, when
// the child is shared with another replica and cannot be changed, dropped
// (the layers above are compared afterwards and copied where they differ).
func (e *Engine) dropLayer(ctx context.Context, target *member, srcID, id string) error {
	how := "merged"
	var epoch uint64
	err := e.layerOp(srcID, target, func(ep uint64, _ *member) error {
		epoch = ep
		err := target.client.DeleteSnapshot(ctx, ep, id)
		if errors.Is(err, replica.ErrInvalidArgument) {
			how = "dropped"
			err = target.client.DropLayer(ctx, ep, id)
		}
		return err
	})
	if errors.Is(err, replica.ErrNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove layer %s from %s: %w", id, target.replica.ID, err)
	}
	metricRebuildLayers.WithLabelValues(e.cfg.VolumeID, "dropped").Inc()
	e.log.Info("rebuild removed a snapshot layer its source no longer has", zap.String("replica_id", target.replica.ID),
		zap.String("snapshot", id), zap.Uint64("epoch", epoch), zap.String("how", how))
	return nil
}

// layerExtentSums returns the sums of extents [first, first+n) of layer id
// on the source (flattened if flat: see flatBase) and on the target (its
// layer under construction if build).
func (e *Engine) layerExtentSums(ctx context.Context, target *member, srcID, id string, build, flat bool, first, n uint64) (a, b []uint32, err error) {
	srcPart, tgtPart := replica.LayerSealed, replica.LayerSealed
	if flat {
		srcPart = replica.LayerFlat
	}
	if build {
		tgtPart = replica.LayerBuilding
	}
	err = e.layerOp(srcID, target, func(epoch uint64, src *member) error {
		var err error
		if a, err = src.client.LayerSums(ctx, epoch, id, srcPart, first, n); err != nil {
			return sourceErr(err, "layer %s sums on %s", id, src.replica.ID)
		}
		b, err = target.client.LayerSums(ctx, epoch, id, tgtPart, first, n)
		if errors.Is(err, replica.ErrChecksum) {
			// The target's copy fails its own block sums (a bad disk): it
			// differs, and is built again, as copyExtent does for the head.
			b = make([]uint32, len(a))
			for j := range a {
				b[j] = ^a[j]
			}
			e.log.Warn("a snapshot layer of the rebuild target fails its checksums; building it again",
				zap.String("replica_id", target.replica.ID), zap.String("snapshot", id), zap.Error(err))
			return nil
		}
		if err != nil {
			return fmt.Errorf("layer %s sums on %s: %w", id, target.replica.ID, err)
		}
		return nil
	})
	return a, b, err
}

// compareLayer compares the target's layer id with the source's (flattened
// if flat), extent by extent, and reports whether they are equal.
func (e *Engine) compareLayer(ctx context.Context, target *member, srcID, id string, flat bool, size uint64, st *RebuildStats, report func(bool)) (bool, error) {
	var compared uint64
	same := true
	err := e.eachLayerBatch(ctx, target, srcID, id, false, flat, size, func(_ uint64, a, b []uint32, bytes uint64) (bool, error) {
		if !slices.Equal(a, b) {
			same = false
			return false, nil
		}
		compared += bytes
		st.BytesCompared += bytes
		report(false)
		return true, nil
	})
	if err != nil || same {
		return same, err
	}
	// The layer is compared again, whole, as its replacement is built:
	// counted there.
	st.BytesCompared -= compared
	e.log.Info("a snapshot layer of the rebuild target differs from its source's; building it again",
		zap.String("replica_id", target.replica.ID), zap.String("snapshot", id))
	return false, nil
}

// eachLayerBatch gets the sums of layer id on the source (flattened if
// flat) and the target (its build if build), layerSumsBatch extents at a
// time over the volume's first size bytes, and calls fn with each batch's
// first extent, sums and bytes, until it returns false.
func (e *Engine) eachLayerBatch(ctx context.Context, target *member, srcID, id string, build, flat bool, size uint64,
	fn func(first uint64, a, b []uint32, bytes uint64) (bool, error)) error {
	extents := (size + e.extentSize - 1) / e.extentSize
	for first := uint64(0); first < extents; first += layerSumsBatch {
		n := min(layerSumsBatch, extents-first)
		a, b, err := e.layerExtentSums(ctx, target, srcID, id, build, flat, first, n)
		if err != nil {
			return err
		}
		if more, err := fn(first, a, b, min(n*e.extentSize, size-first*e.extentSize)); err != nil || !more {
			return err
		}
	}
	return nil
}

// carryLayer builds layer id on the target from the source's (flattened if
// flat), copying the extents whose sums differ, and publishes it at
// position pos.
func (e *Engine) carryLayer(ctx context.Context, target *member, srcID, id string, pos int, flat bool, size uint64, st *RebuildStats, report func(bool)) error {
	start := time.Now()
	if err := e.layerOp(srcID, target, func(epoch uint64, _ *member) error {
		return target.client.BeginLayer(ctx, epoch, id, uint64(pos))
	}); err != nil {
		return fmt.Errorf("begin layer %s on %s: %w", id, target.replica.ID, err)
	}
	var copied uint64
	err := e.eachLayerBatch(ctx, target, srcID, id, true, flat, size, func(first uint64, a, b []uint32, bytes uint64) (bool, error) {
		for j := range a {
			if a[j] == b[j] {
				continue
			}
			c, err := e.copyLayerExtent(ctx, target, srcID, id, flat, first+uint64(j))
			if err != nil {
				return false, err
			}
			copied += c
			st.BytesCopied += c
			st.LayerBytesCopied += c
			metricRebuildLayerBytes.WithLabelValues(e.cfg.VolumeID).Add(float64(c))
			if err := e.paceRebuild(ctx, c); err != nil {
				return false, err
			}
		}
		st.BytesCompared += bytes
		report(false)
		return true, nil
	})
	if err != nil {
		return err
	}
	var epoch uint64
	if err := e.layerOp(srcID, target, func(ep uint64, _ *member) error {
		epoch = ep
		return target.client.SealLayer(ctx, ep, id)
	}); err != nil {
		return fmt.Errorf("publish layer %s on %s: %w", id, target.replica.ID, err)
	}
	st.LayersCarried++
	metricRebuildLayers.WithLabelValues(e.cfg.VolumeID, "carried").Inc()
	e.log.Info("rebuild carried a snapshot layer", zap.String("replica_id", target.replica.ID), zap.String("snapshot", id),
		zap.Int("position", pos), zap.Bool("flattened", flat), zap.Uint64("epoch", epoch), zap.Uint64("bytes", copied),
		zap.Duration("took", time.Since(start)))
	return nil
}

// copyLayerExtent copies extent x of layer id (flattened if flat) from the
// source to the target's layer under construction, as rebuild I/O (the QoS
// scheduler first, then each replica's disk scheduler). It returns the
// data bytes the extent carried (zero blocks travel as bits).
func (e *Engine) copyLayerExtent(ctx context.Context, target *member, srcID, id string, flat bool, x uint64) (uint64, error) {
	done, err := e.admit(ctx, iosched.Write, e.extentSize, iosched.Rebuild)
	if err != nil {
		return 0, err
	}
	defer done()
	var copied uint64
	err = e.layerOp(srcID, target, func(epoch uint64, src *member) error {
		enc, err := src.client.ReadLayerExtent(ctx, epoch, id, x, flat)
		if err != nil {
			return sourceErr(err, "read extent %d of layer %s from %s", x, id, src.replica.ID)
		}
		if err := target.client.WriteLayerExtent(ctx, epoch, id, x, enc); err != nil {
			return fmt.Errorf("write extent %d of layer %s to %s: %w", x, id, target.replica.ID, err)
		}
		copied = replica.LayerExtentData(enc)
		return nil
	})
	return copied, err
}

// rebuildBurst is how far the rebuild pace may fall behind and then catch
// up: after a pause (a slow extent, foreground I/O ahead at the
// scheduler) the copies run unpaced until they are this much ahead again.
const rebuildBurst = 100 * time.Millisecond

// paceRebuild keeps the engine's rebuild copies at RebuildBytesPerSecond
// while the node has foreground I/O: it waits until n more bytes are due.
// The time a copy itself takes counts towards its share, so copies that
// take longer than their share go on without waiting, and the rate is what
// the flag says rather than less. The copies of all this engine's rebuilds
// share the pace.
//
// While the node's scheduler has seen no foreground request for
// rebuildQuiet the copies are not paced: the pace protects the volumes
// beside the rebuild, and with none running it would only keep the volume
// short of a copy for longer (tests/bench/rebuildbench: a full rebuild of
// an idle 4 GiB volume ran at the default 200 MiB/s cap, 0.22 of cp). The
// replica servers' schedulers still put the rebuild's requests behind
// foreground ones on the source's and the target's nodes.
func (e *Engine) paceRebuild(ctx context.Context, n uint64) error {
	rate := e.cfg.RebuildBytesPerSecond
	if rate == 0 || n == 0 || e.cfg.Sched != nil && e.cfg.Sched.ForegroundIdle(rebuildQuiet) {
		return nil
	}
	e.paceMu.Lock()
	now := time.Now()
	if floor := now.Add(-rebuildBurst); e.paceNext.Before(floor) {
		e.paceNext = floor
	}
	e.paceNext = e.paceNext.Add(time.Duration(float64(n) / float64(rate) * float64(time.Second)))
	wait := e.paceNext.Sub(now)
	e.paceMu.Unlock()
	if wait <= 0 {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(wait):
		return nil
	}
}

// chainsAgree reports whether the target lists exactly the snapshots the
// source does (or those above a layer it holds flattened: flattenedFrom)
// and no snapshot deletion runs: the rebuild may end. Called
// with e.mu held for writing, so no snapshot is being taken.
func (e *Engine) chainsAgree(ctx context.Context, target *member, srcID string) (bool, error) {
	if e.snapDeletes.Load() > 0 {
		return false, nil
	}
	var src *member
	for _, m := range e.members {
		if m.replica.ID == srcID && m.healthy() && m.client != nil {
			src = m
		}
	}
	if src == nil {
		return false, nil // the source left: a pass with another one
	}
	ctx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
	defer cancel()
	sl, err := src.client.Layers(ctx, e.epoch)
	if errors.Is(err, replica.ErrInvalidArgument) {
		return true, nil // an older server: no chain to carry (see carryChain)
	}
	if err != nil {
		return false, fmt.Errorf("list the layers of %s: %w", srcID, err)
	}
	tl, err := target.client.Layers(ctx, e.epoch)
	if errors.Is(err, replica.ErrInvalidArgument) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("list the layers of %s: %w", target.replica.ID, err)
	}
	tgtIDs, srcIDs := snapshotIDs(tl), snapshotIDs(sl)
	return len(tgtIDs) == len(tl) && (slices.Equal(srcIDs, tgtIDs) || flattenedFrom(srcIDs, tgtIDs)), nil
}
