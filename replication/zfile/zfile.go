// Package zfile keeps a sparse file's data compressed with LZ4, extent by
// extent, with the crash rules of a plain file (docs/compression.md): the
// store under a replica layer's data of a volume with compression lz4.
//
// Three files, all at the volume's offsets:
//
//   - NAME, the raw slots: a plain sparse image, as an uncompressed
//     layer's data file is;
//   - NAME.z, the compressed slots: an extent stored compressed has its LZ4
//     block at the start of its 64 KiB slot, the rest of the slot a hole;
//   - NAME.zmap, 4 bytes per extent: the length of its compressed block,
//     0 (or a hole) for an extent stored raw.
//
// So a compressed extent takes the blocks its LZ4 block needs, and an
// extent that does not compress by at least one block is stored raw: it
// costs no space and one compression attempt.
//
// Crash rules. The map on disk names, for every extent, the slot that holds
// its data as of the last Sync. A write never changes that slot when the
// change would tear more than the blocks it writes:
//
//   - a write into an extent stored raw (on disk and in memory) writes the
//     raw slot in place, as a plain file: a crash leaves each block it
//     covers old or new;
//   - a whole-extent write that compresses goes to the compressed slot if
//     the map on disk does not name it, else raw to the raw slot;
//   - a write into part of an extent held compressed decompresses it,
//     merges, and writes the whole extent raw into the raw slot, which the
//     map on disk then does not name (or which holds, block for block,
//     either its content on disk or newer content);
//
// and Sync makes the data files durable first, then writes the map entries
// of the extents whose slot changed and makes the map durable, and only then
// punches the slots the map no longer names. A crash therefore finds every
// extent whole in the slot the map names, as of the last Sync, with the
// writes since then to raw extents there or not block by block. The writes
// since the last Sync to an extent whose slot changed are lost even when only
// the process died, where a plain file keeps them in the page cache: they
// were never flushed, as a disk's write cache may lose them too.
package zfile

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/pierrec/lz4/v4"
	"golang.org/x/sys/unix"
)

const (
	// ExtentSize is the unit that is compressed.
	ExtentSize = 64 << 10
	// BlockSize is the file system block: a compressed extent must save at
	// least one to be stored compressed.
	BlockSize = 4096

	zSuffix   = ".z"
	mapSuffix = ".zmap"
	stripes   = 64
)

// ErrCorrupt is wrapped by a read of an extent whose compressed block does
// not decompress to a whole extent.
var ErrCorrupt = errors.New("zfile: compressed extent does not decompress")

// File is an open compressed file.
type File struct {
	raw, z, zmap *os.File
	size         uint64

	// locks serialise the operations on one extent (by extent index
	// modulo stripes): a write that changes an extent's slot must not
	// race a read of it.
	locks [stripes]sync.RWMutex

	mu sync.Mutex
	// durable is the map on disk (its entries as last synced), in memory:
	// 4 bytes per extent, for the extents up to the highest stored
	// compressed (nil until one is).
	durable []uint32
	// pending are the extents whose slot changed since the last Sync: the
	// length of their compressed block now (0: raw), with a generation
	// that Sync compares to commit only what it made durable.
	pending map[uint64]change
	gen     uint64
	// compressed counts the extents held compressed now (their current
	// length is not 0): Stats reads it rather than walk the map.
	compressed uint64
	// noGain has a bit per extent that Recompress found would not save a
	// block, cleared when the extent is written: not tried again until
	// then. In memory only (a bit per extent: 2 MiB per TiB).
	noGain []uint64
}

type change struct {
	length uint32
	gen    uint64
}

// Paths are the files of the compressed file at path.
func Paths(path string) []string { return []string{path, path + zSuffix, path + mapSuffix} }

// Create makes the three files of a new compressed file of size bytes at
// path (all holes: all zeros), replacing any, durably: their lengths and
// their names in the directory are synced.
func Create(path string, size uint64) (*File, error) {
	for _, p := range Paths(path) {
		f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, err
		}
		n := int64(size)
		if p == path+mapSuffix {
			n = int64(4 * extents(size))
		}
		err = f.Truncate(n)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	return Open(path)
}

// Exists reports whether a compressed file is at path (its map is there).
func Exists(path string) bool {
	_, err := os.Stat(path + mapSuffix)
	return err == nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Open opens the compressed file at path. Slots that the map does not name
// (left by writes after the last Sync before a crash) are punched.
func Open(path string) (*File, error) {
	f := &File{pending: map[uint64]change{}}
	var err error
	if f.raw, err = os.OpenFile(path, os.O_RDWR, 0); err != nil {
		return nil, err
	}
	if f.z, err = os.OpenFile(path+zSuffix, os.O_RDWR, 0); err != nil {
		f.raw.Close()
		return nil, err
	}
	if f.zmap, err = os.OpenFile(path+mapSuffix, os.O_RDWR, 0); err != nil {
		f.raw.Close()
		f.z.Close()
		return nil, err
	}
	st, err := f.raw.Stat()
	if err == nil {
		f.size = uint64(st.Size())
		err = f.loadMap()
	}
	if err == nil {
		err = f.punchStale()
	}
	if err != nil {
		f.closeFiles()
		return nil, fmt.Errorf("zfile %s: %w", path, err)
	}
	return f, nil
}

func extents(size uint64) uint64 { return (size + ExtentSize - 1) / ExtentSize }

// loadMap reads the map's entries that hold data.
func (f *File) loadMap() error {
	b, err := io.ReadAll(io.NewSectionReader(f.zmap, 0, int64(4*extents(f.size))))
	if err != nil {
		return err
	}
	last := -1
	for i := 0; i+4 <= len(b); i += 4 {
		if binary.LittleEndian.Uint32(b[i:]) != 0 {
			last = i / 4
		}
	}
	if last >= 0 {
		f.durable = make([]uint32, last+1)
		for i := range f.durable {
			f.durable[i] = binary.LittleEndian.Uint32(b[4*i:])
			if f.durable[i] > ExtentSize-BlockSize {
				return fmt.Errorf("map entry of extent %d: length %d: %w", i, f.durable[i], ErrCorrupt)
			}
		}
	}
	f.recount()
	return nil
}

// recount sets compressed from the map; f.mu is held (or f not shared).
func (f *File) recount() {
	f.compressed = 0
	for e, l := range f.durable {
		if _, ok := f.pending[uint64(e)]; !ok && l != 0 {
			f.compressed++
		}
	}
	for _, c := range f.pending {
		if c.length != 0 {
			f.compressed++
		}
	}
}

// punchStale frees the slots the map does not name: the compressed slot of
// every raw extent, the raw slot of every compressed one.
func (f *File) punchStale() error {
	for e := uint64(0); e < extents(f.size); {
		next, err := unix.Seek(int(f.z.Fd()), int64(e*ExtentSize), unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return err
		}
		e = uint64(next) / ExtentSize
		if f.durableLen(e) == 0 {
			if err := punch(f.z, e*ExtentSize, ExtentSize); err != nil {
				return err
			}
		}
		e++
	}
	for e, l := range f.durable {
		if l != 0 {
			if err := punch(f.raw, uint64(e)*ExtentSize, ExtentSize); err != nil {
				return err
			}
		}
	}
	return nil
}

func punch(f *os.File, off, n uint64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n))
}

// Size is the file's size.
func (f *File) Size() uint64 { return f.size }

// Name is the raw file's path.
func (f *File) Name() string { return f.raw.Name() }

func (f *File) durableLen(e uint64) uint32 {
	if e < uint64(len(f.durable)) {
		return f.durable[e]
	}
	return 0
}

// current is extent e's compressed length now (0: raw). f.mu is held.
func (f *File) current(e uint64) uint32 {
	if c, ok := f.pending[e]; ok {
		return c.length
	}
	return f.durableLen(e)
}

func (f *File) currentLocked(e uint64) uint32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.current(e)
}

// setCurrent records extent e's new slot. f.mu is not held.
func (f *File) setCurrent(e uint64, length uint32) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.setGain(e)
	switch old := f.current(e); {
	case old == 0 && length != 0:
		f.compressed++
	case old != 0 && length == 0:
		f.compressed--
	}
	if length == f.durableLen(e) {
		delete(f.pending, e) // back to what the map on disk says
		// A Sync in progress may have taken the old change: a new
		// generation keeps it from committing that.
		f.gen++
		return
	}
	f.gen++
	f.pending[e] = change{length: length, gen: f.gen}
}

func (f *File) lock(e uint64) *sync.RWMutex { return &f.locks[e%stripes] }

// span calls fn for each extent [off, off+n) touches, with the part of it:
// the extent's index, the offset in it and the length.
func span(off, n uint64, fn func(e, in, m, done uint64) error) error {
	for done := uint64(0); done < n; {
		o := off + done
		e, in := o/ExtentSize, o%ExtentSize
		m := min(ExtentSize-in, n-done)
		if err := fn(e, in, m, done); err != nil {
			return err
		}
		done += m
	}
	return nil
}

func (f *File) check(off int64, n int) error {
	if off < 0 || uint64(off)+uint64(n) > f.size {
		return fmt.Errorf("zfile: [%d, +%d) beyond the size %d: %w", off, n, f.size, io.ErrUnexpectedEOF)
	}
	return nil
}

// ReadAt reads len(p) bytes at off. As a plain file's, a read that
// reaches past the size reads what is before it and returns io.EOF.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if off >= 0 && uint64(off)+uint64(len(p)) > f.size {
		if uint64(off) >= f.size {
			return 0, io.EOF
		}
		n, err := f.ReadAt(p[:f.size-uint64(off)], off)
		if err == nil {
			err = io.EOF
		}
		return n, err
	}
	if err := f.check(off, len(p)); err != nil {
		return 0, err
	}
	var buf []byte
	err := span(uint64(off), uint64(len(p)), func(e, in, m, done uint64) error {
		l := f.lock(e)
		l.RLock()
		defer l.RUnlock()
		length := f.currentLocked(e)
		if length == 0 {
			_, err := f.raw.ReadAt(p[done:done+m], int64(e*ExtentSize+in))
			return err
		}
		if buf == nil {
			buf = extentBufs.Get().(*[ExtentSize]byte)[:]
		}
		if err := f.inflate(e, length, buf); err != nil {
			return err
		}
		copy(p[done:done+m], buf[in:in+m])
		return nil
	})
	if buf != nil {
		extentBufs.Put((*[ExtentSize]byte)(buf))
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// extentBufs are ExtentSize buffers (an extent inflated, a compressed
// block read or written), compressors the LZ4 compressors: both cost more
// to make than to use.
var (
	extentBufs  = sync.Pool{New: func() any { return new([ExtentSize]byte) }}
	compressors = sync.Pool{New: func() any { return new(lz4.Compressor) }}
)

// inflate reads extent e's compressed block of length bytes into dst.
func (f *File) inflate(e uint64, length uint32, dst []byte) error {
	b := extentBufs.Get().(*[ExtentSize]byte)
	defer extentBufs.Put(b)
	src := b[:length]
	if _, err := f.z.ReadAt(src, int64(e*ExtentSize)); err != nil {
		return err
	}
	n, err := lz4.UncompressBlock(src, dst)
	if err != nil || n != ExtentSize {
		return fmt.Errorf("extent %d (%d bytes compressed, %d out): %w: %v", e, length, n, ErrCorrupt, err)
	}
	return nil
}

// compress compresses p (a whole extent) into dst (ExtentSize bytes) and
// returns the compressed block, or nil if it would not save a block (the
// block must fit ExtentSize-BlockSize bytes: LZ4 gives up when it does not).
func compress(p, dst []byte) []byte {
	c := compressors.Get().(*lz4.Compressor)
	defer compressors.Put(c)
	n, err := c.CompressBlock(p, dst[:ExtentSize-BlockSize])
	if err != nil || n == 0 {
		return nil
	}
	return dst[:n]
}

// WriteAt writes p at off.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check(off, len(p)); err != nil {
		return 0, err
	}
	err := span(uint64(off), uint64(len(p)), func(e, in, m, done uint64) error {
		l := f.lock(e)
		l.Lock()
		defer l.Unlock()
		if m == ExtentSize {
			return f.writeWhole(e, p[done:done+m])
		}
		return f.writePart(e, in, p[done:done+m])
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeWhole stores a whole extent: compressed into the compressed slot if
// it compresses and the map on disk does not name that slot, else raw.
func (f *File) writeWhole(e uint64, p []byte) error {
	f.mu.Lock()
	zFree := f.durableLen(e) == 0
	f.mu.Unlock()
	if zFree {
		b := extentBufs.Get().(*[ExtentSize]byte)
		defer extentBufs.Put(b)
		if c := compress(p, b[:]); c != nil {
			if _, err := f.z.WriteAt(c, int64(e*ExtentSize)); err != nil {
				return err
			}
			f.setCurrent(e, uint32(len(c)))
			return nil
		}
	}
	if _, err := f.raw.WriteAt(p, int64(e*ExtentSize)); err != nil {
		return err
	}
	f.setCurrent(e, 0)
	return nil
}

// writePart writes p at in of extent e; an extent held compressed is
// written whole, raw, first.
func (f *File) writePart(e, in uint64, p []byte) error {
	length := f.currentLocked(e)
	if length == 0 {
		f.mu.Lock()
		f.setGain(e)
		f.mu.Unlock()
		_, err := f.raw.WriteAt(p, int64(e*ExtentSize+in))
		return err
	}
	b := extentBufs.Get().(*[ExtentSize]byte)
	defer extentBufs.Put(b)
	buf := b[:]
	if err := f.inflate(e, length, buf); err != nil {
		return err
	}
	copy(buf[in:], p)
	if _, err := f.raw.WriteAt(buf, int64(e*ExtentSize)); err != nil {
		return err
	}
	f.setCurrent(e, 0)
	return nil
}

// Punch makes [off, off+n) read as zeros.
func (f *File) Punch(off, n uint64) error {
	if err := f.check(int64(off), int(n)); err != nil {
		return err
	}
	return span(off, n, func(e, in, m, _ uint64) error {
		l := f.lock(e)
		l.Lock()
		defer l.Unlock()
		length := f.currentLocked(e)
		switch {
		case length == 0:
			f.mu.Lock()
			f.setGain(e)
			f.mu.Unlock()
			return punch(f.raw, e*ExtentSize+in, m)
		case m == ExtentSize:
			// The raw slot: a hole the map on disk does not name, or
			// the extent's old data, which the map names until Sync.
			if err := punch(f.raw, e*ExtentSize, ExtentSize); err != nil {
				return err
			}
			f.setCurrent(e, 0)
			return nil
		}
		return f.writePart(e, in, make([]byte, m))
	})
}

// Hole reports whether [off, off+n) holds no data: every extent it touches
// is raw and its raw slot a hole there.
func (f *File) Hole(off, n uint64) (bool, error) {
	hole := true
	err := span(off, n, func(e, in, m, _ uint64) error {
		if !hole {
			return nil
		}
		l := f.lock(e)
		l.RLock()
		defer l.RUnlock()
		if f.currentLocked(e) != 0 {
			hole = false
			return nil
		}
		next, err := unix.Seek(int(f.raw.Fd()), int64(e*ExtentSize+in), unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO):
		case err != nil:
			return err
		case uint64(next) < e*ExtentSize+in+m:
			hole = false
		}
		return nil
	})
	return hole, err
}

// Sync makes every write before it durable (see the package doc for the
// order).
func (f *File) Sync() error {
	f.mu.Lock()
	taken := make(map[uint64]change, len(f.pending))
	for e, c := range f.pending {
		taken[e] = c
	}
	f.mu.Unlock()
	if err := unix.Fdatasync(int(f.raw.Fd())); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(f.z.Fd())); err != nil {
		return err
	}
	if len(taken) == 0 {
		return nil
	}
	// Commit the changes no write has overtaken since they were taken:
	// their data is in the files just synced. Their extents' locks are
	// held meanwhile (in stripe order; taken before f.mu, as writers take
	// them): a write in progress there may have written a slot and not
	// yet recorded it, and the slot punched below must not be that one.
	var held []int
	for e := range taken {
		held = append(held, int(e%stripes))
	}
	slices.Sort(held)
	held = slices.Compact(held)
	for _, i := range held {
		f.locks[i].Lock()
	}
	defer func() {
		for _, i := range held {
			f.locks[i].Unlock()
		}
	}()
	f.mu.Lock()
	defer f.mu.Unlock()
	var commit []uint64
	for e, c := range taken {
		if now, ok := f.pending[e]; ok && now.gen == c.gen {
			commit = append(commit, e)
		}
	}
	slices.Sort(commit)
	var entry [4]byte
	for _, e := range commit {
		binary.LittleEndian.PutUint32(entry[:], f.pending[e].length)
		if _, err := f.zmap.WriteAt(entry[:], int64(4*e)); err != nil {
			return err
		}
	}
	if err := unix.Fdatasync(int(f.zmap.Fd())); err != nil {
		return err
	}
	for _, e := range commit {
		length := f.pending[e].length
		if need := int(e) + 1; length != 0 && need > len(f.durable) {
			f.durable = append(f.durable, make([]uint32, need-len(f.durable))...)
		}
		if e < uint64(len(f.durable)) {
			f.durable[e] = length
		}
		delete(f.pending, e)
		// The slot the map no longer names; no write is in it (its
		// extent's lock is held) and later ones go by the new map.
		stale, at := f.z, e*ExtentSize
		if length != 0 {
			stale = f.raw
		}
		if err := punch(stale, at, ExtentSize); err != nil {
			return err
		}
	}
	return nil
}

// Grow makes the file size bytes (larger), durably (fsync, which a size
// change needs). A crash may leave some of the three files grown and not
// the others; Trim cuts them back.
func (f *File) Grow(size uint64) error {
	if size < f.size {
		return fmt.Errorf("zfile: grow from %d to %d: smaller", f.size, size)
	}
	if err := f.truncate(size); err != nil {
		return err
	}
	f.size = size
	return nil
}

// Trim cuts the file back to size bytes, which must be at most its size:
// the leftover of a Grow whose caller never recorded the new size. Nothing
// may have been written past size.
func (f *File) Trim(size uint64) error {
	if size > f.size {
		return fmt.Errorf("zfile: trim from %d to %d: larger", f.size, size)
	}
	if err := f.truncate(size); err != nil {
		return err
	}
	f.size = size
	f.mu.Lock()
	if n := int(extents(size)); len(f.durable) > n {
		f.durable = f.durable[:n]
	}
	f.recount()
	f.mu.Unlock()
	return nil
}

func (f *File) truncate(size uint64) error {
	for i, fl := range []*os.File{f.raw, f.z, f.zmap} {
		n := int64(size)
		if i == 2 {
			n = int64(4 * extents(size))
		}
		if err := fl.Truncate(n); err != nil {
			return err
		}
		if err := fl.Sync(); err != nil {
			return err
		}
	}
	return nil
}

// Raw is the file of the raw slots, for what needs a descriptor of the
// compressed file as a whole (an flock). Never read or write through it.
func (f *File) Raw() *os.File { return f.raw }

// Stats is what the file holds and takes.
type Stats struct {
	// LogicalBytes is the data it holds: its raw slots' allocated bytes
	// and ExtentSize for each extent held compressed.
	LogicalBytes uint64
	// PhysicalBytes is what its files take on disk.
	PhysicalBytes uint64
	// CompressedExtents counts the extents held compressed.
	CompressedExtents uint64
}

// Stats measures the file: three fstats, whatever its size.
func (f *File) Stats() (Stats, error) {
	var s Stats
	f.mu.Lock()
	s.CompressedExtents = f.compressed
	f.mu.Unlock()
	s.LogicalBytes = s.CompressedExtents * ExtentSize
	for i, fl := range []*os.File{f.raw, f.z, f.zmap} {
		var st unix.Stat_t
		if err := unix.Fstat(int(fl.Fd()), &st); err != nil {
			return Stats{}, err
		}
		s.PhysicalBytes += uint64(st.Blocks) * 512
		if i == 0 {
			s.LogicalBytes += uint64(st.Blocks) * 512
		}
	}
	return s, nil
}

// Close syncs (Sync) and closes the files. Unlike a plain file's close,
// which leaves unflushed writes in the page cache, closing without a Sync
// would lose the writes that moved an extent to another slot: the next
// Open goes by the map on disk and punches the slots it does not name.
func (f *File) Close() error {
	return errors.Join(f.Sync(), f.closeFiles())
}

// closeFiles closes whatever files are open.
func (f *File) closeFiles() error {
	var err error
	for _, fl := range []*os.File{f.raw, f.z, f.zmap} {
		if fl != nil {
			err = errors.Join(err, fl.Close())
		}
	}
	return err
}

// Recompressing. A small write into an extent held compressed stores the
// extent raw (writePart), so random small writes turn a file raw over
// time. Recompress stores such an extent compressed again, by the rule of
// a whole-extent write: into the compressed slot when the map on disk does
// not name it, committed by the next Sync. Its content does not change, so
// it may run beside reads and writes (each extent under its lock).

// NextRaw returns the first extent at or after e that Recompress may
// store compressed: held raw, with data in every block of its raw slot,
// not found incompressible since its last write, and whose compressed
// slot the map on disk does not name. False when there is none.
func (f *File) NextRaw(e uint64) (uint64, bool) {
	last := f.size / ExtentSize // whole extents only
	for e < last {
		next, err := unix.Seek(int(f.raw.Fd()), int64(e*ExtentSize), unix.SEEK_DATA)
		if err != nil { // ENXIO: no data after e
			return 0, false
		}
		e = uint64(next) / ExtentSize
		if e >= last {
			return 0, false
		}
		f.mu.Lock()
		ok := f.current(e) == 0 && f.durableLen(e) == 0 && !f.knownNoGain(e)
		f.mu.Unlock()
		if ok && f.rawWhole(e) {
			return e, true
		}
		e++
	}
	return 0, false
}

// rawWhole reports whether extent e's raw slot holds data in every block
// (no hole). Only such an extent is recompressed: one with holes takes
// fewer blocks raw than its LZ4 block may, and in a replica's layer its
// holes can be blocks the layer does not hold, which a compressed extent
// could no longer tell from written zeros (replica settlePending).
func (f *File) rawWhole(e uint64) bool {
	hole, err := unix.Seek(int(f.raw.Fd()), int64(e*ExtentSize), unix.SEEK_HOLE)
	return err == nil && uint64(hole) >= (e+1)*ExtentSize
}

// Recompress stores extent e compressed if it is held raw, holds data in
// every block (rawWhole) and would save a block; it reports whether it
// did. The raw slot is punched
// at the Sync that commits the change.
func (f *File) Recompress(e uint64) (bool, error) {
	if (e+1)*ExtentSize > f.size {
		return false, nil
	}
	l := f.lock(e)
	l.Lock()
	defer l.Unlock()
	f.mu.Lock()
	ok := f.current(e) == 0 && f.durableLen(e) == 0 && !f.knownNoGain(e)
	f.mu.Unlock()
	if !ok || !f.rawWhole(e) {
		return false, nil
	}
	in := extentBufs.Get().(*[ExtentSize]byte)
	defer extentBufs.Put(in)
	if _, err := f.raw.ReadAt(in[:], int64(e*ExtentSize)); err != nil {
		return false, err
	}
	out := extentBufs.Get().(*[ExtentSize]byte)
	defer extentBufs.Put(out)
	c := compress(in[:], out[:])
	if c == nil {
		f.mu.Lock()
		f.markNoGain(e)
		f.mu.Unlock()
		return false, nil
	}
	if _, err := f.z.WriteAt(c, int64(e*ExtentSize)); err != nil {
		return false, err
	}
	f.setCurrent(e, uint32(len(c)))
	return true, nil
}

// knownNoGain, markNoGain and setGain read and change extent e's noGain
// bit. f.mu is held.
func (f *File) knownNoGain(e uint64) bool {
	return e/64 < uint64(len(f.noGain)) && f.noGain[e/64]&(1<<(e%64)) != 0
}

func (f *File) markNoGain(e uint64) {
	if need := int(e/64) + 1; need > len(f.noGain) {
		f.noGain = append(f.noGain, make([]uint64, need-len(f.noGain))...)
	}
	f.noGain[e/64] |= 1 << (e % 64)
}

func (f *File) setGain(e uint64) {
	if e/64 < uint64(len(f.noGain)) {
		f.noGain[e/64] &^= 1 << (e % 64)
	}
}
