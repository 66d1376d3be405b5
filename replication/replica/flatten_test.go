package replica

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// restoredChain makes, under dir, a source replica r1 with snapshots s1
// and s2 (data, an overwrite and a trim between them) and a replica r2
// restored from s2 into a volume twice as large, which then takes its own
// snapshot own1 and is written again (past the source's end too). It
// returns both, open, with what r2 and its snapshot own1 read.
func restoredChain(t *testing.T, dir string, checksums bool, size uint64) (src, r2 *Replica, head, own1 []byte) {
	t.Helper()
	src, err := OpenWith(dir, "r1", size, testExtent, CreateOptions{Checksums: checksums})
	if err != nil {
		t.Fatal(err)
	}
	claimed(t, src, 1)
	write := func(r *Replica, p []byte, off uint64) {
		t.Helper()
		if err := r.WriteAt(1, p, off, false); err != nil {
			t.Fatal(err)
		}
	}
	snap := func(r *Replica, id string) {
		t.Helper()
		if err := r.Snapshot(1, id); err != nil {
			t.Fatal(err)
		}
	}
	write(src, randBytes(int(size), 1), 0)
	snap(src, "s1")
	write(src, randBytes(int(size/2), 2), size/4+100)
	if err := src.Trim(1, size/8, size/16); err != nil {
		t.Fatal(err)
	}
	snap(src, "s2")
	write(src, randBytes(int(size/4), 3), 0) // the source goes on: not in s2
	if err := CreateFromSnapshot(dir, "r2", src, "s2", 2*size); err != nil {
		t.Fatal(err)
	}
	if r2, err = Open(dir, "r2", 0, 0); err != nil {
		t.Fatal(err)
	}
	claimed(t, r2, 1)
	write(r2, randBytes(int(size/8), 4), 3*size/4+7)
	snap(r2, "own1")
	write(r2, randBytes(int(size/2), 5), size-SumBlockSize-3)
	return src, r2, readAll(t, r2, 1), readSnap(t, r2, "own1")
}

func links(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Nlink)
}

// TestFlattenKeepsEveryView: a restored replica (sharing s1 and s2 with its
// source by hard link) flattened into s2 has one layer fewer below its own
// snapshot, reads the same (the volume and its own snapshot, before and
// after reopening, verified with checksums), no longer shares the
// source's files, and so lets the source delete s1, which it could not
// while s2 (s1's child) was shared.
func TestFlattenKeepsEveryView(t *testing.T) {
	for _, checksums := range []bool{true, false} {
		t.Run(fmt.Sprint("checksums=", checksums), func(t *testing.T) {
			dir := t.TempDir()
			src, r2, head, own1 := restoredChain(t, dir, checksums, testSize)
			defer src.Close()
			srcHead := readAll(t, src, 1)
			srcS2 := readSnap(t, src, "s2")
			if got := r2.LayerIDs(); !slices.Equal(got, []string{"s1", "s2", "own1"}) {
				t.Fatalf("the restored replica's layers: %v", got)
			}
			if err := src.DeleteSnapshot(1, "s1", nil); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("the source deleted s1 while s2 is shared: %v, want ErrInvalidArgument", err)
			}
			if n := links(t, filepath.Join(dir, "r1", dataFileName)); n != 2 {
				t.Fatalf("the source's first data file has %d links, want 2", n)
			}
			var steps int
			var last uint64
			err := r2.Flatten(context.Background(), "s2", func(done, total uint64) {
				steps++
				if done < last || done > total || total != r2.Size() {
					t.Errorf("progress %d of %d after %d", done, total, last)
				}
				last = done
			})
			if err != nil {
				t.Fatalf("Flatten: %v", err)
			}
			if last != r2.Size() || steps == 0 {
				t.Fatalf("progress ended at %d of %d after %d calls", last, r2.Size(), steps)
			}
			check := func(when string) {
				t.Helper()
				if i := firstDiff(readAll(t, r2, 1), head); i >= 0 {
					t.Fatalf("%s: the volume differs at byte %d", when, i)
				}
				if i := firstDiff(readSnap(t, r2, "own1"), own1); i >= 0 {
					t.Fatalf("%s: snapshot own1 differs at byte %d", when, i)
				}
				if got := r2.LayerIDs(); !slices.Equal(got, []string{"s2", "own1"}) || r2.Depth() != 3 {
					t.Fatalf("%s: layers %v, depth %d; want [s2 own1], 3", when, got, r2.Depth())
				}
			}
			check("after flattening")
			if n := links(t, filepath.Join(dir, "r1", dataFileName)); n != 1 {
				t.Fatalf("after flattening the source's first data file has %d links, want 1", n)
			}
			if err := r2.Close(); err != nil {
				t.Fatal(err)
			}
			if r2, err = Open(dir, "r2", 0, 0); err != nil {
				t.Fatal(err)
			}
			defer r2.Close()
			check("after reopening")
			// The source is as it was, and can now merge s1 into s2.
			if i := firstDiff(readAll(t, src, 1), srcHead); i >= 0 {
				t.Fatalf("the source changed at byte %d", i)
			}
			if err := src.DeleteSnapshot(1, "s1", nil); err != nil {
				t.Fatalf("the source deletes s1 once nothing shares s2: %v", err)
			}
			if i := firstDiff(readSnap(t, src, "s2"), srcS2); i >= 0 {
				t.Fatalf("the source's s2 changed at byte %d", i)
			}
			// The flattened replica goes on: its own snapshot merges into
			// the head, a new write lands.
			if err := r2.DeleteSnapshot(1, "own1", nil); err != nil {
				t.Fatal(err)
			}
			p := randBytes(5000, 6)
			if err := r2.WriteAt(1, p, 12345, false); err != nil {
				t.Fatal(err)
			}
			copy(head[12345:], p)
			if i := firstDiff(readAll(t, r2, 1), head); i >= 0 {
				t.Fatalf("after more work the volume differs at byte %d", i)
			}
			if err := r2.Flatten(context.Background(), "own1", nil); !errors.Is(err, ErrNotFound) {
				t.Fatalf("flatten into a layer gone: %v, want ErrNotFound", err)
			}
		})
	}
}

// TestKillDuringFlatten: a process flattening a restored replica is killed
// (SIGKILL) partway: the replica, opened again, reads the same with its
// chain unchanged and no files of the half-built layer left, and a new
// Flatten finishes.
func TestKillDuringFlatten(t *testing.T) {
	const size = 32 << 20 // the restore is 64 MiB: 16 steps
	dir := t.TempDir()
	src, r2, head, own1 := restoredChain(t, dir, true, size)
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r2.Close(); err != nil {
		t.Fatal(err)
	}
	files := func() []string {
		es, err := os.ReadDir(filepath.Join(dir, "r2"))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range es {
			names = append(names, e.Name())
		}
		return names
	}
	before := files()

	killChildAt(t, "flatten "+dir+" r2 s2", "step 5")

	r2, err := Open(dir, "r2", 0, 0)
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	defer r2.Close()
	claimed(t, r2, 1)
	if got := files(); !slices.Equal(got, before) {
		t.Fatalf("after the kill and reopening the files are\n%s\nwant\n%s", strings.Join(got, " "), strings.Join(before, " "))
	}
	if got := r2.LayerIDs(); !slices.Equal(got, []string{"s1", "s2", "own1"}) {
		t.Fatalf("after the kill the layers are %v", got)
	}
	if i := firstDiff(readAll(t, r2, 1), head); i >= 0 {
		t.Fatalf("after the kill the volume differs at byte %d", i)
	}
	if err := r2.Flatten(context.Background(), "s2", nil); err != nil {
		t.Fatalf("flatten again: %v", err)
	}
	if i := firstDiff(readAll(t, r2, 1), head); i >= 0 {
		t.Fatalf("flattened: the volume differs at byte %d", i)
	}
	if i := firstDiff(readSnap(t, r2, "own1"), own1); i >= 0 {
		t.Fatalf("flattened: own1 differs at byte %d", i)
	}
}
