//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"

	"github.com/cairn-csi/cairn/replication/meta"
)

// TestUnknownParameter is scenario 8 of issue 14: a StorageClass with an
// unknown parameter gives the claim an event that names the parameter,
// and no volume is left in the store.
func TestUnknownParameter(t *testing.T) {
	hostOnly(t)
	t.Parallel() // see main_test.go, "Parallel tests"
	// Immediate: provisioning starts without a pod.
	class := storageClass(t, "e2e-bad-parameter", map[string]string{"replicas": "2", "replicaCout": "3"},
		corev1.PersistentVolumeReclaimDelete, storagev1.VolumeBindingImmediate)
	ns := newNamespace(t, "badparam")
	apply(t, claim(ns, "bad", class.Name, "64Mi", corev1.PersistentVolumeFilesystem))

	msg := provisioningFailed(t, ns, "bad")
	if !strings.Contains(msg, "replicaCout") {
		t.Errorf("ProvisioningFailed event does not name the parameter replicaCout: %s", msg)
	}
	if !strings.Contains(msg, "InvalidArgument") {
		t.Errorf("ProvisioningFailed event is not InvalidArgument: %s", msg)
	}
	var pvc corev1.PersistentVolumeClaim
	get(t, &pvc, "get", "pvc", "bad", "-n", ns)
	if pvc.Status.Phase != corev1.ClaimPending {
		t.Errorf("claim %s, want Pending", pvc.Status.Phase)
	}
	// Nothing left behind: no PV, no volume of that name in the store.
	var pvs corev1.PersistentVolumeList
	get(t, &pvs, "get", "pv")
	for _, pv := range pvs.Items {
		if ref := pv.Spec.ClaimRef; ref != nil && ref.Namespace == ns {
			t.Errorf("PV %s made for the bad claim", pv.Name)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := env.cairn.meta.State(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	name := "pvc-" + string(pvc.UID)
	for _, v := range st.Volumes {
		if v.Name == name && v.State != meta.VolumeDeleted {
			t.Errorf("the store has volume %s (%s) for the bad claim", v.ID, v.State)
		}
	}
	t.Logf("ProvisioningFailed: %s", msg)
}
