package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	mount "k8s.io/mount-utils"

	"github.com/cairn-csi/cairn/driver/frontend"
	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
)

// The Node's RPC logic, on fakes of its seams (fakenode_test.go): no root,
// no kernel, no replicas. Real mounts, loop devices and engines are covered
// as root by tests/sanity and tests/csie2e.

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

// newTestNode returns a Node on fakes whose paths must lie under root, with
// nothing staged.
func newTestNode(t *testing.T) (n *Node, root string) {
	n, _, root = newFakeNode(t, 0)
	return n, root
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
	want := []csipb.NodeServiceCapability_RPC_Type{csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS, csipb.NodeServiceCapability_RPC_EXPAND_VOLUME}
	if !slices.Equal(got, want) {
		t.Fatalf("capabilities %v, want %v", got, want)
	}
}

// Staging, publishing and their undoing, on the fakes.

// stage and unstage call the Node for volume id at staging.
func stage(n *Node, id, staging string, vc *csipb.VolumeCapability) error {
	_, err := n.NodeStageVolume(context.Background(), stageReq(id, staging, vc))
	return err
}

func unstage(n *Node, id, staging string) error {
	_, err := n.NodeUnstageVolume(context.Background(), &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	return err
}

// unstageClean unstages id and fails t if anything is left open, attached
// or mounted.
func unstageClean(t *testing.T, n *Node, f *nodeFakes, id, staging string) {
	t.Helper()
	wantCode(t, unstage(n, id, staging), codes.OK)
	if left := f.leftovers(); left != "" {
		t.Fatalf("unstaging %s left%s", id, left)
	}
}

func stageReq(id, staging string, vc *csipb.VolumeCapability) *csipb.NodeStageVolumeRequest {
	return &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc}
}

func publishReq(id, staging, target string, vc *csipb.VolumeCapability, readonly bool) *csipb.NodePublishVolumeRequest {
	return &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc, Readonly: readonly}
}

func hasOpt(mp mount.MountPoint, opt string) bool {
	for _, o := range mp.Opts {
		if o == opt {
			return true
		}
	}
	return false
}

func TestNodeStageMountVolume(t *testing.T) {
	n, f, root := newFakeNode(t, 0)
	staging, other := filepath.Join(root, "staging"), filepath.Join(root, "other")
	vc := &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "xfs", MountFlags: []string{"noatime"}}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: writer}}

	wantCode(t, stage(n, "v1", staging, vc), codes.OK)
	mp, ok := f.mounter.mountAt(staging)
	if !ok || mp.Device != "/dev/loop0" || mp.Type != "xfs" || !hasOpt(mp, "noatime") {
		t.Fatalf("staging mount %+v (found %v), want /dev/loop0 as xfs with noatime", mp, ok)
	}
	if got := f.devices.attached["/dev/loop0"]; got != filepath.Join(root, "state", "fuse", "v1") {
		t.Errorf("loop device on %q, want the volume's FUSE file", got)
	}
	if f.files.files["v1"] != frontend.Backend(f.engines.open["v1"]) {
		t.Errorf("the FUSE file does not serve the volume's engine")
	}

	// Again at the same path: nothing more is done.
	wantCode(t, stage(n, "v1", staging, vc), codes.OK)
	// At another path: the volume is staged once per node.
	wantCode(t, stage(n, "v1", other, vc), codes.FailedPrecondition)
	if f.engines.opens != 1 || f.mounter.formats != 1 || f.files.mounts != 1 || len(f.devices.devices()) != 1 {
		t.Fatalf("restaging did work again: %d opens, %d formats, %d FUSE mounts, devices %v",
			f.engines.opens, f.mounter.formats, f.files.mounts, f.devices.devices())
	}

	unstageClean(t, n, f, "v1", staging)
	wantCode(t, unstage(n, "v1", staging), codes.OK)
	if f.engines.releases != 1 || f.devices.detaches != 1 {
		t.Fatalf("a second unstage released %d, detached %d: want 1 each in all", f.engines.releases, f.devices.detaches)
	}

	// Staged anew, a volume goes where the new request says.
	wantCode(t, stage(n, "v1", other, vc), codes.OK)
}

func TestNodeStageBlockVolume(t *testing.T) {
	n, f, root := newFakeNode(t, 0)
	staging := filepath.Join(root, "staging")
	wantCode(t, stage(n, "v1", staging, blockCap(writer)), codes.OK)
	if mps, _ := f.mounter.List(); len(mps) != 0 || f.mounter.formats != 0 {
		t.Fatalf("a block volume was formatted (%d) or mounted: %v", f.mounter.formats, mps)
	}
	if devs := f.devices.devices(); len(devs) != 1 {
		t.Fatalf("loop devices %v, want one", devs)
	}
	wantCode(t, stage(n, "v1", staging, blockCap(writer)), codes.OK)
	unstageClean(t, n, f, "v1", staging)
}

func TestNodeStageMaxVolumes(t *testing.T) {
	n, f, root := newFakeNode(t, 1)
	s1, s2 := filepath.Join(root, "s1"), filepath.Join(root, "s2")
	wantCode(t, stage(n, "v1", s1, blockCap(writer)), codes.OK)
	wantCode(t, stage(n, "v2", s2, blockCap(writer)), codes.ResourceExhausted)
	if f.engines.opens != 1 {
		t.Fatalf("a volume past the limit opened its engine")
	}
	// The volume already staged is no new one.
	wantCode(t, stage(n, "v1", s1, blockCap(writer)), codes.OK)
	wantCode(t, unstage(n, "v1", s1), codes.OK)
	wantCode(t, stage(n, "v2", s2, blockCap(writer)), codes.OK)
}

// TestNodeStageUndo fails each step of staging in turn: the call answers
// the failure's code, leaves nothing open, attached or mounted, and does
// not count against MaxVolumes; the retry then stages.
func TestNodeStageUndo(t *testing.T) {
	tests := []struct {
		name  string
		block bool
		fault func(*nodeFakes)
		want  codes.Code
	}{
		{"volume unknown", false, func(f *nodeFakes) { f.engines.openErr["v1"] = fmt.Errorf("open: %w", meta.ErrNotFound) }, codes.NotFound},
		{"engine fenced", false, func(f *nodeFakes) { f.engines.openErr["v1"] = fmt.Errorf("open: %w", engine.ErrFenced) }, codes.FailedPrecondition},
		{"store without leader", false, func(f *nodeFakes) { f.engines.openErr["v1"] = fmt.Errorf("open: %w", meta.ErrNoLeader) }, codes.Unavailable},
		{"registry busy", false, func(f *nodeFakes) { f.engines.openErr["v1"] = fmt.Errorf("open: %w", attach.ErrBusy) }, codes.Aborted},
		{"engine open fails", false, func(f *nodeFakes) { f.engines.openErr["v1"] = errFake }, codes.Internal},
		{"FUSE mount fails", false, func(f *nodeFakes) { f.files.mountErr = errFake }, codes.Internal},
		{"FUSE add fails", true, func(f *nodeFakes) { f.files.addErr = errFake }, codes.Internal},
		{"loop attach fails", true, func(f *nodeFakes) { f.devices.attachErr = errFake }, codes.Internal},
		{"mkfs or mount fails", false, func(f *nodeFakes) { f.mounter.formatErr = errFake }, codes.Internal},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n, f, root := newFakeNode(t, 1)
			staging := filepath.Join(root, "staging")
			vc := mountCap(writer)
			if tc.block {
				vc = blockCap(writer)
			}
			tc.fault(f)
			wantCode(t, stage(n, "v1", staging, vc), tc.want)
			if left := f.leftovers(); left != "" {
				t.Fatalf("a failed stage left%s", left)
			}
			if f.engines.opens != f.engines.releases {
				t.Fatalf("%d engines opened, %d released", f.engines.opens, f.engines.releases)
			}
			if len(n.staged) != 0 || n.staging != 0 {
				t.Fatalf("a failed stage counts: %d staged, %d staging", len(n.staged), n.staging)
			}

			*f.engines = fakeEngines{openErr: map[string]error{}, open: map[string]*fakeEngine{}}
			f.files.mountErr, f.files.addErr, f.devices.attachErr, f.mounter.formatErr = nil, nil, nil, nil
			wantCode(t, stage(n, "v1", staging, vc), codes.OK)
		})
	}
}

func TestNodeUnstageResumes(t *testing.T) {
	n, f, root := newFakeNode(t, 0)
	staging := filepath.Join(root, "staging")
	wantCode(t, stage(n, "v1", staging, mountCap(writer)), codes.OK)

	// The loop device is busy: nothing is released, and the volume stays
	// staged for the retry.
	f.devices.detachErr = []error{errFake}
	wantCode(t, unstage(n, "v1", staging), codes.Internal)
	if _, ok := f.mounter.mountAt(staging); ok {
		t.Errorf("the staging path is still mounted")
	}
	if f.engines.releases != 0 || len(f.devices.devices()) != 1 || len(f.files.names()) != 1 {
		t.Fatalf("after a failed detach: %d releases, devices %v, files %v", f.engines.releases, f.devices.devices(), f.files.names())
	}

	// The engine's turn does not come: Aborted, and the retry goes on
	// from there without detaching again.
	f.engines.releaseErr = []error{fmt.Errorf("release: %w", attach.ErrBusy)}
	wantCode(t, unstage(n, "v1", staging), codes.Aborted)
	if len(f.devices.devices()) != 0 || len(f.engines.openIDs()) != 1 {
		t.Fatalf("after a busy release: devices %v, engines %v", f.devices.devices(), f.engines.openIDs())
	}
	unstageClean(t, n, f, "v1", staging)
	if f.devices.detaches != 2 {
		t.Errorf("%d detaches, want 2 (one failed, one done)", f.devices.detaches)
	}

	// An engine that does not close cleanly is closed all the same.
	wantCode(t, stage(n, "v1", staging, mountCap(writer)), codes.OK)
	f.engines.releaseErr = []error{errFake}
	unstageClean(t, n, f, "v1", staging)
}

func TestNodeUnstageAfterRestart(t *testing.T) {
	n, f, root := newFakeNode(t, 0)
	staging := filepath.Join(root, "staging")
	if err := os.Mkdir(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	// What a node plugin that crashed left: a mounted staging path and a
	// loop device on the volume's old FUSE file.
	f.devices.attached["/dev/loop9"] = filepath.Join(root, "state", "fuse", "v1")
	f.devices.attached["/dev/loop8"] = filepath.Join(root, "state", "fuse", "v2")
	if err := f.mounter.Mount("/dev/loop9", staging, "ext4", nil); err != nil {
		t.Fatal(err)
	}
	wantCode(t, unstage(n, "v1", staging), codes.OK)
	if devs := f.devices.devices(); len(devs) != 1 || devs[0] != "/dev/loop8" {
		t.Fatalf("devices %v, want only v2's /dev/loop8", devs)
	}
	if _, ok := f.mounter.mountAt(staging); ok {
		t.Fatalf("the staging path is still mounted")
	}
}

func TestNodePublishStaged(t *testing.T) {
	tests := []struct {
		name     string
		vc       *csipb.VolumeCapability
		readonly bool
	}{
		{"mount", mountCap(writer), false},
		{"mount readonly", mountCap(writer), true},
		{"mount with flags", &csipb.VolumeCapability{
			AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{MountFlags: []string{"noexec"}}},
			AccessMode: &csipb.VolumeCapability_AccessMode{Mode: writer}}, false},
		{"block", blockCap(writer), false},
		{"block readonly", blockCap(writer), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			n, f, root := newFakeNode(t, 0)
			staging, target := filepath.Join(root, "staging"), filepath.Join(root, "pods", "p1", "target")
			block := tc.vc.GetBlock() != nil
			wantCode(t, stage(n, "v1", staging, tc.vc), codes.OK)

			// Published as the other access type than staged.
			other := blockCap(writer)
			if block {
				other = mountCap(writer)
			}
			_, err := n.NodePublishVolume(ctx, publishReq("v1", staging, target, other, false))
			wantCode(t, err, codes.InvalidArgument)

			_, err = n.NodePublishVolume(ctx, publishReq("v1", staging, target, tc.vc, tc.readonly))
			wantCode(t, err, codes.OK)
			mp, ok := f.mounter.mountAt(target)
			if !ok || mp.Device != "/dev/loop0" || !hasOpt(mp, "bind") || hasOpt(mp, "ro") != tc.readonly {
				t.Fatalf("target mount %+v (found %v): want a bind mount of /dev/loop0, readonly %v", mp, ok, tc.readonly)
			}
			for _, flag := range tc.vc.GetMount().GetMountFlags() {
				if !hasOpt(mp, flag) {
					t.Errorf("mount flag %s missing from %v", flag, mp.Opts)
				}
			}
			fi, err := os.Stat(target)
			if err != nil || fi.IsDir() == block {
				t.Fatalf("target %v (%v): want a file for a block volume, a directory for a mount one", fi, err)
			}

			// Published again: already there.
			_, err = n.NodePublishVolume(ctx, publishReq("v1", staging, target, tc.vc, tc.readonly))
			wantCode(t, err, codes.OK)
			if mps, _ := f.mounter.List(); len(mps) != map[bool]int{true: 1, false: 2}[block] {
				t.Fatalf("mounts %v after a second publish", mps)
			}

			stats, err := n.NodeGetVolumeStats(ctx, &csipb.NodeGetVolumeStatsRequest{VolumeId: "v1", VolumePath: target})
			wantCode(t, err, codes.OK)
			if u := stats.GetUsage(); block && (len(u) != 1 || u[0].GetTotal() != fakeVolumeSize) {
				t.Errorf("block stats %v, want the volume's size", u)
			} else if !block && (len(u) != 2 || u[0].GetUnit() != csipb.VolumeUsage_BYTES || u[1].GetUnit() != csipb.VolumeUsage_INODES) {
				t.Errorf("mount stats %v, want bytes and inodes", u)
			}

			for i := 0; i < 2; i++ { // the second finds it gone
				_, err = n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: target})
				wantCode(t, err, codes.OK)
				if _, ok := f.mounter.mountAt(target); ok {
					t.Fatalf("target still mounted")
				}
				if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("target left behind: %v", err)
				}
			}
			unstageClean(t, n, f, "v1", staging)
		})
	}
}

func TestNodePublishMountFails(t *testing.T) {
	ctx := context.Background()
	n, f, root := newFakeNode(t, 0)
	staging, target := filepath.Join(root, "staging"), filepath.Join(root, "target")
	wantCode(t, stage(n, "v1", staging, mountCap(writer)), codes.OK)
	f.mounter.MountCheckErrors = map[string]error{target: os.ErrPermission}
	_, err := n.NodePublishVolume(ctx, publishReq("v1", staging, target, mountCap(writer), false))
	wantCode(t, err, codes.Internal)
	f.mounter.MountCheckErrors = nil
	// A target that exists as a file where a directory should be.
	bad := filepath.Join(root, "file")
	if err := os.WriteFile(bad, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = n.NodePublishVolume(ctx, publishReq("v1", staging, filepath.Join(bad, "target"), mountCap(writer), false))
	wantCode(t, err, codes.Internal)
	if _, ok := f.mounter.mountAt(target); ok {
		t.Fatalf("a failed publish mounted")
	}
}

func TestNodeClose(t *testing.T) {
	n, f, root := newFakeNode(t, 0)
	wantCode(t, stage(n, "v1", filepath.Join(root, "s1"), blockCap(writer)), codes.OK)
	n.Close()
	if len(f.engines.openIDs()) != 0 || len(f.devices.devices()) != 0 || !f.files.unmounted {
		t.Fatalf("after Close: engines %v, devices %v, FUSE unmounted %v", f.engines.openIDs(), f.devices.devices(), f.files.unmounted)
	}
}

// TestNodeStageInFlight holds a staging in its engine's open: another call
// on the volume is Aborted at once, and the staging counts against
// MaxVolumes before it is done.
func TestNodeStageInFlight(t *testing.T) {
	ctx := context.Background()
	n, f, root := newFakeNode(t, 1)
	s1, s2 := filepath.Join(root, "s1"), filepath.Join(root, "s2")
	entered, release := make(chan struct{}), make(chan struct{})
	f.engines.hold = func(string) { close(entered); <-release }
	done := make(chan error, 1)
	go func() { done <- stage(n, "v1", s1, blockCap(writer)) }()
	<-entered
	f.engines.mu.Lock()
	f.engines.hold = nil
	f.engines.mu.Unlock()

	wantCode(t, stage(n, "v1", s1, blockCap(writer)), codes.Aborted)
	wantCode(t, unstage(n, "v1", s1), codes.Aborted)
	_, err := n.NodePublishVolume(ctx, publishReq("v1", s1, filepath.Join(root, "t1"), blockCap(writer), false))
	wantCode(t, err, codes.Aborted)
	wantCode(t, stage(n, "v2", s2, blockCap(writer)), codes.ResourceExhausted)

	close(release)
	wantCode(t, <-done, codes.OK)
	wantCode(t, stage(n, "v1", s1, blockCap(writer)), codes.OK)
}

// TestNodeMountCheckFails: a path whose mount state cannot be read is not
// taken for unmounted.
func TestNodeMountCheckFails(t *testing.T) {
	ctx := context.Background()
	n, f, root := newFakeNode(t, 0)
	staging, target := filepath.Join(root, "staging"), filepath.Join(root, "target")
	wantCode(t, stage(n, "v1", staging, mountCap(writer)), codes.OK)
	_, err := n.NodePublishVolume(ctx, publishReq("v1", staging, target, mountCap(writer), false))
	wantCode(t, err, codes.OK)

	f.mounter.MountCheckErrors = map[string]error{target: os.ErrPermission, staging: os.ErrPermission}
	_, err = n.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: "v1", TargetPath: target})
	wantCode(t, err, codes.Internal)
	wantCode(t, unstage(n, "v1", staging), codes.Internal)
	if _, ok := f.mounter.mountAt(target); !ok {
		t.Fatalf("the target was unmounted after all")
	}
	if f.engines.releases != 0 || len(f.devices.devices()) != 1 {
		t.Fatalf("unstage went on past the failed check: %d releases, devices %v", f.engines.releases, f.devices.devices())
	}
}
