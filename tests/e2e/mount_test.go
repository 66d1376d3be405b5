//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// writeScript writes files of several sizes and their sha256 sums, then
// waits for the test to look (it creates /data/.continue through the
// node's staging mount) and exits.
const writeScript = `set -e
mkdir -p /data/files
for i in 1 2 3 4 5 6 7 8; do head -c $((i * 131072 + 17)) /dev/urandom > /data/files/f$i; done
cd /data && sha256sum files/* > SHA256SUMS
sync
echo written
while [ ! -e /data/.continue ]; do sleep 0.2; done
rm /data/.continue
sync
`

// verifyScript checks the files against their sums, then waits like
// writeScript. A mismatch fails the pod.
const verifyScript = `set -e
cd /data
test "$(wc -l < SHA256SUMS)" -eq 8
sha256sum -c SHA256SUMS
echo verified
while [ ! -e /data/.continue ]; do sleep 0.2; done
rm /data/.continue
sync
`

// TestReplicatedExt4 is scenario 1 of issue 14: a claim on the replicated
// ext4 class (WaitForFirstConsumer), a pod that writes files and their
// sums, a second pod that verifies them; the PV, the VolumeAttachment, the
// staging and publish mounts and the store's volume are checked at each
// step, and deleting the claim removes the volume from the store.
func TestReplicatedExt4(t *testing.T) {
	t.Parallel() // see main_test.go, "Parallel tests"
	ns := newNamespace(t, "ext4")
	apply(t, claim(ns, "data", env.cairn.ext4Class, "256Mi", corev1.PersistentVolumeFilesystem))

	// WaitForFirstConsumer: nothing is provisioned before a pod uses it.
	time.Sleep(2 * time.Second)
	var pvc corev1.PersistentVolumeClaim
	get(t, &pvc, "get", "pvc", "data", "-n", ns)
	if pvc.Status.Phase != corev1.ClaimPending || pvc.Spec.VolumeName != "" {
		t.Fatalf("claim before any pod: phase %s, volume %q; want Pending and none (WaitForFirstConsumer)", pvc.Status.Phase, pvc.Spec.VolumeName)
	}

	apply(t, shellPod(ns, "writer", "data", false, writeScript))
	pod := waitLog(t, ns, "writer", "written", 4*time.Minute)
	pv := boundPV(t, ns, "data")
	checkPV(t, pv, ns)
	stage := checkAttached(t, pv, pod)
	checkSums(t, stage)
	release(t, stage)
	waitPod(t, ns, "writer", 2*time.Minute, corev1.PodSucceeded)
	checkDetached(t, pv)

	apply(t, shellPod(ns, "reader", "data", false, verifyScript))
	pod = waitLog(t, ns, "reader", "verified", 4*time.Minute)
	stage = checkAttached(t, pv, pod)
	checkSums(t, stage)
	release(t, stage)
	waitPod(t, ns, "reader", 2*time.Minute, corev1.PodSucceeded)
	checkDetached(t, pv)

	// reclaimPolicy Delete: the claim's deletion removes the PV and the
	// store's volume.
	kubectl(t, "delete", "pod", "--all", "-n", ns, "--wait=true")
	kubectl(t, "delete", "pvc", "data", "-n", ns, "--wait=true")
	waitVolumeGone(t, pv)
}

// checkPV checks what the provisioner wrote into the PV.
func checkPV(t *testing.T, pv *corev1.PersistentVolume, ns string) {
	t.Helper()
	csi := pv.Spec.CSI
	switch {
	case csi == nil:
		t.Fatalf("PV %s is not a CSI volume", pv.Name)
	case csi.Driver != driverName:
		t.Errorf("PV driver %q, want %q", csi.Driver, driverName)
	case csi.VolumeHandle == "":
		t.Errorf("PV %s has no volume handle", pv.Name)
	}
	if pv.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimDelete {
		t.Errorf("PV reclaim policy %s, want Delete (the class's)", pv.Spec.PersistentVolumeReclaimPolicy)
	}
	if ref := pv.Spec.ClaimRef; ref == nil || ref.Namespace != ns || ref.Name != "data" {
		t.Errorf("PV claimRef %+v, want %s/data", pv.Spec.ClaimRef, ns)
	}
	if pv.Spec.StorageClassName != env.cairn.ext4Class {
		t.Errorf("PV class %q", pv.Spec.StorageClassName)
	}
	if pv.Spec.VolumeMode == nil || *pv.Spec.VolumeMode == corev1.PersistentVolumeFilesystem {
		if csi != nil && csi.FSType != "ext4" {
			t.Errorf("PV fsType %q, want ext4", csi.FSType)
		}
	}
	// The replicas are reached over the network from any node, so the
	// PV needs no node affinity; if it has one, it must admit this node.
	if na := pv.Spec.NodeAffinity; na != nil && na.Required != nil && !admitsNode(t, na.Required) {
		t.Errorf("PV %s node affinity %+v excludes node %s", pv.Name, na.Required, env.kube.NodeName)
	}
	v, err := volume(pv)
	if err != nil {
		t.Fatalf("the store has no volume %s for PV %s: %v", csi.VolumeHandle, pv.Name, err)
	}
	want := env.cairn.replicas
	if v.ReplicaCount != want || len(v.Replicas) != want {
		t.Errorf("volume %s: %d replicas of %d wanted, want %d (the class's replicas)", v.ID, len(v.Replicas), v.ReplicaCount, want)
	}
	nodes := map[string]bool{}
	for _, r := range v.Replicas {
		nodes[r.Node] = true
	}
	if len(nodes) != want {
		t.Errorf("volume %s: replicas on %d distinct nodes, want %d", v.ID, len(nodes), want)
	}
	if want := pvSize(pv); v.SizeBytes < want {
		t.Errorf("volume %s: %d bytes, less than the PV's %d", v.ID, v.SizeBytes, want)
	}
}

// admitsNode reports whether sel admits the cluster's node by its labels
// (the only operator CSI topology uses is In).
func admitsNode(t *testing.T, sel *corev1.NodeSelector) bool {
	t.Helper()
	var node corev1.Node
	get(t, &node, "get", "node", env.kube.NodeName)
	for _, term := range sel.NodeSelectorTerms {
		ok := true
		for _, e := range term.MatchExpressions {
			if e.Operator != corev1.NodeSelectorOpIn || !slices.Contains(e.Values, node.Labels[e.Key]) {
				ok = false
			}
		}
		if ok {
			return true
		}
	}
	return false
}

func pvSize(pv *corev1.PersistentVolume) uint64 {
	q := pv.Spec.Capacity[corev1.ResourceStorage]
	return uint64(q.Value())
}

// volume reads the PV's volume from the store.
func volume(pv *corev1.PersistentVolume) (*meta.Volume, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return env.cairn.meta.Volume(ctx, pv.Spec.CSI.VolumeHandle)
}

// checkAttached checks, while pod runs with the volume: the
// VolumeAttachment is attached to the node, the store has the volume
// attached to the registered node agent, kubelet staged the volume (one
// ext4 mount of a loop device) and published it into the pod. It returns
// the staging mount's path.
func checkAttached(t *testing.T, pv *corev1.PersistentVolume, pod *corev1.Pod) string {
	t.Helper()
	va := attachment(t, pv.Name)
	switch {
	case va == nil:
		t.Fatalf("no VolumeAttachment for PV %s while pod %s runs", pv.Name, pod.Name)
	case va.Spec.Attacher != driverName || va.Spec.NodeName != env.kube.NodeName:
		t.Errorf("VolumeAttachment %s: attacher %q node %q, want %q on %q", va.Name, va.Spec.Attacher, va.Spec.NodeName, driverName, env.kube.NodeName)
	case !va.Status.Attached:
		t.Errorf("VolumeAttachment %s not attached: %+v", va.Name, va.Status)
	}
	v, err := volume(pv)
	if err != nil {
		t.Fatal(err)
	}
	if v.Attachment == nil || v.Attachment.Node != env.cairn.node.ID {
		t.Errorf("store: volume %s attached to %+v, want %s (the node agent kubelet uses)", v.ID, v.Attachment, env.cairn.node.ID)
	}
	stage := stagingMount(t, pv)
	if stage == nil {
		t.Fatalf("no staging mount for PV %s under %s", pv.Name, stagingRoot())
	}
	if !strings.HasPrefix(stage.Source, "/dev/loop") {
		t.Errorf("staging mount %s: source %s, want a loop device", stage.Point, stage.Source)
	}
	if stage.FSType != "ext4" {
		t.Errorf("staging mount %s: %s, want ext4", stage.Point, stage.FSType)
	}
	publish := filepath.Join(env.kube.KubeletRoot, "pods", string(pod.UID), "volumes", "kubernetes.io~csi", pv.Name, "mount")
	ms := mountsUnder(t, publish)
	if len(ms) != 1 || ms[0].Source != stage.Source || ms[0].FSType != "ext4" {
		t.Errorf("publish mount %s: %+v, want one ext4 mount of %s", publish, ms, stage.Source)
	}
	return stage.Point
}

// stagingRoot is where kubelet stages volumes of the driver.
func stagingRoot() string {
	return filepath.Join(env.kube.KubeletRoot, "plugins", "kubernetes.io", "csi", driverName)
}

// stagingMount finds the PV's staging mount: kubelet names the directory
// by the sha256 of the volume handle.
func stagingMount(t *testing.T, pv *corev1.PersistentVolume) *localkube.Mount {
	t.Helper()
	sum := sha256.Sum256([]byte(pv.Spec.CSI.VolumeHandle))
	dir := filepath.Join(stagingRoot(), hex.EncodeToString(sum[:]), "globalmount")
	for _, m := range mountsUnder(t, dir) {
		if m.Point == dir {
			return &m
		}
	}
	return nil
}

// checkSums verifies the files against SHA256SUMS as the node sees them
// through the staging mount.
func checkSums(t *testing.T, stage string) {
	t.Helper()
	sums, err := os.ReadFile(filepath.Join(stage, "SHA256SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(sums)), "\n")
	if len(lines) != 8 {
		t.Fatalf("SHA256SUMS has %d lines, want 8:\n%s", len(lines), sums)
	}
	for _, l := range lines {
		want, name, ok := strings.Cut(l, "  ")
		if !ok {
			t.Fatalf("SHA256SUMS line %q", l)
		}
		b, err := os.ReadFile(filepath.Join(stage, name))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if got := hex.EncodeToString(sum[:]); got != want {
			t.Errorf("%s: sha256 %s on the node, %s in SHA256SUMS", name, got, want)
		}
	}
}

// release lets the pod's script finish.
func release(t *testing.T, stage string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(stage, ".continue"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
}

// checkDetached waits, after the pod ended, for kubelet to unstage the
// volume, the attach/detach controller to detach it, and the store to
// record it detached.
func checkDetached(t *testing.T, pv *corev1.PersistentVolume) {
	t.Helper()
	err := poll(context.Background(), 3*time.Minute, "PV "+pv.Name+" to be unstaged and detached", func() error {
		if m := stagingMount(t, pv); m != nil {
			return fmt.Errorf("still staged at %s", m.Point)
		}
		if va := attachment(t, pv.Name); va != nil {
			return fmt.Errorf("VolumeAttachment %s still there (attached %v)", va.Name, va.Status.Attached)
		}
		v, err := volume(pv)
		if err != nil {
			return err
		}
		if v.Attachment != nil {
			return fmt.Errorf("store: still attached to %s (state %s)", v.Attachment.Node, v.State)
		}
		if dev, ok := loopOf(pv.Spec.CSI.VolumeHandle); ok {
			return fmt.Errorf("loop device %s is still attached to the volume's FUSE file", dev)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v\nkubelet:\n%s", err, env.kube.Kubelet().Tail(30))
	}
	var now corev1.PersistentVolume
	if !get(t, &now, "get", "pv", pv.Name) || now.Status.Phase != corev1.VolumeBound {
		t.Errorf("PV %s after detach: phase %s, want Bound", pv.Name, now.Status.Phase)
	}
}

// waitVolumeGone waits until the PV and its volume in the store are gone.
func waitVolumeGone(t *testing.T, pv *corev1.PersistentVolume) {
	t.Helper()
	err := poll(context.Background(), 2*time.Minute, "PV "+pv.Name+" and its volume to be deleted", func() error {
		var now corev1.PersistentVolume
		if get(t, &now, "get", "pv", pv.Name) {
			return fmt.Errorf("PV %s still there (%s)", pv.Name, now.Status.Phase)
		}
		_, err := volume(pv)
		if errors.Is(err, meta.ErrNotFound) {
			return nil
		}
		if err == nil {
			return fmt.Errorf("store still has volume %s", pv.Spec.CSI.VolumeHandle)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// loopOf returns a loop device attached to the FUSE file of volume id,
// whatever directory the kernel reports it in: the file is named after the
// volume, and in a pod the path is the one the agent's mount namespace saw.
func loopOf(id string) (string, bool) {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
		if filepath.Base(backing) == id {
			return "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(f))), true
		}
	}
	return "", false
}
