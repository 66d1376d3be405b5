package engine

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/replica"
)

// TestSnapshotIsAConsistentCut: a snapshot taken while writers stream
// acknowledged writes holds every write acknowledged before Snapshot was
// called and none that started after it returned, and every replica holds
// the same snapshot. Then the volume goes on, the snapshot keeps its
// contents, and deleting it leaves the volume as it was.
func TestSnapshotIsAConsistentCut(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("snap", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()

	const block = 4096
	blocks := v.SizeBytes / block
	// Each write fills one block, never written before, with its number.
	var next atomic.Uint64 // the next block to write
	type span struct{ started, acked atomic.Bool }
	state := make([]span, blocks)
	var stop atomic.Bool
	var wg sync.WaitGroup
	var writeErr atomic.Value
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, block)
			for !stop.Load() {
				b := next.Add(1) - 1
				if b >= blocks {
					return
				}
				binary.BigEndian.PutUint64(p, b+1)
				state[b].started.Store(true)
				if err := e.WriteAt(ctx, p, b*block, false); err != nil {
					writeErr.Store(err)
					return
				}
				state[b].acked.Store(true)
			}
		}()
	}
	for next.Load() < blocks/4 { // let the writers get going
		time.Sleep(time.Millisecond)
	}
	ackedBefore := make([]bool, blocks)
	for b := range blocks {
		ackedBefore[b] = state[b].acked.Load()
	}
	if err := e.Snapshot(ctx, "cut"); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	startedAfter := make([]bool, blocks)
	for b := range blocks {
		startedAfter[b] = !state[b].started.Load()
	}
	stop.Store(true)
	wg.Wait()
	if err, _ := writeErr.Load().(error); err != nil {
		t.Fatalf("a write failed: %v", err)
	}

	var first []byte
	for _, rep := range v.Replicas {
		rr, err := r.servers[rep.Node].srv.Get(rep.ID)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, v.SizeBytes)
		if err := rr.ReadSnapshotAt(e.Epoch(), "cut", got, 0); err != nil {
			t.Fatalf("replica %s: read the snapshot: %v", rep.ID, err)
		}
		if first == nil {
			first = got
		} else if !bytes.Equal(first, got) {
			t.Fatalf("replica %s holds another snapshot than %s", rep.ID, v.Replicas[0].ID)
		}
	}
	var in, out int
	for b := range blocks {
		n := binary.BigEndian.Uint64(first[b*block:])
		switch {
		case ackedBefore[b] && n != b+1:
			t.Fatalf("block %d was acknowledged before the snapshot and is not in it (holds %d)", b, n)
		case startedAfter[b] && n != 0:
			t.Fatalf("block %d was written after the snapshot and is in it", b)
		}
		if ackedBefore[b] {
			in++
		}
		if startedAfter[b] {
			out++
		}
	}
	if in == 0 || out == 0 {
		t.Fatalf("the cut did not fall inside the stream (%d blocks before it, %d after)", in, out)
	}

	// The engine reads the snapshot too, and the volume goes on.
	p := make([]byte, block)
	if err := e.ReadSnapshotAt(ctx, "cut", p, 0); err != nil || !bytes.Equal(p, first[:block]) {
		t.Fatalf("engine read of the snapshot: %v", err)
	}
	volume := make([]byte, v.SizeBytes)
	if err := e.ReadAt(ctx, volume, 0); err != nil {
		t.Fatal(err)
	}
	if err := e.Snapshot(ctx, "cut"); err != nil {
		t.Fatalf("a retried snapshot: %v", err)
	}
	if err := e.Snapshot(ctx, "../bad"); !errors.Is(err, replica.ErrInvalidArgument) {
		t.Fatalf("a bad snapshot id: %v, want ErrInvalidArgument", err)
	}
	if err := e.DeleteSnapshot(ctx, "cut"); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	after := make([]byte, v.SizeBytes)
	if err := e.ReadAt(ctx, after, 0); err != nil || !bytes.Equal(after, volume) {
		t.Fatalf("the volume changed when its snapshot was deleted (%v)", err)
	}
	if err := e.ReadSnapshotAt(ctx, "cut", p, 0); !errors.Is(err, replica.ErrNotFound) {
		t.Fatalf("read of a deleted snapshot: %v, want ErrNotFound", err)
	}
	r.healthyIdentical(v.ID, volume)
}

// TestSnapshotThatFailsLeavesNoCopy: a snapshot id that one replica holds
// from an earlier, failed attempt (another cut) makes the snapshot fail,
// and no replica keeps it; taken again, it is on every replica.
func TestSnapshotThatFailsLeavesNoCopy(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("undo", 4*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	if err := e.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	first, err := r.servers[v.Replicas[0].Node].srv.Get(v.Replicas[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Snapshot(e.Epoch(), "x"); err != nil { // an earlier attempt's cut
		t.Fatal(err)
	}
	if err := e.Snapshot(ctx, "x"); err == nil {
		t.Fatal("a snapshot that one replica had from another cut succeeded")
	}
	holders := func() (n int) {
		for _, rep := range v.Replicas {
			rr, err := r.servers[rep.Node].srv.Get(rep.ID)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range rr.Snapshots() {
				if id == "x" {
					n++
				}
			}
		}
		return n
	}
	if n := holders(); n != 0 {
		t.Fatalf("after the failed snapshot %d replicas hold it, want 0", n)
	}
	if err := e.Snapshot(ctx, "x"); err != nil {
		t.Fatalf("taking it again: %v", err)
	}
	if n := holders(); n != 3 {
		t.Fatalf("%d replicas hold the snapshot, want 3", n)
	}
}

// TestSnapshotSurvivesReplicaOutage: a replica that was away while the
// volume changed keeps its snapshot through the delta rebuild that brings
// it back (the rebuild writes into its head, its sealed layers stay), and
// after the rebuild every replica holds the same snapshot and the same
// volume; deleting the snapshot afterwards works on all three.
func TestSnapshotSurvivesReplicaOutage(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	r.heartbeat("n1", "n2", "n3")
	v := r.createVolume("snapout", 16*mib, 3, 0, "n1")
	e, rebuilt := r.openWatching(v.ID)
	ctx := r.ctx()
	model, write := r.modelWriter(e, v.SizeBytes, 8)
	for off := uint64(0); off < v.SizeBytes; off += mib {
		write(off, mib)
	}
	if err := e.Snapshot(ctx, "before"); err != nil {
		t.Fatal(err)
	}
	snap := bytes.Clone(model)
	n3 := r.servers["n3"]
	r.kill("n3")
	write(3*mib+5*512, 64<<10) // changes while n3 is away
	write(9*mib, 200<<10)
	r.startServer("n3", n3.dir, n3.addr)
	select {
	case <-rebuilt:
	case <-time.After(30 * time.Second):
		t.Fatal("no rebuild finished within 30s")
	}
	// A loaded machine (CI, -race) may time out a clean point's request to
	// the replica just back and eject it again; the engine then rebuilds
	// it once more. Every replica must be healthy in the end.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		vol, err := r.meta.Volume(ctx, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if vol.HealthyReplicas() == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d healthy replicas 30s after the rebuild, want 3", vol.HealthyReplicas())
		}
	}
	if got := r.healthyIdentical(v.ID, model).HealthyReplicas(); got != 3 {
		t.Fatalf("%d healthy replicas after the rebuild, want 3", got)
	}
	vol, err := r.meta.Volume(ctx, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, rep := range vol.Replicas {
		rr, err := r.servers[rep.Node].srv.Get(rep.ID)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, v.SizeBytes)
		if err := rr.ReadSnapshotAt(e.Epoch(), "before", got, 0); err != nil {
			t.Fatalf("replica %s on %s: read the snapshot: %v", rep.ID, rep.Node, err)
		}
		if !bytes.Equal(got, snap) {
			t.Fatalf("replica %s on %s holds another snapshot", rep.ID, rep.Node)
		}
	}
	if err := e.DeleteSnapshot(ctx, "before"); err != nil {
		t.Fatal(err)
	}
	r.healthyIdentical(v.ID, model)
}
