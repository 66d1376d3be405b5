package loopback

import (
	"net"
	"testing"
)

func TestAddrs(t *testing.T) {
	addrs, err := Addrs(3, 4)
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 3 {
		t.Fatalf("%d hosts, want 3", len(addrs))
	}
	seen := map[string]bool{}
	hostOf := map[string]int{}
	for i, node := range addrs {
		if len(node) != 4 {
			t.Fatalf("host %d has %d addresses, want 4", i, len(node))
		}
		for _, a := range node {
			if seen[a] {
				t.Errorf("%s handed out twice", a)
			}
			seen[a] = true
			host, _, err := net.SplitHostPort(a)
			if err != nil {
				t.Fatal(err)
			}
			ip := net.ParseIP(host)
			if !ip.IsLoopback() || host == "127.0.0.1" {
				t.Errorf("%s: want a loopback address other than 127.0.0.1", a)
			}
			if j, ok := hostOf[host]; ok && j != i {
				t.Errorf("hosts %d and %d share %s", j, i, host)
			}
			hostOf[host] = i
			// Free now: it can be bound.
			l, err := net.Listen("tcp", a)
			if err != nil {
				t.Errorf("%s is not free: %v", a, err)
				continue
			}
			l.Close()
		}
	}
}
