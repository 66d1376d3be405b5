package csi

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"

	"golang.org/x/sys/unix"
)

// A volume restored from a snapshot, or cloned, into a larger size holds a
// file system of the source's size on a larger device. NodeStage grows it
// to fill the device (docs/snapshots.md): ext4 before it is mounted
// (e2fsck, then resize2fs; growing a mounted ext4 needs CAP_SYS_RESOURCE,
// growing an unmounted one does not), xfs once mounted (xfs_growfs works
// only on a mounted xfs).

// fsOnDevice reads the superblock of the file system on dev: its type
// ("ext4", "xfs", or "" for none this knows) and its size in bytes.
func fsOnDevice(dev string) (fsType string, size uint64, err error) {
	f, err := os.Open(dev)
	if err != nil {
		return "", 0, err
	}
	defer f.Close() // read-only
	sb := make([]byte, 4096)
	if _, err := f.ReadAt(sb, 0); err != nil {
		return "", 0, fmt.Errorf("read the superblock of %s: %w", dev, err)
	}
	if string(sb[0:4]) == "XFSB" { // xfs: big-endian sb_blocksize, sb_dblocks
		return "xfs", uint64(binary.BigEndian.Uint32(sb[4:])) * binary.BigEndian.Uint64(sb[8:]), nil
	}
	ext := sb[1024:2048] // ext2/3/4: the superblock is at 1 KiB, little-endian
	if binary.LittleEndian.Uint16(ext[0x38:]) == 0xEF53 {
		blocks := uint64(binary.LittleEndian.Uint32(ext[0x4:]))
		const incompat64bit = 0x80
		if binary.LittleEndian.Uint32(ext[0x60:])&incompat64bit != 0 {
			blocks |= uint64(binary.LittleEndian.Uint32(ext[0x150:])) << 32
		}
		return "ext4", blocks * (1024 << binary.LittleEndian.Uint32(ext[0x18:])), nil
	}
	return "", 0, nil
}

// deviceBytes is the size of the block device dev.
func deviceBytes(dev string) (uint64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close() // read-only
	n, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	return uint64(n), nil
}

// smallerFS reports the type of the file system on dev if it is smaller
// than dev by more than a MiB (what mkfs leaves over is less), else "".
// A device it cannot read is not grown (staging says more about it).
func smallerFS(dev string) string {
	fsType, size, err := fsOnDevice(dev)
	if err != nil || fsType == "" {
		return ""
	}
	dsize, err := deviceBytes(dev)
	if err != nil || dsize <= size+(1<<20) {
		return ""
	}
	return fsType
}

// growExt4Offline grows the unmounted ext4 on dev to fill it: e2fsck
// first (resize2fs insists, and it replays the journal of a crash-
// consistent snapshot), then resize2fs.
func growExt4Offline(dev string) error {
	out, err := exec.Command("e2fsck", "-f", "-p", dev).CombinedOutput()
	var exit *exec.ExitError
	// Exit status 1: errors were corrected; that is what -p is for.
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 1) {
		return fmt.Errorf("e2fsck %s before growing it: %v: %s", dev, err, out)
	}
	if out, err := exec.Command("resize2fs", dev).CombinedOutput(); err != nil {
		return fmt.Errorf("resize2fs %s: %v: %s", dev, err, out)
	}
	return nil
}
