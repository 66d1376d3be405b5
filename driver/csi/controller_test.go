package csi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/replication/meta"
)

// These tests drive the Controller's RPC logic against fakeStore: no Raft,
// no root, milliseconds. tests/sanity runs the same RPCs against a real
// cluster; these add the inputs csi-sanity does not try and pin each code.

const gib = 1 << 30

func mountCap(mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

func blockCap(mode csipb.VolumeCapability_AccessMode_Mode) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: mode},
	}
}

const writer = csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

var writerCaps = []*csipb.VolumeCapability{mountCap(writer)}

// wantCode fails unless err is a status with exactly code (codes.OK: nil).
func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if code == codes.OK {
		if err != nil {
			t.Fatalf("error %v, want success", err)
		}
		return
	}
	s, ok := status.FromError(err)
	if !ok || err == nil {
		t.Fatalf("error %v (%T), want a status with code %s", err, err, code)
	}
	if s.Code() != code {
		t.Fatalf("code %s (%q), want %s", s.Code(), s.Message(), code)
	}
}

func newTestController(nodes ...string) (*Controller, *fakeStore) {
	if len(nodes) == 0 {
		nodes = []string{"n1", "n2", "n3"}
	}
	f := newFakeStore(100*gib, nodes...)
	return NewController(f), f
}

func createReq(name string, size int64) *csipb.CreateVolumeRequest {
	return &csipb.CreateVolumeRequest{
		Name: name, VolumeCapabilities: writerCaps,
		CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
		Parameters:    map[string]string{"replicas": "3"},
	}
}

// mustCreate creates a volume and returns its id.
func mustCreate(t *testing.T, c *Controller, name string) string {
	t.Helper()
	resp, err := c.CreateVolume(context.Background(), createReq(name, 64<<20))
	wantCode(t, err, codes.OK)
	return resp.GetVolume().GetVolumeId()
}

func TestCreateVolumeInvalid(t *testing.T) {
	ok := func() *csipb.CreateVolumeRequest { return createReq("pvc-1", 64<<20) }
	tests := []struct {
		name   string
		change func(r *csipb.CreateVolumeRequest)
		want   codes.Code
	}{
		{"valid", func(*csipb.CreateVolumeRequest) {}, codes.OK},
		{"no name", func(r *csipb.CreateVolumeRequest) { r.Name = "" }, codes.InvalidArgument},
		{"no capabilities", func(r *csipb.CreateVolumeRequest) { r.VolumeCapabilities = nil }, codes.InvalidArgument},
		{"nil capability", func(r *csipb.CreateVolumeRequest) { r.VolumeCapabilities = []*csipb.VolumeCapability{nil} }, codes.InvalidArgument},
		{"no access type", func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{{AccessMode: &csipb.VolumeCapability_AccessMode{Mode: writer}}}
		}, codes.InvalidArgument},
		{"no access mode", func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{{AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}}}}
		}, codes.InvalidArgument},
		{"unknown access mode", func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_UNKNOWN)}
		}, codes.InvalidArgument},
		{"multi-node writer", func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}
		}, codes.InvalidArgument},
		{"multi-node reader among good ones", func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csipb.VolumeCapability{mountCap(writer), blockCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY)}
		}, codes.InvalidArgument},
		{"unsupported fs type", func(r *csipb.CreateVolumeRequest) {
			r.VolumeCapabilities[0].GetMount().FsType = "btrfs"
		}, codes.InvalidArgument},
		{"xfs", func(r *csipb.CreateVolumeRequest) { r.VolumeCapabilities[0].GetMount().FsType = "xfs" }, codes.OK},
		{"unknown source volume", func(r *csipb.CreateVolumeRequest) {
			r.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: "v"}}}
		}, codes.NotFound},
		{"unknown source snapshot", func(r *csipb.CreateVolumeRequest) {
			r.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: "s"}}}
		}, codes.NotFound},
		{"content source without an id", func(r *csipb.CreateVolumeRequest) {
			r.VolumeContentSource = &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{}}}
		}, codes.InvalidArgument},
		{"empty content source", func(r *csipb.CreateVolumeRequest) { r.VolumeContentSource = &csipb.VolumeContentSource{} }, codes.InvalidArgument},
		{"negative required bytes", func(r *csipb.CreateVolumeRequest) { r.CapacityRange = &csipb.CapacityRange{RequiredBytes: -1} }, codes.InvalidArgument},
		{"negative limit bytes", func(r *csipb.CreateVolumeRequest) { r.CapacityRange = &csipb.CapacityRange{LimitBytes: -1} }, codes.InvalidArgument},
		{"required above limit", func(r *csipb.CreateVolumeRequest) {
			r.CapacityRange = &csipb.CapacityRange{RequiredBytes: 2 << 20, LimitBytes: 1 << 20}
		}, codes.InvalidArgument},
		{"no whole MiB in range", func(r *csipb.CreateVolumeRequest) {
			r.CapacityRange = &csipb.CapacityRange{RequiredBytes: (1 << 20) + 1, LimitBytes: (2 << 20) - 1}
		}, codes.OutOfRange},
		{"limit under one MiB", func(r *csipb.CreateVolumeRequest) { r.CapacityRange = &csipb.CapacityRange{LimitBytes: 4096} }, codes.OutOfRange},
		{"larger than the largest volume", func(r *csipb.CreateVolumeRequest) {
			r.CapacityRange = &csipb.CapacityRange{RequiredBytes: MaxSize + 1}
		}, codes.OutOfRange},
		{"unknown parameter", func(r *csipb.CreateVolumeRequest) { r.Parameters["colour"] = "blue" }, codes.InvalidArgument},
		{"bad replicas", func(r *csipb.CreateVolumeRequest) { r.Parameters["replicas"] = "many" }, codes.InvalidArgument},
		{"immutable key as mutable parameter", func(r *csipb.CreateVolumeRequest) {
			r.MutableParameters = map[string]string{"replicas": "2"}
		}, codes.InvalidArgument},
		{"bad mutable value", func(r *csipb.CreateVolumeRequest) {
			r.MutableParameters = map[string]string{"maxIOPS": "fast"}
		}, codes.InvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, f := newTestController()
			r := ok()
			tc.change(r)
			_, err := c.CreateVolume(context.Background(), r)
			wantCode(t, err, tc.want)
			if tc.want != codes.OK && len(f.applied) != 0 {
				t.Errorf("a refused request reached the store: %v", f.applied)
			}
		})
	}
}

func TestCreateVolumeIdempotent(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	first, err := c.CreateVolume(ctx, createReq("pvc-1", 100<<20))
	wantCode(t, err, codes.OK)
	again, err := c.CreateVolume(ctx, createReq("pvc-1", 100<<20))
	wantCode(t, err, codes.OK)
	if first.GetVolume().GetVolumeId() != again.GetVolume().GetVolumeId() || again.GetVolume().GetCapacityBytes() != 100<<20 {
		t.Fatalf("retry gave %v, first %v: want the same volume", again.GetVolume(), first.GetVolume())
	}
	if got := first.GetVolume().GetVolumeContext()["replicas"]; got != "3" {
		t.Errorf("volume context replicas = %q, want 3", got)
	}
	_, err = c.CreateVolume(ctx, createReq("pvc-1", 200<<20))
	wantCode(t, err, codes.AlreadyExists)
	other := createReq("pvc-1", 100<<20)
	other.Parameters["replicas"] = "2"
	_, err = c.CreateVolume(ctx, other)
	wantCode(t, err, codes.AlreadyExists)
	if n := len(f.st.Volumes); n != 1 {
		t.Fatalf("%d volumes stored, want 1", n)
	}
	// After a delete the name is free again: a new volume.
	_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: first.GetVolume().GetVolumeId()})
	wantCode(t, err, codes.OK)
	third, err := c.CreateVolume(ctx, createReq("pvc-1", 200<<20))
	wantCode(t, err, codes.OK)
	if third.GetVolume().GetVolumeId() == first.GetVolume().GetVolumeId() {
		t.Fatal("a deleted volume's id came back")
	}
}

func TestCreateVolumeSize(t *testing.T) {
	tests := []struct {
		name string
		r    *csipb.CapacityRange
		want int64
	}{
		{"none: the default", nil, DefaultSize},
		{"one byte: one MiB", &csipb.CapacityRange{RequiredBytes: 1}, SizeUnit},
		{"rounded up to whole MiB", &csipb.CapacityRange{RequiredBytes: 3*SizeUnit + 1}, 4 * SizeUnit},
		{"default capped by the limit", &csipb.CapacityRange{LimitBytes: 10 * SizeUnit}, 10 * SizeUnit},
		{"rounded down to the limit", &csipb.CapacityRange{RequiredBytes: SizeUnit + 1, LimitBytes: 2*SizeUnit + 5}, 2 * SizeUnit},
		{"the largest volume", &csipb.CapacityRange{RequiredBytes: MaxSize}, MaxSize},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := newTestController()
			r := createReq("pvc", 0)
			r.CapacityRange = tc.r
			resp, err := c.CreateVolume(context.Background(), r)
			wantCode(t, err, codes.OK)
			if got := resp.GetVolume().GetCapacityBytes(); got != tc.want {
				t.Errorf("capacity %d, want %d", got, tc.want)
			}
		})
	}
}

func TestCreateVolumeRecordsRequest(t *testing.T) {
	c, f := newTestController()
	r := createReq("pvc-b", 64<<20)
	r.VolumeCapabilities = []*csipb.VolumeCapability{blockCap(writer)}
	r.AccessibilityRequirements = &csipb.TopologyRequirement{Requisite: []*csipb.Topology{
		{Segments: map[string]string{TopologyZoneKey: "a"}},
		{Segments: map[string]string{TopologyZoneKey: DefaultZone}},
		{Segments: map[string]string{"other/key": "x"}},
	}}
	_, err := c.CreateVolume(context.Background(), r)
	wantCode(t, err, codes.OK)
	cmd := f.lastCreate()
	if cmd.AccessType != "block" || cmd.Replicas != 3 || cmd.SizeBytes != 64<<20 {
		t.Errorf("stored %+v, want a 64 MiB block volume with 3 replicas", cmd)
	}
	// The default zone is the store's empty zone; segments of other keys
	// do not restrict placement.
	if !slices.Equal(cmd.AllowedZones, []string{"a", ""}) {
		t.Errorf("allowed zones %q, want [a, \"\"]", cmd.AllowedZones)
	}
	_, err = c.CreateVolume(context.Background(), createReq("pvc-m", 64<<20))
	wantCode(t, err, codes.OK)
	if cmd := f.lastCreate(); cmd.AccessType != "mount" || cmd.AllowedZones != nil {
		t.Errorf("stored %+v, want a mount volume with no zone restriction", cmd)
	}
}

func TestCreateVolumeStoreErrors(t *testing.T) {
	tests := []struct {
		err  error
		want codes.Code
	}{
		{fmt.Errorf("volume %q: placement: 2 of 3 nodes: %w", "pvc", meta.ErrResourceExhausted), codes.ResourceExhausted},
		{fmt.Errorf("placement: no zone a: %w", meta.ErrInvalidArgument), codes.InvalidArgument},
		{fmt.Errorf("taken: %w", meta.ErrAlreadyExists), codes.AlreadyExists},
		{fmt.Errorf("gone: %w", meta.ErrNotFound), codes.NotFound},
		{meta.ErrNoLeader, codes.Unavailable},
		{meta.ErrNotLeader, codes.Unavailable},
		{meta.ErrOutcomeUnknown, codes.Unavailable},
		{context.DeadlineExceeded, codes.Unavailable},
		{status.Error(codes.Unavailable, "connection refused"), codes.Unavailable},
		{errors.New("disk on fire"), codes.Internal},
	}
	for _, tc := range tests {
		t.Run(tc.err.Error(), func(t *testing.T) {
			c, f := newTestController()
			f.fail["Apply"] = tc.err
			_, err := c.CreateVolume(context.Background(), createReq("pvc", 0))
			wantCode(t, err, tc.want)
			if !strings.Contains(status.Convert(err).Message(), status.Convert(tc.err).Message()) {
				t.Errorf("message %q lost the store's reason %q", status.Convert(err).Message(), tc.err)
			}
		})
	}
}

// A second operation on the same name or volume while one runs is Aborted
// at once, and the store is not asked.
func TestOperationInProgress(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")
	unlockName, err := c.locks.lock("name/pvc-2")
	wantCode(t, err, codes.OK)
	unlockVol, err := c.locks.lock(id)
	wantCode(t, err, codes.OK)
	applied := len(f.applied)

	_, err = c.CreateVolume(ctx, createReq("pvc-2", 0))
	wantCode(t, err, codes.Aborted)
	_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.Aborted)
	_, err = c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "n1", VolumeCapability: mountCap(writer)})
	wantCode(t, err, codes.Aborted)
	_, err = c.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "n1"})
	wantCode(t, err, codes.Aborted)
	_, err = c.ControllerModifyVolume(ctx, &csipb.ControllerModifyVolumeRequest{VolumeId: id, MutableParameters: map[string]string{"maxIOPS": "10"}})
	wantCode(t, err, codes.Aborted)
	if len(f.applied) != applied {
		t.Errorf("busy calls reached the store: %v", f.applied[applied:])
	}
	unlockName()
	unlockVol()
	_, err = c.CreateVolume(ctx, createReq("pvc-2", 0))
	wantCode(t, err, codes.OK)
	_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.OK)
}

func TestDeleteVolume(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")

	_, err := c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{})
	wantCode(t, err, codes.InvalidArgument)
	_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: "no-such-volume"})
	wantCode(t, err, codes.OK)

	_, err = c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "n1", VolumeCapability: mountCap(writer)})
	wantCode(t, err, codes.OK)
	_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.FailedPrecondition) // still published

	_, err = c.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "n1"})
	wantCode(t, err, codes.OK)
	f.fail["Apply"] = meta.ErrNoLeader
	_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.Unavailable)
	delete(f.fail, "Apply")
	for range 2 { // the second delete finds it gone: success
		_, err = c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: id})
		wantCode(t, err, codes.OK)
	}
	if f.volumeByName("pvc-1") != nil {
		t.Fatal("volume still live after delete")
	}
}

func TestControllerPublishVolume(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")
	deleted := mustCreate(t, c, "pvc-deleted")
	_, err := c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: deleted})
	wantCode(t, err, codes.OK)

	pub := func(vol, node string, ro bool, vc *csipb.VolumeCapability) error {
		_, err := c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: vol, NodeId: node, Readonly: ro, VolumeCapability: vc})
		return err
	}
	steps := []struct {
		name     string
		vol, nd  string
		readOnly bool
		vc       *csipb.VolumeCapability
		want     codes.Code
	}{
		{"no volume id", "", "n1", false, mountCap(writer), codes.InvalidArgument},
		{"no node id", id, "", false, mountCap(writer), codes.InvalidArgument},
		{"no capability", id, "n1", false, nil, codes.InvalidArgument},
		{"multi-node capability", id, "n1", false, mountCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_SINGLE_WRITER), codes.InvalidArgument},
		{"unknown volume", "no-such-volume", "n1", false, mountCap(writer), codes.NotFound},
		{"deleted volume", deleted, "n1", false, mountCap(writer), codes.NotFound},
		{"unknown node", id, "n9", false, mountCap(writer), codes.NotFound},
		{"publish", id, "n1", false, mountCap(writer), codes.OK},
		{"publish again", id, "n1", false, mountCap(writer), codes.OK},
		{"same node, now read-only", id, "n1", true, mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY), codes.AlreadyExists},
		{"another node", id, "n2", false, mountCap(writer), codes.FailedPrecondition},
	}
	for _, s := range steps {
		t.Run(s.name, func(t *testing.T) { wantCode(t, pub(s.vol, s.nd, s.readOnly, s.vc), s.want) })
	}
	if a := f.volumeByName("pvc-1").Attachment; a == nil || a.Node != "n1" || a.ReadOnly {
		t.Fatalf("attachment %+v, want read-write on n1", a)
	}

	t.Run("publish context", func(t *testing.T) {
		resp, err := c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "n1", VolumeCapability: mountCap(writer)})
		wantCode(t, err, codes.OK)
		if resp.GetPublishContext()["epoch-attached"] != "true" {
			t.Errorf("publish context %v", resp.GetPublishContext())
		}
	})
	t.Run("read-only publish", func(t *testing.T) {
		ro := mustCreate(t, c, "pvc-ro")
		wantCode(t, pub(ro, "n2", true, blockCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)), codes.OK)
		if a := f.volumeByName("pvc-ro").Attachment; a == nil || !a.ReadOnly || a.Node != "n2" {
			t.Fatalf("attachment %+v, want read-only on n2", a)
		}
		wantCode(t, pub(ro, "n2", false, blockCap(writer)), codes.AlreadyExists)
	})
	t.Run("store errors", func(t *testing.T) {
		other := mustCreate(t, c, "pvc-2")
		f.fail["Volume"] = meta.ErrNoLeader
		wantCode(t, pub(other, "n1", false, mountCap(writer)), codes.Unavailable)
		delete(f.fail, "Volume")
		f.fail["Attach"] = fmt.Errorf("volume %s is attached to n3: %w", other, meta.ErrFailedPrecondition)
		wantCode(t, pub(other, "n1", false, mountCap(writer)), codes.FailedPrecondition)
		f.fail["Attach"] = errors.New("boom")
		wantCode(t, pub(other, "n1", false, mountCap(writer)), codes.Internal)
		delete(f.fail, "Attach")
	})
}

func TestControllerUnpublishVolume(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")
	unpub := func(vol, node string) error {
		_, err := c.ControllerUnpublishVolume(ctx, &csipb.ControllerUnpublishVolumeRequest{VolumeId: vol, NodeId: node})
		return err
	}
	wantCode(t, unpub("", "n1"), codes.InvalidArgument)
	wantCode(t, unpub("no-such-volume", "n1"), codes.OK)
	wantCode(t, unpub(id, "n1"), codes.OK) // never published

	_, err := c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "n1", VolumeCapability: mountCap(writer)})
	wantCode(t, err, codes.OK)
	wantCode(t, unpub(id, "n2"), codes.OK) // another node's unpublish leaves n1's attachment
	if f.volumeByName("pvc-1").Attachment == nil {
		t.Fatal("unpublish from n2 detached n1")
	}
	f.fail["Detach"] = meta.ErrOutcomeUnknown
	wantCode(t, unpub(id, "n1"), codes.Unavailable)
	delete(f.fail, "Detach")
	wantCode(t, unpub(id, "n1"), codes.OK)
	if f.volumeByName("pvc-1").Attachment != nil {
		t.Fatal("still attached after unpublish")
	}
	wantCode(t, unpub(id, "n1"), codes.OK)
	wantCode(t, unpub(id, ""), codes.OK) // no node: any node's
}

func TestValidateVolumeCapabilities(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")
	validate := func(r *csipb.ValidateVolumeCapabilitiesRequest) (*csipb.ValidateVolumeCapabilitiesResponse, error) {
		return c.ValidateVolumeCapabilities(ctx, r)
	}
	_, err := validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeCapabilities: writerCaps})
	wantCode(t, err, codes.InvalidArgument)
	_, err = validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id})
	wantCode(t, err, codes.InvalidArgument)
	_, err = validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeId: "no-such-volume", VolumeCapabilities: writerCaps})
	wantCode(t, err, codes.NotFound)
	_, err = validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: writerCaps, Parameters: map[string]string{"colour": "blue"}})
	wantCode(t, err, codes.InvalidArgument)

	caps := []*csipb.VolumeCapability{blockCap(writer), mountCap(csipb.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER)}
	resp, err := validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: caps,
		VolumeContext: map[string]string{"replicas": "3"}, Parameters: map[string]string{"replicas": "3"}})
	wantCode(t, err, codes.OK)
	if conf := resp.GetConfirmed(); conf == nil || len(conf.GetVolumeCapabilities()) != 2 || conf.GetVolumeContext()["replicas"] != "3" || conf.GetParameters()["replicas"] != "3" {
		t.Fatalf("confirmed %v, want the request's capabilities, context and parameters", conf)
	}

	// Unsupported capabilities are an answer, not an error: unconfirmed, with the reason.
	resp, err = validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id,
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}})
	wantCode(t, err, codes.OK)
	if resp.GetConfirmed() != nil || !strings.Contains(resp.GetMessage(), "MULTI_NODE_MULTI_WRITER") {
		t.Fatalf("response %v, want unconfirmed with a message naming the mode", resp)
	}

	f.fail["Volume"] = meta.ErrNoLeader
	_, err = validate(&csipb.ValidateVolumeCapabilitiesRequest{VolumeId: id, VolumeCapabilities: writerCaps})
	wantCode(t, err, codes.Unavailable)
}

func TestListVolumesPaging(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	var ids []string
	for i := range 5 {
		ids = append(ids, mustCreate(t, c, fmt.Sprintf("pvc-%d", i)))
	}
	_, err := c.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: ids[2]})
	wantCode(t, err, codes.OK)
	_, err = c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: ids[0], NodeId: "n2", VolumeCapability: mountCap(writer)})
	wantCode(t, err, codes.OK)
	live := []string{ids[0], ids[1], ids[3], ids[4]}
	slices.Sort(live)

	var got []string
	token, pages := "", 0
	for {
		resp, err := c.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: 3, StartingToken: token})
		wantCode(t, err, codes.OK)
		pages++
		for _, e := range resp.GetEntries() {
			got = append(got, e.GetVolume().GetVolumeId())
			wantNodes := []string(nil)
			if e.GetVolume().GetVolumeId() == ids[0] {
				wantNodes = []string{"n2"}
			}
			if !slices.Equal(e.GetStatus().GetPublishedNodeIds(), wantNodes) {
				t.Errorf("%s published on %v, want %v", e.GetVolume().GetVolumeId(), e.GetStatus().GetPublishedNodeIds(), wantNodes)
			}
		}
		if token = resp.GetNextToken(); token == "" {
			break
		}
	}
	if !slices.Equal(got, live) || pages != 2 {
		t.Fatalf("listed %v in %d pages, want %v in 2 (deleted volumes left out, id order)", got, pages, live)
	}
	all, err := c.ListVolumes(ctx, &csipb.ListVolumesRequest{})
	wantCode(t, err, codes.OK)
	if len(all.GetEntries()) != 4 || all.GetNextToken() != "" {
		t.Fatalf("unbounded list gave %d entries, next %q", len(all.GetEntries()), all.GetNextToken())
	}
	end, err := c.ListVolumes(ctx, &csipb.ListVolumesRequest{StartingToken: "4"})
	wantCode(t, err, codes.OK)
	if len(end.GetEntries()) != 0 || end.GetNextToken() != "" {
		t.Fatalf("a token at the end gave %v", end)
	}

	for _, bad := range []string{"x", "-1", "5", "1.5"} {
		_, err := c.ListVolumes(ctx, &csipb.ListVolumesRequest{StartingToken: bad})
		wantCode(t, err, codes.Aborted)
		_, err = c.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{StartingToken: bad})
		wantCode(t, err, codes.Aborted)
	}
	_, err = c.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: -1})
	wantCode(t, err, codes.InvalidArgument)
	_, err = c.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{MaxEntries: -1})
	wantCode(t, err, codes.InvalidArgument)
	f.fail["State"] = meta.ErrNoLeader
	_, err = c.ListVolumes(ctx, &csipb.ListVolumesRequest{})
	wantCode(t, err, codes.Unavailable)
}

func TestControllerGetVolumeAndHealth(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")
	_, err := c.ControllerPublishVolume(ctx, &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "n3", VolumeCapability: mountCap(writer)})
	wantCode(t, err, codes.OK)

	_, err = c.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{})
	wantCode(t, err, codes.InvalidArgument)
	_, err = c.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: "no-such-volume"})
	wantCode(t, err, codes.NotFound)
	got, err := c.ControllerGetVolume(ctx, &csipb.ControllerGetVolumeRequest{VolumeId: id})
	wantCode(t, err, codes.OK)
	if got.GetVolume().GetVolumeId() != id || !slices.Equal(got.GetStatus().GetPublishedNodeIds(), []string{"n3"}) {
		t.Fatalf("got %v", got)
	}

	_, err = c.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{})
	wantCode(t, err, codes.InvalidArgument)
	_, err = c.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{VolumeId: "no-such-volume"})
	wantCode(t, err, codes.NotFound)

	health := func() []csipb.VolumeHealthErrorType {
		t.Helper()
		h, err := c.ControllerGetVolumeHealth(ctx, &csipb.ControllerGetVolumeHealthRequest{VolumeId: id})
		wantCode(t, err, codes.OK)
		var out []csipb.VolumeHealthErrorType
		for _, e := range h.GetVolumeHealth().GetHealthStatuses() {
			out = append(out, e.GetStatus())
		}
		return out
	}
	if h := health(); len(h) != 0 {
		t.Fatalf("a healthy volume reports %v", h)
	}
	setReplicas := func(state meta.ReplicaState, n int) {
		f.mu.Lock()
		defer f.mu.Unlock()
		v := f.st.Volumes[id]
		for i := range v.Replicas {
			v.Replicas[i].State = meta.ReplicaHealthy
			if i < n {
				v.Replicas[i].State = state
			}
		}
	}
	setReplicas(meta.ReplicaFailed, 1)
	if h := health(); !slices.Equal(h, []csipb.VolumeHealthErrorType{csipb.VolumeHealthErrorType_DEGRADED}) {
		t.Fatalf("one failed replica: %v, want DEGRADED", h)
	}
	setReplicas(meta.ReplicaFailed, 3)
	if h := health(); !slices.Equal(h, []csipb.VolumeHealthErrorType{csipb.VolumeHealthErrorType_INACCESSIBLE}) {
		t.Fatalf("no healthy replica: %v, want INACCESSIBLE", h)
	}
	list, err := c.ControllerListVolumeHealth(ctx, &csipb.ControllerListVolumeHealthRequest{})
	wantCode(t, err, codes.OK)
	if len(list.GetEntries()) != 1 || list.GetEntries()[0].GetVolumeId() != id {
		t.Fatalf("list health %v", list)
	}
}

func TestGetCapacity(t *testing.T) {
	ctx := context.Background()
	f := newFakeStore(0)
	f.st.Nodes["a1"] = &meta.Node{ID: "a1", Zone: "a", State: meta.NodeUp, CapacityBytes: 10 * gib}
	f.st.Nodes["a2"] = &meta.Node{ID: "a2", Zone: "a", State: meta.NodeUp, CapacityBytes: 30 * gib}
	f.st.Nodes["a3"] = &meta.Node{ID: "a3", Zone: "a", State: meta.NodeDown, CapacityBytes: 100 * gib}
	f.st.Nodes["d1"] = &meta.Node{ID: "d1", State: meta.NodeUp, CapacityBytes: 20 * gib}
	c := NewController(f)
	zone := func(z string) *csipb.Topology {
		return &csipb.Topology{Segments: map[string]string{TopologyZoneKey: z}}
	}
	tests := []struct {
		name           string
		req            *csipb.GetCapacityRequest
		total, largest int64
		want           codes.Code
	}{
		{"whole cluster, up nodes only", &csipb.GetCapacityRequest{}, 60 * gib, 30 * gib, codes.OK},
		{"zone a", &csipb.GetCapacityRequest{AccessibleTopology: zone("a")}, 40 * gib, 30 * gib, codes.OK},
		{"the default zone", &csipb.GetCapacityRequest{AccessibleTopology: zone(DefaultZone)}, 20 * gib, 20 * gib, codes.OK},
		{"an empty zone", &csipb.GetCapacityRequest{AccessibleTopology: zone("z")}, 0, 0, codes.OK},
		{"supported capabilities", &csipb.GetCapacityRequest{VolumeCapabilities: writerCaps}, 60 * gib, 30 * gib, codes.OK},
		{"unsupported capabilities: no room", &csipb.GetCapacityRequest{
			VolumeCapabilities: []*csipb.VolumeCapability{mountCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)}}, 0, 0, codes.OK},
		// CreateVolume names the bad parameter; GetCapacity must not
		// hide that error behind "not enough free storage".
		{"parameters CreateVolume refuses", &csipb.GetCapacityRequest{Parameters: map[string]string{"colour": "blue"}}, 60 * gib, 30 * gib, codes.OK},
		{"a refused value, a disk type no node has", &csipb.GetCapacityRequest{Parameters: map[string]string{"type": "nvme-ssd", "compression": "lz4"}}, 0, 0, codes.OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := c.GetCapacity(ctx, tc.req)
			wantCode(t, err, tc.want)
			if err != nil {
				return
			}
			if resp.GetAvailableCapacity() != tc.total || resp.GetMaximumVolumeSize().GetValue() != tc.largest {
				t.Errorf("available %d, largest %d; want %d, %d", resp.GetAvailableCapacity(), resp.GetMaximumVolumeSize().GetValue(), tc.total, tc.largest)
			}
		})
	}

	t.Run("placed replicas and over-provisioning", func(t *testing.T) {
		f.mu.Lock()
		f.st.OverProvisioningRatio = 2
		f.st.Volumes["v"] = &meta.Volume{ID: "v", SizeBytes: 5 * gib, State: meta.VolumeAvailable,
			Replicas: []meta.Replica{{ID: "v-r1", Node: "a2"}, {ID: "v-r2", Node: "d1"}}}
		f.mu.Unlock()
		resp, err := c.GetCapacity(ctx, &csipb.GetCapacityRequest{AccessibleTopology: zone("a")})
		wantCode(t, err, codes.OK)
		if resp.GetAvailableCapacity() != 20*gib+55*gib || resp.GetMaximumVolumeSize().GetValue() != 55*gib {
			t.Errorf("available %d, largest %d; want 75 GiB and 55 GiB", resp.GetAvailableCapacity(), resp.GetMaximumVolumeSize().GetValue())
		}
	})
	t.Run("no more than the disk has free (snapshots take space)", func(t *testing.T) {
		f.mu.Lock()
		f.st.Nodes["a2"].FreeBytes = 12 * gib // a2's disk: 12 GiB free, less than its 55 GiB of thin room
		f.mu.Unlock()
		defer func() { f.mu.Lock(); f.st.Nodes["a2"].FreeBytes = 0; f.mu.Unlock() }()
		resp, err := c.GetCapacity(ctx, &csipb.GetCapacityRequest{AccessibleTopology: zone("a")})
		wantCode(t, err, codes.OK)
		if resp.GetAvailableCapacity() != 20*gib+12*gib || resp.GetMaximumVolumeSize().GetValue() != 20*gib {
			t.Errorf("available %d, largest %d; want 32 GiB and 20 GiB", resp.GetAvailableCapacity(), resp.GetMaximumVolumeSize().GetValue())
		}
	})
	t.Run("store unavailable", func(t *testing.T) {
		f.fail["State"] = meta.ErrNoLeader
		defer delete(f.fail, "State")
		_, err := c.GetCapacity(ctx, &csipb.GetCapacityRequest{})
		wantCode(t, err, codes.Unavailable)
	})
}

func TestControllerGetCapabilities(t *testing.T) {
	c, _ := newTestController()
	resp, err := c.ControllerGetCapabilities(context.Background(), &csipb.ControllerGetCapabilitiesRequest{})
	wantCode(t, err, codes.OK)
	var got []csipb.ControllerServiceCapability_RPC_Type
	for _, cp := range resp.GetCapabilities() {
		got = append(got, cp.GetRpc().GetType())
	}
	want := []csipb.ControllerServiceCapability_RPC_Type{
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
	if !slices.Equal(got, want) {
		t.Fatalf("capabilities %v, want %v", got, want)
	}
}

func TestControllerModifyVolume(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1")
	modify := func(vol string, mp map[string]string) error {
		_, err := c.ControllerModifyVolume(ctx, &csipb.ControllerModifyVolumeRequest{VolumeId: vol, MutableParameters: mp})
		return err
	}
	wantCode(t, modify("", map[string]string{"maxIOPS": "10"}), codes.InvalidArgument)
	wantCode(t, modify("no-such-volume", map[string]string{"maxIOPS": "10"}), codes.NotFound)
	wantCode(t, modify(id, map[string]string{"replicas": "1"}), codes.InvalidArgument)
	wantCode(t, modify(id, map[string]string{"maxIOPS": "lots"}), codes.InvalidArgument)
	applied := len(f.applied)
	wantCode(t, modify(id, nil), codes.OK)
	if len(f.applied) != applied {
		t.Fatal("an empty modify reached the store")
	}
	wantCode(t, modify(id, map[string]string{"maxIOPS": "5000"}), codes.OK)
	if got := f.volumeByName("pvc-1").Parameters["maxIOPS"]; got != "5000" {
		t.Fatalf("maxIOPS = %q after modify, want 5000", got)
	}
	f.fail["Apply"] = meta.ErrNotLeader
	wantCode(t, modify(id, map[string]string{"maxIOPS": "6000"}), codes.Unavailable)
}

func TestIdentityProbe(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		local  bool
		fail   string
		leader string
		ready  bool
	}{
		{"cluster with a leader", false, "", "m1", true},
		{"cluster without a leader", false, "", "", false},
		{"cluster status fails", false, "Status", "m1", false},
		{"local member answers", true, "", "", true},
		{"local member down", true, "Info", "m1", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeStore(0)
			f.leader = tc.leader
			if tc.fail != "" {
				f.fail[tc.fail] = meta.ErrNoLeader
			}
			resp, err := (&Identity{Meta: f, Local: tc.local}).Probe(ctx, &csipb.ProbeRequest{})
			wantCode(t, err, codes.OK)
			if resp.GetReady().GetValue() != tc.ready {
				t.Errorf("ready = %v, want %v", resp.GetReady().GetValue(), tc.ready)
			}
		})
	}
}

// TestVolumeHealthReportsFollowerLag: an asynchronous volume's followers
// are in service (not "degraded" for not being healthy), and are reported
// with their lag while behind.
func TestVolumeHealthReportsFollowerLag(t *testing.T) {
	v := &meta.Volume{ID: "v", ReplicaCount: 3, Replicas: []meta.Replica{
		{ID: "v-r1", Node: "n1", State: meta.ReplicaHealthy},
		{ID: "v-r2", Node: "n2", State: meta.ReplicaFollowing, Lag: &meta.ReplicaLag{Applied: 10}},
		{ID: "v-r3", Node: "n3", State: meta.ReplicaFollowing, Lag: &meta.ReplicaLag{Applied: 10}},
	}}
	if h := volumeHealth(v); len(h.HealthStatuses) != 0 {
		t.Fatalf("caught-up followers: %v, want no status", h.HealthStatuses)
	}
	v.Replicas[2].Lag = &meta.ReplicaLag{Writes: 12, Bytes: 48 << 10, Seconds: 0.25}
	h := volumeHealth(v)
	if len(h.HealthStatuses) != 1 || h.HealthStatuses[0].Reason != "ReplicaLag" ||
		!strings.Contains(h.HealthStatuses[0].Message, "replica v-r3 on n3: 12 writes, 49152 bytes, 0.250s behind") {
		t.Fatalf("a follower behind: %v", h.HealthStatuses)
	}
}
