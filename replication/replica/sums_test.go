package replica

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// openSummed creates replica "r1" with checksums under dir, claimed at
// epoch 1.
func openSummed(t testing.TB, dir string, size uint64) *Replica {
	t.Helper()
	r, err := OpenWith(dir, "r1", size, testExtent, CreateOptions{Checksums: true})
	if err != nil {
		t.Fatalf("OpenWith: %v", err)
	}
	t.Cleanup(func() { _ = r.Close() })
	if !r.Checksummed() {
		t.Fatal("replica created with checksums has no sums file")
	}
	claimed(t, r, 1)
	return r
}

// flipByte flips one bit of the replica's data file at off, behind the
// replica's back (as a failing disk would).
func flipByte(t testing.TB, dir string, off int64) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "r1", dataFileName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x10
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func randBytes(n int, seed uint64) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	p := make([]byte, n)
	_, _ = rand.NewChaCha8(key).Read(p) // never fails; fast, even under -race
	return p
}

func TestSumsWriteReadVerify(t *testing.T) {
	dir := t.TempDir()
	const size = testSize + 1536 // a short last block
	r := openSummed(t, dir, size)
	model := make([]byte, size)
	write := func(off uint64, n int, seed uint64, withPieces bool) {
		t.Helper()
		p := randBytes(n, seed)
		var pieces []uint32
		if withPieces {
			pieces = PieceSums(nil, p, off)
		}
		if err := r.WriteAtSums(1, p, off, false, pieces); err != nil {
			t.Fatalf("write %d at %d: %v", n, off, err)
		}
		copy(model[off:], p)
	}
	write(0, 3*SumBlockSize, 1, true)           // whole blocks
	write(SumBlockSize+512, 512, 2, true)       // inside one block
	write(5*SumBlockSize-1024, 9000, 3, false)  // partial, whole, partial; sums computed here
	write(size-1536, 1536, 4, true)             // the short last block
	write(size-SumBlockSize-512, 1024, 5, true) // across into the short block
	if err := r.Trim(1, 2*SumBlockSize+512, 2*SumBlockSize); err != nil {
		t.Fatal(err)
	}
	clear(model[2*SumBlockSize+512 : 4*SumBlockSize+512])
	if err := r.WriteZeroes(1, 6*SumBlockSize, 2*SumBlockSize); err != nil {
		t.Fatal(err)
	}
	clear(model[6*SumBlockSize : 8*SumBlockSize])
	if err := r.Flush(1); err != nil {
		t.Fatalf("Flush (data and sums): %v", err)
	}
	if got := readAll(t, r, 1); !bytes.Equal(got, model) {
		t.Fatal("replica content differs from the model")
	}
	// Unaligned reads verify the blocks they touch.
	for _, rd := range [][2]uint64{{100, 10}, {SumBlockSize - 1, 2}, {size - 700, 700}, {3000, 20000}} {
		p := make([]byte, rd[1])
		if err := r.ReadAt(1, p, rd[0]); err != nil {
			t.Fatalf("read %d at %d: %v", rd[1], rd[0], err)
		}
		if !bytes.Equal(p, model[rd[0]:rd[0]+rd[1]]) {
			t.Fatalf("read %d at %d: wrong data", rd[1], rd[0])
		}
	}
}

func TestSumsWireDamageRefused(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	p := randBytes(2*SumBlockSize, 7)
	pieces := PieceSums(nil, p, 0)
	p[SumBlockSize+3] ^= 1 // damaged after the sender summed it
	err := r.WriteAtSums(1, p, 0, false, pieces)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("damaged write: %v, want ErrChecksum", err)
	}
	if got := readAll(t, r, 1); !bytes.Equal(got, make([]byte, testSize)) {
		t.Fatal("a refused write changed the data")
	}
	if d := r.DirtyExtents(); len(d) != 0 {
		t.Fatalf("a refused write marked extents dirty: %v", d)
	}
	if err := r.WriteAtSums(1, p, 0, false, pieces[:1]); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("wrong number of checksums: %v, want ErrInvalidArgument", err)
	}
}

func TestSumsDetectCorruptionAndRehash(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	p := randBytes(4*SumBlockSize, 9)
	if err := r.WriteAtSums(1, p, 0, false, PieceSums(nil, p, 0)); err != nil {
		t.Fatal(err)
	}
	flipByte(t, dir, 2*SumBlockSize+100)
	// A read of the bad block fails and names it; reads beside it work.
	err := r.ReadAt(1, make([]byte, 512), 2*SumBlockSize+1024)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("read of a corrupt block: %v, want ErrChecksum", err)
	}
	if err := r.ReadAt(1, make([]byte, SumBlockSize), SumBlockSize); err != nil {
		t.Fatalf("read of a good block: %v", err)
	}
	if _, err := r.ReadExtent(1, 0); !errors.Is(err, ErrChecksum) {
		t.Fatalf("ReadExtent over a corrupt block: %v, want ErrChecksum", err)
	}
	// A write that covers the bad block in part must not bless it.
	if err := r.WriteAt(1, make([]byte, 512), 2*SumBlockSize, false); !errors.Is(err, ErrChecksum) {
		t.Fatalf("partial write over a corrupt block: %v, want ErrChecksum", err)
	}
	// A whole-block write replaces it.
	good := p[2*SumBlockSize : 3*SumBlockSize]
	if err := r.WriteAtSums(1, good, 2*SumBlockSize, false, PieceSums(nil, good, 2*SumBlockSize)); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, r, 1); !bytes.Equal(got[:len(p)], p) {
		t.Fatal("repaired block reads wrong")
	}
	// A torn write (data without its sum) is accepted by Rehash.
	flipByte(t, dir, 100)
	if err := r.ReadAt(1, make([]byte, 10), 0); !errors.Is(err, ErrChecksum) {
		t.Fatalf("read: %v, want ErrChecksum", err)
	}
	if err := r.Rehash(1, 0, 1); err != nil {
		t.Fatal(err)
	}
	if err := r.ReadAt(1, make([]byte, 10), 0); err != nil {
		t.Fatalf("read after Rehash: %v", err)
	}
	if err := r.Rehash(2, 0, 1); !errors.Is(err, ErrNotClaimed) {
		t.Fatalf("Rehash with a future epoch: %v", err)
	}
}

func TestSumsSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	p := randBytes(SumBlockSize, 11)
	if err := r.WriteAt(1, p, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	flipByte(t, dir, 5)
	r2, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if !r2.Checksummed() {
		t.Fatal("reopened replica lost its checksums")
	}
	if err := r2.ReadAt(1, make([]byte, 4), 0); !errors.Is(err, ErrChecksum) {
		t.Fatalf("read: %v, want ErrChecksum", err)
	}
}

func TestNoSumsFileNoVerification(t *testing.T) {
	dir := t.TempDir()
	r := openTest(t, dir, testSize, testExtent) // as created before checksums
	claimed(t, r, 1)
	if r.Checksummed() {
		t.Fatal("replica without a sums file says it has checksums")
	}
	p := randBytes(SumBlockSize, 13)
	// Piece checksums are still verified on arrival.
	pieces := PieceSums(nil, p, 0)
	pieces[0]++
	if err := r.WriteAtSums(1, p, 0, false, pieces); !errors.Is(err, ErrChecksum) {
		t.Fatalf("damaged write: %v, want ErrChecksum", err)
	}
	if err := r.WriteAt(1, p, 0, false); err != nil {
		t.Fatal(err)
	}
	flipByte(t, dir, 5)
	got := make([]byte, 8)
	if err := r.ReadAt(1, got, 0); err != nil {
		t.Fatalf("read without checksums: %v", err)
	}
}

func TestSumsOverTheWire(t *testing.T) {
	dir := t.TempDir()
	s, addr := startServer(t, dir)
	if _, err := s.CreateWith("r1", testSize, CreateOptions{Checksums: true}); err != nil {
		t.Fatal(err)
	}
	c := dial(t, addr, "r1", testSize)
	ctx := testCtx(t)
	if err := c.Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}
	p := randBytes(3*SumBlockSize+512, 17)
	off := uint64(1024)
	if err := c.WriteAtSums(ctx, 1, p, off, true, PieceSums(nil, p, off)); err != nil {
		t.Fatal(err)
	}
	bad := PieceSums(nil, p, off)
	bad[2] ^= 1
	if err := c.WriteAtSums(ctx, 1, p, off, false, bad); !errors.Is(err, ErrChecksum) {
		t.Fatalf("damaged write over the wire: %v, want ErrChecksum", err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(ctx, 1, got, off); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v (equal %v)", err, bytes.Equal(got, p))
	}
	flipByte(t, dir, int64(off)+SumBlockSize)
	if err := c.ReadAt(ctx, 1, got, off); !errors.Is(err, ErrChecksum) {
		t.Fatalf("read of a corrupt block over the wire: %v, want ErrChecksum", err)
	}
	if err := c.Rehash(ctx, 1, 0, 1); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(ctx, 1, got, off); err != nil {
		t.Fatalf("read after rehash: %v", err)
	}
}

// BenchmarkWriteSums measures what block checksums add to a replica write
// (page cache only): 4 KiB and 1 MiB writes, with a sums file and the
// sender's piece sums, and without checksums.
func BenchmarkWriteSums(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20} {
		for _, sums := range []bool{false, true} {
			name := fmt.Sprintf("%dk/sums=%v", size>>10, sums)
			b.Run(name, func(b *testing.B) {
				r, err := OpenWith(b.TempDir(), "r1", 64<<20, 0, CreateOptions{Checksums: sums})
				if err != nil {
					b.Fatal(err)
				}
				defer r.Close()
				claimed(b, r, 1)
				p := randBytes(size, 1)
				pieces := PieceSums(nil, p, 0)
				b.SetBytes(int64(size))
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					off := uint64(i*size) % (64<<20 - uint64(size))
					off -= off % uint64(size)
					if sums {
						err = r.WriteAtSums(1, p, off, false, pieces)
					} else {
						err = r.WriteAt(1, p, off, false)
					}
					if err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// BenchmarkReadSums measures what block checksums add to a replica read
// (page cache only): 4 KiB and 1 MiB reads, verified against the stored
// sums, and without checksums.
func BenchmarkReadSums(b *testing.B) {
	for _, size := range []int{4 << 10, 1 << 20} {
		for _, sums := range []bool{false, true} {
			name := fmt.Sprintf("%dk/sums=%v", size>>10, sums)
			b.Run(name, func(b *testing.B) {
				const span = 64 << 20
				r, err := OpenWith(b.TempDir(), "r1", span, 0, CreateOptions{Checksums: sums})
				if err != nil {
					b.Fatal(err)
				}
				defer r.Close()
				claimed(b, r, 1)
				chunk := randBytes(1<<20, 1)
				for off := uint64(0); off < span; off += uint64(len(chunk)) {
					if err := r.WriteAt(1, chunk, off, false); err != nil {
						b.Fatal(err)
					}
				}
				p := make([]byte, size)
				b.SetBytes(int64(size))
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					off := uint64(i*size) % (span - uint64(size))
					off -= off % uint64(size)
					if err := r.ReadAt(1, p, off); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// TestLongReadVerifiedChunkByChunk: a read longer than verifyChunk is read
// and checked in chunks; a bad block in any chunk, including the last and
// a short one, fails the read and is named, and a clean long read returns
// the data.
func TestLongReadVerifiedChunkByChunk(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	n := 2*verifyChunk + 3*SumBlockSize // two whole chunks and a short one
	p := randBytes(n, 11)
	if err := r.WriteAtSums(1, p, 0, false, PieceSums(nil, p, 0)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, n)
	if err := r.ReadAt(1, got, 0); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("clean long read: err %v, data equal %v", err, bytes.Equal(got, p))
	}
	for _, blk := range []int{0, verifyChunk/SumBlockSize + 1, n/SumBlockSize - 1} {
		flipByte(t, dir, int64(blk*SumBlockSize+7))
		err := r.ReadAt(1, got, 0)
		if !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), fmt.Sprintf("block %d ", blk)) {
			t.Fatalf("long read over corrupt block %d: %v, want ErrChecksum naming it", blk, err)
		}
		flipByte(t, dir, int64(blk*SumBlockSize+7)) // flip back
	}
	// Unaligned: starts and ends inside blocks, spans chunks.
	off := uint64(SumBlockSize + 100)
	got = got[:verifyChunk+SumBlockSize]
	if err := r.ReadAt(1, got, off); err != nil || !bytes.Equal(got, p[off:off+uint64(len(got))]) {
		t.Fatalf("unaligned long read: err %v", err)
	}
}

// TestSumsMapFaultIsAnError: a page of the mapped sums file that cannot be
// read (here: the file cut short behind the replica's back, so the mapped
// page lies past its end and the kernel sends SIGBUS, as it does for a
// disk's read error) fails the read with an error; the process goes on.
func TestSumsMapFaultIsAnError(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	if r.sumsMap == nil {
		t.Fatal("the sums file is not mapped")
	}
	p := randBytes(SumBlockSize, 12)
	if err := r.WriteAtSums(1, p, 0, false, PieceSums(nil, p, 0)); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, "r1", sumsFileName), 0); err != nil {
		t.Fatal(err)
	}
	err := r.ReadAt(1, make([]byte, SumBlockSize), 0)
	if err == nil || !strings.Contains(err.Error(), "fault on the mapped sums file") {
		t.Fatalf("read with its sums page gone: %v, want the fault as an error", err)
	}
}

// TestSumsMapWriteFaultIsAnError: a sum that cannot be stored in the mapped
// sums file (here: its page lies past the end of the file cut short behind
// the replica's back; on a full disk a hole page faults the same way) fails
// the write with an error; the process goes on.
func TestSumsMapWriteFaultIsAnError(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	if r.sumsMap == nil {
		t.Fatal("the sums file is not mapped")
	}
	if err := os.Truncate(filepath.Join(dir, "r1", sumsFileName), 0); err != nil {
		t.Fatal(err)
	}
	p := randBytes(SumBlockSize, 13)
	err := r.WriteAtSums(1, p, 0, false, PieceSums(nil, p, 0))
	if err == nil || !strings.Contains(err.Error(), "fault on the mapped sums file") {
		t.Fatalf("write with its sums page gone: %v, want the fault as an error", err)
	}
}

// TestMappedSumsReachTheFile: sums stored through the mapping are the
// file's contents (read(2) of the file, as another process or a reopened
// replica does, sees them) and Flush, which syncs them, succeeds.
func TestMappedSumsReachTheFile(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	if r.sumsMap == nil {
		t.Fatal("the sums file is not mapped")
	}
	p := randBytes(3*SumBlockSize, 14)
	if err := r.WriteAtSums(1, p, 5*SumBlockSize, false, PieceSums(nil, p, 5*SumBlockSize)); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(1); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(dir, "r1", sumsFileName))
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		b := p[i*SumBlockSize : (i+1)*SumBlockSize]
		if got, want := binary.BigEndian.Uint32(raw[4*(5+i):]), storedSum(b); got != want {
			t.Fatalf("block %d: file holds %#08x, want %#08x", 5+i, got, want)
		}
	}
}
