package iosched

import "time"

// Observer receives the scheduler's measurements, so that the caller can turn
// them into metrics (Prometheus histograms and counters, say) without iosched
// importing a metrics library.
//
// The scheduler calls Observer methods with its lock held, so they must be
// fast, must not block and must not call back into the Scheduler. Updating a
// Prometheus histogram or counter meets all three.
type Observer interface {
	// QueueWait reports how long a request waited between Acquire and its
	// dispatch, whatever held it (a dispatch slot, tokens, or other volumes).
	QueueWait(volume string, class Class, d time.Duration)
	// Throttled reports that a volume had requests held back by its own
	// limits for d. It is reported when the volume has tokens again (or is
	// removed), once per continuous throttled period.
	Throttled(volume string, d time.Duration)
	// DeadlineMiss reports a request dispatched after its deadline.
	DeadlineMiss(volume string, class Class)
	// Dispatched reports a request handed to the disk. Flush and Discard
	// report the bytes the caller gave, though they are not charged to the
	// bytes/s bucket.
	Dispatched(volume string, op Op, bytes uint64)
	// SpareLimit reports that the latency guard (Config.LatencyTolerance)
	// changed the rate of requests on spare capacity it allows, in I/Os
	// per second (one per 64 KiB of a larger Read or Write); +Inf when it
	// holds nothing.
	SpareLimit(iops float64)
}

// NopObserver is an Observer that ignores everything. It is the default.
type NopObserver struct{}

// QueueWait does nothing.
func (NopObserver) QueueWait(string, Class, time.Duration) {}

// Throttled does nothing.
func (NopObserver) Throttled(string, time.Duration) {}

// DeadlineMiss does nothing.
func (NopObserver) DeadlineMiss(string, Class) {}

// Dispatched does nothing.
func (NopObserver) Dispatched(string, Op, uint64) {}

// SpareLimit does nothing.
func (NopObserver) SpareLimit(float64) {}
