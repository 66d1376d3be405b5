package replica

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/layer"
)

// flattenStep is how much of the volume Flatten copies between two looks
// at the disk scheduler: the unit of its background I/O.
const flattenStep = 4 << 20

// Depth is the number of layers in the replica's chain, the head included
// (docs/snapshots.md, "Chain depth and flattening").
func (r *Replica) Depth() int {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if r.chain == nil {
		return 0
	}
	return r.chain.Len()
}

// LayerIDs returns the ids of the replica's sealed layers, oldest first,
// those being deleted included: what Flatten may be asked to flatten into.
func (r *Replica) LayerIDs() []string {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if r.chain == nil {
		return nil
	}
	es := r.chain.Entries()
	ids := make([]string, 0, len(es)-1)
	for _, e := range es[:len(es)-1] {
		ids = append(ids, e.ID)
	}
	return ids
}

// SharedUpTo reports whether another replica on this node links any of
// the layers from the bottom up to position k (a restore made from them,
// or the replica they came from). A layer whose files cannot be looked at
// counts as shared.
func (r *Replica) SharedUpTo(k int) bool {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if r.chain == nil {
		return true
	}
	for i := 0; i <= k && i < r.chain.Len()-1; i++ {
		if shared, err := r.chain.Shared(i); shared || err != nil {
			return true
		}
	}
	return false
}

// Flatten replaces the layers from the bottom up to layer id with one
// layer of this replica's own that holds what layer id shows
// (layer.Chain.Flatten). Every view of the replica reads the same before,
// during and after: the volume, and the snapshots whose layers lie above
// id. The layers replaced were the replica's links to layers it shares
// with others (a volume restored from a snapshot shares its source's
// layers up to it); they are unlinked. It copies what layer id shows,
// holes staying holes, a step at a time through the disk scheduler's
// rebuild class (background I/O), verified against the stored sums on
// the way; writes go on meanwhile. progress, if set, is called after each
// step with the bytes gone through and the total.
//
// A crash at any point leaves the replica as it was before, or flattened:
// the chain record is the commit point. It refuses (ErrInvalidArgument) a
// layer being deleted below id, a rebuild building a layer here, and a
// volume grown meanwhile (flatten again). It runs one at a time with
// snapshot deletions.
func (r *Replica) Flatten(ctx context.Context, id string, progress func(done, total uint64)) error {
	r.mergeMu.Lock()
	defer r.mergeMu.Unlock()
	r.epochMu.RLock()
	k, size, err := r.flattenTarget(id)
	checksums := r.sums != nil
	r.epochMu.RUnlock()
	if err != nil {
		return err
	}
	stem := layer.NewStem()
	f, m, err := r.createFlatFiles(stem, size, checksums)
	if err != nil {
		removeBuildFiles(r.dir, stem)
		return fmt.Errorf("replica %s: flatten into %s: %w", r.id, id, err)
	}
	published := false
	defer func() {
		_ = f.close()
		_ = m.Close()
		if !published {
			removeBuildFiles(r.dir, stem)
		}
	}()
	for off := uint64(0); off < size; off += flattenStep {
		if err := r.flattenStep(ctx, id, size, f, off, min(flattenStep, size-off)); err != nil {
			return err
		}
		if progress != nil {
			progress(min(off+flattenStep, size), size)
		}
	}
	err = syncData(f.data)
	if err == nil && f.sums != nil {
		err = unix.Fdatasync(int(f.sums.Fd()))
	}
	if err == nil {
		err = m.Sync()
	}
	if err != nil {
		return fmt.Errorf("replica %s: flatten into %s: sync the new layer: %w", r.id, id, err)
	}
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if k, _, err = r.flattenTarget(id); err != nil {
		return err
	}
	before := r.chain.Entries()
	if err := r.chain.Flatten(k, stem); err != nil {
		if errors.Is(err, layer.ErrReopen) {
			r.closed = true
			_ = r.closeFiles()
			return fmt.Errorf("replica %s: flatten into %s: %w (the replica is closed; open it again)", r.id, id, err)
		}
		return fmt.Errorf("replica %s: flatten into %s: %w", r.id, id, err)
	}
	published = true
	// The layers above keep their sums: every view is the same.
	r.layerSums.drop(stemsOf(before[:k+1]))
	return r.reopenLayers(before, false, "flatten into "+id)
}

// flattenTarget checks that layer id can be flattened into now and returns
// its position and the volume's size. Callers hold epochMu and mergeMu.
func (r *Replica) flattenTarget(id string) (k int, size uint64, err error) {
	if r.closed {
		return 0, 0, fmt.Errorf("replica %s: %w", r.id, ErrClosed)
	}
	k, err = r.chain.Find(id)
	if err != nil {
		return 0, 0, fmt.Errorf("replica %s: layer %s: %w", r.id, id, ErrNotFound)
	}
	for i, e := range r.chain.Entries()[:k+1] {
		if e.Deleting {
			return 0, 0, fmt.Errorf("replica %s: %w: layer %d (%s) is being deleted; flatten once it is gone", r.id, ErrInvalidArgument, i, e.ID)
		}
	}
	r.buildMu.Lock()
	building := r.build != nil
	r.buildMu.Unlock()
	if building {
		return 0, 0, fmt.Errorf("replica %s: %w: a rebuild is building a layer here", r.id, ErrInvalidArgument)
	}
	return k, r.size, nil
}

// createFlatFiles makes the files of the flattened layer under stem, for a
// volume of size bytes: data and sums sparse, the map with every block set
// (it holds every block, and stays right if a rebuild later moves it up).
func (r *Replica) createFlatFiles(stem string, size uint64, checksums bool) (layerFiles, *layer.BuildMap, error) {
	path := func(kind string) string { return filepath.Join(r.dir, stem+"."+kind) }
	if err := createData(path(dataFileName), size, isCompressed(r.data)); err != nil {
		return layerFiles{}, nil, err
	}
	if checksums {
		if err := createSumsFileAt(path(sumsFileName), size); err != nil {
			return layerFiles{}, nil, err
		}
	}
	m, err := layer.CreateBuildMap(r.dir, stem, size)
	if err != nil {
		return layerFiles{}, nil, err
	}
	if err := m.SetAll(); err != nil {
		_ = m.Close()
		return layerFiles{}, nil, err
	}
	var f layerFiles
	if f.data, err = openData(path(dataFileName)); err == nil && checksums {
		f.sums, f.sumsMap, err = r.openSumsFile(path(sumsFileName), false)
	}
	if err != nil {
		_ = f.close()
		_ = m.Close()
		return layerFiles{}, nil, err
	}
	return f, m, nil
}

// flattenStep copies [off, off+n) as layer id shows it into the flattened
// layer's files: per span, from the layer that holds it (moveBlocks: data
// verified, sums copied, holes punched).
func (r *Replica) flattenStep(ctx context.Context, id string, size uint64, to layerFiles, off, n uint64) error {
	t, err := r.admit(ctx, OpWrite, n, iosched.Rebuild)
	if err != nil {
		return fmt.Errorf("replica %s: flatten into %s: %w", r.id, id, err)
	}
	defer t.Done()
	if err := ctx.Err(); err != nil {
		return err
	}
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	k, now, err := r.flattenTarget(id)
	if err != nil {
		return err
	}
	if now != size {
		return fmt.Errorf("replica %s: %w: the volume grew while flattening into %s; flatten again", r.id, ErrInvalidArgument, id)
	}
	err = r.chain.SpansIn(k, off, n, func(i int, o, m uint64) error {
		return r.moveBlocks(r.layerFilesOf(i), to, o, m)
	})
	if err != nil {
		return fmt.Errorf("replica %s: flatten into %s: %w", r.id, id, err)
	}
	return nil
}
