package engine

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// flipBit flips one bit of a replica's data file at off, behind its
// server's back, as a failing disk would.
func (r *rig) flipBit(rep meta.Replica, off int64) {
	r.t.Helper()
	f, err := os.OpenFile(filepath.Join(r.servers[rep.Node].dir, rep.ID, "data"), os.O_RDWR, 0)
	if err != nil {
		r.t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		r.t.Fatal(err)
	}
	b[0] ^= 0x04
	if _, err := f.WriteAt(b, off); err != nil {
		r.t.Fatal(err)
	}
}

// verifies reports whether a replica's whole content passes its checksums.
func (r *rig) verifies(v *meta.Volume, rep meta.Replica) error {
	rr, err := r.servers[rep.Node].srv.Get(rep.ID)
	if err != nil {
		r.t.Fatal(err)
	}
	return rr.ReadAt(rr.Epoch(), make([]byte, v.SizeBytes), 0)
}

func randomData(n int, seed uint64) []byte {
	rng := rand.New(rand.NewPCG(seed, 2))
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(rng.Uint32())
	}
	return p
}

// TestChecksumReadRepairsCorruptBlock (issue 10, part 4): a bit flipped in
// one replica's data file is never returned: the read answers with the
// data of a replica that verifies, the bad block is rewritten, the replica
// stays healthy and the repair is counted.
func TestChecksumReadRepairsCorruptBlock(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("sums", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	want := randomData(256<<10, 1)
	if err := e.WriteAt(ctx, want, 0, true); err != nil {
		t.Fatal(err)
	}
	before := testutil.ToFloat64(metricChecksumRepairs.WithLabelValues(v.ID))
	// Every replica might be the one read: corrupt a different block on each.
	for i, rep := range v.Replicas {
		r.flipBit(rep, int64(i*3*replica.SumBlockSize+100))
	}
	got := make([]byte, len(want))
	if err := e.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("read over corrupt blocks: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read returned wrong data")
	}
	// A sub-block read of a corrupt block too.
	small := make([]byte, 512)
	if err := e.ReadAt(ctx, small, 3*replica.SumBlockSize); err != nil || !bytes.Equal(small, want[3*replica.SumBlockSize:][:512]) {
		t.Fatalf("small read: %v", err)
	}
	if n := testutil.ToFloat64(metricChecksumRepairs.WithLabelValues(v.ID)); n <= before {
		t.Fatalf("repairs counted: %v, want more than %v", n, before)
	}
	v = r.healthyIdentical(v.ID, nil)
	for _, rep := range v.Replicas {
		if rep.State != meta.ReplicaHealthy {
			t.Fatalf("replica %s is %s after a checksum error; it must stay healthy", rep.ID, rep.State)
		}
		if err := r.verifies(v, rep); err != nil {
			t.Fatalf("replica %s after the repair: %v", rep.ID, err)
		}
	}
	if v.Condition != nil {
		t.Fatalf("volume condition %+v after a repaired error", v.Condition)
	}
}

// TestChecksumNoGoodCopyIsEIO: the same block corrupt on every replica
// fails the read with ErrIO (never wrong data) and marks the volume's
// condition abnormal; the rest of the volume still reads.
func TestChecksumNoGoodCopyIsEIO(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("lost", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	want := randomData(64<<10, 2)
	if err := e.WriteAt(ctx, want, 0, true); err != nil {
		t.Fatal(err)
	}
	for _, rep := range v.Replicas {
		r.flipBit(rep, 5*replica.SumBlockSize+7)
	}
	got := make([]byte, len(want))
	if err := e.ReadAt(ctx, got, 0); !errors.Is(err, ErrIO) {
		t.Fatalf("read of a block bad everywhere: %v, want ErrIO", err)
	}
	if err := e.ReadAt(ctx, got[:4096], 0); err != nil || !bytes.Equal(got[:4096], want[:4096]) {
		t.Fatalf("read of a good block: %v", err)
	}
	v, err := r.meta.Volume(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if v.Condition == nil || !v.Condition.Abnormal {
		t.Fatalf("volume condition %+v, want abnormal", v.Condition)
	}
	t.Logf("condition: %s", v.Condition.Message)
	for _, rep := range v.Replicas {
		if rep.State != meta.ReplicaHealthy {
			t.Fatalf("replica %s is %s", rep.ID, rep.State)
		}
	}
}

// TestChecksumPartialWriteOverCorruptBlock: a write that covers a corrupt
// block in part is refused by that replica (it must not bless the bad
// block with a new sum); the engine copies the block from a replica that
// took the write, so the write succeeds and every replica verifies.
func TestChecksumPartialWriteOverCorruptBlock(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("partial", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	want := make([]byte, 8*mib)
	copy(want, randomData(64<<10, 3))
	if err := e.WriteAt(ctx, want[:64<<10], 0, true); err != nil {
		t.Fatal(err)
	}
	r.flipBit(v.Replicas[1], 2*replica.SumBlockSize+1000)
	patch := randomData(512, 4)
	if err := e.WriteAt(ctx, patch, 2*replica.SumBlockSize+512, true); err != nil {
		t.Fatalf("partial write: %v", err)
	}
	copy(want[2*replica.SumBlockSize+512:], patch)
	v = r.healthyIdentical(v.ID, want)
	for _, rep := range v.Replicas {
		if err := r.verifies(v, rep); err != nil {
			t.Fatalf("replica %s: %v", rep.ID, err)
		}
	}
}

// damageConn damages the payload of its first write on the way.
type damageConn struct {
	replicaConn
	damaged atomic.Int32
}

func (d *damageConn) WriteAtSums(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error {
	if len(p) > 100 && d.damaged.Add(1) == 1 {
		q := append([]byte(nil), p...)
		q[100] ^= 1 // after the engine summed it
		p = q
	}
	return d.replicaConn.WriteAtSums(ctx, epoch, p, off, fua, pieces)
}

// TestChecksumWireDamageRepaired: a write damaged on its way to one replica
// is refused there and the range copied from a replica that took it.
func TestChecksumWireDamageRepaired(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("wire", 8*mib, 3, 0, "n1")
	var dc *damageConn
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 5 * time.Second, CleanInterval: time.Hour,
		wrapConn: func(rep meta.Replica, c replicaConn) replicaConn {
			if rep.ID != v.Replicas[2].ID {
				return c
			}
			dc = &damageConn{replicaConn: c}
			return dc
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	want := make([]byte, 8*mib)
	copy(want, randomData(32<<10, 5))
	if err := e.WriteAt(ctx, want[:32<<10], 0, true); err != nil {
		t.Fatalf("write: %v", err)
	}
	if dc == nil || dc.damaged.Load() == 0 {
		t.Fatal("the fault did not fire")
	}
	r.healthyIdentical(v.ID, want)
}

// TestResyncRehashesTornWrite: after an engine dies with writes in dirty
// extents, a replica whose data and sums disagree there (a write torn by a
// crash) is accepted as it is by the next engine's resync, and the
// replicas end identical and verifying.
func TestResyncRehashesTornWrite(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("torn", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	if err := e.WriteAt(ctx, randomData(128<<10, 6), 0, true); err != nil {
		t.Fatal(err)
	}
	// The engine "crashes": no clean point. One replica's data changed
	// without its sums, as a torn write leaves it.
	r.flipBit(v.Replicas[0], 4096*7)
	v = r.attach(v.ID, "n2")
	e2 := r.open(v.ID, "n2")
	got := make([]byte, 128<<10)
	if err := e2.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("read after resync: %v", err)
	}
	v = r.healthyIdentical(v.ID, nil)
	for _, rep := range v.Replicas {
		if err := r.verifies(v, rep); err != nil {
			t.Fatalf("replica %s after resync: %v", rep.ID, err)
		}
	}
}

// TestScrubRepairsAndReports: a scrub finds and repairs a corrupt block
// and a block that verifies but differs from the verified copy, counts
// them, and reports a block bad on every replica as unrecoverable (the
// valid checksum wins; no majority decides).
func TestScrubRepairsAndReports(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("scrub", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	want := make([]byte, 8*mib)
	copy(want, randomData(2*mib, 8))
	if err := e.WriteAt(ctx, want[:2*mib], 0, true); err != nil {
		t.Fatal(err)
	}
	r.flipBit(v.Replicas[1], 10*replica.SumBlockSize+5)
	r.flipBit(v.Replicas[2], 300*replica.SumBlockSize+5)
	// A block that verifies but differs: other data, stored with its own
	// valid sum, on a replica that is not the engine's first source (the
	// local one on n1, which the scrub takes as the reference).
	for _, rep := range v.Replicas {
		if rep.Node == "n1" {
			continue
		}
		rr, err := r.servers[rep.Node].srv.Get(rep.ID)
		if err != nil {
			t.Fatal(err)
		}
		if err := rr.WriteAt(rr.Epoch(), randomData(replica.SumBlockSize, 9), 600*replica.SumBlockSize, false); err != nil {
			t.Fatal(err)
		}
		break
	}
	st, err := e.Scrub(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	blocks := uint64(8*mib) / replica.SumBlockSize
	if st.BlocksChecked != 3*blocks || st.Repaired != 3 || st.Unrecoverable != 0 {
		t.Fatalf("scrub: %+v, want %d checked, 3 repaired, 0 unrecoverable", st, 3*blocks)
	}
	v = r.healthyIdentical(v.ID, want)
	for _, rep := range v.Replicas {
		if err := r.verifies(v, rep); err != nil {
			t.Fatalf("replica %s after scrub: %v", rep.ID, err)
		}
	}
	// Bad on every replica: unrecoverable, condition abnormal.
	for _, rep := range v.Replicas {
		r.flipBit(rep, 20*replica.SumBlockSize)
	}
	st, err = e.Scrub(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Unrecoverable != 1 || st.Repaired != 0 {
		t.Fatalf("scrub: %+v, want 1 unrecoverable", st)
	}
	if v, _ = r.meta.Volume(ctx, v.ID); v.Condition == nil || !v.Condition.Abnormal {
		t.Fatalf("condition %+v, want abnormal", v.Condition)
	}
	// A write of the whole block makes it good again; the next scrub
	// clears the condition.
	if err := e.WriteAt(ctx, want[20*replica.SumBlockSize:21*replica.SumBlockSize], 20*replica.SumBlockSize, true); err != nil {
		t.Fatal(err)
	}
	if st, err = e.Scrub(ctx, nil); err != nil || st.Unrecoverable != 0 {
		t.Fatalf("scrub: %+v, %v", st, err)
	}
	if v, _ = r.meta.Volume(ctx, v.ID); v.Condition != nil {
		t.Fatalf("condition %+v after the block was rewritten and scrubbed, want none", v.Condition)
	}
}

// TestScrubRequestedThroughStore: a scrub asked for in the store is run by
// the attached engine, which records its progress until done.
func TestScrubRequestedThroughStore(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("scrubreq", 4*mib, 3, 0, "n1")
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: time.Hour, WatchInterval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	if err := e.WriteAt(ctx, randomData(64<<10, 9), 0, true); err != nil {
		t.Fatal(err)
	}
	r.flipBit(v.Replicas[0], 7)
	if _, err := r.meta.Apply(ctx, &meta.ScrubProgressUpdate{VolumeID: v.ID, Progress: meta.ScrubProgress{Seq: 1}}); err != nil {
		t.Fatal(err)
	}
	for {
		v, err = r.meta.Volume(ctx, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if s := v.Scrub; s != nil && s.Done {
			if s.Seq != 1 || s.Repaired != 1 || s.Error != "" || s.BlocksChecked != 3*1024 {
				t.Fatalf("scrub result %+v", s)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("scrub not done: %+v", v.Scrub)
		case <-time.After(20 * time.Millisecond):
		}
	}
	// A view of the store from before the scrub's end was recorded (the
	// watch loop may hold one) does not run it a second time, which found
	// nothing left to repair and wrote "0 repaired" over the record (seen
	// in CI under load): the record stays, and the engine ran one scrub.
	runs := func() float64 { return testutil.ToFloat64(metricScrubRuns.WithLabelValues(v.ID, "ok")) }
	before := runs()
	stale := v.Clone()
	stale.Scrub.Done, stale.Scrub.Repaired = false, 0
	e.maybeScrub(ctx, stale)
	time.Sleep(300 * time.Millisecond) // a second run (4 MiB) or the record would be done by then
	for e.scrubbing.Load() {
		time.Sleep(20 * time.Millisecond)
	}
	if got, err := r.meta.Volume(ctx, v.ID); err != nil || got.Scrub.Repaired != 1 || !got.Scrub.Done || runs() != before {
		t.Fatalf("after a stale view of the finished scrub: record %+v (%v), %v scrubs run, want 1 repaired and none run", got.Scrub, err, runs()-before)
	}
}

// TestRebuildRepairsCorruptSource: a returning replica is rebuilt although
// its source has a corrupt block in an extent to copy: the source is first
// repaired from a copy that verifies, so the corruption is not copied and
// the rebuild does not stop there for ever.
func TestRebuildRepairsCorruptSource(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	r.heartbeat("n1", "n2", "n3")
	v := r.createVolume("rbsrc", 16*mib, 3, 0, "n1")
	rebuilt := make(chan RebuildStats, 4)
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond, Local: r.servers["n1"].srv,
		OnRebuilt: func(s RebuildStats) { rebuilt <- s }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	model := make([]byte, v.SizeBytes)
	copy(model[5*mib:], randomData(64<<10, 10))
	n3 := r.servers["n3"]
	r.kill("n3")
	if err := e.WriteAt(ctx, model[5*mib:5*mib+64<<10], 5*mib, false); err != nil {
		t.Fatal(err)
	}
	for _, rep := range v.Replicas {
		if rep.Node == "n1" { // the rebuild's source: the local replica
			r.flipBit(rep, 5*mib+4096+9)
		}
	}
	r.startServer("n3", n3.dir, n3.addr)
	select {
	case st := <-rebuilt:
		if st.BytesCopied == 0 {
			t.Fatalf("rebuild copied nothing: %+v", st)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no rebuild finished within 30s")
	}
	v = r.healthyIdentical(v.ID, model)
	for _, rep := range v.Replicas {
		if err := r.verifies(v, rep); err != nil {
			t.Fatalf("replica %s: %v", rep.ID, err)
		}
	}
}

// TestChecksumReadsRacingWrites: reads of blocks that writes are changing
// at the same moment may see a block whose data is written and whose sum
// is not yet: that is no corruption. No read may fail, nothing may be
// counted as lost, and the volume's condition stays normal.
func TestChecksumReadsRacingWrites(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("race", 8*mib, 3, 0, "n1")
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 5 * time.Second,
		CleanInterval: time.Hour, Local: r.servers["n1"].srv})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	lostBefore := testutil.ToFloat64(metricChecksumUnrecoverable.WithLabelValues(v.ID))
	stop := time.Now().Add(time.Second)
	errs := make(chan error, 8)
	for g := 0; g < 4; g++ {
		go func() {
			rng := rand.New(rand.NewPCG(uint64(g), 3))
			for time.Now().Before(stop) {
				off := uint64(rng.IntN(16)) * 512
				p := randomData(512*(1+rng.IntN(16)), rng.Uint64())
				if err := e.WriteAt(ctx, p, off, false); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
		go func() {
			p := make([]byte, 16<<10)
			for time.Now().Before(stop) {
				if err := e.ReadAt(ctx, p, 0); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := testutil.ToFloat64(metricChecksumUnrecoverable.WithLabelValues(v.ID)); n != lostBefore {
		t.Fatalf("%v blocks counted lost while reads raced writes", n-lostBefore)
	}
	v = r.healthyIdentical(v.ID, nil)
	if v.Condition != nil {
		t.Fatalf("condition %+v", v.Condition)
	}
	for _, rep := range v.Replicas {
		if err := r.verifies(v, rep); err != nil {
			t.Fatalf("replica %s: %v", rep.ID, err)
		}
	}
}

// TestScrubPeriodic: with a scrub interval the attached engine scrubs on
// its own, counting from its start when the store has no scrub recorded.
func TestScrubPeriodic(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("scrubtick", 4*mib, 3, 0, "n1")
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: time.Hour, WatchInterval: 20 * time.Millisecond, ScrubInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	for {
		v, err = r.meta.Volume(ctx, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if s := v.Scrub; s != nil && s.Done && s.Seq >= 2 {
			if s.Error != "" || s.BlocksChecked != 3*1024 {
				t.Fatalf("scrub %+v", s)
			}
			return // two in a row: the interval counts from the last one
		}
		select {
		case <-ctx.Done():
			t.Fatalf("no periodic scrubs: %+v", v.Scrub)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
