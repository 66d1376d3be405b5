package replica

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/internal/atomicfile"
	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/layer"
	"github.com/cairn-csi/cairn/replication/zfile"
)

// Layers: snapshots of a replica (docs/snapshots.md).
//
// A replica's data is a chain of layers (replication/layer): sealed,
// read-only layers and the writable head. The head's files are the
// replica's data, raw, sums and sumsMap fields, as for a replica without
// snapshots, so the write path is the same; the sealed layers' files are in
// below. A replica whose chain has one layer (every replica until its first
// snapshot) reads and writes exactly as before: layered() is false.
//
// With more than one layer:
//   - a read finds, per block, the newest layer that holds it (Spans) and
//     verifies it against that layer's sums;
//   - a write that covers a block in part is widened to whole blocks, the
//     rest read from the layers below (copy-up), so that the head's copy of
//     every block it holds is whole; after the data write the blocks are
//     marked held (MarkHeld);
//   - a trim or write-zeroes punches whole blocks in the head and marks
//     them held (they read as zeros, not as what lies below), and zeroes
//     the parts of blocks at its ends by writing;
//   - Flush and FUA sync the head's data before its map (layer.Chain.Sync).

// layerFiles are one layer's open files.
type layerFiles struct {
	data    dataFile
	sums    *os.File // nil without checksums
	sumsMap []byte   // sums mapped; nil if the mapping failed
}

// layerKinds are the files a replica keeps per layer besides the map.
var layerKinds = []string{dataFileName, zDataFileName, zMapFileName, sumsFileName}

func (r *Replica) headFiles() layerFiles {
	return layerFiles{data: r.data, sums: r.sums, sumsMap: r.sumsMap}
}

// layerFilesOf returns the files of layer i of the chain.
func (r *Replica) layerFilesOf(i int) layerFiles {
	if i == r.chain.Head() {
		return r.headFiles()
	}
	return r.below[i]
}

// layered reports whether the replica has snapshots: more than one layer.
func (r *Replica) layered() bool { return r.chain.Len() > 1 }

// openChain opens the chain of the replica at path and the files of its
// sealed layers. The head's files are opened by the caller, at the paths
// the chain gives.
func (r *Replica) openChain() error {
	c, err := layer.Open(r.dir, r.size, layer.Options{Kinds: layerKinds})
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	r.chain = c
	for i := range c.Len() - 1 {
		lf, err := r.openLayerFiles(i)
		if err != nil {
			return err
		}
		r.below = append(r.below, lf)
	}
	return nil
}

func (r *Replica) openLayerFiles(i int) (layerFiles, error) {
	f, err := openData(r.chain.Path(i, dataFileName))
	if err != nil {
		return layerFiles{}, fmt.Errorf("replica %s: %w: layer %d: %v", r.id, ErrCorrupt, i, err)
	}
	sums, m, err := r.openSumsFile(r.chain.Path(i, sumsFileName), false)
	if err != nil {
		_ = f.Close() // not written
		return layerFiles{}, err
	}
	return layerFiles{data: f, sums: sums, sumsMap: m}, nil
}

func (lf *layerFiles) close() error {
	var err error
	if lf.sumsMap != nil {
		err = unix.Munmap(lf.sumsMap)
		lf.sumsMap = nil
	}
	if lf.sums != nil {
		err = errors.Join(err, lf.sums.Close())
	}
	if lf.data != nil {
		err = errors.Join(err, lf.data.Close())
	}
	return err
}

// closeLayers closes the sealed layers' files and the chain. Callers hold
// epochMu exclusively.
func (r *Replica) closeLayers() error {
	var err error
	for i := range r.below {
		err = errors.Join(err, r.below[i].close())
	}
	r.below = nil
	if r.chain != nil {
		err = errors.Join(err, r.chain.Close())
	}
	return err
}

// syncHead makes the head's data durable and, with snapshots, then the
// head's map (see layer.Chain.Sync).
func (r *Replica) syncHead() error {
	if !r.layered() {
		return r.fdatasync()
	}
	if err := r.chain.Sync(r.fdatasync); err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	return nil
}

// widen returns the write of p at off as whole blocks: p itself if it is
// block-aligned (or the replica has no snapshots), else a buffer holding
// the blocks it touches as they read now with p copied over them (the
// copy-up). The caller writes the result at the returned offset, and
// returns the buffer with putBuf when done (nil: nothing to return).
func (r *Replica) widen(p []byte, off uint64) (w []byte, woff uint64, buf *[]byte, err error) {
	aoff, aend := BlockSpan(off, uint64(len(p)), r.size)
	if !r.layered() || aoff == off && aend == off+uint64(len(p)) {
		return p, off, nil, nil
	}
	buf = getBuf(int(aend - aoff))
	b := *buf
	end := off + uint64(len(p))
	for _, bo := range [...]uint64{aoff, (aend - 1) / SumBlockSize * SumBlockSize} {
		be := min(bo+SumBlockSize, aend)
		if off <= bo && end >= be {
			continue // the write covers this block whole
		}
		if err := r.readBlocks(b[bo-aoff:be-aoff], bo); err != nil {
			putBuf(buf)
			return nil, 0, nil, err
		}
	}
	copy(b[off-aoff:], p)
	return b, aoff, buf, nil
}

// markHeld records, with snapshots, that the head holds the blocks of
// [off, off+n) (written whole).
func (r *Replica) markHeld(off, n uint64) error {
	if !r.layered() {
		return nil
	}
	if err := r.chain.MarkHeld(off, n); err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	return nil
}

// punchLayered is punch for a replica with snapshots: the whole blocks of
// [off, off+length) are punched in the head and marked held (they must
// read as zeros, not as the layers below); the parts of blocks at the ends
// are written as zeros. Callers hold epochMu shared and have marked the
// extents dirty.
func (r *Replica) punchLayered(off, length uint64) error {
	end := off + length
	full0 := min(end, (off+SumBlockSize-1)/SumBlockSize*SumBlockSize)
	full1 := max(full0, end/SumBlockSize*SumBlockSize)
	if end == r.size {
		full1 = end
	}
	for _, edge := range [...][2]uint64{{off, full0}, {full1, end}} {
		if edge[0] < edge[1] {
			if err := r.writeData(zeroChunk[:edge[1]-edge[0]], edge[0], nil, false); err != nil {
				return err
			}
		}
	}
	if full0 >= full1 {
		return nil
	}
	err := punchData(r.data, full0, full1-full0)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		err = r.writeZeros(full0, full1-full0)
	}
	if err == nil && r.sums != nil {
		err = r.punchSums(full0, full1-full0)
	}
	if err != nil {
		return err
	}
	return r.markHeld(full0, full1-full0)
}

// isHoleLayered is isHole for a replica with snapshots: no layer that
// holds a part of the range has data there.
func (r *Replica) isHoleLayered(off, n uint64) bool {
	hole := true
	err := r.chain.Spans(off, n, func(i int, o, m uint64) error {
		if hole && !fileHole(r.layerFilesOf(i).data, o, m) {
			hole = false
		}
		return nil
	})
	return hole && err == nil // when in doubt, the caller reads the range
}

// Snapshot seals the replica's current contents as snapshot id: they stay
// readable (ReadSnapshotAt) while writes go on into a new head. It costs
// the same for any amount of data: no data is copied. The head's data and
// sums are made durable first. Writes in progress finish before it and
// none starts until it returns (epochMu exclusively); the engine stops
// writes across all replicas for a consistent cut.
func (r *Replica) Snapshot(epoch uint64, id string) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	// The sealed layer's sums are never rehashed, so they are synced too.
	syncData := func() error {
		if err := r.fdatasync(); err != nil {
			return err
		}
		return r.syncSums()
	}
	if err := r.chain.Seal(id, syncData, r.makeHeadFiles); err != nil {
		if errors.Is(err, layer.ErrReopen) {
			// Which chain is on disk is unknown: this replica stops, and
			// opening it again reads the chain that is.
			r.closed = true
			_ = r.closeFiles()
			return fmt.Errorf("replica %s: snapshot %s: %w (the replica is closed; open it again)", r.id, id, err)
		}
		if errors.Is(err, layer.ErrExists) {
			return fmt.Errorf("replica %s: snapshot %s: %w", r.id, id, ErrSnapshotExists)
		}
		if errors.Is(err, layer.ErrInvalid) || errors.Is(err, layer.ErrTooManyLayers) {
			return fmt.Errorf("replica %s: snapshot %s: %w: %v", r.id, id, ErrInvalidArgument, err)
		}
		return fmt.Errorf("replica %s: snapshot %s: %w", r.id, id, err)
	}
	// The old head's files become the sealed layer's; the new head's are
	// opened. If that fails the replica cannot go on (its chain on disk is
	// right; reopening it works).
	r.below = append(r.below, r.headFiles())
	r.dropHeadMap() // its file is the sealed layer's now
	r.data, r.sums, r.sumsMap = nil, nil, nil
	if err := r.openHead(); err != nil {
		r.closed = true
		_ = r.closeFiles()
		return fmt.Errorf("replica %s: snapshot %s taken, but the new head cannot be opened (reopen the replica): %w", r.id, id, err)
	}
	return nil
}

// makeHeadFiles creates the data file (and the sums file, if the replica
// keeps checksums) of a new head under stem, empty, durably.
func (r *Replica) makeHeadFiles(stem string) error {
	path := func(kind string) string { return filepath.Join(r.dir, stem+"."+kind) }
	if err := createData(path(dataFileName), r.size, isCompressed(r.data)); err != nil {
		return err
	}
	if r.sums != nil {
		return createSumsFileAt(path(sumsFileName), r.size)
	}
	return nil
}

// PrepareSnapshot makes the files of the next snapshot's new head ahead of
// it, while writes go on, so that Snapshot, which holds writes, only has
// to record them (layer.Chain.PrepareSpare). Optional: Snapshot makes them
// itself if they are not there.
func (r *Replica) PrepareSnapshot(epoch uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if err := r.chain.PrepareSpare(r.makeHeadFiles); err != nil {
		return fmt.Errorf("replica %s: prepare a snapshot: %w", r.id, err)
	}
	return nil
}

// openHead opens the head's data and sums files at the paths the chain
// gives, locks the data file against other openers and checks its size.
func (r *Replica) openHead() error {
	f, err := openData(r.chain.Path(r.chain.Head(), dataFileName))
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("replica %s: %w: data file missing in %s", r.id, ErrCorrupt, r.dir)
	}
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	r.data = f
	if err := r.checkDataFile(); err != nil {
		_ = f.Close() // opened read-write but never written
		r.data = nil
		return err
	}
	if err := r.openSums(); err != nil {
		_ = f.Close()
		r.data = nil
		return err
	}
	return nil
}

// Snapshots returns the ids of the replica's snapshots, oldest first.
func (r *Replica) Snapshots() []string {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	var ids []string
	for _, e := range r.chain.Entries() {
		if e.ID != "" && !e.Deleting {
			ids = append(ids, e.ID)
		}
	}
	return ids
}

// SnapshotUsage is the space one snapshot of a replica takes.
type SnapshotUsage struct {
	ID string
	// HeldBytes is what the snapshot's layer holds: the blocks written
	// between the snapshot before it and this one (for the oldest, the
	// whole volume as it was, holes included).
	HeldBytes uint64
	// FreedByDelete is what deleting the snapshot would free: those of its
	// blocks that were written again since (the rest moves up).
	FreedByDelete uint64
}

// SnapshotUsage returns the space each snapshot takes, oldest first. It
// reads the layers' maps whole (a bit per 4 KiB block of the volume).
func (r *Replica) SnapshotUsage() ([]SnapshotUsage, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if r.closed {
		return nil, fmt.Errorf("replica %s: %w", r.id, ErrClosed)
	}
	var out []SnapshotUsage
	for i, e := range r.chain.Entries() {
		if e.ID == "" || e.Deleting {
			continue
		}
		u, err := r.chain.Usage(i)
		if err != nil {
			return nil, fmt.Errorf("replica %s: %w", r.id, err)
		}
		out = append(out, SnapshotUsage{ID: e.ID, HeldBytes: u.Held * layer.BlockSize, FreedByDelete: u.Shadowed * layer.BlockSize})
	}
	return out, nil
}

// ReadSnapshotAt fills p from off as snapshot id holds it, verified when
// the replica keeps checksums. An unknown id → ErrNotFound.
func (r *Replica) ReadSnapshotAt(epoch uint64, id string, p []byte, off uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if err := r.checkRange(off, uint64(len(p))); err != nil {
		return err
	}
	k, err := r.snapshotLayer(id)
	if err != nil {
		return err
	}
	aoff, aend := BlockSpan(off, uint64(len(p)), r.size)
	buf := getBuf(int(aend - aoff))
	defer putBuf(buf)
	err = r.chain.SpansIn(k, aoff, aend-aoff, func(i int, o, m uint64) error {
		lf, dst := r.layerFilesOf(i), (*buf)[o-aoff:o-aoff+m]
		if lf.sums != nil {
			return r.readCheckedIn(lf, dst, o)
		}
		return r.readFile(lf.data, dst, o)
	})
	if err != nil {
		return err
	}
	copy(p, (*buf)[off-aoff:])
	return nil
}

// snapshotLayer returns the position of snapshot id's layer; a snapshot
// being deleted is no snapshot any more (ErrNotFound). Callers hold
// epochMu.
func (r *Replica) snapshotLayer(id string) (int, error) {
	k, err := r.chain.Find(id)
	if err != nil || r.chain.Entries()[k].Deleting {
		return 0, fmt.Errorf("replica %s: snapshot %s: %w", r.id, id, ErrNotFound)
	}
	return k, nil
}

// mergeStep is how much of the volume DeleteSnapshot moves at a time: the
// bound on the extra space a deletion holds, and, when the layer's child is
// the head, on how long writes wait for it. Each step ends with two
// fdatasyncs, a large part of a deletion's time: 1 MiB steps took 4.6 s
// for a 1 GiB snapshot with 10 % unique data, 4 MiB steps (the default
// extent) 2.9 s (BenchmarkDeleteSnapshot).
const mergeStep = 4 << 20

// DeleteSnapshot removes snapshot id: the blocks its layer alone holds move
// into the next layer up (whose contents stay the same), and its files are
// removed. The cost is proportional to those blocks, not to the volume,
// and its space comes back as it goes. progress, if set, is called after
// each step with the bytes of the volume gone through and the total.
//
// The deletion is first recorded in the chain (layer.Chain.MarkDeleting):
// from then on the snapshot is gone for readers and restores, whatever
// happens to the merge, and a new DeleteSnapshot after a crash finishes
// the work; the volume and the other snapshots read the same at every
// point. A layer whose child is shared with another replica →
// ErrInvalidArgument naming the sharing (the snapshot must stay).
// Deletions of one replica run one at a time, each step of it through the
// disk scheduler's rebuild class (background I/O).
func (r *Replica) DeleteSnapshot(epoch uint64, id string, progress func(done, total uint64)) error {
	r.mergeMu.Lock()
	defer r.mergeMu.Unlock()
	if err := r.prepareDelete(epoch, id); err != nil {
		return err
	}
	step := uint64(mergeStep / layer.Granule)
	total := r.chain.Granules()
	for g := uint64(0); g < total; g += step {
		// Each step waits for the disk scheduler's rebuild class, as
		// background work: it yields to foreground I/O. The wait ends
		// with an error only if the server or the volume goes away.
		t, err := r.admit(context.Background(), OpWrite, mergeStep, iosched.Rebuild)
		if err != nil {
			return fmt.Errorf("replica %s: delete snapshot %s: %w", r.id, id, err)
		}
		err = r.mergeStep(epoch, id, g, g+step)
		t.Done()
		if err != nil {
			return err
		}
		if progress != nil {
			progress(min(g+step, total)*layer.Granule, total*layer.Granule)
		}
	}
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	k, err := r.findLayer(epoch, id)
	if err != nil {
		return err
	}
	gone := r.below[k]
	r.forgetSumsFrom(k)
	if err := r.chain.FinishMerge(k); err != nil {
		return fmt.Errorf("replica %s: delete snapshot %s: %w", r.id, id, err)
	}
	r.below = append(r.below[:k:k], r.below[k+1:]...)
	_ = gone.close() // its files are gone from the chain; closing cannot matter
	return nil
}

// findLayer checks the epoch and returns the position of snapshot id's
// layer, deleting or not. Callers hold epochMu.
func (r *Replica) findLayer(epoch uint64, id string) (int, error) {
	if err := r.checkEpoch(epoch); err != nil {
		return 0, err
	}
	k, err := r.chain.Find(id)
	if err != nil {
		return 0, fmt.Errorf("replica %s: snapshot %s: %w", r.id, id, ErrNotFound)
	}
	return k, nil
}

// prepareDelete, with the replica to itself: records the deletion, maps
// the child's map writable, and makes the child's files as long as the
// volume (a layer sealed before the volume grew is shorter; the merge
// writes up to the volume's end).
func (r *Replica) prepareDelete(epoch uint64, id string) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	k, err := r.findLayer(epoch, id)
	if err != nil {
		return err
	}
	if err := r.chain.PrepareMerge(k); err != nil {
		if errors.Is(err, layer.ErrShared) {
			return fmt.Errorf("replica %s: delete snapshot %s: %w: %v", r.id, id, ErrInvalidArgument, err)
		}
		return fmt.Errorf("replica %s: delete snapshot %s: %w", r.id, id, err)
	}
	if err := r.chain.MarkDeleting(k); err != nil {
		return fmt.Errorf("replica %s: delete snapshot %s: %w", r.id, id, err)
	}
	// The layer above holds, for a rebuild, what it will once merged:
	// its cached sums are those of its own blocks only (carry.go).
	r.forgetSumsFrom(k)
	if k+1 == r.chain.Head() {
		return nil
	}
	child := &r.below[k+1]
	if have, err := dataSize(child.data); err != nil || have < r.size {
		if err == nil {
			err = extendFile(child.data, r.size)
		}
		if err != nil {
			return fmt.Errorf("replica %s: delete snapshot %s: extend the next layer's data: %w", r.id, id, err)
		}
	}
	if child.sums != nil && uint64(len(child.sumsMap)) < 4*sumBlocks(r.size) {
		if err := extendFile(child.sums, 4*sumBlocks(r.size)); err != nil {
			return fmt.Errorf("replica %s: delete snapshot %s: extend the next layer's sums: %w", r.id, id, err)
		}
		m, err := unix.Mmap(int(child.sums.Fd()), 0, int(4*sumBlocks(r.size)), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			m = nil // pread and pwrite then
		}
		if child.sumsMap != nil {
			_ = unix.Munmap(child.sumsMap) // only fails on a bad address
		}
		child.sumsMap = m
	}
	return nil
}

// mergeStep moves the blocks of granules [g0, g1) of snapshot id's layer
// into its child. If the child is the head, it runs with the replica to
// itself and syncs the head first (a block written there but not synced
// must not count as holding its older copy: a crash would forget it).
// Otherwise writes go on meanwhile (they go to the head), and readers of
// the child see a block's bit only once its data there was synced.
func (r *Replica) mergeStep(epoch uint64, id string, g0, g1 uint64) error {
	r.epochMu.RLock()
	k, err := r.findLayer(epoch, id)
	childIsHead := err == nil && k+1 == r.chain.Head()
	locked := false
	if err == nil && childIsHead {
		// Seals (the only other change to the chain while mergeMu is
		// held) only move the head away, so the position holds.
		r.epochMu.RUnlock()
		r.epochMu.Lock()
		locked = true
		k, err = r.findLayer(epoch, id)
		childIsHead = err == nil && k+1 == r.chain.Head()
	}
	unlock := r.epochMu.RUnlock
	if locked {
		unlock = r.epochMu.Unlock
	}
	if err != nil {
		unlock()
		return err
	}
	if childIsHead {
		if err := r.syncHead(); err != nil {
			unlock()
			return err
		}
	}
	from, to := r.layerFilesOf(k), r.layerFilesOf(k+1)
	move := func(off, n uint64) error { return r.moveBlocks(from, to, off, n) }
	sync := func() error {
		if err := syncData(to.data); err != nil {
			return err
		}
		if to.sums != nil {
			return unix.Fdatasync(int(to.sums.Fd()))
		}
		return nil
	}
	_, err = r.chain.MergeRange(k, g0, g1, move, sync)
	unlock()
	if err != nil {
		return fmt.Errorf("replica %s: delete snapshot %s: %w", r.id, id, err)
	}
	return r.freeMerged(epoch, id, g0, g1)
}

// freeMerged punches the range [g0, g1) that a merge step finished out of
// the deleted layer's data: its child now holds, or shadows, every block
// of it, so nobody in this chain needs it, and freeing it step by step
// bounds the extra space of a deletion to a step. It takes the replica to
// itself: a reader or a copy-up that resolved a block to this layer before
// the child's bit was set must finish its read first. Not if another
// replica shares the layer.
func (r *Replica) freeMerged(epoch uint64, id string, g0, g1 uint64) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	k, err := r.findLayer(epoch, id)
	if err != nil {
		return err
	}
	if shared, err := r.chain.Shared(k); err != nil || shared {
		return err
	}
	off := g0 * layer.Granule
	if off >= r.size {
		return nil
	}
	n := min(g1*layer.Granule, r.size) - off
	err = punchData(r.below[k].data, off, n)
	if err != nil && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("replica %s: delete snapshot %s: free its data: %w", r.id, id, err)
	}
	return nil
}

// moveBlocks makes [off, off+n) (whole blocks) of layer to hold what it
// holds in layer from: the data (moveData: cloned or copied in the kernel
// where the file system can; verified on the way when the replica keeps
// checksums), and its sums. A hole in from is punched in to.
func (r *Replica) moveBlocks(from, to layerFiles, off, n uint64) error {
	for n > 0 {
		m := min(n, writeChunk)
		if fileHole(from.data, off, m) {
			if err := punchData(to.data, off, m); err != nil {
				return err
			}
			if to.sums != nil {
				if err := r.copySums(from, to, off, m); err != nil {
					return err
				}
			}
		} else {
			var chunk [writeChunk]byte
			if err := r.moveData(from, to, chunk[:m], off); err != nil {
				return err
			}
			if to.sums != nil {
				if err := r.copySums(from, to, off, m); err != nil {
					return err
				}
			}
		}
		off, n = off+m, n-m
	}
	return nil
}

// copySums copies the stored sums of the blocks of [off, off+n) from one
// layer's sums file to another's.
func (r *Replica) copySums(from, to layerFiles, off, n uint64) error {
	vs := make([]uint32, (n+SumBlockSize-1)/SumBlockSize)
	if err := r.readSumsIn(from, vs, off/SumBlockSize); err != nil {
		return err
	}
	return r.writeSumsIn(to, vs, off/SumBlockSize)
}

// createSized creates the file path, sparse, of size bytes, durably.
func createSized(path string, size uint64) error { return atomicfile.CreateSized(path, int64(size)) }

// CreateFromSnapshot creates replica id under dir holding what snapshot
// snapID of src holds, in a volume of size bytes (0: src's size; never
// less). The new replica's sealed layers are src's up to the snapshot's,
// shared by hard links, so dir must be on src's file system; its head is
// new and empty. It costs the same for any amount of data, and the data is
// readable at once. A layer with more than one link is never changed
// (writes go to each replica's own head; a merge refuses to change a
// shared layer), so the link count is the layer's reference count and the
// last replica to drop it frees it.
//
// The new replica has its own generation, the source's extent size and
// checksum choice, and no dirty extents. As for a new replica, it is built
// in a hidden directory and renamed into place.
func CreateFromSnapshot(dir, id string, src *Replica, snapID string, size uint64) error {
	if err := validateID(id); err != nil {
		return err
	}
	// No recompression step runs on src's layers while they are linked,
	// and a pass that began before stops at its next step (datafile.go).
	src.linkMu.Lock()
	defer src.linkMu.Unlock()
	src.links++
	src.epochMu.RLock() // the chain stays as it is while its files are linked
	defer src.epochMu.RUnlock()
	if src.closed {
		return fmt.Errorf("replica %s: %w", src.id, ErrClosed)
	}
	if size == 0 {
		size = src.size
	}
	if size < src.size {
		return fmt.Errorf("replica %s: %w: a restore of %d bytes from a snapshot of %d", id, ErrInvalidArgument, size, src.size)
	}
	if err := validateGeometry(size, src.extentSize); err != nil {
		return fmt.Errorf("replica %s: %w", id, err)
	}
	k, err := src.snapshotLayer(snapID)
	if err != nil {
		return err
	}
	// A compressed layer's extents recompressed since its last sync are
	// committed first: the new replica reads the map on disk, and its
	// open punches the slots the map does not name, on the shared files.
	for i := range k + 1 {
		if z, ok := src.layerFilesOf(i).data.(*zfile.File); ok {
			if err := z.Sync(); err != nil {
				return fmt.Errorf("replica %s: sync layer %d of %s before sharing it: %w", id, i, src.id, err)
			}
		}
	}
	err = buildHidden(dir, id, func(tmp string) error {
		return fillFromSnapshot(tmp, id, src, k, size)
	})
	if errors.Is(err, errLostRace) {
		return fmt.Errorf("replica %s: %w", id, ErrExists)
	}
	return err
}

// fillFromSnapshot makes tmp the directory of replica id restored from
// layer k of src (see CreateFromSnapshot).
func fillFromSnapshot(tmp, id string, src *Replica, k int, size uint64) error {
	var sealed []layer.Entry
	for i, e := range src.chain.Entries()[:k+1] {
		stem := e.Stem
		if stem == "" {
			stem = layer.NewStem() // the source's first files, "data" and "sums"
		}
		for _, kind := range append([]string{"map"}, layerKinds...) {
			err := os.Link(src.chain.Path(i, kind), filepath.Join(tmp, stem+"."+kind))
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("replica %s: share layer %s of %s: %w", id, e.ID, src.id, err)
			}
		}
		sealed = append(sealed, layer.Entry{ID: e.ID, Stem: stem})
	}
	head := layer.NewStem()
	if err := createData(filepath.Join(tmp, head+"."+dataFileName), size, isCompressed(src.data)); err != nil {
		return err
	}
	if src.sums != nil {
		if err := createSumsFileAt(filepath.Join(tmp, head+"."+sumsFileName), size); err != nil {
			return err
		}
	}
	if err := layer.Assemble(tmp, sealed, head, size); err != nil {
		return fmt.Errorf("replica %s: %w", id, err)
	}
	m := metaState{ID: id, Generation: newGeneration(), Size: size, ExtentSize: src.extentSize,
		Dirty: make(bitmap, bitmapLen(extentCount(size, src.extentSize)))}
	return writeFileAtomic(tmp, metaFileName, encodeMeta(&m))
}
