package replica

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Growing a replica (online volume expansion, docs/expansion.md).
//
// A grow makes the data file, the sums file and the dirty-extent bitmap
// cover a larger size. It runs with epochMu held exclusively: no read,
// write or checksum scan is in flight, so the sums mapping can be replaced
// and size, extents and the bitmaps changed without any reader seeing them
// half-done.
//
// Steps, each durable before the next:
//
//  1. the data file is extended (ftruncate; the new range is a hole, which
//     reads as zeros) and fsynced, so that its new length is on disk;
//  2. the sums file likewise (a hole in it means "zero block", which is
//     what the new range holds);
//  3. the meta file is rewritten atomically with the new size and a bitmap
//     for the new extent count. This is the commit point.
//
// A crash before step 3 leaves a meta file naming the old size beside data
// and sums files that may be longer. Nothing can have been written past the
// old end (every request is checked against the size in memory, which moves
// only after step 3), so openExisting cuts the files back to the size the
// meta file names, and the replica opens at its old size. A crash after
// step 3 leaves files at least as long as the new size, which is exactly
// what opens. Either way a retried grow finishes the job: the size only
// ever moves to one that the volume store recorded first, and the store
// keeps asking for it (engine claim, the node's realizer).
//
// The old last sum block, if the old size was not a multiple of
// SumBlockSize, stays right: its stored sum counts the missing tail as
// zeros, and the extension fills that tail with zeros.

// growStep numbers the durable steps of a grow for the crash tests, which
// stop a grow after a given step (see growHook).
type growStep int

const (
	growStepData growStep = iota + 1
	growStepSums
	growStepMeta
)

// growHook, when set (tests only), runs after each step of a grow; an error
// stops the grow there, as a crash would.
var growHook func(growStep) error

// Grow makes the replica size bytes long, durably. A size the replica has
// already reached (or passed) is a success that changes nothing, so a
// retried grow is harmless; replicas never shrink. The epoch is checked as
// for any change. Grow waits for every operation in progress, like Claim.
func (r *Replica) Grow(epoch, size uint64) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	return r.growLocked(size)
}

// GrowTo is Grow without the epoch check, for the node's realizer: it grows
// a replica that no engine serves to a size the volume store has recorded.
// Fencing keeps an older engine from changing data; a grow changes none
// (the new range reads as zeros) and only ever moves towards the store's
// size, so it needs no epoch.
func (r *Replica) GrowTo(size uint64) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if r.closed {
		return fmt.Errorf("replica %s: %w", r.id, ErrClosed)
	}
	return r.growLocked(size)
}

// growLocked grows the replica to size. Callers hold epochMu exclusively.
func (r *Replica) growLocked(size uint64) error {
	if size <= r.size {
		return nil
	}
	if err := validateGeometry(size, r.extentSize); err != nil {
		return fmt.Errorf("replica %s: grow to %d: %w", r.id, size, err)
	}
	r.dropHeadMap() // made for the old size; the next small write maps again
	if err := extendFile(r.data, size); err != nil {
		return fmt.Errorf("replica %s: grow data file to %d bytes: %w", r.id, size, err)
	}
	if err := runGrowHook(growStepData); err != nil {
		return err
	}
	if r.sums != nil {
		if err := extendFile(r.sums, 4*sumBlocks(size)); err != nil {
			return fmt.Errorf("replica %s: grow sums file for %d bytes: %w", r.id, size, err)
		}
		if err := runGrowHook(growStepSums); err != nil {
			return err
		}
	}
	// The head's layer map and the index cover the new size before it is
	// committed; sealed layers keep their length and read as zeros past it
	// (readFile). A crash here leaves a longer head map, which opening
	// cuts back (layer.Open).
	if err := r.chain.Grow(size); err != nil {
		return fmt.Errorf("replica %s: grow the layer map to %d bytes: %w", r.id, size, err)
	}
	extents := extentCount(size, r.extentSize)
	m := r.snapshotMeta()
	m.Size = size
	m.Dirty = m.Dirty.grow(extents)
	if err := r.writeMeta(&m); err != nil {
		return fmt.Errorf("replica %s: record size %d in the meta file: %w", r.id, size, err)
	}
	if err := runGrowHook(growStepMeta); err != nil {
		return err
	}
	r.size, r.extents = size, extents
	// The last extent of the old size is longer now, in every layer: its
	// cached layer sums are wrong (carry.go). A grow is rare; all go.
	r.layerSums.drop(nil)
	r.mu.Lock()
	r.want = r.want.grow(extents)
	r.mu.Unlock()
	r.setDurable(m.Dirty) // what the meta file now holds: want, widened
	if r.sums != nil {
		r.remapSums()
	}
	return nil
}

func runGrowHook(s growStep) error {
	if growHook == nil {
		return nil
	}
	return growHook(s)
}

// remapSums replaces the sums mapping by one of the file's current length.
// Callers hold epochMu exclusively: nothing reads or writes the old mapping.
// A failed mapping is no error: readSums and writeSums then use pread and
// pwrite, as when openSums could not map.
func (r *Replica) remapSums() {
	if r.sumsMap != nil {
		_ = unix.Munmap(r.sumsMap) // only fails on a bad address
		r.sumsMap = nil
	}
	if m, err := unix.Mmap(int(r.sums.Fd()), 0, int(4*sumBlocks(r.size)), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
		r.sumsMap = m
	}
}

// grow returns b widened to hold extents bits; the new bits are clear.
func (b bitmap) grow(extents uint64) bitmap {
	n := bitmapLen(extents)
	if uint64(len(b)) >= n {
		return b
	}
	return append(b, make(bitmap, n-uint64(len(b)))...)
}
