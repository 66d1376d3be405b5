package csi

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cairn-csi/cairn/replication/meta"
)

// Snapshots, restores and clones (docs/snapshots.md). The controller asks
// the store; the node serving the volume takes the snapshot and records it
// ready, and the nodes holding its layers make a restored volume's
// replicas from them.

// snapshotWait bounds how long CreateSnapshot waits for the snapshot to be
// ready. A snapshot takes milliseconds once its node acts; if it is not
// ready by then (a node restarting), the answer says not ready, and the
// caller (csi-snapshotter) asks again until it is.
const snapshotWait = 30 * time.Second

// volume returns a volume users see: a hidden one (deleted, kept for its
// snapshots) does not exist for them.
func (c *Controller) volume(ctx context.Context, id string) (*meta.Volume, error) {
	v, err := c.Meta.Volume(ctx, id)
	if err != nil {
		return nil, err
	}
	if v.Hidden {
		return nil, failf(errNotFound, "volume %s does not exist", id)
	}
	return v, nil
}

// restoreSource is what a new volume is made from: a snapshot or a volume.
type restoreSource struct {
	snapshot, volume string
	// bytes is the source's size, the least the new volume may have.
	bytes uint64
}

// contentSource checks a CreateVolume's content source: nil when there is
// none; NotFound when it names a snapshot or volume users cannot see.
func (c *Controller) contentSource(ctx context.Context, cs *csipb.VolumeContentSource) (*restoreSource, error) {
	switch {
	case cs == nil:
		return nil, nil
	case cs.GetSnapshot() != nil:
		id := cs.GetSnapshot().GetSnapshotId()
		if id == "" {
			return nil, failf(errInvalid, "the content source names no snapshot id")
		}
		st, err := c.Meta.State(ctx, true)
		if err != nil {
			return nil, err
		}
		sn, ok := st.Snapshots[id]
		if !ok || sn.Hidden() {
			return nil, failf(errNotFound, "snapshot %s does not exist", id)
		}
		if !sn.ReadyToUse {
			return nil, failf(errWrongOrder, "snapshot %s is not ready to use yet", id)
		}
		return &restoreSource{snapshot: id, bytes: sn.SizeBytes}, nil
	case cs.GetVolume() != nil:
		id := cs.GetVolume().GetVolumeId()
		if id == "" {
			return nil, failf(errInvalid, "the content source names no volume id")
		}
		v, err := c.volume(ctx, id)
		if err != nil {
			return nil, err
		}
		return &restoreSource{volume: id, bytes: v.SizeBytes}, nil
	}
	return nil, failf(errInvalid, "the content source is neither a snapshot nor a volume")
}

// size is the size of a volume made from src for range r: the source's
// size when r names none, else what r asks for, which must not be less
// than the source (a volume cannot hold a larger one's data): OutOfRange.
func (src *restoreSource) size(r *csipb.CapacityRange) (uint64, error) {
	req, lim, err := capacityRange(r)
	if err != nil {
		return 0, err
	}
	if lim > 0 && uint64(lim) < src.bytes || req > 0 && uint64(req) < src.bytes {
		return 0, failf(errOutOfRange, "the source is %d bytes; a volume made from it cannot be smaller (asked: required %d, limit %d)",
			src.bytes, req, lim)
	}
	if req == 0 {
		return src.bytes, nil
	}
	return sizeFor(r)
}

// CheckSnapshotParameters accepts only the keys Kubernetes' sidecars add
// (csi.storage.k8s.io/...): a VolumeSnapshotClass has no parameters of
// Cairn's, and a key that would be silently ignored is refused by name.
func CheckSnapshotParameters(params map[string]string) error {
	for k := range params {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			return failf(errInvalid, "snapshot parameter %q is not known: a Cairn VolumeSnapshotClass takes no parameters", k)
		}
	}
	return nil
}

// CreateSnapshot takes a crash-consistent snapshot of a volume and answers
// once it is ready. The same name and volume give the same snapshot (a
// retry, across controller restarts); the same name and another volume is
// AlreadyExists.
func (c *Controller) CreateSnapshot(ctx context.Context, req *csipb.CreateSnapshotRequest) (*csipb.CreateSnapshotResponse, error) {
	name, src := req.GetName(), req.GetSourceVolumeId()
	switch {
	case name == "":
		return nil, toStatus(failf(errInvalid, "name is required"))
	case src == "":
		return nil, toStatus(failf(errInvalid, "source volume id is required"))
	}
	if err := meta.CheckUserSnapshotName(src, name); err != nil {
		return nil, toStatus(err)
	}
	if err := CheckSnapshotParameters(req.GetParameters()); err != nil {
		return nil, toStatus(err)
	}
	unlock, err := c.locks.lock("snapshot/" + name)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	if _, err := c.volume(ctx, src); err != nil {
		return nil, toStatus(err)
	}
	wctx, cancel := context.WithTimeout(ctx, snapshotWait)
	defer cancel()
	sn, err := c.Meta.TakeSnapshot(wctx, src, name)
	if err != nil {
		if sn != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			// Recorded, not taken yet: the caller asks again.
			return &csipb.CreateSnapshotResponse{Snapshot: csiSnapshot(sn)}, nil
		}
		return nil, toStatus(err)
	}
	return &csipb.CreateSnapshotResponse{Snapshot: csiSnapshot(sn)}, nil
}

// DeleteSnapshot deletes a snapshot: it is gone for users at once, and its
// space comes back in the background. A snapshot already gone is success.
func (c *Controller) DeleteSnapshot(ctx context.Context, req *csipb.DeleteSnapshotRequest) (*csipb.DeleteSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "snapshot id is required"))
	}
	if err := c.Meta.DeleteSnapshot(ctx, id); err != nil {
		return nil, toStatus(err)
	}
	return &csipb.DeleteSnapshotResponse{}, nil
}

// ListSnapshots pages through the snapshots users see in id order,
// filtered by snapshot id or source volume; a token is the index of the
// next entry.
func (c *Controller) ListSnapshots(ctx context.Context, req *csipb.ListSnapshotsRequest) (*csipb.ListSnapshotsResponse, error) {
	st, err := c.Meta.State(ctx, true)
	if err != nil {
		return nil, toStatus(err)
	}
	var snaps []*meta.Snapshot
	for _, sn := range st.Snapshots {
		if sn.Hidden() || req.GetSnapshotId() != "" && sn.ID != req.GetSnapshotId() ||
			req.GetSourceVolumeId() != "" && sn.SourceVolumeID != req.GetSourceVolumeId() {
			continue
		}
		snaps = append(snaps, sn)
	}
	slices.SortFunc(snaps, func(a, b *meta.Snapshot) int { return cmp.Compare(a.ID, b.ID) })
	page, next, err := pageOf(snaps, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &csipb.ListSnapshotsResponse{NextToken: next}
	for _, sn := range page {
		resp.Entries = append(resp.Entries, &csipb.ListSnapshotsResponse_Entry{Snapshot: csiSnapshot(sn)})
	}
	return resp, nil
}

// csiSnapshot describes a snapshot to CSI. Its size is its volume's size
// when it was taken.
func csiSnapshot(sn *meta.Snapshot) *csipb.Snapshot {
	return &csipb.Snapshot{
		SnapshotId: sn.ID, SourceVolumeId: sn.SourceVolumeID, SizeBytes: int64(sn.SizeBytes),
		CreationTime: timestamppb.New(time.Unix(0, sn.CreatedAt)), ReadyToUse: sn.ReadyToUse,
	}
}

// GetSnapshot describes one snapshot users see.
func (c *Controller) GetSnapshot(ctx context.Context, req *csipb.GetSnapshotRequest) (*csipb.GetSnapshotResponse, error) {
	id := req.GetSnapshotId()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "snapshot id is required"))
	}
	st, err := c.Meta.State(ctx, true)
	if err != nil {
		return nil, toStatus(err)
	}
	sn, ok := st.Snapshots[id]
	if !ok || sn.Hidden() {
		return nil, toStatus(failf(errNotFound, "snapshot %s does not exist", id))
	}
	return &csipb.GetSnapshotResponse{Snapshot: csiSnapshot(sn)}, nil
}
