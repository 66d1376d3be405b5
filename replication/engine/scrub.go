package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Scrub: a background pass over every block of every healthy replica.
//
// Per extent, each replica computes its extent digest (CHECKSUMS) in the
// disk scheduler's Scrub class, behind foreground I/O and rebuilds; with
// checksums that reads and verifies every block of the extent. An extent
// where every replica verifies and the digests agree costs nothing more.
// Otherwise the engine takes the extent's range (no write can interleave)
// and goes block by block: the first replica whose block verifies (the
// engine's usual source first) is the reference; a replica whose block
// fails its checksum, or verifies but differs from the reference, gets the
// reference's block. A valid checksum always beats a majority: two
// replicas agreeing on a block that fails its checksum never outvote the
// one that verifies. A block that verifies nowhere is unrecoverable: it is
// counted, and the volume's condition becomes abnormal. A scrub that ends
// with nothing unrecoverable clears an abnormal condition.
//
// A scrub is asked for through the store (ScrubProgressUpdate with a new
// Seq, not done: `cairn ctl volume scrub`, or the engine itself every
// Config.ScrubInterval) and run by the engine of the attached volume, which
// records its progress there.

// ScrubStats is the outcome of a scrub.
type ScrubStats struct {
	// BlocksChecked counts replica blocks verified; BlocksTotal is what a
	// scrub of every healthy replica at its start verifies (blocks ×
	// replicas). They differ when a replica left (or joined) midway.
	BlocksChecked, BlocksTotal uint64
	Repaired                   uint64
	Unrecoverable              uint64
}

// scrubProgressEvery is how often a running scrub records its progress.
const scrubProgressEvery = time.Second

// Scrub verifies every block of every healthy replica and repairs what it
// can; report, if set, gets the running totals now and then (blocks total
// first).
func (e *Engine) Scrub(ctx context.Context, report func(total uint64, s ScrubStats)) (ScrubStats, error) {
	var st ScrubStats
	e.mu.RLock()
	if err := e.usable(); err != nil {
		e.mu.RUnlock()
		return st, err
	}
	extentSize := e.extentSize
	replicas := uint64(e.healthyCount())
	e.mu.RUnlock()
	if extentSize == 0 {
		return st, fmt.Errorf("volume %s: extent size unknown: %w", e.cfg.VolumeID, ErrIO)
	}
	size := e.size.Load() // an expansion meanwhile is scrubbed next time
	blocks := (size + replica.SumBlockSize - 1) / replica.SumBlockSize
	total := blocks * replicas
	extents := (size + extentSize - 1) / extentSize
	sctx := replica.WithClass(ctx, iosched.Scrub)
	var lost []uint64
	last := time.Now()
	for x := uint64(0); x < extents; x++ {
		off := x * extentSize
		n := min(extentSize, size-off)
		checked, repaired, bad, err := e.scrubExtent(ctx, sctx, x, off, n)
		if err != nil {
			return st, fmt.Errorf("volume %s: scrub extent %d: %w", e.cfg.VolumeID, x, err)
		}
		st.BlocksChecked = min(total, st.BlocksChecked+checked)
		st.Repaired += repaired
		st.Unrecoverable += uint64(len(bad))
		lost = append(lost, bad...)
		metricScrubBlocks.WithLabelValues(e.cfg.VolumeID).Add(float64(checked))
		metricScrubRepaired.WithLabelValues(e.cfg.VolumeID).Add(float64(repaired))
		metricScrubUnrecoverable.WithLabelValues(e.cfg.VolumeID).Add(float64(len(bad)))
		if report != nil && time.Since(last) >= scrubProgressEvery {
			report(total, st)
			last = time.Now()
		}
	}
	st.BlocksTotal = total
	if len(lost) > 0 {
		e.markAbnormal(ctx, lost)
	} else if e.checksums.Load() {
		e.clearAbnormal(ctx)
	}
	if report != nil {
		report(total, st)
	}
	return st, nil
}

// scrubExtent checks extent x on every healthy replica and repairs it when
// the replicas disagree or a block fails its checksum. It returns the
// replica blocks checked, the blocks repaired and the blocks lost.
func (e *Engine) scrubExtent(ctx, sctx context.Context, x, off, n uint64) (checked, repaired uint64, lost []uint64, err error) {
	e.mu.RLock()
	if err := e.usable(); err != nil {
		e.mu.RUnlock()
		return 0, 0, nil, err
	}
	epoch, ms := e.epoch, e.healthyMembers()
	e.mu.RUnlock()
	blocks := (n + replica.SumBlockSize - 1) / replica.SumBlockSize
	var first uint32
	clean := true
	for i, m := range ms {
		sums, err := m.client.Checksums(sctx, epoch, x, 1)
		switch {
		case err == nil:
			checked += blocks
			if i == 0 {
				first = sums[0]
			} else if sums[0] != first {
				clean = false
			}
		case errors.Is(err, replica.ErrChecksum):
			checked += blocks
			clean = false
		case ctx.Err() != nil:
			return checked, 0, nil, ctx.Err()
		default:
			// Fenced, reconfigured, a replica going away: its writes
			// decide what becomes of it. Look again under the lock.
			clean = false
		}
	}
	if clean {
		return checked, 0, nil, nil
	}
	repaired, lost, err = e.fixExtent(ctx, off, n)
	return checked, repaired, lost, err
}

// healthyMembers returns the healthy members with a connection, the
// engine's usual source first. Called with e.mu held.
func (e *Engine) healthyMembers() []*member {
	src := e.source()
	var ms []*member
	if src != nil {
		ms = append(ms, src)
	}
	for _, m := range e.members {
		if m != src && m.healthy() && m.client != nil {
			ms = append(ms, m)
		}
	}
	return ms
}

// fixExtent goes block by block over [off, off+n) with the range and the
// read lock held (see the comment at the top of this file).
func (e *Engine) fixExtent(ctx context.Context, off, n uint64) (repaired uint64, lost []uint64, err error) {
	unlock, err := e.locks.lock(ctx, off, n)
	if err != nil {
		return 0, nil, err
	}
	defer unlock()
	e.mu.RLock()
	defer e.mu.RUnlock()
	if err := e.usable(); err != nil {
		return 0, nil, err
	}
	ms := e.healthyMembers()
	bufs := make([][]byte, len(ms))
	for i := range bufs {
		bufs[i] = make([]byte, replica.SumBlockSize)
	}
	for bo := off; bo < off+n; bo += replica.SumBlockSize {
		bl := min(uint64(replica.SumBlockSize), e.size.Load()-bo)
		var good []byte
		var src *member
		var fix []*member
		var why []string
		for i, m := range ms {
			b := bufs[i][:bl]
			err := e.readFrom(ctx, m, e.epoch, b, bo)
			switch {
			case errors.Is(err, replica.ErrChecksum):
				fix, why = append(fix, m), append(why, "checksum")
			case err != nil:
				return repaired, lost, fmt.Errorf("read block %d of %s: %w", bo/replica.SumBlockSize, m.replica.ID, err)
			case good == nil:
				good, src = b, m
			case !bytes.Equal(b, good):
				fix, why = append(fix, m), append(why, "differs from the verified copy")
			}
		}
		blk := bo / replica.SumBlockSize
		if good == nil {
			lost = append(lost, blk)
			continue
		}
		for i, m := range fix {
			wctx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
			err := e.writeCopy(wctx, m, good, bo)
			cancel()
			if err != nil {
				e.log.Warn("block repair from a verified copy failed", zap.String("replica_id", m.replica.ID), zap.Uint64("block", blk),
					zap.Uint64("epoch", e.epoch), zap.Error(err))
				continue
			}
			e.dirty.Store(true)
			repaired++
			metricChecksumRepairs.WithLabelValues(e.cfg.VolumeID).Inc()
			e.log.Warn("block repaired from a verified copy (scrub or rebuild)", zap.String("replica_id", m.replica.ID),
				zap.String("source", src.replica.ID), zap.Uint64("block", blk), zap.Uint64("offset", bo),
				zap.String("reason", why[i]), zap.Uint64("epoch", e.epoch))
		}
	}
	return repaired, lost, nil
}

// clearAbnormal clears the volume's abnormal condition, if set, once a scrub
// found every block verifying somewhere.
func (e *Engine) clearAbnormal(ctx context.Context) {
	v, err := e.cfg.Meta.Volume(ctx, e.cfg.VolumeID)
	if err != nil || v.Condition == nil {
		return
	}
	if _, err := e.cfg.Meta.Apply(ctx, &meta.SetVolumeCondition{VolumeID: e.cfg.VolumeID}); err != nil {
		e.log.Warn("cannot clear the volume condition", zap.Error(err))
		return
	}
	e.abnormalBlock.Store(0)
	e.log.Info("scrub found every block verifying: volume condition normal again", zap.Uint64("epoch", e.Epoch()))
}

// maybeScrub starts the scrub the store asks for, or the periodic one, if
// none runs. Called by the watch loop with the volume it read.
func (e *Engine) maybeScrub(ctx context.Context, v *meta.Volume) {
	if e.cfg.Maintenance || e.scrubbing.Load() {
		return
	}
	e.mu.RLock()
	err := e.usable()
	e.mu.RUnlock()
	if err != nil {
		return // fenced or closing: the volume's current engine scrubs
	}
	var p meta.ScrubProgress
	switch {
	case v.Scrub != nil && !v.Scrub.Done && e.finishedScrub(v.Scrub.Seq):
		// This engine ran that scrub already: v was read before its end
		// was recorded, or the record failed. Record it (again) rather
		// than run it twice, which would write over its repair counts.
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			e.recordScrub(ctx, *e.lastScrub.Load())
		}()
		return
	case v.Scrub != nil && !v.Scrub.Done:
		p = *v.Scrub // asked for, or cut short by a previous engine
	case e.cfg.ScrubInterval > 0:
		last := e.opened
		if v.Scrub != nil && v.Scrub.FinishedAt > 0 {
			last = time.Unix(0, v.Scrub.FinishedAt)
		}
		if time.Since(last) < e.cfg.ScrubInterval {
			return
		}
		p = meta.ScrubProgress{Seq: 1}
		if v.Scrub != nil {
			p.Seq = v.Scrub.Seq + 1
		}
	default:
		return
	}
	e.scrubbing.Store(true)
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer e.scrubbing.Store(false)
		e.runScrub(ctx, p.Seq)
	}()
}

// finishedScrub reports whether this engine ran scrub seq to its end.
func (e *Engine) finishedScrub(seq uint64) bool {
	last := e.lastScrub.Load()
	return last != nil && last.Seq == seq
}

// recordScrub records a scrub's progress in the store.
func (e *Engine) recordScrub(ctx context.Context, p meta.ScrubProgress) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := e.cfg.Meta.Apply(sctx, &meta.ScrubProgressUpdate{VolumeID: e.cfg.VolumeID, Progress: p}); err != nil {
		e.log.Debug("cannot record scrub progress", zap.Error(err))
	}
}

// runScrub runs scrub number seq and records it in the store.
func (e *Engine) runScrub(ctx context.Context, seq uint64) {
	started := time.Now()
	put := func(p meta.ScrubProgress) {
		p.Seq, p.StartedAt = seq, started.UnixNano()
		e.recordScrub(ctx, p)
	}
	e.log.Info("scrub started", zap.Uint64("scrub", seq), zap.Uint64("epoch", e.Epoch()))
	st, err := e.Scrub(ctx, func(total uint64, s ScrubStats) {
		put(meta.ScrubProgress{BlocksTotal: total, BlocksChecked: s.BlocksChecked, Repaired: s.Repaired, Unrecoverable: s.Unrecoverable})
	})
	if ctx.Err() != nil || errors.Is(err, ErrFenced) || errors.Is(err, ErrClosed) {
		return // this engine is done: the volume's next one takes the scrub up again
	}
	p := meta.ScrubProgress{BlocksChecked: st.BlocksChecked, BlocksTotal: st.BlocksTotal, Repaired: st.Repaired,
		Unrecoverable: st.Unrecoverable, Done: true, FinishedAt: time.Now().UnixNano()}
	result := "ok"
	if err != nil {
		p.Error, result = err.Error(), "error"
		e.log.Warn("scrub failed", zap.Uint64("scrub", seq), zap.Error(err), zap.Uint64("epoch", e.Epoch()))
	} else {
		e.log.Info("scrub done", zap.Uint64("scrub", seq), zap.Uint64("blocks_checked", st.BlocksChecked),
			zap.Uint64("repaired", st.Repaired), zap.Uint64("unrecoverable", st.Unrecoverable),
			zap.Duration("took", time.Since(started)), zap.Uint64("epoch", e.Epoch()))
	}
	metricScrubRuns.WithLabelValues(e.cfg.VolumeID, result).Inc()
	metricScrubLast.WithLabelValues(e.cfg.VolumeID).Set(float64(time.Now().Unix()))
	p.Seq, p.StartedAt = seq, started.UnixNano()
	e.lastScrub.Store(&p)
	e.recordScrub(ctx, p)
}
