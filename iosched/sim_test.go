package iosched

import (
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock that moves only when told. Timers fire synchronously,
// in time order (then creation order), in the goroutine that advances the
// clock, and never while the clock's lock is held.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	seq    uint64
	timers []*fakeTimer
}

type fakeTimer struct {
	c      *fakeClock
	at     time.Time
	seq    uint64
	f      func()
	active bool
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) Timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{c: c, f: f}
	c.schedule(t, d)
	return t
}

func (c *fakeClock) schedule(t *fakeTimer, d time.Duration) {
	c.seq++
	t.at, t.seq, t.active = c.now.Add(d), c.seq, true
	c.timers = append(c.timers, t)
}

func (c *fakeClock) unlink(t *fakeTimer) {
	t.active = false
	if i := slices.Index(c.timers, t); i >= 0 {
		c.timers = slices.Delete(c.timers, i, i+1)
	}
}

func (t *fakeTimer) Stop() bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	if was {
		t.c.unlink(t)
	}
	return was
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	t.c.mu.Lock()
	defer t.c.mu.Unlock()
	was := t.active
	if was {
		t.c.unlink(t)
	}
	t.c.schedule(t, d)
	return was
}

// fireNext fires the earliest timer due by limit, moving the clock to it, and
// reports whether there was one.
func (c *fakeClock) fireNext(limit time.Time) bool {
	c.mu.Lock()
	var next *fakeTimer
	for _, t := range c.timers {
		if !t.at.After(limit) && (next == nil || t.at.Before(next.at) || t.at.Equal(next.at) && t.seq < next.seq) {
			next = t
		}
	}
	if next == nil {
		c.mu.Unlock()
		return false
	}
	if next.at.After(c.now) {
		c.now = next.at
	}
	c.unlink(next)
	c.mu.Unlock()
	next.f()
	return true
}

// Advance moves the clock by d, firing the timers due on the way.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	limit := c.now.Add(d)
	c.mu.Unlock()
	for c.fireNext(limit) {
	}
	c.mu.Lock()
	if limit.After(c.now) {
		c.now = limit
	}
	c.mu.Unlock()
}

// pending reports how many timers are set.
func (c *fakeClock) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.timers)
}

// grantRec is one dispatch as the simulation saw it.
type grantRec struct {
	req      Request
	id       int
	arrival  time.Duration // since the simulation's start
	at       time.Duration
	deadline time.Duration
	phase    phase
}

// client issues requests of one kind on one volume: closed-loop, keeping qd
// requests outstanding (queued or in flight), or open-loop with every.
type client struct {
	req   Request
	qd    int
	every time.Duration
	from  time.Duration // start issuing at
	until time.Duration // stop issuing at (0: never)

	granted int
	waits   []time.Duration
}

// sim drives a Scheduler on a fake clock with a disk model: every dispatched
// request completes after service(req). Everything runs in the test's
// goroutine; there is no real concurrency and the outcome is deterministic.
type sim struct {
	tb      testing.TB
	clk     *fakeClock
	s       *Scheduler
	t0      time.Time
	service func(Request) time.Duration

	nextID      int
	entering    *simReq             // the request inside enqueue
	owner       map[*waiter]*simReq // queued requests
	fresh       []*waiter           // granted by the scheduler, not yet collected
	inflight    int
	maxInflight int
	grants      []grantRec
	held        []Ticket                                       // dispatched requests the test completes itself (service < 0)
	onGrant     []func(w *waiter, ph phase, now time.Duration) // run under the scheduler's lock
	afterStep   []func()                                       // run after every step of the simulation
	onDone      []func(w *waiter)                              // run just before a dispatched request's Done
}

type simReq struct {
	w      *waiter // while queued
	id     int
	c      *client
	req    Request
	arrive time.Duration
}

func newSim(tb testing.TB, cfg Config, service time.Duration) *sim {
	tb.Helper()
	clk := newFakeClock()
	cfg.Clock = clk
	s, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	h := &sim{
		tb: tb, clk: clk, s: s, t0: clk.Now(),
		service: func(Request) time.Duration { return service },
		owner:   make(map[*waiter]*simReq),
	}
	s.grantHook = func(w *waiter, ph phase, now int64) {
		for _, f := range h.onGrant {
			f(w, ph, time.Duration(now))
		}
		r := h.owner[w]
		if r == nil {
			r = h.entering // granted inside the enqueue that queued it
		}
		id := -1 // queued behind the harness's back
		if r != nil {
			id = r.id
		}
		h.grants = append(h.grants, grantRec{
			req: w.req, id: id, arrival: time.Duration(w.arrival), at: time.Duration(now),
			deadline: time.Duration(w.deadline), phase: ph,
		})
		h.fresh = append(h.fresh, w)
	}
	tb.Cleanup(s.Close)
	return h
}

func (h *sim) elapsed() time.Duration { return h.clk.Now().Sub(h.t0) }

func (h *sim) setLimits(vol string, l Limits) {
	h.tb.Helper()
	if err := h.s.SetLimits(vol, l); err != nil {
		h.tb.Fatal(err)
	}
}

// at runs f at simulation time d.
func (h *sim) at(d time.Duration, f func()) {
	h.clk.AfterFunc(d-h.elapsed(), func() { f(); h.collect() })
}

// submit queues one request of c (c may be nil for a one-off request r).
func (h *sim) submit(c *client, r Request) *simReq {
	h.tb.Helper()
	if c != nil {
		r = c.req
	}
	sr := &simReq{id: h.nextID, c: c, req: r, arrive: h.elapsed()}
	h.nextID++
	// The grant hook may run inside enqueue, before the waiter is known.
	h.entering = sr
	w, err := h.s.enqueue(r)
	h.entering = nil
	if err != nil {
		h.tb.Fatalf("enqueue %+v: %v", r, err)
	}
	h.owner[w] = sr
	sr.w = w
	h.collect()
	return sr
}

// collect starts the disk on every request granted since the last call.
func (h *sim) collect() {
	for len(h.fresh) > 0 {
		w := h.fresh[0]
		h.fresh = h.fresh[1:]
		sr := h.owner[w]
		delete(h.owner, w)
		<-w.ch
		t, err := h.s.collect(w)
		if err != nil {
			h.tb.Fatalf("collect: %v", err)
		}
		h.inflight++
		h.maxInflight = max(h.maxInflight, h.inflight)
		if sr == nil {
			h.tb.Fatal("request queued behind the harness's back was granted")
		}
		d := h.service(sr.req)
		if d < 0 {
			h.held = append(h.held, t)
			continue
		}
		if c := sr.c; c != nil {
			c.granted++
			c.waits = append(c.waits, h.elapsed()-sr.arrive)
		}
		h.clk.AfterFunc(d, func() {
			h.inflight--
			h.done(t)
			if c := sr.c; c != nil && c.qd > 0 && (c.until == 0 || h.elapsed() < c.until) {
				h.submit(c, Request{})
			}
			h.collect()
		})
	}
	for _, f := range h.afterStep {
		f()
	}
}

// start starts clients at their from time.
func (h *sim) start(cs ...*client) {
	for _, c := range cs {
		h.at(c.from, func() {
			if c.qd > 0 {
				for range c.qd {
					h.submit(c, Request{})
				}
				return
			}
			var tick func()
			tick = func() {
				if c.until != 0 && h.elapsed() >= c.until {
					return
				}
				h.submit(c, Request{})
				h.clk.AfterFunc(c.every, func() { tick(); h.collect() })
			}
			tick()
		})
	}
}

// finish completes the oldest held request.
func (h *sim) finish() {
	t := h.held[0]
	h.held = h.held[1:]
	h.inflight--
	h.done(t)
	h.collect()
}

// done completes a dispatched request.
func (h *sim) done(t Ticket) {
	for _, f := range h.onDone {
		f(t.w)
	}
	t.Done()
}

// run advances the simulation to time end.
func (h *sim) run(end time.Duration) {
	limit := h.t0.Add(end)
	for h.clk.fireNext(limit) {
		h.collect()
	}
	h.clk.Advance(limit.Sub(h.clk.Now()))
	h.collect()
}

// queued reports how many requests the scheduler holds in its queues.
func (h *sim) queued() int {
	h.s.mu.Lock()
	defer h.s.mu.Unlock()
	return h.s.queued
}

// checkNoLeaks fails the test if goroutines running iosched code remain,
// waiting a little for ones that are finishing.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	var stacks string
	for range 100 {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "iosched.(*Scheduler)") || strings.Contains(g, "iosched.Ticket") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 {
			return
		}
		stacks = strings.Join(leaked, "\n\n")
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("goroutines left running iosched code:\n%s", stacks)
}
