package replica

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

const (
	testExtent = 64 << 10
	testSize   = 16 * testExtent
)

// openTest opens (creating) replica "r1" under dir and closes it at cleanup.
func openTest(t testing.TB, dir string, size, extent uint64) *Replica {
	t.Helper()
	r, err := Open(dir, "r1", size, extent)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return r
}

func claimed(t testing.TB, r *Replica, epoch uint64) {
	t.Helper()
	if err := r.Claim(epoch); err != nil {
		t.Fatalf("Claim(%d): %v", epoch, err)
	}
}

func readAll(t testing.TB, r *Replica, epoch uint64) []byte {
	t.Helper()
	p := make([]byte, r.Size())
	if err := r.ReadAt(epoch, p, 0); err != nil {
		t.Fatalf("ReadAt: %v", err)
	}
	return p
}

func fileBytes(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestWriteReadRoundTrip(t *testing.T) {
	dir := t.TempDir()
	r := openTest(t, dir, testSize, testExtent)
	claimed(t, r, 1)
	rng := rand.New(rand.NewPCG(1, 2))
	model := make([]byte, testSize)
	for i := 0; i < 300; i++ {
		n := 1 + rng.IntN(3*testExtent)
		off := rng.IntN(testSize - n + 1)
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if err := r.WriteAt(1, p, uint64(off), i%7 == 0); err != nil {
			t.Fatalf("WriteAt(%d, %d): %v", n, off, err)
		}
		copy(model[off:], p)
		// Read back a random window.
		rn := 1 + rng.IntN(testExtent)
		roff := rng.IntN(testSize - rn + 1)
		got := make([]byte, rn)
		if err := r.ReadAt(1, got, uint64(roff)); err != nil {
			t.Fatalf("ReadAt: %v", err)
		}
		if !bytes.Equal(got, model[roff:roff+rn]) {
			t.Fatalf("read %d bytes at %d after write %d: differs from model", rn, roff, i)
		}
	}
	if err := r.Flush(1); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(readAll(t, r, 1), model) {
		t.Fatal("whole replica differs from model")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r2, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if !bytes.Equal(readAll(t, r2, 1), model) {
		t.Fatal("reopened replica differs from model")
	}
}

// TestFencing checks every operation against a replica claimed at epoch 5:
// epoch 4 is fenced and epoch 6 not claimed, and neither changes a byte of
// the data or meta file.
func TestFencing(t *testing.T) {
	dir := t.TempDir()
	r := openTest(t, dir, testSize, testExtent)
	claimed(t, r, 5)
	seed := bytes.Repeat([]byte{0xAB}, 3*testExtent)
	if err := r.WriteAt(5, seed, testExtent, true); err != nil {
		t.Fatal(err)
	}
	if err := r.MarkClean(5, 1); err != nil {
		t.Fatal(err)
	}
	dataPath, metaPath := filepath.Join(dir, "r1", dataFileName), filepath.Join(dir, "r1", metaFileName)
	data0, meta0 := fileBytes(t, dataPath), fileBytes(t, metaPath)

	ops := []struct {
		name string
		run  func(epoch uint64) error
	}{
		{"WriteAt", func(e uint64) error { return r.WriteAt(e, []byte("fenced write"), 0, false) }},
		{"WriteAt FUA", func(e uint64) error { return r.WriteAt(e, []byte("fenced write"), 2*testExtent, true) }},
		{"ReadAt", func(e uint64) error { return r.ReadAt(e, make([]byte, 10), 0) }},
		{"Flush", func(e uint64) error { return r.Flush(e) }},
		{"Trim", func(e uint64) error { return r.Trim(e, testExtent, testExtent) }},
		{"WriteZeroes", func(e uint64) error { return r.WriteZeroes(e, testExtent, testExtent) }},
		{"Checksums", func(e uint64) error { _, err := r.Checksums(e, 0, 2); return err }},
		{"ReadExtent", func(e uint64) error { _, err := r.ReadExtent(e, 1); return err }},
		{"MarkClean", func(e uint64) error { return r.MarkClean(e, 9) }},
	}
	for _, op := range ops {
		t.Run(op.name, func(t *testing.T) {
			if err := op.run(4); !errors.Is(err, ErrFenced) {
				t.Errorf("epoch 4: got %v, want ErrFenced", err)
			}
			if err := op.run(6); !errors.Is(err, ErrNotClaimed) {
				t.Errorf("epoch 6: got %v, want ErrNotClaimed", err)
			}
		})
	}
	if err := r.Claim(4); !errors.Is(err, ErrFenced) {
		t.Errorf("Claim(4): got %v, want ErrFenced", err)
	}
	if err := r.Claim(5); err != nil {
		t.Errorf("Claim(5) again: %v", err)
	}
	if !bytes.Equal(fileBytes(t, dataPath), data0) {
		t.Error("data file changed")
	}
	if !bytes.Equal(fileBytes(t, metaPath), meta0) {
		t.Error("meta file changed")
	}
	if got := r.DirtyExtents(); len(got) != 0 {
		t.Errorf("DirtyExtents = %v, want none", got)
	}

	// The epoch is durable.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r2, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if got := r2.Epoch(); got != 5 {
		t.Fatalf("epoch after reopen = %d, want 5", got)
	}
	if err := r2.WriteAt(4, []byte("x"), 0, false); !errors.Is(err, ErrFenced) {
		t.Fatalf("after reopen, epoch 4: got %v, want ErrFenced", err)
	}
}

// TestFencingConcurrentClaim races writers of the old epoch against a Claim of
// a newer one: no old-epoch write that starts after Claim returns succeeds,
// and the data after Claim returns is never changed by the old epoch.
func TestFencingConcurrentClaim(t *testing.T) {
	r := openTest(t, t.TempDir(), testSize, testExtent)
	claimed(t, r, 1)
	for round := uint64(1); round <= 20; round++ {
		old, next := round, round+1
		var claimDone atomic.Bool
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var lateSuccess, lateTries atomic.Int64
		for w := 0; w < 4; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				p := make([]byte, 4096)
				for i := 0; ; i++ {
					select {
					case <-stop:
						return
					default:
					}
					for j := range p {
						p[j] = byte(i + w)
					}
					after := claimDone.Load()
					err := r.WriteAt(old, p, uint64(w*testExtent+(i%8)*4096), false)
					if after {
						lateTries.Add(1)
						if err == nil {
							lateSuccess.Add(1)
						}
					}
					if err != nil && !errors.Is(err, ErrFenced) {
						t.Errorf("write: %v", err)
						return
					}
				}
			}(w)
		}
		claimed(t, r, next)
		claimDone.Store(true)
		snapshot := readAll(t, r, next)
		// Let the old writers try a while longer.
		for lateTries.Load() < 40 {
			runtime.Gosched()
		}
		close(stop)
		wg.Wait()
		if n := lateSuccess.Load(); n != 0 {
			t.Fatalf("round %d: %d writes of epoch %d succeeded after Claim(%d) returned", round, n, old, next)
		}
		if !bytes.Equal(readAll(t, r, next), snapshot) {
			t.Fatalf("round %d: data changed after Claim(%d) returned", round, next)
		}
	}
}

func decodeMetaFile(t testing.TB, path string) metaState {
	t.Helper()
	m, err := decodeMeta(fileBytes(t, path))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// dirtyOnDisk is the dirty set a replica at dir would open with: its meta
// file's bitmap and its dirty-bits file's (dirtybits.go).
func dirtyOnDisk(t testing.TB, dir string) []uint64 {
	t.Helper()
	m := decodeMetaFile(t, filepath.Join(dir, metaFileName))
	if err := readDirtyBits(dir, m.Dirty, extentCount(m.Size, m.ExtentSize)); err != nil {
		t.Fatal(err)
	}
	return m.Dirty.list(0, 0)
}

func TestDirtyExtentsPersistedBeforeData(t *testing.T) {
	dir := t.TempDir()
	rdir := filepath.Join(dir, "r1")
	metaPath := filepath.Join(rdir, metaFileName)
	bitsPath := filepath.Join(rdir, dirtyBitsFileName)
	r, err := Open(dir, "r1", testSize, testExtent)
	if err != nil {
		t.Fatal(err)
	}
	r.markAhead = 0 // exact sets below; TestMarkAhead covers marking ahead
	claimed(t, r, 1)
	meta0, err := os.Stat(metaPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, []byte("extent zero"), 100, false); err != nil {
		t.Fatal(err)
	}
	// The dirty bit is on disk when the write returns, in the dirty-bits
	// file: the meta file is not rewritten for it.
	if got := dirtyOnDisk(t, rdir); !slices.Equal(got, []uint64{0}) {
		t.Fatalf("on disk after first write: dirty %v, want [0]", got)
	}
	if got := decodeMetaFile(t, metaPath).Dirty.list(0, 0); len(got) != 0 {
		t.Errorf("meta file after first write: dirty %v, want none (the marks go to %s)", got, dirtyBitsFileName)
	}
	meta1, err := os.Stat(metaPath)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(meta0, meta1) {
		t.Error("meta file rewritten for a write's dirty mark")
	}
	// Later marks overwrite the dirty-bits file in place.
	bits0, err := os.Stat(bitsPath)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, []byte("extent two"), 2*testExtent, false); err != nil {
		t.Fatal(err)
	}
	bits1, err := os.Stat(bitsPath)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(bits0, bits1) {
		t.Error("dirty-bits file replaced, not overwritten in place")
	}
	if got := dirtyOnDisk(t, rdir); !slices.Equal(got, []uint64{0, 2}) {
		t.Fatalf("on disk after a write to extent 2: dirty %v, want [0 2]", got)
	}
	// A second write to the same extent writes no mark.
	marks := r.marksWritten.Load()
	if err := r.WriteAt(1, []byte("extent zero again"), 5000, false); err != nil {
		t.Fatal(err)
	}
	if r.marksWritten.Load() != marks {
		t.Error("dirty-bits file written for a write to an extent already dirty")
	}

	// When the dirty bit cannot be persisted, the data is not written:
	// the dirty-bits file's descriptor is swapped for a read-only one, so
	// that the mark's write fails.
	ro, err := os.Open(bitsPath)
	if err != nil {
		t.Fatal(err)
	}
	rw := r.bits
	r.bits = ro
	before := make([]byte, 16)
	if err := r.ReadAt(1, before, 3*testExtent); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, []byte("must not land"), 3*testExtent, false); err == nil {
		t.Fatal("write succeeded although its dirty bit could not be persisted")
	}
	after := make([]byte, 16)
	if err := r.ReadAt(1, after, 3*testExtent); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("data written although its dirty bit could not be persisted")
	}
	r.bits = rw
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, []byte("extent three"), 3*testExtent+7, false); err != nil {
		t.Fatal(err)
	}
	// "Crash": close without a clean point.
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	r, err = Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.DirtyExtents(); !slices.Equal(got, []uint64{0, 2, 3}) {
		t.Fatalf("after reopen: DirtyExtents = %v, want [0 2 3]", got)
	}
	if err := r.MarkClean(1, 1); err != nil {
		t.Fatal(err)
	}
	if got := r.DirtyExtents(); len(got) != 0 {
		t.Fatalf("after MarkClean: DirtyExtents = %v, want []", got)
	}
	// The clean point cleared both files.
	if got := dirtyOnDisk(t, rdir); len(got) != 0 {
		t.Fatalf("on disk after MarkClean: dirty %v, want none", got)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r, err = Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := r.DirtyExtents(); len(got) != 0 {
		t.Fatalf("after MarkClean and reopen: DirtyExtents = %v, want []", got)
	}
	if info := r.Info(); info.CleanEpoch != 1 || info.CleanGeneration != 1 || info.DirtyExtents != 0 {
		t.Fatalf("Info = %+v, want clean point (1, 1) and no dirty extents", info)
	}
	// A write after the clean point dirties its extent again.
	if err := r.WriteAt(1, []byte("x"), 5*testExtent, false); err != nil {
		t.Fatal(err)
	}
	if got := r.DirtyExtents(); !slices.Equal(got, []uint64{5}) {
		t.Fatalf("DirtyExtents = %v, want [5]", got)
	}
}

func TestDirtyExtentsRangesAndConcurrency(t *testing.T) {
	r := openTest(t, t.TempDir(), testSize, testExtent)
	claimed(t, r, 1)
	// A write straddling extents 1 and 2, a trim over 4-6.
	if err := r.WriteAt(1, make([]byte, 10), 2*testExtent-5, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Trim(1, 4*testExtent, 3*testExtent); err != nil {
		t.Fatal(err)
	}
	if got := r.DirtyExtents(); !slices.Equal(got, []uint64{1, 2, 4, 5, 6}) {
		t.Fatalf("DirtyExtents = %v, want [1 2 4 5 6]", got)
	}
	// Concurrent first writes to the remaining extents share meta writes.
	var wg sync.WaitGroup
	for e := uint64(7); e < 16; e++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := r.WriteAt(1, []byte{1}, e*testExtent, false); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := r.WriteZeroes(1, 0, 1); err != nil {
		t.Fatal(err)
	}
	want := []uint64{0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}
	if got := r.DirtyExtents(); !slices.Equal(got, want) {
		t.Fatalf("DirtyExtents = %v, want %v", got, want)
	}
	if got := dirtyOnDisk(t, r.dir); !slices.Equal(got, want) {
		t.Fatalf("dirty on disk = %v, want %v", got, want)
	}
}

func TestMarkCleanGenerations(t *testing.T) {
	r := openTest(t, t.TempDir(), testSize, testExtent)
	claimed(t, r, 3)
	write := func(epoch, ext uint64) {
		t.Helper()
		if err := r.WriteAt(epoch, []byte{1}, ext*testExtent, false); err != nil {
			t.Fatal(err)
		}
	}
	write(3, 1)
	if err := r.MarkClean(3, 2); err != nil {
		t.Fatal(err)
	}
	write(3, 2)
	// A retried or late clean point changes nothing.
	for _, gen := range []uint64{2, 1} {
		if err := r.MarkClean(3, gen); err != nil {
			t.Fatal(err)
		}
		if got := r.DirtyExtents(); !slices.Equal(got, []uint64{2}) {
			t.Fatalf("after MarkClean(3, %d): DirtyExtents = %v, want [2]", gen, got)
		}
	}
	if err := r.MarkClean(3, 3); err != nil {
		t.Fatal(err)
	}
	if got := r.DirtyExtents(); len(got) != 0 {
		t.Fatalf("DirtyExtents = %v, want []", got)
	}
	// A new epoch starts its own generations.
	claimed(t, r, 4)
	write(4, 7)
	if err := r.MarkClean(4, 1); err != nil {
		t.Fatal(err)
	}
	if got := r.DirtyExtents(); len(got) != 0 {
		t.Fatalf("DirtyExtents = %v, want []", got)
	}
}

func allocatedBlocks(t testing.TB, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Blocks
}

func TestTrimAndWriteZeroesPunchHoles(t *testing.T) {
	for _, tc := range []struct {
		name  string
		punch func(r *Replica, epoch, off, n uint64) error
	}{
		{"Trim", (*Replica).Trim},
		{"WriteZeroes", (*Replica).WriteZeroes},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			r := openTest(t, dir, 4<<20, testExtent)
			claimed(t, r, 1)
			rng := rand.New(rand.NewPCG(3, 4))
			p := make([]byte, 2<<20)
			for i := range p {
				p[i] = byte(rng.Uint32()) | 1 // never zero
			}
			if err := r.WriteAt(1, p, 0, false); err != nil {
				t.Fatal(err)
			}
			if err := r.Flush(1); err != nil {
				t.Fatal(err)
			}
			dataPath := filepath.Join(dir, "r1", dataFileName)
			before := allocatedBlocks(t, dataPath)
			const off, n = 256 << 10, 1 << 20
			if err := tc.punch(r, 1, off, n); err != nil {
				t.Fatal(err)
			}
			if err := r.Flush(1); err != nil {
				t.Fatal(err)
			}
			after := allocatedBlocks(t, dataPath)
			// 1 MiB punched: 2048 fewer 512-byte blocks.
			if before-after < n/512 {
				t.Fatalf("allocated blocks %d → %d: want at least %d fewer", before, after, n/512)
			}
			got := readAll(t, r, 1)
			want := make([]byte, 4<<20)
			copy(want, p)
			clear(want[off : off+n])
			if !bytes.Equal(got, want) {
				t.Fatal("data after punching differs: the range must read as zeros and the rest stay")
			}
			if info := r.Info(); info.AllocatedBytes != uint64(after)*512 {
				t.Errorf("Info.AllocatedBytes = %d, want %d", info.AllocatedBytes, after*512)
			}
		})
	}
}

func TestChecksums(t *testing.T) {
	// Size with a short last extent.
	const size = 6*testExtent + 1024
	r := openTest(t, t.TempDir(), size, testExtent)
	claimed(t, r, 1)
	rng := rand.New(rand.NewPCG(5, 6))
	block := make([]byte, testExtent)
	for i := range block {
		block[i] = byte(rng.Uint32())
	}
	for _, e := range []uint64{1, 2} {
		if err := r.WriteAt(1, block, e*testExtent, false); err != nil {
			t.Fatal(err)
		}
	}
	sums, err := r.Checksums(1, 0, r.Extents())
	if err != nil {
		t.Fatal(err)
	}
	if len(sums) != 7 {
		t.Fatalf("%d checksums, want 7", len(sums))
	}
	zeroSum := crc32.Checksum(make([]byte, testExtent), castagnoli)
	want := []uint32{
		zeroSum,
		crc32.Checksum(block, castagnoli),
		crc32.Checksum(block, castagnoli),
		zeroSum, zeroSum, zeroSum,
		crc32.Checksum(make([]byte, 1024), castagnoli),
	}
	if !slices.Equal(sums, want) {
		t.Fatalf("checksums = %08x, want %08x", sums, want)
	}
	// One byte changed in extent 2: only its checksum moves.
	if err := r.WriteAt(1, []byte{block[77] ^ 0xFF}, 2*testExtent+77, false); err != nil {
		t.Fatal(err)
	}
	// A written-then-zeroed extent reads as zeros and sums like a hole.
	if err := r.WriteAt(1, block, 4*testExtent, false); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteZeroes(1, 4*testExtent, testExtent); err != nil {
		t.Fatal(err)
	}
	sums2, err := r.Checksums(1, 0, r.Extents())
	if err != nil {
		t.Fatal(err)
	}
	for i := range sums2 {
		if changed := sums2[i] != sums[i]; changed != (i == 2) {
			t.Errorf("extent %d: checksum %08x → %08x; only extent 2 should change", i, sums[i], sums2[i])
		}
	}
	part, err := r.Checksums(1, 5, 2)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(part, sums2[5:7]) {
		t.Errorf("Checksums(5, 2) = %08x, want %08x", part, sums2[5:7])
	}
	ext, err := r.ReadExtent(1, 6)
	if err != nil {
		t.Fatal(err)
	}
	if len(ext) != 1024 {
		t.Errorf("last extent is %d bytes, want 1024", len(ext))
	}
	ext, err = r.ReadExtent(1, 1)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ext, block) {
		t.Error("ReadExtent(1) differs from what was written")
	}
}

func TestOutOfRange(t *testing.T) {
	r := openTest(t, t.TempDir(), testSize, testExtent)
	claimed(t, r, 1)
	huge := uint64(math.MaxUint64 - 10)
	for _, tc := range []struct {
		name string
		run  func() error
	}{
		{"write at end", func() error { return r.WriteAt(1, []byte{1}, testSize, false) }},
		{"write across end", func() error { return r.WriteAt(1, make([]byte, 100), testSize-50, false) }},
		{"write offset overflow", func() error { return r.WriteAt(1, make([]byte, 100), huge, false) }},
		{"read across end", func() error { return r.ReadAt(1, make([]byte, 2), testSize-1) }},
		{"read offset overflow", func() error { return r.ReadAt(1, make([]byte, 100), huge) }},
		{"trim across end", func() error { return r.Trim(1, testSize-512, 1024) }},
		{"trim length overflow", func() error { return r.Trim(1, 512, math.MaxUint64) }},
		{"zeroes past end", func() error { return r.WriteZeroes(1, testSize+1, 0) }},
		{"checksums past end", func() error { _, err := r.Checksums(1, 10, 7); return err }},
		{"checksums count overflow", func() error { _, err := r.Checksums(1, 1, math.MaxUint64); return err }},
		{"read extent past end", func() error { _, err := r.ReadExtent(1, 16); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.run(); !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("got %v, want ErrOutOfRange", err)
			}
		})
	}
	if got := r.DirtyExtents(); len(got) != 0 {
		t.Fatalf("out-of-range requests dirtied extents %v", got)
	}
	// The edges themselves are fine.
	if err := r.WriteAt(1, []byte{1}, testSize-1, false); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, nil, testSize, false); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptMeta(t *testing.T) {
	valid := func() []byte {
		m := metaState{ID: "r1", Generation: "0123456789abcdef", Size: testSize, ExtentSize: testExtent, Epoch: 3, Dirty: make(bitmap, 2)}
		return encodeMeta(&m)
	}
	flip := func(i int) []byte { b := valid(); b[i] ^= 0x40; return b }
	resum := func(edit func(b []byte)) []byte {
		b := valid()
		edit(b)
		body := b[:len(b)-4]
		return append(body, crcBytes(body)...)
	}
	for _, tc := range []struct {
		name string
		meta []byte // nil: no meta file
		data int64  // data file size; -1: no data file
	}{
		{"garbage", []byte("this is not a meta file at all, not even close to one"), testSize},
		{"empty", []byte{}, testSize},
		{"truncated", valid()[:40], testSize},
		{"flipped size bit", flip(9), testSize},
		{"flipped checksum", flip(len(valid()) - 1), testSize},
		{"bad version", resum(func(b []byte) { b[5] = 9 }), testSize},
		{"bad extent size", resum(func(b []byte) { b[23] = 3 }), testSize},
		{"other id", resum(func(b []byte) { b[59] = 'x' }), testSize},
		// The generation follows the 2-byte id "r1": length at 60.
		{"generation past the end", resum(func(b []byte) { b[60] = 200 }), testSize},
		{"empty generation", resum(func(b []byte) { b[60] = 0 }), testSize},
		{"generation with a slash", resum(func(b []byte) { b[61] = '/' }), testSize},
		{"version 1 with a generation", resum(func(b []byte) { b[5] = 1 }), testSize},
		{"missing meta", nil, testSize},
		{"missing data", valid(), -1},
		{"short data", valid(), testSize - 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			rdir := filepath.Join(dir, "r1")
			if err := os.Mkdir(rdir, 0o700); err != nil {
				t.Fatal(err)
			}
			if tc.meta != nil {
				if err := os.WriteFile(filepath.Join(rdir, metaFileName), tc.meta, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			if tc.data >= 0 {
				if err := os.WriteFile(filepath.Join(rdir, dataFileName), nil, 0o600); err != nil {
					t.Fatal(err)
				}
				if err := os.Truncate(filepath.Join(rdir, dataFileName), tc.data); err != nil {
					t.Fatal(err)
				}
			}
			r, err := Open(dir, "r1", 0, 0)
			if err == nil {
				r.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("got %v, want ErrCorrupt", err)
			}
			t.Logf("%v", err)
		})
	}
}

func crcBytes(b []byte) []byte {
	s := crc32.Checksum(b, castagnoli)
	return []byte{byte(s >> 24), byte(s >> 16), byte(s >> 8), byte(s)}
}

func TestMetaRoundTripAndTruncation(t *testing.T) {
	m := metaState{ID: "vol-1.r_2", Generation: newGeneration(), Size: 1 << 30, ExtentSize: 1 << 20, Epoch: 7, CleanEpoch: 6, CleanGeneration: 42,
		Dirty: make(bitmap, bitmapLen(1024))}
	m.Dirty.set(0)
	m.Dirty.set(513)
	m.Dirty.set(1023)
	b := encodeMeta(&m)
	got, err := decodeMeta(b)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(m) {
		t.Fatalf("decoded %+v, want %+v", got, m)
	}
	for n := 0; n < len(b); n++ {
		if _, err := decodeMeta(b[:n]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("prefix of %d bytes: got %v, want ErrCorrupt", n, err)
		}
	}
	if _, err := decodeMeta(append(b, 0)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("trailing byte: got %v, want ErrCorrupt", err)
	}
}

func TestOpenArguments(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name       string
		id         string
		size, ext  uint64
		wantErr    error
		createHere bool
	}{
		{"empty id", "", testSize, 0, ErrInvalidArgument, false},
		{"path in id", "../x", testSize, 0, ErrInvalidArgument, false},
		{"hidden id", ".x", testSize, 0, ErrInvalidArgument, false},
		{"slash", "a/b", testSize, 0, ErrInvalidArgument, false},
		{"zero size new", "new", 0, 0, ErrNotFound, false},
		{"unaligned size", "odd", 1000, 0, ErrInvalidArgument, false},
		{"extent not power of two", "ext", testSize, 3 << 12, ErrInvalidArgument, false},
		{"extent too small", "ext2", testSize, 1024, ErrInvalidArgument, false},
		{"too many extents", "big", 1 << 50, 4096, ErrInvalidArgument, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Open(dir, tc.id, tc.size, tc.ext)
			if err == nil {
				r.Close()
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("got %v, want %v", err, tc.wantErr)
			}
		})
	}
	r, err := Open(dir, "r1", testSize, 0)
	if err != nil {
		t.Fatal(err)
	}
	if r.ExtentSize() != DefaultExtentSize {
		t.Errorf("extent size %d, want default %d", r.ExtentSize(), DefaultExtentSize)
	}
	if _, err := Open(dir, "r1", testSize, 0); !errors.Is(err, ErrBusy) {
		t.Errorf("second open while open: got %v, want ErrBusy", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir, "r1", 2*testSize, 0); !errors.Is(err, ErrExists) {
		t.Errorf("other size: got %v, want ErrExists", err)
	}
	if _, err := Open(dir, "r1", testSize, testExtent); !errors.Is(err, ErrExists) {
		t.Errorf("other extent size: got %v, want ErrExists", err)
	}
	r, err = Open(dir, "r1", testSize, DefaultExtentSize)
	if err != nil {
		t.Fatalf("same parameters: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(0, []byte{1}, 0, false); !errors.Is(err, ErrClosed) {
		t.Errorf("write after close: got %v, want ErrClosed", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() != "r1" {
			t.Errorf("leftover entry %q in the data directory", e.Name())
		}
	}
}

func TestRemove(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(dir, "r1", testSize, testExtent)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("data directory not empty after Remove: %v", entries)
	}
	if _, err := Open(dir, "r1", 0, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open after Remove: got %v, want ErrNotFound", err)
	}
}

// TestPieceLen checks how pwrite splits a write: pieces end at writeChunk
// boundaries, so none is larger than writeChunk or crosses one.
func TestPieceLen(t *testing.T) {
	for _, tc := range []struct{ off, left, want uint64 }{
		{0, 1 << 20, writeChunk},
		{0, 4096, 4096},
		{writeChunk - 512, 1024, 512},
		{writeChunk, 3 * writeChunk, writeChunk},
		{3*writeChunk + 7, 3 * writeChunk, writeChunk - 7},
	} {
		if got := pieceLen(tc.off, tc.left); got != tc.want {
			t.Errorf("pieceLen(%d, %d) = %d, want %d", tc.off, tc.left, got, tc.want)
		}
	}
}

// TestWriteAcrossChunks writes across writeChunk boundaries at odd offsets:
// every byte of the pieces pwrite splits a write into must land where the
// caller put it.
func TestWriteAcrossChunks(t *testing.T) {
	const size = 4 << 20
	r := openTest(t, t.TempDir(), size, 0)
	claimed(t, r, 1)
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, w := range []struct{ off, n uint64 }{
		{0, 1 << 20},                       // aligned, several chunks
		{writeChunk - 512, 1024},           // straddles one boundary
		{3*writeChunk + 7, 3 * writeChunk}, // unaligned start and end
		{size - writeChunk - 1, writeChunk + 1},
	} {
		p := make([]byte, w.n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if err := r.WriteAt(1, p, w.off, false); err != nil {
			t.Fatalf("write %d+%d: %v", w.off, w.n, err)
		}
		copy(want[w.off:], p)
	}
	got := make([]byte, size)
	if err := r.ReadAt(1, got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("first difference at byte %d: got %#x, want %#x", i, got[i], want[i])
	}
}

// TestWriteZerosFallback runs the zeroing used on file systems without hole
// punching, over an unaligned range spanning several writeChunks: the range
// reads back as zeros and the bytes around it are untouched.
func TestWriteZerosFallback(t *testing.T) {
	const size = 1 << 20
	r := openTest(t, t.TempDir(), size, 0)
	claimed(t, r, 1)
	want := bytes.Repeat([]byte{0xa5}, size)
	if err := r.WriteAt(1, want, 0, false); err != nil {
		t.Fatal(err)
	}
	off, n := uint64(writeChunk-100), uint64(3*writeChunk+200)
	if err := r.writeZeros(off, n); err != nil {
		t.Fatal(err)
	}
	clear(want[off : off+n])
	got := make([]byte, size)
	if err := r.ReadAt(1, got, 0); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(got, want); i >= 0 {
		t.Fatalf("first difference at byte %d: got %#x, want %#x", i, got[i], want[i])
	}
}

// firstDiff returns the first index where a and b (of equal length) differ,
// or -1.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1 // at memory speed; the loop below is slow under -race
	}
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestCleanPointInterruptedKeepsMarks: a crash after MarkClean rewrote the
// meta file but before it zeroed the dirty-bits file leaves the marks of
// the last period in place. The replica opens with them dirty: more to
// resync, nothing missed (dirtybits.go). Bits a stale file holds past the
// replica's extents are ignored.
func TestCleanPointInterruptedKeepsMarks(t *testing.T) {
	dir := t.TempDir()
	rdir := filepath.Join(dir, "r1")
	r := openTest(t, dir, testSize, testExtent)
	claimed(t, r, 1)
	for _, x := range []uint64{1, 5} {
		if err := r.WriteAt(1, []byte{7}, x*testExtent, false); err != nil {
			t.Fatal(err)
		}
	}
	marks := fileBytes(t, filepath.Join(rdir, dirtyBitsFileName))
	if err := r.MarkClean(1, 1); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	// The crash: the meta file says clean, the dirty-bits file still has
	// the marks, and one bit past the last extent.
	extents := extentCount(testSize, testExtent)
	stale := append(marks, 0xff)
	if extents%8 != 0 {
		stale[len(marks)-1] |= 0x80
	}
	must(t, os.WriteFile(filepath.Join(rdir, dirtyBitsFileName), stale, 0o600))
	r, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := r.DirtyExtents(); !slices.Equal(got, []uint64{1, 5}) {
		t.Fatalf("after an interrupted clean point: DirtyExtents = %v, want [1 5]", got)
	}
	// The next clean point clears them, in both files.
	if err := r.MarkClean(1, 2); err != nil {
		t.Fatal(err)
	}
	if got := dirtyOnDisk(t, rdir); len(got) != 0 {
		t.Fatalf("on disk after the next clean point: dirty %v, want none", got)
	}
}

// TestMarkAhead: a write into the extent after a dirty one (a sequential
// writer) marks the extents ahead of it too, durably, in the same persist;
// the next writes there need no mark. A write after a clean extent marks
// only its own.
func TestMarkAhead(t *testing.T) {
	const extent = 1 << 20 // 32 MiB ahead: 32 extents
	dir := t.TempDir()
	r := openTest(t, dir, 64*extent, extent)
	defer r.Close()
	claimed(t, r, 1)
	write := func(x uint64) {
		t.Helper()
		if err := r.WriteAt(1, []byte{1}, x*extent, false); err != nil {
			t.Fatal(err)
		}
	}
	write(10)
	if got := dirtyOnDisk(t, r.dir); !slices.Equal(got, []uint64{10}) {
		t.Fatalf("after a write to extent 10: dirty %v, want [10]", got)
	}
	write(11)
	var want []uint64
	for x := uint64(10); x <= 11+markAheadExtents(extent); x++ {
		want = append(want, x)
	}
	if got := dirtyOnDisk(t, r.dir); !slices.Equal(got, want) {
		t.Fatalf("after a write to extent 11: dirty %v, want 10-%d", got, want[len(want)-1])
	}
	// The last extents: marking stops at the end.
	write(62)
	write(63)
	if got := r.DirtyExtents(); !slices.Contains(got, 63) || slices.Contains(got, 61) {
		t.Fatalf("after writes to extents 62 and 63: dirty %v, want 62 and 63 and not 61", got)
	}
	marks := r.marksWritten.Load()
	for x := uint64(12); x <= 11+markAheadExtents(extent); x++ {
		write(x)
	}
	if n := r.marksWritten.Load() - marks; n != 0 {
		t.Errorf("the dirty-bits file was written %d times for extents marked ahead", n)
	}
}
