package dataplane

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/replica"
)

// TestLostReplicaDataRebuilt writes a pattern over a whole 3-replica volume
// exported on node-1 and flushes it; then node-1 is crashed (SIGKILL) and
// loses its data, as when its disk is replaced or not mounted: its replica's
// directory, or its whole data dir, raft state included. node-1 is started
// again under the same id and addresses. Each loss is tried with the
// replicas still dirty (killed before the engine's next clean point: the
// attach resyncs every extent) and clean (after one: nothing is resynced,
// the rebuild must copy everything).
//
// Invariants: node-1 does not trust (nor serve, nor resync from) an empty
// copy in place of the lost one: the data reads back intact through the
// export on node-1 itself, which comes back by itself (block 0, where a file
// system keeps its superblock, is checked first: an empty block 0 is what
// makes NodeStage run mkfs over the user's data); node-1's replica gets a
// new copy (another generation), is rebuilt and healthy again; the replicas
// are identical (verify); the data reads back through an export on node-2
// too. With the whole data dir gone, node-1 also rejoins the store's raft
// cluster rather than starting one of its own.
func TestLostReplicaDataRebuilt(t *testing.T) {
	loseReplicaDir := func(t *testing.T, dataDir, replica string) {
		dir := filepath.Join(dataDir, "replicas", replica)
		if _, err := os.Stat(filepath.Join(dir, "meta")); err != nil {
			t.Fatalf("the replica is not where the test looks for it: %v", err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
	}
	loseDataDir := func(t *testing.T, dataDir, _ string) {
		if _, err := os.Stat(filepath.Join(dataDir, "raft.db")); err != nil {
			t.Fatalf("the data dir is not where the test looks for it: %v", err)
		}
		if err := os.RemoveAll(dataDir); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name string
		// lose deletes what node-1 loses; dataDir is its data dir, replica
		// the id of its replica.
		lose func(t *testing.T, dataDir, replica string)
		// clean: wait for a clean point before the kill.
		clean bool
	}{
		{"replica dir deleted/dirty", loseReplicaDir, false},
		{"replica dir deleted/clean", loseReplicaDir, true},
		{"data dir deleted/dirty", loseDataDir, false},
		{"data dir deleted/clean", loseDataDir, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := startCluster(t, 3)
			v := c.createVolume("lost", volSizeArg, "--replicas", "3")
			sock, _ := c.export(v.ID, "node-1", 20*time.Second)
			conn := c.dial(sock, 10*time.Second)
			m := newModel(volSize)
			m.fill(t, conn, 'A', 0, m.blocks(), 8)
			for b := 0; b < m.blocks(); b += 3 {
				if err := m.write(context.Background(), conn, b, writeID('B', uint64(b)+1), false); err != nil {
					t.Fatalf("write block %d: %v", b, err)
				}
			}
			if err := conn.Flush(context.Background()); err != nil {
				t.Fatalf("flush: %v", err)
			}
			_ = conn.Close()
			before := c.mustVolume(v.ID)
			victim := before.replicaOn("node-1")
			if victim == nil {
				t.Fatalf("no replica on node-1: %s", before.summary())
			}
			if victim.Generation == "" {
				t.Errorf("the engine did not record the generation of node-1's copy: %+v", before.Replicas)
			}
			if tc.clean {
				c.waitClean(before, 30*time.Second)
			}

			c.kill("node-1")
			tc.lose(t, c.node("node-1").DataDir, victim.ID)
			restartAt := time.Now()
			c.start("node-1")

			// The attachment is in the store: the export on node-1 comes back
			// by itself, and must serve the data, not an empty copy.
			conn = c.dial(sock, 90*time.Second)
			t.Logf("the export on node-1 came back %v after the restart", time.Since(restartAt).Round(time.Millisecond))
			block0 := make([]byte, blockSize)
			if err := conn.ReadAt(context.Background(), block0, 0); err != nil {
				t.Fatalf("read block 0 through node-1: %v", err)
			}
			want := make([]byte, blockSize)
			blockContent(want, m.allowed(0)[0], 0)
			if !bytes.Equal(block0, want) {
				t.Fatalf("block 0 through node-1 after it lost its replica: %s, want write %#x (an empty block 0 makes NodeStage run mkfs over the data)",
					describeBlock(block0), m.allowed(0)[0])
			}
			checkModel(t, m, conn, "read through node-1 after it returned without its replica")

			final := c.waitVolume(v.ID, 120*time.Second, "node-1's replica rebuilt", func(v volumeJSON) error {
				if err := allHealthy(v); err != nil {
					return err
				}
				r := v.replica(victim.ID)
				if r == nil {
					return stopPolling(fmt.Errorf("replica %s left the set (%s)", victim.ID, v.summary()))
				}
				if r.Generation == victim.Generation {
					return fmt.Errorf("replica %s still records the lost copy's generation", r.ID)
				}
				if rb := v.Rebuild; rb == nil || rb.ReplicaID != r.ID || !rb.Done {
					return fmt.Errorf("rebuild of %s not recorded as done", r.ID)
				}
				return nil
			})
			rb := final.Rebuild
			t.Logf("node-1's replica %s rebuilt %v after the restart (generation %s → %s): compared %d, copied %d of %d bytes; %s",
				rb.ReplicaID, time.Since(restartAt).Round(time.Millisecond), victim.Generation, final.replica(victim.ID).Generation,
				rb.BytesCompared, rb.BytesCopied, rb.BytesTotal, final.summary())
			if tc.clean && rb.BytesCopied != volSize {
				// Nothing was dirty, so nothing was resynced into the new,
				// empty copy: the rebuild must have copied every extent.
				t.Errorf("rebuild copied %d bytes, want the whole volume (%d)", rb.BytesCopied, volSize)
			}
			checkModel(t, m, conn, "read through node-1 after the rebuild")
			if err := c.verify(v.ID); err != nil {
				t.Fatal(err)
			}
			_ = conn.Close()

			sock2, _ := c.export(v.ID, "node-2", 30*time.Second)
			conn2 := c.dial(sock2, 10*time.Second)
			checkModel(t, m, conn2, "read through node-2")
		})
	}
}

// waitClean waits until no replica of v has a dirty extent: the engine has
// declared a clean point since the last write.
func (c *devCluster) waitClean(v volumeJSON, timeout time.Duration) {
	c.t.Helper()
	addrs := map[string]string{}
	for _, n := range c.nodes() {
		addrs[n.ID] = n.Data
	}
	tlsOpt := c.replicaTLS()
	start := time.Now()
	eventually(c.t, timeout, "a clean point on every replica", func() error {
		for _, r := range v.Replicas {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			rc, err := replica.Dial(ctx, addrs[r.Node], r.ID, v.Size, tlsOpt)
			if err != nil {
				cancel()
				return err
			}
			info, err := rc.Info(ctx)
			_ = rc.Close()
			cancel()
			if err != nil {
				return err
			}
			if info.DirtyExtents > 0 {
				return fmt.Errorf("replica %s has %d dirty extents", r.ID, info.DirtyExtents)
			}
		}
		return nil
	})
	c.t.Logf("clean point on every replica %v after the flush", time.Since(start).Round(time.Millisecond))
}
