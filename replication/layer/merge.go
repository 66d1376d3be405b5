package layer

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Removing a sealed layer k (its snapshot was deleted) folds it into its
// child k+1: the blocks k holds and k+1 does not are moved into k+1, which
// then holds everything k+1 showed before, and k leaves the chain. The
// cost is the data that only k holds; the extra space while it runs is the
// part moved and not yet freed, which the caller bounds by moving a range
// of granules at a time (MergeRange) and freeing what it moved when the
// range is done. A crash at any point leaves a chain that reads the same:
// a block's bit in k+1 is set only after its data there is durable, so a
// rerun finds the moved blocks held by k+1 and moves only the rest.
//
// The child is changed, never k, so k may be shared with another replica
// (a clone holding a link to it): this replica only drops its own link. The
// child must not be shared: its files would change under the other replica.

// Shared reports whether any of layer i's files has other links (another
// replica's chain holds the layer too).
func (c *Chain) Shared(i int) (bool, error) {
	for _, kind := range append([]string{mapKind}, c.kinds...) {
		var st unix.Stat_t
		err := unix.Stat(c.path(c.layers[i].Stem, kind), &st)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return false, err
		}
		if st.Nlink > 1 {
			return true, nil
		}
	}
	return false, nil
}

// Granules returns the number of index granules: the range of MergeRange.
func (c *Chain) Granules() uint64 { return c.granules() }

// MergeRange moves the blocks of granules [g0, g1) that layer k holds and
// its child does not into the child. move copies layer k's bytes [off,
// off+n) into the child's files (a hole may be punched rather than
// copied); sync makes what move wrote durable. It returns the bytes moved.
// The caller keeps writes out of the range while it runs (the child may be
// the head).
func (c *Chain) MergeRange(k int, g0, g1 uint64, move func(off, n uint64) error, sync func() error) (moved uint64, err error) {
	if err := c.checkMerge(k); err != nil {
		return 0, err
	}
	g1 = min(g1, c.granules())
	child := c.layers[k+1]
	if err := c.writableMap(k + 1); err != nil {
		return 0, err
	}
	type run struct{ first, n uint64 } // in blocks
	var runs []run
	if err := c.guard("find the blocks to merge", func() {
		for b := g0 * blocksPerGranule; b < min(c.blocks, g1*blocksPerGranule); b++ {
			if child.has(b) || k > 0 && !c.layers[k].has(b) {
				continue
			}
			if len(runs) > 0 && runs[len(runs)-1].first+runs[len(runs)-1].n == b {
				runs[len(runs)-1].n++
			} else {
				runs = append(runs, run{b, 1})
			}
		}
	}); err != nil {
		return 0, err
	}
	if len(runs) == 0 {
		return 0, nil
	}
	for _, r := range runs {
		if err := move(r.first*BlockSize, r.n*BlockSize); err != nil {
			return moved, err
		}
		moved += r.n * BlockSize
	}
	if err := sync(); err != nil {
		return moved, err
	}
	if err := c.guard("record merged blocks", func() {
		for _, r := range runs {
			for b := r.first; b < r.first+r.n; b++ {
				atomic.OrUint32(word(child.bits, b), 1<<(b%32))
			}
			for g := r.first / blocksPerGranule; g <= (r.first+r.n-1)/blocksPerGranule; g++ {
				c.raiseTop(g, k+1)
			}
		}
	}); err != nil {
		return moved, err
	}
	if err := unix.Fdatasync(int(child.mapFile.Fd())); err != nil {
		return moved, fmt.Errorf("layer: sync the map of %s: %w", child.Stem, err)
	}
	return moved, nil
}

func (c *Chain) checkMerge(k int) error {
	if k < 0 || k >= len(c.layers)-1 {
		return fmt.Errorf("%w: layer %d of %d cannot be merged (the head cannot)", ErrInvalid, k, len(c.layers))
	}
	shared, err := c.Shared(k + 1)
	if err != nil {
		return err
	}
	if shared {
		return fmt.Errorf("%w: layer %s, the child of %s", ErrShared, c.layers[k+1].Stem, c.layers[k].Stem)
	}
	return nil
}

// writableMap maps layer i's map read-write (a sealed layer's is mapped
// read-only until a merge writes into it).
func (c *Chain) writableMap(i int) error {
	l := c.layers[i]
	if i == len(c.layers)-1 || l.writable {
		return nil
	}
	if err := l.unmap(); err != nil {
		return err
	}
	f, err := os.OpenFile(c.path(l.Stem, mapKind), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	l.mapFile = f
	// The map must cover the volume: blocks past its end are set too.
	if err := f.Truncate(int64(mapBytes(c.blocks))); err != nil {
		return err
	}
	if err := mapFile(l, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		return err
	}
	l.writable = true
	return nil
}

// FinishMerge takes layer k, whose blocks MergeRange moved into its child
// over the whole volume, out of the chain and removes its files (its map
// and those of Options.Kinds). A layer that still holds a block its child does not →
// ErrUnmerged, and nothing changes. The new record is the commit point; a
// crash after it leaves files that the next Open removes. The caller holds
// the chain to itself.
func (c *Chain) FinishMerge(k int) error {
	if err := c.checkMerge(k); err != nil {
		return err
	}
	var left uint64
	if err := c.guard("check a merge", func() {
		child := c.layers[k+1]
		for b := range c.blocks {
			if !child.has(b) && (k == 0 || c.layers[k].has(b)) {
				left++
			}
		}
	}); err != nil {
		return err
	}
	if left > 0 {
		return fmt.Errorf("%w: %s holds %d blocks that %s does not", ErrUnmerged, c.layers[k].Stem, left, c.layers[k+1].Stem)
	}
	entries := c.Entries()
	gone := entries[k]
	entries = append(entries[:k:k], entries[k+1:]...)
	if err := c.writeRecord(entries); err != nil {
		return fmt.Errorf("layer: record the chain without %s: %w", gone.Stem, err)
	}
	l := c.layers[k]
	c.layers = append(c.layers[:k:k], c.layers[k+1:]...)
	for g := range c.granules() {
		if t := c.getTop(g); t > k {
			c.setTop(g, t-1)
		}
	}
	err := l.unmap()
	if k == 0 {
		// The child is the bottom now, which holds every block: its map
		// is not read any more.
		err = errors.Join(err, c.layers[0].unmap())
	}
	for _, kind := range append([]string{mapKind}, c.kinds...) {
		if rerr := os.Remove(c.path(gone.Stem, kind)); rerr != nil && !errors.Is(rerr, fs.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
	}
	return err
}

// Usage is what a layer occupies, in blocks: Held, the blocks it holds
// (for the bottom: every block of the volume), and Shadowed, those of them
// its child holds too, which removing the layer frees. The head shadows
// nothing.
type Usage struct {
	Held, Shadowed uint64
}

// Usage counts layer i's blocks. It reads i's and its child's maps whole.
func (c *Chain) Usage(i int) (u Usage, err error) {
	err = c.guard("count a layer's blocks", func() {
		if i == 0 {
			u.Held = c.blocks
		} else {
			u.Held = c.layers[i].popcount(c.blocks)
		}
		if i == len(c.layers)-1 {
			return
		}
		child := c.layers[i+1]
		for b := range c.blocks {
			if child.has(b) && (i == 0 || c.layers[i].has(b)) {
				u.Shadowed++
			}
		}
	})
	return u, err
}
