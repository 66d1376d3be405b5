package layer

import (
	"errors"
	"math/rand/v2"
	"os"
	"testing"
)

// keepAll is Recover's test of a block after a process crash: the page
// cache holds everything written.
func keepAll(uint64) (bool, error) { return true, nil }

// recover settles the store's pending bits as a replica's open does.
func (s *store) recover(keep func(b uint64) (bool, error)) (promoted, dropped uint64) {
	s.t.Helper()
	promoted, dropped, err := s.c.Recover(keep, s.files[s.c.Head()].Sync)
	if err != nil {
		s.t.Fatalf("Recover: %v", err)
	}
	if u := s.c.Unclean(); u.Blocks != 0 {
		s.t.Fatalf("after Recover the chain still reports %+v", u)
	}
	return promoted, dropped
}

// layeredStore is a store with a sealed layer of random data, and the model
// of what it holds.
func layeredStore(t *testing.T, seed uint64) (*store, *model, *rand.Rand) {
	r := rand.New(rand.NewPCG(seed, 11))
	s := openStore(t, t.TempDir(), testSize)
	m := &model{head: randBytes(r, testSize), snaps: map[string][]byte{}}
	s.write(m.head, 0)
	s.seal("a")
	m.snaps["a"] = append([]byte(nil), m.head...)
	return s, m, r
}

// TestPendingBitsSurviveProcessCrash: blocks written into the head and not
// synced are still held after the process dies and the chain is opened
// again (the bug: the bits lived in anonymous memory and the blocks read
// their old contents from the layer below). Open reports them as this
// boot's; Recover makes them durable and clears the pending file.
func TestPendingBitsSurviveProcessCrash(t *testing.T) {
	s, m, r := layeredStore(t, 1)
	p := randBytes(r, 5*BlockSize+100)
	s.write(p, 3*BlockSize+7) // 6 blocks
	copy(m.head[3*BlockSize+7:], p)
	s.kill()
	if u := s.c.Unclean(); u.Blocks != 6 || !u.SameBoot {
		t.Fatalf("after the kill Unclean() = %+v, want 6 blocks of this boot", u)
	}
	s.check(m, "after the kill, before Recover")
	if promoted, dropped := s.recover(keepAll); promoted != 6 || dropped != 0 {
		t.Fatalf("Recover promoted %d and dropped %d, want 6 and 0", promoted, dropped)
	}
	s.check(m, "after Recover")
	// Durable now: a power loss that keeps nothing of the pending file
	// changes nothing.
	s.crash()
	s.check(m, "after Recover and a power loss")
	if u := s.c.Unclean(); u.Blocks != 0 {
		t.Fatalf("Unclean() = %+v after a clean open", u)
	}
}

// TestRecoverDropsBlocksNotKept: the blocks the caller's test rejects (their
// data did not reach the disk) read their old contents from below, and the
// index forgets the head where it held nothing else; the rest read new.
func TestRecoverDropsBlocksNotKept(t *testing.T) {
	s, m, r := layeredStore(t, 2)
	old := append([]byte(nil), m.head...)
	const first, n = 20, 40 // blocks across three granules
	s.write(randBytes(r, n*BlockSize), first*BlockSize)
	lost := func(b uint64) bool { return b%3 == 0 || b >= 48 } // 48.. is granule 3, whole
	s.kill()
	want := append([]byte(nil), old...)
	for b := uint64(first); b < first+n; b++ {
		if lost(b) {
			continue
		}
		_, err := s.files[s.c.Head()].ReadAt(want[b*BlockSize:(b+1)*BlockSize], int64(b*BlockSize))
		if err != nil {
			t.Fatal(err)
		}
	}
	promoted, dropped := s.recover(func(b uint64) (bool, error) { return !lost(b), nil })
	var wantDropped uint64
	for b := uint64(first); b < first+n; b++ {
		if lost(b) {
			wantDropped++
		}
	}
	if dropped != wantDropped || promoted != n-wantDropped {
		t.Fatalf("Recover promoted %d and dropped %d, want %d and %d", promoted, dropped, n-wantDropped, wantDropped)
	}
	m.head = want
	s.check(m, "after Recover")
	if top := s.c.getTop(3); top != 0 {
		t.Fatalf("granule 3, whose blocks all fell back, has index %d, want 0", top)
	}
	s.kill() // nothing pending any more: the same
	if u := s.c.Unclean(); u.Blocks != 0 {
		t.Fatalf("Unclean() = %+v after Recover and a kill", u)
	}
	s.check(m, "after Recover and a kill")
	s.crash()
	s.check(m, "after Recover and a power loss")
}

// TestPendingBitsOfAnotherBoot: a pending file whose header does not name
// the running boot (a power loss or reboot came between) is reported as
// such; one that does, written after Recover, is this boot's again.
func TestPendingBitsOfAnotherBoot(t *testing.T) {
	s, m, r := layeredStore(t, 3)
	p := randBytes(r, BlockSize)
	s.write(p, 0)
	copy(m.head, p)
	s.close()
	defer func(f func() string) { bootID = f }(bootID)
	bootID = func() string { return "00000000-0000-0000-0000-000000000001" }
	s.open()
	if u := s.c.Unclean(); u.Blocks != 1 || u.SameBoot {
		t.Fatalf("Unclean() = %+v, want 1 block of another boot", u)
	}
	s.recover(keepAll)
	s.check(m, "after Recover")
	s.write(p, BlockSize)
	copy(m.head[BlockSize:], p)
	s.kill()
	if u := s.c.Unclean(); u.Blocks != 1 || !u.SameBoot {
		t.Fatalf("after Recover and a kill Unclean() = %+v, want 1 block of this boot", u)
	}
	// A boot id that cannot be read names no boot.
	s.close()
	bootID = func() string { return "" }
	s.open()
	if u := s.c.Unclean(); u.Blocks != 1 || u.SameBoot {
		t.Fatalf("without a boot id Unclean() = %+v, want 1 block of another boot", u)
	}
	s.recover(keepAll)
	s.check(m, "after Recover")
}

// TestGrowAndSealKeepPendingBits: a Grow between a write and a kill keeps
// the write's bit (the pending file grows; the bits stay in it), and so
// does a write past the old end; a Seal moves the head's pending bits into
// its map first, removes the sealed head's pending file, and the new head
// has its own.
func TestGrowAndSealKeepPendingBits(t *testing.T) {
	s, m, r := layeredStore(t, 4)
	p := randBytes(r, 3*BlockSize)
	s.write(p, BlockSize)
	copy(m.head[BlockSize:], p)
	const grown = 4*testSize + 5*BlockSize
	if err := s.c.Grow(grown); err != nil {
		t.Fatal(err)
	}
	for _, f := range s.files {
		if err := f.Truncate(grown); err != nil {
			t.Fatal(err)
		}
	}
	s.size = grown
	m.head = append(m.head, make([]byte, grown-testSize)...)
	q := randBytes(r, 2*BlockSize)
	s.write(q, 3*testSize)
	copy(m.head[3*testSize:], q)
	s.kill()
	if u := s.c.Unclean(); u.Blocks != 5 || !u.SameBoot {
		t.Fatalf("after Grow and a kill Unclean() = %+v, want 5 blocks of this boot", u)
	}
	s.recover(keepAll)
	s.checkHead(m, "after Grow, a kill and Recover")

	// Seal with writes not synced: Seal syncs them into the map first.
	s.write(p, 7*BlockSize)
	copy(m.head[7*BlockSize:], p)
	oldHead := s.c.Path(s.c.Head(), pendingKind)
	s.seal("b")
	if _, err := os.Stat(oldHead); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the sealed head's pending file is still there: %v", err)
	}
	if _, err := os.Stat(s.c.Path(s.c.Head(), pendingKind)); err != nil {
		t.Fatalf("the new head has no pending file: %v", err)
	}
	s.crash() // a power loss keeping no pending bit: the seal synced them
	s.checkHead(m, "after a Seal and a power loss")
	s.write(q, 0)
	copy(m.head, q)
	s.kill()
	if u := s.c.Unclean(); u.Blocks != 2 {
		t.Fatalf("after a Seal and a kill Unclean() = %+v, want 2 blocks", u)
	}
	s.recover(keepAll)
	s.checkHead(m, "after a Seal, a kill and Recover")
}

// TestStrayPendingFileOfSealedLayer: a sealed layer's pending file (a crash
// after a Seal's record, before its removal) goes at the next Open; the
// head's stays.
func TestStrayPendingFileOfSealedLayer(t *testing.T) {
	s, _, _ := layeredStore(t, 5)
	s.seal("b")
	sealed := s.c.Path(1, pendingKind)
	if err := os.WriteFile(sealed, make([]byte, pendingHeader+8), 0o600); err != nil {
		t.Fatal(err)
	}
	s.kill()
	if _, err := os.Stat(sealed); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a sealed layer's pending file survived Open: %v", err)
	}
	if _, err := os.Stat(s.c.Path(s.c.Head(), pendingKind)); err != nil {
		t.Fatalf("the head's pending file: %v", err)
	}
}
