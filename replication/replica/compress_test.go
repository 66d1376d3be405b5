package replica

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/cairn-csi/cairn/internal/testlogs"
)

// TestCompressedReplica runs the same random operations on a compressed
// replica and on a model of its contents, with and without checksums:
// whole-extent and partial writes, trims, zeroes, flushes, snapshots read
// back and deleted, a grow, a restore from a snapshot, a flatten of it,
// and reopens. Every read matches the model, every layer the replica makes
// is compressed, and its logs take at most half their size.
func TestCompressedReplica(t *testing.T) {
	for _, sums := range []bool{false, true} {
		t.Run(fmt.Sprintf("checksums=%v", sums), func(t *testing.T) { testCompressedReplica(t, sums) })
	}
}

func testCompressedReplica(t *testing.T, sums bool) {
	const size = 4 << 20
	dir := t.TempDir()
	r, err := OpenWith(dir, "z1", size, 0, CreateOptions{Checksums: sums, Compression: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	if !r.Compressed() {
		t.Fatal("a replica created with compression is not compressed")
	}
	for _, name := range []string{"data", "data.z", "data.zmap"} {
		if _, err := os.Stat(filepath.Join(dir, "z1", name)); err != nil {
			t.Fatalf("the compressed replica's %s: %v", name, err)
		}
	}
	rng := rand.New(rand.NewPCG(7, uint64(map[bool]int{false: 1, true: 2}[sums])))
	model := make([]byte, size)
	snaps := map[string][]byte{}
	var order []string
	check := func(what string) {
		t.Helper()
		got := make([]byte, len(model))
		if err := r.ReadAt(0, got, 0); err != nil {
			t.Fatalf("%s: read: %v", what, err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("%s: the replica does not read what was written", what)
		}
		for _, id := range order {
			if err := r.ReadSnapshotAt(0, id, got[:len(snaps[id])], 0); err != nil {
				t.Fatalf("%s: read snapshot %s: %v", what, id, err)
			}
			if !bytes.Equal(got[:len(snaps[id])], snaps[id]) {
				t.Fatalf("%s: snapshot %s does not read what it held", what, id)
			}
		}
	}
	const ext = 64 << 10
	for step := range 400 {
		switch op := rng.IntN(100); {
		case op < 35: // whole extents, as a file system's large writes
			n := uint64(1+rng.IntN(4)) * ext
			off := uint64(rng.IntN(int((uint64(len(model))-n)/ext))) * ext
			p := make([]byte, n)
			testlogs.Fill(p, rng)
			if err := r.WriteAt(0, p, off, rng.IntN(10) == 0); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		case op < 65: // small writes, often into compressed extents
			n := uint64(1+rng.IntN(16)) * 512
			off := uint64(rng.IntN(int((uint64(len(model))-n)/512))) * 512
			p := make([]byte, n)
			testlogs.Fill(p, rng)
			if err := r.WriteAt(0, p, off, false); err != nil {
				t.Fatal(err)
			}
			copy(model[off:], p)
		case op < 72:
			n := uint64(1+rng.IntN(40)) * 4096
			off := uint64(rng.IntN(int((uint64(len(model))-n)/4096))) * 4096
			if rng.IntN(2) == 0 {
				err = r.Trim(0, off, n)
			} else {
				err = r.WriteZeroes(0, off, n)
			}
			if err != nil {
				t.Fatal(err)
			}
			clear(model[off : off+n])
		case op < 80:
			if err := r.Flush(0); err != nil {
				t.Fatal(err)
			}
		case op < 86 && len(order) < 4:
			id := fmt.Sprintf("s%d", step)
			if err := r.Flush(0); err != nil {
				t.Fatal(err)
			}
			if err := r.Snapshot(0, id); err != nil {
				t.Fatal(err)
			}
			snaps[id] = bytes.Clone(model)
			order = append(order, id)
			if !r.Compressed() {
				t.Fatalf("the head after snapshot %s is not compressed", id)
			}
		case op < 89 && len(order) > 0:
			i := rng.IntN(len(order))
			if err := r.DeleteSnapshot(0, order[i], nil); err != nil {
				t.Fatal(err)
			}
			delete(snaps, order[i])
			order = append(order[:i], order[i+1:]...)
		case op < 95:
			if err := r.Flush(0); err != nil {
				t.Fatal(err)
			}
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			if r, err = Open(dir, "z1", 0, 0); err != nil {
				t.Fatal(err)
			}
			check(fmt.Sprintf("step %d, reopened", step))
		default:
			check(fmt.Sprintf("step %d", step))
		}
	}
	check("the end")

	// Recompressing stores compressed again what small writes left raw,
	// in every layer: the logs take at most half their size again.
	before := r.Info().AllocatedBytes
	st, err := r.Recompress(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	check("recompressed")
	after, logical := r.Info().AllocatedBytes, r.LogicalBytes()
	t.Logf("recompressed %d extents: %.2f MiB on disk, %.2f MiB after, of %.2f MiB (%.2f×)", st.Extents,
		float64(before)/(1<<20), float64(after)/(1<<20), float64(logical)/(1<<20), float64(after)/float64(logical))
	if st.Extents == 0 || float64(after) > 0.5*float64(logical) {
		t.Errorf("recompressed %d extents: %d of %d bytes on disk, want at most half", st.Extents, after, logical)
	}
	if again, err := r.Recompress(context.Background(), nil); err != nil || again.Extents != 0 {
		t.Errorf("a second pass recompressed %d extents (%v), want none", again.Extents, err)
	}

	// A grow: the new part reads zeros, and takes writes.
	if err := r.Grow(0, 2*size); err != nil {
		t.Fatal(err)
	}
	model = append(model, make([]byte, size)...)
	tail := make([]byte, 3*ext)
	testlogs.Fill(tail, rng)
	if err := r.WriteAt(0, tail, size+ext, false); err != nil {
		t.Fatal(err)
	}
	copy(model[size+ext:], tail)
	check("grown")

	// Logs written whole take at most half their size (the bound
	// for compressible data), also once a snapshot sealed them; the
	// layers above hold small writes in extents stored whole
	// (docs/compression.md).
	z3, err := OpenWith(dir, "z3", size, 0, CreateOptions{Checksums: sums, Compression: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = z3.Close() }()
	full := make([]byte, size)
	testlogs.Fill(full, rng)
	for _, step := range []func() error{
		func() error { return z3.WriteAt(0, full, 0, false) },
		func() error { return z3.Flush(0) },
		func() error { return z3.Snapshot(0, "sealed") },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	logical, physical := z3.LogicalBytes(), z3.Info().AllocatedBytes
	t.Logf("%d MiB of logs take %.2f MiB: %.2f×", logical>>20, float64(physical)/(1<<20), float64(physical)/float64(logical))
	if logical < size || float64(physical) > 0.5*float64(logical) {
		t.Errorf("%d logical bytes take %d: want at most half", logical, physical)
	}
	if err := r.Flush(0); err != nil {
		t.Fatal(err)
	}

	// A restore from a snapshot shares its layers and is compressed, and
	// its flatten keeps it so.
	id := "last"
	if err := r.Snapshot(0, id); err != nil {
		t.Fatal(err)
	}
	snaps[id], order = bytes.Clone(model), append(order, id)
	if err := CreateFromSnapshot(dir, "z2", r, id, 0); err != nil {
		t.Fatal(err)
	}
	r2, err := Open(dir, "z2", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r2.Close() }()
	if !r2.Compressed() {
		t.Fatal("a replica restored from a compressed one is not compressed")
	}
	got := make([]byte, len(model))
	if err := r2.ReadAt(0, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("the restored replica does not read the snapshot: %v", err)
	}
	if err := r2.Flatten(context.Background(), id, nil); err != nil {
		t.Fatal(err)
	}
	if err := r2.ReadAt(0, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("the flattened replica does not read the snapshot: %v", err)
	}
	if !r2.Compressed() {
		t.Error("the flattened replica is not compressed")
	}
	check("after the restore")
}

// TestPlainReplicaNotCompressed: a replica made without compression has no
// compressed files and says so.
func TestPlainReplicaNotCompressed(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(dir, "p1", 1<<20, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	if r.Compressed() {
		t.Error("a plain replica says it is compressed")
	}
	if _, err := os.Stat(filepath.Join(dir, "p1", "data.zmap")); err == nil {
		t.Error("a plain replica has a compressed map")
	}
}

// TestRecompressDuringRestore: a restore links a sealed layer while a
// recompression pass is storing its extents compressed again. The
// extents recompressed before the link are committed first, the pass
// stops at its next step, and both the source and the restored replica
// read the snapshot whole, also after a reopen.
func TestRecompressDuringRestore(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	r, err := OpenWith(dir, "src", size, 0, CreateOptions{Compression: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.Close() }()
	rng := rand.New(rand.NewPCG(11, 11))
	model := testlogs.JSON(rng, size)
	if err := r.WriteAt(0, model, 0, false); err != nil {
		t.Fatal(err)
	}
	// A small write into every extent leaves them all raw.
	for off := 0; off < size; off += 64 << 10 {
		p := testlogs.JSON(rng, 4096)
		copy(model[off+8192:], p)
		if err := r.WriteAt(0, p, uint64(off+8192), false); err != nil {
			t.Fatal(err)
		}
	}
	if err := r.Flush(0); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(0, "s"); err != nil {
		t.Fatal(err)
	}
	steps := 0
	st, err := r.Recompress(context.Background(), func(context.Context) (func(), error) {
		steps++
		if steps == 4 { // three extents recompressed, not yet synced
			if err := CreateFromSnapshot(dir, "restored", r, "s", 0); err != nil {
				t.Error(err)
			}
		}
		return func() {}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if st.Extents != 3 {
		t.Errorf("the pass recompressed %d extents, want the 3 before the restore linked the layer", st.Extents)
	}
	r2, err := Open(dir, "restored", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	read := func(rep *Replica, what string) {
		t.Helper()
		got := make([]byte, size)
		if err := rep.ReadSnapshotAt(rep.Epoch(), "s", got, 0); err != nil || !bytes.Equal(got, model) {
			t.Fatalf("%s does not read the snapshot (%v)", what, err)
		}
	}
	read(r, "the source")
	got := make([]byte, size)
	if err := r2.ReadAt(0, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("the restored replica does not read the snapshot (%v)", err)
	}
	if err := r2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if r, err = Open(dir, "src", 0, 0); err != nil {
		t.Fatal(err)
	}
	read(r, "the source, reopened")
	if r2, err = Open(dir, "restored", 0, 0); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r2.Close() }()
	if err := r2.ReadAt(0, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("the restored replica, reopened, does not read the snapshot (%v)", err)
	}
	// A later pass leaves the shared layer alone.
	if st, err := r.Recompress(context.Background(), nil); err != nil || st.Extents != 0 {
		t.Errorf("a pass over a shared layer recompressed %d extents (%v)", st.Extents, err)
	}
}
