package engine

import (
	"sync"

	"github.com/cairn-csi/cairn/replication/crypt"
)

// entryCache keeps recent metadata blocks of an encrypted volume (the
// entries of a group of 128 blocks each; replication/crypt), so that a
// read of blocks whose group is cached reads only their ciphertext: a
// second read per I/O was the largest cost of an encrypted read.
//
// It is a hint, never the truth. The data always comes from a replica, and
// an entry opens only the exact ciphertext it was sealed with (every seal
// has its own nonce), so a stale entry cannot make a read return wrong data:
// it fails to open, and the read then drops the group and reads again from
// the replicas holding the blocks' logical range (sealedRead). Writes,
// discards and repairs of the engine update or drop the groups they touch;
// a fill that races a write may still leave a stale entry, which costs that
// retry once.
//
// Direct-mapped and bounded: entryCacheSlots metadata blocks (4 MiB, for
// 512 MiB of data) at most, each allocated when first filled.
type entryCache struct {
	slots [entryCacheSlots]entrySlot
}

const entryCacheSlots = 1024

type entrySlot struct {
	mu    sync.Mutex
	group uint64
	valid bool
	block []byte // allocated by the first fill, kept after
}

func (c *entryCache) slot(group uint64) *entrySlot { return &c.slots[group%entryCacheSlots] }

// get copies the entries of logical blocks [first, first+len(dst)/EntrySize)
// (all in one group) into dst, if their group is cached.
func (c *entryCache) get(first uint64, dst []byte) bool {
	g := first / crypt.GroupBlocks
	s := c.slot(g)
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.valid || s.group != g {
		return false
	}
	copy(dst, s.block[first%crypt.GroupBlocks*crypt.EntrySize:])
	return true
}

// put caches group's metadata block (blockSize bytes, read from a replica).
func (c *entryCache) put(group uint64, block []byte) {
	s := c.slot(group)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.block == nil {
		s.block = make([]byte, blockSize)
	}
	s.group, s.valid = group, true
	copy(s.block, block)
}

// update writes the entries of logical blocks from first (one group) into
// the cache, if their group is cached.
func (c *entryCache) update(first uint64, entries []byte) {
	g := first / crypt.GroupBlocks
	s := c.slot(g)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.valid && s.group == g {
		copy(s.block[first%crypt.GroupBlocks*crypt.EntrySize:], entries)
	}
}

// drop forgets the group of logical block b.
func (c *entryCache) drop(b uint64) {
	g := b / crypt.GroupBlocks
	s := c.slot(g)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.group == g {
		s.valid = false
	}
}
