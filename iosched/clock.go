package iosched

import "time"

// Clock is the scheduler's source of time. Tests replace it with a fake that
// advances only when told, so that token buckets, deadlines and throttling
// timers are deterministic.
type Clock interface {
	// Now returns the current time. It must never go backwards.
	Now() time.Time
	// AfterFunc calls f in its own goroutine once d has passed, like
	// time.AfterFunc. The scheduler keeps one Timer and re-arms it with Reset.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is the part of *time.Timer the scheduler uses, with the semantics of a
// timer made by time.AfterFunc.
type Timer interface {
	// Stop prevents the timer from firing. It reports whether the call stopped
	// the timer (false if it had already fired or been stopped).
	Stop() bool
	// Reset makes the timer fire after d. It reports whether the timer was
	// still pending; when it returns false, f will run once more.
	Reset(d time.Duration) bool
}

// realClock is the wall clock.
type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }
