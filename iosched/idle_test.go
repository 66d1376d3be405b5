package iosched

import (
	"context"
	"testing"
	"time"
)

// TestForegroundIdle: a scheduler that has seen no foreground request is
// idle; one foreground request makes it busy for the given time; requests
// of the rebuild class do not.
func TestForegroundIdle(t *testing.T) {
	s, err := New(Config{Depth: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SetLimits("v", Limits{}); err != nil {
		t.Fatal(err)
	}
	if !s.ForegroundIdle(time.Hour) {
		t.Fatal("a new scheduler is not idle")
	}
	acquire := func(c Class) {
		t.Helper()
		tk, err := s.Acquire(context.Background(), Request{Volume: "v", Op: Write, Bytes: 4096, Class: c})
		if err != nil {
			t.Fatal(err)
		}
		tk.Done()
	}
	acquire(Rebuild)
	if !s.ForegroundIdle(time.Hour) {
		t.Fatal("a rebuild request made the scheduler busy")
	}
	acquire(Foreground)
	if s.ForegroundIdle(time.Hour) {
		t.Fatal("idle for an hour right after a foreground request")
	}
	time.Sleep(20 * time.Millisecond)
	if !s.ForegroundIdle(10 * time.Millisecond) {
		t.Fatal("not idle 20 ms after the last foreground request, asked for 10 ms")
	}
}

// TestForegroundIdleAtStart: a foreground request at the very instant the
// scheduler started (a clock that has not moved) makes it busy like any
// other; it was once taken for "none seen".
func TestForegroundIdleAtStart(t *testing.T) {
	clock := newFakeClock()
	s, err := New(Config{Depth: 4, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.SetLimits("v", Limits{}); err != nil {
		t.Fatal(err)
	}
	tk, err := s.Acquire(context.Background(), Request{Volume: "v", Op: Write, Bytes: 4096, Class: Foreground})
	if err != nil {
		t.Fatal(err)
	}
	tk.Done()
	if s.ForegroundIdle(time.Millisecond) {
		t.Fatal("idle right after a foreground request at the start instant")
	}
	clock.Advance(time.Millisecond)
	if !s.ForegroundIdle(time.Millisecond) {
		t.Fatal("not idle 1 ms after the last foreground request, asked for 1 ms")
	}
}
