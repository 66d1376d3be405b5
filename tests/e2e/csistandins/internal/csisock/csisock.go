// Package csisock connects to a CSI driver's Unix socket the way both
// stand-ins need it.
package csisock

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
)

// Path returns the filesystem path of a CSI address, which the upstream
// sidecars accept both as a path (/csi/csi.sock) and as a URL
// (unix:///csi/csi.sock).
func Path(addr string) string {
	if p, ok := strings.CutPrefix(addr, "unix://"); ok {
		return p
	}
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return p
	}
	return addr
}

// Dial returns a client connection to the CSI socket at addr. It
// connects lazily and keeps reconnecting, so it may be made before the
// driver listens. The reconnect backoff is capped at a second: gRPC's
// default grows to two minutes, and a driver that (re)starts after the
// first attempts would then stay unreachable long after its socket is
// back, failing health checks in the meantime.
func Dial(addr string) (*grpc.ClientConn, error) {
	p := Path(addr)
	if p == "" {
		return nil, fmt.Errorf("empty CSI address")
	}
	cfg := backoff.DefaultConfig
	cfg.MaxDelay = time.Second
	return grpc.NewClient("unix:"+p,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: cfg, MinConnectTimeout: time.Second}))
}
