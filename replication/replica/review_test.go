package replica

// Regression tests for bugs a review of the layered replica found (each
// failed before its fix): merges racing each other, readers and copy-up;
// merges trusting the head's unsynced bits; a short last block; a merge
// into a layer shorter than the volume.

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
)

// crashCopy copies the replica directory as the page cache holds it now:
// the most favourable power loss (every page of every file reached the
// disk), after which the head's pending file names no boot (forgetBoot).
func crashCopy(t *testing.T, src, dst string) {
	t.Helper()
	copyFiles(t, src, dst)
	forgetBoot(t, dst)
}

// Deleting a snapshot into the head, whose newest write was not synced,
// then crashing: the block reads the flushed or the newer data, never the
// older snapshot's. (The merge counted the head's unsynced bit as holding
// the block, and dropped the snapshot's copy.)
func TestMergeIntoHeadSyncsItFirst(t *testing.T) {
	for _, sums := range []bool{false, true} {
		t.Run(fmt.Sprint("sums=", sums), func(t *testing.T) {
			dir := t.TempDir()
			r := openLayered(t, dir, sums)
			defer r.Close()
			p0 := bytes.Repeat([]byte{0xA0}, SumBlockSize)
			p1 := bytes.Repeat([]byte{0xB1}, SumBlockSize)
			p2 := bytes.Repeat([]byte{0xC2}, SumBlockSize)
			must(t, r.WriteAt(1, p0, 0, false))
			must(t, r.Snapshot(1, "s0")) // bottom: P0
			must(t, r.WriteAt(1, p1, 0, false))
			must(t, r.Flush(1))
			must(t, r.Snapshot(1, "s1"))        // layer 1: P1 (durable, flushed)
			must(t, r.WriteAt(1, p2, 0, false)) // head: P2, not flushed: pending bit
			must(t, r.DeleteSnapshot(1, "s1", nil))
			// Power loss now: the most favourable one, where every page reached the disk.
			crash := filepath.Join(t.TempDir(), "r1")
			crashCopy(t, filepath.Join(dir, "r1"), crash)
			r2, err := Open(filepath.Dir(crash), "r1", 0, 0)
			must(t, err)
			defer r2.Close()
			claimed(t, r2, 1)
			got := make([]byte, SumBlockSize)
			err = r2.ReadAt(1, got, 0)
			if err != nil {
				t.Fatalf("after the crash, block 0 does not read: %v", err)
			}
			switch {
			case bytes.Equal(got, p1), bytes.Equal(got, p2):
			case bytes.Equal(got, p0):
				t.Fatalf("after the crash block 0 reads P0, the snapshot s0's older contents: neither the flushed P1 nor the unflushed P2")
			default:
				t.Fatalf("after the crash block 0 reads %x...", got[:8])
			}
		})
	}
}

// Deleting a snapshot of a clone made larger than its source, once the
// source is gone: the merge writes into a layer shorter than the volume,
// which is extended first. (It wrote sums past the end of the mapping and
// panicked.)
func TestMergeIntoShorterLayer(t *testing.T) {
	dir := t.TempDir()
	a, err := OpenWith(dir, "a", testSize, testExtent, CreateOptions{Checksums: true})
	if err != nil {
		t.Fatal(err)
	}
	claimed(t, a, 1)
	must(t, a.WriteAt(1, randBytes(testSize, 1), 0, false))
	must(t, a.Snapshot(1, "s1"))
	must(t, a.WriteAt(1, randBytes(8192, 2), 0, false))
	must(t, a.Snapshot(1, "s2"))
	must(t, CreateFromSnapshot(dir, "b", a, "s2", 2*testSize))
	must(t, a.Remove()) // the source goes: b's layers are its own now
	b, err := Open(dir, "b", 0, 0)
	must(t, err)
	defer b.Close()
	claimed(t, b, 1)
	must(t, b.WriteAt(1, randBytes(SumBlockSize, 3), testSize+SumBlockSize, false))
	defer func() {
		if p := recover(); p != nil {
			t.Fatalf("DeleteSnapshot panicked (a process crash in the server): %v", p)
		}
	}()
	must(t, b.DeleteSnapshot(1, "s1", nil))
}

// Two deletions of neighbouring snapshots at once (CSI deletes run in
// parallel): they run one after the other, and the volume is intact. (They
// ran side by side, and one punched data the other had just moved.)
func TestConcurrentDeletesOfNeighbours(t *testing.T) {
	const size = 32 << 20
	for iter := range 3 {
		dir := t.TempDir()
		r := openClaimed(t, dir, size, false)
		model := randBytes(size, uint64(iter))
		must(t, r.WriteAt(1, model, 0, false))
		must(t, r.Snapshot(1, "s0"))
		p1 := randBytes(size, uint64(iter)+100) // layer 1 holds everything
		must(t, r.WriteAt(1, p1, 0, false))
		copy(model, p1)
		must(t, r.Snapshot(1, "s1"))
		for i := 0; i < size; i += 1 << 20 { // layer 2 holds a block per MiB
			q := randBytes(SumBlockSize, uint64(i))
			must(t, r.WriteAt(1, q, uint64(i), false))
			copy(model[i:], q)
		}
		must(t, r.Snapshot(1, "s2"))
		q := randBytes(SumBlockSize, 77)
		must(t, r.WriteAt(1, q, 8192, false))
		copy(model[8192:], q)
		must(t, r.Snapshot(1, "s3"))
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for j, id := range []string{"s1", "s2"} {
			wg.Add(1)
			go func() { defer wg.Done(); errs[j] = r.DeleteSnapshot(1, id, nil) }()
		}
		wg.Wait()
		for j, err := range errs {
			if err != nil {
				t.Fatalf("iteration %d: deletion %d: %v", iter, j, err)
			}
		}
		got := make([]byte, size)
		must(t, r.ReadAt(1, got, 0))
		if i := firstDiff(got, model); i >= 0 {
			t.Fatalf("iteration %d: the volume differs at byte %d after deleting s1 and s2 at once (delete errors: %v); got %x want %x",
				iter, i, errs, got[i:i+8], model[i:i+8])
		}
		r.Close()
	}
}

// Reads of the volume while a snapshot whose child is sealed is deleted
// read the right data throughout. (A read that resolved its blocks to the
// layer before the child's bits were set read the layer after the merge
// step had punched it.)
func TestReadsDuringMergeSeeNoHoles(t *testing.T) {
	const size = 64 << 20
	for iter := range 2 {
		dir := t.TempDir()
		r := openClaimed(t, dir, size, false)
		must(t, r.WriteAt(1, randBytes(size, 5), 0, false))
		must(t, r.Snapshot(1, "s0"))
		model := randBytes(size, uint64(iter)+50)
		must(t, r.WriteAt(1, model, 0, false))
		must(t, r.Snapshot(1, "s1"))
		q := randBytes(SumBlockSize, 9)
		must(t, r.WriteAt(1, q, 0, false))
		copy(model, q)
		must(t, r.Snapshot(1, "s2"))
		var stop atomic.Bool
		var bad atomic.Int64
		bad.Store(-1)
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(g), 3))
				p := make([]byte, 4<<20)
				for !stop.Load() {
					off := uint64(rng.IntN(size-len(p))) &^ (SumBlockSize - 1)
					if err := r.ReadAt(1, p, off); err != nil {
						t.Error(err)
						return
					}
					if i := firstDiff(p, model[off:off+uint64(len(p))]); i >= 0 {
						bad.Store(int64(off) + int64(i))
						t.Logf("wrong read at %d: got %x want %x (zeros: %v)", off+uint64(i), p[i:i+8], model[off+uint64(i):off+uint64(i)+8], bytes.Count(p[i:], []byte{0}) > len(p[i:])*9/10)
						return
					}
				}
			}()
		}
		must(t, r.DeleteSnapshot(1, "s1", nil))
		stop.Store(true)
		wg.Wait()
		if b := bad.Load(); b >= 0 {
			t.Fatalf("iteration %d: a read during the deletion returned wrong data at byte %d", iter, b)
		}
		got := make([]byte, size)
		must(t, r.ReadAt(1, got, 0))
		if !bytes.Equal(got, model) {
			t.Fatalf("volume differs after deletion")
		}
		r.Close()
	}
}

// A volume whose size is not a multiple of 4 KiB: deleting the newest
// snapshot moves the short last block into the head as far as the volume
// goes. (It moved a whole block, the head's file grew past the volume and
// the replica could not be opened again.)
func TestMergeOfShortLastBlock(t *testing.T) {
	for _, sums := range []bool{false, true} {
		t.Run(fmt.Sprint("sums=", sums), func(t *testing.T) {
			const size = testSize - 512
			dir := t.TempDir()
			r := openClaimed(t, dir, size, sums)
			tail := bytes.Repeat([]byte{7}, 3584)
			must(t, r.Snapshot(1, "s0"))
			must(t, r.WriteAt(1, tail, size-3584, false))
			must(t, r.Snapshot(1, "s1"))
			must(t, r.DeleteSnapshot(1, "s1", nil)) // child: the head
			st, err := os.Stat(r.chain.Path(r.chain.Head(), dataFileName))
			must(t, err)
			if st.Size() != size {
				t.Fatalf("after the merge the head's data file is %d bytes, the volume %d", st.Size(), size)
			}
			must(t, r.Close())
			r2, err := Open(dir, "r1", 0, 0)
			if err != nil {
				t.Fatalf("reopen after deleting a snapshot: %v", err)
			}
			r2.Close()
		})
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// openClaimed creates replica r1 of size bytes in dir, claimed at epoch 1.
func openClaimed(t testing.TB, dir string, size uint64, checksums bool) *Replica {
	t.Helper()
	r, err := OpenWith(dir, "r1", size, testExtent, CreateOptions{Checksums: checksums})
	must(t, err)
	claimed(t, r, 1)
	return r
}
