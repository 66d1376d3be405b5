package devcluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
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
		// The CA goes with the cluster: a later dev up in dir makes a new one.
		if _, err := os.Stat(filepath.Join(dir, "pki")); !os.IsNotExist(err) {
			t.Errorf("dev down left %s/pki (%v)", dir, err)
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
	// With --server, every member's certificate and its expiry.
	if out := mustRun(t, "ctl", "--server", servers, "--tls-dir", ctlDir, "cert", "status"); strings.Count(out, "node/node-") != 3 {
		t.Errorf("cert status --server does not show the three members' certificates:\n%s", out)
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

// TestTLSRotationUnderLoad: the cluster CA is replaced while a 3-replica
// volume is written through ext4 with fsync, without a restart: first the
// new CA joins every bundle, then every certificate is reissued by it, then
// the old CA leaves the bundles. The writer sees no error, every
// acknowledged record reads back, and afterwards only the new CA's
// certificates get in: a restarted node rejoins with its new certificate,
// and ctl with an old one is refused.
func TestTLSRotationUnderLoad(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: FUSE, loop devices, mkfs and mount")
	}
	dir := filepath.Join(t.TempDir(), "cluster")
	t.Cleanup(func() {
		if r := run(t, "dev", "down", "--dir", dir); r.code != 0 {
			t.Errorf("dev down: exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
	})
	mustRun(t, "dev", "up", "--nodes", "3", "--dir", dir, "--tls")
	pkiDir := filepath.Join(dir, "pki")
	servers := agentsOf(t, dir)
	ctlDir := filepath.Join(pkiDir, "ctl")
	vol := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "create", "rotate", "--size", "128Mi",
		"--param", "replicas=3", "--param", "csi.storage.k8s.io/fstype=ext4"))
	mnt := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "publish", vol, "--node", "node-1"))

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	w := startSyncWriter(t, ctx, filepath.Join(mnt, "records"))
	waitFor := func(n int64) {
		t.Helper()
		eventually(t, 30*time.Second, fmt.Sprintf("%d acknowledged records", n), func() error {
			if err := w.failed(); err != nil {
				t.Fatalf("the fsync writer failed during the rotation: %v", err)
			}
			if got := w.acked(); got < n {
				return fmt.Errorf("%d acknowledged", got)
			}
			return nil
		})
	}
	waitFor(100)

	idents := []string{"node-1", "node-2", "node-3", "controller", "ctl"}
	oldCA := readFile(t, filepath.Join(pkiDir, "ca", "ca.crt"))
	oldCtl := filepath.Join(t.TempDir(), "old-ctl")
	copyDir(t, ctlDir, oldCtl)
	newCADir := filepath.Join(pkiDir, "ca-next")
	mustRun(t, "ca", "init", "--dir", newCADir, "--name", "cairn dev cluster CA, next")
	newCA := readFile(t, filepath.Join(newCADir, "ca.crt"))
	// The credentials are read again at the next handshake once their
	// files changed, looked at every 5 s: each step gives them that.
	settle := func() { waitFor(w.acked() + 50); time.Sleep(6 * time.Second) }
	// 1. Both CAs trusted everywhere.
	for _, id := range idents {
		writeFile(t, filepath.Join(pkiDir, id, "ca.crt"), oldCA+newCA)
	}
	settle()
	// 2. New certificates from the new CA.
	for _, id := range idents {
		role := "node"
		if !strings.HasPrefix(id, "node-") {
			role = "ctl"
		}
		mustRun(t, "ca", "issue", "--ca-dir", newCADir, "--role", role, "--name", id, "--out", filepath.Join(pkiDir, id))
	}
	settle()
	// 3. The old CA no longer trusted.
	for _, id := range idents {
		writeFile(t, filepath.Join(pkiDir, id, "ca.crt"), newCA)
	}
	settle()
	// New connections everywhere: node-2 restarts and must rejoin with
	// its new certificate while the writer goes on.
	mustRun(t, "dev", "kill", "--dir", dir, "node-2")
	mustRun(t, "dev", "start", "--dir", dir, "node-2")
	waitFor(w.acked() + 100)
	stop()
	if err, _ := w.wait(); err != nil {
		t.Fatalf("the fsync writer failed during the rotation: %v", err)
	}

	st := decode[statusJSON](t, mustRun(t, "ctl", "--server", servers, "--tls-dir", ctlDir, "status", "-o", "json"))
	if nodeState(st, "node-2") != "up" || len(st.Members) != 3 {
		t.Fatalf("after the rotation and a restart: %+v", st)
	}
	if out := mustRun(t, "ctl", "--tls-dir", ctlDir, "cert", "status"); !strings.Contains(out, "next") || strings.Count(out, "trusts:") != 1 {
		t.Errorf("cert status after the rotation:\n%s", out)
	}
	if r := run(t, "ctl", "--server", servers, "--tls-dir", oldCtl, "--timeout", "3s", "status"); r.code == 0 {
		t.Fatalf("a certificate of the old CA still gets in after the rotation:\n%s", r.stdout)
	}
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
	w.verify(t)
	t.Logf("%d records written and read back across the CA rotation", w.acked())
	mustRun(t, "dev", "csi", "--dir", dir, "unpublish", vol, "--node", "node-1")
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	// Through a rename, as a rotation tool would: a reader never sees half.
	if err := os.WriteFile(path+".new", []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".new", path); err != nil {
		t.Fatal(err)
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
