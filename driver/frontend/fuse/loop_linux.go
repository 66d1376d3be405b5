package fuse

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// loopAttachTries bounds the retries when another process takes the
	// free loop device between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
	loopAttachTries = 16
	// detachWait bounds how long DetachLoop waits for the kernel to tear
	// the device down (it drains in-flight requests first).
	detachWait = 3 * time.Second
)

// AttachLoop attaches a free loop device to the file at path with direct I/O
// (LOOP_CONFIGURE with LO_FLAGS_DIRECT_IO), discard enabled (the loop driver
// enables it for a file that supports fallocate), no autoclear and no
// partition scan, and returns its name, /dev/loopN. The logical block size
// is 4096 when the file's size is a multiple of it, else 512. It fails if the
// kernel would not use direct I/O or discard, rather than serve the volume
// through the page cache. It needs Linux 5.8 or later (LOOP_CONFIGURE).
func AttachLoop(path string) (string, error) {
	abs := canonicalPath(path)
	f, err := os.OpenFile(abs, os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("attach loop to %s: %w", abs, err)
	}
	// Only read from: the loop driver takes its own reference.
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("attach loop to %s: %w", abs, err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("attach loop to %s: not a regular file", abs)
	}
	blockSize := uint32(512)
	if fi.Size()%4096 == 0 {
		blockSize = 4096
	}

	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return "", fmt.Errorf("attach loop to %s: open /dev/loop-control (is the loop module loaded?): %w", abs, err)
	}
	defer func() { _ = ctl.Close() }()

	for range loopAttachTries {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return "", fmt.Errorf("attach loop to %s: LOOP_CTL_GET_FREE: %w", abs, err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		dev, retry, err := configureLoop(dev, f, abs, blockSize)
		if retry {
			continue
		}
		return dev, err
	}
	return "", fmt.Errorf("attach loop to %s: every free loop device was taken by someone else %d times: %w", abs, loopAttachTries, ErrBusy)
}

// configureLoop binds dev to f; retry reports that someone else took dev.
func configureLoop(dev string, f *os.File, abs string, blockSize uint32) (_ string, retry bool, _ error) {
	lf, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return "", false, fmt.Errorf("attach loop to %s: open %s: %w", abs, dev, err)
	}
	// A block device descriptor: closing it writes nothing back.
	defer func() { _ = lf.Close() }()
	fd := int(lf.Fd())
	cfg := unix.LoopConfig{
		Fd:   uint32(f.Fd()),
		Size: blockSize,
		Info: unix.LoopInfo64{Flags: unix.LO_FLAGS_DIRECT_IO},
	}
	copy(cfg.Info.File_name[:unix.LO_NAME_SIZE-1], abs)
	if err := unix.IoctlLoopConfigure(fd, &cfg); err != nil {
		if errors.Is(err, unix.EBUSY) {
			return "", true, nil
		}
		if errors.Is(err, unix.ENOTTY) {
			err = fmt.Errorf("%w (LOOP_CONFIGURE needs Linux 5.8 or later)", err)
		}
		return "", false, fmt.Errorf("attach loop to %s: LOOP_CONFIGURE %s: %w", abs, dev, err)
	}
	// From here on the device is ours: undo on failure.
	fail := func(err error) (string, bool, error) {
		if cerr := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); cerr != nil {
			err = errors.Join(err, fmt.Errorf("detach %s: %w", dev, cerr))
		}
		return "", false, fmt.Errorf("attach loop to %s: %s: %w", abs, dev, err)
	}
	// The kernel silently drops LO_FLAGS_DIRECT_IO it cannot honour; asking
	// again with LOOP_SET_DIRECT_IO gets the reason.
	st, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil {
		return fail(fmt.Errorf("LOOP_GET_STATUS64: %w", err))
	}
	if st.Flags&unix.LO_FLAGS_DIRECT_IO == 0 {
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_DIRECT_IO, 1); err != nil {
			return fail(fmt.Errorf("backing file does not support direct I/O: LOOP_SET_DIRECT_IO: %w", err))
		}
	}
	name := filepath.Base(dev)
	if v, err := readSysUint(filepath.Join("/sys/block", name, "queue", "discard_max_bytes")); err != nil {
		return fail(err)
	} else if v == 0 {
		return fail(errors.New("the loop driver did not enable discard (backing file system lacks fallocate or statfs)"))
	}
	return dev, false, nil
}

// DetachLoop detaches the loop device dev (LOOP_CLR_FD) and waits for the
// kernel to tear it down. A device with nothing attached is not an error. It
// fails with ErrBusy, leaving the device alone, while a file system is
// mounted on it (or something else holds it exclusively); if a process has it
// open, the kernel detaches it at that process's last close, and DetachLoop
// reports ErrBusy after waiting a little.
func DetachLoop(dev string) error {
	name := filepath.Base(dev)
	if _, ok := loopNumber(name); !ok {
		return fmt.Errorf("detach %s: not a loop device name", dev)
	}
	// O_EXCL on a block device fails with EBUSY while it is mounted or
	// claimed, which keeps a mounted file system from losing its device.
	lf, err := os.OpenFile(dev, os.O_RDWR|unix.O_EXCL, 0)
	if err != nil {
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("detach %s: mounted or held by another device: %w", dev, ErrBusy)
		}
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	err = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_CLR_FD, 0)
	// A block device descriptor: closing it writes nothing back. The
	// close matters: the kernel tears the device down at the last close.
	_ = lf.Close()
	if errors.Is(err, unix.ENXIO) {
		return nil // nothing attached
	}
	if err != nil {
		return fmt.Errorf("detach %s: LOOP_CLR_FD: %w", dev, err)
	}
	deadline := time.Now().Add(detachWait)
	for {
		if _, attached := backingFile(name); !attached {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("detach %s: still open elsewhere; the kernel detaches it at the last close: %w", dev, ErrBusy)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// RefreshLoopSize makes the loop device dev take the current size of its
// backing file (LOOP_SET_CAPACITY): the loop driver reads the size only when
// attached, so a volume that grew stays at its old size on dev until then.
// A file system on dev is grown separately, afterwards.
func RefreshLoopSize(dev string) error {
	if _, ok := loopNumber(filepath.Base(dev)); !ok {
		return fmt.Errorf("resize %s: not a loop device name", dev)
	}
	lf, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("resize %s: %w", dev, err)
	}
	err = unix.IoctlSetInt(int(lf.Fd()), unix.LOOP_SET_CAPACITY, 0)
	// A block device descriptor used for an ioctl: closing it writes nothing back.
	_ = lf.Close()
	if err != nil {
		return fmt.Errorf("resize %s: LOOP_SET_CAPACITY: %w", dev, err)
	}
	return nil
}

// claimed reports whether dev is mounted or held exclusively (by a file
// system, device mapper …): an O_EXCL open of a block device fails with
// EBUSY then.
func claimed(dev string) bool {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_EXCL, 0)
	if err != nil {
		return errors.Is(err, unix.EBUSY)
	}
	_ = f.Close() // opened read-only
	return false
}

// FindLoop returns the loop device attached to the file at path, for
// idempotent staging after a crash and for an agent that took a FUSE mount
// over from an earlier one. It matches the backing file's path as the kernel
// reports it (/sys/block/loop*/loop/backing_file) or, failing that, its
// device and inode numbers (LOOP_GET_STATUS64). The path alone is not
// enough: the kernel prints it as seen from the mount namespace of whoever
// attached the device, so after a node-agent pod is replaced the path no
// longer names the file it is attached to, while the inode does (the FUSE
// mount is the same and keeps each volume file's node id).
func FindLoop(path string) (string, bool) {
	want := canonicalPath(path)
	var st unix.Stat_t
	haveStat := unix.Stat(want, &st) == nil
	for _, l := range listLoops() {
		if l.backing == want || haveStat && l.isFile(&st) {
			return l.dev, true
		}
	}
	return "", false
}

// loopDev is an attached loop device.
type loopDev struct {
	dev     string // /dev/loopN
	backing string // as the kernel reports it
	// The backing file's device and inode numbers, when LOOP_GET_STATUS64
	// answered (ok).
	fileDev, fileIno uint64
	ok               bool
}

// isFile reports whether st describes l's backing file.
func (l loopDev) isFile(st *unix.Stat_t) bool {
	return l.ok && l.fileDev == uint64(st.Dev) && l.fileIno == st.Ino
}

// listLoops lists attached loop devices in device-number order.
func listLoops() []loopDev {
	paths, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	type numbered struct {
		n int
		loopDev
	}
	var out []numbered
	for _, p := range paths {
		name := filepath.Base(filepath.Dir(filepath.Dir(p)))
		n, ok := loopNumber(name)
		if !ok {
			continue
		}
		backing, ok := backingFile(name)
		if !ok {
			continue
		}
		l := loopDev{dev: "/dev/" + name, backing: backing}
		l.fileDev, l.fileIno, l.ok = loopFile(l.dev)
		out = append(out, numbered{n, l})
	}
	slices.SortFunc(out, func(a, b numbered) int { return a.n - b.n })
	loops := make([]loopDev, len(out))
	for i, l := range out {
		loops[i] = l.loopDev
	}
	return loops
}

// loopFile asks the loop device dev for its backing file's device and inode
// numbers. The kernel encodes the device number as stat(2) does.
func loopFile(dev string) (fileDev, fileIno uint64, ok bool) {
	// Not O_EXCL: reading the status of a mounted device is harmless.
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return 0, 0, false
	}
	// A block device opened read-only for an ioctl: closing it writes nothing.
	defer func() { _ = f.Close() }()
	info, err := unix.IoctlLoopGetStatus64(int(f.Fd()))
	if err != nil {
		return 0, 0, false
	}
	return info.Device, info.Inode, true
}

// loopsUnder lists the loop devices whose backing file is inside dir,
// including files since unlinked. When dir is a mount point, a device whose
// file is on that file system counts too, whatever path the kernel reports
// for it (see FindLoop).
func loopsUnder(dir string) []loopDev {
	prefix := strings.TrimSuffix(dir, "/") + "/"
	var st unix.Stat_t
	onMount := false
	if mounted, err := isMountPoint(dir); err == nil && mounted {
		onMount = unix.Stat(dir, &st) == nil
	}
	var in []loopDev
	for _, l := range listLoops() {
		if strings.HasPrefix(strings.TrimSuffix(l.backing, " (deleted)"), prefix) ||
			onMount && l.ok && l.fileDev == uint64(st.Dev) {
			in = append(in, l)
		}
	}
	return in
}

// backingFile reads the backing file of loop device name ("loop3").
func backingFile(name string) (string, bool) {
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err != nil {
		return "", false
	}
	return strings.TrimSuffix(string(b), "\n"), true
}

func loopNumber(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "loop")
	if !ok || rest == "" {
		return 0, false
	}
	n, err := strconv.Atoi(rest)
	return n, err == nil && n >= 0
}

func readSysUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// canonicalPath makes path absolute and, when it exists, symlink-free, as
// the kernel reports backing files.
func canonicalPath(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return filepath.Clean(path)
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		return r
	}
	return abs
}
