//go:build linux

package fuse

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// The FUSE device, driven directly where go-fuse does not reach: Cairn
// opens /dev/fuse and mounts it itself, so that it holds the descriptor a
// holder process can keep alive across a restart of the agent
// (docs/restart.md), and writes the notifications itself, because a
// go-fuse server started on a connection that is already past INIT (a
// resumed one) believes the kernel supports none.

// Notification codes of the FUSE protocol (include/uapi/linux/fuse.h,
// enum fuse_notify_code).
const (
	notifyInvalInode = 2
	notifyInvalEntry = 3
	notifyResend     = 7 // Linux 6.9 and later
)

// outHeaderSize is the size of struct fuse_out_header.
const outHeaderSize = 16

// mountDevice opens /dev/fuse and mounts a FUSE file system of type
// fuse.cairn on dir (absolute) served through it. The kernel queues its
// INIT request at once; the caller's server answers it.
func mountDevice(dir string, maxWrite int) (*os.File, error) {
	dev, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/fuse (is the fuse module loaded and the device in this container?): %w: %w", ErrFUSEUnavailable, err)
	}
	// Fd puts the descriptor in blocking mode, which go-fuse's readers of
	// its duplicates (the same open file) need.
	opts := strings.Join([]string{
		fmt.Sprintf("fd=%d", dev.Fd()),
		"rootmode=40000", // a directory
		fmt.Sprintf("user_id=%d", os.Geteuid()),
		fmt.Sprintf("group_id=%d", os.Getegid()),
		fmt.Sprintf("max_read=%d", maxWrite),
		// Let processes of other users look at the files (diagnostics);
		// the loop driver itself needs no permission.
		"allow_other",
	}, ",")
	if err := unix.Mount(fsName, dir, "fuse."+fsName, unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		_ = dev.Close()
		if errors.Is(err, unix.ENODEV) {
			err = fmt.Errorf("%w: %w", ErrFUSEUnavailable, err)
		}
		return nil, fmt.Errorf("mount(2): %w", err)
	}
	return dev, nil
}

// writeNotify writes one notification: a fuse_out_header whose error
// field carries the code and whose unique is 0, then the payload. One
// write(2) is one message.
func writeNotify(dev *os.File, code int32, payload []byte) error {
	msg := make([]byte, outHeaderSize+len(payload))
	binary.LittleEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.LittleEndian.PutUint32(msg[4:], uint32(code))
	copy(msg[outHeaderSize:], payload)
	n, err := dev.Write(msg)
	if err == nil && n != len(msg) {
		err = fmt.Errorf("short write: %d of %d bytes", n, len(msg))
	}
	return err
}

// notifyInode drops the kernel's cached attributes of node ino (an offset
// below 0: attributes only; the files have no page cache).
func notifyInode(dev *os.File, ino uint64) error {
	var p [24]byte // struct fuse_notify_inval_inode_out
	binary.LittleEndian.PutUint64(p[0:], ino)
	off := int64(-1)
	binary.LittleEndian.PutUint64(p[8:], uint64(off))
	return writeNotify(dev, notifyInvalInode, p[:])
}

// notifyEntry drops the kernel's cached entry name in directory parent.
func notifyEntry(dev *os.File, parent uint64, name string) error {
	p := make([]byte, 16+len(name)+1) // struct fuse_notify_inval_entry_out, the name, NUL
	binary.LittleEndian.PutUint64(p[0:], parent)
	binary.LittleEndian.PutUint32(p[8:], uint32(len(name)))
	copy(p[16:], name)
	return writeNotify(dev, notifyInvalEntry, p)
}

// notifyResendAll asks the kernel to queue again every request that a
// server of this connection read and never answered (the dead agent's).
func notifyResendAll(dev *os.File) error {
	return writeNotify(dev, notifyResend, nil)
}

// connected reports whether dev's connection is alive: the kernel's poll
// of a FUSE device answers POLLERR once the connection is aborted or gone
// (unmounted), and for a device never mounted.
func connected(dev *os.File) bool {
	fds := []unix.PollFd{{Fd: int32(dev.Fd()), Events: unix.POLLIN}}
	for {
		_, err := unix.Poll(fds, 0)
		if err == unix.EINTR {
			continue
		}
		return err == nil && fds[0].Revents&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) == 0
	}
}
