package replica

import (
	"fmt"

	"github.com/cairn-csi/cairn/replication/layer"
)

// After an unclean stop: the head's pending bits (docs/snapshots.md).
//
// With snapshots, a block written into the head is held by it (reads find
// it there, not below) through a pending bit until the next Flush moves the
// bit into the head's map after syncing the data. The pending bits live in
// a file that is never synced (layer/pending.go). A replica opened after a
// stop without a Flush finds the bits of the writes since the last one, and
// settles them before it serves anything:
//
//   - after a process crash (the pending file names the running boot), the
//     page cache kept every write whole, data, sums and bits: every block is
//     kept (with checksums, each is still verified first);
//   - after a power loss or reboot, any part of the data, sums and bits may
//     have reached the disk. With checksums a block is kept only if its data
//     verifies against its stored sum and is not a zero block (data and sum
//     that both never reached the disk read as a zero block with a zero sum,
//     which a written zero block, or a trim, cannot be told from); without
//     checksums, only if the head's data file is not a hole there. A block
//     not kept reads its old contents from the layers below, as from a disk
//     that lost its cache, which an unflushed write allows.
//
// A compressed head (datafile.go) is settled as after a power loss even
// after a process crash: a zfile loses the writes since its last Sync that
// moved an extent to another slot, page cache or not (replication/zfile).
//
// The extents of all those blocks are dirty already (a write marks its
// extents dirty, durably, before the data); any that are not are marked
// before anything is made durable, so resync compares them across the
// replicas. The kept blocks are then made durable as a Flush does: the
// head's data and sums synced before the map.

// UncleanStop is what opening a replica with snapshots found of writes that
// no Flush had made durable, and what it did with them.
type UncleanStop struct {
	// SameBoot: the machine did not restart since the writes (a process
	// crash); otherwise a power loss or reboot came between.
	SameBoot bool
	// Pending counts the blocks with a pending bit; Kept the ones the
	// head did not hold durably that it holds now; FellBack those that
	// read their old contents from below again.
	Pending, Kept, FellBack uint64
	// DirtyAdded counts the extents that were not dirty and were marked.
	DirtyAdded uint64
}

// UncleanStop reports what the replica's open settled after an unclean
// stop; false if there was nothing to settle.
func (r *Replica) UncleanStop() (UncleanStop, bool) {
	return r.unclean, r.unclean.Pending > 0
}

// settlePending settles the head's pending bits that opening the chain
// found (see above). Called by openExisting, before the replica is
// published, once the head's files are open.
func (r *Replica) settlePending() error {
	u := r.chain.Unclean()
	if u.Blocks == 0 {
		return nil
	}
	st := UncleanStop{SameBoot: u.SameBoot, Pending: u.Blocks}
	err := r.chain.UncleanRuns(func(first, n uint64) {
		off := first * layer.BlockSize
		if off >= r.size {
			return
		}
		lo, hi := r.extentsOf(off, min(r.size, (first+n)*layer.BlockSize)-off)
		r.mu.Lock()
		for i := lo; i <= hi; i++ {
			if !r.want.has(i) {
				r.want.set(i)
				st.DirtyAdded++
			}
		}
		r.mu.Unlock()
	})
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	if st.DirtyAdded > 0 {
		m := r.snapshotMeta()
		if err := r.writeMeta(&m); err != nil {
			return fmt.Errorf("replica %s: mark the extents of unflushed writes dirty: %w", r.id, err)
		}
		r.setDurable(m.Dirty)
	}
	// What a process crash leaves of a compressed head is what a power
	// loss leaves (see above).
	sameBoot := u.SameBoot && !isCompressed(r.data)
	buf := make([]byte, SumBlockSize)
	keep := func(b uint64) (bool, error) {
		off := b * SumBlockSize
		n := min(SumBlockSize, r.size-off)
		if r.sums == nil {
			return sameBoot || !fileHole(r.data, off, n), nil
		}
		var sum [1]uint32
		if err := r.readSums(sum[:], b); err != nil {
			return false, err
		}
		if err := r.readFile(r.data, buf[:n], off); err != nil {
			return false, err
		}
		return storedSum(buf[:n]) == sum[0] && (sameBoot || sum[0] != 0), nil
	}
	syncData := func() error {
		if err := r.fdatasync(); err != nil {
			return err
		}
		return r.syncSums()
	}
	st.Kept, st.FellBack, err = r.chain.Recover(keep, syncData)
	if err != nil {
		return fmt.Errorf("replica %s: settle the writes an unclean stop left unflushed: %w", r.id, err)
	}
	r.unclean = st
	return nil
}
