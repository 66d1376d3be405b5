// Package csi is Cairn's CSI driver: the Identity, Controller and Node
// services (CSI spec v1.13) on a unix socket. The controller keeps volumes
// and attachments in the volume store; the node service starts the engine
// of a published volume, exposes it as a block device (FUSE file + loop
// device), formats and mounts it.
package csi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// DriverName is the CSI driver's name.
const DriverName = "csi.cairn.io"

// TopologyZoneKey is the topology key of a node's zone.
const TopologyZoneKey = "topology.csi.cairn.io/zone"

// DefaultZone is the topology zone reported for nodes started without
// --zone (the store keeps their zone empty).
const DefaultZone = "default"

// zoneLabel and storeZone convert between the store's zone and CSI's.
func zoneLabel(z string) string {
	if z == "" {
		return DefaultZone
	}
	return z
}

func storeZone(label string) string {
	if label == DefaultZone {
		return ""
	}
	return label
}

// Server serves the CSI services that were given to it on one socket.
type Server struct {
	log *zap.Logger
	srv *grpc.Server
	lis net.Listener
}

// Listen opens a CSI endpoint ("unix:///path/csi.sock" or a bare path),
// removing a stale socket file first.
func Listen(endpoint string) (net.Listener, error) {
	path := endpoint
	if strings.HasPrefix(endpoint, "unix://") {
		u, err := url.Parse(endpoint)
		if err != nil {
			return nil, fmt.Errorf("endpoint %q: %w", endpoint, err)
		}
		path = u.Path
		if u.Host != "" {
			path = u.Host + u.Path
		}
	} else if strings.Contains(endpoint, "://") {
		return nil, fmt.Errorf("endpoint %q: only unix:// sockets are supported", endpoint)
	}
	if path == "" {
		return nil, fmt.Errorf("endpoint %q has no path", endpoint)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return net.Listen("unix", path)
}

// Serve starts serving the given services on lis in the background.
func Serve(log *zap.Logger, lis net.Listener, identity csipb.IdentityServer, controller csipb.ControllerServer, node csipb.NodeServer) *Server {
	log = log.Named("csi")
	s := &Server{log: log, lis: lis, srv: grpc.NewServer(grpc.UnaryInterceptor(logCalls(log)))}
	if identity != nil {
		csipb.RegisterIdentityServer(s.srv, identity)
	}
	if controller != nil {
		csipb.RegisterControllerServer(s.srv, controller)
	}
	if node != nil {
		csipb.RegisterNodeServer(s.srv, node)
	}
	go func() { _ = s.srv.Serve(lis) }()
	log.Info("CSI endpoint serving", zap.String("address", lis.Addr().String()))
	return s
}

// Stop stops the server, letting running calls finish for a while.
func (s *Server) Stop() {
	done := make(chan struct{})
	go func() { s.srv.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		s.srv.Stop()
	}
}

// logCalls logs every CSI call once, with its error, secrets stripped.
func logCalls(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := h(ctx, req)
		// Handlers map their errors with toStatus; doing it here too means
		// an error that escapes unmapped still gets the mapping's code, not
		// gRPC's Unknown. A status passes through unchanged.
		err = toStatus(err)
		fields := []zap.Field{zap.String("method", info.FullMethod), zap.Duration("took", time.Since(start))}
		if m, ok := req.(proto.Message); ok {
			fields = append(fields, zap.String("request", sanitized(m)))
		}
		switch {
		case err != nil:
			log.Info("CSI call failed", append(fields, zap.Error(err))...)
		case strings.HasSuffix(info.FullMethod, "/Probe"), strings.HasSuffix(info.FullMethod, "Capabilities"),
			strings.HasSuffix(info.FullMethod, "/GetPluginInfo"), strings.HasSuffix(info.FullMethod, "/NodeGetVolumeStats"):
			log.Debug("CSI call", fields...)
		default:
			log.Info("CSI call", fields...)
		}
		return resp, err
	}
}

// sanitized prints a request with every field marked csi_secret replaced.
func sanitized(m proto.Message) string {
	c := proto.Clone(m)
	redact(c.ProtoReflect())
	return fmt.Sprint(c)
}

func redact(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if opts := fd.Options(); opts != nil && proto.HasExtension(opts, csipb.E_CsiSecret) {
			if fd.IsMap() {
				mp := m.Mutable(fd).Map()
				mp.Range(func(k protoreflect.MapKey, _ protoreflect.Value) bool {
					mp.Set(k, protoreflect.ValueOfString("***stripped***"))
					return true
				})
			} else {
				m.Clear(fd)
			}
			return true
		}
		if fd.Kind() == protoreflect.MessageKind && !fd.IsList() && !fd.IsMap() {
			redact(m.Mutable(fd).Message())
		}
		return true
	})
}

// Identity is the CSI Identity service, served by controller and nodes.
type Identity struct {
	csipb.UnimplementedIdentityServer
	Version string
	Meta    VolumeStore
	// Local makes Probe ask only whether this node's own store member
	// answers, not whether the store has a leader: a node plugin's liveness
	// must not restart every node agent when the cluster loses quorum.
	Local bool
	// Log gets why a probe was not ready (nil: nowhere).
	Log *zap.Logger
}

// GetPluginInfo names the driver and its version.
func (i *Identity) GetPluginInfo(context.Context, *csipb.GetPluginInfoRequest) (*csipb.GetPluginInfoResponse, error) {
	v := i.Version
	if v == "" {
		v = "dev"
	}
	return &csipb.GetPluginInfoResponse{Name: DriverName, VendorVersion: v}, nil
}

// GetPluginCapabilities lists what the plugin offers.
func (i *Identity) GetPluginCapabilities(context.Context, *csipb.GetPluginCapabilitiesRequest) (*csipb.GetPluginCapabilitiesResponse, error) {
	svc := func(t csipb.PluginCapability_Service_Type) *csipb.PluginCapability {
		return &csipb.PluginCapability{Type: &csipb.PluginCapability_Service_{Service: &csipb.PluginCapability_Service{Type: t}}}
	}
	return &csipb.GetPluginCapabilitiesResponse{Capabilities: []*csipb.PluginCapability{
		svc(csipb.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csipb.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
		// Volumes grow while published and in use (ControllerExpandVolume,
		// NodeExpandVolume; docs/expansion.md).
		{Type: &csipb.PluginCapability_VolumeExpansion_{VolumeExpansion: &csipb.PluginCapability_VolumeExpansion{
			Type: csipb.PluginCapability_VolumeExpansion_ONLINE}}},
	}}, nil
}

// Probe is ready only when the volume store answers.
func (i *Identity) Probe(ctx context.Context, _ *csipb.ProbeRequest) (*csipb.ProbeResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	var err error
	if i.Local {
		_, err = i.Meta.Info(ctx)
	} else {
		st, serr := i.Meta.Status(ctx)
		if err = serr; err == nil && st.Leader == "" {
			err = errors.New("the volume store has no leader")
		}
	}
	if err != nil && i.Log != nil {
		// The liveness probe only sees "not ready": say here why.
		i.Log.Warn("probe: not ready", zap.Error(err))
	}
	return &csipb.ProbeResponse{Ready: wrapperspb.Bool(err == nil)}, nil
}

func wrapInt64(v uint64) *wrapperspb.Int64Value { return wrapperspb.Int64(int64(v)) }
