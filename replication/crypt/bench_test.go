package crypt

import "testing"

// BenchmarkSeal and BenchmarkOpen: AES-256-GCM of one 4 KiB block, the
// cipher's own cost per block (docs/encryption.md, "Cost").
func BenchmarkSeal(b *testing.B) {
	s, _ := NewSealer(make([]byte, 32), 1)
	plain := make([]byte, BlockSize)
	dst := make([]byte, BlockSize, BlockSize+16)
	entry := make([]byte, EntrySize)
	b.SetBytes(BlockSize)
	for b.Loop() {
		if err := s.Seal(dst, entry, plain, 7); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkOpen(b *testing.B) {
	s, _ := NewSealer(make([]byte, 32), 1)
	plain := make([]byte, BlockSize)
	ct := make([]byte, BlockSize, BlockSize+16)
	entry := make([]byte, EntrySize)
	if err := s.Seal(ct, entry, plain, 7); err != nil {
		b.Fatal(err)
	}
	dst, scratch := make([]byte, BlockSize), make([]byte, BlockSize+16)
	b.SetBytes(BlockSize)
	for b.Loop() {
		if err := s.Open(dst, ct, entry, scratch, 7); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnwrap: one scrypt derivation and unwrap, what CreateVolume and
// NodeStage pay once, and what each passphrase guess costs an attacker
// holding the store's record.
func BenchmarkUnwrap(b *testing.B) {
	w, _, err := NewDataKey([]byte("passphrase"))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := w.Unwrap([]byte("passphrase")); err != nil {
			b.Fatal(err)
		}
	}
}
