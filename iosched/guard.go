package iosched

import (
	"math"
	"math/bits"
	"time"
)

// guard is the latency guard: while a volume with a reservation is active,
// it limits the rate of requests on spare capacity so that the reserved
// volumes' service time (dispatch to Done) stays within a tolerance of what
// it is on a quiet node.
//
// Slots (Config.Depth, ReservedSlots, SpareSlotsWhileReserved) bound how many
// requests are in flight, which protects a reserved volume's turn at the
// disk. On a small node that is not enough: the flood's requests are short,
// so even two slots carry thousands of them a second, and each one also costs
// CPU (network, replication, checksums) that the reserved volume's requests
// then wait for. What slows the reserved volume down is visible in one
// number, its service time, so the guard steers by it, as Linux's io.latency
// controller does for cgroups:
//
//   - Baseline: the lowest 99th percentile service time of the reserved
//     volumes' requests in a window, over the current and the previous period
//     (guardPeriodWindows windows). Each period starts with a probe: two
//     windows in which spare work runs at Config.MinSpareIOPS only, the
//     first to let the flood's work in progress drain, the second to measure,
//     so that the baseline is taken on a quiet node even when the flood
//     started first.
//   - Each window, if that percentile exceeds the baseline times
//     Config.LatencyTolerance, the spare rate is halved (from what spare
//     work actually used, so the first cut after a calm spell bites at
//     once); otherwise it grows by a tenth, plus one token (so that it
//     grows from a small limit too). It never goes below
//     MinSpareIOPS, so spare work slows down but does not stop.
//   - Without an active reserved volume the guard holds nothing. A reserved
//     volume is active while it sends foreground requests (a reserved
//     volume's rebuild is not latency-sensitive). When one becomes active
//     again, the limit learned before applies (unless the baseline has
//     expired); the first time, spare work starts from MinSpareIOPS and
//     grows from there.
//
// A window is judged once guardMinSamples of the reserved volumes'
// foreground requests have finished in it, so a slow reserved volume is
// judged over longer windows; after guardMaxWindows windows it is judged on
// what it has (the percentile of a few samples is their maximum, which errs
// towards holding spare work back), and a window with none lets the limit
// grow. A probe's measuring window waits at most guardMaxProbeWindows.
//
// A limit that grew past guardMaxLimit is dropped (+Inf) and stays dropped
// across pauses within a period: the flood never hurt the reserved volume
// at any rate the guard let it reach.
type guard struct {
	tol    float64 // 0: the guard is off
	window int64   // ns
	floor  float64 // spare rate never limited below this (tokens/s)

	active bool // a reserved volume is active; the fields below are valid

	// The current window.
	start int64 // when it began
	n     int64 // reserved requests that finished in it
	hist  latencyHist
	spare int64 // tokens spent by requests granted on spare capacity in it (guardCost)
	probe int   // probe windows left, this one included: spare work runs at floor

	// Baseline: lowest window percentile in this period and the previous one
	// (0: none yet).
	minCur, minPrev int64
	periodStart     int64 // when the current period (and its probe) began
	// limit is the spare rate learned, in tokens (guardCost) per second
	// (+Inf: no limit). It survives probes, which run at the floor, and
	// pauses of the reserved volumes, where the next active spell resumes.
	limit  float64
	tokens bucket // enforces rate(); unlimited while it is +Inf
}

const (
	// guardMinSamples is how many reserved requests a window needs before
	// its percentile is trusted.
	guardMinSamples = 8
	// guardPeriodWindows is the length of a baseline period in windows
	// (10 s with the default window): a probe every period costs spare
	// work 1% of its time when the reserved volumes are busy.
	guardPeriodWindows = 200
	// guardQuantile is the share of a window's reserved requests the
	// guard judges by: their 99th percentile service time, the tail a
	// latency-sensitive tenant is judged by. The mean hides it: it grows
	// long after the tail does (tried: it let the flood run at 3-8k IOPS
	// with the tenant's p99 at 3-4x; the p90 left a rebuild's bursts at
	// 2-3x).
	guardQuantile = 0.99
	// guardGrowth is how much the spare rate grows per window within
	// the tolerance: slowly, since the service time lags behind it.
	guardGrowth = 1.1
	// guardProbeWindows is the length of a probe.
	guardProbeWindows = 2
	// guardMaxProbeWindows bounds how long a probe's measuring window
	// waits for guardMinSamples: with the draining window, a probe costs
	// spare work at most 11 windows of each period (5.5%).
	guardMaxProbeWindows = 10
	// guardMaxWindows bounds how long any other window waits for them.
	guardMaxWindows = 20
	// guardMaxLimit caps the spare rate the guard grows to; above it the
	// limit is dropped (+Inf).
	guardMaxLimit = 1e9
)

func (g *guard) configure(c Config) {
	g.tol = c.LatencyTolerance
	g.window = int64(c.LatencyWindow)
	g.floor = float64(c.MinSpareIOPS)
	// The first spell starts from the floor: a flood let loose at once
	// would hold the reserved volume back for the several windows its rate
	// takes to halve down.
	g.limit = g.floor
}

// rate is the spare rate enforced now: the floor during a probe, else the
// limit learned.
func (g *guard) rate() float64 {
	if g.probe > 0 {
		return g.floor
	}
	return g.limit
}

// enabled reports whether the guard may hold spare work at all.
func (g *guard) enabled() bool { return g.tol > 0 }

// holds brings the guard's tokens up to now and reports whether a request
// on spare capacity must wait for them, and if so until when.
func (g *guard) holds(now int64) (bool, int64) {
	if math.IsInf(g.current(), 1) {
		return false, 0
	}
	g.tokens.advance(now)
	at := g.tokens.readyAt(1, now)
	return at > now, at
}

// spareGranted accounts for a request granted on spare capacity.
func (g *guard) spareGranted(r *Request, now int64) {
	if !g.active {
		return
	}
	c := guardCost(r)
	g.spare += int64(c)
	g.tokens.charge(c, now) // nothing if unlimited
}

// guardUnit is the size of I/O one token of the guard's rate pays for.
const guardUnit = 64 << 10

// guardCost is what a request takes from the guard's rate: one token per
// guardUnit of the bytes it carries (cost), at least one. A rebuild's 4 MiB
// extent copy costs the CPU of many small I/Os, and at one token it would
// pass under any limit.
func guardCost(r *Request) float64 {
	_, bytes := cost(r)
	return max(1, math.Ceil(bytes/guardUnit))
}

// finished accounts for a reserved volume's foreground request that took d
// from dispatch to Done.
func (g *guard) finished(d int64) {
	if g.active {
		g.n++
		g.hist.add(d)
	}
}

// tick runs the guard's clock: it starts the guard when a reserved volume
// is active (until resvActive), stops it when none is, and closes windows.
// It reports whether the limit in force changed, so that the caller can
// tell its Observer.
func (g *guard) tick(now, resvActive int64) bool {
	if !g.enabled() {
		return false
	}
	if now >= resvActive {
		if !g.active {
			return false
		}
		// No reserved volume is active: hold nothing, but keep the
		// baseline and the limit learned, where the next active spell
		// starts. Reserved volumes that pause for more than
		// ReservedActiveWindow are common.
		g.active = false
		g.probe = 0
		return true
	}
	period := guardPeriodWindows * g.window
	if !g.active {
		g.active = true
		g.resetWindow(now)
		if now-g.periodStart >= 2*period {
			g.minCur, g.minPrev = 0, 0 // too old to trust
			g.limit = g.floor          // learned against that baseline
		}
		if g.minCur == 0 && g.minPrev == 0 || now-g.periodStart >= period {
			g.newPeriod(now)
		} else {
			g.enforce(now)
		}
		return true
	}
	if now-g.start < g.window {
		return false
	}
	switch {
	case g.probe > 1:
		// The draining window of a probe ends on time.
	case g.probe == 1:
		// The measuring one waits for samples, within reason.
		if g.n < guardMinSamples && now-g.start < guardMaxProbeWindows*g.window {
			return false
		}
	case g.n < guardMinSamples && now-g.start < guardMaxWindows*g.window:
		return false // a window is judged on enough samples, within reason
	}
	changed := g.closeWindow(now)
	if g.probe == 0 && now-g.periodStart >= period {
		g.newPeriod(now)
		changed = true
	}
	g.resetWindow(now)
	return changed
}

// closeWindow judges the window that ends at now and reports whether the
// limit changed.
func (g *guard) closeWindow(now int64) bool {
	if g.probe > 0 {
		// The first probe window only drains; the last one measures.
		g.probe--
		if g.probe > 0 {
			return false
		}
		if g.n >= guardMinSamples {
			g.minCur = max(1, g.hist.quantile(guardQuantile, g.n))
		}
		// Too few samples: no baseline from this probe; the first window
		// judged gives one, measured under whatever load there is.
		g.enforce(now) // back to the limit learned
		return true
	}
	if g.n == 0 {
		// A long window in which no reserved request finished: no sign
		// of harm (and none of anything else); let spare work grow.
		return g.grow(now)
	}
	lat := g.hist.quantile(guardQuantile, g.n)
	if g.minCur == 0 || lat < g.minCur {
		g.minCur = max(1, lat)
	}
	base := g.minCur
	if g.minPrev != 0 {
		base = min(base, g.minPrev)
	}
	old := g.limit
	if float64(lat) > g.tol*float64(base) {
		used := float64(g.spare) * float64(time.Second) / float64(now-g.start)
		g.setLimit(math.Max(g.floor, math.Min(g.limit, used)/2), now)
		return g.limit != old
	}
	return g.grow(now)
}

// grow raises the limit by guardGrowth and reports whether it changed.
func (g *guard) grow(now int64) bool {
	if math.IsInf(g.limit, 1) {
		return false
	}
	next := g.limit*guardGrowth + 1
	if next > guardMaxLimit {
		next = math.Inf(1)
	}
	g.setLimit(next, now)
	return true
}

// setLimit sets the limit learned and enforces it.
func (g *guard) setLimit(limit float64, now int64) {
	g.limit = limit
	g.enforce(now)
}

// newPeriod starts a baseline period with a probe window.
func (g *guard) newPeriod(now int64) {
	g.minPrev, g.minCur = g.minCur, 0
	g.periodStart = now
	g.probe = guardProbeWindows
	g.enforce(now)
}

func (g *guard) resetWindow(now int64) {
	g.start, g.n, g.spare = now, 0, 0
	g.hist = latencyHist{}
}

// enforce sets the bucket to rate(); it holds one window's worth, so that
// spare work may run at that rate across a window in any pattern.
func (g *guard) enforce(now int64) {
	r := g.rate()
	if math.IsInf(r, 1) {
		g.tokens = bucket{}
		return
	}
	g.tokens.configure(uint64(math.Ceil(r)), time.Duration(g.window), now, 1)
}

// current returns the spare rate the guard allows now, in I/Os of up to
// guardUnit per second; +Inf when it holds nothing.
func (g *guard) current() float64 {
	if !g.active {
		return math.Inf(1)
	}
	return g.rate()
}

// latencyHist counts service times in buckets a sixteenth of a power of two
// wide (6.25% apart at most), fine enough to tell a percentile within the
// guard's tolerance without keeping the samples.
type latencyHist [64 * 16]uint32

// bucketOf returns d's bucket: its power of two and the next four bits.
func bucketOf(d int64) int {
	if d < 16 {
		return int(max(d, 0))
	}
	e := bits.Len64(uint64(d)) - 1 // 2^e ≤ d < 2^(e+1), e ≥ 4
	return e*16 + int(uint64(d)>>(e-4)&15)
}

// bucketTop is the largest duration in bucket i.
func bucketTop(i int) int64 {
	if i < 64 {
		return int64(min(i, 15)) // 16 to 63 are never used
	}
	e, q := i/16, uint64(i%16)
	return int64((17+q)<<(e-4) - 1)
}

func (h *latencyHist) add(d int64) {
	if b := bucketOf(d); h[b] < math.MaxUint32 {
		h[b]++
	}
}

// quantile returns the top of the bucket holding the q-quantile of the n
// samples added.
func (h *latencyHist) quantile(q float64, n int64) int64 {
	rank := uint64(math.Ceil(q * float64(n)))
	var seen uint64
	for i, c := range h {
		seen += uint64(c)
		if seen >= rank {
			return bucketTop(i)
		}
	}
	return math.MaxInt64 // not reached: the last bucket used holds MaxInt64
}
