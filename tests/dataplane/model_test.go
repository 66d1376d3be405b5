package dataplane

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// blockSize is the unit of every write the tests make, and of the model.
const blockSize = 64 << 10

// Every write carries a write id. Its content is a function of the id and
// the block it lands on: a 16-byte header (id, block index) followed by a
// ChaCha8 stream seeded with both, so that a block read back names the write
// it came from and a torn or misplaced block is detected. Id 0 is the
// never-written block: all zeroes.
//
// The top byte of an id names a pattern (A, B, C …) so that a test can ask
// whether any byte of one pattern reached the volume.
const patternShift = 56

func writeID(pattern byte, n uint64) uint64 { return uint64(pattern)<<patternShift | n }

func patternOf(id uint64) byte { return byte(id >> patternShift) }

// blockContent fills p (blockSize bytes) with the content of write id at
// block b.
func blockContent(p []byte, id uint64, b int) {
	if id == 0 {
		clear(p)
		return
	}
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[0:], id)
	binary.LittleEndian.PutUint64(seed[8:], uint64(b))
	binary.LittleEndian.PutUint64(seed[16:], 0x6361_6972_6e64_7031) // "cairndp1"
	rng := rand.NewChaCha8(seed)
	_, _ = rng.Read(p[16:])
	binary.BigEndian.PutUint64(p[0:], id)
	binary.BigEndian.PutUint64(p[8:], uint64(b))
}

// describeBlock says which write a block read back seems to come from.
func describeBlock(p []byte) string {
	if !slices.ContainsFunc(p, func(c byte) bool { return c != 0 }) {
		return "all zeroes"
	}
	id, b := binary.BigEndian.Uint64(p[0:]), binary.BigEndian.Uint64(p[8:])
	return fmt.Sprintf("header says write %#x (pattern %q) for block %d", id, patternOf(id), b)
}

// model is what the volume must hold: for every block, the id of the last
// acknowledged write, plus the writes whose outcome is unknown (they failed
// or were in flight when a connection broke) and may or may not have landed.
// Writes are whole blocks and a block never has two writes in flight at
// once, so a later acknowledged write supersedes every earlier one.
type model struct {
	mu       sync.Mutex
	acked    []uint64
	maybe    [][]uint64
	inflight []bool
}

func newModel(size uint64) *model {
	n := int(size / blockSize)
	return &model{acked: make([]uint64, n), maybe: make([][]uint64, n), inflight: make([]bool, n)}
}

func (m *model) blocks() int { return len(m.acked) }

// begin reserves block b for one write; false if a write to it is in flight.
func (m *model) begin(b int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.inflight[b] {
		return false
	}
	m.inflight[b] = true
	return true
}

// end records the outcome of write id to block b: acknowledged (err == nil)
// or unknown.
func (m *model) end(b int, id uint64, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.inflight[b] = false
	if err == nil {
		m.acked[b] = id
		m.maybe[b] = nil
		return
	}
	m.maybe[b] = append(m.maybe[b], id)
}

// allowed lists the ids block b may hold.
func (m *model) allowed(b int) []uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]uint64{m.acked[b]}, m.maybe[b]...)
}

// uncertain counts the blocks whose content is not fixed by the model.
func (m *model) uncertain() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, ids := range m.maybe {
		if len(ids) > 0 {
			n++
		}
	}
	return n
}

// write writes block b with id through c and records the outcome.
func (m *model) write(ctx context.Context, c *nbdConn, b int, id uint64, fua bool) error {
	for !m.begin(b) {
		time.Sleep(time.Millisecond)
	}
	p := make([]byte, blockSize)
	blockContent(p, id, b)
	err := c.WriteAt(ctx, p, uint64(b)*blockSize, fua)
	m.end(b, id, err)
	return err
}

// fill writes every block in [first, last) with pattern, qd writes at a
// time; it fails the test on the first error.
func (m *model) fill(t *testing.T, c *nbdConn, pattern byte, first, last, qd int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var next atomic.Int64
	next.Store(int64(first))
	var wg sync.WaitGroup
	errs := make(chan error, qd)
	for range qd {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				b := int(next.Add(1) - 1)
				if b >= last {
					return
				}
				if err := m.write(ctx, c, b, writeID(pattern, uint64(b)+1), false); err != nil {
					errs <- fmt.Errorf("write block %d: %w", b, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		t.Fatalf("fill blocks [%d,%d) with pattern %q: %v", first, last, pattern, err)
	}
}

// check reads the whole volume through c (chunk bytes per request, qd at a
// time) and compares every block with the model; forbidden patterns must not
// appear at all. It returns a description of the first mismatches, or nil.
func (m *model) check(ctx context.Context, c *nbdConn, forbidden ...byte) error {
	const chunk = 1 << 20
	const qd = 8
	size := uint64(m.blocks()) * blockSize
	if c.Size() != size {
		return fmt.Errorf("export size %d, model size %d", c.Size(), size)
	}
	var mu sync.Mutex
	var problems []string
	var firstErr error
	sem := make(chan struct{}, qd)
	var wg sync.WaitGroup
	for off := uint64(0); off < size; off += chunk {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			buf := make([]byte, min(chunk, size-off))
			if err := c.ReadAt(ctx, buf, off); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("read %d bytes at %d: %w", len(buf), off, err)
				}
				mu.Unlock()
				return
			}
			want := make([]byte, blockSize)
			for i := 0; i < len(buf); i += blockSize {
				b := int((off + uint64(i)) / blockSize)
				got := buf[i : i+blockSize]
				var why string
				if id := binary.BigEndian.Uint64(got); id != 0 && slices.Contains(forbidden, patternOf(id)) {
					why = "holds a write of forbidden pattern"
				} else {
					match := false
					for _, id := range m.allowed(b) {
						blockContent(want, id, b)
						if bytes.Equal(got, want) {
							match = true
							break
						}
					}
					if !match {
						why = "matches no allowed write"
					}
				}
				if why != "" {
					mu.Lock()
					problems = append(problems, fmt.Sprintf("block %d (offset %d) %s: allowed %#x, %s", b, uint64(b)*blockSize, why, m.allowed(b), describeBlock(got)))
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if len(problems) > 0 {
		slices.Sort(problems)
		n := len(problems)
		if len(problems) > 8 {
			problems = problems[:8]
		}
		return fmt.Errorf("%d of %d blocks differ from the model:\n  %s", n, m.blocks(), joinLines(problems))
	}
	return nil
}

func joinLines(s []string) string {
	var b bytes.Buffer
	for i, l := range s {
		if i > 0 {
			b.WriteString("\n  ")
		}
		b.WriteString(l)
	}
	return b.String()
}

// streamWriter streams whole-block writes with random (seeded) block numbers
// through one connection, qd at a time, recording every outcome in the
// model. The blocks it picks come from region, which a test may narrow while
// it runs.
type streamWriter struct {
	m       *model
	c       *nbdConn
	pattern byte

	region atomic.Pointer[[2]int] // [first, last) blocks to write
	seq    atomic.Uint64
	acked  atomic.Int64
	failed atomic.Int64

	mu       sync.Mutex
	firstErr error
	errAt    time.Time

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// startWriter starts qd writer goroutines; stopOnError makes each stop at
// its first failed write (for a connection that is expected to break).
func startWriter(t *testing.T, m *model, c *nbdConn, pattern byte, seed uint64, qd int, stopOnError bool) *streamWriter {
	ctx, cancel := context.WithCancel(context.Background())
	w := &streamWriter{m: m, c: c, pattern: pattern, cancel: cancel}
	w.setRegion(0, m.blocks())
	for i := range qd {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			for ctx.Err() == nil {
				r := w.region.Load()
				b := r[0] + rng.IntN(r[1]-r[0])
				if !m.begin(b) {
					continue
				}
				id := writeID(pattern, w.seq.Add(1))
				p := make([]byte, blockSize)
				blockContent(p, id, b)
				// Writes are never cancelled by the test: a write the test
				// gave up on would have an unknown outcome for no reason.
				err := c.WriteAt(context.Background(), p, uint64(b)*blockSize, false)
				m.end(b, id, err)
				if err == nil {
					w.acked.Add(1)
					continue
				}
				w.failed.Add(1)
				w.mu.Lock()
				if w.firstErr == nil {
					w.firstErr, w.errAt = fmt.Errorf("write %#x to block %d: %w", id, b, err), time.Now()
				}
				w.mu.Unlock()
				if stopOnError || errors.Is(err, errNBDClosed) {
					return
				}
			}
		}()
	}
	t.Cleanup(w.stop)
	return w
}

func (w *streamWriter) setRegion(first, last int) { w.region.Store(&[2]int{first, last}) }

// stop ends the stream and waits for the writes in flight.
func (w *streamWriter) stop() {
	w.cancel()
	w.wg.Wait()
}

func (w *streamWriter) err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.firstErr
}

// waitAcked waits until n more writes than now have been acknowledged.
func (w *streamWriter) waitAcked(t *testing.T, n int64, timeout time.Duration, what string) {
	t.Helper()
	target := w.acked.Load() + n
	eventually(t, timeout, what, func() error {
		if err := w.err(); err != nil {
			return stopPolling(err)
		}
		if got := w.acked.Load(); got < target {
			return fmt.Errorf("%d of %d writes acknowledged", got, target)
		}
		return nil
	})
}
