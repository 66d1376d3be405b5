// Package crypt is what Cairn's encryption at rest (StorageClass parameter
// encryption: aes-256-gcm) is made of: the layout of an encrypted volume on
// its replicas, the sealing of each 4 KiB block with AES-256-GCM, the
// nonces, and the volume's data key wrapped by a key-encryption key derived
// from a passphrase. The engine (replication/engine/sealed.go) encrypts
// before it fans a write out, so replicas, rebuilds, scrubs and snapshots
// only ever handle ciphertext and never hold a key. docs/encryption.md has
// the whole design and its arguments.
package crypt

// BlockSize is the unit of encryption: each 4 KiB block of the volume is
// sealed on its own, with its own nonce and tag.
const BlockSize = 4096

// EntrySize is the bytes of per-block metadata: the 12-byte nonce, the
// 16-byte tag, and 4 bytes kept zero (a format for later). An entry of all
// zeroes is a block never written (or trimmed): it reads as zeroes when its
// data is zeroes too.
const EntrySize = 32

// GroupBlocks is how many data blocks share one metadata block: a metadata
// block holds BlockSize/EntrySize entries.
const GroupBlocks = BlockSize / EntrySize

// groupBytes is the replica bytes of a whole group: its metadata block, then
// its data blocks.
const groupBytes = (GroupBlocks + 1) * BlockSize

// The replicas of an encrypted volume hold groups of one metadata block
// followed by the GroupBlocks data blocks it describes:
//
//	[meta 0][data 0 … data 127][meta 1][data 128 … data 255] …
//
// so the metadata sits beside its data on every replica and goes wherever
// the data goes: snapshots, layers, rebuilds, scrubs and expansion treat it
// as the ordinary bytes it is to them. A last, partial group holds fewer
// data blocks; growing the volume fills it and then appends groups, so no
// block moves. The cost is 1/128 of the volume (8 MiB per GiB).

// PhysicalSize is the size of the replicas of an encrypted volume of
// logical bytes (a multiple of BlockSize, or rounded up to one).
func PhysicalSize(logical uint64) uint64 {
	blocks := (logical + BlockSize - 1) / BlockSize
	groups := (blocks + GroupBlocks - 1) / GroupBlocks
	return (blocks + groups) * BlockSize
}

// LogicalSize is the inverse of PhysicalSize: the bytes a user sees of
// replicas of physical bytes.
func LogicalSize(physical uint64) uint64 {
	blocks := physical / BlockSize
	groups := (blocks + GroupBlocks) / (GroupBlocks + 1)
	if groups > blocks {
		return 0
	}
	return (blocks - groups) * BlockSize
}

// DataOffset is where logical block b's ciphertext sits on the replicas.
// Consecutive blocks of one group are consecutive there.
func DataOffset(b uint64) uint64 {
	return b/GroupBlocks*groupBytes + (1+b%GroupBlocks)*BlockSize
}

// EntryOffset is where logical block b's metadata entry sits on the
// replicas. Consecutive blocks of one group have consecutive entries.
func EntryOffset(b uint64) uint64 {
	return b/GroupBlocks*groupBytes + b%GroupBlocks*EntrySize
}

// Run is the part of a range of logical blocks that falls in one group: its
// data and its entries are each one contiguous range of the replicas.
type Run struct {
	First, Count uint64 // logical blocks
}

// Runs cuts the logical blocks [first, first+count) at group boundaries.
func Runs(first, count uint64) []Run {
	var out []Run
	for count > 0 {
		n := min(count, GroupBlocks-first%GroupBlocks)
		out = append(out, Run{First: first, Count: n})
		first, count = first+n, count-n
	}
	return out
}
