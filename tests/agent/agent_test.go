// Package agent starts a node agent in process (driver/agent) and drives
// its CSI Node service through its unix socket, as kubelet does. It needs
// root: staging makes a FUSE mount and loop devices.
package agent

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cairn-csi/cairn/driver/agent"
	"github.com/cairn-csi/cairn/internal/loopback"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/testrig"
)

// promptly bounds the staging of a block volume whose replica answers. A
// staging held up behind an engine open waiting for a silent replica would
// take that engine's I/O timeout (10 s).
const promptly = 8 * time.Second

// TestStageDoesNotWaitForAnotherVolume: on a one-node cluster started in
// process, volume a's only replica is on a node whose replica server
// accepts connections and never answers, so staging a is stuck in its
// engine's open; volume b, staged meanwhile, is staged at once.
func TestStageDoesNotWaitForAnotherVolume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (FUSE, loop devices); run it as root, as CI does")
	}
	dir := t.TempDir()
	addrs, err := loopback.Addrs(2, 3)
	if err != nil {
		t.Fatal(err)
	}
	self := addrs[0]
	endpoint := "unix://" + filepath.Join(dir, "csi.sock")
	a, err := agent.Start(agent.Config{
		ID: "node-1", DataDir: filepath.Join(dir, "node-1"),
		RaftAddr: self[0], APIAddr: self[1], DataAddr: self[2],
		BootstrapExpect: 1, RaftTimeoutMultiplier: 0.2,
		HeartbeatInterval: 200 * time.Millisecond, NodeDownAfter: time.Hour, StaleReplicaTimeout: time.Hour,
		IOSchedDepth: 256, IOSchedSpareWhileReserved: 2,
		CSIEndpoint: endpoint, CSIAllowedRoots: []string{dir},
		Version: "test", Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("agent Close: %v", err)
		}
	})
	c, err := meta.NewClient([]string{a.APIAddr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)

	// The silent node: a listener on the second host's data address that
	// accepts and never answers.
	_, accepted := testrig.SilentListener(t, addrs[1][2])
	for {
		_, err := c.Apply(ctx, &meta.RegisterNode{Node: meta.Node{ID: "s1", RaftAddr: addrs[1][0], APIAddr: addrs[1][1],
			DataAddr: addrs[1][2], CapacityBytes: 10 << 30, FreeBytes: 10 << 30}})
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("register the silent node: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// node-1 registers itself with its first heartbeat.
	for {
		st, err := c.State(ctx, true)
		if err == nil && st.Nodes["node-1"] != nil && st.Nodes["node-1"].DataAddr != "" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("node-1 did not register: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	volA := createAttached(ctx, t, c, "a", "s1")
	volB := createAttached(ctx, t, c, "b", "node-1")

	cc, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	node := csipb.NewNodeClient(cc)
	block := &csipb.VolumeCapability{AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	stage := func(ctx context.Context, id string) error {
		_, err := node.NodeStageVolume(ctx, &csipb.NodeStageVolumeRequest{VolumeId: id,
			StagingTargetPath: filepath.Join(dir, "staging", id), VolumeCapability: block})
		return err
	}

	doneA := make(chan error, 1)
	go func() { doneA <- stage(ctx, volA.ID) }()
	select {
	case <-accepted:
	case err := <-doneA:
		t.Fatalf("staging %s ended before its replica's server was dialled: %v", volA.ID, err)
	case <-time.After(promptly):
		t.Fatalf("staging %s did not dial its replica's server within %v", volA.ID, promptly)
	}
	start := time.Now()
	if err := stage(ctx, volB.ID); err != nil {
		t.Fatalf("stage %s while %s's engine is opening: %v", volB.ID, volA.ID, err)
	}
	took := time.Since(start)
	if took > promptly {
		t.Errorf("staging %s took %v while %s's engine was opening, want under %v", volB.ID, took, volA.ID, promptly)
	}
	t.Logf("staged %s in %v while %s's engine was opening", volB.ID, took, volA.ID)
	select {
	case err := <-doneA:
		t.Fatalf("staging %s ended (%v) before %s's: the test proves nothing", volA.ID, err, volB.ID)
	default:
	}
	if _, err := node.NodeUnstageVolume(ctx, &csipb.NodeUnstageVolumeRequest{VolumeId: volB.ID,
		StagingTargetPath: filepath.Join(dir, "staging", volB.ID)}); err != nil {
		t.Fatalf("unstage %s: %v", volB.ID, err)
	}
	if err := <-doneA; err == nil {
		t.Fatalf("staging %s, whose only replica never answers, succeeded", volA.ID)
	}
}

// createAttached creates a 16 MiB volume with one replica on node on and
// attaches it to node-1, as ControllerPublishVolume would.
func createAttached(ctx context.Context, t *testing.T, c *meta.Client, name, on string) *meta.Volume {
	t.Helper()
	res, err := c.Apply(ctx, &meta.CreateVolume{ID: "vol-" + name, Name: name, SizeBytes: 16 << 20, Replicas: 1, PreferredNode: on})
	if err != nil {
		t.Fatal(err)
	}
	if v := res.Volume; len(v.Replicas) != 1 || v.Replicas[0].Node != on {
		t.Fatalf("volume %s placed on %v, want one replica on %s", v.ID, v.Replicas, on)
	}
	res, err = c.Apply(ctx, &meta.AttachVolume{VolumeID: res.Volume.ID, NodeID: "node-1", ExpectEpoch: res.Volume.Epoch})
	if err != nil {
		t.Fatal(err)
	}
	return res.Volume
}
