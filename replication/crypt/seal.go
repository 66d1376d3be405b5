package crypt

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
)

// ErrAuth is a block that fails authentication: its ciphertext, its entry or
// its place was changed since it was sealed (or the key is wrong).
var ErrAuth = errors.New("block fails authentication")

// ErrNoncesExhausted: a lease's nonces are used up (2^56 writes) or its
// prefix is beyond the 40 bits it has. Never reached in practice; refused
// rather than ever repeating a nonce.
var ErrNoncesExhausted = errors.New("nonces of this lease used up")

// Nonce layout: the 12 bytes are a 40-bit lease from the volume store, then
// a 56-bit counter. The store hands out each lease once in the cluster's
// life (meta.LeaseNonces: a counter in the Raft-replicated state), and an
// engine takes one each time it opens a volume for writing; only that
// engine counts in it, from 0, up. So no two seals under one data key share
// a nonce: not across rewrites (the counter moves), failovers and restarts
// (a new engine, a new lease), nor snapshots and clones (they share the
// data key, but every engine of every volume in the cluster leases from the
// same counter). See docs/encryption.md.
const (
	leaseBits   = 40
	counterBits = 56
	// MaxLease is the largest lease a nonce can hold.
	MaxLease = 1<<leaseBits - 1
)

// Sealer seals and opens the blocks of one volume under its data key, with
// the nonces of one lease. Safe for concurrent use.
type Sealer struct {
	aead  cipher.AEAD
	lease uint64
	next  atomic.Uint64 // counter of the next nonce
}

// NewSealer returns a Sealer for the 32-byte data key. lease is the nonce
// lease of the engine (0: open only; Seal fails).
func NewSealer(dataKey []byte, lease uint64) (*Sealer, error) {
	if len(dataKey) != 32 {
		return nil, fmt.Errorf("data key of %d bytes, want 32 (AES-256)", len(dataKey))
	}
	if lease > MaxLease {
		return nil, fmt.Errorf("nonce lease %d beyond %d: %w", lease, uint64(MaxLease), ErrNoncesExhausted)
	}
	block, err := aes.NewCipher(dataKey)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: aead, lease: lease}, nil
}

// nonce returns the next nonce of the lease into n.
func (s *Sealer) nonce(n []byte) error {
	if s.lease == 0 {
		return errors.New("sealer without a nonce lease: it only opens")
	}
	c := s.next.Add(1) - 1
	if c >= 1<<counterBits {
		return ErrNoncesExhausted
	}
	binary.BigEndian.PutUint64(n[4:12], c)
	// The lease's low 40 bits go over bytes 0..4; the counter's 56 bits
	// are bytes 5..11.
	n[0] = byte(s.lease >> 32)
	binary.BigEndian.PutUint32(n[1:5], uint32(s.lease))
	return nil
}

// aad is the authenticated data of logical block b: its address, so that a
// block copied to another address fails to open.
func aad(b uint64) []byte {
	var a [8]byte
	binary.BigEndian.PutUint64(a[:], b)
	return a[:]
}

// Seal encrypts plain (BlockSize bytes), logical block b, into dst
// (BlockSize bytes, which must have 16 bytes of capacity beyond them; they
// are overwritten) and its entry (EntrySize bytes). dst and plain must not
// overlap.
func (s *Sealer) Seal(dst, entry, plain []byte, b uint64) error {
	if len(plain) != BlockSize || len(entry) != EntrySize || cap(dst) < BlockSize+16 {
		return fmt.Errorf("seal: block of %d bytes, entry of %d, room %d", len(plain), len(entry), cap(dst))
	}
	if err := s.nonce(entry[:12]); err != nil {
		return err
	}
	out := s.aead.Seal(dst[:0], entry[:12], plain, aad(b))
	copy(entry[12:28], out[BlockSize:])
	clear(entry[28:])
	return nil
}

// Open decrypts block b's ciphertext (BlockSize bytes) with its entry into
// dst (BlockSize bytes). scratch is BlockSize+16 bytes of the caller's (GCM
// wants the tag after the ciphertext). A zero entry is a block never
// written, or discarded: dst is zeroed whatever the data holds (a discard
// zeroes the entries first; docs/encryption.md). Anything else that fails
// is ErrAuth.
func (s *Sealer) Open(dst, ciphertext, entry, scratch []byte, b uint64) error {
	if isZero(entry) {
		clear(dst)
		return nil
	}
	copy(scratch, ciphertext)
	copy(scratch[BlockSize:], entry[12:28])
	if _, err := s.aead.Open(dst[:0], entry[:12], scratch[:BlockSize+16], aad(b)); err != nil {
		return fmt.Errorf("block %d: %w", b, ErrAuth)
	}
	return nil
}

// OpenRun decrypts in place the blocks of buf (a multiple of BlockSize:
// consecutive logical blocks from first, their ciphertext in, their
// plaintext out), with their entries (EntrySize each). It stops at the
// first block that fails and returns its index with ErrAuth (that block's
// bytes are then undefined; the others before it are opened and the ones
// after it untouched); it returns len(buf)/BlockSize and nil when every
// block opens. scratch is BlockSize+16 bytes of the caller's.
//
// GCM wants the tag right after the ciphertext. Each block but the last
// borrows the 16 bytes after it (the next block's first ciphertext bytes,
// put back at once), so a read of many blocks is opened with no copy; the
// last block goes through scratch, as Open does.
func (s *Sealer) OpenRun(buf, entries, scratch []byte, first uint64) (int, error) {
	count := len(buf) / BlockSize
	if len(buf)%BlockSize != 0 || len(entries) != count*EntrySize {
		return 0, fmt.Errorf("open: %d bytes with %d bytes of entries", len(buf), len(entries))
	}
	var saved [16]byte
	var ad [8]byte
	for k := range count {
		block := buf[k*BlockSize:][:BlockSize]
		entry := entries[k*EntrySize:][:EntrySize]
		b := first + uint64(k)
		if k == count-1 {
			if err := s.Open(block, block, entry, scratch, b); err != nil {
				return k, err
			}
			continue
		}
		if isZero(entry) {
			clear(block)
			continue
		}
		sealed := buf[k*BlockSize:][:BlockSize+16]
		copy(saved[:], sealed[BlockSize:])
		copy(sealed[BlockSize:], entry[12:28])
		binary.BigEndian.PutUint64(ad[:], b)
		_, err := s.aead.Open(block[:0], entry[:12], sealed, ad[:])
		copy(sealed[BlockSize:], saved[:])
		if err != nil {
			return k, fmt.Errorf("block %d: %w", b, ErrAuth)
		}
	}
	return count, nil
}

func isZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
