// Command livenessprobe is the e2e harness's stand-in for the CSI
// livenessprobe sidecar (see the module's doc.go for why): it serves
// GET /healthz, which calls the CSI Probe RPC on the driver's socket and
// answers 200 "ok" if it succeeds and the driver does not say it is not
// ready, and 500 with the reason otherwise. kubelet's liveness probe
// then restarts a driver container that stopped answering.
//
// It takes the upstream flags that Cairn's manifests pass:
//
//	livenessprobe --csi-address=/csi/csi.sock --http-endpoint=127.0.0.1:9898 --probe-timeout=3s
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cairn-csi/cairn/tests/e2e/csistandins/internal/csisock"
)

// prober answers /healthz with the driver's Probe.
type prober struct {
	client  csi.IdentityClient
	timeout time.Duration
}

func (p *prober) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), p.timeout)
	defer cancel()
	resp, err := p.client.Probe(ctx, &csi.ProbeRequest{})
	if err != nil {
		log.Printf("probe failed: %v", err)
		http.Error(w, fmt.Sprintf("probe: %v", err), http.StatusInternalServerError)
		return
	}
	// An unset ready means ready (CSI spec: the plugin may leave it out).
	if rd := resp.GetReady(); rd != nil && !rd.GetValue() {
		log.Print("probe: the driver is not ready")
		http.Error(w, "probe: the driver is not ready", http.StatusInternalServerError)
		return
	}
	fmt.Fprint(w, "ok")
}

func main() {
	csiAddress := flag.String("csi-address", "", "the CSI driver's socket (a path or unix:// URL; required)")
	httpEndpoint := flag.String("http-endpoint", ":9808", "address to serve GET /healthz on")
	timeout := flag.Duration("probe-timeout", time.Second, "how long a Probe call may take")
	flag.Parse()
	if *csiAddress == "" {
		log.Fatal("--csi-address is required")
	}
	if flag.NArg() > 0 {
		log.Fatalf("unexpected arguments: %q", flag.Args())
	}
	// Lazy: the driver need not listen yet; /healthz fails until it does.
	conn, err := csisock.Dial(*csiAddress)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	p := &prober{client: csi.NewIdentityClient(conn), timeout: *timeout}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", p.healthz)
	srv := &http.Server{Addr: *httpEndpoint, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	log.Printf("serving /healthz on %s, probing %s (timeout %s)", *httpEndpoint, *csiAddress, *timeout)
	log.Fatal(srv.ListenAndServe())
}
