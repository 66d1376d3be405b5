package layer

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// build makes a layer aside in s's directory, as a rebuild target does:
// its map from CreateBuildMap, a data file holding fill over the blocks
// held says, and returns its stem.
func (s *store) build(held func(b uint64) bool, fill byte) string {
	s.t.Helper()
	stem := NewStem()
	m, err := CreateBuildMap(s.dir, stem, s.size)
	if err != nil {
		s.t.Fatal(err)
	}
	defer func() { _ = m.Close() }()
	s.createData(filepath.Join(s.dir, stem+".data"))
	f := s.openData(filepath.Join(s.dir, stem+".data"))
	defer func() { _ = f.Close() }()
	blocks := blocksOf(s.size)
	bits := make([]byte, (blocks+7)/8)
	for b := range blocks {
		if held(b) {
			bits[b/8] |= 1 << (b % 8)
			if _, err := f.WriteAt(bytes.Repeat([]byte{fill}, BlockSize), int64(b*BlockSize)); err != nil {
				s.t.Fatal(err)
			}
		}
	}
	if err := m.Set(0, blocks, bits); err != nil {
		s.t.Fatal(err)
	}
	got := make([]byte, len(bits))
	if err := m.Get(0, blocks, got); err != nil || !bytes.Equal(got, bits) {
		s.t.Fatalf("the build map reads %x, was set to %x (%v)", got, bits, err)
	}
	return stem
}

// insert publishes a built layer and reopens the store's files.
func (s *store) insert(pos int, id, stem string) bool {
	s.t.Helper()
	replaced, err := s.c.Insert(pos, id, stem, func(stem string) error {
		s.createData(filepath.Join(s.dir, stem+".data"))
		return nil
	})
	if err != nil {
		s.t.Fatalf("Insert %s at %d: %v", id, pos, err)
	}
	s.refiles()
	return replaced
}

// refiles opens the data files of the chain's layers again.
func (s *store) refiles() {
	for _, f := range s.files {
		_ = f.Close()
	}
	s.files = nil
	for i := range s.c.Len() {
		s.files = append(s.files, s.openData(s.c.Path(i, "data")))
	}
}

func ids(c *Chain) []string {
	var out []string
	for _, e := range c.Entries() {
		out = append(out, e.ID)
	}
	return out
}

// TestInsertAndDrop: layers built aside and published at a position read
// there, above and below; the head that is the only layer is replaced by
// an empty one, a sealed bottom without a map is dropped rather than moved
// up; Drop takes a layer out; HeldIn gives a layer's blocks with those of
// the layers being deleted below it; the chain reads the same reopened.
func TestInsertAndDrop(t *testing.T) {
	const size = 8 * Granule
	s := openStore(t, t.TempDir(), size)
	s.write(bytes.Repeat([]byte{1}, size), 0) // the head, the only layer
	replaced := s.insert(0, "a", s.build(func(uint64) bool { return true }, 0xA))
	if !replaced || !slices.Equal(ids(s.c), []string{"a", ""}) {
		t.Fatalf("after inserting a under a lone head: %q, head replaced %v", ids(s.c), replaced)
	}
	read := func(last int, off uint64) byte {
		p := make([]byte, 1)
		s.readIn(last, p, off)
		return p[0]
	}
	if read(1, 0) != 0xA {
		t.Fatal("the new head does not show the layer below it")
	}
	// b above a, holding the blocks of granule 2; c inserted between them,
	// holding granules 2 and 3.
	s.insert(1, "b", s.build(func(b uint64) bool { return b/blocksPerGranule == 2 }, 0xB))
	s.write([]byte{0xE}, 3*Granule) // the head's own block
	s.insert(1, "c", s.build(func(b uint64) bool { return b/blocksPerGranule == 2 || b/blocksPerGranule == 3 }, 0xC))
	if !slices.Equal(ids(s.c), []string{"a", "c", "b", ""}) {
		t.Fatalf("chain %q, want [a c b head]", ids(s.c))
	}
	for _, tc := range []struct {
		last int
		off  uint64
		want byte
	}{{0, 2 * Granule, 0xA}, {1, 2 * Granule, 0xC}, {1, 3 * Granule, 0xC}, {2, 2 * Granule, 0xB}, {2, 3 * Granule, 0xC},
		{3, 3 * Granule, 0xE}, {3, 3*Granule + BlockSize, 0xC}, {3, 0, 0xA}} {
		if got := read(tc.last, tc.off); got != tc.want {
			t.Errorf("layers 0-%d at %d read %#x, want %#x", tc.last, tc.off, got, tc.want)
		}
	}
	// Replacing c by a layer holding granule 4 only.
	s.insert(1, "c", s.build(func(b uint64) bool { return b/blocksPerGranule == 4 }, 0xD))
	if !slices.Equal(ids(s.c), []string{"a", "c", "b", ""}) || read(2, 3*Granule) != 0xA || read(2, 4*Granule) != 0xD {
		t.Fatalf("after replacing c: %q", ids(s.c))
	}
	held := make([]byte, blocksOf(size)/8)
	if err := s.c.HeldIn(2, 0, 0, blocksOf(size), held); err != nil {
		t.Fatal(err)
	}
	for b := range blocksOf(size) {
		g := b / blocksPerGranule
		if got, want := held[b/8]&(1<<(b%8)) != 0, g == 2 || g == 4; got != want {
			t.Fatalf("HeldIn(b and c over a): block %d (granule %d) held %v, want %v", b, g, got, want)
		}
	}
	s.reopen()
	if read(2, 4*Granule) != 0xD || read(3, 3*Granule) != 0xE {
		t.Fatal("the chain reads otherwise reopened")
	}
	// Dropping c: b shows a below it there.
	if err := s.c.Drop(1); err != nil {
		t.Fatal(err)
	}
	s.refiles()
	if !slices.Equal(ids(s.c), []string{"a", "b", ""}) || read(1, 4*Granule) != 0xA || read(1, 2*Granule) != 0xB {
		t.Fatalf("after dropping c: %q", ids(s.c))
	}
	if err := s.c.Drop(s.c.Head()); !errors.Is(err, ErrInvalid) {
		t.Fatalf("dropping the head: %v, want ErrInvalid", err)
	}
	// Dropping a, the bottom: b becomes the bottom; a layer inserted under
	// it moves it up, its map read again.
	if err := s.c.Drop(0); err != nil {
		t.Fatal(err)
	}
	s.refiles()
	s.insert(0, "z", s.build(func(uint64) bool { return true }, 0x2))
	if !slices.Equal(ids(s.c), []string{"z", "b", ""}) || read(1, 2*Granule) != 0xB || read(1, 0) != 0x2 {
		t.Fatalf("after inserting under b: %q", ids(s.c))
	}
	if _, err := s.c.Insert(1, "z", s.build(func(uint64) bool { return false }, 0), nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("inserting z above its own position: %v, want ErrInvalid", err)
	}
}

// TestInsertDropsMaplessBottom: the file a replica was created with,
// sealed, has no map and cannot move up; a layer inserted under it takes
// its place.
func TestInsertDropsMaplessBottom(t *testing.T) {
	const size = 4 * Granule
	dir := t.TempDir()
	s := openStore(t, dir, size)
	s.write(bytes.Repeat([]byte{1}, size), 0)
	s.seal("old")
	s.insert(0, "new", s.build(func(uint64) bool { return true }, 0x7))
	if !slices.Equal(ids(s.c), []string{"new", ""}) {
		t.Fatalf("chain %q, want [new head]", ids(s.c))
	}
	if _, err := os.Stat(filepath.Join(dir, "data")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the dropped bottom's file: %v", err)
	}
	p := make([]byte, 1)
	s.readIn(1, p, 0)
	if p[0] != 0x7 {
		t.Fatalf("the head reads %#x, want the new bottom's 0x7", p[0])
	}
}
