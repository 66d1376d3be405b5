// Package ioschedtest holds helpers for tests of code that runs an
// iosched.Scheduler.
package ioschedtest

import (
	"sync"
	"time"

	"github.com/cairn-csi/cairn/iosched"
)

// FrozenClock is an iosched.Clock that moves only when told (Advance), so
// that what a scheduler decides from time (deadlines, ForegroundIdle) does
// not depend on how fast the test's goroutines ran. Its timers never fire:
// the scheduler arms them only for volumes held back by their limits, so a
// test that sets limits must not use it.
type FrozenClock struct {
	mu sync.Mutex
	t  time.Time
}

// NewFrozenClock returns a clock standing at t.
func NewFrozenClock(t time.Time) *FrozenClock { return &FrozenClock{t: t} }

// Now returns the clock's time.
func (c *FrozenClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *FrozenClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// AfterFunc returns a timer that never fires.
func (*FrozenClock) AfterFunc(time.Duration, func()) iosched.Timer {
	return &frozenTimer{pending: true}
}

type frozenTimer struct {
	mu      sync.Mutex
	pending bool
}

func (t *frozenTimer) Stop() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	was := t.pending
	t.pending = false
	return was
}

func (t *frozenTimer) Reset(time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	was := t.pending
	t.pending = true
	return was
}
