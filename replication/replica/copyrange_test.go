package replica

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// mergeOnce makes a replica of 4 MiB under dir (with or without
// checksums), fills it, snapshots it as s1, writes a tenth of it again,
// snapshots s2, deletes s1 (its blocks move into s2) and checks that the
// volume and s2 read as before. It returns the replica, closed.
func mergeOnce(t *testing.T, dir string, checksums bool) *Replica {
	t.Helper()
	const size = 4 << 20
	r, err := OpenWith(dir, "m1", size, 0, CreateOptions{Checksums: checksums})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	claimed(t, r, 1)
	if err := r.WriteAt(1, randBytes(size, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	if err := r.WriteAt(1, randBytes(size/10, 2), size/3, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "s2"); err != nil {
		t.Fatal(err)
	}
	head, s2 := readAll(t, r, 1), readSnap(t, r, "s2")
	if err := r.DeleteSnapshot(1, "s1", nil); err != nil {
		t.Fatal(err)
	}
	if i := firstDiff(readAll(t, r, 1), head); i >= 0 {
		t.Fatalf("after the merge the volume differs at byte %d", i)
	}
	if i := firstDiff(readSnap(t, r, "s2"), s2); i >= 0 {
		t.Fatalf("after the merge s2 differs at byte %d", i)
	}
	return r
}

// TestMergeMovesDataInTheKernel: on the test's file system (ext4 here), a
// merge without checksums moves its data with copy_file_range, none
// through this process; with checksums it reads and verifies every block
// it moves, then writes (or clones) it.
func TestMergeMovesDataInTheKernel(t *testing.T) {
	r := mergeOnce(t, t.TempDir(), false)
	t.Logf("without checksums: %d bytes cloned, %d copied in the kernel, %d written", r.moves.cloned.Load(), r.moves.copied.Load(), r.moves.written.Load())
	if r.moves.copied.Load()+r.moves.cloned.Load() == 0 || r.moves.written.Load() != 0 {
		t.Fatalf("the merge moved its data through this process (%d bytes written)", r.moves.written.Load())
	}
	moved := r.moves.copied.Load() + r.moves.cloned.Load()
	r = mergeOnce(t, t.TempDir(), true)
	if got := r.moves.written.Load() + r.moves.cloned.Load(); got != moved {
		t.Fatalf("with checksums %d bytes were verified and then written or cloned, want all %d the merge moved", got, moved)
	}
}

// TestMergeClonesOnXFS: on xfs with reflinks (made on a file by the test,
// mounted through a loop device), a merge with checksums verifies the
// blocks it moves and then clones them (FICLONERANGE): nothing is written.
func TestMergeClonesOnXFS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a file system (CI runs as root)")
	}
	mkfs, err := exec.LookPath("mkfs.xfs")
	if err != nil {
		t.Skip("mkfs.xfs is not installed (xfsprogs); make test installs it")
	}
	img, mnt := filepath.Join(t.TempDir(), "xfs.img"), t.TempDir()
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 320<<20); err != nil { // mkfs.xfs wants 300 MB at least
		t.Fatal(err)
	}
	run := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	run(mkfs, "-q", "-m", "reflink=1", img)
	run("mount", "-o", "loop", img, mnt)
	t.Cleanup(func() {
		// The loop device mount made goes with the unmount (autoclear).
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", mnt, err, out)
		}
	})
	r := mergeOnce(t, mnt, true)
	t.Logf("on xfs: %d bytes cloned, %d copied, %d written", r.moves.cloned.Load(), r.moves.copied.Load(), r.moves.written.Load())
	if r.moves.cloned.Load() == 0 || r.moves.written.Load() != 0 {
		t.Fatalf("the merge did not clone: %d bytes cloned, %d written", r.moves.cloned.Load(), r.moves.written.Load())
	}
}
