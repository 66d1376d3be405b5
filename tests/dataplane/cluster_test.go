package dataplane

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/tests/bench/benchkit"
	"github.com/cairn-csi/cairn/tests/logcheck"
)

// devCluster is one `cairn dev` cluster, started for one test and torn down
// by t.Cleanup whatever happens: stopped nodes are continued, `dev down`
// stops the rest, and any process of this cluster still alive is killed.
type devCluster struct {
	t       *testing.T
	dir     string // the cluster's directory (cluster.json, data, logs)
	sockDir string // NBD sockets: a short path, unix socket paths are limited

	mu      sync.Mutex
	down    map[string]bool // nodes killed or stopped by the test
	stopped map[string]bool // nodes under SIGSTOP
	pids    map[int]bool    // every node pid seen
}

type nodeJSON struct {
	ID      string `json:"id"`
	Agent   string `json:"agent"`
	Data    string `json:"data"`
	DataDir string `json:"data_dir"`
	Metrics string `json:"metrics"`
	PID     int    `json:"pid"`
	Log     string `json:"log"`
}

type clusterJSON struct {
	Nodes      []nodeJSON `json:"nodes"`
	Controller *struct {
		PID int `json:"pid"`
	} `json:"controller"`
}

type replicaJSON struct {
	ID         string `json:"id"`
	Node       string `json:"node"`
	State      string `json:"state"`
	Generation string `json:"generation"`
}

type volumeJSON struct {
	ID           string        `json:"id"`
	Size         uint64        `json:"size"`
	State        string        `json:"state"`
	ReplicaCount int           `json:"replica_count"`
	WriteQuorum  int           `json:"write_quorum"`
	Replicas     []replicaJSON `json:"replicas"`
	Epoch        uint64        `json:"epoch"`
	Attachment   *struct {
		Node      string `json:"node"`
		NBDSocket string `json:"nbd_socket"`
	} `json:"attachment"`
	Rebuild *struct {
		ReplicaID     string `json:"replica_id"`
		BytesTotal    uint64 `json:"bytes_total"`
		BytesCompared uint64 `json:"bytes_compared"`
		BytesCopied   uint64 `json:"bytes_copied"`
		Done          bool   `json:"done"`
	} `json:"rebuild"`
}

// replica returns the replica with id, or nil.
func (v *volumeJSON) replica(id string) *replicaJSON {
	for i := range v.Replicas {
		if v.Replicas[i].ID == id {
			return &v.Replicas[i]
		}
	}
	return nil
}

// replicaOn returns the replica on node, or nil.
func (v *volumeJSON) replicaOn(node string) *replicaJSON {
	for i := range v.Replicas {
		if v.Replicas[i].Node == node {
			return &v.Replicas[i]
		}
	}
	return nil
}

func (v *volumeJSON) healthy() int {
	n := 0
	for _, r := range v.Replicas {
		if r.State == "healthy" {
			n++
		}
	}
	return n
}

// summary reads like "epoch 7 [r1@node-1 healthy, r2@node-2 failed]".
func (v *volumeJSON) summary() string {
	var rs []string
	for _, r := range v.Replicas {
		rs = append(rs, fmt.Sprintf("%s@%s %s", r.ID[strings.LastIndexByte(r.ID, '-')+1:], r.Node, r.State))
	}
	s := fmt.Sprintf("epoch %d [%s]", v.Epoch, strings.Join(rs, ", "))
	if v.Attachment != nil {
		s += " attached to " + v.Attachment.Node
	}
	return s
}

// startCluster runs `cairn dev up --nodes n` in a fresh directory; extra
// arguments go to `dev up`.
func startCluster(t *testing.T, n int, extra ...string) *devCluster {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "cdp")
	if err != nil {
		t.Fatal(err)
	}
	c := &devCluster{t: t, dir: filepath.Join(t.TempDir(), "cluster"), sockDir: sockDir,
		down: map[string]bool{}, stopped: map[string]bool{}, pids: map[int]bool{}}
	t.Cleanup(c.cleanup)
	start := time.Now()
	c.mustCairn(append([]string{"dev", "up", "--nodes", fmt.Sprint(n), "--dir", c.dir}, extra...)...)
	if got := len(c.nodes()); got != n {
		t.Fatalf("cluster.json lists %d nodes, want %d", got, n)
	}
	t.Logf("dev cluster of %d nodes up in %v (%s)", n, time.Since(start).Round(time.Millisecond), c.dir)
	return c
}

// replicaTLS is how the tests dial replicas themselves: with node-1's
// certificate, as an engine on node-1 would (a ctl certificate may not
// read a replica's blocks).
func (c *devCluster) replicaTLS() replica.DialOption {
	c.t.Helper()
	creds, err := pki.Load(pki.FilesIn(filepath.Join(c.dir, "pki", "node-1"), "tls"))
	if err != nil {
		c.t.Fatal(err)
	}
	return replica.WithTLS(creds)
}

// cleanup stops everything the cluster started, even after a failure.
func (c *devCluster) cleanup() {
	t := c.t
	c.mu.Lock()
	for id := range c.stopped {
		if n, ok := c.nodeOK(id); ok && n.PID > 0 {
			_ = syscall.Kill(n.PID, syscall.SIGCONT)
		}
	}
	c.stopped = map[string]bool{}
	c.mu.Unlock()
	nodes := c.nodes()
	if r := c.cairn("dev", "down", "--keep-data", "--dir", c.dir); r.code != 0 {
		t.Errorf("dev down: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	c.mu.Lock()
	for pid := range c.pids {
		if c.ownProcess(pid) {
			t.Errorf("pid %d of this cluster still runs after dev down; killing it", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	c.mu.Unlock()
	for _, n := range nodes {
		if !raceNodes {
			logcheck.Check(t, n.Log, n.ID)
		} else { // the race detector writes its reports into the log
			if b, err := os.ReadFile(n.Log); err == nil && bytes.Contains(b, []byte("WARNING: DATA RACE")) {
				t.Errorf("%s reported a data race; see below", n.ID)
				t.Logf("--- %s: data race report ---\n%s", n.ID, raceReport(b))
			}
		}
		if t.Failed() {
			t.Logf("--- %s: last interesting lines of %s ---\n%s", n.ID, n.Log, interestingTail(n.Log, 40))
		}
		if keep := os.Getenv("CAIRN_DATAPLANE_KEEP_LOGS"); keep != "" {
			if b, err := os.ReadFile(n.Log); err == nil {
				dst := filepath.Join(keep, t.Name()+"-"+n.ID+".log")
				if err := os.WriteFile(dst, b, 0o644); err != nil {
					t.Logf("keep log: %v", err)
				}
			}
		}
	}
	_ = os.RemoveAll(c.sockDir)
}

// ownProcess reports whether pid is alive and a node of this cluster (pids
// get reused).
func (c *devCluster) ownProcess(pid int) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := bytes.LastIndexByte(stat, ')'); i > 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(cmdline, []byte(c.dir+string(filepath.Separator)))
}

func raceReport(log []byte) string {
	i := bytes.Index(log, []byte("WARNING: DATA RACE"))
	j := min(len(log), i+6000)
	return string(log[i:j])
}

// interestingTail returns the last n log lines that are warnings, errors,
// panics or engine, export and rebuild events.
func interestingTail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, "{") || strings.Contains(l, `"level":"warn"`) || strings.Contains(l, `"level":"error"`) ||
			strings.Contains(l, `"logger":"engine"`) || strings.Contains(l, `"logger":"export"`) ||
			strings.Contains(l, "replica repair") || strings.Contains(l, "shutting down") || strings.Contains(l, "node agent running") {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// result is one finished cairn command.
type result struct {
	stdout, stderr string
	code           int
}

// cairn runs the binary (at most 3 minutes).
func (c *devCluster) cairn(args ...string) result {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cairnBin, args...)
	// The cluster speaks mutual TLS (dev up's default): ctl presents the
	// certificate dev up issued for it.
	cmd.Env = append(os.Environ(), "CAIRN_TLS_DIR="+filepath.Join(c.dir, "pki", "ctl"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		c.t.Fatalf("cairn %s: %v", strings.Join(args, " "), err)
	}
	c.notePIDs()
	return result{out.String(), errb.String(), code}
}

func (c *devCluster) mustCairn(args ...string) string {
	c.t.Helper()
	r := c.cairn(args...)
	if r.code != 0 {
		c.t.Fatalf("cairn %s: exit %d\nstdout: %s\nstderr: %s", strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// load reads cluster.json (the zero value if there is none).
func (c *devCluster) load() clusterJSON {
	var cl clusterJSON
	b, err := os.ReadFile(filepath.Join(c.dir, "cluster.json"))
	if err != nil {
		return cl
	}
	if err := json.Unmarshal(b, &cl); err != nil {
		c.t.Errorf("cluster.json: %v", err)
	}
	return cl
}

// nodes lists the cluster's nodes from cluster.json.
func (c *devCluster) nodes() []nodeJSON { return c.load().Nodes }

// notePIDs remembers every process cluster.json names, so that cleanup can
// kill what `dev down` left behind.
func (c *devCluster) notePIDs() {
	cl := c.load()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range cl.Nodes {
		if n.PID > 0 {
			c.pids[n.PID] = true
		}
	}
	if cl.Controller != nil && cl.Controller.PID > 0 {
		c.pids[cl.Controller.PID] = true
	}
}

func (c *devCluster) nodeOK(id string) (nodeJSON, bool) {
	for _, n := range c.nodes() {
		if n.ID == id {
			return n, true
		}
	}
	return nodeJSON{}, false
}

func (c *devCluster) node(id string) nodeJSON {
	c.t.Helper()
	n, ok := c.nodeOK(id)
	if !ok {
		c.t.Fatalf("no node %s in cluster.json", id)
	}
	return n
}

// servers lists the meta API addresses of the nodes the test has not
// killed or stopped: a stopped member accepts connections and never
// answers, which would cost every command a timeout.
func (c *devCluster) servers() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, n := range c.nodes() {
		if !c.down[n.ID] {
			out = append(out, n.Agent)
		}
	}
	return strings.Join(out, ",")
}

// ctl runs `cairn ctl --server <live nodes> args…`.
func (c *devCluster) ctl(args ...string) result {
	c.t.Helper()
	return c.cairn(append([]string{"ctl", "--server", c.servers()}, args...)...)
}

func (c *devCluster) mustCtl(args ...string) string {
	c.t.Helper()
	return c.mustCairn(append([]string{"ctl", "--server", c.servers()}, args...)...)
}

// kill crashes a node (SIGKILL, through `dev kill`).
func (c *devCluster) kill(id string) {
	c.t.Helper()
	c.mu.Lock()
	c.down[id] = true
	c.mu.Unlock()
	c.mustCairn("dev", "kill", "--dir", c.dir, id)
}

// start restarts a killed node and waits until it follows a leader.
func (c *devCluster) start(id string) {
	c.t.Helper()
	c.mustCairn("dev", "start", "--dir", c.dir, id)
	c.mu.Lock()
	delete(c.down, id)
	c.mu.Unlock()
}

// startAlone restarts a killed node without waiting for it to find a leader
// (there is none while most members are down). `dev start` then reports
// that the node did not come back in time; the process must run anyway.
func (c *devCluster) startAlone(id string) {
	c.t.Helper()
	r := c.cairn("dev", "start", "--wait", "1s", "--dir", c.dir, id)
	if r.code != 0 && !strings.Contains(r.stderr, "did not come back") {
		c.t.Fatalf("dev start %s: exit %d: %s%s", id, r.code, r.stdout, r.stderr)
	}
	if n := c.node(id); !c.ownProcess(n.PID) {
		c.t.Fatalf("dev start %s: process %d does not run: %s", id, n.PID, r.stderr)
	}
	c.mu.Lock()
	delete(c.down, id)
	c.mu.Unlock()
}

// stop freezes a node's process (SIGSTOP): it keeps its sockets and state,
// and answers nothing, as a node cut off by a partition or a long pause.
func (c *devCluster) stop(id string) {
	c.t.Helper()
	n := c.node(id)
	c.mu.Lock()
	c.down[id], c.stopped[id] = true, true
	c.mu.Unlock()
	if err := syscall.Kill(n.PID, syscall.SIGSTOP); err != nil {
		c.t.Fatalf("SIGSTOP %s (pid %d): %v", id, n.PID, err)
	}
}

// cont resumes a stopped node.
func (c *devCluster) cont(id string) {
	c.t.Helper()
	n := c.node(id)
	if err := syscall.Kill(n.PID, syscall.SIGCONT); err != nil {
		c.t.Fatalf("SIGCONT %s (pid %d): %v", id, n.PID, err)
	}
	c.mu.Lock()
	delete(c.down, id)
	delete(c.stopped, id)
	c.mu.Unlock()
}

// createVolume creates a volume; extra arguments go to `volume create`.
func (c *devCluster) createVolume(name, size string, extra ...string) volumeJSON {
	c.t.Helper()
	out := c.mustCtl(append([]string{"volume", "create", name, "--size", size, "-o", "json"}, extra...)...)
	return decode[volumeJSON](c.t, out)
}

func (c *devCluster) volume(id string) (volumeJSON, error) {
	r := c.ctl("volume", "get", id, "-o", "json", "--timeout", "10s")
	if r.code != 0 {
		return volumeJSON{}, fmt.Errorf("volume get: exit %d: %s", r.code, strings.TrimSpace(r.stderr))
	}
	var v volumeJSON
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		return volumeJSON{}, fmt.Errorf("volume get: %v", err)
	}
	return v, nil
}

func (c *devCluster) mustVolume(id string) volumeJSON {
	c.t.Helper()
	v, err := c.volume(id)
	if err != nil {
		c.t.Fatal(err)
	}
	return v
}

// waitVolume polls the volume until cond accepts it.
func (c *devCluster) waitVolume(id string, timeout time.Duration, what string, cond func(v volumeJSON) error) volumeJSON {
	c.t.Helper()
	var v volumeJSON
	eventually(c.t, timeout, what, func() error {
		var err error
		if v, err = c.volume(id); err != nil {
			return err
		}
		if err := cond(v); err != nil {
			return fmt.Errorf("%v (volume: %s)", err, v.summary())
		}
		return nil
	})
	return v
}

// allHealthy accepts a volume whose replica set is complete and healthy.
func allHealthy(v volumeJSON) error {
	if len(v.Replicas) != v.ReplicaCount || v.healthy() != v.ReplicaCount {
		return fmt.Errorf("%d of %d replicas healthy", v.healthy(), v.ReplicaCount)
	}
	return nil
}

// metrics scrapes a node's /metrics into sample → value ("name{labels}"
// as Prometheus' text format writes it).
func (c *devCluster) metrics(node string) map[string]float64 {
	c.t.Helper()
	m, err := benchkit.Scrape(context.Background(), c.node(node).Metrics)
	if err != nil {
		c.t.Fatalf("scrape %s: %v", node, err)
	}
	return m
}

// socket is the NBD socket path used for exports on node.
func (c *devCluster) socket(node string) string { return filepath.Join(c.sockDir, node+".sock") }

// export attaches the volume to node with an NBD socket (moving the
// attachment if needed) and returns the socket path and the volume as
// `volume export` answered it.
func (c *devCluster) export(id, node string, wait time.Duration) (string, volumeJSON) {
	c.t.Helper()
	sock := c.socket(node)
	out := c.mustCtl("volume", "export", id, "--node", node, "--nbd", sock, "--wait", wait.String(),
		"--timeout", (wait + 30*time.Second).String(), "-o", "json")
	return sock, decode[volumeJSON](c.t, out)
}

// verify runs `volume verify`: nil when every healthy replica is identical.
func (c *devCluster) verify(id string) error {
	c.t.Helper()
	r := c.ctl("volume", "verify", id)
	if r.code != 0 {
		return fmt.Errorf("volume verify: exit %d: %s%s", r.code, r.stdout, r.stderr)
	}
	c.t.Logf("%s", strings.TrimSpace(r.stdout))
	return nil
}

// dial connects an NBD client to sock, retrying until timeout (the socket
// may be a stale file until the node listens again). The connection is
// closed at cleanup.
func (c *devCluster) dial(sock string, timeout time.Duration) *nbdConn {
	c.t.Helper()
	var conn *nbdConn
	eventually(c.t, timeout, "NBD connection to "+sock, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var err error
		conn, err = dialNBD(ctx, sock)
		return err
	})
	c.t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func decode[T any](t *testing.T, s string) T {
	t.Helper()
	var v T
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("decode %T from %q: %v", v, s, err)
	}
	return v
}

// permanent wraps an error that ends polling at once.
type permanent struct{ error }

func stopPolling(err error) error { return permanent{err} }

// eventually polls fn until it returns nil, fails the test when the timeout
// passes or fn returns stopPolling(err).
func eventually(t *testing.T, timeout time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		var p permanent
		if errors.As(err, &p) {
			t.Fatalf("%s: %v", what, p.error)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
