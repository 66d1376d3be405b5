package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// What the engine does with block checksums (docs/integrity.md):
//
//   - Every write carries the CRC32C of each 4 KiB piece, computed once over
//     the bytes sent to every replica; a replica that finds a piece damaged
//     refuses it (ErrChecksum) and the engine copies the range from a
//     replica that took the write (repairWrites).
//   - Every read is verified by the replica. A replica that answers
//     ErrChecksum is not ejected (it answered; the block is repaired): the
//     engine reads the other healthy replicas, returns the copy that
//     verifies, and rewrites the bad replica's blocks from it. A block that
//     verifies nowhere fails the read with ErrIO and marks the volume's
//     condition abnormal in the store; wrong data is never returned.
//   - Resync and resolve first have every replica recompute the sums of the
//     extents they are about to compare (torn writes after a crash).

// Engine metrics, shared by the engines of a process (labelled by volume).
var (
	metricChecksumErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_checksum_errors_total",
		Help: "Replica answers refused for a checksum mismatch (a damaged write on the wire or a block that no longer matches its sum).",
	}, []string{"volume_id"})
	metricChecksumRepairs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_checksum_repairs_total",
		Help: "Ranges rewritten on a replica from another replica's verified copy after a checksum mismatch.",
	}, []string{"volume_id"})
	metricChecksumUnrecoverable = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_checksum_unrecoverable_total",
		Help: "Blocks that verified on no replica: the read got EIO and the volume's condition became abnormal.",
	}, []string{"volume_id"})
	metricScrubBlocks = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_scrub_blocks_checked_total",
		Help: "Replica blocks read and verified by scrubs.",
	}, []string{"volume_id"})
	metricScrubRepaired = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_scrub_blocks_repaired_total",
		Help: "Blocks scrubs rewrote from a verified copy (corrupt, or differing from the verified copy).",
	}, []string{"volume_id"})
	metricScrubUnrecoverable = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_scrub_blocks_unrecoverable_total",
		Help: "Blocks scrubs found verifying on no replica.",
	}, []string{"volume_id"})
	metricScrubRuns = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_scrub_runs_total",
		Help: "Scrubs finished, by result (ok, error).",
	}, []string{"volume_id", "result"})
	metricScrubLast = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "cairn_scrub_last_completed_timestamp_seconds",
		Help: "When the volume's last scrub finished (unix seconds).",
	}, []string{"volume_id"})
)

// Collectors returns the engine's Prometheus metrics, to be registered once
// per process.
func Collectors() []prometheus.Collector {
	return []prometheus.Collector{metricChecksumErrors, metricChecksumRepairs, metricChecksumUnrecoverable,
		metricScrubBlocks, metricScrubRepaired, metricScrubUnrecoverable, metricScrubRuns, metricScrubLast,
		metricReplicaGrows, metricExpansions, metricRebuildLayerBytes, metricRebuildLayers, metricSealRepairs, metricSealUnrecoverable,
		metricFollowLagWrites, metricFollowLagBytes, metricFollowLagSeconds, metricFollowResyncExtents, metricFollowOverflows, metricFollowWait}
}

// blockSpan rounds [off, off+n) out to whole checksum blocks, cut at the end
// of the volume: an offset and a length.
func (e *Engine) blockSpan(off, n uint64) (uint64, uint64) {
	a, b := replica.BlockSpan(off, n, e.size.Load())
	return a, b - a
}

// repairJob rewrites [off, off+n) of to from from's verified copy.
type repairJob struct {
	from, to *member
	off, n   uint64
	why      string
}

// readFrom reads p at off from m, bounded by IOTimeout for a remote replica.
func (e *Engine) readFrom(ctx context.Context, m *member, epoch uint64, p []byte, off uint64) error {
	return e.readWithin(ctx, m, epoch, p, off, e.cfg.IOTimeout)
}

// readWithin reads p at off from m, bounded by timeout for a remote
// replica; a replica served in process is read without a timer (a local
// pread is not cancelled midway).
func (e *Engine) readWithin(ctx context.Context, m *member, epoch uint64, p []byte, off uint64, timeout time.Duration) error {
	switch {
	case m.client == nil:
		return errors.New("no connection")
	case m.inProcess():
		return m.client.ReadAt(ctx, epoch, p, off)
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return m.client.ReadAt(rctx, epoch, p, off)
}

// readAround serves a read whose first source answered ErrChecksum: it
// reads the other healthy replicas until one copy verifies, and failing
// that, block by block. It returns the repairs to make and the blocks no
// replica could serve. Called with the blocks' range and e.mu held for
// reading.
func (e *Engine) readAround(ctx context.Context, p []byte, off, epoch uint64, first *member) ([]repairJob, []uint64, error) {
	metricChecksumErrors.WithLabelValues(e.cfg.VolumeID).Inc()
	cands := []*member{first}
	for _, m := range e.members {
		if m != first && m.healthy() && m.client != nil {
			cands = append(cands, m)
		}
	}
	aoff, an := e.blockSpan(off, uint64(len(p)))
	bad := []*member{first}
	for _, m := range cands[1:] {
		err := e.readFrom(ctx, m, epoch, p, off)
		if err == nil {
			jobs := make([]repairJob, 0, len(bad))
			for _, b := range bad {
				jobs = append(jobs, repairJob{from: m, to: b, off: aoff, n: an, why: "read"})
			}
			return jobs, nil, nil
		}
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
		if errors.Is(err, replica.ErrChecksum) {
			metricChecksumErrors.WithLabelValues(e.cfg.VolumeID).Inc()
			bad = append(bad, m)
		} else {
			e.log.Warn("replica failed a read while another was being read around", zap.String("replica_id", m.replica.ID),
				zap.Uint64("epoch", epoch), zap.Error(err))
		}
	}
	// No whole copy verifies: serve each block from whichever verifies.
	// Every replica that failed is asked for every block, so that all of
	// their bad blocks are found and repaired, not only the first.
	var jobs []repairJob
	var lost []uint64
	end := off + uint64(len(p))
	scratch := make([]byte, replica.SumBlockSize)
	for bo := off; bo < end; {
		be := min(end, (bo/replica.SumBlockSize+1)*replica.SumBlockSize)
		piece := p[bo-off : be-off]
		var good *member
		var badHere []*member
		for _, m := range cands {
			dst := piece
			if good != nil {
				if !slices.Contains(bad, m) {
					continue
				}
				dst = scratch[:len(piece)]
			}
			err := e.readFrom(ctx, m, epoch, dst, bo)
			if err == nil {
				if good == nil {
					good = m
				}
				continue
			}
			if ctx.Err() != nil {
				return nil, nil, ctx.Err()
			}
			if errors.Is(err, replica.ErrChecksum) {
				badHere = append(badHere, m)
			}
		}
		blk := bo / replica.SumBlockSize
		if good == nil {
			lost = append(lost, blk)
		} else {
			for _, b := range badHere {
				jobs = append(jobs, repairJob{from: good, to: b, off: blk * replica.SumBlockSize,
					n: min(e.size.Load(), (blk+1)*replica.SumBlockSize) - blk*replica.SumBlockSize, why: "read"})
			}
		}
		bo = be
	}
	return jobs, lost, nil
}

// readChecked serves a read whose source answered ErrChecksum. Reads take
// no range lock, so the mismatch may only be a write to the same blocks in
// flight (its data written, its sums not yet): the read is done again with
// the blocks' range held, which no write to them can hold at the same
// time. A mismatch then is real: the other replicas are read around it
// (readAround), the bad blocks rewritten from the verified copy under the
// same hold, and blocks that verify nowhere fail the read with ErrIO and
// mark the volume's condition abnormal.
func (e *Engine) readChecked(ctx context.Context, p []byte, off uint64) error {
	aoff, an := e.blockSpan(off, uint64(len(p)))
	unlock, err := e.locks.lock(ctx, aoff, an)
	if err != nil {
		return err
	}
	lost, err := func() ([]uint64, error) {
		defer unlock()
		e.mu.RLock()
		defer e.mu.RUnlock()
		if err := e.usable(); err != nil {
			return nil, err
		}
		ms := e.healthyMembers()
		if len(ms) == 0 {
			return nil, fmt.Errorf("volume %s: no healthy replica to read from: %w", e.cfg.VolumeID, ErrIO)
		}
		err := e.readFrom(ctx, ms[0], e.epoch, p, off)
		if err == nil || !errors.Is(err, replica.ErrChecksum) {
			return nil, err // a write was in flight; or a plain failure, for the caller's next read
		}
		jobs, lost, err := e.readAround(ctx, p, off, e.epoch, ms[0])
		if err != nil {
			return nil, err
		}
		e.repair(ctx, jobs)
		return lost, nil
	}()
	if err != nil {
		if ctx.Err() == nil && !errors.Is(err, ErrIO) && !errors.Is(err, ErrClosed) && !errors.Is(err, ErrFenced) {
			err = fmt.Errorf("volume %s: read after a checksum error: %v: %w", e.cfg.VolumeID, err, ErrIO)
		}
		return err
	}
	if len(lost) > 0 {
		e.markAbnormal(ctx, lost)
		return fmt.Errorf("volume %s: %d block(s) from offset %d verify on no replica: %w",
			e.cfg.VolumeID, len(lost), lost[0]*replica.SumBlockSize, ErrIO)
	}
	return nil
}

// repair rewrites each job's range on its bad replica from the good one's
// current, verified copy. Callers hold the ranges and e.mu for reading.
// Failures are logged: the bad replica keeps failing its checksum there and
// the next read or scrub tries again. It returns how many succeeded.
func (e *Engine) repair(ctx context.Context, jobs []repairJob) int {
	done := 0
	for _, j := range jobs {
		if err := e.copyRange(ctx, j.from, j.to, j.off, j.n); err != nil {
			e.log.Warn("checksum repair failed", zap.String("replica_id", j.to.replica.ID), zap.String("source", j.from.replica.ID),
				zap.Uint64("block", j.off/replica.SumBlockSize), zap.Uint64("offset", j.off), zap.Uint64("length", j.n),
				zap.Uint64("epoch", e.epoch), zap.Error(err))
			continue
		}
		done++
		metricChecksumRepairs.WithLabelValues(e.cfg.VolumeID).Inc()
		e.log.Warn("checksum mismatch repaired from another replica", zap.String("replica_id", j.to.replica.ID),
			zap.String("source", j.from.replica.ID), zap.String("found_by", j.why), zap.Uint64("block", j.off/replica.SumBlockSize),
			zap.Uint64("blocks", (j.n+replica.SumBlockSize-1)/replica.SumBlockSize), zap.Uint64("offset", j.off), zap.Uint64("epoch", e.epoch))
	}
	return done
}

// writeCopy writes data, copied from another replica, to m at off (a
// rebuild, a resync, a repair). When the volume keeps checksums it goes
// with its piece checksums, as a user write does: a copy damaged on the
// way is refused, never stored under a fresh valid sum. Callers hold e.mu.
func (e *Engine) writeCopy(ctx context.Context, m *member, data []byte, off uint64) error {
	if !e.checksums.Load() {
		return m.client.WriteAt(ctx, e.epoch, data, off, false)
	}
	return m.client.WriteAtSums(ctx, e.epoch, data, off, false, replica.PieceSums(nil, data, off))
}

// copyRange copies [off, off+n) from one member to another. Callers hold
// the range and e.mu for reading.
func (e *Engine) copyRange(ctx context.Context, from, to *member, off, n uint64) error {
	buf := make([]byte, n)
	if err := e.readFrom(ctx, from, e.epoch, buf, off); err != nil {
		return fmt.Errorf("read good copy from %s: %w", from.replica.ID, err)
	}
	if to.client == nil {
		return errors.New("no connection")
	}
	wctx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
	defer cancel()
	if err := e.writeCopy(wctx, to, buf, off); err != nil {
		return fmt.Errorf("write to %s: %w", to.replica.ID, err)
	}
	e.dirty.Store(true)
	return nil
}

// repairWrites handles the members of a write that answered ErrChecksum: the
// piece was damaged on the way, or the write covers in part a block that
// was already corrupt there. Nothing was written on them; the range (held
// by the caller, with e.mu for reading) is copied to them from a healthy
// member that took the write, and their error is cleared when that works.
func (e *Engine) repairWrites(ctx context.Context, ms []*member, errs []error, spans []span) {
	var good *member
	for i, m := range ms {
		if errs[i] == nil && m.healthy() {
			good = m
			break
		}
	}
	for i, m := range ms {
		if !errors.Is(errs[i], replica.ErrChecksum) {
			continue
		}
		metricChecksumErrors.WithLabelValues(e.cfg.VolumeID).Inc()
		if good == nil {
			continue
		}
		repaired := true
		for _, s := range spans {
			off, n := s.off, s.end-s.off
			aoff, an := e.blockSpan(off, n)
			if err := e.copyRange(ctx, good, m, aoff, an); err != nil {
				e.log.Warn("checksum repair of a write failed", zap.String("replica_id", m.replica.ID), zap.String("source", good.replica.ID),
					zap.Uint64("block", aoff/replica.SumBlockSize), zap.Uint64("epoch", e.epoch), zap.NamedError("checksum_error", errs[i]), zap.Error(err))
				repaired = false
				break
			}
			metricChecksumRepairs.WithLabelValues(e.cfg.VolumeID).Inc()
			e.log.Warn("write refused for a checksum mismatch; range copied from another replica", zap.String("replica_id", m.replica.ID),
				zap.String("source", good.replica.ID), zap.Uint64("block", aoff/replica.SumBlockSize), zap.Uint64("offset", off),
				zap.Uint64("length", n), zap.Uint64("epoch", e.epoch), zap.NamedError("checksum_error", errs[i]))
		}
		if repaired {
			errs[i] = nil
		}
	}
}

// markAbnormal records in the store that blocks verified on no replica, so
// that the CSI volume condition reports it.
func (e *Engine) markAbnormal(ctx context.Context, lost []uint64) {
	metricChecksumUnrecoverable.WithLabelValues(e.cfg.VolumeID).Add(float64(len(lost)))
	e.recordAbnormal(ctx, lost, "verify on no replica")
}

// recordAbnormal records in the store that the volume's blocks lost (of 4
// KiB, as the volume's users count them) could be read from no replica,
// and why. Called with no lock of the engine held: it writes to the store.
func (e *Engine) recordAbnormal(ctx context.Context, lost []uint64, why string) {
	// Recorded once per first lost block: an application retrying the
	// read, or readahead, must not make a store write and an Error line
	// of every EIO.
	if e.abnormalBlock.Swap(lost[0]+1) == lost[0]+1 {
		return
	}
	msg := fmt.Sprintf("data damaged: %d block(s) of 4 KiB %s, first block %d (offset %d); reads of them fail with EIO",
		len(lost), why, lost[0], lost[0]*replica.SumBlockSize)
	e.log.Error("blocks "+why+": read fails with EIO, volume condition abnormal", zap.Uint64("block", lost[0]),
		zap.Int("blocks", len(lost)), zap.Uint64("offset", lost[0]*replica.SumBlockSize), zap.Uint64("epoch", e.Epoch()))
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := e.cfg.Meta.Apply(sctx, &meta.SetVolumeCondition{VolumeID: e.cfg.VolumeID, Abnormal: true, Message: msg}); err != nil {
		e.abnormalBlock.Store(0) // try again at the next one
		e.log.Warn("cannot record the abnormal volume condition", zap.Error(err))
	}
}

// rehash has every connected member recompute the sums of the given
// extents. A replica server older than checksums refuses the op, which is
// fine: it keeps no sums. Called with e.mu held.
func (e *Engine) rehash(ctx context.Context, extents []uint64) error {
	if !e.checksums.Load() || len(extents) == 0 {
		return nil
	}
	for _, m := range e.members {
		if m.client == nil {
			continue
		}
		for _, x := range extents {
			err := m.client.Rehash(ctx, e.epoch, x, 1)
			if errors.Is(err, replica.ErrInvalidArgument) {
				break
			}
			if err != nil {
				return fmt.Errorf("rehash extent %d on %s: %w", x, m.replica.ID, err)
			}
		}
	}
	return nil
}
