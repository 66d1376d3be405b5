package csie2e

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/internal/testfs"
	"github.com/cairn-csi/cairn/replication/meta"
)

// The snapshot services on a real 3-node cluster (docs/snapshots.md): the
// data a snapshot, a restore and a clone hold, read through ext4 on
// another node, and deletion in every order with the space coming back.

// syncFS makes everything written under dir durable (the file system's
// journal included): what a snapshot then holds is what the files hold.
func syncFS(t *testing.T, dir string) {
	t.Helper()
	testfs.Sync(t, dir)
}

func (c *cluster) snapshot(name, vol string) *csipb.Snapshot {
	c.t.Helper()
	start := time.Now()
	resp, err := c.controller.CreateSnapshot(ctx(c.t), &csipb.CreateSnapshotRequest{Name: name, SourceVolumeId: vol})
	if err != nil {
		c.t.Fatalf("CreateSnapshot %s of %s: %v", name, vol, err)
	}
	sn := resp.GetSnapshot()
	if !sn.GetReadyToUse() || sn.GetSourceVolumeId() != vol || sn.GetSnapshotId() == "" {
		c.t.Fatalf("CreateSnapshot %s answered %v: want ready, of %s", name, sn, vol)
	}
	c.t.Logf("snapshot %s (%s) of %s ready in %v", name, sn.GetSnapshotId(), vol, time.Since(start).Round(time.Millisecond))
	return sn
}

// createFrom creates a 3-replica volume from a snapshot or a volume.
func (c *cluster) createFrom(name string, size int64, src *csipb.VolumeContentSource) (*csipb.Volume, error) {
	resp, err := c.controller.CreateVolume(ctx(c.t), &csipb.CreateVolumeRequest{
		Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: map[string]string{"replicas": "3"},
		VolumeContentSource: src,
	})
	return resp.GetVolume(), err
}

func fromSnapshot(id string) *csipb.VolumeContentSource {
	return &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Snapshot{Snapshot: &csipb.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
}

func fromVolume(id string) *csipb.VolumeContentSource {
	return &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: id}}}
}

// checkExactly checks that dir holds the files of sums, unchanged, and no
// other file of the test.
func checkExactly(t *testing.T, dir string, sums map[string][32]byte) {
	t.Helper()
	checkFiles(t, dir, sums)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if _, ok := sums[e.Name()]; !ok && e.Name() != "lost+found" {
			t.Fatalf("%s holds %s, written after the data it should hold", dir, e.Name())
		}
	}
}

// metricSum scrapes the metrics at addr and sums the samples of name whose
// labels mention label (an empty label also takes a sample without labels).
func metricSum(t *testing.T, addr, name, label string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, line := range strings.Split(string(body), "\n") {
		labelled := strings.HasPrefix(line, name+"{") && strings.Contains(line, `"`+label+`"`)
		if !labelled && (label != "" || !strings.HasPrefix(line, name+" ")) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// replicaDirs lists the replica directories of volume id on every node.
func (c *cluster) replicaDirs(id string) []string {
	dirs, _ := filepath.Glob(filepath.Join(c.dir, "node-*", "data", "replicas", id+"-r*"))
	return dirs
}

// waitGone waits until no node holds a replica directory of volume id.
func (c *cluster) waitGone(id string) {
	c.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for len(c.replicaDirs(id)) > 0 {
		if time.Now().After(deadline) {
			c.t.Fatalf("replicas of %s still on disk after 60s: %v", id, c.replicaDirs(id))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *cluster) listSnapshots(req *csipb.ListSnapshotsRequest) []string {
	c.t.Helper()
	resp, err := c.controller.ListSnapshots(ctx(c.t), req)
	if err != nil {
		c.t.Fatalf("ListSnapshots: %v", err)
	}
	var ids []string
	for _, e := range resp.GetEntries() {
		ids = append(ids, e.GetSnapshot().GetSnapshotId())
	}
	return ids
}

func TestSnapshotRestoreAndClone(t *testing.T) {
	c := startCluster(t)
	src, err := c.createFrom("snap-src", 128<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := src.GetVolumeId()
	staging, target := c.attach(id, "node-1")
	atSnap := map[string][32]byte{}
	writeFiles(t, target, "before", 10, 11, atSnap)
	syncFS(t, target)

	// The snapshot holds what was written before it; the volume moves on.
	snap := c.snapshot("snap-1", id)
	if again := c.snapshot("snap-1", id); again.GetSnapshotId() != snap.GetSnapshotId() {
		t.Fatalf("CreateSnapshot retried gave %s, want the first %s", again.GetSnapshotId(), snap.GetSnapshotId())
	}
	now := maps.Clone(atSnap)
	writeFiles(t, target, "after", 10, 12, now)
	// Overwrite a file the snapshot holds.
	writeFiles(t, target, "before", 1, 13, now)
	syncFS(t, target)

	// Space accounting: on each node, the snapshot's layer holds the
	// files written before it, and holds alone some of it (what was
	// written again since: ext4's journal and metadata at least; where
	// ext4 puts a rewritten file's data is its own choice).
	for node, addr := range c.metrics {
		held := metricSum(t, addr, "cairn_snapshot_held_bytes", snap.GetSnapshotId())
		alone := metricSum(t, addr, "cairn_snapshot_exclusive_bytes", snap.GetSnapshotId())
		if held < 10*256<<10 || alone == 0 || alone >= held {
			t.Fatalf("%s: snapshot holds %v bytes, %v alone; want at least the 10 files before it, and some of it alone", node, held, alone)
		}
		t.Logf("%s: the snapshot holds %.1f MiB, %.1f MiB of it alone", node, held/(1<<20), alone/(1<<20))
	}

	// The store learns the same from the node of the first healthy
	// replica, and cairn ctl shows it.
	deadline := time.Now().Add(40 * time.Second)
	for {
		var sn meta.Snapshot
		out := cairn(t, "ctl", "--server", c.agents, "snapshot", "get", snap.GetSnapshotId(), "-o", "json")
		if err := json.Unmarshal([]byte(out), &sn); err != nil {
			t.Fatal(err)
		}
		if sp := sn.Space; sp != nil && sp.HeldBytes >= 10*256<<10 && sp.AloneBytes > 0 {
			t.Logf("cairn ctl snapshot get: %s", grepLines(cairn(t, "ctl", "--server", c.agents, "snapshot", "get", snap.GetSnapshotId()), "space"))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the snapshot's space did not reach the store within 40s: %s", out)
		}
		time.Sleep(time.Second)
	}
	if u := c.volumeJSON(id).Usage; u == nil || u.AllocatedBytes < 10*256<<10 {
		t.Fatalf("the volume's space on disk in the store: %+v", u)
	}

	// A restore reads the old data, on another node.
	restored, err := c.createFrom("snap-restored", 128<<20, fromSnapshot(snap.GetSnapshotId()))
	if err != nil {
		t.Fatalf("restore: %v", err)
	}
	if restored.GetContentSource().GetSnapshot().GetSnapshotId() != snap.GetSnapshotId() {
		t.Fatalf("restored volume's content source: %v", restored.GetContentSource())
	}
	rStaging, rTarget := c.attach(restored.GetVolumeId(), "node-2")
	checkExactly(t, rTarget, atSnap)
	checkExactly(t, target, now)

	// cairn ctl restores too, and waits until every replica holds the data.
	out := cairn(t, "ctl", "--server", c.agents, "volume", "create", "ctl-restored", "--from-snapshot", snap.GetSnapshotId(), "--wait")
	if !strings.Contains(out, "created volume") || strings.Count(out, "healthy") < 3 {
		t.Fatalf("cairn ctl volume create --from-snapshot --wait:\n%s", out)
	}

	// A clone of the volume in use holds what it holds now.
	clone, err := c.createFrom("snap-clone", 128<<20, fromVolume(id))
	if err != nil {
		t.Fatalf("clone: %v", err)
	}
	cStaging, cTarget := c.attach(clone.GetVolumeId(), "node-3")
	checkExactly(t, cTarget, now)
	// The clone's own snapshot is not the user's to see.
	if ids := c.listSnapshots(&csipb.ListSnapshotsRequest{}); !slices.Equal(ids, []string{snap.GetSnapshotId()}) {
		t.Fatalf("ListSnapshots = %v, want only %s", ids, snap.GetSnapshotId())
	}

	// Each changes apart from the others.
	cloneNow := maps.Clone(now)
	writeFiles(t, cTarget, "clone", 3, 14, cloneNow)
	restoredNow := maps.Clone(atSnap)
	writeFiles(t, rTarget, "restored", 3, 15, restoredNow)
	syncFS(t, cTarget)
	syncFS(t, rTarget)
	checkExactly(t, target, now)
	checkExactly(t, cTarget, cloneNow)
	checkExactly(t, rTarget, restoredNow)

	// Refused, and nothing made: a restore smaller than the snapshot, a
	// snapshot of a volume that does not exist, a restore of one that
	// does not exist.
	if _, err := c.createFrom("too-small", 64<<20, fromSnapshot(snap.GetSnapshotId())); status.Code(err) != codes.OutOfRange {
		t.Fatalf("restore into a smaller volume: %v, want OutOfRange", err)
	}
	if _, err := c.controller.CreateSnapshot(ctx(t), &csipb.CreateSnapshotRequest{Name: "nope", SourceVolumeId: "vol-nope"}); status.Code(err) != codes.NotFound {
		t.Fatalf("snapshot of an unknown volume: %v, want NotFound", err)
	}
	if _, err := c.createFrom("nope", 128<<20, fromSnapshot("snap-nope")); status.Code(err) != codes.NotFound {
		t.Fatalf("restore of an unknown snapshot: %v, want NotFound", err)
	}

	// Delete the source volume while its snapshot remains: it is hidden,
	// its replicas stay for the snapshot, and a restore still works.
	c.detach(id, "node-1", staging, target)
	if _, err := c.controller.DeleteVolume(ctx(t), &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.controller.ControllerGetVolume(ctx(t), &csipb.ControllerGetVolumeRequest{VolumeId: id}); status.Code(err) != codes.NotFound {
		t.Fatalf("a deleted volume kept for its snapshot: %v, want NotFound", err)
	}
	if n := len(c.replicaDirs(id)); n != 3 {
		t.Fatalf("a deleted volume with a snapshot has %d replicas on disk, want 3 kept", n)
	}
	late, err := c.createFrom("snap-late", 128<<20, fromSnapshot(snap.GetSnapshotId()))
	if err != nil {
		t.Fatalf("restore after its volume was deleted: %v", err)
	}
	lStaging, lTarget := c.attach(late.GetVolumeId(), "node-1")
	checkExactly(t, lTarget, atSnap)
	c.detach(late.GetVolumeId(), "node-1", lStaging, lTarget)

	// Deleting the snapshot, the last thing the volume was kept for,
	// frees its replicas; the restores, sharing layers by hard links,
	// keep their data.
	if _, err := c.controller.DeleteSnapshot(ctx(t), &csipb.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshotId()}); err != nil {
		t.Fatal(err)
	}
	if ids := c.listSnapshots(&csipb.ListSnapshotsRequest{}); len(ids) != 0 {
		t.Fatalf("ListSnapshots after the delete = %v, want none", ids)
	}
	c.waitGone(id)
	checkExactly(t, rTarget, restoredNow)
	checkExactly(t, cTarget, cloneNow)
	c.detach(restored.GetVolumeId(), "node-2", rStaging, rTarget)
	c.detach(clone.GetVolumeId(), "node-3", cStaging, cTarget)
	lStaging, lTarget = c.attach(late.GetVolumeId(), "node-2")
	checkExactly(t, lTarget, atSnap)
	c.detach(late.GetVolumeId(), "node-2", lStaging, lTarget)
	for _, v := range []string{restored.GetVolumeId(), clone.GetVolumeId(), late.GetVolumeId()} {
		if _, err := c.controller.DeleteVolume(ctx(t), &csipb.DeleteVolumeRequest{VolumeId: v}); err != nil {
			t.Fatal(err)
		}
		c.waitGone(v)
	}
}

// seqBlock is the content of the k-th write of writer w in
// TestSnapshotIsACutOfAcknowledgedWrites: its own 4 KiB block, named by
// its first bytes and filled from them.
func seqBlock(w, k int) []byte {
	b := alignedBuf(4096)
	rng := rand.New(rand.NewPCG(uint64(w), uint64(k)))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	binary.LittleEndian.PutUint64(b[0:], uint64(w))
	binary.LittleEndian.PutUint64(b[8:], uint64(k))
	return b
}

// TestSnapshotIsACutOfAcknowledgedWrites takes a snapshot of a raw block
// volume while four writers write, each at queue depth 1 with O_DSYNC, to
// blocks of their own, and checks the restored snapshot: it holds every
// write acknowledged before CreateSnapshot was called and none that
// started after it returned, and each block holds a whole write or none.
func TestSnapshotIsACutOfAcknowledgedWrites(t *testing.T) {
	const writers, size = 4, 64 << 20
	const blocks = size / 4096
	c := startCluster(t)
	resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "cut-src", CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csipb.VolumeCapability{blockCap}, Parameters: map[string]string{"replicas": "3"},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	staging, target := c.attachAs(id, "node-1", blockCap)

	type write struct{ start, ack time.Time }
	done := make([][]write, writers) // per writer, its writes in order
	stop := make(chan struct{})
	errs := make(chan error, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f, err := os.OpenFile(target, os.O_WRONLY|syscall.O_DIRECT|syscall.O_DSYNC, 0)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			for k := 0; w+k*writers < blocks; k++ {
				select {
				case <-stop:
					return
				default:
				}
				b := seqBlock(w, k)
				start := time.Now()
				if _, err := f.WriteAt(b, int64(w+k*writers)*4096); err != nil {
					errs <- fmt.Errorf("writer %d, write %d: %w", w, k, err)
					return
				}
				done[w] = append(done[w], write{start, time.Now()})
			}
			errs <- fmt.Errorf("writer %d ran out of blocks before the snapshot", w)
		}()
	}
	time.Sleep(time.Second)
	called := time.Now()
	snap := c.snapshot("cut", id)
	returned := time.Now()
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	c.detach(id, "node-1", staging, target)

	restored, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "cut-restored", VolumeCapabilities: []*csipb.VolumeCapability{blockCap},
		Parameters: map[string]string{"replicas": "3"}, VolumeContentSource: fromSnapshot(snap.GetSnapshotId()),
	})
	if err != nil {
		t.Fatal(err)
	}
	rStaging, rTarget := c.attachAs(restored.GetVolume().GetVolumeId(), "node-2", blockCap)
	img := readDirect(t, rTarget, 0, size)
	var before, after, held int
	zero := make([]byte, 4096)
	for w := range writers {
		for k, wr := range done[w] {
			got := img[(w+k*writers)*4096:][:4096]
			has := bytes.Equal(got, seqBlock(w, k))
			switch {
			case !has && !bytes.Equal(got, zero):
				t.Fatalf("writer %d, write %d: the snapshot's block is neither the write nor zeros (torn or misplaced)", w, k)
			case wr.ack.Before(called) && !has:
				t.Fatalf("writer %d, write %d, acknowledged %v before CreateSnapshot was called, is not in the snapshot", w, k, called.Sub(wr.ack))
			case wr.start.After(returned) && has:
				t.Fatalf("writer %d, write %d, started %v after CreateSnapshot returned, is in the snapshot", w, k, wr.start.Sub(returned))
			}
			switch {
			case wr.ack.Before(called):
				before++
			case wr.start.After(returned):
				after++
			}
			if has {
				held++
			}
		}
	}
	if before == 0 || after == 0 {
		t.Fatalf("%d writes acknowledged before the snapshot, %d started after it: the test proves nothing", before, after)
	}
	t.Logf("%d writes acknowledged before CreateSnapshot, %d started after it returned (%v later); the snapshot holds %d",
		before, after, returned.Sub(called).Round(time.Millisecond), held)
	c.detach(restored.GetVolume().GetVolumeId(), "node-2", rStaging, rTarget)
}

// TestRestoreIntoLargerVolume restores a snapshot, and clones a volume,
// into twice the source's size, on the node where the source is mounted:
// the file system fills the larger device when staged (ext4 grown before
// mounting, xfs after), its files are intact, and xfs mounts beside the
// source that has the same UUID.
func TestRestoreIntoLargerVolume(t *testing.T) {
	c := startCluster(t)
	for _, fsType := range []string{"ext4", "xfs"} {
		t.Run(fsType, func(t *testing.T) {
			from, to := int64(64<<20), int64(128<<20)
			if fsType == "xfs" {
				from, to = 320<<20, 640<<20 // mkfs.xfs wants 300 MB at least
			}
			vc := fsCap(fsType)
			resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
				Name: "grow-src-" + fsType, CapacityRange: &csipb.CapacityRange{RequiredBytes: from},
				VolumeCapabilities: []*csipb.VolumeCapability{vc}, Parameters: map[string]string{"replicas": "3"},
			})
			if err != nil {
				t.Fatal(err)
			}
			id := resp.GetVolume().GetVolumeId()
			staging, target := c.attachAs(id, "node-1", vc)
			sums := map[string][32]byte{}
			writeFiles(t, target, "f", 5, 21, sums)
			syncFS(t, target)
			small := fsSize(t, target)
			snap := c.snapshot("grow-snap-"+fsType, id)
			for _, src := range []*csipb.VolumeContentSource{fromSnapshot(snap.GetSnapshotId()), fromVolume(id)} {
				kind := "restore"
				if src.GetVolume() != nil {
					kind = "clone"
				}
				r, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
					Name: "grow-" + kind + "-" + fsType, CapacityRange: &csipb.CapacityRange{RequiredBytes: to},
					VolumeCapabilities: []*csipb.VolumeCapability{vc}, Parameters: map[string]string{"replicas": "3"},
					VolumeContentSource: src,
				})
				if err != nil {
					t.Fatalf("%s into %d bytes: %v", kind, to, err)
				}
				if r.GetVolume().GetCapacityBytes() != to {
					t.Fatalf("%s: capacity %d, want %d", kind, r.GetVolume().GetCapacityBytes(), to)
				}
				rid := r.GetVolume().GetVolumeId()
				rStaging, rTarget := c.attachAs(rid, "node-1", vc)
				checkExactly(t, rTarget, sums)
				if big := fsSize(t, rTarget); big < small+(to-from)*9/10 {
					t.Fatalf("%s: file system of %d bytes on a %d-byte volume (the source's was %d): not grown", kind, big, to, small)
				}
				c.detach(rid, "node-1", rStaging, rTarget)
				if _, err := c.controller.DeleteVolume(ctx(t), &csipb.DeleteVolumeRequest{VolumeId: rid}); err != nil {
					t.Fatal(err)
				}
			}
			c.detach(id, "node-1", staging, target)
			if _, err := c.controller.DeleteSnapshot(ctx(t), &csipb.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshotId()}); err != nil {
				t.Fatal(err)
			}
			if _, err := c.controller.DeleteVolume(ctx(t), &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Fatal(err)
			}
			c.waitGone(id)
		})
	}
}

// volumeJSON is a volume as cairn ctl volume get -o json prints it.
func (c *cluster) volumeJSON(id string) *meta.Volume {
	c.t.Helper()
	var v meta.Volume
	if err := json.Unmarshal([]byte(cairn(c.t, "ctl", "--server", c.agents, "volume", "get", id, "-o", "json")), &v); err != nil {
		c.t.Fatal(err)
	}
	return &v
}

// TestRestoreAfterHolderReplaced: a node holding a replica of a volume
// with a snapshot dies for good; its replica is replaced on the fourth
// node and rebuilt there, snapshot layers included. A restore then uses
// that rebuilt replica too, and reads the snapshot's data through ext4 on
// the new node.
func TestRestoreAfterHolderReplaced(t *testing.T) {
	c := startClusterOf(t, 4)
	resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "replaced-src", CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap},
		Parameters:         map[string]string{"replicas": "3", "staleReplicaTimeout": "2s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	v := c.volumeJSON(id)
	holders := map[string]string{} // node → replica id
	for _, r := range v.Replicas {
		holders[r.Node] = r.ID
	}
	var spare string
	for n := range c.nodes {
		if _, ok := holders[n]; !ok {
			spare = n
		}
	}
	attachNode := v.Replicas[0].Node
	staging, target := c.attach(id, attachNode)
	atSnap := map[string][32]byte{}
	writeFiles(t, target, "held", 6, 31, atSnap)
	syncFS(t, target)
	snap := c.snapshot("replaced-snap", id)
	now := maps.Clone(atSnap)
	writeFiles(t, target, "held", 2, 32, now) // overwrite two files after the snapshot
	syncFS(t, target)
	c.detach(id, attachNode, staging, target)

	// The node of another replica dies for good; its replica moves to the
	// spare node and is rebuilt there from the others.
	victim := v.Replicas[1].Node
	cairn(t, "dev", "kill", "--dir", c.dir, victim)
	deadline := time.Now().Add(90 * time.Second)
	var moved meta.Replica
	for moved.ID == "" {
		for _, r := range c.volumeJSON(id).Replicas {
			if r.Node == spare && r.State == meta.ReplicaHealthy && r.Generation != "" {
				moved = r
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replica on %s was not replaced on %s and rebuilt within 90s:\n%s", victim, spare,
				cairn(t, "ctl", "--server", c.agents, "volume", "get", id, "-o", "json"))
		}
		time.Sleep(300 * time.Millisecond)
	}
	t.Logf("replica %s of %s (killed) replaced by %s on %s", holders[victim], victim, moved.ID, spare)

	// A restore puts a replica on the spare node, made from the rebuilt
	// replica's carried layers, and reads the snapshot's data there.
	restored, err := c.createFrom("replaced-restored", 64<<20, fromSnapshot(snap.GetSnapshotId()))
	if err != nil {
		t.Fatalf("restore after a holder was replaced: %v", err)
	}
	rv := c.volumeJSON(restored.GetVolumeId())
	var onSpare bool
	for _, r := range rv.Replicas {
		if r.Node == spare && r.Source == moved.ID {
			onSpare = true
		}
		if r.Node == victim {
			t.Fatalf("the restore placed a replica on the dead node %s: %+v", victim, rv.Replicas)
		}
	}
	if !onSpare {
		t.Fatalf("the restore made no replica from the rebuilt replica %s on %s: %+v", moved.ID, spare, rv.Replicas)
	}
	rStaging, rTarget := c.attach(restored.GetVolumeId(), spare)
	checkExactly(t, rTarget, atSnap)
	c.detach(restored.GetVolumeId(), spare, rStaging, rTarget)
	cairn(t, "dev", "start", "--dir", c.dir, victim)
}
