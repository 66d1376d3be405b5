package csi

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Sizes: volumes are whole MiB (the replica format wants 512-byte sectors;
// a MiB keeps extents simple), 1 GiB when the request names no size.
const (
	SizeUnit    = 1 << 20
	DefaultSize = 1 << 30
	// MaxSize bounds one volume (16 TiB).
	MaxSize = 16 << 40
)

// Controller is the CSI Controller service: volumes and attachments in the
// volume store.
type Controller struct {
	csipb.UnimplementedControllerServer
	Meta  VolumeStore
	locks *volumeLocks
}

// NewController returns a controller using the store behind m.
func NewController(m VolumeStore) *Controller {
	return &Controller{Meta: m, locks: newVolumeLocks()}
}

var controllerCaps = []csipb.ControllerServiceCapability_RPC_Type{
	csipb.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
	csipb.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME,
	csipb.ControllerServiceCapability_RPC_LIST_VOLUMES,
	csipb.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
	csipb.ControllerServiceCapability_RPC_GET_CAPACITY,
	csipb.ControllerServiceCapability_RPC_GET_VOLUME,
	csipb.ControllerServiceCapability_RPC_GET_VOLUME_HEALTH,
	csipb.ControllerServiceCapability_RPC_LIST_VOLUME_HEALTH,
	csipb.ControllerServiceCapability_RPC_PUBLISH_READONLY,
	csipb.ControllerServiceCapability_RPC_MODIFY_VOLUME,
	csipb.ControllerServiceCapability_RPC_EXPAND_VOLUME,
	csipb.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
	csipb.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
	csipb.ControllerServiceCapability_RPC_CLONE_VOLUME,
	csipb.ControllerServiceCapability_RPC_GET_SNAPSHOT,
}

// ControllerGetCapabilities lists exactly what works.
func (c *Controller) ControllerGetCapabilities(context.Context, *csipb.ControllerGetCapabilitiesRequest) (*csipb.ControllerGetCapabilitiesResponse, error) {
	var caps []*csipb.ControllerServiceCapability
	for _, t := range controllerCaps {
		caps = append(caps, &csipb.ControllerServiceCapability{Type: &csipb.ControllerServiceCapability_Rpc{Rpc: &csipb.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csipb.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkCapabilities accepts single-node access, as a mount (ext4/xfs) or a
// raw block device. A replicated block device has one writer at a time.
func checkCapabilities(caps []*csipb.VolumeCapability) error {
	if len(caps) == 0 {
		return failf(errInvalid, "volume capabilities are required")
	}
	for _, c := range caps {
		if c == nil {
			return failf(errInvalid, "a volume capability is empty")
		}
		switch {
		case c.GetBlock() != nil:
		case c.GetMount() != nil:
			if fs := c.GetMount().GetFsType(); fs != "" && fs != "ext4" && fs != "xfs" {
				return failf(errInvalid, "fs type %q is not supported (ext4, xfs)", fs)
			}
		default:
			return failf(errInvalid, "a volume capability needs an access type (block or mount)")
		}
		if c.GetAccessMode() == nil {
			return failf(errInvalid, "a volume capability needs an access mode")
		}
		switch c.GetAccessMode().GetMode() {
		case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
			csipb.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
		default:
			return failf(errInvalid, "access mode %s is not supported: a Cairn volume is attached to one node at a time", c.GetAccessMode().GetMode())
		}
	}
	return nil
}

// capacityRange returns a range's required and limit bytes once they are
// consistent (0: not given).
func capacityRange(r *csipb.CapacityRange) (req, lim int64, err error) {
	req, lim = r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 {
		return 0, 0, failf(errInvalid, "capacity range must not be negative")
	}
	if lim > 0 && req > lim {
		return 0, 0, failf(errInvalid, "required bytes %d exceed limit bytes %d", req, lim)
	}
	return req, lim, nil
}

// sizeFor rounds a capacity range to whole MiB within its limit.
func sizeFor(r *csipb.CapacityRange) (uint64, error) {
	req, lim, err := capacityRange(r)
	if err != nil {
		return 0, err
	}
	size := uint64(req)
	if size == 0 {
		size = DefaultSize
		if lim > 0 && uint64(lim) < size {
			size = uint64(lim)
		}
	}
	size = (size + SizeUnit - 1) / SizeUnit * SizeUnit
	if lim > 0 && size > uint64(lim) {
		// The limit is not a whole MiB; round down instead, if that still
		// covers the required bytes.
		size = uint64(lim) / SizeUnit * SizeUnit
		if size < uint64(req) || size == 0 {
			return 0, failf(errOutOfRange, "no size in whole MiB lies between %d and %d bytes", req, lim)
		}
	}
	if size > MaxSize {
		return 0, failf(errOutOfRange, "%d bytes is more than the largest volume (%d)", size, uint64(MaxSize))
	}
	return size, nil
}

// CreateVolume records the volume and places its replicas.
func (c *Controller) CreateVolume(ctx context.Context, req *csipb.CreateVolumeRequest) (*csipb.CreateVolumeResponse, error) {
	if req.GetName() == "" {
		return nil, toStatus(failf(errInvalid, "name is required"))
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, toStatus(err)
	}
	src, err := c.contentSource(ctx, req.GetVolumeContentSource())
	if err != nil {
		return nil, toStatus(err)
	}
	size, err := sizeFor(req.GetCapacityRange())
	if err != nil {
		return nil, toStatus(err)
	}
	if src != nil {
		if size, err = src.size(req.GetCapacityRange()); err != nil {
			return nil, toStatus(err)
		}
	}
	p, err := volspec.Parse(req.GetParameters())
	if err != nil {
		return nil, toStatus(err)
	}
	// A VolumeAttributesClass given at creation sets the first QoS.
	vac, err := mutableParameters(req.GetMutableParameters())
	if err != nil {
		return nil, toStatus(err)
	}
	unlock, err := c.locks.lock("name/" + req.GetName())
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	accessType := "mount"
	for _, vc := range req.GetVolumeCapabilities() {
		if vc.GetBlock() != nil {
			accessType = "block"
		}
	}
	cmd := &meta.CreateVolume{
		Name: req.GetName(), SizeBytes: size, Replicas: p.Replicas, WriteQuorum: p.WriteQuorum,
		Parameters: p.Params(), AccessType: accessType,
		PreferredNode: preferredNode(p, req.GetAccessibilityRequirements()),
	}
	for k, v := range vac {
		if v == "" {
			delete(cmd.Parameters, k)
		} else {
			cmd.Parameters[k] = v
		}
	}
	if zones := zonesOf(req.GetAccessibilityRequirements().GetRequisite()); len(zones) > 0 {
		cmd.AllowedZones = zones
	}
	if p.Encrypted() && src == nil {
		// A new data key, wrapped by the passphrase of the provisioner's
		// Secret. A restore or clone shares its source's (the store
		// copies it).
		pass := req.GetSecrets()[crypt.SecretKey]
		if pass == "" {
			return nil, toStatus(failf(errInvalid, "encryption %s: the Secret that the StorageClass's %sprovisioner-secret-name and -namespace name must hold a passphrase under the key %s",
				p.Encryption, "csi.storage.k8s.io/", crypt.SecretKey))
		}
		if cmd.Encryption, _, err = crypt.NewDataKey([]byte(pass)); err != nil {
			return nil, toStatus(err)
		}
	}
	if src != nil {
		v, err := c.Meta.Restore(ctx, *cmd, src.snapshot, src.volume)
		if err != nil {
			return nil, toStatus(err)
		}
		vol := csiVolume(v)
		vol.ContentSource = req.GetVolumeContentSource()
		return &csipb.CreateVolumeResponse{Volume: vol}, nil
	}
	res, err := c.Meta.Apply(ctx, meta.CreateCommand(cmd))
	if err != nil {
		return nil, toStatus(err)
	}
	return &csipb.CreateVolumeResponse{Volume: csiVolume(res.Volume)}, nil
}

func zonesOf(ts []*csipb.Topology) []string {
	var out []string
	for _, t := range ts {
		if z, ok := t.GetSegments()[TopologyZoneKey]; ok {
			out = append(out, storeZone(z))
		}
	}
	return out
}

// csiVolume describes a stored volume to CSI. Any node can reach a volume's
// replicas over the network, so no accessible topology is given.
func csiVolume(v *meta.Volume) *csipb.Volume {
	return &csipb.Volume{
		VolumeId:      v.ID,
		CapacityBytes: int64(v.SizeBytes),
		VolumeContext: map[string]string{"replicas": strconv.Itoa(v.ReplicaCount)},
	}
}

// DeleteVolume deletes a volume; a volume already gone is success.
func (c *Controller) DeleteVolume(ctx context.Context, req *csipb.DeleteVolumeRequest) (*csipb.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	unlock, err := c.locks.lockVolume(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	// A volume with snapshots is hidden until they go (RetireVolume).
	_, err = c.Meta.RetireVolume(ctx, id)
	if err != nil && !isNotFound(err) {
		return nil, toStatus(err)
	}
	return &csipb.DeleteVolumeResponse{}, nil
}

func isNotFound(err error) bool { return status.Code(toStatus(err)) == codes.NotFound }

// ControllerPublishVolume attaches the volume to the node (one node at a time).
func (c *Controller) ControllerPublishVolume(ctx context.Context, req *csipb.ControllerPublishVolumeRequest) (*csipb.ControllerPublishVolumeResponse, error) {
	id, node := req.GetVolumeId(), req.GetNodeId()
	if id == "" || node == "" {
		return nil, toStatus(failf(errInvalid, "volume id and node id are required"))
	}
	if err := checkCapabilities([]*csipb.VolumeCapability{req.GetVolumeCapability()}); err != nil {
		return nil, toStatus(err)
	}
	unlock, err := c.locks.lock(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	// One volume, not the whole state: every pod start publishes, and at
	// 10 000 volumes the same read held DeleteVolume to 9 calls a second
	// (scalebench).
	// The store refuses a node it does not know (NotFound) in Attach.
	v, err := c.volume(ctx, id)
	if err != nil {
		return nil, toStatus(err)
	}
	if a := v.Attachment; a != nil {
		if a.Node != node {
			return nil, toStatus(failf(errWrongOrder, "volume %s is published to %s; a Cairn volume is attached to one node at a time", id, a.Node))
		}
		if a.ReadOnly != req.GetReadonly() {
			return nil, toStatus(failf(errAlreadyExists, "volume %s is published to %s with read-only %v", id, a.Node, a.ReadOnly))
		}
	}
	if _, err := c.Meta.Attach(ctx, id, node, req.GetReadonly(), ""); err != nil {
		return nil, toStatus(err)
	}
	return &csipb.ControllerPublishVolumeResponse{PublishContext: map[string]string{"epoch-attached": "true"}}, nil
}

// ControllerUnpublishVolume detaches; a volume already detached (or gone)
// is success.
func (c *Controller) ControllerUnpublishVolume(ctx context.Context, req *csipb.ControllerUnpublishVolumeRequest) (*csipb.ControllerUnpublishVolumeResponse, error) {
	id := req.GetVolumeId()
	unlock, err := c.locks.lockVolume(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	if _, err := c.Meta.Detach(ctx, id, req.GetNodeId()); err != nil && !isNotFound(err) {
		return nil, toStatus(err)
	}
	return &csipb.ControllerUnpublishVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities Cairn supports.
func (c *Controller) ValidateVolumeCapabilities(ctx context.Context, req *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, toStatus(failf(errInvalid, "volume capabilities are required"))
	}
	if _, err := c.volume(ctx, req.GetVolumeId()); err != nil {
		return nil, toStatus(err)
	}
	if _, err := volspec.Parse(req.GetParameters()); err != nil {
		return nil, toStatus(err)
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csipb.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csipb.ValidateVolumeCapabilitiesResponse{Confirmed: &csipb.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext: req.GetVolumeContext(), VolumeCapabilities: req.GetVolumeCapabilities(), Parameters: req.GetParameters(),
	}}, nil
}

// ListVolumes pages through the volumes in id order; the token is the
// index of the next entry.
func (c *Controller) ListVolumes(ctx context.Context, req *csipb.ListVolumesRequest) (*csipb.ListVolumesResponse, error) {
	vols, next, err := c.page(ctx, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &csipb.ListVolumesResponse{NextToken: next}
	for _, v := range vols {
		resp.Entries = append(resp.Entries, &csipb.ListVolumesResponse_Entry{Volume: csiVolume(v), Status: volumeStatus(v)})
	}
	return resp, nil
}

// page returns one page of the live volumes users see, in id order; a
// token is the index of the next entry.
func (c *Controller) page(ctx context.Context, token string, maxEntries int32) ([]*meta.Volume, string, error) {
	if maxEntries < 0 {
		return nil, "", failf(errInvalid, "max entries must not be negative")
	}
	st, err := c.Meta.State(ctx, true)
	if err != nil {
		return nil, "", err
	}
	vols := slices.DeleteFunc(st.SortedVolumes(), func(v *meta.Volume) bool { return v.Hidden })
	return pageOf(vols, token, maxEntries)
}

// pageOf returns the page of items that token starts (the index of its
// first entry; "" for the first page) with at most maxEntries entries (0:
// no limit), and the token of the next page ("" after the last).
func pageOf[T any](items []T, token string, maxEntries int32) ([]T, string, error) {
	if maxEntries < 0 {
		return nil, "", failf(errInvalid, "max entries must not be negative")
	}
	start := 0
	if token != "" {
		n, err := strconv.Atoi(token)
		if err != nil || n < 0 || n > len(items) {
			return nil, "", failf(errStaleToken, "starting token %q is not valid (any more)", token)
		}
		start = n
	}
	end := len(items)
	if m := int(maxEntries); m > 0 && start+m < end {
		end = start + m
	}
	next := ""
	if end < len(items) {
		next = strconv.Itoa(end)
	}
	return items[start:end], next, nil
}

// volumeStatus gives the node the volume is published to.
func volumeStatus(v *meta.Volume) *csipb.ListVolumesResponse_VolumeStatus {
	s := &csipb.ListVolumesResponse_VolumeStatus{}
	if v.Attachment != nil {
		s.PublishedNodeIds = []string{v.Attachment.Node}
	}
	return s
}

// volumeHealth is degraded while the volume has fewer healthy replicas than
// it should, inaccessible with none, and data loss while blocks verify on
// no replica (the volume's condition is abnormal: docs/integrity.md). (CSI
// v1.13 carries health in these RPCs; earlier versions had a
// VolumeCondition.)
func volumeHealth(v *meta.Volume) *csipb.VolumeHealth {
	h := &csipb.VolumeHealth{VolumeId: v.ID}
	if c := v.Condition; c != nil && c.Abnormal {
		h.HealthStatuses = append(h.HealthStatuses, &csipb.VolumeHealth_VolumeHealthEntry{
			Status: csipb.VolumeHealthErrorType_DATA_LOSS, Reason: "ChecksumMismatch", Message: c.Message})
	}
	// An asynchronous volume's followers are in service: they are
	// reported while behind, with their lag (docs/replication-modes.md).
	var behind []string
	for _, r := range v.Following() {
		if r.Lag.Behind() {
			behind = append(behind, fmt.Sprintf("replica %s on %s: %s", r.ID, r.Node, r.Lag))
		}
	}
	if len(behind) > 0 {
		h.HealthStatuses = append(h.HealthStatuses, &csipb.VolumeHealth_VolumeHealthEntry{
			Status: csipb.VolumeHealthErrorType_DEGRADED, Reason: "ReplicaLag", Message: "asynchronous followers behind the acknowledged writes: " + strings.Join(behind, "; ")})
	}
	healthy := v.HealthyReplicas()
	if healthy+len(v.Following()) >= v.ReplicaCount {
		return h
	}
	msg := fmt.Sprintf("%d of %d replicas healthy", healthy, v.ReplicaCount)
	if rb := v.Rebuild; rb != nil && !rb.Done && rb.BytesTotal > 0 {
		msg += fmt.Sprintf("; rebuilding %s, %.0f%% compared", rb.ReplicaID, 100*float64(rb.BytesCompared)/float64(rb.BytesTotal))
	}
	st := csipb.VolumeHealthErrorType_DEGRADED
	if healthy == 0 {
		st = csipb.VolumeHealthErrorType_INACCESSIBLE
	}
	h.HealthStatuses = append(h.HealthStatuses, &csipb.VolumeHealth_VolumeHealthEntry{Status: st, Reason: "ReplicasDegraded", Message: msg})
	return h
}

// ControllerGetVolume describes one volume and where it is published.
func (c *Controller) ControllerGetVolume(ctx context.Context, req *csipb.ControllerGetVolumeRequest) (*csipb.ControllerGetVolumeResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	v, err := c.volume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &csipb.ControllerGetVolumeResponse{Volume: csiVolume(v), Status: &csipb.ControllerGetVolumeResponse_VolumeStatus{
		PublishedNodeIds: volumeStatus(v).PublishedNodeIds,
	}}, nil
}

// ControllerGetVolumeHealth reports a degraded or inaccessible volume.
func (c *Controller) ControllerGetVolumeHealth(ctx context.Context, req *csipb.ControllerGetVolumeHealthRequest) (*csipb.ControllerGetVolumeHealthResponse, error) {
	if req.GetVolumeId() == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	v, err := c.volume(ctx, req.GetVolumeId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &csipb.ControllerGetVolumeHealthResponse{VolumeHealth: volumeHealth(v)}, nil
}

// ControllerListVolumeHealth pages through the health of every volume.
func (c *Controller) ControllerListVolumeHealth(ctx context.Context, req *csipb.ControllerListVolumeHealthRequest) (*csipb.ControllerListVolumeHealthResponse, error) {
	vols, next, err := c.page(ctx, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &csipb.ControllerListVolumeHealthResponse{NextToken: next}
	for _, v := range vols {
		resp.Entries = append(resp.Entries, volumeHealth(v))
	}
	return resp, nil
}

// GetCapacity is the room left for one more replica's worth of data in the
// topology segment: the largest free space on one up node (thin
// provisioning: capacity × ratio minus what is placed there).
//
// A class whose parameters CreateVolume refuses still gets the capacity of
// its disk type. With WaitForFirstConsumer the scheduler puts a pod only
// where a CSIStorageCapacity object says there is room, and csi-provisioner
// publishes none for a class whose GetCapacity fails: the pod would stay
// Pending with "did not have enough free storage", and the user would never
// see CreateVolume's error, which names the parameter and what is accepted.
// Found on a real cluster (tests/e2e, TestDesignStorageClass).
func (c *Controller) GetCapacity(ctx context.Context, req *csipb.GetCapacityRequest) (*csipb.GetCapacityResponse, error) {
	spec, err := volspec.Parse(req.GetParameters())
	if err != nil {
		spec = volspec.Spec{DiskType: volspec.DiskTypeOf(req.GetParameters())}
	}
	if len(req.GetVolumeCapabilities()) > 0 {
		if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
			return &csipb.GetCapacityResponse{}, nil
		}
	}
	st, err := c.Meta.State(ctx, false)
	if err != nil {
		return nil, toStatus(err)
	}
	zone, byZone := req.GetAccessibleTopology().GetSegments()[TopologyZoneKey]
	zone = storeZone(zone)
	// The same space rule as placement: capacity × over-provisioning ratio
	// minus the replicas already placed; and no more than the disk has
	// free, which counts what snapshots take (their layers grow with the
	// writes after them) and what hidden volumes keep.
	// Per disk type: the StorageClass's.
	var best, total uint64
	for _, n := range st.PlacementNodesFor(spec.DiskType) {
		if !n.Up || (byZone && n.Zone != zone) {
			continue
		}
		free := n.FreeBytes(st.OverProvisioningRatio)
		if disk := st.DiskSpace(n.ID, spec.DiskType).FreeBytes; disk > 0 {
			free = min(free, disk)
		}
		total += free
		best = max(best, free)
	}
	return &csipb.GetCapacityResponse{
		AvailableCapacity: int64(min(total, uint64(1<<62))),
		MaximumVolumeSize: wrapInt64(min(best, uint64(MaxSize))),
	}, nil
}

// ControllerModifyVolume changes a live volume's QoS (VolumeAttributesClass
// parameters maxIOPS, minIOPS, maxBandwidth, burstDuration); the engine
// applies them within a second.
func (c *Controller) ControllerModifyVolume(ctx context.Context, req *csipb.ControllerModifyVolumeRequest) (*csipb.ControllerModifyVolumeResponse, error) {
	id := req.GetVolumeId()
	unlock, err := c.locks.lockVolume(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	if _, err := c.volume(ctx, id); err != nil {
		return nil, toStatus(err)
	}
	set, err := mutableParameters(req.GetMutableParameters())
	if err != nil {
		return nil, toStatus(err)
	}
	if len(set) == 0 {
		return &csipb.ControllerModifyVolumeResponse{}, nil
	}
	if _, err := c.Meta.Apply(ctx, &meta.SetParameters{VolumeID: id, Parameters: set}); err != nil {
		return nil, toStatus(err)
	}
	return &csipb.ControllerModifyVolumeResponse{}, nil
}

// mutableParameters validates VolumeAttributesClass parameters: only the
// QoS keys, with valid values. It returns them as the store records them
// ("" for a zero limit, which removes the key).
func mutableParameters(mp map[string]string) (map[string]string, error) {
	set, err := volspec.Changes(mp)
	if err != nil {
		return nil, toStatus(err)
	}
	return set, nil
}

// ControllerExpandVolume grows a volume, online or not: the store records
// the new size (ExpandVolume); the engine of an attached volume grows its
// replicas and then its size, and NodeExpandVolume grows the device and
// the file system (docs/expansion.md). A volume already at least the
// required size is a success with its size, as the CSI spec asks of a
// retried or overtaken expansion, and nothing shrinks: a limit below the
// volume's size is OutOfRange, and so is a size past MaxSize.
//
// Node expansion is required for every volume: for a file system to grow
// it, and for a raw block volume so that its loop device takes the new
// size before kubelet reports the expansion done.
func (c *Controller) ControllerExpandVolume(ctx context.Context, req *csipb.ControllerExpandVolumeRequest) (*csipb.ControllerExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	r := req.GetCapacityRange()
	if r == nil || r.GetRequiredBytes() <= 0 && r.GetLimitBytes() <= 0 {
		return nil, toStatus(failf(errInvalid, "a capacity range with required bytes is required"))
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
			return nil, toStatus(err)
		}
	}
	unlock, err := c.locks.lockVolume(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	v, err := c.volume(ctx, id)
	if err != nil {
		return nil, toStatus(err)
	}
	size, err := expandSize(r, v.SizeBytes)
	if err != nil {
		return nil, toStatus(err)
	}
	if size > v.SizeBytes {
		res, err := c.Meta.Apply(ctx, &meta.ExpandVolume{VolumeID: id, SizeBytes: size})
		if err != nil {
			return nil, toStatus(err)
		}
		v = res.Volume
	}
	return &csipb.ControllerExpandVolumeResponse{CapacityBytes: int64(v.SizeBytes), NodeExpansionRequired: true}, nil
}

// expandSize is the size to grow a volume of size current to for r: the
// required bytes rounded up to whole MiB (within the limit), or current
// when that is already enough. A limit below current would need a shrink:
// OutOfRange, as is a size past MaxSize.
func expandSize(r *csipb.CapacityRange, current uint64) (uint64, error) {
	req, lim, err := capacityRange(r)
	if err != nil {
		return 0, err
	}
	if lim > 0 && uint64(lim) < current {
		return 0, failf(errOutOfRange, "the volume is %d bytes, more than the limit of %d: volumes cannot shrink", current, lim)
	}
	if uint64(req) <= current {
		return current, nil
	}
	return sizeFor(r)
}
