//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// Cairn as users run it (-e2e.cairn=pods): the node DaemonSet, the FUSE
// holder DaemonSet and the controller Deployment of the Helm chart
// deploy/helm/cairn (which deploy/kubernetes is rendered from), in
// containerd, from images built here. What this proves that host
// processes cannot: the image has the tools the node plugin runs, the
// Bidirectional mounts of the staging and publish paths reach the host,
// the registration socket, the privileged /dev, the probes, and the RBAC
// of every sidecar in its pod.
//
// Only what one node cannot have differs from a user's install, and the
// overlay says so: one store member (node.bootstrapExpect=1), a class of
// one replica, kubelet's root under the run directory (node.kubeletDir),
// and, as this cluster has no DNS, host aliases for the names cluster DNS
// would answer (the node's name, which the agents advertise, and the
// cairn-meta Service). Mutual TLS is on, as the chart has it by default:
// the harness makes the CA with `cairn ca init` and the overlay puts it
// in the Secret the chart reads.

// onePodClass is the overlay's StorageClass: cairn-replicated-ext4 with one
// replica, as this cluster has one node.
const onePodClass = "cairn-1r-ext4"

// podsValues are the chart values of the one-node install: local images,
// one store member, the harness's kubelet root, and a one-replica class.
func podsValues(kube *localkube.Run, dataDir string) ([]byte, error) {
	local := localkube.LocalImages()
	img := func(upstream string) string {
		if l, ok := local[upstream]; ok {
			return l
		}
		return upstream
	}
	// The chart's defaults name the upstream images; map each one.
	sidecars := map[string]any{}
	for key, upstream := range map[string]string{
		"provisioner":   "registry.k8s.io/sig-storage/csi-provisioner:v6.4.0",
		"attacher":      "registry.k8s.io/sig-storage/csi-attacher:v4.13.0",
		"resizer":       "registry.k8s.io/sig-storage/csi-resizer:v2.3.0",
		"snapshotter":   "registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0",
		"registrar":     "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.18.0",
		"livenessProbe": "registry.k8s.io/sig-storage/livenessprobe:v2.20.0",
	} {
		l := img(upstream)
		if l == upstream {
			return nil, fmt.Errorf("no local image for %s", upstream)
		}
		sidecars[key] = map[string]any{"image": l}
	}
	repo, tag, _ := strings.Cut(localkube.CairnImageRef, ":")
	values := map[string]any{
		"createNamespace": true,
		// Never: an image missing from containerd fails the pod at once
		// with ErrImageNeverPull instead of a pull that cannot succeed.
		"image":    map[string]any{"repository": repo, "tag": tag, "pullPolicy": "Never"},
		"sidecars": sidecars,
		"node": map[string]any{
			"bootstrapExpect": 1,
			"peers":           kube.NodeName + ":7002",
			"kubeletDir":      kube.KubeletRoot,
			"dataDir":         dataDir,
		},
		"storageClasses": map[string]any{"extra": []any{map[string]any{
			"name": onePodClass,
			"parameters": map[string]any{
				"replicas": 1, "dataLocality": "best-effort", "csi.storage.k8s.io/fstype": "ext4",
			},
		}}},
	}
	return yaml.Marshal(values)
}

// deployCairnPods renders the chart with podsValues, makes a cluster CA,
// applies the chart through a kustomize overlay that adds the host aliases
// and the CA's Secret, and waits until kubelet has registered the driver
// and the provisioner publishes capacity.
func deployCairnPods(ctx context.Context, kube *localkube.Run, bins *localkube.Binaries, b *localkube.Builder, cairnBin, repo string) (*cairnDeployment, error) {
	c := &cairnDeployment{dir: filepath.Join(kube.Dir, "cairn-pods"), kube: kube, pods: true,
		ext4Class: onePodClass, replicas: 1}
	c.node = devNode{ID: kube.NodeName}

	start := time.Now()
	cairnImage, err := b.CairnImage(cairnBin)
	if err != nil {
		return c, err
	}
	images := []string{cairnImage}
	for _, tarball := range bins.Images {
		images = append(images, tarball)
	}
	sort.Strings(images)
	for _, img := range images {
		if err := kube.ImportImage(ctx, img); err != nil {
			return c, err
		}
	}
	fmt.Printf("pods: %d images built and imported (%s)\n", len(images), time.Since(start).Round(100*time.Millisecond))

	overlay := filepath.Join(c.dir, "overlay")
	if err := os.MkdirAll(overlay, 0o755); err != nil {
		return c, err
	}
	values, err := podsValues(kube, filepath.Join(c.dir, "data"))
	if err != nil {
		return c, err
	}
	valuesFile := filepath.Join(c.dir, "values.yaml")
	if err := os.WriteFile(valuesFile, values, 0o644); err != nil {
		return c, err
	}
	render, err := buildHelmRender(b.CacheDir, repo)
	if err != nil {
		return c, err
	}
	if out, err := exec.CommandContext(ctx, render, "-chart", filepath.Join(repo, "deploy", "helm", "cairn"),
		"-namespace", namespace, "-f", valuesFile, "-out", overlay).CombinedOutput(); err != nil {
		return c, fmt.Errorf("render the chart: %v: %s", err, out)
	}
	// The cluster CA, which the chart wants in the Secret cairn-ca (the
	// overlay makes it from the files), and a ctl certificate for the
	// tests' own store client.
	caDir, ctlDir := filepath.Join(c.dir, "ca"), filepath.Join(c.dir, "ctl")
	for _, args := range [][]string{
		{"ca", "init", "--dir", caDir},
		{"ca", "issue", "--ca-dir", caDir, "--role", "ctl", "--name", "e2e", "--out", ctlDir},
	} {
		if out, err := exec.CommandContext(ctx, cairnBin, args...).CombinedOutput(); err != nil {
			return c, fmt.Errorf("cairn %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	for _, f := range []string{pki.CACertFile, pki.CAKeyFile} {
		data, err := os.ReadFile(filepath.Join(caDir, f))
		if err != nil {
			return c, err
		}
		if err := os.WriteFile(filepath.Join(overlay, f), data, 0o600); err != nil {
			return c, err
		}
	}
	if err := writeOverlay(overlay, kube); err != nil {
		return c, err
	}

	// The VolumeSnapshotClass in the chart needs the CRDs first.
	if err := installSnapshotCRDs(ctx, kube, bins); err != nil {
		return c, err
	}
	if _, err := kube.Kubectl(ctx, nil, "apply", "-k", overlay); err != nil {
		return c, err
	}
	p, err := startSnapshotController(kube, bins)
	if err != nil {
		return c, err
	}
	c.procs = append(c.procs, p)

	for _, w := range [][]string{
		// rollout status knows no OnDelete DaemonSet: count ready pods.
		{"wait", "--for=jsonpath={.status.numberReady}=1", "daemonset/cairn-fuse-holder"},
		{"rollout", "status", "daemonset/cairn-node"},
		{"rollout", "status", "deployment/cairn-controller"},
	} {
		if _, err := kube.Kubectl(ctx, nil, append(w, "-n", namespace, "--timeout=5m")...); err != nil {
			desc, _ := kube.Kubectl(ctx, nil, "describe", "pods", "-n", namespace)
			return c, fmt.Errorf("%w\n%s", err, desc)
		}
	}
	// The tests read the store as the controller does, at the node's
	// meta API, with mutual TLS.
	creds, err := pki.Load(pki.FilesIn(ctlDir, "tls"))
	if err != nil {
		return c, err
	}
	if c.meta, err = meta.NewClient([]string{kube.NodeIP + ":7002"}, meta.WithTLS(creds)); err != nil {
		return c, err
	}
	return c, waitDriverReady(ctx, kube, c)
}

// writeOverlay writes the kustomization over the rendered chart in dir:
// every rendered manifest, and the host aliases that stand in for cluster
// DNS in the node agents' and the controllers' pods.
func writeOverlay(dir string, kube *localkube.Run) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return err
	}
	var resources []string
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return err
		}
		// A template whose condition is off renders nothing.
		if b, _ := os.ReadFile(f); st.Size() == 0 || strings.TrimSpace(strings.Trim(string(b), "-\n ")) == "" {
			continue
		}
		resources = append(resources, filepath.Base(f))
	}
	aliases := func(names ...string) string {
		return fmt.Sprintf(`- op: add
  path: /spec/template/spec/hostAliases
  value: [{ip: %q, hostnames: [%s]}]
`, kube.NodeIP, strings.Join(names, ", "))
	}
	k := map[string]any{
		"apiVersion": "kustomize.config.k8s.io/v1beta1",
		"kind":       "Kustomization",
		"resources":  resources,
		// The Secret the chart's tls.caSecret names, as a user makes it
		// with kubectl create secret (deploy/README.md).
		"secretGenerator": []any{map[string]any{
			"name": "cairn-ca", "namespace": namespace,
			"files":   []string{pki.CACertFile, pki.CAKeyFile},
			"options": map[string]any{"disableNameSuffixHash": true},
		}},
		"patches": []any{
			// The agents advertise themselves by node name.
			map[string]any{"target": map[string]any{"kind": "DaemonSet", "name": "cairn-node"}, "patch": aliases(kube.NodeName)},
			// The controller dials the cairn-meta Service, then the
			// members by the names they advertise.
			map[string]any{"target": map[string]any{"kind": "Deployment", "name": "cairn-controller"},
				"patch": aliases("cairn-meta."+namespace+".svc", kube.NodeName)},
		},
	}
	b, err := yaml.Marshal(k)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "kustomization.yaml"), b, 0o644)
}

// buildHelmRender builds tests/deploy/helmrender, the chart renderer
// `make manifests` uses (its own module: Helm's libraries stay out of
// Cairn's go.mod).
func buildHelmRender(cache, repo string) (string, error) {
	out := filepath.Join(cache, "helmrender", "helmrender")
	cmd := exec.Command("go", "build", "-o", out, ".")
	cmd.Dir = filepath.Join(repo, "tests", "deploy", "helmrender")
	cmd.Env = append(os.Environ(), "GOWORK=off")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build helmrender: %v: %s", err, b)
	}
	return out, nil
}

// podLogs names the logs of the containers of Cairn's pods, as kubelet
// writes them: "CONTAINER (POD)".
func podLogs(kube *localkube.Run) map[string]string {
	out := map[string]string{}
	dirs, _ := filepath.Glob(filepath.Join(kube.Dir, "pod-logs", namespace+"_*"))
	for _, d := range dirs {
		pod := strings.Split(filepath.Base(d), "_")[1]
		logs, _ := filepath.Glob(filepath.Join(d, "*", "*.log"))
		// kubelet names a container's logs by its restart count, N.log:
		// the highest one is the newest.
		restart := func(l string) int {
			n, _ := strconv.Atoi(strings.TrimSuffix(filepath.Base(l), ".log"))
			return n
		}
		sort.Slice(logs, func(i, j int) bool { return restart(logs[i]) < restart(logs[j]) })
		for _, l := range logs {
			out[filepath.Base(filepath.Dir(l))+" ("+pod+")"] = l
		}
	}
	return out
}
