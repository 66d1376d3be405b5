//go:build linux

package fuse

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"
)

// TestFileMapping drives the volume file directly (no loop device) and checks
// which backend call each file operation becomes.
func TestFileMapping(t *testing.T) {
	s := mountT(t)
	const size = 16 << 20
	b := newMemBackend(size)
	path, err := s.Add("vol-a", b)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(s.Dir(), "vol-a"); path != want {
		t.Fatalf("Add returned %q, want %q", path, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != size || !fi.Mode().IsRegular() {
		t.Fatalf("stat: size %d mode %v, want %d, regular", fi.Size(), fi.Mode(), size)
	}
	entries, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "vol-a" {
		t.Fatalf("ReadDir: %v", entries)
	}

	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	fd := int(f.Fd())

	t.Run("write and read", func(t *testing.T) {
		p := alignedBuf(64 << 10)
		_, _ = rand.Read(p)
		if _, err := unix.Pwrite(fd, p, 8192); err != nil {
			t.Fatal(err)
		}
		if got := b.snapshot(8192, uint64(len(p))); !bytes.Equal(got, p) {
			t.Fatal("backend content differs from what was written")
		}
		q := alignedBuf(len(p))
		if n, err := unix.Pread(fd, q, 8192); err != nil || n != len(q) || !bytes.Equal(p, q) {
			t.Fatalf("read back: n=%d err=%v equal=%v", n, err, bytes.Equal(p, q))
		}
		if b.fuaWrites.Load() != 0 {
			t.Fatalf("plain write reached the backend with FUA")
		}
	})
	t.Run("fsync and fdatasync flush", func(t *testing.T) {
		f0 := b.flushes.Load()
		if err := unix.Fsync(fd); err != nil {
			t.Fatal(err)
		}
		if err := unix.Fdatasync(fd); err != nil {
			t.Fatal(err)
		}
		if got := b.flushes.Load() - f0; got != 2 {
			t.Fatalf("fsync+fdatasync made %d flushes, want 2", got)
		}
	})
	t.Run("O_DSYNC write is FUA", func(t *testing.T) {
		g, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT|syscall.O_DSYNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		p := alignedBuf(4096)
		w0 := b.fuaWrites.Load()
		if _, err := unix.Pwrite(int(g.Fd()), p, 0); err != nil {
			t.Fatal(err)
		}
		if b.fuaWrites.Load() != w0+1 {
			t.Fatalf("O_DSYNC write did not reach the backend with FUA")
		}
		f0 := b.flushes.Load()
		if err := g.Close(); err != nil {
			t.Fatal(err)
		}
		// Releasing a handle that wrote flushes (RELEASE is asynchronous).
		waitFor(t, "flush on release", func() bool { return b.flushes.Load() > f0 })
	})
	t.Run("punch hole is trim", func(t *testing.T) {
		t0 := b.trims.Load()
		if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192, 4096); err != nil {
			t.Fatal(err)
		}
		if b.trims.Load() != t0+1 {
			t.Fatal("punch hole did not reach Trim")
		}
		if got := b.snapshot(8192, 4096); !bytes.Equal(got, make([]byte, 4096)) {
			t.Fatal("punched range does not read as zeroes")
		}
	})
	t.Run("zero range is write zeroes", func(t *testing.T) {
		z0, zb0 := b.zeroes.Load(), b.zeroBytes.Load()
		// Past the end with KEEP_SIZE: clipped.
		if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, size-4096, 1<<20); err != nil {
			t.Fatal(err)
		}
		if b.zeroes.Load() != z0+1 || b.zeroBytes.Load()-zb0 != 4096 {
			t.Fatalf("zero range: %d calls, %d bytes; want 1 call of 4096 bytes", b.zeroes.Load()-z0, b.zeroBytes.Load()-zb0)
		}
	})
	t.Run("refusals", func(t *testing.T) {
		p := alignedBuf(8192)
		for _, tc := range []struct {
			name string
			call func() error
			want syscall.Errno
		}{
			{"write past the end", func() error { _, err := unix.Pwrite(fd, p, size-4096); return err }, unix.ENOSPC},
			{"truncate", func() error { return unix.Ftruncate(fd, size/2) }, unix.EPERM},
			{"grow by fallocate", func() error { return unix.Fallocate(fd, 0, size-4096, 8192) }, unix.ENOSPC},
			{"preallocate", func() error { return unix.Fallocate(fd, 0, 0, 4096) }, unix.EOPNOTSUPP},
			{"create a file", func() error {
				_, err := os.Create(filepath.Join(s.Dir(), "other"))
				return err
			}, unix.EPERM},
			{"unlink", func() error { return os.Remove(path) }, unix.EPERM},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if got := errnoOf(tc.call()); got != tc.want {
					t.Fatalf("errno %v, want %v", got, tc.want)
				}
			})
		}
		// Reading at the end is EOF, not an error.
		if n, err := unix.Pread(fd, p, size); n != 0 || err != nil {
			t.Fatalf("read at the end: n=%d err=%v", n, err)
		}
	})
	t.Run("Remove while open", func(t *testing.T) {
		if err := s.Remove("vol-a"); !errors.Is(err, ErrBusy) {
			t.Fatalf("Remove of an open file: %v, want ErrBusy", err)
		}
	})
	t.Run("backend errors", func(t *testing.T) {
		p := alignedBuf(4096)
		for _, tc := range []struct {
			err  error
			want syscall.Errno
		}{
			{errors.New("replica quorum lost"), unix.EIO},
			{unix.EROFS, unix.EROFS},
		} {
			b.fail.Store(&tc.err)
			_, rerr := unix.Pread(fd, p, 0)
			_, werr := unix.Pwrite(fd, p, 0)
			ferr := unix.Fsync(fd)
			b.fail.Store(nil)
			for _, err := range []error{rerr, werr, ferr} {
				if got := errnoOf(err); got != tc.want {
					t.Fatalf("backend error %v: errno %v, want %v", tc.err, got, tc.want)
				}
			}
		}
	})
}

// TestErrors checks that misuse fails with the sentinel a caller matches.
func TestErrors(t *testing.T) {
	s := mountT(t)
	if _, err := s.Add("vol", newMemBackend(1<<20)); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing.img")
	for _, tc := range []struct {
		name string
		call func() error
		want error
	}{
		{"Add duplicate name", func() error { _, err := s.Add("vol", newMemBackend(1<<20)); return err }, ErrAlreadyExists},
		{"Add name with slash", func() error { _, err := s.Add("a/b", newMemBackend(1<<20)); return err }, ErrInvalidName},
		{"Add empty name", func() error { _, err := s.Add("", newMemBackend(1<<20)); return err }, ErrInvalidName},
		{"Add dot-dot", func() error { _, err := s.Add("..", newMemBackend(1<<20)); return err }, ErrInvalidName},
		{"Add empty volume", func() error { _, err := s.Add("zero", newMemBackend(0)); return err }, ErrInvalidSize},
		{"Add odd size", func() error { _, err := s.Add("odd", newMemBackend(1000)); return err }, ErrInvalidSize},
		{"Remove unknown name", func() error { return s.Remove("nope") }, ErrNotFound},
		{"AttachLoop missing path", func() error { _, err := AttachLoop(missing); return err }, os.ErrNotExist},
		{"Mount on a mount point", func() error { _, err := Mount(zaptest.NewLogger(t), s.Dir()); return err }, ErrBusy},
		{"Mount on a missing directory", func() error { _, err := Mount(zaptest.NewLogger(t), missing); return err }, os.ErrNotExist},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
			t.Logf("%v", err)
		})
	}
	if err := DetachLoop("/dev/sda"); err == nil {
		t.Fatal("DetachLoop of a non-loop device succeeded")
	}
	if _, ok := FindLoop(missing); ok {
		t.Fatal("FindLoop found a loop device for a missing file")
	}
	// Remove then Add again under the same name serves the new backend.
	if err := s.Remove("vol"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(s.Dir(), "vol")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("removed file still visible: %v", err)
	}
	if _, err := s.Add("vol", newMemBackend(2<<20)); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(s.Dir(), "vol")); err != nil || fi.Size() != 2<<20 {
		t.Fatalf("re-added file: %v, %v", fi, err)
	}
	if err := s.Unmount(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Add("late", newMemBackend(1<<20)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Add after Unmount: %v, want ErrClosed", err)
	}
	if err := s.Unmount(); err != nil {
		t.Fatalf("second Unmount: %v", err)
	}
}

// TestLoopRoundTrip writes random data through /dev/loopN with O_DIRECT and
// checks it against the backend's content and what reads return.
func TestLoopRoundTrip(t *testing.T) {
	s := mountT(t)
	const size = 64 << 20
	b := newMemBackend(size)
	path, err := s.Add("vol-rt", b)
	if err != nil {
		t.Fatal(err)
	}
	dev := attachT(t, path)

	for rel, want := range map[string]string{
		"loop/dio":                  "1",
		"loop/autoclear":            "0",
		"loop/partscan":             "0",
		"queue/logical_block_size":  "4096",
		"queue/physical_block_size": "4096",
		"size":                      "131072", // 512-byte sectors
	} {
		if got := sysfsValue(t, dev, rel); got != want {
			t.Errorf("%s/%s = %s, want %s", dev, rel, got, want)
		}
	}
	if got := sysfsValue(t, dev, "queue/discard_max_bytes"); got == "0" {
		t.Errorf("discard is not enabled on %s", dev)
	}
	t.Logf("%s: write cache %q, fua %q, discard_max_bytes %s, write_zeroes_max_bytes %s, max_sectors_kb %s",
		dev, sysfsValue(t, dev, "queue/write_cache"), sysfsValue(t, dev, "queue/fua"),
		sysfsValue(t, dev, "queue/discard_max_bytes"), sysfsValue(t, dev, "queue/write_zeroes_max_bytes"),
		sysfsValue(t, dev, "queue/max_sectors_kb"))
	if got, ok := FindLoop(path); !ok || got != dev {
		t.Fatalf("FindLoop(%s) = %q, %v; want %s", path, got, ok, dev)
	}

	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	fd := int(f.Fd())
	shadow := make([]byte, size)
	w0 := b.writes.Load()
	var buf [16]byte
	for i := range 300 {
		_, _ = rand.Read(buf[:])
		n := 4096 << (int(buf[0]) % 9) // 4 KiB … 1 MiB
		off := (int(buf[1])<<16 | int(buf[2])<<8 | int(buf[3])) * 4096 % (size - n + 1)
		off -= off % 4096
		p := alignedBuf(n)
		_, _ = rand.Read(p)
		if w, err := unix.Pwrite(fd, p, int64(off)); err != nil || w != n {
			t.Fatalf("write %d: %d bytes at %d: n=%d err=%v", i, n, off, w, err)
		}
		copy(shadow[off:], p)
	}
	if b.writes.Load() == w0 {
		t.Fatal("no write reached the backend")
	}
	got := alignedBuf(size)
	for off := 0; off < size; off += 1 << 20 {
		if n, err := unix.Pread(fd, got[off:off+1<<20], int64(off)); err != nil || n != 1<<20 {
			t.Fatalf("read at %d: n=%d err=%v", off, n, err)
		}
	}
	if !bytes.Equal(got, shadow) {
		t.Fatal("data read through the loop device differs from what was written")
	}
	if !bytes.Equal(b.snapshot(0, size), shadow) {
		t.Fatal("backend content differs from what was written through the loop device")
	}

	// A FUA write to the loop device: the loop driver has no FUA, so the
	// block layer sends the write and then a FLUSH.
	g, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT|syscall.O_DSYNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f0 := b.flushes.Load()
	if _, err := unix.Pwrite(int(g.Fd()), alignedBuf(4096), 0); err != nil {
		t.Fatal(err)
	}
	if b.flushes.Load() == f0 {
		t.Fatal("an O_DSYNC write to the loop device did not reach the backend as a flush")
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	// Removing a file with a loop on it is refused.
	if err := s.Remove("vol-rt"); !errors.Is(err, ErrBusy) {
		t.Fatalf("Remove with a loop attached: %v, want ErrBusy", err)
	}
	if err := DetachLoop(dev); err != nil {
		t.Fatal(err)
	}
	if d, ok := FindLoop(path); ok {
		t.Fatalf("FindLoop still finds %s after detach", d)
	}
	if err := DetachLoop(dev); err != nil {
		t.Fatalf("second DetachLoop: %v", err)
	}
	if err := s.Remove("vol-rt"); err != nil {
		t.Fatalf("Remove after detach: %v", err)
	}
}

// TestExt4FlushAndTrim is the proof that durability requests and discards
// from a file system on the loop device reach the engine: FLUSH as Flush,
// discard as Trim, zero-out as WriteZeroes.
func TestExt4FlushAndTrim(t *testing.T) {
	mkfs := needTool(t, "mkfs.ext4")
	fstrim := needTool(t, "fstrim")
	blkdiscard := needTool(t, "blkdiscard")
	e2fsck := needTool(t, "e2fsck")
	syncCmd := needTool(t, "sync")
	s := mountT(t)
	const size = 256 << 20
	b := newMemBackend(size)
	path, err := s.Add("vol-ext4", b)
	if err != nil {
		t.Fatal(err)
	}
	dev := attachT(t, path)
	run(t, mkfs, "-q", "-F", dev)
	t.Logf("after mkfs.ext4: %d writes, %d flushes, %d trims (%d MiB), %d write-zeroes (%d MiB)",
		b.writes.Load(), b.flushes.Load(), b.trims.Load(), b.trimBytes.Load()>>20, b.zeroes.Load(), b.zeroBytes.Load()>>20)

	mnt := mountExt4T(t, dev)
	data := make([]byte, 8<<20)
	_, _ = rand.Read(data)

	t.Run("fsync reaches Flush", func(t *testing.T) {
		f, err := os.Create(filepath.Join(mnt, "a"))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(data); err != nil {
			t.Fatal(err)
		}
		f0 := b.flushes.Load()
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		if b.flushes.Load() == f0 {
			t.Fatal("fsync on ext4 did not reach the backend as Flush")
		}
	})
	t.Run("sync reaches Flush", func(t *testing.T) {
		if err := os.WriteFile(filepath.Join(mnt, "b"), data[:1<<20], 0o600); err != nil {
			t.Fatal(err)
		}
		f0 := b.flushes.Load()
		run(t, syncCmd)
		if b.flushes.Load() == f0 {
			t.Fatal("sync did not reach the backend as Flush")
		}
	})
	t.Run("fstrim reaches Trim", func(t *testing.T) {
		if err := os.Remove(filepath.Join(mnt, "b")); err != nil {
			t.Fatal(err)
		}
		run(t, syncCmd)
		t0 := b.trims.Load()
		out := run(t, fstrim, "-v", mnt)
		if b.trims.Load() == t0 {
			t.Fatalf("fstrim did not reach the backend as Trim: %s", out)
		}
		t.Logf("%s→ %d trims", out, b.trims.Load()-t0)
	})

	unmountRetry(t, mnt)
	run(t, e2fsck, "-f", "-n", dev)
	mnt2 := mountExt4T(t, dev)
	if got, err := os.ReadFile(filepath.Join(mnt2, "a")); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("file after remount: err=%v equal=%v", err, bytes.Equal(got, data))
	}
	unmountRetry(t, mnt2)

	t.Run("blkdiscard reaches Trim", func(t *testing.T) {
		t0 := b.trims.Load()
		run(t, blkdiscard, "-o", "0", "-l", "4MiB", dev)
		if b.trims.Load() == t0 {
			t.Fatal("blkdiscard did not reach the backend as Trim")
		}
	})
	t.Run("blkdiscard -z reaches WriteZeroes", func(t *testing.T) {
		b.load(8<<20, data[:4<<20])
		z0, t0 := b.zeroes.Load(), b.trims.Load()
		run(t, blkdiscard, "-z", "-o", "8MiB", "-l", "4MiB", dev)
		if b.zeroes.Load() == z0 {
			t.Fatalf("blkdiscard -z did not reach WriteZeroes (%d trims)", b.trims.Load()-t0)
		}
		if !bytes.Equal(b.snapshot(8<<20, 4<<20), make([]byte, 4<<20)) {
			t.Fatal("zeroed range is not zero")
		}
	})
	t.Run("fallocate --punch-hole on the device", func(t *testing.T) {
		// BLKDEV_ZERO_NOFALLBACK without NOUNMAP: the loop driver sends
		// WRITE_ZEROES as a punch hole, so it reaches Trim and must read
		// back as zeroes.
		b.load(16<<20, data[:4<<20])
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		t0, z0 := b.trims.Load(), b.zeroes.Load()
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 16<<20, 4<<20)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("punch hole on %s: %d trims, %d write-zeroes", dev, b.trims.Load()-t0, b.zeroes.Load()-z0)
		if !bytes.Equal(b.snapshot(16<<20, 4<<20), make([]byte, 4<<20)) {
			t.Fatal("punched range is not zero")
		}
	})
}

// TestUnmount checks that Unmount detaches the loop devices on the mount and
// leaves neither mount nor loop behind, and that it refuses (and can be
// retried) while a file system is mounted on one of them.
func TestUnmount(t *testing.T) {
	s := mountT(t)
	var devs []string
	for _, name := range []string{"vol-1", "vol-2"} {
		path, err := s.Add(name, newMemBackend(8<<20))
		if err != nil {
			t.Fatal(err)
		}
		dev, err := AttachLoop(path)
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, dev)
	}
	slices.Sort(devs)
	var under []string
	for _, l := range loopsUnder(s.Dir()) {
		under = append(under, l.dev)
	}
	if !slices.Equal(under, devs) {
		t.Fatalf("loops under %s: %v, want %v", s.Dir(), under, devs)
	}

	// A file system on one of them makes Unmount fail without harm.
	run(t, needTool(t, "mkfs.ext4"), "-q", "-F", devs[0])
	mnt := mountExt4T(t, devs[0])
	if err := s.Unmount(); !errors.Is(err, ErrBusy) {
		t.Fatalf("Unmount under a mounted file system: %v, want ErrBusy", err)
	} else {
		t.Logf("%v", err)
	}
	if l := loopsUnder(s.Dir()); len(l) != 2 {
		t.Fatalf("the refused Unmount changed the loop devices: %v", l)
	}
	if err := os.WriteFile(filepath.Join(mnt, "still-works"), []byte("yes"), 0o600); err != nil {
		t.Fatalf("file system broken by the refused Unmount: %v", err)
	}
	unmountRetry(t, mnt)

	if err := s.Unmount(); err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts() {
		if m.point == s.Dir() {
			t.Fatalf("still mounted: %+v", m)
		}
	}
	if l := loopsUnder(s.Dir()); len(l) != 0 {
		t.Fatalf("loops left: %v", l)
	}
	out := run(t, needTool(t, "losetup"), "-a")
	if bytes.Contains([]byte(out), []byte(s.Dir())) {
		t.Fatalf("losetup -a still lists a loop on %s:\n%s", s.Dir(), out)
	}
}

// TestFindLoopByInode finds a loop device whose backing path, as the kernel
// prints it, no longer names the file: it was attached through a bind mount
// that is gone since, as when the node-agent pod that attached it was
// replaced and its mount namespace went with it. Unmount must detach it too.
func TestFindLoopByInode(t *testing.T) {
	s := mountT(t)
	path, err := s.Add("vol-1", newMemBackend(8<<20))
	if err != nil {
		t.Fatal(err)
	}
	other := t.TempDir()
	if err := unix.Mount(s.Dir(), other, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	dev := attachT(t, filepath.Join(other, "vol-1"))
	// MNT_DETACH: the loop device keeps the bind mount busy.
	if err := unix.Unmount(other, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	backing, _ := backingFile(filepath.Base(dev))
	if backing == path || strings.HasPrefix(backing, s.Dir()+"/") {
		t.Fatalf("the kernel still reports %s for %s: the test does not test anything", backing, dev)
	}
	t.Logf("%s reports backing file %q for %s", dev, backing, path)
	if got, ok := FindLoop(path); !ok || got != dev {
		t.Fatalf("FindLoop(%s) = %q, %v; want %s", path, got, ok, dev)
	}
	if got, ok := FindLoop(filepath.Join(s.Dir(), "no-such-volume")); ok {
		t.Fatalf("FindLoop of a missing file found %s", got)
	}
	if err := s.Unmount(); err != nil {
		t.Fatal(err)
	}
	if _, attached := backingFile(filepath.Base(dev)); attached {
		t.Fatalf("Unmount left %s attached", dev)
	}
}

// TestFioVerify writes random blocks of mixed sizes at queue depth 32
// through the loop device, with checksums, and reads them back: concurrent
// asynchronous direct I/O must not mix up data.
func TestFioVerify(t *testing.T) {
	fio := needTool(t, "fio")
	s := mountT(t)
	b := newMemBackend(64 << 20)
	path, err := s.Add("vol-fio", b)
	if err != nil {
		t.Fatal(err)
	}
	dev := attachT(t, path)
	run(t, fio, "--name=verify", "--filename="+dev, "--rw=randwrite", "--bsrange=4k-256k",
		"--iodepth=32", "--direct=1", "--ioengine=libaio", "--size=64M", "--verify=crc32c",
		"--verify_fatal=1", "--do_verify=1", "--verify_state_save=0", "--randrepeat=0")
	if b.writes.Load() == 0 || b.reads.Load() == 0 {
		t.Fatalf("fio did not reach the backend: %d writes, %d reads", b.writes.Load(), b.reads.Load())
	}
	t.Logf("fio verify passed: %d writes, %d reads reached the backend", b.writes.Load(), b.reads.Load())
}
