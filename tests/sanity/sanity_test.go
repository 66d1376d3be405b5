// Package sanity runs the Kubernetes CSI sanity suite (csi-test v5) against
// a local Cairn cluster: three real node agents and the CSI controller as
// processes, real FUSE files, loop devices, mkfs and mounts. It needs root.
package sanity

import (
	"encoding/json"
	"github.com/cairn-csi/cairn/tests/testbin"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
)

var cairnBin string

func TestMain(m *testing.M) { testbin.Main(m, &cairnBin) }

// requireRoot fails (not skips) without root: the suite mounts and attaches
// loop devices, and CI runs as root.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root (FUSE, loop devices, mkfs, mount); run it as root, as CI does")
	}
}

func TestCSISanity(t *testing.T) {
	requireRoot(t)
	dir := filepath.Join(t.TempDir(), "cluster")
	run := func(args ...string) {
		t.Helper()
		out, err := exec.Command(cairnBin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("cairn %v: %v\n%s", args, err, out)
		}
	}
	t.Cleanup(func() {
		out, err := exec.Command(cairnBin, "dev", "down", "--dir", dir).CombinedOutput()
		if err != nil {
			t.Errorf("dev down: %v\n%s", err, out)
		}
		assertNothingLeft(t, dir)
	})
	// With mutual TLS between the controller, the node agents and their
	// replicas, as users should run Cairn.
	run("dev", "up", "--nodes", "3", "--dir", dir, "--tls")
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cl struct {
		Nodes []struct {
			ID  string `json:"id"`
			CSI string `json:"csi"`
		} `json:"nodes"`
		Controller struct {
			CSI string `json:"csi"`
		} `json:"controller"`
	}
	if err := json.Unmarshal(raw, &cl); err != nil {
		t.Fatal(err)
	}
	if cl.Controller.CSI == "" || len(cl.Nodes) == 0 || cl.Nodes[0].CSI == "" {
		t.Fatalf("cluster.json lacks CSI endpoints: %s", raw)
	}
	cfg := sanity.NewTestConfig()
	cfg.Address = cl.Nodes[0].CSI
	cfg.ControllerAddress = cl.Controller.CSI
	// Staging and target paths must lie under the nodes' allowed roots.
	cfg.StagingPath = filepath.Join(dir, "sanity", "staging")
	cfg.TargetPath = filepath.Join(dir, "sanity", "target")
	if err := os.MkdirAll(filepath.Join(dir, "sanity"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg.TestVolumeSize = 64 << 20
	cfg.TestVolumeParameters = map[string]string{"replicas": "3"}
	cfg.TestVolumeMutableParameters = map[string]string{"maxIOPS": "5000", "burstDuration": "2s"}
	cfg.IdempotentCount = 2
	sanity.Test(t, cfg)
}

// assertNothingLeft checks that after the suite and dev down no mount, FUSE
// mount, loop device or process of the cluster remains.
func assertNothingLeft(t *testing.T, dir string) {
	t.Helper()
	mi, _ := os.ReadFile("/proc/self/mountinfo")
	for _, line := range strings.Split(string(mi), "\n") {
		if strings.Contains(line, dir) {
			t.Errorf("mount left behind: %s", line)
		}
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		if b, _ := os.ReadFile(bf); strings.Contains(string(b), dir) {
			t.Errorf("loop device left behind: %s → %s", bf, strings.TrimSpace(string(b)))
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, _ := os.ReadFile(p); strings.Contains(string(b), dir) {
			t.Errorf("process left behind: %s %q", p, strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}
