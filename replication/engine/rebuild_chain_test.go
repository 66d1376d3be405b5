package engine

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// chainVolume writes the pattern the chain tests share through e: A over
// the whole volume, snapshot s1, B (a few ranges, unaligned ones and a
// trim among them), snapshot s2, C (more ranges). It returns the volume as
// s1, s2 and the head hold it.
func (r *rig) chainVolume(e *Engine, size uint64, seed uint64) (a, b []byte, c func() []byte, write func(off uint64, n int)) {
	r.t.Helper()
	ctx := r.ctx()
	model, write := r.modelWriter(e, size, seed)
	for off := uint64(0); off < size; off += mib {
		write(off, mib)
	}
	if err := e.Snapshot(ctx, "s1"); err != nil {
		r.t.Fatal(err)
	}
	a = bytes.Clone(model)
	write(1*mib+1000, 70<<10)
	write(6*mib, 4096)
	write(9*mib+512, 3*512)
	if err := e.Trim(ctx, 12*mib, mib); err != nil { // held by s2 as zeros
		r.t.Fatal(err)
	}
	clear(model[12*mib : 13*mib])
	if err := e.Snapshot(ctx, "s2"); err != nil {
		r.t.Fatal(err)
	}
	b = bytes.Clone(model)
	write(2*mib, 200<<10)
	write(6*mib+100, 10)
	write(13*mib-4096, 8192)
	return a, b, func() []byte { return model }, write
}

// replicaOn returns the replica of volume id on node, opened through its
// server.
func (r *rig) replicaOn(id, node string) (*replica.Replica, meta.Replica) {
	r.t.Helper()
	v, err := r.meta.Volume(r.ctx(), id)
	if err != nil {
		r.t.Fatal(err)
	}
	for _, rep := range v.Replicas {
		if rep.Node == node {
			rr, err := r.servers[node].srv.Get(rep.ID)
			if err != nil {
				r.t.Fatal(err)
			}
			return rr, rep
		}
	}
	r.t.Fatalf("volume %s has no replica on %s", id, node)
	return nil, meta.Replica{}
}

// expectSnapshots checks that replica rr alone holds exactly the
// snapshots ids, oldest first, and that ids[i] reads as want[i].
func expectSnapshots(t *testing.T, rr *replica.Replica, ids []string, want ...[]byte) {
	t.Helper()
	if got := rr.Snapshots(); !slices.Equal(got, ids) {
		t.Fatalf("replica %s holds snapshots %v, want %v", rr.ID(), got, ids)
	}
	for i, id := range ids {
		got := make([]byte, len(want[i]))
		if err := rr.ReadSnapshotAt(rr.Epoch(), id, got, 0); err != nil {
			t.Fatalf("replica %s: read snapshot %s: %v", rr.ID(), id, err)
		}
		if !bytes.Equal(got, want[i]) {
			t.Fatalf("replica %s holds another snapshot %s (first difference at %d)", rr.ID(), id, firstDiff(got, want[i]))
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// waitRebuilt waits for the rebuild of replica id.
func waitRebuilt(t testing.TB, rebuilt <-chan RebuildStats, id string) RebuildStats {
	t.Helper()
	deadline := time.After(90 * time.Second)
	for {
		select {
		case st := <-rebuilt:
			if st.ReplicaID == id {
				return st
			}
		case <-deadline:
			t.Fatalf("replica %s was not rebuilt within 90 s", id)
		}
	}
}

// replaceReplica replaces the (failed) replica of volume id on node with a
// new one, as the store's reconciler does for a node gone for good, and
// creates it, blank, where the store placed it (the node agent's job). It
// returns the new replica.
func (r *rig) replaceReplica(id, node string) meta.Replica {
	r.t.Helper()
	ctx := r.ctx()
	deadline := time.Now().Add(30 * time.Second)
	for {
		v, err := r.meta.Volume(ctx, id)
		if err != nil {
			r.t.Fatal(err)
		}
		var old meta.Replica
		for _, rep := range v.Replicas {
			if rep.Node == node {
				old = rep
			}
		}
		if old.ID == "" {
			r.t.Fatalf("volume %s has no replica on %s", id, node)
		}
		if old.State != meta.ReplicaHealthy {
			res, err := r.meta.Apply(ctx, &meta.ReplaceReplica{VolumeID: id, ReplicaID: old.ID, ExpectEpoch: v.Epoch})
			if err == nil {
				for _, rep := range res.Volume.Replicas {
					if !slices.ContainsFunc(v.Replicas, func(o meta.Replica) bool { return o.ID == rep.ID }) {
						if _, err := r.servers[rep.Node].srv.CreateWith(rep.ID, v.SizeBytes, replica.CreateOptions{Checksums: r.checksums}); err != nil {
							r.t.Fatal(err)
						}
						return rep
					}
				}
				r.t.Fatal("ReplaceReplica made no new replica")
			}
			if !errors.Is(err, meta.ErrEpochMismatch) {
				r.t.Fatal(err)
			}
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("replica %s on %s never became replaceable (%s)", old.ID, node, old.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRebuildCarriesChainToNewNode: a replica lost with its node is
// replaced by a blank one on another node; the rebuild gives it every
// snapshot, oldest first, with the contents each had, and then the head.
// The rebuilt replica alone then serves both snapshots and a restore.
func TestRebuildCarriesChainToNewNode(t *testing.T) {
	for _, sums := range []bool{true, false} {
		name := "checksums"
		if !sums {
			name = "no-checksums"
		}
		t.Run(name, func(t *testing.T) {
			r := newRig(t, 4)
			r.checksums = sums
			r.local = sums // the source in process once, over TCP once
			v := r.createVolume("chain", 16*mib, 3, 0, "n1")
			var lost string
			for _, rep := range v.Replicas {
				if rep.Node != "n1" {
					lost = rep.Node
				}
			}
			var live []string
			for _, n := range []string{"n1", "n2", "n3", "n4"} {
				if n != lost {
					live = append(live, n)
				}
			}
			r.heartbeat(live...)
			e, rebuilt := r.openWatching(v.ID)
			e.mu.RLock()
			inProcess := slices.ContainsFunc(e.members, func(m *member) bool { return m.inProcess() })
			e.mu.RUnlock()
			if r.local && !inProcess {
				t.Fatal("no replica on n1 to reach in process")
			}
			a, b, c, write := r.chainVolume(e, v.SizeBytes, 11)

			r.kill(lost) // the node and its disk are gone
			write(4*mib, 4096)
			fresh := r.replaceReplica(v.ID, lost)
			st := waitRebuilt(t, rebuilt, fresh.ID)
			t.Logf("rebuild onto %s: %+v", fresh.Node, st)
			if st.LayersCarried != 2 || st.LayerBytesCopied == 0 {
				t.Errorf("carried %d layers, %d bytes; want both snapshots", st.LayersCarried, st.LayerBytesCopied)
			}
			if want := 3 * v.SizeBytes; st.Passes != 1 || st.BytesTotal != want || st.BytesCompared != want {
				t.Errorf("rebuild compared %d of %d bytes in %d passes, want %d of %d in one (two layers and the head)",
					st.BytesCompared, st.BytesTotal, st.Passes, want, want)
			}
			rr, err := r.servers[fresh.Node].srv.Get(fresh.ID)
			if err != nil {
				t.Fatal(err)
			}
			expectSnapshots(t, rr, []string{"s1", "s2"}, a, b)
			head := make([]byte, v.SizeBytes)
			if err := rr.ReadAt(rr.Epoch(), head, 0); err != nil || !bytes.Equal(head, c()) {
				t.Fatalf("rebuilt replica's head differs from the volume (%v)", err)
			}
			// Restores work from the rebuilt replica alone.
			restored, err := r.servers[fresh.Node].srv.CreateFromSnapshot("restored", fresh.ID, "s1", 0)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, v.SizeBytes)
			if err := restored.ReadAt(restored.Epoch(), got, 0); err != nil || !bytes.Equal(got, a) {
				t.Fatalf("restore of s1 from the rebuilt replica differs (%v)", err)
			}
			r.healthyIdentical(v.ID, c())
			// The rebuilt replica's layers equal the source's, extent by
			// extent (the held blocks and the zeroed ones included).
			src, _ := r.replicaOn(v.ID, "n1")
			for _, id := range []string{"s1", "s2"} {
				want, err := src.LayerSums(src.Epoch(), id, 0, rr.Extents())
				if err != nil {
					t.Fatal(err)
				}
				got, err := rr.LayerSums(rr.Epoch(), id, 0, rr.Extents())
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, want) {
					t.Fatalf("layer %s of the rebuilt replica differs from the source's", id)
				}
			}
		})
	}
}

// chainRig is a rig of three nodes, heard from, with a checksummed 16 MiB
// volume attached to n1, for the tests of a replica (n3's) that returns.
func chainRig(t *testing.T, name string) (*rig, *meta.Volume) {
	t.Helper()
	r := newRig(t, 3)
	r.checksums = true
	r.patient = true // the outages below must be the only ones
	r.heartbeat("n1", "n2", "n3")
	return r, r.createVolume(name, 16*mib, 3, 0, "n1")
}

// TestDeltaRebuildCopiesNoLayer: a replica away for a moment already holds
// every snapshot: its delta rebuild compares them (by cached sums) and
// copies nothing into them, only what changed in the head.
func TestDeltaRebuildCopiesNoLayer(t *testing.T) {
	r, v := chainRig(t, "delta")
	e, rebuilt := r.openWatching(v.ID)
	a, b, c, write := r.chainVolume(e, v.SizeBytes, 12)
	st, rr := r.outage(v.ID, "n3", rebuilt, func() { write(5*mib, 64<<10) })
	t.Logf("delta rebuild: %+v", st)
	if st.LayerBytesCopied != 0 || st.LayersCarried != 0 || st.LayersDropped != 0 {
		t.Errorf("delta rebuild copied %d bytes into %d layers (dropped %d); want none", st.LayerBytesCopied, st.LayersCarried, st.LayersDropped)
	}
	if st.BytesCopied == 0 || st.BytesCopied > 2*4*mib {
		t.Errorf("copied %d bytes; want the changed extent of the head only", st.BytesCopied)
	}
	if want := 3 * v.SizeBytes; st.Passes != 1 || st.BytesTotal != want || st.BytesCompared != want {
		t.Errorf("compared %d of %d bytes in %d passes, want %d of %d in one (two layers and the head)",
			st.BytesCompared, st.BytesTotal, st.Passes, want, want)
	}
	expectSnapshots(t, rr, []string{"s1", "s2"}, a, b)
	r.healthyIdentical(v.ID, c())
}

// TestRebuildReplacesCorruptLayer: a returning replica whose oldest
// snapshot layer was damaged while it was away (a bit flipped on its disk,
// in a block only that layer holds) gets the layer built again, and the
// head's view of the block copied; the layer above it stays as it was.
func TestRebuildReplacesCorruptLayer(t *testing.T) {
	r, v := chainRig(t, "rot")
	e, rebuilt := r.openWatching(v.ID)
	a, b, c, write := r.chainVolume(e, v.SizeBytes, 16)
	_, rep := r.replicaOn(v.ID, "n3")
	st, rr := r.outage(v.ID, "n3", rebuilt, func() {
		write(5*mib, 4096)
		r.flipBit(rep, 14*mib+100) // the file the replica was created with: s1
	})
	t.Logf("rebuild: %+v", st)
	if st.LayersCarried != 1 || st.LayerBytesCopied < 16*mib {
		t.Errorf("carried %d layers (%d bytes); want s1 again, whole", st.LayersCarried, st.LayerBytesCopied)
	}
	expectSnapshots(t, rr, []string{"s1", "s2"}, a, b)
	r.healthyIdentical(v.ID, c())
}

// TestRebuildAvoidsCorruptSource: when a block of the source's oldest
// layer fails its checksums (a block no newer layer holds), the rebuild
// takes its layers from another healthy replica instead of failing.
func TestRebuildAvoidsCorruptSource(t *testing.T) {
	r, v := chainRig(t, "badsrc")
	e, rebuilt := r.openWatching(v.ID)
	a, b, c, write := r.chainVolume(e, v.SizeBytes, 17)
	e.mu.RLock()
	src := e.source().replica
	e.mu.RUnlock()
	if src.Node == "n3" {
		t.Fatal("the engine's source is the replica meant to return")
	}
	st, rr := r.outage(v.ID, "n3", rebuilt, func() {
		write(5*mib, 4096)
		r.flipBit(src, 14*mib+100) // the file the source was created with: s1
	})
	t.Logf("rebuild: %+v", st)
	if st.Passes < 2 || st.LayerBytesCopied != 0 {
		t.Errorf("rebuild ran %d passes and copied %d layer bytes; want a second pass from another source, nothing copied", st.Passes, st.LayerBytesCopied)
	}
	expectSnapshots(t, rr, []string{"s1", "s2"}, a, b)
	got := r.contents(v, meta.Replica{ID: rr.ID(), Node: "n3"})
	if !bytes.Equal(got, c()) {
		t.Fatal("the rebuilt replica's head differs from the volume")
	}
}

// deleteSnapshot deletes snapshot id through e as its callers do: a
// deletion that an epoch change fenced midway (an ejection, the store's
// reconciler bringing a replica back) is retried (see DeleteSnapshot).
func deleteSnapshot(e *Engine, id string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := e.DeleteSnapshot(context.Background(), id)
		if !errors.Is(err, replica.ErrFenced) && !errors.Is(err, replica.ErrNotClaimed) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// outage stops node's replica server, runs during (the volume changes
// meanwhile), starts the server again on its data and returns the rebuild
// of its replica, and the replica.
func (r *rig) outage(id, node string, rebuilt <-chan RebuildStats, during func()) (RebuildStats, *replica.Replica) {
	r.t.Helper()
	v, err := r.meta.Volume(r.ctx(), id)
	if err != nil {
		r.t.Fatal(err)
	}
	if n := v.HealthyReplicas(); n != len(v.Replicas) {
		// The rebuild this test watches would then start from a replica
		// that missed more than the outage.
		r.t.Fatalf("before the outage of %s: %d of %d replicas healthy, want all", node, n, len(v.Replicas))
	}
	s := r.servers[node]
	r.kill(node)
	during()
	r.startServer(node, s.dir, s.addr)
	_, rep := r.replicaOn(id, node)
	st := waitRebuilt(r.t, rebuilt, rep.ID)
	rr, _ := r.replicaOn(id, node)
	return st, rr
}

// TestRebuildDropsDeletedSnapshot: a snapshot deleted while a replica was
// away is gone from it after its rebuild, merged as the source merged it
// (so the layer above it is equal at once, nothing copied), and the
// snapshot above reads as before.
func TestRebuildDropsDeletedSnapshot(t *testing.T) {
	r, v := chainRig(t, "drop")
	e, rebuilt := r.openWatching(v.ID)
	_, b, c, write := r.chainVolume(e, v.SizeBytes, 13)
	st, rr := r.outage(v.ID, "n3", rebuilt, func() {
		write(7*mib, 4096)
		if err := deleteSnapshot(e, "s1"); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("rebuild: %+v", st)
	if st.LayersDropped != 1 || st.LayersCarried != 0 || st.LayerBytesCopied != 0 {
		t.Errorf("rebuild dropped %d layers, carried %d (%d bytes); want s1 dropped, nothing copied", st.LayersDropped, st.LayersCarried, st.LayerBytesCopied)
	}
	expectSnapshots(t, rr, []string{"s2"}, b)
	r.healthyIdentical(v.ID, c())
}

// layerCrashConn is a connection to a rebuild target that calls crash
// once, after the given number of layer extents went through it.
type layerCrashConn struct {
	replicaConn
	after  int32
	writes atomic.Int32
	once   sync.Once
	crash  func()
}

func (c *layerCrashConn) WriteLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, enc []byte) error {
	err := c.replicaConn.WriteLayerExtent(ctx, epoch, id, x, enc)
	if c.writes.Add(1) == c.after {
		c.once.Do(c.crash)
	}
	return err
}

// copyDir copies the files of src into dst: the files as a crash would
// leave them (the page cache is what a reader sees). It runs on the
// engine's goroutine, so it reports errors without stopping it.
func copyDir(t *testing.T, src, dst string) {
	t.Helper()
	if err := os.MkdirAll(dst, 0o750); err != nil {
		t.Error(err)
		return
	}
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Error(err)
		return
	}
	for _, e := range ents {
		if e.IsDir() {
			continue
		}
		in, err := os.Open(filepath.Join(src, e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // a temporary file renamed meanwhile: the crash did not see it
		}
		if err != nil {
			t.Error(err)
			return
		}
		out, err := os.Create(filepath.Join(dst, e.Name()))
		if err == nil {
			_, err = io.Copy(out, in)
		}
		_ = in.Close()
		if err == nil {
			err = out.Close()
		}
		if err != nil {
			t.Error(err)
			return
		}
	}
}

// TestLayerBuildCrash: the node of a replacement replica dies while a
// layer is half copied to it. The replica as that crash leaves it opens
// without the half layer (no snapshot of that id, its files gone); the
// node restarted, the rebuild runs again and completes.
func TestLayerBuildCrash(t *testing.T) {
	r := newRig(t, 4)
	r.checksums = true
	v := r.createVolume("crash", 16*mib, 3, 0, "n1")
	var lost, spare string
	for _, n := range []string{"n1", "n2", "n3", "n4"} {
		switch {
		case !slices.ContainsFunc(v.Replicas, func(rep meta.Replica) bool { return rep.Node == n }):
			spare = n
		case n != "n1":
			lost = n
		}
	}
	var live []string
	for _, n := range []string{"n1", "n2", "n3", "n4"} {
		if n != lost {
			live = append(live, n)
		}
	}
	r.heartbeat(live...)
	image := t.TempDir()
	var crashing, crashed atomic.Bool
	rebuilt := make(chan RebuildStats, 4)
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond, OnRebuilt: func(s RebuildStats) { rebuilt <- s },
		wrapConn: func(rep meta.Replica, c replicaConn) replicaConn {
			if rep.Node != spare || crashing.Load() {
				return c
			}
			return &layerCrashConn{replicaConn: c, after: 2, crash: func() {
				if crashing.Swap(true) {
					return
				}
				copyDir(t, filepath.Join(r.servers[spare].dir, rep.ID), filepath.Join(image, rep.ID))
				r.kill(spare)
				crashed.Store(true)
			}}
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	a, b, c, write := r.chainVolume(e, v.SizeBytes, 14)

	r.kill(lost)
	write(3*mib, 4096)
	rep := r.replaceReplica(v.ID, lost)
	deadline := time.Now().Add(60 * time.Second)
	for !crashed.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the rebuild never got to the crash")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The crash image: the half layer's files are there, but no record
	// lists them.
	before, err := os.ReadDir(filepath.Join(image, rep.ID))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(before, func(e os.DirEntry) bool { return filepath.Ext(e.Name()) == ".map" }) {
		t.Fatalf("the crash image holds no layer under construction: %v", before)
	}
	img, err := replica.Open(image, rep.ID, 0, 0)
	if err != nil {
		ents, _ := os.ReadDir(filepath.Join(image, rep.ID))
		t.Fatalf("open the replica as the crash left it: %v (files %v)", err, ents)
	}
	if got := img.Snapshots(); len(got) != 0 {
		t.Errorf("after a crash mid-layer the replica lists snapshots %v, want none", got)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(image, rep.ID))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ent := range ents {
		names = append(names, ent.Name())
		if filepath.Ext(ent.Name()) == ".map" {
			t.Errorf("the half layer's files are left after reopening: %s", ent.Name())
		}
	}
	t.Logf("the crash image after reopening: %v", names)
	// The node comes back; the rebuild runs again and completes.
	r.startServer(spare, r.servers[spare].dir, r.servers[spare].addr)
	st := waitRebuilt(t, rebuilt, rep.ID)
	t.Logf("rebuild after the crash: %+v", st)
	rr, err := r.servers[spare].srv.Get(rep.ID)
	if err != nil {
		t.Fatal(err)
	}
	expectSnapshots(t, rr, []string{"s1", "s2"}, a, b)
	r.healthyIdentical(v.ID, c())
}

// midRebuild is a connection to a rebuild target that, at the first
// extent checksum of the head's compare (the layers are carried by then),
// starts act: a snapshot or a deletion, which go to the healthy replicas
// only.
type midRebuild struct {
	replicaConn
	once sync.Once
	act  func()
}

func (c *midRebuild) Checksums(ctx context.Context, epoch, first, count uint64) ([]uint32, error) {
	c.once.Do(func() { go c.act() }) // a snapshot waits for this compare's lock
	return c.replicaConn.Checksums(ctx, epoch, first, count)
}

// TestSnapshotChangesDuringRebuild: a snapshot taken, or one deleted,
// while a replica is rebuilt (after its layers were carried) reaches it
// anyway: the rebuild sees the chains differ (or a deletion running)
// before it ends and runs again, carrying the new layer or dropping the
// deleted one.
func TestSnapshotChangesDuringRebuild(t *testing.T) {
	for _, tc := range []struct {
		name    string
		act     func(e *Engine) error
		carried int
		dropped int
	}{
		{"snapshot", func(e *Engine) error { return e.Snapshot(context.Background(), "s3") }, 1, 0},
		{"delete", func(e *Engine) error { return deleteSnapshot(e, "s1") }, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, v := chainRig(t, "mid")
			var target meta.Replica
			for _, rep := range v.Replicas {
				if rep.Node == "n3" {
					target = rep
				}
			}
			var e *Engine
			acted := make(chan error, 1)
			rebuilt := make(chan RebuildStats, 4)
			e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
				CleanInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond, OnRebuilt: func(s RebuildStats) { rebuilt <- s },
				wrapConn: func(rep meta.Replica, c replicaConn) replicaConn {
					if rep.ID != target.ID || rep.State != meta.ReplicaRebuilding {
						return c
					}
					return &midRebuild{replicaConn: c, act: func() { acted <- tc.act(e) }}
				}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = e.Close(context.Background()) })
			a, b, c, write := r.chainVolume(e, v.SizeBytes, 15)
			st, rr := r.outage(v.ID, "n3", rebuilt, func() { write(6*mib, 8192) })
			t.Logf("rebuild: %+v", st)
			if err := <-acted; err != nil {
				t.Fatalf("the %s during the rebuild: %v", tc.name, err)
			}
			if st.Passes < 2 || st.LayersCarried != tc.carried || st.LayersDropped != tc.dropped {
				t.Errorf("rebuild ran %d passes, carried %d layers, dropped %d; want a second pass carrying %d, dropping %d",
					st.Passes, st.LayersCarried, st.LayersDropped, tc.carried, tc.dropped)
			}
			if tc.name == "snapshot" {
				expectSnapshots(t, rr, []string{"s1", "s2", "s3"}, a, b, c())
			} else {
				expectSnapshots(t, rr, []string{"s2"}, b)
			}
			r.healthyIdentical(v.ID, c())
		})
	}
}
