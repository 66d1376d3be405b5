package csie2e

import (
	"crypto/sha256"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/internal/testfs"
)

// writeDirect writes data at off of the block device at path, with
// O_DIRECT, and syncs it.
func writeDirect(t *testing.T, path string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf := alignedBuf(1 << 20)
	for done := 0; done < len(data); done += len(buf) {
		n := copy(buf, data[done:])
		if _, err := f.WriteAt(buf[:n], off+int64(done)); err != nil {
			t.Fatalf("write at %d of %s: %v", off+int64(done), path, err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestDeduplication (the space-efficiency issue): on a node whose data
// directory of type xfs is an xfs with reflinks, five volumes written with
// the same 256 MiB and five clones of one of them take at most 1.2× one
// copy once the node's pass ran; cairn ctl volume get shows what
// deduplication saved; a write to one volume changes none of the others.
// A volume with deduplication on the node's default data directory (the
// host's file system, without shared extents) is refused with a message
// that names that directory and the reason.
func TestDeduplication(t *testing.T) {
	const size = 256 << 20
	dir := filepath.Join(t.TempDir(), "cluster")
	mnt := filepath.Join(dir, "node-1", "disk-xfs")
	testfs.Mount(t, "xfs", 4<<30, mnt) // before the cluster: its cleanup then runs after dev down
	c := startClusterIn(t, dir, 1, []string{"--disk-types", "xfs"}, "--dedup-interval=2s")
	base := int64(testfs.Used(t, mnt))

	create := func(name, diskType string, src *csipb.VolumeContentSource) (string, error) {
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csipb.VolumeCapability{blockCap}, VolumeContentSource: src,
			Parameters: map[string]string{"replicas": "1", "type": diskType, "deduplication": "true"},
		})
		return resp.GetVolume().GetVolumeId(), err
	}
	// The node records what its probes found after it starts.
	var ids []string
	waitFor(t, 30*time.Second, "a volume with deduplication accepted on the xfs disk", func() bool {
		id, err := create("dedup-0", "xfs", nil)
		if err != nil && status.Code(err) != codes.ResourceExhausted {
			t.Fatal(err)
		}
		if err == nil {
			ids = append(ids, id)
		}
		return err == nil
	})
	_, err := create("dedup-default", "default", nil)
	defaultDir := filepath.Join(dir, "node-1", "data")
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), defaultDir+" (") ||
		!strings.Contains(err.Error(), "cannot share blocks") {
		t.Fatalf("deduplication on the default data directory: %v, want ResourceExhausted naming %s and why", err, defaultDir)
	}

	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(17, 17))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	want := sha256.Sum256(data)
	for i := 1; i < 5; i++ {
		id, err := create("dedup-"+string(rune('0'+i)), "xfs", nil)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	for _, id := range ids {
		staging, target := c.attachAs(id, "node-1", blockCap)
		writeDirect(t, target, 0, data)
		c.detach(id, "node-1", staging, target)
	}
	for i := range 5 {
		id, err := create("dedup-clone-"+string(rune('0'+i)), "xfs", fromVolume(ids[0]))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	before := int64(testfs.Used(t, mnt)) - base
	t.Logf("10 volumes of the same %d MiB (5 written, 5 clones of the first): %d MiB in use once made (passes ran meanwhile)", size>>20, before>>20)

	c.killMidPass(mnt)

	// Two passes that start after the last write: the first may have
	// begun before it.
	passes := func() float64 { return metricSum(t, c.metrics["node-1"], "cairn_dedup_passes_total", "xfs") }
	from := passes()
	waitFor(t, 3*time.Minute, "two deduplication passes", func() bool { return passes() >= from+2 })
	after := int64(testfs.Used(t, mnt)) - base
	t.Logf("after the passes: %d MiB in use (%.2f× one copy); %.0f MiB hashed, %.0f MiB shared by the node's passes so far", after>>20,
		float64(after)/size, metricSum(t, c.metrics["node-1"], "cairn_dedup_hashed_bytes_total", "xfs")/(1<<20),
		metricSum(t, c.metrics["node-1"], "cairn_dedup_shared_bytes_total", "xfs")/(1<<20))
	if after > size*12/10 {
		t.Errorf("%d MiB in use after deduplication, want at most 1.2 × %d MiB", after>>20, size>>20)
	}

	// The store records what each replica saves. Of the ten equal copies
	// one keeps its blocks (the first in the pass's order, which follows
	// the random volume ids), so nine together save nine copies' worth;
	// cairn ctl volume get shows the savings of one of the written ones.
	var shown string
	waitFor(t, 30*time.Second, "the space of the ten volumes recorded", func() bool {
		var saved int64
		shown = ""
		for i, id := range ids {
			sp := c.volumeJSON(id).Replicas[0].Space
			if sp == nil {
				return false
			}
			saved += int64(sp.DedupSavedBytes)
			if i > 0 && i < 5 && shown == "" && int64(sp.DedupSavedBytes) >= size-(1<<20) && int64(sp.AllocatedBytes) >= size {
				shown = id
			}
		}
		return saved >= 9*size-(10<<20) && shown != ""
	})
	if out := cairn(t, "ctl", "--server", c.agents, "volume", "get", shown); !strings.Contains(out, "saved by deduplication") ||
		!strings.Contains(out, "256 MiB written") {
		t.Errorf("volume get does not show the savings:\n%s", out)
	} else {
		t.Logf("cairn ctl volume get %s:\n%s", shown, out)
	}

	// A write to one volume changes it alone.
	patch := make([]byte, 1<<20)
	for i := range patch {
		patch[i] = byte(i * 31)
	}
	staging, target := c.attachAs(ids[2], "node-1", blockCap)
	writeDirect(t, target, 8<<20, patch)
	c.detach(ids[2], "node-1", staging, target)
	changed := append([]byte(nil), data...)
	copy(changed[8<<20:], patch)
	for i, id := range ids {
		staging, target := c.attachAs(id, "node-1", blockCap)
		got := sha256.Sum256(readDirect(t, target, 0, size))
		c.detach(id, "node-1", staging, target)
		switch {
		case i == 2 && got != sha256.Sum256(changed):
			t.Errorf("volume %s does not read what was written to it", id)
		case i != 2 && got != want:
			t.Errorf("volume %s changed after a write to %s", id, ids[2])
		}
	}
}

// killMidPass kills node-1's agent with SIGKILL while a deduplication pass
// runs on the xfs at mnt (its checkpoint is there), starts it again, and
// checks that the pass resumed from its checkpoint.
func (c *cluster) killMidPass(mnt string) {
	t := c.t
	t.Helper()
	progress := filepath.Join(mnt, "dedup", "progress.json")
	for try := 0; ; try++ {
		waitFor(t, time.Minute, "a deduplication pass running", func() bool {
			_, err := os.Stat(progress)
			return err == nil
		})
		cairn(t, "dev", "kill", "--dir", c.dir, "node-1")
		_, err := os.Stat(progress)
		cairn(t, "dev", "start", "--dir", c.dir, "node-1")
		if err == nil {
			break // killed mid-pass
		}
		if try == 5 {
			t.Fatal("every kill came after a pass had ended")
		}
	}
	log := filepath.Join(c.dir, "node-1", "node.log")
	waitFor(t, time.Minute, "the pass resumed after the restart", func() bool {
		b, _ := os.ReadFile(log)
		return strings.Contains(string(b), "deduplication pass resumes")
	})
	t.Logf("node-1 killed with SIGKILL during a deduplication pass; the pass resumed from its checkpoint")
}
