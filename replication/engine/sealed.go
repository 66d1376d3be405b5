package engine

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Encryption at rest (docs/encryption.md). The engine of an encrypted
// volume seals each 4 KiB block with AES-256-GCM before it fans the write
// out, and opens it after the read: the replicas hold ciphertext and the
// blocks' entries (nonce and tag) beside it, in the layout of
// replication/crypt, and never a key. Everything below the user's I/O —
// rebuilds, resyncs, scrubs, snapshots, checksums, expansion — works on the
// replicas' bytes as it always does.
//
// The user's I/O works on logical blocks; a range of them is one data range
// and one entry range of the replicas per group (crypt.Runs). Two I/Os on
// the same logical blocks are ordered by sealState.locks: a read must not
// see one write's data with another's entries, and a write that covers a
// block in part reads, merges and seals it again.

var (
	metricSealRepairs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_decrypt_repairs_total",
		Help: "Encrypted blocks that failed authentication on a replica and were rewritten from another replica's copy.",
	}, []string{"volume_id"})
	metricSealUnrecoverable = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_decrypt_unrecoverable_total",
		Help: "Encrypted blocks that failed authentication on every replica (the read failed with EIO).",
	}, []string{"volume_id"})
)

// sealState is an encrypted volume's part of its engine.
type sealState struct {
	s       *crypt.Sealer
	locks   *rangeLocks // over logical offsets
	entries entryCache  // recent metadata blocks (entrycache.go)
}

const blockSize = crypt.BlockSize

// openSeal prepares the engine of an encrypted volume: a Sealer with the
// data key and, for an engine that writes, a nonce lease of its own from
// the store. Called by Open before it claims anything.
func (e *Engine) openSeal(ctx context.Context, encrypted bool) error {
	switch {
	case !encrypted && e.cfg.DataKey != nil:
		return fmt.Errorf("volume %s is not encrypted, but a data key was given: %w", e.cfg.VolumeID, ErrIO)
	case !encrypted || e.cfg.Maintenance:
		return nil // a maintenance engine copies ciphertext; it needs no key
	case e.cfg.DataKey == nil:
		return fmt.Errorf("volume %s is encrypted: it opens only with its key (CSI NodeStage with the secret's %s): %w",
			e.cfg.VolumeID, crypt.SecretKey, ErrNeedsKey)
	}
	lease, err := e.cfg.Meta.LeaseNonces(ctx, e.cfg.VolumeID)
	if err != nil {
		return fmt.Errorf("volume %s: lease nonces: %w", e.cfg.VolumeID, err)
	}
	s, err := crypt.NewSealer(e.cfg.DataKey, lease)
	if err != nil {
		return fmt.Errorf("volume %s: %w", e.cfg.VolumeID, err)
	}
	e.seal = &sealState{s: s, locks: &rangeLocks{}}
	e.log.Info("volume encrypted: blocks sealed with aes-256-gcm", zap.Uint64("nonce_lease", lease))
	return nil
}

// lockBlocks takes the logical blocks [first, first+count) that
// [off, off+n) touches (n > 0).
func (e *Engine) lockBlocks(ctx context.Context, off, n uint64) (first, count uint64, unlock func(), err error) {
	first = off / blockSize
	count = (off+n+blockSize-1)/blockSize - first
	unlock, err = e.seal.locks.lock(ctx, first*blockSize, count*blockSize)
	return first, count, unlock, err
}

// sealedWrite writes p at logical offset off.
func (e *Engine) sealedWrite(ctx context.Context, p []byte, off uint64, fua bool) error {
	if len(p) == 0 {
		return nil
	}
	first, count, unlock, err := e.lockBlocks(ctx, off, uint64(len(p)))
	if err != nil {
		return err
	}
	defer unlock()
	plain := p
	if head, end := off-first*blockSize, off+uint64(len(p)); head != 0 || end%blockSize != 0 {
		// A block written in part: merge into what it holds.
		plain = make([]byte, count*blockSize)
		if head != 0 {
			if err := e.sealedReadBlocks(ctx, plain[:blockSize], first, true); err != nil {
				return err
			}
		}
		if last := first + count - 1; end%blockSize != 0 && (last != first || head == 0) {
			if err := e.sealedReadBlocks(ctx, plain[(count-1)*blockSize:], last, true); err != nil {
				return err
			}
		}
		copy(plain[head:], p)
	}
	return e.sealRuns(ctx, plain, first, fua)
}

// sealRuns seals the whole blocks of plain, from logical block first, and
// writes their ciphertext and entries to the replicas. The caller holds
// their logical range.
func (e *Engine) sealRuns(ctx context.Context, plain []byte, first uint64, fua bool) error {
	runs := crypt.Runs(first, uint64(len(plain))/blockSize)
	type write struct {
		data, entries []byte
		first         uint64
	}
	writes := make([]write, 0, len(runs))
	for _, r := range runs {
		data := make([]byte, r.Count*blockSize, r.Count*blockSize+16)
		entries := make([]byte, r.Count*crypt.EntrySize)
		for i := range r.Count {
			pi := plain[(r.First-first+i)*blockSize:][:blockSize]
			if err := e.seal.s.Seal(data[i*blockSize:], entries[i*crypt.EntrySize:][:crypt.EntrySize], pi, r.First+i); err != nil {
				return fmt.Errorf("volume %s: seal block %d: %w", e.cfg.VolumeID, r.First+i, err)
			}
		}
		writes = append(writes, write{data, entries, r.First})
	}
	// Each group's data and entries go to every replica as one request
	// (writePair), so that no replica takes one without the other. Once
	// sent, a write is not given up because the caller's context ended
	// (a replica that took it would hold a pair the others lack until the
	// resolve); the replicas' own timeouts still bound it.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*e.cfg.IOTimeout)
	defer cancel()
	return parallel(len(writes), func(i int) error {
		w := writes[i]
		err := e.writePair(wctx, w.data, crypt.DataOffset(w.first), w.entries, crypt.EntryOffset(w.first), fua)
		if err != nil {
			e.seal.entries.drop(w.first) // the replicas may hold either
		} else {
			e.seal.entries.update(w.first, w.entries)
		}
		return err
	})
}

// writePair writes an encrypted volume's ciphertext at doff and its
// entries at eoff as one request to every replica (replica.FlagPair),
// ordered against other writes by one hold of both ranges. A replica
// takes both or neither: an engine that dies midway, or a request that
// fails, leaves no block with its data but not its entry (or the reverse)
// on a replica that answered.
func (e *Engine) writePair(ctx context.Context, data []byte, doff uint64, entries []byte, eoff uint64, fua bool) error {
	pair := replica.Pair{Off: eoff, Data: entries}
	if e.checksums.Load() {
		pair.FirstPieces = replica.PieceSums(nil, data, doff)
		pair.SecondPieces = replica.PieceSums(nil, entries, eoff)
	}
	spans := []span{{eoff, eoff + uint64(len(entries))}, {doff, doff + uint64(len(data))}}
	return e.mutateSpans(ctx, "write", spans, func(ctx context.Context, m *member, epoch uint64) error {
		return m.client.WritePair(ctx, epoch, data, doff, pair, fua)
	})
}

// sealedDiscard makes [off, off+n) read as zeroes (Trim, WriteZeroes): the
// whole blocks' entries are zeroed first, then their data punched (trim)
// or zeroed; the blocks covered in part are written with zeroes. A crash
// in between leaves a zero entry, which reads as zeroes whatever the data.
func (e *Engine) sealedDiscard(ctx context.Context, off, n uint64, zero bool) error {
	if n == 0 {
		return nil
	}
	// Whole blocks inside the range.
	a, b := (off+blockSize-1)/blockSize, (off+n)/blockSize
	if a >= b {
		return e.sealedWrite(ctx, make([]byte, n), off, false)
	}
	if head := a*blockSize - off; head > 0 {
		if err := e.sealedWrite(ctx, make([]byte, head), off, false); err != nil {
			return err
		}
	}
	if tail := off + n - b*blockSize; tail > 0 {
		if err := e.sealedWrite(ctx, make([]byte, tail), b*blockSize, false); err != nil {
			return err
		}
	}
	unlock, err := e.seal.locks.lock(ctx, a*blockSize, (b-a)*blockSize)
	if err != nil {
		return err
	}
	defer unlock()
	runs := crypt.Runs(a, b-a)
	if err := parallel(len(runs), func(i int) error {
		r := runs[i]
		zeroes := make([]byte, r.Count*crypt.EntrySize)
		err := e.zeroPhys(ctx, crypt.EntryOffset(r.First), uint64(len(zeroes)))
		if err != nil {
			e.seal.entries.drop(r.First) // the replicas may hold either
		} else {
			e.seal.entries.update(r.First, zeroes)
		}
		return err
	}); err != nil {
		return err
	}
	return parallel(len(runs), func(i int) error {
		off, n := crypt.DataOffset(runs[i].First), runs[i].Count*blockSize
		if zero {
			return e.zeroPhys(ctx, off, n)
		}
		return e.trimPhys(ctx, off, n)
	})
}

// sealedRead reads p at logical offset off. It reads without the blocks'
// logical range first: a write running at the same time may then show its
// data with the entries before it (or the reverse), which fails to open,
// so a read that meets a block failing authentication reads again holding
// the range, and only a failure then is a damaged block.
func (e *Engine) sealedRead(ctx context.Context, p []byte, off uint64) error {
	if len(p) == 0 {
		return nil
	}
	first := off / blockSize
	count := (off+uint64(len(p))+blockSize-1)/blockSize - first
	buf := p
	head := off - first*blockSize
	if head != 0 || uint64(len(p)) != count*blockSize {
		buf = make([]byte, count*blockSize)
	}
	err := e.sealedReadBlocks(ctx, buf, first, false)
	if errors.Is(err, crypt.ErrAuth) {
		var unlock func()
		if _, _, unlock, err = e.lockBlocks(ctx, off, uint64(len(p))); err != nil {
			return err
		}
		err = e.sealedReadBlocks(ctx, buf, first, true)
		unlock()
	}
	if err != nil {
		return err
	}
	if &buf[0] != &p[0] {
		copy(p, buf[head:])
	}
	return nil
}

// sealedReadBlocks reads and opens the whole logical blocks dst covers,
// from block first. A block that fails authentication is repaired when
// the caller holds the blocks' logical range (locked), and fails the read
// with crypt.ErrAuth otherwise.
func (e *Engine) sealedReadBlocks(ctx context.Context, dst []byte, first uint64, locked bool) error {
	runs := crypt.Runs(first, uint64(len(dst))/blockSize)
	if len(runs) == 1 { // most reads: no goroutine, no closure
		return e.openRun(ctx, dst, first, runs[0], locked)
	}
	return parallel(len(runs), func(i int) error {
		return e.openRun(ctx, dst, first, runs[i], locked)
	})
}

// openRun is sealedReadBlocks for the blocks of one run.
func (e *Engine) openRun(ctx context.Context, dst []byte, first uint64, r crypt.Run, locked bool) error {
	data := dst[(r.First-first)*blockSize:][:r.Count*blockSize]
	eb := entriesPool.Get().(*[]byte)
	defer entriesPool.Put(eb)
	if need := int(r.Count * crypt.EntrySize); cap(*eb) < need {
		*eb = make([]byte, need)
	}
	entries := (*eb)[:r.Count*crypt.EntrySize]
	if err := e.readRun(ctx, data, entries, r, locked); err != nil {
		return err
	}
	scratch := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(scratch)
	for k := uint64(0); k < r.Count; {
		n, err := e.seal.s.OpenRun(data[k*blockSize:], entries[k*crypt.EntrySize:], *scratch, r.First+k)
		k += uint64(n)
		if err == nil {
			break
		}
		if errors.Is(err, crypt.ErrAuth) && locked {
			err = e.sealedRepair(ctx, data[k*blockSize:][:blockSize], r.First+k)
		}
		if err != nil {
			return err
		}
		k++
	}
	return nil
}

// entriesPool holds the buffers a read's entries go into: a group's
// entries at most (crypt.GroupBlocks of them) once grown.
var entriesPool = sync.Pool{New: func() any { b := make([]byte, 0, 16*crypt.EntrySize); return &b }}

// readRun reads run r's ciphertext into data and its entries into
// entries. Unlocked, the entries come from the cache when their group is
// there, and a miss reads the group's whole metadata block (the same one
// request) and caches it. Locked (a read again after a block failed to
// open, or a write's merge), the group is dropped and the entries are read
// from the replicas: a stale cached entry is never trusted twice.
func (e *Engine) readRun(ctx context.Context, data, entries []byte, r crypt.Run, locked bool) error {
	c := &e.seal.entries
	if locked {
		c.drop(r.First)
		return parallel(2, func(j int) error {
			if j == 0 {
				return e.readPhys(ctx, data, crypt.DataOffset(r.First))
			}
			return e.readPhys(ctx, entries, crypt.EntryOffset(r.First))
		})
	}
	// Unlocked, the ciphertext is read without the replica's sums when
	// the replica is in process: GCM authenticates it against an entry
	// that was read checked (or written by this engine), and a block that
	// fails is read again locked, checked.
	if c.get(r.First, entries) {
		return e.readPhysFrom(ctx, data, crypt.DataOffset(r.First), true)
	}
	group := r.First / crypt.GroupBlocks
	meta := make([]byte, blockSize)
	err := parallel(2, func(j int) error {
		if j == 0 {
			return e.readPhysFrom(ctx, data, crypt.DataOffset(r.First), true)
		}
		// A group's metadata block is whole on the replicas even in the
		// volume's last, partial group: it comes before the group's data.
		return e.readPhys(ctx, meta, crypt.EntryOffset(group*crypt.GroupBlocks))
	})
	if err != nil {
		return err
	}
	c.put(group, meta)
	copy(entries, meta[r.First%crypt.GroupBlocks*crypt.EntrySize:])
	return nil
}

// sealedRepair serves logical block b, which failed authentication as
// read: it reads the block and its entry from every healthy replica, opens
// the first copy that authenticates into dst and rewrites the block and
// entry of the replicas whose copy does not. A block that authenticates
// nowhere fails the read with ErrIO and marks the volume's condition
// abnormal. It holds the replicas' ranges of the block and its entry, so
// no rebuild copy or write slips in between.
func (e *Engine) sealedRepair(ctx context.Context, dst []byte, b uint64) error {
	e.seal.entries.drop(b)
	err := e.sealedRepairLocked(ctx, dst, b)
	if errors.Is(err, errSealLost) {
		// Recorded with no lock held: it writes to the store.
		metricSealUnrecoverable.WithLabelValues(e.cfg.VolumeID).Inc()
		e.recordAbnormal(ctx, []uint64{b}, "fail authentication on every replica")
		return fmt.Errorf("volume %s: encrypted block %d fails authentication on every replica: %w", e.cfg.VolumeID, b, ErrIO)
	}
	return err
}

// errSealLost: no replica's copy of the block opens (sealedRepairLocked).
var errSealLost = errors.New("no copy opens")

// sealedRepairLocked is sealedRepair's work, under the replicas' range of
// the block and its entry and e.mu for reading.
func (e *Engine) sealedRepairLocked(ctx context.Context, dst []byte, b uint64) error {
	doff, eoff := crypt.DataOffset(b), crypt.EntryOffset(b)
	// The entry and the block as one hold, as a write pair holds them.
	unlock, err := e.locks.lockSpans(ctx, []span{{eoff, eoff + crypt.EntrySize}, {doff, doff + blockSize}})
	if err != nil {
		return err
	}
	defer unlock()
	e.mu.RLock()
	defer e.mu.RUnlock()
	if err := e.usable(); err != nil {
		return err
	}
	type copyOf struct {
		m           *member
		data, entry []byte
	}
	var good *copyOf
	var bad []*member
	scratch := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(scratch)
	for _, m := range e.healthyMembers() {
		c := &copyOf{m: m, data: make([]byte, blockSize), entry: make([]byte, crypt.EntrySize)}
		err := e.readFrom(ctx, m, e.epoch, c.data, doff)
		if err == nil {
			err = e.readFrom(ctx, m, e.epoch, c.entry, eoff)
		}
		if err == nil {
			err = e.seal.s.Open(dst, c.data, c.entry, *scratch, b)
		}
		switch {
		case err == nil && good == nil:
			good = c
		case err == nil:
		case errors.Is(err, crypt.ErrAuth) || errors.Is(err, replica.ErrChecksum):
			bad = append(bad, m)
		default:
			e.log.Warn("replica unreadable while repairing an encrypted block", zap.String("replica_id", m.replica.ID),
				zap.Uint64("block", b), zap.Uint64("epoch", e.epoch), zap.Error(err))
		}
	}
	if good == nil {
		return errSealLost
	}
	// dst may hold a failed copy's bytes: open the good one last.
	if err := e.seal.s.Open(dst, good.data, good.entry, *scratch, b); err != nil {
		return fmt.Errorf("volume %s: block %d: %w", e.cfg.VolumeID, b, err)
	}
	for _, m := range bad {
		wctx, cancel := context.WithTimeout(ctx, e.cfg.IOTimeout)
		err := e.writeCopy(wctx, m, good.data, doff)
		if err == nil {
			err = e.writeCopy(wctx, m, good.entry, eoff)
		}
		cancel()
		if err != nil {
			e.log.Warn("rewriting an encrypted block that failed authentication failed", zap.String("replica_id", m.replica.ID),
				zap.String("source", good.m.replica.ID), zap.Uint64("block", b), zap.Uint64("epoch", e.epoch), zap.Error(err))
			continue
		}
		e.dirty.Store(true)
		metricSealRepairs.WithLabelValues(e.cfg.VolumeID).Inc()
		e.log.Warn("encrypted block failed authentication; repaired from another replica", zap.String("replica_id", m.replica.ID),
			zap.String("source", good.m.replica.ID), zap.Uint64("block", b), zap.Uint64("epoch", e.epoch))
	}
	return nil
}

// scratchPool holds the buffers crypt.Sealer.Open wants (a block and its
// tag).
var scratchPool = sync.Pool{New: func() any { b := make([]byte, blockSize+16); return &b }}

// parallel runs f(0..n-1) at once, f(0) on the caller's goroutine, and
// returns their errors joined.
func parallel(n int, f func(int) error) error {
	if n == 1 {
		return f(0)
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 1; i < n; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = f(i) }()
	}
	errs[0] = f(0)
	wg.Wait()
	return errors.Join(errs...)
}
