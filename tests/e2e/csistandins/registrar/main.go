// Command registrar is the e2e harness's stand-in for
// csi-node-driver-registrar (see the module's doc.go for why): it
// announces a CSI node plugin to kubelet by serving kubelet's plugin
// registration API on <plugin-registration-path>/<driver>-reg.sock, a
// socket in kubelet's plugins_registry directory. kubelet's plugin
// watcher finds the socket, calls GetInfo, which answers with the CSI
// socket's path as kubelet sees it, then calls NodeGetInfo there and
// writes the CSINode.
//
// It takes the upstream flags that Cairn's node DaemonSet passes:
//
//	registrar --csi-address=/csi/csi.sock \
//	  --kubelet-registration-path=/var/lib/kubelet/plugins/csi.cairn.io/csi.sock \
//	  --http-endpoint=127.0.0.1:9899
//
// and, for the harness's host-process mode, --driver (skip asking the
// plugin its name) with --plugin-registration-path (kubelet's
// plugins_registry directory, /registration in the container).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/cairn-csi/cairn/tests/e2e/csistandins/internal/csisock"
)

// registration answers kubelet's plugin watcher.
type registration struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint, sock string
	// serving is set once the fields above are, and the socket listens:
	// /healthz answers before that, while the driver's name is not known
	// yet, and must not read them.
	serving atomic.Bool
	// registered is set once kubelet reports that it registered the
	// plugin; /healthz fails until then.
	registered atomic.Bool
}

func (r *registration) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registration) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if !st.PluginRegistered {
		// kubelet refused the plugin: say why and stop, like the
		// upstream registrar, so that whoever runs it (kubelet
		// restarting the container, or the harness) sees the failure.
		// The socket goes first so that kubelet does not keep a stale
		// registration around.
		log.Printf("kubelet did not register %s: %s", r.driver, st.Error)
		_ = os.Remove(r.sock)
		os.Exit(1)
	}
	r.registered.Store(true)
	log.Printf("kubelet registered %s at %s", r.driver, r.endpoint)
	return &registerapi.RegistrationStatusResponse{}, nil
}

// healthz answers 200 while the registration socket exists and kubelet
// has registered the plugin. A socket removed behind our back (kubelet's
// directory wiped, say) means kubelet will not find the plugin again;
// failing the check gets the container restarted, which makes a new one.
func (r *registration) healthz(w http.ResponseWriter, _ *http.Request) {
	if !r.serving.Load() {
		http.Error(w, "waiting for the CSI driver", http.StatusInternalServerError)
		return
	}
	st, err := os.Stat(r.sock)
	switch {
	case err != nil:
		http.Error(w, fmt.Sprintf("registration socket: %v", err), http.StatusInternalServerError)
	case st.Mode().Type() != fs.ModeSocket:
		http.Error(w, r.sock+" is not a socket", http.StatusInternalServerError)
	case !r.registered.Load():
		http.Error(w, "kubelet has not registered "+r.driver+" yet", http.StatusInternalServerError)
	default:
		fmt.Fprintln(w, "ok")
	}
}

// driverName asks the plugin on addr for its name, retrying until it
// answers: the registrar usually starts beside the plugin, before the
// plugin listens.
func driverName(ctx context.Context, addr string) (string, error) {
	conn, err := csisock.Dial(addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	client := csi.NewIdentityClient(conn)
	start := time.Now()
	var lastLog time.Time
	for {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := client.GetPluginInfo(callCtx, &csi.GetPluginInfoRequest{})
		cancel()
		if err == nil && resp.GetName() != "" {
			return resp.GetName(), nil
		}
		if err == nil {
			err = errors.New("GetPluginInfo returned an empty name")
		}
		if time.Since(lastLog) >= 10*time.Second {
			log.Printf("waiting for the CSI driver on %s (%s): %v", addr, time.Since(start).Round(time.Second), err)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("GetPluginInfo on %s: %w (last error: %v)", addr, ctx.Err(), err)
		case <-time.After(time.Second):
		}
	}
}

func main() {
	csiAddress := flag.String("csi-address", "", "the CSI driver's socket, as this process sees it (a path or unix:// URL; required)")
	kubeletPath := flag.String("kubelet-registration-path", "", "the same socket's path as kubelet sees it on the host, returned to kubelet (default: --csi-address)")
	regDir := flag.String("plugin-registration-path", "/registration", "kubelet's plugins_registry directory, as this process sees it: <driver>-reg.sock goes there")
	httpEndpoint := flag.String("http-endpoint", "", "if set, serve GET /healthz on this address (e.g. 127.0.0.1:9899)")
	driver := flag.String("driver", "", "the CSI driver's name (default: ask the driver with GetPluginInfo)")
	flag.Parse()
	if *csiAddress == "" {
		log.Fatal("--csi-address is required")
	}
	if flag.NArg() > 0 {
		log.Fatalf("unexpected arguments: %q", flag.Args())
	}
	endpoint := *kubeletPath
	if endpoint == "" {
		endpoint = csisock.Path(*csiAddress)
	}

	reg := &registration{}
	// Served from the start, failing until the plugin is registered, so
	// that a probe while the driver is not up yet gets an answer (a
	// refused connection says less).
	if *httpEndpoint != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("GET /healthz", reg.healthz)
		hs := &http.Server{Addr: *httpEndpoint, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		go func() {
			log.Printf("serving /healthz on %s", *httpEndpoint)
			err := hs.ListenAndServe()
			if reg.serving.Load() {
				_ = os.Remove(reg.sock)
			}
			log.Fatalf("http endpoint %s: %v", *httpEndpoint, err)
		}()
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	name := *driver
	if name == "" {
		var err error
		if name, err = driverName(ctx, *csiAddress); err != nil {
			log.Fatal(err)
		}
		log.Printf("the CSI driver on %s is %s", *csiAddress, name)
	}

	sock := filepath.Join(*regDir, name+"-reg.sock")
	// A socket left by an earlier run (killed, or a restarted
	// container) would make Listen fail.
	if err := os.Remove(sock); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Fatal(err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	reg.driver, reg.endpoint, reg.sock = name, endpoint, sock
	reg.serving.Store(true)
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, reg)

	go func() {
		<-ctx.Done()
		// Removing the socket is how kubelet learns that the plugin
		// left; Stop closes the listener, which removes it too.
		srv.Stop()
	}()
	log.Printf("serving plugin registration for %s (endpoint %s) on %s", name, endpoint, sock)
	if err := srv.Serve(lis); err != nil {
		_ = os.Remove(sock)
		log.Fatal(err)
	}
	_ = os.Remove(sock)
}
