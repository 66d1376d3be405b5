package iosched

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"testing"
	"time"
)

const (
	kib = 1 << 10
	mib = 1 << 20
)

func within(got, want, frac float64) bool { return math.Abs(got-want) <= frac*want }

// TestLimitsHoldOverLongWindow floods limited volumes for 60 simulated seconds
// and checks each got its limit (plus its initial burst) within 5%, while an
// unlimited volume took the rest of the disk.
func TestLimitsHoldOverLongWindow(t *testing.T) {
	const window = 60 * time.Second
	h := newSim(t, Config{Depth: 8}, time.Millisecond) // the disk does 8000 IOPS
	h.setLimits("iops", Limits{MaxIOPS: 1000})
	h.setLimits("bw", Limits{MaxBytesPerSec: 2 * mib, BurstDuration: 500 * time.Millisecond})
	h.setLimits("both", Limits{MaxIOPS: 300, MaxBytesPerSec: 4 * mib, BurstDuration: 2 * time.Second})
	h.setLimits("free", Limits{})
	iops := &client{req: Request{Volume: "iops", Op: Read, Bytes: 4 * kib}, qd: 32}
	bw := &client{req: Request{Volume: "bw", Op: Write, Bytes: 64 * kib}, qd: 16}
	both := &client{req: Request{Volume: "both", Op: Read, Bytes: 4 * kib}, qd: 16}
	free := &client{req: Request{Volume: "free", Op: Write, Bytes: 4 * kib}, qd: 32}
	h.start(iops, bw, both, free)
	h.run(window)

	secs := window.Seconds()
	tests := []struct {
		name string
		got  float64
		rate float64 // per second, in the client's units
		burs float64
	}{
		{"iops", float64(iops.granted), 1000, 1000},
		{"bw bytes", float64(bw.granted) * 64 * kib, 2 * mib, mib},
		{"both iops", float64(both.granted), 300, 600},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.rate*secs + tc.burs
			if !within(tc.got, want, 0.05) {
				t.Errorf("got %.0f in %v, want %.0f ± 5%%", tc.got, window, want)
			}
			// The limit is a ceiling too, not just an average.
			if tc.got > want+tc.rate*0.01 {
				t.Errorf("got %.0f, more than rate × window + burst = %.0f", tc.got, want)
			}
		})
	}
	limited := iops.granted + bw.granted + both.granted
	if spare := float64(free.granted); spare < 0.9*(8000*secs-float64(limited)) {
		t.Errorf("unlimited volume got %.0f I/Os, want most of the remaining %.0f", spare, 8000*secs-float64(limited))
	}
	if h.maxInflight > 8 {
		t.Errorf("%d requests in flight, depth is 8", h.maxInflight)
	}
}

// TestBurstIsExactlyTheBucket checks that an idle volume may dispatch exactly
// its burst at once, and the next request waits for exactly one token.
func TestBurstIsExactlyTheBucket(t *testing.T) {
	tests := []struct {
		name   string
		lim    Limits
		req    Request
		burst  int           // requests the bucket holds
		refill time.Duration // time to earn one more request
	}{
		{"iops", Limits{MaxIOPS: 100, BurstDuration: 500 * time.Millisecond},
			Request{Op: Read, Bytes: 4 * kib}, 50, 10 * time.Millisecond},
		{"bytes", Limits{MaxBytesPerSec: mib, BurstDuration: 250 * time.Millisecond},
			Request{Op: Write, Bytes: 4 * kib}, 64, 3906250 * time.Nanosecond},
		{"iops default burst", Limits{MaxIOPS: 40}, Request{Op: Flush}, 40, 25 * time.Millisecond},
		{"bytes ignore flush", Limits{MaxBytesPerSec: kib, MaxIOPS: 20}, Request{Op: Flush, Bytes: mib},
			20, 50 * time.Millisecond},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newSim(t, Config{Depth: 1000}, time.Hour) // nothing completes
			h.setLimits("v", tc.lim)
			tc.req.Volume = "v"
			for range tc.burst + 10 {
				h.submit(nil, tc.req)
			}
			if got := len(h.grants); got != tc.burst {
				t.Fatalf("dispatched %d at once, want the bucket: %d", got, tc.burst)
			}
			h.run(tc.refill - time.Nanosecond)
			if got := len(h.grants); got != tc.burst {
				t.Fatalf("dispatched %d before one token was earned, want %d", got, tc.burst)
			}
			h.run(tc.refill)
			if got := len(h.grants); got != tc.burst+1 {
				t.Fatalf("dispatched %d once one token was earned, want %d", got, tc.burst+1)
			}
		})
	}
}

// TestLargeRequestRunsIntoDebt: a request larger than the bytes bucket waits
// for a full bucket, not forever.
func TestLargeRequestRunsIntoDebt(t *testing.T) {
	h := newSim(t, Config{Depth: 4}, time.Millisecond)
	h.setLimits("v", Limits{MaxBytesPerSec: mib, BurstDuration: 100 * time.Millisecond})
	h.submit(nil, Request{Volume: "v", Op: Write, Bytes: 4 * mib}) // bucket is full: goes
	h.submit(nil, Request{Volume: "v", Op: Write, Bytes: 4 * mib}) // owes 4 MiB − 100 ms worth
	h.run(time.Hour)
	if len(h.grants) != 2 {
		t.Fatalf("dispatched %d, want 2", len(h.grants))
	}
	// The first left the bucket at 0.1 MiB − 4 MiB; the second needs a full
	// bucket again (0.1 MiB): 4 s later.
	if got, want := h.grants[1].at, 4*time.Second; got != want {
		t.Errorf("second large request dispatched at %v, want %v", got, want)
	}
}

// TestReservationUnderFlood: a volume with MinIOPS and almost no weight gets
// its reservation while a heavy volume floods the disk; without the
// reservation it would get next to nothing. The service time does not divide
// the reservation's interval, so slots free a little after the volume falls
// behind: the reservation tag must let it catch up rather than lose the
// difference each time.
func TestReservationUnderFlood(t *testing.T) {
	const window = 60 * time.Second
	for _, tc := range []struct {
		name    string
		minIOPS uint64
		atLeast float64
		atMost  float64
	}{
		{"reserved", 500, 0.99 * 500 * 60, 4000 * 60},
		{"not reserved", 0, 0, 50 * 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const service = 1300 * time.Microsecond
			capacity := 4 / service.Seconds() // IOPS at depth 4
			h := newSim(t, Config{Depth: 4}, service)
			h.setLimits("flood", Limits{Weight: MaxWeight})
			h.setLimits("tenant", Limits{MinIOPS: tc.minIOPS, Weight: 1})
			flood := &client{req: Request{Volume: "flood", Op: Write, Bytes: 4 * kib}, qd: 128}
			tenant := &client{req: Request{Volume: "tenant", Op: Read, Bytes: 4 * kib}, qd: 16}
			h.start(flood, tenant)
			h.run(window)
			got := float64(tenant.granted)
			t.Logf("tenant %d, flood %d I/Os in %v", tenant.granted, flood.granted, window)
			if got < tc.atLeast || got > tc.atMost {
				t.Errorf("tenant got %.0f I/Os in %v, want between %.0f and %.0f", got, window, tc.atLeast, tc.atMost)
			}
			if total := float64(tenant.granted + flood.granted); !within(total, capacity*60, 0.01) {
				t.Errorf("disk did %.0f I/Os, want it kept busy (%.0f)", total, capacity*60)
			}
		})
	}
}

// TestReservedSlots: with slots kept for reservations, a volume under its
// reservation never waits for a flood on spare capacity to free a slot; the
// flood keeps the rest of the depth busy. Without them, the reserved volume
// goes first but waits for a slot. Once the tenant is above its
// reservation, its requests are spare work and queue like the flood's.
func TestReservedSlots(t *testing.T) {
	const service = time.Millisecond
	for _, tc := range []struct {
		name     string
		reserved int
		minIOPS  uint64
		maxWait  time.Duration // the tenant's longest wait, at most
		minWait  time.Duration // and at least
	}{
		{"reserved slot", 1, 500, 0, 0},
		{"no reserved slot", 0, 500, service, time.Microsecond},
		{"no reservation", 1, 0, 100 * time.Millisecond, time.Microsecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newSim(t, Config{Depth: 4, ReservedSlots: tc.reserved}, service)
			h.setLimits("flood", Limits{})
			h.setLimits("tenant", Limits{MinIOPS: tc.minIOPS})
			flood := &client{req: Request{Volume: "flood", Op: Write, Bytes: 4 * kib}, qd: 64}
			// One request every 5 ms: 200 IOPS, below a 500 IOPS reservation.
			tenant := &client{req: Request{Volume: "tenant", Op: Read, Bytes: 4 * kib}, every: 5 * time.Millisecond}
			h.start(flood, tenant)
			h.run(2 * time.Second)
			worst := slices.Max(tenant.waits)
			t.Logf("tenant %d I/Os, longest wait %v; flood %d I/Os; most in flight %d", tenant.granted, worst, flood.granted, h.maxInflight)
			if worst > tc.maxWait || worst < tc.minWait {
				t.Errorf("tenant's longest wait %v, want between %v and %v", worst, tc.minWait, tc.maxWait)
			}
			if tenant.granted < 395 {
				t.Errorf("tenant got %d I/Os in 2 s at 200 IOPS", tenant.granted)
			}
			// The flood keeps busy every slot open to spare work, less
			// what the tenant's I/Os hold.
			wantFlood := float64(4-tc.reserved)*2000 - float64(tenant.granted)
			if !within(float64(flood.granted), wantFlood, 0.02) {
				t.Errorf("flood got %d I/Os, want about %.0f", flood.granted, wantFlood)
			}
		})
	}
}

// TestSpareSlotsWhileReserved checks the bound on spare work while a
// reserved volume is active: a flood keeps only SpareSlotsWhileReserved
// requests in flight while a reserved tenant sends requests, and takes every
// slot open to spare work again once the tenant has been quiet for
// ReservedActiveWindow.
func TestSpareSlotsWhileReserved(t *testing.T) {
	const (
		service = time.Millisecond
		window  = 20 * time.Millisecond
	)
	h := newSim(t, Config{Depth: 8, ReservedSlots: 1, SpareSlotsWhileReserved: 2, ReservedActiveWindow: window}, service)
	h.setLimits("flood", Limits{})
	h.setLimits("tenant", Limits{MinIOPS: 500})
	flood := &client{req: Request{Volume: "flood", Op: Write, Bytes: 4 * kib}, qd: 64}
	// 200 IOPS for the first second, then silence.
	tenant := &client{req: Request{Volume: "tenant", Op: Read, Bytes: 4 * kib}, every: 5 * time.Millisecond, until: time.Second}
	h.start(flood, tenant)

	h.run(time.Second)
	active := flood.granted
	if worst := slices.Max(tenant.waits); worst != 0 {
		t.Errorf("tenant waited up to %v with slots free", worst)
	}
	// Two spare slots for a second of 1 ms services.
	if !within(float64(active), 2000, 0.02) {
		t.Errorf("flood got %d I/Os while the tenant was active, want about 2000 (2 slots)", active)
	}

	h.run(2 * time.Second)
	quiet := flood.granted - active
	// The window's worth at 2 slots, then 7 (8 less the kept one).
	want := float64(window/service)*2 + float64((time.Second-window)/service)*7
	if !within(float64(quiet), want, 0.02) {
		t.Errorf("flood got %d I/Os in the second after the tenant stopped, want about %.0f (7 slots)", quiet, want)
	}
	t.Logf("flood: %d I/Os with the tenant active, %d after; tenant %d I/Os", active, quiet, tenant.granted)
}

// TestReservationBurst sends a reserved tenant's I/O in bursts of four next
// to a flood: with a burst allowance of four, every request of a burst goes
// under the reservation at once; with strict spacing, all but the first
// wait for the flood.
func TestReservationBurst(t *testing.T) {
	const service = time.Millisecond
	for _, tc := range []struct {
		burst    int
		waitZero bool
	}{{4, true}, {1, false}} {
		t.Run(fmt.Sprintf("burst=%d", tc.burst), func(t *testing.T) {
			h := newSim(t, Config{Depth: 8, ReservedSlots: 4, ReservationBurst: tc.burst}, service)
			h.setLimits("flood", Limits{})
			h.setLimits("tenant", Limits{MinIOPS: 500})
			flood := &client{req: Request{Volume: "flood", Op: Write, Bytes: 4 * kib}, qd: 64}
			// Four requests together every 10 ms: 400 IOPS, under 500.
			var tenants []*client
			for range 4 {
				tenants = append(tenants, &client{req: Request{Volume: "tenant", Op: Read, Bytes: 4 * kib}, every: 10 * time.Millisecond})
			}
			h.start(append(tenants, flood)...)
			h.run(time.Second)
			var worst time.Duration
			granted := 0
			for _, c := range tenants {
				worst = max(worst, slices.Max(c.waits))
				granted += c.granted
			}
			t.Logf("tenant: %d I/Os, longest wait %v", granted, worst)
			if granted < 396 {
				t.Errorf("tenant got %d I/Os in 1 s at 400 IOPS", granted)
			}
			if tc.waitZero && worst != 0 {
				t.Errorf("tenant waited up to %v, want no wait with a burst allowance of 4", worst)
			}
			if !tc.waitZero && worst < service/2 {
				t.Errorf("tenant waited at most %v with strict spacing, want the flood's service time", worst)
			}
		})
	}
}

// TestEDFOrder queues requests with different deadlines behind a full
// dispatch depth and checks they go in deadline order: across volumes, across
// classes, and within a volume.
func TestEDFOrder(t *testing.T) {
	h := newSim(t, Config{Depth: 1}, -1) // the test completes requests itself
	for _, v := range []string{"hold", "a", "b", "c", "d"} {
		h.setLimits(v, Limits{})
	}
	h.submit(nil, Request{Volume: "hold"}) // takes the only slot
	t0 := h.clk.Now()
	dl := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	reqs := []Request{
		{Volume: "a", Deadline: dl(50)},
		{Volume: "b", Class: Scrub},               // 1 s
		{Volume: "c", Deadline: dl(20)},           //
		{Volume: "a", Class: Rebuild},             // 100 ms
		{Volume: "d"},                             // foreground: 10 ms
		{Volume: "b", Deadline: dl(30)},           //
		{Volume: "c", Class: Foreground},          // 10 ms, after d
		{Volume: "d", Deadline: dl(5)},            //
		{Volume: "a", Deadline: dl(2000)},         //
		{Volume: "c", Class: Scrub},               // 1 s, after b's scrub
		{Volume: "b", Deadline: dl(99)},           //
		{Volume: "d", Deadline: dl(100)},          // ties a's rebuild: arrival decides
		{Volume: "a", Deadline: dl(1), Op: Write}, //
	}
	want := []int{12, 7, 4, 6, 2, 5, 0, 10, 3, 11, 1, 9, 8}
	first := len(h.grants)
	var ids []int
	for _, r := range reqs {
		ids = append(ids, h.submit(nil, r).id)
	}
	for range reqs {
		h.finish()
	}
	var got []int
	for _, g := range h.grants[first:] {
		got = append(got, slices.Index(ids, g.id))
	}
	if !slices.Equal(got, want) {
		t.Errorf("dispatch order %v, want %v", got, want)
	}
}

// TestThrottledVolumeDoesNotBlockOthers: a volume out of tokens with a deep
// queue must not hold the dispatch slot or delay another volume.
func TestThrottledVolumeDoesNotBlockOthers(t *testing.T) {
	h := newSim(t, Config{Depth: 1}, time.Millisecond)
	h.setLimits("slow", Limits{MaxIOPS: 10, BurstDuration: 100 * time.Millisecond})
	h.setLimits("fast", Limits{})
	slow := &client{req: Request{Volume: "slow", Op: Read, Bytes: 4 * kib}, qd: 100}
	fast := &client{req: Request{Volume: "fast", Op: Read, Bytes: 4 * kib}, qd: 1}
	h.start(slow, fast)
	h.run(time.Second)
	if !within(float64(slow.granted), 11, 0.1) {
		t.Errorf("slow volume got %d, want its limit: 10 + 1 burst", slow.granted)
	}
	if fast.granted < 1000-slow.granted-1 {
		t.Errorf("fast volume got %d I/Os in 1 s on a 1000-IOPS disk, slow got %d", fast.granted, slow.granted)
	}
	if w := slices.Max(fast.waits); w > time.Millisecond {
		t.Errorf("fast volume waited up to %v, want at most one service time", w)
	}
}

// TestBackgroundServedWithinMaxWait: a rebuild stream on a volume whose
// foreground I/O floods the disk; the rebuild's far deadline would make it
// wait about its whole target latency, the bound cuts that to
// MaxBackgroundWait.
func TestBackgroundServedWithinMaxWait(t *testing.T) {
	const maxBG = 200 * time.Millisecond
	for _, tc := range []struct {
		name     string
		maxBG    time.Duration
		maxWait  time.Duration // must not exceed
		minWorst time.Duration // the worst wait must reach (shows the scenario bites)
	}{
		{"bounded", maxBG, maxBG + time.Millisecond, 0},
		{"unbounded", time.Hour, time.Hour, 900 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Depth: 4, MaxBackgroundWait: tc.maxBG}
			cfg.ClassLatency[Rebuild] = time.Second
			h := newSim(t, cfg, time.Millisecond)
			h.setLimits("busy", Limits{})
			h.setLimits("other", Limits{})
			fg := &client{req: Request{Volume: "busy", Op: Write, Bytes: 4 * kib}, qd: 64}
			fg2 := &client{req: Request{Volume: "other", Op: Write, Bytes: 4 * kib}, qd: 64}
			rb := &client{req: Request{Volume: "busy", Op: Read, Bytes: mib, Class: Rebuild},
				every: 50 * time.Millisecond, from: time.Second}
			sc := &client{req: Request{Volume: "other", Op: Read, Bytes: mib, Class: Scrub},
				every: 130 * time.Millisecond, from: time.Second}
			h.start(fg, fg2, rb, sc)
			h.run(10 * time.Second)
			if rb.granted < 150 || sc.granted < 50 {
				t.Fatalf("background dispatched: rebuild %d, scrub %d; want nearly all", rb.granted, sc.granted)
			}
			worst := max(slices.Max(rb.waits), slices.Max(sc.waits))
			if worst > tc.maxWait {
				t.Errorf("background waited up to %v, want ≤ %v", worst, tc.maxWait)
			}
			if worst < tc.minWorst {
				t.Errorf("background waited at most %v; the scenario should make it wait ≥ %v", worst, tc.minWorst)
			}
		})
	}
}

// TestWeightsShareSpareCapacity: backlogged volumes share the disk in
// proportion to their weights, and a volume that starts flooding late does
// not monopolise the disk to "catch up".
func TestWeightsShareSpareCapacity(t *testing.T) {
	h := newSim(t, Config{Depth: 4}, time.Millisecond)
	h.setLimits("light", Limits{Weight: 100})
	h.setLimits("heavy", Limits{Weight: 300})
	h.setLimits("late", Limits{Weight: 100})
	light := &client{req: Request{Volume: "light", Op: Read}, qd: 64}
	heavy := &client{req: Request{Volume: "heavy", Op: Read}, qd: 64}
	late := &client{req: Request{Volume: "late", Op: Read}, qd: 64, from: 20 * time.Second}
	h.start(light, heavy, late)
	h.run(20 * time.Second)
	if r := float64(heavy.granted) / float64(light.granted); !within(r, 3, 0.05) {
		t.Errorf("heavy:light = %d:%d = %.2f, want 3 ± 5%%", heavy.granted, light.granted, r)
	}
	l0, h0 := light.granted, heavy.granted
	h.run(21 * time.Second)
	dl, dh, dlate := light.granted-l0, heavy.granted-h0, late.granted
	// Weights 100:300:100 of 4000 IOPS: 800, 2400, 800 in the second.
	for _, c := range []struct {
		name      string
		got, want int
	}{{"light", dl, 800}, {"heavy", dh, 2400}, {"late", dlate, 800}} {
		if !within(float64(c.got), float64(c.want), 0.1) {
			t.Errorf("in the second after late started, %s got %d, want %d ± 10%%", c.name, c.got, c.want)
		}
	}
}

// TestLightVolumeNotStuckBehindFlood: a volume doing one I/O at a time is
// served promptly although another volume keeps hundreds queued.
func TestLightVolumeNotStuckBehindFlood(t *testing.T) {
	h := newSim(t, Config{Depth: 4}, time.Millisecond)
	h.setLimits("flood", Limits{})
	h.setLimits("light", Limits{})
	flood := &client{req: Request{Volume: "flood", Op: Write}, qd: 512}
	light := &client{req: Request{Volume: "light", Op: Read}, qd: 1}
	h.start(flood, light)
	h.run(5 * time.Second)
	slices.Sort(light.waits)
	p99 := light.waits[len(light.waits)*99/100]
	if p99 > 2*time.Millisecond {
		t.Errorf("light volume's p99 queue wait %v, want ≤ 2 service times (flood has 512 queued)", p99)
	}
}

// TestCancelRemovesQueuedRequest cancels a blocked Acquire and checks the
// request left the queue and the slot goes to the next request.
func TestCancelRemovesQueuedRequest(t *testing.T) {
	defer checkNoLeaks(t)
	clk := newFakeClock()
	s, err := New(Config{Depth: 1, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, v := range []string{"a", "b"} {
		if err := s.SetLimits(v, Limits{}); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	held, err := s.Acquire(ctx, Request{Volume: "a"})
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() {
		_, err := s.Acquire(cctx, Request{Volume: "b"})
		errc <- err
	}()
	waitQueued(t, s, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Acquire returned %v, want context.Canceled", err)
	}
	if n := queuedOf(s); n != 0 {
		t.Fatalf("%d requests queued after cancel, want 0", n)
	}
	held.Done()
	// The slot is free: the next Acquire must not block.
	t2, err := s.Acquire(ctx, Request{Volume: "b"})
	if err != nil {
		t.Fatal(err)
	}
	t2.Done()

	// A context that is already done never queues.
	if _, err := s.Acquire(cctx, Request{Volume: "a"}); !errors.Is(err, context.Canceled) {
		t.Errorf("Acquire with a done context returned %v, want context.Canceled", err)
	}
}

// TestCancelThrottledHead: cancelling a throttled volume's head lets a
// cheaper request behind it go at once.
func TestCancelThrottledHead(t *testing.T) {
	h := newSim(t, Config{Depth: 4}, time.Millisecond)
	h.setLimits("v", Limits{MaxBytesPerSec: mib, BurstDuration: 100 * time.Millisecond})
	h.submit(nil, Request{Volume: "v", Op: Write, Bytes: 100 * kib}) // drains the bucket
	h.run(10 * time.Millisecond)                                     // earns ~10 KiB
	big, err := h.s.enqueue(Request{Volume: "v", Op: Write, Bytes: 50 * kib, Deadline: h.clk.Now()})
	if err != nil {
		t.Fatal(err)
	}
	h.submit(nil, Request{Volume: "v", Op: Write, Bytes: 4 * kib})
	if len(h.grants) != 1 {
		t.Fatalf("dispatched %d, want only the first (the 50 KiB head is short of tokens)", len(h.grants))
	}
	if !h.s.cancel(big) {
		t.Fatal("cancel: request was not queued")
	}
	h.collect()
	if len(h.grants) != 2 {
		t.Fatalf("dispatched %d after cancelling the head, want 2", len(h.grants))
	}
}

// TestCloseReleasesWaiters: Close fails every blocked Acquire with
// ErrClosed, later calls fail too, and tickets granted before stay usable.
func TestCloseReleasesWaiters(t *testing.T) {
	defer checkNoLeaks(t)
	s, err := New(Config{Depth: 2})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetLimits("v", Limits{}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetLimits("slow", Limits{MaxIOPS: 1, BurstDuration: time.Second}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t1, _ := s.Acquire(ctx, Request{Volume: "v"})
	t2, _ := s.Acquire(ctx, Request{Volume: "slow"})
	const n = 10
	var wg sync.WaitGroup
	errs := make(chan error, 2*n)
	for range n {
		wg.Add(2)
		go func() { defer wg.Done(); _, err := s.Acquire(ctx, Request{Volume: "v"}); errs <- err }()
		go func() { defer wg.Done(); _, err := s.Acquire(ctx, Request{Volume: "slow"}); errs <- err }()
	}
	waitQueued(t, s, 2*n)
	t2.Done() // a slot frees; "slow" has no tokens left, so one "v" goes
	waitQueued(t, s, 2*n-1)
	s.Close()
	wg.Wait()
	close(errs)
	var granted, closed int
	for err := range errs {
		switch {
		case err == nil:
			granted++
		case errors.Is(err, ErrClosed):
			closed++
		default:
			t.Errorf("Acquire returned %v, want nil or ErrClosed", err)
		}
	}
	if granted != 1 || closed != 2*n-1 {
		t.Errorf("granted %d, closed %d; want 1 and %d", granted, closed, 2*n-1)
	}
	t1.Done() // after Close: fine
	if _, err := s.Acquire(ctx, Request{Volume: "v"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Acquire after Close: %v, want ErrClosed", err)
	}
	if err := s.SetLimits("v", Limits{}); !errors.Is(err, ErrClosed) {
		t.Errorf("SetLimits after Close: %v, want ErrClosed", err)
	}
	s.Close() // idempotent
}

// TestRealClockThrottling runs a throttled volume on the wall clock: the
// timer, not polling, lets its requests through, and Close stops the timer.
func TestRealClockThrottling(t *testing.T) {
	defer checkNoLeaks(t)
	s, err := New(Config{Depth: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SetLimits("v", Limits{MaxIOPS: 200, BurstDuration: 10 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	start := time.Now()
	for range 22 { // 2 from the burst, then 20 at 5 ms: ≥ 100 ms
		tk, err := s.Acquire(ctx, Request{Volume: "v"})
		if err != nil {
			t.Fatal(err)
		}
		tk.Done()
	}
	if d := time.Since(start); d < 95*time.Millisecond {
		t.Errorf("22 requests at 200 IOPS with a burst of 2 took %v, want ≥ 100 ms", d)
	}
	// Leave a request throttled with the timer pending, then Close.
	tctx, cancel := context.WithTimeout(ctx, time.Millisecond)
	defer cancel()
	_, _ = s.Acquire(tctx, Request{Volume: "v"})
	_, _ = s.Acquire(tctx, Request{Volume: "v"})
	s.Close()
}

// TestRemoveVolume fails the volume's queued requests and forgets it.
func TestRemoveVolume(t *testing.T) {
	h := newSim(t, Config{Depth: 1}, time.Hour)
	h.setLimits("v", Limits{})
	h.setLimits("w", Limits{MaxIOPS: 1})
	h.submit(nil, Request{Volume: "v"})
	q1, _ := h.s.enqueue(Request{Volume: "v"})
	q2, _ := h.s.enqueue(Request{Volume: "w"})
	h.s.RemoveVolume("v")
	h.s.RemoveVolume("nope")
	if _, err := h.s.collect(waitSignal(t, q1)); !errors.Is(err, ErrVolumeRemoved) {
		t.Errorf("queued request of removed volume: %v, want ErrVolumeRemoved", err)
	}
	if _, err := h.s.enqueue(Request{Volume: "v"}); !errors.Is(err, ErrUnknownVolume) {
		t.Errorf("request for removed volume: %v, want ErrUnknownVolume", err)
	}
	if n := h.queued(); n != 1 {
		t.Errorf("%d queued, want 1 (w's)", n)
	}
	h.s.RemoveVolume("w")
	if _, err := h.s.collect(waitSignal(t, q2)); !errors.Is(err, ErrVolumeRemoved) {
		t.Errorf("queued request of removed volume: %v, want ErrVolumeRemoved", err)
	}
}

// TestSetLimitsLive raises a throttled volume's limit: its queue drains at once.
func TestSetLimitsLive(t *testing.T) {
	h := newSim(t, Config{Depth: 100}, time.Hour)
	h.setLimits("v", Limits{MaxIOPS: 10, BurstDuration: 100 * time.Millisecond})
	for range 20 {
		h.submit(nil, Request{Volume: "v"})
	}
	if len(h.grants) != 1 {
		t.Fatalf("dispatched %d, want the burst of 1", len(h.grants))
	}
	h.setLimits("v", Limits{MaxIOPS: 10, BurstDuration: 100 * time.Millisecond, MinIOPS: 5})
	h.collect()
	if len(h.grants) != 1 {
		t.Fatalf("dispatched %d after an unrelated change, want 1", len(h.grants))
	}
	h.setLimits("v", Limits{MaxIOPS: 1000, BurstDuration: 100 * time.Millisecond})
	h.collect()
	// Kept tokens: none; the new rate earns one per ms.
	h.run(5 * time.Millisecond)
	if len(h.grants) != 6 {
		t.Fatalf("dispatched %d 5 ms after raising the limit to 1000 IOPS, want 6", len(h.grants))
	}
	h.setLimits("v", Limits{})
	h.collect()
	if len(h.grants) != 20 {
		t.Fatalf("dispatched %d after removing the limit, want all 20", len(h.grants))
	}
}

func TestSetLimitsValidation(t *testing.T) {
	s, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	tests := []struct {
		name string
		vol  string
		lim  Limits
		ok   bool
	}{
		{"zero", "v", Limits{}, true},
		{"min equals max", "v", Limits{MinIOPS: 10, MaxIOPS: 10}, true},
		{"min without max", "v", Limits{MinIOPS: 10}, true},
		{"everything", "v", Limits{MaxIOPS: 1, MinIOPS: 1, MaxBytesPerSec: 1, BurstDuration: time.Nanosecond, Weight: MaxWeight}, true},
		{"empty id", "", Limits{}, false},
		{"min above max", "v", Limits{MinIOPS: 11, MaxIOPS: 10}, false},
		{"negative burst", "v", Limits{BurstDuration: -time.Second}, false},
		{"weight too large", "v", Limits{Weight: MaxWeight + 1}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := s.SetLimits(tc.vol, tc.lim)
			if tc.ok && err != nil {
				t.Errorf("SetLimits: %v", err)
			}
			if !tc.ok && !errors.Is(err, ErrInvalidLimits) {
				t.Errorf("SetLimits: %v, want ErrInvalidLimits", err)
			}
		})
	}
}

func TestNewValidation(t *testing.T) {
	neg := Config{}
	neg.ClassLatency[Scrub] = -1
	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"zero", Config{}, true},
		{"negative depth", Config{Depth: -1}, false},
		{"negative latency", neg, false},
		{"negative max wait", Config{MaxBackgroundWait: -1}, false},
		{"reserved slots", Config{Depth: 4, ReservedSlots: 3}, true},
		{"every slot reserved", Config{Depth: 4, ReservedSlots: 4}, false},
		{"negative reserved slots", Config{ReservedSlots: -1}, false},
		{"spare bound", Config{Depth: 4, ReservedSlots: 1, SpareSlotsWhileReserved: 3}, true},
		{"spare bound above the open slots", Config{Depth: 4, ReservedSlots: 1, SpareSlotsWhileReserved: 4}, false},
		{"negative spare bound", Config{SpareSlotsWhileReserved: -1}, false},
		{"negative active window", Config{ReservedActiveWindow: -time.Millisecond}, false},
		{"reservation burst", Config{ReservationBurst: MaxReservationBurst}, true},
		{"reservation burst too large", Config{ReservationBurst: MaxReservationBurst + 1}, false},
		{"negative reservation burst", Config{ReservationBurst: -1}, false},
		{"latency tolerance", Config{LatencyTolerance: 1.5, LatencyWindow: time.Millisecond, MinSpareIOPS: 1}, true},
		{"latency tolerance below 1", Config{LatencyTolerance: 0.5}, false},
		{"latency tolerance too large", Config{LatencyTolerance: 1001}, false},
		{"latency tolerance NaN", Config{LatencyTolerance: math.NaN()}, false},
		{"negative latency window", Config{LatencyTolerance: 2, LatencyWindow: -1}, false},
		{"latency window too long", Config{LatencyTolerance: 2, LatencyWindow: MaxLatencyWindow + 1}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.cfg)
			if tc.ok != (err == nil) || !tc.ok && !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("New: %v", err)
			}
			if s != nil {
				s.Close()
			}
		})
	}
}

func TestInvalidRequest(t *testing.T) {
	s, _ := New(Config{})
	defer s.Close()
	_ = s.SetLimits("v", Limits{})
	ctx := context.Background()
	for _, r := range []Request{{Volume: "v", Class: 3}, {Volume: "v", Op: 4}} {
		if _, err := s.Acquire(ctx, r); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("Acquire(%+v): %v, want ErrInvalidRequest", r, err)
		}
	}
	if _, err := s.Acquire(ctx, Request{Volume: "x"}); !errors.Is(err, ErrUnknownVolume) {
		t.Errorf("Acquire on unknown volume: %v, want ErrUnknownVolume", err)
	}
}

// TestDisabledBypass: a disabled scheduler lets everything through at once.
func TestDisabledBypass(t *testing.T) {
	obs := &countingObserver{}
	s, err := New(Config{Depth: 1, Disabled: true, Observer: obs})
	if err != nil {
		t.Fatal(err)
	}
	_ = s.SetLimits("v", Limits{MaxIOPS: 1})
	ctx := context.Background()
	for range 1000 {
		if _, err := s.Acquire(ctx, Request{Volume: "v", Op: Write, Bytes: 1}); err != nil {
			t.Fatal(err)
		}
	}
	if obs.dispatched != 1000 || obs.bytes != 1000 {
		t.Errorf("observer saw %d dispatches (%d bytes), want 1000", obs.dispatched, obs.bytes)
	}
	Ticket{}.Done()
	s.Close()
	if _, err := s.Acquire(ctx, Request{Volume: "v"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Acquire after Close: %v, want ErrClosed", err)
	}
}

func TestDoneTwicePanics(t *testing.T) {
	s, _ := New(Config{})
	defer s.Close()
	_ = s.SetLimits("v", Limits{})
	tk, err := s.Acquire(context.Background(), Request{Volume: "v"})
	if err != nil {
		t.Fatal(err)
	}
	tk.Done()
	// Reuse the waiter, so that the stale ticket points at a live one.
	tk2, _ := s.Acquire(context.Background(), Request{Volume: "v"})
	defer tk2.Done()
	defer func() {
		if recover() == nil {
			t.Error("second Done did not panic")
		}
	}()
	tk.Done()
}

type countingObserver struct {
	waits, misses, dispatched, throttles int
	bytes                                uint64
	throttled                            time.Duration
	maxWait                              time.Duration
}

func (o *countingObserver) QueueWait(_ string, _ Class, d time.Duration) {
	o.waits++
	o.maxWait = max(o.maxWait, d)
}
func (o *countingObserver) Throttled(_ string, d time.Duration) { o.throttles++; o.throttled += d }
func (o *countingObserver) DeadlineMiss(string, Class)          { o.misses++ }
func (o *countingObserver) Dispatched(_ string, _ Op, b uint64) { o.dispatched++; o.bytes += b }
func (o *countingObserver) SpareLimit(float64)                  {}

// TestObserver checks what the metrics hooks report in a small scenario.
func TestObserver(t *testing.T) {
	obs := &countingObserver{}
	cfg := Config{Depth: 1, Observer: obs}
	cfg.ClassLatency[Foreground] = 5 * time.Millisecond
	h := newSim(t, cfg, 2*time.Millisecond)
	h.setLimits("v", Limits{MaxIOPS: 100, BurstDuration: 10 * time.Millisecond}) // burst 1
	for range 5 {
		h.submit(nil, Request{Volume: "v", Op: Read, Bytes: 512})
	}
	h.run(time.Second)
	if obs.dispatched != 5 || obs.bytes != 5*512 || obs.waits != 5 {
		t.Errorf("dispatched %d, bytes %d, waits %d; want 5, 2560, 5", obs.dispatched, obs.bytes, obs.waits)
	}
	// Dispatched at 0, 10, 20, 30, 40 ms with a 5 ms deadline: 4 misses.
	if obs.misses != 4 || obs.maxWait != 40*time.Millisecond {
		t.Errorf("misses %d, max wait %v; want 4 and 40ms", obs.misses, obs.maxWait)
	}
	// Throttled from 0 to 40 ms, reported each time tokens came.
	if obs.throttled != 40*time.Millisecond {
		t.Errorf("throttled for %v in %d periods, want 40ms", obs.throttled, obs.throttles)
	}
}

func waitQueued(t *testing.T, s *Scheduler, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for queuedOf(s) != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d queued, want %d", queuedOf(s), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func queuedOf(s *Scheduler) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.queued
}

func waitSignal(t *testing.T, w *waiter) *waiter {
	t.Helper()
	select {
	case <-w.ch:
	case <-time.After(5 * time.Second):
		t.Fatal("waiter not signalled")
	}
	return w
}

// TestTokens checks what Tokens reports: a limited volume's buckets as
// requests spend them and time refills them, and nothing meaningful for an
// unlimited one.
func TestTokens(t *testing.T) {
	h := newSim(t, Config{Depth: 4}, -1) // the test completes requests itself
	h.setLimits("limited", Limits{MaxIOPS: 100, MaxBytesPerSec: 1 * mib, BurstDuration: time.Second})
	h.setLimits("free", Limits{})
	byName := func() map[string]VolumeTokens {
		m := map[string]VolumeTokens{}
		for _, v := range h.s.Tokens(nil) {
			m[v.Volume] = v
		}
		return m
	}
	got := byName()
	if len(got) != 2 {
		t.Fatalf("Tokens reports %d volumes, want 2: %+v", len(got), got)
	}
	if l := got["limited"]; !l.IOPSLimited || !l.BytesLimited || l.IOPS != 100 || l.Bytes != mib {
		t.Errorf("limited volume at start: %+v, want full buckets of 100 I/Os and 1 MiB", l)
	}
	if f := got["free"]; f.IOPSLimited || f.BytesLimited {
		t.Errorf("unlimited volume reported as limited: %+v", f)
	}
	for range 4 {
		h.submit(nil, Request{Volume: "limited", Op: Write, Bytes: 64 * kib})
	}
	if l := byName()["limited"]; l.IOPS != 96 || l.Bytes != mib-4*64*kib {
		t.Errorf("after 4 writes of 64 KiB: %+v, want 96 I/Os and 768 KiB", l)
	}
	h.run(50 * time.Millisecond) // refills 5 I/Os and 50 KiB-ish, capped at the burst
	if l := byName()["limited"]; l.IOPS != 100 || !within(l.Bytes, mib-4*64*kib+0.05*mib, 1e-9) {
		t.Errorf("50 ms later: %+v, want 100 I/Os (full) and %.0f bytes", l, mib-4*64*kib+0.05*mib)
	}
	for range 4 {
		h.finish()
	}
}
