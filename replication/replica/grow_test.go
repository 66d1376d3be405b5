package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// growSizes: an old size that ends inside a checksum block and inside an
// extent, and a new one several extents further.
const (
	growOld = 3*testExtent + 5*SectorSize
	growNew = 11*testExtent + 3*SectorSize
)

func openGrowTest(t *testing.T, dir string, sums bool) *Replica {
	t.Helper()
	r, err := OpenWith(dir, "r1", growOld, testExtent, CreateOptions{Checksums: sums})
	if err != nil {
		t.Fatalf("OpenWith: %v", err)
	}
	return r
}

func reopen(t *testing.T, dir string) *Replica {
	t.Helper()
	r, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatalf("reopen: %v", err)
	}
	return r
}

// checkGrown reads the whole replica: old must be its start, zeros the rest.
func checkGrown(t *testing.T, r *Replica, epoch uint64, old []byte, size uint64) {
	t.Helper()
	if got := r.Size(); got != size {
		t.Fatalf("Size() = %d, want %d", got, size)
	}
	if got, want := r.Extents(), extentCount(size, testExtent); got != want {
		t.Fatalf("Extents() = %d, want %d", got, want)
	}
	all := readAll(t, r, epoch)
	if i := firstDiff(all[:len(old)], old); i >= 0 {
		t.Fatalf("data before the old end changed at byte %d", i)
	}
	if !bytes.Equal(all[len(old):], make([]byte, len(all)-len(old))) {
		t.Fatal("the grown range does not read as zeros")
	}
	if _, err := r.Checksums(epoch, 0, r.Extents()); err != nil {
		t.Fatalf("Checksums over the grown replica: %v", err)
	}
}

// TestGrow: a grow keeps every byte below the old end, the new range reads
// as zeros (and verifies, with checksums), writes reach the new end, the
// new size survives a reopen, and growing again to a reached size or less
// changes nothing.
func TestGrow(t *testing.T) {
	for _, sums := range []bool{false, true} {
		t.Run(fmt.Sprintf("checksums=%v", sums), func(t *testing.T) {
			dir := t.TempDir()
			r := openGrowTest(t, dir, sums)
			claimed(t, r, 2)
			old := randBytes(growOld, 1)
			if err := r.WriteAt(2, old, 0, false); err != nil {
				t.Fatal(err)
			}
			if err := r.Grow(2, growNew); err != nil {
				t.Fatalf("Grow: %v", err)
			}
			checkGrown(t, r, 2, old, growNew)
			if m := decodeMetaFile(t, filepath.Join(dir, "r1", metaFileName)); m.Size != growNew {
				t.Fatalf("meta file says size %d, want %d", m.Size, growNew)
			}
			// The last block and extent, past the old end, take writes
			// and are tracked dirty like any other.
			tail := randBytes(2*SumBlockSize, 2)
			if err := r.WriteAt(2, tail, growNew-uint64(len(tail)), true); err != nil {
				t.Fatalf("write at the new end: %v", err)
			}
			if d := r.DirtyExtents(); d[len(d)-1] != extentCount(growNew, testExtent)-1 {
				t.Fatalf("dirty extents %v do not include the new last extent", d)
			}
			// Growing to the size reached, or to less, is a success that
			// changes nothing.
			for _, size := range []uint64{growNew, growOld, SectorSize} {
				if err := r.Grow(2, size); err != nil {
					t.Fatalf("Grow(%d) after growing to %d: %v", size, growNew, err)
				}
				if r.Size() != growNew {
					t.Fatalf("Grow(%d) changed the size to %d", size, r.Size())
				}
			}
			if err := r.Close(); err != nil {
				t.Fatal(err)
			}
			r = reopen(t, dir)
			defer r.Close()
			want := append(append([]byte{}, old...), make([]byte, growNew-growOld)...)
			copy(want[growNew-uint64(len(tail)):], tail)
			if got := readAll(t, r, 2); !bytes.Equal(got, want) {
				t.Fatalf("after reopen the replica differs at byte %d", firstDiff(got, want))
			}
		})
	}
}

// TestGrowEpochAndArguments: Grow is fenced like any change, and refuses
// a size that is not whole sectors; neither changes the replica.
func TestGrowEpochAndArguments(t *testing.T) {
	r := openGrowTest(t, t.TempDir(), true)
	defer r.Close()
	claimed(t, r, 5)
	for _, tc := range []struct {
		epoch, size uint64
		want        error
	}{
		{4, growNew, ErrFenced},
		{6, growNew, ErrNotClaimed},
		{5, growNew + 1, ErrInvalidArgument},
		{5, MaxExtents*testExtent + testExtent, ErrInvalidArgument},
	} {
		if err := r.Grow(tc.epoch, tc.size); !errors.Is(err, tc.want) {
			t.Errorf("Grow(epoch %d, size %d) = %v, want %v", tc.epoch, tc.size, err, tc.want)
		}
		if r.Size() != growOld {
			t.Fatalf("a refused grow changed the size to %d", r.Size())
		}
	}
}

// TestGrowCrashAtEveryStep: a grow stopped after any of its durable steps
// (as a crash would stop it) leaves a replica that opens, at the old size
// before the meta file was rewritten and at the new one after, with every
// byte intact; a retried grow then finishes it.
func TestGrowCrashAtEveryStep(t *testing.T) {
	crash := errors.New("crash")
	for _, sums := range []bool{false, true} {
		for _, step := range []growStep{growStepData, growStepSums, growStepMeta} {
			if step == growStepSums && !sums {
				continue
			}
			t.Run(fmt.Sprintf("checksums=%v/step=%d", sums, step), func(t *testing.T) {
				dir := t.TempDir()
				r := openGrowTest(t, dir, sums)
				claimed(t, r, 1)
				old := randBytes(growOld, 3)
				if err := r.WriteAt(1, old, 0, false); err != nil {
					t.Fatal(err)
				}
				if err := r.Flush(1); err != nil {
					t.Fatal(err)
				}
				growHook = func(s growStep) error {
					if s == step {
						return crash
					}
					return nil
				}
				err := r.Grow(1, growNew)
				growHook = nil
				if !errors.Is(err, crash) {
					t.Fatalf("Grow = %v, want the crash", err)
				}
				// The process dies here: only the files count.
				if err := r.Close(); err != nil {
					t.Fatal(err)
				}
				r = reopen(t, dir)
				want := uint64(growOld)
				if step == growStepMeta {
					want = growNew
				}
				checkGrown(t, r, 1, old, want)
				if err := r.Grow(1, growNew); err != nil {
					t.Fatalf("retried Grow: %v", err)
				}
				checkGrown(t, r, 1, old, growNew)
				if err := r.Close(); err != nil {
					t.Fatal(err)
				}
				r = reopen(t, dir)
				checkGrown(t, r, 1, old, growNew)
				if err := r.Close(); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

// TestGrowWhileIO: writes, verified reads and checksum scans run while the
// replica grows (the race detector watches the size, the bitmaps and the
// sums mapping), and every byte below the old end is kept. The writer keeps
// to the first extent and the readers to the rest: a read racing a write
// of the same block may see the data before its sum (the engine orders
// them with its range locks), which is not what this test is about.
func TestGrowWhileIO(t *testing.T) {
	r := openGrowTest(t, t.TempDir(), true)
	defer r.Close()
	claimed(t, r, 1)
	want := randBytes(growOld, 9)
	if err := r.WriteAt(1, want, 0, false); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	errs := make(chan error, 3)
	var mu sync.Mutex
	wg.Add(3)
	go func() { // writer: 4 KiB blocks of the first extent
		defer wg.Done()
		for i := uint64(0); ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			off := (i * 7 % (testExtent / SumBlockSize)) * SumBlockSize
			b := randBytes(SumBlockSize, i)
			mu.Lock()
			err := r.WriteAt(1, b, off, false)
			if err == nil {
				copy(want[off:], b)
			}
			mu.Unlock()
			if err != nil {
				errs <- err
				return
			}
		}
	}()
	go func() { // reader of verified blocks past the first extent
		defer wg.Done()
		p := make([]byte, growOld-testExtent)
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := r.ReadAt(1, p, testExtent); err != nil {
				errs <- err
				return
			}
			if i := firstDiff(p, want[testExtent:]); i >= 0 {
				errs <- fmt.Errorf("read byte %d past the first extent differs", testExtent+i)
				return
			}
		}
	}()
	go func() { // scanner over whatever extents there are past the first
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := r.Checksums(1, 1, r.Extents()-1); err != nil && !errors.Is(err, ErrOutOfRange) {
				errs <- err
				return
			}
		}
	}()
	for size := uint64(growOld); size < growNew; size += testExtent {
		time.Sleep(5 * time.Millisecond)
		if err := r.Grow(1, size+testExtent/2); err != nil {
			t.Fatalf("Grow: %v", err)
		}
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("I/O during grow: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	got := readAll(t, r, 1)
	if i := firstDiff(got[:growOld], want); i >= 0 {
		t.Fatalf("byte %d below the old end differs after the grows", i)
	}
}

// TestGrowOverTheWire: GROW is epoch-checked on the server like the other
// ops, and a new connection sees the new size.
func TestGrowOverTheWire(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	if _, err := s.CreateWith("r1", growOld, CreateOptions{Checksums: true}); err != nil {
		t.Fatal(err)
	}
	c := dial(t, addr, "r1", 0)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Claim(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if err := c.Grow(ctx, 2, growNew); !errors.Is(err, ErrFenced) {
		t.Fatalf("Grow with an older epoch = %v, want ErrFenced", err)
	}
	if err := c.Grow(ctx, 3, growNew); err != nil {
		t.Fatalf("Grow: %v", err)
	}
	if err := c.Grow(ctx, 3, growNew); err != nil {
		t.Fatalf("repeated Grow: %v", err)
	}
	if err := c.WriteAt(ctx, 3, make([]byte, SumBlockSize), growNew-SumBlockSize, false); err != nil {
		t.Fatalf("write at the new end: %v", err)
	}
	if got := dial(t, addr, "r1", 0).Opened().Size; got != growNew {
		t.Fatalf("a new connection opens size %d, want %d", got, growNew)
	}
	dial(t, addr, "r1", growNew) // OPEN with the expected size passes
}
