// Package csie2e drives Cairn's CSI services the way kubelet and the
// sidecars do, through the kernel: a real ext4 on a loop device on a FUSE
// file served by the engine, on a local 3-node cluster of real processes.
// It needs root.
package csie2e

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"github.com/cairn-csi/cairn/tests/logcheck"
	"github.com/cairn-csi/cairn/tests/testbin"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

var cairnBin string

func TestMain(m *testing.M) { testbin.Main(m, &cairnBin) }

type cluster struct {
	t          *testing.T
	dir        string
	agents     string
	controller csipb.ControllerClient
	nodes      map[string]csipb.NodeClient
	metrics    map[string]string // node id → metrics host:port
}

type clusterJSON struct {
	Nodes []struct {
		ID      string `json:"id"`
		Agent   string `json:"agent"`
		CSI     string `json:"csi"`
		Log     string `json:"log"`
		Metrics string `json:"metrics"`
	} `json:"nodes"`
	Controller struct {
		CSI string `json:"csi"`
	} `json:"controller"`
}

func cairn(t *testing.T, args ...string) string {
	t.Helper()
	out, err := cairnCmd(args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cairn %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The clusters run with mutual TLS (dev up --tls), as users should run
// them: the CSI flows (snapshots, restores, flattening, expansion,
// encryption) go through the meta API's and the replica port's role
// checks. ctlCerts maps a cluster's --server list to its ctl certificate.
var (
	ctlCertsMu sync.Mutex
	ctlCerts   = map[string]string{}
)

// cairnCmd is the cairn command with args; a `--server LIST` of a cluster
// started here gets that cluster's ctl certificate (CAIRN_TLS_DIR).
func cairnCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(cairnBin, args...)
	for i, a := range args {
		if a == "--server" && i+1 < len(args) {
			ctlCertsMu.Lock()
			dir := ctlCerts[args[i+1]]
			ctlCertsMu.Unlock()
			if dir != "" {
				cmd.Env = append(os.Environ(), "CAIRN_TLS_DIR="+dir)
			}
		}
	}
	return cmd
}

func dial(t *testing.T, endpoint string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("unix://"+strings.TrimPrefix(endpoint, "unix://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	return startClusterOf(t, 3)
}

// startClusterOf starts a dev cluster of n nodes (cairn dev up), each node
// agent given nodeArgs besides its own flags.
func startClusterOf(t *testing.T, n int, nodeArgs ...string) *cluster {
	t.Helper()
	return startClusterWith(t, n, nil, nodeArgs...)
}

// startClusterWith is startClusterOf with upArgs for cairn dev up.
func startClusterWith(t *testing.T, n int, upArgs []string, nodeArgs ...string) *cluster {
	t.Helper()
	return startClusterIn(t, filepath.Join(t.TempDir(), "cluster"), n, upArgs, nodeArgs...)
}

// startClusterIn is startClusterWith in dir, which may already hold
// directories the test prepared (a file system mounted where a node's
// data directory will be).
func startClusterIn(t *testing.T, dir string, n int, upArgs []string, nodeArgs ...string) *cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (FUSE, loop devices, mkfs, mount); run it as root, as CI does")
	}
	var cj clusterJSON
	t.Cleanup(func() {
		// The node plugins' lines (staging, FUSE, their engines) name
		// their node once, like every other component's. dev down
		// removes the logs.
		for _, n := range cj.Nodes {
			logcheck.Check(t, n.Log, n.ID)
			// Every flow here is legitimate: the role checks of mutual
			// TLS must refuse none of what the nodes ask each other.
			if b, err := os.ReadFile(n.Log); err == nil {
				if lines := logcheck.Refusals(string(b)); len(lines) > 0 {
					t.Errorf("%s's log shows calls refused by the role checks:\n%s", n.ID, strings.Join(lines, "\n"))
				}
			}
		}
		out, err := exec.Command(cairnBin, "dev", "down", "--dir", dir).CombinedOutput()
		if err != nil {
			t.Errorf("dev down: %v\n%s", err, out)
		}
		assertNothingLeft(t, dir)
	})
	args := append([]string{"dev", "up", "--nodes", strconv.Itoa(n), "--dir", dir, "--tls"}, upArgs...)
	for _, a := range nodeArgs {
		args = append(args, "--node-arg="+a)
	}
	cairn(t, args...)
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &cj); err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, dir: dir, nodes: map[string]csipb.NodeClient{}, metrics: map[string]string{}}
	c.controller = csipb.NewControllerClient(dial(t, cj.Controller.CSI))
	var agents []string
	for _, n := range cj.Nodes {
		c.nodes[n.ID] = csipb.NewNodeClient(dial(t, n.CSI))
		c.metrics[n.ID] = n.Metrics
		agents = append(agents, n.Agent)
	}
	c.agents = strings.Join(agents, ",")
	ctlCertsMu.Lock()
	ctlCerts[c.agents] = filepath.Join(dir, "pki", "ctl")
	ctlCertsMu.Unlock()
	return c
}

// assertNothingLeft checks that no mount and no loop device of the cluster
// survives dev down.
func assertNothingLeft(t *testing.T, dir string) {
	t.Helper()
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mi), dir) {
		t.Errorf("mounts under %s remain after dev down:\n%s", dir, grepLines(string(mi), dir))
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		b, _ := os.ReadFile(bf)
		if strings.Contains(string(b), dir) {
			t.Errorf("loop device %s still backs onto %s", bf, strings.TrimSpace(string(b)))
		}
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return c
}

var mountCap = &csipb.VolumeCapability{
	AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// attach publishes, stages and publishes the volume on node as ext4; it
// returns the target path where the filesystem is mounted.
func (c *cluster) attach(id, node string) (staging, target string) {
	c.t.Helper()
	return c.attachAs(id, node, mountCap)
}

func (c *cluster) detach(id, node, staging, target string) {
	t := c.t
	t.Helper()
	if _, err := c.nodes[node].NodeUnpublishVolume(ctx(t), &csipb.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatalf("NodeUnpublishVolume: %v", err)
	}
	if _, err := c.nodes[node].NodeUnstageVolume(ctx(t), &csipb.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Fatalf("NodeUnstageVolume: %v", err)
	}
	if _, err := c.controller.ControllerUnpublishVolume(ctx(t), &csipb.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: node}); err != nil {
		t.Fatalf("ControllerUnpublishVolume: %v", err)
	}
}

// writeFiles writes n files of random content under dir, fsyncs each, and
// returns their checksums.
func writeFiles(t *testing.T, dir, prefix string, n int, seed uint64, sums map[string][32]byte) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := 0; i < n; i++ {
		b := make([]byte, 256<<10+rng.IntN(256<<10))
		for j := range b {
			b[j] = byte(rng.Uint32())
		}
		name := filepath.Join(dir, fmt.Sprintf("%s-%03d", prefix, i))
		f, err := os.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatalf("fsync %s: %v", name, err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		sums[filepath.Base(name)] = sha256.Sum256(b)
	}
}

func checkFiles(t *testing.T, dir string, sums map[string][32]byte) {
	t.Helper()
	for name, want := range sums {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatalf("read %s: %v", name, err)
		}
		if sha256.Sum256(b) != want {
			t.Fatalf("%s has changed", name)
		}
	}
}

func TestFilesSurviveReplicaLossAndMoveToAnotherNode(t *testing.T) {
	c := startCluster(t)
	resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "e2e-data", CapacityRange: &csipb.CapacityRange{RequiredBytes: 128 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: map[string]string{"replicas": "3"},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	staging, target := c.attach(id, "node-1")
	sums := map[string][32]byte{}
	writeFiles(t, target, "before", 20, 1, sums)

	// node-3 holds a replica; killing it must not stop the filesystem.
	cairn(t, "dev", "kill", "--dir", c.dir, "node-3")
	writeFiles(t, target, "during", 20, 2, sums)
	checkFiles(t, target, sums)
	out := cairn(t, "ctl", "--server", c.agents, "volume", "get", id, "-o", "json")
	if !strings.Contains(out, `"state": "failed"`) && !strings.Contains(out, `"state": "rebuilding"`) {
		t.Fatalf("the replica on the killed node is not marked failed or rebuilding:\n%s", out)
	}
	h, err := c.controller.ControllerGetVolumeHealth(ctx(t), &csipb.ControllerGetVolumeHealthRequest{VolumeId: id})
	if err != nil {
		t.Fatal(err)
	}
	if len(h.GetVolumeHealth().GetHealthStatuses()) == 0 || h.GetVolumeHealth().GetHealthStatuses()[0].GetStatus() != csipb.VolumeHealthErrorType_DEGRADED {
		t.Fatalf("health of a degraded volume: %v", h)
	}
	cairn(t, "dev", "start", "--dir", c.dir, "node-3")

	// Move the volume to node-2 and read everything back there.
	c.detach(id, "node-1", staging, target)
	staging2, target2 := c.attach(id, "node-2")
	checkFiles(t, target2, sums)
	writeFiles(t, target2, "after", 5, 3, sums)
	c.detach(id, "node-2", staging2, target2)

	// Once the returning replica is rebuilt, all three are identical.
	deadline := time.Now().Add(60 * time.Second)
	for {
		out := cairn(t, "ctl", "--server", c.agents, "volume", "get", id, "-o", "json")
		if strings.Count(out, `"state": "healthy"`) == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("replicas not all healthy within 60s:\n%s", out)
		}
		time.Sleep(300 * time.Millisecond)
	}
	cairn(t, "ctl", "--server", c.agents, "volume", "verify", id)
	if _, err := c.controller.DeleteVolume(ctx(t), &csipb.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Fatal(err)
	}
}

func TestFlushReachesEveryReplica(t *testing.T) {
	c := startCluster(t)
	resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
		Name: "e2e-flush", CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
		VolumeCapabilities: []*csipb.VolumeCapability{mountCap},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetVolume().GetVolumeId()
	staging, target := c.attach(id, "node-1")
	sums := map[string][32]byte{}
	writeFiles(t, target, "flushed", 5, 9, sums) // each file fsynced
	// With the writes fsynced, kill every node (their page caches survive a
	// process kill, so what we prove is that the engine flushed to every
	// replica's file and that replicas agree) and bring them back.
	c.detach(id, "node-1", staging, target)
	cairn(t, "ctl", "--server", c.agents, "volume", "verify", id)
	for _, n := range []string{"node-1", "node-2", "node-3"} {
		cairn(t, "dev", "kill", "--dir", c.dir, n)
	}
	for _, n := range []string{"node-1", "node-2", "node-3"} {
		cairn(t, "dev", "start", "--dir", c.dir, n)
	}
	_, target = c.attach(id, "node-2")
	checkFiles(t, target, sums)
}

func TestBadInput(t *testing.T) {
	c := startCluster(t)
	n := c.nodes["node-1"]
	outside := "/nonexistent-root/staging"
	cases := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"create without name", func() error {
			_, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{VolumeCapabilities: []*csipb.VolumeCapability{mountCap}})
			return err
		}, codes.InvalidArgument},
		{"create with unknown parameter", func() error {
			_, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: map[string]string{"replicaz": "3"}})
			if err != nil && !strings.Contains(err.Error(), "replicaz") {
				return fmt.Errorf("error does not name the key: %w", err)
			}
			return err
		}, codes.InvalidArgument},
		{"create with bad replicas", func() error {
			_, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: map[string]string{"replicas": "9"}})
			return err
		}, codes.InvalidArgument},
		{"create multi-node writer", func() error {
			_, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csipb.VolumeCapability{{
				AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
				AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER}}}})
			return err
		}, codes.InvalidArgument},
		{"create too large for its limit", func() error {
			_, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{Name: "x", VolumeCapabilities: []*csipb.VolumeCapability{mountCap},
				CapacityRange: &csipb.CapacityRange{RequiredBytes: 1<<20 + 1, LimitBytes: 1<<20 + 2}})
			return err
		}, codes.OutOfRange},
		{"create more than any node holds", func() error {
			_, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{Name: "huge", VolumeCapabilities: []*csipb.VolumeCapability{mountCap},
				CapacityRange: &csipb.CapacityRange{RequiredBytes: 15 << 40}})
			return err
		}, codes.ResourceExhausted},
		{"publish unknown volume", func() error {
			_, err := c.controller.ControllerPublishVolume(ctx(t), &csipb.ControllerPublishVolumeRequest{VolumeId: "vol-nope", NodeId: "node-1", VolumeCapability: mountCap})
			return err
		}, codes.NotFound},
		{"stage outside allowed roots", func() error {
			_, err := n.NodeStageVolume(ctx(t), &csipb.NodeStageVolumeRequest{VolumeId: "vol-nope", StagingTargetPath: outside, VolumeCapability: mountCap})
			return err
		}, codes.InvalidArgument},
		{"stage relative path", func() error {
			_, err := n.NodeStageVolume(ctx(t), &csipb.NodeStageVolumeRequest{VolumeId: "vol-nope", StagingTargetPath: "rel/path", VolumeCapability: mountCap})
			return err
		}, codes.InvalidArgument},
		{"stage unpublished volume", func() error {
			_, err := n.NodeStageVolume(ctx(t), &csipb.NodeStageVolumeRequest{VolumeId: "vol-nope", StagingTargetPath: filepath.Join(c.dir, "s"), VolumeCapability: mountCap})
			return err
		}, codes.NotFound},
		{"publish unstaged volume", func() error {
			_, err := n.NodePublishVolume(ctx(t), &csipb.NodePublishVolumeRequest{VolumeId: "vol-nope", StagingTargetPath: filepath.Join(c.dir, "s"), TargetPath: filepath.Join(c.dir, "t"), VolumeCapability: mountCap})
			return err
		}, codes.FailedPrecondition},
		{"unpublish outside allowed roots", func() error {
			_, err := n.NodeUnpublishVolume(ctx(t), &csipb.NodeUnpublishVolumeRequest{VolumeId: "v", TargetPath: "/etc"})
			return err
		}, codes.InvalidArgument},
		{"stage without capability", func() error {
			_, err := n.NodeStageVolume(ctx(t), &csipb.NodeStageVolumeRequest{VolumeId: "v", StagingTargetPath: filepath.Join(c.dir, "s")})
			return err
		}, codes.InvalidArgument},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if got := status.Code(err); got != tc.want {
				t.Fatalf("got %v (%v), want %v", got, err, tc.want)
			}
		})
	}
	// No bad call left anything behind: no volume was created.
	out := cairn(t, "ctl", "--server", c.agents, "volume", "list", "-o", "json")
	if strings.TrimSpace(out) != "[]" {
		t.Fatalf("bad requests created volumes: %s", out)
	}
}
