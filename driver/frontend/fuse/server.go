//go:build linux

package fuse

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
// Create it with Mount; it is safe for concurrent use.
type Server struct {
	log *zap.Logger
	dir string
	fs  *volumeFS
	srv *gofuse.Server
	// served is closed when the FUSE serve loop has returned.
	served chan struct{}
	// cancel ends the context of backend calls once unmounted.
	cancel context.CancelFunc

	// unmountMu serialises Unmount.
	unmountMu sync.Mutex
}

// Mount mounts an empty FUSE file system on dir (which must exist and not be
// a mount point) and serves it until Unmount. It mounts with
// mount(2) directly (go-fuse's DirectMountStrict: no fallback to fusermount),
// so it needs CAP_SYS_ADMIN, and fails with ErrFUSEUnavailable when the kernel
// has no FUSE.
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
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("fuse mount %s: open /dev/fuse (is the fuse module loaded and the device in this container?): %w: %w", abs, ErrFUSEUnavailable, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("fuse mount %s: close /dev/fuse: %w", abs, err)
	}

	setIOFlusher(log)

	fuseLog, err := zap.NewStdLogAt(log.Named("go-fuse"), zap.WarnLevel)
	if err != nil {
		panic("BUG: zap.NewStdLogAt: " + err.Error())
	}
	ctx, cancel := context.WithCancel(context.Background())
	vfs := newVolumeFS(ctx, log)
	opts := &gofuse.MountOptions{
		// Let processes of other users look at the files (diagnostics);
		// the loop driver itself needs no permission.
		AllowOther:        true,
		FsName:            fsName,
		Name:              fsName,
		DirectMountStrict: true,
		MaxBackground:     tn.maxBackground,
		MaxWrite:          maxWrite,
		DisableXAttrs:     true,
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
	srv, err := gofuse.NewServer(vfs, abs, opts)
	if err != nil {
		cancel()
		if errors.Is(err, syscall.ENODEV) {
			err = fmt.Errorf("%w: %w", ErrFUSEUnavailable, err)
		}
		return nil, fmt.Errorf("fuse mount %s: %w", abs, err)
	}
	s := &Server{
		log:    log,
		dir:    abs,
		fs:     vfs,
		srv:    srv,
		served: make(chan struct{}),
		cancel: cancel,
	}
	go func() {
		defer close(s.served)
		srv.Serve()
	}()
	if err := srv.WaitMount(); err != nil {
		// The kernel's INIT went wrong; unmount and, if that worked,
		// wait for the serve loop to notice.
		uerr := srv.Unmount()
		if uerr == nil {
			<-s.served
		}
		cancel()
		return nil, fmt.Errorf("fuse mount %s: waiting for INIT: %w", abs, errors.Join(err, uerr))
	}
	ks := srv.KernelSettings()
	log.Info("fuse mounted",
		zap.String("dir", abs),
		zap.Uint32("fuse_minor", ks.Minor),
		zap.Bool("async_dio", ks.Flags64()&gofuse.CAP_ASYNC_DIO != 0 && tn.asyncDIO),
		zap.Int("max_background", tn.maxBackground))
	return s, nil
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
	if st := s.srv.InodeNotify(ino, -1, 0); !st.Ok() && st != gofuse.ENOENT {
		return 0, fmt.Errorf("fuse resize %q: invalidate the kernel's attributes: %v", name, st)
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
	if st := s.srv.EntryNotify(gofuse.FUSE_ROOT_ID, name); !st.Ok() && st != gofuse.ENOENT {
		s.log.Debug("entry invalidation failed", zap.String("volume_id", name), zap.Stringer("status", st))
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
	if err := s.srv.Unmount(); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			err = fmt.Errorf("%w (open files: %s): %w", ErrBusy, strings.Join(s.fs.openNames(), ", "), err)
		}
		return fmt.Errorf("fuse unmount %s: %w", s.dir, err)
	}
	<-s.served
	s.fs.close()
	s.cancel()
	s.log.Info("fuse unmounted", zap.String("dir", s.dir))
	return nil
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
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 4 && unescapeMountPath(fields[4]) == dir {
			return true, nil
		}
	}
	return false, nil
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
