package engine

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
)

func TestVerdictOf(t *testing.T) {
	const g, h = "gen-g", "gen-h"
	for _, tc := range []struct {
		state            meta.ReplicaState
		stored, reported string
		want             identityVerdict
		why              string
	}{
		{meta.ReplicaHealthy, "", "", identityOK, "a server older than generations: nothing to compare"},
		{meta.ReplicaHealthy, "", g, identityRecord, "first sight of the copy"},
		{meta.ReplicaHealthy, g, g, identityOK, "the copy the store trusts"},
		{meta.ReplicaHealthy, g, h, identityLost, "another copy under the same id"},
		{meta.ReplicaHealthy, g, "", identityLost, "a copy that cannot say which it is"},
		{meta.ReplicaRebuilding, "", "", identityOK, "nothing to record"},
		{meta.ReplicaRebuilding, g, "", identityOK, "nothing to record"},
		{meta.ReplicaRebuilding, "", g, identityRecord, "a new replica's first copy"},
		{meta.ReplicaRebuilding, g, g, identityOK, "the copy being rebuilt"},
		{meta.ReplicaRebuilding, g, h, identityRecord, "a new blank copy: the rebuild compares every extent"},
	} {
		if got := verdictOf(tc.state, tc.stored, tc.reported); got != tc.want {
			t.Errorf("%s, store %q, server %q: verdict %d, want %d (%s)", tc.state, tc.stored, tc.reported, got, tc.want, tc.why)
		}
	}
}

// TestEngineRecordsGenerations: the first engine of a volume records the
// generation of every healthy replica's copy before it serves I/O.
func TestEngineRecordsGenerations(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("gen", 4*mib, 3, 0, "n1")
	for _, rep := range v.Replicas {
		if rep.Generation != "" {
			t.Fatalf("replica %s has generation %q before any engine ran", rep.ID, rep.Generation)
		}
	}
	r.open(v.ID, "n1")
	after, err := r.meta.Volume(r.ctx(), v.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, rep := range after.Replicas {
		rr, err := r.servers[rep.Node].srv.Get(rep.ID)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Generation == "" || rep.Generation != rr.Generation() {
			t.Errorf("replica %s: store records generation %q, its copy has %q", rep.ID, rep.Generation, rr.Generation())
		}
	}
	if after.Epoch != v.Epoch {
		t.Errorf("recording generations moved the epoch %d → %d", v.Epoch, after.Epoch)
	}
}

// TestReplicaRecreatedEmptyIsNeverTrusted: n2 loses its replica's directory
// while the replicas hold data not yet past a clean point (dirty), and an
// empty replica is made again under the same id (what the node agent did
// before generations). The volume is then taken over on n2, whose engine
// reaches that empty copy in process: the copy it would read from first and
// resync the dirty extents from.
// Invariants: the empty copy is ejected before any I/O; reads return the
// data; the healthy replicas hold it; once n2 is back up, the replica is
// rebuilt, its new copy's generation recorded, and it ends healthy.
func TestReplicaRecreatedEmptyIsNeverTrusted(t *testing.T) {
	r := newRig(t, 3)
	v := r.createVolume("lost", 16*mib, 3, 0, "n1")
	first := r.open(v.ID, "n1")
	ctx := r.ctx()
	model := make([]byte, v.SizeBytes)
	for i := range model {
		model[i] = byte(i/4096 + 1)
	}
	for off := uint64(0); off < v.SizeBytes; off += 256 << 10 {
		if err := first.WriteAt(ctx, model[off:off+256<<10], off, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := first.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	var lost meta.Replica
	for _, rep := range v.Replicas {
		if rep.Node == "n2" {
			lost = rep
		}
	}
	n2 := r.servers["n2"]
	r.kill("n2")
	if err := os.RemoveAll(filepath.Join(n2.dir, lost.ID)); err != nil {
		t.Fatal(err)
	}
	s := r.startServer("n2", n2.dir, n2.addr)
	blank, err := s.srv.Create(lost.ID, v.SizeBytes)
	if err != nil {
		t.Fatal(err)
	}

	r.attach(v.ID, "n2")
	rebuilt := make(chan RebuildStats, 4)
	e, err := Open(ctx, Config{VolumeID: v.ID, NodeID: "n2", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: time.Hour, WatchInterval: 100 * time.Millisecond, Local: s.srv,
		OnRebuilt: func(st RebuildStats) { rebuilt <- st }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	got := make([]byte, v.SizeBytes)
	if err := e.ReadAt(ctx, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the engine on n2 read the empty copy made after n2 lost its replica")
	}
	after := r.healthyIdentical(v.ID, model)
	for _, rep := range after.Replicas {
		if rep.ID == lost.ID && rep.State == meta.ReplicaHealthy {
			t.Fatalf("the empty copy's replica is still healthy: %+v", after.Replicas)
		}
	}

	// n2 is back: the leader's reconciler puts its replica to rebuilding,
	// and the engine rebuilds it from a replica that holds the data.
	// (Another replica may be rebuilt too, if a slow request ejected it.)
	r.heartbeat("n1", "n2", "n3")
	timeout := time.After(30 * time.Second)
	for done := false; !done; {
		select {
		case st := <-rebuilt:
			if st.ReplicaID != lost.ID {
				continue
			}
			if st.BytesCopied != v.SizeBytes {
				t.Fatalf("rebuild %+v: want all %d bytes copied into the empty copy", st, v.SizeBytes)
			}
			done = true
		case <-timeout:
			t.Fatalf("no rebuild of %s finished within 30s", lost.ID)
		}
	}
	final := r.healthyIdentical(v.ID, model)
	for _, rep := range final.Replicas {
		if rep.ID != lost.ID {
			continue
		}
		if rep.State != meta.ReplicaHealthy || rep.Generation != blank.Generation() {
			t.Fatalf("rebuilt replica %+v: want healthy with its new copy's generation %q", rep, blank.Generation())
		}
	}
}
