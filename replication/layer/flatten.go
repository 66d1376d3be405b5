package layer

import (
	"fmt"
	"os"
)

// Flattening (docs/snapshots.md, "Chain depth and flattening").
//
// A volume restored from a snapshot shares its source's layers up to that
// snapshot by hard link. A restore of a restore shares those and more, so
// chains grow with every generation, and every read of a block that only a
// low layer holds walks the maps above it. Flattening replaces the lowest
// layers 0..k with one layer built aside that holds everything layer k
// shows: the replica then reads the same everywhere and drops its links to
// the old layers (freeing them if it was the last to hold them, and letting
// the source merge a deleted snapshot into a layer no longer shared).

// Flatten publishes a layer built aside under stem (its map made by
// CreateBuildMap, every file durable) in place of layers 0 to k: it becomes
// the bottom and takes layer k's id. It must show what layer k shows, for
// every block of the volume; the layers above and the head read the same
// afterwards. Layer k must be sealed, and no layer 0 to k being deleted
// (a merge in progress moves blocks between them). The new record is the
// commit point: a crash before it leaves the old chain and a stray stem
// that the next Open removes, a crash after it the files of the old layers,
// likewise. This replica's links to the old layers' files are removed. The
// caller holds the chain to itself.
func (c *Chain) Flatten(k int, stem string) error {
	if k < 0 || k >= len(c.layers)-1 {
		return fmt.Errorf("%w: layer %d of %d cannot be flattened into (the head cannot)", ErrInvalid, k, len(c.layers))
	}
	if !validStem(stem) {
		return fmt.Errorf("%w: stem %q", ErrInvalid, stem)
	}
	if _, err := os.Stat(c.path(stem, mapKind)); err != nil {
		return fmt.Errorf("%w: the map of %s: %v", ErrInvalid, stem, err)
	}
	for i, l := range c.layers[:k+1] {
		if l.Deleting {
			return fmt.Errorf("%w: layer %d (%s) is being deleted", ErrInvalid, i, l.ID)
		}
	}
	nl := &layer{Entry: Entry{ID: c.layers[k].ID, Stem: stem}}
	layers := append([]*layer{nl}, c.layers[k+1:]...)
	entries := make([]Entry, len(layers))
	for i, l := range layers {
		entries[i] = l.Entry
	}
	if err := c.writeRecord(entries); err != nil {
		return fmt.Errorf("%w: record the chain flattened into %s: %v", ErrReopen, nl.ID, err)
	}
	gone := c.layers[:k+1]
	c.layers = layers
	for _, l := range gone {
		_ = l.unmap() // read-only: only fails on a bad address
		c.removeFiles(l.Stem)
	}
	if err := c.buildIndex(); err != nil {
		return fmt.Errorf("%w: %v", ErrReopen, err)
	}
	return nil
}

// SetAll sets the bit of every block of the volume: the map of a layer that
// holds every block (a flattened bottom, which may be moved up later by a
// rebuild's Insert and must then still show every block it holds).
func (m *BuildMap) SetAll() error {
	buf := make([]byte, mapBytes(m.blocks))
	full := m.blocks / 8
	for i := range full {
		buf[i] = 0xff
	}
	if r := m.blocks % 8; r != 0 {
		buf[full] = byte(1)<<r - 1
	}
	_, err := m.f.WriteAt(buf, 0)
	return err
}
