//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// driverName is the CSIDriver deploy/kubernetes installs.
const driverName = "csi.cairn.io"

// namespace is where the sidecars keep their leases and capacity objects,
// as deploy/kubernetes has it.
const namespace = "cairn-system"

// cairnDeployment is Cairn on the cluster as host processes: the node
// agents and the CSI controller of a `cairn dev up` cluster, the sidecars
// next to the controller as the Deployment in deploy/kubernetes runs them,
// and a registrar that announces node-1's CSI socket to kubelet. The
// objects of deploy/kubernetes that make sense for host processes are
// applied: namespace, CSIDriver, service accounts, RBAC, StorageClasses,
// VolumeSnapshotClass; the sidecars use the controller's service account,
// so its RBAC is what they are allowed.
type cairnDeployment struct {
	bin, dir string
	dev      devCluster
	// node is the agent kubelet uses as its node plugin.
	node devNode
	meta *meta.Client
	kube *localkube.Run
	// procs are the sidecars and the registrar (host processes), or the
	// snapshot-controller alone (pods).
	procs []*localkube.Process
	// pods: Cairn runs from the Helm chart in containerd (pods_test.go);
	// bin and dev are then unset.
	pods bool
	// ext4Class is the replicated ext4 StorageClass scenario 1 uses, and
	// replicas its replica count.
	ext4Class string
	replicas  int
}

// devCluster is the part of `cairn dev up`'s cluster.json the tests read.
type devCluster struct {
	Nodes      []devNode `json:"nodes"`
	Controller struct {
		CSI string `json:"csi"`
		Log string `json:"log"`
	} `json:"controller"`
}

type devNode struct {
	ID    string `json:"id"`
	Agent string `json:"agent"`
	CSI   string `json:"csi"`
	Log   string `json:"log"`
}

func deployCairn(ctx context.Context, kube *localkube.Run, bins *localkube.Binaries, bin, manifests string) (*cairnDeployment, error) {
	c := &cairnDeployment{bin: bin, dir: filepath.Join(kube.Dir, "cairn"), kube: kube, ext4Class: "cairn-replicated-ext4", replicas: 3}
	// Node agents on loopback addresses with CSI sockets kubelet's paths
	// are allowed on, and the CSI controller. Each node has a data
	// directory of disk type nvme-ssd besides its default one and IOPS to
	// promise to guaranteed volumes, as the design's StorageClass needs
	// (TestDesignStorageClass).
	// With mutual TLS on every port: the CSI controller and the tests'
	// own store client present certificates dev up issues.
	out, err := exec.CommandContext(ctx, bin, "dev", "up", "--nodes", "3", "--dir", c.dir, "--tls",
		"--disk-types", "nvme-ssd", fmt.Sprintf("--node-arg=--reservable-iops=%d", designReservable),
		"--node-arg=--csi-allowed-roots="+kube.KubeletRoot).CombinedOutput()
	fmt.Printf("%s", out)
	if err != nil {
		return c, fmt.Errorf("cairn dev up: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(c.dir, "cluster.json"))
	if err != nil {
		return c, err
	}
	if err := json.Unmarshal(b, &c.dev); err != nil {
		return c, err
	}
	c.node = c.dev.Nodes[0]
	var agents []string
	for _, n := range c.dev.Nodes {
		agents = append(agents, n.Agent)
	}
	creds, err := pki.Load(pki.FilesIn(filepath.Join(c.dir, "pki", "ctl"), "tls"))
	if err != nil {
		return c, err
	}
	if c.meta, err = meta.NewClient(agents, meta.WithTLS(creds)); err != nil {
		return c, err
	}

	for _, f := range []string{"namespace.yaml", "csidriver.yaml", "serviceaccounts.yaml",
		"rbac-provisioner.yaml", "rbac-attacher.yaml", "rbac-resizer.yaml", "rbac-snapshotter.yaml", "rbac-node.yaml",
		"storageclasses.yaml"} {
		if _, err := kube.Kubectl(ctx, nil, "apply", "-f", filepath.Join(manifests, f)); err != nil {
			return c, err
		}
	}
	if err := installSnapshotCRDs(ctx, kube, bins); err != nil {
		return c, err
	}
	if _, err := kube.Kubectl(ctx, nil, "apply", "-f", filepath.Join(manifests, "volumesnapshotclass.yaml")); err != nil {
		return c, err
	}

	// The sidecars act as the controller pod's service account would.
	tok, err := kube.Kubectl(ctx, nil, "create", "token", "cairn-controller", "-n", namespace, "--duration", "24h")
	if err != nil {
		return c, err
	}
	saKube := filepath.Join(kube.Dir, "cairn-controller.kubeconfig")
	if err := kube.WriteKubeconfig(saKube, strings.TrimSpace(tok)); err != nil {
		return c, err
	}
	sock := strings.TrimPrefix(c.dev.Controller.CSI, "unix://")
	election := []string{"--leader-election", "--leader-election-namespace", namespace}
	sidecars := []struct {
		name string
		args []string
		env  []string
	}{
		{"csi-provisioner", append([]string{"--timeout=120s", "--extra-create-metadata", "--default-fstype=ext4",
			// Outside a pod the capacity objects have no owner.
			"--enable-capacity", "--capacity-ownerref-level=-1"}, election...), []string{"NAMESPACE=" + namespace}},
		{"csi-attacher", append([]string{"--timeout=60s"}, election...), nil},
		{"csi-resizer", append([]string{"--timeout=60s"}, election...), nil},
		{"csi-snapshotter", append([]string{"--timeout=120s"}, election...), nil},
	}
	for _, s := range sidecars {
		args := append([]string{"--csi-address", sock, "--kubeconfig", saKube, "--v", "4"}, s.args...)
		p, err := kube.Start(s.name, bins.Sidecar[s.name], args, s.env)
		if err != nil {
			return c, err
		}
		c.procs = append(c.procs, p)
	}
	p, err := startSnapshotController(kube, bins)
	if err != nil {
		return c, err
	}
	c.procs = append(c.procs, p)
	p, err = kube.Start("registrar", bins.Registrar, []string{"--driver", driverName,
		"--csi-address", strings.TrimPrefix(c.node.CSI, "unix://"),
		"--plugin-registration-path", filepath.Join(kube.KubeletRoot, "plugins_registry")}, nil)
	if err != nil {
		return c, err
	}
	c.procs = append(c.procs, p)
	return c, waitDriverReady(ctx, kube, c)
}

// installSnapshotCRDs installs the VolumeSnapshot CRDs, which every
// cluster that takes snapshots has (the VolumeSnapshotClass needs them).
func installSnapshotCRDs(ctx context.Context, kube *localkube.Run, bins *localkube.Binaries) error {
	if _, err := kube.Kubectl(ctx, nil, "apply", "-k", bins.SnapshotCRDs); err != nil {
		return err
	}
	_, err := kube.Kubectl(ctx, nil, "wait", "--for=condition=established", "--timeout=60s",
		"crd/volumesnapshotclasses.snapshot.storage.k8s.io", "crd/volumesnapshots.snapshot.storage.k8s.io", "crd/volumesnapshotcontents.snapshot.storage.k8s.io")
	return err
}

// startSnapshotController runs the snapshot-controller, which is the
// cluster's, not the driver's, as a host process.
func startSnapshotController(kube *localkube.Run, bins *localkube.Binaries) (*localkube.Process, error) {
	return kube.Start("snapshot-controller", bins.Sidecar["snapshot-controller"], []string{"--kubeconfig", kube.Kubeconfig, "--leader-election=false", "--v", "3"}, nil)
}

// waitDriverReady waits for kubelet to register the node plugin and for
// the provisioner to publish capacity.
func waitDriverReady(ctx context.Context, kube *localkube.Run, c *cairnDeployment) error {
	if err := poll(ctx, 2*time.Minute, "kubelet to register "+driverName, func() error {
		out, err := kube.Kubectl(ctx, nil, "get", "csinode", kube.NodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		if err != nil {
			return err
		}
		if !strings.Contains(out, driverName) {
			return fmt.Errorf("CSINode drivers: %q", out)
		}
		return nil
	}); err != nil {
		return fmt.Errorf("%w\n%s\nkubelet:\n%s", err, c.tail("registrar", 10), kube.Kubelet().Tail(30))
	}
	// WaitForFirstConsumer pods schedule only where a CSIStorageCapacity
	// says there is room.
	if err := poll(ctx, 3*time.Minute, "CSIStorageCapacity objects", func() error {
		out, err := kube.Kubectl(ctx, nil, "get", "csistoragecapacities", "-n", namespace, "-o", "jsonpath={.items[*].capacity}")
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("none yet")
		}
		return nil
	}); err != nil {
		return fmt.Errorf("%w\n%s", err, c.tail("provisioner", 20))
	}
	return nil
}

// tail returns the last n lines of each log whose name contains what.
func (c *cairnDeployment) tail(what string, n int) string {
	var b strings.Builder
	for name, path := range c.allLogs() {
		if strings.Contains(name, what) {
			fmt.Fprintf(&b, "%s:\n%s\n", name, localkube.Tail(path, n))
		}
	}
	return b.String()
}

// allLogs names the logs of every process of the cluster and of Cairn.
func (c *cairnDeployment) allLogs() map[string]string {
	logs := c.kube.Logs()
	for k, v := range c.logs() {
		logs[k] = v
	}
	return logs
}

// logs names the logs of the node agents and the CSI controller.
func (c *cairnDeployment) logs() map[string]string {
	if c.pods {
		return podLogs(c.kube)
	}
	out := map[string]string{"cairn-controller": c.dev.Controller.Log}
	for _, n := range c.dev.Nodes {
		out["cairn-"+n.ID] = n.Log
	}
	return out
}

// down stops the sidecars and the registrar, then the dev cluster.
func (c *cairnDeployment) down() error {
	for i := len(c.procs) - 1; i >= 0; i-- {
		c.procs[i].Stop(10 * time.Second)
	}
	if c.meta != nil {
		c.meta.Close()
	}
	if c.pods {
		// The pods go with the cluster (localkube's Close).
		return nil
	}
	if _, err := os.Stat(filepath.Join(c.dir, "cluster.json")); err != nil {
		return nil
	}
	out, err := exec.Command(c.bin, "dev", "down", "--dir", c.dir, "--keep-data").CombinedOutput()
	if err != nil {
		return fmt.Errorf("cairn dev down: %v: %s", err, out)
	}
	return nil
}

// poll calls check every 500 ms until it returns nil or timeout passes.
func poll(ctx context.Context, timeout time.Duration, what string, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if last = check(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waited %v for %s: %v", timeout, what, last)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
