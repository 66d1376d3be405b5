package localkube

import (
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// The cluster has no kube-proxy: nothing else needs Services, and its
// rules would be many more to clean up. Pods still find the API server
// where every in-cluster client looks, the kubernetes Service
// (KUBERNETES_SERVICE_HOST, the first address of the service range):
// routeServiceToAPI sends that address to the API server with one DNAT
// rule in a chain of its own, which Cleanup removes.
const (
	serviceRange        = "10.96.0.0/24"
	kubernetesServiceIP = "10.96.0.1"
	// natChain holds the harness's NAT rules.
	natChain = "CAIRN-E2E"
)

// natJumps are where natChain is called from: PREROUTING for pods on the
// bridge, OUTPUT for host-network pods and processes.
var natJumps = []string{"PREROUTING", "OUTPUT"}

func iptables(args ...string) error {
	out, err := exec.Command("iptables", append([]string{"-w", "-t", "nat"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("iptables -t nat %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// routeServiceToAPI DNATs the kubernetes Service's address, port 443, to
// the API server at ip:port.
func routeServiceToAPI(ip string, port int) error {
	if err := removeServiceRoute(); err != nil {
		return err
	}
	if err := iptables("-N", natChain); err != nil {
		return err
	}
	if err := iptables("-A", natChain, "-d", kubernetesServiceIP+"/32", "-p", "tcp", "--dport", "443",
		"-j", "DNAT", "--to-destination", ip+":"+strconv.Itoa(port)); err != nil {
		return err
	}
	for _, from := range natJumps {
		if err := iptables("-A", from, "-d", kubernetesServiceIP+"/32", "-j", natChain); err != nil {
			return err
		}
	}
	return nil
}

// removeServiceRoute removes natChain and the jumps to it, if there are
// any (a crashed run leaves them).
func removeServiceRoute() error {
	if iptables("-n", "-L", natChain) != nil {
		return nil // no chain: nothing to remove
	}
	for _, from := range natJumps {
		// -D deletes one rule a call; a crashed run may have added the
		// jump twice.
		for iptables("-D", from, "-d", kubernetesServiceIP+"/32", "-j", natChain) == nil {
			continue
		}
	}
	if err := iptables("-F", natChain); err != nil {
		return err
	}
	return iptables("-X", natChain)
}
