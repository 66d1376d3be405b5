package iosched

import (
	"errors"
	"fmt"
	"time"
)

// Class is the kind of work a request belongs to. It chooses the request's
// default deadline (Config.ClassLatency) and whether the background
// starvation bound (Config.MaxBackgroundWait) applies to it.
type Class uint8

// The classes, most urgent first.
const (
	// Foreground is I/O a workload is waiting for.
	Foreground Class = iota
	// Rebuild is I/O that restores a replica's redundancy.
	Rebuild
	// Scrub is I/O that verifies replicas in the background.
	Scrub

	numClasses = 3
)

var classNames = [numClasses]string{"foreground", "rebuild", "scrub"}

// String returns the class's name in lower case, as metric labels want it.
func (c Class) String() string {
	if int(c) < len(classNames) {
		return classNames[c]
	}
	return fmt.Sprintf("class(%d)", uint8(c))
}

// background reports whether the class is bounded by MaxBackgroundWait.
func (c Class) background() bool { return c != Foreground }

// Op is what a request does to the disk.
type Op uint8

// The operations. Only Read and Write move data, so only they are charged to
// a volume's bytes/s bucket; every operation costs one I/O.
const (
	Read Op = iota
	Write
	Flush
	Discard

	numOps = 4
)

var opNames = [numOps]string{"read", "write", "flush", "discard"}

// String returns the operation's name in lower case.
func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Request is one I/O on a volume, as presented to Acquire.
type Request struct {
	// Volume is the volume's id; it must have been registered with SetLimits.
	Volume string
	// Op is the operation.
	Op Op
	// Bytes is the request's size, charged to the bytes/s bucket for Read and
	// Write.
	Bytes uint64
	// Class is the kind of work.
	Class Class
	// Deadline is when the request should be dispatched by. Zero means
	// arrival + Config.ClassLatency[Class].
	Deadline time.Time
}

// Limits are a volume's quality-of-service settings. The zero value means no
// limit, no reservation and the default weight.
type Limits struct {
	// MaxIOPS caps the volume's I/O rate; 0 is unlimited.
	MaxIOPS uint64
	// MinIOPS is the volume's reservation: while it has been served fewer
	// I/Os than MinIOPS per second, it goes ahead of every volume that is
	// only using spare capacity. 0 reserves nothing. It may not exceed a
	// non-zero MaxIOPS.
	MinIOPS uint64
	// MaxBytesPerSec caps the volume's Read and Write throughput; 0 is
	// unlimited.
	MaxBytesPerSec uint64
	// BurstDuration sizes both buckets: burst = limit × BurstDuration, so an
	// idle volume may run at full speed for that long. 0 means
	// DefaultBurstDuration. Keep it well above the timer's lateness (about a
	// millisecond on a busy node): tokens earned while a throttled volume's
	// wake-up is late are clipped to the burst and lost.
	BurstDuration time.Duration
	// Weight is the volume's share of spare capacity relative to other
	// volumes with queued requests. 0 means DefaultWeight; at most MaxWeight.
	Weight uint32
}

// Defaults and bounds.
const (
	// DefaultDepth is the number of requests in flight to the disk when
	// Config.Depth is 0.
	DefaultDepth = 32
	// DefaultBurstDuration is the burst of a volume whose
	// Limits.BurstDuration is 0 (the same as Ceph RBD's QoS default).
	DefaultBurstDuration = time.Second
	// DefaultMaxBackgroundWait bounds how long a background request waits
	// when Config.MaxBackgroundWait is 0.
	DefaultMaxBackgroundWait = 2 * time.Second
	// MaxReservationBurst is the largest Config.ReservationBurst.
	MaxReservationBurst = 1 << 16
	// DefaultReservedActiveWindow is Config.ReservedActiveWindow when 0.
	DefaultReservedActiveWindow = 100 * time.Millisecond
	// DefaultLatencyWindow is Config.LatencyWindow when 0.
	DefaultLatencyWindow = 50 * time.Millisecond
	// MaxLatencyWindow is the longest Config.LatencyWindow.
	MaxLatencyWindow = time.Minute
	// DefaultMinSpareIOPS is Config.MinSpareIOPS when 0.
	DefaultMinSpareIOPS = 100
	// DefaultWeight is the weight of a volume whose Limits.Weight is 0.
	DefaultWeight = 100
	// MaxWeight is the largest weight SetLimits accepts.
	MaxWeight = 10000
)

// DefaultClassLatency are the target latencies of the classes when
// Config.ClassLatency holds zeros.
var DefaultClassLatency = [numClasses]time.Duration{
	Foreground: 10 * time.Millisecond,
	Rebuild:    100 * time.Millisecond,
	Scrub:      time.Second,
}

// Config configures a Scheduler. The zero value is usable: it means the
// defaults above, the wall clock and no metrics.
type Config struct {
	// Depth is the number of requests the scheduler lets be in flight to the
	// disk at once (Acquired and not yet Done). 0 means DefaultDepth.
	Depth int
	// ReservedSlots are slots of Depth kept for requests served under a
	// reservation (a volume below its MinIOPS) and for overdue background
	// requests: a request on spare capacity is dispatched only while fewer
	// than Depth-ReservedSlots requests are in flight. Without them, a
	// reserved request that arrives while a flood holds every slot goes
	// first, but still waits for one of the flood's requests to finish.
	// 0 keeps none; it must be less than Depth.
	ReservedSlots int
	// ReservationBurst is how many requests a volume below its reservation
	// may have served under it back to back, ahead of spare work, before
	// the reservation's spacing (one request per 1/MinIOPS) applies again.
	// Applications issue I/O in small bursts (a queue depth of a few);
	// with strict spacing only the first request of a burst would go under
	// the reservation and the rest would queue behind spare work. The
	// long-run reserved rate stays MinIOPS. 0 means 1: strict spacing, as
	// in mClock.
	ReservationBurst int
	// SpareSlotsWhileReserved bounds the requests on spare capacity in
	// flight while some volume with a reservation (MinIOPS > 0) is active,
	// that is, has sent a foreground request within ReservedActiveWindow; the bound
	// counts only requests dispatched on spare capacity, so a flood always
	// keeps that many. Like the latency guard below, it holds back only
	// volumes without a reservation: a reserved volume's requests beyond
	// its reservation are not throttled on its own account. Kept slots protect a reserved volume's turn at the
	// disk, not its latency once it is there: when the contended resource is
	// not the disk alone (a small node whose CPUs also serve the flood's
	// network and replication work), every request in flight slows the
	// others down. With this bound, a latency-sensitive volume that holds
	// a reservation sees a nearly idle node while it is active; without
	// reserved volumes it has no effect. 0 means no such bound.
	SpareSlotsWhileReserved int
	// ReservedActiveWindow is how long a reserved volume counts as active
	// after its last request, so that the bound holds across the short gaps
	// of a steady workload. 0 means DefaultReservedActiveWindow.
	ReservedActiveWindow time.Duration
	// LatencyTolerance turns on the latency guard: while a reserved volume
	// is active, the rate of requests on spare capacity is cut whenever the
	// reserved volumes' 99th percentile service time (dispatch to Done) over
	// a LatencyWindow exceeds LatencyTolerance times its baseline on a quiet
	// node, and raised again while it does not (see guard.go). It bounds
	// what the slots cannot: short requests run thousands a second through
	// a couple of slots, and on a node whose CPUs serve both volumes each
	// one slows the reserved volume down. 0 turns the guard off; otherwise
	// it must be at least 1.
	LatencyTolerance float64
	// LatencyWindow is how often the guard judges the service time (once
	// enough requests finished in a window). 0 means DefaultLatencyWindow;
	// at most MaxLatencyWindow.
	LatencyWindow time.Duration
	// MinSpareIOPS is the spare rate the guard never goes below, so that
	// work beyond reservations slows down but never stops. The guard counts
	// a Read or Write larger than 64 KiB as one I/O per 64 KiB: a large
	// request costs the node as much as that many small ones. 0 means
	// DefaultMinSpareIOPS.
	MinSpareIOPS uint64
	// ClassLatency is each class's target latency: a request's default
	// deadline is its arrival plus its class's latency, so the order of these
	// is the order of urgency (foreground < rebuild < scrub). Zero entries
	// take DefaultClassLatency.
	ClassLatency [numClasses]time.Duration
	// MaxBackgroundWait bounds how long a Rebuild or Scrub request waits for
	// other volumes' work: once it has waited that long it goes next (its own
	// volume's limits still apply). 0 means DefaultMaxBackgroundWait.
	MaxBackgroundWait time.Duration
	// Clock is the source of time; nil means the wall clock.
	Clock Clock
	// Observer receives measurements; nil means NopObserver.
	Observer Observer
	// Disabled turns the scheduler into a pass-through: Acquire returns at
	// once and only Observer.Dispatched is reported. It exists to measure
	// what scheduling buys (the noisy-neighbour comparison).
	Disabled bool
}

// Errors returned by the scheduler. Callers match them with errors.Is.
var (
	// ErrClosed means the scheduler was closed.
	ErrClosed = errors.New("iosched: scheduler closed")
	// ErrUnknownVolume means a request named a volume that SetLimits never
	// registered (or that was removed).
	ErrUnknownVolume = errors.New("iosched: unknown volume")
	// ErrVolumeRemoved means the request's volume was removed while the
	// request waited.
	ErrVolumeRemoved = errors.New("iosched: volume removed")
	// ErrInvalidLimits means SetLimits was given inconsistent limits.
	ErrInvalidLimits = errors.New("iosched: invalid limits")
	// ErrInvalidRequest means a request had an unknown class or operation.
	ErrInvalidRequest = errors.New("iosched: invalid request")
	// ErrInvalidConfig means New was given a bad Config.
	ErrInvalidConfig = errors.New("iosched: invalid config")
)

// validate checks a volume id and its limits.
func (l Limits) validate(volume string) error {
	switch {
	case volume == "":
		return fmt.Errorf("%w: empty volume id", ErrInvalidLimits)
	case l.MaxIOPS != 0 && l.MinIOPS > l.MaxIOPS:
		return fmt.Errorf("%w: volume %q: MinIOPS %d exceeds MaxIOPS %d",
			ErrInvalidLimits, volume, l.MinIOPS, l.MaxIOPS)
	case l.BurstDuration < 0:
		return fmt.Errorf("%w: volume %q: negative BurstDuration %v",
			ErrInvalidLimits, volume, l.BurstDuration)
	case l.Weight > MaxWeight:
		return fmt.Errorf("%w: volume %q: Weight %d exceeds %d",
			ErrInvalidLimits, volume, l.Weight, MaxWeight)
	}
	return nil
}

// withDefaults fills in the zero fields of a Config and checks the rest.
func (c Config) withDefaults() (Config, error) {
	if c.Depth < 0 {
		return c, fmt.Errorf("%w: negative Depth %d", ErrInvalidConfig, c.Depth)
	}
	if c.Depth == 0 {
		c.Depth = DefaultDepth
	}
	if c.ReservedSlots < 0 || c.ReservedSlots >= c.Depth {
		return c, fmt.Errorf("%w: ReservedSlots %d: want 0 to Depth-1 (%d)", ErrInvalidConfig, c.ReservedSlots, c.Depth-1)
	}
	if c.SpareSlotsWhileReserved < 0 || c.SpareSlotsWhileReserved > c.Depth-c.ReservedSlots {
		return c, fmt.Errorf("%w: SpareSlotsWhileReserved %d: want 0 to Depth-ReservedSlots (%d)",
			ErrInvalidConfig, c.SpareSlotsWhileReserved, c.Depth-c.ReservedSlots)
	}
	if c.ReservationBurst < 0 || c.ReservationBurst > MaxReservationBurst {
		return c, fmt.Errorf("%w: ReservationBurst %d: want 0 to %d", ErrInvalidConfig, c.ReservationBurst, MaxReservationBurst)
	}
	if c.ReservationBurst == 0 {
		c.ReservationBurst = 1
	}
	if c.ReservedActiveWindow < 0 {
		return c, fmt.Errorf("%w: negative ReservedActiveWindow %v", ErrInvalidConfig, c.ReservedActiveWindow)
	}
	if c.ReservedActiveWindow == 0 {
		c.ReservedActiveWindow = DefaultReservedActiveWindow
	}
	if c.LatencyTolerance != 0 && !(c.LatencyTolerance >= 1 && c.LatencyTolerance <= 1000) {
		return c, fmt.Errorf("%w: LatencyTolerance %v: want 0 (off) or 1 to 1000", ErrInvalidConfig, c.LatencyTolerance)
	}
	if c.LatencyWindow < 0 || c.LatencyWindow > MaxLatencyWindow {
		return c, fmt.Errorf("%w: LatencyWindow %v: want 0 to %v", ErrInvalidConfig, c.LatencyWindow, MaxLatencyWindow)
	}
	if c.LatencyWindow == 0 {
		c.LatencyWindow = DefaultLatencyWindow
	}
	if c.MinSpareIOPS == 0 {
		c.MinSpareIOPS = DefaultMinSpareIOPS
	}
	for i, d := range c.ClassLatency {
		if d < 0 {
			return c, fmt.Errorf("%w: negative ClassLatency[%v] %v", ErrInvalidConfig, Class(i), d)
		}
		if d == 0 {
			c.ClassLatency[i] = DefaultClassLatency[i]
		}
	}
	if c.MaxBackgroundWait < 0 {
		return c, fmt.Errorf("%w: negative MaxBackgroundWait %v", ErrInvalidConfig, c.MaxBackgroundWait)
	}
	if c.MaxBackgroundWait == 0 {
		c.MaxBackgroundWait = DefaultMaxBackgroundWait
	}
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	if c.Observer == nil {
		c.Observer = NopObserver{}
	}
	return c, nil
}
