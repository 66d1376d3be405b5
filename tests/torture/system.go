package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// loopFS is a small ext4 file system in an image file, loop-mounted as one
// node's data dir, that the disk-full fault fills up.
type loopFS struct {
	img, mnt string
	filler   string // the file that takes the free space, while the fault lasts
}

// makeLoopFS creates a sparse image of size bytes, makes ext4 on it (no
// blocks reserved for root: the node agents run as root) and mounts it on mnt
// through a loop device that the kernel detaches at unmount (autoclear).
func makeLoopFS(ctx context.Context, img, mnt string, size uint64) (*loopFS, error) {
	f, err := os.Create(img)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(int64(size)); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", img).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mkfs.ext4 %s: %v: %s", img, err, strings.TrimSpace(string(out)))
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return nil, err
	}
	if out, err := exec.CommandContext(ctx, "mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("mount -o loop %s %s: %v: %s", img, mnt, err, strings.TrimSpace(string(out)))
	}
	return &loopFS{img: img, mnt: mnt, filler: filepath.Join(mnt, "torture-filler")}, nil
}

// fill takes every free block of the file system with one preallocated
// file, halving the request on ENOSPC down to one block, and returns how
// many bytes it took.
func (l *loopFS) fill() (int64, error) {
	f, err := os.OpenFile(l.filler, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return 0, err
	}
	var off int64
	for chunk := int64(64 << 20); chunk >= 4096; {
		err := unix.Fallocate(int(f.Fd()), 0, off, chunk)
		switch {
		case err == nil:
			off += chunk
		case errors.Is(err, unix.ENOSPC):
			chunk /= 2
		default:
			f.Close()
			return off, fmt.Errorf("fallocate %s: %w", l.filler, err)
		}
	}
	return off, f.Close()
}

// unfill gives the space back.
func (l *loopFS) unfill() error {
	if err := os.Remove(l.filler); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// free returns the bytes available on the file system.
func (l *loopFS) free() uint64 {
	var st unix.Statfs_t
	if err := unix.Statfs(l.mnt, &st); err != nil {
		return 0
	}
	return st.Bavail * uint64(st.Bsize)
}

// unmount unmounts the file system if it is still mounted (`dev down`
// unmounts whatever lies under the cluster's directory) and detaches any
// loop device still backed by the image.
func (l *loopFS) unmount() error {
	var errs []error
	if mounted(l.mnt) {
		if err := unix.Unmount(l.mnt, 0); err != nil {
			if err := unix.Unmount(l.mnt, unix.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", l.mnt, err))
			}
		}
	}
	out, err := exec.Command("losetup", "-j", l.img, "-O", "NAME", "-n").Output()
	if err == nil {
		for _, dev := range strings.Fields(string(out)) {
			if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("losetup -d %s: %v: %s", dev, err, strings.TrimSpace(string(out))))
			}
		}
	}
	return errors.Join(errs...)
}

// mounted reports whether dir is a mount point (per /proc/self/mountinfo).
func mounted(dir string) bool {
	raw, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

// nftTable is this process's own nftables table: the partition fault puts
// its rules there, and removing the table removes them all at once.
//
// On loopback every connection between node agents leaves from 127.0.0.1
// (see internal/loopback), so flows can only be told apart by the address they
// were made to. The partition therefore cuts the replica server address of
// the victim node (both directions: requests to it and its replies), which
// is the engine's only path to that replica; raft and the meta API still
// connect.
type nftTable struct {
	name string
	have bool // the table exists
}

func newNFTTable() *nftTable {
	return &nftTable{name: fmt.Sprintf("cairn_torture_%d", os.Getpid())}
}

// nftAvailable says why nft cannot be used, or nil.
func nftAvailable() error {
	if _, err := exec.LookPath("nft"); err != nil {
		return errors.New("nft not found: the partition fault needs nftables (apt-get install -y nftables)")
	}
	return nil
}

// dropTCP drops every TCP packet to and from hostport in the output hook
// (loopback traffic passes it once, from the sender).
func (t *nftTable) dropTCP(hostport string) error {
	host, port, ok := strings.Cut(hostport, ":")
	if !ok {
		return fmt.Errorf("bad address %q", hostport)
	}
	rules := fmt.Sprintf(`table inet %[1]s {
	chain out {
		type filter hook output priority 0; policy accept;
		ip daddr %[2]s tcp dport %[3]s drop
		ip saddr %[2]s tcp sport %[3]s drop
	}
}
`, t.name, host, port)
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	t.have = true // even a failed load may have made the table
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// remove deletes the table and its rules (nothing if there is none).
func (t *nftTable) remove() error {
	if !t.have {
		return nil
	}
	out, err := exec.Command("nft", "delete", "table", "inet", t.name).CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No such file") {
		return fmt.Errorf("nft delete table inet %s: %v: %s", t.name, err, strings.TrimSpace(string(out)))
	}
	t.have = false
	return nil
}

// flipBit inverts one bit of the file at path, at byte offset off, in place
// (through the page cache, as the replica server reads it).
func flipBit(path string, off int64, bit uint) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	var b [1]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		f.Close()
		return fmt.Errorf("read %s at %d: %w", path, off, err)
	}
	b[0] ^= 1 << (bit % 8)
	if _, err := f.WriteAt(b[:], off); err != nil {
		f.Close()
		return fmt.Errorf("write %s at %d: %w", path, off, err)
	}
	return f.Close()
}

// isRoot fails clearly when the campaign cannot run: it needs root for
// mount, loop devices, nftables and signalling the nodes.
func isRoot() error {
	if syscall.Geteuid() != 0 {
		return errors.New("the torture campaign needs root (loop devices, mount, nftables, FUSE in the node agents); run it as root, as CI does")
	}
	return nil
}
