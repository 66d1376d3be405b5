package replica

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// openLayered opens replica r1 under dir, with or without checksums,
// claimed at epoch 1.
func openLayered(t testing.TB, dir string, checksums bool) *Replica {
	t.Helper()
	r, err := OpenWith(dir, "r1", testSize, testExtent, CreateOptions{Checksums: checksums})
	if err != nil {
		t.Fatalf("OpenWith: %v", err)
	}
	claimed(t, r, 1)
	return r
}

func readSnap(t testing.TB, r *Replica, id string) []byte {
	t.Helper()
	p := make([]byte, r.Size())
	if err := r.ReadSnapshotAt(1, id, p, 0); err != nil {
		t.Fatalf("ReadSnapshotAt %s: %v", id, err)
	}
	return p
}

// TestSnapshotModel: random writes (unaligned, across blocks), trims,
// snapshots, deletions of random snapshots and reopenings, with and
// without checksums; after each step the replica and every snapshot read
// what a model of them holds, and every read verifies.
func TestSnapshotModel(t *testing.T) {
	for _, checksums := range []bool{true, false} {
		t.Run(fmt.Sprint("checksums=", checksums), func(t *testing.T) {
			dir := t.TempDir()
			r := openLayered(t, dir, checksums)
			defer func() { _ = r.Close() }()
			rng := rand.New(rand.NewPCG(11, 12))
			head := make([]byte, testSize)
			snaps := map[string][]byte{}
			var order []string
			next := 0
			for step := range 60 {
				switch op := rng.IntN(12); {
				case op < 6:
					n := 1 + rng.IntN(3*SumBlockSize)
					off := rng.IntN(testSize - n)
					p := randBytes(n, uint64(step))
					if err := r.WriteAt(1, p, uint64(off), rng.IntN(4) == 0); err != nil {
						t.Fatalf("step %d: write: %v", step, err)
					}
					copy(head[off:], p)
				case op < 7:
					n := 1 + rng.IntN(3*SumBlockSize)
					off := rng.IntN(testSize - n)
					if err := r.Trim(1, uint64(off), uint64(n)); err != nil {
						t.Fatalf("step %d: trim: %v", step, err)
					}
					clear(head[off : off+n])
				case op < 9:
					id := fmt.Sprint("s", next)
					next++
					if err := r.Snapshot(1, id); err != nil {
						t.Fatalf("step %d: snapshot: %v", step, err)
					}
					snaps[id] = bytes.Clone(head)
					order = append(order, id)
				case op < 11 && len(order) > 0:
					i := rng.IntN(len(order))
					id := order[i]
					if err := r.DeleteSnapshot(1, id, nil); err != nil {
						t.Fatalf("step %d: delete snapshot %s: %v", step, id, err)
					}
					delete(snaps, id)
					order = append(order[:i:i], order[i+1:]...)
				default:
					if err := r.Close(); err != nil {
						t.Fatal(err)
					}
					var err error
					if r, err = Open(dir, "r1", 0, 0); err != nil {
						t.Fatalf("step %d: reopen: %v", step, err)
					}
				}
				if i := firstDiff(readAll(t, r, 1), head); i >= 0 {
					t.Fatalf("step %d: the volume differs first at byte %d", step, i)
				}
				for id, want := range snaps {
					if i := firstDiff(readSnap(t, r, id), want); i >= 0 {
						t.Fatalf("step %d: snapshot %s differs first at byte %d", step, id, i)
					}
				}
				if got := r.Snapshots(); len(got) != len(order) {
					t.Fatalf("step %d: Snapshots() = %v, want %v", step, got, order)
				}
			}
		})
	}
}

// TestSnapshotDigestsMatchAFlatReplica: the extent digests that resync and
// scrub compare are those of what the replica reads, however its layers
// hold it: a replica with snapshots and one without, written the same,
// agree; and rehashing a layered replica's dirty extents changes nothing.
func TestSnapshotDigestsMatchAFlatReplica(t *testing.T) {
	layered := openLayered(t, t.TempDir(), true)
	defer layered.Close()
	flat := openLayered(t, t.TempDir(), true)
	defer flat.Close()
	write := func(p []byte, off uint64) {
		for _, r := range []*Replica{layered, flat} {
			if err := r.WriteAt(1, p, off, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(randBytes(testSize, 1), 0)
	if err := layered.Snapshot(1, "a"); err != nil {
		t.Fatal(err)
	}
	write(randBytes(3*SumBlockSize+5, 2), 5*testExtent-100)
	if err := layered.Trim(1, 9*testExtent+7, 2*testExtent); err != nil {
		t.Fatal(err)
	}
	if err := flat.Trim(1, 9*testExtent+7, 2*testExtent); err != nil {
		t.Fatal(err)
	}
	want, err := flat.Checksums(1, 0, flat.Extents())
	if err != nil {
		t.Fatal(err)
	}
	got, err := layered.Checksums(1, 0, layered.Extents())
	if err != nil {
		t.Fatal(err)
	}
	if !equalU32(got, want) {
		t.Fatalf("extent digests of the layered replica %x, of the flat one %x", got, want)
	}
	if err := layered.Rehash(1, 0, layered.Extents()); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(readAll(t, layered, 1), readAll(t, flat, 1)); i >= 0 {
		t.Fatalf("after Rehash the replicas differ at byte %d", i)
	}
}

func equalU32(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestCorruptSnapshotLayerIsCaught: a flipped bit in a sealed layer's data
// fails the reads that reach it (of the snapshot and of the volume where
// the head does not hold the block) with ErrChecksum.
func TestCorruptSnapshotLayerIsCaught(t *testing.T) {
	dir := t.TempDir()
	r := openLayered(t, dir, true)
	defer r.Close()
	if err := r.WriteAt(1, randBytes(testSize, 3), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "a"); err != nil {
		t.Fatal(err)
	}
	flipByte(t, dir, 3*SumBlockSize+10) // the bottom layer's "data" file
	p := make([]byte, SumBlockSize)
	if err := r.ReadSnapshotAt(1, "a", p, 3*SumBlockSize); !errors.Is(err, ErrChecksum) {
		t.Fatalf("snapshot read of the corrupt block: %v, want ErrChecksum", err)
	}
	if err := r.ReadAt(1, p, 3*SumBlockSize); !errors.Is(err, ErrChecksum) {
		t.Fatalf("volume read of the corrupt block: %v, want ErrChecksum", err)
	}
	// Overwritten in the head, the block reads the new data.
	q := randBytes(SumBlockSize, 4)
	if err := r.WriteAt(1, q, 3*SumBlockSize, false); err != nil {
		t.Fatal(err)
	}
	if err := r.ReadAt(1, p, 3*SumBlockSize); err != nil || !bytes.Equal(p, q) {
		t.Fatalf("read of the overwritten block: %v", err)
	}
}

// TestDeleteSnapshotFreesItsSpace: deleting a snapshot whose blocks were
// all overwritten frees them; deleting one whose blocks were not moves
// them into the head (the space stays, the contents too).
func TestDeleteSnapshotFreesItsSpace(t *testing.T) {
	dir := t.TempDir()
	r := openLayered(t, dir, false)
	defer r.Close()
	full := randBytes(testSize, 5)
	if err := r.WriteAt(1, full, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "old"); err != nil {
		t.Fatal(err)
	}
	newer := randBytes(testSize, 6)
	if err := r.WriteAt(1, newer, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Flush(1); err != nil {
		t.Fatal(err)
	}
	before := r.Info().AllocatedBytes
	var calls int
	if err := r.DeleteSnapshot(1, "old", func(done, total uint64) { calls++ }); err != nil {
		t.Fatal(err)
	}
	after := r.Info().AllocatedBytes
	if before-after < testSize {
		t.Fatalf("deleting a wholly overwritten snapshot freed %d bytes (from %d to %d), want at least %d", before-after, before, after, testSize)
	}
	if calls == 0 {
		t.Fatal("no progress reported")
	}
	if i := firstDiff(readAll(t, r, 1), newer); i >= 0 {
		t.Fatalf("the volume changed at byte %d", i)
	}
	if err := r.ReadSnapshotAt(1, "old", make([]byte, 10), 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read of a deleted snapshot: %v, want ErrNotFound", err)
	}
}

// TestSnapshotArguments: a duplicate id, a bad id and a stale epoch are
// refused and change nothing.
func TestSnapshotArguments(t *testing.T) {
	r := openLayered(t, t.TempDir(), true)
	defer r.Close()
	if err := r.Snapshot(1, "a"); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "a"); !errors.Is(err, ErrSnapshotExists) {
		t.Fatalf("duplicate snapshot id: %v, want ErrExists", err)
	}
	if err := r.Snapshot(1, "../x"); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("bad snapshot id: %v, want ErrInvalidArgument", err)
	}
	claimed(t, r, 2)
	if err := r.Snapshot(1, "b"); !errors.Is(err, ErrFenced) {
		t.Fatalf("snapshot at a stale epoch: %v, want ErrFenced", err)
	}
	if got := r.Snapshots(); len(got) != 1 || got[0] != "a" {
		t.Fatalf("Snapshots() = %v", got)
	}
}

// TestRestoreSharesLayers: a replica restored from a snapshot, larger than
// the source, reads the snapshot (and zeros past its end) at once, shares
// the source's layers by hard link instead of copying them, takes writes
// of its own, and keeps its contents when the source deletes the snapshot
// and is removed altogether.
func TestRestoreSharesLayers(t *testing.T) {
	for _, checksums := range []bool{true, false} {
		t.Run(fmt.Sprint("checksums=", checksums), func(t *testing.T) {
			dir := t.TempDir()
			src := openLayered(t, dir, checksums)
			defer src.Close()
			a := randBytes(testSize, 7)
			if err := src.WriteAt(1, a, 0, false); err != nil {
				t.Fatal(err)
			}
			if err := src.Snapshot(1, "s1"); err != nil {
				t.Fatal(err)
			}
			b := randBytes(testSize/2, 8)
			if err := src.WriteAt(1, b, 100, false); err != nil {
				t.Fatal(err)
			}
			const bigger = 2 * testSize
			if err := CreateFromSnapshot(dir, "r2", src, "s1", bigger); err != nil {
				t.Fatalf("CreateFromSnapshot: %v", err)
			}
			if err := CreateFromSnapshot(dir, "r3", src, "s1", testSize/2); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("restore into a smaller volume: %v, want ErrInvalidArgument", err)
			}
			if err := CreateFromSnapshot(dir, "r3", src, "nope", 0); !errors.Is(err, ErrNotFound) {
				t.Fatalf("restore of an unknown snapshot: %v, want ErrNotFound", err)
			}
			r2, err := Open(dir, "r2", 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer r2.Close()
			claimed(t, r2, 1)
			want := make([]byte, bigger)
			copy(want, a)
			if i := firstDiff(readAll(t, r2, 1), want); i >= 0 {
				t.Fatalf("the restored replica differs from the snapshot at byte %d", i)
			}
			if r2.Generation() == src.Generation() {
				t.Fatal("the restored replica has the source's generation")
			}
			// The data was linked, not copied: the shared data file has
			// two links.
			var st unix.Stat_t
			if err := unix.Stat(filepath.Join(dir, "r1", dataFileName), &st); err != nil || st.Nlink != 2 {
				t.Fatalf("the source's first data file has %d links (%v), want 2", st.Nlink, err)
			}
			c := randBytes(3*SumBlockSize, 9)
			if err := r2.WriteAt(1, c, testSize-SumBlockSize, false); err != nil {
				t.Fatal(err)
			}
			copy(want[testSize-SumBlockSize:], c)
			// The source goes on as before, then drops the snapshot and
			// itself; the restored replica keeps its contents.
			srcWant := bytes.Clone(a)
			copy(srcWant[100:], b)
			if i := firstDiff(readAll(t, src, 1), srcWant); i >= 0 {
				t.Fatalf("the source changed at byte %d", i)
			}
			if err := src.DeleteSnapshot(1, "s1", nil); err != nil {
				t.Fatalf("the source deletes its shared snapshot: %v", err)
			}
			if i := firstDiff(readAll(t, src, 1), srcWant); i >= 0 {
				t.Fatalf("the source changed at byte %d after deleting its snapshot", i)
			}
			if err := src.Remove(); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(readAll(t, r2, 1), want); i >= 0 {
				t.Fatalf("the restored replica changed at byte %d after its source went", i)
			}
			if err := r2.Close(); err != nil {
				t.Fatal(err)
			}
			if r2, err = Open(dir, "r2", 0, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(readAll(t, r2, 1), want); i >= 0 {
				t.Fatalf("the restored replica differs at byte %d after reopening", i)
			}
		})
	}
}

// TestInterruptedDeleteResumes: a deletion stopped halfway (the process
// died after some steps, with part of the layer's data already freed)
// leaves the volume and the other snapshots intact after reopening, and a
// new DeleteSnapshot finishes it.
func TestInterruptedDeleteResumes(t *testing.T) {
	dir := t.TempDir()
	r := openLayered(t, dir, true)
	a := randBytes(testSize, 10)
	if err := r.WriteAt(1, a, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "a"); err != nil {
		t.Fatal(err)
	}
	b := randBytes(testSize/3, 11)
	if err := r.WriteAt(1, b, testSize/2, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "b"); err != nil {
		t.Fatal(err)
	}
	c := randBytes(testSize/4, 12)
	if err := r.WriteAt(1, c, 1000, false); err != nil {
		t.Fatal(err)
	}
	wantB := bytes.Clone(a)
	copy(wantB[testSize/2:], b)
	wantHead := bytes.Clone(wantB)
	copy(wantHead[1000:], c)
	// Half of the deletion of "a", into "b".
	if err := r.prepareDelete(1, "a"); err != nil {
		t.Fatal(err)
	}
	if err := r.mergeStep(1, "a", 0, r.chain.Granules()/2); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if i := firstDiff(readAll(t, r, 1), wantHead); i >= 0 {
		t.Fatalf("the volume differs at byte %d after an interrupted deletion", i)
	}
	if i := firstDiff(readSnap(t, r, "b"), wantB); i >= 0 {
		t.Fatalf("snapshot b differs at byte %d after an interrupted deletion", i)
	}
	// Its deletion begun, "a" is no snapshot any more.
	if err := r.ReadSnapshotAt(1, "a", make([]byte, 10), 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read of a half-deleted snapshot: %v, want ErrNotFound", err)
	}
	if got := r.Snapshots(); len(got) != 1 || got[0] != "b" {
		t.Fatalf("Snapshots() during a deletion = %v, want b", got)
	}
	if err := r.DeleteSnapshot(1, "a", nil); err != nil {
		t.Fatalf("resumed deletion: %v", err)
	}
	if i := firstDiff(readSnap(t, r, "b"), wantB); i >= 0 {
		t.Fatalf("snapshot b differs at byte %d after the deletion", i)
	}
	if got := r.Snapshots(); len(got) != 1 || got[0] != "b" {
		t.Fatalf("Snapshots() = %v", got)
	}
}

// TestSnapshotOpsOverNetwork: SNAPSHOT, READ_SNAP and DELETE_SNAP through
// a client and a server, with their errors mapped to the sentinels.
func TestSnapshotOpsOverNetwork(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	mustCreate(t, s, "vol1-r0")
	c := dial(t, addr, "vol1-r0", testSize)
	ctx := testCtx(t)
	if err := c.Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}
	a := randBytes(testSize, 20)
	if err := c.WriteAt(ctx, 1, a, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := c.Snapshot(ctx, 1, "s1"); err != nil {
		t.Fatal(err)
	}
	if n := snapshotGauge(t, s, "vol1-r0"); n != 1 {
		t.Fatalf("cairn_replica_snapshots = %v after a snapshot, want 1", n)
	}
	if err := c.WriteAt(ctx, 1, randBytes(testSize, 21), 0, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, testSize)
	if err := c.ReadSnapshotAt(ctx, 1, "s1", got, 0); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("READ_SNAP: %v", err)
	}
	if err := c.Snapshot(ctx, 1, "s1"); !errors.Is(err, ErrSnapshotExists) {
		t.Fatalf("SNAPSHOT of an existing id: %v, want ErrExists", err)
	}
	if err := c.Snapshot(ctx, 0, "s2"); !errors.Is(err, ErrFenced) {
		t.Fatalf("SNAPSHOT at an old epoch: %v, want ErrFenced", err)
	}
	if err := c.DeleteSnapshot(ctx, 1, "s1"); err != nil {
		t.Fatal(err)
	}
	if n := snapshotGauge(t, s, "vol1-r0"); n != 0 {
		t.Fatalf("cairn_replica_snapshots = %v after the deletion, want 0", n)
	}
	if err := c.ReadSnapshotAt(ctx, 1, "s1", got[:10], 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("READ_SNAP of a deleted snapshot: %v, want ErrNotFound", err)
	}
	if err := c.DeleteSnapshot(ctx, 1, "s1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DELETE_SNAP of a deleted snapshot: %v, want ErrNotFound", err)
	}
	if err := c.Snapshot(ctx, 1, string(make([]byte, MaxSnapshotIDLen+1))); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("SNAPSHOT with a too long id: %v, want ErrInvalidArgument", err)
	}
}

// TestPreparedSnapshot: files made ahead by PrepareSnapshot serve the next
// snapshot; unused, they are removed when the replica opens again; made
// for a smaller size (a grow came between), they are not used.
func TestPreparedSnapshot(t *testing.T) {
	dir := t.TempDir()
	r := openLayered(t, dir, true)
	strays := func() []string {
		m, err := filepath.Glob(filepath.Join(dir, "r1", "layer-*"))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	if err := r.PrepareSnapshot(1); err != nil {
		t.Fatal(err)
	}
	if n := len(strays()); n != 3 {
		t.Fatalf("PrepareSnapshot made %d files, want 3 (data, sums, map)", n)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := strays(); len(got) != 0 {
		t.Fatalf("unused prepared files left after reopening: %v", got)
	}
	a := randBytes(testSize, 30)
	if err := r.WriteAt(1, a, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.PrepareSnapshot(1); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	if n := len(strays()); n != 4 {
		t.Fatalf("after a prepared snapshot %d layer files, want the 4 of the new head (data, sums, map, pending)", n)
	}
	if err := r.PrepareSnapshot(1); err != nil {
		t.Fatal(err)
	}
	if err := r.Grow(1, 2*testSize); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "s2"); err != nil {
		t.Fatalf("snapshot after a grow, with files prepared for the old size: %v", err)
	}
	want := make([]byte, 2*testSize)
	copy(want, a)
	if i := firstDiff(readSnap(t, r, "s2"), want); i >= 0 {
		t.Fatalf("snapshot s2 differs at byte %d", i)
	}
	if n := len(strays()); n != 7 {
		t.Fatalf("%d layer files, want 7 (two layers, the head's pending file; the unused prepared ones removed)", n)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if r, err = Open(dir, "r1", 0, 0); err != nil {
		t.Fatalf("reopen after a snapshot of the grown volume: %v", err)
	}
}

// TestGrowWithSnapshots: growing a replica that has snapshots keeps them
// (they read their old contents, and zeros past their old end), and the
// volume takes writes in the new range; all of it after reopening too.
func TestGrowWithSnapshots(t *testing.T) {
	dir := t.TempDir()
	r := openLayered(t, dir, true)
	a := randBytes(testSize, 13)
	if err := r.WriteAt(1, a, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "a"); err != nil {
		t.Fatal(err)
	}
	const bigger = 3 * testSize
	if err := r.Grow(1, bigger); err != nil {
		t.Fatal(err)
	}
	b := randBytes(testSize, 14)
	if err := r.WriteAt(1, b, testSize+SumBlockSize+3, false); err != nil {
		t.Fatal(err)
	}
	wantA := make([]byte, bigger)
	copy(wantA, a)
	want := bytes.Clone(wantA)
	copy(want[testSize+SumBlockSize+3:], b)
	for pass := range 2 {
		if i := firstDiff(readAll(t, r, 1), want); i >= 0 {
			t.Fatalf("pass %d: the volume differs at byte %d", pass, i)
		}
		if i := firstDiff(readSnap(t, r, "a"), wantA); i >= 0 {
			t.Fatalf("pass %d: snapshot a differs at byte %d", pass, i)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		var err error
		if r, err = Open(dir, "r1", 0, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestListRemovesLeftovers: the hidden directory of an interrupted restore
// (its hard links would pin the source's layers for ever: never merged,
// never freed) is removed when the server lists its replicas.
func TestListRemovesLeftovers(t *testing.T) {
	dir := t.TempDir()
	s, _ := startServer(t, dir)
	r, err := s.CreateWith("vol1-r0", testSize, CreateOptions{Checksums: true})
	if err != nil {
		t.Fatal(err)
	}
	claimed(t, r, 1)
	if err := r.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	left := filepath.Join(dir, ".vol2-r0.creating-123")
	if err := os.MkdirAll(left, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(filepath.Join(dir, "vol1-r0", dataFileName), filepath.Join(left, "layer-x.data")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.List(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(left); !os.IsNotExist(err) {
		t.Fatalf("the leftover is still there: %v", err)
	}
	if shared, err := r.chain.Shared(0); err != nil || shared {
		t.Fatalf("the layer is still shared (%v, %v)", shared, err)
	}
}

// TestServerRestoreAndUsage: the server restores a replica from another's
// snapshot and serves it; SnapshotUsage says what each snapshot holds and
// what deleting it would free.
func TestServerRestoreAndUsage(t *testing.T) {
	dir := t.TempDir()
	s, _ := startServer(t, dir)
	src, err := s.CreateWith("vol1-r0", testSize, CreateOptions{Checksums: true})
	if err != nil {
		t.Fatal(err)
	}
	claimed(t, src, 1)
	a := randBytes(testSize, 50)
	if err := src.WriteAt(1, a, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := src.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt(1, randBytes(4*SumBlockSize, 51), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := src.Snapshot(1, "s2"); err != nil {
		t.Fatal(err)
	}
	if err := src.WriteAt(1, randBytes(2*SumBlockSize, 52), SumBlockSize, false); err != nil {
		t.Fatal(err)
	}
	if err := src.Flush(1); err != nil {
		t.Fatal(err)
	}
	u, err := src.SnapshotUsage()
	if err != nil {
		t.Fatal(err)
	}
	want := []SnapshotUsage{
		{ID: "s1", HeldBytes: testSize, FreedByDelete: 4 * SumBlockSize},
		{ID: "s2", HeldBytes: 4 * SumBlockSize, FreedByDelete: 2 * SumBlockSize},
	}
	if fmt.Sprint(u) != fmt.Sprint(want) {
		t.Fatalf("SnapshotUsage() = %+v, want %+v", u, want)
	}

	r2, err := s.CreateFromSnapshot("vol2-r0", "vol1-r0", "s1", 0)
	if err != nil {
		t.Fatalf("CreateFromSnapshot: %v", err)
	}
	if got, err := s.Get("vol2-r0"); err != nil || got != r2 {
		t.Fatalf("the restored replica is not served: %v", err)
	}
	claimed(t, r2, 1)
	if i := firstDiff(readAll(t, r2, 1), a); i >= 0 {
		t.Fatalf("the restored replica differs from s1 at byte %d", i)
	}
	if _, err := s.CreateFromSnapshot("vol2-r0", "vol1-r0", "s1", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("restoring onto an existing replica: %v, want ErrExists", err)
	}
}

// snapshotGauge scrapes s's metrics and returns cairn_replica_snapshots
// for replica id (-1 if absent).
func snapshotGauge(t testing.TB, s *Server, id string) float64 {
	t.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.Collectors()...)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "cairn_replica_snapshots" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "replica" && l.GetValue() == id {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return -1
}
