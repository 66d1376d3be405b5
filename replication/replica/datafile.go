package replica

import (
	"context"
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/replication/zfile"
)

// A layer's data is kept in one of two ways (docs/compression.md):
//
//   - a plain sparse file (*os.File) at the volume's offsets: the default;
//   - a zfile (*zfile.File), which keeps each 64 KiB extent LZ4-compressed
//     where that saves a block, for a volume with compression lz4. Its
//     three files are the layer's "data", "data.z" and "data.zmap".
//
// A replica is compressed when its head is a zfile; every layer it makes
// (snapshot heads, flattened and rebuilt layers, a restore's head) is made
// the same way, and a layer is opened as a zfile when its map is there, so
// the meta file needs no field for it. The helpers below are the only
// places that tell the two apart; the paths that need a descriptor (an
// mmap of the head, FICLONERANGE and copy_file_range, sync_file_range)
// are taken for plain files only.

// dataFile is a layer's data.
type dataFile interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Name() string
	Close() error
}

// Layer file kinds of a compressed layer besides dataFileName.
const (
	zDataFileName = dataFileName + ".z"
	zMapFileName  = dataFileName + ".zmap"
)

// plainFile is f's *os.File, or nil for a zfile.
func plainFile(f dataFile) *os.File {
	pf, _ := f.(*os.File)
	return pf
}

// isCompressed reports whether f is a zfile.
func isCompressed(f dataFile) bool {
	_, ok := f.(*zfile.File)
	return ok
}

// createData creates the data file of a layer at path, sparse, of size
// bytes, durably: compressed, or plain.
func createData(path string, size uint64, compressed bool) error {
	if !compressed {
		return createSized(path, size)
	}
	f, err := zfile.Create(path, size)
	if err != nil {
		return err
	}
	return f.Close()
}

// openData opens the data file of a layer at path: as a zfile when its
// map is there.
func openData(path string) (dataFile, error) {
	if zfile.Exists(path) {
		f, err := zfile.Open(path)
		if err != nil {
			return nil, err
		}
		return f, nil
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return f, nil
}

// syncData makes every write to f durable (fdatasync; a zfile's Sync).
func syncData(f dataFile) error {
	if z, ok := f.(*zfile.File); ok {
		return z.Sync()
	}
	return unix.Fdatasync(int(plainFile(f).Fd()))
}

// dataSize is f's length.
func dataSize(f dataFile) (uint64, error) {
	if z, ok := f.(*zfile.File); ok {
		return z.Size(), nil
	}
	st, err := plainFile(f).Stat()
	if err != nil {
		return 0, err
	}
	if !st.Mode().IsRegular() {
		return 0, errors.New("not a regular file")
	}
	return uint64(st.Size()), nil
}

// fileHole reports whether [off, off+n) of f holds no data (SEEK_DATA finds
// none). When the file system cannot tell, it answers false.
func fileHole(f dataFile, off, n uint64) bool {
	if z, ok := f.(*zfile.File); ok {
		hole, err := z.Hole(off, n)
		return err == nil && hole
	}
	next, err := plainFile(f).Seek(int64(off), unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true // no data from off to the end of the file
	}
	return err == nil && uint64(next) >= off+n
}

// punchData makes [off, off+n) of f a hole. A plain file on a file system
// that cannot punch → EOPNOTSUPP or ENOSYS (punchFile writes zeros then).
func punchData(f dataFile, off, n uint64) error {
	if z, ok := f.(*zfile.File); ok {
		return z.Punch(off, n)
	}
	return unix.Fallocate(int(plainFile(f).Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// punchFile makes [off, off+n) of f a hole (zeros where the file system
// cannot punch).
func punchFile(f dataFile, off, n uint64) error {
	err := punchData(f, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		for n > 0 {
			m := min(n, writeChunk)
			if _, err := f.WriteAt(zeroChunk[:m], int64(off)); err != nil {
				return err
			}
			off, n = off+m, n-m
		}
		return nil
	}
	return err
}

// allocatedBytes is the disk space f occupies.
func allocatedBytes(f dataFile) uint64 {
	_, physical := dataBytes(f)
	return physical
}

// dataBytes is what f holds before compression (an extent stored
// compressed counts whole, zfile.Stats) and what it takes on disk; the
// same for a plain file. Zeros when they cannot be read.
func dataBytes(f dataFile) (logical, physical uint64) {
	if z, ok := f.(*zfile.File); ok {
		st, err := z.Stats()
		if err != nil {
			return 0, 0
		}
		return st.LogicalBytes, st.PhysicalBytes
	}
	st, err := plainFile(f).Stat()
	if err != nil {
		return 0, 0
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		return uint64(sys.Blocks) * 512, uint64(sys.Blocks) * 512
	}
	return 0, 0
}

// extendFile sets f's length to n bytes (more than now) and makes the new
// length durable: fsync, not fdatasync, which may leave a size change out.
func extendFile(f dataFile, n uint64) error {
	if z, ok := f.(*zfile.File); ok {
		return z.Grow(n)
	}
	return truncateDurably(plainFile(f), n)
}

// truncateDurably sets f's length to n and makes it durable (fsync: a
// size change needs it).
func truncateDurably(f *os.File, n uint64) error {
	if err := f.Truncate(int64(n)); err != nil {
		return err
	}
	return f.Sync()
}

// trimInterruptedGrow cuts f back to want bytes when it is longer: the
// leftover of a grow that crashed before its meta file named the new size
// (see the top of grow.go). Nothing was ever written past want. A file
// shorter than want is not a grow's leftover; the caller reports it.
func trimInterruptedGrow(f dataFile, have, want uint64) error {
	if have <= want {
		return nil
	}
	if z, ok := f.(*zfile.File); ok {
		return z.Trim(want)
	}
	return truncateDurably(plainFile(f), want)
}

// lockFile is the file whose descriptor stands for f in an flock.
func lockFile(f dataFile) *os.File {
	if z, ok := f.(*zfile.File); ok {
		return z.Raw()
	}
	return plainFile(f)
}

// Compressed reports whether the replica keeps its data compressed
// (CreateOptions.Compression).
func (r *Replica) Compressed() bool {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	return !r.closed && isCompressed(r.data)
}

// LogicalBytes is the data the replica's layers hold before compression
// (an extent stored compressed counts whole, zfile.Stats); for a plain
// replica, what its data files take (Info's AllocatedBytes). 0 for a
// closed replica.
func (r *Replica) LogicalBytes() uint64 {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if r.closed {
		return 0
	}
	n := logicalBytes(r.data)
	for _, lf := range r.below {
		n += logicalBytes(lf.data)
	}
	return n
}

func logicalBytes(f dataFile) uint64 {
	logical, _ := dataBytes(f)
	return logical
}

// RecompressStepBytes is what one step of Recompress reads (an extent).
const RecompressStepBytes = zfile.ExtentSize

// RecompressStats is what a Recompress pass did.
type RecompressStats struct {
	// Extents were stored compressed again; Bytes is their size before
	// compression.
	Extents, Bytes uint64
}

// Recompress stores compressed again the extents of the replica's
// compressed layers that small writes left raw (zfile.Recompress), layer
// by layer, the head last, syncing each layer before, every
// recompressSyncEvery extents and at its end. Their content does not
// change, so reads and writes go on meanwhile. A sealed layer that another
// replica shares by hard link (a restore's) is left alone: that replica
// keeps its own view of the files; a restore that links one while the
// pass runs stops the pass (CreateFromSnapshot). admit, if set, is called
// before each extent (the node's background I/O class) and returns what to
// call after it; its error stops the pass. A plain replica has nothing to
// do.
func (r *Replica) Recompress(ctx context.Context, admit func(ctx context.Context) (func(), error)) (RecompressStats, error) {
	var st RecompressStats
	r.linkMu.RLock()
	r.epochMu.RLock()
	if r.closed {
		r.epochMu.RUnlock()
		r.linkMu.RUnlock()
		return st, fmt.Errorf("replica %s: %w", r.id, ErrClosed)
	}
	links := r.links
	var layers []*zfile.File
	for k, lf := range r.below {
		if z, ok := lf.data.(*zfile.File); ok {
			if shared, err := r.chain.Shared(k); err == nil && !shared {
				layers = append(layers, z)
			}
		}
	}
	if z, ok := r.data.(*zfile.File); ok {
		layers = append(layers, z)
	}
	r.epochMu.RUnlock()
	r.linkMu.RUnlock()
	for _, z := range layers {
		// First the changes since the last flush: an extent that a
		// small write made raw is offered once the map on disk no longer
		// names its compressed slot.
		if err := r.syncLayer(z); err != nil {
			return st, err
		}
		unsynced := 0
		for e, more := uint64(0), true; more; {
			if err := ctx.Err(); err != nil {
				return st, err
			}
			done := func() {}
			if admit != nil {
				d, err := admit(ctx)
				if err != nil {
					return st, err
				}
				done = d
			}
			var did, stop bool
			var err error
			e, did, more, stop, err = r.recompressStep(z, e, links)
			done()
			if err != nil {
				return st, fmt.Errorf("replica %s: recompress extent %d: %w", r.id, e, err)
			}
			if stop {
				return st, nil // a restore shares a layer now: the next pass looks again
			}
			if did {
				st.Extents++
				st.Bytes += zfile.ExtentSize
				unsynced++
			}
			// Until its Sync an extent takes both slots, and counts
			// twice in zfile.Stats: bounded.
			if unsynced >= recompressSyncEvery || !more && unsynced > 0 {
				if err := r.syncLayer(z); err != nil {
					return st, err
				}
				unsynced = 0
			}
		}
	}
	return st, nil
}

// recompressSyncEvery is how many extents (64 MiB) Recompress stores
// compressed in a layer between syncs.
const recompressSyncEvery = 1024

// recompressStep recompresses the first extent at or after e that z
// offers (zfile.NextRaw), under the replica's locks: epochMu shared keeps
// z from being closed, linkMu shared keeps a restore from linking its
// files meanwhile. It returns the extent to go on from; more is false
// when z has no more, or is no longer one of the replica's layers (merged
// away, the replica closed); stop is set when a restore linked layers
// since the pass began (links) and z is not the head.
func (r *Replica) recompressStep(z *zfile.File, e, links uint64) (next uint64, did, more, stop bool, err error) {
	r.linkMu.RLock()
	defer r.linkMu.RUnlock()
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if !r.holds(z) {
		return e, false, false, false, nil
	}
	if r.links != links && r.data != dataFile(z) {
		return e, false, false, true, nil
	}
	e, ok := z.NextRaw(e)
	if !ok {
		return e, false, false, false, nil
	}
	did, err = z.Recompress(e)
	return e + 1, did, true, false, err
}

// syncLayer makes z's recompressed extents durable, if z is still one of
// the replica's layers.
func (r *Replica) syncLayer(z *zfile.File) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if !r.holds(z) {
		return nil
	}
	if err := z.Sync(); err != nil {
		return fmt.Errorf("replica %s: sync a recompressed layer: %w", r.id, err)
	}
	return nil
}

// holds reports whether z is the data of one of the replica's layers now.
// epochMu is held.
func (r *Replica) holds(z *zfile.File) bool {
	if r.closed {
		return false
	}
	if r.data == dataFile(z) {
		return true
	}
	for _, lf := range r.below {
		if lf.data == dataFile(z) {
			return true
		}
	}
	return false
}
