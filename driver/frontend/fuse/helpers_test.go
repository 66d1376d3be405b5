//go:build linux

package fuse

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/goleak"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	if arg := os.Getenv(handoverChildEnv); arg != "" {
		handoverChild(arg) // the server TestFUSEConnectionSurvivesServerKill kills
		return
	}
	// A test binary killed mid-run (timeout, SIGKILL) leaves a dead FUSE
	// mount and loop devices behind; clear them before they confuse
	// this run.
	cleanupStale()
	goleak.VerifyTestMain(m)
}

// requireRoot fails the test (not skips: CI runs as root, so a skip would
// hide that nothing ran) when the process cannot mount FUSE or set up loop
// devices.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it mounts FUSE with mount(2) and attaches loop devices (run: sudo go test ./driver/frontend/fuse)")
	}
	for _, dev := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(dev); err != nil {
			t.Fatalf("this test needs %s: %v", dev, err)
		}
	}
}

// needTool returns the path of a command the test cannot do without.
func needTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed (Debian: e2fsprogs util-linux fio): %v", name, err)
	}
	return p
}

// run runs a command and fails the test with its output if it fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// mountT mounts a Server on a fresh directory; cleanup unmounts it even when
// the test failed half way, forcing the matter if it must.
func mountT(t testing.TB) *Server {
	t.Helper()
	return mountTuned(t, defaultTuning)
}

func mountTuned(t testing.TB, tn tuning) *Server {
	t.Helper()
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "volumes")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := mount(zaptest.NewLogger(t), dir, tn)
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
			forceCleanup(t, s.Dir())
			// Let the serve loop end so goleak does not blame the
			// next test.
			select {
			case <-s.served:
			case <-time.After(10 * time.Second):
				t.Errorf("serve loop of %s did not end", s.Dir())
			}
		}
	})
	return s
}

// attachT attaches a loop device to path; cleanup detaches it.
func attachT(t testing.TB, path string) string {
	t.Helper()
	dev, err := AttachLoop(path)
	if err != nil {
		t.Fatalf("AttachLoop: %v", err)
	}
	t.Cleanup(func() {
		if err := DetachLoop(dev); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return dev
}

// mountExt4T mounts dev (ext4) on a fresh directory; cleanup unmounts it.
func mountExt4T(t testing.TB, dev string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, mnt, err)
	}
	t.Cleanup(func() { unmountRetry(t, mnt) })
	return mnt
}

func unmountRetry(t testing.TB, mnt string) {
	t.Helper()
	var err error
	for range 50 {
		if err = unix.Unmount(mnt, 0); err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("unmount %s: %v; detaching lazily", mnt, err)
	if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
		t.Errorf("lazy unmount %s: %v", mnt, err)
	}
}

// forceCleanup tears down what a failed Unmount left: file systems on loop
// devices backed by dir, the loops, then the FUSE mount (lazily).
func forceCleanup(t testing.TB, dir string) {
	for _, l := range loopsUnder(dir) {
		for _, mnt := range mountsOf(l.dev) {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
		if err := DetachLoop(l.dev); err != nil {
			t.Errorf("force cleanup: %v", err)
		}
	}
	abortHungFUSE(dir)
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		t.Errorf("force cleanup: lazy unmount %s: %v", dir, err)
	}
}

// deadFUSE reports whether the FUSE mount at dir has lost its server. A
// server that died with its /dev/fuse still open (a thread of the killed
// process stuck in a request to its own mount) answers nothing: a stat that
// hangs for 5 s counts as dead, and the connection is aborted, which also
// releases the stuck process and the stat.
func deadFUSE(dir string) bool {
	done := make(chan error, 1)
	go func() {
		var st unix.Stat_t
		done <- unix.Stat(dir, &st)
	}()
	select {
	case err := <-done:
		return errors.Is(err, unix.ENOTCONN) || errors.Is(err, unix.ECONNABORTED)
	case <-time.After(5 * time.Second):
	}
	fmt.Fprintf(os.Stderr, "FUSE mount %s does not answer; aborting its connection\n", dir)
	abortHungFUSE(dir)
	<-done
	return true
}

// abortHungFUSE aborts the connection of the FUSE mount at dir through
// fusectl, mounting fusectl for the moment if it is not mounted. It uses
// /proc/self/mountinfo, not stat, which would hang on such a mount.
func abortHungFUSE(dir string) {
	var minor string
	for _, line := range strings.Split(readFile("/proc/self/mountinfo"), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && unescapeMountPath(f[4]) == dir {
			_, minor, _ = strings.Cut(f[2], ":") // major:minor of st_dev
		}
	}
	if minor == "" {
		return
	}
	const conns = "/sys/fs/fuse/connections"
	if _, err := os.Stat(filepath.Join(conns, minor)); err != nil {
		if err := unix.Mount("fusectl", conns, "fusectl", 0, ""); err == nil {
			defer func() { _ = unix.Unmount(conns, 0) }()
		}
	}
	_ = os.WriteFile(filepath.Join(conns, minor, "abort"), []byte("1"), 0o200)
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

type mountEntry struct{ point, fstype, source string }

func mounts() []mountEntry {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []mountEntry
	for line := range strings.SplitSeq(string(data), "\n") {
		left, right, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		lf, rf := strings.Fields(left), strings.Fields(right)
		if len(lf) < 5 || len(rf) < 2 {
			continue
		}
		out = append(out, mountEntry{point: unescapeMountPath(lf[4]), fstype: rf[0], source: unescapeMountPath(rf[1])})
	}
	return out
}

// mountsOf lists the mount points of a device.
func mountsOf(dev string) []string {
	var pts []string
	for _, m := range mounts() {
		if m.source == dev {
			pts = append(pts, m.point)
		}
	}
	return pts
}

// cleanupStale clears dead fuse.cairn mounts under the temp directory (their
// server process is gone: stat fails with ENOTCONN), with the loop devices
// and file systems stacked on them.
func cleanupStale() {
	tmp, err := filepath.EvalSymlinks(os.TempDir())
	if err != nil || os.Geteuid() != 0 {
		return
	}
	for _, m := range mounts() {
		if m.fstype != "fuse."+fsName || !strings.HasPrefix(m.point, tmp+"/") {
			continue
		}
		if !deadFUSE(m.point) {
			continue // alive: another test binary's
		}
		fmt.Fprintf(os.Stderr, "removing stale FUSE mount %s\n", m.point)
		for _, l := range loopsUnder(m.point) {
			for _, mnt := range mountsOf(l.dev) {
				_ = unix.Unmount(mnt, unix.MNT_DETACH)
			}
			if err := DetachLoop(l.dev); err != nil {
				fmt.Fprintf(os.Stderr, "stale %s: %v\n", l.dev, err)
			}
		}
		_ = unix.Unmount(m.point, unix.MNT_DETACH)
	}
}

// memBackend keeps a volume in memory and counts the calls that reach it.
// Trim and WriteZeroes zero the range, as the engine's replicas do when they
// punch holes.
type memBackend struct {
	data []byte
	// stripes lock 1 MiB regions, so concurrent I/O to different
	// regions does not serialise (and the race detector stays quiet).
	stripes []sync.RWMutex

	reads, writes, fuaWrites, flushes, trims, zeroes atomic.Int64
	trimBytes, zeroBytes                             atomic.Int64
	// fail, when set, is returned by every call.
	fail atomic.Pointer[error]
}

const stripeSize = 1 << 20

func newMemBackend(size uint64) *memBackend {
	return &memBackend{
		data:    make([]byte, size),
		stripes: make([]sync.RWMutex, (size+stripeSize-1)/stripeSize),
	}
}

func (b *memBackend) lock(off, n uint64, write bool) func() {
	if n == 0 {
		return func() {}
	}
	first, last := off/stripeSize, (off+n-1)/stripeSize
	for i := first; i <= last; i++ {
		if write {
			b.stripes[i].Lock()
		} else {
			b.stripes[i].RLock()
		}
	}
	return func() {
		for i := first; i <= last; i++ {
			if write {
				b.stripes[i].Unlock()
			} else {
				b.stripes[i].RUnlock()
			}
		}
	}
}

func (b *memBackend) injected() error {
	if p := b.fail.Load(); p != nil {
		return *p
	}
	return nil
}

func (b *memBackend) check(off, n uint64) error {
	if off+n > uint64(len(b.data)) || off+n < off {
		return fmt.Errorf("BUG: [%d, +%d) past the end %d", off, n, len(b.data))
	}
	return b.injected()
}

func (b *memBackend) Size() uint64 { return uint64(len(b.data)) }

func (b *memBackend) ReadAt(_ context.Context, p []byte, off uint64) error {
	b.reads.Add(1)
	if err := b.check(off, uint64(len(p))); err != nil {
		return err
	}
	defer b.lock(off, uint64(len(p)), false)()
	copy(p, b.data[off:])
	return nil
}

func (b *memBackend) WriteAt(_ context.Context, p []byte, off uint64, fua bool) error {
	b.writes.Add(1)
	if fua {
		b.fuaWrites.Add(1)
	}
	if err := b.check(off, uint64(len(p))); err != nil {
		return err
	}
	defer b.lock(off, uint64(len(p)), true)()
	copy(b.data[off:], p)
	return nil
}

func (b *memBackend) Flush(context.Context) error {
	b.flushes.Add(1)
	return b.injected()
}

func (b *memBackend) Trim(_ context.Context, off, length uint64) error {
	b.trims.Add(1)
	b.trimBytes.Add(int64(length))
	return b.zero(off, length)
}

func (b *memBackend) WriteZeroes(_ context.Context, off, length uint64, fua bool) error {
	b.zeroes.Add(1)
	b.zeroBytes.Add(int64(length))
	return b.zero(off, length)
}

func (b *memBackend) zero(off, length uint64) error {
	if err := b.check(off, length); err != nil {
		return err
	}
	defer b.lock(off, length, true)()
	clear(b.data[off : off+length])
	return nil
}

// snapshot copies the content of [off, off+n).
func (b *memBackend) snapshot(off, n uint64) []byte {
	defer b.lock(off, n, false)()
	return bytes.Clone(b.data[off : off+n])
}

// load sets the content of [off, off+len(p)) without counting a call.
func (b *memBackend) load(off uint64, p []byte) {
	defer b.lock(off, uint64(len(p)), true)()
	copy(b.data[off:], p)
}

// alignedBuf returns n bytes aligned to 4096, as O_DIRECT on a 4K-sector
// device wants.
func alignedBuf(n int) []byte {
	buf := make([]byte, n+4096)
	skip := (4096 - int(uintptr(unsafe.Pointer(&buf[0]))%4096)) % 4096
	return buf[skip : skip+n : skip+n]
}

// sysfsValue reads /sys/block/<loopN>/<rel>.
func sysfsValue(t testing.TB, dev, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/block", filepath.Base(dev), rel))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// waitFor polls cond until it holds or 5 s have passed.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// errnoOf extracts the errno of a failed system call.
func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}
