package engine

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// replicaSizes returns the size of each replica of v on its server.
func (r *rig) replicaSizes(v *meta.Volume) map[string]uint64 {
	r.t.Helper()
	out := map[string]uint64{}
	for _, rep := range v.Replicas {
		rr, err := r.servers[rep.Node].srv.Get(rep.ID)
		if err != nil {
			r.t.Fatalf("replica %s: %v", rep.ID, err)
		}
		out[rep.ID] = rr.Size()
	}
	return out
}

func (r *rig) expand(id string, size uint64) *meta.Volume {
	r.t.Helper()
	res, err := r.meta.Apply(r.ctx(), &meta.ExpandVolume{VolumeID: id, SizeBytes: size})
	if err != nil {
		r.t.Fatalf("ExpandVolume %s to %d: %v", id, size, err)
	}
	return res.Volume
}

// TestExpandWhileWriting: a volume grows while a writer keeps writing below
// its old end. Expand grows every replica, then the engine's size; the new
// range takes writes on every replica, nothing written before is lost, and
// the replicas stay identical.
func TestExpandWhileWriting(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v := r.createVolume("grow", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()

	const newSize = 20*mib + 512*3
	model := make([]byte, newSize)
	stopWriter := startWriter(e, model, 8*mib, 1)
	time.Sleep(50 * time.Millisecond)
	r.expand(v.ID, newSize)
	got, err := e.Expand(ctx)
	if err != nil || got != newSize || e.Size() != newSize {
		t.Fatalf("Expand = %d, %v (Size %d); want %d", got, err, e.Size(), newSize)
	}
	time.Sleep(50 * time.Millisecond)
	if err := stopWriter(); err != nil {
		t.Fatalf("write during the expansion: %v", err)
	}
	// The last bytes of the new size take a write on every replica.
	tail := make([]byte, 3*512)
	for i := range tail {
		tail[i] = 0xa5
	}
	if err := e.WriteAt(ctx, tail, newSize-uint64(len(tail)), true); err != nil {
		t.Fatalf("write at the new end: %v", err)
	}
	copy(model[newSize-uint64(len(tail)):], tail)
	if err := e.WriteAt(ctx, tail, newSize-512, false); !errors.Is(err, replica.ErrOutOfRange) {
		t.Fatalf("write past the new end = %v, want ErrOutOfRange", err)
	}
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	after := r.healthyIdentical(v.ID, model)
	for id, size := range r.replicaSizes(after) {
		if size != newSize {
			t.Errorf("replica %s has size %d, want %d", id, size, newSize)
		}
	}
	if got := after.HealthyReplicas(); got != 3 {
		t.Fatalf("%d healthy replicas after the expansion, want 3", got)
	}
	// Expand again, and the store asked for less: nothing changes.
	r.expand(v.ID, 8*mib)
	if got, err := e.Expand(ctx); err != nil || got != newSize {
		t.Fatalf("repeated Expand = %d, %v; want %d, nil", got, err, newSize)
	}
}

// TestExpandWhileReplicaDown is the regression test for a replica that
// misses an expansion: its node is down while the volume grows (its grow
// fails and it is ejected), and comes back with the replica at the old
// size. The engine grows it before it serves (as a rebuild target here);
// the volume never runs with replicas of two sizes, and all three end
// healthy, identical and at the new size. A volume grown while no engine
// runs has its replicas grown at the next open, before any I/O.
func TestExpandWhileReplicaDown(t *testing.T) {
	r := newRig(t, 3)
	r.heartbeat("n1", "n2", "n3")
	v := r.createVolume("down", 8*mib, 3, 0, "n1")
	// No replica deadline: n3's server is closed (its requests fail at
	// once), and the others must not be ejected for being slow on a
	// loaded machine (CI saw n1's replica miss a 1 s deadline), or the
	// volume would fall below its write quorum and the test watch
	// another story.
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 20 * time.Second, ReplicaDeadline: -1,
		CleanInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) }) // once: Close is idempotent
	ctx := r.ctx()
	model := make([]byte, 24*mib)
	seed := uint64(3)
	write := func(off uint64, n int) {
		t.Helper()
		seed++
		p := randomData(n, seed)
		if err := e.WriteAt(ctx, p, off, false); err != nil {
			t.Fatalf("write %d at %d: %v", n, off, err)
		}
		copy(model[off:], p)
	}
	for off := uint64(0); off < 8*mib; off += mib {
		write(off, mib)
	}
	n3 := r.servers["n3"]
	r.kill("n3")
	r.expand(v.ID, 16*mib)
	if got, err := e.Expand(ctx); err != nil || got != 16*mib {
		t.Fatalf("Expand with a replica down = %d, %v; want %d, nil", got, err, 16*mib)
	}
	write(12*mib, 64<<10) // the new range, while n3 is away
	r.startServer("n3", n3.dir, n3.addr)
	// The reconciler makes n3's replica rebuilding; the engine connects to
	// it, finds it at 8 MiB, grows it, rebuilds it and marks it healthy.
	deadline := time.Now().Add(60 * time.Second)
	for {
		cur, err := r.meta.Volume(ctx, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if cur.HealthyReplicas() == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("n3's replica not healthy again within 60s: %+v", cur.Replicas)
		}
		time.Sleep(100 * time.Millisecond)
	}
	after := r.healthyIdentical(v.ID, model[:16*mib])
	for id, size := range r.replicaSizes(after) {
		if size != 16*mib {
			t.Errorf("replica %s has size %d after its return, want %d", id, size, 16*mib)
		}
	}
	if err := e.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	// Grown in the store while no engine runs: the next open grows every
	// replica before it serves.
	r.expand(v.ID, 24*mib)
	for id, size := range r.replicaSizes(after) {
		if size != 16*mib {
			t.Fatalf("replica %s grew to %d with no engine", id, size)
		}
	}
	e2 := r.open(v.ID, "n1")
	if e2.Size() != 24*mib {
		t.Fatalf("engine opened at size %d, want %d", e2.Size(), 24*mib)
	}
	write2 := make([]byte, mib)
	for i := range write2 {
		write2[i] = 0x5a
	}
	if err := e2.WriteAt(ctx, write2, 23*mib, true); err != nil {
		t.Fatal(err)
	}
	copy(model[23*mib:], write2)
	final := r.healthyIdentical(v.ID, model)
	for id, size := range r.replicaSizes(final) {
		if size != 24*mib {
			t.Errorf("replica %s has size %d after the open, want %d", id, size, 24*mib)
		}
	}
}
