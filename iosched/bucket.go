package iosched

import (
	"math"
	"time"
)

// bucket is a token bucket over the scheduler's time line (nanoseconds since
// the scheduler started). A zero bucket has no limit.
//
// Tokens are float64: a bytes/s limit times a burst in nanoseconds overflows
// int64 (10 GB/s × 1 s is 10¹⁹ byte-nanoseconds), and float64 keeps 53 bits of
// a bucket that holds at most rate × burst tokens.
type bucket struct {
	rate     float64 // tokens per nanosecond; 0 means unlimited
	capacity float64 // burst: rate × burst duration, at least minCapacity
	tokens   float64 // may go negative: a request larger than the bucket runs into debt
	last     int64   // time tokens was last brought up to date
}

// tokenSlack absorbs float rounding: after waiting exactly the computed time
// the bucket may hold need − 1e-12, which must count as enough.
const tokenSlack = 1e-9

// configure sets the bucket to limit tokens per second with a burst of
// limit × burst, keeping the tokens it holds (capped to the new burst). A bucket
// that was unlimited starts full, so a volume that gains a limit may burst at
// once. minCapacity keeps the burst from being smaller than one request.
func (b *bucket) configure(limit uint64, burst time.Duration, now int64, minCapacity float64) {
	if limit == 0 {
		*b = bucket{}
		return
	}
	wasLimited := b.rate > 0
	if wasLimited {
		b.advance(now)
	}
	b.rate = float64(limit) / float64(time.Second)
	b.capacity = math.Max(float64(limit)*burst.Seconds(), minCapacity)
	if !wasLimited || b.tokens > b.capacity {
		b.tokens = b.capacity
	}
	b.last = now
}

// advance adds the tokens earned since the last call.
func (b *bucket) advance(now int64) {
	if b.rate == 0 || now <= b.last {
		return
	}
	b.tokens = b.level(now)
	b.last = now
}

// level returns the tokens the bucket holds at now, without changing it.
func (b *bucket) level(now int64) float64 {
	if b.rate == 0 || now <= b.last {
		return b.tokens
	}
	return math.Min(b.capacity, b.tokens+float64(now-b.last)*b.rate)
}

// readyAt returns the earliest time, not before now, at which the bucket can
// pay for cost tokens. A cost above the burst only needs a full bucket and
// leaves the bucket in debt, so a request is never larger than the bucket.
// The bucket must have been advanced to now.
func (b *bucket) readyAt(cost float64, now int64) int64 {
	if b.rate == 0 {
		return now
	}
	need := math.Min(cost, b.capacity)
	short := need - b.tokens
	if short <= tokenSlack*math.Max(1, need) {
		return now
	}
	wait := math.Ceil(short / b.rate)
	if wait >= math.MaxInt64/2 {
		return math.MaxInt64 / 2
	}
	return now + max(1, int64(wait))
}

// charge takes cost tokens at now. It advances the bucket first: tokens
// earned while it was full must be clipped before the charge, not after.
func (b *bucket) charge(cost float64, now int64) {
	if b.rate != 0 {
		b.advance(now)
		b.tokens -= cost
	}
}
