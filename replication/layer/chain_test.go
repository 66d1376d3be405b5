package layer

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// store is the smallest layered block store on top of a Chain, the way a
// replica uses one: each layer's data in a sparse file of the volume's
// size ("data"), writes into the head after copying up the blocks they
// cover in part, reads by Spans.
type store struct {
	t     testing.TB
	dir   string
	size  uint64
	c     *Chain
	files []*os.File // per layer, as c lists them
}

func openStore(t testing.TB, dir string, size uint64) *store {
	t.Helper()
	s := &store{t: t, dir: dir, size: size}
	s.open()
	t.Cleanup(func() { s.close() })
	return s
}

func (s *store) open() {
	s.t.Helper()
	if _, err := os.Stat(filepath.Join(s.dir, "data")); errors.Is(err, os.ErrNotExist) {
		if _, err := os.Stat(filepath.Join(s.dir, recordName)); errors.Is(err, os.ErrNotExist) {
			s.createData(filepath.Join(s.dir, "data"))
		}
	}
	c, err := Open(s.dir, s.size, Options{Kinds: []string{"data"}})
	if err != nil {
		s.t.Fatalf("Open: %v", err)
	}
	s.c = c
	s.files = nil
	for i := range c.Len() {
		s.files = append(s.files, s.openData(c.Path(i, "data")))
	}
}

func (s *store) createData(path string) {
	s.t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		s.t.Fatal(err)
	}
	if err := f.Truncate(int64(s.size)); err != nil {
		s.t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		s.t.Fatal(err)
	}
}

func (s *store) openData(path string) *os.File {
	s.t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		s.t.Fatal(err)
	}
	return f
}

func (s *store) close() {
	if s.c == nil {
		return
	}
	for _, f := range s.files {
		_ = f.Close()
	}
	if err := s.c.Close(); err != nil {
		s.t.Errorf("Close: %v", err)
	}
	s.c = nil
}

// reopen closes and opens the store as a clean restart does: Flush first.
func (s *store) reopen() {
	s.t.Helper()
	s.flush()
	s.crash()
}

// crash closes and opens the store without a Flush, as a power loss that
// kept none of the head's pending file leaves it: the bits of blocks
// written since the last Flush are forgotten (their data may or may not
// have reached the head's file).
func (s *store) crash() {
	s.t.Helper()
	s.close()
	s.losePending()
	s.open()
}

// losePending removes the pending files: none of them reached the disk.
func (s *store) losePending() {
	s.t.Helper()
	names, err := filepath.Glob(filepath.Join(s.dir, "*."+pendingKind))
	if err != nil {
		s.t.Fatal(err)
	}
	for _, name := range names {
		if err := os.Remove(name); err != nil {
			s.t.Fatal(err)
		}
	}
}

// kill closes and opens the store without a Flush, as a process crash
// leaves it: the page cache keeps every file as written, the pending bits
// included, for Recover.
func (s *store) kill() {
	s.t.Helper()
	s.close()
	s.open()
}

// readIn reads [off, off+len(p)) as layers 0 to last show it.
func (s *store) readIn(last int, p []byte, off uint64) {
	s.t.Helper()
	err := s.c.SpansIn(last, off, uint64(len(p)), func(i int, o, m uint64) error {
		_, err := s.files[i].ReadAt(p[o-off:o-off+m], int64(o))
		return err
	})
	if err != nil {
		s.t.Fatalf("read %d bytes at %d in layers 0-%d: %v", len(p), off, last, err)
	}
}

// write writes p at off into the head, copying up the blocks at either end
// that p covers in part and the head does not hold.
func (s *store) write(p []byte, off uint64) {
	s.t.Helper()
	h := s.c.Head()
	aoff := off / BlockSize * BlockSize
	aend := min(s.size, (off+uint64(len(p))+BlockSize-1)/BlockSize*BlockSize)
	buf := make([]byte, aend-aoff)
	for _, b := range []uint64{aoff, aend - BlockSize} {
		if i, err := s.c.Holder(b); err != nil {
			s.t.Fatal(err)
		} else if i != h {
			s.readIn(h, buf[b-aoff:b-aoff+BlockSize], b)
		} else if _, err := s.files[h].ReadAt(buf[b-aoff:b-aoff+BlockSize], int64(b)); err != nil {
			s.t.Fatal(err)
		}
	}
	copy(buf[off-aoff:], p)
	if _, err := s.files[h].WriteAt(buf, int64(aoff)); err != nil {
		s.t.Fatal(err)
	}
	if err := s.c.MarkHeld(aoff, aend-aoff); err != nil {
		s.t.Fatal(err)
	}
}

func (s *store) flush() {
	s.t.Helper()
	if err := s.c.Sync(s.files[s.c.Head()].Sync); err != nil {
		s.t.Fatal(err)
	}
}

func (s *store) seal(id string) {
	s.t.Helper()
	err := s.c.Seal(id, s.files[s.c.Head()].Sync, func(stem string) error {
		s.createData(filepath.Join(s.dir, stem+".data"))
		return nil
	})
	if err != nil {
		s.t.Fatalf("Seal %s: %v", id, err)
	}
	s.files = append(s.files, s.openData(s.c.Path(s.c.Head(), "data")))
}

// mergeSome moves the blocks of granules [g0, g1) of layer k into its
// child.
func (s *store) mergeSome(k int, g0, g1 uint64) {
	s.t.Helper()
	if err := s.c.PrepareMerge(k); err != nil {
		s.t.Fatalf("PrepareMerge %d: %v", k, err)
	}
	if k+1 == s.c.Head() {
		s.flush() // only the child's durable bits count
	}
	from, to := s.files[k], s.files[k+1]
	_, err := s.c.MergeRange(k, g0, g1, func(off, n uint64) error {
		buf := make([]byte, n)
		if _, err := from.ReadAt(buf, int64(off)); err != nil {
			return err
		}
		_, err := to.WriteAt(buf, int64(off))
		return err
	}, to.Sync)
	if err != nil {
		s.t.Fatalf("MergeRange %d [%d, %d): %v", k, g0, g1, err)
	}
}

func (s *store) finish(k int) {
	s.t.Helper()
	if err := s.c.FinishMerge(k); err != nil {
		s.t.Fatalf("FinishMerge %d: %v", k, err)
	}
	_ = s.files[k].Close()
	s.files = append(s.files[:k:k], s.files[k+1:]...)
}

// model is what the store must read: the head's contents and each sealed
// snapshot's, by id.
type model struct {
	head  []byte
	snaps map[string][]byte
}

// checkHead reads the head whole and compares it with m.
func (s *store) checkHead(m *model, when string) {
	s.t.Helper()
	got := make([]byte, s.size)
	s.readIn(s.c.Head(), got, 0)
	if i := firstDiff(got, m.head); i >= 0 {
		s.t.Fatalf("%s: the head differs first at byte %d (block %d)", when, i, i/BlockSize)
	}
}

// check reads the head and every snapshot whole and compares them with m.
func (s *store) check(m *model, when string) {
	s.t.Helper()
	s.checkHead(m, when)
	got := make([]byte, s.size)
	for id, want := range m.snaps {
		k, err := s.c.Find(id)
		if err != nil {
			s.t.Fatalf("%s: snapshot %s: %v", when, id, err)
		}
		s.readIn(k, got, 0)
		if i := firstDiff(got, want); i >= 0 {
			s.t.Fatalf("%s: snapshot %s (layer %d) differs first at byte %d (block %d)", when, id, k, i, i/BlockSize)
		}
	}
	if n := s.c.Len() - 1; n != len(m.snaps) {
		s.t.Fatalf("%s: %d sealed layers, %d snapshots", when, n, len(m.snaps))
	}
}

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

const testSize = 1<<20 + 3*BlockSize // 16 granules and a short one

func randBytes(r *rand.Rand, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(r.Uint32())
	}
	return p
}

// TestPreChainReplicaIsOneLayer: a directory with only a data file (a
// replica from before chains) is a chain of one layer whose files keep
// their names, and a read is one run from it.
func TestPreChainReplicaIsOneLayer(t *testing.T) {
	s := openStore(t, t.TempDir(), testSize)
	if s.c.Len() != 1 || s.c.Path(0, "data") != filepath.Join(s.dir, "data") {
		t.Fatalf("Len %d, Path %s", s.c.Len(), s.c.Path(0, "data"))
	}
	var runs int
	if err := s.c.Spans(100, 5*BlockSize, func(i int, o, m uint64) error {
		runs++
		if i != 0 || o != 100 || m != 5*BlockSize {
			t.Fatalf("run %d %d+%d", i, o, m)
		}
		return nil
	}); err != nil || runs != 1 {
		t.Fatalf("Spans: %v, %d runs", err, runs)
	}
	if _, err := os.Stat(filepath.Join(s.dir, recordName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("opening wrote a record: %v", err)
	}
}

// TestSnapshotsKeepTheirContents is the chain's model test: random
// unaligned writes, seals, merges of random layers done in random pieces,
// and reopenings; after every step the head and every snapshot read what
// was written.
func TestSnapshotsKeepTheirContents(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 7))
			s := openStore(t, t.TempDir(), testSize)
			m := &model{head: make([]byte, testSize), snaps: map[string][]byte{}}
			next := 0
			for step := range 100 {
				full := true // read the snapshots too, not only the head
				switch op := r.IntN(10); {
				case op < 6:
					n := 1 + r.IntN(3*BlockSize)
					off := r.IntN(testSize - n)
					p := randBytes(r, n)
					s.write(p, uint64(off))
					copy(m.head[off:], p)
					full = step%8 == 0 // writes do not touch the snapshots
				case op < 8:
					id := fmt.Sprint("snap-", next)
					next++
					s.seal(id)
					m.snaps[id] = bytes.Clone(m.head)
				case op < 9 && s.c.Len() > 1:
					k := r.IntN(s.c.Len() - 1)
					id := s.c.Entries()[k].ID
					for g := uint64(0); g < s.c.Granules(); {
						e := g + 1 + uint64(r.IntN(5))
						s.mergeSome(k, g, e)
						g = e
					}
					s.finish(k)
					delete(m.snaps, id)
				default:
					s.reopen()
				}
				if full {
					s.check(m, fmt.Sprint("step ", step))
				} else {
					s.checkHead(m, fmt.Sprint("step ", step))
				}
			}
		})
	}
}

// TestInterruptedMergeReadsTheSame: a merge stopped halfway (the process
// died) leaves a chain that reads the same after reopening, and finishing
// it afterwards (moving everything again from the start) loses nothing.
func TestInterruptedMergeReadsTheSame(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	s := openStore(t, t.TempDir(), testSize)
	m := &model{head: make([]byte, testSize), snaps: map[string][]byte{}}
	for _, id := range []string{"a", "b"} {
		for range 20 {
			n := 1 + r.IntN(2*BlockSize)
			off := r.IntN(testSize - n)
			p := randBytes(r, n)
			s.write(p, uint64(off))
			copy(m.head[off:], p)
		}
		s.seal(id)
		m.snaps[id] = bytes.Clone(m.head)
	}
	s.mergeSome(0, 0, s.c.Granules()/2)
	s.reopen()
	s.check(m, "after half a merge and a restart")
	if err := s.c.FinishMerge(0); !errors.Is(err, ErrUnmerged) {
		t.Fatalf("FinishMerge of a half-merged layer: %v, want ErrUnmerged", err)
	}
	s.check(m, "after a refused FinishMerge")
	s.mergeSome(0, 0, s.c.Granules())
	s.finish(0)
	delete(m.snaps, "a")
	s.reopen()
	s.check(m, "after the merge finished")
	if _, err := os.Stat(filepath.Join(s.dir, "data")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the merged-away bottom's data file is still there: %v", err)
	}
}

// TestInterruptedSealLeavesTheChain: a seal that fails before its record
// (here: preparing the new head fails) leaves the chain as it was, and the
// files it made are removed when the chain is opened again.
func TestInterruptedSealLeavesTheChain(t *testing.T) {
	s := openStore(t, t.TempDir(), testSize)
	s.seal("first")
	var stem string
	err := s.c.Seal("second", s.files[s.c.Head()].Sync, func(st string) error {
		stem = st
		s.createData(filepath.Join(s.dir, st+".data"))
		return errors.New("the disk went away")
	})
	if err == nil || !strings.Contains(err.Error(), "the disk went away") {
		t.Fatalf("Seal: %v", err)
	}
	if s.c.Len() != 2 {
		t.Fatalf("a failed seal changed the chain: %d layers", s.c.Len())
	}
	s.reopen()
	for _, kind := range []string{"data", "map"} {
		if _, err := os.Stat(filepath.Join(s.dir, stem+"."+kind)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the failed seal's %s file is still there: %v", kind, err)
		}
	}
	if _, err := s.c.Find("second"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Find of the failed seal: %v", err)
	}
}

// TestSharedChildIsNotMerged: a layer whose child is linked into another
// replica (a clone) cannot be merged into it: the child would change under
// the clone.
func TestSharedChildIsNotMerged(t *testing.T) {
	s := openStore(t, t.TempDir(), testSize)
	s.seal("a")
	s.seal("b")
	other := t.TempDir()
	if err := os.Link(s.c.Path(1, mapKind), filepath.Join(other, "l.map")); err != nil {
		t.Fatal(err)
	}
	if err := s.c.PrepareMerge(0); !errors.Is(err, ErrShared) {
		t.Fatalf("PrepareMerge into a shared layer: %v, want ErrShared", err)
	}
	_, err := s.c.MergeRange(0, 0, s.c.Granules(), func(uint64, uint64) error { return nil }, func() error { return nil })
	if !errors.Is(err, ErrShared) {
		t.Fatalf("MergeRange into a shared layer: %v, want ErrShared", err)
	}
	if shared, err := s.c.Shared(0); err != nil || shared {
		t.Fatalf("Shared(0) = %v, %v", shared, err)
	}
}

// TestGrowKeepsSnapshots: after the volume grows, the head reads zeros past
// the old end until written, and a snapshot from before still reads its
// old contents (its map is shorter than the volume).
func TestGrowKeepsSnapshots(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	s := openStore(t, t.TempDir(), testSize)
	p := randBytes(r, testSize)
	s.write(p, 0)
	s.seal("before")
	const bigger = 2*testSize + 5*BlockSize
	if err := s.c.Grow(bigger); err != nil {
		t.Fatal(err)
	}
	for _, f := range s.files {
		if err := f.Truncate(bigger); err != nil {
			t.Fatal(err)
		}
	}
	s.size = bigger
	q := randBytes(r, 3*BlockSize)
	s.write(q, bigger-2*BlockSize-100)
	m := &model{head: make([]byte, bigger), snaps: map[string][]byte{"before": make([]byte, bigger)}}
	copy(m.head, p)
	copy(m.snaps["before"], p)
	copy(m.head[bigger-2*BlockSize-100:], q)
	s.check(m, "after growing")
	s.reopen()
	s.check(m, "after growing and reopening")
	if err := s.c.Grow(testSize); !errors.Is(err, ErrInvalid) {
		t.Fatalf("shrinking: %v, want ErrInvalid", err)
	}
}

// TestUsageCounts: a layer's held blocks and the blocks of it that its
// child holds too (what deleting it frees).
func TestUsageCounts(t *testing.T) {
	s := openStore(t, t.TempDir(), testSize)
	s.seal("base")
	s.write(make([]byte, 10*BlockSize), 0)
	s.seal("a")
	s.write(make([]byte, 4*BlockSize), 2*BlockSize)
	u, err := s.c.Usage(1)
	if err != nil || u != (Usage{Held: 10, Shadowed: 4}) {
		t.Fatalf("Usage(1) = %+v, %v; want 10 held, 4 shadowed", u, err)
	}
	if u, err := s.c.Usage(2); err != nil || u != (Usage{Held: 4}) {
		t.Fatalf("Usage(head) = %+v, %v", u, err)
	}
}

// TestIndexIsTwoBytesPerGranule: the heap index is 2 bytes per 64 KiB.
func TestIndexIsTwoBytesPerGranule(t *testing.T) {
	const size = 1 << 30
	dir := t.TempDir()
	s := openStore(t, dir, size)
	s.seal("a")
	if got, want := 4*len(s.c.top), 2*size/Granule; got != want {
		t.Fatalf("index of a 1 GiB volume: %d bytes, want %d", got, want)
	}
}

// TestMapFaultIsAnError: a map page that cannot be written (here: the map
// file cut short behind the chain's back; a full disk faults the same way)
// fails Sync with an error, and the process goes on.
func TestMapFaultIsAnError(t *testing.T) {
	s := openStore(t, t.TempDir(), testSize)
	s.seal("a")
	if err := os.Truncate(s.c.Path(s.c.Head(), mapKind), 0); err != nil {
		t.Fatal(err)
	}
	s.write(make([]byte, BlockSize), 0)
	err := s.c.Sync(func() error { return nil })
	if err == nil || !strings.Contains(err.Error(), "fault on a mapped map file") {
		t.Fatalf("Sync with its map page gone: %v", err)
	}
}

// TestLayerLimit: Seal past the configured limit is refused and changes
// nothing; ids are unique and checked.
func TestLayerLimit(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, testSize)
	s.close()
	c, err := Open(dir, testSize, Options{MaxLayers: 2, Kinds: []string{"data"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nothing := func() error { return nil }
	prep := func(string) error { return nil }
	if err := c.Seal("../x", nothing, prep); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Seal with a bad id: %v", err)
	}
	if err := c.Seal("a", nothing, prep); err != nil {
		t.Fatal(err)
	}
	if err := c.Seal("b", nothing, prep); !errors.Is(err, ErrTooManyLayers) || c.Len() != 2 {
		t.Fatalf("Seal past the limit: %v, %d layers", err, c.Len())
	}
}

// TestUnsyncedWriteReadsOldAfterCrash: a block that a snapshot holds,
// overwritten in the head and not synced, reads its old contents after a
// crash (never zeros: the head's bit is not durable before its data); a
// synced one reads the new contents; a failed data sync keeps the bits
// pending.
func TestUnsyncedWriteReadsOldAfterCrash(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	s := openStore(t, t.TempDir(), testSize)
	old := randBytes(r, 8*BlockSize)
	s.write(old, 0)
	s.seal("a")
	m := &model{head: make([]byte, testSize), snaps: map[string][]byte{"a": make([]byte, testSize)}}
	copy(m.head, old)
	copy(m.snaps["a"], old)

	synced := randBytes(r, 2*BlockSize)
	s.write(synced, 0)
	copy(m.head, synced)
	s.flush()
	s.write(randBytes(r, 3*BlockSize+7), 3*BlockSize) // not synced
	if err := s.c.Sync(func() error { return errors.New("EIO") }); err == nil {
		t.Fatal("Sync with a failing data sync succeeded")
	}
	s.crash()
	s.check(m, "after a crash")
	if u, err := s.c.Usage(1); err != nil || u.Held != 2 {
		t.Fatalf("the head holds %+v (%v) after the crash, want the 2 synced blocks", u, err)
	}
}

// TestSyncsRunOneAtATime: a Sync called while another waits for its data
// sync does not return before the bits of the writes that completed ahead
// of it are in the map (found by review: it returned at once, having found
// nothing to move, while the first still held those bits).
func TestSyncsRunOneAtATime(t *testing.T) {
	const size = 256 << 20
	s := openStore(t, t.TempDir(), size)
	s.seal("s0")
	blk := make([]byte, BlockSize)
	s.write(blk, 0) // its bit: page 0 of the pending bits
	head := s.c.layers[s.c.Head()]
	inData := make(chan struct{})
	release := make(chan struct{})
	first := make(chan error)
	go func() { // a slow data sync
		first <- s.c.Sync(func() error { close(inData); <-release; return nil })
	}()
	<-inData
	s.write(blk, uint64(pageBytes*8)*BlockSize) // a bit in page 1
	second := make(chan error)
	go func() { second <- s.c.Sync(func() error { return nil }) }()
	select {
	case err := <-second:
		t.Fatalf("the second Sync returned (%v) while the first still held block 0's bit", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	for _, b := range []uint64{0, pageBytes * 8} {
		if atomic.LoadUint32(word(head.bits, b))&(1<<(b%32)) == 0 {
			t.Fatalf("block %d is not in the map after both Syncs returned", b)
		}
	}
}
