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

// PrepareMerge readies layer k's merge into its child: it checks that the
// child is not shared and maps the child's map writable. The caller holds
// the chain to itself (the old mapping goes away under no reader), and
// then runs MergeRange over the volume and FinishMerge.
func (c *Chain) PrepareMerge(k int) error {
	if err := c.checkMerge(k); err != nil {
		return err
	}
	return c.writableMap(k + 1)
}

// MergeRange moves the blocks of granules [g0, g1) that layer k holds and
// its child does not durably hold into the child. move copies layer k's
// bytes [off, off+n) into the child's files (a hole may be punched rather
// than copied); sync makes what move wrote durable. It returns the bytes
// moved. Only the child's durable bits count: if the child is the head,
// the caller syncs it first (Sync) and keeps writes out while the range
// is merged, or a block written but not yet synced there would lose its
// older copy here. PrepareMerge came first. One merge at a time.
func (c *Chain) MergeRange(k int, g0, g1 uint64, move func(off, n uint64) error, sync func() error) (moved uint64, err error) {
	if err := c.checkMerge(k); err != nil {
		return 0, err
	}
	g1 = min(g1, c.granules())
	child := c.layers[k+1]
	if k+1 != len(c.layers)-1 && !child.writable {
		return 0, fmt.Errorf("%w: merge of layer %d not prepared", ErrInvalid, k)
	}
	type run struct{ first, n uint64 } // in blocks
	var runs []run
	if err := c.guard("find the blocks to merge", func() {
		for b := g0 * blocksPerGranule; b < min(c.blocks, g1*blocksPerGranule); b++ {
			if child.hasDurable(b) || k > 0 && !c.layers[k].has(b) {
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
		// The short last block of a volume is moved as far as the volume
		// goes: a layer's files are never longer than the volume.
		off := r.first * BlockSize
		n := min(r.n*BlockSize, c.size-off)
		if err := move(off, n); err != nil {
			return moved, err
		}
		moved += n
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
// The new mapping is made before the old one goes, so that a failure
// leaves the layer as it was.
func (c *Chain) writableMap(i int) error {
	l := c.layers[i]
	if i == len(c.layers)-1 || l.writable {
		return nil
	}
	f, err := os.OpenFile(c.path(l.Stem, mapKind), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	nl := &layer{Entry: l.Entry, mapFile: f}
	// The map must cover the volume: blocks past its end are set too.
	if err := f.Truncate(int64(mapBytes(c.blocks))); err != nil {
		_ = f.Close() // the truncate error is the one to report
		return err
	}
	if err := mapFile(nl, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		_ = f.Close()
		return err
	}
	_ = l.unmap() // read-only: only fails on a bad address
	l.mapFile, l.bits, l.writable = nl.mapFile, nl.bits, true
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
			if !child.hasDurable(b) && (k == 0 || c.layers[k].has(b)) {
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
	// Committed. What follows cannot fail in a way that matters: a file
	// left behind is a stray, which the next Open removes.
	l := c.layers[k]
	c.layers = append(c.layers[:k:k], c.layers[k+1:]...)
	for g := range c.granules() {
		if t := c.getTop(g); t > k {
			c.setTop(g, t-1)
		}
	}
	_ = l.unmap()
	if k == 0 && len(c.layers) > 1 {
		// The child is the bottom now, which holds every block: its map
		// is not read any more. (A head that became the bottom keeps its
		// map: the chain of one layer does not read it either.)
		_ = c.layers[0].unmap()
	}
	c.removeFiles(gone.Stem)
	return nil
}

// MarkDeleting records in the chain that layer k's snapshot is being
// deleted, before a merge frees any of its data: from then on it is no
// snapshot any more (Entry.Deleting), whatever happens to the merge, and
// a restart resumes the deletion. The caller holds the chain to itself.
func (c *Chain) MarkDeleting(k int) error {
	if k < 0 || k >= len(c.layers)-1 {
		return fmt.Errorf("%w: layer %d of %d", ErrInvalid, k, len(c.layers))
	}
	if c.layers[k].Deleting {
		return nil
	}
	entries := c.Entries()
	entries[k].Deleting = true
	if err := c.writeRecord(entries); err != nil {
		return fmt.Errorf("layer: record that %s is being deleted: %w", c.layers[k].ID, err)
	}
	c.layers[k].Deleting = true
	return nil
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
