package replica

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The dirty-bits file: where a write's "this extent may differ" mark goes.
//
// Before a write reaches the data file, the extents it touches must be
// marked dirty on disk (markDirty), so that after a crash the dirty union
// still names every extent that may differ between replicas. Rewriting the
// meta file for that (a new file, fsync, rename, fsync of the directory)
// costs several journal commits, and random writes after a clean point, or
// any sequential write, paid it every few writes: it bounded a 3-replica
// volume's write rate. The marks go instead into dirtyBitsFileName, a plain
// bitmap (bit i = extent i, as in the meta file) that is overwritten in
// place: pwrite of the bytes that changed, then fdatasync. An overwrite of
// blocks the file already has needs no journal commit.
//
// Why a torn write is safe: between two clean points bits are only ever
// set in this file, so whatever part of an interrupted write reached the
// disk, the file holds a superset of what it held before; the writes that
// waited for the marks had not been made (they wait for the fdatasync).
//
// The replica's dirty set on disk is the meta file's bitmap ∪ this file's.
// Whatever rewrites the meta file with a smaller set (MarkClean) rewrites
// this file after it; a crash in between leaves extra extents dirty, which
// costs a resync of them and loses nothing. A replica without the file (made
// before it existed, or never written since) has an empty one.
const dirtyBitsFileName = "dirty.bits"

// markAheadBytes is how far past a sequential write markDirty marks
// extents dirty in advance: at 4 MiB extents, a writer streaming at
// 500 MiB/s waits for one mark every 36 MiB rather than every 4 MiB.
const markAheadBytes = 32 << 20

// markAheadExtents is markAheadBytes in extents of extentSize, at least 1.
func markAheadExtents(extentSize uint64) uint64 {
	return max(1, markAheadBytes/extentSize)
}

// readDirtyBits ORs the dirty-bits file of the replica at dir into dirty,
// ignoring bits past extents (a file written before a failed grow's meta
// commit may name them; no write reached them).
func readDirtyBits(dir string, dirty bitmap, extents uint64) error {
	raw, err := os.ReadFile(filepath.Join(dir, dirtyBitsFileName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for i := range min(len(raw), len(dirty)) {
		dirty[i] |= raw[i]
	}
	if rest := extents % 8; rest != 0 && len(dirty) > 0 {
		dirty[len(dirty)-1] &= byte(1)<<rest - 1
	}
	return nil
}

// createDirtyBits makes the dirty-bits file, holding the bitmap full, and
// opens it for writing in place. It is written whole to a temporary file,
// synced, renamed, and the directory synced, so that the file, once it
// exists, has all its blocks and each later write is an overwrite. A file
// that exists already was opened with the replica (openExisting).
func createDirtyBits(dir string, full bitmap) (*os.File, error) {
	if err := writeFileAtomic(dir, dirtyBitsFileName, full); err != nil {
		return nil, err
	}
	return os.OpenFile(filepath.Join(dir, dirtyBitsFileName), os.O_RDWR, 0)
}

// pendingBytes is the range of bytes of want changed since they were last
// written to the dirty-bits file (or the meta file): [lo, hi), empty when
// lo == hi.
type pendingBytes struct{ lo, hi int }

func (p *pendingBytes) add(byteIndex int) {
	if p.lo == p.hi {
		p.lo, p.hi = byteIndex, byteIndex+1
		return
	}
	p.lo, p.hi = min(p.lo, byteIndex), max(p.hi, byteIndex+1)
}

func (p *pendingBytes) union(q pendingBytes) {
	if q.lo == q.hi {
		return
	}
	if p.lo == p.hi {
		*p = q
		return
	}
	p.lo, p.hi = min(p.lo, q.lo), max(p.hi, q.hi)
}

// persistDirty makes the marks in chunk (want's bytes from lo) durable in
// the dirty-bits file; full is want whole, for the file's first making.
// Called by the one persisting goroutine of markDirty, without r.mu.
func (r *Replica) persistDirty(lo int, chunk, full bitmap) error {
	if r.bits == nil {
		f, err := createDirtyBits(r.dir, full)
		if err != nil {
			return fmt.Errorf("create %s: %w", dirtyBitsFileName, err)
		}
		r.bits = f
	}
	r.marksWritten.Add(1)
	if _, err := r.bits.WriteAt(chunk, int64(lo)); err != nil {
		return fmt.Errorf("write %s: %w", dirtyBitsFileName, err)
	}
	if err := unix.Fdatasync(int(r.bits.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", dirtyBitsFileName, err)
	}
	return nil
}

// clearDirtyBits zeroes the dirty-bits file after the meta file recorded a
// clean point. Callers hold epochMu exclusively (no persist is in flight).
func (r *Replica) clearDirtyBits(n int) error {
	if r.bits == nil {
		return nil
	}
	if _, err := r.bits.WriteAt(make([]byte, n), 0); err != nil {
		return fmt.Errorf("clear %s: %w", dirtyBitsFileName, err)
	}
	if err := unix.Fdatasync(int(r.bits.Fd())); err != nil {
		return fmt.Errorf("sync %s: %w", dirtyBitsFileName, err)
	}
	return nil
}
