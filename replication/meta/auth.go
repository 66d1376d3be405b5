package meta

import (
	"context"
	"errors"
	"path"

	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/internal/pki"
)

// The meta API's authorization, with mutual TLS (AgentConfig.TLS): each
// method is open to some roles, and a request that names a node must come
// from that node's own certificate. docs/security.md has the whole model.
var methodRoles = map[string][]string{
	// Commands: node agents (engines, the realizer) and managers.
	"Apply": {pki.RoleNode, pki.RoleCtl},
	// Store membership and liveness: node agents only, each for itself.
	"Join":      {pki.RoleNode},
	"Heartbeat": {pki.RoleNode},
	// Reads: everyone with a certificate, monitoring included.
	"Read":      {pki.RoleNode, pki.RoleCtl, pki.RoleMonitor},
	"GetVolume": {pki.RoleNode, pki.RoleCtl, pki.RoleMonitor},
	"Status":    {pki.RoleNode, pki.RoleCtl, pki.RoleMonitor},
	"Info":      {pki.RoleNode, pki.RoleCtl, pki.RoleMonitor},
	"Watch":     {pki.RoleNode, pki.RoleCtl, pki.RoleMonitor},
}

// callerOf returns the verified identity of the call's peer.
func callerOf(ctx context.Context) (pki.Identity, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return pki.Identity{}, pki.ErrUnauthenticated
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return pki.Identity{}, pki.ErrUnauthenticated
	}
	return pki.PeerIdentity(info.State)
}

// authorize checks that the caller may call method with req (nil for a
// stream, whose request is checked by its handler).
func (a *Agent) authorize(ctx context.Context, fullMethod string, req any) error {
	id, err := callerOf(ctx)
	if err != nil {
		return status.Error(codes.Unauthenticated, err.Error())
	}
	method := path.Base(fullMethod)
	roles, ok := methodRoles[method]
	if !ok {
		return status.Errorf(codes.PermissionDenied, "%s: no role may call it", method)
	}
	if err := pki.Allow(id, "call "+method, roles...); err != nil {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	// A node speaks for itself only. A request forwarded to the leader
	// carries another node's words: only a store member forwards, and
	// the first member checked the node that sent it. A member is
	// trusted as Raft trusts it (it could become the leader and write
	// anything); docs/security.md.
	var named string
	switch r := req.(type) {
	case *JoinRequest:
		if r.Forwarded {
			return a.checkForwarder(method, id)
		}
		named = r.NodeID
	case *HeartbeatRequest:
		if r.Forwarded {
			return a.checkForwarder(method, id)
		}
		named = r.NodeID
	case *ApplyRequest:
		if r.Forwarded {
			return a.checkForwarder(method, id)
		}
		if id.Role == pki.RoleNode {
			if c := innermost(r.Command); c != nil && managerOnly(c) {
				return status.Errorf(codes.PermissionDenied, "%s: %v: %s may not send %s, a manager's command", method, pki.ErrPermissionDenied, id, commandName(c))
			}
			for _, n := range nodesNamedBy(r.Command) {
				if n != id.Name {
					return status.Errorf(codes.PermissionDenied, "%s: %v: %s may not speak for node %q", method, pki.ErrPermissionDenied, id, n)
				}
			}
		}
	}
	if named != "" && named != id.Name {
		return status.Errorf(codes.PermissionDenied, "%s: %v: %s may not speak for node %q", method, pki.ErrPermissionDenied, id, named)
	}
	return nil
}

// checkForwarder admits a forwarded request from a store member only.
func (a *Agent) checkForwarder(method string, id pki.Identity) error {
	if id.Role == pki.RoleNode {
		members, err := a.store.Members()
		if err != nil {
			return status.Errorf(codes.Unavailable, "%s: the store's members: %v", method, err)
		}
		for _, m := range members {
			if m.ID == id.Name {
				return nil
			}
		}
	}
	return status.Errorf(codes.PermissionDenied, "%s: %v: %s is not a store member and may not forward requests", method, pki.ErrPermissionDenied, id)
}

// nodesNamedBy returns the nodes a command speaks for when a node sends
// it: its registration, liveness and state, an attachment to it, an epoch
// it advances as the volume's holder ("" for others, left out), and the
// node an AsNode says sent it. A node may send these about itself only:
// attaching a volume to another node, or moving the epoch under another
// node's engine, is a manager's job. Commands about a volume or a replica
// are checked by the store (asnode.go).
func nodesNamedBy(b []byte) []string {
	cmd, err := Decode(b)
	if err != nil {
		return nil // the store refuses it with the decoding error
	}
	var named string
	switch c := cmd.(type) {
	case *Request: // a client's envelope (an id for retries)
		return nodesNamedBy(c.Command)
	case *AsNode:
		return append([]string{c.Node}, nodesNamedBy(c.Command)...)
	case *RegisterNode:
		named = c.Node.ID
	case *NodeHeartbeat:
		named = c.NodeID
	case *SetNodeState:
		named = c.NodeID
	case *SetNodeReservable:
		named = c.NodeID
	case *SetNodeDisks:
		named = c.NodeID
	case *SetNodeDedup:
		named = c.NodeID
	case *SetNodeFeatures:
		named = c.NodeID
	case *AttachVolume:
		named = c.NodeID
	case *DetachVolume:
		named = c.NodeID
	case *AdvanceEpoch:
		named = c.NodeID // "" for an unattached volume: no node's
	}
	if named == "" {
		return nil
	}
	return []string{named}
}

// innermost decodes b and unwraps its Request and AsNode envelopes (nil if
// it does not decode: the store refuses it).
func innermost(b []byte) Command {
	for range 3 {
		c, err := Decode(b)
		if err != nil {
			return nil
		}
		switch e := c.(type) {
		case *Request:
			b = e.Command
		case *AsNode:
			b = e.Command
		default:
			return c
		}
	}
	return nil // nested deeper than the store accepts
}

func (a *Agent) authorizeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := a.authorize(ctx, info.FullMethod, req); err != nil {
		a.logRefusal(ctx, info.FullMethod, err)
		return nil, err
	}
	return handler(ctx, req)
}

func (a *Agent) authorizeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := a.authorize(ss.Context(), info.FullMethod, nil); err != nil {
		a.logRefusal(ss.Context(), info.FullMethod, err)
		return err
	}
	return handler(srv, ss)
}

// logRefusal says who was refused what: an operator must see a
// misconfigured client, and an attempt.
func (a *Agent) logRefusal(ctx context.Context, method string, err error) {
	caller := "unknown"
	if id, cerr := callerOf(ctx); cerr == nil {
		caller = id.String()
	}
	remote := ""
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		remote = p.Addr.String()
	}
	a.log.Warn("meta API call refused", zap.String("method", path.Base(method)), zap.String("identity", caller),
		zap.String("remote", remote), zap.Error(err))
}

// IsUnauthorized reports whether err is the meta API refusing the caller's
// certificate or role.
func IsUnauthorized(err error) bool {
	if errors.Is(err, pki.ErrUnauthenticated) || errors.Is(err, pki.ErrPermissionDenied) {
		return true
	}
	c := status.Code(err)
	return c == codes.Unauthenticated || c == codes.PermissionDenied
}
