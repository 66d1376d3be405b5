package iosched

import (
	"fmt"
	"math"
	mrand "math/rand"
	"math/rand/v2"
	"slices"
	"testing"
	"testing/quick"
	"time"
)

// quickConfig makes testing/quick deterministic: the same seeds every run.
func quickConfig(n int) *quick.Config {
	return &quick.Config{MaxCount: n, Rand: mrand.New(mrand.NewSource(1))}
}

// refBucket is an independent token bucket used to judge the scheduler.
type refBucket struct {
	rate, capacity, tokens float64 // rate per ns; rate 0 = unlimited
	last                   int64
}

func newRefBucket(limit uint64, burst time.Duration) refBucket {
	if limit == 0 {
		return refBucket{}
	}
	if burst == 0 {
		burst = DefaultBurstDuration
	}
	c := math.Max(1, float64(limit)*burst.Seconds())
	return refBucket{rate: float64(limit) / 1e9, capacity: c, tokens: c}
}

func (b refBucket) at(now int64) float64 {
	if b.rate == 0 {
		return math.Inf(1)
	}
	return math.Min(b.capacity, b.tokens+float64(now-b.last)*b.rate)
}

func (b refBucket) need(cost float64) float64 { return math.Min(cost, b.capacity) }

// tol is how far float rounding may move the scheduler's view of a bucket
// from the reference's.
func tol(need float64) float64 { return 1e-6 * math.Max(1, need) }

func (b *refBucket) charge(cost float64, now int64) {
	if b.rate == 0 {
		return
	}
	b.tokens, b.last = b.at(now)-cost, now
}

// volSpec is one volume of a random scenario.
type volSpec struct {
	name    string
	lim     Limits
	size    uint64
	op      Op
	gap     time.Duration // mean time between arrivals
	bgShare float64
	iops    refBucket
	bytes   refBucket
	queued  int
}

func (v *volSpec) unlimited() bool { return v.lim.MaxIOPS == 0 && v.lim.MaxBytesPerSec == 0 }

// affordable reports whether the reference buckets can pay for one request
// of the volume at now, leaning by ±slack.
func (v *volSpec) affordable(now int64, slack float64) bool {
	bytes := float64(v.size)
	if v.op != Read && v.op != Write {
		bytes = 0
	}
	ni, nb := v.iops.need(1), v.bytes.need(bytes)
	return v.iops.at(now) >= ni+slack*tol(ni) && v.bytes.at(now) >= nb+slack*tol(nb)
}

// TestPropertyRandomArrivals runs random scenarios (volumes with random
// limits, reservations and weights; random arrivals, classes, deadlines,
// sizes, service times and cancellations) and checks after every step that:
//
//   - no more than Depth requests are in flight;
//   - no request is dispatched before its volume's buckets can pay for it
//     (so the limits hold at every instant, not only on average);
//   - the scheduler is work-conserving with no head-of-line blocking: while
//     a slot is free, every volume with queued requests is out of tokens
//     (with ReservedSlots: while only kept slots are free, no volume under
//     its reservation or with overdue background work is waiting, and no
//     request on spare capacity takes a kept slot; with
//     SpareSlotsWhileReserved: the same while a reserved volume sent a
//     request within ReservedActiveWindow and that many requests on spare
//     capacity of volumes without a reservation are in flight, or, with
//     LatencyTolerance, while the latency guard holds spare work; and
//     then no volume with a reservation waits either);
//   - each dispatch is the one the rules choose, computed by brute force over
//     every queued request (overdue background, then reservations, then the
//     earliest effective deadline; while spare work is held, the reserved
//     volume with the earliest reservation tag in place of a volume without
//     a reservation), so the heaps keep the EDF order;
//   - a background request on an unlimited volume waits at most
//     MaxBackgroundWait plus one service time per older overdue background
//     request dispatched before it;
//   - once arrivals stop, every request not cancelled is dispatched.
func TestPropertyRandomArrivals(t *testing.T) {
	var total heldStats
	check := func(seed uint64) bool {
		return t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { total.add(randomScenario(t, seed)) })
	}
	n := 60
	if testing.Short() {
		n = 10
	}
	if err := quick.Check(check, quickConfig(n)); err != nil {
		t.Error(err)
	}
	// The rules for held spare work must have been exercised, not passed
	// for want of occasions.
	if total.guardHeld == 0 || total.fallback == 0 {
		t.Errorf("over %d scenarios, the latency guard held waiting work %d times and a reserved volume went on spare capacity while others were held %d times; want both above 0",
			n, total.guardHeld, total.fallback)
	}
	t.Logf("held spare work: by the latency guard %d times, reserved volumes served instead %d times", total.guardHeld, total.fallback)
}

// heldStats counts the occasions a scenario gave the rules for held spare
// work.
type heldStats struct {
	guardHeld int // steps where the guard held back a waiting volume without a reservation
	fallback  int // grants on spare capacity to a reserved volume while others were held
}

func (a *heldStats) add(b heldStats) {
	a.guardHeld += b.guardHeld
	a.fallback += b.fallback
}

func randomScenario(t *testing.T, seed uint64) (stats heldStats) {
	rng := rand.New(rand.NewPCG(seed, 0x10))
	var h *sim
	dur := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(rng.Int64N(int64(hi-lo+1))) }
	cfg := Config{Depth: 1 + rng.IntN(6), MaxBackgroundWait: dur(20*time.Millisecond, 300*time.Millisecond)}
	if rng.IntN(2) == 0 {
		cfg.ReservedSlots = rng.IntN(cfg.Depth)
	}
	spareSlots := cfg.Depth - cfg.ReservedSlots
	if rng.IntN(2) == 0 {
		cfg.ReservationBurst = rng.IntN(10)
	}
	if rng.IntN(2) == 0 {
		cfg.SpareSlotsWhileReserved = 1 + rng.IntN(spareSlots)
		cfg.ReservedActiveWindow = dur(time.Millisecond, 50*time.Millisecond)
	}
	if rng.IntN(2) == 0 {
		cfg.LatencyTolerance = 1 + 2*rng.Float64()
		cfg.LatencyWindow = dur(time.Millisecond, 10*time.Millisecond)
		cfg.MinSpareIOPS = 1 + rng.Uint64N(2000)
	}
	// The test's own account of the bound: when the last reserved volume's
	// window ends, and the requests on spare capacity in flight of volumes
	// without a reservation. Whether the latency guard holds is read from
	// the scheduler's own guard: this test checks that dispatch obeys it,
	// not that it is right (TestGuardStateMachine and TestLatencyGuard in
	// guard_test.go check that).
	resvActive := time.Duration(-1)
	spareInflight := 0
	spareGranted := map[*waiter]bool{}
	spareBounded := func(now time.Duration) bool {
		return cfg.SpareSlotsWhileReserved > 0 && now < resvActive && spareInflight >= cfg.SpareSlotsWhileReserved
	}
	spareHeld := func(now time.Duration) bool {
		held, _ := h.s.guard.holds(int64(now))
		return spareBounded(now) || held && int64(now) < h.s.resvActive
	}
	cfg.ClassLatency = [numClasses]time.Duration{
		dur(time.Millisecond, 20*time.Millisecond),
		dur(10*time.Millisecond, 500*time.Millisecond),
		dur(100*time.Millisecond, 2*time.Second),
	}
	maxService := dur(100*time.Microsecond, 2*time.Millisecond)
	h = newSim(t, cfg, 0)
	h.service = func(Request) time.Duration { return dur(maxService/4, maxService) }

	var vols []*volSpec
	byName := map[string]*volSpec{}
	for i := range 1 + rng.IntN(5) {
		v := &volSpec{name: fmt.Sprintf("vol%d", i), size: 512 << rng.IntN(8), op: Op(rng.IntN(numOps))}
		if rng.IntN(2) == 0 {
			v.lim.MaxIOPS = 20 + rng.Uint64N(2000)
		}
		if rng.IntN(3) == 0 {
			v.lim.MaxBytesPerSec = 256*kib + rng.Uint64N(8*mib)
		}
		if rng.IntN(3) == 0 {
			v.lim.MinIOPS = 1 + rng.Uint64N(800)
			if v.lim.MaxIOPS != 0 {
				v.lim.MinIOPS = min(v.lim.MinIOPS, v.lim.MaxIOPS)
			}
		}
		if rng.IntN(2) == 0 {
			v.lim.BurstDuration = dur(time.Millisecond, time.Second)
		}
		v.lim.Weight = uint32(rng.IntN(1000))
		v.gap = dur(time.Millisecond, 20*time.Millisecond)
		if rng.IntN(3) == 0 {
			// A flood: arrivals beyond what the disk does, so queues build.
			// The limits are raised so that the backlog drains in minutes.
			v.gap = dur(200*time.Microsecond, 500*time.Microsecond)
			if v.lim.MaxIOPS != 0 {
				v.lim.MaxIOPS = max(v.lim.MaxIOPS, 200)
			}
			if v.lim.MaxBytesPerSec != 0 {
				v.lim.MaxBytesPerSec = max(v.lim.MaxBytesPerSec, 8*mib)
			}
		}
		v.bgShare = []float64{0, 0.1, 0.5, 1}[rng.IntN(4)]
		v.iops = newRefBucket(v.lim.MaxIOPS, v.lim.BurstDuration)
		v.bytes = newRefBucket(v.lim.MaxBytesPerSec, v.lim.BurstDuration)
		h.setLimits(v.name, v.lim)
		vols = append(vols, v)
		byName[v.name] = v
	}
	t.Logf("depth %d, max service %v, %+v", cfg.Depth, maxService, cfg)
	for _, v := range vols {
		t.Logf("%s: %+v size %d op %v gap %v bg %.1f", v.name, v.lim, v.size, v.op, v.gap, v.bgShare)
	}

	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("at %v: "+format, append([]any{h.elapsed()}, args...)...)
	}
	// Checks at each grant, before the scheduler changes anything.
	h.onGrant = append(h.onGrant, func(w *waiter, ph phase, now time.Duration) {
		v := byName[w.req.Volume]
		n := int64(now)
		if !v.affordable(n, -1) {
			sb := h.s.vols[v.name].bytes
			sb.advance(n)
			fail("%s dispatched by phase %d without tokens: iops %.3f, bytes %.1f (scheduler: %.1f) for %d bytes %v",
				v.name, ph, v.iops.at(n), v.bytes.at(n), sb.tokens, w.req.Bytes, w.req.Op)
		}
		held := spareHeld(now)
		checkPick(t, h.s, byName, w, ph, n, held)
		if ph == phaseSpare && h.s.inflight >= spareSlots {
			fail("%s dispatched on spare capacity with %d in flight; %d of depth %d are kept for reservations",
				v.name, h.s.inflight, cfg.ReservedSlots, cfg.Depth)
		}
		if ph == phaseSpare && v.lim.MinIOPS > 0 && held {
			stats.fallback++
		}
		if ph == phaseSpare && v.lim.MinIOPS == 0 && held {
			fail("%s dispatched on spare capacity while spare work is held: %d spare requests in flight while a reserved volume is active (until %v, bound %d), guard limit %v",
				v.name, spareInflight, resvActive, cfg.SpareSlotsWhileReserved, h.s.guard.current())
		}
		if ph == phaseSpare && v.lim.MinIOPS == 0 {
			spareInflight++
			spareGranted[w] = true
		}
		bytes := float64(w.req.Bytes)
		if w.req.Op != Read && w.req.Op != Write {
			bytes = 0
		}
		v.iops.charge(1, n)
		v.bytes.charge(bytes, n)
		v.queued--
	})
	h.onDone = append(h.onDone, func(w *waiter) {
		if spareGranted[w] {
			delete(spareGranted, w)
			spareInflight--
		}
	})
	// Work conservation after every step.
	h.afterStep = append(h.afterStep, func() {
		if h.inflight > cfg.Depth {
			fail("%d in flight, depth %d", h.inflight, cfg.Depth)
		}
		if h.inflight == cfg.Depth {
			return
		}
		now := int64(h.elapsed())
		for _, v := range vols {
			if v.queued == 0 || !v.affordable(now, +1) {
				continue
			}
			sv := h.s.vols[v.name]
			if g, _ := h.s.guard.holds(now); g && now < h.s.resvActive && sv.rStep == 0 && h.inflight < spareSlots {
				stats.guardHeld++
			}
			if h.inflight >= spareSlots || sv.rStep == 0 && spareHeld(time.Duration(now)) {
				// Only the reserved slots are free, or spare work of
				// volumes without a reservation is held while a reserved
				// volume is active: the free slots must be taken by a
				// volume under its reservation or overdue background work
				// (with spare work held, by any reserved volume: that
				// one fails below).
				reserved := sv.rStep > 0 && sv.rTag <= now
				overdue := sv.bgHead != nil && sv.bgHead.arrival+h.s.maxBG <= now
				if reserved || overdue {
					fail("reserved slot free (%d/%d in flight, %d kept) but %s is eligible (reserved %v, overdue %v) with %d queued",
						h.inflight, cfg.Depth, cfg.ReservedSlots, v.name, reserved, overdue, v.queued)
				}
				continue
			}
			fail("slot free (%d/%d in flight) but %s has %d queued and tokens (iops %.3f, bytes %.1f)",
				h.inflight, cfg.Depth, v.name, v.queued, v.iops.at(now), v.bytes.at(now))
		}
	})

	const arrivals = time.Second
	cancelled := 0
	for _, v := range vols {
		var next func()
		next = func() {
			if h.elapsed() >= arrivals {
				return
			}
			r := Request{Volume: v.name, Op: v.op, Bytes: v.size}
			if rng.Float64() < v.bgShare {
				r.Class = Class(1 + rng.IntN(2))
			}
			if rng.IntN(5) == 0 {
				r.Deadline = h.clk.Now().Add(dur(0, 50*time.Millisecond))
			}
			v.queued++
			if v.lim.MinIOPS > 0 && r.Class == Foreground {
				resvActive = h.elapsed() + cfg.ReservedActiveWindow
			}
			sr := h.submit(nil, r)
			if rng.IntN(20) == 0 {
				h.clk.AfterFunc(dur(0, 50*time.Millisecond), func() {
					if w := sr.w; h.owner[w] == sr && h.s.cancel(w) {
						delete(h.owner, w)
						v.queued--
						cancelled++
					}
					h.collect()
				})
			}
			h.clk.AfterFunc(time.Duration(rng.ExpFloat64()*float64(v.gap)), func() { next(); h.collect() })
		}
		h.at(0, next)
	}
	h.run(arrivals)
	// Drain: nothing new arrives; everything queued must go.
	for i := 0; h.queued() > 0 || h.inflight > 0; i++ {
		if i > 1000 {
			fail("not drained: %d queued, %d in flight", h.queued(), h.inflight)
		}
		h.run(h.elapsed() + time.Second)
	}
	if got, want := len(h.grants), h.nextID-cancelled; got != want {
		t.Errorf("dispatched %d of %d requests (%d cancelled)", got, want, cancelled)
	}
	checkBackgroundBound(t, h.grants, byName, cfg.MaxBackgroundWait, maxService)
	var phases [3]int
	maxWait := time.Duration(0)
	for _, g := range h.grants {
		phases[g.phase]++
		maxWait = max(maxWait, g.at-g.arrival)
	}
	t.Logf("%d requests, %d cancelled, %v simulated, by phase (overdue, reserved, spare) %v, max wait %v",
		h.nextID, cancelled, h.elapsed(), phases, maxWait)
	return stats
}

// checkPick recomputes by brute force, from the scheduler's state at the
// moment of a grant, which request the rules choose, and compares.
func checkPick(t *testing.T, s *Scheduler, specs map[string]*volSpec, got *waiter, ph phase, now int64, held bool) {
	t.Helper()
	type cand struct {
		w        *waiter
		k1       int64
		k2       uint64
		eligible bool
	}
	var overdue, resv, resvAny, spare *cand
	better := func(c, best *cand) bool {
		return best == nil || c.k1 < best.k1 || c.k1 == best.k1 && c.k2 < best.k2
	}
	for name, v := range s.vols {
		if v.queue.len() == 0 {
			continue
		}
		// The head: the urgent background request, else the earliest
		// deadline (then arrival), found by scanning the whole queue.
		head := v.urgent
		if head == nil {
			for _, w := range v.queue.items {
				if head == nil || w.deadline < head.deadline || w.deadline == head.deadline && w.seq < head.seq {
					head = w
				}
			}
		}
		// Eligibility is the scheduler's (ready or throttled), checked
		// against the reference buckets with a rounding tolerance.
		ready := v.readyIdx >= 0
		if ready == (v.throttledIdx >= 0) {
			t.Fatalf("%s: ready %v, throttled %v", name, ready, v.throttledIdx >= 0)
		}
		spec := specs[name]
		if ready && !spec.affordable(now, -1) || !ready && spec.affordable(now, +1) {
			t.Fatalf("%s: ready=%v disagrees with reference buckets (iops %.4f, bytes %.2f)",
				name, ready, spec.iops.at(now), spec.bytes.at(now))
		}
		if !ready {
			continue
		}
		if b := v.bgHead; b != nil && b.arrival+s.maxBG <= now {
			if c := (&cand{w: b, k1: b.arrival, k2: b.seq}); better(c, overdue) {
				overdue = c
			}
		}
		if v.rStep > 0 {
			c := &cand{w: head, k1: v.rTag, k2: head.seq}
			if v.rTag <= now && better(c, resv) {
				resv = c
			}
			if better(c, resvAny) {
				resvAny = c
			}
		}
		if c := (&cand{w: head, k1: max(head.deadline, s.shareTag(v)), k2: head.seq}); better(c, spare) {
			spare = c
		}
	}
	want, wantPh := (*cand)(nil), phaseSpare
	switch {
	case overdue != nil:
		want, wantPh = overdue, phaseOverdue
	case resv != nil:
		want, wantPh = resv, phaseReserved
	case spare != nil && spare.w.vol.rStep == 0 && held:
		want = resvAny
	default:
		want = spare
	}
	if want == nil || want.w != got || wantPh != ph {
		wantDesc := "nothing"
		if want != nil {
			wantDesc = fmt.Sprintf("%s seq %d", want.w.req.Volume, want.w.seq)
		}
		t.Fatalf("granted %s seq %d by phase %d; the rules choose %s by phase %d",
			got.req.Volume, got.seq, ph, wantDesc, wantPh)
	}
}

// checkBackgroundBound checks the starvation bound on the log of grants.
func checkBackgroundBound(t *testing.T, grants []grantRec, specs map[string]*volSpec, maxBG, maxService time.Duration) {
	t.Helper()
	for i, g := range grants {
		if !g.req.Class.background() || !specs[g.req.Volume].unlimited() {
			continue
		}
		due := g.arrival + maxBG
		if g.at <= due {
			continue
		}
		ahead := 0
		for j := i - 1; j >= 0 && grants[j].at >= due; j-- {
			o := grants[j]
			if !o.req.Class.background() || o.arrival > g.arrival {
				t.Errorf("overdue background request %d (arrived %v) waited while request %d (class %v, arrived %v) went at %v",
					g.id, g.arrival, o.id, o.req.Class, o.arrival, o.at)
			}
			ahead++
		}
		if bound := due + time.Duration(ahead+1)*maxService; g.at > bound {
			t.Errorf("background request %d arrived %v, dispatched %v: beyond %v (%d older ones ahead)",
				g.id, g.arrival, g.at, bound, ahead)
		}
	}
}

// TestPropertyEDF queues random requests (random volumes, classes, explicit
// and default deadlines) behind a full depth of one, then frees the slot
// repeatedly: they must go in deadline order, ties in arrival order.
//
// The weights are high enough that no volume's share tag passes a deadline
// (≤ 60 requests × quantum × DefaultWeight/6000 ≤ the foreground latency):
// with a smaller weight, a volume that dispatches many requests in one
// instant is ahead of its share, and its later requests rank behind other
// volumes' requests with the same deadline. That is the fairness rule, and
// TestPropertyRandomArrivals checks it against the brute-force oracle.
func TestPropertyEDF(t *testing.T) {
	check := func(seed uint64) bool {
		rng := rand.New(rand.NewPCG(seed, 0xedf))
		h := newSim(t, Config{Depth: 1}, -1)
		h.setLimits("hold", Limits{})
		nvol := 1 + rng.IntN(6)
		for i := range nvol {
			h.setLimits(fmt.Sprint(i), Limits{Weight: uint32(6000 + rng.IntN(MaxWeight-6000+1))})
		}
		h.submit(nil, Request{Volume: "hold"})
		type queued struct {
			id       int
			deadline time.Duration
		}
		var want []queued
		q := DefaultClassLatency[Foreground] // the share quantum at depth 1
		for range 1 + rng.IntN(60) {
			r := Request{Volume: fmt.Sprint(rng.IntN(nvol)), Class: Class(rng.IntN(numClasses))}
			d := DefaultClassLatency[r.Class]
			if rng.IntN(2) == 0 {
				d = q + time.Duration(rng.Int64N(int64(5*time.Second)))
				r.Deadline = h.clk.Now().Add(d)
			}
			want = append(want, queued{h.submit(nil, r).id, d})
		}
		slices.SortStableFunc(want, func(a, b queued) int { return int(a.deadline - b.deadline) })
		first := len(h.grants)
		for range want {
			h.finish()
		}
		for i, g := range h.grants[first:] {
			if g.id != want[i].id {
				t.Logf("seed %d: dispatch %d is request %d, want %d", seed, i, g.id, want[i].id)
				for j, g := range h.grants[first:] {
					t.Logf("  %d: id %d vol %s deadline %v", j, g.id, g.req.Volume, g.deadline)
				}
				return false
			}
		}
		return true
	}
	if err := quick.Check(check, quickConfig(200)); err != nil {
		t.Error(err)
	}
}
