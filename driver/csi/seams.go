package csi

import (
	"context"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/cairn-csi/cairn/driver/frontend"
	"github.com/cairn-csi/cairn/driver/frontend/fuse"
	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
)

// The Node service's seams: mounting, block devices, the FUSE file system
// and the node's engine registry. The first three need root and a real
// kernel, the last a volume store and replicas, so the Node's RPC logic can
// be unit-tested only with them replaced (node_test.go). They are declared
// here with their real implementations.

// Mounter is what the Node service needs of mounting: mount-utils'
// mount.Interface (mount, unmount, mount-point checks; also what
// mount.CleanupMountPoint takes) and formatting a blank device at its first
// mount. A test gives mount.NewFakeMounter inside a mount.SafeFormatAndMount
// with a fake exec, or a fake of its own.
type Mounter interface {
	mount.Interface
	// FormatAndMount mounts source at target, first formatting it with
	// fsType if it holds no file system (never when it holds data).
	FormatAndMount(source, target, fsType string, options []string) error
}

var _ Mounter = (*mount.SafeFormatAndMount)(nil)

// newMounter returns the host's mounter: mount(8) and the mkfs and fsck
// tools found on the PATH.
func newMounter() Mounter {
	return &mount.SafeFormatAndMount{Interface: mount.New(""), Exec: utilexec.New()}
}

// BlockDevices turns a staged volume's FUSE file into a block device, and
// grows it after the volume grew.
type BlockDevices interface {
	// Attach attaches a loop device to the file at path and returns its
	// name, /dev/loopN.
	Attach(path string) (dev string, err error)
	// Detach detaches dev; a device with nothing attached is not an error.
	Detach(dev string) error
	// Find returns the loop device attached to the file at path, if any
	// (a volume staged before the node plugin restarted).
	Find(path string) (dev string, found bool)
	// Resize makes dev take its file's current size, then grows the file
	// system mounted from dev at mountPath to fill it ("" for a raw block
	// volume: nothing to grow).
	Resize(dev, mountPath string) error
}

// loopDevices is BlockDevices over the fuse package's loop devices, with
// mount-utils' ResizeFs growing the file system (resize2fs, xfs_growfs).
type loopDevices struct {
	fs *mount.ResizeFs
}

var _ BlockDevices = loopDevices{}

func newLoopDevices() BlockDevices {
	return loopDevices{fs: mount.NewResizeFs(utilexec.New())}
}

func (loopDevices) Attach(path string) (string, error) { return fuse.AttachLoop(path) }
func (loopDevices) Detach(dev string) error            { return fuse.DetachLoop(dev) }
func (loopDevices) Find(path string) (string, bool)    { return fuse.FindLoop(path) }

func (l loopDevices) Resize(dev, mountPath string) error {
	if err := fuse.RefreshLoopSize(dev); err != nil {
		return err
	}
	if mountPath == "" {
		return nil
	}
	if _, err := l.fs.Resize(dev, mountPath); err != nil {
		if !haveCapability(unix.CAP_SYS_RESOURCE) {
			// ext4 refuses to grow while mounted (EPERM) to a process
			// without it, whatever its uid; resize2fs only says
			// "Permission denied". Say what is missing.
			return fmt.Errorf("grow the file system on %s at %s: %w (the node agent lacks CAP_SYS_RESOURCE, which growing a mounted ext4 needs)", dev, mountPath, err)
		}
		return fmt.Errorf("grow the file system on %s at %s: %w", dev, mountPath, err)
	}
	return nil
}

// haveCapability reports whether this process has capability c in its
// effective set (false when it cannot tell).
func haveCapability(c int) bool {
	var data [2]unix.CapUserData
	if err := unix.Capget(&unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}, &data[0]); err != nil {
		return false
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

// volumeEngine is what the Node needs of a staged volume's engine: the
// blocks the FUSE file serves, the epoch it opened at (for the log), and
// growing to the size the store records (NodeExpandVolume).
type volumeEngine interface {
	frontend.Backend
	Epoch() uint64
	// Expand grows the replicas and then the engine to the volume's size
	// in the store, and returns the engine's size.
	Expand(ctx context.Context) (uint64, error)
}

var _ volumeEngine = (*engine.Engine)(nil)

// volumeEngines is what the Node needs of the node's engine registry
// (attach.Registry): open a volume's engine, and flush and close it.
type volumeEngines interface {
	// Open's passphrase unwraps an encrypted volume's data key (nil for
	// none; a plain volume ignores it).
	Open(ctx context.Context, id string, passphrase []byte) (volumeEngine, error)
	// Takeover is Open at a new epoch, of a volume whose engine on this
	// node died with an earlier agent (Node.Resume).
	Takeover(ctx context.Context, id string, passphrase []byte) (volumeEngine, error)
	// Release returns attach.ErrBusy when the volume's turn did not come
	// before ctx ended: e then stays open.
	Release(ctx context.Context, e volumeEngine) error
}

// registryEngines is volumeEngines over an attach.Registry.
type registryEngines struct{ r *attach.Registry }

func (r registryEngines) Open(ctx context.Context, id string, passphrase []byte) (volumeEngine, error) {
	e, err := r.r.OpenWith(ctx, id, passphrase)
	if err != nil {
		return nil, err // not a nil *engine.Engine in a non-nil interface
	}
	return e, nil
}

func (r registryEngines) Takeover(ctx context.Context, id string, passphrase []byte) (volumeEngine, error) {
	e, err := r.r.Takeover(ctx, id, passphrase)
	if err != nil {
		return nil, err
	}
	return e, nil
}

func (r registryEngines) Release(ctx context.Context, e volumeEngine) error {
	ee, ok := e.(*engine.Engine)
	if !ok {
		panic(fmt.Sprintf("BUG: releasing a %T, not an engine the registry opened", e))
	}
	return r.r.Release(ctx, ee)
}

// fileServer is what the Node needs of the FUSE file system that exposes
// staged volumes as files (fuse.Server).
type fileServer interface {
	// Add serves b as the file name and returns its path.
	Add(name string, b frontend.Backend) (string, error)
	// Resize gives the file its backend's current size (the volume grew),
	// as the kernel sees it once it returns; it returns that size.
	Resize(name string) (uint64, error)
	Remove(name string) error
	Unmount() error
}

var _ fileServer = (*fuse.Server)(nil)

// mountFUSE mounts the FUSE file system at dir.
func mountFUSE(log *zap.Logger, dir string) (fileServer, error) {
	fs, err := fuse.Mount(log, dir)
	if err != nil {
		return nil, err // not a nil *fuse.Server in a non-nil interface
	}
	return fs, nil
}

// handover is what a fileServer that can outlive this process offers
// (fuse.Server): its FUSE descriptor for a holder to keep, its mount
// point, and Leave, which stops serving without unmounting.
type handover interface {
	Device() *os.File
	Dir() string
	Leave(wait time.Duration) bool
}

var _ handover = (*fuse.Server)(nil)

// resumeFUSE takes over the FUSE mount at dir through dev, serving files
// (fuse.Resume).
func resumeFUSE(log *zap.Logger, dir string, dev *os.File, files map[string]frontend.Backend) (fileServer, error) {
	fs, err := fuse.Resume(log, dir, dev, files)
	if err != nil {
		return nil, err
	}
	return fs, nil
}
