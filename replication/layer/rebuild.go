package layer

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/internal/atomicfile"
)

// Carrying a chain to another replica (a rebuild, docs/snapshots.md).
//
// The rebuilder makes a target replica's sealed layers equal to a source's,
// oldest first. A layer the target lacks (or holds with other contents) is
// built aside, under a stem that no record lists (BuildMap and the caller's
// data and sums files), so that until it is published it is a stray, which
// the next Open removes: a crash midway never shows half a layer. Insert
// publishes it through the record, the one commit point. Drop takes a layer
// out without merging it (when a merge cannot run).
//
// Both change the positions of the layers above the change, so they leave
// the views of those layers (and of the head) to the caller: the rebuilder
// compares every layer above, and the head, after it, and copies what
// differs. That is why they are for a replica being rebuilt, which serves
// no reads.

// BuildMap is the map file of a layer being built: a bit per block, set for
// the blocks the layer will hold, in the format of every map file. It is
// written with plain reads and writes (the layer is in no chain yet, so no
// reader maps it) by one writer at a time.
type BuildMap struct {
	f      *os.File
	blocks uint64
}

// CreateBuildMap creates the (empty) map file of a layer to be built under
// stem in dir, for a volume of size bytes, durably, and opens it.
func CreateBuildMap(dir, stem string, size uint64) (*BuildMap, error) {
	if !validStem(stem) {
		return nil, fmt.Errorf("%w: stem %q", ErrInvalid, stem)
	}
	c := &Chain{dir: dir}
	path := c.path(stem, mapKind)
	if err := atomicfile.CreateSized(path, int64(mapBytes(blocksOf(size)))); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &BuildMap{f: f, blocks: blocksOf(size)}, nil
}

// Set makes the map's bits for blocks [first, first+n) those of held (bit j
// of byte j/8 for block first+j): held blocks set, the others cleared.
func (m *BuildMap) Set(first, n uint64, held []byte) error {
	if first+n > m.blocks {
		return fmt.Errorf("%w: blocks %d+%d of a map of %d", ErrInvalid, first, n, m.blocks)
	}
	if n == 0 {
		return nil
	}
	lo, buf, err := m.bytesOf(first, n)
	if err != nil {
		return err
	}
	for j := range n {
		b := first + j - lo*8
		if held[j/8]&(1<<(j%8)) != 0 {
			buf[b/8] |= 1 << (b % 8)
		} else {
			buf[b/8] &^= 1 << (b % 8)
		}
	}
	_, err = m.f.WriteAt(buf, int64(lo))
	return err
}

// Get fills held with the bits of blocks [first, first+n), as Set takes them.
func (m *BuildMap) Get(first, n uint64, held []byte) error {
	clear(held[:(n+7)/8])
	if n == 0 {
		return nil
	}
	lo, buf, err := m.bytesOf(first, n)
	if err != nil {
		return err
	}
	for j := range n {
		b := first + j - lo*8
		if buf[b/8]&(1<<(b%8)) != 0 {
			held[j/8] |= 1 << (j % 8)
		}
	}
	return nil
}

// bytesOf reads the bytes of the map that hold the bits of blocks [first,
// first+n), n > 0; lo is the first one's offset.
func (m *BuildMap) bytesOf(first, n uint64) (lo uint64, buf []byte, err error) {
	lo = first / 8
	buf = make([]byte, (first+n-1)/8+1-lo)
	k, err := m.f.ReadAt(buf, int64(lo))
	if errors.Is(err, io.EOF) {
		clear(buf[k:])
		err = nil
	}
	return lo, buf, err
}

// Sync makes the map durable.
func (m *BuildMap) Sync() error { return unix.Fdatasync(int(m.f.Fd())) }

// Close closes the map file.
func (m *BuildMap) Close() error { return m.f.Close() }

// Insert publishes a layer built aside (its map made by CreateBuildMap, its
// other files by the caller, all under stem and durable) as the sealed layer
// id at position pos, below the head: the layers from pos up move one up. A
// sealed layer with the same id leaves the chain (the new one replaces it);
// it must not lie below pos. The new record is the commit point.
//
// Two layers cannot move up, having no map of the blocks they hold: the
// head when it is the only layer (it is the bottom, which holds every
// block) and a sealed bottom without a map file (the file a replica was
// created with). Inserting at 0 replaces the first with a new, empty head
// (its files made through prepare, as for Seal) and drops the second. It
// reports whether the head was replaced. The caller holds the chain to
// itself.
func (c *Chain) Insert(pos int, id, stem string, prepare func(stem string) error) (headReplaced bool, err error) {
	if !validID(id) || !validStem(stem) {
		return false, fmt.Errorf("%w: layer %q under %q", ErrInvalid, id, stem)
	}
	if _, err := os.Stat(c.path(stem, mapKind)); err != nil {
		return false, fmt.Errorf("%w: the map of %s: %v", ErrInvalid, stem, err)
	}
	keep := make([]*layer, 0, len(c.layers)+1)
	var gone []*layer
	for i, l := range c.layers {
		if i < len(c.layers)-1 && l.ID == id {
			if i < pos {
				return false, fmt.Errorf("%w: layer %q is at %d, below %d", ErrInvalid, id, i, pos)
			}
			gone = append(gone, l)
			continue
		}
		keep = append(keep, l)
	}
	if pos < 0 || pos > len(keep)-1 {
		return false, fmt.Errorf("%w: position %d in a chain of %d layers", ErrInvalid, pos, len(keep))
	}
	var head *layer
	if pos == 0 {
		switch bottom := keep[0]; {
		case len(c.layers) == 1:
			// The head is the bottom: a chain of one layer keeps no map.
			hs, err := c.takeSpare()
			if err == nil && hs == "" {
				hs, err = c.makeHeadFiles(prepare)
			}
			if err != nil {
				return false, err
			}
			head = &layer{Entry: Entry{Stem: hs}}
			gone, keep = append(gone, bottom), keep[:0]
		case len(keep) > 1 && !c.hasMap(bottom):
			gone, keep = append(gone, bottom), keep[1:]
		}
	}
	if len(keep)+1+btoi(head != nil) > c.maxLayers {
		return false, fmt.Errorf("%w (%d)", ErrTooManyLayers, c.maxLayers)
	}
	nl := &layer{Entry: Entry{ID: id, Stem: stem}}
	layers := append(append(append([]*layer(nil), keep[:pos]...), nl), keep[pos:]...)
	if head != nil {
		layers = append(layers, head)
	}
	entries := make([]Entry, len(layers))
	for i, l := range layers {
		entries[i] = l.Entry
	}
	if err := c.writeRecord(entries); err != nil {
		if head != nil {
			c.removeFiles(head.Stem) // a stray either way; tidier gone now
		}
		return false, fmt.Errorf("%w: record the chain with %s: %v", ErrReopen, id, err)
	}
	// Committed: the layers that moved to a position above the bottom need
	// their maps (the bottom's is never read), the new head its own.
	for i, l := range layers {
		switch {
		case l == head:
			err = c.openMap(l, true)
		case i > 0 && l.bits == nil && l.mapFile == nil:
			err = c.openMap(l, false)
		}
		if err != nil {
			return false, fmt.Errorf("%w: %s is published but cannot be used: %v", ErrReopen, id, err)
		}
	}
	c.layers = layers
	for _, l := range gone {
		_ = l.unmap() // read-only or a head no one uses now: only fails on a bad address
		c.removeFiles(l.Stem)
	}
	if err := c.buildIndex(); err != nil {
		return head != nil, fmt.Errorf("%w: %v", ErrReopen, err)
	}
	return head != nil, nil
}

// hasMap reports whether layer l has a map file (every layer has one but
// the file a replica was created with, and a bottom restored from it).
func (c *Chain) hasMap(l *layer) bool {
	if l.Stem == "" {
		return false
	}
	_, err := os.Stat(c.path(l.Stem, mapKind))
	return !errors.Is(err, fs.ErrNotExist)
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Drop takes sealed layer k out of the chain without merging it into its
// child, and removes its files: the layers above it then show less (what
// only k held reads from below). The rebuilder uses it for a layer that
// its source no longer has and that cannot be merged (its child is shared),
// then copies what the layers above must show. The new record is the commit
// point. The caller holds the chain to itself.
func (c *Chain) Drop(k int) error {
	if k < 0 || k >= len(c.layers)-1 {
		return fmt.Errorf("%w: layer %d of %d cannot be dropped (the head cannot)", ErrInvalid, k, len(c.layers))
	}
	entries := c.Entries()
	gone := c.layers[k]
	entries = append(entries[:k:k], entries[k+1:]...)
	if err := c.writeRecord(entries); err != nil {
		return fmt.Errorf("%w: record the chain without %s: %v", ErrReopen, gone.ID, err)
	}
	c.layers = append(c.layers[:k:k], c.layers[k+1:]...)
	_ = gone.unmap()
	if k == 0 && len(c.layers) > 1 {
		_ = c.layers[0].unmap() // the bottom's map is not read (see FinishMerge)
	}
	c.removeFiles(gone.Stem)
	if err := c.buildIndex(); err != nil {
		return fmt.Errorf("%w: %v", ErrReopen, err)
	}
	return nil
}

// HeldIn fills held (bit j of byte j/8) with the blocks [first, first+n)
// that layers above+1 to last hold: the blocks a layer holds once the
// layers between it and the layer above (being deleted, not yet merged
// into it) have been merged. With above < 0 that is every block (the
// bottom holds them all). Blocks past the volume's end are not held.
func (c *Chain) HeldIn(last, above int, first, n uint64, held []byte) error {
	if last < 0 || last >= len(c.layers) || above >= last {
		return fmt.Errorf("%w: layers %d to %d of %d", ErrInvalid, above+1, last, len(c.layers))
	}
	clear(held[:(n+7)/8])
	return c.guard("find the blocks of a layer", func() {
		for j := range n {
			b := first + j
			if b < c.blocks && c.heldAbove(b, last, above) {
				held[j/8] |= 1 << (j % 8)
			}
		}
	})
}

// heldAbove reports whether a layer at positions above+1 to last holds
// block b.
func (c *Chain) heldAbove(b uint64, last, above int) bool {
	if above < 0 {
		return true
	}
	for i := min(c.getTop(b/blocksPerGranule), last); i > above; i-- {
		if c.layers[i].has(b) {
			return true
		}
	}
	return false
}

// ValidID reports whether id can name a layer (a snapshot): 1–128 of
// [A-Za-z0-9_-].
func ValidID(id string) bool { return validID(id) }
