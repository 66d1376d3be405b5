package localkube

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Options configure Up.
type Options struct {
	// Dir is the run directory; Up empties it first (after Cleanup).
	Dir string
	// Bins are the built programs and images.
	Bins *Binaries
	// NodeName is kubelet's node name (default "e2e-node").
	NodeName string
	// Progress gets a line per phase with its time.
	Progress io.Writer
}

// Run is a running single-node cluster.
type Run struct {
	// Dir is the run directory.
	Dir string
	// NodeName is the one node's name; NodeIP its InternalIP.
	NodeName, NodeIP string
	// Server is the API server's URL; Kubeconfig an admin kubeconfig for it.
	Server, Kubeconfig string
	// CACert is the CA file clients verify the API server with.
	CACert string
	// KubeletRoot is kubelet's --root-dir (its plugins, plugins_registry
	// and pods directories are the CSI paths).
	KubeletRoot string
	// ContainerdSocket is the private containerd's socket.
	ContainerdSocket string

	opts     Options
	pki      *pki
	mu       sync.Mutex // guards state and procs
	state    *state
	procs    []*Process
	kubelet  *Process
	etcdURL  string
	progress io.Writer
}

// Up cleans up what an earlier run in opts.Dir left, then starts
// containerd, etcd, the control plane and kubelet, and waits until the node
// is Ready and the default service account exists. On failure it stops
// what it started (see Close) and returns an error that names the log to
// read.
func Up(ctx context.Context, opts Options) (r *Run, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("localkube needs root (mounts, cgroups, network namespaces)")
	}
	if opts.NodeName == "" {
		opts.NodeName = "e2e-node"
	}
	if opts.Progress == nil {
		opts.Progress = io.Discard
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, err
	}
	if err := Cleanup(dir); err != nil {
		return nil, fmt.Errorf("clean up the last run in %s: %w", dir, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	r = &Run{Dir: dir, NodeName: opts.NodeName, opts: opts, state: &state{}, progress: opts.Progress,
		KubeletRoot: filepath.Join(dir, "kubelet"), ContainerdSocket: filepath.Join(dir, "containerd", "containerd.sock")}
	defer func() {
		if err != nil {
			r.Close()
			r = nil
		}
	}()
	if err := r.state.recordSysctls(); err != nil {
		return r, err
	}
	if err := r.state.save(dir); err != nil {
		return r, err
	}
	if r.NodeIP, err = defaultRouteIP(); err != nil {
		return r, err
	}
	if r.pki, err = newPKI(filepath.Join(dir, "pki"), r.NodeName, []net.IP{net.ParseIP(r.NodeIP), net.ParseIP(kubernetesServiceIP)}); err != nil {
		return r, err
	}
	r.CACert = r.pki.caCert
	for _, step := range []struct {
		name string
		fn   func(context.Context) error
	}{
		{"containerd and images", r.startContainerd},
		{"etcd", r.startEtcd},
		{"kube-apiserver", r.startAPIServer},
		{"controller-manager and scheduler", r.startControllers},
		{"kubelet and node Ready", r.startKubelet},
	} {
		start := time.Now()
		if err := step.fn(ctx); err != nil {
			return r, fmt.Errorf("%s: %w", step.name, err)
		}
		fmt.Fprintf(r.progress, "up: %s (%s)\n", step.name, time.Since(start).Round(100*time.Millisecond))
	}
	return r, nil
}

// Close stops every process the run started, newest first, and cleans up
// (see Cleanup). The run directory stays, with the logs.
func (r *Run) Close() error {
	r.mu.Lock()
	procs := r.procs
	r.procs = nil
	r.mu.Unlock()
	for i := len(procs) - 1; i >= 0; i-- {
		procs[i].Stop(10 * time.Second)
	}
	return Cleanup(r.Dir)
}

// Logs lists the log files of the processes the run started.
func (r *Run) Logs() map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string]string{}
	for _, p := range r.procs {
		out[p.Name] = p.Log
	}
	return out
}

// Tail returns the last n lines of a log file.
func Tail(path string, n int) string { return tailFile(path, n) }

// defaultRouteIP returns the IPv4 address of the interface of the default
// route: kubelet refuses a loopback node IP.
func defaultRouteIP() (string, error) {
	f, err := os.Open("/proc/net/route")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 || fs[1] != "00000000" {
			continue
		}
		ifc, err := net.InterfaceByName(fs[0])
		if err != nil {
			return "", err
		}
		addrs, err := ifc.Addrs()
		if err != nil {
			return "", err
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil {
				return ipn.IP.String(), nil
			}
		}
	}
	return "", errors.New("no IPv4 address on the default route's interface (kubelet needs a node IP that is not loopback)")
}

// Ports handed out by freePort in this process, so that two components
// never get the same one.
var (
	portsMu sync.Mutex
	ports   = map[int]bool{}
)

// freePort returns a TCP port free right now on host, below the kernel's
// ephemeral range (ip_local_port_range). A component binds it seconds
// later; a port of the ephemeral range (what a listen on port 0 gives) can
// meanwhile become the local port of any outgoing connection on the
// machine, and then the component fails with "address already in use"
// (CI 35's kubelet did).
func freePort(host string) (int, error) {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				low = n
			}
		}
	}
	const floor = 10000
	if low <= floor+1000 {
		return 0, fmt.Errorf("the ephemeral port range starts at %d: no room below it above %d", low, floor)
	}
	portsMu.Lock()
	defer portsMu.Unlock()
	for range 1000 {
		port := floor + rand.IntN(low-floor)
		if ports[port] {
			continue
		}
		l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			continue // taken
		}
		l.Close()
		ports[port] = true
		return port, nil
	}
	return 0, fmt.Errorf("no free TCP port on %s between %d and %d after 1000 tries", host, floor, low-1)
}

// waitFor polls check every 250 ms until it returns nil, p exits or
// timeout passes; the error names p's log.
func waitFor(ctx context.Context, p *Process, timeout time.Duration, what string, check func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if p != nil {
			if done, err := p.Exited(); done {
				return fmt.Errorf("%s exited (%v) while waiting for %s; last lines of %s:\n%s", p.Name, err, what, p.Log, p.Tail(20))
			}
		}
		if last = check(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("no %s within %v: %v", what, timeout, last)
			if p != nil {
				msg += fmt.Sprintf("; last lines of %s:\n%s", p.Log, p.Tail(20))
			}
			return errors.New(msg)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func (r *Run) startContainerd(ctx context.Context) error {
	base := filepath.Join(r.Dir, "containerd")
	cniConf := filepath.Join(r.Dir, "cni", "net.d")
	for _, d := range []string{base, cniConf} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// The pods' network: a bridge with host-local addresses and a default
	// route through it, so that pods reach the node's address (Cairn's
	// controller pods dial the node agents' meta API there). No masquerade
	// and no port maps: the pods talk to nothing beyond the node, and so
	// the plugins add no iptables rules to clean up.
	conflist := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "cairn-e2e",
  "plugins": [
    {"type": "bridge", "bridge": %q, "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": %q}}
  ]
}
`, Bridge, filepath.Join(r.Dir, "cni", "ipam"))
	if err := os.WriteFile(filepath.Join(cniConf, "10-cairn-e2e.conflist"), []byte(conflist), 0o644); err != nil {
		return err
	}
	// Everything containerd keeps is under base: root, state, sockets, the
	// runc state, the pods' network namespaces (netns_mounts_under_state_dir)
	// and /opt's replacement. restrict_oom_score_adj: without
	// CAP_SYS_RESOURCE a negative oom_score_adj fails and so would every
	// sandbox.
	config := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %[3]q

[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[5]q
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = %[6]q

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = %[7]q
`, filepath.Join(base, "root"), filepath.Join(base, "state"), r.ContainerdSocket, filepath.Join(base, "opt"),
		PauseImageRef, cniConf, filepath.Join(base, "runc"))
	cfgPath := filepath.Join(base, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		return err
	}
	p, err := r.Start("containerd", "containerd", []string{"--config", cfgPath}, nil)
	if err != nil {
		return err
	}
	if err := waitFor(ctx, p, 30*time.Second, "containerd socket", func() error {
		c, err := net.Dial("unix", r.ContainerdSocket)
		if err != nil {
			return err
		}
		return c.Close()
	}); err != nil {
		return err
	}
	for _, img := range []string{r.opts.Bins.PauseImage, r.opts.Bins.BusyboxImage} {
		if err := r.ImportImage(ctx, img); err != nil {
			return err
		}
	}
	return nil
}

func (r *Run) startEtcd(ctx context.Context) error {
	client, err := freePort("127.0.0.1")
	if err != nil {
		return err
	}
	peer, err := freePort("127.0.0.1")
	if err != nil {
		return err
	}
	clientURL := "http://127.0.0.1:" + strconv.Itoa(client)
	peerURL := "http://127.0.0.1:" + strconv.Itoa(peer)
	p, err := r.Start("etcd", r.opts.Bins.Etcd, []string{
		"--name", "e2e", "--data-dir", filepath.Join(r.Dir, "etcd"),
		"--listen-client-urls", clientURL, "--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "e2e=" + peerURL,
		// A test cluster: a crash loses it anyway.
		"--unsafe-no-fsync",
	}, nil)
	if err != nil {
		return err
	}
	r.etcdURL = clientURL
	return waitFor(ctx, p, 60*time.Second, "etcd health", func() error {
		resp, err := http.Get(clientURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/health: %s", resp.Status)
		}
		return nil
	})
}

func (r *Run) startAPIServer(ctx context.Context) error {
	port, err := freePort(r.NodeIP)
	if err != nil {
		return err
	}
	r.Server = "https://" + net.JoinHostPort(r.NodeIP, strconv.Itoa(port))
	if err := routeServiceToAPI(r.NodeIP, port); err != nil {
		return err
	}
	p, err := r.Start("kube-apiserver", r.opts.Bins.APIServer, []string{
		"--etcd-servers", r.etcdURL,
		// Listen on the node's address, which the endpoints of the
		// kubernetes Service need and pods reach (routeServiceToAPI).
		"--bind-address", r.NodeIP, "--secure-port", strconv.Itoa(port), "--advertise-address", r.NodeIP,
		"--tls-cert-file", r.pki.serverCert, "--tls-private-key-file", r.pki.serverKey,
		"--client-ca-file", r.pki.caCert,
		// kubelet's node name resolves nowhere here: reach it (kubectl
		// logs, exec) at its InternalIP.
		"--kubelet-preferred-address-types", "InternalIP,Hostname",
		"--token-auth-file", r.pki.tokenFile,
		"--authorization-mode", "Node,RBAC",
		"--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file", r.pki.saPub, "--service-account-signing-key-file", r.pki.saKey,
		"--service-cluster-ip-range", serviceRange,
		"--allow-privileged=true",
		"--enable-admission-plugins", "NodeRestriction",
		"--profiling=false",
		"--cert-dir", filepath.Join(r.Dir, "pki", "apiserver"),
	}, nil)
	if err != nil {
		return err
	}
	r.Kubeconfig = filepath.Join(r.Dir, "admin.kubeconfig")
	if err := writeKubeconfig(r.Kubeconfig, r.Server, r.pki.caCert, r.pki.adminToken); err != nil {
		return err
	}
	client, err := r.httpClient()
	if err != nil {
		return err
	}
	return waitFor(ctx, p, 120*time.Second, "API server /readyz", func() error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, r.Server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+r.pki.adminToken)
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s: %s", resp.Status, body)
		}
		return nil
	})
}

// httpClient trusts the run's CA.
func (r *Run) httpClient() (*http.Client, error) {
	pem, err := os.ReadFile(r.pki.caCert)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("bad CA certificate")
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}, nil
}

func (r *Run) startControllers(ctx context.Context) error {
	cmKube := filepath.Join(r.Dir, "controller-manager.kubeconfig")
	schedKube := filepath.Join(r.Dir, "scheduler.kubeconfig")
	if err := writeKubeconfig(cmKube, r.Server, r.pki.caCert, r.pki.cmToken); err != nil {
		return err
	}
	if err := writeKubeconfig(schedKube, r.Server, r.pki.caCert, r.pki.schedToken); err != nil {
		return err
	}
	cmPort, err := freePort("127.0.0.1")
	if err != nil {
		return err
	}
	if _, err := r.Start("kube-controller-manager", r.opts.Bins.ControllerManager, []string{
		"--kubeconfig", cmKube, "--authentication-kubeconfig", cmKube, "--authorization-kubeconfig", cmKube,
		"--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(cmPort),
		"--leader-elect=false",
		// Publishes kube-root-ca.crt in every namespace, and signs the
		// service-account tokens of the controllers.
		"--root-ca-file", r.pki.caCert, "--service-account-private-key-file", r.pki.saKey,
		"--cert-dir", filepath.Join(r.Dir, "pki", "controller-manager"),
	}, nil); err != nil {
		return err
	}
	schedPort, err := freePort("127.0.0.1")
	if err != nil {
		return err
	}
	_, err = r.Start("kube-scheduler", r.opts.Bins.Scheduler, []string{
		"--kubeconfig", schedKube, "--authentication-kubeconfig", schedKube, "--authorization-kubeconfig", schedKube,
		"--bind-address", "127.0.0.1", "--secure-port", strconv.Itoa(schedPort),
		"--leader-elect=false",
		"--cert-dir", filepath.Join(r.Dir, "pki", "scheduler"),
	}, nil)
	return err
}

func (r *Run) startKubelet(ctx context.Context) error {
	// The pods' cgroups go under CgroupRoot in every hierarchy, which
	// kubelet expects to exist.
	hier, _ := filepath.Glob("/sys/fs/cgroup/*")
	for _, h := range hier {
		if st, err := os.Stat(filepath.Join(h, "cgroup.procs")); err != nil || st.IsDir() {
			continue
		}
		if err := os.MkdirAll(filepath.Join(h, CgroupRoot), 0o755); err != nil {
			return err
		}
	}
	for _, d := range []string{r.KubeletRoot, filepath.Join(r.Dir, "pod-logs"), filepath.Join(r.Dir, "volume-plugins")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := shareMounts(r.KubeletRoot); err != nil {
		return err
	}
	port, err := freePort("127.0.0.1")
	if err != nil {
		return err
	}
	healthz, err := freePort("127.0.0.1")
	if err != nil {
		return err
	}
	// cgroupfs: containerd 1.6 does not answer the CRI RuntimeConfig
	// call that the systemd driver needs. failCgroupV1: this machine has
	// cgroup v1. oomScoreAdj 0: no CAP_SYS_RESOURCE. makeIPTablesUtilChains
	// false: no iptables rules to clean up (there is no kube-proxy).
	// syncFrequency 10s: kubelet grows the filesystem of a mounted volume
	// whose claim grew only when it next syncs the pod, every minute by
	// default; the expansion tests would wait for that, not for Cairn.
	config := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
syncFrequency: 10s
port: %d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: %d
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: %s
cgroupsPerQOS: true
failCgroupV1: false
failSwapOn: false
oomScoreAdj: 0
makeIPTablesUtilChains: false
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
volumePluginDir: %s
resolvConf: ""
serializeImagePulls: false
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
  nodefs.inodesFree: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
`, port, healthz, CgroupRoot, r.ContainerdSocket, filepath.Join(r.Dir, "pod-logs"), filepath.Join(r.Dir, "volume-plugins"))
	cfgPath := filepath.Join(r.Dir, "kubelet-config.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		return err
	}
	kubeconfig := filepath.Join(r.Dir, "kubelet.kubeconfig")
	if err := writeKubeconfig(kubeconfig, r.Server, r.pki.caCert, r.pki.nodeToken); err != nil {
		return err
	}
	p, err := r.Start("kubelet", r.opts.Bins.Kubelet, []string{
		"--config", cfgPath, "--kubeconfig", kubeconfig, "--root-dir", r.KubeletRoot,
		"--hostname-override", r.NodeName, "--node-ip", r.NodeIP,
		"--cert-dir", filepath.Join(r.Dir, "pki", "kubelet"), "--v", "2",
	}, nil)
	if err != nil {
		return err
	}
	r.kubelet = p
	if err := waitFor(ctx, p, 120*time.Second, "node "+r.NodeName+" Ready", func() error {
		out, err := r.Kubectl(ctx, nil, "get", "node", r.NodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`)
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) != "True" {
			return fmt.Errorf("Ready=%q", out)
		}
		return nil
	}); err != nil {
		return err
	}
	// Pods need the namespace's default service account, which the
	// controller-manager makes.
	return waitFor(ctx, p, 60*time.Second, "service account default/default", func() error {
		_, err := r.Kubectl(ctx, nil, "get", "serviceaccount", "default", "-n", "default")
		return err
	})
}

// shareMounts makes dir a mount of its own with shared propagation, as
// kubelet's root is on a real node (systemd mounts / shared). A container
// volume with mountPropagation Bidirectional, the node agent's view of
// the staging and publish paths, needs it: the mounts the agent makes in
// its container must appear on the host, where kubelet and the pods look.
// Here / is private, so without this the pod's runtime refuses the mount.
// Cleanup's unmount of everything under the run directory removes it.
func shareMounts(dir string) error {
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s onto itself: %w", dir, err)
	}
	if err := syscall.Mount("", dir, "", syscall.MS_SHARED|syscall.MS_REC, ""); err != nil {
		return fmt.Errorf("make %s shared: %w", dir, err)
	}
	return nil
}

// ImportImage loads a docker-archive tarball into containerd's k8s.io
// namespace, where kubelet finds images (nothing is ever pulled).
func (r *Run) ImportImage(ctx context.Context, tarball string) error {
	out, err := exec.CommandContext(ctx, "ctr", "--address", r.ContainerdSocket, "-n", "k8s.io", "images", "import", tarball).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %v: %s", tarball, err, out)
	}
	return nil
}

// Kubelet is kubelet's process.
func (r *Run) Kubelet() *Process { return r.kubelet }

// Kubectl runs kubectl against the cluster as admin, with stdin if not
// nil, and returns its standard output; the error has its standard error.
func (r *Run) Kubectl(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, r.opts.Bins.Kubectl, append([]string{"--kubeconfig", r.Kubeconfig}, args...)...)
	cmd.Stdin = stdin
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// WriteKubeconfig writes a kubeconfig for the cluster with token (e.g. a
// service account's, from `kubectl create token`).
func (r *Run) WriteKubeconfig(path, token string) error {
	return writeKubeconfig(path, r.Server, r.pki.caCert, token)
}
