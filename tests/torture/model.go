package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cairn-csi/cairn/tests/nbdclient"
)

// blockSize is the unit of every write and of the model.
const blockSize = 64 << 10

// Every write has an id, unique and increasing within a round. Its content
// is a function of the id, the block it lands on and the round's salt: a
// 24-byte header (id, block, salt) followed by a ChaCha8 stream seeded with
// all three, so that a block read back names the write it came from, and a
// torn, misplaced or corrupted block matches nothing. Id 0 is the
// never-written block: all zeroes.

// blockContent fills p (blockSize bytes) with the content of write id at
// block b.
func blockContent(p []byte, salt, id uint64, b int) {
	if id == 0 {
		clear(p)
		return
	}
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[0:], id)
	binary.LittleEndian.PutUint64(seed[8:], uint64(b))
	binary.LittleEndian.PutUint64(seed[16:], salt)
	binary.LittleEndian.PutUint64(seed[24:], 0x6361_6972_6e74_7274) // "cairntrt"
	rng := rand.NewChaCha8(seed)
	_, _ = rng.Read(p[24:])
	binary.BigEndian.PutUint64(p[0:], id)
	binary.BigEndian.PutUint64(p[8:], uint64(b))
	binary.BigEndian.PutUint64(p[16:], salt)
}

// model is what the volume must hold: for every block, the id of the last
// acknowledged write and the writes after it whose outcome is unknown (an
// error reply or a broken connection: they may or may not have landed).
// A block never has two writes in flight at once (busy), so the ids of one
// block's writes increase in the order they were made, and an acknowledged
// write supersedes every earlier one.
//
// It also keeps every block's writes with the times they started and ended
// (hist), so that a snapshot can be judged against the volume as it was
// when the snapshot was taken (judgeAt), not as it is at the end.
type model struct {
	salt uint64
	seq  atomic.Uint64

	mu    sync.Mutex
	acked []uint64
	maybe [][]uint64
	busy  []bool // a write in flight, or the block held by a fault
	hist  [][]writeRec
}

// writeRec is one write of a block: when it was sent and when its answer
// came (the zero time while it is in flight), and whether it was
// acknowledged.
type writeRec struct {
	id         uint64
	start, end time.Time
	ok, fua    bool
}

func newModel(size, salt uint64) *model {
	n := int(size / blockSize)
	return &model{salt: salt, acked: make([]uint64, n), maybe: make([][]uint64, n), busy: make([]bool, n), hist: make([][]writeRec, n)}
}

func (m *model) blocks() int { return len(m.acked) }

// begin reserves block b for one write (or a fault); false if it is busy.
func (m *model) begin(b int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.busy[b] {
		return false
	}
	m.busy[b] = true
	return true
}

// release frees a block reserved with begin and not written.
func (m *model) release(b int) {
	m.mu.Lock()
	m.busy[b] = false
	m.mu.Unlock()
}

// startAt records that write id to block b (reserved with begin) was sent
// at t. It is taken before the request goes out, so that no write counts
// as started later than it did.
func (m *model) startAt(b int, id uint64, t time.Time, fua bool) {
	m.mu.Lock()
	m.hist[b] = append(m.hist[b], writeRec{id: id, start: t, fua: fua})
	m.mu.Unlock()
}

// when describes write id of block b for a report: when it was sent and
// answered, and whether it had FUA.
func (m *model) when(b int, id uint64) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := slices.IndexFunc(m.hist[b], func(w writeRec) bool { return w.id == id })
	if i < 0 {
		return ""
	}
	w := m.hist[b][i]
	s := " (sent " + w.start.Format("15:04:05.000")
	switch {
	case w.end.IsZero():
		s += ", no answer"
	case w.ok:
		s += ", acknowledged " + w.end.Format("15:04:05.000")
	default:
		s += ", failed " + w.end.Format("15:04:05.000")
	}
	if w.fua {
		s += ", FUA"
	}
	return s + ")"
}

// end records the outcome of write id to block b: acknowledged (err == nil)
// or unknown.
func (m *model) end(b int, id uint64, err error) { m.endAt(b, id, err, time.Now()) }

// endAt is end with the time the answer came, taken after it came: a write
// never counts as acknowledged earlier than it was.
func (m *model) endAt(b int, id uint64, err error, t time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.busy[b] = false
	h := m.hist[b]
	if len(h) == 0 || h[len(h)-1].id != id {
		// Not started through startAt (the unit tests): it started as late
		// as it could have.
		h = append(h, writeRec{id: id, start: t})
	}
	h[len(h)-1].end, h[len(h)-1].ok = t, err == nil
	m.hist[b] = h
	if err == nil {
		m.acked[b] = id
		m.maybe[b] = nil
		return
	}
	m.maybe[b] = append(m.maybe[b], id)
}

// written reports whether block b holds an acknowledged write.
func (m *model) written(b int) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.acked[b] != 0
}

// uncertain counts the blocks whose content the model does not pin down.
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

// write writes block b through c (the block must have been reserved with
// begin) and records the outcome.
func (m *model) write(ctx context.Context, c *nbdclient.Conn, b int, fua bool) (uint64, error) {
	id := m.seq.Add(1)
	p := make([]byte, blockSize)
	blockContent(p, m.salt, id, b)
	m.startAt(b, id, time.Now(), fua)
	err := c.WriteAt(ctx, p, uint64(b)*blockSize, fua)
	m.end(b, id, err)
	return id, err
}

// fill writes every block in [first, last), qd at a time, and fails on the
// first error.
func (m *model) fill(ctx context.Context, c *nbdclient.Conn, first, last, qd int) error {
	var next atomic.Int64
	next.Store(int64(first))
	var wg sync.WaitGroup
	errs := make(chan error, qd)
	for range qd {
		wg.Go(func() {
			for ctx.Err() == nil {
				b := int(next.Add(1) - 1)
				if b >= last {
					return
				}
				for !m.begin(b) {
					time.Sleep(time.Millisecond)
				}
				if _, err := m.write(ctx, c, b, false); err != nil {
					errs <- fmt.Errorf("write block %d: %w", b, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	return ctx.Err()
}

// verdict is what one block read back is, against the model.
type verdict int

const (
	blockOK    verdict = iota // the last acknowledged write or an uncertain one after it
	blockStale                // an older write of this block: an acknowledged write was rolled back
	blockLost                 // no write of this block at all: zeroes, corrupt, torn or misplaced data
	blockNewer                // in a snapshot: a write that started after the snapshot was taken
)

// judge classifies the content got of block b; why describes anything but
// blockOK. want is scratch space of blockSize bytes.
func (m *model) judge(b int, got, want []byte) (v verdict, why string) {
	m.mu.Lock()
	acked, maybe := m.acked[b], slices.Clone(m.maybe[b])
	m.mu.Unlock()
	for _, id := range append([]uint64{acked}, maybe...) {
		blockContent(want, m.salt, id, b)
		if bytes.Equal(got, want) {
			return blockOK, ""
		}
	}
	allowed := fmt.Sprintf("last acknowledged write %#x%s", acked, m.when(b, acked))
	if len(maybe) > 0 {
		allowed += fmt.Sprintf(", uncertain %#x", maybe)
	}
	if !slices.ContainsFunc(got, func(c byte) bool { return c != 0 }) {
		return blockLost, "reads back as zeroes; " + allowed
	}
	id, hb, salt := binary.BigEndian.Uint64(got[0:]), binary.BigEndian.Uint64(got[8:]), binary.BigEndian.Uint64(got[16:])
	if salt == m.salt && hb == uint64(b) && id != 0 && id < acked {
		blockContent(want, m.salt, id, b)
		if bytes.Equal(got, want) {
			return blockStale, fmt.Sprintf("holds the older write %#x%s; %s", id, m.when(b, id), allowed)
		}
	}
	desc := fmt.Sprintf("header says write %#x for block %d", id, hb)
	if salt != m.salt {
		desc = "header is not one of this round's writes"
	} else if hb == uint64(b) {
		blockContent(want, m.salt, id, b)
		if n := diffBytes(got, want); n > 0 && n <= 16 {
			desc += fmt.Sprintf(", %d bytes differ from that write (first at byte %d)", n, firstDiff(got, want))
		}
	}
	return blockLost, "matches no write (" + desc + "); " + allowed
}

// judgeAt classifies the content got of block b in a snapshot that was
// asked for at called and reported ready at returned. The snapshot is a cut
// of the volume somewhere in between, so it may hold the last write
// acknowledged before called (zeroes if there was none), or any later write
// of the block that started before returned (acknowledged or not: the cut
// may fall before or after it). An older write is stale, a write started
// after returned is newer, anything else is lost. want is scratch space of
// blockSize bytes.
//
// A block's content names its write in its header, so only that write is
// generated and compared, however many writes the block had meanwhile.
func (m *model) judgeAt(b int, got, want []byte, called, returned time.Time) (v verdict, why string) {
	m.mu.Lock()
	h := slices.Clone(m.hist[b])
	m.mu.Unlock()
	// last: the last write acknowledged before the call. Writes of a block
	// do not overlap, so their answers come in the order of their ids.
	last := -1
	for i, w := range h {
		if w.ok && w.end.Before(called) {
			last = i
		}
	}
	allowed := func() string {
		s := "zeroes (nothing acknowledged before the snapshot was asked for)"
		if last >= 0 {
			s = fmt.Sprintf("write %#x (acknowledged %s before the snapshot was asked for)", h[last].id, called.Sub(h[last].end).Round(time.Microsecond))
		}
		var later []string
		for _, w := range h[last+1:] {
			if w.start.Before(returned) {
				later = append(later, fmt.Sprintf("%#x", w.id))
			}
		}
		if len(later) > 6 {
			later = append(later[:6], "…")
		}
		if len(later) > 0 {
			s += ", or one started before it was ready: " + strings.Join(later, " ")
		}
		return "the snapshot may hold " + s
	}
	if !slices.ContainsFunc(got, func(c byte) bool { return c != 0 }) {
		if last < 0 {
			return blockOK, ""
		}
		return blockLost, "reads back as zeroes; " + allowed()
	}
	id, hb, salt := binary.BigEndian.Uint64(got[0:]), binary.BigEndian.Uint64(got[8:]), binary.BigEndian.Uint64(got[16:])
	i := slices.IndexFunc(h, func(w writeRec) bool { return w.id == id })
	if salt == m.salt && hb == uint64(b) && i >= 0 {
		blockContent(want, m.salt, id, b)
		if bytes.Equal(got, want) {
			switch {
			case i == last || i > last && h[i].start.Before(returned):
				return blockOK, ""
			case i < last:
				return blockStale, fmt.Sprintf("holds the older write %#x%s; %s", id, m.when(b, id), allowed())
			default:
				return blockNewer, fmt.Sprintf("holds write %#x, started %s after the snapshot was ready; %s",
					id, h[i].start.Sub(returned).Round(time.Millisecond), allowed())
			}
		}
	}
	desc := fmt.Sprintf("header says write %#x for block %d", id, hb)
	switch {
	case salt != m.salt:
		desc = "header is not one of this round's writes"
	case hb == uint64(b) && i >= 0:
		if n := diffBytes(got, want); n > 0 && n <= 16 {
			desc += fmt.Sprintf(", %d bytes differ from that write (first at byte %d)", n, firstDiff(got, want))
		}
	case hb == uint64(b):
		desc += ", which this block never had"
	}
	return blockLost, "matches no write (" + desc + "); " + allowed()
}

func diffBytes(a, b []byte) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// checkResult is one read of the whole volume against the model.
type checkResult struct {
	stale, lost, newer int
	problems           []string // the first few, sorted by block
}

// check reads the whole volume through c, 1 MiB at a time, 8 reads in
// flight, and judges every block.
func (m *model) check(ctx context.Context, c *nbdclient.Conn) (checkResult, error) {
	return m.checkWith(ctx, c, m.judge)
}

// checkAt reads a restored snapshot through c and judges every block
// against the volume at the snapshot's cut (judgeAt).
func (m *model) checkAt(ctx context.Context, c *nbdclient.Conn, called, returned time.Time) (checkResult, error) {
	return m.checkWith(ctx, c, func(b int, got, want []byte) (verdict, string) {
		return m.judgeAt(b, got, want, called, returned)
	})
}

// checkWith reads the whole volume through c, 1 MiB at a time, 8 reads in
// flight, and judges every block with judge.
func (m *model) checkWith(ctx context.Context, c *nbdclient.Conn, judge func(b int, got, want []byte) (verdict, string)) (checkResult, error) {
	const chunk = 1 << 20
	const qd = 8
	size := uint64(m.blocks()) * blockSize
	if c.Size() != size {
		return checkResult{}, fmt.Errorf("export size %d, model size %d", c.Size(), size)
	}
	var mu sync.Mutex
	var res checkResult
	var problems []struct {
		b   int
		why string
	}
	var firstErr error
	sem := make(chan struct{}, qd)
	var wg sync.WaitGroup
	for off := uint64(0); off < size; off += chunk {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
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
				v, why := judge(b, buf[i:i+blockSize], want)
				if v == blockOK {
					continue
				}
				mu.Lock()
				switch v {
				case blockStale:
					res.stale++
				case blockNewer:
					res.newer++
				default:
					res.lost++
				}
				problems = append(problems, struct {
					b   int
					why string
				}{b, why})
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return res, firstErr
	}
	sort.Slice(problems, func(i, j int) bool { return problems[i].b < problems[j].b })
	for i, p := range problems {
		if i == 6 {
			res.problems = append(res.problems, fmt.Sprintf("… and %d more", len(problems)-i))
			break
		}
		res.problems = append(res.problems, fmt.Sprintf("block %d (offset %d) %s", p.b, uint64(p.b)*blockSize, p.why))
	}
	return res, nil
}

// ioLog records every write's start and end, to find the longest
// acknowledged write of a time window.
type ioLog struct {
	mu  sync.Mutex
	ios []ioRecord
}

type ioRecord struct {
	start, end time.Time
	ok         bool
}

func (l *ioLog) add(start, end time.Time, ok bool) {
	l.mu.Lock()
	l.ios = append(l.ios, ioRecord{start, end, ok})
	l.mu.Unlock()
}

// ackedSince reports whether a write that started after t has been
// acknowledged.
func (l *ioLog) ackedSince(t time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.ios) - 1; i >= 0; i-- {
		if r := l.ios[i]; r.ok && r.start.After(t) {
			return true
		}
	}
	return false
}

// maxAcked returns the longest acknowledged write that was in flight at
// some time in [from, to].
func (l *ioLog) maxAcked(from, to time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	var longest time.Duration
	for _, r := range l.ios {
		if r.ok && !r.end.Before(from) && !r.start.After(to) {
			longest = max(longest, r.end.Sub(r.start))
		}
	}
	return longest
}

// writer streams whole-block writes to random blocks through one
// connection, qd at a time, recording every outcome in the model (and
// every eighth write with FUA). Writes are never cancelled: a write given up
// on would have an unknown outcome for no reason. Beside them, one reader
// reads random blocks that no write is changing and judges what it gets.
type writer struct {
	m    *model
	conn *nbdclient.Conn
	log  *ioLog

	acked, failed atomic.Int64
	firstAck      chan struct{} // closed at the first acknowledged write
	firstAckAt    atomic.Int64  // its time, unix nanoseconds
	ackOnce       sync.Once

	reads, readErrors atomic.Int64

	mu        sync.Mutex
	firstErr  error
	badReads  []string // blocks read back wrong while writes went on
	readLost  int
	readStale int

	stopc chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

func startWriter(m *model, conn *nbdclient.Conn, log *ioLog, seed uint64, qd int) *writer {
	w := &writer{m: m, conn: conn, log: log, firstAck: make(chan struct{}), stopc: make(chan struct{})}
	for i := range qd {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		w.wg.Go(func() { w.loop(rng) })
	}
	rng := rand.New(rand.NewPCG(seed, uint64(qd)))
	w.wg.Go(func() { w.readLoop(rng) })
	return w
}

// readLoop reads one random block at a time, holding it in the model so
// that no write changes it meanwhile, and judges it. A read that fails is
// counted, not judged: availability is not what it checks.
func (w *writer) readLoop(rng *rand.Rand) {
	got, want := make([]byte, blockSize), make([]byte, blockSize)
	for !isClosed(w.stopc) {
		b := rng.IntN(w.m.blocks())
		if !w.m.begin(b) {
			continue
		}
		err := w.conn.ReadAt(context.Background(), got, uint64(b)*blockSize)
		var v verdict
		var why string
		if err == nil {
			v, why = w.m.judge(b, got, want)
		}
		w.m.release(b)
		w.reads.Add(1)
		switch {
		case err != nil:
			w.readErrors.Add(1)
			if errors.Is(err, nbdclient.ErrClosed) {
				return
			}
		case v != blockOK:
			w.mu.Lock()
			if v == blockStale {
				w.readStale++
			} else {
				w.readLost++
			}
			if len(w.badReads) < 6 {
				w.badReads = append(w.badReads, fmt.Sprintf("read at %s: block %d (offset %d) %s", time.Now().Format("15:04:05.000"), b, uint64(b)*blockSize, why))
			}
			w.mu.Unlock()
		}
		select {
		case <-w.stopc:
		case <-time.After(2 * time.Millisecond):
		}
	}
}

func (w *writer) loop(rng *rand.Rand) {
	for !isClosed(w.stopc) {
		b := rng.IntN(w.m.blocks())
		if !w.m.begin(b) {
			continue
		}
		start := time.Now()
		_, err := w.m.write(context.Background(), w.conn, b, rng.IntN(8) == 0)
		w.log.add(start, time.Now(), err == nil)
		if err == nil {
			w.acked.Add(1)
			w.ackOnce.Do(func() {
				w.firstAckAt.Store(time.Now().UnixNano())
				close(w.firstAck)
			})
			continue
		}
		w.failed.Add(1)
		w.mu.Lock()
		if w.firstErr == nil {
			w.firstErr = fmt.Errorf("write to block %d: %w", b, err)
		}
		w.mu.Unlock()
		if errors.Is(err, nbdclient.ErrClosed) {
			return
		}
		// An error reply comes at once while the volume is below its write
		// quorum: do not spin.
		select {
		case <-w.stopc:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop makes the writer start no more writes; those in flight go on.
func (w *writer) stop() { w.once.Do(func() { close(w.stopc) }) }

// wait waits up to timeout for the writes in flight; false if some are
// still out.
func (w *writer) wait(timeout time.Duration) bool {
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

func (w *writer) err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.firstErr
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// closeOnce closes ch unless it is nil or closed already (only one
// goroutine closes it).
func closeOnce(ch chan struct{}) {
	if ch != nil && !isClosed(ch) {
		close(ch)
	}
}
