package engine

import (
	"context"

	"github.com/cairn-csi/cairn/replication/replica"
)

// replicaConn is how the engine talks to one replica: over the network
// (*replica.Client) or, for the replica on the engine's own node, in
// process (localReplica). Both enforce the same epoch rules: the replica
// itself checks every epoch.
type replicaConn interface {
	Claim(ctx context.Context, epoch uint64) error
	WriteAt(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool) error
	// WriteAtSums is WriteAt with p's piece checksums (replica.PieceSums),
	// which the replica verifies before it writes.
	WriteAtSums(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error
	// WritePair writes p at off and pair.Data at pair.Off as one request
	// (replica.Client.WritePair).
	WritePair(ctx context.Context, epoch uint64, p []byte, off uint64, pair replica.Pair, fua bool) error
	// Rehash has the replica recompute its stored block checksums of the
	// extents from their data (resync of torn writes).
	Rehash(ctx context.Context, epoch, firstExtent, count uint64) error
	ReadAt(ctx context.Context, epoch uint64, p []byte, off uint64) error
	Flush(ctx context.Context, epoch uint64) error
	Trim(ctx context.Context, epoch, off, length uint64) error
	WriteZeroes(ctx context.Context, epoch, off, length uint64) error
	Checksums(ctx context.Context, epoch, firstExtent, count uint64) ([]uint32, error)
	ReadExtent(ctx context.Context, epoch, index uint64) ([]byte, error)
	DirtyExtents(ctx context.Context) ([]uint64, error)
	MarkClean(ctx context.Context, epoch, generation uint64) error
	Info(ctx context.Context) (replica.Info, error)
	// Grow makes the replica size bytes long (a size reached is a
	// success); see replica.Replica.Grow.
	Grow(ctx context.Context, epoch, size uint64) error
	// Snapshot, DeleteSnapshot and ReadSnapshotAt: see the replica's
	// methods of those names.
	Snapshot(ctx context.Context, epoch uint64, id string) error
	PrepareSnapshot(ctx context.Context, epoch uint64) error
	DeleteSnapshot(ctx context.Context, epoch uint64, id string) error
	ReadSnapshotAt(ctx context.Context, epoch uint64, id string, p []byte, off uint64) error
	// Layers, LayerSums, ReadLayerExtent, BeginLayer, WriteLayerExtent,
	// SealLayer and DropLayer carry the chain of sealed layers to a
	// replica being rebuilt: see the replica's methods (carry.go).
	Layers(ctx context.Context, epoch uint64) ([]replica.LayerInfo, error)
	LayerSums(ctx context.Context, epoch uint64, id string, part replica.LayerPart, firstExtent, count uint64) ([]uint32, error)
	ReadLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, flat bool) ([]byte, error)
	BeginLayer(ctx context.Context, epoch uint64, id string, pos uint64) error
	WriteLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, enc []byte) error
	SealLayer(ctx context.Context, epoch uint64, id string) error
	DropLayer(ctx context.Context, epoch uint64, id string) error
	Close() error
}

// localReplica calls a replica of this node's replica server directly:
// no loopback TCP, no framing, no goroutine hand-offs per I/O. The calls do
// not cancel a local pread or pwrite midway, but each data operation first
// takes its turn in the server's disk scheduler (Replica.Admit), in the
// class of its context, as the same request over the network would: an
// engine next to its replica gets no more of the disk than a remote one.
// localReplica is a replica of this node's server, reached in process.
type localReplica struct {
	r *replica.Replica
	s *replica.Server
}

func (l localReplica) Claim(_ context.Context, epoch uint64) error { return l.r.Claim(epoch) }
func (l localReplica) WriteAt(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool) error {
	t, err := l.r.Admit(ctx, replica.OpWrite, uint64(len(p)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.WriteAt(epoch, p, off, fua)
}
func (l localReplica) WriteAtSums(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error {
	t, err := l.r.Admit(ctx, replica.OpWrite, uint64(len(p)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.WriteAtLocal(epoch, p, off, fua, pieces)
}
func (l localReplica) WritePair(ctx context.Context, epoch uint64, p []byte, off uint64, pair replica.Pair, fua bool) error {
	t, err := l.r.Admit(ctx, replica.OpWrite, uint64(len(p)+len(pair.Data)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.WritePairLocal(epoch, p, off, pair, fua)
}
func (l localReplica) Rehash(ctx context.Context, epoch, first, count uint64) error {
	t, err := l.r.Admit(ctx, replica.OpRehash, count)
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.Rehash(epoch, first, count)
}
func (l localReplica) ReadAt(ctx context.Context, epoch uint64, p []byte, off uint64) error {
	t, err := l.r.Admit(ctx, replica.OpRead, uint64(len(p)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.ReadAt(epoch, p, off)
}

// readAuthenticated reads ciphertext that the caller opens with AES-GCM,
// without checking the replica's sums (replica.ReadAtAuthenticated).
func (l localReplica) readAuthenticated(ctx context.Context, epoch uint64, p []byte, off uint64) error {
	t, err := l.r.Admit(ctx, replica.OpRead, uint64(len(p)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.ReadAtAuthenticated(epoch, p, off)
}
func (l localReplica) Flush(ctx context.Context, epoch uint64) error {
	t, err := l.r.Admit(ctx, replica.OpFlush, 0)
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.Flush(epoch)
}
func (l localReplica) Trim(ctx context.Context, epoch, off, length uint64) error {
	t, err := l.r.Admit(ctx, replica.OpTrim, length)
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.Trim(epoch, off, length)
}
func (l localReplica) WriteZeroes(ctx context.Context, epoch, off, length uint64) error {
	t, err := l.r.Admit(ctx, replica.OpWriteZeroes, length)
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.WriteZeroes(epoch, off, length)
}
func (l localReplica) Checksums(ctx context.Context, epoch, first, count uint64) ([]uint32, error) {
	t, err := l.r.Admit(ctx, replica.OpChecksums, count)
	if err != nil {
		return nil, err
	}
	defer t.Done()
	return l.r.Checksums(epoch, first, count)
}
func (l localReplica) ReadExtent(ctx context.Context, epoch, index uint64) ([]byte, error) {
	t, err := l.r.Admit(ctx, replica.OpReadExtent, 0)
	if err != nil {
		return nil, err
	}
	defer t.Done()
	return l.r.ReadExtent(epoch, index)
}
func (l localReplica) DirtyExtents(context.Context) ([]uint64, error) { return l.r.DirtyExtents(), nil }
func (l localReplica) MarkClean(_ context.Context, epoch, generation uint64) error {
	return l.r.MarkClean(epoch, generation)
}
func (l localReplica) Info(context.Context) (replica.Info, error) { return l.r.Info(), nil }
func (l localReplica) Grow(_ context.Context, epoch, size uint64) error {
	return l.r.Grow(epoch, size)
}

func (l localReplica) Snapshot(_ context.Context, epoch uint64, id string) error {
	return l.r.Snapshot(epoch, id)
}
func (l localReplica) PrepareSnapshot(_ context.Context, epoch uint64) error {
	return l.r.PrepareSnapshot(epoch)
}
func (l localReplica) DeleteSnapshot(_ context.Context, epoch uint64, id string) error {
	return l.s.DeleteSnapshot(l.r, epoch, id)
}
func (l localReplica) ReadSnapshotAt(ctx context.Context, epoch uint64, id string, p []byte, off uint64) error {
	t, err := l.r.Admit(ctx, replica.OpRead, uint64(len(p)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.ReadSnapshotAt(epoch, id, p, off)
}

func (l localReplica) Layers(_ context.Context, epoch uint64) ([]replica.LayerInfo, error) {
	return l.r.Layers(epoch)
}
func (l localReplica) LayerSums(ctx context.Context, epoch uint64, id string, part replica.LayerPart, first, count uint64) ([]uint32, error) {
	t, err := l.r.Admit(ctx, replica.OpLayerSums, count)
	if err != nil {
		return nil, err
	}
	defer t.Done()
	switch part {
	case replica.LayerBuilding:
		return l.r.BuildSums(epoch, id, first, count)
	case replica.LayerFlat:
		return l.r.FlatSums(epoch, id, first, count)
	}
	return l.r.LayerSums(epoch, id, first, count)
}
func (l localReplica) ReadLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, flat bool) ([]byte, error) {
	t, err := l.r.Admit(ctx, replica.OpLayerRead, 0)
	if err != nil {
		return nil, err
	}
	defer t.Done()
	return l.r.ReadLayerExtent(epoch, id, x, flat, nil)
}
func (l localReplica) BeginLayer(_ context.Context, epoch uint64, id string, pos uint64) error {
	return l.r.BeginLayer(epoch, id, pos)
}
func (l localReplica) WriteLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, enc []byte) error {
	t, err := l.r.Admit(ctx, replica.OpLayerWrite, uint64(len(enc)))
	if err != nil {
		return err
	}
	defer t.Done()
	return l.r.WriteLayerExtent(epoch, id, x, enc)
}
func (l localReplica) SealLayer(_ context.Context, epoch uint64, id string) error {
	return l.r.SealLayer(epoch, id)
}
func (l localReplica) DropLayer(_ context.Context, epoch uint64, id string) error {
	return l.r.DropLayer(epoch, id)
}

// Close does nothing: the replica server owns the replica.
func (l localReplica) Close() error { return nil }
