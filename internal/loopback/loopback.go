// Package loopback picks listen addresses for local clusters of Cairn nodes
// (the `cairn dev` cluster and the test harnesses): each node on a loopback
// address of its own, 127.X.Y.i, in a /24 drawn at random per cluster.
//
// Why not 127.0.0.1: a restarted node must bind the addresses it had (its
// raft address is in the cluster's membership), but on 127.0.0.1 the kernel
// hands the same port numbers to other processes, to their outgoing
// connections and to their listeners on port 0, so a parallel test can hold
// a stopped node's port when it comes back. Connections to any 127.x.y.z
// leave from 127.0.0.1, and nothing else binds a cluster's own addresses, so
// its ports stay free for it; only a listener on every address (0.0.0.0 or
// [::]) could take one. Linux routes all of 127.0.0.0/8 to lo.
package loopback

import (
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
)

// Addrs returns perHost distinct "host:port" addresses, free right now, on
// each of hosts fresh loopback addresses: Addrs(3, 4)[i] are node i's four.
func Addrs(hosts, perHost int) ([][]string, error) {
	subnet := fmt.Sprintf("127.%d.%d.", 1+rand.IntN(254), rand.IntN(256))
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	addrs := make([][]string, hosts)
	for i := range addrs {
		host := subnet + strconv.Itoa(i+1)
		for range perHost {
			l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
			if err != nil {
				return nil, fmt.Errorf("reserve a port on %s: %w", host, err)
			}
			ls = append(ls, l)
			addrs[i] = append(addrs[i], l.Addr().String())
		}
	}
	return addrs, nil
}
