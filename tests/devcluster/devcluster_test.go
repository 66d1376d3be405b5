// Package devcluster tests the `cairn dev` and `cairn ctl` commands end to
// end: real processes, real TCP on loopback addresses, real data dirs.
package devcluster

import (
	"bytes"
	"encoding/json"
	"fmt"
	"github.com/cairn-csi/cairn/tests/logcheck"
	"github.com/cairn-csi/cairn/tests/testbin"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cairnBin is the binary under test, built once in TestMain.
var cairnBin string

func TestMain(m *testing.M) { testbin.Main(m, &cairnBin) }

// result is one finished cairn command.
type result struct {
	stdout, stderr string
	code           int
}

func run(t *testing.T, args ...string) result {
	t.Helper()
	cmd := exec.Command(cairnBin, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("cairn %v: %v", args, err)
	}
	return result{out.String(), errb.String(), code}
}

// mustRun runs cairn and fails the test unless it exits 0.
func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	r := run(t, args...)
	if r.code != 0 {
		t.Fatalf("cairn %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

type clusterJSON struct {
	Nodes []struct {
		ID      string `json:"id"`
		Agent   string `json:"agent"`
		Raft    string `json:"raft"`
		Data    string `json:"data"`
		Metrics string `json:"metrics"`
		PID     int    `json:"pid"`
		Log     string `json:"log"`
	} `json:"nodes"`
}

type statusJSON struct {
	Leader  string `json:"leader"`
	Members []struct {
		ID      string `json:"id"`
		Address string `json:"address"`
		Voter   bool   `json:"voter"`
		Leader  bool   `json:"leader"`
	} `json:"members"`
	Nodes []struct {
		ID    string `json:"id"`
		State string `json:"state"`
	} `json:"nodes"`
}

type volumeJSON struct {
	ID       string `json:"id"`
	Name     string `json:"name"`
	Size     uint64 `json:"size"`
	State    string `json:"state"`
	Epoch    uint64 `json:"epoch"`
	Replicas []struct {
		ID    string `json:"id"`
		Node  string `json:"node"`
		State string `json:"state"`
	} `json:"replicas"`
}

func decode[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("decode %T from %q: %v", v, s, err)
	}
	return v
}

func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(stat, ')')
	return !(i > 0 && i+2 < len(stat) && stat[i+2] == 'Z')
}

// eventually polls fn until it returns nil or the timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = fn(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v: %v", what, timeout, err)
}

func nodeState(st statusJSON, id string) string {
	for _, n := range st.Nodes {
		if n.ID == id {
			return n.State
		}
	}
	return "missing"
}

func TestDevClusterEndToEnd(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cluster")
	var pids []int
	t.Cleanup(func() {
		run(t, "dev", "down", "--dir", dir)
		for _, pid := range pids {
			if processAlive(pid) {
				t.Errorf("pid %d still runs after dev down; killing it", pid)
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})

	// With mutual TLS, the default: every ctl below presents the
	// certificate dev up issued for it.
	mustRun(t, "dev", "up", "--nodes", "3", "--dir", dir)
	t.Setenv("CAIRN_TLS_DIR", filepath.Join(dir, "pki", "ctl"))
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		t.Fatal(err)
	}
	cl := decode[clusterJSON](t, string(raw))
	if len(cl.Nodes) != 3 {
		t.Fatalf("cluster.json has %d nodes, want 3", len(cl.Nodes))
	}
	var servers []string
	hosts := map[string]string{}
	for _, n := range cl.Nodes {
		if n.ID == "" || n.Agent == "" || n.Raft == "" || n.Data == "" || n.Metrics == "" || n.PID <= 0 {
			t.Fatalf("cluster.json node lacks a field: %+v", n)
		}
		// Each node has a loopback address of its own, not 127.0.0.1,
		// where other processes could take a stopped node's ports before
		// it restarts (see package loopback).
		for _, a := range []string{n.Agent, n.Raft, n.Data, n.Metrics} {
			host, _, err := net.SplitHostPort(a)
			if err != nil || !net.ParseIP(host).IsLoopback() || host == "127.0.0.1" {
				t.Fatalf("%s listens on %q: want a loopback address other than 127.0.0.1", n.ID, a)
			}
			if other, ok := hosts[host]; ok && other != n.ID {
				t.Fatalf("%s and %s share the address %s", n.ID, other, host)
			}
			hosts[host] = n.ID
		}
		if !processAlive(n.PID) {
			t.Fatalf("%s (pid %d) is not running", n.ID, n.PID)
		}
		pids = append(pids, n.PID)
		servers = append(servers, n.Agent)
	}
	server := strings.Join(servers, ",")
	status := func() statusJSON {
		return decode[statusJSON](t, mustRun(t, "ctl", "--server", server, "status", "-o", "json"))
	}

	st := status()
	if st.Leader == "" || len(st.Members) != 3 || len(st.Nodes) != 3 {
		t.Fatalf("status after up: %+v", st)
	}
	for _, m := range st.Members {
		if !m.Voter || m.Address == "" {
			t.Errorf("member %+v: want a voter with an address", m)
		}
	}
	for _, n := range st.Nodes {
		if n.State != "up" {
			t.Errorf("node %s is %s after up", n.ID, n.State)
		}
	}

	v := decode[volumeJSON](t, mustRun(t, "ctl", "--server", server, "volume", "create", "v1", "--size", "64Mi", "--replicas", "3", "-o", "json"))
	if v.ID == "" || v.Name != "v1" || v.Size != 64<<20 || v.State != "available" || v.Epoch != 1 || len(v.Replicas) != 3 {
		t.Fatalf("created volume: %+v", v)
	}
	seen := map[string]bool{}
	for _, r := range v.Replicas {
		if seen[r.Node] {
			t.Fatalf("two replicas on %s: %+v", r.Node, v.Replicas)
		}
		seen[r.Node] = true
	}

	// Prometheus metrics on every node.
	resp, err := http.Get("http://" + cl.Nodes[0].Metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, name := range []string{"cairn_meta_applied_index", "cairn_meta_commit_latency_seconds", "cairn_meta_raft_state", "cairn_meta_nodes"} {
		if !bytes.Contains(body, []byte(name)) {
			t.Errorf("/metrics lacks %s", name)
		}
	}

	// Kill the leader: a new one is elected and writes go on.
	old := st.Leader
	out := mustRun(t, "dev", "kill", "--dir", dir, old)
	if !strings.Contains(out, "killed "+old) {
		t.Errorf("dev kill said %q", out)
	}
	start := time.Now()
	eventually(t, 20*time.Second, "a new leader", func() error {
		r := run(t, "ctl", "--server", server, "--timeout", "2s", "status", "-o", "json")
		if r.code != 0 {
			return fmt.Errorf("%s", r.stderr)
		}
		if s := decode[statusJSON](t, r.stdout); s.Leader == "" || s.Leader == old {
			return fmt.Errorf("leader %q", s.Leader)
		}
		return nil
	})
	t.Logf("failover (processes, SIGKILL): new leader seen after %v", time.Since(start).Round(time.Millisecond))
	mustRun(t, "ctl", "--server", server, "volume", "create", "v2", "--size", "16Mi", "--replicas", "2")
	eventually(t, 20*time.Second, old+" marked down", func() error {
		if s := nodeState(status(), old); s != "down" {
			return fmt.Errorf("%s is %s", old, s)
		}
		return nil
	})

	// Restart it: it comes back up and sees every volume.
	mustRun(t, "dev", "start", "--dir", dir, old)
	eventually(t, 20*time.Second, old+" up again", func() error {
		if s := nodeState(status(), old); s != "up" {
			return fmt.Errorf("%s is %s", old, s)
		}
		return nil
	})
	raw, _ = os.ReadFile(filepath.Join(dir, "cluster.json"))
	cl = decode[clusterJSON](t, string(raw))
	var oldAgent string
	for _, n := range cl.Nodes {
		if n.ID == old {
			oldAgent = n.Agent
			pids = append(pids, n.PID)
		}
	}
	list := decode[[]volumeJSON](t, mustRun(t, "ctl", "--server", oldAgent, "volume", "list", "-o", "json"))
	if len(list) != 2 {
		t.Fatalf("volume list through %s: %d volumes, want 2: %+v", old, len(list), list)
	}
	got := decode[volumeJSON](t, mustRun(t, "ctl", "--server", oldAgent, "volume", "get", v.ID, "-o", "json"))
	if got.ID != v.ID || len(got.Replicas) != 3 {
		t.Fatalf("volume get: %+v", got)
	}
	mustRun(t, "ctl", "--server", server, "volume", "delete", v.ID)
	if r := run(t, "ctl", "--server", server, "volume", "get", v.ID); r.code == 0 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("get of a deleted volume: exit %d, %q", r.code, r.stderr)
	}

	// Every line the node agents logged names its node once.
	for _, n := range cl.Nodes {
		logcheck.Check(t, n.Log, n.ID)
	}

	// Down stops every process (gracefully: SIGTERM is enough) and removes
	// the cluster.
	if out := mustRun(t, "dev", "down", "--dir", dir); strings.Contains(out, "did not stop") {
		t.Errorf("a node did not shut down on SIGTERM:\n%s", out)
	}
	for _, pid := range pids {
		if processAlive(pid) {
			t.Errorf("pid %d still runs after dev down", pid)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "cluster.json")); !os.IsNotExist(err) {
		t.Errorf("cluster.json still there after down: %v", err)
	}
}

// TestBadInput: unknown commands, wrong flags and bad values give a clear
// error and a non-zero exit, never a panic.
func TestBadInput(t *testing.T) {
	tmp := t.TempDir()
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"unknown command", []string{"bogus"}, "unknown command"},
		{"unknown flag", []string{"node", "--no-such-flag"}, "unknown flag"},
		{"node without id", []string{"node", "--data-dir", tmp}, "--id is required"},
		{"node without data dir", []string{"node", "--id", "n1"}, "--data-dir is required"},
		{"bootstrap and join", []string{"node", "--id", "n1", "--data-dir", tmp, "--bootstrap-expect", "1", "--join", "127.0.0.1:1"}, "exclude each other"},
		{"too few peers", []string{"node", "--id", "n1", "--data-dir", tmp, "--bootstrap-expect", "3"}, "needs at least 2 --peers"},
		{"bad address", []string{"node", "--id", "n1", "--data-dir", tmp, "--raft-addr", "nonsense"}, "--raft-addr"},
		{"bad multiplier", []string{"node", "--id", "n1", "--data-dir", tmp, "--raft-timeout-multiplier", "0"}, "--raft-timeout-multiplier"},
		{"no TLS and not insecure", []string{"node", "--id", "n1", "--data-dir", tmp}, "--tls-dir is required"},
		{"TLS and insecure", []string{"node", "--id", "n1", "--data-dir", tmp, "--tls-dir", tmp, "--insecure"}, "exclude each other"},
		{"half the TLS flags", []string{"node", "--id", "n1", "--data-dir", tmp, "--tls-cert", "x.crt"}, "--tls-ca"},
		{"ctl without server", []string{"ctl", "status"}, "--server is required"},
		{"ctl bad output", []string{"ctl", "--server", "127.0.0.1:1", "-o", "yaml", "status"}, "want table or json"},
		{"bad size", []string{"ctl", "--server", "127.0.0.1:1", "volume", "create", "x", "--size", "lots"}, "--size"},
		{"zero size", []string{"ctl", "--server", "127.0.0.1:1", "volume", "create", "x", "--size", "0"}, "--size must be more than 0"},
		{"too many replicas", []string{"ctl", "--server", "127.0.0.1:1", "volume", "create", "x", "--size", "1Mi", "--replicas", "9"}, "--replicas 9"},
		{"quorum above replicas", []string{"ctl", "--server", "127.0.0.1:1", "volume", "create", "x", "--size", "1Mi", "--replicas", "2", "--write-quorum", "3"}, "--write-quorum 3"},
		{"get without id", []string{"ctl", "--server", "127.0.0.1:1", "volume", "get"}, "accepts 1 arg"},
		{"unreachable server", []string{"ctl", "--server", "127.0.0.1:1", "--timeout", "2s", "status"}, "127.0.0.1:1"},
		{"dev without dir", []string{"dev", "up"}, "--dir is required"},
		{"dev kill without cluster", []string{"dev", "kill", "--dir", tmp, "node-1"}, "no dev cluster"},
		{"dev bad node count", []string{"dev", "up", "--dir", tmp, "--nodes", "0"}, "--nodes 0"},
		{"dev TLS and insecure", []string{"dev", "up", "--dir", tmp, "--tls", "--insecure"}, "exclude each other"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := run(t, c.args...)
			if r.code == 0 {
				t.Fatalf("exit 0, want an error; stdout %q", r.stdout)
			}
			if !strings.Contains(r.stderr, c.want) {
				t.Errorf("stderr %q does not mention %q", r.stderr, c.want)
			}
			if strings.Contains(r.stderr, "panic") || strings.Contains(r.stderr, "goroutine ") {
				t.Errorf("cairn panicked: %s", r.stderr)
			}
		})
	}
}

// TestDataDirIdentity: a data dir belongs to one node id and one cluster.
func TestDataDirIdentity(t *testing.T) {
	a := filepath.Join(t.TempDir(), "a")
	b := filepath.Join(t.TempDir(), "b")
	t.Cleanup(func() {
		run(t, "dev", "down", "--dir", a)
		run(t, "dev", "down", "--dir", b)
	})
	mustRun(t, "dev", "up", "--nodes", "1", "--dir", a)
	mustRun(t, "dev", "up", "--nodes", "1", "--dir", b)
	// Certificates for the nodes started below, each from the CA of the
	// cluster it speaks to (dev up keeps it in DIR/pki/ca): mutual TLS
	// must let them through, so that what refuses them is the data dir.
	certs := t.TempDir()
	mustRun(t, "ca", "issue", "--ca-dir", filepath.Join(a, "pki", "ca"), "--role", "node", "--name", "other", "--out", filepath.Join(certs, "other"))
	mustRun(t, "ca", "issue", "--ca-dir", filepath.Join(b, "pki", "ca"), "--role", "node", "--name", "node-1", "--out", filepath.Join(certs, "b-node-1"))
	rawB, _ := os.ReadFile(filepath.Join(b, "cluster.json"))
	cb := decode[clusterJSON](t, string(rawB))
	// Wait until cluster A's data dir records its cluster id, then stop A.
	dataA := filepath.Join(a, "node-1", "data")
	eventually(t, 10*time.Second, "cluster-id file", func() error {
		_, err := os.Stat(filepath.Join(dataA, "cluster-id"))
		return err
	})
	mustRun(t, "dev", "kill", "--dir", a, "node-1")

	t.Run("another node id", func(t *testing.T) {
		r := run(t, "node", "--id", "other", "--data-dir", dataA, "--raft-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--metrics-addr", "",
			"--tls-dir", filepath.Join(certs, "other"))
		if r.code == 0 || !strings.Contains(r.stderr, `belongs to node "node-1", not "other"`) {
			t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
	t.Run("another cluster", func(t *testing.T) {
		// A's data dir pointed at B's cluster must stop, naming both clusters.
		cmd := exec.Command(cairnBin, "node", "--id", "node-1", "--data-dir", dataA,
			"--raft-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0", "--metrics-addr", "",
			"--join", cb.Nodes[0].Agent, "--tls-dir", filepath.Join(certs, "b-node-1"))
		var errb bytes.Buffer
		cmd.Stderr = &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(errb.String(), "cluster mismatch") {
				t.Fatalf("exit %v, stderr %q", err, errb.String())
			}
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
			t.Fatalf("node with another cluster's data dir kept running; stderr %q", errb.String())
		}
		t.Logf("refused: %s", lastLine(errb.String()))
	})
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestFrozenLeader: a leader that is frozen (SIGSTOP) keeps its sockets
// open but never answers. Members that forward to it must give up on it and
// forward to the leader the others elect, so that a client talking to the
// followers gets its answer while the old leader is still frozen, and a
// command sent again on the way is applied once.
func TestFrozenLeader(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cluster")
	var frozen int
	t.Cleanup(func() {
		if frozen > 0 {
			_ = syscall.Kill(frozen, syscall.SIGCONT)
		}
		run(t, "dev", "down", "--dir", dir)
	})
	mustRun(t, "dev", "up", "--nodes", "3", "--dir", dir)
	t.Setenv("CAIRN_TLS_DIR", filepath.Join(dir, "pki", "ctl"))
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		t.Fatal(err)
	}
	cl := decode[clusterJSON](t, string(raw))
	var all []string
	for _, n := range cl.Nodes {
		all = append(all, n.Agent)
	}
	st := decode[statusJSON](t, mustRun(t, "ctl", "--server", strings.Join(all, ","), "status", "-o", "json"))
	var followers []string
	for _, n := range cl.Nodes {
		if n.ID == st.Leader {
			frozen = n.PID
		} else {
			followers = append(followers, n.Agent)
		}
	}
	if frozen == 0 || len(followers) != 2 {
		t.Fatalf("leader %q not among the nodes of cluster.json", st.Leader)
	}
	if err := syscall.Kill(frozen, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Logf("leader %s (pid %d) frozen", st.Leader, frozen)

	// A linearizable read then a write, each through the followers only.
	server := strings.Join(followers, ",")
	start := time.Now()
	mustRun(t, "ctl", "--server", server, "--timeout", "60s", "volume", "list", "-o", "json")
	v := decode[volumeJSON](t, mustRun(t, "ctl", "--server", server, "--timeout", "60s",
		"volume", "create", "while-frozen", "--size", "1Mi", "--replicas", "2", "-o", "json"))
	t.Logf("read and write answered %v after the freeze; volume %s", time.Since(start).Round(time.Millisecond), v.ID)

	after := decode[statusJSON](t, mustRun(t, "ctl", "--server", server, "status", "-o", "json"))
	if after.Leader == "" || after.Leader == st.Leader {
		t.Fatalf("leader after the freeze is %q, want one of the followers", after.Leader)
	}
	list := decode[[]volumeJSON](t, mustRun(t, "ctl", "--server", server, "volume", "list", "-o", "json"))
	if len(list) != 1 || list[0].ID != v.ID {
		t.Fatalf("volumes after one create: %+v, want exactly %s", list, v.ID)
	}
}
