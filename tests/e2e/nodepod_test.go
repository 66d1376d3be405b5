//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// TestNodePodReplaced is scenario 5 with Cairn as pods: the node agent's
// pod is deleted, as a rolling update of the cairn-node DaemonSet does
// (SIGTERM, then a new pod), while a pod appends and syncs a line every
// 100 ms to a volume that agent serves. The cairn-fuse-holder DaemonSet
// keeps the volume's FUSE connection meanwhile; the new pod issues its
// certificate, takes the volume over and goes on serving
// (docs/restart.md). No write may fail, and the writes must go on.
func TestNodePodReplaced(t *testing.T) {
	if !env.cairn.pods {
		t.Skip("Cairn runs as host processes: TestNodeAgentKilled kills those; this test deletes the node agent's pod (-e2e.cairn=pods)")
	}
	ns := newNamespace(t, "nodepod")
	apply(t, claim(ns, "data", env.cairn.ext4Class, "128Mi", corev1.PersistentVolumeFilesystem))
	apply(t, shellPod(ns, "writer", "data", false, loopScript))
	pod := waitLogLine(t, ns, "writer", 4*time.Minute, func(l string) bool { return strings.HasPrefix(l, "ok ") })
	pv := boundPV(t, ns, "data")

	old := nodePod(t)
	down := time.Now()
	kubectl(t, "delete", "pod", old.Name, "-n", namespace, "--wait=true", "--timeout=2m")
	var next corev1.Pod
	err := poll(context.Background(), 3*time.Minute, "the DaemonSet's next cairn-node pod to be Ready", func() error {
		next = nodePod(t)
		if next.Name == old.Name {
			return fmt.Errorf("still %s", old.Name)
		}
		for _, c := range next.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return fmt.Errorf("%s is %s", next.Name, next.Status.Phase)
	})
	if err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	time.Sleep(15 * time.Second)

	during, errsDuring := countWrites(podLog(pod), down, back)
	after, errsAfter := countWrites(podLog(pod), back.Add(time.Second), time.Now())
	t.Logf("cairn-node pod %s replaced by %s in %v: meanwhile the pod made %d writes, %d failed %v; in the 15 s after, %d writes, %d failed %v",
		old.Name, next.Name, back.Sub(down).Round(time.Second), during.ok, during.failed, errsDuring, after.ok, after.failed, errsAfter)
	if during.failed > 0 || after.failed > 0 || after.ok == 0 {
		t.Errorf("replacing the node agent's pod disturbed the writer: meanwhile %d failed %v; after, %d writes, %d failed %v",
			during.failed, errsDuring, after.ok, after.failed, errsAfter)
	}
	// The new agent says it took the volume over from the holder.
	path := nodeAgentLog(t, next.Name)
	if b, err := os.ReadFile(path); err != nil {
		t.Error(err)
	} else if !strings.Contains(string(b), "volume taken over") {
		t.Errorf("the new agent's log does not say it took the volume over:\n%s", localkube.Tail(path, 20))
	}

	// The volume goes on as usual: the writer's end unstages and detaches it.
	kubectl(t, "delete", "pod", "writer", "-n", ns, "--wait=true", "--timeout=2m")
	checkDetached(t, pv)
}

// nodePod returns the cairn-node DaemonSet's pod (one node: one pod).
func nodePod(t *testing.T) corev1.Pod {
	t.Helper()
	var list corev1.PodList
	get(t, &list, "get", "pods", "-n", namespace, "-l", "app.kubernetes.io/component=node")
	if len(list.Items) == 0 {
		return corev1.Pod{}
	}
	return list.Items[0]
}

// nodeAgentLog returns the path of the log of the cairn container of the
// node pod named pod, as kubelet wrote it.
func nodeAgentLog(t *testing.T, pod string) string {
	t.Helper()
	path, ok := podLogs(env.kube)["cairn ("+pod+")"]
	if !ok {
		t.Fatalf("no log of the cairn container of %s", pod)
	}
	return path
}
