// Command registrar announces a CSI node plugin to kubelet, the part of
// csi-node-driver-registrar that a host-process node agent needs: it serves
// kubelet's plugin registration API on a socket in kubelet's
// plugins_registry directory and answers GetInfo with the CSI socket.
// kubelet then calls NodeGetInfo on that socket and writes the CSINode.
package main

import (
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// registration answers kubelet's plugin watcher.
type registration struct {
	registerapi.UnimplementedRegistrationServer
	driver, endpoint string
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
		// upstream registrar, so that whoever runs it sees the failure.
		log.Printf("kubelet did not register %s: %s", r.driver, st.Error)
		os.Exit(1)
	}
	log.Printf("kubelet registered %s at %s", r.driver, r.endpoint)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	driver := flag.String("driver", "", "CSI driver name, as the node plugin's GetPluginInfo returns it (required)")
	endpoint := flag.String("csi-socket", "", "path of the node plugin's CSI socket as kubelet sees it (required)")
	dir := flag.String("registration-dir", "", "kubelet's plugins_registry directory (required)")
	flag.Parse()
	if *driver == "" || *endpoint == "" || *dir == "" {
		log.Fatal("--driver, --csi-socket and --registration-dir are required")
	}
	sock := filepath.Join(*dir, *driver+"-reg.sock")
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatal(err)
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		log.Fatal(err)
	}
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registration{driver: *driver, endpoint: *endpoint})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sig
		// Removing the socket is how kubelet learns the plugin left.
		srv.Stop()
	}()
	log.Printf("serving plugin registration for %s on %s", *driver, sock)
	if err := srv.Serve(lis); err != nil {
		log.Fatal(err)
	}
	_ = os.Remove(sock)
}
