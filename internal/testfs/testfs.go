// Package testfs gives tests a real file system of a chosen type: made on
// a loop device over a sparse file the test owns, mounted, and undone when
// the test ends. The tests that claim deduplication works run on an xfs
// with reflinks, as a node's data directory would be.
package testfs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// mkfs is the command that makes each file system type a test may ask for.
var mkfs = map[string][]string{
	"xfs":  {"mkfs.xfs", "-q", "-m", "reflink=1"},
	"ext4": {"mkfs.ext4", "-q"},
}

// Mount makes a file system of fstype ("xfs", with reflinks, or "ext4") of
// size bytes and mounts it at mnt (made if missing). The test is skipped,
// saying why, without root or the mkfs tool. The unmount and the loop
// device's removal run when the test ends; a mount something else already
// undid (cairn dev down unmounts what lies under a cluster's directory) is
// left alone.
func Mount(t testing.TB, fstype string, size int64, mnt string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test makes a loop device and mounts a file system on it")
	}
	cmd, ok := mkfs[fstype]
	if !ok {
		t.Fatalf("testfs: no mkfs for %q", fstype)
	}
	if _, err := exec.LookPath(cmd[0]); err != nil {
		t.Skipf("needs %s (apt-get install -y xfsprogs e2fsprogs; make test installs them)", cmd[0])
	}
	img := filepath.Join(t.TempDir(), fstype+".img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err := exec.Command("losetup", "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	if out, err := exec.Command(cmd[0], append(cmd[1:], dev)...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", cmd[0], err, out)
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(dev, mnt, fstype, 0, ""); err != nil {
		t.Fatalf("mount %s on %s: %v", dev, mnt, err)
	}
	t.Cleanup(func() {
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		if !strings.Contains(string(mi), " "+mnt+" ") {
			return
		}
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
}

// Sync makes everything written to the file system at dir durable
// (syncfs: its journal included).
func Sync(t testing.TB, dir string) {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		t.Fatalf("syncfs %s: %v", dir, err)
	}
}

// Used is what the file system at dir has in use, after a sync.
func Used(t testing.TB, dir string) uint64 {
	t.Helper()
	Sync(t, dir)
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return (st.Blocks - st.Bfree) * uint64(st.Bsize)
}
