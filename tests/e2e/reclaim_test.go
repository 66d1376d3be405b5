//go:build e2e

package e2e

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
)

// TestReclaimRetain is the Retain half of scenario 7 of issue 14 (the
// Delete half ends TestReplicatedExt4): with reclaimPolicy Retain,
// deleting the claim leaves the PV Released and the volume in the store.
func TestReclaimRetain(t *testing.T) {
	hostOnly(t)
	t.Parallel() // see main_test.go, "Parallel tests"
	retain := corev1.PersistentVolumeReclaimRetain
	class := storageClass(t, "e2e-retain", map[string]string{"replicas": "2", "csi.storage.k8s.io/fstype": "ext4"},
		retain, storagev1.VolumeBindingWaitForFirstConsumer)

	ns := newNamespace(t, "retain")
	apply(t, claim(ns, "kept", class.Name, "64Mi", corev1.PersistentVolumeFilesystem))
	apply(t, shellPod(ns, "writer", "kept", false, "echo kept > /data/kept && sync && echo written"))
	waitPod(t, ns, "writer", 4*time.Minute, corev1.PodSucceeded)
	pv := boundPV(t, ns, "kept")
	if pv.Spec.PersistentVolumeReclaimPolicy != retain {
		t.Errorf("PV %s reclaim policy %s, want Retain", pv.Name, pv.Spec.PersistentVolumeReclaimPolicy)
	}
	// The volume stays in the store once the PV is deleted: the test
	// deletes it there.
	retainCleanup(t, pv)

	kubectl(t, "delete", "pod", "writer", "-n", ns, "--wait=true")
	checkDetached(t, pv)
	kubectl(t, "delete", "pvc", "kept", "-n", ns, "--wait=true")
	waitReleased(t, pv)
	// Give the provisioner time to (wrongly) delete it.
	time.Sleep(5 * time.Second)
	v, err := volume(pv)
	if err != nil {
		t.Fatalf("Retain: the store lost volume %s: %v", pv.Spec.CSI.VolumeHandle, err)
	}
	if v.Attachment != nil {
		t.Errorf("retained volume %s still attached to %s", v.ID, v.Attachment.Node)
	}
}

// retire deletes a volume from the store as `cairn ctl volume delete` does.
func retire(ctx context.Context, id string) error {
	_, err := env.cairn.meta.RetireVolume(ctx, id)
	return err
}
