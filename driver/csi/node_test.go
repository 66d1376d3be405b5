package csi

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	mount "k8s.io/mount-utils"
)

// The Node's logic that runs before it touches an engine, a loop device or a
// mount needs no root; these tests cover it. Staging itself is covered as
// root by tests/sanity and tests/csie2e.

func TestCheckPathUnder(t *testing.T) {
	roots := []string{"/var/lib/kubelet", "/srv/csi/"}
	tests := []struct {
		name  string
		roots []string
		path  string
		ok    bool
	}{
		{"empty", nil, "", false},
		{"relative", nil, "pods/x", false},
		{"dot relative", nil, "./x", false},
		{"absolute without roots", nil, "/anywhere", true},
		{"under a root", roots, "/var/lib/kubelet/pods/x/mount", true},
		{"the root itself", roots, "/var/lib/kubelet", true},
		{"under a root with a trailing slash", roots, "/srv/csi/staging", true},
		{"outside", roots, "/etc/x", false},
		{"a sibling sharing the prefix", roots, "/var/lib/kubelet-evil/x", false},
		{"escaping with ..", roots, "/var/lib/kubelet/../../../etc", false},
		{"relative under roots", roots, "var/lib/kubelet/x", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := checkPathUnder(tc.roots, "target path", tc.path)
			if tc.ok {
				wantCode(t, toStatus(err), codes.OK)
				return
			}
			if !errors.Is(err, errInvalid) {
				t.Fatalf("checkPathUnder(%q) = %v, want errInvalid", tc.path, err)
			}
		})
	}
}

func TestUnmountIfMounted(t *testing.T) {
	dir := t.TempDir()
	mounted := filepath.Join(dir, "mounted")
	plain := filepath.Join(dir, "plain")
	broken := filepath.Join(dir, "broken")
	for _, d := range []string{mounted, plain, broken} {
		if err := os.Mkdir(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}
	fm := mount.NewFakeMounter([]mount.MountPoint{{Device: "/dev/loop7", Path: mounted}})
	fm.MountCheckErrors = map[string]error{broken: os.ErrPermission}

	if err := unmountIfMounted(fm, filepath.Join(dir, "missing")); err != nil {
		t.Errorf("a missing path: %v, want nothing to do", err)
	}
	if err := unmountIfMounted(fm, plain); err != nil {
		t.Errorf("a plain directory: %v, want nothing to do", err)
	}
	if err := unmountIfMounted(fm, broken); !errors.Is(err, os.ErrPermission) {
		t.Errorf("a failed mount check: %v, want its error", err)
	}
	if len(fm.GetLog()) != 0 {
		t.Fatalf("unmounted where nothing was mounted: %v", fm.GetLog())
	}
	if err := unmountIfMounted(fm, mounted); err != nil {
		t.Fatalf("a mount point: %v", err)
	}
	if log := fm.GetLog(); len(log) != 1 || log[0].Action != mount.FakeActionUnmount || log[0].Target != mounted {
		t.Fatalf("actions %v, want one unmount of %s", log, mounted)
	}
}

func TestVolumeLocks(t *testing.T) {
	l := newVolumeLocks()
	if _, err := l.lockVolume(""); !errors.Is(err, errInvalid) {
		t.Fatalf("lockVolume(\"\") = %v, want errInvalid", err)
	}
	unlock, err := l.lockVolume("v1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.lock("v1"); !errors.Is(err, errBusy) {
		t.Fatalf("second lock = %v, want errBusy", err)
	}
	unlockOther, err := l.lock("v2")
	if err != nil {
		t.Fatalf("another volume's lock: %v", err)
	}
	unlock()
	unlockOther()
	unlock, err = l.lock("v1")
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock()
}

// newTestNode returns a Node whose paths must lie under root; nothing is
// staged, and no request in these tests gets as far as opening an engine.
func newTestNode(t *testing.T) (n *Node, root string) {
	root = t.TempDir()
	return NewNode(NodeConfig{NodeID: "n1", Zone: "a", StateDir: filepath.Join(root, "state"), AllowedRoots: []string{root}}), root
}

func TestNodeStageVolumeInvalid(t *testing.T) {
	n, root := newTestNode(t)
	staging := filepath.Join(root, "staging")
	tests := []struct {
		name    string
		id      string
		staging string
		vc      *csipb.VolumeCapability
	}{
		{"no volume id", "", staging, mountCap(writer)},
		{"no staging path", "v1", "", mountCap(writer)},
		{"relative staging path", "v1", "staging", mountCap(writer)},
		{"staging path outside the roots", "v1", "/etc/cairn", mountCap(writer)},
		{"no capability", "v1", staging, nil},
		{"capability without access mode", "v1", staging, &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}}}},
		{"multi-node capability", "v1", staging, blockCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)},
		{"unsupported fs type", "v1", staging, &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ntfs"}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: writer}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := n.NodeStageVolume(context.Background(), &csipb.NodeStageVolumeRequest{VolumeId: tc.id, StagingTargetPath: tc.staging, VolumeCapability: tc.vc})
			wantCode(t, err, codes.InvalidArgument)
		})
	}
}

func TestNodePublishVolume(t *testing.T) {
	n, root := newTestNode(t)
	staging, target := filepath.Join(root, "staging"), filepath.Join(root, "target")
	tests := []struct {
		name            string
		id              string
		target, staging string
		vc              *csipb.VolumeCapability
		want            codes.Code
	}{
		{"no volume id", "", target, staging, mountCap(writer), codes.InvalidArgument},
		{"no target path", "v1", "", staging, mountCap(writer), codes.InvalidArgument},
		{"no staging path", "v1", target, "", mountCap(writer), codes.InvalidArgument},
		{"target outside the roots", "v1", "/etc/cairn", staging, mountCap(writer), codes.InvalidArgument},
		{"relative staging path", "v1", target, "staging", mountCap(writer), codes.InvalidArgument},
		{"no capability", "v1", target, staging, nil, codes.InvalidArgument},
		{"multi-node capability", "v1", target, staging, mountCap(csipb.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY), codes.InvalidArgument},
		{"not staged", "v1", target, staging, mountCap(writer), codes.FailedPrecondition},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := n.NodePublishVolume(context.Background(), &csipb.NodePublishVolumeRequest{
				VolumeId: tc.id, TargetPath: tc.target, StagingTargetPath: tc.staging, VolumeCapability: tc.vc})
			wantCode(t, err, tc.want)
		})
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused publish created its target: %v", err)
	}
}

func TestNodeUnstageAndUnpublish(t *testing.T) {
	ctx := context.Background()
	n, root := newTestNode(t)
	gone := filepath.Join(root, "gone")

	_, err := n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{StagingTargetPath: gone})
	wantCode(t, err, codes.InvalidArgument)
	_, err = n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "v1"})
	wantCode(t, err, codes.InvalidArgument)
	_, err = n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "v1", StagingTargetPath: "/etc/cairn"})
	wantCode(t, err, codes.InvalidArgument)

	_, err = n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{TargetPath: gone})
	wantCode(t, err, codes.InvalidArgument)
	_, err = n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v1"})
	wantCode(t, err, codes.InvalidArgument)
	_, err = n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: "relative"})
	wantCode(t, err, codes.InvalidArgument)

	// A target or a staging already gone is success: kubelet retries
	// until it is.
	_, err = n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: gone})
	wantCode(t, err, codes.OK)
	_, err = n.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: "v1", StagingTargetPath: gone})
	wantCode(t, err, codes.OK)
}

func TestNodeGetVolumeStats(t *testing.T) {
	ctx := context.Background()
	n, root := newTestNode(t)
	stats := func(id, p string) error {
		_, err := n.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: p})
		return err
	}
	wantCode(t, stats("", root), codes.InvalidArgument)
	wantCode(t, stats("v1", ""), codes.InvalidArgument)
	wantCode(t, stats("v1", filepath.Join(root, "missing")), codes.NotFound)
	wantCode(t, stats("v1", root), codes.NotFound) // the path exists, the volume is not staged here
}

func TestNodeGetInfoAndCapabilities(t *testing.T) {
	n := NewNode(NodeConfig{NodeID: "n1", MaxVolumes: 7})
	info, err := n.NodeGetInfo(context.Background(), &csipb.NodeGetInfoRequest{})
	wantCode(t, err, codes.OK)
	if info.GetNodeId() != "n1" || info.GetMaxVolumesPerNode() != 7 || info.GetAccessibleTopology().GetSegments()[TopologyZoneKey] != DefaultZone {
		t.Fatalf("info %v: want n1, 7 volumes, the default zone", info)
	}
	caps, err := n.NodeGetCapabilities(context.Background(), &csipb.NodeGetCapabilitiesRequest{})
	wantCode(t, err, codes.OK)
	var got []csipb.NodeServiceCapability_RPC_Type
	for _, c := range caps.GetCapabilities() {
		got = append(got, c.GetRpc().GetType())
	}
	if len(got) != 2 || got[0] != csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME || got[1] != csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS {
		t.Fatalf("capabilities %v", got)
	}
}
