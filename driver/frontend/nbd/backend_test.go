package nbd

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
)

// callCounts records which backend methods were called and how.
type callCounts struct {
	reads, writes, flushes, trims, zeroes atomic.Int64
	fuaWrites, fuaZeroes                  atomic.Int64
}

// mutating reports the calls that may change content.
func (c *callCounts) mutating() int64 {
	return c.writes.Load() + c.trims.Load() + c.zeroes.Load()
}

func (c *callCounts) total() int64 {
	return c.reads.Load() + c.flushes.Load() + c.mutating()
}

// fileBackend serves a sparse file, like a replica's data file: TRIM and
// WRITE_ZEROES punch holes, FLUSH and FUA fdatasync.
type fileBackend struct {
	callCounts
	f    *os.File
	size uint64
	// fail, when set, is returned by every I/O call.
	fail atomic.Pointer[error]
}

func newFileBackend(t testing.TB, size uint64) *fileBackend {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "volume.img"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(size)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	return &fileBackend{f: f, size: size}
}

func (b *fileBackend) injected() error {
	if p := b.fail.Load(); p != nil {
		return *p
	}
	return nil
}

func (b *fileBackend) Size() uint64 { return b.size }

func (b *fileBackend) ReadAt(ctx context.Context, p []byte, off uint64) error {
	b.reads.Add(1)
	if err := b.injected(); err != nil {
		return err
	}
	_, err := b.f.ReadAt(p, int64(off))
	return err
}

func (b *fileBackend) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	b.writes.Add(1)
	if fua {
		b.fuaWrites.Add(1)
	}
	if err := b.injected(); err != nil {
		return err
	}
	if _, err := b.f.WriteAt(p, int64(off)); err != nil {
		return err
	}
	if fua {
		return syscall.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

func (b *fileBackend) Flush(ctx context.Context) error {
	b.flushes.Add(1)
	if err := b.injected(); err != nil {
		return err
	}
	return syscall.Fdatasync(int(b.f.Fd()))
}

// fallocPunchHole is FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE.
const fallocPunchHole = 0x3

func (b *fileBackend) Trim(ctx context.Context, off, length uint64) error {
	b.trims.Add(1)
	if err := b.injected(); err != nil {
		return err
	}
	return syscall.Fallocate(int(b.f.Fd()), fallocPunchHole, int64(off), int64(length))
}

func (b *fileBackend) WriteZeroes(ctx context.Context, off, length uint64, fua bool) error {
	b.zeroes.Add(1)
	if fua {
		b.fuaZeroes.Add(1)
	}
	if err := b.injected(); err != nil {
		return err
	}
	if err := syscall.Fallocate(int(b.f.Fd()), fallocPunchHole, int64(off), int64(length)); err != nil {
		return err
	}
	if fua {
		return syscall.Fdatasync(int(b.f.Fd()))
	}
	return nil
}

// memBackend keeps the export in memory and reports any call outside the
// export, which the server must never make.
type memBackend struct {
	callCounts
	mu   sync.Mutex
	data []byte
	// bad collects calls the server should not have made.
	bad atomic.Pointer[string]
}

func newMemBackend(size int) *memBackend { return &memBackend{data: make([]byte, size)} }

func (b *memBackend) Size() uint64 { return uint64(len(b.data)) }

func (b *memBackend) check(op string, off, n uint64) bool {
	if n == 0 || off > uint64(len(b.data)) || n > uint64(len(b.data))-off {
		msg := fmt.Sprintf("%s off=%d len=%d outside export of %d bytes (or empty)", op, off, n, len(b.data))
		b.bad.Store(&msg)
		return false
	}
	return true
}

func (b *memBackend) ReadAt(ctx context.Context, p []byte, off uint64) error {
	b.reads.Add(1)
	if !b.check("read", off, uint64(len(p))) {
		return syscall.EINVAL
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	copy(p, b.data[off:])
	return nil
}

func (b *memBackend) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	b.writes.Add(1)
	if !b.check("write", off, uint64(len(p))) {
		return syscall.EINVAL
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	copy(b.data[off:], p)
	return nil
}

func (b *memBackend) Flush(ctx context.Context) error {
	b.flushes.Add(1)
	return nil
}

func (b *memBackend) Trim(ctx context.Context, off, length uint64) error {
	b.trims.Add(1)
	return b.zero("trim", off, length)
}

func (b *memBackend) WriteZeroes(ctx context.Context, off, length uint64, fua bool) error {
	b.zeroes.Add(1)
	return b.zero("write_zeroes", off, length)
}

func (b *memBackend) zero(op string, off, length uint64) error {
	if !b.check(op, off, length) {
		return syscall.EINVAL
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	clear(b.data[off : off+length])
	return nil
}
