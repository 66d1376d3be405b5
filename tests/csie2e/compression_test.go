package csie2e

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/internal/testlogs"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// TestCompression: volumes with compression lz4 on a 4-node dev cluster,
// through CSI-published block devices.
//
//   - JSON logs take at most half their size on each of three replicas,
//     as the store records it, `cairn ctl volume get` shows it and the
//     metrics report it; random data at most 1.02 of its size.
//   - A node agent holding a replica is killed with SIGKILL while small
//     and whole-extent overwrites go on, and started again: its replica
//     catches up.
//   - Another holder dies for good: its replica is rebuilt on the fourth
//     node, compressed; the nodes' recompression (every 2 s here) stores
//     what the overwrites' small writes left raw compressed again, and
//     every replica is back under half its size.
//   - A snapshot taken before the overwrites is restored into a new
//     volume, which reads what the snapshot held.
//   - Finally every node agent is stopped and each replica's files are
//     read directly: every copy holds exactly what was written.
func TestCompression(t *testing.T) {
	c := startClusterOf(t, 4, "--recompress-interval=2s")
	const size = 64 << 20
	create := func(name string, replicas int, src *csipb.VolumeContentSource) (string, error) {
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csipb.VolumeCapability{blockCap}, VolumeContentSource: src,
			Parameters: map[string]string{"replicas": fmt.Sprint(replicas), "compression": "lz4", "staleReplicaTimeout": "20s"},
		})
		return resp.GetVolume().GetVolumeId(), err
	}
	// Nodes record that they can compress after they start.
	var logs string
	waitFor(t, 30*time.Second, "a volume with compression accepted", func() bool {
		id, err := create("logs", 3, nil)
		if err != nil && status.Code(err) != codes.ResourceExhausted {
			t.Fatal(err)
		}
		logs = id
		return err == nil
	})
	random, err := create("random", 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "sealed", CapacityRange: &csipb.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csipb.VolumeCapability{blockCap},
		Parameters:         map[string]string{"compression": "lz4", "encryption": "aes-256-gcm"},
		Secrets:            map[string]string{"encryptionPassphrase": "p"},
	})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "compression") || !strings.Contains(err.Error(), "encryption") {
		t.Fatalf("compression with encryption: %v, want InvalidArgument naming both", err)
	}

	rng := rand.New(rand.NewPCG(5, 5))
	model := make([]byte, size)
	testlogs.Fill(model, rng)
	v := c.volumeJSON(logs)
	nodeA, nodeB, nodeC := v.Replicas[0].Node, v.Replicas[1].Node, v.Replicas[2].Node
	staging, target := c.attachAs(logs, nodeA, blockCap)
	writeDirect(t, target, 0, model)
	c.detach(logs, nodeA, staging, target)

	noise := make([]byte, size)
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	rv := c.volumeJSON(random)
	staging, target = c.attachAs(random, rv.Replicas[0].Node, blockCap)
	writeDirect(t, target, 0, noise)
	c.detach(random, rv.Replicas[0].Node, staging, target)

	// What each replica takes, as its node records it.
	space := func(id string, want func(meta.ReplicaSpace) bool) []meta.ReplicaSpace {
		var out []meta.ReplicaSpace
		waitFor(t, 60*time.Second, "the space of "+id+"'s replicas recorded", func() bool {
			out = out[:0]
			for _, r := range c.volumeJSON(id).Replicas {
				if r.Space == nil || !want(*r.Space) {
					return false
				}
				out = append(out, *r.Space)
			}
			return true
		})
		return out
	}
	for i, sp := range space(logs, func(sp meta.ReplicaSpace) bool { return sp.LogicalBytes >= size }) {
		t.Logf("logs, replica %d: %d MiB written take %.1f MiB (%.2f×)", i, sp.LogicalBytes>>20, float64(sp.AllocatedBytes)/(1<<20), sp.CompressionRatio())
		if sp.CompressionRatio() > 0.5 {
			t.Errorf("logs, replica %d: %.2f× of the logical bytes on disk, want at most 0.5", i, sp.CompressionRatio())
		}
	}
	for _, sp := range space(random, func(sp meta.ReplicaSpace) bool { return sp.LogicalBytes >= size }) {
		t.Logf("random: %d MiB written take %.2f MiB (%.3f×)", sp.LogicalBytes>>20, float64(sp.AllocatedBytes)/(1<<20), sp.CompressionRatio())
		if sp.CompressionRatio() > 1.02 {
			t.Errorf("random data: %.3f× of the logical bytes on disk, want at most 1.02", sp.CompressionRatio())
		}
	}
	if out := cairn(t, "ctl", "--server", c.agents, "volume", "get", logs); !strings.Contains(out, "compressed into") ||
		!strings.Contains(out, "compression:  lz4") {
		t.Errorf("volume get does not show the compression:\n%s", out)
	} else {
		t.Logf("cairn ctl volume get %s:\n%s", logs, out)
	}
	if m := metricSum(t, c.metrics[nodeA], "cairn_replica_logical_bytes", logs); m < size {
		t.Errorf("cairn_replica_logical_bytes of %s on %s: %.0f, want at least %d", logs, nodeA, m, size)
	}

	// The snapshot holds the logs as written; then overwrites go on while
	// nodeB's agent is killed and started again.
	snap := c.snapshot("logs-snap", logs)
	atSnap := bytes.Clone(model)
	staging, target = c.attachAs(logs, nodeA, blockCap)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writes int
	wg.Go(func() { writes = overwrite(t, target, model, rng, stop) })
	time.Sleep(time.Second)
	cairn(t, "dev", "kill", "--dir", c.dir, nodeB)
	time.Sleep(time.Second)
	cairn(t, "dev", "start", "--dir", c.dir, nodeB)
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	t.Logf("%d overwrites while %s was killed with SIGKILL and started again", writes, nodeB)
	rid := v.Replicas[1].ID
	waitFor(t, 90*time.Second, "the killed node's replica caught up", func() bool {
		for _, r := range c.volumeJSON(logs).Replicas {
			if r.ID == rid {
				return r.State == meta.ReplicaHealthy
			}
		}
		t.Fatalf("replica %s of %s was replaced; its node was down for less than staleReplicaTimeout", rid, nodeB)
		return false
	})
	if got := readDirect(t, target, 0, size); !bytes.Equal(got, model) {
		t.Fatal("the volume does not read what was written, after the kill")
	}
	c.detach(logs, nodeA, staging, target)

	// nodeC dies for good: its replica is rebuilt on the spare node, and
	// compressed there.
	var spare string
	for n := range c.nodes {
		if n != nodeA && n != nodeB && n != nodeC {
			spare = n
		}
	}
	cairn(t, "dev", "kill", "--dir", c.dir, nodeC)
	var moved meta.Replica
	waitFor(t, 2*time.Minute, "the replica on "+nodeC+" rebuilt on "+spare, func() bool {
		for _, r := range c.volumeJSON(logs).Replicas {
			if r.Node == spare && r.State == meta.ReplicaHealthy && r.Generation != "" {
				moved = r
				return true
			}
		}
		return false
	})
	// The overwrites' small writes left extents raw; the nodes'
	// recompression (every 2 s here) stores them compressed again, and
	// the rebuild wrote every extent whole.
	for i, sp := range space(logs, func(sp meta.ReplicaSpace) bool { return sp.LogicalBytes >= size && sp.CompressionRatio() <= 0.5 }) {
		r := c.volumeJSON(logs).Replicas[i]
		t.Logf("after the rebuild: replica %s on %s: %d MiB written (snapshot included) take %.1f MiB (%.2f×)", r.ID, r.Node,
			sp.LogicalBytes>>20, float64(sp.AllocatedBytes)/(1<<20), sp.CompressionRatio())
	}
	if n := metricSum(t, c.metrics[nodeA], "cairn_recompressed_bytes_total", ""); n == 0 {
		t.Errorf("%s recompressed nothing after the overwrites", nodeA)
	} else {
		t.Logf("%s recompressed %.1f MiB that the overwrites left raw", nodeA, n/(1<<20))
	}
	t.Logf("replica %s rebuilt on %s", moved.ID, spare)

	// The snapshot restored: compressed too, and it reads what the
	// snapshot held.
	restored, err := create("logs-restored", 2, fromSnapshot(snap.GetSnapshotId()))
	if err != nil {
		t.Fatal(err)
	}
	rn := c.volumeJSON(restored).Replicas[0].Node
	staging, target = c.attachAs(restored, rn, blockCap)
	if got := readDirect(t, target, 0, size); !bytes.Equal(got, atSnap) {
		t.Fatal("the restored volume does not read what the snapshot held")
	}
	c.detach(restored, rn, staging, target)
	if out := cairn(t, "ctl", "--server", c.agents, "volume", "get", restored); !strings.Contains(out, "compression:  lz4") {
		t.Errorf("the restored volume is not shown compressed:\n%s", out)
	}

	// Every copy, read from its files with the agents stopped.
	copies := map[string][]meta.Replica{logs: c.volumeJSON(logs).Replicas, restored: c.volumeJSON(restored).Replicas}
	live := []string{nodeA, nodeB, spare}
	for _, n := range live {
		cairn(t, "dev", "kill", "--dir", c.dir, n)
	}
	defer func() {
		for _, n := range append(live, nodeC) {
			cairn(t, "dev", "start", "--dir", c.dir, n)
		}
	}()
	for _, vol := range []struct {
		id   string
		want []byte
	}{{logs, model}, {restored, atSnap}} {
		for _, r := range copies[vol.id] {
			if r.Node == nodeC {
				continue
			}
			dir := filepath.Join(c.dir, r.Node, "data", "replicas")
			// The map of a compressed layer's data: "data.zmap", or
			// "<layer>.data.zmap" once the replica has layers.
			if maps, _ := filepath.Glob(filepath.Join(dir, r.ID, "*data.zmap")); len(maps) == 0 {
				t.Errorf("replica %s on %s is not compressed: no data.zmap in its directory", r.ID, r.Node)
			}
			rep, err := replica.Open(dir, r.ID, 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, size)
			err = rep.ReadAt(rep.Epoch(), got, 0)
			_ = rep.Close() // only read
			if err != nil || !bytes.Equal(got, vol.want) {
				t.Errorf("replica %s of %s on %s does not hold what was written (%v)", r.ID, vol.id, r.Node, err)
			}
		}
	}
}

// overwrite writes to the block device at path until stop closes: small
// writes (4 to 32 KiB) into extents stored compressed, and whole 64 KiB
// extents, of fresh JSON logs, one at a time, keeping model up to date. It
// returns how many it wrote.
func overwrite(t *testing.T, path string, model []byte, rng *rand.Rand, stop chan struct{}) int {
	f, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Error(err)
		return 0
	}
	defer f.Close()
	buf := alignedBuf(64 << 10)
	for n := 0; ; n++ {
		select {
		case <-stop:
			return n
		default:
		}
		var off, l int
		if rng.IntN(2) == 0 {
			l = (1 + rng.IntN(8)) * 4096
			off = rng.IntN((len(model)-l)/4096) * 4096
		} else {
			l = 64 << 10
			off = rng.IntN(len(model)/l) * l
		}
		testlogs.Fill(buf[:l], rng)
		if _, err := f.WriteAt(buf[:l], int64(off)); err != nil {
			t.Errorf("overwrite %d bytes at %d: %v", l, off, err)
			return n
		}
		copy(model[off:], buf[:l])
	}
}
