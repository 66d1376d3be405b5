//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// kubectl runs kubectl as admin and fails the test on an error.
func kubectl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := env.kube.Kubectl(context.Background(), nil, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// apply creates or updates objects given as Go values (encoded to JSON).
func apply(t *testing.T, objs ...any) {
	t.Helper()
	for _, o := range objs {
		b, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := env.kube.Kubectl(context.Background(), bytes.NewReader(b), "apply", "-f", "-"); err != nil {
			t.Fatal(err)
		}
	}
}

// get decodes `kubectl get ARGS -o json` into into; it reports false when
// the object does not exist.
func get(t *testing.T, into any, args ...string) bool {
	t.Helper()
	out, err := env.kube.Kubectl(context.Background(), nil, append(args, "-o", "json")...)
	if err != nil {
		if strings.Contains(err.Error(), "NotFound") {
			return false
		}
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(out), into); err != nil {
		t.Fatalf("decode kubectl get %v: %v", args, err)
	}
	return true
}

// newNamespace makes a namespace for one test. Its cleanup deletes the
// pods and claims in it and waits until their volumes are gone, so the
// next test starts from an empty store.
func newNamespace(t *testing.T, prefix string) string {
	t.Helper()
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	ns := prefix + "-" + hex.EncodeToString(b)
	kubectl(t, "create", "namespace", ns)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("events in %s:\n%s", ns, events(ns))
		}
		ctx := context.Background()
		for _, kind := range []string{"pods", "volumesnapshots", "pvc"} {
			if _, err := env.kube.Kubectl(ctx, nil, "delete", kind, "--all", "-n", ns, "--wait=true", "--timeout=3m"); err != nil {
				t.Errorf("delete %s in %s: %v", kind, ns, err)
			}
		}
		if err := poll(ctx, 3*time.Minute, "the namespace's volumes to go", func() error {
			var pvs corev1.PersistentVolumeList
			out, err := env.kube.Kubectl(ctx, nil, "get", "pv", "-o", "json")
			if err != nil {
				return err
			}
			if err := json.Unmarshal([]byte(out), &pvs); err != nil {
				return err
			}
			for _, pv := range pvs.Items {
				if ref := pv.Spec.ClaimRef; ref != nil && ref.Namespace == ns && pv.Spec.PersistentVolumeReclaimPolicy == corev1.PersistentVolumeReclaimDelete {
					return fmt.Errorf("PV %s (%s) still there", pv.Name, pv.Status.Phase)
				}
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
		if _, err := env.kube.Kubectl(ctx, nil, "delete", "namespace", ns, "--wait=false"); err != nil {
			t.Error(err)
		}
	})
	return ns
}

// events lists the events of a namespace, oldest first.
func events(ns string) string {
	out, err := env.kube.Kubectl(context.Background(), nil, "get", "events", "-n", ns, "--sort-by=.lastTimestamp")
	if err != nil {
		return err.Error()
	}
	return out
}

// storageClass makes a StorageClass of the driver for one test, deleted
// when the test ends.
func storageClass(t *testing.T, name string, params map[string]string, reclaim corev1.PersistentVolumeReclaimPolicy, binding storagev1.VolumeBindingMode) *storagev1.StorageClass {
	t.Helper()
	class := &storagev1.StorageClass{
		TypeMeta:          metav1.TypeMeta{APIVersion: "storage.k8s.io/v1", Kind: "StorageClass"},
		ObjectMeta:        metav1.ObjectMeta{Name: name},
		Provisioner:       driverName,
		Parameters:        params,
		ReclaimPolicy:     &reclaim,
		VolumeBindingMode: &binding,
	}
	apply(t, class)
	t.Cleanup(func() { _, _ = env.kube.Kubectl(context.Background(), nil, "delete", "storageclass", name) })
	return class
}

// claim is a PersistentVolumeClaim of size on class.
func claim(ns, name, class, size string, mode corev1.PersistentVolumeMode) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "PersistentVolumeClaim"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &class,
			VolumeMode:       &mode,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}},
		},
	}
}

// shellPod is a pod of one busybox container that runs script with the
// claim at /data (mount) or /dev/xvda (block), and is not restarted.
func shellPod(ns, name, claimName string, block bool, script string) *corev1.Pod {
	c := corev1.Container{
		Name: "main", Image: "e2e.local/busybox:1", ImagePullPolicy: corev1.PullNever,
		Command: []string{"/bin/sh", "-c", script},
	}
	if block {
		c.VolumeDevices = []corev1.VolumeDevice{{Name: "data", DevicePath: "/dev/xvda"}}
	} else {
		c.VolumeMounts = []corev1.VolumeMount{{Name: "data", MountPath: "/data"}}
	}
	noToken := false
	grace := int64(1)
	return &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: corev1.PodSpec{
			RestartPolicy: corev1.RestartPolicyNever,
			// No cluster DNS here: the node's resolver, without the
			// MissingClusterDNS warning on every pod.
			DNSPolicy:                     corev1.DNSDefault,
			AutomountServiceAccountToken:  &noToken,
			TerminationGracePeriodSeconds: &grace,
			Containers:                    []corev1.Container{c},
			Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claimName}}}},
		},
	}
}

// waitPod waits until the pod is in one of phases and returns it; a pod
// that reaches another final phase fails the test with its log and the
// namespace's events.
func waitPod(t *testing.T, ns, name string, timeout time.Duration, phases ...corev1.PodPhase) *corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	err := poll(context.Background(), timeout, fmt.Sprintf("pod %s/%s to be %v", ns, name, phases), func() error {
		pod = corev1.Pod{}
		if !get(t, &pod, "get", "pod", name, "-n", ns) {
			return fmt.Errorf("no pod")
		}
		for _, p := range phases {
			if pod.Status.Phase == p {
				return nil
			}
		}
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			t.Fatalf("pod %s/%s is %s, want %v; its log:\n%s\nevents:\n%s", ns, name, pod.Status.Phase, phases, podLog(&pod), events(ns))
		}
		return fmt.Errorf("phase %s", pod.Status.Phase)
	})
	if err != nil {
		t.Fatalf("%v\npod log:\n%s\nevents:\n%s", err, podLog(&pod), events(ns))
	}
	return &pod
}

// podLog reads the container "main"'s log from kubelet's log directory
// (kubectl logs would need the API server to reach kubelet, which listens
// on loopback only).
func podLog(pod *corev1.Pod) string {
	if pod == nil || pod.UID == "" {
		return "(no pod)"
	}
	dir := filepath.Join(env.kube.Dir, "pod-logs", fmt.Sprintf("%s_%s_%s", pod.Namespace, pod.Name, pod.UID), "main")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return err.Error()
		}
		// CRI log lines: TIME STREAM TAG MESSAGE.
		for _, line := range strings.Split(strings.TrimRight(string(raw), "\n"), "\n") {
			if f := strings.SplitN(line, " ", 4); len(f) == 4 {
				line = f[3]
			}
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// waitLog waits until the pod's log has a line equal to want.
func waitLog(t *testing.T, ns, name, want string, timeout time.Duration) *corev1.Pod {
	t.Helper()
	return waitLogLine(t, ns, name, timeout, func(l string) bool { return l == want })
}

// waitLogLine waits until a line of the pod's log satisfies match.
func waitLogLine(t *testing.T, ns, name string, timeout time.Duration, match func(string) bool) *corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	err := poll(context.Background(), timeout, fmt.Sprintf("the awaited line in the log of %s/%s", ns, name), func() error {
		pod = corev1.Pod{}
		if !get(t, &pod, "get", "pod", name, "-n", ns) {
			return fmt.Errorf("no pod")
		}
		if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			t.Fatalf("pod %s/%s ended (%s) before printing the awaited line; its log:\n%s\nevents:\n%s", ns, name, pod.Status.Phase, podLog(&pod), events(ns))
		}
		for _, l := range strings.Split(podLog(&pod), "\n") {
			if match(l) {
				return nil
			}
		}
		return fmt.Errorf("phase %s", pod.Status.Phase)
	})
	if err != nil {
		t.Fatalf("%v\npod log:\n%s\nevents:\n%s", err, podLog(&pod), events(ns))
	}
	return &pod
}

// boundPV waits for the claim to be bound and returns its volume.
func boundPV(t *testing.T, ns, name string) *corev1.PersistentVolume {
	t.Helper()
	var pvc corev1.PersistentVolumeClaim
	if err := poll(context.Background(), 2*time.Minute, "claim "+name+" bound", func() error {
		if !get(t, &pvc, "get", "pvc", name, "-n", ns) {
			return fmt.Errorf("no claim")
		}
		if pvc.Status.Phase != corev1.ClaimBound {
			return fmt.Errorf("phase %s", pvc.Status.Phase)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\nevents:\n%s", err, events(ns))
	}
	var pv corev1.PersistentVolume
	if !get(t, &pv, "get", "pv", pvc.Spec.VolumeName) {
		t.Fatalf("claim %s is bound to %s, which does not exist", name, pvc.Spec.VolumeName)
	}
	return &pv
}

// attachment returns the VolumeAttachment of pv, or nil.
func attachment(t *testing.T, pv string) *storagev1.VolumeAttachment {
	t.Helper()
	var list storagev1.VolumeAttachmentList
	get(t, &list, "get", "volumeattachments")
	for i, va := range list.Items {
		if s := va.Spec.Source.PersistentVolumeName; s != nil && *s == pv {
			return &list.Items[i]
		}
	}
	return nil
}

// mountsUnder lists the mounts at or below dir (localkube.MountsUnder).
func mountsUnder(t *testing.T, dir string) []localkube.Mount {
	t.Helper()
	ms, err := localkube.MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}
