package pki

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const (
	testCAValidity   = 24 * time.Hour
	testCertValidity = time.Hour
	ioTimeout        = 5 * time.Second
)

// handshakeResult is what the test server learned from one connection.
type handshakeResult struct {
	err  error    // the server's handshake error
	id   Identity // the peer's identity, when the handshake succeeded
	idOK bool     // whether PeerIdentity was obtained at all
	leaf *x509.Certificate
}

// startServer listens on 127.0.0.1 with cfg and handles connections one at a
// time: it completes the handshake, reads the peer's identity, writes one
// byte on success and closes. Each connection's result goes to the channel.
func startServer(t *testing.T, cfg *tls.Config) (addr string, results <-chan handshakeResult) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	ch := make(chan handshakeResult, 64)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			ch <- serveOne(conn)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return ln.Addr().String(), ch
}

func serveOne(conn net.Conn) handshakeResult {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	tc := conn.(*tls.Conn)
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	if err := tc.HandshakeContext(ctx); err != nil {
		return handshakeResult{err: err}
	}
	cs := tc.ConnectionState()
	id, err := PeerIdentity(cs)
	if err != nil {
		return handshakeResult{err: err}
	}
	res := handshakeResult{id: id, idOK: true}
	if len(cs.PeerCertificates) > 0 {
		res.leaf = cs.PeerCertificates[0]
	}
	if _, err := tc.Write([]byte{1}); err != nil {
		res.err = err
	}
	return res
}

// dial connects to addr with cfg, completes the handshake and reads the
// server's byte (which surfaces a refusal the server sends after the
// client's side of a TLS 1.3 handshake is done). It returns the client's
// view of the server's identity.
func dial(t *testing.T, addr string, cfg *tls.Config) (Identity, error) {
	t.Helper()
	d := &net.Dialer{Timeout: ioTimeout}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return Identity{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(ioTimeout))
	buf := make([]byte, 1)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return Identity{}, err
	}
	return PeerIdentity(conn.ConnectionState())
}

func recvResult(t *testing.T, results <-chan handshakeResult) handshakeResult {
	t.Helper()
	select {
	case r := <-results:
		return r
	case <-time.After(2 * ioTimeout):
		t.Fatal("the server reported no handshake")
		return handshakeResult{}
	}
}

// newCluster makes a CA in a temp dir and issues and loads node-1 and ctl-1.
func newCluster(t *testing.T, caName string) (ca *CA, dir string, node, ctl *Credentials) {
	t.Helper()
	dir = t.TempDir()
	ca, err := InitCA(dir, caName, testCAValidity)
	if err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	node = issueAndLoad(t, ca, Identity{Role: RoleNode, Name: "node-1"}, FilesIn(dir, "node-1"))
	ctl = issueAndLoad(t, ca, Identity{Role: RoleCtl, Name: "ctl-1"}, FilesIn(dir, "ctl-1"))
	return ca, dir, node, ctl
}

func issueAndLoad(t *testing.T, ca *CA, id Identity, f Files) *Credentials {
	t.Helper()
	if err := ca.Issue(id, testCertValidity, f); err != nil {
		t.Fatalf("Issue %v: %v", id, err)
	}
	c, err := Load(f)
	if err != nil {
		t.Fatalf("Load %v: %v", id, err)
	}
	return c
}

func TestMutualTLSAcceptsTheClusterAndReadsIdentity(t *testing.T) {
	ca, _, node, ctl := newCluster(t, "test-ca")

	wantNode := Identity{Role: RoleNode, Name: "node-1"}
	wantCtl := Identity{Role: RoleCtl, Name: "ctl-1"}
	if got := node.Identity(); got != wantNode {
		t.Errorf("node Identity() = %v, want %v", got, wantNode)
	}
	if got := ctl.Identity(); got != wantCtl {
		t.Errorf("ctl Identity() = %v, want %v", got, wantCtl)
	}
	for _, c := range []*Credentials{node, ctl} {
		na := c.NotAfter()
		if !na.After(time.Now()) {
			t.Errorf("%v NotAfter() = %v, not in the future", c.Identity(), na)
		}
		if na.After(ca.Cert.NotAfter) {
			t.Errorf("%v NotAfter() = %v, after the CA's %v", c.Identity(), na, ca.Cert.NotAfter)
		}
	}

	addr, results := startServer(t, node.ServerConfig())
	serverID, err := dial(t, addr, ctl.ClientConfig())
	if err != nil {
		t.Fatalf("client: %v", err)
	}
	if serverID != wantNode {
		t.Errorf("client sees the server as %v, want %v", serverID, wantNode)
	}
	r := recvResult(t, results)
	if r.err != nil {
		t.Fatalf("server: %v", r.err)
	}
	if !r.idOK || r.id != wantCtl {
		t.Errorf("server sees the client as %v (obtained %v), want %v", r.id, r.idOK, wantCtl)
	}
}

func TestRefusesStrangers(t *testing.T) {
	_, dir, node, ctl := newCluster(t, "cluster-ca")
	addr, results := startServer(t, node.ServerConfig())

	// expectRefused checks that a client was refused by the server.
	expectRefused := func(t *testing.T, clientErr error) {
		t.Helper()
		r := recvResult(t, results)
		if r.err == nil {
			t.Errorf("the server accepted the client (identity %v)", r.id)
		}
		if r.idOK {
			t.Errorf("the server obtained a peer identity %v", r.id)
		}
		if clientErr == nil {
			t.Errorf("the client saw no error")
		}
	}

	t.Run("no certificate", func(t *testing.T) {
		_, err := dial(t, addr, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
		expectRefused(t, err)
	})

	t.Run("another CA", func(t *testing.T) {
		otherDir := t.TempDir()
		other, err := InitCA(otherDir, "other-ca", testCAValidity)
		if err != nil {
			t.Fatalf("InitCA: %v", err)
		}
		// The stranger trusts the cluster CA, so only the server's check
		// of the stranger's certificate can fail.
		f := FilesIn(otherDir, "ctl-1")
		f.CA = filepath.Join(dir, CACertFile)
		stranger := issueAndLoad(t, other, Identity{Role: RoleCtl, Name: "ctl-1"}, f)
		_, err = dial(t, addr, stranger.ClientConfig())
		expectRefused(t, err)
	})

	t.Run("server is not a node", func(t *testing.T) {
		ctlAddr, ctlResults := startServer(t, ctl.ServerConfig())
		client := issueAndLoad(t, mustLoadCA(t, dir), Identity{Role: RoleCtl, Name: "ctl-2"}, FilesIn(dir, "ctl-2"))
		_, err := dial(t, ctlAddr, client.ClientConfig())
		if err == nil {
			t.Fatal("the client accepted a ctl server")
		}
		if !strings.Contains(err.Error(), "not a node") {
			t.Errorf("client error %q does not mention %q", err, "not a node")
		}
		r := recvResult(t, ctlResults)
		if r.err == nil || r.idOK {
			t.Errorf("the ctl server completed a handshake the client refused (err %v, identity %v)", r.err, r.id)
		}
	})
}

func mustLoadCA(t *testing.T, dir string) *CA {
	t.Helper()
	ca, err := LoadCA(dir)
	if err != nil {
		t.Fatalf("LoadCA: %v", err)
	}
	return ca
}

func TestIssueRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	ca, err := InitCA(dir, "test-ca", testCAValidity)
	if err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	if err := ca.Issue(Identity{Role: "admin", Name: "a"}, testCertValidity, FilesIn(dir, "a")); err == nil {
		t.Error("Issue accepted role admin")
	}
	if _, err := os.Stat(filepath.Join(dir, "a.crt")); err == nil {
		t.Error("Issue with a bad role wrote a certificate")
	}
	if err := ca.Issue(Identity{Role: RoleCtl, Name: ""}, testCertValidity, FilesIn(dir, "empty")); err == nil {
		t.Error("Issue accepted an empty name")
	}

	before, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := InitCA(dir, "again", testCAValidity); err == nil {
		t.Error("a second InitCA in the same dir succeeded")
	}
	after, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Error("a refused InitCA changed ca.crt")
	}
}

func TestRotationReloadsFiles(t *testing.T) {
	_, dir, node, ctl := newCluster(t, "old-ca")
	addr, results := startServer(t, node.ServerConfig())

	if _, err := dial(t, addr, ctl.ClientConfig()); err != nil {
		t.Fatalf("client before the rotation: %v", err)
	}
	if r := recvResult(t, results); r.err != nil {
		t.Fatalf("server before the rotation: %v", r.err)
	}

	newDir := t.TempDir()
	newCA, err := InitCA(newDir, "new-ca", testCAValidity)
	if err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	oldPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		t.Fatal(err)
	}
	bundle := append(append([]byte{}, oldPEM...), newCA.PEM...)
	// node and ctl share dir, so they share ca.crt.
	nodeFiles, ctlFiles := node.Files(), ctl.Files()
	for _, p := range []string{nodeFiles.CA, ctlFiles.CA} {
		if err := os.WriteFile(p, bundle, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := newCA.Issue(Identity{Role: RoleCtl, Name: "ctl-1"}, testCertValidity, ctlFiles); err != nil {
		t.Fatalf("Issue from the new CA: %v", err)
	}
	if got, _ := os.ReadFile(ctlFiles.CA); !bytes.Equal(got, bundle) {
		t.Fatal("Issue replaced the existing CA bundle")
	}
	// Make sure the times differ from what was loaded, whatever the
	// file system's time resolution.
	future := time.Now().Add(time.Minute)
	for _, p := range []string{nodeFiles.CA, ctlFiles.CA, ctlFiles.Cert, ctlFiles.Key} {
		if err := os.Chtimes(p, future, future); err != nil {
			t.Fatal(err)
		}
	}

	// The credentials look at the files at most every reloadEvery.
	deadline := time.Now().Add(reloadEvery + 5*time.Second)
	for attempt := 1; ; attempt++ {
		serverID, clientErr := dial(t, addr, ctl.ClientConfig())
		r := recvResult(t, results)
		if clientErr == nil && r.err == nil && r.idOK && r.leaf != nil && r.leaf.CheckSignatureFrom(newCA.Cert) == nil {
			if r.id != (Identity{Role: RoleCtl, Name: "ctl-1"}) {
				t.Errorf("server sees the rotated client as %v", r.id)
			}
			if serverID != (Identity{Role: RoleNode, Name: "node-1"}) {
				t.Errorf("the rotated client sees the server as %v", serverID)
			}
			t.Logf("the rotated certificate was accepted after %d attempts", attempt)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the server never accepted the certificate from the new CA (last: client %v, server %v)", clientErr, r.err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func TestAllow(t *testing.T) {
	err := Allow(Identity{Role: RoleMonitor, Name: "m"}, "apply", RoleNode, RoleCtl)
	if !errors.Is(err, ErrPermissionDenied) {
		t.Errorf("Allow(monitor) = %v, want ErrPermissionDenied", err)
	}
	if err := Allow(Identity{Role: RoleCtl, Name: "c"}, "apply", RoleNode, RoleCtl); err != nil {
		t.Errorf("Allow(ctl) = %v, want nil", err)
	}
}

// TestRotationThroughTheCADirectory: how a CA is replaced where each pod
// issues its certificate from a shared CA directory (the chart's Secret):
// in three steps, each rolled out to every pod before the next. (a) ca.crt
// bundles the old and the new CA, ca.key is still the old one; (b) the key
// is the new CA's; (c) ca.crt holds the new CA only. LoadCA finds the
// certificate of the key wherever it is in the bundle, and Issue hands the
// whole bundle to the pod, so a pod of one step and a pod of the next
// always accept each other.
func TestRotationThroughTheCADirectory(t *testing.T) {
	oldCA, err := InitCA(filepath.Join(t.TempDir(), "old"), "old", testCAValidity)
	if err != nil {
		t.Fatal(err)
	}
	newCA, err := InitCA(filepath.Join(t.TempDir(), "new"), "new", testCAValidity)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := func(ca *CA) []byte {
		der, err := x509.MarshalECPrivateKey(ca.Key)
		if err != nil {
			t.Fatal(err)
		}
		return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	}
	bundle := append(append([]byte{}, oldCA.PEM...), newCA.PEM...)
	steps := []struct {
		name      string
		crt       []byte
		key       *CA
		issuedBy  *CA
		trustsOld bool
	}{
		{"before", oldCA.PEM, oldCA, oldCA, true},
		{"(a) both trusted, old key", bundle, oldCA, oldCA, true},
		{"(b) both trusted, new key", bundle, newCA, newCA, true},
		{"(c) new only", newCA.PEM, newCA, newCA, false},
	}
	pods := make([]*Credentials, len(steps))
	for i, st := range steps {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, CACertFile), st.crt, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, CAKeyFile), keyPEM(st.key), 0o600); err != nil {
			t.Fatal(err)
		}
		ca := mustLoadCA(t, dir)
		if !ca.Cert.Equal(st.issuedBy.Cert) {
			t.Fatalf("%s: LoadCA took %q, want the CA of the key, %q", st.name, ca.Cert.Subject.CommonName, st.issuedBy.Cert.Subject.CommonName)
		}
		pods[i] = issueAndLoad(t, ca, Identity{Role: RoleNode, Name: fmt.Sprintf("node-%d", i)}, FilesIn(t.TempDir(), "tls"))
		got, err := os.ReadFile(pods[i].Files().CA)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, st.crt) {
			t.Errorf("%s: the pod's ca.crt is not the directory's bundle", st.name)
		}
	}
	// Neighbouring steps, both ways.
	for i := 0; i+1 < len(pods); i++ {
		for _, pair := range [][2]int{{i, i + 1}, {i + 1, i}} {
			srv, cli := pods[pair[0]], pods[pair[1]]
			addr, results := startServer(t, srv.ServerConfig())
			if _, err := dial(t, addr, cli.ClientConfig()); err != nil {
				t.Errorf("a pod of %q dialing one of %q: %v", steps[pair[1]].name, steps[pair[0]].name, err)
			}
			if r := recvResult(t, results); r.err != nil {
				t.Errorf("a pod of %q accepting one of %q: %v", steps[pair[0]].name, steps[pair[1]].name, r.err)
			}
		}
	}
	// Skipping a step breaks: before and (c) share no CA.
	addr, results := startServer(t, pods[0].ServerConfig())
	if _, err := dial(t, addr, pods[3].ClientConfig()); err == nil {
		if r := recvResult(t, results); r.err == nil {
			t.Error("a pod of the old CA only and one of the new CA only accepted each other")
		}
	}

	// A key with no certificate of its own in ca.crt is refused by name.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, CACertFile), oldCA.PEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, CAKeyFile), keyPEM(newCA), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadCA(dir); err == nil || !strings.Contains(err.Error(), "matches") {
		t.Errorf("LoadCA of a key without its certificate: %v, want an error naming the mismatch", err)
	}
}
