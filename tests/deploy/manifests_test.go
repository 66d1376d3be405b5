// Package deploy checks the Kubernetes manifests under deploy/ without a
// cluster: every YAML document decodes strictly into its k8s.io/api type (an
// unknown field, a duplicate field or an unknown kind fails), and the pieces
// are wired to each other — the CSI socket each container uses, the kubelet
// paths, the images, the accounts and what their roles allow, and the
// StorageClass parameters the driver accepts. Strict decoding does not check
// enum values (mountPropagation, volumeBindingMode …); these tests do.
package deploy

import (
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/cairn-csi/cairn/driver/csi"
	"github.com/cairn-csi/cairn/replication/volspec"
)

const (
	driverName = "csi.cairn.io"
	namespace  = "cairn-system"
	cairnImage = "cairn:dev"

	// kubeletPlugins is where kubelet expects driver sockets on the host.
	kubeletPlugins = "/var/lib/kubelet/plugins"
	kubeletPods    = "/var/lib/kubelet/pods"
	// kubeletRegistry is the host folder kubelet watches for registration sockets.
	kubeletRegistry = "/var/lib/kubelet/plugins_registry"
)

// sidecarTags are the sidecar images and the exact tags to run
// (ECOSYSTEM.md, "CSI sidecars").
var sidecarTags = map[string]string{
	"registry.k8s.io/sig-storage/csi-provisioner":           "v6.4.0",
	"registry.k8s.io/sig-storage/csi-attacher":              "v4.13.0",
	"registry.k8s.io/sig-storage/csi-resizer":               "v2.3.0",
	"registry.k8s.io/sig-storage/csi-snapshotter":           "v8.7.0",
	"registry.k8s.io/sig-storage/csi-node-driver-registrar": "v2.18.0",
	"registry.k8s.io/sig-storage/livenessprobe":             "v2.20.0",
}

// localImages are built from this repository and loaded into the cluster
// (deploy/README.md); kubelet must not try to pull them.
var localImages = map[string]bool{"cairn:dev": true, "cairn-sanity:dev": true}

// ---------------------------------------------------------------------------
// The checker checks itself

func TestDecodeRejectsBadDocuments(t *testing.T) {
	bad := map[string]string{
		"unknown field": `apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  replica: 2
`,
		"duplicate field": `apiVersion: v1
kind: ConfigMap
metadata: {name: x}
data: {a: "1"}
data: {b: "2"}
`,
		"unknown kind": `apiVersion: example.com/v1
kind: Widget
metadata: {name: x}
`,
		"wrong apiVersion for kind": `apiVersion: apps/v1beta1
kind: Deployment
metadata: {name: x}
`,
		"no kind": `metadata: {name: x}
`,
	}
	for name, doc := range bad {
		if _, obj, err := decode([]byte(doc)); err == nil {
			t.Errorf("%s: decoded without error into %T", name, obj)
		}
	}
	docs, err := splitDocuments([]byte("# only a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, d := range docs {
		if _, obj, err := decode(d); err != nil {
			t.Errorf("decode %q: %v", d, err)
		} else if obj != nil {
			n++
		}
	}
	if n != 1 {
		t.Errorf("split and decode found %d objects, want 1", n)
	}
}

func TestParameterCheckRejectsBadValues(t *testing.T) {
	bad := []map[string]string{
		{"replicas": "0"}, {"replicas": "6"}, {"replicas": "three"},
		{"replicas": "2", "writeQuorum": "3"}, {"writeQuorum": "0"},
		{"dataLocality": "strict"},
		{"staleReplicaTimeout": "-1m"}, {"staleReplicaTimeout": "soon"},
		{"maxIOPS": "-5"}, {"maxIOPS": "100", "minIOPS": "200"},
		{"maxBandwidth": "fast"}, {"burstDuration": "0s"},
		{"csi.storage.k8s.io/fstype": "btrfs"},
		{"replica": "3"}, {"fsType": "ext4"},
	}
	for _, p := range bad {
		if errs := checkParameters(p); len(errs) == 0 {
			t.Errorf("checkParameters(%v) found nothing wrong", p)
		}
	}
	good := map[string]string{
		"replicas": "3", "writeQuorum": "2", "dataLocality": "best-effort",
		"staleReplicaTimeout": "15", "maxIOPS": "5000", "minIOPS": "100",
		"maxBandwidth": "100Mi", "burstDuration": "2s",
		"csi.storage.k8s.io/fstype":                  "xfs",
		"csi.storage.k8s.io/provisioner-secret-name": "x",
	}
	if errs := checkParameters(good); len(errs) > 0 {
		t.Errorf("checkParameters(%v): %v", good, errs)
	}
}

// ---------------------------------------------------------------------------
// Install manifests: deploy/kubernetes

const installDir = "deploy/kubernetes"

func TestEveryDocumentDecodesStrictly(t *testing.T) {
	s := load(t, installDir)
	seen := map[string]string{}
	for _, m := range s.all {
		if m.key == "kustomize.config.k8s.io/v1beta1/Kustomization" {
			continue
		}
		md := m.meta()
		if md.Name == "" {
			t.Errorf("%s: no metadata.name", m)
		}
		if kinds[m.key].namespaced {
			if md.Namespace != namespace {
				t.Errorf("%s: namespace %q, want %q (set it in the file: kubectl apply -f must work too)", m, md.Namespace, namespace)
			}
		} else if md.Namespace != "" {
			t.Errorf("%s: cluster-scoped object has namespace %q", m, md.Namespace)
		}
		id := m.key + " " + md.Namespace + "/" + md.Name
		if prev, dup := seen[id]; dup {
			t.Errorf("%s: %s is also defined in %s", m, id, prev)
		}
		seen[id] = m.String()
	}
	ns := one[corev1.Namespace](t, s, namespace)
	if ns.Labels["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace %s: the node DaemonSet is privileged; label pod-security.kubernetes.io/enforce=privileged", namespace)
	}
}

func TestKustomizationListsEveryFile(t *testing.T) {
	s := load(t, installDir)
	ks := ofType[kustomization](s)
	if len(ks) != 1 {
		t.Fatalf("want one Kustomization under %s, found %d", installDir, len(ks))
	}
	listed := map[string]bool{}
	for _, r := range ks[0].Resources {
		if listed[r] {
			t.Errorf("kustomization lists %s twice", r)
		}
		listed[r] = true
		if _, err := os.Stat(filepath.Join(s.root, installDir, filepath.FromSlash(r))); err != nil {
			t.Errorf("kustomization lists %s: %v", r, err)
		}
	}
	for _, f := range s.files {
		rel := strings.TrimPrefix(f, installDir+"/")
		if path.Base(rel) == "kustomization.yaml" {
			continue
		}
		if !listed[rel] {
			t.Errorf("%s is not listed in %s/kustomization.yaml", f, installDir)
		}
	}
	if len(ks[0].Resources) == 0 || ks[0].Resources[0] != "namespace.yaml" {
		t.Errorf("kustomization: list namespace.yaml first, got %v", ks[0].Resources)
	}
}

func TestImagesArePinned(t *testing.T) {
	for _, dir := range []string{installDir, sanityDir} {
		s := load(t, dir)
		for _, p := range s.pods() {
			for _, c := range allContainers(p.spec) {
				checkImage(t, p.where, c)
			}
		}
	}
}

func checkImage(t *testing.T, where string, c *corev1.Container) {
	t.Helper()
	repo, tag, digest := splitImage(c.Image)
	switch {
	case tag == "":
		t.Errorf("%s: container %s: image %q has no tag", where, c.Name, c.Image)
		return
	case tag == "latest":
		t.Errorf("%s: container %s: image %q uses :latest", where, c.Name, c.Image)
	}
	if digest != "" && !strings.HasPrefix(digest, "sha256:") {
		t.Errorf("%s: container %s: image %q has a malformed digest", where, c.Name, c.Image)
	}
	if want, ok := sidecarTags[repo]; ok {
		if tag != want {
			t.Errorf("%s: container %s: %s:%s, want tag %s", where, c.Name, repo, tag, want)
		}
		if c.ImagePullPolicy == corev1.PullNever {
			t.Errorf("%s: container %s: a registry image with imagePullPolicy Never", where, c.Name)
		}
		return
	}
	if strings.HasPrefix(repo, "registry.k8s.io/sig-storage/") {
		t.Errorf("%s: container %s: sidecar image %s is not one of the pinned sidecars", where, c.Name, c.Image)
		return
	}
	if !localImages[c.Image] {
		t.Errorf("%s: container %s: image %q is neither a pinned sidecar nor a locally built image (%v)", where, c.Name, c.Image, localImages)
		return
	}
	// Built locally and loaded into the nodes: never pulled.
	if c.ImagePullPolicy != corev1.PullIfNotPresent && c.ImagePullPolicy != corev1.PullNever {
		t.Errorf("%s: container %s: locally built image %s needs imagePullPolicy IfNotPresent or Never, not %q", where, c.Name, c.Image, c.ImagePullPolicy)
	}
}

// TestPodSpecsUseValidValues checks the enum and format fields that strict
// decoding lets through, in every pod of deploy/.
func TestPodSpecsUseValidValues(t *testing.T) {
	for _, dir := range []string{installDir, sanityDir} {
		s := load(t, dir)
		for _, p := range s.pods() {
			checkPodSpec(t, p)
		}
	}
}

var (
	ianaSvcName    = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)
	envReference   = regexp.MustCompile(`\$+\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	validFieldRefs = []string{"metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
		"spec.serviceAccountName", "status.hostIP", "status.hostIPs", "status.podIP", "status.podIPs"}
	validHostPathTypes = []corev1.HostPathType{"", corev1.HostPathDirectoryOrCreate, corev1.HostPathDirectory,
		corev1.HostPathFileOrCreate, corev1.HostPathFile, corev1.HostPathSocket, corev1.HostPathCharDev, corev1.HostPathBlockDev}
)

func checkPodSpec(t *testing.T, p podTemplate) {
	t.Helper()
	spec := p.spec
	switch spec.DNSPolicy {
	case "", corev1.DNSClusterFirst, corev1.DNSClusterFirstWithHostNet, corev1.DNSDefault, corev1.DNSNone:
	default:
		t.Errorf("%s: dnsPolicy %q", p.where, spec.DNSPolicy)
	}
	if spec.HostNetwork && spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("%s: hostNetwork pods need dnsPolicy ClusterFirstWithHostNet to resolve Service names", p.where)
	}
	switch spec.RestartPolicy {
	case "", corev1.RestartPolicyAlways, corev1.RestartPolicyOnFailure, corev1.RestartPolicyNever:
	default:
		t.Errorf("%s: restartPolicy %q", p.where, spec.RestartPolicy)
	}
	switch spec.PriorityClassName {
	case "", "system-node-critical", "system-cluster-critical":
	default:
		t.Errorf("%s: priorityClassName %q is not a built-in class", p.where, spec.PriorityClassName)
	}
	volumes := map[string]bool{}
	for _, v := range spec.Volumes {
		if volumes[v.Name] {
			t.Errorf("%s: volume %q defined twice", p.where, v.Name)
		}
		volumes[v.Name] = true
		if v.HostPath != nil {
			if !path.IsAbs(v.HostPath.Path) {
				t.Errorf("%s: hostPath %q is not absolute", p.where, v.HostPath.Path)
			}
			if v.HostPath.Type != nil && !slices.Contains(validHostPathTypes, *v.HostPath.Type) {
				t.Errorf("%s: hostPath %s: type %q", p.where, v.HostPath.Path, *v.HostPath.Type)
			}
		}
	}
	names := map[string]bool{}
	ports := map[int32]string{}
	for _, c := range allContainers(spec) {
		if names[c.Name] {
			t.Errorf("%s: container name %q used twice", p.where, c.Name)
		}
		names[c.Name] = true
		switch c.ImagePullPolicy {
		case "", corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
		default:
			t.Errorf("%s: container %s: imagePullPolicy %q", p.where, c.Name, c.ImagePullPolicy)
		}
		privileged := c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				t.Errorf("%s: container %s mounts undefined volume %q", p.where, c.Name, m.Name)
			}
			if m.MountPropagation != nil {
				switch *m.MountPropagation {
				case corev1.MountPropagationNone, corev1.MountPropagationHostToContainer:
				case corev1.MountPropagationBidirectional:
					if !privileged {
						t.Errorf("%s: container %s: Bidirectional propagation on %s needs a privileged container", p.where, c.Name, m.MountPath)
					}
				default:
					t.Errorf("%s: container %s: mountPropagation %q on %s", p.where, c.Name, *m.MountPropagation, m.MountPath)
				}
			}
		}
		portNames := map[string]bool{}
		for _, cp := range c.Ports {
			if cp.Name != "" {
				if len(cp.Name) > 15 || !ianaSvcName.MatchString(cp.Name) || !strings.ContainsAny(cp.Name, "abcdefghijklmnopqrstuvwxyz") {
					t.Errorf("%s: container %s: port name %q is not an IANA service name (≤15 lowercase letters, digits, '-')", p.where, c.Name, cp.Name)
				}
				if portNames[cp.Name] {
					t.Errorf("%s: container %s: port name %q used twice", p.where, c.Name, cp.Name)
				}
				portNames[cp.Name] = true
			}
			switch cp.Protocol {
			case "", corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
			default:
				t.Errorf("%s: container %s: protocol %q", p.where, c.Name, cp.Protocol)
			}
			if cp.ContainerPort < 1 || cp.ContainerPort > 65535 {
				t.Errorf("%s: container %s: containerPort %d", p.where, c.Name, cp.ContainerPort)
			}
			if spec.HostNetwork && cp.HostPort != 0 && cp.HostPort != cp.ContainerPort {
				t.Errorf("%s: container %s: with hostNetwork, hostPort must equal containerPort", p.where, c.Name)
			}
			// Containers of a pod share its network namespace.
			if other, dup := ports[cp.ContainerPort]; dup {
				t.Errorf("%s: port %d declared by %s and %s", p.where, cp.ContainerPort, other, c.Name)
			}
			ports[cp.ContainerPort] = c.Name
		}
		for _, probe := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe, c.StartupProbe} {
			if probe == nil || probe.HTTPGet == nil {
				continue
			}
			if _, ok := containerPort(c, probe.HTTPGet.Port); !ok {
				t.Errorf("%s: container %s: probe port %q is not a port of the container", p.where, c.Name, probe.HTTPGet.Port.String())
			}
			if !strings.HasPrefix(probe.HTTPGet.Path, "/") {
				t.Errorf("%s: container %s: probe path %q", p.where, c.Name, probe.HTTPGet.Path)
			}
		}
		// $(VAR) in command and args is only expanded for variables the
		// container defines; otherwise the text stays as it is.
		env := map[string]bool{}
		for _, e := range c.Env {
			env[e.Name] = true
			if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && !slices.Contains(validFieldRefs, e.ValueFrom.FieldRef.FieldPath) {
				t.Errorf("%s: container %s: env %s: fieldRef %q is not one the downward API offers", p.where, c.Name, e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		}
		for _, a := range append(slices.Clone(c.Command), c.Args...) {
			for _, m := range envReference.FindAllStringSubmatch(a, -1) {
				if strings.HasPrefix(m[0], "$$") {
					continue // escaped
				}
				if !env[m[1]] {
					t.Errorf("%s: container %s: %q refers to $(%s), which the container does not define", p.where, c.Name, a, m[1])
				}
			}
		}
	}
}

func TestCSIDriver(t *testing.T) {
	s := load(t, installDir)
	ds := ofType[storagev1.CSIDriver](s)
	if len(ds) != 1 {
		t.Fatalf("want one CSIDriver, found %d", len(ds))
	}
	d := ds[0]
	if d.Name != driverName {
		t.Errorf("CSIDriver %q, want %q", d.Name, driverName)
	}
	sp := d.Spec
	isTrue := func(b *bool) bool { return b != nil && *b }
	isFalse := func(b *bool) bool { return b != nil && !*b }
	if !isTrue(sp.AttachRequired) {
		t.Error("CSIDriver: attachRequired must be true (ControllerPublishVolume fences the writer)")
	}
	if !isFalse(sp.PodInfoOnMount) {
		t.Error("CSIDriver: podInfoOnMount must be false")
	}
	if sp.FSGroupPolicy == nil || *sp.FSGroupPolicy != storagev1.FileFSGroupPolicy {
		t.Errorf("CSIDriver: fsGroupPolicy %v, want File", sp.FSGroupPolicy)
	}
	if !slices.Equal(sp.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecyclePersistent}) {
		t.Errorf("CSIDriver: volumeLifecycleModes %v, want [Persistent]", sp.VolumeLifecycleModes)
	}
	if !isTrue(sp.StorageCapacity) {
		t.Error("CSIDriver: storageCapacity must be true (csi-provisioner --enable-capacity)")
	}
	if !isTrue(sp.SELinuxMount) {
		t.Error("CSIDriver: seLinuxMount must be true")
	}
	if sp.RequiresRepublish != nil && *sp.RequiresRepublish {
		t.Error("CSIDriver: requiresRepublish is not wanted")
	}
}

func TestStorageClasses(t *testing.T) {
	s := load(t, installDir)
	want := map[string]struct {
		replicas string
		fstype   string
	}{
		"cairn-replicated-ext4": {"3", "ext4"},
		"cairn-2r-xfs":          {"2", "xfs"},
		"cairn-block":           {"3", ""},
	}
	scs := ofType[storagev1.StorageClass](s)
	found := map[string]bool{}
	for _, sc := range scs {
		found[sc.Name] = true
		where := "StorageClass " + sc.Name
		if sc.Provisioner != driverName {
			t.Errorf("%s: provisioner %q, want the CSIDriver's name %q", where, sc.Provisioner, driverName)
		}
		for _, err := range checkParameters(sc.Parameters) {
			t.Errorf("%s: %v", where, err)
		}
		if sc.ReclaimPolicy != nil {
			switch *sc.ReclaimPolicy {
			case corev1.PersistentVolumeReclaimDelete, corev1.PersistentVolumeReclaimRetain:
			default: // Recycle is not allowed for dynamically provisioned volumes
				t.Errorf("%s: reclaimPolicy %q, want Delete or Retain", where, *sc.ReclaimPolicy)
			}
		}
		if sc.VolumeBindingMode == nil {
			t.Errorf("%s: volumeBindingMode unset (defaults to Immediate), want WaitForFirstConsumer", where)
		} else {
			switch *sc.VolumeBindingMode {
			case storagev1.VolumeBindingWaitForFirstConsumer:
			case storagev1.VolumeBindingImmediate:
				t.Errorf("%s: volumeBindingMode Immediate, want WaitForFirstConsumer (placement and capacity need the pod's node)", where)
			default:
				t.Errorf("%s: volumeBindingMode %q is not a valid mode", where, *sc.VolumeBindingMode)
			}
		}
		if sc.AllowVolumeExpansion == nil || !*sc.AllowVolumeExpansion {
			t.Errorf("%s: allowVolumeExpansion must be true (the driver expands online)", where)
		}
		if len(sc.MountOptions) > 0 {
			t.Errorf("%s: mountOptions %v: the driver takes none", where, sc.MountOptions)
		}
		if w, ok := want[sc.Name]; ok {
			if got := sc.Parameters["replicas"]; got != w.replicas {
				t.Errorf("%s: replicas %q, want %q", where, got, w.replicas)
			}
			if got := sc.Parameters["csi.storage.k8s.io/fstype"]; got != w.fstype {
				t.Errorf("%s: csi.storage.k8s.io/fstype %q, want %q", where, got, w.fstype)
			}
		}
	}
	for name := range want {
		if !found[name] {
			t.Errorf("StorageClass %s is missing", name)
		}
	}
	vscs := ofType[volumeSnapshotClass](s)
	if len(vscs) != 1 {
		t.Fatalf("want one VolumeSnapshotClass, found %d", len(vscs))
	}
	for _, v := range vscs {
		if v.Driver != driverName {
			t.Errorf("VolumeSnapshotClass %s: driver %q, want %q", v.Name, v.Driver, driverName)
		}
		if v.DeletionPolicy != "Delete" && v.DeletionPolicy != "Retain" {
			t.Errorf("VolumeSnapshotClass %s: deletionPolicy %q, want Delete or Retain", v.Name, v.DeletionPolicy)
		}
		// The parameters pass the driver's own check (CreateSnapshot
		// refuses the same ones), so a snapshot of this class is taken.
		if err := csi.CheckSnapshotParameters(v.Parameters); err != nil {
			t.Errorf("VolumeSnapshotClass %s: %v", v.Name, err)
		}
	}
}

// checkParameters checks StorageClass parameters with the driver's own
// parser (replication/volspec; docs/architecture.md, "StorageClass
// parameters"): the keys it accepts, or csi.storage.k8s.io/*, and each value
// well formed. A manifest and the driver cannot disagree.
func checkParameters(params map[string]string) []error {
	if _, err := volspec.Parse(params); err != nil {
		return []error{err}
	}
	return nil
}

// TestControllerWiring checks the controller Deployment: one socket in an
// emptyDir shared by every container, leader election and health endpoints
// on the sidecars, and the meta address pointing at the node agents.
func TestControllerWiring(t *testing.T) {
	s := load(t, installDir)
	dep := one[appsv1.Deployment](t, s, "cairn-controller")
	p := podTemplate{"Deployment cairn-controller", dep.Namespace, dep.Spec.Template.Labels, &dep.Spec.Template.Spec}
	spec := p.spec

	if !labelsMatch(dep.Spec.Selector, p.labels) {
		t.Errorf("%s: selector %v does not match the template's labels %v", p.where, dep.Spec.Selector, p.labels)
	}
	if spec.HostNetwork {
		t.Errorf("%s: the controller does not need the host network", p.where)
	}
	cairn := oneContainer(t, p, "cairn")
	if cairn.Image != cairnImage {
		t.Errorf("%s: cairn image %q, want %q", p.where, cairn.Image, cairnImage)
	}
	if len(cairn.Args) == 0 || cairn.Args[0] != "controller" {
		t.Errorf("%s: cairn container args %q, want the controller subcommand first", p.where, cairn.Args)
	}
	endpoint := mustFlag(t, p.where, cairn, "endpoint")
	sock, err := socketPath(endpoint)
	if err != nil {
		t.Fatalf("%s: cairn --endpoint: %v", p.where, err)
	}
	want, err := location(spec, cairn, sock)
	if err != nil {
		t.Fatalf("%s: %v", p.where, err)
	}
	if !strings.HasPrefix(want, "emptyDir:") {
		t.Errorf("%s: the controller socket is at %s, want it in an emptyDir", p.where, want)
	}

	sidecars := []string{"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "livenessprobe"}
	for _, r := range sidecars {
		c := oneContainer(t, p, r)
		addr, err := socketPath(mustFlag(t, p.where, c, "csi-address"))
		if err != nil {
			t.Errorf("%s: %s --csi-address: %v", p.where, c.Name, err)
			continue
		}
		got, err := location(spec, c, addr)
		if err != nil {
			t.Errorf("%s: %v", p.where, err)
		} else if got != want {
			t.Errorf("%s: %s talks to %s (%s), but cairn serves %s (%s)", p.where, c.Name, addr, got, sock, want)
		}
	}
	if n := len(longRunning(spec)); n != 1+len(sidecars) {
		t.Errorf("%s: %d containers, want cairn and %v", p.where, n, sidecars)
	}

	// Leader election and the /healthz/leader-election liveness probe.
	httpPorts := map[int]string{}
	for _, r := range []string{"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"} {
		c := oneContainer(t, p, r)
		if v, ok := flag(c.Args, "leader-election"); !ok || v != "true" {
			t.Errorf("%s: %s: --leader-election missing", p.where, c.Name)
		}
		for f, w := range map[string]time.Duration{
			"leader-election-lease-duration": 15 * time.Second,
			"leader-election-renew-deadline": 10 * time.Second,
			"leader-election-retry-period":   5 * time.Second,
		} {
			v, ok := flag(c.Args, f)
			d, err := time.ParseDuration(v)
			if !ok || err != nil || d != w {
				t.Errorf("%s: %s: --%s=%q, want %v", p.where, c.Name, f, v, w)
			}
		}
		ep := mustFlag(t, p.where, c, "http-endpoint")
		_, port, err := hostPort(ep)
		if err != nil {
			t.Errorf("%s: %s: --http-endpoint %q: %v", p.where, c.Name, ep, err)
			continue
		}
		if other, dup := httpPorts[port]; dup {
			t.Errorf("%s: %s and %s both serve HTTP on port %d (one network namespace)", p.where, other, c.Name, port)
		}
		httpPorts[port] = c.Name
		lp := c.LivenessProbe
		if lp == nil || lp.HTTPGet == nil || lp.HTTPGet.Path != "/healthz/leader-election" {
			t.Errorf("%s: %s: want a liveness probe on /healthz/leader-election", p.where, c.Name)
			continue
		}
		if got, _ := containerPort(c, lp.HTTPGet.Port); got != port {
			t.Errorf("%s: %s: liveness probe on port %d, but --http-endpoint is %s", p.where, c.Name, got, ep)
		}
		if v, ok := flag(c.Args, "timeout"); ok {
			if _, err := time.ParseDuration(v); err != nil {
				t.Errorf("%s: %s: --timeout=%q: %v", p.where, c.Name, v, err)
			}
		}
	}

	prov := oneContainer(t, p, "csi-provisioner")
	for _, f := range []string{"enable-capacity", "extra-create-metadata"} {
		if v, ok := flag(prov.Args, f); !ok || v != "true" {
			t.Errorf("%s: csi-provisioner: --%s missing", p.where, f)
		}
	}
	if v, _ := flag(prov.Args, "capacity-ownerref-level"); v != "2" {
		t.Errorf("%s: csi-provisioner: --capacity-ownerref-level=%q, want 2 (pod -> ReplicaSet -> Deployment)", p.where, v)
	}
	if v, _ := flag(prov.Args, "timeout"); v != "" {
		if d, err := time.ParseDuration(v); err != nil || d < 2*time.Minute {
			t.Errorf("%s: csi-provisioner: --timeout=%q, want at least 2m (above CreateVolume's worst case)", p.where, v)
		}
	} else {
		t.Errorf("%s: csi-provisioner: --timeout unset (default 10s is below CreateVolume's worst case)", p.where)
	}
	for name, field := range map[string]string{"NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"} {
		e := envVar(prov, name)
		if e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != field {
			t.Errorf("%s: csi-provisioner: --enable-capacity needs env %s from %s", p.where, name, field)
		}
	}

	checkLivenessSidecar(t, p, cairn)
	checkMetaAddress(t, s, p.where, mustFlag(t, p.where, cairn, "meta"))
}

// checkLivenessSidecar checks that the driver container's liveness probe asks
// the livenessprobe sidecar, where it listens.
func checkLivenessSidecar(t *testing.T, p podTemplate, driver *corev1.Container) {
	t.Helper()
	lp := oneContainer(t, p, "livenessprobe")
	host, port := "", 9808
	if ep, ok := flag(lp.Args, "http-endpoint"); ok {
		h, n, err := hostPort(ep)
		if err != nil {
			t.Errorf("%s: livenessprobe --http-endpoint %q: %v", p.where, ep, err)
			return
		}
		host, port = h, n
	} else if v, ok := flag(lp.Args, "health-port"); ok {
		port, _ = strconv.Atoi(v)
	}
	if driver.LivenessProbe == nil || driver.LivenessProbe.HTTPGet == nil {
		t.Errorf("%s: container %s has no HTTP liveness probe", p.where, driver.Name)
		return
	}
	loopback := false
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		loopback = true
		if !p.spec.HostNetwork {
			t.Errorf("%s: livenessprobe listens on %s, which kubelet cannot reach outside the host network", p.where, host)
		}
	}
	for kind, probe := range map[string]*corev1.Probe{"liveness": driver.LivenessProbe, "startup": driver.StartupProbe} {
		if probe == nil {
			continue
		}
		if probe.HTTPGet == nil {
			t.Errorf("%s: container %s: %s probe is not an HTTP probe of the livenessprobe sidecar", p.where, driver.Name, kind)
			continue
		}
		if probe.HTTPGet.Path != "/healthz" {
			t.Errorf("%s: container %s: %s probe path %q, want /healthz", p.where, driver.Name, kind, probe.HTTPGet.Path)
		}
		if got, _ := containerPort(driver, probe.HTTPGet.Port); got != port {
			t.Errorf("%s: container %s: %s probe on port %d, livenessprobe listens on %d", p.where, driver.Name, kind, got, port)
		}
		if loopback && probe.HTTPGet.Host != host {
			t.Errorf("%s: container %s: %s probe host %q, but livenessprobe listens on %s only", p.where, driver.Name, kind, probe.HTTPGet.Host, host)
		}
	}
}

// checkMetaAddress checks that a --meta value names the headless Service in
// front of the node agents' meta API, on the port they listen on.
func checkMetaAddress(t *testing.T, s *set, where, meta string) {
	t.Helper()
	ds := one[appsv1.DaemonSet](t, s, "cairn-node")
	np := podTemplate{"DaemonSet cairn-node", ds.Namespace, ds.Spec.Template.Labels, &ds.Spec.Template.Spec}
	node := oneContainer(t, np, "cairn")
	_, apiPort, err := hostPort(mustFlag(t, np.where, node, "api-addr"))
	if err != nil {
		t.Fatalf("%s: cairn --api-addr: %v", np.where, err)
	}
	for _, addr := range strings.Split(meta, ",") {
		host, port, err := hostPort(addr)
		if err != nil {
			t.Errorf("%s: --meta %q: %v", where, addr, err)
			continue
		}
		parts := strings.Split(strings.TrimSuffix(host, ".cluster.local"), ".")
		if len(parts) != 3 || parts[2] != "svc" {
			t.Errorf("%s: --meta %q: want <service>.<namespace>.svc:<port>", where, addr)
			continue
		}
		var svc *corev1.Service
		for _, x := range ofType[corev1.Service](s) {
			if x.Name == parts[0] && x.Namespace == parts[1] {
				svc = x
			}
		}
		if svc == nil {
			t.Errorf("%s: --meta %q: no Service %s/%s", where, addr, parts[1], parts[0])
			continue
		}
		if svc.Spec.ClusterIP != corev1.ClusterIPNone {
			t.Errorf("Service %s: want headless (clusterIP: None) so its name gives every member", svc.Name)
		}
		if !svc.Spec.PublishNotReadyAddresses {
			t.Errorf("Service %s: want publishNotReadyAddresses: a store that is still forming must be reachable", svc.Name)
		}
		if !selectorMatches(svc.Spec.Selector, np.labels) {
			t.Errorf("Service %s: selector %v does not select the node pods (%v)", svc.Name, svc.Spec.Selector, np.labels)
		}
		ok := false
		for _, sp := range svc.Spec.Ports {
			if int(sp.Port) != port {
				continue
			}
			target := sp.TargetPort
			if target.Type == intstr.Int && target.IntVal == 0 {
				target = intstr.FromInt32(sp.Port)
			}
			got, found := containerPort(node, target)
			if !found || got != apiPort {
				t.Errorf("Service %s: port %d targets %q, but the meta API listens on %d", svc.Name, port, target.String(), apiPort)
			}
			ok = true
		}
		if !ok {
			t.Errorf("%s: --meta %q: Service %s has no port %d", where, addr, svc.Name, port)
		}
	}
}

func selectorMatches(sel, labels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func labelsMatch(sel *metav1.LabelSelector, labels map[string]string) bool {
	if sel == nil || len(sel.MatchExpressions) > 0 {
		return false
	}
	return selectorMatches(sel.MatchLabels, labels)
}

// TestNodeWiring checks the node DaemonSet: host network, a privileged
// driver, the socket where kubelet looks for it and the registrar says it is,
// the kubelet folders with Bidirectional propagation, and how the store forms.
func TestNodeWiring(t *testing.T) {
	s := load(t, installDir)
	ds := one[appsv1.DaemonSet](t, s, "cairn-node")
	p := podTemplate{"DaemonSet cairn-node", ds.Namespace, ds.Spec.Template.Labels, &ds.Spec.Template.Spec}
	spec := p.spec

	if !labelsMatch(ds.Spec.Selector, p.labels) {
		t.Errorf("%s: selector does not match the template's labels", p.where)
	}
	if !spec.HostNetwork {
		t.Errorf("%s: hostNetwork must be true (replicas and Raft members reach each other at node addresses)", p.where)
	}
	cairn := oneContainer(t, p, "cairn")
	if cairn.Image != cairnImage {
		t.Errorf("%s: cairn image %q, want %q", p.where, cairn.Image, cairnImage)
	}
	if sc := cairn.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Errorf("%s: the cairn container must be privileged (mounts, loop and FUSE devices)", p.where)
	}
	if len(cairn.Args) == 0 || cairn.Args[0] != "node" {
		t.Errorf("%s: cairn args %q, want the node subcommand first", p.where, cairn.Args)
	}
	if id := mustFlag(t, p.where, cairn, "id"); id != "$(NODE_NAME)" {
		t.Errorf("%s: cairn --id=%q, want $(NODE_NAME)", p.where, id)
	}
	if e := envVar(cairn, "NODE_NAME"); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("%s: cairn: env NODE_NAME must come from spec.nodeName", p.where)
	}

	// One socket: where cairn listens, where the registrar and the
	// livenessprobe connect, and where kubelet is told to look.
	sock, err := socketPath(mustFlag(t, p.where, cairn, "csi-endpoint"))
	if err != nil {
		t.Fatalf("%s: cairn --csi-endpoint: %v", p.where, err)
	}
	want, err := location(spec, cairn, sock)
	if err != nil {
		t.Fatalf("%s: %v", p.where, err)
	}
	hostSock := path.Join(kubeletPlugins, driverName, path.Base(sock))
	if want != "host:"+hostSock {
		t.Errorf("%s: cairn serves CSI at %s, want host:%s", p.where, want, hostSock)
	}
	reg := oneContainer(t, p, "csi-node-driver-registrar")
	lp := oneContainer(t, p, "livenessprobe")
	for _, c := range []*corev1.Container{reg, lp} {
		addr, err := socketPath(mustFlag(t, p.where, c, "csi-address"))
		if err != nil {
			t.Errorf("%s: %s --csi-address: %v", p.where, c.Name, err)
			continue
		}
		if got, err := location(spec, c, addr); err != nil {
			t.Errorf("%s: %v", p.where, err)
		} else if got != want {
			t.Errorf("%s: %s connects to %s (%s), cairn serves %s (%s)", p.where, c.Name, addr, got, sock, want)
		}
	}
	if got := mustFlag(t, p.where, reg, "kubelet-registration-path"); "host:"+got != want {
		t.Errorf("%s: --kubelet-registration-path=%s, but the socket is at %s", p.where, got, want)
	}
	regDir := "/registration"
	if v, ok := flag(reg.Args, "plugin-registration-path"); ok {
		regDir = v
	}
	if got, err := location(spec, reg, regDir); err != nil || got != "host:"+kubeletRegistry {
		t.Errorf("%s: registrar's %s is %s (%v), want host:%s", p.where, regDir, got, err, kubeletRegistry)
	}
	if ep, ok := flag(reg.Args, "http-endpoint"); ok {
		_, port, err := hostPort(ep)
		if err != nil {
			t.Errorf("%s: registrar --http-endpoint %q: %v", p.where, ep, err)
		} else if pr := reg.LivenessProbe; pr == nil || pr.HTTPGet == nil || pr.HTTPGet.Path != "/healthz" {
			t.Errorf("%s: registrar serves /healthz on %s but has no liveness probe on it", p.where, ep)
		} else if got, _ := containerPort(reg, pr.HTTPGet.Port); got != port {
			t.Errorf("%s: registrar probe on port %d, --http-endpoint %s", p.where, got, ep)
		}
	}

	// Mounts made by the driver must reach kubelet and the pods.
	for _, dir := range []string{kubeletPods, kubeletPlugins} {
		m, rel := mountFor(cairn, dir)
		if m == nil || rel != "." {
			t.Errorf("%s: cairn does not mount %s", p.where, dir)
			continue
		}
		if got, _ := location(spec, cairn, dir); got != "host:"+dir {
			t.Errorf("%s: cairn's %s is %s, want the host's %s at the same path", p.where, dir, got, dir)
		}
		if m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationBidirectional {
			t.Errorf("%s: cairn's %s needs mountPropagation Bidirectional", p.where, dir)
		}
	}
	if got, err := location(spec, cairn, "/dev"); err != nil || got != "host:/dev" {
		t.Errorf("%s: cairn needs the host's /dev at /dev (got %s, %v)", p.where, got, err)
	}
	dataDir := mustFlag(t, p.where, cairn, "data-dir")
	if got, err := location(spec, cairn, dataDir); err != nil || !strings.HasPrefix(got, "host:") {
		t.Errorf("%s: --data-dir %s must be on the host (got %s, %v): the store and replicas outlive the pod", p.where, dataDir, got, err)
	}

	checkLivenessSidecar(t, p, cairn)

	// Every address the agent listens on is a declared port (host ports,
	// with hostNetwork: the scheduler then sees conflicts).
	declared := map[int]bool{}
	for _, c := range allContainers(spec) {
		for _, cp := range c.Ports {
			declared[int(cp.ContainerPort)] = true
		}
	}
	for _, f := range []string{"raft-addr", "api-addr", "data-addr", "metrics-addr"} {
		v := mustFlag(t, p.where, cairn, f)
		_, port, err := hostPort(v)
		if err != nil {
			t.Errorf("%s: cairn --%s=%q: %v", p.where, f, v, err)
		} else if !declared[port] {
			t.Errorf("%s: cairn --%s listens on %d, which no container declares", p.where, f, port)
		}
	}

	checkStoreFormation(t, s, p, cairn)
}

// checkStoreFormation checks how the agents form the store: the ConfigMap's
// PEERS are exactly BOOTSTRAP_EXPECT meta API addresses written the way each
// peer advertises itself (the agent recognises itself in the list by string),
// and the start script lets only those peers bootstrap.
func checkStoreFormation(t *testing.T, s *set, p podTemplate, cairn *corev1.Container) {
	t.Helper()
	for _, f := range []string{"bootstrap-expect", "peers", "join"} {
		if _, ok := flag(cairn.Args, f); ok {
			t.Errorf("%s: cairn --%s on the command line overrides the start script's choice of bootstrap or join", p.where, f)
		}
	}
	values := map[string]string{}
	for _, name := range []string{"BOOTSTRAP_EXPECT", "PEERS"} {
		e := envVar(cairn, name)
		if e == nil || e.ValueFrom == nil || e.ValueFrom.ConfigMapKeyRef == nil {
			t.Fatalf("%s: cairn: env %s must come from the node ConfigMap", p.where, name)
		}
		ref := e.ValueFrom.ConfigMapKeyRef
		cm := one[corev1.ConfigMap](t, s, ref.Name)
		if cm.Namespace != p.ns {
			t.Errorf("ConfigMap %s is in %s, the pods in %s", cm.Name, cm.Namespace, p.ns)
		}
		v, ok := cm.Data[ref.Key]
		if !ok {
			t.Fatalf("ConfigMap %s has no key %s", cm.Name, ref.Key)
		}
		values[name] = v
	}
	expect, err := strconv.Atoi(values["BOOTSTRAP_EXPECT"])
	if err != nil || expect < 1 || expect > 7 || expect%2 == 0 {
		t.Errorf("BOOTSTRAP_EXPECT=%q: want an odd number of voters from 1 to 7 (3 or 5 in production)", values["BOOTSTRAP_EXPECT"])
	}
	advertise := mustFlag(t, p.where, cairn, "api-advertise")
	advHost, advPort, err := hostPort(advertise)
	if err != nil {
		t.Fatalf("%s: --api-advertise %q: %v", p.where, advertise, err)
	}
	_, apiPort, _ := hostPort(mustFlag(t, p.where, cairn, "api-addr"))
	if advPort != apiPort {
		t.Errorf("%s: --api-advertise port %d differs from --api-addr port %d", p.where, advPort, apiPort)
	}
	m := envReference.FindStringSubmatch(advHost)
	if m == nil || m[0] != advHost {
		t.Fatalf("%s: --api-advertise=%q: want $(VAR):port so that each node advertises itself", p.where, advertise)
	}
	advEnv := envVar(cairn, m[1])
	if advEnv == nil || advEnv.ValueFrom == nil || advEnv.ValueFrom.FieldRef == nil {
		t.Fatalf("%s: env %s must come from the downward API", p.where, m[1])
	}
	byIP := false
	switch advEnv.ValueFrom.FieldRef.FieldPath {
	case "spec.nodeName":
	case "status.hostIP":
		byIP = true
	default:
		t.Errorf("%s: env %s from %s: want spec.nodeName or status.hostIP", p.where, m[1], advEnv.ValueFrom.FieldRef.FieldPath)
	}
	peers := strings.Split(values["PEERS"], ",")
	if len(peers) != expect {
		t.Errorf("PEERS lists %d members, BOOTSTRAP_EXPECT is %d: list exactly the first members", len(peers), expect)
	}
	seen := map[string]bool{}
	for _, peer := range peers {
		h, port, err := hostPort(peer)
		if err != nil || peer != strings.TrimSpace(peer) {
			t.Errorf("PEERS entry %q: want host:port without spaces (%v)", peer, err)
			continue
		}
		if port != advPort {
			t.Errorf("PEERS entry %q: port %d, but agents advertise port %d (a peer finds itself in PEERS by exact match)", peer, port, advPort)
		}
		if isIP := net.ParseIP(h) != nil; isIP != byIP {
			t.Errorf("PEERS entry %q: agents advertise %s, so list them the same way", peer, advEnv.ValueFrom.FieldRef.FieldPath)
		}
		if seen[peer] {
			t.Errorf("PEERS lists %q twice", peer)
		}
		seen[peer] = true
	}
	// The start script: a peer (its advertised address in PEERS) bootstraps,
	// any other node joins; then it execs cairn with the container's args.
	script := strings.Join(cairn.Command, "\n")
	for _, want := range []string{
		"${" + m[1] + "}:" + strconv.Itoa(advPort),
		"CAIRN_BOOTSTRAP_EXPECT=", "CAIRN_PEERS=", "CAIRN_JOIN=",
		`exec /usr/local/bin/cairn "$@"`,
	} {
		if !strings.Contains(script, want) {
			t.Errorf("%s: cairn's start script does not contain %q", p.where, want)
		}
	}
}

// TestServiceAccountsAndRBAC checks that every pod's ServiceAccount exists and
// is bound, that every binding points at things that exist, and that each
// sidecar's account may do what the sidecar does.
func TestServiceAccountsAndRBAC(t *testing.T) {
	s := load(t, installDir)
	sas := map[string]bool{}
	for _, sa := range ofType[corev1.ServiceAccount](s) {
		sas[sa.Namespace+"/"+sa.Name] = true
	}
	clusterRoles := map[string]*rbacv1.ClusterRole{}
	for _, r := range ofType[rbacv1.ClusterRole](s) {
		clusterRoles[r.Name] = r
	}
	roles := map[string]*rbacv1.Role{}
	for _, r := range ofType[rbacv1.Role](s) {
		roles[r.Namespace+"/"+r.Name] = r
	}
	bound := map[string]bool{}
	checkSubjects := func(where string, subjects []rbacv1.Subject) {
		for _, sub := range subjects {
			if sub.Kind != rbacv1.ServiceAccountKind {
				t.Errorf("%s: subject %s %s: only ServiceAccounts are expected", where, sub.Kind, sub.Name)
				continue
			}
			id := sub.Namespace + "/" + sub.Name
			if !sas[id] {
				t.Errorf("%s: binds ServiceAccount %s, which is not defined", where, id)
			}
			bound[id] = true
		}
	}
	for _, b := range ofType[rbacv1.ClusterRoleBinding](s) {
		where := "ClusterRoleBinding " + b.Name
		if b.RoleRef.Kind != "ClusterRole" || b.RoleRef.APIGroup != rbacv1.GroupName || clusterRoles[b.RoleRef.Name] == nil {
			t.Errorf("%s: roleRef %+v is not a ClusterRole defined here", where, b.RoleRef)
		}
		checkSubjects(where, b.Subjects)
	}
	for _, b := range ofType[rbacv1.RoleBinding](s) {
		where := "RoleBinding " + b.Namespace + "/" + b.Name
		switch {
		case b.RoleRef.APIGroup != rbacv1.GroupName:
			t.Errorf("%s: roleRef apiGroup %q", where, b.RoleRef.APIGroup)
		case b.RoleRef.Kind == "Role" && roles[b.Namespace+"/"+b.RoleRef.Name] != nil:
		case b.RoleRef.Kind == "ClusterRole" && clusterRoles[b.RoleRef.Name] != nil:
		default:
			t.Errorf("%s: roleRef %+v is not defined here", where, b.RoleRef)
		}
		checkSubjects(where, b.Subjects)
	}
	checkRules := func(where string, rules []rbacv1.PolicyRule) {
		for _, r := range rules {
			for _, list := range [][]string{r.APIGroups, r.Resources, r.Verbs} {
				if slices.Contains(list, "*") {
					t.Errorf("%s: wildcard in rule %+v", where, r)
				}
			}
			for _, v := range r.Verbs {
				if !slices.Contains([]string{"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}, v) {
					t.Errorf("%s: verb %q", where, v)
				}
			}
		}
	}
	for _, r := range clusterRoles {
		checkRules("ClusterRole "+r.Name, r.Rules)
	}
	for _, r := range roles {
		checkRules("Role "+r.Name, r.Rules)
	}

	for _, p := range s.pods() {
		sa := p.spec.ServiceAccountName
		if sa == "" || sa == "default" {
			t.Errorf("%s: runs as the default ServiceAccount; give it its own", p.where)
			continue
		}
		id := p.ns + "/" + sa
		if !sas[id] {
			t.Errorf("%s: ServiceAccount %s is not defined", p.where, id)
		}
		if !bound[id] {
			t.Errorf("%s: ServiceAccount %s has no binding", p.where, id)
		}
		for _, c := range allContainers(p.spec) {
			for _, need := range needs[role(c)] {
				if !allows(s, p.ns, sa, need) {
					t.Errorf("%s: %s runs as %s, which may not %s", p.where, c.Name, id, need)
				}
			}
		}
	}
	// The node agent may read its Node (for its topology labels).
	if !allows(s, namespace, "cairn-node", perm{"", "nodes", "get", ""}) {
		t.Errorf("ServiceAccount cairn-node may not get nodes")
	}
}

// perm is one API permission; ns "" means it must hold in every namespace
// (a ClusterRoleBinding), otherwise in that namespace.
type perm struct {
	group, resource, verb, ns string
}

func (p perm) String() string {
	where := "in every namespace"
	if p.ns != "" {
		where = "in " + p.ns
	}
	g := p.group
	if g == "" {
		g = "core"
	}
	return fmt.Sprintf("%s %s (%s) %s", p.verb, p.resource, g, where)
}

// needs lists, per sidecar, what its controllers do with the API.
var needs = func() map[string][]perm {
	all := func(group, resource string, verbs ...string) []perm {
		var out []perm
		for _, v := range verbs {
			out = append(out, perm{group, resource, v, ""})
		}
		return out
	}
	local := func(group, resource string, verbs ...string) []perm {
		var out []perm
		for _, v := range verbs {
			out = append(out, perm{group, resource, v, namespace})
		}
		return out
	}
	leases := local("coordination.k8s.io", "leases", "get", "watch", "create", "update")
	join := func(lists ...[]perm) []perm { return slices.Concat(lists...) }
	return map[string][]perm{
		"csi-provisioner": join(
			all("", "persistentvolumes", "get", "list", "watch", "create", "delete"),
			all("", "persistentvolumeclaims", "get", "list", "watch", "update"),
			all("storage.k8s.io", "storageclasses", "get", "list", "watch"),
			all("storage.k8s.io", "csinodes", "get", "list", "watch"),
			all("", "nodes", "get", "list", "watch"),
			all("storage.k8s.io", "volumeattachments", "get", "list", "watch"),
			all("storage.k8s.io", "volumeattributesclasses", "get", "list", "watch"),
			all("snapshot.storage.k8s.io", "volumesnapshots", "get", "list", "watch", "update"),
			all("snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list"),
			all("", "events", "create", "patch"),
			leases,
			local("storage.k8s.io", "csistoragecapacities", "get", "list", "watch", "create", "update", "delete"),
			local("", "pods", "get"),
			local("apps", "replicasets", "get"),
		),
		"csi-attacher": join(
			all("", "persistentvolumes", "get", "list", "watch", "patch"),
			all("storage.k8s.io", "csinodes", "get", "list", "watch"),
			all("storage.k8s.io", "volumeattachments", "get", "list", "watch", "patch"),
			all("storage.k8s.io", "volumeattachments/status", "patch"),
			leases,
		),
		"csi-resizer": join(
			all("", "persistentvolumes", "get", "list", "watch", "patch"),
			all("", "persistentvolumeclaims", "get", "list", "watch"),
			all("", "persistentvolumeclaims/status", "patch"),
			all("", "pods", "list", "watch"),
			all("storage.k8s.io", "volumeattributesclasses", "get", "list", "watch"),
			all("", "events", "create", "patch"),
			leases,
		),
		"csi-snapshotter": join(
			all("snapshot.storage.k8s.io", "volumesnapshotclasses", "get", "list", "watch"),
			all("snapshot.storage.k8s.io", "volumesnapshotcontents", "get", "list", "watch", "update", "patch"),
			all("snapshot.storage.k8s.io", "volumesnapshotcontents/status", "update", "patch"),
			all("", "events", "create", "patch"),
			leases,
		),
	}
}()

// allows evaluates the RBAC objects of s for ServiceAccount ns/name.
func allows(s *set, ns, name string, p perm) bool {
	subject := func(subs []rbacv1.Subject) bool {
		for _, sub := range subs {
			if sub.Kind == rbacv1.ServiceAccountKind && sub.Namespace == ns && sub.Name == name {
				return true
			}
		}
		return false
	}
	match := func(rules []rbacv1.PolicyRule) bool {
		for _, r := range rules {
			if slices.Contains(r.APIGroups, p.group) && slices.Contains(r.Resources, p.resource) && slices.Contains(r.Verbs, p.verb) {
				return true
			}
		}
		return false
	}
	clusterRole := func(n string) []rbacv1.PolicyRule {
		for _, r := range ofType[rbacv1.ClusterRole](s) {
			if r.Name == n {
				return r.Rules
			}
		}
		return nil
	}
	for _, b := range ofType[rbacv1.ClusterRoleBinding](s) {
		if subject(b.Subjects) && match(clusterRole(b.RoleRef.Name)) {
			return true
		}
	}
	if p.ns == "" {
		return false
	}
	for _, b := range ofType[rbacv1.RoleBinding](s) {
		if b.Namespace != p.ns || !subject(b.Subjects) {
			continue
		}
		var rules []rbacv1.PolicyRule
		if b.RoleRef.Kind == "ClusterRole" {
			rules = clusterRole(b.RoleRef.Name)
		} else {
			for _, r := range ofType[rbacv1.Role](s) {
				if r.Namespace == b.Namespace && r.Name == b.RoleRef.Name {
					rules = r.Rules
				}
			}
		}
		if match(rules) {
			return true
		}
	}
	return false
}

// ---------------------------------------------------------------------------
// csi-sanity: deploy/csi-sanity

const sanityDir = "deploy/csi-sanity"

// TestSanityPodWiring checks the csi-sanity pod against the install: it must
// reach the node's socket where the DaemonSet puts it, its private controller
// on a socket they share, the store through the same address as the
// controller Deployment, and staging and target folders the node agent sees
// at the same paths.
func TestSanityPodWiring(t *testing.T) {
	s := load(t, sanityDir)
	inst := load(t, installDir)
	pod := one[corev1.Pod](t, s, "cairn-sanity")
	p := podTemplate{"Pod cairn-sanity", pod.Namespace, pod.Labels, &pod.Spec}
	if pod.Namespace != namespace {
		t.Errorf("%s: namespace %q, want %q", p.where, pod.Namespace, namespace)
	}
	if pod.Spec.NodeName == "" {
		t.Errorf("%s: set nodeName: it tests one node's socket", p.where)
	}
	ctrl := oneContainer(t, p, "cairn")
	sanity := oneContainer(t, p, "cairn-sanity")
	if len(ctrl.Args) == 0 || ctrl.Args[0] != "controller" {
		t.Errorf("%s: %s args %q, want the controller subcommand", p.where, ctrl.Name, ctrl.Args)
	}
	if ctrl.RestartPolicy == nil || *ctrl.RestartPolicy != corev1.ContainerRestartPolicyAlways || !slices.ContainsFunc(pod.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == ctrl.Name }) {
		t.Errorf("%s: the controller must be a native sidecar (an init container with restartPolicy Always) so the pod completes", p.where)
	}

	ctrlSock, err := socketPath(mustFlag(t, p.where, ctrl, "endpoint"))
	if err != nil {
		t.Fatal(err)
	}
	ctrlLoc, err := location(p.spec, ctrl, ctrlSock)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := sanityLocation(p, sanity, "csi.controllerendpoint"); err != nil || got != ctrlLoc {
		t.Errorf("%s: csi-sanity --csi.controllerendpoint is %s (%v), the controller serves %s", p.where, got, err, ctrlLoc)
	}
	nodeSock := "host:" + path.Join(kubeletPlugins, driverName, "csi.sock")
	if got, err := sanityLocation(p, sanity, "csi.endpoint"); err != nil || got != nodeSock {
		t.Errorf("%s: csi-sanity --csi.endpoint is %s (%v), the node agent serves %s", p.where, got, err, nodeSock)
	}
	for _, f := range []string{"csi.stagingdir", "csi.mountdir"} {
		dir := mustFlag(t, p.where, sanity, f)
		if got, err := location(p.spec, sanity, dir); err != nil || got != "host:"+dir {
			t.Errorf("%s: --%s %s is %s (%v): it must be the host's %s, which the node agent sees", p.where, f, dir, got, err, dir)
		}
		if !strings.HasPrefix(dir, kubeletPlugins+"/") {
			t.Errorf("%s: --%s %s is not under %s, which the node agent mounts", p.where, f, dir, kubeletPlugins)
		}
	}
	paramsFile := mustFlag(t, p.where, sanity, "csi.testvolumeparameters")
	m, rel := mountFor(sanity, paramsFile)
	if m == nil {
		t.Fatalf("%s: nothing mounted at %s", p.where, paramsFile)
	}
	v := volume(p.spec, m.Name)
	if v == nil || v.ConfigMap == nil {
		t.Fatalf("%s: %s is not from a ConfigMap", p.where, paramsFile)
	}
	cm := one[corev1.ConfigMap](t, s, v.ConfigMap.Name)
	data, ok := cm.Data[rel]
	if !ok {
		t.Fatalf("ConfigMap %s has no key %s", cm.Name, rel)
	}
	var params map[string]string
	if err := yaml.UnmarshalStrict([]byte(data), &params); err != nil {
		t.Fatalf("ConfigMap %s key %s: %v", cm.Name, rel, err)
	}
	for _, err := range checkParameters(params) {
		t.Errorf("csi-sanity volume parameters: %v", err)
	}
	for _, f := range []string{"csi.testvolumesize", "csi.testvolumeexpandsize"} {
		if v, ok := flag(sanity.Args, f); ok {
			if n, err := strconv.ParseInt(v, 10, 64); err != nil || n <= 0 {
				t.Errorf("%s: --%s=%q: want a positive number of bytes", p.where, f, v)
			}
		}
	}
	if v, ok := flag(sanity.Args, "csi.testvolumeaccesstype"); ok && v != "mount" && v != "block" {
		t.Errorf("%s: --csi.testvolumeaccesstype=%q, want mount or block", p.where, v)
	}

	dep := one[appsv1.Deployment](t, inst, "cairn-controller")
	var instCairn *corev1.Container
	for _, c := range allContainers(&dep.Spec.Template.Spec) {
		if role(c) == "cairn" {
			instCairn = c
		}
	}
	if instCairn == nil {
		t.Fatal("controller Deployment has no cairn container")
	}
	if got, want := mustFlag(t, p.where, ctrl, "meta"), mustFlag(t, "controller", instCairn, "meta"); got != want {
		t.Errorf("%s: --meta=%s, the controller Deployment uses %s", p.where, got, want)
	}
}

func sanityLocation(p podTemplate, c *corev1.Container, f string) (string, error) {
	v, ok := flag(c.Args, f)
	if !ok {
		return "", fmt.Errorf("no --%s", f)
	}
	sock, err := socketPath(v)
	if err != nil {
		return "", err
	}
	return location(p.spec, c, sock)
}

// TestDesignStorageClass: the StorageClass of the design
// (deploy/examples/design-storageclass.yaml) uses only keys the driver
// knows, and each of its values takes effect on its own. The class as a
// whole is refused, naming compression and encryption, which cannot go
// together. None is unknown or ignored.
func TestDesignStorageClass(t *testing.T) {
	s := load(t, "deploy/examples")
	sc := one[storagev1.StorageClass](t, s, "high-performance-replicated")
	if sc.Provisioner != driverName {
		t.Errorf("provisioner %q, want %q", sc.Provisioner, driverName)
	}
	design := 0
	for k, v := range sc.Parameters {
		if !strings.HasPrefix(k, "csi.storage.k8s.io/") {
			design++
		} else if !strings.HasSuffix(k, "-secret-name") && !strings.HasSuffix(k, "-secret-namespace") || v == "" {
			t.Errorf("%s: %q: the class adds only the references of its encryption Secret", k, v)
		}
	}
	if design != 15 {
		t.Errorf("%d parameters of the design, want its 15", design)
	}
	for _, k := range []string{"provisioner-secret-name", "node-stage-secret-name"} {
		if sc.Parameters["csi.storage.k8s.io/"+k] == "" {
			t.Errorf("no csi.storage.k8s.io/%s: encryption needs its passphrase at CreateVolume and NodeStage", k)
		}
	}
	for k, v := range sc.Parameters {
		// With the class's minIOPS: qosClass guaranteed needs it.
		if _, err := volspec.Parse(map[string]string{k: v, volspec.KeyMinIOPS: sc.Parameters[volspec.KeyMinIOPS]}); err != nil {
			t.Errorf("%s: %q: %v, want it accepted", k, v, err)
		}
	}
	if _, err := volspec.Parse(sc.Parameters); err == nil || !strings.Contains(err.Error(), `"compression"`) ||
		!strings.Contains(err.Error(), "encryption") {
		t.Errorf("the whole class: %v, want compression refused with encryption", err)
	}
}
