//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// loopScript appends a numbered line and syncs it every 100 ms, and says
// on stdout whether each write and sync succeeded: "ok N SECONDS" or
// "err N SECONDS MESSAGE".
const loopScript = `i=0
while true; do
  i=$((i + 1))
  now=$(date +%s)
  if echo "$i $now" >> /data/log 2>/tmp/err && sync -d /data/log 2>>/tmp/err; then
    echo "ok $i $now"
  else
    echo "err $i $now $(tr '\n' ' ' < /tmp/err)"
  fi
  sleep 0.1
done
`

// writeOutcome counts a loopScript pod's writes in a time window.
type writeOutcome struct{ ok, failed int }

func countWrites(log string, from, to time.Time) (w writeOutcome, errs []string) {
	for _, l := range strings.Split(log, "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			continue
		}
		sec, err := strconv.ParseInt(f[2], 10, 64)
		if err != nil || sec < from.Unix() || sec > to.Unix() {
			continue
		}
		switch f[0] {
		case "ok":
			w.ok++
		case "err":
			w.failed++
			if len(errs) < 3 {
				errs = append(errs, l)
			}
		}
	}
	return w, errs
}

// TestNodeAgentKilled is scenario 5 of issue 14: a node agent is killed
// with SIGKILL and restarted while a pod writes. Killing an agent that
// only holds a replica must not disturb the pod (the write quorum is 2 of
// 3). Killing the agent kubelet uses, which serves the pod's volume, must
// not either: its fuse holder keeps the volume's FUSE connection, and the
// restarted agent takes it over (docs/restart.md); the pod's writes wait
// meanwhile and none fails. A new pod can then use the volume.
func TestNodeAgentKilled(t *testing.T) {
	hostOnly(t)
	ns := newNamespace(t, "nodekill")
	apply(t, claim(ns, "data", "cairn-replicated-ext4", "128Mi", corev1.PersistentVolumeFilesystem))
	apply(t, shellPod(ns, "writer", "data", false, loopScript))
	pod := waitLogLine(t, ns, "writer", 4*time.Minute, func(l string) bool { return strings.HasPrefix(l, "ok ") })
	pv := boundPV(t, ns, "data")
	v, err := volume(pv)
	if err != nil {
		t.Fatal(err)
	}
	var replicaOnly string
	for _, r := range v.Replicas {
		if r.Node != env.cairn.node.ID {
			replicaOnly = r.Node
			break
		}
	}
	if replicaOnly == "" {
		t.Fatalf("volume %s has no replica off %s: %+v", v.ID, env.cairn.node.ID, v.Replicas)
	}

	// An agent that holds only a replica: the pod must not notice.
	down, back := killAndRestart(t, replicaOnly, 8*time.Second)
	time.Sleep(5 * time.Second)
	w, errs := countWrites(podLog(pod), down, back.Add(5*time.Second))
	t.Logf("%s (replica only) killed for %v: the pod made %d writes, %d failed %v", replicaOnly, back.Sub(down).Round(time.Second), w.ok, w.failed, errs)
	if w.failed > 0 || w.ok == 0 {
		t.Errorf("killing %s, which only holds a replica, disturbed the pod: %d writes, %d failed: %v", replicaOnly, w.ok, w.failed, errs)
	}

	// The agent kubelet uses, which serves the pod's volume: its writes
	// wait for the restarted agent, and none fails.
	node := env.cairn.node.ID
	down, back = killAndRestart(t, node, 8*time.Second)
	time.Sleep(15 * time.Second)
	during, errsDuring := countWrites(podLog(pod), down, back)
	after, errsAfter := countWrites(podLog(pod), back.Add(time.Second), time.Now())
	t.Logf("%s (serving the pod's volume) killed for %v: while down the pod made %d writes, %d failed %v; in the 15 s after its restart %d writes, %d failed %v",
		node, back.Sub(down).Round(time.Second), during.ok, during.failed, errsDuring, after.ok, after.failed, errsAfter)
	if during.failed > 0 || after.failed > 0 || after.ok == 0 {
		t.Errorf("killing %s, which serves the pod's volume, disturbed the pod: while down %d failed %v; after its restart %d writes, %d failed %v",
			node, during.failed, errsDuring, after.ok, after.failed, errsAfter)
	}

	// Whatever the pod saw, the volume must serve a new pod once the
	// agent is back.
	if _, err := env.kube.Kubectl(context.Background(), nil, "delete", "pod", "writer", "-n", ns, "--wait=true", "--timeout=2m"); err != nil {
		t.Logf("the writer did not go within 2 min (%v); forcing it", err)
		kubectl(t, "delete", "pod", "writer", "-n", ns, "--grace-period=0", "--force")
	}
	checkDetached(t, pv)
	apply(t, shellPod(ns, "reader", "data", false, "tail -n 2 /data/log && echo readable"))
	reader := waitPod(t, ns, "reader", 4*time.Minute, corev1.PodSucceeded)
	t.Logf("after the restart a new pod reads the volume: %s", strings.ReplaceAll(strings.TrimSpace(podLog(reader)), "\n", " | "))
}

// killAndRestart kills a node agent with SIGKILL (cairn dev kill), waits
// for downFor, and starts it again from its data dir (cairn dev start).
// It returns when it was killed and when it answered again. If the agent
// does not come back, it says what the killed process was still doing
// (its threads' states) and fails the test.
func killAndRestart(t *testing.T, node string, downFor time.Duration) (down, back time.Time) {
	t.Helper()
	dev := func(args ...string) error {
		out, err := exec.Command(env.cairn.bin, append([]string{"dev"}, append(args, "--dir", env.cairn.dir)...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("cairn dev %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	old := devPID(t, node)
	down = time.Now()
	if err := dev("kill", node); err != nil {
		t.Fatal(err)
	}
	time.Sleep(downFor)
	if err := dev("start", node); err != nil {
		t.Fatalf("%v\nthe killed agent (pid %d) after %v: %s\nlast lines of its log:\n%s", err, old, time.Since(down).Round(time.Second), threadStates(old), localkube.Tail(devLog(t, node), 15))
	}
	return down, time.Now()
}

// devPID is a dev cluster node's PID as cluster.json has it.
func devPID(t *testing.T, node string) int {
	t.Helper()
	var c struct {
		Nodes []struct {
			ID  string `json:"id"`
			PID int    `json:"pid"`
		} `json:"nodes"`
	}
	b, err := os.ReadFile(filepath.Join(env.cairn.dir, "cluster.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		if n.ID == node {
			return n.PID
		}
	}
	t.Fatalf("no node %s in cluster.json", node)
	return 0
}

func devLog(t *testing.T, node string) string {
	for _, n := range env.cairn.dev.Nodes {
		if n.ID == node {
			return n.Log
		}
	}
	t.Fatalf("no node %s", node)
	return ""
}

// threadStates describes what is left of a process: each thread's state
// and kernel wait channel ("gone" if nothing is).
func threadStates(pid int) string {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return "gone"
	}
	var out []string
	for _, task := range tasks {
		stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		wchan, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/wchan", pid, task.Name()))
		state := "?"
		if i := strings.LastIndexByte(string(stat), ')'); i > 0 && i+2 < len(stat) {
			state = string(stat[i+2])
		}
		out = append(out, fmt.Sprintf("%s:%s/%s", task.Name(), state, wchan))
	}
	return fmt.Sprintf("%d threads: %s", len(out), strings.Join(out, " "))
}
