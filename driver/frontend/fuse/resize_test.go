//go:build linux

package fuse

import (
	"bytes"
	"errors"
	"os"
	"sync/atomic"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// growBackend is a memBackend whose size can be raised up to its data's
// length, as an engine's after an expansion.
type growBackend struct {
	*memBackend
	size atomic.Uint64
}

func (b *growBackend) Size() uint64 { return b.size.Load() }

// TestResizeGrowsFileAndLoop: after the backend grew, Resize gives the FUSE
// file the new size as the kernel sees it, RefreshLoopSize has the loop
// device take it, the new range takes writes through the device, and what
// was written before is intact. A backend that shrank is refused.
func TestResizeGrowsFileAndLoop(t *testing.T) {
	s := mountT(t)
	const from, to = 32 << 20, 64 << 20
	b := &growBackend{memBackend: newMemBackend(to)}
	b.size.Store(from)
	path, err := s.Add("vol-grow", b)
	if err != nil {
		t.Fatal(err)
	}
	dev := attachT(t, path)
	if got := sysfsValue(t, dev, "size"); got != "65536" {
		t.Fatalf("%s has %s sectors, want 65536", dev, got)
	}
	f, err := os.OpenFile(dev, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // O_DIRECT writes: nothing cached to lose
	fd := int(f.Fd())
	head := alignedBuf(1 << 20)
	for i := range head {
		head[i] = byte(i * 7)
	}
	if n, err := unix.Pwrite(fd, head, 0); err != nil || n != len(head) {
		t.Fatalf("write the first MiB: %d, %v", n, err)
	}

	b.size.Store(to)
	if got, err := s.Resize("vol-grow"); err != nil || got != to {
		t.Fatalf("Resize = %d, %v; want %d", got, err, to)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != to {
		t.Fatalf("the FUSE file is %v bytes (%v), want %d", fi.Size(), err, to)
	}
	if err := RefreshLoopSize(dev); err != nil {
		t.Fatal(err)
	}
	if got := sysfsValue(t, dev, "size"); got != "131072" {
		t.Fatalf("%s has %s sectors after the resize, want 131072", dev, got)
	}
	tail := alignedBuf(1 << 20)
	for i := range tail {
		tail[i] = 0x3c
	}
	if n, err := unix.Pwrite(fd, tail, to-int64(len(tail))); err != nil || n != len(tail) {
		t.Fatalf("write the new last MiB: %d, %v", n, err)
	}
	got := alignedBuf(1 << 20)
	for _, c := range []struct {
		off  int64
		want []byte
	}{{0, head}, {to - 1<<20, tail}} {
		if n, err := unix.Pread(fd, got, c.off); err != nil || n != len(got) || !bytes.Equal(got, c.want) {
			t.Fatalf("read back at %d: %d, %v, equal %v", c.off, n, err, bytes.Equal(got, c.want))
		}
	}

	b.size.Store(from / 2)
	if _, err := s.Resize("vol-grow"); !errors.Is(err, ErrInvalidSize) {
		t.Fatalf("Resize of a backend that shrank = %v, want ErrInvalidSize", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Size() != to {
		t.Fatalf("a refused resize left the file at %v bytes (%v), want %d", fi.Size(), err, to)
	}
	if _, err := s.Resize("no-such-volume"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Resize of an unknown file = %v, want ErrNotFound", err)
	}
}
