package replica

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// smallWrites writes pieces of 32 and 512 bytes inside blocks, as an
// encrypted volume's entries and a 512-byte sector write arrive, into the
// replica and into model.
func smallWrites(t *testing.T, r *Replica, model []byte, seed uint64) {
	t.Helper()
	for i, w := range []struct{ off, n uint64 }{
		{0, 32}, {32, 32}, {4064, 32}, {3*SumBlockSize + 512, 512}, {5*SumBlockSize + 100, 7},
	} {
		p := randBytes(int(w.n), seed+uint64(i))
		if err := r.WriteAtSums(1, p, w.off, false, PieceSums(nil, p, w.off)); err != nil {
			t.Fatalf("write %d+%d: %v", w.off, w.n, err)
		}
		copy(model[w.off:], p)
	}
}

// TestSmallWritesThroughTheMapping: writes inside one block go through the
// mapping of the data file, and what they leave is what pread and pwrite
// would have left: the file (read with read(2), as a reopened replica
// reads it) holds the bytes, the sums file the sums of the merged blocks,
// and reads verify.
func TestSmallWritesThroughTheMapping(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	model := randBytes(8*SumBlockSize, 1)
	if err := r.WriteAtSums(1, model, 0, false, PieceSums(nil, model, 0)); err != nil {
		t.Fatal(err)
	}
	if r.headMap.m != nil {
		t.Fatal("the data file was mapped before any small write")
	}
	smallWrites(t, r, model, 10)
	if r.headMap.m == nil || r.headMap.f != r.data {
		t.Fatal("small writes did not map the head's data file")
	}
	if err := r.Flush(1); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "r1", dataFileName))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[:len(model)], model) {
		t.Fatal("the data file does not hold the small writes")
	}
	sums, err := os.ReadFile(filepath.Join(dir, "r1", sumsFileName))
	if err != nil {
		t.Fatal(err)
	}
	for b := range 8 {
		if got, want := binary.BigEndian.Uint32(sums[4*b:]), storedSum(model[b*SumBlockSize:][:SumBlockSize]); got != want {
			t.Fatalf("block %d: sums file holds %#08x, want %#08x", b, got, want)
		}
	}
	if got := readAll(t, r, 1); !bytes.Equal(got[:len(model)], model) {
		t.Fatal("reads do not return the small writes")
	}
}

// TestSmallWriteIntoCorruptBlock: a small write into a block that no longer
// matches its sum is refused (ErrChecksum) and changes nothing, as through
// pread: the mapping must not give a damaged block a new valid sum.
func TestSmallWriteIntoCorruptBlock(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	p := randBytes(2*SumBlockSize, 2)
	if err := r.WriteAtSums(1, p, 0, false, PieceSums(nil, p, 0)); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, []byte("mapped"), 10, false); err != nil { // maps the file
		t.Fatal(err)
	}
	flipByte(t, dir, SumBlockSize+2000)
	err := r.WriteAt(1, []byte("entries!"), SumBlockSize+64, false)
	if !errors.Is(err, ErrChecksum) {
		t.Fatalf("small write into a corrupt block: %v, want ErrChecksum", err)
	}
	data, err := os.ReadFile(filepath.Join(dir, "r1", dataFileName))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[SumBlockSize+64:][:8], p[SumBlockSize+64:][:8]) {
		t.Fatal("the refused write changed the data file")
	}
}

// TestSmallWritesAfterSnapshotAndGrow: the mapping never outlives its file.
// After a snapshot the old head's file is the snapshot's, and small writes
// must not reach it; after the snapshot's deletion the new head is mapped
// afresh; after a grow the whole new size is writable.
func TestSmallWritesAfterSnapshotAndGrow(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	model := make([]byte, testSize)
	smallWrites(t, r, model, 20)
	before := bytes.Clone(model)
	if err := r.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	if r.headMap.m != nil {
		t.Fatal("the mapping of the old head survived the snapshot")
	}
	smallWrites(t, r, model, 30)
	if got := readSnap(t, r, "s1"); !bytes.Equal(got, before) {
		t.Fatal("small writes after the snapshot changed it")
	}
	if got := readAll(t, r, 1); !bytes.Equal(got, model) {
		t.Fatal("the head does not read the small writes made after the snapshot")
	}
	if err := r.DeleteSnapshot(1, "s1", nil); err != nil {
		t.Fatal(err)
	}
	smallWrites(t, r, model, 40)
	if r.headMap.m == nil || r.headMap.f != r.data {
		t.Fatal("small writes after the merge did not map the new head")
	}
	if got := readAll(t, r, 1); !bytes.Equal(got, model) {
		t.Fatal("reads after the merge differ from the small writes")
	}

	newSize := uint64(testSize + 2*testExtent)
	if err := r.Grow(1, newSize); err != nil {
		t.Fatal(err)
	}
	tail := []byte("written into the grown part")
	off := newSize - SumBlockSize + 100
	if err := r.WriteAt(1, tail, off, false); err != nil {
		t.Fatalf("small write past the old end: %v", err)
	}
	if uint64(len(r.headMap.m)) != newSize {
		t.Fatalf("mapping is %d bytes after the grow, want %d", len(r.headMap.m), newSize)
	}
	got := make([]byte, len(tail))
	if err := r.ReadAt(1, got, off); err != nil || !bytes.Equal(got, tail) {
		t.Fatalf("read back past the old end: %q, %v", got, err)
	}
}

// TestSmallWriteMapFaultIsAnError: a page of the mapped data file that
// cannot be read (here: the file cut short behind the replica's back; an
// I/O error of the disk faults the same way) fails the write with an
// error; the process goes on.
func TestSmallWriteMapFaultIsAnError(t *testing.T) {
	dir := t.TempDir()
	r := openSummed(t, dir, testSize)
	if err := r.WriteAt(1, []byte("maps the file"), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(dir, "r1", dataFileName), 0); err != nil {
		t.Fatal(err)
	}
	err := r.WriteAt(1, []byte("x"), 3*SumBlockSize+1, false)
	if err == nil || !strings.Contains(err.Error(), "fault on the mapped data file") {
		t.Fatalf("small write with its page gone: %v, want the fault as an error", err)
	}
}
