package devcluster

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestDevClusterTLS: `cairn dev up --tls` runs every port with mutual TLS,
// with certificates it issues itself. ctl with the ctl certificate
// manages the cluster; without one, or with a monitor certificate, it is
// refused what it may not do, and nothing changes. A 3-replica volume
// staged through CSI writes through the engine's TLS connections to the
// replicas, and verify compares them over the replica port.
func TestDevClusterTLS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: FUSE, loop devices, mkfs and mount")
	}
	dir := filepath.Join(t.TempDir(), "cluster")
	t.Cleanup(func() {
		if r := run(t, "dev", "down", "--dir", dir); r.code != 0 {
			t.Errorf("dev down: exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
	})
	up := mustRun(t, "dev", "up", "--nodes", "3", "--dir", dir, "--tls")
	ctlDir := filepath.Join(dir, "pki", "ctl")
	if !strings.Contains(up, "CAIRN_TLS_DIR="+ctlDir) {
		t.Errorf("dev up --tls does not tell how to point ctl at its certificate:\n%s", up)
	}
	servers := agentsOf(t, dir)
	ctl := func(args ...string) result {
		return run(t, append([]string{"ctl", "--server", servers, "--timeout", "5s"}, args...)...)
	}
	withCert := func(certDir string, args ...string) []string { return append([]string{"--tls-dir", certDir}, args...) }

	st := decode[statusJSON](t, mustRun(t, append([]string{"ctl", "--server", servers}, withCert(ctlDir, "status", "-o", "json")...)...))
	if st.Leader == "" || len(st.Members) != 3 {
		t.Fatalf("status over TLS: %+v", st)
	}
	if out := mustRun(t, "ctl", "--tls-dir", ctlDir, "cert", "status"); !strings.Contains(out, "identity: ctl/ctl") || !strings.Contains(out, "cairn dev cluster CA") {
		t.Errorf("cert status:\n%s", out)
	}

	// Without a certificate: refused, and it says why.
	if r := ctl("status"); r.code == 0 {
		t.Fatalf("status without a certificate succeeded:\n%s", r.stdout)
	}
	// A monitor may look, not change.
	monDir := filepath.Join(dir, "pki", "monitor")
	mustRun(t, "ca", "issue", "--ca-dir", filepath.Join(dir, "pki", "ca"), "--role", "monitor", "--name", "grafana", "--out", monDir)
	if r := ctl(withCert(monDir, "status")...); r.code != 0 {
		t.Fatalf("status with a monitor certificate: exit %d: %s", r.code, r.stderr)
	}
	if r := ctl(withCert(monDir, "volume", "create", "nope", "--size", "16Mi", "--replicas", "1")...); r.code == 0 || !strings.Contains(strings.ToLower(r.stderr), "permission") {
		t.Fatalf("volume create with a monitor certificate: exit %d, stderr %q; want refused for permission", r.code, r.stderr)
	}
	if out := mustRun(t, append([]string{"ctl", "--server", servers}, withCert(ctlDir, "volume", "list")...)...); strings.Contains(out, "nope") {
		t.Fatalf("a refused create left a volume:\n%s", out)
	}

	// The data path over TLS: the engine on node-1 reaches the replicas
	// on the other nodes through their TLS replica ports.
	vol := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "create", "tls-data", "--size", "64Mi",
		"--param", "replicas=3", "--param", "csi.storage.k8s.io/fstype=ext4"))
	mnt := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "publish", vol, "--node", "node-1"))
	want := strings.Repeat("over mutual TLS\n", 4096)
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte(want), 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "dev", "csi", "--dir", dir, "unpublish", vol, "--node", "node-1")
	if out := mustRun(t, append([]string{"ctl", "--server", servers}, withCert(ctlDir, "volume", "verify", vol)...)...); !strings.Contains(out, "3 healthy replicas identical") {
		t.Fatalf("verify over the TLS replica ports:\n%s", out)
	}
	// A restarted node rejoins over TLS and the data reads back on another node.
	mustRun(t, "dev", "kill", "--dir", dir, "node-2")
	mustRun(t, "dev", "start", "--dir", dir, "node-2")
	mnt = strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "publish", vol, "--node", "node-3"))
	if got, err := os.ReadFile(filepath.Join(mnt, "f")); err != nil || string(got) != want {
		t.Fatalf("read back on node-3: %d bytes, %v", len(got), err)
	}
	mustRun(t, "dev", "csi", "--dir", dir, "unpublish", vol, "--node", "node-3")
}
