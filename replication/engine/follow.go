package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Asynchronous replication (docs/replication-modes.md). The engine of an
// asynchronous volume keeps its write quorum of replicas healthy (its own
// replica first) and turns the others into followers: a write is
// acknowledged once the healthy members have it, and each follower gets
// it afterwards from a bounded queue, in order.
//
// The rules that keep a follower from silently missing a write:
//
//   - A write is queued under the same read lock (and range hold) it was
//     sent with, so nothing that takes the write lock (a clean point, a
//     snapshot, a resolve) finds a write acknowledged but not queued, and
//     overlapping writes are queued in the order the replicas took them.
//   - A queue that overflows is dropped and its ranges are remembered as
//     extents to copy from a healthy replica, under each extent's range
//     hold (the follower is "lagging" until none is left). Later writes
//     are queued again meanwhile, and the one sender interleaves them with
//     the copies (catchUp).
//   - A clean point (which clears the replicas' dirty maps) happens only
//     while every follower has everything: otherwise a write still queued
//     would be in no dirty map, and a resync after a crash would miss it.
//   - Anything that needs the replicas identical (a resolve, a snapshot,
//     closing the engine) drains the followers first, under the write
//     lock; a follower that cannot be drained is ejected.
//   - A follower is never a read source (but for consistencyLevel
//     eventual, its own node's) nor a copy source, and the store never
//     makes one healthy without the operator (meta.PromoteVolume).

// Bounds of a follower's queue: past either, it overflows.
const (
	followQueueWrites = 8192
	followQueueBytes  = 64 << 20
	// followQueueWait bounds how long a write waits for room in a
	// streaming follower's full queue while the follower sends nothing
	// (awaitFollowers); then the queue overflows.
	followQueueWait = 500 * time.Millisecond
	// followBatch and followBatchBytes bound the writes sent at once to a
	// follower (at least one); they never overlap each other. The bytes
	// bound keeps batches of large writes short, so that a full queue
	// gains room often (awaitFollowers).
	followBatch      = 64
	followBatchBytes = 8 << 20
	// followForceBytes bounds what a drain copies with writes paused
	// (drainOne): up to a second or so at disk speed. A follower further
	// behind is ejected and rebuilt rather than the volume stalled.
	followForceBytes = 512 << 20
	// copyLockWait is how long a catch-up copy waits for its extent's
	// range before it steps aside (copyExtent).
	copyLockWait = 10 * time.Millisecond
	// lagReportInterval is how often the engine records its followers'
	// lag in the store (when it changed).
	lagReportInterval = 2 * time.Second
)

var (
	metricFollowLagWrites = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "cairn_engine_follower_lag_writes",
		Help: "Acknowledged writes a following replica (asynchronous volume) has not been sent yet.",
	}, []string{"volume_id", "replica_id"})
	metricFollowLagBytes = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "cairn_engine_follower_lag_bytes",
		Help: "Bytes of acknowledged writes a following replica has not been sent yet.",
	}, []string{"volume_id", "replica_id"})
	metricFollowLagSeconds = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "cairn_engine_follower_lag_seconds",
		Help: "Age of the oldest acknowledged write a following replica has not been sent yet.",
	}, []string{"volume_id", "replica_id"})
	metricFollowResyncExtents = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "cairn_engine_follower_resync_extents",
		Help: "Extents left to copy to a following replica whose queue overflowed (0: it streams).",
	}, []string{"volume_id", "replica_id"})
	metricFollowWait = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_follower_wait_seconds_total",
		Help: "Time writes waited for room in a following replica's full queue (asynchronous volume).",
	}, []string{"volume_id"})
	metricFollowOverflows = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cairn_engine_follower_overflows_total",
		Help: "Times a following replica's queue overflowed and it fell back to copying dirty extents.",
	}, []string{"volume_id"})
)

// queued is one acknowledged write (or trim, or zeroing) waiting for a
// follower: op as the healthy members ran it, its ranges, and its place in
// the engine's order of writes.
type queued struct {
	seq   uint64
	spans []span
	op    func(context.Context, *member, uint64) error
	bytes uint64
	at    time.Time
}

// follower streams the acknowledged writes to one following member.
type follower struct {
	e  *Engine
	id string

	mu       sync.Mutex
	m        *member // the member it sends to (replaced at a reconfigure)
	queue    []*queued
	bytes    uint64
	sending  int             // writes taken from the head, not yet done
	resync   map[uint64]bool // extents to copy; non-nil while lagging
	pass     []uint64        // this catch-up pass's extents not yet tried, in order
	copyNext bool            // lagging: the next step copies an extent (catchUp)
	applied  uint64          // seq of the last write it has, with every one before it
	err      error           // the last send or copy failed: drain ejects it
	idle     *sync.Cond      // broadcast when the queue or resync set shrinks
	wake     chan struct{}   // a write was queued or an extent marked
	stop     chan struct{}   // closed when the member leaves the set
	lastLag  meta.ReplicaLag // last reported to the store
	reported bool            // lastLag was reported once
}

// following reports whether m is a following replica.
func (m *member) following() bool { return m.replica.State == meta.ReplicaFollowing }

// holdsData reports whether m holds the volume's data for snapshot work:
// healthy, or following (drained first where it matters).
func (m *member) holdsData() bool { return m.healthy() || m.following() }

// writers returns the members a write is sent to and waited for: every
// member but the followers. Called with e.mu held.
func (e *Engine) writers() []*member {
	return e.writeSet
}

// syncFollowers makes e.followers match the following members after a
// change of the set: a new follower starts with nothing queued (it was
// made equal when it became one, or at Open's resync), one whose member
// left stops. A maintenance engine writes nothing, so it has no
// followers (and never makes them healthy at its close). Called with e.mu
// held for writing.
func (e *Engine) syncFollowers() {
	seen := map[string]bool{}
	e.writeSet = e.writeSet[:0:0]
	for _, m := range e.members {
		if !m.following() {
			e.writeSet = append(e.writeSet, m)
			continue
		}
		if e.cfg.Maintenance {
			continue
		}
		seen[m.replica.ID] = true
		if f, ok := e.followers[m.replica.ID]; ok {
			f.mu.Lock()
			f.m = m
			f.mu.Unlock()
			continue
		}
		f := &follower{e: e, id: m.replica.ID, m: m, wake: make(chan struct{}, 1), stop: make(chan struct{})}
		f.idle = sync.NewCond(&f.mu)
		f.applied = e.seq.Load()
		if e.followers == nil {
			e.followers = map[string]*follower{}
		}
		e.followers[m.replica.ID] = f
		e.followWG.Add(1)
		go func() { defer e.followWG.Done(); f.run() }()
		e.log.Info("replica follows", zap.String("replica_id", m.replica.ID), zap.String("node", m.replica.Node), zap.Uint64("epoch", e.epoch))
	}
	for id, f := range e.followers {
		if !seen[id] {
			f.close()
			delete(e.followers, id)
		}
	}
}

// close stops the follower's sender and forgets its metrics.
func (f *follower) close() {
	close(f.stop)
	f.mu.Lock()
	f.err = errors.New("no longer a follower")
	f.idle.Broadcast()
	f.mu.Unlock()
	for _, g := range []*prometheus.GaugeVec{metricFollowLagWrites, metricFollowLagBytes, metricFollowLagSeconds, metricFollowResyncExtents} {
		g.DeleteLabelValues(f.e.cfg.VolumeID, f.id)
	}
}

// enqueue hands an acknowledged write to every follower. Called with e.mu
// held for reading and the write's ranges held, right after the healthy
// members took it.
func (e *Engine) enqueue(spans []span, op func(context.Context, *member, uint64) error) {
	if len(e.followers) == 0 || len(spans) == 0 {
		return
	}
	q := &queued{spans: spans, op: op, at: time.Now()}
	for _, s := range spans {
		q.bytes += s.end - s.off
	}
	// Writes queue under the read lock, several at once: numbered and
	// appended under one mutex, every queue is in sequence order (a
	// follower's last done write is then its applied point).
	e.enqMu.Lock()
	defer e.enqMu.Unlock()
	q.seq = e.seq.Add(1)
	for _, f := range e.followers {
		f.mu.Lock()
		switch {
		case len(f.queue) >= e.queueLimit() || f.bytes+q.bytes > followQueueBytes:
			f.overflow(spans)
		default:
			f.queue = append(f.queue, q)
			f.bytes += q.bytes
		}
		f.mu.Unlock()
		select {
		case f.wake <- struct{}{}:
		default:
		}
	}
}

// awaitFollowers waits, before a write of spans takes its ranges, until
// every streaming follower's queue has room for it, as long as the
// follower sends a batch at least every followQueueWait. A follower slower than the writer then slows the
// writes down to its pace, as a synchronous volume's are, rather than
// overflowing: an overflow turns every write it drops into a copy of a
// whole extent, which on a busy node made an asynchronous volume slower
// than a synchronous one (a 1M sequential fill ran at 0.3× the synchronous
// speed). A follower that sends nothing for that long is stalled; its
// queue overflows and it lags. No write waits for a lagging or failed
// follower.
func (e *Engine) awaitFollowers(ctx context.Context, spans []span) {
	var n uint64
	for _, s := range spans {
		n += s.end - s.off
	}
	wait := followQueueWait
	if e.cfg.followWait > 0 {
		wait = e.cfg.followWait
	}
	var (
		deadline time.Time
		last     *follower
		seen     uint64
	)
	for {
		e.mu.RLock()
		var full *follower
		var applied uint64
		for _, f := range e.followers {
			if ok, a := f.full(n); ok {
				full, applied = f, a
				break
			}
		}
		e.mu.RUnlock()
		if full == nil {
			return
		}
		now := time.Now()
		if full != last || applied != seen {
			last, seen, deadline = full, applied, now.Add(wait) // it moved: wait on
		}
		if !now.Before(deadline) || ctx.Err() != nil {
			return // enqueue overflows it
		}
		full.awaitRoom(ctx, n, deadline)
		metricFollowWait.WithLabelValues(e.cfg.VolumeID).Add(time.Since(now).Seconds())
	}
}

// full reports whether f streams and its queue has no room for a write
// of n bytes, and its applied point: a streaming follower's moves with
// every batch it sends, which is the progress awaitFollowers waits on.
func (f *follower) full(n uint64) (bool, uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fullLocked(n), f.applied
}

func (f *follower) fullLocked(n uint64) bool {
	return f.err == nil && f.resync == nil && (len(f.queue) >= f.e.queueLimit() || f.bytes+n > followQueueBytes)
}

// awaitRoom waits until f's queue has room for n bytes, f lags or fails,
// ctx ends or the deadline passes. The sender broadcasts f.idle after
// each batch; a timer wakes the wait at the deadline.
func (f *follower) awaitRoom(ctx context.Context, n uint64, deadline time.Time) {
	t := time.AfterFunc(time.Until(deadline), func() {
		f.mu.Lock()
		f.idle.Broadcast()
		f.mu.Unlock()
	})
	defer t.Stop()
	stop := context.AfterFunc(ctx, func() {
		f.mu.Lock()
		f.idle.Broadcast()
		f.mu.Unlock()
	})
	defer stop()
	f.mu.Lock()
	defer f.mu.Unlock()
	for f.fullLocked(n) && time.Now().Before(deadline) && ctx.Err() == nil {
		f.idle.Wait()
	}
}

func (e *Engine) queueLimit() int {
	if e.cfg.followWrites > 0 {
		return e.cfg.followWrites
	}
	return followQueueWrites
}

// overflow drops the queue for the extents it covers. Called with f.mu.
// A follower that is lagging already keeps the extents it had to copy.
func (f *follower) overflow(spans []span) {
	lagging := f.resync != nil
	if !lagging {
		f.resync = map[uint64]bool{}
	}
	for _, q := range f.queue[f.sending:] {
		f.markExtents(q.spans)
	}
	// The writes being sent stay until they are done (run drops them);
	// their extents are copied again too, in case they fail.
	for _, q := range f.queue[:f.sending] {
		f.markExtents(q.spans)
	}
	f.queue = f.queue[:f.sending]
	f.bytes = 0
	for _, q := range f.queue {
		f.bytes += q.bytes
	}
	f.markExtents(spans)
	metricFollowOverflows.WithLabelValues(f.e.cfg.VolumeID).Inc()
	if lagging {
		// Said once, when it started lagging; the metric counts the rest.
		f.e.log.Debug("lagging follower's queue overflowed again", zap.String("replica_id", f.id), zap.Int("extents", len(f.resync)))
		return
	}
	f.e.log.Warn("follower's queue overflowed; it is lagging and gets the changed extents copied instead",
		zap.String("replica_id", f.id), zap.Int("extents", len(f.resync)), zap.Uint64("epoch", f.e.epochNow.Load()))
}

// markExtents adds the extents spans touch to the resync set. Called with
// f.mu.
func (f *follower) markExtents(spans []span) {
	x := f.e.extentSize // learned at Open's resync, before any write
	if x == 0 {
		f.fail(errors.New("extent size unknown: cannot mark extents to copy"))
		return
	}
	for _, s := range spans {
		for i := s.off / x; i*x < s.end; i++ {
			f.resync[i] = true
		}
	}
}

// run sends the queue in order, a batch of non-overlapping writes at a
// time, and copies the extents of a lagging follower.
func (f *follower) run() {
	for {
		select {
		case <-f.stop:
			return
		case <-f.e.fctx.Done():
			return
		case <-f.wake:
		}
		for f.step() {
		}
	}
}

// step does one batch; it reports whether there may be more to do.
func (f *follower) step() bool {
	f.mu.Lock()
	if f.err != nil {
		f.mu.Unlock()
		return false
	}
	// A lagging follower takes turns: a batch of the writes queued since
	// the overflow, then one extent, so that neither waits for the other.
	if f.resync != nil && (len(f.queue) == 0 || f.copyNext) {
		f.copyNext = false
		f.mu.Unlock()
		return f.catchUp()
	}
	if len(f.queue) == 0 {
		f.mu.Unlock()
		return false
	}
	var batch []*queued
	var bytes uint64
	for _, q := range f.queue {
		if len(batch) == followBatch || len(batch) > 0 && bytes+q.bytes > followBatchBytes ||
			slices.ContainsFunc(batch, func(b *queued) bool { return overlappingBlocks(b.spans, q.spans) }) {
			break
		}
		batch = append(batch, q)
		bytes += q.bytes
	}
	f.sending = len(batch)
	m := f.m
	f.mu.Unlock()

	errs := make([]error, len(batch))
	var wg sync.WaitGroup
	for i, q := range batch {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f.send(m, q)
		}()
	}
	wg.Wait()
	err := errors.Join(errs...)

	f.mu.Lock()
	defer f.mu.Unlock()
	n := min(f.sending, len(f.queue))
	for _, q := range f.queue[:n] {
		f.bytes -= q.bytes
	}
	if err == nil && n > 0 && f.resync == nil {
		// A lagging follower lacks the dropped writes before these: its
		// applied point moves when it has caught up (catchUp).
		f.applied = f.queue[n-1].seq
	}
	f.queue = slices.Delete(f.queue, 0, n)
	f.sending = 0
	f.copyNext = f.resync != nil
	if err != nil {
		f.fail(err)
		return false
	}
	f.idle.Broadcast()
	return true
}

// send sends one queued write, with the engine's current epoch: a claim
// of the follower by this engine (after an ejection elsewhere in the set)
// moves it on, and the write is sent again at the new epoch. A newer
// engine's claim fences it for good.
func (f *follower) send(m *member, q *queued) error {
	e := f.e
	deadline := time.Now().Add(e.cfg.IOTimeout)
	for {
		epoch := e.epochNow.Load()
		ctx, cancel := context.WithTimeout(e.fctx, e.cfg.IOTimeout)
		err := one(ctx, m, func(ctx context.Context, m *member) error { return q.op(ctx, m, epoch) })
		cancel()
		// This engine's reconfigure is claiming the set with a new epoch
		// (epochNow moves before the claims): the replica held the old
		// one when the write went, or is not claimed with the new one
		// yet. A newer engine's claim does not pass: epochNow moves only
		// after this engine checked its attachment, and a fenced engine
		// stops at once.
		select {
		case <-e.fencedCh:
			return err
		default:
		}
		retry := errors.Is(err, replica.ErrFenced) && e.epochNow.Load() != epoch || errors.Is(err, replica.ErrNotClaimed)
		if retry && time.Now().Before(deadline) && e.fctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		return err
	}
}

// catchUp copies one extent of a lagging follower from a healthy replica,
// under the extent's range hold (so that no write to it runs meanwhile),
// and ends the lag once none is left. It reports whether there may be
// more to do.
//
// Only an overflow marks extents; the writes after it are queued, and step
// sends them between the copies. That is what lets a follower catch up
// under writes spread over the whole volume: when those writes marked
// extents instead, each pass found most of the volume marked again and
// copied it again, for as long as the writes went on (an asynchronous
// volume under fio's random writes never streamed again, and its engine
// spent its CPU copying whole extents).
//
// The order is safe because one goroutine sends and copies, each waiting
// for the last: a queued write that reaches the follower after a copy of
// its extent was acknowledged before the copy (the copy holds the range),
// so it carries data the copy had too or older, and every write to the
// range after it is queued behind it.
func (f *follower) catchUp() bool {
	f.mu.Lock()
	if len(f.pass) == 0 {
		f.pass = f.marked() // a new pass over what is marked now
	}
	if len(f.pass) == 0 {
		f.mu.Unlock()
		return f.caughtUp()
	}
	x := f.pass[0]
	f.pass = f.pass[1:]
	f.mu.Unlock()
	return f.copyExtent(x)
}

// caughtUp ends a follower's lag when no extent is left to copy: it
// streams again. Its applied point is the write before the first one still
// queued (every earlier write was sent or copied); e.enqMu keeps a write
// from being numbered meanwhile without being queued.
func (f *follower) caughtUp() bool {
	e := f.e
	e.enqMu.Lock()
	defer e.enqMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.resync == nil || len(f.resync) > 0 || f.err != nil {
		return f.err == nil // marked again meanwhile: another pass
	}
	f.resync, f.pass = nil, nil
	if len(f.queue) > 0 {
		f.applied = f.queue[0].seq - 1
	} else {
		f.applied = e.seq.Load()
	}
	f.idle.Broadcast()
	e.log.Info("follower caught up: it streams the writes again", zap.String("replica_id", f.id),
		zap.Int("queued", len(f.queue)), zap.Uint64("epoch", e.epochNow.Load()))
	return true
}

// copyExtent copies extent x of a lagging follower under its range hold
// and the read lock; see catchUp.
//
// It waits for neither lock. A drain holds the engine's write lock until
// this sender has sent the follower's queue, and a write that holds the
// extent's range may be waiting for that lock: a copy that waited would
// hold the drain up until its timeout. A busy copy steps aside for
// copyLockWait; the extent stays marked, and the sender sends the queue.
//
// The extent is unmarked only once it is copied: until then followerHas
// does not send an eventual read there. A write dropped by an overflow
// meanwhile, which marks it again, was acknowledged before the copy took
// the range, so the copy has its data.
func (f *follower) copyExtent(x uint64) bool {
	e := f.e
	off := x * e.extentSize
	lctx, lcancel := context.WithTimeout(e.fctx, copyLockWait)
	unlock, err := e.locks.lockSpans(lctx, []span{{off, off + e.extentSize}})
	lcancel()
	if err != nil {
		return e.fctx.Err() == nil // busy: another time
	}
	if !e.mu.TryRLock() {
		unlock()
		time.Sleep(copyLockWait) // a writer holds the engine's lock, or waits for it
		return true
	}
	defer unlock()
	defer e.mu.RUnlock()
	f.mu.Lock()
	if f.err != nil || f.resync == nil {
		f.mu.Unlock()
		return false
	}
	if !f.resync[x] {
		f.mu.Unlock()
		return true // not marked (again) since the pass began
	}
	m := f.m
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(e.fctx, e.cfg.IOTimeout)
	err = e.copyExtentTo(ctx, m, x)
	cancel()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		f.fail(err)
		return false
	}
	if f.resync != nil {
		delete(f.resync, x)
	}
	f.idle.Broadcast()
	return true
}

// marked returns the extents in f's resync set, in order. Called with
// f.mu.
func (f *follower) marked() []uint64 {
	extents := make([]uint64, 0, len(f.resync))
	for x := range f.resync {
		extents = append(extents, x)
	}
	slices.Sort(extents)
	return extents
}

// copyExtentTo copies extent x, as far as the volume goes, from a healthy
// replica to follower m. Callers hold the extent (its range, or the write
// lock) and e.mu.
func (e *Engine) copyExtentTo(ctx context.Context, m *member, x uint64) error {
	size, off := e.size.Load(), x*e.extentSize
	if off >= size {
		return nil
	}
	src := e.source()
	if src == nil {
		return fmt.Errorf("copy extent %d: no healthy replica to copy from", x)
	}
	if err := e.copyRange(ctx, src, m, off, min(e.extentSize, size-off)); err != nil {
		return fmt.Errorf("copy extent %d: %w", x, err)
	}
	return nil
}

// copyResync copies every extent left in f's resync set, and f streams
// again. Called with e.mu held for writing: no write is in flight, none is
// marked meanwhile, and the copier waits for the read lock.
func (e *Engine) copyResync(ctx context.Context, f *follower) error {
	f.mu.Lock()
	if f.resync == nil {
		f.mu.Unlock()
		return nil // a drain copied them meanwhile
	}
	if f.sending > 0 || len(f.queue) > 0 {
		f.mu.Unlock()
		return errors.New("writes in flight to a lagging follower") // callers wait for them first
	}
	extents, m := f.marked(), f.m
	f.mu.Unlock()
	for _, x := range extents {
		if err := e.copyExtentTo(ctx, m, x); err != nil {
			return err
		}
	}
	f.mu.Lock()
	f.resync, f.pass = nil, nil
	f.applied = e.seq.Load()
	f.idle.Broadcast()
	f.mu.Unlock()
	return nil
}

// fail records a follower's failure: the next drain (or the background
// ejection started here) ejects it. Called with f.mu.
func (f *follower) fail(err error) {
	if f.err != nil {
		return
	}
	f.err = err
	f.idle.Broadcast()
	select {
	case <-f.stop:
		return // no longer a follower: nothing to eject
	default:
	}
	f.e.log.Warn("follower failed; it is ejected", zap.String("replica_id", f.id), zap.Uint64("epoch", f.e.epochNow.Load()), zap.Error(err))
	f.e.followWG.Add(1)
	go func() { defer f.e.followWG.Done(); f.e.ejectFollower(f) }()
}

// ejectFollower ejects a failed follower under the write lock (not from
// the sender itself: a drain may hold the lock and wait for it).
// It tries again (backing off up to 10 s) while the follower is still
// there: a failed follower sends nothing, and no clean point happens
// while it is in the set.
func (e *Engine) ejectFollower(f *follower) {
	wait := 100 * time.Millisecond
	for {
		if !e.tryEjectFollower(f) {
			return
		}
		select {
		case <-e.fctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 10*time.Second)
	}
}

// tryEjectFollower is one attempt of ejectFollower; it reports whether
// the follower is still to be ejected.
func (e *Engine) tryEjectFollower(f *follower) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.usable() != nil || e.fctx.Err() != nil || e.followers[f.id] != f {
		return false
	}
	f.mu.Lock()
	m := f.m
	f.mu.Unlock()
	if err := e.eject(e.fctx, []*member{m}, "follower failed"); err != nil && e.fctx.Err() == nil {
		e.log.Warn("ejecting a failed follower; will try again", zap.String("replica_id", f.id), zap.Error(err))
	}
	return e.followers[f.id] == f
}

// followersIdle reports whether every follower has every acknowledged
// write. Called with e.mu held for writing (no write is being queued).
func (e *Engine) followersIdle() bool {
	for _, f := range e.followers {
		f.mu.Lock()
		idle := len(f.queue) == 0 && f.resync == nil && f.err == nil
		f.mu.Unlock()
		if !idle {
			return false
		}
	}
	return true
}

// drainFollowers brings every follower up to every acknowledged write and
// flushes it, or ejects it: a lagging one's extents are copied here, a
// streaming one's queue is waited for (its sender runs without the
// engine's lock) up to IOTimeout. Called with e.mu held for writing.
func (e *Engine) drainFollowers(ctx context.Context, why string) error {
	if len(e.followers) == 0 {
		return nil
	}
	start := time.Now()
	var failed []*member
	deadline := time.Now().Add(e.cfg.IOTimeout)
	for _, f := range e.followers {
		if err := e.drainOne(ctx, f, deadline); err != nil {
			e.log.Warn("follower could not be drained; it is ejected", zap.String("replica_id", f.id), zap.String("reason", why),
				zap.Uint64("epoch", e.epoch), zap.Error(err))
			failed = append(failed, f.m)
		}
	}
	if len(failed) > 0 {
		if err := e.ejectGone(ctx, failed, "follower could not be drained ("+why+")"); err != nil {
			return err
		}
	}
	var ms []*member
	for _, f := range e.followers {
		ms = append(ms, f.m)
	}
	epoch := e.epoch
	errs := e.fanOut(ctx, ms, func(ctx context.Context, m *member) error { return m.client.Flush(ctx, epoch) })
	for i, err := range errs {
		if err != nil {
			failed = append(failed, ms[i])
		}
	}
	if len(failed) > 0 {
		return e.ejectGone(ctx, failed, "follower flush failed ("+why+")")
	}
	e.log.Debug("followers drained", zap.String("reason", why), zap.Int("followers", len(ms)), zap.Duration("took", time.Since(start)))
	return nil
}

// ejectGone ejects the followers ms and checks that they left the set:
// eject also succeeds when the store's epoch had moved for another reason
// and the reconfigure found them still following. Called with e.mu held
// for writing.
func (e *Engine) ejectGone(ctx context.Context, ms []*member, why string) error {
	if err := e.eject(ctx, ms, why); err != nil {
		return err
	}
	for _, m := range ms {
		if _, ok := e.followers[m.replica.ID]; ok {
			return fmt.Errorf("follower %s could not be ejected (%s): %w", m.replica.ID, why, ErrIO)
		}
	}
	return nil
}

// drainOne drains f; see drainFollowers.
func (e *Engine) drainOne(ctx context.Context, f *follower, deadline time.Time) error {
	f.mu.Lock()
	if f.err != nil {
		defer f.mu.Unlock()
		return f.err
	}
	// Wait for the sender: every queued write, and the batch in flight
	// when the queue overflowed, must have landed before extents are
	// copied, or a late one would undo a copy. The sender holds no engine
	// lock; a timer wakes the wait at the deadline.
	t := time.AfterFunc(time.Until(deadline), func() {
		f.mu.Lock()
		f.idle.Broadcast()
		f.mu.Unlock()
	})
	defer t.Stop()
	select {
	case f.wake <- struct{}{}:
	default:
	}
	for (len(f.queue) > 0 || f.sending > 0) && f.err == nil && time.Now().Before(deadline) && ctx.Err() == nil {
		f.idle.Wait()
	}
	switch {
	case f.err != nil:
		f.mu.Unlock()
		return f.err
	case len(f.queue) > 0 || f.sending > 0:
		n := len(f.queue)
		f.mu.Unlock()
		return fmt.Errorf("%d writes still queued after %s", n, e.cfg.IOTimeout)
	}
	resync := f.resync
	f.mu.Unlock()
	if resync == nil {
		return nil
	}
	// Copied with writes paused: bounded, or the follower is ejected
	// (and rebuilt) rather than the volume stalled.
	if bytes := uint64(len(resync)) * e.extentSize; bytes > followForceBytes {
		return fmt.Errorf("%d extents (%d bytes) behind: too far to copy with writes paused", len(resync), bytes)
	}
	// Nothing else copies now: the copier needs the read lock.
	return e.copyResync(ctx, f)
}

// followerHas reports whether follower m holds every acknowledged write
// to [off, off+n): nothing for the range waits in its queue or its
// resync set. An eventual read may then use it, and a read that feeds a
// write (an encrypted block's merge) never returns older data than the
// healthy replicas hold. Called with e.mu held.
func (e *Engine) followerHas(m *member, off, n uint64) bool {
	f := e.followers[m.replica.ID]
	if f == nil {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil || !e.started.Load() {
		return false
	}
	want := []span{{off, off + n}}
	for _, q := range f.queue {
		if overlapping(q.spans, want) {
			return false
		}
	}
	if f.resync != nil && e.extentSize > 0 {
		for x := off / e.extentSize; x*e.extentSize < off+n; x++ {
			if f.resync[x] {
				return false
			}
		}
	}
	return true
}

// lag is f's lag now.
func (f *follower) lag(now time.Time) meta.ReplicaLag {
	f.mu.Lock()
	defer f.mu.Unlock()
	l := meta.ReplicaLag{Writes: uint64(len(f.queue)), Bytes: f.bytes, Applied: f.applied, ReportedAt: now.UnixNano(),
		Epoch: f.e.epochNow.Load(), Engine: f.e.opened.UnixNano()}
	if len(f.queue) > 0 {
		l.Seconds = now.Sub(f.queue[0].at).Seconds()
	}
	if f.resync != nil {
		l.Resyncing, l.Extents = true, uint64(len(f.resync))
	}
	return l
}

// Lags returns the lag of every follower now, by replica id, as this
// engine sees it (users see the store's copy, recorded by reportLags).
func (e *Engine) Lags() map[string]meta.ReplicaLag {
	e.mu.RLock()
	defer e.mu.RUnlock()
	now := time.Now()
	out := map[string]meta.ReplicaLag{}
	for id, f := range e.followers {
		out[id] = f.lag(now)
	}
	return out
}

// lagLoop measures the followers' lag, sets the metrics, and records it in
// the store when it changed (and once a report interval while behind).
func (e *Engine) lagLoop(ctx context.Context) {
	t := time.NewTicker(lagReportInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		e.reportLags(ctx)
	}
}

// reportLags is one round of lagLoop.
func (e *Engine) reportLags(ctx context.Context) {
	e.mu.RLock()
	epoch := e.epoch
	now := time.Now()
	report := map[string]*meta.ReplicaLag{}
	sent := map[string]*follower{}
	for id, f := range e.followers {
		l := f.lag(now)
		metricFollowLagWrites.WithLabelValues(e.cfg.VolumeID, id).Set(float64(l.Writes))
		metricFollowLagBytes.WithLabelValues(e.cfg.VolumeID, id).Set(float64(l.Bytes))
		metricFollowLagSeconds.WithLabelValues(e.cfg.VolumeID, id).Set(l.Seconds)
		metricFollowResyncExtents.WithLabelValues(e.cfg.VolumeID, id).Set(float64(l.Extents))
		f.mu.Lock()
		changed := !f.reported || l.Behind() || f.lastLag.Behind() || l.Applied != f.lastLag.Applied
		if changed {
			f.lastLag, f.reported = l, true
			report[id], sent[id] = &l, f
		}
		f.mu.Unlock()
	}
	e.mu.RUnlock()
	if len(report) == 0 {
		return
	}
	if err := e.cfg.Meta.ReportLag(ctx, e.cfg.VolumeID, epoch, report); err != nil && ctx.Err() == nil {
		e.log.Debug("lag report not recorded", zap.Uint64("epoch", epoch), zap.Error(err))
		for _, f := range sent {
			f.mu.Lock()
			f.reported = false // report it again next round
			f.mu.Unlock()
		}
	}
}

// arrangeFollowers, for an asynchronous volume, turns the healthy members
// beyond the write quorum into followers in the store, keeping this node's
// replica healthy first. It reports whether it changed the set (the caller
// then reads and claims it again). Safe only when the demoted replicas
// hold every acknowledged write: called with e.mu held for writing, before
// Open's resync (which makes every member equal) or after one.
func (e *Engine) arrangeFollowers(ctx context.Context, v *meta.Volume) (bool, error) {
	if !v.Async() || e.cfg.Maintenance {
		return false, nil
	}
	var healthy []*member
	for _, m := range e.members {
		if m.healthy() && m.client != nil {
			healthy = append(healthy, m)
		}
	}
	if len(healthy) < e.quorum && e.started.Load() {
		return e.promoteFollower(ctx, v)
	}
	if len(healthy) <= e.quorum {
		return false, nil
	}
	// Keep the local replica, then the first ones.
	slices.SortStableFunc(healthy, func(a, b *member) int {
		switch {
		case a.local == b.local:
			return 0
		case a.local:
			return -1
		}
		return 1
	})
	epoch := v.Epoch
	for _, m := range healthy[e.quorum:] {
		res, err := e.cfg.Meta.Apply(ctx, &meta.SetReplicaState{VolumeID: v.ID, ReplicaID: m.replica.ID, State: meta.ReplicaFollowing, ExpectEpoch: epoch})
		if errors.Is(err, meta.ErrEpochMismatch) {
			return true, nil // the set moved: read it again
		}
		if err != nil {
			return false, fmt.Errorf("make replica %s a follower: %w", m.replica.ID, err)
		}
		epoch = res.Volume.Epoch
		e.log.Info("replica made a follower (asynchronous replication)", zap.String("replica_id", m.replica.ID),
			zap.String("node", m.replica.Node), zap.Uint64("epoch", epoch))
	}
	return true, nil
}

// promoteFollower makes a follower healthy when fewer healthy replicas
// than the write quorum are left (one was ejected): drained and flushed
// under the write lock, it holds every acknowledged write, and writes go
// on instead of failing until a rebuild ends. It reports whether it
// changed the set. Called with e.mu held for writing, from reconfigure.
func (e *Engine) promoteFollower(ctx context.Context, v *meta.Volume) (bool, error) {
	for _, m := range e.members {
		f := e.followers[m.replica.ID]
		if f == nil || m.client == nil {
			continue
		}
		f.mu.Lock()
		ok := e.started.Load() && f.err == nil
		f.mu.Unlock()
		if !ok {
			continue
		}
		if err := e.drainOne(ctx, f, time.Now().Add(e.cfg.IOTimeout)); err != nil {
			e.log.Warn("follower not promoted: it could not be drained", zap.String("replica_id", m.replica.ID), zap.Error(err))
			continue
		}
		if err := m.client.Flush(ctx, e.epoch); err != nil {
			e.log.Warn("follower not promoted: flush failed", zap.String("replica_id", m.replica.ID), zap.Error(err))
			continue
		}
		_, err := e.cfg.Meta.Apply(ctx, &meta.SetReplicaState{VolumeID: v.ID, ReplicaID: m.replica.ID, State: meta.ReplicaHealthy, ExpectEpoch: v.Epoch})
		if errors.Is(err, meta.ErrEpochMismatch) {
			return true, nil
		}
		if err != nil {
			return false, fmt.Errorf("make follower %s healthy: %w", m.replica.ID, err)
		}
		e.log.Info("follower made healthy: fewer healthy replicas than the write quorum were left", zap.String("replica_id", m.replica.ID),
			zap.String("node", m.replica.Node), zap.Int("write_quorum", e.quorum), zap.Uint64("epoch", v.Epoch+1))
		return true, nil
	}
	return false, nil
}

// releaseFollowers, when the engine closes with every follower drained,
// makes them healthy again in the store: they hold everything, and the
// next engine (on any node) may use them as sources. Called with e.mu held
// for writing.
func (e *Engine) releaseFollowers(ctx context.Context) error {
	if len(e.followers) == 0 {
		return nil
	}
	if err := e.drainFollowers(ctx, "closing"); err != nil {
		return err
	}
	// The volume may be detached already (an unexport, NodeUnpublish):
	// the detach took a new epoch. Still unattached at that epoch, nobody
	// has written since; an attach would move it and fail the commands
	// below.
	v, err := e.cfg.Meta.Volume(ctx, e.cfg.VolumeID)
	if err != nil {
		return err
	}
	epoch := e.epoch
	switch a := v.Attachment; {
	case a == nil:
		epoch = v.Epoch
	case a.Node != e.cfg.NodeID || v.Epoch != e.epoch:
		return fmt.Errorf("volume %s is attached to %s at epoch %d now", v.ID, a.Node, v.Epoch)
	}
	for id, f := range e.followers {
		f.mu.Lock()
		ready := e.started.Load() && f.err == nil && len(f.queue) == 0 && f.sending == 0 && f.resync == nil
		m := f.m
		f.mu.Unlock()
		if !ready {
			return fmt.Errorf("follower %s is not drained", id)
		}
		// Nobody claimed it since this engine did (an engine that
		// attached, wrote and went away after our drain): then it may
		// lack that engine's writes.
		if info, err := m.client.Info(ctx); err != nil || info.Epoch != e.epoch {
			return fmt.Errorf("follower %s: claimed by another engine since (epoch %d, ours %d) or unreachable: %v", id, info.Epoch, e.epoch, err)
		}
		res, err := e.cfg.Meta.Apply(ctx, &meta.SetReplicaState{VolumeID: e.cfg.VolumeID, ReplicaID: id, State: meta.ReplicaHealthy, ExpectEpoch: epoch})
		if err != nil {
			return fmt.Errorf("make follower %s healthy: %w", id, err)
		}
		epoch = res.Volume.Epoch
		f.close()
		delete(e.followers, id)
	}
	e.log.Info("followers healthy again: the engine closed with every write on them", zap.Uint64("epoch", epoch))
	return nil
}
