package replica

import (
	"bytes"
	"errors"
	"testing"
)

// TestWritePair: a WRITE with FlagPair writes both ranges; with checksums,
// a damaged piece in either range refuses the whole request and writes
// neither; overlapping ranges are refused.
func TestWritePair(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	if _, err := s.CreateWith("p-r0", testSize, CreateOptions{Checksums: true}); err != nil {
		t.Fatal(err)
	}
	c := dial(t, addr, "p-r0", testSize)
	ctx := testCtx(t)
	if err := c.Claim(ctx, 2); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xAB}, 8192)
	entries := bytes.Repeat([]byte{0xCD}, 64)
	const doff, eoff = 3 * 4096, 4096 + 64
	pair := Pair{Off: eoff, Data: entries, FirstPieces: PieceSums(nil, data, doff), SecondPieces: PieceSums(nil, entries, eoff)}
	if err := c.WritePair(ctx, 2, data, doff, pair, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if err := c.ReadAt(ctx, 2, got, doff); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("first range: %v", err)
	}
	if err := c.ReadAt(ctx, 2, got[:64], eoff); err != nil || !bytes.Equal(got[:64], entries) {
		t.Fatalf("second range: %v", err)
	}

	// A damaged piece of the second range: nothing of either is written.
	data2 := bytes.Repeat([]byte{0x11}, 8192)
	bad := pair
	bad.Data = bytes.Repeat([]byte{0x22}, 64)
	bad.FirstPieces = PieceSums(nil, data2, doff)
	bad.SecondPieces = PieceSums(nil, entries, eoff) // the old entries' sums
	if err := c.WritePair(ctx, 2, data2, doff, bad, false); !errors.Is(err, ErrChecksum) {
		t.Fatalf("a pair with a damaged piece: %v, want ErrChecksum", err)
	}
	if err := c.ReadAt(ctx, 2, got, doff); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the refused pair changed the first range: %v", err)
	}
	// Ranges that share a block are refused, by the client and by the
	// replica.
	overlap := Pair{Off: doff + 100, Data: entries}
	if err := c.WritePair(ctx, 2, data, doff, overlap, false); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("overlapping pair: %v, want ErrInvalidArgument", err)
	}
	r, err := s.Get("p-r0")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.WritePair(2, data, doff, overlap, false); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("overlapping pair at the replica: %v, want ErrInvalidArgument", err)
	}
}
