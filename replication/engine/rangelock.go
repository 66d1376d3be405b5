package engine

import (
	"context"
	"sync"

	"github.com/cairn-csi/cairn/replication/replica"
)

// rangeLocks orders the operations that change overlapping byte ranges of
// the volume: writes, trims and write-zeroes, and the rebuilder's copy of
// one extent.
//
// Every replica server runs requests concurrently, and the block frontends
// keep many requests in flight. Without an order, two overlapping writes W1
// and W2 in flight at once could land as W1 then W2 on one replica and W2
// then W1 on another: both acknowledged, and the replicas differ for ever
// (a read after a failover would see other data). A holder keeps its range
// until its operation is resolved on every replica (acknowledged, or its
// failed replicas ejected, or the range marked unresolved: see
// Engine.mutate), so the next overlapping operation is sent only after it,
// and every replica sees the same order. DRBD's conflict detection does
// the same job.
//
// Waiters are served in arrival order: an operation waits only for the
// earlier ones that overlap it, so operations on different ranges never
// wait for each other, and a stream of small writes cannot starve a
// rebuild's whole-extent copy.
type rangeLocks struct {
	mu   sync.Mutex
	head *rangeHold // oldest
	tail *rangeHold
}

// rangeHold is one operation's place in the queue: held once ready is
// closed. An operation on several ranges (an encrypted volume's blocks and
// their entries) holds them all as one hold, taken at once: holds of one
// range each, taken one after the other, could wait holding the first
// behind a later hold that waits for it.
type rangeHold struct {
	spans      []span // [off, end) each
	blockers   int    // earlier holds that overlap this one
	ready      chan struct{}
	prev, next *rangeHold
}

// span is a byte range [off, end) of the replicas.
type span struct{ off, end uint64 }

func (h *rangeHold) overlaps(o *rangeHold) bool { return overlapping(h.spans, o.spans) }

// overlapping reports whether two sets of spans share a byte.
func overlapping(a, b []span) bool {
	for _, x := range a {
		for _, y := range b {
			if x.off < y.end && y.off < x.end {
				return true
			}
		}
	}
	return false
}

// overlappingBlocks reports whether a and b touch a common lockGrain
// block: two writes that share a block must not run at the same time, or
// the replica's read-merge-sum of that block keeps only one of them in its
// sum.
func overlappingBlocks(a, b []span) bool {
	for _, x := range a {
		for _, y := range b {
			if x.off/lockGrain*lockGrain < y.end && y.off/lockGrain*lockGrain < x.end {
				return true
			}
		}
	}
	return false
}

// lockGrain is the unit ranges are rounded out to: the replicas' checksum
// block. A write that covers a block in part makes the replica read, merge
// and re-sum the whole block, so two writes to different parts of one
// block overlap as far as the replicas are concerned and must be ordered.
const lockGrain = replica.SumBlockSize

// lock takes [off, off+n) (n > 0), rounded out to whole lockGrain blocks,
// and returns the function that releases it. It waits for every earlier
// overlapping hold, or fails with ctx's error, having taken nothing.
func (l *rangeLocks) lock(ctx context.Context, off, n uint64) (func(), error) {
	return l.lockSpans(ctx, []span{{off, off + n}})
}

// lockSpans is lock of several ranges ([off, end) each, not empty) as one
// hold.
func (l *rangeLocks) lockSpans(ctx context.Context, spans []span) (func(), error) {
	h := &rangeHold{spans: make([]span, len(spans)), ready: make(chan struct{})}
	for i, s := range spans {
		h.spans[i] = span{s.off / lockGrain * lockGrain, (s.end + lockGrain - 1) / lockGrain * lockGrain}
	}
	l.mu.Lock()
	for o := l.head; o != nil; o = o.next {
		if o.overlaps(h) {
			h.blockers++
		}
	}
	h.prev = l.tail
	if l.tail != nil {
		l.tail.next = h
	} else {
		l.head = h
	}
	l.tail = h
	if h.blockers == 0 {
		close(h.ready)
	}
	l.mu.Unlock()
	release := func() { l.remove(h) }
	select {
	case <-h.ready:
		return release, nil
	default:
	}
	select {
	case <-h.ready:
		return release, nil
	case <-ctx.Done():
		// Leaving the queue unblocks later holds that counted this one,
		// whether or not it became ready meanwhile.
		l.remove(h)
		return nil, ctx.Err()
	}
}

// remove takes h out of the queue and readies the later holds that were
// waiting only for it.
func (l *rangeLocks) remove(h *rangeHold) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for o := h.next; o != nil; o = o.next {
		if o.overlaps(h) {
			if o.blockers--; o.blockers == 0 {
				close(o.ready)
			}
		}
	}
	if h.prev != nil {
		h.prev.next = h.next
	} else {
		l.head = h.next
	}
	if h.next != nil {
		h.next.prev = h.prev
	} else {
		l.tail = h.prev
	}
}

// held counts the holds in the queue, held or waiting (tests).
func (l *rangeLocks) held() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for o := l.head; o != nil; o = o.next {
		n++
	}
	return n
}
