package csi

import (
	"fmt"

	mount "k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/cairn-csi/cairn/driver/frontend/fuse"
)

// The Node service's seams to the host: mounting and block devices. Both
// need root and a real kernel, so the Node's RPC logic can be unit-tested
// only with them replaced. They are declared here with their real
// implementations; node.go still calls mount-utils and the fuse package's
// loop functions directly until the engine-registry work on it has landed.

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
		return fmt.Errorf("grow the file system on %s at %s: %w", dev, mountPath, err)
	}
	return nil
}
