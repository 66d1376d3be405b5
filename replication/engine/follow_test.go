package engine

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/volspec"
)

var asyncParams = map[string]string{volspec.KeyReplicationMode: volspec.ReplicationAsync}

// gate holds every write to one node's replica until it is opened.
type gate struct{ open chan struct{} }

func newGate() *gate { return &gate{open: make(chan struct{})} }

func (g *gate) hold(ctx context.Context, p []byte, off uint64, forward func(context.Context) error) error {
	select {
	case <-g.open:
	case <-ctx.Done():
		return ctx.Err()
	}
	return forward(ctx)
}

// openAsync opens the engine of an asynchronous volume on n1 whose writes
// to the replica on n3 wait for g; queue bounds the followers' queues
// (0: the default).
func (r *rig) openAsync(id string, g *gate, queue int) *Engine {
	r.t.Helper()
	return r.openAsyncWith(id, g.hold, queue)
}

// openAsyncWith is openAsync with the writes to the replica on n3 going
// through write (faultConn).
func (r *rig) openAsyncWith(id string, write func(context.Context, []byte, uint64, func(context.Context) error) error, queue int) *Engine {
	r.t.Helper()
	e, err := Open(r.ctx(), Config{VolumeID: id, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 20 * time.Second, CleanInterval: time.Hour,
		followWrites: queue,
		wrapConn: func(rep meta.Replica, c replicaConn) replicaConn {
			if rep.Node == "n3" {
				return &faultConn{replicaConn: c, write: write}
			}
			return c
		}})
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { _ = e.Close(context.Background()) })
	return e
}

// replicaOnNode returns v's replica on node.
func replicaOnNode(t *testing.T, v *meta.Volume, node string) meta.Replica {
	t.Helper()
	for _, rep := range v.Replicas {
		if rep.Node == node {
			return rep
		}
	}
	t.Fatalf("volume %s has no replica on %s", v.ID, node)
	return meta.Replica{}
}

// asyncWrites writes n blocks of 64 KiB at distinct offsets through e
// into model and returns how long the slowest acknowledgement took.
func asyncWrites(t *testing.T, e *Engine, model []byte, n int, seed uint64) time.Duration {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 1))
	var slowest time.Duration
	for i := range n {
		p := make([]byte, 64<<10)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		off := uint64(i%(len(model)/len(p))) * uint64(len(p))
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := e.WriteAt(ctx, p, off, false)
		cancel()
		if err != nil {
			t.Fatalf("write %d with a follower held up: %v", i, err)
		}
		slowest = max(slowest, time.Since(start))
		copy(model[off:], p)
	}
	return slowest
}

// waitFor polls cond until it holds or 30 s pass.
func waitFor(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitStoredLag waits until the lag the store recorded for volume id's
// replica on node satisfies ok.
func (r *rig) waitStoredLag(id, node string, ok func(*meta.ReplicaLag) bool) {
	r.t.Helper()
	t := r.t.(*testing.T)
	ctx := r.ctx()
	waitFor(t, "the store records "+node+"'s lag", func() error {
		v, err := r.meta.Volume(ctx, id)
		if err != nil {
			return err
		}
		if l := replicaOnNode(t, v, node).Lag; !ok(l) {
			return fmt.Errorf("recorded lag %v", l)
		}
		return nil
	})
}

// TestAsyncAcknowledgesBeforeFollower: an asynchronous volume's writes are
// acknowledged while a follower has none of them; the lag is reported (the
// engine, the store, the metrics); the follower catches up once it can;
// and at close every replica is healthy and identical.
func TestAsyncAcknowledgesBeforeFollower(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("async", 16*mib, 3, 0, "n1", asyncParams)
	if v.WriteQuorum != 1 {
		t.Fatalf("asynchronous volume's write quorum %d, want 1 (the engine's own replica)", v.WriteQuorum)
	}
	g := newGate()
	e := r.openAsync(v.ID, g, 0)
	ctx := r.ctx()
	v, err := r.meta.Volume(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	r1, r3 := replicaOnNode(t, v, "n1"), replicaOnNode(t, v, "n3")
	if r1.State != meta.ReplicaHealthy || replicaOnNode(t, v, "n2").State != meta.ReplicaFollowing || r3.State != meta.ReplicaFollowing {
		t.Fatalf("replicas after open: %+v; want n1's healthy, the others following", v.Replicas)
	}

	model := make([]byte, v.SizeBytes)
	slowest := asyncWrites(t, e, model, 24, 7)
	t.Logf("24 writes acknowledged with n3 held up; slowest %v", slowest)
	if got := r.contents(v, r3); bytes.Equal(got, model) {
		t.Fatal("n3's replica already has the writes: the test did not hold it up")
	}
	if got := r.contents(v, r1); !bytes.Equal(got, model) {
		t.Fatal("n1's replica lacks acknowledged writes")
	}
	lag := e.Lags()[r3.ID]
	if lag.Writes != 24 || lag.Bytes != 24*64<<10 || lag.Seconds <= 0 {
		t.Fatalf("n3's lag %+v, want 24 writes of 64 KiB", lag)
	}
	r.waitStoredLag(v.ID, "n3", func(l *meta.ReplicaLag) bool { return l.Behind() && l.Writes == 24 })
	if got := testutil.ToFloat64(metricFollowLagWrites.WithLabelValues(v.ID, r3.ID)); got != 24 {
		t.Fatalf("cairn_engine_follower_lag_writes = %v, want 24", got)
	}

	close(g.open)
	waitFor(t, "n3 catches up", func() error {
		if l := e.Lags()[r3.ID]; l.Writes != 0 || l.Applied < 24 {
			return fmt.Errorf("lag %+v", l)
		}
		return nil
	})
	if got := r.contents(v, r3); !bytes.Equal(got, model) {
		t.Fatal("n3's replica differs after catching up")
	}
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	v = r.healthyIdentical(v.ID, model)
	if n := v.HealthyReplicas(); n != 3 {
		t.Fatalf("after close %d healthy replicas, want 3: %+v", n, v.Replicas)
	}
}

// TestAsyncOverflowResyncs: a follower's queue that overflows is dropped
// for the extents it covered; the follower is reported lagging, and once
// it answers again the extents are copied and it streams again.
func TestAsyncOverflowResyncs(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("overflow", 16*mib, 3, 0, "n1", asyncParams)
	g := newGate()
	e := r.openAsync(v.ID, g, 8)
	ctx := r.ctx()
	v, _ = r.meta.Volume(ctx, v.ID)
	r3 := replicaOnNode(t, v, "n3")
	before := testutil.ToFloat64(metricFollowOverflows.WithLabelValues(v.ID))
	model := make([]byte, v.SizeBytes)
	asyncWrites(t, e, model, 40, 9)
	lag := e.Lags()[r3.ID]
	if !lag.Resyncing || lag.Extents == 0 {
		t.Fatalf("n3's lag after 40 writes with a queue of 8: %+v, want resyncing", lag)
	}
	// n2's follower may overflow too: its queue is as short.
	if got := testutil.ToFloat64(metricFollowOverflows.WithLabelValues(v.ID)) - before; got < 1 {
		t.Fatalf("overflows counted %v, want at least n3's", got)
	}
	r.waitStoredLag(v.ID, "n3", func(l *meta.ReplicaLag) bool { return l != nil && l.Resyncing })
	close(g.open)
	waitFor(t, "n3 copies its extents and streams again", func() error {
		if l := e.Lags()[r3.ID]; l.Resyncing || l.Writes != 0 {
			return fmt.Errorf("lag %+v", l)
		}
		return nil
	})
	asyncWrites(t, e, model, 5, 10) // streamed again
	waitFor(t, "n3 has the writes after the resync", func() error {
		if l := e.Lags()[r3.ID]; l.Writes != 0 {
			return fmt.Errorf("lag %+v", l)
		}
		return nil
	})
	if got := r.contents(v, r3); !bytes.Equal(got, model) {
		t.Fatal("n3's replica differs after its resync")
	}
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	r.healthyIdentical(v.ID, model)
}

// TestAsyncCatchUpStreamsNewWrites: after its queue overflows, a follower
// gets the writes made since then through its queue again, between the
// copies of the extents the overflow marked, and it catches up while
// writes all over the volume go on. (When those writes marked extents
// instead, every catch-up pass found the volume marked again: a follower
// of a volume under random writes never streamed again.)
func TestAsyncCatchUpStreamsNewWrites(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("catchup", 16*mib, 3, 0, "n1", asyncParams)
	g := newGate()
	e := r.openAsync(v.ID, g, 16)
	ctx := r.ctx()
	v, _ = r.meta.Volume(ctx, v.ID)
	r3 := replicaOnNode(t, v, "n3")
	model := make([]byte, v.SizeBytes)
	asyncWrites(t, e, model, 40, 21)
	lag := e.Lags()[r3.ID]
	if !lag.Resyncing {
		t.Fatalf("n3's lag after 40 writes with a queue of 16: %+v, want resyncing", lag)
	}
	// n3's sender is stuck at the gate with the batch it took before the
	// overflow; three more writes wait in its queue behind that batch.
	asyncWrites(t, e, model, 3, 22)
	if after := e.Lags()[r3.ID]; !after.Resyncing || after.Writes != lag.Writes+3 {
		t.Fatalf("n3's lag after 3 more writes: %+v (before them %+v), want them queued while it resyncs", after, lag)
	}

	// Random 4 KiB writes over the whole volume while n3 catches up.
	stopWriter := startWriter(e, model, v.SizeBytes, 23)
	close(g.open)
	waitFor(t, "n3 catches up while writes go on", func() error {
		if l := e.Lags()[r3.ID]; l.Resyncing {
			return fmt.Errorf("lag %+v", l)
		}
		return nil
	})
	if err := stopWriter(); err != nil {
		t.Fatalf("write while n3 caught up: %v", err)
	}
	waitFor(t, "n3 has every write", func() error {
		if l := e.Lags()[r3.ID]; l.Resyncing || l.Writes != 0 {
			return fmt.Errorf("lag %+v", l)
		}
		return nil
	})
	if got := r.contents(v, r3); !bytes.Equal(got, model) {
		t.Fatal("n3's replica differs after catching up under writes")
	}
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	r.healthyIdentical(v.ID, model)
}

// TestAsyncSlowFollowerSlowsWrites: a follower that takes every write,
// only slower than they come, makes the writes wait for room in its queue
// instead of overflowing it: it never lags, nothing is copied, and it
// ends with every write.
func TestAsyncSlowFollowerSlowsWrites(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("slow", 16*mib, 3, 0, "n1", asyncParams)
	slow := func(ctx context.Context, p []byte, off uint64, forward func(context.Context) error) error {
		time.Sleep(20 * time.Millisecond)
		return forward(ctx)
	}
	e := r.openAsyncWith(v.ID, slow, 4)
	ctx := r.ctx()
	v, _ = r.meta.Volume(ctx, v.ID)
	r3 := replicaOnNode(t, v, "n3")
	overflows := testutil.ToFloat64(metricFollowOverflows.WithLabelValues(v.ID))
	waited := testutil.ToFloat64(metricFollowWait.WithLabelValues(v.ID))
	model := make([]byte, v.SizeBytes)
	for i := range 8 {
		asyncWrites(t, e, model, 5, uint64(30+i))
		if l := e.Lags()[r3.ID]; l.Resyncing {
			t.Fatalf("n3 lags after %d writes: %+v, want its queue waited for", 5*(i+1), l)
		}
	}
	if got := testutil.ToFloat64(metricFollowOverflows.WithLabelValues(v.ID)) - overflows; got != 0 {
		t.Fatalf("%v overflows with a follower that keeps taking writes, want 0", got)
	}
	if got := testutil.ToFloat64(metricFollowWait.WithLabelValues(v.ID)) - waited; got <= 0 {
		t.Fatal("no write waited for n3's queue of 4, though n3 takes 20 ms a write")
	}
	waitFor(t, "n3 has every write", func() error {
		if l := e.Lags()[r3.ID]; l.Writes != 0 {
			return fmt.Errorf("lag %+v", l)
		}
		return nil
	})
	if got := r.contents(v, r3); !bytes.Equal(got, model) {
		t.Fatal("n3's replica differs")
	}
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	r.healthyIdentical(v.ID, model)
}

// TestAsyncSameBlockWritesNotBatched: sector writes to different parts of
// one 4 KiB block, queued for a follower, reach it one after another: sent
// in one batch, the replica's read-merge-sum of the block raced, and the
// stored sum kept only one of them (a follower whose blocks failed their
// checksums; 4 to 11 runs in 40 before the batches were cut at blocks).
func TestAsyncSameBlockWritesNotBatched(t *testing.T) {
	for run := range 10 {
		r := newRig(t, 3)
		r.checksums = true
		v := r.createVolumeWith(fmt.Sprintf("sameblk%d", run), 4*mib, 3, 0, "n1", asyncParams)
		g := newGate()
		e := r.openAsync(v.ID, g, 0)
		ctx := r.ctx()
		v, _ = r.meta.Volume(ctx, v.ID)
		r3 := replicaOnNode(t, v, "n3")
		// 8 blocks × 8 sectors, interleaved so that a batch could hold
		// several writes to one block.
		for s := range 8 {
			for b := range 8 {
				p := randomData(512, uint64(100+8*b+s))
				if err := e.WriteAt(ctx, p, uint64(b*4096+s*512), false); err != nil {
					t.Fatal(err)
				}
			}
		}
		close(g.open)
		waitFor(t, "n3 has every write", func() error {
			if l := e.Lags()[r3.ID]; l.Resyncing || l.Writes != 0 {
				return fmt.Errorf("lag %+v", l)
			}
			return nil
		})
		for _, rep := range v.Replicas {
			if err := r.verifies(v, rep); err != nil {
				t.Fatalf("run %d: replica on %s after same-block sector writes: %v", run, rep.Node, err)
			}
		}
		if err := e.Close(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestAsyncDrainWhileLaggingWithQueue: a snapshot drains the followers
// under the engine's write lock while a lagging follower has writes queued
// since its overflow. Its sender must send them rather than wait for that
// lock to copy an extent: the drain then ends at once, and the follower
// stays a follower (it was ejected after the I/O timeout).
func TestAsyncDrainWhileLaggingWithQueue(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("drainlag", 16*mib, 3, 0, "n1", asyncParams)
	g := newGate()
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 5 * time.Second, CleanInterval: time.Hour,
		followWrites: 16,
		wrapConn: func(rep meta.Replica, c replicaConn) replicaConn {
			if rep.Node == "n3" {
				return &faultConn{replicaConn: c, write: g.hold}
			}
			return c
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	v, _ = r.meta.Volume(ctx, v.ID)
	r3 := replicaOnNode(t, v, "n3")
	model := make([]byte, v.SizeBytes)
	asyncWrites(t, e, model, 40, 21)
	asyncWrites(t, e, model, 3, 22)
	if l := e.Lags()[r3.ID]; !l.Resyncing || l.Writes == 0 {
		t.Fatalf("n3's lag before the snapshot: %+v, want resyncing with writes queued", l)
	}
	go func() { time.Sleep(300 * time.Millisecond); close(g.open) }()
	start := time.Now()
	if _, err := e.TakeSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	v, _ = r.meta.Volume(ctx, v.ID)
	if rep := replicaOnNode(t, v, "n3"); rep.State != meta.ReplicaFollowing {
		t.Fatalf("n3 is %s after the snapshot (took %v), want still following: the drain waited out its timeout", rep.State, took)
	}
	if got := r.contents(v, r3); !bytes.Equal(got, model) {
		t.Fatal("n3's replica differs after the drain")
	}
}

// TestAsyncFailoverResyncsFollowers: the engine dies (another node takes
// the volume) while a follower lacks acknowledged writes; a clean point in
// between must not have hidden them. The new engine makes every replica
// equal to the healthy one, and the old engine's late writes are fenced.
func TestAsyncFailoverResyncsFollowers(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("failover", 16*mib, 3, 0, "n1", asyncParams)
	g := newGate()
	old := r.openAsync(v.ID, g, 0)
	ctx := r.ctx()
	model := make([]byte, v.SizeBytes)
	asyncWrites(t, old, model, 16, 11)
	if err := old.CleanPoint(ctx); err != nil {
		t.Fatal(err)
	}
	r.attach(v.ID, "n2")
	e := r.open(v.ID, "n2")
	close(g.open) // the old engine's writes reach n3 now: fenced
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	v = r.healthyIdentical(v.ID, model)
	if n := v.HealthyReplicas(); n != 3 {
		t.Fatalf("after close %d healthy replicas, want 3: %+v", n, v.Replicas)
	}
}

// TestAsyncSnapshotHoldsEveryWrite: a snapshot taken while a follower lags
// drains it first, so the follower's snapshot holds the same writes.
func TestAsyncSnapshotHoldsEveryWrite(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("asnap", 16*mib, 3, 0, "n1", asyncParams)
	g := newGate()
	e := r.openAsync(v.ID, g, 0)
	ctx := r.ctx()
	model := make([]byte, v.SizeBytes)
	asyncWrites(t, e, model, 12, 13)
	go func() { time.Sleep(300 * time.Millisecond); close(g.open) }()
	holders, err := e.TakeSnapshot(ctx, "s1")
	if err != nil {
		t.Fatal(err)
	}
	if len(holders) != 3 {
		t.Fatalf("snapshot held by %v, want all three replicas", holders)
	}
	v, _ = r.meta.Volume(ctx, v.ID)
	r3 := replicaOnNode(t, v, "n3")
	rr, err := r.servers["n3"].srv.Get(r3.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, v.SizeBytes)
	if err := rr.ReadSnapshotAt(rr.Epoch(), "s1", got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the follower's snapshot lacks writes acknowledged before it")
	}
}

// TestAsyncEventualReadsLocalFollower: after a failover the new engine's
// own replica follows (the replica that was healthy stays so). With
// consistencyLevel strong it reads the healthy replica on the other node;
// with eventual it reads its own follower.
func TestAsyncEventualReadsLocalFollower(t *testing.T) {
	for _, level := range []string{volspec.ConsistencyStrong, volspec.ConsistencyEventual} {
		t.Run(level, func(t *testing.T) {
			r := newRig(t, 3)
			params := map[string]string{volspec.KeyReplicationMode: volspec.ReplicationAsync, volspec.KeyConsistencyLevel: level}
			v := r.createVolumeWith("eventual", 16*mib, 3, 0, "n1", params)
			old := r.open(v.ID, "n1")
			ctx := r.ctx()
			model := make([]byte, v.SizeBytes)
			asyncWrites(t, old, model, 8, 17)
			r.attach(v.ID, "n2")
			var remote atomic.Int64 // reads sent to n1
			held := newGate()       // writes to n2's follower, once armed
			var arm atomic.Bool
			e, err := Open(ctx, Config{VolumeID: v.ID, NodeID: "n2", Meta: r.meta, Logger: r.log, IOTimeout: 20 * time.Second, CleanInterval: time.Hour,
				wrapConn: func(rep meta.Replica, c replicaConn) replicaConn {
					if rep.Node == "n2" {
						return &faultConn{replicaConn: c, write: func(ctx context.Context, p []byte, off uint64, forward func(context.Context) error) error {
							if arm.Load() {
								return held.hold(ctx, p, off, forward)
							}
							return forward(ctx)
						}}
					}
					if rep.Node != "n1" {
						return c
					}
					return &faultConn{replicaConn: c, read: func(ctx context.Context, p []byte, off uint64, forward func(context.Context) error) error {
						remote.Add(1)
						return forward(ctx)
					}}
				}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = e.Close(context.Background()) })
			v, _ = r.meta.Volume(ctx, v.ID)
			if st := replicaOnNode(t, v, "n2").State; st != meta.ReplicaFollowing {
				t.Fatalf("the new engine's own replica is %s, want following", st)
			}
			got := make([]byte, v.SizeBytes)
			if err := e.ReadAt(ctx, got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, model) {
				t.Fatal("read back differs")
			}
			switch n := remote.Load(); {
			case level == volspec.ConsistencyStrong && n == 0:
				t.Fatal("strong: the read did not go to the healthy replica on n1")
			case level == volspec.ConsistencyEventual && n != 0:
				t.Fatalf("eventual: %d reads went to n1, want the local follower", n)
			}
			// A write the local follower does not have yet: a read of its
			// range goes to the healthy replica even when eventual (an
			// encrypted block's merge reads so before it writes).
			arm.Store(true)
			asyncWrites(t, e, model, 1, 19) // 64 KiB at 0
			before := remote.Load()
			if err := e.ReadAt(ctx, got[:64<<10], 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:64<<10], model[:64<<10]) || remote.Load() == before {
				t.Fatalf("a read of a range the follower lacks: equal %v, reads to n1 %d→%d; want the new data from n1",
					bytes.Equal(got[:64<<10], model[:64<<10]), before, remote.Load())
			}
			close(held.open)
		})
	}
}

// TestAsyncQuorumTwoPromotesFollower: with writeQuorum 2, losing one of the
// two healthy replicas makes the engine drain its follower and make it
// healthy, so writes go on instead of failing until a rebuild ends.
func TestAsyncQuorumTwoPromotesFollower(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolumeWith("q2", 16*mib, 3, 2, "n1", asyncParams)
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 20 * time.Second, CleanInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	v, _ = r.meta.Volume(ctx, v.ID)
	var healthyOther, follower meta.Replica
	for _, rep := range v.Replicas {
		switch {
		case rep.Node == "n1":
		case rep.State == meta.ReplicaHealthy:
			healthyOther = rep
		case rep.State == meta.ReplicaFollowing:
			follower = rep
		}
	}
	if healthyOther.ID == "" || follower.ID == "" {
		t.Fatalf("replicas %+v: want n1's and one more healthy, one following", v.Replicas)
	}
	model := make([]byte, v.SizeBytes)
	asyncWrites(t, e, model, 8, 23)
	r.kill(healthyOther.Node)
	asyncWrites(t, e, model, 8, 29) // ejects it, promotes the follower
	v, _ = r.meta.Volume(ctx, v.ID)
	if st := replicaOnNode(t, v, follower.Node).State; st != meta.ReplicaHealthy {
		t.Fatalf("the follower on %s is %s after the healthy replica on %s was lost, want healthy", follower.Node, st, healthyOther.Node)
	}
	if got := r.contents(v, replicaOnNode(t, v, follower.Node)); !bytes.Equal(got, model) {
		t.Fatal("the promoted follower lacks acknowledged writes")
	}
}
