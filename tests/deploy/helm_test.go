package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
)

// The Helm chart (deploy/helm/cairn) is the source of deploy/kubernetes:
// rendered with its defaults it must give those files byte for byte, so
// that everything this package checks of deploy/kubernetes holds for the
// chart too. Its values must take effect, and bad ones be refused.

const chartDir = "deploy/helm/cairn"

var (
	helmrenderOnce sync.Once
	helmrenderBin  string
	helmrenderErr  error
)

// helmrender builds tests/deploy/helmrender (its own module: Helm's
// template engine) once per test binary.
func helmrender(t *testing.T) string {
	t.Helper()
	helmrenderOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cairn-helmrender-")
		if err != nil {
			helmrenderErr = err
			return
		}
		helmrenderBin = filepath.Join(dir, "helmrender")
		cmd := exec.Command("go", "build", "-o", helmrenderBin, ".")
		cmd.Dir = filepath.Join(repoRoot(t), "tests", "deploy", "helmrender")
		cmd.Env = append(os.Environ(), "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			helmrenderErr = &buildError{err: err, out: string(out)}
		}
	})
	if helmrenderErr != nil {
		t.Fatalf("build tests/deploy/helmrender: %v", helmrenderErr)
	}
	return helmrenderBin
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + "\n" + e.out }

func TestMain(m *testing.M) {
	code := m.Run()
	if helmrenderBin != "" {
		os.RemoveAll(filepath.Dir(helmrenderBin))
	}
	os.Exit(code)
}

// renderChart renders the chart into a new folder and returns it, or the
// renderer's error output.
func renderChart(t *testing.T, namespace string, sets ...string) (string, error) {
	t.Helper()
	return renderChartWith(t, namespace, nil, sets...)
}

// renderChartWith is renderChart with values files (helm -f) too.
func renderChartWith(t *testing.T, namespace string, valueFiles []string, sets ...string) (string, error) {
	t.Helper()
	return runHelmrender(t, append([]string{"-namespace", namespace}, helmrenderArgs(valueFiles, sets)...)...)
}

// helmrenderArgs turns values files and values into helmrender's flags.
func helmrenderArgs(valueFiles, sets []string) []string {
	var args []string
	for _, f := range valueFiles {
		args = append(args, "-f", f)
	}
	for _, s := range sets {
		args = append(args, "-set", s)
	}
	return args
}

// runHelmrender renders the chart with args into a new folder and returns
// it, or the renderer's error output.
func runHelmrender(t *testing.T, args ...string) (string, error) {
	t.Helper()
	out := t.TempDir()
	args = append([]string{"-chart", filepath.Join(repoRoot(t), filepath.FromSlash(chartDir)), "-out", out}, args...)
	cmd := exec.Command(helmrender(t), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", &buildError{err: err, out: stderr.String()}
	}
	return out, nil
}

func TestHelmChartRendersTheManifests(t *testing.T) {
	// As make manifests renders it.
	out, err := runHelmrender(t, "-manifests")
	if err != nil {
		t.Fatal(err)
	}
	rendered, err := filepath.Glob(filepath.Join(out, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	install := filepath.Join(repoRoot(t), filepath.FromSlash(installDir))
	checked, err := filepath.Glob(filepath.Join(install, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range rendered {
		name := filepath.Base(r)
		names = append(names, name)
		got, err := os.ReadFile(r)
		if err != nil {
			t.Fatal(err)
		}
		want, err := os.ReadFile(filepath.Join(install, name))
		if err != nil {
			t.Errorf("the chart renders %s, which %s lacks: run make manifests", name, installDir)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s/%s differs from the chart's rendering: run make manifests (and edit %s/templates/%s, not the file)\n%s",
				installDir, name, chartDir, name, firstDifference(string(want), string(got)))
		}
	}
	for _, c := range checked {
		if name := filepath.Base(c); name != "kustomization.yaml" && !slices.Contains(names, name) {
			t.Errorf("%s/%s is not rendered from the chart: add deploy/helm/cairn/templates/%s", installDir, name, name)
		}
	}
}

// firstDifference shows the first line where two texts differ.
func firstDifference(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(w), len(g)); i++ {
		var wl, gl string
		if i < len(w) {
			wl = w[i]
		}
		if i < len(g) {
			gl = g[i]
		}
		if wl != gl {
			return "line " + strconv.Itoa(i+1) + ":\n  file:  " + wl + "\n  chart: " + gl
		}
	}
	return "(no line differs)"
}

func TestHelmChartValues(t *testing.T) {
	const ns = "storage"
	out, err := renderChart(t, ns,
		"image.repository=registry.example/cairn", "image.tag=v0.1.0", "image.pullPolicy=Always",
		"sidecars.provisioner.image=mirror.example/csi-provisioner:v6.4.0",
		"controller.replicas=1",
		"node.kubeletDir=/var/lib/k0s/kubelet", "node.dataDir=/mnt/cairn",
		"node.bootstrapExpect=1", "node.peers=worker-a:7002",
		"node.extraArgs={--reservable-iops=20000,--zone=eu-1a}",
		"node.disks[0].type=nvme-ssd", "node.disks[0].path=/mnt/nvme",
		"node.nodeSelector.storage-node=yes",
		"node.tolerations[0].key=storage", "node.tolerations[0].operator=Exists", "node.tolerations[0].effect=NoSchedule",
		"node.resources.cairn.limits.memory=1Gi",
		"controller.nodeSelector.role=infra",
		"metrics.serviceMonitor.create=true", "metrics.serviceMonitor.labels.release=prom",
		"storageClasses.create=false", "snapshotClass.create=false",
		"storageClasses.extra[0].name=fast-2r", "storageClasses.extra[0].parameters.type=nvme-ssd",
		"storageClasses.extra[0].parameters.replicas=2", "storageClasses.extra[0].reclaimPolicy=Retain")
	if err != nil {
		t.Fatal(err)
	}
	s := loadUnder(t, out, ".")
	if len(ofType[corev1.Namespace](s)) != 0 {
		t.Error("createNamespace is false by default, but the chart makes a Namespace")
	}
	// storageClasses.create=false: only the one of storageClasses.extra.
	if scs := ofType[storagev1.StorageClass](s); len(scs) != 1 || scs[0].Name != "fast-2r" {
		t.Errorf("StorageClasses %v, want only storageClasses.extra's fast-2r", scs)
	} else {
		sc := scs[0]
		if sc.Provisioner != "csi.cairn.io" || sc.Parameters["replicas"] != "2" || sc.Parameters["type"] != "nvme-ssd" ||
			sc.ReclaimPolicy == nil || *sc.ReclaimPolicy != corev1.PersistentVolumeReclaimRetain ||
			sc.VolumeBindingMode == nil || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer ||
			sc.AllowVolumeExpansion == nil || !*sc.AllowVolumeExpansion {
			t.Errorf("StorageClass fast-2r: %+v", sc)
		}
		for _, err := range checkParameters(sc.Parameters) {
			t.Errorf("StorageClass fast-2r: %v", err)
		}
	}
	for _, m := range s.all {
		if m.key == "snapshot.storage.k8s.io/v1/VolumeSnapshotClass" {
			t.Error("snapshotClass.create=false, but a VolumeSnapshotClass rendered")
		}
		if md := m.meta(); md.Namespace != "" && md.Namespace != ns {
			t.Errorf("%s: namespace %q, want the release's %q", m, md.Namespace, ns)
		}
	}
	for _, b := range ofType[rbacv1.ClusterRoleBinding](s) {
		for _, sub := range b.Subjects {
			if sub.Kind == "ServiceAccount" && sub.Namespace != ns {
				t.Errorf("ClusterRoleBinding %s binds %s/%s, want namespace %s", b.Name, sub.Namespace, sub.Name, ns)
			}
		}
	}

	ctrl := one[appsv1.Deployment](t, s, "cairn-controller")
	if ctrl.Spec.Replicas == nil || *ctrl.Spec.Replicas != 1 {
		t.Errorf("controller replicas %v, want 1", ctrl.Spec.Replicas)
	}
	if ctrl.Spec.Template.Spec.NodeSelector["role"] != "infra" {
		t.Errorf("controller nodeSelector %v, want controller.nodeSelector's", ctrl.Spec.Template.Spec.NodeSelector)
	}
	for _, c := range ctrl.Spec.Template.Spec.Containers {
		switch c.Name {
		case "cairn":
			if c.Image != "registry.example/cairn:v0.1.0" || c.ImagePullPolicy != corev1.PullAlways {
				t.Errorf("controller cairn image %s (%s), want registry.example/cairn:v0.1.0 (Always)", c.Image, c.ImagePullPolicy)
			}
			if m, _ := flag(c.Args, "meta"); m != "cairn-meta."+ns+".svc:7002" {
				t.Errorf("controller --meta %q, want the release namespace's service", m)
			}
		case "csi-provisioner":
			if c.Image != "mirror.example/csi-provisioner:v6.4.0" {
				t.Errorf("csi-provisioner image %s, want the value's", c.Image)
			}
		}
	}

	node := one[appsv1.DaemonSet](t, s, "cairn-node")
	spec := &node.Spec.Template.Spec
	if spec.NodeSelector["storage-node"] != "yes" {
		t.Errorf("node nodeSelector %v, want node.nodeSelector's", spec.NodeSelector)
	}
	if len(spec.Tolerations) != 1 || spec.Tolerations[0].Key != "storage" || spec.Tolerations[0].Effect != corev1.TaintEffectNoSchedule {
		t.Errorf("node tolerations %+v, want node.tolerations'", spec.Tolerations)
	}
	if v := volume(spec, "disk-nvme-ssd"); v == nil || v.HostPath == nil || v.HostPath.Path != "/mnt/nvme" {
		t.Errorf("node.disks: volume disk-nvme-ssd %+v, want host path /mnt/nvme", v)
	}
	for _, v := range spec.Volumes {
		if v.HostPath == nil {
			continue
		}
		p := v.HostPath.Path
		if strings.HasPrefix(p, "/var/lib/kubelet") {
			t.Errorf("volume %s: host path %s ignores node.kubeletDir", v.Name, p)
		}
		if v.Name == "data" && p != "/mnt/cairn" {
			t.Errorf("data volume at %s, want node.dataDir /mnt/cairn", p)
		}
	}
	for _, c := range spec.Containers {
		for _, m := range c.VolumeMounts {
			// Staging and publish paths are the host's: the container must
			// see them where kubelet does.
			if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional && !strings.HasPrefix(m.MountPath, "/var/lib/k0s/kubelet/") {
				t.Errorf("%s mounts %s at %s, want it under node.kubeletDir", c.Name, m.Name, m.MountPath)
			}
		}
		switch c.Name {
		case "cairn":
			if d, _ := flag(c.Args, "data-dir"); d != "/var/lib/cairn,nvme-ssd=/var/lib/cairn-disks/nvme-ssd" {
				t.Errorf("node agent --data-dir %q, want the default dir and node.disks' nvme-ssd", d)
			}
			if m, p := mountFor(&c, "/var/lib/cairn-disks/nvme-ssd/x"); m == nil || m.Name != "disk-nvme-ssd" {
				t.Errorf("node agent: /var/lib/cairn-disks/nvme-ssd is not mounted from volume disk-nvme-ssd (%v %s)", m, p)
			}
			lim, req := c.Resources.Limits[corev1.ResourceMemory], c.Resources.Requests[corev1.ResourceCPU]
			if lim.String() != "1Gi" || req.String() != "100m" {
				t.Errorf("node agent resources %+v, want the default requests and node.resources' memory limit 1Gi", c.Resources)
			}
			// NodeStage refuses paths outside the allowed roots: a moved
			// kubelet directory with the default root fails every mount
			// (found by tests/e2e running the chart).
			if r, _ := flag(c.Args, "csi-allowed-roots"); r != "/var/lib/k0s/kubelet" {
				t.Errorf("node agent --csi-allowed-roots %q ignores node.kubeletDir", r)
			}
			for _, a := range c.Args {
				if strings.Contains(a, "/var/lib/kubelet") {
					t.Errorf("node agent arg %q ignores node.kubeletDir", a)
				}
			}
			for _, a := range []string{"--reservable-iops=20000", "--zone=eu-1a"} {
				if !slices.Contains(c.Args, a) {
					t.Errorf("node agent args %v lack node.extraArgs' %s", c.Args, a)
				}
			}
		case "node-driver-registrar":
			if p, _ := flag(c.Args, "kubelet-registration-path"); p != "/var/lib/k0s/kubelet/plugins/csi.cairn.io/csi.sock" {
				t.Errorf("registrar --kubelet-registration-path %q ignores node.kubeletDir", p)
			}
		}
	}
	// metrics.serviceMonitor.create: the Service over the agents' metrics
	// port, and a ServiceMonitor that selects it.
	svc := one[corev1.Service](t, s, "cairn-node-metrics")
	if !selectorMatches(svc.Spec.Selector, node.Spec.Template.Labels) || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 9102 {
		t.Errorf("Service cairn-node-metrics %+v: want port 9102 over the node agents", svc.Spec)
	} else if _, ok := containerPort(oneContainer(t, podTemplate{where: "cairn-node", spec: spec}, "cairn"), svc.Spec.Ports[0].TargetPort); !ok {
		t.Errorf("Service cairn-node-metrics targets %v, which the node agent does not expose", svc.Spec.Ports[0].TargetPort)
	}
	sm := one[serviceMonitor](t, s, "cairn-node")
	if !labelsMatch(&sm.Spec.Selector, svc.Labels) || sm.Labels["release"] != "prom" ||
		len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name {
		t.Errorf("ServiceMonitor cairn-node %+v (labels %v): want it to select cairn-node-metrics' port, labelled release=prom", sm.Spec, sm.Labels)
	}

	cm := one[corev1.ConfigMap](t, s, "cairn-node")
	if cm.Data["BOOTSTRAP_EXPECT"] != "1" || cm.Data["PEERS"] != "worker-a:7002" {
		t.Errorf("ConfigMap cairn-node %v, want node.bootstrapExpect and node.peers", cm.Data)
	}
}

// TestHelmChartRefusesBadValues: values.schema.json turns typos and bad
// values into errors that name them, as helm install would print.
func TestHelmChartRefusesBadValues(t *testing.T) {
	for _, tc := range []struct{ set, want string }{
		{"imag.tag=v1", "imag"},
		{"node.kubeletDir=var/lib/kubelet", "kubeletDir"},
		{"controller.replicas=0", "replicas"},
		{"node.peers=node-a", "peers"},
		{"image.pullPolicy=Sometimes", "pullPolicy"},
		{"node.extraArgs={reservable-iops}", "extraArgs"},
		{"node.disks[0].type=default,node.disks[0].path=/mnt/x", "type"},
		{"node.disks[0].type=" + strings.Repeat("a", 59) + ",node.disks[0].path=/mnt/x", "type"},
		{"node.disks[0].type=hdd,node.disks[0].path=/a,node.disks[1].type=hdd,node.disks[1].path=/b", "given twice"},
		{"node.bootstrapExpect=1", "bootstrapExpect"},
		{"storageClasses.extra[0].reclaimPolicy=Keep", "reclaimPolicy"},
		{"metrics.serviceMonitor.interval=often", "interval"},
	} {
		t.Run(tc.set, func(t *testing.T) {
			_, err := renderChart(t, "cairn-system", tc.set)
			if err == nil {
				t.Fatalf("-set %s rendered; want an error naming %s", tc.set, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("-set %s: error does not name %s:\n%v", tc.set, tc.want, err)
			}
		})
	}
}

// TestHelmChartValuesFile: numbers in a values file reach Helm as floats;
// StorageClass parameters must still print them whole ("1000000", not
// "1e+06", which the driver would refuse).
func TestHelmChartValuesFile(t *testing.T) {
	values := filepath.Join(t.TempDir(), "values.yaml")
	if err := os.WriteFile(values, []byte(`storageClasses:
  create: false
  extra:
    - name: big
      parameters:
        replicas: 3
        maxIOPS: 1000000
        maxBandwidth: 104857600
        dataLocality: disabled
`), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := renderChartWith(t, "cairn-system", []string{values})
	if err != nil {
		t.Fatal(err)
	}
	s := loadUnder(t, out, ".")
	sc := one[storagev1.StorageClass](t, s, "big")
	want := map[string]string{"replicas": "3", "maxIOPS": "1000000", "maxBandwidth": "104857600", "dataLocality": "disabled"}
	for k, v := range want {
		if sc.Parameters[k] != v {
			t.Errorf("parameter %s = %q, want %q", k, sc.Parameters[k], v)
		}
	}
	for _, err := range checkParameters(sc.Parameters) {
		t.Errorf("StorageClass big: %v", err)
	}
}
