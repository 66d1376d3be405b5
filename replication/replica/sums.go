package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"

	"golang.org/x/sys/unix"
)

// Per-block checksums (docs/integrity.md).
//
// A replica created with checksums has, beside its data file, a sums file:
// one big-endian u32 per SumBlockSize block of the data, at offset 4 × block
// index. The value stored for a block is CRC32C(block) XOR CRC32C(a block of
// zeros), so that a block never written (a hole in the data file) and a
// block whose sum was never written (a hole in the sums file) agree: both
// are "a zero block", stored as 0. A short last block counts as padded with
// zeros to SumBlockSize. The sums file is sparse and lives in the page
// cache; it is never copied into the process (a 1 TiB volume has a 1 GiB
// sums file). It is read and written through a shared mapping (see
// readSumsMapped and writeSumsMapped): a sum costs a load or a store, not a
// system call, and the kernel writes the dirty pages back as it does those
// of any file; fdatasync of the file (Flush) makes them durable. Where the
// mapping cannot be made, pread and pwrite do the same job.
//
// Whether a replica keeps sums is the presence of the sums file, decided at
// creation; a replica created before checksums existed has none and is
// served as before. The meta file does not mention it.
//
// Order and crashes: a write marks its extents dirty, writes the data, then
// the sums. A crash between the two leaves the block's data and sum
// disagreeing (a torn write) inside a dirty extent; resync has the replica
// recompute the sums of its dirty extents (Rehash) before it compares the
// replicas. Outside dirty extents a mismatch is corruption.
//
// The engine orders the writes of one block (its range locks cover whole
// blocks), so the read-modify-write of a block that a write covers in part
// never races with another write of the same block.

// SumBlockSize is the span of data one checksum covers.
const SumBlockSize = 4096

const sumsFileName = "sums"

// zeroBlockCRC is CRC32C of SumBlockSize zero bytes.
var zeroBlockCRC = crc32.Checksum(zeroChunk[:SumBlockSize], castagnoli)

// SumPieces returns how many SumBlockSize-aligned pieces [off, off+n) is cut
// into: the number of checksums a WRITE with FlagSums carries.
func SumPieces(off, n uint64) uint64 {
	if n == 0 {
		return 0
	}
	return (off+n-1)/SumBlockSize - off/SumBlockSize + 1
}

// PieceSums appends to dst the CRC32C of each SumBlockSize-aligned piece of
// p, which is to be written at off: the checksums a WRITE with FlagSums
// carries.
func PieceSums(dst []uint32, p []byte, off uint64) []uint32 {
	for len(p) > 0 {
		n := min(uint64(len(p)), SumBlockSize-off%SumBlockSize)
		dst = append(dst, crc32.Checksum(p[:n], castagnoli))
		p, off = p[n:], off+n
	}
	return dst
}

// storedSum is the value kept in the sums file for a block whose bytes are b
// (len(b) <= SumBlockSize; shorter means the rest is zeros).
func storedSum(b []byte) uint32 {
	c := crc32.Checksum(b, castagnoli)
	if len(b) < SumBlockSize {
		c = crc32.Update(c, castagnoli, zeroChunk[:SumBlockSize-len(b)])
	}
	return c ^ zeroBlockCRC
}

// createSumsFile makes an empty (all holes: every block a zero block) sums
// file for a data file of size bytes in dir.
func createSumsFile(dir string, size uint64) error {
	return createSumsFileAt(filepath.Join(dir, sumsFileName), size)
}

// createSumsFileAt is createSumsFile at any path (a layer's sums).
func createSumsFileAt(path string, size uint64) error {
	return createSized(path, 4*sumBlocks(size))
}

func sumBlocks(size uint64) uint64 { return (size + SumBlockSize - 1) / SumBlockSize }

// openSums opens the head's sums file if the replica has one.
func (r *Replica) openSums() error {
	f, m, err := r.openSumsFile(r.chain.Path(r.chain.Head(), sumsFileName), true)
	r.sums, r.sumsMap = f, m
	return err
}

// openSumsFile opens and maps a layer's sums file; nil if there is none
// (the replica keeps no checksums). A failed mapping is no error: readSums
// and writeSums then use pread and pwrite. The head's sums cover the
// volume exactly; a sealed layer's may be shorter (see readFile).
func (r *Replica) openSumsFile(path string, head bool) (*os.File, []byte, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("replica %s: %w", r.id, err)
	}
	want := 4 * sumBlocks(r.size)
	st, err := f.Stat()
	var have uint64
	if err == nil {
		have = uint64(st.Size())
	}
	switch {
	case err != nil:
	case head:
		// Longer: left by a grow that stopped before its commit point
		// (grow.go); cut back. Shorter: damage.
		err = trimInterruptedGrow(f, have, want)
		if err == nil && have < want {
			err = fmt.Errorf("%w: sums file %s is %d bytes, want %d", ErrCorrupt, filepath.Base(path), have, want)
		}
		have = want
	case have > want:
		// A sealed layer is never longer than the volume (it may be
		// shorter: see readFile).
		err = fmt.Errorf("%w: sums file %s is %d bytes, the volume needs %d", ErrCorrupt, filepath.Base(path), have, want)
	}
	if err != nil {
		_ = f.Close() // the error above is the one to report
		return nil, nil, fmt.Errorf("replica %s: %w", r.id, err)
	}
	if have == 0 {
		return f, nil, nil
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(have), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		m = nil
	}
	return f, m, nil
}

// closeSums unmaps and closes the sums file. Callers hold epochMu
// exclusively: no read of the mapping is in flight.
func (r *Replica) closeSums() error {
	if r.sumsMap != nil {
		_ = unix.Munmap(r.sumsMap) // only fails on a bad address
		r.sumsMap = nil
	}
	return r.sums.Close()
}

// Checksummed reports whether the replica keeps per-block checksums.
func (r *Replica) Checksummed() bool { return r.checksummed }

// readSums reads the stored sums of the head's blocks [first,
// first+len(dst)). Callers hold epochMu shared (Close unmaps under it).
func (r *Replica) readSums(dst []uint32, first uint64) error {
	return r.readSumsIn(r.headFiles(), dst, first)
}

// readSumsIn is readSums from the files of any layer.
func (r *Replica) readSumsIn(lf layerFiles, dst []uint32, first uint64) error {
	if lf.sumsMap != nil {
		return r.readSumsMapped(lf.sumsMap, dst, first)
	}
	var small [64]byte
	var b []byte
	if n := 4 * len(dst); n <= len(small) {
		b = small[:n]
	} else {
		b = make([]byte, n)
	}
	n, err := lf.sums.ReadAt(b, int64(4*first))
	if errors.Is(err, io.EOF) {
		clear(b[n:]) // past the end of a shorter layer: zero blocks (see readFile)
		err = nil
	}
	if err != nil {
		return fmt.Errorf("replica %s: read sums of blocks %d+%d: %w", r.id, first, len(dst), err)
	}
	for i := range dst {
		dst[i] = binary.BigEndian.Uint32(b[4*i:])
	}
	return nil
}

// readSumsMapped is readSums from the mapping. The pread it replaces cost a
// system call per verified read, a sixth of the CPU of a 4 KiB read
// (fiobench). A page of the mapping that cannot be read (an I/O error of
// the disk) arrives as a fault rather than an error; onSumsFault turns it
// into the error the pread would have returned.
func (r *Replica) readSumsMapped(m []byte, dst []uint32, first uint64) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer r.onSumsFault("read", first, len(dst), &err)
	end := min(uint64(len(m)), 4*(first+uint64(len(dst))))
	var b []byte
	if 4*first < end {
		b = m[4*first : end]
	}
	for i := range dst {
		if 4*i+4 > len(b) {
			dst[i] = 0 // past the end of a shorter layer (see readFile)
			continue
		}
		dst[i] = binary.BigEndian.Uint32(b[4*i:])
	}
	return nil
}

// writeSums stores sums for the head's blocks [first, first+len(vs)).
func (r *Replica) writeSums(vs []uint32, first uint64) error {
	return r.writeSumsIn(r.headFiles(), vs, first)
}

// writeSumsIn is writeSums into the sums of any layer.
func (r *Replica) writeSumsIn(lf layerFiles, vs []uint32, first uint64) error {
	if lf.sumsMap != nil {
		return r.writeSumsMapped(lf.sumsMap, vs, first)
	}
	var small [64]byte
	b := small[:0]
	if 4*len(vs) > len(small) {
		b = make([]byte, 0, 4*len(vs))
	}
	for _, v := range vs {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	if _, err := lf.sums.WriteAt(b, int64(4*first)); err != nil {
		return fmt.Errorf("replica %s: write sums of blocks %d+%d: %w", r.id, first, len(vs), err)
	}
	return nil
}

// writeSumsMapped is writeSums into the mapping. The pwrite of 4 bytes it
// replaces went through the file system's whole write path for every write
// of data (page lookup, block mapping, dirtying the page), about as much
// CPU as the write of the data itself for a 4 KiB write (fiobench, perf).
// A store into the mapping costs nothing once its page is dirty; the first
// store after a writeback takes one page fault (the file system's
// page_mkwrite). A page that cannot be made writable (the disk is full and
// the page was a hole, or an I/O error) faults; onSumsFault turns that into
// the error pwrite would have returned.
func (r *Replica) writeSumsMapped(m []byte, vs []uint32, first uint64) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer r.onSumsFault("write", first, len(vs), &err)
	if 4*(first+uint64(len(vs))) > uint64(len(m)) {
		return fmt.Errorf("replica %s: %w: sums of blocks %d+%d past the end of a layer's sums (%d blocks)", r.id, ErrOutOfRange, first, len(vs), len(m)/4)
	}
	b := m[4*first : 4*(first+uint64(len(vs)))]
	for i, v := range vs {
		binary.BigEndian.PutUint32(b[4*i:], v)
	}
	return nil
}

// onSumsFault, deferred with SetPanicOnFault on, recovers a memory fault on
// the mapped sums file into *err. Any other panic is a bug and goes on.
func (r *Replica) onSumsFault(op string, first uint64, count int, err *error) {
	p := recover()
	if p == nil {
		return
	}
	if _, fault := p.(interface{ Addr() uintptr }); !fault {
		panic(p)
	}
	*err = fmt.Errorf("replica %s: %s sums of blocks %d+%d: fault on the mapped sums file (the disk failed the %s, or is full): %v", r.id, op, first, count, op, p)
}

// readBlocks reads whole blocks as readChecked takes them, checked when the
// replica keeps sums.
func (r *Replica) readBlocks(data []byte, aoff uint64) error {
	if r.sums != nil {
		return r.readChecked(data, aoff)
	}
	return r.readAt(data, aoff)
}

// BlockSpan returns the range of whole checksum blocks around [off, off+n),
// cut at size (the end of the replica or volume).
func BlockSpan(off, n, size uint64) (aoff, aend uint64) {
	aoff = off / SumBlockSize * SumBlockSize
	aend = min(size, (off+n+SumBlockSize-1)/SumBlockSize*SumBlockSize)
	return aoff, aend
}

// verifyChunk is how much of a long read is read and checked at a time. The
// CRC pass right after each pread finds the bytes still in the CPU cache;
// checking a 1 MiB read after reading all of it walked the whole buffer
// again from memory, which cost more than the CRC itself (fiobench, 1M reads).
const verifyChunk = 128 << 10

// storedSums reads the stored sums of the blocks of [aoff, aoff+n) (aoff
// block-aligned) in layer lf into dst's array if it is large enough (a
// short read's sums then stay on the caller's stack).
func (r *Replica) storedSums(lf layerFiles, dst []uint32, aoff, n uint64) ([]uint32, error) {
	var want []uint32
	if count := int((n + SumBlockSize - 1) / SumBlockSize); count <= cap(dst) {
		want = dst[:count]
	} else {
		want = make([]uint32, count)
	}
	if err := r.readSumsIn(lf, want, aoff/SumBlockSize); err != nil {
		return nil, err
	}
	return want, nil
}

// checkBlocks compares data, the bytes of [aoff, ...) as readChecked takes
// them, with want, the stored sums of its blocks.
func (r *Replica) checkBlocks(data []byte, aoff uint64, want []uint32) error {
	first := aoff / SumBlockSize
	for i := range want {
		b := data[uint64(i)*SumBlockSize : min(uint64(len(data)), uint64(i+1)*SumBlockSize)]
		if got := storedSum(b); got != want[i] {
			blk := first + uint64(i)
			return fmt.Errorf("replica %s: %w: block %d (offset %d): stored %#08x, data gives %#08x",
				r.id, ErrChecksum, blk, blk*SumBlockSize, want[i], got)
		}
	}
	return nil
}

// readVerified fills p from off and verifies every block it touches; blocks
// that p covers only in part are read whole. Callers hold epochMu shared.
func (r *Replica) readVerified(p []byte, off uint64) error {
	aoff, aend := BlockSpan(off, uint64(len(p)), r.size)
	if aoff != off || aend != off+uint64(len(p)) {
		buf := getBuf(int(aend - aoff))
		defer putBuf(buf)
		if err := r.readChecked(*buf, aoff); err != nil {
			return err
		}
		copy(p, (*buf)[off-aoff:])
		return nil
	}
	return r.readChecked(p, off)
}

// readChecked reads data, the bytes of [aoff, aoff+len(data)) where aoff is
// block-aligned and the range ends on a block boundary or at the end of the
// replica, from the layers that hold them, checking each block against its
// layer's stored sums.
func (r *Replica) readChecked(data []byte, aoff uint64) error {
	if !r.layered() {
		return r.readCheckedIn(r.headFiles(), data, aoff)
	}
	return r.chain.Spans(aoff, uint64(len(data)), func(i int, o, m uint64) error {
		return r.readCheckedIn(r.layerFilesOf(i), data[o-aoff:o-aoff+m], o)
	})
}

// readCheckedIn is readChecked from one layer, chunk by chunk, checking
// each chunk as soon as it is read.
func (r *Replica) readCheckedIn(lf layerFiles, data []byte, aoff uint64) error {
	var small [16]uint32
	want, err := r.storedSums(lf, small[:0], aoff, uint64(len(data)))
	if err != nil {
		return err
	}
	for o := 0; o < len(data); o += verifyChunk {
		chunk := data[o:min(len(data), o+verifyChunk)]
		if err := r.readFile(lf.data, chunk, aoff+uint64(o)); err != nil {
			return err
		}
		w := want[o/SumBlockSize : o/SumBlockSize+(len(chunk)+SumBlockSize-1)/SumBlockSize]
		if err := r.checkBlocks(chunk, aoff+uint64(o), w); err != nil {
			return err
		}
	}
	return nil
}

// checkPieces verifies the wire checksums of a write (see PieceSums).
func (r *Replica) checkPieces(p []byte, off uint64, sums []uint32) error {
	if uint64(len(sums)) != SumPieces(off, uint64(len(p))) {
		return fmt.Errorf("replica %s: %w: %d checksums for a write of %d pieces", r.id, ErrInvalidArgument, len(sums), SumPieces(off, uint64(len(p))))
	}
	for i := 0; len(p) > 0; i++ {
		n := min(uint64(len(p)), SumBlockSize-off%SumBlockSize)
		if got := crc32.Checksum(p[:n], castagnoli); got != sums[i] {
			return fmt.Errorf("replica %s: %w: %d bytes at offset %d arrived with CRC32C %#08x, sent with %#08x",
				r.id, ErrChecksum, n, off, got, sums[i])
		}
		p, off = p[n:], off+n
	}
	return nil
}

// newSums computes the sums a write of p at off leaves in the blocks it
// touches. pieces, if set, are p's verified piece checksums: a full block's
// stored sum follows from its piece's without reading the data again. A
// block the write covers in part is read, verified (a corrupt block is not
// silently given a new valid sum: ErrChecksum, and nothing is written) and
// merged with p. The sums are appended to dst (a caller's stack array
// keeps a small write's sums off the heap). Callers hold epochMu shared and
// the engine's range lock on the blocks.
func (r *Replica) newSums(dst []uint32, p []byte, off uint64, pieces []uint32) ([]uint32, error) {
	aoff, aend := BlockSpan(off, uint64(len(p)), r.size)
	out := dst
	if n := int((aend - aoff + SumBlockSize - 1) / SumBlockSize); n > cap(out) {
		out = make([]uint32, 0, n)
	}
	end := off + uint64(len(p))
	var block []byte
	for i, bo := 0, aoff; bo < aend; i, bo = i+1, bo+SumBlockSize {
		be := min(bo+SumBlockSize, r.size)
		lo, hi := max(bo, off), min(be, end)
		if lo == bo && hi == be {
			if pieces != nil && be-bo == SumBlockSize {
				out = append(out, pieces[i]^zeroBlockCRC)
			} else {
				out = append(out, storedSum(p[lo-off:hi-off]))
			}
			continue
		}
		if block == nil {
			block = make([]byte, SumBlockSize)
		}
		b := block[:be-bo]
		if err := r.readChecked(b, bo); err != nil {
			return nil, err
		}
		copy(b[lo-bo:], p[lo-off:hi-off])
		out = append(out, storedSum(b))
	}
	return out, nil
}

// rehashRange recomputes and stores the sums of [off, off+n) (block-aligned
// or ending at the end of the replica) from the data as it is. Callers hold
// epochMu shared.
func (r *Replica) rehashRange(off, n uint64, buf []byte) error {
	for n > 0 {
		chunk := buf[:min(n, uint64(len(buf)))]
		if err := r.readFile(r.data, chunk, off); err != nil {
			return err
		}
		vs := make([]uint32, 0, (len(chunk)+SumBlockSize-1)/SumBlockSize)
		for i := 0; i < len(chunk); i += SumBlockSize {
			vs = append(vs, storedSum(chunk[i:min(len(chunk), i+SumBlockSize)]))
		}
		if err := r.writeSums(vs, off/SumBlockSize); err != nil {
			return err
		}
		off, n = off+uint64(len(chunk)), n-uint64(len(chunk))
	}
	return nil
}

// Rehash recomputes the stored sums of extents [firstExtent,
// firstExtent+count) from their data, accepting the data as it is. Resync
// calls it for the dirty extents after an unclean stop, where a write may
// have reached the data but not the sums (a torn write). Without checksums
// it does nothing. The epoch is checked before each extent.
func (r *Replica) Rehash(epoch, firstExtent, count uint64) error {
	if err := r.checkExtents(firstExtent, count); err != nil {
		return err
	}
	if !r.checksummed { // r.sums may be replaced meanwhile (a new head)
		r.epochMu.RLock()
		defer r.epochMu.RUnlock()
		return r.checkEpoch(epoch)
	}
	buf := make([]byte, min(r.extentSize, 256<<10))
	for x := firstExtent; x < firstExtent+count; x++ {
		if err := r.rehashExtent(epoch, x, buf); err != nil {
			return err
		}
	}
	return nil
}

func (r *Replica) rehashExtent(epoch, x uint64, buf []byte) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	off, n := r.extentBounds(x)
	if !r.layered() {
		return r.rehashHead(off, n, buf)
	}
	// Only the head's blocks can be torn: a sealed layer was synced whole
	// before it was sealed.
	head := r.chain.Head()
	return r.chain.Spans(off, n, func(i int, o, m uint64) error {
		if i != head {
			return nil
		}
		return r.rehashHead(o, m, buf)
	})
}

// rehashHead recomputes the head's sums of [off, off+n) (whole blocks).
func (r *Replica) rehashHead(off, n uint64, buf []byte) error {
	if n == r.extentSize && fileHole(r.data, off, n) {
		return r.punchSums(off, n)
	}
	return r.rehashRange(off, n, buf)
}

// punchSums makes the sums of the blocks wholly inside [off, off+n) read as
// zero blocks, and recomputes those of the blocks at either end that the
// range covers in part. Called after the data range was punched.
func (r *Replica) punchSums(off, n uint64) error {
	end := off + n
	full0 := (off + SumBlockSize - 1) / SumBlockSize * SumBlockSize
	full1 := end / SumBlockSize * SumBlockSize
	if end == r.size {
		full1 = end // a short last block wholly inside is wholly zero
	}
	if full0 < full1 {
		s0, s1 := 4*(full0/SumBlockSize), 4*((full1+SumBlockSize-1)/SumBlockSize)
		err := unix.Fallocate(int(r.sums.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(s0), int64(s1-s0))
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
			_, err = r.sums.WriteAt(make([]byte, s1-s0), int64(s0))
		}
		if err != nil {
			return fmt.Errorf("replica %s: punch sums: %w", r.id, err)
		}
	}
	// The partly covered blocks at the ends.
	var block [SumBlockSize]byte
	for _, edge := range [...]uint64{off, end - 1} {
		bo := edge / SumBlockSize * SumBlockSize
		if bo >= full0 && bo < full1 {
			continue
		}
		if err := r.rehashRange(bo, min(bo+SumBlockSize, r.size)-bo, block[:]); err != nil {
			return err
		}
		if full0 >= full1 && off/SumBlockSize == (end-1)/SumBlockSize {
			break // one block, both ends
		}
	}
	return nil
}
