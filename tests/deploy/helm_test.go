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

// manifestsHeader is the first line make manifests writes into each file.
const manifestsHeader = "# Generated from deploy/helm/cairn by `make manifests`: edit the chart, not this file."

// manifestsSets are the values make manifests renders deploy/kubernetes with.
var manifestsSets = []string{"createNamespace=true"}

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
	out := t.TempDir()
	args := []string{"-chart", filepath.Join(repoRoot(t), filepath.FromSlash(chartDir)), "-namespace", namespace, "-out", out}
	for _, s := range sets {
		args = append(args, "-set", s)
	}
	cmd := exec.Command(helmrender(t), args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", &buildError{err: err, out: stderr.String()}
	}
	return out, nil
}

func TestHelmChartRendersTheManifests(t *testing.T) {
	out, err := renderChart(t, "cairn-system", manifestsSets...)
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
		if !bytes.Equal(append([]byte(manifestsHeader+"\n"), got...), want) {
			t.Errorf("%s/%s differs from the chart's rendering: run make manifests (and edit %s/templates/%s, not the file)\n%s",
				installDir, name, chartDir, name, firstDifference(string(want), manifestsHeader+"\n"+string(got)))
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
		"storageClasses.create=false", "snapshotClass.create=false")
	if err != nil {
		t.Fatal(err)
	}
	s := loadUnder(t, out, ".")
	if len(ofType[corev1.Namespace](s)) != 0 {
		t.Error("createNamespace is false by default, but the chart makes a Namespace")
	}
	if n := len(ofType[storagev1.StorageClass](s)); n != 0 {
		t.Errorf("storageClasses.create=false, but %d StorageClasses rendered", n)
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
