package iosched

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Scheduler decides which queued request goes to the disk next. It is safe
// for concurrent use. Create it with New and stop it with Close.
type Scheduler struct {
	clock    Clock
	obs      Observer
	disabled bool
	depth    int
	spare    int // slots that work on spare capacity may fill: depth - ReservedSlots
	// spareResv bounds spareInflight while resvActive is in the future
	// (Config.SpareSlotsWhileReserved; 0: no bound); resvWindow is
	// Config.ReservedActiveWindow in ns.
	spareResv  int
	resvWindow int64
	resvBurst  int64             // Config.ReservationBurst
	guard      guard             // Config.LatencyTolerance; under mu
	classLat   [numClasses]int64 // ns
	maxBG      int64             // ns
	quantum    int64             // ns of share tag a weight-DefaultWeight volume spends per spare I/O
	start      time.Time         // time 0 of the scheduler's int64 time line
	onTimer    func()            // s.wake, bound once so that arming the timer does not allocate

	closedFlag atomic.Bool // mirrors closed for the Disabled path, which takes no lock
	// lastForeground is one more than when a foreground request last
	// arrived, in ns of the monotonic clock since start, and 0 while none
	// has (noteForeground, ForegroundIdle): stored as is, a request at the
	// start instant (a clock that has not moved) would read as none.
	lastForeground atomic.Int64

	// timers counts timer callbacks that are scheduled or running, so that
	// Close can wait for them.
	timers sync.WaitGroup

	mu       sync.Mutex
	closed   bool
	vols     map[string]*volume
	inflight int // granted and not yet Done
	// spareInflight counts those of them granted on spare capacity to
	// volumes without a reservation (the ones the throttles hold back);
	// resvActive is when the last reserved volume's activity window ends.
	spareInflight int
	resvActive    int64
	queued        int    // waiting in some volume's queue
	seq           uint64 // arrival counter, the tie-break that makes the order total

	// Volumes with queued requests are in exactly one of two states:
	// eligible (their head request can be paid for now), in ready, and in resv
	// if they have a reservation, and in overdue if they have background
	// requests queued; or throttled, in throttled, keyed by when their head
	// request can be paid for.
	ready     indexedHeap[*volume] // by effective deadline (readyKey)
	resv      indexedHeap[*volume] // by reservation tag
	overdue   indexedHeap[*volume] // by arrival of the oldest queued background request
	throttled indexedHeap[*volume] // by readyAt

	// vtime is the share tag of the most recent spare-capacity dispatch: the
	// floor from which a volume that starts competing takes its tag, so that
	// it neither jumps ahead of busy volumes nor pays for its idle time.
	// epoch counts the moments when no request was queued: share tags from an
	// older epoch are void, since without a backlog there is nothing to share.
	vtime int64
	epoch uint64

	free []*waiter // waiters to reuse: no allocation per request once warm

	timer    Timer // nil until first needed
	timerSet bool  // timer is pending for timerAt
	timerAt  int64

	// grantHook, if set (by tests), is called at each grant before any state
	// changes, with the phase that chose the request.
	grantHook func(w *waiter, ph phase, now int64)
}

// phase is the rule that chose a request.
type phase uint8

const (
	// phaseOverdue: a background request that had waited MaxBackgroundWait.
	phaseOverdue phase = iota
	// phaseReserved: a volume below its MinIOPS.
	phaseReserved
	// phaseSpare: earliest effective deadline among eligible volumes.
	phaseSpare
)

// volume is one volume's queue and accounting.
type volume struct {
	name  string
	lim   Limits
	iops  bucket
	bytes bucket

	// rStep is 1/MinIOPS in ns (0: no reservation); rTag is when the volume
	// is next owed an I/O: it is below its reservation while rTag ≤ now.
	rStep, rTag int64
	// pStep is the share tag one spare-capacity I/O costs; pTag is the
	// volume's share tag, valid while pEpoch is the scheduler's epoch.
	pStep, pTag int64
	pEpoch      uint64

	queue  indexedHeap[*waiter] // by deadline, then arrival
	bgHead *waiter              // background requests in arrival order
	bgTail *waiter
	// urgent is bgHead once it has waited MaxBackgroundWait: the volume's
	// head regardless of deadlines until it is dispatched.
	urgent *waiter

	// Heap keys, computed in update so that they stay fixed while in a heap.
	readyKey int64  // effective deadline of the head
	headSeq  uint64 // arrival number of the head
	bgKey    int64  // arrival of bgHead
	bgSeq    uint64
	readyAt  int64 // when the head can be paid for (throttled only)
	since    int64 // when the volume became throttled

	readyIdx, resvIdx, overdueIdx, throttledIdx int
}

type waiterState uint8

const (
	stateFree waiterState = iota
	stateQueued
	stateGranted
	stateFailed
)

// waiter is a request waiting in, or dispatched by, the scheduler. Waiters are
// reused; gen tells a Ticket whether it still owns its waiter.
type waiter struct {
	ch       chan struct{} // one signal when granted or failed; buffered, so the signaller never blocks
	req      Request
	vol      *volume
	arrival  int64
	deadline int64
	seq      uint64
	gen      uint64
	idx      int // position in vol.queue
	bgPrev   *waiter
	bgNext   *waiter
	state    waiterState
	spare    bool  // granted on spare capacity to a volume without a reservation (counted in spareInflight)
	granted  int64 // when it was granted
	err      error // why a failed waiter failed
}

// Ticket is a dispatched request's hold on one slot of the dispatch depth.
// Call Done exactly once, when the disk has finished the request. The zero
// Ticket (from a Disabled scheduler) holds nothing.
type Ticket struct {
	s   *Scheduler
	w   *waiter
	gen uint64
}

// New returns a scheduler configured by cfg, or an error wrapping
// ErrInvalidConfig.
func New(cfg Config) (*Scheduler, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Scheduler{
		clock:      cfg.Clock,
		obs:        cfg.Observer,
		disabled:   cfg.Disabled,
		depth:      cfg.Depth,
		spare:      cfg.Depth - cfg.ReservedSlots,
		spareResv:  cfg.SpareSlotsWhileReserved,
		resvWindow: int64(cfg.ReservedActiveWindow),
		resvBurst:  int64(cfg.ReservationBurst),
		resvActive: math.MinInt64,
		maxBG:      int64(cfg.MaxBackgroundWait),
		start:      cfg.Clock.Now(),
		vols:       make(map[string]*volume),
		vtime:      math.MinInt64,
	}
	for i, d := range cfg.ClassLatency {
		s.classLat[i] = int64(d)
	}
	// With Depth requests in flight and each finishing within the foreground
	// target, the disk serves about Depth I/Os per foreground latency; a
	// volume of default weight that gets more than that is ahead of real time
	// and its requests rank by its share tag rather than by their deadlines.
	s.quantum = max(1, s.classLat[Foreground]/int64(s.depth))
	s.guard.configure(cfg)
	s.onTimer = s.wake
	s.ready = indexedHeap[*volume]{less: readyLess, pos: func(v *volume) *int { return &v.readyIdx }}
	s.resv = indexedHeap[*volume]{less: resvLess, pos: func(v *volume) *int { return &v.resvIdx }}
	s.overdue = indexedHeap[*volume]{less: overdueLess, pos: func(v *volume) *int { return &v.overdueIdx }}
	s.throttled = indexedHeap[*volume]{less: throttledLess, pos: func(v *volume) *int { return &v.throttledIdx }}
	return s, nil
}

func readyLess(a, b *volume) bool {
	return a.readyKey < b.readyKey || a.readyKey == b.readyKey && a.headSeq < b.headSeq
}

func resvLess(a, b *volume) bool {
	return a.rTag < b.rTag || a.rTag == b.rTag && a.headSeq < b.headSeq
}

func overdueLess(a, b *volume) bool {
	return a.bgKey < b.bgKey || a.bgKey == b.bgKey && a.bgSeq < b.bgSeq
}

func throttledLess(a, b *volume) bool {
	return a.readyAt < b.readyAt || a.readyAt == b.readyAt && a.headSeq < b.headSeq
}

func waiterLess(a, b *waiter) bool {
	return a.deadline < b.deadline || a.deadline == b.deadline && a.seq < b.seq
}

func waiterPos(w *waiter) *int { return &w.idx }

// SetLimits registers a volume or changes its limits; changes apply at once
// to its queued requests. Tokens already earned are kept (up to the new
// burst). It returns an error wrapping ErrInvalidLimits or ErrClosed.
func (s *Scheduler) SetLimits(id string, l Limits) error {
	if err := l.validate(id); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	now := s.now()
	v := s.vols[id]
	if v == nil {
		v = &volume{
			name:     id,
			queue:    indexedHeap[*waiter]{less: waiterLess, pos: waiterPos},
			readyIdx: -1, resvIdx: -1, overdueIdx: -1, throttledIdx: -1,
			// Owed from the start, burst allowance included, however soon
			// after the scheduler's time 0 the volume comes.
			rTag: math.MinInt64 / 2,
		}
		s.vols[id] = v
	}
	v.setLimits(l, s.quantum, now)
	if v.queue.len() > 0 {
		s.update(v, now)
		s.refresh(now)
		s.dispatch(now)
		s.arm(now)
	}
	return nil
}

func (v *volume) setLimits(l Limits, quantum, now int64) {
	burst := l.BurstDuration
	if burst == 0 {
		burst = DefaultBurstDuration
	}
	weight := int64(l.Weight)
	if weight == 0 {
		weight = DefaultWeight
	}
	v.lim = l
	v.iops.configure(l.MaxIOPS, burst, now, 1)
	v.bytes.configure(l.MaxBytesPerSec, burst, now, 1)
	v.rStep = 0
	if l.MinIOPS > 0 {
		v.rStep = max(1, int64(time.Second)/int64(min(l.MinIOPS, uint64(time.Second))))
	}
	v.pStep = max(1, quantum*DefaultWeight/weight)
}

// RemoveVolume forgets a volume. Its queued requests fail with
// ErrVolumeRemoved; requests already dispatched are unaffected and their
// Tickets must still be Done. Removing an unknown volume does nothing.
func (s *Scheduler) RemoveVolume(volume string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v := s.vols[volume]
	if v == nil {
		return
	}
	now := s.now()
	s.failAll(v, ErrVolumeRemoved, now)
	delete(s.vols, volume)
}

// VolumeTokens is what a volume's token buckets hold at one moment.
type VolumeTokens struct {
	Volume string
	// IOPS and Bytes are the tokens in the volume's IOPS and bytes/s
	// buckets: up to limit × burst, negative while a request larger than
	// the bucket is paid off. They mean something only where the volume
	// has that limit (IOPSLimited, BytesLimited).
	IOPS, Bytes               float64
	IOPSLimited, BytesLimited bool
}

// Tokens appends to dst what every registered volume's buckets hold now and
// returns it, in no particular order. It is meant for a metrics scrape: it
// holds the scheduler's lock for a pass over all volumes, and reads the
// buckets without changing them.
func (s *Scheduler) Tokens(dst []VolumeTokens) []VolumeTokens {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	for _, v := range s.vols {
		dst = append(dst, VolumeTokens{Volume: v.name,
			IOPS: v.iops.level(now), Bytes: v.bytes.level(now),
			IOPSLimited: v.iops.rate > 0, BytesLimited: v.bytes.rate > 0})
	}
	return dst
}

// Acquire waits until r may be dispatched, that is until the scheduler grants
// it a slot of the dispatch depth and its volume's buckets have paid for it,
// and returns the Ticket whose Done frees the slot. It returns early with
// ctx.Err() if ctx ends first (the request leaves the queue), ErrClosed if the
// scheduler is closed, ErrVolumeRemoved if the volume is removed meanwhile,
// or an error wrapping ErrUnknownVolume or ErrInvalidRequest.
//
// A request granted at the moment ctx ends is given back: Acquire then
// returns ctx.Err(), though the tokens it was charged stay spent.
func (s *Scheduler) Acquire(ctx context.Context, r Request) (Ticket, error) {
	if s.disabled {
		if r.Class == Foreground {
			s.noteForeground(s.now())
		}
		if s.closedFlag.Load() {
			return Ticket{}, ErrClosed
		}
		s.obs.Dispatched(r.Volume, r.Op, r.Bytes)
		return Ticket{}, nil
	}
	if err := ctx.Err(); err != nil {
		return Ticket{}, err
	}
	w, err := s.enqueue(r)
	if err != nil {
		return Ticket{}, err
	}
	select {
	case <-w.ch:
		return s.collect(w)
	case <-ctx.Done():
	}
	if s.cancel(w) {
		return Ticket{}, ctx.Err()
	}
	// Granted or failed while ctx ended: the signal is on its way.
	<-w.ch
	t, err := s.collect(w)
	if err != nil {
		return Ticket{}, err
	}
	t.done(false) // it never ran: no service time to measure
	return Ticket{}, ctx.Err()
}

// ForegroundIdle reports whether no foreground request has arrived for d:
// background work (a rebuild) may then use more of the node than it would
// beside foreground I/O. A scheduler that has seen none is idle.
func (s *Scheduler) ForegroundIdle(d time.Duration) bool {
	last := s.lastForeground.Load()
	return last == 0 || time.Duration(s.now()-(last-1)) >= d
}

// noteForeground records that a foreground request arrived at now.
func (s *Scheduler) noteForeground(now int64) { s.lastForeground.Store(now + 1) }

// enqueue queues r and dispatches whatever may go now (r itself, perhaps).
// The waiter is signalled on w.ch when granted or failed.
func (s *Scheduler) enqueue(r Request) (*waiter, error) {
	if r.Class >= numClasses || r.Op >= numOps {
		return nil, fmt.Errorf("%w: class %v, op %v", ErrInvalidRequest, r.Class, r.Op)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	v := s.vols[r.Volume]
	if v == nil {
		return nil, fmt.Errorf("%w: %q", ErrUnknownVolume, r.Volume)
	}
	now := s.now()
	if r.Class == Foreground {
		s.noteForeground(now) // ForegroundIdle; the clock read once
	}
	if v.rStep > 0 && r.Class == Foreground {
		// Only foreground requests make a reserved volume active: its
		// rebuild or scrub is not what the throttles protect. Before
		// refresh, so that the latency guard starts with this request
		// (and measures it).
		s.resvActive = now + s.resvWindow
	}
	s.refresh(now)
	w := s.newWaiter()
	w.req = r
	w.vol = v
	w.arrival = now
	if r.Deadline.IsZero() {
		w.deadline = now + s.classLat[r.Class]
	} else {
		w.deadline = int64(r.Deadline.Sub(s.start))
	}
	w.seq = s.seq
	s.seq++
	w.state = stateQueued
	v.queue.set(w)
	if r.Class.background() {
		w.bgPrev = v.bgTail
		if v.bgTail != nil {
			v.bgTail.bgNext = w
		} else {
			v.bgHead = w
		}
		v.bgTail = w
	}
	s.queued++
	s.update(v, now)
	s.dispatch(now)
	s.arm(now)
	return w, nil
}

// collect turns a signalled waiter into the Acquire result.
func (s *Scheduler) collect(w *waiter) (Ticket, error) {
	if w.state == stateGranted {
		return Ticket{s: s, w: w, gen: w.gen}, nil
	}
	err := w.err
	s.mu.Lock()
	s.release(w)
	s.mu.Unlock()
	return Ticket{}, err
}

// cancel takes a queued waiter out of the queue and reports whether it was
// still queued.
func (s *Scheduler) cancel(w *waiter) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w.state != stateQueued {
		return false
	}
	v := w.vol
	now := s.now()
	s.unqueue(w)
	s.release(w)
	s.update(v, now)
	// The volume's head may have changed to a request that can go now.
	s.refresh(now)
	s.dispatch(now)
	s.arm(now)
	return true
}

// Done frees the Ticket's dispatch slot, letting the next request go. Calling
// it twice is a bug and panics.
func (t Ticket) Done() { t.done(true) }

// done is Done; ran says whether the request went to the disk, so that its
// service time counts for the latency guard.
func (t Ticket) done(ran bool) {
	if t.w == nil {
		return
	}
	s := t.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.w.gen != t.gen || t.w.state != stateGranted {
		panic("BUG: iosched: Ticket.Done called twice")
	}
	if t.w.spare {
		s.spareInflight--
	}
	now := s.now()
	if w := t.w; ran && w.vol.rStep > 0 && w.req.Class == Foreground {
		s.guard.finished(now - w.granted)
	}
	s.release(t.w)
	s.inflight--
	if s.closed {
		return
	}
	s.refresh(now)
	s.dispatch(now)
	s.arm(now)
}

// Close fails every queued request with ErrClosed, stops the timer and waits
// for a timer callback that is running. Tickets already granted stay valid;
// their Done may be called after Close. Close is idempotent.
func (s *Scheduler) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.closedFlag.Store(true)
	now := s.now()
	for _, v := range s.vols {
		s.failAll(v, ErrClosed, now)
	}
	if s.timer != nil && s.timer.Stop() {
		s.timers.Done()
	}
	s.timerSet = false
	s.mu.Unlock()
	s.timers.Wait()
}

// wake is the timer callback: a throttled volume may have its tokens.
func (s *Scheduler) wake() {
	defer s.timers.Done()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.timerSet = false
	if s.closed {
		return
	}
	now := s.now()
	s.refresh(now)
	s.dispatch(now)
	s.arm(now)
}

// The functions below run with s.mu held.

func (s *Scheduler) now() int64 { return int64(s.clock.Now().Sub(s.start)) }

func (s *Scheduler) newWaiter() *waiter {
	if n := len(s.free); n > 0 {
		w := s.free[n-1]
		s.free[n-1] = nil
		s.free = s.free[:n-1]
		return w
	}
	return &waiter{ch: make(chan struct{}, 1), idx: -1}
}

// release returns a waiter to the free list; any Ticket for it is void.
func (s *Scheduler) release(w *waiter) {
	w.gen++
	w.state = stateFree
	w.req = Request{}
	w.vol = nil
	w.err = nil
	w.spare = false
	s.free = append(s.free, w)
}

// unqueue takes a queued waiter out of its volume's structures (not out of
// the scheduler's heaps: the caller updates the volume).
func (s *Scheduler) unqueue(w *waiter) {
	v := w.vol
	v.queue.remove(w)
	if w.req.Class.background() {
		if w.bgPrev != nil {
			w.bgPrev.bgNext = w.bgNext
		} else {
			v.bgHead = w.bgNext
		}
		if w.bgNext != nil {
			w.bgNext.bgPrev = w.bgPrev
		} else {
			v.bgTail = w.bgPrev
		}
		w.bgPrev, w.bgNext = nil, nil
	}
	if v.urgent == w {
		v.urgent = nil
	}
	s.queued--
	if s.queued == 0 {
		// No backlog, nothing to share: forget every share tag at once.
		s.epoch++
		s.vtime = math.MinInt64
	}
}

// failAll fails every queued request of v and takes v out of the heaps.
func (s *Scheduler) failAll(v *volume, err error, now int64) {
	for v.queue.len() > 0 {
		w := v.queue.top()
		s.unqueue(w)
		w.state = stateFailed
		w.err = err
		w.ch <- struct{}{}
	}
	s.update(v, now)
}

// head is the request v would dispatch next.
func (v *volume) head() *waiter {
	if v.urgent != nil {
		return v.urgent
	}
	return v.queue.top()
}

// shareTag is v's share tag, or MinInt64 if it belongs to an older epoch.
func (s *Scheduler) shareTag(v *volume) int64 {
	if v.pEpoch != s.epoch {
		return math.MinInt64
	}
	return v.pTag
}

// cost returns what r takes from its volume's IOPS and bytes buckets: only
// reads and writes carry bytes.
func cost(r *Request) (ios, bytes float64) {
	if r.Op == Read || r.Op == Write {
		bytes = float64(r.Bytes)
	}
	return 1, bytes
}

// paidAt brings v's buckets up to now and returns when they can pay for w.
func (v *volume) paidAt(w *waiter, now int64) int64 {
	ios, bytes := cost(&w.req)
	v.iops.advance(now)
	v.bytes.advance(now)
	return max(v.iops.readyAt(ios, now), v.bytes.readyAt(bytes, now))
}

// update puts v in the heaps that match its queue and tokens at now. Every
// change to a volume's queue, tags or limits ends with it.
func (s *Scheduler) update(v *volume, now int64) {
	if v.queue.len() == 0 {
		s.ready.remove(v)
		s.resv.remove(v)
		s.overdue.remove(v)
		s.unthrottle(v, now)
		return
	}
	h := v.head()
	v.headSeq = h.seq
	if at := v.paidAt(h, now); at > now {
		s.ready.remove(v)
		s.resv.remove(v)
		s.overdue.remove(v)
		if !s.throttled.contains(v) {
			v.since = now
		}
		v.readyAt = at
		s.throttled.set(v)
		return
	}
	s.unthrottle(v, now)
	v.readyKey = max(h.deadline, s.shareTag(v))
	s.ready.set(v)
	if v.rStep > 0 {
		s.resv.set(v)
	} else {
		s.resv.remove(v)
	}
	if v.bgHead != nil {
		v.bgKey, v.bgSeq = v.bgHead.arrival, v.bgHead.seq
		s.overdue.set(v)
	} else {
		s.overdue.remove(v)
	}
}

func (s *Scheduler) unthrottle(v *volume, now int64) {
	if s.throttled.contains(v) {
		s.throttled.remove(v)
		s.obs.Throttled(v.name, time.Duration(now-v.since))
	}
}

// refresh makes eligible every throttled volume whose tokens have come, and
// runs the latency guard's clock.
func (s *Scheduler) refresh(now int64) {
	if s.guard.tick(now, s.resvActive) {
		s.obs.SpareLimit(s.guard.current())
	}
	for s.throttled.len() > 0 && s.throttled.top().readyAt <= now {
		s.update(s.throttled.top(), now)
	}
}

// dispatch grants requests while slots are free and some volume is eligible.
//
// Invariant (after dispatch returns): either every slot is taken, or no
// volume with queued requests is eligible, or the only eligible requests
// would use spare capacity and every slot open to them is taken (the others
// are kept, Config.ReservedSlots), or they are those of volumes without a
// reservation and spare work is held (see spareHeld).
//
// Every caller runs refresh(now) first.
func (s *Scheduler) dispatch(now int64) {
	// spareHeld(now), worked out when first needed; only a grant that
	// counts against the throttles (w.spare) can change it.
	held, known := false, false
	for s.inflight < s.depth {
		w, ph := s.pick(now)
		if w == nil {
			return
		}
		if ph == phaseSpare {
			if s.inflight >= s.spare {
				return // pick offers spare work only when nothing else is eligible
			}
			if w.vol.rStep == 0 {
				if !known {
					held, known = s.spareHeld(now), true
				}
				if held {
					// The throttles hold back only volumes without a
					// reservation: they protect the reserved ones, so
					// an eligible reserved volume beyond its
					// reservation goes instead, the most owed first.
					if s.resv.len() == 0 {
						return
					}
					w = s.resv.top().head()
				}
			}
		}
		s.grant(w, ph, now)
		if w.spare {
			known = false
		}
	}
}

// spareHeld reports whether a reserved volume is active and spare work of
// volumes without a reservation has its share of slots
// (Config.SpareSlotsWhileReserved) or of the rate the latency guard allows
// (Config.LatencyTolerance). The guard holds only while a reserved volume
// is active: refresh, which runs first, stops it when none is.
func (s *Scheduler) spareHeld(now int64) bool {
	if s.spareBounded(now) {
		return true
	}
	held, _ := s.guard.holds(now)
	return held
}

// spareBounded reports whether the bound for spare work while a reserved
// volume is active applies now and is reached.
func (s *Scheduler) spareBounded(now int64) bool {
	return s.spareResv > 0 && now < s.resvActive && s.spareInflight >= s.spareResv
}

// pick chooses the next request: first a background request that has waited
// MaxBackgroundWait, then a volume below its reservation, then the eligible
// request with the earliest effective deadline.
func (s *Scheduler) pick(now int64) (*waiter, phase) {
	for s.overdue.len() > 0 {
		v := s.overdue.top()
		b := v.bgHead
		if b.arrival+s.maxBG > now {
			break
		}
		if v.urgent == b {
			return b, phaseOverdue
		}
		// Make it the volume's head; its tokens may not suffice (it may be
		// larger than the head was), in which case the volume is throttled
		// until they do and this loop looks at the next volume.
		v.urgent = b
		s.update(v, now)
	}
	if s.resv.len() > 0 {
		if v := s.resv.top(); v.rTag <= now {
			return v.head(), phaseReserved
		}
	}
	if s.ready.len() > 0 {
		return s.ready.top().head(), phaseSpare
	}
	return nil, phaseSpare
}

// grant dispatches w, which pick chose by rule ph.
func (s *Scheduler) grant(w *waiter, ph phase, now int64) {
	if s.grantHook != nil {
		s.grantHook(w, ph, now)
	}
	v := w.vol
	s.unqueue(w)
	ios, bytes := cost(&w.req)
	v.iops.charge(ios, now)
	v.bytes.charge(bytes, now)
	if v.rStep > 0 {
		// mClock: the tag advances from the request's arrival, so a backlogged
		// volume that was served late catches up, but an idle one banks
		// nothing beyond the burst allowance b: the tag may start up to b-1
		// steps before the arrival, so b requests arriving together are
		// all owed.
		v.rTag = max(v.rTag, w.arrival-(s.resvBurst-1)*v.rStep) + v.rStep
	}
	if ph != phaseReserved {
		// Start-time fair queueing on share tags: reserved I/Os are not
		// charged against the volume's share of spare capacity.
		base := max(s.shareTag(v), s.vtime, now)
		v.pTag, v.pEpoch = base+v.pStep, s.epoch
		if ph == phaseSpare {
			s.vtime = max(s.vtime, base)
		}
	}
	s.inflight++
	w.granted = now
	// Only volumes without a reservation count against the throttles.
	w.spare = ph == phaseSpare && v.rStep == 0
	if w.spare {
		s.spareInflight++
		s.guard.spareGranted(&w.req, now)
	}
	w.state = stateGranted
	s.obs.QueueWait(v.name, w.req.Class, time.Duration(now-w.arrival))
	if now > w.deadline {
		s.obs.DeadlineMiss(v.name, w.req.Class)
	}
	s.obs.Dispatched(v.name, w.req.Op, w.req.Bytes)
	w.ch <- struct{}{}
	s.update(v, now)
}

// arm sets the timer for the earliest throttled volume, if a slot is free for
// it, and, while only kept slots are free, for the next reservation or
// background deadline. With every slot taken there is no need: Done
// refreshes the throttled volumes itself.
func (s *Scheduler) arm(now int64) {
	if s.closed || s.inflight >= s.depth {
		return
	}
	at := int64(math.MaxInt64)
	if s.throttled.len() > 0 {
		at = s.throttled.top().readyAt
	}
	if s.guard.active && s.resvActive > now {
		// The latency guard stops when the reserved volumes' activity
		// ends; wake up then, so that it reports so (SpareLimit) even if
		// nothing else happens. That is also when the throttles below
		// let go of spare work.
		at = min(at, s.resvActive)
	}
	bounded := s.spareBounded(now)
	held, until := s.guard.holds(now)
	if s.inflight >= s.spare || bounded || held {
		// A request on spare capacity of a volume without a reservation
		// must wait although a slot is free: the free slots are kept
		// (Config.ReservedSlots), or spare work is held (spareHeld).
		// Eligible spare work waits for them to be needed by no one: a
		// volume coming under its reservation or background work
		// becoming overdue may take one, but both happen by the clock
		// alone, with no call to dispatch. So do the end of a reserved
		// volume's activity and the guard's next token.
		if s.resv.len() > 0 {
			at = min(at, s.resv.top().rTag)
		}
		if s.overdue.len() > 0 {
			at = min(at, s.overdue.top().bgHead.arrival+s.maxBG)
		}
		if bounded && s.ready.len() > 0 {
			at = min(at, s.resvActive)
		}
		if held && s.ready.len() > 0 {
			at = min(at, until) // held implies active: resvActive is in at
		}
	}
	if at == math.MaxInt64 {
		return
	}
	if s.timerSet && s.timerAt <= at {
		return // an earlier wake-up is pending; it re-arms
	}
	d := time.Duration(max(1, at-now))
	if s.timer == nil {
		s.timers.Add(1)
		s.timer = s.clock.AfterFunc(d, s.onTimer)
	} else if !s.timer.Reset(d) {
		s.timers.Add(1)
	}
	s.timerSet, s.timerAt = true, at
}
