package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/replication/testrig"
)

// rig is a real volume store (one raft member on TCP) and real replica
// servers on 127.0.0.1, one per storage node, with their data in t.TempDir.
type rig struct {
	t       testing.TB
	log     *zap.Logger
	agent   *meta.Agent
	meta    *meta.Client
	servers map[string]*replicaServer
	// checksums: createVolume makes replicas with a sums file.
	checksums bool
	// local: openWatching's engine reaches n1's replica in process.
	local bool
	// patient: openWatching's engine waits up to a long IOTimeout for
	// every replica instead of ejecting one that answers a second after
	// the others. Tests whose premise is that no replica is ejected
	// before the outage they stage set it: on a loaded machine an fsync
	// can lag that long.
	patient bool
}

type replicaServer struct {
	srv  *replica.Server
	lis  net.Listener
	addr string
	dir  string
}

func newRig(t testing.TB, nodes int) *rig {
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	agent, c := testrig.StartStore(t, log)
	r := &rig{t: t, log: log, agent: agent, meta: c, servers: map[string]*replicaServer{}}
	t.Cleanup(func() { // before the store's (cleanups run last first)
		for _, s := range r.servers {
			s.srv.Close()
		}
	})
	ctx := r.ctx()
	for i := 1; i <= nodes; i++ {
		id := fmt.Sprintf("n%d", i)
		rs := r.startServer(id, filepath.Join(t.TempDir(), id), "127.0.0.1:0")
		if _, err := c.Apply(ctx, &meta.RegisterNode{Node: meta.Node{
			ID: id, RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:1", DataAddr: rs.addr,
			CapacityBytes: 10 << 30, FreeBytes: 10 << 30,
		}}); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

func (r *rig) ctx() context.Context {
	// Generous: under the race detector, with the whole suite and more
	// sharing two cores, filling a 64 MiB 3-replica volume with a clean
	// point (fsync) every 200 ms took more than 30 s.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	r.t.Cleanup(cancel)
	return ctx
}

func (r *rig) startServer(node, dir, addr string) *replicaServer {
	r.t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		r.t.Fatal(err)
	}
	s := &replicaServer{srv: replica.NewServer(r.log, dir), lis: lis, addr: lis.Addr().String(), dir: dir}
	go func() { _ = s.srv.Serve(lis) }()
	r.servers[node] = s
	return s
}

// kill stops a node's replica server abruptly (its connections drop).
func (r *rig) kill(node string) {
	r.servers[node].srv.Close()
}

// createVolume records a volume, creates its replicas on their servers
// (the node agents' job in production) and attaches it to node.
func (r *rig) createVolume(name string, size uint64, replicas, quorum int, node string) *meta.Volume {
	r.t.Helper()
	return r.createVolumeWith(name, size, replicas, quorum, node, nil)
}

// createVolumeWith is createVolume with parameters.
func (r *rig) createVolumeWith(name string, size uint64, replicas, quorum int, node string, params map[string]string) *meta.Volume {
	r.t.Helper()
	ctx := r.ctx()
	res, err := r.meta.Apply(ctx, &meta.CreateVolume{ID: "vol-" + name, Name: name, SizeBytes: size, Replicas: replicas, WriteQuorum: quorum, Parameters: params})
	if err != nil {
		r.t.Fatal(err)
	}
	for _, rep := range res.Volume.Replicas {
		if _, err := r.servers[rep.Node].srv.CreateWith(rep.ID, size, replica.CreateOptions{Checksums: r.checksums}); err != nil {
			r.t.Fatal(err)
		}
	}
	return r.attach(res.Volume.ID, node)
}

// attach moves the attachment to node (detaching first if needed).
func (r *rig) attach(id, node string) *meta.Volume {
	r.t.Helper()
	ctx := r.ctx()
	v, err := r.meta.Volume(ctx, id)
	if err != nil {
		r.t.Fatal(err)
	}
	if v.Attachment != nil {
		res, err := r.meta.Apply(ctx, &meta.DetachVolume{VolumeID: id, ExpectEpoch: v.Epoch})
		if err != nil {
			r.t.Fatal(err)
		}
		v = res.Volume
	}
	res, err := r.meta.Apply(ctx, &meta.AttachVolume{VolumeID: id, NodeID: node, ExpectEpoch: v.Epoch})
	if err != nil {
		r.t.Fatal(err)
	}
	return res.Volume
}

// openWatching opens the engine of volume id on n1 with short clean and
// watch intervals; the rebuilds it finishes arrive on the channel.
func (r *rig) openWatching(id string) (*Engine, <-chan RebuildStats) {
	r.t.Helper()
	rebuilt := make(chan RebuildStats, 4)
	cfg := Config{VolumeID: id, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond, OnRebuilt: func(s RebuildStats) { rebuilt <- s }}
	if r.local {
		cfg.Local = r.servers["n1"].srv
	}
	if r.patient {
		cfg.IOTimeout, cfg.ReplicaDeadline = 20*time.Second, -1
	}
	e, err := Open(r.ctx(), cfg)
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { _ = e.Close(context.Background()) })
	return e, rebuilt
}

// modelWriter returns a model of a volume of size bytes and a function
// that writes n random bytes at off through e and into the model.
func (r *rig) modelWriter(e *Engine, size uint64, seed uint64) ([]byte, func(off uint64, n int)) {
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(seed, seed))
	ctx := r.ctx()
	return model, func(off uint64, n int) {
		r.t.Helper()
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		if err := e.WriteAt(ctx, p, off, false); err != nil {
			r.t.Fatal(err)
		}
		copy(model[off:], p)
	}
}

func (r *rig) open(id, node string) *Engine {
	r.t.Helper()
	e, err := Open(r.ctx(), Config{VolumeID: id, NodeID: node, Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second, CleanInterval: time.Hour})
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { _ = e.Close(context.Background()) })
	return e
}

// contents reads a replica's whole data straight from its server.
func (r *rig) contents(v *meta.Volume, rep meta.Replica) []byte {
	r.t.Helper()
	rr, err := r.servers[rep.Node].srv.Get(rep.ID)
	if err != nil {
		r.t.Fatal(err)
	}
	buf := make([]byte, v.SizeBytes)
	if err := rr.ReadAt(rr.Epoch(), buf, 0); err != nil {
		r.t.Fatal(err)
	}
	return buf
}

// healthyIdentical checks invariant 3: every healthy replica holds the same
// bytes, and (when want is given) exactly want.
func (r *rig) healthyIdentical(id string, want []byte) *meta.Volume {
	r.t.Helper()
	v, err := r.meta.Volume(r.ctx(), id)
	if err != nil {
		r.t.Fatal(err)
	}
	var first []byte
	for _, rep := range v.Replicas {
		if rep.State != meta.ReplicaHealthy {
			continue
		}
		got := r.contents(v, rep)
		if first == nil {
			first = got
		} else if !bytes.Equal(first, got) {
			r.t.Fatalf("healthy replicas of %s differ (%s)", id, rep.ID)
		}
		if want != nil && !bytes.Equal(got, want) {
			r.t.Fatalf("replica %s does not hold every acknowledged write", rep.ID)
		}
	}
	return v
}

const mib = 1 << 20

func TestWriteReadAllReplicasIdentical(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("a", 16*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	rng := rand.New(rand.NewPCG(1, 2))
	model := make([]byte, v.SizeBytes)
	for i := 0; i < 200; i++ {
		n := (rng.IntN(64) + 1) * 512
		off := uint64(rng.IntN(int(v.SizeBytes)-n)) &^ 511
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if err := e.WriteAt(ctx, p, off, i%17 == 0); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	if err := e.Trim(ctx, 4*mib, mib); err != nil {
		t.Fatal(err)
	}
	clear(model[4*mib : 5*mib])
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, v.SizeBytes)
	if err := e.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("read back differs from what was written")
	}
	r.healthyIdentical(v.ID, model)
	if err := e.ReadAt(ctx, make([]byte, 512), v.SizeBytes); !errors.Is(err, replica.ErrOutOfRange) {
		t.Fatalf("read past the end: %v, want ErrOutOfRange", err)
	}
}

func TestFailedReplicaEjectedBeforeAck(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("b", 8*mib, 3, 0, "n1")
	// The engine's log goes to the test and to logs, where the ejection's
	// line is looked for below.
	obs, logs := observer.New(zap.WarnLevel)
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: zap.New(zapcore.NewTee(r.log.Core(), obs)),
		IOTimeout: 2 * time.Second, CleanInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	model := make([]byte, v.SizeBytes)
	var victim meta.Replica
	for _, rep := range v.Replicas {
		if rep.Node == "n3" {
			victim = rep
		}
	}
	for i := 0; i < 64; i++ {
		if i == 20 {
			r.kill("n3")
		}
		p := bytes.Repeat([]byte{byte(i + 1)}, 64<<10)
		off := uint64(i) * 64 << 10
		if err := e.WriteAt(ctx, p, off, false); err != nil {
			t.Fatalf("write %d after killing n3: %v", i, err)
		}
		copy(model[off:], p)
	}
	after := r.healthyIdentical(v.ID, model)
	for _, rep := range after.Replicas {
		// Failed, or already put back to rebuilding by the leader's
		// reconciler: a new leader counts every node as recently heard
		// from for a few heartbeats, the killed one too.
		if rep.ID == victim.ID && rep.State == meta.ReplicaHealthy {
			t.Fatalf("replica on the killed node is %s, want it ejected", rep.State)
		}
	}
	if after.Epoch <= v.Epoch {
		t.Fatalf("epoch %d after an ejection, was %d", after.Epoch, v.Epoch)
	}
	// The log says why: the write's error on that replica, not only that
	// a write failed.
	ejected := logs.FilterMessage("replica ejected").FilterField(zap.String("replica_id", victim.ID)).All()
	if len(ejected) == 0 {
		t.Fatalf("no \"replica ejected\" line for %s: %v", victim.ID, logs.All())
	}
	if cause, _ := ejected[0].ContextMap()["cause"].(string); !strings.Contains(cause, "connection lost") {
		t.Errorf("ejection logged with cause %q, want the write's error on %s (its connection lost)", cause, victim.ID)
	}
	// The reconciler may move the epoch again meanwhile; the engine
	// follows the store within its watch interval.
	deadline := time.Now().Add(10 * time.Second)
	for {
		cur, err := r.meta.Volume(ctx, v.ID)
		if err != nil {
			t.Fatal(err)
		}
		if e.Epoch() == cur.Epoch {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("engine writes with epoch %d, store has %d", e.Epoch(), cur.Epoch)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestWriteQuorum(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("q", 4*mib, 3, 3, "n1") // every replica must take a write
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	if err := e.WriteAt(ctx, make([]byte, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	r.kill("n2")
	err := e.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), 0, false)
	if !errors.Is(err, ErrIO) {
		t.Fatalf("write with 2 of quorum 3: %v, want ErrIO", err)
	}
}

func TestStaleEngineFenced(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("f", 4*mib, 3, 0, "n1")
	old := r.open(v.ID, "n1")
	ctx := r.ctx()
	if err := old.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0, false); err != nil {
		t.Fatal(err)
	}
	// Take over on n2 (a new attachment, a new epoch) while the old engine
	// still runs: the old one must not change any replica afterwards.
	r.attach(v.ID, "n2")
	fresh := r.open(v.ID, "n2")
	if err := fresh.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	err := old.WriteAt(ctx, bytes.Repeat([]byte{9}, 4096), 0, true)
	if err == nil || !(errors.Is(err, ErrFenced) || errors.Is(err, ErrNotAttached)) {
		t.Fatalf("stale engine write: %v, want fenced", err)
	}
	want := make([]byte, 4*mib)
	copy(want, bytes.Repeat([]byte{2}, 4096))
	r.healthyIdentical(v.ID, want)
}

func TestResyncDirtyExtentsAfterCrash(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("r", 16*mib, 3, 0, "n1")
	crashed := r.open(v.ID, "n1")
	ctx := r.ctx()
	if err := crashed.WriteAt(ctx, bytes.Repeat([]byte{1}, mib), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := crashed.CleanPoint(ctx); err != nil {
		t.Fatal(err)
	}
	// A write that reached one replica only, as when the engine dies
	// mid-write: it dirties extent 2 of that replica.
	var lone meta.Replica
	for _, rep := range v.Replicas {
		if rep.Node == "n3" {
			lone = rep
		}
	}
	raw, err := replica.Dial(ctx, r.servers["n3"].addr, lone.ID, v.SizeBytes)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if err := raw.WriteAt(ctx, crashed.Epoch(), bytes.Repeat([]byte{5}, 4096), 8*mib+4096, false); err != nil {
		t.Fatal(err)
	}
	// Failover to n2: the new engine resyncs the union of dirty extents.
	r.attach(v.ID, "n2")
	r.open(v.ID, "n2")
	r.healthyIdentical(v.ID, nil)
}

func TestConcurrentWritersWithEjection(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("c", 8*mib, 3, 0, "n1")
	e := r.open(v.ID, "n1")
	ctx := r.ctx()
	var wg sync.WaitGroup
	model := make([]byte, v.SizeBytes)
	var mu sync.Mutex
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 32; i++ {
				off := uint64(w*32+i) * 32 << 10 // disjoint ranges per write
				p := bytes.Repeat([]byte{byte(w*32 + i + 1)}, 32<<10)
				if err := e.WriteAt(ctx, p, off, false); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				mu.Lock()
				copy(model[off:], p)
				mu.Unlock()
			}
		}()
		if w == 4 {
			r.kill("n2")
		}
	}
	wg.Wait()
	r.healthyIdentical(v.ID, model)
}

// heartbeat keeps the rig's storage nodes up in the store.
func (r *rig) heartbeat(nodes ...string) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			for _, n := range nodes {
				hctx, c := context.WithTimeout(ctx, time.Second)
				_ = r.meta.Heartbeat(hctx, &meta.HeartbeatRequest{NodeID: n, CapacityBytes: 10 << 30, FreeBytes: 10 << 30})
				c()
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	r.t.Cleanup(func() { cancel(); <-done })
}

func TestReturningReplicaRebuildsOnlyWhatChanged(t *testing.T) {
	r := newRig(t, 3)
	// n3's outage must be the only one: on a loaded machine n2 can miss the
	// replica deadline once, and with n3 gone that left one healthy
	// replica, below the write quorum (seen under a parallel make test).
	r.patient = true
	r.heartbeat("n1", "n2", "n3")
	v := r.createVolume("rb", 64*mib, 3, 0, "n1")
	e, rebuilt := r.openWatching(v.ID)
	ctx := r.ctx()
	model, write := r.modelWriter(e, v.SizeBytes, 7)
	for off := uint64(0); off < v.SizeBytes; off += mib {
		write(off, mib) // the whole volume, before the outage
	}
	if err := e.CleanPoint(ctx); err != nil {
		t.Fatal(err)
	}
	n3 := r.servers["n3"]
	r.kill("n3")
	write(10*mib, 64<<10) // changes while n3 is away: two extents
	write(40*mib, 64<<10)
	// n3's replica server comes back on the same address with its data.
	r.startServer("n3", n3.dir, n3.addr)
	var st RebuildStats
	select {
	case st = <-rebuilt:
	case <-time.After(30 * time.Second):
		t.Fatal("no rebuild finished within 30s")
	}
	t.Logf("rebuild of %s: compared %d bytes, copied %d bytes of %d", st.ReplicaID, st.BytesCompared, st.BytesCopied, v.SizeBytes)
	if st.BytesCompared != v.SizeBytes {
		t.Errorf("compared %d bytes, want the whole volume %d", st.BytesCompared, v.SizeBytes)
	}
	if st.BytesCopied == 0 || st.BytesCopied > 3*4*mib {
		t.Errorf("copied %d bytes; want the changed extents only (≤ 12 MiB of 64 MiB)", st.BytesCopied)
	}
	after := r.healthyIdentical(v.ID, model)
	if got := after.HealthyReplicas(); got != 3 {
		t.Fatalf("%d healthy replicas after the rebuild, want 3: %+v", got, after.Replicas)
	}
	if after.Rebuild == nil || !after.Rebuild.Done || after.Rebuild.BytesCopied != st.BytesCopied {
		t.Errorf("store's rebuild progress %+v does not match %+v", after.Rebuild, st)
	}
}

// openLocal opens an engine that reaches node's own replica in process.
func (r *rig) openLocal(id, node string) *Engine {
	r.t.Helper()
	e, err := Open(r.ctx(), Config{VolumeID: id, NodeID: node, Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: time.Hour, Local: r.servers[node].srv})
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { _ = e.Close(context.Background()) })
	return e
}

func TestLocalReplicaInProcessKeepsFencing(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("l", 8*mib, 3, 0, "n1")
	old := r.openLocal(v.ID, "n1")
	ctx := r.ctx()
	for _, m := range old.members {
		if _, inProcess := m.client.(localReplica); inProcess != (m.replica.Node == "n1") {
			t.Fatalf("replica %s on %s is reached through %T", m.replica.ID, m.replica.Node, m.client)
		}
	}
	model := make([]byte, v.SizeBytes)
	for i := 0; i < 32; i++ {
		p := bytes.Repeat([]byte{byte(i + 1)}, 64<<10)
		if err := old.WriteAt(ctx, p, uint64(i)*128<<10, i%8 == 0); err != nil {
			t.Fatal(err)
		}
		copy(model[uint64(i)*128<<10:], p)
	}
	got := make([]byte, v.SizeBytes)
	if err := old.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("read back through the in-process replica differs")
	}
	// A takeover on n2 fences the old engine, whose local replica is
	// claimed by the new engine with a higher epoch.
	r.attach(v.ID, "n2")
	fresh := r.openLocal(v.ID, "n2")
	if err := fresh.WriteAt(ctx, bytes.Repeat([]byte{0xEE}, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	copy(model, bytes.Repeat([]byte{0xEE}, 4096))
	if err := old.WriteAt(ctx, bytes.Repeat([]byte{0x99}, 4096), 4096, true); err == nil {
		t.Fatal("the fenced engine's write through its in-process replica succeeded")
	}
	r.healthyIdentical(v.ID, model)
}

// TestFrozenEngineLearnsOfTakeoverBeforeWriting: an engine frozen past its
// lease (as under SIGSTOP) while another node took over, whose own replica
// the new engine could not claim, must not write even that replica: the
// expired lease makes it ask the store first, which fences it.
func TestFrozenEngineLearnsOfTakeoverBeforeWriting(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("frz", 4*mib, 3, 0, "n1")
	old := r.openLocal(v.ID, "n1")
	ctx := r.ctx()
	if err := old.WriteAt(ctx, bytes.Repeat([]byte{1}, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	// n1's replica server becomes unreachable to others (its listener
	// closes); the old engine still reaches its replica in process.
	r.servers["n1"].lis.Close()
	r.attach(v.ID, "n2")
	fresh := r.open(v.ID, "n2") // ejects n1's replica: it cannot be claimed
	if err := fresh.WriteAt(ctx, bytes.Repeat([]byte{2}, 4096), 0, true); err != nil {
		t.Fatal(err)
	}
	var n1Replica meta.Replica
	for _, rep := range v.Replicas {
		if rep.Node == "n1" {
			n1Replica = rep
		}
	}
	rr, err := r.servers["n1"].srv.Get(n1Replica.ID)
	if err != nil {
		t.Fatal(err)
	}
	before := make([]byte, 8192)
	if err := rr.ReadAt(rr.Epoch(), before, 0); err != nil {
		t.Fatal(err)
	}
	old.confirmed.Store(0) // frozen for longer than the lease
	err = old.WriteAt(ctx, bytes.Repeat([]byte{9}, 4096), 4096, true)
	if !errors.Is(err, ErrFenced) {
		t.Fatalf("write of a frozen engine after a takeover: %v, want ErrFenced", err)
	}
	after := make([]byte, 8192)
	if err := rr.ReadAt(rr.Epoch(), after, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("the fenced engine changed its own node's replica")
	}
}

// TestEngineWakesOnStoreChange: a change of the volume in the store reaches
// the engine through the store's watch, long before its next periodic read
// (an hour here): the engine takes the new epoch at once.
func TestEngineWakesOnStoreChange(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("w", 4*mib, 3, 2, "n1")
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: time.Hour, WatchInterval: time.Hour, Lease: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	var other meta.Replica
	for _, rep := range v.Replicas {
		if rep.Node != "n1" {
			other = rep
		}
	}
	res, err := r.meta.Apply(r.ctx(), &meta.SetReplicaState{VolumeID: v.ID, ReplicaID: other.ID, State: meta.ReplicaStale, ExpectEpoch: e.Epoch()})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.Epoch() < res.Volume.Epoch {
		if time.Now().After(deadline) {
			t.Fatalf("engine at epoch %d 5 s after the store moved to %d", e.Epoch(), res.Volume.Epoch)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startWriter writes random 4 KiB blocks at random block offsets below
// span through e, recording each acknowledged one in model, until the
// returned stop is called; stop returns the first write error. model must
// not be read before stop returns.
func startWriter(e *Engine, model []byte, span, seed uint64) (stop func() error) {
	quit, werr := make(chan struct{}), make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(seed, 2))
		for {
			select {
			case <-quit:
				werr <- nil
				return
			default:
			}
			off := rng.Uint64N(span/4096) * 4096
			p := randomData(4096, rng.Uint64())
			if err := e.WriteAt(context.Background(), p, off, false); err != nil {
				werr <- err
				return
			}
			copy(model[off:], p)
		}
	}()
	return func() error {
		close(quit)
		return <-werr
	}
}
