package replica

import (
	"context"
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairn-csi/cairn/iosched"
)

// How disk I/O of the replicas passes the node's disk scheduler.
//
// Every data operation on a replica (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
// CHECKSUMS, READ_EXTENT), whether it comes over the network or in process
// from an engine on the same node, waits for a slot of the disk scheduler the
// server was given, under the id of the replica's volume and in the I/O class
// its caller named: foreground unless marked with WithClass (in process) or
// FlagRebuild / FlagScrub (on the wire). That scheduler gives the volumes of
// every engine that writes to this node's disk a fair share of it, and lets
// rebuild and scrub traffic yield to foreground I/O for a bounded time.
//
// The control operations (OPEN, CLAIM, DIRTY, MARK_CLEAN, INFO, PING) are not
// scheduled: they are rare, small, and failover and attach wait for them; a
// claim queued behind a flood would hold up a takeover.

// classKey is the context key of WithClass.
type classKey struct{}

// WithClass returns a context whose replica data operations belong to I/O
// class c of the disk scheduler: those sent by a Client carry the matching
// flag, and Replica.Admit files them under c. The rebuilder marks its
// context with iosched.Rebuild, so that it yields to foreground I/O on every
// replica it touches. (Resync stays foreground: an attach waits for it.)
func WithClass(ctx context.Context, c iosched.Class) context.Context {
	return context.WithValue(ctx, classKey{}, c)
}

// ClassOf returns the class WithClass put in ctx, iosched.Foreground if none.
func ClassOf(ctx context.Context) iosched.Class {
	if c, ok := ctx.Value(classKey{}).(iosched.Class); ok {
		return c
	}
	return iosched.Foreground
}

// classFlag returns the wire flag of class c (0 for foreground and for
// classes the protocol does not know).
func classFlag(c iosched.Class) uint8 {
	switch c {
	case iosched.Rebuild:
		return FlagRebuild
	case iosched.Scrub:
		return FlagScrub
	}
	return 0
}

// classOfFlags is the inverse of classFlag, for a validated header.
func classOfFlags(flags uint8) iosched.Class {
	switch flags & flagsClass {
	case FlagRebuild:
		return iosched.Rebuild
	case FlagScrub:
		return iosched.Scrub
	}
	return iosched.Foreground
}

// scheduled reports whether op is a data operation, which passes the disk
// scheduler: exactly the ops that take a class flag.
func scheduled(op Op) bool { return op < opLimit && opSpecs[op].flags&flagsClass != 0 }

// schedOp says what the disk scheduler charges for op: n is the request's
// length field (bytes, or extents for CHECKSUMS). ok is false for the ops it
// does not schedule. TRIM and WRITE_ZEROES move no data and are charged no
// bytes, as the engine charges them.
func schedOp(op Op, n, extentSize uint64) (sop iosched.Op, bytes uint64, ok bool) {
	switch op {
	case OpRead:
		return iosched.Read, n, true
	case OpWrite:
		return iosched.Write, n, true
	case OpFlush:
		return iosched.Flush, 0, true
	case OpTrim, OpWriteZeroes:
		return iosched.Discard, 0, true
	case OpChecksums:
		return iosched.Read, n * extentSize, true // at most: holes are not read
	case OpReadExtent:
		return iosched.Read, extentSize, true
	case OpRehash:
		return iosched.Read, n * extentSize, true // and small writes of sums
	case OpLayerSums:
		return iosched.Read, n * extentSize, true // at most: cached sums read nothing
	case OpLayerRead:
		return iosched.Read, extentSize, true
	case OpLayerWrite:
		return iosched.Write, n, true
	}
	return 0, 0, false
}

// admission is a replica's way into its server's disk scheduler; the zero
// value (a replica opened without a server, or a server without a
// scheduler) admits everything at once.
type admission struct {
	sched   *iosched.Scheduler
	volume  string           // the scheduler's key: the replica's volume id
	waiting prometheus.Gauge // requests waiting for the scheduler, server-wide
}

// Admit waits until the disk scheduler of the server that opened r lets
// data operation op go, in the class ClassOf(ctx), and returns the Ticket
// whose Done ends it; call Done when the operation has returned. n is what
// the op's length field would be on the wire (bytes; extents for
// CHECKSUMS). Control ops, and replicas without a scheduler, pass at once
// with a zero Ticket. It is how an engine's in-process calls (engine
// Config.Local) take their turn with the network's requests. It fails with
// ctx's error, or with an error wrapping ErrClosed when the replica was
// deleted or the scheduler closed meanwhile.
func (r *Replica) Admit(ctx context.Context, op Op, n uint64) (iosched.Ticket, error) {
	if r.adm.sched == nil {
		return iosched.Ticket{}, nil
	}
	return r.admit(ctx, op, n, ClassOf(ctx))
}

// admit is Admit with the class given (the server takes it from the
// request's flags).
func (r *Replica) admit(ctx context.Context, op Op, n uint64, class iosched.Class) (iosched.Ticket, error) {
	a := r.adm
	if a.sched == nil {
		return iosched.Ticket{}, nil
	}
	sop, bytes, ok := schedOp(op, n, r.extentSize)
	if !ok {
		return iosched.Ticket{}, nil
	}
	a.waiting.Inc()
	t, err := a.sched.Acquire(ctx, iosched.Request{Volume: a.volume, Op: sop, Bytes: bytes, Class: class})
	a.waiting.Dec()
	if err == nil {
		return t, nil
	}
	if errors.Is(err, iosched.ErrClosed) || errors.Is(err, iosched.ErrVolumeRemoved) || errors.Is(err, iosched.ErrUnknownVolume) {
		// The server deleted or closed the replica, or is shutting down.
		return iosched.Ticket{}, fmt.Errorf("replica %s: disk scheduler: %w: %w", r.id, ErrClosed, err)
	}
	return iosched.Ticket{}, fmt.Errorf("replica %s: disk scheduler: %w", r.id, err)
}
