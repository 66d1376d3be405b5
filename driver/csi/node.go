package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	mount "k8s.io/mount-utils"

	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/engine"
)

// NodeConfig configures the CSI Node service.
type NodeConfig struct {
	NodeID string
	Zone   string
	// MaxVolumes is how many volumes this node may stage (0: no limit).
	MaxVolumes int64
	// StateDir holds the FUSE mount that exposes staged volumes as files.
	StateDir string
	// AllowedRoots, if set, are the only directories staging and target
	// paths may lie under (kubelet's directory in production).
	AllowedRoots []string
	// Engines opens and closes the staged volumes' engines.
	Engines *attach.Registry
	// Mounter mounts, unmounts and formats; nil: the host's (newMounter).
	Mounter Mounter
	// Devices attaches and detaches loop devices; nil: the host's
	// (newLoopDevices).
	Devices BlockDevices
	// Holder is the unix socket of a descriptor holder (`cairn
	// fuse-holder`), "" for none. With one, the FUSE connection that
	// serves the staged volumes outlives this process: a restarted agent
	// takes the volumes over (Resume), and Close leaves them to it
	// instead of tearing them down (docs/restart.md).
	Holder string
	Logger *zap.Logger
}

// Node is the CSI Node service: stage = engine + FUSE file + loop device
// (+ filesystem), publish = bind mount.
type Node struct {
	csipb.UnimplementedNodeServer
	cfg     NodeConfig
	log     *zap.Logger
	mounter Mounter
	devices BlockDevices
	engines volumeEngines
	// mountFiles mounts the FUSE file system at a directory (fuse.Mount).
	mountFiles func(dir string) (fileServer, error)
	// holder keeps the FUSE descriptor for a successor; nil without one.
	holder *holder
	// stopRefill ends the loop that refills a restarted holder.
	stopRefill chan struct{}
	// locks orders the operations on one volume (and answers Aborted to a
	// second one at once); operations on different volumes run side by
	// side.
	locks *volumeLocks

	// fsMu serialises the one mount of the FUSE file system (fuseServer):
	// it exists for that mount, which every staging needs before it can go
	// on anyway.
	fsMu sync.Mutex
	fs   fileServer

	// mu guards staged and staging. It is held only to read or change
	// them, never across an engine's open or close, mkfs, a mount or I/O,
	// so that a volume slow to stage (a silent replica) holds up no other.
	mu      sync.Mutex
	staged  map[string]*stagedVolume
	staging int // stagings past the MaxVolumes check, not yet in staged
}

type stagedVolume struct {
	engine  volumeEngine
	fs      fileServer
	file    string // FUSE file name (the volume id)
	dev     string // loop device
	staging string
	block   bool
}

// NewNode returns the Node service.
func NewNode(cfg NodeConfig) *Node {
	var engines volumeEngines
	if cfg.Engines != nil {
		engines = registryEngines{cfg.Engines}
	}
	return newNode(cfg, engines, mountFUSE)
}

// newNode returns the Node service over the given engines and FUSE file
// system; NewNode gives the real ones, a unit test its fakes.
func newNode(cfg NodeConfig, engines volumeEngines, mountFiles func(log *zap.Logger, dir string) (fileServer, error)) *Node {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Mounter == nil {
		cfg.Mounter = newMounter()
	}
	if cfg.Devices == nil {
		cfg.Devices = newLoopDevices()
	}
	n := &Node{
		cfg: cfg, log: cfg.Logger.Named("csi-node").With(zap.String("node_id", cfg.NodeID)),
		mounter: cfg.Mounter, devices: cfg.Devices, engines: engines,
		locks: newVolumeLocks(), staged: map[string]*stagedVolume{},
	}
	n.mountFiles = func(dir string) (fileServer, error) { return mountFiles(n.log, dir) }
	if cfg.Holder != "" {
		n.holder = newHolder(cfg.Holder, n.log)
		n.stopRefill = make(chan struct{})
		go n.refillHolder()
	}
	return n
}

// refillHolder asks the holder every few seconds whether it is there, which
// gives a holder that was restarted (an upgrade) what it held before.
func (n *Node) refillHolder() {
	t := time.NewTicker(holderRefillInterval)
	defer t.Stop()
	for {
		select {
		case <-n.stopRefill:
			return
		case <-t.C:
			n.holder.reachable()
		}
	}
}

// holderRefillInterval is how often refillHolder asks.
const holderRefillInterval = 2 * time.Second

// Close unstages nothing (volumes stay staged for kubelet) but stops the
// engines. With a descriptor holder that answers, the FUSE mount is left
// to the next agent (handover): the requests being served are answered,
// later ones wait for it, and the engines are flushed and closed. Without
// one, the loop devices are detached and the FUSE file system unmounted:
// the volumes' file systems lose their device.
func (n *Node) Close() {
	n.mu.Lock()
	staged := make(map[string]*stagedVolume, len(n.staged))
	for id, s := range n.staged {
		staged[id] = s
	}
	n.mu.Unlock()
	if n.stopRefill != nil {
		close(n.stopRefill)
		n.stopRefill = nil
	}
	n.fsMu.Lock()
	defer n.fsMu.Unlock()
	if h, ok := n.fs.(handover); ok && n.holder != nil && n.holder.reachable() {
		h.Leave(10 * time.Second)
		for id, s := range staged {
			err := n.release(s.engine)
			n.log.Info("node plugin stopping: volume left staged for the next agent", zap.String("volume_id", id), zap.String("device", s.dev), zap.Error(err))
		}
		n.holder.close()
		return
	}
	if n.holder != nil && len(staged) > 0 {
		n.log.Warn("the descriptor holder does not answer: the staged volumes lose their device", zap.String("holder", n.cfg.Holder))
	}
	for id, s := range staged {
		_ = n.release(s.engine)
		n.log.Warn("node plugin stopping with a staged volume", zap.String("volume_id", id), zap.String("device", s.dev))
	}
	if n.fs != nil {
		for _, s := range staged {
			_ = n.devices.Detach(s.dev)
		}
		_ = n.fs.Unmount()
	}
	if n.holder != nil {
		_ = n.holder.drop(holdFUSE)
		n.holder.close()
	}
}

// release flushes and closes e outside any request: a shutdown's, or an
// undone staging's, bounded by 10 s.
func (n *Node) release(e volumeEngine) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return n.engines.Release(ctx, e)
}

// NodeGetInfo names the node and its zone; the node's own topology segment
// is what lets dataLocality find the pod's node (see preferredNode).
func (n *Node) NodeGetInfo(context.Context, *csipb.NodeGetInfoRequest) (*csipb.NodeGetInfoResponse, error) {
	return &csipb.NodeGetInfoResponse{NodeId: n.cfg.NodeID, MaxVolumesPerNode: n.cfg.MaxVolumes,
		AccessibleTopology: &csipb.Topology{Segments: map[string]string{TopologyZoneKey: zoneLabel(n.cfg.Zone), TopologyNodeKey: n.cfg.NodeID}}}, nil
}

// NodeGetCapabilities lists the node's RPCs.
func (n *Node) NodeGetCapabilities(context.Context, *csipb.NodeGetCapabilitiesRequest) (*csipb.NodeGetCapabilitiesResponse, error) {
	var caps []*csipb.NodeServiceCapability
	for _, t := range []csipb.NodeServiceCapability_RPC_Type{
		csipb.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csipb.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csipb.NodeServiceCapability_RPC_EXPAND_VOLUME,
	} {
		caps = append(caps, &csipb.NodeServiceCapability{Type: &csipb.NodeServiceCapability_Rpc{Rpc: &csipb.NodeServiceCapability_RPC{Type: t}}})
	}
	return &csipb.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

// checkPath refuses relative paths and paths outside the allowed roots.
func (n *Node) checkPath(what, p string) error { return checkPathUnder(n.cfg.AllowedRoots, what, p) }

// checkPathUnder refuses an empty or relative path p, and one outside roots
// when roots are given; what names p in the message.
func checkPathUnder(roots []string, what, p string) error {
	if p == "" {
		return failf(errInvalid, "%s is required", what)
	}
	if !filepath.IsAbs(p) {
		return failf(errInvalid, "%s %q is not an absolute path", what, p)
	}
	clean := filepath.Clean(p)
	if len(roots) == 0 {
		return nil
	}
	for _, root := range roots {
		root = filepath.Clean(root)
		if clean == root || strings.HasPrefix(clean, root+string(filepath.Separator)) {
			return nil
		}
	}
	return failf(errInvalid, "%s %q is outside the allowed roots %v", what, p, roots)
}

// fuseServer mounts the FUSE file system on first use.
func (n *Node) fuseServer() (fileServer, error) {
	n.fsMu.Lock()
	defer n.fsMu.Unlock()
	if n.fs != nil {
		return n.fs, nil
	}
	dir := filepath.Join(n.cfg.StateDir, "fuse")
	// A FUSE mount left by a crashed node agent must go before a new one.
	// First: MkdirAll on it fails (its stat answers ENOTCONN, its mkdir
	// EEXIST), so a restarted agent could stage nothing.
	if err := os.MkdirAll(filepath.Dir(dir), 0o750); err != nil {
		return nil, err
	}
	_ = mount.CleanupMountPoint(dir, n.mounter, true)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, err
	}
	fs, err := n.mountFiles(dir)
	if err != nil {
		return nil, fmt.Errorf("mount FUSE at %s: %w", dir, err)
	}
	n.fs = fs
	if h, ok := fs.(handover); ok && n.holder != nil {
		if err := n.holder.put(holdFUSE, h.Device(), holdMount{Dir: h.Dir()}); err != nil {
			n.log.Warn("the descriptor holder did not take the FUSE descriptor: the volumes staged here will not survive a restart of this agent",
				zap.String("holder", n.cfg.Holder), zap.Error(err))
		}
	}
	return fs, nil
}

// holdStaged records a staged volume in the descriptor holder, so that a
// successor takes it over.
func (n *Node) holdStaged(id string, s *stagedVolume, passphrase string) {
	h, ok := s.fs.(handover)
	if !ok || n.holder == nil {
		return
	}
	if err := n.holder.put(holdVolumePrefix+id, h.Device(), holdVolume{Staging: s.staging, Block: s.block, Passphrase: passphrase}); err != nil {
		n.log.Warn("the descriptor holder did not record the staged volume: it will not survive a restart of this agent",
			zap.String("volume_id", id), zap.String("holder", n.cfg.Holder), zap.Error(err))
	}
}

// NodeStageVolume starts the engine, exposes the volume as a loop device,
// formats it when blank (never when it holds data) and mounts it.
func (n *Node) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	if err := n.checkPath("staging target path", staging); err != nil {
		return nil, toStatus(err)
	}
	vc := req.GetVolumeCapability()
	if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
		return nil, toStatus(err)
	}
	unlock, err := n.locks.lock(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	n.mu.Lock()
	if s, ok := n.staged[id]; ok {
		n.mu.Unlock()
		if s.staging != staging {
			return nil, toStatus(failf(errWrongOrder, "volume %s is staged at %s, not %s", id, s.staging, staging))
		}
		return &csipb.NodeStageVolumeResponse{}, nil
	}
	// Stagings still running count: they were let past this check.
	if busy := int64(len(n.staged) + n.staging); n.cfg.MaxVolumes > 0 && busy >= n.cfg.MaxVolumes {
		n.mu.Unlock()
		return nil, toStatus(failf(errNoRoom, "node %s already has %d volumes staged", n.cfg.NodeID, busy))
	}
	n.staging++
	n.mu.Unlock()
	s, err := n.stage(ctx, id, staging, vc, req.GetSecrets())
	n.mu.Lock()
	n.staging--
	if err == nil {
		n.staged[id] = s
	}
	n.mu.Unlock()
	if err != nil {
		return nil, err
	}
	n.holdStaged(id, s, req.GetSecrets()[crypt.SecretKey])
	n.log.Info("volume staged", zap.String("volume_id", id), zap.String("device", s.dev), zap.String("staging", staging),
		zap.Bool("block", s.block), zap.Uint64("epoch", s.engine.Epoch()))
	return &csipb.NodeStageVolumeResponse{}, nil
}

// stage opens the engine of volume id, exposes it as a loop device and,
// for a mount volume, formats it when blank and mounts it at staging. On
// failure it undoes what it did. Called with id's lock held, and no other.
func (n *Node) stage(ctx context.Context, id, staging string, vc *csipb.VolumeCapability, secrets map[string]string) (*stagedVolume, error) {
	var passphrase []byte
	if p := secrets[crypt.SecretKey]; p != "" {
		passphrase = []byte(p)
	}
	e, err := n.engines.Open(ctx, id, passphrase)
	if errors.Is(err, engine.ErrNeedsKey) || errors.Is(err, crypt.ErrWrongKey) {
		// Nothing was claimed or written.
		return nil, toStatus(failf(errInvalid, "%v: the Secret that the StorageClass's %snode-stage-secret-name and -namespace name must hold the volume's passphrase under the key %s",
			err, "csi.storage.k8s.io/", crypt.SecretKey))
	}
	if err != nil {
		return nil, toStatus(err)
	}
	s := &stagedVolume{engine: e, file: id, staging: staging, block: vc.GetBlock() != nil}
	undo := func() {
		if s.dev != "" {
			_ = n.devices.Detach(s.dev)
		}
		if s.fs != nil {
			_ = s.fs.Remove(s.file)
		}
		_ = n.release(e)
	}
	fs, err := n.fuseServer()
	if err != nil {
		undo()
		return nil, toStatus(err)
	}
	path, err := fs.Add(s.file, e)
	if err != nil {
		undo()
		return nil, toStatus(fmt.Errorf("expose volume %s: %v", id, err))
	}
	s.fs = fs
	if s.dev, err = n.devices.Attach(path); err != nil {
		undo()
		return nil, toStatus(fmt.Errorf("attach a loop device to %s: %v", path, err))
	}
	if !s.block {
		fsType := vc.GetMount().GetFsType()
		if fsType == "" {
			fsType = "ext4"
		}
		if err := os.MkdirAll(staging, 0o750); err != nil {
			undo()
			return nil, toStatus(fmt.Errorf("create %s: %v", staging, err))
		}
		// A restore or clone into a larger size: grow its file system
		// (fsgrow.go); ext4 before mounting it.
		grow := smallerFS(s.dev)
		if grow == "ext4" {
			if err := growExt4Offline(s.dev); err != nil {
				undo()
				return nil, toStatus(fmt.Errorf("volume %s: %w", id, err))
			}
			n.log.Info("file system grown to fill its larger volume", zap.String("volume_id", id), zap.String("device", s.dev), zap.String("fs_type", grow))
		}
		flags := vc.GetMount().GetMountFlags()
		if fsType == "xfs" {
			// A restore or clone holds its source's xfs UUID, which xfs
			// refuses to mount twice on one node without this.
			flags = append(slices.Clone(flags), "nouuid")
		}
		// FormatAndMount formats only a device without a filesystem.
		if err := n.mounter.FormatAndMount(s.dev, staging, fsType, flags); err != nil {
			undo()
			return nil, toStatus(fmt.Errorf("format and mount %s (%s) at %s: %v", s.dev, fsType, staging, err))
		}
		if grow == "xfs" {
			if err := n.devices.Resize(s.dev, staging); err != nil {
				_ = n.mounter.Unmount(staging) // undone as a whole; the error says why
				undo()
				return nil, toStatus(fmt.Errorf("volume %s: %w", id, err))
			}
			n.log.Info("file system grown to fill its larger volume", zap.String("volume_id", id), zap.String("device", s.dev), zap.String("fs_type", grow))
		}
	}
	return s, nil
}

// NodeUnstageVolume unmounts, detaches the loop device, flushes and stops
// the engine. A volume not staged (or staged before a crash of the node
// plugin) is cleaned up as far as anything is left, and is success.
func (n *Node) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	unlock, err := n.locks.lockVolume(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	if err := n.checkPath("staging target path", staging); err != nil {
		return nil, toStatus(err)
	}
	if err := unmountIfMounted(n.mounter, staging); err != nil {
		return nil, toStatus(fmt.Errorf("unmount %s: %v", staging, err))
	}
	s, ok := n.lookupStaged(id)
	if !ok {
		// Left over from before a restart: a loop device on the old FUSE file.
		if dev, found := n.devices.Find(filepath.Join(n.cfg.StateDir, "fuse", id)); found {
			_ = n.devices.Detach(dev)
		}
		return &csipb.NodeUnstageVolumeResponse{}, nil
	}
	// A retry after ErrBusy below goes on where this call stopped.
	if s.dev != "" {
		if err := n.devices.Detach(s.dev); err != nil {
			return nil, toStatus(fmt.Errorf("detach %s: %v", s.dev, err))
		}
		s.dev = ""
	}
	if s.fs != nil {
		if err := s.fs.Remove(s.file); err != nil {
			n.log.Warn("remove FUSE file", zap.String("volume_id", id), zap.Error(err))
		}
		s.fs = nil
	}
	if err := n.engines.Release(ctx, s.engine); errors.Is(err, attach.ErrBusy) {
		return nil, toStatus(fmt.Errorf("close the engine of %s: %w", id, err))
	} else if err != nil {
		n.log.Warn("engine did not close cleanly", zap.String("volume_id", id), zap.Error(err))
	}
	n.mu.Lock()
	delete(n.staged, id)
	n.mu.Unlock()
	if n.holder != nil {
		if err := n.holder.drop(holdVolumePrefix + id); err != nil {
			n.log.Warn("the descriptor holder did not forget the unstaged volume", zap.String("volume_id", id), zap.Error(err))
		}
	}
	n.log.Info("volume unstaged", zap.String("volume_id", id))
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

func unmountIfMounted(m mount.Interface, path string) error {
	notMnt, err := m.IsLikelyNotMountPoint(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil && !mount.IsCorruptedMnt(err) {
		return err
	}
	if err == nil && notMnt {
		return nil
	}
	return m.Unmount(path)
}

// NodePublishVolume bind-mounts the staged filesystem (or the device file,
// for a raw block volume) at the target path.
func (n *Node) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	id, target, staging := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	if err := n.checkPath("target path", target); err != nil {
		return nil, toStatus(err)
	}
	if err := n.checkPath("staging target path", staging); err != nil {
		return nil, toStatus(err)
	}
	vc := req.GetVolumeCapability()
	if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
		return nil, toStatus(err)
	}
	unlock, err := n.locks.lock(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	s, ok := n.lookupStaged(id)
	if !ok {
		return nil, toStatus(failf(errWrongOrder, "volume %s is not staged on %s", id, n.cfg.NodeID))
	}
	if s.block != (vc.GetBlock() != nil) {
		return nil, toStatus(failf(errInvalid, "volume %s was staged as %s, published as the other", id, map[bool]string{true: "block", false: "mount"}[s.block]))
	}
	opts := []string{"bind"}
	if req.GetReadonly() {
		opts = append(opts, "ro")
	}
	source := staging
	if s.block {
		source = s.dev
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return nil, toStatus(err)
		}
		f, err := os.OpenFile(target, os.O_CREATE, 0o640)
		if err != nil {
			return nil, toStatus(fmt.Errorf("create %s: %v", target, err))
		}
		if err := f.Close(); err != nil {
			return nil, toStatus(err)
		}
	} else {
		if err := os.MkdirAll(target, 0o750); err != nil {
			return nil, toStatus(fmt.Errorf("create %s: %v", target, err))
		}
		opts = append(opts, vc.GetMount().GetMountFlags()...)
	}
	notMnt, err := n.mounter.IsLikelyNotMountPoint(target)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, toStatus(fmt.Errorf("check %s: %v", target, err))
	}
	if err == nil && !notMnt {
		return &csipb.NodePublishVolumeResponse{}, nil // already published
	}
	if err := n.mounter.Mount(source, target, "", opts); err != nil {
		return nil, toStatus(fmt.Errorf("bind mount %s at %s: %v", source, target, err))
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

// NodeUnpublishVolume unmounts the target path and removes it; a target
// already gone is success.
func (n *Node) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	unlock, err := n.locks.lockVolume(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	if err := n.checkPath("target path", target); err != nil {
		return nil, toStatus(err)
	}
	if err := mount.CleanupMountPoint(target, n.mounter, true); err != nil {
		return nil, toStatus(fmt.Errorf("unmount %s: %v", target, err))
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats reports bytes and inodes of a mounted volume, the size
// of a block one.
func (n *Node) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	id, p := req.GetVolumeId(), req.GetVolumePath()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	if p == "" {
		return nil, toStatus(failf(errInvalid, "volume path is required"))
	}
	fi, err := os.Stat(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, toStatus(failf(errNotFound, "volume path %s does not exist", p))
	}
	if err != nil {
		return nil, toStatus(err)
	}
	s, staged := n.lookupStaged(id)
	if !staged {
		return nil, toStatus(failf(errNotFound, "volume %s is not staged on %s", id, n.cfg.NodeID))
	}
	if fi.Mode()&os.ModeDevice != 0 || s.block {
		return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{{Unit: csipb.VolumeUsage_BYTES, Total: int64(s.engine.Size())}}}, nil
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(p, &st); err != nil {
		return nil, toStatus(fmt.Errorf("statfs %s: %v", p, err))
	}
	bs := int64(st.Bsize)
	return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: int64(st.Blocks) * bs, Available: int64(st.Bavail) * bs, Used: int64(st.Blocks-st.Bfree) * bs},
		{Unit: csipb.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}}, nil
}

// lookupStaged returns the record of volume id's staging on this node.
func (n *Node) lookupStaged(id string) (*stagedVolume, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	s, ok := n.staged[id]
	return s, ok
}

// NodeExpandVolume grows a staged volume on this node after the store
// recorded its new size (ControllerExpandVolume), while it is mounted and
// in use: the engine grows the replicas and its own size, the FUSE file
// takes that size, the loop device takes the file's (LOOP_SET_CAPACITY),
// and the file system mounted at the staging path grows to fill it
// (resize2fs, xfs_growfs). A raw block volume stops after the loop
// device. Every step does nothing when already done, so a retry finishes
// an interrupted expansion. The request names only the volume and a path;
// the device comes from this node's own record of the staging.
func (n *Node) NodeExpandVolume(ctx context.Context, req *csipb.NodeExpandVolumeRequest) (*csipb.NodeExpandVolumeResponse, error) {
	id, p := req.GetVolumeId(), req.GetVolumePath()
	if id == "" {
		return nil, toStatus(failf(errInvalid, "volume id is required"))
	}
	if p == "" {
		return nil, toStatus(failf(errInvalid, "volume path is required"))
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		if err := checkCapabilities([]*csipb.VolumeCapability{vc}); err != nil {
			return nil, toStatus(err)
		}
	}
	unlock, err := n.locks.lock(id)
	if err != nil {
		return nil, toStatus(err)
	}
	defer unlock()
	s, ok := n.lookupStaged(id)
	if !ok {
		return nil, toStatus(failf(errNotFound, "volume %s is not staged on %s", id, n.cfg.NodeID))
	}
	if err := n.checkPath("volume path", p); err != nil {
		return nil, toStatus(err)
	}
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		return nil, toStatus(failf(errNotFound, "volume path %s does not exist", p))
	}
	before := s.engine.Size()
	size, err := s.engine.Expand(ctx)
	if err != nil {
		return nil, toStatus(fmt.Errorf("grow the replicas of %s: %w", id, err))
	}
	if r := req.GetCapacityRange(); r != nil {
		if req, lim := r.GetRequiredBytes(), r.GetLimitBytes(); req > 0 && uint64(req) > size || lim > 0 && uint64(lim) < size {
			return nil, toStatus(failf(errOutOfRange, "volume %s is %d bytes, outside the range [%d, %d] asked for: expand it through the controller first",
				id, size, req, lim))
		}
	}
	if _, err := s.fs.Resize(s.file); err != nil {
		return nil, toStatus(fmt.Errorf("grow the file of %s: %w", id, err))
	}
	mountPath := s.staging
	if s.block {
		mountPath = ""
	}
	if err := n.devices.Resize(s.dev, mountPath); err != nil {
		return nil, toStatus(fmt.Errorf("grow %s of volume %s: %w", s.dev, id, err))
	}
	n.log.Info("volume expanded on the node", zap.String("volume_id", id), zap.String("device", s.dev), zap.Bool("block", s.block),
		zap.Uint64("previous_size", before), zap.Uint64("size", size), zap.Uint64("epoch", s.engine.Epoch()))
	return &csipb.NodeExpandVolumeResponse{CapacityBytes: int64(size)}, nil
}
