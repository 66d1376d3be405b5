package replica

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// unflushedOp is one step of the writes that the child of
// TestKillKeepsUnflushedWrites makes before it is killed.
type unflushedOp struct {
	kind string // "write", "fua", "zeroes", "trim" or "flush"
	off  uint64
	p    []byte // write, fua
	n    uint64 // zeroes, trim
}

// unflushedPlan: writes flushed and not, unaligned ones (copied up from the
// snapshot below), a write inside one block, write-zeroes and a trim (zero
// blocks with zero sums: after a process crash they must read as zeros
// too), a FUA write, and a block flushed and then written again.
func unflushedPlan() []unflushedOp {
	return []unflushedOp{
		{kind: "write", off: 3*SumBlockSize + 100, p: randBytes(5*SumBlockSize, 71)},
		{kind: "write", off: 5 * testExtent, p: randBytes(testExtent, 72)},
		{kind: "flush"},
		{kind: "fua", off: 14 * testExtent, p: randBytes(2*SumBlockSize, 75)}, // syncs the head
		{kind: "write", off: 9*testExtent + 8*SumBlockSize, p: randBytes(10*SumBlockSize, 73)},
		{kind: "write", off: 2*testExtent + 200, p: randBytes(300, 74)},
		{kind: "zeroes", off: 12 * testExtent, n: 3 * SumBlockSize},
		{kind: "trim", off: 13*testExtent + 1000, n: 4 * SumBlockSize},
		{kind: "write", off: 4*SumBlockSize + 10, p: randBytes(100, 76)},
	}
}

// applyPlan makes the plan's writes into r, or into the model m if r is
// nil.
func applyPlan(r *Replica, m []byte) error {
	for _, op := range unflushedPlan() {
		var err error
		switch {
		case r == nil && op.p != nil:
			copy(m[op.off:], op.p)
		case r == nil && op.n > 0:
			clear(m[op.off : op.off+op.n])
		case r == nil: // a flush changes no contents
		case op.kind == "write", op.kind == "fua":
			err = r.WriteAt(1, op.p, op.off, op.kind == "fua")
		case op.kind == "zeroes":
			err = r.WriteZeroes(1, op.off, op.n)
		case op.kind == "trim":
			err = r.Trim(1, op.off, op.n)
		case op.kind == "flush":
			err = r.Flush(1)
		}
		if err != nil {
			return fmt.Errorf("%s at %d: %w", op.kind, op.off, err)
		}
	}
	return nil
}

// writeUnflushed is the child of TestKillKeepsUnflushedWrites: it makes the
// plan's writes into replica r1 in dir, says "written" and waits to be
// killed, the replica open.
func writeUnflushed(dir string) int {
	r, err := Open(dir, "r1", 0, 0)
	if err == nil {
		err = applyPlan(r, nil)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("written")
	time.Sleep(time.Minute)
	return 1 // not killed
}

// TestKillKeepsUnflushedWrites: the node agent's process is killed
// (SIGKILL) after writes into a replica with a snapshot that no Flush made
// durable; opened again, the replica reads every one of them (the bug: the
// head's pending bits lived in anonymous memory, and the blocks read their
// old contents from the snapshot's layer, which resync then spread to the
// other replicas). The open settles them durably: a power loss right after
// it changes nothing.
func TestKillKeepsUnflushedWrites(t *testing.T) {
	for _, sums := range []bool{true, false} {
		t.Run(fmt.Sprint("sums=", sums), func(t *testing.T) {
			dir := t.TempDir()
			r := openLayered(t, dir, sums)
			old := randBytes(testSize, 70)
			must(t, r.WriteAt(1, old, 0, false))
			must(t, r.Snapshot(1, "s"))
			must(t, r.Close())

			killChildAt(t, "write-unflushed "+dir, "written")

			want := bytes.Clone(old)
			must(t, applyPlan(nil, want))
			r, err := Open(dir, "r1", 0, 0)
			if err != nil {
				t.Fatalf("reopen after the kill: %v", err)
			}
			defer r.Close()
			if i := firstDiff(readAll(t, r, 1), want); i >= 0 {
				t.Fatalf("after the kill the volume differs at byte %d (block %d)", i, i/SumBlockSize)
			}
			if i := firstDiff(readSnap(t, r, "s"), old); i >= 0 {
				t.Fatalf("after the kill snapshot s differs at byte %d", i)
			}
			st, ok := r.UncleanStop()
			// 10 + 1 + 3 + 5 blocks not held before, and one block held
			// (flushed) and written again.
			if !ok || !st.SameBoot || st.FellBack != 0 || st.Kept != 19 || st.Pending != 20 {
				t.Fatalf("UncleanStop() = %+v, %v; want 20 blocks pending, 19 kept after a process crash, none fallen back", st, ok)
			}
			dirty := map[uint64]bool{}
			for _, e := range r.DirtyExtents() {
				dirty[e] = true
			}
			for _, e := range []uint64{2, 9, 12, 13, 14} {
				if !dirty[e] {
					t.Fatalf("extent %d, written and not flushed, is not dirty: %v", e, r.DirtyExtents())
				}
			}
			// Settled durably: a power loss now that keeps nothing of the
			// pending file reads the same.
			lost := filepath.Join(t.TempDir(), "r1")
			crashCopy(t, filepath.Join(dir, "r1"), lost)
			removePending(t, lost)
			r2, err := Open(filepath.Dir(lost), "r1", 0, 0)
			must(t, err)
			defer r2.Close()
			if i := firstDiff(readAll(t, r2, 1), want); i >= 0 {
				t.Fatalf("after the open and a power loss the volume differs at byte %d", i)
			}
			if _, ok := r2.UncleanStop(); ok {
				t.Fatal("a second open found writes to settle")
			}
		})
	}
}

// forgetBoot makes the pending files in dir name no boot, as after a power
// loss: the next open cannot take their bits for a process crash's.
func forgetBoot(t *testing.T, dir string) {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.pending"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		pokeFile(t, name, 0, make([]byte, 128))
	}
}

// removePending removes the pending files in dir: none reached the disk.
func removePending(t *testing.T, dir string) {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.pending"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		must(t, os.Remove(name))
	}
}

func pokeFile(t *testing.T, path string, off int64, p []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

func punchPath(t *testing.T, path string, off, n int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	must(t, err)
	defer f.Close()
	must(t, unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n))
}

// powerLossCase is a replica with a snapshot of random data, blocks
// 10-29 written into the head since, block 40 written as zeros and 41
// zeroed by WriteZeroes, none flushed, copied as a power loss that wrote
// every page back leaves it (the pending bits too, under a header of the
// boot before). It returns the copy's directory, the head's data and sums
// files in it, and the volume before and after the writes.
func powerLossCase(t *testing.T, sums, sameBoot bool) (dir, data, sumsFile string, old, written []byte) {
	t.Helper()
	src := t.TempDir()
	r := openLayered(t, src, sums)
	defer r.Close()
	old = randBytes(testSize, 80)
	must(t, r.WriteAt(1, old, 0, false))
	must(t, r.Snapshot(1, "s"))
	written = bytes.Clone(old)
	p := randBytes(20*SumBlockSize, 81)
	must(t, r.WriteAt(1, p, 10*SumBlockSize, false))
	copy(written[10*SumBlockSize:], p)
	must(t, r.WriteAt(1, make([]byte, SumBlockSize), 40*SumBlockSize, false))
	must(t, r.WriteZeroes(1, 41*SumBlockSize, SumBlockSize))
	clear(written[40*SumBlockSize : 42*SumBlockSize])
	dir = t.TempDir()
	crashCopy(t, filepath.Join(src, "r1"), filepath.Join(dir, "r1"))
	if sameBoot {
		copyPendingHeaders(t, filepath.Join(src, "r1"), filepath.Join(dir, "r1"))
	}
	head := r.chain.Head()
	data = filepath.Join(dir, "r1", filepath.Base(r.chain.Path(head, dataFileName)))
	sumsFile = filepath.Join(dir, "r1", filepath.Base(r.chain.Path(head, sumsFileName)))
	return dir, data, sumsFile, old, written
}

// copyPendingHeaders gives the pending files in dst the headers of src's:
// a copy made as a process crash leaves the files, in this boot.
func copyPendingHeaders(t *testing.T, src, dst string) {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(src, "*.pending"))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		pokeFile(t, filepath.Join(dst, filepath.Base(name)), 0, fileBytes(t, name)[:128])
	}
}

// checkBlocks opens replica r1 in dir and checks that each block reads as
// in written, except those in fellBack, which read as in old.
func checkBlocks(t *testing.T, dir string, old, written []byte, fellBack map[uint64]bool) UncleanStop {
	t.Helper()
	r, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatalf("open after the power loss: %v", err)
	}
	defer r.Close()
	got := readAll(t, r, 1)
	for b := range uint64(testSize / SumBlockSize) {
		want, what := written, "as written"
		if fellBack[b] {
			want, what = old, "its old contents"
		}
		blk := func(p []byte) []byte { return p[b*SumBlockSize : (b+1)*SumBlockSize] }
		if !bytes.Equal(blk(got), blk(want)) {
			t.Fatalf("block %d does not read %s", b, what)
		}
	}
	st, _ := r.UncleanStop()
	return st
}

// TestPowerLossKeepsOnlyIntactBlocks: after a power loss (the pending bits
// reached the disk, under the header of another boot), a block whose data
// did not reach the head's file, or reached it torn, reads its old contents
// from the snapshot below, not zeros or garbage; so does a zero block with
// a zero sum, which is also what a block reads when neither its data nor
// its sum reached the disk (an unflushed write of zeros may read old). The
// other blocks read as written.
func TestPowerLossKeepsOnlyIntactBlocks(t *testing.T) {
	dir, data, sums, old, written := powerLossCase(t, true, false)
	pokeFile(t, data, 12*SumBlockSize, make([]byte, SumBlockSize))  // data lost, sum kept
	pokeFile(t, data, 13*SumBlockSize+77, []byte{0xff, 0x00, 0xff}) // torn
	punchPath(t, data, 14*SumBlockSize, SumBlockSize)               // neither data
	pokeFile(t, sums, 4*14, make([]byte, 4))                        // nor sum
	punchPath(t, data, 15*SumBlockSize, SumBlockSize)               // data lost, sum kept
	// The dirty marks are lost, in the meta file and the dirty-bits file
	// (they cannot be, as a write marks its extents dirty first; the open
	// marks them all the same).
	meta := filepath.Join(dir, "r1", metaFileName)
	m := decodeMetaFile(t, meta)
	clear(m.Dirty)
	must(t, writeFileAtomic(filepath.Dir(meta), metaFileName, encodeMeta(&m)))
	must(t, os.Remove(filepath.Join(dir, "r1", dirtyBitsFileName)))
	fellBack := map[uint64]bool{12: true, 13: true, 14: true, 15: true, 40: true, 41: true}
	st := checkBlocks(t, dir, old, written, fellBack)
	if st.SameBoot || st.FellBack != 6 || st.Kept != 16 {
		t.Fatalf("UncleanStop() = %+v, want 16 blocks kept and 6 fallen back after a power loss", st)
	}
	// Blocks 10-29 and 40-41: extents 0, 1 and 2, kept and fallen back alike.
	if got := decodeMetaFile(t, meta).Dirty.list(0, 0); st.DirtyAdded != 3 || fmt.Sprint(got) != "[0 1 2]" {
		t.Fatalf("dirty extents %v (%d added), want [0 1 2] (3 added)", got, st.DirtyAdded)
	}
}

// TestProcessCrashKeepsZeroBlocks: the same files seen as a process crash
// leaves them (the header names this boot): the zero blocks are kept, and
// only the blocks that fail their sums fall back.
func TestProcessCrashKeepsZeroBlocks(t *testing.T) {
	dir, data, sums, old, written := powerLossCase(t, true, true)
	pokeFile(t, data, 13*SumBlockSize+77, []byte{0xff, 0x00, 0xff})
	punchPath(t, data, 14*SumBlockSize, SumBlockSize)
	pokeFile(t, sums, 4*14, make([]byte, 4))
	written = bytes.Clone(written)
	clear(written[14*SumBlockSize : 15*SumBlockSize]) // what a zero block with a zero sum is
	st := checkBlocks(t, dir, old, written, map[uint64]bool{13: true})
	if !st.SameBoot || st.FellBack != 1 || st.Kept != 21 {
		t.Fatalf("UncleanStop() = %+v, want 21 blocks kept and 1 fallen back after a process crash", st)
	}
}

// TestUncleanStopWithoutChecksums: without checksums nothing tells a
// block's data from what a power loss left of it. After a process crash
// every block is kept; after a power loss every block but those where the
// head's data file is a hole (nothing reached it), which read their old
// contents: a block torn or zeroed on the way reads as the disk has it.
func TestUncleanStopWithoutChecksums(t *testing.T) {
	t.Run("process crash", func(t *testing.T) {
		dir, data, _, old, written := powerLossCase(t, false, true)
		punchPath(t, data, 15*SumBlockSize, SumBlockSize)
		written = bytes.Clone(written)
		clear(written[15*SumBlockSize : 16*SumBlockSize])
		st := checkBlocks(t, dir, old, written, nil)
		if !st.SameBoot || st.FellBack != 0 || st.Kept != 22 {
			t.Fatalf("UncleanStop() = %+v, want all 22 blocks kept", st)
		}
	})
	t.Run("power loss", func(t *testing.T) {
		dir, data, _, old, written := powerLossCase(t, false, false)
		torn := []byte{0xff, 0x00, 0xff}
		pokeFile(t, data, 13*SumBlockSize+77, torn)
		punchPath(t, data, 15*SumBlockSize, SumBlockSize)
		written = bytes.Clone(written)
		copy(written[13*SumBlockSize+77:], torn)
		// 41 was zeroed by a punch: a hole (which the copy did not keep),
		// like a write that never reached the disk. 40 was written as
		// zeros: data, kept.
		punchPath(t, data, 41*SumBlockSize, SumBlockSize)
		st := checkBlocks(t, dir, old, written, map[uint64]bool{15: true, 41: true})
		if st.SameBoot || st.FellBack != 2 || st.Kept != 20 {
			t.Fatalf("UncleanStop() = %+v, want 20 blocks kept and 2 fallen back", st)
		}
	})
}

// TestSnapshotAndGrowKeepUnflushedWrites: writes not flushed before a Grow,
// and after it past the old end, survive a process crash; a Snapshot makes
// the head's writes durable before it seals them, so a power loss keeping
// none of the pending bits after it loses only the writes made since.
func TestSnapshotAndGrowKeepUnflushedWrites(t *testing.T) {
	src := t.TempDir()
	r := openLayered(t, src, true)
	defer r.Close()
	model := randBytes(testSize, 90)
	must(t, r.WriteAt(1, model, 0, false))
	must(t, r.Snapshot(1, "s"))
	write := func(p []byte, off uint64) {
		t.Helper()
		must(t, r.WriteAt(1, p, off, false))
		copy(model[off:], p)
	}
	write(randBytes(3*SumBlockSize, 91), 2*testExtent+5)
	must(t, r.Grow(1, 2*testSize))
	model = append(model, make([]byte, testSize)...)
	write(randBytes(2*SumBlockSize, 92), testSize+7*SumBlockSize)
	write(randBytes(SumBlockSize, 93), testSize-SumBlockSize/2)

	reopenCopy := func(when string, crash func(dir string)) *Replica {
		t.Helper()
		dir := filepath.Join(t.TempDir(), "r1")
		crashCopy(t, filepath.Join(src, "r1"), dir)
		crash(dir)
		r2, err := Open(filepath.Dir(dir), "r1", 0, 0)
		if err != nil {
			t.Fatalf("%s: open: %v", when, err)
		}
		t.Cleanup(func() { r2.Close() })
		return r2
	}
	processCrash := func(dir string) { copyPendingHeaders(t, filepath.Join(src, "r1"), dir) }
	r2 := reopenCopy("a process crash after a grow", processCrash)
	if i := firstDiff(readAll(t, r2, 1), model); i >= 0 {
		t.Fatalf("after a grow and a process crash the volume differs at byte %d", i)
	}

	beforeSnap := bytes.Clone(model)
	must(t, r.Snapshot(1, "t"))
	after := randBytes(2*SumBlockSize, 94)
	write(after, 5*testExtent)
	r3 := reopenCopy("a process crash after a snapshot", processCrash)
	if i := firstDiff(readAll(t, r3, 1), model); i >= 0 {
		t.Fatalf("after a snapshot and a process crash the volume differs at byte %d", i)
	}
	if i := firstDiff(readSnap(t, r3, "t"), beforeSnap); i >= 0 {
		t.Fatalf("after a snapshot and a process crash snapshot t differs at byte %d", i)
	}
	r4 := reopenCopy("a power loss after a snapshot", func(dir string) { removePending(t, dir) })
	if i := firstDiff(readAll(t, r4, 1), beforeSnap); i >= 0 {
		t.Fatalf("after a snapshot and a power loss keeping no pending bit the volume differs at byte %d (want the snapshot's contents)", i)
	}
}
