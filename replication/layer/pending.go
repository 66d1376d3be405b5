package layer

import (
	"bytes"
	"fmt"
	"math/bits"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The head's pending bits (docs/snapshots.md, "What a layer holds").
//
// A block written into the head has its bit set in the pending bits, not in
// the map, until a Sync has made its data durable: a bit on disk before its
// data would, after a power loss, make the block read what never reached the
// head's file (zeros) instead of its old contents below. The pending bits
// live in a file beside the map, "<stem>.pending", mapped shared and never
// synced on purpose. A process that dies (SIGKILL of the node agent) leaves
// them in the page cache together with the data they describe, so the next
// Open finds them; a power loss leaves whatever writeback chose of either.
// Open therefore only reports them (Unclean), and Recover, given a test of
// each block's data by the caller, decides which to keep, before the head is
// used.
//
// The file starts with a header of pendingHeader bytes naming the boot of
// the machine that last settled it (the kernel's boot id), then the bits, in
// the map's format. Bits found under a header naming the running boot were
// written by a process of this boot: the page cache holds every page it
// wrote, the data's as much as the bits'. Any other header (another boot,
// or none: the header never reached the disk) means a power loss or a
// reboot came between, and the caller must check the data.

const (
	// pendingHeader is the header's span: a page, so that the bits start
	// on a page of the file, as touched counts them.
	pendingHeader = 4096
	pendingMagic  = "cairn layer pending bits 1\n"
	// stampBytes is how much of the header a stamp writes: the magic,
	// the boot id (36 characters) and a newline, padded with zeros.
	stampBytes = 128
)

// bootID returns the running kernel's boot id, drawn at random at every
// boot; "" when it cannot be read, and then no header names this boot.
var bootID = sync.OnceValue(func() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
})

// stamp returns the header naming the running boot; nil if it is unknown.
func stamp() []byte {
	id := bootID()
	if id == "" {
		return nil
	}
	h := make([]byte, stampBytes)
	copy(h, pendingMagic+id+"\n")
	return h
}

// Unclean describes the pending bits that Open found in the head's pending
// file: the blocks written since the last Sync before the chain was left
// without a Sync (a process crash, or a power loss).
type Unclean struct {
	// Blocks counts the blocks with a pending bit, whether or not the
	// head's map holds them already (a block written again since).
	Blocks uint64
	// SameBoot: the bits were written since the machine last started, so
	// a process stopped, not the machine; the page cache kept everything
	// it wrote (the head's data and sums included). Otherwise any part of
	// the head's files, bits and data alike, may be lost.
	SameBoot bool
}

// mapPending sizes f, a pending file, for a map of n bytes and maps it
// shared, header and bits.
func mapPending(f *os.File, n int) ([]byte, error) {
	if err := f.Truncate(int64(pendingHeader + n)); err != nil {
		return nil, err
	}
	return unix.Mmap(int(f.Fd()), 0, pendingHeader+n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
}

func touchedLen(pendingBytes int) int { return ((pendingBytes+pageBytes-1)/pageBytes + 31) / 32 }

// openPending opens the head l's pending file (creating it: a head made
// before pending files existed, or whose file a power loss took), maps it
// and records the bits it holds (Unclean). Their pages are marked touched,
// so that a Sync moves whatever Recover keeps.
func (c *Chain) openPending(l *layer) error {
	f, err := os.OpenFile(c.path(l.Stem, pendingKind), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("layer %q: open the pending bits: %w", l.Stem, err)
	}
	m, err := mapPending(f, len(l.bits))
	if err != nil {
		_ = f.Close() // the mapping error is the one to report
		return fmt.Errorf("layer %q: map the pending bits: %w", l.Stem, err)
	}
	l.pendingFile, l.pendingMap, l.pending = f, m, m[pendingHeader:]
	c.touched = make([]uint32, touchedLen(len(l.pending)))
	var u Unclean
	if err := c.guard("read the pending bits", func() {
		for b := uint64(0); b < uint64(len(l.pending))*8; b += 32 {
			if v := atomic.LoadUint32(word(l.pending, b)); v != 0 {
				u.Blocks += uint64(bits.OnesCount32(v))
				p := b / 8 / pageBytes
				c.touched[p/32] |= 1 << (p % 32)
			}
		}
		want := stamp()
		u.SameBoot = want != nil && bytes.Equal(m[:len(want)], want)
	}); err != nil {
		return err
	}
	c.unclean = u
	if u.Blocks == 0 {
		// Nothing to settle: from now on the bits are this boot's.
		l.stampBoot()
	}
	return nil
}

// stampBoot writes the running boot into l's pending header: bits found
// under it later are this boot's. Written through the file (the page
// cache), never synced. A failure leaves an older header, which only makes
// the next open after a process crash test the data as after a power loss.
func (l *layer) stampBoot() {
	if h := stamp(); h != nil && l.pendingFile != nil {
		_, _ = l.pendingFile.WriteAt(h, 0)
	}
}

// Unclean returns what Open found in the head's pending file (zero once a
// Sync or Recover settled it, or if there was nothing).
func (c *Chain) Unclean() Unclean {
	c.syncMu.Lock()
	defer c.syncMu.Unlock()
	return c.unclean
}

// UncleanRuns calls fn for each run of blocks [first, first+n) with a
// pending bit that Open found, in order: the caller marks them changed
// (they were written since the last Sync) before Recover makes any of them
// durable.
func (c *Chain) UncleanRuns(fn func(first, n uint64)) error {
	c.syncMu.Lock()
	defer c.syncMu.Unlock()
	if c.unclean.Blocks == 0 {
		return nil
	}
	head := c.layers[len(c.layers)-1]
	return c.guard("read the pending bits", func() {
		var first, n uint64
		for w := uint64(0); w < uint64(len(head.pending))*8; w += 32 {
			for v := atomic.LoadUint32(word(head.pending, w)); v != 0; v &= v - 1 {
				b := w + uint64(bits.TrailingZeros32(v))
				switch {
				case b >= c.blocks:
				case n > 0 && first+n == b:
					n++
				default:
					if n > 0 {
						fn(first, n)
					}
					first, n = b, 1
				}
			}
		}
		if n > 0 {
			fn(first, n)
		}
	})
}

// Recover settles the pending bits that Open found (Unclean), before the
// head is used: for each block they name that the head's map does not hold,
// keep reports whether the head's data file holds the block as written (the
// caller's test: after a process crash everything written is there; after
// a power loss the block's data may not be). A kept block stays held; a
// block not kept loses its bit and reads from the layers below again (its
// old contents, as from a disk that lost its cache). Then, as a Sync does,
// syncData makes the head's data durable before the kept bits go into the
// map, which is synced. promoted and dropped count the blocks kept and not.
// The caller holds the chain to itself.
func (c *Chain) Recover(keep func(b uint64) (bool, error), syncData func() error) (promoted, dropped uint64, err error) {
	if c.Unclean().Blocks == 0 {
		return 0, 0, nil
	}
	h := len(c.layers) - 1
	head := c.layers[h]
	var kerr error
	var granules []uint64 // those that lost a bit, in order
	err = c.guard("settle the pending bits", func() {
		for b := uint64(0); b < uint64(len(head.pending))*8 && kerr == nil; b += 32 {
			v := atomic.LoadUint32(word(head.pending, b))
			if w := word(head.bits, b); w != nil {
				v &^= atomic.LoadUint32(w) // held already: nothing to decide
			}
			for ; v != 0; v &= v - 1 {
				bb := b + uint64(bits.TrailingZeros32(v))
				ok := false
				if bb < c.blocks {
					if ok, kerr = keep(bb); kerr != nil {
						return
					}
				}
				if ok {
					promoted++
					continue
				}
				atomic.AndUint32(word(head.pending, bb), ^uint32(1<<(bb%32)))
				dropped++
				if g := bb / blocksPerGranule; len(granules) == 0 || granules[len(granules)-1] != g {
					granules = append(granules, g)
				}
			}
		}
		// The index may name the head for a granule that it no longer
		// holds any block of.
		for _, g := range granules {
			if g < c.granules() {
				c.setTop(g, c.newestHolderOfGranule(g, h))
			}
		}
	})
	if err == nil {
		err = kerr
	}
	if err != nil {
		return promoted, dropped, fmt.Errorf("layer: settle the pending bits in %s: %w", c.dir, err)
	}
	if err := c.Sync(syncData); err != nil {
		return promoted, dropped, err
	}
	return promoted, dropped, nil
}

// settled records, after a Sync that moved every bit it found (Sync holds
// syncMu), that the bits Open found are settled: any left now are this
// boot's. Open marked their pages touched, so the Sync found them all.
func (c *Chain) settled() {
	if c.unclean.Blocks == 0 {
		return
	}
	c.unclean = Unclean{}
	c.layers[len(c.layers)-1].stampBoot()
}
