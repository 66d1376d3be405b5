package replica

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// chainSource makes r hold s1 (a pattern over the whole volume), s2 (some
// unaligned writes and a trim over it) and a head with more writes, and
// returns the three as they read.
func chainSource(t *testing.T, r *Replica) (s1, s2, head []byte) {
	t.Helper()
	model := randBytes(testSize, 1)
	if err := r.WriteAt(1, model, 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	s1 = bytes.Clone(model)
	write := func(off, n int, seed uint64) {
		p := randBytes(n, seed)
		if err := r.WriteAt(1, p, uint64(off), false); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	write(1000, 9000, 2)
	write(5*testExtent+512, 512, 3)
	if err := r.Trim(1, 8*testExtent, 2*testExtent+4096); err != nil { // held by s2 as zeros
		t.Fatal(err)
	}
	clear(model[8*testExtent : 10*testExtent+4096])
	if err := r.Snapshot(1, "s2"); err != nil {
		t.Fatal(err)
	}
	s2 = bytes.Clone(model)
	write(3*testExtent, 3*4096, 4)
	return s1, s2, model
}

// carry does what the rebuilder does with a target's sealed layers (steps
// 1 and 2 of engine/rebuild_chain.go), between two replicas in process.
// It returns the data bytes copied.
func carry(t *testing.T, src, dst *Replica) uint64 {
	t.Helper()
	srcLayers, err := src.Layers(1)
	if err != nil {
		t.Fatal(err)
	}
	var copied uint64
	for i, l := range srcLayers {
		a, err := src.LayerSums(1, l.ID, 0, src.Extents())
		if err != nil {
			t.Fatal(err)
		}
		if b, err := dst.LayerSums(1, l.ID, 0, dst.Extents()); err == nil && slices.Equal(a, b) {
			continue
		}
		if err := dst.BeginLayer(1, l.ID, uint64(i)); err != nil {
			t.Fatal(err)
		}
		b, err := dst.BuildSums(1, l.ID, 0, dst.Extents())
		if err != nil {
			t.Fatal(err)
		}
		for x := range src.Extents() {
			if a[x] == b[x] {
				continue
			}
			enc, err := src.ReadLayerExtent(1, l.ID, x, false, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := dst.WriteLayerExtent(1, l.ID, x, enc); err != nil {
				t.Fatal(err)
			}
			copied += LayerExtentData(enc)
		}
		if err := dst.SealLayer(1, l.ID); err != nil {
			t.Fatal(err)
		}
	}
	return copied
}

// TestCarryLayers: a blank replica given a source's sealed layers holds
// the same snapshots, layer for layer (same sums: same blocks held, zeroed
// and written), with holes where the source's blocks read as zeros; a
// second carry copies nothing. Its head is new and empty (it shows the
// newest snapshot), for the rebuilder to copy the head into.
func TestCarryLayers(t *testing.T) {
	for _, sums := range []bool{true, false} {
		t.Run(fmt.Sprint("checksums=", sums), func(t *testing.T) {
			src := openLayered(t, t.TempDir(), sums)
			defer func() { _ = src.Close() }()
			s1, s2, _ := chainSource(t, src)
			dst, err := OpenWith(t.TempDir(), "r2", testSize, testExtent, CreateOptions{Checksums: sums})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = dst.Close() }()
			claimed(t, dst, 1)
			if err := dst.WriteAt(1, randBytes(4096, 9), 0, false); err != nil { // a write the rebuild got meanwhile
				t.Fatal(err)
			}
			copied := carry(t, src, dst)
			trimmed := uint64(2*testExtent + 4096)
			// s1 whole; of s2 its four written blocks (three under the
			// write at 1000, one under the one at 5×64 KiB+512), not
			// its trimmed ones.
			if want := uint64(testSize + 4*4096); copied != want {
				t.Errorf("copied %d bytes, want %d", copied, want)
			}
			if got := dst.Snapshots(); !slices.Equal(got, []string{"s1", "s2"}) {
				t.Fatalf("carried snapshots %v, want [s1 s2]", got)
			}
			for id, want := range map[string][]byte{"s1": s1, "s2": s2} {
				if !bytes.Equal(readSnap(t, dst, id), want) {
					t.Fatalf("carried snapshot %s differs", id)
				}
				a, _ := src.LayerSums(1, id, 0, src.Extents())
				b, err := dst.LayerSums(1, id, 0, dst.Extents())
				if err != nil || !slices.Equal(a, b) {
					t.Fatalf("layer %s: sums differ (%v)", id, err)
				}
			}
			head := make([]byte, testSize)
			if err := dst.ReadAt(1, head, 0); err != nil || !bytes.Equal(head, s2) {
				t.Fatalf("the carried replica's new head does not show s2 (%v)", err)
			}
			// s2's trimmed range travelled as zero bits: a hole in its layer.
			k, _ := dst.chain.Find("s2")
			if !fileHole(dst.below[k].data, 8*testExtent, trimmed-4096) {
				t.Error("the zeroed blocks of s2 were written, not left as a hole")
			}
			if n := carry(t, src, dst); n != 0 {
				t.Errorf("a second carry copied %d bytes", n)
			}
			// Both survive a reopen.
			if err := dst.Close(); err != nil {
				t.Fatal(err)
			}
			dst, err = Open(filepath.Dir(dst.dir), "r2", 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(readSnap(t, dst, "s1"), s1) || !bytes.Equal(readSnap(t, dst, "s2"), s2) {
				t.Fatal("carried snapshots differ after a reopen")
			}
		})
	}
}

// TestLayerSumsCached: a sealed layer's sums, and those of its flattened
// form, are computed once (a change
// of its file behind the replica's back is not seen: nothing is read
// again) until a deletion below it changes what it holds once merged.
func TestLayerSumsCached(t *testing.T) {
	r := openLayered(t, t.TempDir(), false)
	defer func() { _ = r.Close() }()
	chainSource(t, r)
	first, err := r.LayerSums(1, "s2", 0, r.Extents())
	if err != nil {
		t.Fatal(err)
	}
	flatFirst, err := r.FlatSums(1, "s2", 0, r.Extents())
	if err != nil || slices.Equal(flatFirst, first) {
		t.Fatalf("the flattened sums of s2 equal its own (%v)", err)
	}
	k, _ := r.chain.Find("s2")
	if _, err := r.below[k].data.WriteAt(bytes.Repeat([]byte{0xAB}, 9000), 1000); err != nil {
		t.Fatal(err)
	}
	again, err := r.LayerSums(1, "s2", 0, r.Extents())
	if err != nil || !slices.Equal(first, again) {
		t.Fatalf("the second sums of an unchanged layer were computed again (%v)", err)
	}
	if flatAgain, err := r.FlatSums(1, "s2", 0, r.Extents()); err != nil || !slices.Equal(flatFirst, flatAgain) {
		t.Fatalf("the second flattened sums of an unchanged layer were computed again (%v)", err)
	}
	if err := r.DeleteSnapshot(1, "s1", nil); err != nil {
		t.Fatal(err)
	}
	after, err := r.LayerSums(1, "s2", 0, r.Extents())
	if err != nil {
		t.Fatal(err)
	}
	if after[0] == first[0] {
		t.Error("a deletion below a layer did not drop its cached sums")
	}
	if flatAfter, err := r.FlatSums(1, "s2", 0, r.Extents()); err != nil || flatAfter[0] == flatFirst[0] {
		t.Errorf("a deletion below a layer did not drop its cached flattened sums (%v)", err)
	}
}

// copyFiles copies the files of directory src into dst, as a crash would
// leave them (the page cache is what a reader sees).
func copyFiles(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o750); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		in, err := os.Open(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, in); err != nil {
			t.Fatal(err)
		}
		_ = in.Close()
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLayerBuildCrashSafe: a layer under construction is in no chain: a
// crash leaves files that the next open removes, and no snapshot; begun
// again the same way it is resumed (what it holds is kept), begun for
// another position it starts over; sealed, it is there.
func TestLayerBuildCrashSafe(t *testing.T) {
	src := openLayered(t, t.TempDir(), true)
	defer func() { _ = src.Close() }()
	s1, _, _ := chainSource(t, src)
	dir := t.TempDir()
	dst, err := OpenWith(dir, "r2", testSize, testExtent, CreateOptions{Checksums: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = dst.Close() }()
	claimed(t, dst, 1)
	if err := dst.BeginLayer(1, "s1", 0); err != nil {
		t.Fatal(err)
	}
	for x := range uint64(3) {
		enc, err := src.ReadLayerExtent(1, "s1", x, false, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := dst.WriteLayerExtent(1, "s1", x, enc); err != nil {
			t.Fatal(err)
		}
	}
	image := filepath.Join(t.TempDir(), "r2")
	copyFiles(t, filepath.Join(dir, "r2"), image)
	crashed, err := Open(filepath.Dir(image), "r2", 0, 0)
	if err != nil {
		t.Fatalf("open the crash image: %v", err)
	}
	if got := crashed.Snapshots(); len(got) != 0 {
		t.Errorf("a half-built layer is visible after a crash: %v", got)
	}
	if err := crashed.Close(); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(image)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "layer-") {
			t.Errorf("the half-built layer's file %s is left after the reopen", e.Name())
		}
	}

	// Begun again at the same place: resumed.
	if err := dst.BeginLayer(1, "s1", 0); err != nil {
		t.Fatal(err)
	}
	a, _ := src.LayerSums(1, "s1", 0, 3)
	b, err := dst.BuildSums(1, "s1", 0, 3)
	if err != nil || !slices.Equal(a, b) {
		t.Fatalf("a resumed build lost what it held (%v)", err)
	}
	// A damaged extent is refused whole.
	enc, _ := src.ReadLayerExtent(1, "s1", 3, false, nil)
	enc[len(enc)-1] ^= 1
	if err := dst.WriteLayerExtent(1, "s1", 3, enc); !errors.Is(err, ErrChecksum) {
		t.Fatalf("a damaged extent: %v, want ErrChecksum", err)
	}
	// Elsewhere: started over.
	if err := dst.BeginLayer(1, "s1", 1); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("a layer above the head: %v, want ErrInvalidArgument", err)
	}
	if err := dst.BeginLayer(1, "other", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.BuildSums(1, "s1", 0, 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the first build outlived a build of another layer: %v", err)
	}
	if err := dst.SealLayer(1, "s1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("seal of a build that is gone: %v, want ErrNotFound", err)
	}
	// Carried whole, sealed: there, and fenced by epoch like any change.
	if err := dst.BeginLayer(2, "s1", 0); !errors.Is(err, ErrNotClaimed) {
		t.Fatalf("begin with an unclaimed epoch: %v", err)
	}
	carry(t, src, dst)
	if !bytes.Equal(readSnap(t, dst, "s1"), s1) {
		t.Fatal("the carried s1 differs")
	}
}

// TestDropLayer: a layer taken out without a merge leaves the chain and
// its files; the layers below it read as before.
func TestDropLayer(t *testing.T) {
	r := openLayered(t, t.TempDir(), true)
	defer func() { _ = r.Close() }()
	s1, _, head := chainSource(t, r)
	k, _ := r.chain.Find("s2")
	stem := r.chain.Entries()[k].Stem
	if err := r.DropLayer(1, "s2"); err != nil {
		t.Fatal(err)
	}
	if got := r.Snapshots(); !slices.Equal(got, []string{"s1"}) {
		t.Fatalf("snapshots %v after dropping s2, want [s1]", got)
	}
	if !bytes.Equal(readSnap(t, r, "s1"), s1) {
		t.Fatal("s1 changed when s2 was dropped")
	}
	if _, err := os.Stat(filepath.Join(r.dir, stem+".data")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dropped layer's data file: %v", err)
	}
	// The head shows s1 with the head's own blocks over it now.
	got := make([]byte, testSize)
	if err := r.ReadAt(1, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[3*testExtent:3*testExtent+3*4096], head[3*testExtent:3*testExtent+3*4096]) {
		t.Fatal("the head lost its own blocks")
	}
	if !bytes.Equal(got[8*testExtent:9*testExtent], s1[8*testExtent:9*testExtent]) {
		t.Fatal("the head still shows the dropped layer's trim")
	}
	if err := r.DropLayer(1, "s2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("dropping it again: %v, want ErrNotFound", err)
	}
}
