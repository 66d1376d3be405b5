package dataplane

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/replica"
)

const (
	volSize    = 64 << 20
	volSizeArg = "64Mi"
	// extentSize is the replicas' dirty-tracking and checksum granule
	// (replica.DefaultExtentSize); rebuilds copy whole extents.
	extentSize      = 4 << 20
	blocksPerExtent = extentSize / blockSize
)

// checkModel reads the whole volume through conn and fails the test if a
// block differs from the model or holds a forbidden pattern.
func checkModel(t *testing.T, m *model, conn *nbdConn, what string, forbidden ...byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	if err := m.check(ctx, conn, forbidden...); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	t.Logf("%s: all %d blocks match the model (%d uncertain), read in %v", what, m.blocks(), m.uncertain(), time.Since(start).Round(time.Millisecond))
}

// TestPatternRoundTrip writes a seeded random pattern over a whole 3-replica
// volume through NBD and reads it back. Invariant: what was acknowledged is
// read back, and the three replicas are identical.
func TestPatternRoundTrip(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("roundtrip", volSizeArg, "--replicas", "3")
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	if conn.Size() != volSize {
		t.Fatalf("export size %d, want %d", conn.Size(), volSize)
	}
	m := newModel(volSize)
	start := time.Now()
	m.fill(t, conn, 'A', 0, m.blocks(), 8)
	t.Logf("wrote %d MiB in %v", volSize>>20, time.Since(start).Round(time.Millisecond))
	if err := conn.Flush(context.Background()); err != nil {
		t.Fatalf("flush: %v", err)
	}
	checkModel(t, m, conn, "read back")
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}

	// What the writes did is visible in the exporting node's metrics: the
	// NBD export's requests, labelled with the volume, and the replica
	// server's disk I/O through the disk scheduler.
	metrics := c.metrics("node-1")
	for _, want := range []string{
		`cairn_nbd_requests_total{export="",op="write",volume_id="` + v.ID + `"}`,
		`cairn_nbd_request_duration_seconds_count{export="",op="read",volume_id="` + v.ID + `"}`,
		`cairn_disk_sched_dispatched_total{op="write",volume_id="` + v.ID + `"}`,
	} {
		if n, ok := metrics[want]; !ok || n == 0 {
			t.Errorf("node-1's /metrics: %s is %v (present: %v), want > 0", want, n, ok)
		}
	}
}

// TestReplicaNodeKilledDuringWrites crashes (SIGKILL) a node holding a
// replica, not the export, while writes stream. Invariants: no write fails
// (the engine ejects the dead replica and acknowledges); the returning
// replica is rebuilt by copying only the extents that changed while it was
// away; every acknowledged write is read back; the replicas are identical.
func TestReplicaNodeKilledDuringWrites(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("killreplica", volSizeArg, "--replicas", "3")
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	victim := v.replicaOn("node-3")
	if victim == nil {
		t.Fatalf("no replica on node-3: %s", v.summary())
	}

	m := newModel(volSize)
	const seed = 2
	w := startWriter(t, m, conn, 'A', seed, 4, false)
	w.waitAcked(t, 300, 60*time.Second, "writes before the kill")

	// From now on the writer touches the first two extents only, so that the
	// returning replica misses writes there and nowhere else. The writes in
	// flight elsewhere finish before the kill (50 more acknowledgements).
	const regionExtents = 2
	w.setRegion(0, regionExtents*blocksPerExtent)
	w.waitAcked(t, 50, 30*time.Second, "writes after narrowing the region")
	killAt := time.Now()
	c.kill("node-3")
	t.Logf("killed node-3 after %d acknowledged writes", w.acked.Load())

	c.waitVolume(v.ID, 30*time.Second, "replica on node-3 ejected", func(v volumeJSON) error {
		if r := v.replica(victim.ID); r == nil || r.State != "failed" {
			return fmt.Errorf("replica %s not failed", victim.ID)
		}
		return nil
	})
	t.Logf("replica %s failed %v after the kill", victim.ID, time.Since(killAt).Round(time.Millisecond))
	w.waitAcked(t, 200, 30*time.Second, "writes while node-3 is down")

	restartAt := time.Now()
	c.start("node-3")
	final := c.waitVolume(v.ID, 60*time.Second, "all replicas healthy after the restart", func(v volumeJSON) error {
		if err := allHealthy(v); err != nil {
			return err
		}
		if rb := v.Rebuild; rb == nil || rb.ReplicaID != victim.ID || !rb.Done {
			return fmt.Errorf("rebuild of %s not recorded as done", victim.ID)
		}
		return nil
	})
	t.Logf("replica %s healthy %v after the restart", victim.ID, time.Since(restartAt).Round(time.Millisecond))
	w.waitAcked(t, 50, 30*time.Second, "writes after the rebuild")
	w.stop()
	if err := w.err(); err != nil {
		t.Fatalf("a write failed while a replica node was killed: %v", err)
	}
	if n := w.failed.Load(); n != 0 {
		t.Fatalf("%d writes failed", n)
	}

	rb := final.Rebuild
	t.Logf("rebuild of %s: compared %d of %d bytes, copied %d bytes (%.1f%% of the volume; %d extents written while it was away)",
		rb.ReplicaID, rb.BytesCompared, rb.BytesTotal, rb.BytesCopied, 100*float64(rb.BytesCopied)/float64(volSize), regionExtents)
	if rb.BytesTotal != volSize || rb.BytesCompared != volSize {
		t.Errorf("rebuild compared %d of %d bytes, want the whole volume (%d)", rb.BytesCompared, rb.BytesTotal, volSize)
	}
	if rb.BytesCopied == 0 || rb.BytesCopied > (regionExtents+1)*extentSize {
		t.Errorf("rebuild copied %d bytes; want more than 0 and at most %d (the %d extents written while the replica was away, plus one)",
			rb.BytesCopied, (regionExtents+1)*extentSize, regionExtents)
	}
	t.Logf("%d writes acknowledged, none failed", w.acked.Load())
	checkModel(t, m, conn, "read back after the rebuild")
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
}

// TestEngineNodeKilledTakeover crashes (SIGKILL) the node that runs the
// engine while writes stream, and takes the volume over on another node.
// Invariants: the takeover moves to a higher epoch; every write acknowledged
// before the crash is read back through the new engine (writes in flight may
// or may not have landed); after the old node returns and its replica is
// rebuilt, the replicas are identical.
func TestEngineNodeKilledTakeover(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("takeover", volSizeArg, "--replicas", "3")
	sock1, exp1 := c.export(v.ID, "node-1", 20*time.Second)
	conn1 := c.dial(sock1, 10*time.Second)

	m := newModel(volSize)
	w := startWriter(t, m, conn1, 'A', 3, 4, true)
	w.waitAcked(t, 400, 60*time.Second, "writes through node-1")
	c.kill("node-1")
	killAt := time.Now()
	w.stop()
	t.Logf("killed node-1 (the engine) after %d acknowledged writes; %d writes in flight were cut off (%v)",
		w.acked.Load(), w.failed.Load(), w.err())
	if err := w.err(); err == nil || !errors.Is(err, errNBDClosed) {
		t.Errorf("writes through the killed node: want the connection to break, got %v", err)
	}

	sock2, exp2 := c.export(v.ID, "node-2", 40*time.Second)
	t.Logf("takeover: export on node-2 at epoch %d (node-1's was %d), socket up %v after the kill",
		exp2.Epoch, exp1.Epoch, time.Since(killAt).Round(time.Millisecond))
	if exp2.Epoch <= exp1.Epoch {
		t.Fatalf("takeover epoch %d, want more than node-1's %d", exp2.Epoch, exp1.Epoch)
	}
	if exp2.Attachment == nil || exp2.Attachment.Node != "node-2" {
		t.Fatalf("after takeover: %s", exp2.summary())
	}
	conn2 := c.dial(sock2, 10*time.Second)
	checkModel(t, m, conn2, "read through node-2 after the takeover")
	after := c.mustVolume(v.ID)
	t.Logf("volume after the takeover: %s", after.summary())
	if r := after.replicaOn("node-1"); r == nil || r.State == "healthy" {
		t.Errorf("node-1's replica should have been ejected by the new engine: %s", after.summary())
	}

	// Writes go on through node-2; then node-1 returns and is rebuilt.
	m.fill(t, conn2, 'B', 0, 2*blocksPerExtent, 4)
	restartAt := time.Now()
	c.start("node-1")
	c.waitVolume(v.ID, 60*time.Second, "node-1's replica rebuilt", allHealthy)
	t.Logf("all replicas healthy %v after node-1 restarted", time.Since(restartAt).Round(time.Millisecond))
	checkModel(t, m, conn2, "read through node-2 after the rebuild")
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
}

// TestStaleEngineCannotWrite freezes (SIGSTOP) the node that runs the
// engine, with a client connected to it, and takes the volume over on
// another node; the new engine cannot claim the frozen node's replica and
// ejects it. Then the old node resumes and the client, still connected to
// the old engine, writes pattern C. Invariants: the takeover moves to a
// higher epoch; the old engine acknowledges none of the C writes (error
// reply or closed connection), and no byte of C reaches the volume: not
// through the new engine, and not in any healthy replica once the old
// node's replica has been rebuilt (verify).
func TestStaleEngineCannotWrite(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("fenced", volSizeArg, "--replicas", "3")
	sock1, exp1 := c.export(v.ID, "node-1", 20*time.Second)
	conn1 := c.dial(sock1, 10*time.Second)
	m := newModel(volSize)
	m.fill(t, conn1, 'A', 0, m.blocks(), 8)
	if err := conn1.Flush(context.Background()); err != nil {
		t.Fatalf("flush through node-1: %v", err)
	}

	c.stop("node-1")
	stopAt := time.Now()
	sock2, exp2 := c.export(v.ID, "node-2", 60*time.Second)
	t.Logf("takeover while node-1 is frozen: export on node-2 at epoch %d (node-1's was %d), socket up %v after SIGSTOP",
		exp2.Epoch, exp1.Epoch, time.Since(stopAt).Round(time.Millisecond))
	if exp2.Epoch <= exp1.Epoch {
		t.Fatalf("takeover epoch %d, want more than node-1's %d", exp2.Epoch, exp1.Epoch)
	}
	r1 := exp2.replicaOn("node-1")
	if r1 == nil {
		t.Fatalf("no replica on node-1: %s", exp2.summary())
	}
	after := c.waitVolume(v.ID, 30*time.Second, "node-1's replica ejected by the new engine", func(v volumeJSON) error {
		if r := v.replica(r1.ID); r == nil || r.State != "failed" {
			return fmt.Errorf("replica %s not failed", r1.ID)
		}
		return nil
	})
	t.Logf("volume with node-1 frozen: %s", after.summary())

	conn2 := c.dial(sock2, 10*time.Second)
	m.fill(t, conn2, 'B', 0, m.blocks()/2, 8)
	if err := conn2.Flush(context.Background()); err != nil {
		t.Fatalf("flush through node-2: %v", err)
	}

	// node-1 wakes up with its engine at the old epoch and the client still
	// connected to it. Every write of pattern C must fail. The first ones are
	// sent while node-1 is still frozen: the kernel holds them in the socket
	// (small writes, so that they fit) and node-1's NBD server reads them as
	// soon as it runs again, likely before it hears of the takeover, so that
	// they reach the old engine. Each C write covers the start of a block,
	// where the block's header names the write.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cWrite := func(b int) []byte {
		p := make([]byte, blockSize)
		blockContent(p, writeID('C', uint64(b)+1), b)
		return p[:4096]
	}
	const queued = 8
	var calls []*nbdCall
	for i := range queued {
		b := i * m.blocks() / queued // B and A regions alike
		call, err := conn1.SendWrite(cWrite(b), uint64(b)*blockSize)
		if err != nil {
			t.Fatalf("queue a write on the old connection: %v", err)
		}
		calls = append(calls, call)
	}
	c.cont("node-1")
	var eio, closed, acked int
	var other []error
	count := func(err error) {
		switch {
		case err == nil:
			acked++
		case isNBDErrno(err, nbdEIO):
			eio++
		case errors.Is(err, errNBDClosed):
			closed++
		default:
			other = append(other, err)
		}
	}
	for _, call := range calls {
		count(call.Wait(ctx))
	}
	// Then one at a time, until the old export is gone.
	for b := 1; b < m.blocks() && ctx.Err() == nil; b += 2 {
		err := conn1.WriteAt(ctx, cWrite(b), uint64(b)*blockSize, false)
		count(err)
		if errors.Is(err, errNBDClosed) {
			break
		}
	}
	t.Logf("writes of pattern C through the old engine: %d acknowledged, %d EIO replies, %d on a closed connection, %d other errors",
		acked, eio, closed, len(other))
	if acked > 0 {
		t.Errorf("the fenced engine on node-1 acknowledged %d writes", acked)
	}
	if len(other) > 0 {
		t.Errorf("writes through the fenced engine: want EIO or a closed connection, got %v", other[0])
	}
	if eio+closed == 0 {
		t.Errorf("no write through the fenced engine was answered")
	}
	// An observation, not a check: the replica's rebuild may already copy
	// extents into it, and a read that overlaps a copy can see the new
	// data before its checksums (the replica does not order its readers
	// against its writers; an engine does, and no engine reads a replica
	// that is not healthy). Such a read says nothing about the data.
	switch n, err := scanReplica(c.node("node-1").Data, r1.ID, volSize, 'C', c.replicaTLS()); {
	case errors.Is(err, replica.ErrChecksum):
		t.Logf("observation: node-1's ejected replica %s could not be read whole while its rebuild copies into it: %v", r1.ID, err)
	case err != nil:
		t.Fatalf("replica %s: %v", r1.ID, err)
	case n > 0:
		// The ejected replica was never claimed at the new epoch (its node
		// was frozen), so it still takes the old engine's epoch; it is
		// failed, and its rebuild compares and repairs every extent.
		t.Logf("observation: node-1's ejected replica %s took %d blocks of pattern C from the fenced engine before it learnt of the takeover", r1.ID, n)
	default:
		t.Logf("node-1's ejected replica %s holds no block of pattern C", r1.ID)
	}

	rebuildFrom := time.Now()
	c.waitVolume(v.ID, 60*time.Second, "node-1's replica rebuilt", allHealthy)
	t.Logf("all replicas healthy %v after SIGCONT", time.Since(rebuildFrom).Round(time.Millisecond))
	checkModel(t, m, conn2, "read through node-2", 'C')
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
	if n := replicaPattern(t, c.node("node-1").Data, r1.ID, volSize, 'C', c.replicaTLS()); n > 0 {
		t.Errorf("node-1's replica %s, healthy again, holds %d blocks of pattern C", r1.ID, n)
	}
}

// TestFlushedDataSurvivesKillAll writes and flushes through NBD, then
// crashes (SIGKILL) all three nodes and restarts them. Invariant: no
// acknowledged flush is undone: the export comes back by itself (the
// attachment is in the store) and reads back exactly the flushed data; the
// replicas end identical.
func TestFlushedDataSurvivesKillAll(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("killall", volSizeArg, "--replicas", "3")
	sock, exp := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	m := newModel(volSize)
	m.fill(t, conn, 'A', 0, m.blocks(), 8)
	// Overwrite a scattered quarter of the blocks, some with FUA.
	for b := 0; b < m.blocks(); b += 4 {
		if err := m.write(context.Background(), conn, b, writeID('B', uint64(b)+1), b%8 == 0); err != nil {
			t.Fatalf("write block %d: %v", b, err)
		}
	}
	if err := conn.Flush(context.Background()); err != nil {
		t.Fatalf("flush: %v", err)
	}
	_ = conn.Close()

	for _, id := range []string{"node-1", "node-2", "node-3"} {
		c.kill(id)
	}
	restartAt := time.Now()
	// One member alone has no leader to find: start it without waiting.
	c.startAlone("node-1")
	c.start("node-2")
	c.start("node-3")
	conn = c.dial(sock, 60*time.Second)
	t.Logf("the export on node-1 came back by itself %v after the restart", time.Since(restartAt).Round(time.Millisecond))
	checkModel(t, m, conn, "read back after all nodes were killed")
	final := c.waitVolume(v.ID, 60*time.Second, "all replicas healthy after the restart", allHealthy)
	t.Logf("volume after the restart: %s (epoch before the crash %d)", final.summary(), exp.Epoch)
	if final.Attachment == nil || final.Attachment.Node != "node-1" {
		t.Errorf("attachment lost in the crash: %s", final.summary())
	}
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
}

// TestWriteQuorum uses a volume whose write quorum is all three replicas,
// and crashes (SIGKILL) a replica node. Invariants: a write that cannot
// reach the write quorum fails with EIO (it is not acknowledged); once the
// node is back and its replica rebuilt, writes succeed again, every
// acknowledged write reads back and the replicas are identical.
func TestWriteQuorum(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("quorum", volSizeArg, "--replicas", "3", "--write-quorum", "3")
	if v.WriteQuorum != 3 {
		t.Fatalf("write quorum %d, want 3", v.WriteQuorum)
	}
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	m := newModel(volSize)
	m.fill(t, conn, 'A', 0, m.blocks(), 8)

	c.kill("node-3")
	killAt := time.Now()
	ctx := context.Background()
	err := m.write(ctx, conn, 5, writeID('B', 1), false)
	if !isNBDErrno(err, nbdEIO) {
		t.Fatalf("write with 2 of 3 replicas and write quorum 3: want EIO, got %v", err)
	}
	t.Logf("write with node-3 down failed as it must: %v", err)
	// And it keeps failing while the node is away.
	if err := m.write(ctx, conn, 6, writeID('B', 2), true); !isNBDErrno(err, nbdEIO) {
		t.Fatalf("second write with node-3 down: want EIO, got %v", err)
	}
	if err := conn.Flush(ctx); !isNBDErrno(err, nbdEIO) {
		t.Errorf("flush with node-3 down: want EIO, got %v", err)
	}
	// Reads need only one healthy replica.
	checkModel(t, m, conn, "read while below the write quorum")

	c.start("node-3")
	restartAt := time.Now()
	var attempts int
	eventually(t, 60*time.Second, "writes succeed again after node-3 returns", func() error {
		attempts++
		return m.write(ctx, conn, 7, writeID('C', uint64(attempts)), false)
	})
	t.Logf("writes succeed again %v after node-3 restarted (%v after the kill; %d attempts)",
		time.Since(restartAt).Round(time.Millisecond), time.Since(killAt).Round(time.Millisecond), attempts)
	final := c.mustVolume(v.ID)
	if err := allHealthy(final); err != nil {
		t.Errorf("a write was acknowledged with write quorum 3 but %v: %s", err, final.summary())
	}
	m.fill(t, conn, 'D', 0, blocksPerExtent, 8)
	if err := conn.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	checkModel(t, m, conn, "read back after recovery")
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
}

// TestStaleReplicaReplaced runs four nodes with a 3 s stale-replica timeout
// and crashes (SIGKILL) a node holding a replica (not the export's) for
// good. Invariants: the leader replaces the replica with a new one on the
// fourth node, which is rebuilt to healthy while the volume stays online;
// the data is intact and the three healthy replicas are identical.
func TestStaleReplicaReplaced(t *testing.T) {
	c := startCluster(t, 4, "--stale-replica-timeout", "3s")
	v := c.createVolume("stale", volSizeArg, "--replicas", "3")
	used := map[string]bool{}
	for _, r := range v.Replicas {
		used[r.Node] = true
	}
	var spare string
	for _, n := range c.nodes() {
		if !used[n.ID] {
			spare = n.ID
		}
	}
	if len(v.Replicas) != 3 || spare == "" {
		t.Fatalf("want 3 replicas on 3 of the 4 nodes: %s", v.summary())
	}
	exportNode, victim := v.Replicas[0].Node, v.Replicas[1]
	sock, _ := c.export(v.ID, exportNode, 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	m := newModel(volSize)
	m.fill(t, conn, 'A', 0, m.blocks(), 8)
	if err := conn.Flush(context.Background()); err != nil {
		t.Fatalf("flush: %v", err)
	}

	c.kill(victim.Node)
	killAt := time.Now()
	t.Logf("killed %s (replica %s); volume exported on %s; spare node %s", victim.Node, victim.ID, exportNode, spare)
	// Writes go on meanwhile, to a few extents.
	w := startWriter(t, m, conn, 'B', 7, 2, false)
	final := c.waitVolume(v.ID, 60*time.Second, "replica replaced on the spare node and rebuilt", func(v volumeJSON) error {
		if v.replica(victim.ID) != nil || v.replicaOn(victim.Node) != nil {
			return fmt.Errorf("replica %s on %s still in the set", victim.ID, victim.Node)
		}
		if r := v.replicaOn(spare); r == nil {
			return fmt.Errorf("no replica on %s yet", spare)
		}
		return allHealthy(v)
	})
	t.Logf("replica on %s replaced by %s on %s and rebuilt %v after the kill: %s",
		victim.Node, final.replicaOn(spare).ID, spare, time.Since(killAt).Round(time.Millisecond), final.summary())
	if rb := final.Rebuild; rb != nil {
		t.Logf("rebuild of %s: compared %d, copied %d of %d bytes", rb.ReplicaID, rb.BytesCompared, rb.BytesCopied, rb.BytesTotal)
	}
	w.waitAcked(t, 20, 30*time.Second, "writes after the replacement")
	w.stop()
	if err := w.err(); err != nil {
		t.Fatalf("a write failed while the replica was replaced: %v", err)
	}
	if err := conn.Flush(context.Background()); err != nil {
		t.Fatalf("flush: %v", err)
	}
	checkModel(t, m, conn, "read back after the replacement")
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
}
