package csie2e

import (
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cairn-csi/cairn/replication/layer"
	"github.com/cairn-csi/cairn/replication/meta"
)

// chainOf reads the layer ids of the chain record in a replica directory
// (the head's, empty, included).
func chainOf(t *testing.T, dir string) []string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "chain"))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct{ Layers []layer.Entry }
	if err := json.Unmarshal(raw, &rec); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range rec.Layers {
		ids = append(ids, e.ID)
	}
	return ids
}

// waitFor polls cond every 200 ms until it holds, failing after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestFlattenPastSoftLimit: with a chain soft limit of 3, a volume
// restored from the second snapshot of another shares both of its layers
// (chain s1, s2, head: at the limit, kept). Its own first snapshot takes
// it past the limit, and every node flattens its replica in the
// background: s1 and s2 become one layer of the replica's own, the
// volume and its snapshot read as before (through ext4, while mounted),
// the store and cairn ctl show the new depth, and the source, no longer
// sharing s2, can delete s1 (its merge into s2 was refused while s2 was
// shared).
func TestFlattenPastSoftLimit(t *testing.T) {
	c := startClusterOf(t, 3, "--chain-soft-limit=3")
	src, err := c.createFrom("flat-src", 64<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := src.GetVolumeId()
	staging, target := c.attach(id, "node-1")
	atS2 := map[string][32]byte{}
	writeFiles(t, target, "one", 6, 21, atS2)
	syncFS(t, target)
	s1 := c.snapshot("flat-s1", id)
	writeFiles(t, target, "two", 6, 22, atS2)
	syncFS(t, target)
	s2 := c.snapshot("flat-s2", id)
	c.detach(id, "node-1", staging, target)

	restored, err := c.createFrom("flat-restored", 64<<20, fromSnapshot(s2.GetSnapshotId()))
	if err != nil {
		t.Fatal(err)
	}
	rid := restored.GetVolumeId()
	rStaging, rTarget := c.attach(rid, "node-2")
	checkExactly(t, rTarget, atS2)
	for _, d := range c.replicaDirs(rid) {
		if got, want := chainOf(t, d), []string{s1.GetSnapshotId(), s2.GetSnapshotId(), ""}; !slices.Equal(got, want) {
			t.Fatalf("%s: the restored replica's chain is %q, want %q (shared, at the soft limit: not flattened)", d, got, want)
		}
	}
	// The source cannot merge s1 into s2 while the restore shares s2.
	if _, err := c.controller.DeleteSnapshot(ctx(t), &csipb.DeleteSnapshotRequest{SnapshotId: s1.GetSnapshotId()}); err != nil {
		t.Fatal(err)
	}

	atOwn := maps.Clone(atS2)
	writeFiles(t, rTarget, "three", 4, 23, atOwn)
	syncFS(t, rTarget)
	own := c.snapshot("flat-own", rid)
	flat := []string{s2.GetSnapshotId(), own.GetSnapshotId(), ""}
	waitFor(t, 60*time.Second, "every replica of the restore flattened", func() bool {
		for _, d := range c.replicaDirs(rid) {
			if !slices.Equal(chainOf(t, d), flat) {
				return false
			}
		}
		return true
	})
	var flattened float64
	for _, addr := range c.metrics {
		flattened += metricSum(t, addr, "cairn_storage_flattens_total", "")
	}
	if flattened != 3 {
		t.Fatalf("cairn_storage_flattens_total sums to %v over the nodes, want 3", flattened)
	}
	// Read through the mounted file system, after dropping its caches,
	// and through a restore of the volume's own snapshot; then write on.
	syncFS(t, rTarget)
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
	checkExactly(t, rTarget, atOwn)
	now := maps.Clone(atOwn)
	writeFiles(t, rTarget, "four", 3, 24, now)
	syncFS(t, rTarget)
	checkExactly(t, rTarget, now)
	back, err := c.createFrom("flat-own-restored", 64<<20, fromSnapshot(own.GetSnapshotId()))
	if err != nil {
		t.Fatal(err)
	}
	bStaging, bTarget := c.attach(back.GetVolumeId(), "node-3")
	checkExactly(t, bTarget, atOwn)
	c.detach(back.GetVolumeId(), "node-3", bStaging, bTarget)

	// The store and cairn ctl show the depth.
	waitFor(t, 40*time.Second, "the store has the flattened depth", func() bool {
		u := c.volumeJSON(rid).Usage
		return u != nil && u.Depth == 3 && u.Flatten == nil
	})
	if out := cairn(t, "ctl", "--server", c.agents, "volume", "get", rid); !strings.Contains(out, "chain:        3 layers") {
		t.Fatalf("cairn ctl volume get does not show the chain's depth:\n%s", out)
	}

	// s1 is merged away on the source's replicas now that s2 is its own.
	waitFor(t, 60*time.Second, "the source's replicas dropped s1", func() bool {
		for _, d := range c.replicaDirs(id) {
			if slices.Contains(chainOf(t, d), s1.GetSnapshotId()) {
				return false
			}
		}
		return true
	})
	c.detach(rid, "node-2", rStaging, rTarget)
}

// TestRestoreElsewhereIsFlattened: a one-replica volume with two
// snapshots is restored into three replicas. The one on the source's node
// shares the two layers by hard link and keeps them apart; the two placed
// on the other nodes receive the layers through the rebuild and, sharing
// them with nothing, flatten them into one. The data reads the same
// through ext4 on a node of each kind.
func TestRestoreElsewhereIsFlattened(t *testing.T) {
	c := startCluster(t)
	resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "one-src", CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: map[string]string{"replicas": "1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	holder := c.volumeJSON(id).Replicas[0].Node
	staging, target := c.attach(id, holder)
	atB := map[string][32]byte{}
	writeFiles(t, target, "a", 6, 41, atB)
	syncFS(t, target)
	a := c.snapshot("one-a", id)
	writeFiles(t, target, "a", 3, 42, atB) // written over: the older copies stay in a's layer
	syncFS(t, target)
	b := c.snapshot("one-b", id)
	c.detach(id, holder, staging, target)

	restored, err := c.createFrom("one-restored", 64<<20, fromSnapshot(b.GetSnapshotId()))
	if err != nil {
		t.Fatal(err)
	}
	rid := restored.GetVolumeId()
	waitFor(t, 90*time.Second, "the restore's replicas on the other nodes rebuilt and flattened", func() bool {
		v := c.volumeJSON(rid)
		for _, r := range v.Replicas {
			if r.State != meta.ReplicaHealthy {
				return false
			}
			want := []string{b.GetSnapshotId(), ""} // flattened
			if r.Node == holder {
				want = []string{a.GetSnapshotId(), b.GetSnapshotId(), ""}
			}
			if !slices.Equal(chainOf(t, filepath.Join(c.dir, r.Node, "data", "replicas", r.ID)), want) {
				return false
			}
		}
		return len(v.Replicas) == 3
	})
	for _, r := range c.volumeJSON(rid).Replicas {
		if r.Node == holder {
			continue
		}
		rStaging, rTarget := c.attach(rid, r.Node)
		checkExactly(t, rTarget, atB)
		c.detach(rid, r.Node, rStaging, rTarget)
		break
	}
	rStaging, rTarget := c.attach(rid, holder)
	checkExactly(t, rTarget, atB)
	c.detach(rid, holder, rStaging, rTarget)
}
