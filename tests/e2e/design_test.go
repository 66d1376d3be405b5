//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"

	"github.com/cairn-csi/cairn/replication/meta"
)

// designClassFile is the design's StorageClass as deploy/ ships it.
const designClassFile = "../../deploy/examples/design-storageclass.yaml"

// designClassName is its metadata.name.
const designClassName = "high-performance-replicated"

// designReservable is the IOPS each node agent may promise to guaranteed
// volumes here (cairn node --reservable-iops, set by deployCairn): the
// design class's minIOPS (10000) fits, a second volume of 15000 does not.
const designReservable = 20000

// markerScript writes a line that is easy to look for in the replicas'
// files, many times over, beside writeScript's files.
const markerScript = `i=0; while [ $i -lt 2048 ]; do echo ` + plaintextMarker + `; i=$((i+1)); done > /data/marker.txt
`

// plaintextMarker must not appear in the replicas of an encrypted volume.
const plaintextMarker = "cairn-e2e-plaintext-marker-7f3a"

// TestDesignStorageClass is scenario 6 of issue 14: the StorageClass of
// Cairn's founding design (deploy/examples/design-storageclass.yaml).
//
// As shipped, it asks for compression with encryption, which cannot go
// together (docs/compression.md): the claim must get an event that says
// so, and no volume. With
// compression "none", deduplication "false" (the node's data directories are
// on the host's file system, which cannot share blocks; tests/csie2e
// TestDeduplication runs one on an xfs that can) and every other key
// verbatim, the class provisions
// and mounts, and the test checks that each key had its effect: three
// replicas on three nodes' nvme-ssd data directories, data encrypted on the
// disks and read back across pods with the passphrase from the Secret, the
// guaranteed reservation admitted (and a second one beyond the nodes'
// reservable IOPS refused with ResourceExhausted), and Retain.
func TestDesignStorageClass(t *testing.T) {
	hostOnly(t)
	t.Parallel() // see main_test.go, "Parallel tests"
	yaml, err := os.ReadFile(designClassFile)
	if err != nil {
		t.Fatal(err)
	}
	passphrase := make([]byte, 32)
	_, _ = rand.Read(passphrase)
	kubectl(t, "-n", namespace, "create", "secret", "generic", "cairn-encryption",
		"--from-literal=encryptionPassphrase="+base64.StdEncoding.EncodeToString(passphrase))
	t.Cleanup(func() {
		_, _ = env.kube.Kubectl(context.Background(), nil, "-n", namespace, "delete", "secret", "cairn-encryption")
	})

	t.Run("verbatim: refused by name", func(t *testing.T) {
		applyYAML(t, yaml, designClassName)
		ns := newNamespace(t, "design-verbatim")
		apply(t, claim(ns, "data", designClassName, "256Mi", corev1.PersistentVolumeFilesystem))
		// WaitForFirstConsumer: provisioning starts when a pod is
		// scheduled, which needs the class's CSIStorageCapacity.
		apply(t, shellPod(ns, "writer", "data", false, "echo never"))
		msg := provisioningFailed(t, ns, "data")
		if !strings.Contains(msg, "compression") || !strings.Contains(msg, "cannot go with encryption") {
			t.Errorf("ProvisioningFailed does not say that compression cannot go with encryption: %s", msg)
		}
		t.Logf("ProvisioningFailed: %s", msg)
	})

	t.Run("today's values: provisions and mounts", func(t *testing.T) {
		const name = designClassName + "-today"
		today := bytes.Replace(yaml, []byte("name: "+designClassName+"\n"), []byte("name: "+name+"\n"), 1)
		for _, r := range [][2]string{{`deduplication: "true"`, `deduplication: "false"`}, {`compression: "lz4"`, `compression: "none"`}} {
			if !bytes.Contains(today, []byte(r[0])) {
				t.Fatalf("%s no longer has %s: update this test", designClassFile, r[0])
			}
			today = bytes.Replace(today, []byte(r[0]), []byte(r[1]), 1)
		}
		applyYAML(t, today, name)
		var class storagev1.StorageClass
		get(t, &class, "get", "storageclass", name)
		if class.VolumeBindingMode == nil || *class.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer {
			t.Errorf("class %s binding mode %v, want WaitForFirstConsumer", name, class.VolumeBindingMode)
		}

		ns := newNamespace(t, "design")
		apply(t, claim(ns, "data", name, "256Mi", corev1.PersistentVolumeFilesystem))
		apply(t, shellPod(ns, "writer", "data", false, markerScript+writeScript))
		pod := waitLog(t, ns, "writer", "written", 4*time.Minute)
		pv := boundPV(t, ns, "data")
		retainCleanup(t, pv)
		if pv.Spec.PersistentVolumeReclaimPolicy != corev1.PersistentVolumeReclaimRetain {
			t.Errorf("PV reclaim policy %s, want Retain (the class's)", pv.Spec.PersistentVolumeReclaimPolicy)
		}
		stage := checkAttached(t, pv, pod)
		checkSums(t, stage)
		v, err := volume(pv)
		if err != nil {
			t.Fatal(err)
		}
		checkDesignVolume(t, v)
		nodes := map[string]bool{}
		for _, r := range v.Replicas {
			nodes[r.Node] = true
			dir := filepath.Join(env.cairn.dir, r.Node, "disk-nvme-ssd", "replicas", r.ID)
			if _, err := os.Stat(dir); err != nil {
				t.Errorf("replica %s on %s is not on the node's nvme-ssd disk: %v", r.ID, r.Node, err)
				continue
			}
			if f := findInFiles(t, dir, []byte(plaintextMarker)); f != "" {
				t.Errorf("encryption: replica %s holds the pod's plaintext in %s", r.ID, f)
			}
		}
		if len(nodes) != 3 {
			t.Errorf("replicas on %d nodes, want 3: %+v", len(nodes), v.Replicas)
		}
		// The guaranteed reservation is made: one more volume of 15000
		// IOPS does not fit next to it on any node.
		over := storageClass(t, "e2e-guaranteed-over", map[string]string{
			"type": "nvme-ssd", "replicationFactor": "3", "qosClass": "guaranteed", "minIOPS": "15000"},
			corev1.PersistentVolumeReclaimDelete, storagev1.VolumeBindingImmediate)
		apply(t, claim(ns, "over", over.Name, "64Mi", corev1.PersistentVolumeFilesystem))
		msg := provisioningFailed(t, ns, "over")
		if !strings.Contains(msg, "ResourceExhausted") || !strings.Contains(msg, "IOPS") {
			t.Errorf("a guaranteed volume beyond the nodes' reservable IOPS: want ResourceExhausted naming IOPS, got: %s", msg)
		}
		t.Logf("admission refused: %s", msg)

		release(t, stage)
		waitPod(t, ns, "writer", 2*time.Minute, corev1.PodSucceeded)
		checkDetached(t, pv)
		// Another pod decrypts with the Secret's passphrase at NodeStage.
		apply(t, shellPod(ns, "reader", "data", false, "grep -c "+plaintextMarker+" /data/marker.txt; "+verifyScript))
		pod = waitLog(t, ns, "reader", "verified", 4*time.Minute)
		stage = checkAttached(t, pv, pod)
		release(t, stage)
		waitPod(t, ns, "reader", 2*time.Minute, corev1.PodSucceeded)
		if !slices.Contains(strings.Split(podLog(pod), "\n"), "2048") {
			t.Errorf("reader: the marker file does not read back whole: %s", podLog(pod))
		}

		// Retain: the claim goes, the PV stays Released and the volume stays
		// in the store (retainCleanup deletes both).
		kubectl(t, "delete", "pod", "--all", "-n", ns, "--wait=true")
		checkDetached(t, pv)
		kubectl(t, "delete", "pvc", "data", "-n", ns, "--wait=true")
		waitReleased(t, pv)
		if _, err := volume(pv); err != nil {
			t.Errorf("Retain: the store lost volume %s: %v", pv.Spec.CSI.VolumeHandle, err)
		}
	})
}

// checkDesignVolume checks that the store's volume carries the design
// class's choices.
func checkDesignVolume(t *testing.T, v *meta.Volume) {
	t.Helper()
	if v.ReplicaCount != 3 {
		t.Errorf("volume %s: %d replicas wanted, the class says 3", v.ID, v.ReplicaCount)
	}
	if v.Encryption == nil {
		t.Errorf("volume %s has no data key: encryption aes-256-gcm was not applied", v.ID)
	}
	// The store keeps parameters in their stored form, without the
	// values that are the defaults (replicationMode synchronous,
	// consistencyLevel strong, checksumAlgorithm crc32c): "" stands for
	// them.
	for k, want := range map[string]string{
		"type": "nvme-ssd", "encryption": "aes-256-gcm", "qosClass": "guaranteed", "minIOPS": "10000",
		"maxIOPS": "50000", "snapshotSchedule": "0 */6 * * *",
		"replicationMode": "", "consistencyLevel": "", "checksumAlgorithm": "",
	} {
		if got := v.Parameters[k]; got != want {
			t.Errorf("volume %s: parameter %s = %q, want %q", v.ID, k, got, want)
		}
	}
	for k := range v.Parameters {
		if strings.HasPrefix(k, "csi.storage.k8s.io/") && strings.Contains(k, "secret") {
			t.Errorf("volume %s: the store keeps the sidecar's secret reference %s", v.ID, k)
		}
	}
}

// applyYAML applies a manifest of one cluster-scoped object named name,
// deleted when the test ends.
func applyYAML(t *testing.T, yaml []byte, name string) {
	t.Helper()
	if _, err := env.kube.Kubectl(context.Background(), bytes.NewReader(yaml), "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = env.kube.Kubectl(context.Background(), nil, "delete", "storageclass", name) })
}

// provisioningFailed waits for the claim's first ProvisioningFailed event
// and returns its message.
func provisioningFailed(t *testing.T, ns, claimName string) string {
	t.Helper()
	var msg string
	if err := poll(context.Background(), 3*time.Minute, "a ProvisioningFailed event for "+claimName, func() error {
		var evs corev1.EventList
		get(t, &evs, "get", "events", "-n", ns, "--field-selector", "involvedObject.name="+claimName+",reason=ProvisioningFailed")
		if len(evs.Items) == 0 {
			return fmt.Errorf("none yet")
		}
		msg = evs.Items[0].Message
		return nil
	}); err != nil {
		t.Fatalf("%v\nevents:\n%s", err, events(ns))
	}
	return msg
}

// retainCleanup deletes a retained PV and its volume in the store when the
// test ends.
func retainCleanup(t *testing.T, pv *corev1.PersistentVolume) {
	t.Helper()
	t.Cleanup(func() {
		_, _ = env.kube.Kubectl(context.Background(), nil, "delete", "pv", pv.Name, "--wait=true", "--timeout=1m")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := retire(ctx, pv.Spec.CSI.VolumeHandle); err != nil {
			t.Errorf("delete the retained volume %s from the store: %v", pv.Spec.CSI.VolumeHandle, err)
		}
	})
}

// waitReleased waits until a retained PV whose claim is deleted is
// Released; it fails the test if the PV goes.
func waitReleased(t *testing.T, pv *corev1.PersistentVolume) {
	t.Helper()
	if err := poll(context.Background(), time.Minute, "PV "+pv.Name+" Released", func() error {
		var now corev1.PersistentVolume
		if !get(t, &now, "get", "pv", pv.Name) {
			return fmt.Errorf("PV %s is gone: Retain must keep it", pv.Name)
		}
		if now.Status.Phase != corev1.VolumeReleased {
			return fmt.Errorf("phase %s", now.Status.Phase)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// findInFiles returns the first file under dir that contains b, or "".
func findInFiles(t *testing.T, dir string, b []byte) string {
	t.Helper()
	var found string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || found != "" {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if bytes.Contains(data, b) {
			found = p
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}
