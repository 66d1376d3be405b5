// Package localkube runs a single-node Kubernetes on this machine from
// binaries built from source: containerd (private config, root, state and
// socket), etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
// kubelet, with a CNI bridge for the pods. It exists for Cairn's end-to-end
// tests (tests/e2e), which need the parts of Kubernetes that call a CSI
// driver: kubelet's staging and plugin registration, the attach/detach
// controller and the scheduler's capacity checks.
//
// Everything a run makes lives under one run directory, and everything it
// changes outside of it is recorded in the run directory's state file
// before it is changed: the processes it starts (by PID), the kernel
// settings kubelet rewrites, the bridge. Cleanup reads that file, so it
// undoes a crashed run as well as a finished one; Up calls it first.
//
// What lies outside the run directory and how it is put back:
//   - processes: the recorded PIDs, each checked to still run with the run
//     directory in its command line (PIDs get reused), then any process
//     whose command line names the run directory (containerd's shims);
//   - containers: the processes in the pods' cgroups, all under the cgroup
//     CgroupRoot of every v1 hierarchy, which Cleanup empties and removes;
//   - network: the bridge Bridge and the pods' network namespaces, which
//     containerd keeps under its state directory (netns_mounts_under_state_dir);
//   - kernel settings: kubelet sets vm.overcommit_memory, vm.panic_on_oom,
//     kernel.panic, kernel.panic_on_oops and kernel.keys.root_max*, the
//     bridge plugin net.ipv4.ip_forward: their values before the first
//     start are recorded and written back;
//   - /var/log/containers: kubelet's links to container logs (a fixed path in
//     kubelet) that point into the run directory are removed.
package localkube
