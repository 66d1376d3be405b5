//go:build e2e

package e2e

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// blockWriteScript writes 4 MiB of random data at the start of the raw
// device, reads it back, prints its sum, and waits for the test to look.
const blockWriteScript = `set -e
test -b /dev/xvda
dd if=/dev/urandom of=/tmp/pattern bs=1048576 count=4 2>/dev/null
dd if=/tmp/pattern of=/dev/xvda bs=1048576 conv=fsync 2>/dev/null
w=$(sha256sum < /tmp/pattern | cut -d' ' -f1)
r=$(dd if=/dev/xvda bs=1048576 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
test "$w" = "$r"
echo "sum $w"
echo written
sleep 3600
`

// blockReadScript prints the sum of the device's first 4 MiB.
const blockReadScript = `set -e
test -b /dev/xvda
echo "sum $(dd if=/dev/xvda bs=1048576 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)"
echo verified
`

var sumLine = regexp.MustCompile(`(?m)^sum ([0-9a-f]{64})$`)

// TestRawBlock is scenario 2 of issue 14: a claim with volumeMode Block;
// a pod writes the device and reads it back, a second pod reads what the
// first wrote. The device reaches the pod through kubelet's block paths.
func TestRawBlock(t *testing.T) {
	hostOnly(t)
	t.Parallel() // see main_test.go, "Parallel tests"
	ns := newNamespace(t, "block")
	apply(t, claim(ns, "dev", "cairn-block", "64Mi", corev1.PersistentVolumeBlock))
	apply(t, shellPod(ns, "writer", "dev", true, blockWriteScript))
	pod := waitLog(t, ns, "writer", "written", 4*time.Minute)
	m := sumLine.FindStringSubmatch(podLog(pod))
	if m == nil {
		t.Fatalf("writer printed no sum:\n%s", podLog(pod))
	}
	written := m[1]
	pv := boundPV(t, ns, "dev")
	if pv.Spec.VolumeMode == nil || *pv.Spec.VolumeMode != corev1.PersistentVolumeBlock {
		t.Errorf("PV %s volume mode %v, want Block", pv.Name, pv.Spec.VolumeMode)
	}
	va := attachment(t, pv.Name)
	if va == nil || !va.Status.Attached || va.Spec.NodeName != env.kube.NodeName {
		t.Fatalf("VolumeAttachment of %s while the writer runs: %+v", pv.Name, va)
	}
	v, err := volume(pv)
	if err != nil {
		t.Fatal(err)
	}
	if v.AccessType != "block" {
		t.Errorf("store: volume %s access type %q, want block", v.ID, v.AccessType)
	}
	if v.Attachment == nil || v.Attachment.Node != env.cairn.node.ID {
		t.Errorf("store: volume %s attached to %+v, want %s", v.ID, v.Attachment, env.cairn.node.ID)
	}
	// kubelet publishes a block volume as a device file per pod under
	// plugins/kubernetes.io/csi/volumeDevices; nothing is mounted with a
	// filesystem.
	devDir := filepath.Join(env.kube.KubeletRoot, "plugins", "kubernetes.io", "csi", "volumeDevices")
	var found bool
	for _, mt := range mountsUnder(t, devDir) {
		if strings.Contains(mt.Point, pv.Name) {
			found = true
		}
	}
	if !found {
		t.Errorf("no mount for %s under %s: %+v", pv.Name, devDir, mountsUnder(t, devDir))
	}

	// The writer sleeps once done: deleting it is its end.
	kubectl(t, "delete", "pod", "writer", "-n", ns, "--wait=true", "--timeout=2m")
	checkDetached(t, pv)

	apply(t, shellPod(ns, "reader", "dev", true, blockReadScript))
	pod = waitPod(t, ns, "reader", 4*time.Minute, corev1.PodSucceeded)
	m = sumLine.FindStringSubmatch(podLog(pod))
	if m == nil {
		t.Fatalf("reader printed no sum:\n%s", podLog(pod))
	}
	if m[1] != written {
		t.Errorf("the second pod read %s, the first wrote %s", m[1], written)
	}
	checkDetached(t, pv)
	t.Logf("block volume %s: 4 MiB written and read back by another pod", v.ID)
}
