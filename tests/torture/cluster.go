package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

// cluster is the campaign's `cairn dev` cluster of 4 node agents. The last
// node's data dir is a small loop-mounted ext4 file system (smallFS), so
// that it can be filled up. Nodes the campaign killed or froze are tracked,
// so that ctl commands avoid them and cleanup restores them.
type cluster struct {
	bin     string // the cairn binary
	dir     string // the cluster's directory (cluster.json, node dirs)
	sockDir string // NBD sockets (unix socket paths are short)
	verbose bool
	logf    func(format string, args ...any)
	smallFS *loopFS // the data dir of smallFSNode
	nft     *nftTable

	smallFSNode string

	mu      sync.Mutex
	down    map[string]bool // killed or frozen by the campaign: ctl avoids them
	stopped map[string]bool // under SIGSTOP
	pids    map[int]string  // every node pid seen → node id
}

// node is what cluster.json says about one node agent.
type node struct {
	ID      string `json:"id"`
	Agent   string `json:"agent"`    // meta API host:port
	Data    string `json:"data"`     // replica server host:port
	DataDir string `json:"data_dir"` // replicas/<replica id>/data live under it
	PID     int    `json:"pid"`
	Log     string `json:"log"`
}

// volume is the part of `cairn ctl volume get -o json` the campaign reads.
type volume struct {
	ID           string    `json:"id"`
	Size         uint64    `json:"size"`
	ReplicaCount int       `json:"replica_count"`
	WriteQuorum  int       `json:"write_quorum"`
	Replicas     []replica `json:"replicas"`
	Epoch        uint64    `json:"epoch"`
	Attachment   *struct {
		Node string `json:"node"`
	} `json:"attachment"`
	Rebuild *struct {
		ReplicaID   string `json:"replica_id"`
		BytesCopied uint64 `json:"bytes_copied"`
		Done        bool   `json:"done"`
	} `json:"rebuild"`
}

type replica struct {
	ID    string `json:"id"`
	Node  string `json:"node"`
	State string `json:"state"`
}

func (v *volume) replicaOn(nodeID string) *replica {
	for i := range v.Replicas {
		if v.Replicas[i].Node == nodeID {
			return &v.Replicas[i]
		}
	}
	return nil
}

// healthy reports whether the replica set is complete and every replica in
// it healthy.
func (v *volume) healthy() bool {
	if len(v.Replicas) != v.ReplicaCount {
		return false
	}
	for _, r := range v.Replicas {
		if r.State != "healthy" {
			return false
		}
	}
	return true
}

// summary reads like "epoch 7 [r1@node-1 healthy, r2@node-2 failed] on node-3".
func (v *volume) summary() string {
	var rs []string
	for _, r := range v.Replicas {
		rs = append(rs, fmt.Sprintf("%s@%s %s", r.ID[strings.LastIndexByte(r.ID, '-')+1:], r.Node, r.State))
	}
	s := fmt.Sprintf("epoch %d [%s]", v.Epoch, strings.Join(rs, ", "))
	if v.Attachment != nil {
		s += " on " + v.Attachment.Node
	}
	return s
}

// verifyReport is `cairn ctl volume verify -o json`.
type verifyReport struct {
	Replicas  []string `json:"replicas"`
	Extents   uint64   `json:"extents"`
	Differing []uint64 `json:"differing_extents"`
	Identical bool     `json:"identical"`
}

// startCluster makes the small file system for the last node's data dir and
// runs `cairn dev up --nodes n` in dir. On failure it cleans up what it made.
func startCluster(ctx context.Context, bin, work string, n int, smallFSSize uint64, verbose bool, logf func(string, ...any)) (*cluster, error) {
	c := &cluster{bin: bin, dir: filepath.Join(work, "cluster"), sockDir: work, verbose: verbose, logf: logf,
		down: map[string]bool{}, stopped: map[string]bool{}, pids: map[int]string{}}
	last := fmt.Sprintf("node-%d", n)
	fs, err := makeLoopFS(ctx, filepath.Join(work, last+".img"), filepath.Join(c.dir, last, "data"), smallFSSize)
	if err != nil {
		return nil, fmt.Errorf("small file system for %s: %w", last, err)
	}
	c.smallFS, c.smallFSNode = fs, last
	start := time.Now()
	if _, err := c.cairn(ctx, 2*time.Minute, "dev", "up", "--nodes", fmt.Sprint(n), "--dir", c.dir); err != nil {
		c.close(false)
		return nil, err
	}
	if got := len(c.nodes()); got != n {
		c.close(false)
		return nil, fmt.Errorf("cluster.json lists %d nodes, want %d", got, n)
	}
	logf("dev cluster of %d nodes up in %v in %s (%s's data dir: %s of ext4 on a loop device)", n,
		time.Since(start).Round(time.Millisecond), c.dir, last, formatBytes(smallFSSize))
	return c, nil
}

// close restores frozen nodes, removes filter rules, stops the cluster and
// unmounts the small file system. With keep, data dirs and logs stay.
func (c *cluster) close(keep bool) {
	c.mu.Lock()
	for id := range c.stopped {
		if n, ok := c.node(id); ok && c.ownProcess(n.PID) {
			_ = syscall.Kill(n.PID, syscall.SIGCONT)
		}
	}
	c.stopped = map[string]bool{}
	c.mu.Unlock()
	if c.nft != nil {
		if err := c.nft.remove(); err != nil {
			c.logf("cleanup: %v", err)
		}
	}
	if c.smallFS != nil {
		if err := c.smallFS.unfill(); err != nil {
			c.logf("cleanup: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := os.Stat(filepath.Join(c.dir, "cluster.json")); err == nil {
		c.notePIDs()
		if _, err := c.cairn(ctx, time.Minute, "dev", "down", "--dir", c.dir, fmt.Sprintf("--keep-data=%v", keep)); err != nil {
			c.logf("cleanup: %v", err)
		}
	}
	c.mu.Lock()
	for pid, id := range c.pids {
		if c.ownProcess(pid) {
			c.logf("cleanup: %s (pid %d) still runs after dev down; killing it", id, pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	c.mu.Unlock()
	if c.smallFS != nil {
		if err := c.smallFS.unmount(); err != nil {
			c.logf("cleanup: %v", err)
		}
	}
}

// cairn runs the binary (at most timeout) and returns its stdout; a
// non-zero exit is an error quoting stderr.
func (c *cluster) cairn(ctx context.Context, timeout time.Duration, args ...string) (string, error) {
	out, errOut, code, err := c.cairnCode(ctx, timeout, args...)
	if err != nil {
		return "", err
	}
	if code != 0 {
		msg := strings.TrimSpace(errOut)
		if msg == "" {
			msg = strings.TrimSpace(out)
		}
		return out, fmt.Errorf("cairn %s: exit %d: %s", strings.Join(args, " "), code, msg)
	}
	return out, nil
}

// ctlTLS is the directory of ctl's certificate, which dev up writes.
func (c *cluster) ctlTLS() string { return filepath.Join(c.dir, "pki", "ctl") }

// cairnCode runs the binary and returns its output and exit code; err is
// set only when it could not run (or ran out of time).
func (c *cluster) cairnCode(ctx context.Context, timeout time.Duration, args ...string) (stdout, stderr string, code int, err error) {
	if c.verbose {
		c.logf("$ cairn %s", strings.Join(args, " "))
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.bin, args...)
	// The cluster speaks mutual TLS (dev up's default): ctl presents the
	// certificate dev up issued for it.
	cmd.Env = append(os.Environ(), "CAIRN_TLS_DIR="+c.ctlTLS())
	cmd.SysProcAttr = benchkit.OwnGroup() // Ctrl-C reaches only the campaign, which cleans up in order
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	runErr := cmd.Run()
	c.notePIDs()
	var ee *exec.ExitError
	switch {
	case ctx.Err() != nil:
		return out.String(), errb.String(), -1, fmt.Errorf("cairn %s: %w", strings.Join(args, " "), ctx.Err())
	case errors.As(runErr, &ee):
		return out.String(), errb.String(), ee.ExitCode(), nil
	case runErr != nil:
		return "", "", -1, fmt.Errorf("cairn %s: %w", strings.Join(args, " "), runErr)
	}
	return out.String(), errb.String(), 0, nil
}

// nodes lists the cluster's nodes from cluster.json (nil if unreadable).
func (c *cluster) nodes() []node {
	b, err := os.ReadFile(filepath.Join(c.dir, "cluster.json"))
	if err != nil {
		return nil
	}
	var cj struct {
		Nodes []node `json:"nodes"`
	}
	if err := json.Unmarshal(b, &cj); err != nil {
		return nil
	}
	return cj.Nodes
}

func (c *cluster) node(id string) (node, bool) {
	for _, n := range c.nodes() {
		if n.ID == id {
			return n, true
		}
	}
	return node{}, false
}

func (c *cluster) nodeIDs() []string {
	var ids []string
	for _, n := range c.nodes() {
		ids = append(ids, n.ID)
	}
	return ids
}

// notePIDs remembers every node pid cluster.json names, so that close can
// kill what `dev down` left behind.
func (c *cluster) notePIDs() {
	ns := c.nodes()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, n := range ns {
		if n.PID > 0 {
			c.pids[n.PID] = n.ID
		}
	}
}

// ownProcess reports whether pid is alive (not a zombie) and a process of
// this cluster (pids get reused; other clusters on the machine have nodes
// of the same names).
func (c *cluster) ownProcess(pid int) bool {
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

// alive reports whether node id's agent runs.
func (c *cluster) alive(id string) bool {
	n, ok := c.node(id)
	return ok && c.ownProcess(n.PID)
}

// servers lists the meta API addresses of the nodes the campaign has not
// killed or frozen: a frozen member accepts connections and never answers,
// which would cost every command a timeout.
func (c *cluster) servers() string {
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

func (c *cluster) setDown(id string, down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if down {
		c.down[id] = true
	} else {
		delete(c.down, id)
	}
}

// ctl runs `cairn ctl --server <live nodes> args… --timeout T`.
func (c *cluster) ctl(ctx context.Context, timeout time.Duration, args ...string) (string, error) {
	args = append([]string{"ctl", "--server", c.servers(), "--timeout", timeout.String()}, args...)
	return c.cairn(ctx, timeout+10*time.Second, args...)
}

// kill crashes a node (SIGKILL, through `dev kill`).
func (c *cluster) kill(ctx context.Context, id string) error {
	c.setDown(id, true)
	_, err := c.cairn(ctx, 30*time.Second, "dev", "kill", "--dir", c.dir, id)
	return err
}

// start restarts a killed node from its data dir and waits until the store
// counts it up again (a node marked down takes no export).
func (c *cluster) start(ctx context.Context, id string) error {
	if _, err := c.cairn(ctx, time.Minute, "dev", "start", "--wait", "30s", "--dir", c.dir, id); err != nil {
		return err
	}
	c.setDown(id, false)
	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := c.status(ctx)
		if err == nil && st.state(id) == "up" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s restarted, but the store does not count it up within 30s (%v)", id, err)
		}
		if err := benchkit.Sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
}

// storeStatus is the part of `cairn ctl status -o json` the campaign reads.
type storeStatus struct {
	Leader string `json:"leader"`
	Nodes  []struct {
		ID    string `json:"id"`
		State string `json:"state"`
	} `json:"nodes"`
}

func (s *storeStatus) state(id string) string {
	for _, n := range s.Nodes {
		if n.ID == id {
			return n.State
		}
	}
	return ""
}

func (c *cluster) status(ctx context.Context) (*storeStatus, error) {
	out, err := c.ctl(ctx, 10*time.Second, "status", "-o", "json")
	if err != nil {
		return nil, err
	}
	var st storeStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nil, fmt.Errorf("status: %w", err)
	}
	return &st, nil
}

// stop freezes a node's process (SIGSTOP): it keeps its sockets and state
// and answers nothing.
func (c *cluster) stop(id string) error {
	n, ok := c.node(id)
	if !ok || !c.ownProcess(n.PID) {
		return fmt.Errorf("SIGSTOP %s: not running", id)
	}
	c.mu.Lock()
	c.down[id], c.stopped[id] = true, true
	c.mu.Unlock()
	if err := syscall.Kill(n.PID, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("SIGSTOP %s (pid %d): %w", id, n.PID, err)
	}
	return nil
}

// cont resumes a frozen node.
func (c *cluster) cont(id string) error {
	n, ok := c.node(id)
	if ok && c.ownProcess(n.PID) {
		if err := syscall.Kill(n.PID, syscall.SIGCONT); err != nil {
			return fmt.Errorf("SIGCONT %s (pid %d): %w", id, n.PID, err)
		}
	}
	c.mu.Lock()
	delete(c.down, id)
	delete(c.stopped, id)
	c.mu.Unlock()
	return nil
}

// restore lifts every fault: filter rules go, the small file system is
// freed, frozen nodes continue, killed ones start.
// It is what each round ends with, whatever happened in it.
func (c *cluster) restore(ctx context.Context) error {
	var errs []error
	if c.nft != nil {
		errs = append(errs, c.nft.remove())
	}
	if c.smallFS != nil {
		errs = append(errs, c.smallFS.unfill())
	}
	for _, id := range c.nodeIDs() {
		c.mu.Lock()
		stopped := c.stopped[id]
		c.mu.Unlock()
		if stopped {
			errs = append(errs, c.cont(id))
		}
		if !c.alive(id) {
			c.logf("restore: %s is not running; starting it", id)
			errs = append(errs, c.start(ctx, id))
		}
		c.setDown(id, false)
	}
	return errors.Join(errs...)
}

// leader asks the store which node leads it ("" while none does).
func (c *cluster) leader(ctx context.Context) (string, error) {
	st, err := c.status(ctx)
	if err != nil {
		return "", err
	}
	return st.Leader, nil
}

func (c *cluster) createVolume(ctx context.Context, name string, size uint64, preferred string) (volume, error) {
	args := []string{"volume", "create", name, "--size", fmt.Sprintf("%dMi", size>>20), "--replicas", "3", "-o", "json"}
	if preferred != "" {
		args = append(args, "--preferred-node", preferred)
	}
	out, err := c.ctl(ctx, 30*time.Second, args...)
	if err != nil {
		return volume{}, err
	}
	var v volume
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return volume{}, fmt.Errorf("volume create: %w", err)
	}
	return v, nil
}

func (c *cluster) volume(ctx context.Context, id string) (volume, error) {
	out, err := c.ctl(ctx, 10*time.Second, "volume", "get", id, "-o", "json")
	if err != nil {
		return volume{}, err
	}
	var v volume
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return volume{}, fmt.Errorf("volume get: %w", err)
	}
	return v, nil
}

// export attaches the volume to nodeID with an NBD socket (moving the
// attachment if needed) and returns the socket's path and the volume as
// `volume export` answered it.
func (c *cluster) export(ctx context.Context, id, nodeID, sock string) (volume, error) {
	out, err := c.ctl(ctx, time.Minute, "volume", "export", id, "--node", nodeID, "--nbd", sock, "--wait", "45s", "-o", "json")
	if err != nil {
		return volume{}, err
	}
	var v volume
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return volume{}, fmt.Errorf("volume export: %w", err)
	}
	return v, nil
}

// verify runs `volume verify -o json`; it exits 1 when replicas differ and
// still prints its report.
func (c *cluster) verify(ctx context.Context, id string) (verifyReport, error) {
	args := []string{"ctl", "--server", c.servers(), "--timeout", "60s", "volume", "verify", id, "-o", "json"}
	out, errOut, code, err := c.cairnCode(ctx, 70*time.Second, args...)
	if err != nil {
		return verifyReport{}, err
	}
	var rep verifyReport
	if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil {
		return verifyReport{}, fmt.Errorf("volume verify: exit %d: %s%s", code, strings.TrimSpace(out), strings.TrimSpace(errOut))
	}
	return rep, nil
}

// removeVolume unexports and deletes a volume (best effort: the next round
// uses a new one).
func (c *cluster) removeVolume(ctx context.Context, id string) error {
	if _, err := c.ctl(ctx, 30*time.Second, "volume", "unexport", id); err != nil {
		return err
	}
	_, err := c.ctl(ctx, 30*time.Second, "volume", "delete", id)
	return err
}

// logOffsets returns every node log's current size, so that a failed round
// can show what was logged during it.
func (c *cluster) logOffsets() map[string]int64 {
	out := map[string]int64{}
	for _, n := range c.nodes() {
		if fi, err := os.Stat(n.Log); err == nil {
			out[n.ID] = fi.Size()
		}
	}
	return out
}

// waitLogLine waits until node id's log, from byte offset from on, has a
// line containing every one of parts, and returns that line.
func (c *cluster) waitLogLine(ctx context.Context, id string, from int64, timeout time.Duration, parts ...string) (string, error) {
	l, _, err := c.watchLog(ctx, id, from, timeout, 100*time.Millisecond, parts)
	return l, err
}

// watchLog waits until node id's log, from byte offset from on, has a line
// containing every string of one of alts, and returns that line and which
// of alts it matched (the first such line). A timeout of 0 looks once.
func (c *cluster) watchLog(ctx context.Context, id string, from int64, timeout, poll time.Duration, alts ...[]string) (string, int, error) {
	n, ok := c.node(id)
	if !ok {
		return "", -1, fmt.Errorf("no node %s", id)
	}
	t := &logTail{path: n.Log, off: from}
	deadline := time.Now().Add(timeout)
	for {
		for _, l := range t.lines() {
			if i := matchLine(l, alts); i >= 0 {
				return l, i, nil
			}
		}
		if !time.Now().Before(deadline) {
			return "", -1, fmt.Errorf("%s logged no line with %q within %v", id, alts, timeout)
		}
		if err := benchkit.Sleep(ctx, poll); err != nil {
			return "", -1, err
		}
	}
}

// matchLine returns the index of the first of alts whose every string l
// contains, or -1.
func matchLine(l string, alts [][]string) int {
	for i, parts := range alts {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(l, p) }) {
			return i
		}
	}
	return -1
}

// logTail follows a node's log: each look reads only what was appended
// since the last, so that a short poll (a snapshot merge logs its
// quarters milliseconds apart) stays cheap.
type logTail struct {
	path    string
	off     int64
	partial []byte // a line not ended yet at the last look
}

// lines returns the lines completed since the last call.
func (t *logTail) lines() []string {
	f, err := os.Open(t.path)
	if err != nil {
		return nil
	}
	chunk, _ := io.ReadAll(io.NewSectionReader(f, t.off, 1<<40))
	f.Close()
	t.off += int64(len(chunk))
	chunk = append(t.partial, chunk...)
	end := bytes.LastIndexByte(chunk, '\n') + 1
	t.partial = slices.Clone(chunk[end:])
	if end == 0 {
		return nil
	}
	return strings.Split(string(chunk[:end-1]), "\n")
}

// logExcerpt returns up to max warn and error lines (and engine, export and
// rebuild events) each node logged since from.
func (c *cluster) logExcerpt(from map[string]int64, max int) string {
	var b strings.Builder
	for _, n := range c.nodes() {
		raw, err := os.ReadFile(n.Log)
		if err != nil {
			continue
		}
		if off := from[n.ID]; off <= int64(len(raw)) {
			raw = raw[off:]
		}
		var lines []string
		for _, l := range strings.Split(string(raw), "\n") {
			// raft's own complaints about unreachable peers drown the rest.
			if l == "" || strings.Contains(l, `"logger":"raft"`) {
				continue
			}
			if !strings.HasPrefix(l, "{") || strings.Contains(l, `"level":"warn"`) || strings.Contains(l, `"level":"error"`) ||
				strings.Contains(l, `"level":"panic"`) || strings.Contains(l, `"level":"fatal"`) ||
				strings.Contains(l, "eject") || strings.Contains(l, "rebuil") || strings.Contains(l, "fenced") {
				lines = append(lines, l)
			}
		}
		if len(lines) == 0 {
			// Say so, with the node's last lines of any kind: a node that
			// hangs or dies says nothing of note (CI once saw a node stop
			// serving exports for three rounds without a word).
			var all []string
			for _, l := range strings.Split(string(raw), "\n") {
				if l != "" && !strings.Contains(l, `"logger":"raft"`) {
					all = append(all, l)
				}
			}
			if len(all) > 3 {
				all = all[len(all)-3:]
			}
			lines = all
			fmt.Fprintf(&b, "  --- %s (%s): nothing of note; process alive: %v; its last lines ---\n", n.ID, n.Log, c.alive(n.ID))
			for _, l := range lines {
				if len(l) > 600 {
					l = l[:600] + "…"
				}
				b.WriteString("  " + l + "\n")
			}
			continue
		}
		if len(lines) > max {
			lines = lines[len(lines)-max:]
		}
		fmt.Fprintf(&b, "  --- %s (%s) ---\n", n.ID, n.Log)
		for _, l := range lines {
			if len(l) > 600 {
				l = l[:600] + "…"
			}
			b.WriteString("  " + l + "\n")
		}
	}
	return b.String()
}

// pick returns a random element of s, or "" if s is empty.
func pick(rng *rand.Rand, s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[rng.IntN(len(s))]
}

// without returns s without the elements of drop.
func without(s []string, drop ...string) []string {
	return slices.DeleteFunc(slices.Clone(s), func(x string) bool { return slices.Contains(drop, x) })
}

func formatBytes(n uint64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<20:
		return fmt.Sprintf("%d MiB", n>>20)
	default:
		return fmt.Sprintf("%d KiB", n>>10)
	}
}
