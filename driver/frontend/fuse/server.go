//go:build linux

package fuse

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"go.uber.org/zap"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/driver/frontend"
)

// Sentinel errors; callers match them with errors.Is.
var (
	// ErrFUSEUnavailable: /dev/fuse cannot be opened or the kernel refused
	// the FUSE mount.
	ErrFUSEUnavailable = errors.New("FUSE unavailable")
	// ErrAlreadyExists: Add of a name that is already served.
	ErrAlreadyExists = errors.New("already exists")
	// ErrNotFound: Remove of a name that is not served.
	ErrNotFound = errors.New("not found")
	// ErrBusy: the file, loop device or mount is still in use.
	ErrBusy = errors.New("busy")
	// ErrInvalidName: a volume file name that is empty, too long, or not a
	// single path element.
	ErrInvalidName = errors.New("invalid volume file name")
	// ErrInvalidSize: a backend whose size is 0 or not a multiple of 512.
	ErrInvalidSize = errors.New("invalid volume size")
	// ErrClosed: the Server has been unmounted.
	ErrClosed = errors.New("fuse server unmounted")
)

const (
	// fsName is the mount's type suffix: it shows as "fuse.cairn" in
	// /proc/self/mountinfo.
	fsName = "cairn"
	// maxBackground is how many asynchronous requests (async direct I/O
	// from the loop driver) the kernel keeps in flight per mount. The
	// go-fuse default of 12 caps the loop device's queue depth.
	maxBackground = 128
	// maxWrite is the largest READ/WRITE request: 1 MiB (256 pages), the
	// kernel's default max_pages_limit.
	maxWrite = 1 << 20
	// attrTimeout is how long the kernel caches attributes and entries.
	// Resize and Remove invalidate them explicitly.
	attrTimeout = time.Second
	// releaseWait bounds how long Remove and Unmount wait for the kernel's
	// RELEASE of a file whose loop device was just detached: the loop
	// driver drops its file reference, and the RELEASE that follows is
	// sent asynchronously.
	releaseWait = 2 * time.Second
)

// tuning holds mount parameters that only tests and benchmarks change.
type tuning struct {
	asyncDIO      bool
	maxBackground int
}

var defaultTuning = tuning{asyncDIO: true, maxBackground: maxBackground}

// Server serves backends as files under dir (a FUSE mount), one per volume.
// Create it with Mount, or with Resume in a process that takes over the
// mount of an earlier one; it is safe for concurrent use.
type Server struct {
	log *zap.Logger
	dir string
	fs  *volumeFS
	srv *gofuse.Server
	// dev is this process's descriptor of the mount's FUSE connection
	// (/dev/fuse): go-fuse reads requests from a duplicate of it, the
	// notifications are written to it, and a holder process may keep a
	// duplicate so that the mount outlives the process (Device).
	dev *os.File
	// served is closed when the FUSE serve loop has returned.
	served chan struct{}
	// cancel ends the context of backend calls once unmounted.
	cancel context.CancelFunc

	// unmountMu serialises Unmount.
	unmountMu sync.Mutex
}

// Mount mounts an empty FUSE file system on dir (which must exist and not be
// a mount point) and serves it until Unmount. It opens /dev/fuse and calls
// mount(2) itself (no fusermount), so it needs CAP_SYS_ADMIN, and fails with
// ErrFUSEUnavailable when the kernel has no FUSE.
//
// Mount also puts the process in the PR_SET_IO_FLUSHER state
// (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE). The process now serves the I/O of
// block devices: if an allocation it makes while serving a request entered
// reclaim and waited for dirty pages to be written back, possibly to one of
// those devices, it would wait for itself, and the node would deadlock under
// memory pressure; nor should it be throttled for other writers' dirty pages.
// It needs CAP_SYS_RESOURCE; without it Mount logs a warning and goes on.
func Mount(log *zap.Logger, dir string) (*Server, error) {
	return mount(log, dir, defaultTuning)
}

func mount(log *zap.Logger, dir string, tn tuning) (*Server, error) {
	log = log.Named("fuse")
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("fuse mount %s: %w", dir, err)
	}
	// The loop driver reports the backing file's resolved path; resolving
	// the mount point makes FindLoop and Unmount's detach match it.
	abs, err = filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fmt.Errorf("fuse mount %s: %w", dir, err)
	}
	if fi, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("fuse mount %s: %w", abs, err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("fuse mount %s: not a directory", abs)
	}
	if mounted, err := isMountPoint(abs); err != nil {
		return nil, fmt.Errorf("fuse mount %s: %w", abs, err)
	} else if mounted {
		return nil, fmt.Errorf("fuse mount %s: already a mount point (a stale mount from an earlier run? unmount it first): %w", abs, ErrBusy)
	}
	setIOFlusher(log)
	dev, err := mountDevice(abs, maxWrite)
	if err != nil {
		return nil, fmt.Errorf("fuse mount %s: %w", abs, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{log: log, dir: abs, fs: newVolumeFS(ctx, log), dev: dev, served: make(chan struct{}), cancel: cancel}
	// go-fuse reads the kernel's INIT, queued by mount(2), and answers it.
	if err := s.serve(tn); err != nil {
		_ = unix.Unmount(abs, unix.MNT_DETACH)
		_ = dev.Close()
		cancel()
		return nil, fmt.Errorf("fuse mount %s: %w", abs, err)
	}
	pollHack(log, abs)
	ks := s.srv.KernelSettings()
	log.Info("fuse mounted",
		zap.String("dir", abs),
		zap.Uint32("fuse_minor", ks.Minor),
		zap.Bool("async_dio", ks.Flags64()&gofuse.CAP_ASYNC_DIO != 0 && tn.asyncDIO),
		zap.Bool("resend", ks.Flags64()&capHasResend != 0),
		zap.Int("max_background", tn.maxBackground))
	return s, nil
}

// capHasResend is the INIT flag FUSE_HAS_RESEND (bit 39): the kernel can
// send again the requests a dead server had read (notifyResendAll).
const capHasResend = 1 << 39

// ErrConnectionGone: Resume of a mount whose FUSE connection ended (it
// was unmounted, or every process holding it exited).
var ErrConnectionGone = errors.New("the FUSE connection is gone")

// Resume takes over the FUSE mount at dir from a process that served it
// before (a node agent that was restarted; docs/restart.md). dev is a
// duplicate of that process's /dev/fuse descriptor, kept meanwhile by a
// holder; dir is the mount point as Dir reported it. files are the
// volumes to serve, by name: the earlier process's, each with its backend
// opened again. They are in place before the first request is read, and
// each keeps its node id (inoFor), so that the kernel's references (a
// loop device's open file) reach the same volume. The kernel is then
// asked to send again what the earlier process had read and not answered
// (FUSE_NOTIFY_RESEND, Linux 6.9 and later; before that, those requests
// failed when it died).
//
// Resume does not look into dir before it serves: a lookup there would
// wait for the server that is not running yet.
func Resume(log *zap.Logger, dir string, dev *os.File, files map[string]frontend.Backend) (*Server, error) {
	return resume(log, dir, dev, files, defaultTuning)
}

func resume(log *zap.Logger, dir string, dev *os.File, files map[string]frontend.Backend, tn tuning) (*Server, error) {
	log = log.Named("fuse")
	if !filepath.IsAbs(dir) {
		return nil, fmt.Errorf("fuse resume %s: not an absolute path", dir)
	}
	if !connected(dev) {
		return nil, fmt.Errorf("fuse resume %s: %w", dir, ErrConnectionGone)
	}
	if fsType, err := mountType(dir); err != nil {
		return nil, fmt.Errorf("fuse resume %s: %w", dir, err)
	} else if fsType != "fuse."+fsName {
		return nil, fmt.Errorf("fuse resume %s: mounted as %q, not fuse.%s: %w", dir, fsType, fsName, ErrConnectionGone)
	}
	setIOFlusher(log)
	ctx, cancel := context.WithCancel(context.Background())
	vfs := newVolumeFS(ctx, log)
	vfs.resumed = true
	names := make([]string, 0, len(files))
	for name, b := range files {
		if err := validName(name); err != nil {
			cancel()
			return nil, fmt.Errorf("fuse resume %s: %q: %w", dir, name, err)
		}
		if err := vfs.add(name, b, b.Size()); err != nil {
			cancel()
			return nil, fmt.Errorf("fuse resume %s: %q: %w", dir, name, err)
		}
		names = append(names, name)
	}
	resend := true
	if err := notifyResendAll(dev); err != nil {
		// Linux before 6.9: what the earlier process had read failed
		// with ECONNABORTED when it died; the connection serves on.
		resend = false
		log.Warn("this kernel cannot send again the requests the earlier agent had read (FUSE_NOTIFY_RESEND needs Linux 6.9): those failed with an I/O error", zap.Error(err))
	}
	s := &Server{log: log, dir: dir, fs: vfs, dev: dev, served: make(chan struct{}), cancel: cancel}
	// go-fuse takes the first request it reads for INIT and waits for
	// it; INIT is long past, so make sure some request comes.
	kicked := make(chan struct{})
	go func() {
		defer close(kicked)
		var st unix.Statfs_t
		_ = unix.Statfs(dir, &st)
	}()
	if err := s.serve(tn); err != nil {
		cancel()
		return nil, fmt.Errorf("fuse resume %s: %w", dir, err)
	}
	<-kicked
	slices.Sort(names)
	log.Info("fuse mount resumed from an earlier agent", zap.String("dir", dir), zap.Strings("volumes", names), zap.Bool("resend", resend))
	return s, nil
}

// serve starts go-fuse on a duplicate of s.dev (go-fuse closes its
// descriptor when its loop ends), through its /dev/fd/N convention for a
// connection it did not mount. It returns once the first request (INIT on
// a new mount) is answered, with the serve loop running.
func (s *Server) serve(tn tuning) error {
	fuseLog, err := zap.NewStdLogAt(s.log.Named("go-fuse"), zap.WarnLevel)
	if err != nil {
		panic("BUG: zap.NewStdLogAt: " + err.Error())
	}
	opts := &gofuse.MountOptions{
		FsName:        fsName,
		Name:          fsName,
		MaxBackground: tn.maxBackground,
		// The same in every process that serves the connection: the
		// kernel refuses a read of the device into a smaller buffer.
		MaxWrite:      maxWrite,
		DisableXAttrs: true,
		// One flat directory: READDIR is enough.
		DisableReadDirPlus: true,
		// Splicing only pays for data that comes from a file descriptor;
		// ours comes from the engine's buffers, and 1 MiB reads do not
		// fit a pipe (go-fuse logs each fallback).
		DisableSplice: true,
		// go-fuse logs only what goes wrong (panics in handlers,
		// failed replies to the kernel).
		Logger: fuseLog,
	}
	if tn.asyncDIO {
		opts.ExtraCapabilities = gofuse.CAP_ASYNC_DIO
	}
	fd, err := unix.Dup(int(s.dev.Fd()))
	if err != nil {
		return fmt.Errorf("duplicate the FUSE descriptor: %w", err)
	}
	srv, err := gofuse.NewServer(s.fs, "/dev/fd/"+strconv.Itoa(fd), opts)
	if err != nil {
		return err
	}
	s.srv = srv
	go func() {
		defer close(s.served)
		srv.Serve()
	}()
	return srv.WaitMount()
}

// pollHack has the kernel learn at once that this file system does not
// answer POLL (go-fuse does what its own mounts do): otherwise the first
// open of a volume file by this process (a loop attach), which the Go
// runtime registers with its poller, sends a POLL that could wait for a
// thread the runtime's poller holds.
func pollHack(log *zap.Logger, dir string) {
	fd, err := unix.Open(filepath.Join(dir, ".go-fuse-epoll-hack"), unix.O_RDONLY, 0)
	if err != nil {
		log.Debug("poll hack", zap.Error(err))
		return
	}
	_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	_ = unix.Close(fd)
}

// Device is the mount's /dev/fuse descriptor, for a holder to keep a
// duplicate of (fdhold.Client.Put); it stays the Server's.
func (s *Server) Device() *os.File { return s.dev }

// Leave stops serving without unmounting, for a successor process to
// Resume: requests that arrive from now on are left for it, and Leave
// waits up to wait for those being served to be answered. It reports
// whether they all were. The caller then closes the backends (flushing
// them) and exits; a holder must keep the connection (Device) meanwhile.
func (s *Server) Leave(wait time.Duration) bool {
	ok := s.fs.gate.close(wait)
	s.log.Info("fuse mount left to a successor", zap.String("dir", s.dir), zap.Bool("requests_finished", ok))
	return ok
}

// Dir is the absolute, symlink-free mount point.
func (s *Server) Dir() string { return s.dir }

// Add serves b as the file dir/name of b.Size() bytes and returns its path.
// The size must be a positive multiple of 512.
func (s *Server) Add(name string, b frontend.Backend) (string, error) {
	if err := validName(name); err != nil {
		return "", fmt.Errorf("fuse add %q: %w", name, err)
	}
	size := b.Size()
	if size == 0 || size%512 != 0 {
		return "", fmt.Errorf("fuse add %q: size %d is not a positive multiple of 512: %w", name, size, ErrInvalidSize)
	}
	if err := s.fs.add(name, b, size); err != nil {
		return "", fmt.Errorf("fuse add %q: %w", name, err)
	}
	p := filepath.Join(s.dir, name)
	s.log.Info("volume file added", zap.String("volume_id", name), zap.String("path", p), zap.Uint64("size", size))
	return p, nil
}

// Resize gives the file dir/name its backend's current size, after the
// volume grew, and makes the kernel see it: the attributes it caches are
// invalidated and fetched again, so that the file's size in the kernel
// (what a loop device's LOOP_SET_CAPACITY reads, see RefreshLoopSize) is
// the new one when Resize returns. It returns the new size. A backend that
// shrank is refused (ErrInvalidSize).
func (s *Server) Resize(name string) (uint64, error) {
	if err := validName(name); err != nil {
		return 0, fmt.Errorf("fuse resize %q: %w", name, err)
	}
	ino, old, size, err := s.fs.resize(name)
	if err != nil {
		return 0, fmt.Errorf("fuse resize %q: %w", name, err)
	}
	// Not under fs.mu: the kernel may be waiting on a request that needs
	// it. An offset below 0 drops the cached attributes only; the file has
	// no page cache (direct I/O).
	if err := notifyInode(s.dev, ino); err != nil && !errors.Is(err, unix.ENOENT) {
		return 0, fmt.Errorf("fuse resize %q: invalidate the kernel's attributes: %w", name, err)
	}
	p := filepath.Join(s.dir, name)
	fi, err := os.Stat(p) // fetches the attributes again: the kernel's file size moves
	if err != nil {
		return 0, fmt.Errorf("fuse resize %q: %w", name, err)
	}
	if uint64(fi.Size()) != size {
		return 0, fmt.Errorf("fuse resize %q: the kernel sees %d bytes after the resize to %d", name, fi.Size(), size)
	}
	if size != old {
		s.log.Info("volume file grown", zap.String("volume_id", name), zap.String("path", p), zap.Uint64("previous_size", old), zap.Uint64("size", size))
	}
	return size, nil
}

// Remove stops serving dir/name. It fails with ErrBusy while a loop device
// (or anything else) has the file open: detach the loop first.
func (s *Server) Remove(name string) error {
	if err := validName(name); err != nil {
		return fmt.Errorf("fuse remove %q: %w", name, err)
	}
	p := filepath.Join(s.dir, name)
	if dev, ok := FindLoop(p); ok {
		return fmt.Errorf("fuse remove %q: attached to %s, detach it first: %w", name, dev, ErrBusy)
	}
	if err := s.fs.remove(name, releaseWait); err != nil {
		return fmt.Errorf("fuse remove %q: %w", name, err)
	}
	// Drop the kernel's cached dentry so the name is gone at once. This
	// must not run under fs.mu: the kernel may be waiting on a LOOKUP in
	// this directory that needs it.
	if err := notifyEntry(s.dev, gofuse.FUSE_ROOT_ID, name); err != nil && !errors.Is(err, unix.ENOENT) {
		s.log.Debug("entry invalidation failed", zap.String("volume_id", name), zap.Error(err))
	}
	s.log.Info("volume file removed", zap.String("volume_id", name))
	return nil
}

// Unmount detaches every loop device whose backing file is in this mount,
// then unmounts and waits for the serve loop to end. After a failure (say a
// loop device is still mounted: ErrBusy) it can be called again.
func (s *Server) Unmount() error {
	s.unmountMu.Lock()
	defer s.unmountMu.Unlock()
	select {
	case <-s.served:
		return nil
	default:
	}
	loops := loopsUnder(s.dir)
	// Refuse before changing anything while a file system is mounted on
	// one of the devices: detaching the others first would leave a half
	// torn-down node.
	for _, l := range loops {
		if claimed(l.dev) {
			return fmt.Errorf("fuse unmount %s: %s (backing %s) is mounted or held by another device: %w", s.dir, l.dev, l.backing, ErrBusy)
		}
	}
	var errs []error
	for _, l := range loops {
		if err := DetachLoop(l.dev); err != nil {
			errs = append(errs, err)
			continue
		}
		s.log.Info("loop detached", zap.String("device", l.dev), zap.String("path", l.backing))
	}
	if len(errs) > 0 {
		return fmt.Errorf("fuse unmount %s: %w", s.dir, errors.Join(errs...))
	}
	// The RELEASE that follows a detach is asynchronous; unmounting
	// before it arrives fails with EBUSY.
	s.fs.waitClosed(releaseWait)
	if err := unmountDir(s.dir); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			err = fmt.Errorf("%w (open files: %s): %w", ErrBusy, strings.Join(s.fs.openNames(), ", "), err)
		}
		return fmt.Errorf("fuse unmount %s: %w", s.dir, err)
	}
	// The unmount ended the connection: go-fuse's readers get ENODEV.
	<-s.served
	s.fs.close()
	s.fs.gate.free()
	s.cancel()
	_ = s.dev.Close()
	s.log.Info("fuse unmounted", zap.String("dir", s.dir))
	return nil
}

// unmountDir unmounts dir, retrying briefly while it is busy: the kernel
// may still be closing a file that was just released.
func unmountDir(dir string) error {
	var err error
	delay := 5 * time.Millisecond
	for range 5 {
		if err = unix.Unmount(dir, 0); err == nil || !errors.Is(err, unix.EBUSY) {
			return err
		}
		time.Sleep(delay)
		delay *= 2
	}
	return err
}

// validName accepts one path element that Linux can name.
func validName(name string) error {
	switch {
	case name == "", name == ".", name == "..":
		return fmt.Errorf("%w: %q", ErrInvalidName, name)
	case len(name) > 255:
		return fmt.Errorf("%w: longer than 255 bytes", ErrInvalidName)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("%w: %q contains '/' or NUL", ErrInvalidName, name)
	}
	return nil
}

// isMountPoint reports whether dir (absolute, resolved) is a mount point in
// this mount namespace.
func isMountPoint(dir string) (bool, error) {
	t, err := mountType(dir)
	return t != "", err
}

// mountType returns the file system type of the topmost mount at dir
// (absolute, resolved), or "" when nothing is mounted there. It reads
// /proc/self/mountinfo and never touches dir.
func mountType(dir string) (string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	fsType := ""
	for line := range strings.SplitSeq(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) <= 4 || unescapeMountPath(fields[4]) != dir {
			continue
		}
		// The type follows the " - " separator after the optional fields.
		for i := 5; i+1 < len(fields); i++ {
			if fields[i] == "-" {
				fsType = fields[i+1] // a later line is a mount on top
				break
			}
		}
	}
	return fsType, nil
}

// unescapeMountPath undoes the octal escapes (\040 for a space …) of
// /proc/self/mountinfo.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v := 0
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + int(c-'0')
			}
			if ok {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// setIOFlusher marks every thread of the process PR_SET_IO_FLUSHER (threads
// created later inherit it from the thread that clones them). With cgo the
// Go runtime cannot run a syscall on all threads, so only the calling thread
// is marked; the agent is built without cgo.
func setIOFlusher(log *zap.Logger) {
	_, _, errno := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0, 0)
	if errno == 0 {
		return
	}
	if errno != syscall.ENOTSUP {
		log.Warn("PR_SET_IO_FLUSHER failed (needs CAP_SYS_RESOURCE): memory reclaim may deadlock on volume I/O", zap.Error(errno))
		return
	}
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		log.Warn("PR_SET_IO_FLUSHER failed (needs CAP_SYS_RESOURCE): memory reclaim may deadlock on volume I/O", zap.Error(err))
		return
	}
	log.Debug("PR_SET_IO_FLUSHER set on one thread only (built with cgo)")
}
