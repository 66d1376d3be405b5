package iosched

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
)

// benchVolumes registers n volumes with limits high enough never to throttle,
// so that every request pays for the bucket arithmetic, and every fourth
// volume with a reservation.
func benchVolumes(b *testing.B, s *Scheduler, n int) []Request {
	b.Helper()
	reqs := make([]Request, n)
	for i := range reqs {
		name := fmt.Sprintf("pvc-%05d", i)
		l := Limits{MaxIOPS: 1e9, MaxBytesPerSec: 1e12, Weight: uint32(1 + i%MaxWeight)}
		if i%4 == 0 {
			l.MinIOPS = 1000
		}
		if err := s.SetLimits(name, l); err != nil {
			b.Fatal(err)
		}
		reqs[i] = Request{Volume: name, Op: Op(i % 2), Bytes: 4096}
	}
	return reqs
}

// BenchmarkAcquireDone is the uncontended path: a free slot, tokens
// available; Acquire returns at once and Done frees the slot.
func BenchmarkAcquireDone(b *testing.B) {
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("volumes=%d", n), func(b *testing.B) {
			s, err := New(Config{Depth: 64})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			reqs := benchVolumes(b, s, n)
			ctx := context.Background()
			for _, r := range reqs { // warm: waiters and heaps allocated
				t, _ := s.Acquire(ctx, r)
				t.Done()
			}
			acquireDoneLoop(b, s, reqs)
		})
	}
}

// acquireDoneLoop is the timed loop of the uncontended benchmarks: Acquire
// and Done one request at a time, cycling through reqs.
func acquireDoneLoop(b *testing.B, s *Scheduler, reqs []Request) {
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		t, err := s.Acquire(ctx, reqs[i%len(reqs)])
		if err != nil {
			b.Fatal(err)
		}
		t.Done()
	}
}

// BenchmarkAcquireDoneGuarded is the uncontended path with the latency
// guard running (LatencyTolerance, as on nodes): every volume has a
// reservation, so each request is timed for the guard, its windows close
// and its baseline periods turn over, but nothing is held back, which would
// measure waiting rather than the scheduler.
func BenchmarkAcquireDoneGuarded(b *testing.B) {
	s, err := New(Config{Depth: 64, LatencyTolerance: 1.25})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const n = 100
	reqs := make([]Request, n)
	for i := range reqs {
		reqs[i] = Request{Volume: fmt.Sprintf("pvc-%05d", i), Op: Op(i % 2), Bytes: 4096}
		if err := s.SetLimits(reqs[i].Volume, Limits{MinIOPS: 1e6}); err != nil {
			b.Fatal(err)
		}
	}
	acquireDoneLoop(b, s, reqs)
}

// BenchmarkBacklogged measures scheduling with every volume backlogged
// (two requests queued on each, depth 1): each iteration's Done picks the
// next request out of 2n queued through the heaps, and a new request joins
// the granted one's volume. It shows the O(log n) cost as n grows.
func BenchmarkBacklogged(b *testing.B) {
	for _, n := range []int{1, 100, 10000} {
		b.Run(fmt.Sprintf("volumes=%d", n), func(b *testing.B) {
			s, err := New(Config{Depth: 1})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			reqs := benchVolumes(b, s, n)
			var granted *waiter
			s.grantHook = func(w *waiter, _ phase, _ int64) { granted = w }
			take := func() Ticket {
				w := granted
				<-w.ch
				t, err := s.collect(w)
				if err != nil {
					b.Fatal(err)
				}
				return t
			}
			enqueue := func(r Request) {
				if _, err := s.enqueue(r); err != nil {
					b.Fatal(err)
				}
			}
			enqueue(reqs[0])
			held := take()
			for _, r := range reqs {
				enqueue(r)
				enqueue(r)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				held.Done()
				held = take()
				enqueue(Request{Volume: held.w.req.Volume, Op: held.w.req.Op, Bytes: held.w.req.Bytes})
			}
			b.StopTimer()
			if q := queuedOf(s); q != 2*n {
				b.Fatalf("%d queued, want %d", q, 2*n)
			}
		})
	}
}

// BenchmarkAcquireDoneParallel runs Acquire/Done from every P on 100
// volumes: the cost of the scheduler's lock under contention.
func BenchmarkAcquireDoneParallel(b *testing.B) {
	for _, depth := range []int{64, 4} {
		b.Run(fmt.Sprintf("depth=%d", depth), func(b *testing.B) {
			s, err := New(Config{Depth: depth})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			reqs := benchVolumes(b, s, 100)
			var next atomic.Int64
			b.ReportAllocs()
			b.SetParallelism(4) // with depth 4, most Acquires wait for a slot
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				r := reqs[int(next.Add(1))%len(reqs)]
				for pb.Next() {
					t, err := s.Acquire(ctx, r)
					if err != nil {
						b.Error(err)
						return
					}
					t.Done()
				}
			})
		})
	}
}

// BenchmarkDisabled is the pass-through, for comparison.
func BenchmarkDisabled(b *testing.B) {
	s, err := New(Config{Disabled: true})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	r := Request{Volume: "v", Op: Read, Bytes: 4096}
	b.ReportAllocs()
	for b.Loop() {
		t, _ := s.Acquire(ctx, r)
		t.Done()
	}
}
