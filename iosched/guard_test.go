package iosched

import (
	"math"
	"slices"
	"testing"
	"time"
)

// spareLimitLog records what the scheduler reports through SpareLimit.
type spareLimitLog struct {
	NopObserver
	limits []float64
}

func (o *spareLimitLog) SpareLimit(iops float64) { o.limits = append(o.limits, iops) }

// contendedNode is a disk model in which the flood's rate slows the tenant
// down, as on a node whose CPUs serve both: a tenant request takes base
// plus base per perIOPS flood I/Os a second dispatched in the last 10 ms.
// The flood's own requests take floodService, so its slots carry far more
// I/Os a second than the tenant can bear.
type contendedNode struct {
	h            *sim
	base         time.Duration
	perIOPS      float64
	floodService time.Duration
	floodGrants  []time.Duration // when each flood request was dispatched
	tenant       []tenantIO
}

type tenantIO struct {
	at, service time.Duration
}

func newContendedNode(t *testing.T, cfg Config) *contendedNode {
	n := &contendedNode{base: 100 * time.Microsecond, perIOPS: 2000, floodService: time.Millisecond}
	n.h = newSim(t, cfg, 0)
	n.h.onGrant = append(n.h.onGrant, func(w *waiter, _ phase, now time.Duration) {
		if w.req.Volume == "flood" {
			n.floodGrants = append(n.floodGrants, now)
		}
	})
	n.h.service = func(r Request) time.Duration {
		if r.Volume == "flood" {
			return n.floodService
		}
		now := n.h.elapsed()
		const span = 10 * time.Millisecond
		i, _ := slices.BinarySearch(n.floodGrants, now-span)
		rate := float64(len(n.floodGrants)-i) / span.Seconds()
		d := n.base + time.Duration(float64(n.base)*rate/n.perIOPS)
		n.tenant = append(n.tenant, tenantIO{at: now, service: d})
		return d
	}
	return n
}

// meanService is the tenant's mean service time over [from, to).
func (n *contendedNode) meanService(from, to time.Duration) time.Duration {
	var sum time.Duration
	k := 0
	for _, io := range n.tenant {
		if io.at >= from && io.at < to {
			sum += io.service
			k++
		}
	}
	if k == 0 {
		return 0
	}
	return sum / time.Duration(k)
}

// floodIOPS is the flood's dispatch rate over [from, to).
func (n *contendedNode) floodIOPS(from, to time.Duration) float64 {
	i, _ := slices.BinarySearch(n.floodGrants, from)
	j, _ := slices.BinarySearch(n.floodGrants, to)
	return float64(j-i) / (to - from).Seconds()
}

// TestLatencyGuard floods a node whose CPU the flood and a reserved tenant
// share (contendedNode). The flood starts first, so the guard must find the
// tenant's quiet-node service time with its probe window. The tenant runs
// for longer than a baseline period, pauses for longer than its activity
// window and comes back. With the guard, the tenant's mean service time
// stays near the tolerance, also right after the pause, while the flood
// runs well above MinSpareIOPS; without it, the tenant's I/Os take many
// times longer. Once the tenant stops, the flood gets its full rate back.
func TestLatencyGuard(t *testing.T) {
	const (
		tol      = 1.5
		minSpare = 200
		window   = 20 * time.Millisecond // a period of 200 windows is 4 s
		pause    = 6 * time.Second       // the tenant pauses from here
		resume   = pause + 300*time.Millisecond
		until    = 10 * time.Second
	)
	run := func(t *testing.T, tolerance float64) (*contendedNode, *spareLimitLog) {
		obs := &spareLimitLog{}
		n := newContendedNode(t, Config{Depth: 32, ReservationBurst: 4, LatencyTolerance: tolerance,
			LatencyWindow: window, MinSpareIOPS: minSpare, ReservedActiveWindow: 100 * time.Millisecond, Observer: obs})
		n.h.setLimits("flood", Limits{})
		n.h.setLimits("tenant", Limits{MinIOPS: 2000})
		flood := &client{req: Request{Volume: "flood", Op: Write, Bytes: 4 * kib}, qd: 64}
		tenant := Request{Volume: "tenant", Op: Read, Bytes: 4 * kib}
		n.h.start(flood,
			&client{req: tenant, every: time.Millisecond, from: 500 * time.Millisecond, until: pause},
			&client{req: tenant, every: time.Millisecond, from: resume, until: until})
		n.h.run(until + time.Second)
		return n, obs
	}

	off, _ := run(t, 0)
	unguarded := off.meanService(time.Second, pause)
	if unguarded < 5*off.base {
		t.Fatalf("without the guard the tenant's mean service time is %v: the model does not contend (base %v)", unguarded, off.base)
	}

	n, obs := run(t, tol)
	// At MinSpareIOPS the tenant's time is base·(1 + 200/2000): the
	// baseline the probe finds. The guard keeps the 99th percentile near
	// tol times that; allow the mean a quarter more for its oscillation.
	baseline := n.base + time.Duration(float64(n.base)*minSpare/n.perIOPS)
	limit := time.Duration(float64(baseline) * tol * 1.25)
	for _, span := range []struct {
		what     string
		from, to time.Duration
	}{
		{"after the probe and the first cuts", 1500 * time.Millisecond, pause},
		{"in the first 500 ms after the pause", resume, resume + 500*time.Millisecond},
		{"after the pause", resume, until},
	} {
		if got := n.meanService(span.from, span.to); got > limit {
			t.Errorf("tenant's mean service time %s is %v, want at most %v (baseline %v, tolerance %v)", span.what, got, limit, baseline, tol)
		}
	}
	// The model allows about 1300 flood I/Os a second at the tolerance.
	busy := n.floodIOPS(1500*time.Millisecond, until)
	if busy < 3*minSpare {
		t.Errorf("flood ran at %.0f IOPS while the tenant was active, want at least 3 × MinSpareIOPS %d: the guard holds it too hard", busy, minSpare)
	}
	// Once the tenant has stopped (and its activity window ended), the
	// flood runs at full speed: 32 slots of 1 ms.
	quiet := n.floodIOPS(until+200*time.Millisecond, until+time.Second)
	if !within(quiet, 32000, 0.02) {
		t.Errorf("flood ran at %.0f IOPS after the tenant stopped, want about 32000", quiet)
	}
	if len(obs.limits) == 0 || !math.IsInf(obs.limits[len(obs.limits)-1], 1) {
		t.Errorf("SpareLimit reports %v, want the last one +Inf (no limit)", obs.limits)
	}
	t.Logf("tenant's mean service time %v with the guard (baseline %v; %v right after the pause), %v without; "+
		"flood %.0f IOPS while the tenant was active (%.0f without the guard), %.0f after; %d limit changes",
		n.meanService(1500*time.Millisecond, until), baseline, n.meanService(resume, resume+500*time.Millisecond), unguarded,
		busy, off.floodIOPS(1500*time.Millisecond, until), quiet, len(obs.limits))
}

// TestLatencyHistQuantile checks the guard's histogram against exact
// percentiles: the bucket it names holds the percentile and is at most a
// sixteenth of a power of two wide.
func TestLatencyHistQuantile(t *testing.T) {
	for _, tc := range []struct {
		samples []int64
		q       float64
		want    int64
	}{
		{[]int64{1, 2, 3}, 0.9, 3},
		{[]int64{100_000}, 0.9, 100_000},
		{[]int64{10, 20, 30, 40, 50, 60, 70, 80, 90, 1_000_000}, 0.9, 90},
		{[]int64{10, 20, 30, 40, 50, 60, 70, 80, 90, 1_000_000}, 1, 1_000_000},
		{[]int64{math.MaxInt64}, 0.5, math.MaxInt64},
	} {
		var h latencyHist
		for _, d := range tc.samples {
			h.add(d)
		}
		got := h.quantile(tc.q, int64(len(tc.samples)))
		if got < tc.want || float64(got) > float64(tc.want)*(1+1.0/16)+1 {
			t.Errorf("quantile(%v) of %v = %d, want %d to 1/16 above", tc.q, tc.samples, got, tc.want)
		}
	}
	// Every bucket's top is the largest value that falls in it.
	for _, d := range []int64{0, 3, 15, 16, 17, 31, 32, 33, 1000, 1 << 40, 1 << 62, 1<<62 + 1<<58, math.MaxInt64} {
		if top := bucketTop(bucketOf(d)); top < d || bucketOf(top) != bucketOf(d) || top < math.MaxInt64 && bucketOf(top+1) == bucketOf(d) {
			t.Errorf("bucketTop(bucketOf(%d)) = %d: not the top of %d's bucket", d, top, d)
		}
	}
}

// TestGuardCost checks what requests take from the guard's rate: one token
// per 64 KiB of data moved, at least one.
func TestGuardCost(t *testing.T) {
	for _, tc := range []struct {
		r    Request
		want float64
	}{
		{Request{Op: Read, Bytes: 4 * kib}, 1},
		{Request{Op: Write, Bytes: 64 * kib}, 1},
		{Request{Op: Write, Bytes: 64*kib + 1}, 2},
		{Request{Op: Write, Bytes: 4 * mib}, 64},
		{Request{Op: Discard, Bytes: 4 * mib}, 1},
		{Request{Op: Flush}, 1},
	} {
		if got := guardCost(&tc.r); got != tc.want {
			t.Errorf("guardCost(%v of %d bytes) = %v, want %v", tc.r.Op, tc.r.Bytes, got, tc.want)
		}
	}
}

// TestLatencyGuardIgnoresBackgroundOfReservedVolume: a reserved volume that
// sends only rebuild I/O (its replica is being rebuilt, its workload idle)
// is not latency-sensitive; the throttles must not hold the flood back for
// it.
func TestLatencyGuardIgnoresBackgroundOfReservedVolume(t *testing.T) {
	n := newContendedNode(t, Config{Depth: 32, LatencyTolerance: 1.5, LatencyWindow: 20 * time.Millisecond,
		SpareSlotsWhileReserved: 2})
	n.h.setLimits("flood", Limits{})
	n.h.setLimits("tenant", Limits{MinIOPS: 2000})
	flood := &client{req: Request{Volume: "flood", Op: Write, Bytes: 4 * kib}, qd: 64}
	rebuild := &client{req: Request{Volume: "tenant", Op: Write, Bytes: 4 * kib, Class: Rebuild}, every: time.Millisecond}
	n.h.start(flood, rebuild)
	n.h.run(2 * time.Second)
	// 32 slots of 1 ms, less what the rebuild takes.
	if got := n.floodIOPS(500*time.Millisecond, 2*time.Second); got < 30000 {
		t.Errorf("flood ran at %.0f IOPS next to a reserved volume's rebuild, want about 31000: held back for it", got)
	}
}

// TestLatencyGuardReportsItsEnd: when the reserved volume stops and nothing
// else happens, the guard still stops at the end of its activity window and
// reports that it holds nothing, so that the gauge is not left stale.
func TestLatencyGuardReportsItsEnd(t *testing.T) {
	obs := &spareLimitLog{}
	h := newSim(t, Config{Depth: 4, LatencyTolerance: 1.5, LatencyWindow: 10 * time.Millisecond,
		ReservedActiveWindow: 100 * time.Millisecond, Observer: obs}, 100*time.Microsecond)
	h.setLimits("tenant", Limits{MinIOPS: 2000})
	h.start(&client{req: Request{Volume: "tenant", Op: Read, Bytes: 4 * kib}, every: time.Millisecond, until: 500 * time.Millisecond})
	h.run(time.Second)
	if len(obs.limits) < 2 || !math.IsInf(obs.limits[len(obs.limits)-1], 1) {
		t.Errorf("SpareLimit reports %v; want a limit while the tenant ran, then +Inf", obs.limits)
	}
	if h.s.guard.active {
		t.Error("the guard is still active half a second after the tenant stopped")
	}
}

// TestLatencyGuardStartsWithFirstRequest: a reserved volume's first
// foreground request after a quiet spell starts the guard at once, and its
// service time is the first sample.
func TestLatencyGuardStartsWithFirstRequest(t *testing.T) {
	h := newSim(t, Config{Depth: 4, LatencyTolerance: 1.5}, 100*time.Microsecond)
	h.setLimits("tenant", Limits{MinIOPS: 2000})
	h.submit(nil, Request{Volume: "tenant", Op: Read, Bytes: 4 * kib})
	if !h.s.guard.active {
		t.Fatal("the guard did not start with the reserved volume's first request")
	}
	h.run(time.Millisecond)
	if h.s.guard.n != 1 {
		t.Errorf("the guard measured %d requests, want the first one", h.s.guard.n)
	}
}

// TestGuardStateMachine drives the guard alone through its life: the first
// probe, growth within the tolerance, a cut from what spare work used, a
// pause and a resume with the limit learned, a new period's probe, a
// baseline that expires, few-sample windows and the drop to no limit.
func TestGuardStateMachine(t *testing.T) {
	const win = int64(50 * time.Millisecond)
	const floor = 100.0
	g := &guard{}
	g.configure(Config{LatencyTolerance: 1.25, LatencyWindow: time.Duration(win), MinSpareIOPS: uint64(floor)})
	period := guardPeriodWindows * win
	now := int64(0)
	busy := func() int64 { return now + time.Hour.Nanoseconds() } // a reserved volume stays active
	// window runs one window of the guard's clock: n reserved requests of
	// service time d finish and spare requests costing spare tokens are
	// granted, then the clock ticks at its end.
	window := func(n int, d time.Duration, spare int) bool {
		for range n {
			g.finished(int64(d))
		}
		for range spare {
			g.spareGranted(&Request{Op: Read, Bytes: 4096}, now)
		}
		now += win
		return g.tick(now, busy())
	}
	near := func(what string, got, want float64) {
		t.Helper()
		if math.Abs(got-want) > 1e-9*math.Max(1, math.Abs(want)) {
			t.Fatalf("%s: %v, want %v", what, got, want)
		}
	}

	// Idle: holds nothing.
	if g.tick(now, now) || !math.IsInf(g.current(), 1) {
		t.Fatalf("an idle guard reports a limit %v", g.current())
	}
	// First activity: a probe at the floor, the first window drains.
	if !g.tick(now, busy()) || g.probe != guardProbeWindows {
		t.Fatalf("activity did not start a probe (probe %d)", g.probe)
	}
	near("limit during the probe", g.current(), floor)
	window(guardMinSamples, time.Millisecond, 0) // the draining window: not measured
	if g.minCur != 0 {
		t.Fatalf("the draining window gave a baseline %d", g.minCur)
	}
	window(guardMinSamples, 100*time.Microsecond, 0) // the measuring one
	if base := time.Duration(g.minCur); base < 100*time.Microsecond || base > 107*time.Microsecond {
		t.Fatalf("baseline %v, want 100µs to the top of its bucket", base)
	}
	near("limit after the first probe (from the floor)", g.current(), floor)

	// Within the tolerance the limit grows by a tenth plus one per window.
	window(guardMinSamples, 120*time.Microsecond, 0)
	near("limit after a good window", g.current(), floor*guardGrowth+1)
	for g.limit < 1000 {
		window(guardMinSamples, 100*time.Microsecond, 0)
	}
	// Over it, the limit halves from what spare work used: 20 tokens in a
	// window of 50 ms is 400 a second.
	window(guardMinSamples, 300*time.Microsecond, 20)
	near("limit after a slow window", g.current(), 200)
	learned := g.limit

	// A pause holds nothing; the next activity resumes with the limit
	// learned, without a probe, within the period.
	if !g.tick(now, now) || !math.IsInf(g.current(), 1) {
		t.Fatalf("the guard still limits spare work with no reserved volume active: %v", g.current())
	}
	if held, _ := g.holds(now); held {
		t.Fatal("a paused guard holds spare work")
	}
	now += 10 * win
	g.tick(now, busy())
	if g.probe != 0 {
		t.Fatalf("resuming within the period started a probe")
	}
	near("limit on resuming", g.current(), learned)

	// A window with too few samples stays open, up to guardMaxWindows.
	start := g.start
	for i := range guardMaxWindows - 1 {
		n := 0
		if i == 0 {
			n = guardMinSamples - 1
		}
		window(n, 100*time.Microsecond, 0)
		if g.start != start {
			t.Fatalf("a window with %d samples closed after %v", g.n, time.Duration(now-start))
		}
	}
	window(0, 0, 0)
	if g.start != now {
		t.Fatalf("a window with too few samples outlived %d windows", guardMaxWindows)
	}

	// A new period opens with a probe at the floor, then returns to the
	// limit learned; the old period's baseline becomes the previous one.
	for p0 := g.periodStart; g.periodStart == p0; {
		window(guardMinSamples, 100*time.Microsecond, 0)
		if now-p0 > period+win {
			t.Fatalf("no new period %v after the last", time.Duration(now-p0))
		}
	}
	if g.probe != guardProbeWindows || g.minPrev == 0 {
		t.Fatalf("a new period: probe %d, previous baseline %d", g.probe, g.minPrev)
	}
	near("limit during a later probe", g.current(), floor)
	learned = g.limit
	window(guardMinSamples, 100*time.Microsecond, 0)
	window(guardMinSamples, 100*time.Microsecond, 0)
	near("limit after a later probe", g.current(), learned)

	// Idle for two periods: the baseline and the limit learned against it
	// are too old; activity starts over from a probe and the floor.
	g.tick(now, now)
	now += 2 * period
	g.tick(now, busy())
	if g.probe != guardProbeWindows || g.minPrev != 0 || g.minCur != 0 {
		t.Fatalf("after two idle periods: probe %d, baselines %d and %d", g.probe, g.minCur, g.minPrev)
	}
	window(guardMinSamples, 100*time.Microsecond, 0)
	window(guardMinSamples, 100*time.Microsecond, 0)
	near("limit after an expired baseline", g.current(), floor)

	// A limit that grows past guardMaxLimit is dropped.
	g.setLimit(guardMaxLimit, now)
	window(guardMinSamples, 100*time.Microsecond, 0)
	if !math.IsInf(g.current(), 1) {
		t.Fatalf("limit %v past guardMaxLimit, want none", g.current())
	}
	if held, _ := g.holds(now); held {
		t.Fatal("the guard holds spare work with no limit")
	}
}
