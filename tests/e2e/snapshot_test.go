//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// TestSnapshotRestoreClone is scenario 3 of issue 14: a VolumeSnapshot of
// a claim, a claim restored from it and a clone of the claim; pods check
// that each holds the data of its moment: the restore the data at
// snapshot time, the clone the data changed after it.
func TestSnapshotRestoreClone(t *testing.T) {
	hostOnly(t)
	t.Parallel() // see main_test.go, "Parallel tests"
	ns := newNamespace(t, "snap")
	apply(t, claim(ns, "src", "cairn-replicated-ext4", "128Mi", corev1.PersistentVolumeFilesystem))
	apply(t, shellPod(ns, "write", "src", false, `set -e
mkdir -p /data/files
for i in 1 2 3 4 5 6 7 8; do head -c $((i * 65536 + 5)) /dev/urandom > /data/files/f$i; done
cd /data && sha256sum files/* > SHA256SUMS && sync`))
	waitPod(t, ns, "write", 4*time.Minute, corev1.PodSucceeded)

	apply(t, map[string]any{
		"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
		"metadata": map[string]any{"name": "snap", "namespace": ns},
		"spec": map[string]any{"volumeSnapshotClassName": "cairn-snapshot",
			"source": map[string]any{"persistentVolumeClaimName": "src"}},
	})
	if err := poll(context.Background(), 3*time.Minute, "VolumeSnapshot snap ready", func() error {
		var vs struct {
			Status *struct {
				ReadyToUse *bool `json:"readyToUse"`
				Error      *struct {
					Message string `json:"message"`
				} `json:"error"`
			} `json:"status"`
		}
		get(t, &vs, "get", "volumesnapshot", "snap", "-n", ns)
		switch {
		case vs.Status == nil:
			return fmt.Errorf("no status yet")
		case vs.Status.ReadyToUse != nil && *vs.Status.ReadyToUse:
			return nil
		case vs.Status.Error != nil:
			return fmt.Errorf("error: %s", vs.Status.Error.Message)
		}
		return fmt.Errorf("not ready")
	}); err != nil {
		t.Fatalf("%v\nevents:\n%s", err, events(ns))
	}

	// Changed after the snapshot: the restore must not see it, the clone must.
	apply(t, shellPod(ns, "change", "src", false, `set -e
echo changed > /data/files/f1
cd /data && sha256sum files/* > SHA256SUMS.after && sync`))
	waitPod(t, ns, "change", 4*time.Minute, corev1.PodSucceeded)
	kubectl(t, "delete", "pod", "write", "change", "-n", ns, "--wait=true")

	restored := claim(ns, "restored", "cairn-replicated-ext4", "128Mi", corev1.PersistentVolumeFilesystem)
	snapGroup := "snapshot.storage.k8s.io"
	restored.Spec.DataSource = &corev1.TypedLocalObjectReference{APIGroup: &snapGroup, Kind: "VolumeSnapshot", Name: "snap"}
	clone := claim(ns, "clone", "cairn-replicated-ext4", "128Mi", corev1.PersistentVolumeFilesystem)
	clone.Spec.DataSource = &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: "src"}
	apply(t, restored, clone)
	apply(t, shellPod(ns, "check-restored", "restored", false, `set -e
cd /data && sha256sum -c SHA256SUMS && test ! -e SHA256SUMS.after && echo verified`))
	apply(t, shellPod(ns, "check-clone", "clone", false, `set -e
cd /data && sha256sum -c SHA256SUMS.after && test "$(cat files/f1)" = changed && echo verified`))
	for _, p := range []string{"check-restored", "check-clone"} {
		pod := waitPod(t, ns, p, 5*time.Minute, corev1.PodSucceeded)
		t.Logf("%s: %s", p, strings.Join(strings.Fields(podLog(pod)), " "))
	}
	for _, c := range []string{"restored", "clone"} {
		pv := boundPV(t, ns, c)
		want := resource.MustParse("128Mi")
		if got := pv.Spec.Capacity[corev1.ResourceStorage]; got.Cmp(want) < 0 {
			t.Errorf("%s: PV capacity %s, want at least %s", c, got.String(), want.String())
		}
	}
}
