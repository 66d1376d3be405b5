// Package iosched is the node's I/O scheduler: every volume I/O on a node is a
// Request {volume, op, bytes, class, deadline} that passes through a
// Scheduler before it goes to the disk.
//
// # Use
//
//	s, err := iosched.New(iosched.Config{Depth: 32, Observer: metrics})
//	err = s.SetLimits("pvc-1", iosched.Limits{MaxIOPS: 5000, MinIOPS: 500})
//	t, err := s.Acquire(ctx, iosched.Request{Volume: "pvc-1", Op: iosched.Write, Bytes: 4096})
//	... the I/O ...
//	t.Done()
//
// # What decides the order
//
// The scheduler lets at most Config.Depth requests be in flight. When a slot
// is free it picks, among the volumes whose next request their token buckets
// can pay for ("eligible" volumes), by three rules in turn:
//
//  1. Starvation bound. A Rebuild or Scrub request that has waited
//     Config.MaxBackgroundWait goes first, oldest first.
//  2. Reservations (mClock's R tags). A volume with Limits.MinIOPS has a
//     reservation tag that advances by 1/MinIOPS per dispatched I/O, from the
//     request's arrival; while the tag is not after now the volume has been
//     served less than its reservation and goes ahead of volumes that are only
//     spending spare capacity, lowest tag first.
//  3. Earliest effective deadline. A request's deadline is its arrival plus
//     its class's target latency (Config.ClassLatency: foreground < rebuild <
//     scrub) unless the caller gave one. Each volume also has a share tag
//     (mClock's P tag, kept by start-time fair queueing): a spare-capacity
//     I/O advances it by a quantum scaled by DefaultWeight/Weight. A volume's
//     effective deadline is the later of its next request's deadline and its
//     share tag. While no volume runs ahead of its share (light load) that is
//     plain earliest-deadline-first; when volumes are backlogged, they share
//     the spare capacity in proportion to their weights, and a volume with
//     little traffic still goes ahead of a flooding one.
//
// Within a volume, requests go in deadline order (an overdue background
// request excepted), and the volume's buckets are checked for its next
// request only.
//
// # Limits
//
// Each volume has a token bucket for IOPS and one for bytes/s (Read and Write
// only): rate = the limit, burst = limit × Limits.BurstDuration. An idle
// volume starts with full buckets, so it may burst exactly that much. A
// request larger than the bucket waits for a full bucket and leaves it in
// debt. A volume that cannot pay for its next request is "throttled": it
// waits out of the way, so it neither holds a dispatch slot nor delays other
// volumes (no head-of-line blocking), and one timer, set for the earliest
// throttled volume, wakes the scheduler when its tokens come. Nothing polls
// (but see below).
//
// # Protecting reserved volumes
//
// While a volume with a reservation is active (it sent a foreground request
// within Config.ReservedActiveWindow), two throttles hold back the
// spare-capacity requests of volumes without a reservation: a bound on how many are in
// flight (Config.SpareSlotsWhileReserved), and the latency guard
// (Config.LatencyTolerance), which limits their rate whenever the reserved
// volumes' service time grows beyond a tolerance of what it is on a quiet
// node (guard.go). A reserved volume's own requests beyond its reservation
// are never held back by them. While the guard runs, the timer also wakes
// the scheduler when the reserved volumes' activity window ends, so that the
// guard stops on time; a timer is never moved later, so a reserved volume
// that stays busy causes one such wake-up per ReservedActiveWindow.
//
// # Cost
//
// Acquire and Done are O(log n) in the number of queued requests and volumes:
// each volume keeps its queue in a heap, and the scheduler keeps eligible,
// reserved, background and throttled volumes in indexed heaps. Waiters are
// reused, so a request allocates nothing once the scheduler is warm.
//
// # Metrics
//
// The Observer interface reports queue wait, throttled time, deadline misses,
// dispatched I/O and the latency guard's spare rate, and Scheduler.Tokens
// what each volume's buckets hold (read at scrape time); the caller maps
// them onto Prometheus (or anything else).
//
// iosched knows nothing of CSI or Raft and imports the standard library only;
// replication and driver build on it.
package iosched
