package deploy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Loading and decoding the manifests, and small helpers to read pod specs.

// manifest is one decoded YAML document.
type manifest struct {
	file  string // relative to the repository root, with slashes
	index int    // document number in the file, from 0
	key   string // apiVersion + "/" + kind
	obj   any    // pointer to the decoded object
}

func (m manifest) String() string {
	return fmt.Sprintf("%s#%d (%s %s)", m.file, m.index, m.key, m.meta().Name)
}

func (m manifest) meta() *metav1.ObjectMeta {
	if o, ok := m.obj.(interface{ GetObjectMeta() metav1.Object }); ok {
		if om, ok := o.GetObjectMeta().(*metav1.ObjectMeta); ok {
			return om
		}
	}
	return &metav1.ObjectMeta{} // a Kustomization has no metadata
}

// volumeSnapshotClass mirrors snapshot.storage.k8s.io/v1 VolumeSnapshotClass
// (external-snapshotter client/v8), whose Go module this test does not pull in.
type volumeSnapshotClass struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Driver            string            `json:"driver"`
	Parameters        map[string]string `json:"parameters,omitempty"`
	DeletionPolicy    string            `json:"deletionPolicy"`
}

// serviceMonitor mirrors the part of monitoring.coreos.com/v1 ServiceMonitor
// (the Prometheus Operator) the chart renders; its Go module is not pulled in.
type serviceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              struct {
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path,omitempty"`
			Interval string `json:"interval,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// kustomization is the part of kustomize.config.k8s.io/v1beta1 Kustomization
// this repository uses; add a field here when the file grows one.
type kustomization struct {
	metav1.TypeMeta `json:",inline"`
	Resources       []string `json:"resources"`
}

// kindInfo says how to decode a kind and whether its objects are namespaced.
type kindInfo struct {
	new        func() any
	namespaced bool
}

var kinds = map[string]kindInfo{
	"v1/Namespace":       {func() any { return new(corev1.Namespace) }, false},
	"v1/ServiceAccount":  {func() any { return new(corev1.ServiceAccount) }, true},
	"v1/ConfigMap":       {func() any { return new(corev1.ConfigMap) }, true},
	"v1/Service":         {func() any { return new(corev1.Service) }, true},
	"v1/Pod":             {func() any { return new(corev1.Pod) }, true},
	"apps/v1/Deployment": {func() any { return new(appsv1.Deployment) }, true},
	"apps/v1/DaemonSet":  {func() any { return new(appsv1.DaemonSet) }, true},
	"rbac.authorization.k8s.io/v1/ClusterRole":        {func() any { return new(rbacv1.ClusterRole) }, false},
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": {func() any { return new(rbacv1.ClusterRoleBinding) }, false},
	"rbac.authorization.k8s.io/v1/Role":               {func() any { return new(rbacv1.Role) }, true},
	"rbac.authorization.k8s.io/v1/RoleBinding":        {func() any { return new(rbacv1.RoleBinding) }, true},
	"storage.k8s.io/v1/CSIDriver":                     {func() any { return new(storagev1.CSIDriver) }, false},
	"storage.k8s.io/v1/StorageClass":                  {func() any { return new(storagev1.StorageClass) }, false},
	"snapshot.storage.k8s.io/v1/VolumeSnapshotClass":  {func() any { return new(volumeSnapshotClass) }, false},
	"monitoring.coreos.com/v1/ServiceMonitor":         {func() any { return new(serviceMonitor) }, true},
	"kustomize.config.k8s.io/v1beta1/Kustomization":   {func() any { return new(kustomization) }, false},
}

// decode decodes one YAML document strictly into the type its apiVersion and
// kind name. A document with nothing but comments gives (nil, nil).
func decode(doc []byte) (key string, obj any, err error) {
	var probe map[string]any
	if err := yaml.Unmarshal(doc, &probe); err != nil {
		return "", nil, err
	}
	if probe == nil {
		return "", nil, nil
	}
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return "", nil, err
	}
	if tm.APIVersion == "" || tm.Kind == "" {
		return "", nil, errors.New("document has no apiVersion or kind")
	}
	key = tm.APIVersion + "/" + tm.Kind
	info, ok := kinds[key]
	if !ok {
		return key, nil, fmt.Errorf("unknown kind %s (add it to the test's kinds table with its Go type)", key)
	}
	obj = info.new()
	if err := yaml.UnmarshalStrict(doc, obj); err != nil {
		return key, nil, fmt.Errorf("strict decoding as %s: %w", key, err)
	}
	return key, obj, nil
}

// splitDocuments splits a YAML stream at its "---" lines.
func splitDocuments(data []byte) ([][]byte, error) {
	r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var docs [][]byte
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		docs = append(docs, doc)
	}
}

// repoRoot finds the module root above the test's folder.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's folder")
		}
		dir = parent
	}
}

// set is the decoded documents of one folder tree.
type set struct {
	root  string // repository root
	dir   string // the folder, relative to root, with slashes
	files []string
	all   []manifest
}

// load reads every .yaml / .yml file under dir (relative to the repository
// root) and decodes each document; a document that does not decode fails t.
func load(t *testing.T, dir string) *set {
	t.Helper()
	return loadUnder(t, repoRoot(t), dir)
}

// loadUnder is load with dir relative to root, which need not be the
// repository (a rendered chart in a temporary folder).
func loadUnder(t *testing.T, root, dir string) *set {
	t.Helper()
	s := &set{root: root, dir: dir}
	err := filepath.WalkDir(filepath.Join(root, filepath.FromSlash(dir)), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !(strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		s.files = append(s.files, rel)
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		docs, err := splitDocuments(data)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			return nil
		}
		for i, doc := range docs {
			key, obj, err := decode(doc)
			if err != nil {
				t.Errorf("%s#%d: %v", rel, i, err)
				continue
			}
			if obj == nil {
				continue
			}
			s.all = append(s.all, manifest{file: rel, index: i, key: key, obj: obj})
		}
		return nil
	})
	if err != nil {
		t.Fatalf("reading %s: %v", dir, err)
	}
	if len(s.all) == 0 {
		t.Fatalf("no manifests under %s", dir)
	}
	return s
}

// ofType returns the decoded objects of type T.
func ofType[T any](s *set) []*T {
	var out []*T
	for _, m := range s.all {
		if o, ok := m.obj.(*T); ok {
			out = append(out, o)
		}
	}
	return out
}

// one returns the only object of type T named name, failing t otherwise.
func one[T any](t *testing.T, s *set, name string) *T {
	t.Helper()
	var found []*T
	for _, m := range s.all {
		if o, ok := m.obj.(*T); ok && m.meta().Name == name {
			found = append(found, o)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("want exactly one %T named %q under %s, found %d", zero, name, s.dir, len(found))
	}
	return found[0]
}

// podTemplate is a pod spec wherever it appears.
type podTemplate struct {
	where  string
	ns     string
	labels map[string]string
	spec   *corev1.PodSpec
}

func (s *set) pods() []podTemplate {
	var out []podTemplate
	for _, m := range s.all {
		switch o := m.obj.(type) {
		case *appsv1.Deployment:
			out = append(out, podTemplate{m.String(), o.Namespace, o.Spec.Template.Labels, &o.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			out = append(out, podTemplate{m.String(), o.Namespace, o.Spec.Template.Labels, &o.Spec.Template.Spec})
		case *corev1.Pod:
			out = append(out, podTemplate{m.String(), o.Namespace, o.Labels, &o.Spec})
		}
	}
	return out
}

func allContainers(spec *corev1.PodSpec) []*corev1.Container {
	var out []*corev1.Container
	for i := range spec.InitContainers {
		out = append(out, &spec.InitContainers[i])
	}
	for i := range spec.Containers {
		out = append(out, &spec.Containers[i])
	}
	return out
}

// ---------------------------------------------------------------------------
// Small parsers

// splitImage splits "repo[:tag][@digest]".
func splitImage(image string) (repo, tag, digest string) {
	repo = image
	if i := strings.Index(repo, "@"); i >= 0 {
		repo, digest = repo[:i], repo[i+1:]
	}
	if i := strings.LastIndex(repo, ":"); i > strings.LastIndex(repo, "/") {
		repo, tag = repo[:i], repo[i+1:]
	}
	return repo, tag, digest
}

// role names what a container is by its image.
func role(c *corev1.Container) string {
	repo, _, _ := splitImage(c.Image)
	switch base := path.Base(repo); base {
	case "cairn", "cairn-sanity":
		return base
	default:
		if strings.HasPrefix(repo, "registry.k8s.io/sig-storage/") {
			return base
		}
		return "unknown(" + c.Image + ")"
	}
}

// flag returns the value of --name in args ("--name=v" or "--name v"), and
// whether the flag is there at all. A bare boolean flag gives "true".
func flag(args []string, name string) (string, bool) {
	for i, a := range args {
		trimmed := strings.TrimLeft(a, "-")
		if trimmed == a {
			continue
		}
		if k, v, ok := strings.Cut(trimmed, "="); ok && k == name {
			return v, true
		}
		if trimmed == name {
			if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				return args[i+1], true
			}
			return "true", true
		}
	}
	return "", false
}

func mustFlag(t *testing.T, where string, c *corev1.Container, name string) string {
	t.Helper()
	v, ok := flag(c.Args, name)
	if !ok {
		t.Fatalf("%s: container %s has no --%s (args %q)", where, c.Name, name, c.Args)
	}
	return v
}

// socketPath turns a CSI endpoint ("unix:///csi/csi.sock" or "/csi/csi.sock")
// into the socket's path.
func socketPath(endpoint string) (string, error) {
	p := strings.TrimPrefix(endpoint, "unix://")
	if !path.IsAbs(p) || path.Clean(p) != p {
		return "", fmt.Errorf("endpoint %q is not unix://<absolute clean path>", endpoint)
	}
	return p, nil
}

// mountFor returns the mount of c that holds p (the longest mountPath that
// is p or a folder above it) and p relative to it.
func mountFor(c *corev1.Container, p string) (*corev1.VolumeMount, string) {
	var best *corev1.VolumeMount
	var rel string
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		r, err := filepath.Rel(m.MountPath, p)
		if err != nil || r == ".." || strings.HasPrefix(r, "../") {
			continue
		}
		if best == nil || len(m.MountPath) > len(best.MountPath) {
			best, rel = m, r
		}
	}
	return best, rel
}

func volume(spec *corev1.PodSpec, name string) *corev1.Volume {
	for i := range spec.Volumes {
		if spec.Volumes[i].Name == name {
			return &spec.Volumes[i]
		}
	}
	return nil
}

// location names where a path inside a container really is: on the host
// ("host:/var/lib/…"), or in one of the pod's emptyDirs ("emptyDir:name/rel").
func location(spec *corev1.PodSpec, c *corev1.Container, p string) (string, error) {
	m, rel := mountFor(c, p)
	if m == nil {
		return "", fmt.Errorf("container %s mounts nothing that holds %s", c.Name, p)
	}
	if m.SubPath != "" || m.SubPathExpr != "" {
		return "", fmt.Errorf("container %s: mount %s uses a subPath", c.Name, m.MountPath)
	}
	v := volume(spec, m.Name)
	if v == nil {
		return "", fmt.Errorf("container %s mounts volume %q, which the pod does not define", c.Name, m.Name)
	}
	switch {
	case v.HostPath != nil:
		return "host:" + path.Join(v.HostPath.Path, rel), nil
	case v.EmptyDir != nil:
		return "emptyDir:" + path.Join(v.Name, rel), nil
	default:
		return "", fmt.Errorf("container %s: %s is on volume %q, neither a hostPath nor an emptyDir", c.Name, p, v.Name)
	}
}

// hostPort splits "host:port" and parses the port.
func hostPort(addr string) (string, int, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.Atoi(p)
	if err != nil || n < 1 || n > 65535 {
		return "", 0, fmt.Errorf("%q: bad port", addr)
	}
	return h, n, nil
}

// containerPort resolves a probe's or Service's port (number or name) in c.
func containerPort(c *corev1.Container, p intstr.IntOrString) (int, bool) {
	if p.Type == intstr.Int {
		return p.IntValue(), true
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), true
		}
	}
	return 0, false
}

// longRunning returns the pod's containers that run as long as it does:
// its containers and its native sidecars (init containers with
// restartPolicy Always), not the init containers that run to completion
// first (the certificate's issue-certificate runs the cairn image too).
func longRunning(spec *corev1.PodSpec) []*corev1.Container {
	var out []*corev1.Container
	for _, c := range allContainers(spec) {
		if !isInit(spec, c) || (c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways) {
			out = append(out, c)
		}
	}
	return out
}

// isInit says whether c is one of spec's init containers.
func isInit(spec *corev1.PodSpec, c *corev1.Container) bool {
	for i := range spec.InitContainers {
		if &spec.InitContainers[i] == c {
			return true
		}
	}
	return false
}

// container returns the pod's long-running containers of role r.
func container(spec *corev1.PodSpec, r string) []*corev1.Container {
	var out []*corev1.Container
	for _, c := range longRunning(spec) {
		if role(c) == r {
			out = append(out, c)
		}
	}
	return out
}

func oneContainer(t *testing.T, p podTemplate, r string) *corev1.Container {
	t.Helper()
	cs := container(p.spec, r)
	if len(cs) != 1 {
		t.Fatalf("%s: want one %s container, found %d", p.where, r, len(cs))
	}
	return cs[0]
}

func envVar(c *corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}
