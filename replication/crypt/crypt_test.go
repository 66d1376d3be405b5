package crypt

import (
	"bytes"
	"errors"
	"testing"
)

// TestLayout: every logical block has its own data and entry place, inside
// the physical size, none overlapping another's; sizes round-trip.
func TestLayout(t *testing.T) {
	for _, blocks := range []uint64{1, 2, 127, 128, 129, 255, 256, 257, 1000} {
		logical := blocks * BlockSize
		phys := PhysicalSize(logical)
		if got := LogicalSize(phys); got != logical {
			t.Fatalf("LogicalSize(PhysicalSize(%d)) = %d", logical, got)
		}
		used := map[uint64]string{}
		for b := range blocks {
			d, e := DataOffset(b), EntryOffset(b)
			if d%BlockSize != 0 || d+BlockSize > phys || e+EntrySize > phys {
				t.Fatalf("%d blocks: block %d at %d, entry %d, beyond %d", blocks, b, d, e, phys)
			}
			if o, ok := used[d]; ok {
				t.Fatalf("block %d's data at %d, taken by %s", b, d, o)
			}
			used[d] = "data"
			eb := e / BlockSize * BlockSize
			if used[eb] == "data" {
				t.Fatalf("block %d's entry in a data block", b)
			}
			used[eb] = "meta"
		}
		// Growing keeps every block in place.
		if PhysicalSize(logical) > PhysicalSize(logical+BlockSize) {
			t.Fatal("physical size shrank as the volume grew")
		}
	}
	if got := Runs(120, 140); len(got) != 3 || got[0] != (Run{120, 8}) || got[1] != (Run{128, 128}) || got[2] != (Run{256, 4}) {
		t.Fatalf("Runs(120, 140) = %v", got)
	}
}

func TestSealOpen(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	s, err := NewSealer(key, 5)
	if err != nil {
		t.Fatal(err)
	}
	plain := bytes.Repeat([]byte("cairn plaintext "), BlockSize/16)
	ct := make([]byte, BlockSize, BlockSize+16)
	entry := make([]byte, EntrySize)
	if err := s.Seal(ct, entry, plain, 9); err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(ct, []byte("cairn plaintext")) {
		t.Fatal("ciphertext holds the plaintext")
	}
	scratch := make([]byte, BlockSize+16)
	out := make([]byte, BlockSize)
	if err := s.Open(out, ct, entry, scratch, 9); err != nil || !bytes.Equal(out, plain) {
		t.Fatalf("open: %v, equal %v", err, bytes.Equal(out, plain))
	}
	// Another address: the block was moved.
	if err := s.Open(out, ct, entry, scratch, 10); !errors.Is(err, ErrAuth) {
		t.Fatalf("open at another block: %v, want ErrAuth", err)
	}
	bad := bytes.Clone(ct)
	bad[100] ^= 1
	if err := s.Open(out, bad, entry, scratch, 9); !errors.Is(err, ErrAuth) {
		t.Fatalf("open of a flipped bit: %v, want ErrAuth", err)
	}
	// The reader opens with its own lease (or none).
	r, _ := NewSealer(key, 0)
	if err := r.Open(out, ct, entry, scratch, 9); err != nil {
		t.Fatal(err)
	}
	if err := r.Seal(ct, entry, plain, 9); err == nil {
		t.Fatal("a sealer without a lease sealed")
	}
	// Zero entry over zero data: never written.
	if err := r.Open(out, make([]byte, BlockSize), make([]byte, EntrySize), scratch, 3); err != nil || !isZero(out) {
		t.Fatalf("unwritten block: %v", err)
	}
	// A discard zeroes the entries first: the data behind a zero entry
	// reads as zeroes, whatever is left of it.
	if err := r.Open(out, ct, make([]byte, EntrySize), scratch, 9); err != nil || !isZero(out) {
		t.Fatalf("data with its entry zeroed: %v", err)
	}
}

// TestNoncesNeverRepeat: successive seals carry the lease and a counter
// that moves; two leases never share a nonce.
func TestNoncesNeverRepeat(t *testing.T) {
	key := make([]byte, 32)
	seen := map[string]bool{}
	for _, lease := range []uint64{1, 2, MaxLease} {
		s, err := NewSealer(key, lease)
		if err != nil {
			t.Fatal(err)
		}
		for range 1000 {
			var n [12]byte
			if err := s.nonce(n[:]); err != nil {
				t.Fatal(err)
			}
			if seen[string(n[:])] {
				t.Fatalf("nonce %x repeated", n)
			}
			seen[string(n[:])] = true
			if got := uint64(n[0])<<32 | uint64(n[1])<<24 | uint64(n[2])<<16 | uint64(n[3])<<8 | uint64(n[4]); got != lease {
				t.Fatalf("nonce %x holds lease %d, want %d", n, got, lease)
			}
		}
	}
	if _, err := NewSealer(key, MaxLease+1); !errors.Is(err, ErrNoncesExhausted) {
		t.Fatalf("lease beyond 40 bits: %v", err)
	}
	s, _ := NewSealer(key, 1)
	s.next.Store(1 << counterBits)
	var n [12]byte
	if err := s.nonce(n[:]); !errors.Is(err, ErrNoncesExhausted) {
		t.Fatalf("counter past 56 bits: %v", err)
	}
}

func TestWrapUnwrap(t *testing.T) {
	w, key, err := NewDataKey([]byte("correct horse"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := w.Unwrap([]byte("correct horse"))
	if err != nil || !bytes.Equal(got, key) {
		t.Fatalf("unwrap: %v", err)
	}
	if bytes.Contains(w.Sealed, key) {
		t.Fatal("the record holds the data key")
	}
	for _, p := range []string{"", "correct horsf"} {
		if _, err := w.Unwrap([]byte(p)); !errors.Is(err, ErrWrongKey) {
			t.Fatalf("unwrap with %q: %v, want ErrWrongKey", p, err)
		}
	}
	w2, key2, _ := NewDataKey([]byte("correct horse"))
	if bytes.Equal(key, key2) || w.KeyID == w2.KeyID {
		t.Fatal("two volumes share a data key or a KEK (salts are per volume)")
	}
	bad := *w
	bad.N = 1 << 30
	if _, err := bad.Unwrap([]byte("correct horse")); err == nil {
		t.Fatal("absurd scrypt cost accepted")
	}
}

// TestOpenRun: a run of blocks opens in place to what was sealed, a zero
// entry opens as zeroes, and a damaged block in the middle stops the run at
// its index with ErrAuth while the blocks after it keep their ciphertext
// (the 16 bytes each borrows for the tag are put back), so the run goes on
// from the next block.
func TestOpenRun(t *testing.T) {
	s, err := NewSealer(bytes.Repeat([]byte{7}, 32), 3)
	if err != nil {
		t.Fatal(err)
	}
	const count, first = 5, 40
	plain := make([]byte, count*BlockSize)
	for i := range plain {
		plain[i] = byte(i*31 + i/BlockSize)
	}
	buf := make([]byte, count*BlockSize, count*BlockSize+16)
	entries := make([]byte, count*EntrySize)
	for k := range count {
		if err := s.Seal(buf[k*BlockSize:][:BlockSize], entries[k*EntrySize:][:EntrySize], plain[k*BlockSize:][:BlockSize], first+uint64(k)); err != nil {
			t.Fatal(err)
		}
	}
	clear(entries[1*EntrySize:][:EntrySize]) // block 1: never written
	want := bytes.Clone(plain)
	clear(want[1*BlockSize:][:BlockSize])
	scratch := make([]byte, BlockSize+16)

	whole := bytes.Clone(buf)
	if n, err := s.OpenRun(whole, entries, scratch, first); n != count || err != nil {
		t.Fatalf("OpenRun = %d, %v; want %d, nil", n, err, count)
	}
	if !bytes.Equal(whole, want) {
		t.Fatal("OpenRun opened to other bytes than were sealed")
	}

	damaged := bytes.Clone(buf)
	damaged[2*BlockSize+100] ^= 1
	cipherAfter := bytes.Clone(damaged[3*BlockSize:])
	n, err := s.OpenRun(damaged, entries, scratch, first)
	if n != 2 || !errors.Is(err, ErrAuth) {
		t.Fatalf("OpenRun of a run damaged in block 2 = %d, %v; want 2, ErrAuth", n, err)
	}
	if !bytes.Equal(damaged[:2*BlockSize], want[:2*BlockSize]) || !bytes.Equal(damaged[3*BlockSize:], cipherAfter) {
		t.Fatal("blocks before the damaged one not opened, or blocks after it changed")
	}
	if n, err := s.OpenRun(damaged[3*BlockSize:], entries[3*EntrySize:], scratch, first+3); n != 2 || err != nil {
		t.Fatalf("OpenRun after the damaged block = %d, %v", n, err)
	}
	if !bytes.Equal(damaged[3*BlockSize:], want[3*BlockSize:]) {
		t.Fatal("blocks after the damaged one opened to other bytes")
	}
	// A block moved to another address does not open.
	moved := bytes.Clone(buf[:BlockSize])
	if _, err := s.OpenRun(moved, entries[:EntrySize], scratch, first+9); !errors.Is(err, ErrAuth) {
		t.Fatalf("block opened at another address: %v", err)
	}
}
