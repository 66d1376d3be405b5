package storagenode

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/replication/testrig"
)

func TestDecide(t *testing.T) {
	const g, h = "gen-g", "gen-h"
	healthy, rebuilding, failed, stale := meta.ReplicaHealthy, meta.ReplicaRebuilding, meta.ReplicaFailed, meta.ReplicaStale
	for _, tc := range []struct {
		state    meta.ReplicaState
		recorded string
		present  bool
		onDisk   string
		want     replicaAction
	}{
		// Missing on disk.
		{healthy, "", false, "", actCreate},    // a new volume
		{healthy, g, false, "", actFail},       // its data is gone: never made blank
		{rebuilding, "", false, "", actCreate}, // a replacement's first copy
		{rebuilding, g, false, "", actCreate},  // made blank, then rebuilt
		{failed, "", false, "", actWait},
		{failed, g, false, "", actWait},
		{stale, g, false, "", actWait},
		// On disk.
		{healthy, g, true, g, actNone},
		{healthy, "", true, g, actRecord},
		{healthy, h, true, g, actFail}, // another copy under the same id
		{rebuilding, "", true, g, actRecord},
		{rebuilding, h, true, g, actRecord},
		{rebuilding, g, true, g, actNone},
		{failed, g, true, g, actNone},
		{failed, h, true, g, actWait},
		{failed, "", true, g, actWait},
		{stale, h, true, g, actWait},
		// A replica server that predates generations reports none.
		{healthy, g, true, "", actNone},
		{healthy, "", true, "", actNone},
	} {
		name := fmt.Sprintf("%s/recorded=%q/present=%v/on_disk=%q", tc.state, tc.recorded, tc.present, tc.onDisk)
		if got := decide(tc.state, tc.recorded, tc.present, tc.onDisk); got != tc.want {
			t.Errorf("%s: %v, want %v", name, got, tc.want)
		}
	}
}

// storeRig is one store member and the storage nodes of this test.
type storeRig struct {
	t     *testing.T
	log   *zap.Logger
	agent *meta.Agent
	meta  *meta.Client
	nodes map[string]*Node
	// engines are the nodes' engine registries, closed after their nodes.
	engines map[string]*attach.Registry
	dirs    map[string]string
	addrs   map[string]string
}

func newStoreRig(t *testing.T) *storeRig {
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	agent, c := testrig.StartStore(t, log)
	r := &storeRig{t: t, log: log, agent: agent, meta: c, nodes: map[string]*Node{}, engines: map[string]*attach.Registry{}, dirs: map[string]string{}, addrs: map[string]string{}}
	t.Cleanup(func() {
		for id, n := range r.nodes {
			_ = n.Close()
			_ = r.engines[id].Close()
		}
	})
	return r
}

func (r *storeRig) ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	r.t.Cleanup(cancel)
	return ctx
}

// start starts storage node id (again, on the address and data dir it had)
// and registers it in the store.
func (r *storeRig) start(id string) {
	r.t.Helper()
	if _, ok := r.dirs[id]; !ok {
		r.dirs[id] = filepath.Join(r.t.TempDir(), id)
		r.addrs[id] = "127.0.0.1:0"
	}
	n, err := New(Config{NodeID: id, DataDir: r.dirs[id], Listen: r.addrs[id], FSM: r.agent.Store().FSM(), Meta: r.meta, Logger: r.log})
	if err != nil {
		r.t.Fatal(err)
	}
	engines := attach.New(attach.Config{NodeID: id, Meta: r.meta, Logger: r.log, Local: n.Server()})
	n.Start(engines)
	r.nodes[id], r.engines[id], r.addrs[id] = n, engines, n.Addr()
	if _, err := r.meta.Apply(r.ctx(), &meta.RegisterNode{Node: meta.Node{
		ID: id, RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:1", DataAddr: n.Addr(), CapacityBytes: 10 << 30, FreeBytes: 10 << 30,
	}}); err != nil {
		r.t.Fatal(err)
	}
}

func (r *storeRig) stop(id string) {
	r.t.Helper()
	if err := r.nodes[id].Close(); err != nil {
		r.t.Fatal(err)
	}
	if err := r.engines[id].Close(); err != nil {
		r.t.Fatal(err)
	}
	delete(r.nodes, id)
	delete(r.engines, id)
}

// waitReplica polls replica rid of volume vid until ok accepts it.
func (r *storeRig) waitReplica(vid, rid, what string, ok func(meta.Replica) bool) meta.Replica {
	r.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last meta.Replica
	for time.Now().Before(deadline) {
		v, err := r.meta.Volume(r.ctx(), vid)
		if err != nil {
			r.t.Fatal(err)
		}
		for _, rep := range v.Replicas {
			if rep.ID == rid {
				last = rep
			}
		}
		if ok(last) {
			return last
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.t.Fatalf("replica %s: %s: not within 20s (last %+v)", rid, what, last)
	return last
}

// onDisk returns the generation of replica rid on node's disk, or "" when
// the node does not hold it.
func (r *storeRig) onDisk(node, rid string) string {
	r.t.Helper()
	rr, err := r.nodes[node].Server().Get(rid)
	if errors.Is(err, replica.ErrNotFound) {
		return ""
	}
	if err != nil {
		r.t.Fatal(err)
	}
	return rr.Generation()
}

// TestRealizerNeverRecreatesALostReplica runs the realizer of two storage
// nodes against a real store. A new volume's replicas are created and their
// generations recorded. Then n1 stops, its replica's directory is deleted,
// and n1 starts again.
// Invariants: n1 does not make a blank copy of a replica the store trusts
// with data; it marks it failed. Once the replica rebuilds, n1 makes a blank
// copy with a new generation and records it. (The volume is attached, to a
// node with no engine in this test, so that no maintenance rebuild runs: the
// rebuild itself is the engine's, tested there.)
func TestRealizerNeverRecreatesALostReplica(t *testing.T) {
	r := newStoreRig(t)
	r.start("n1")
	r.start("n2")
	res, err := r.meta.Apply(r.ctx(), &meta.CreateVolume{ID: "vol-a", Name: "a", SizeBytes: 8 << 20, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	var rid string
	for _, rep := range res.Volume.Replicas {
		if rep.Node == "n1" {
			rid = rep.ID
		}
	}
	for _, rep := range res.Volume.Replicas {
		rec := r.waitReplica("vol-a", rep.ID, "created and its generation recorded", func(x meta.Replica) bool {
			return x.Generation != "" && r.onDisk(x.Node, x.ID) == x.Generation
		})
		if rec.State != meta.ReplicaHealthy {
			t.Fatalf("new replica %+v is not healthy", rec)
		}
	}
	lostGen := r.waitReplica("vol-a", rid, "recorded", func(x meta.Replica) bool { return x.Generation != "" }).Generation

	r.stop("n1")
	if err := os.RemoveAll(filepath.Join(r.dirs["n1"], "replicas", rid)); err != nil {
		t.Fatal(err)
	}
	r.start("n1")
	r.waitReplica("vol-a", rid, "marked failed", func(x meta.Replica) bool { return x.State == meta.ReplicaFailed })
	// Several passes of the realizer later, there is still no blank copy.
	time.Sleep(500 * time.Millisecond)
	if g := r.onDisk("n1", rid); g != "" {
		t.Fatalf("n1 made a copy (generation %q) of replica %s, which the store trusts with data it lost", g, rid)
	}

	v, err := r.meta.Attach(r.ctx(), "vol-a", "n2", false, "")
	if err != nil {
		t.Fatal(err)
	}
	// What the leader's reconciler does once n1 heartbeats again.
	if _, err := r.meta.Apply(r.ctx(), &meta.SetReplicaState{VolumeID: "vol-a", ReplicaID: rid, State: meta.ReplicaRebuilding, ExpectEpoch: v.Epoch}); err != nil {
		t.Fatal(err)
	}
	rec := r.waitReplica("vol-a", rid, "made again and its new generation recorded", func(x meta.Replica) bool {
		return x.Generation != lostGen && x.Generation == r.onDisk("n1", rid)
	})
	if rec.State != meta.ReplicaRebuilding || rec.Generation == "" {
		t.Fatalf("replica %+v: want rebuilding with the new copy's generation", rec)
	}
}
