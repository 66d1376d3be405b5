package meta

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/internal/pki"
)

// The meta API handlers. Errors of the store travel inside the response
// (WireError) so that the client sees the same sentinel; a gRPC error means
// the transport failed.

func (a *Agent) apply(ctx context.Context, req *ApplyRequest) (*ApplyResponse, error) {
	c, err := Decode(req.Command)
	if err != nil {
		return &ApplyResponse{Error: toWire(err)}, nil
	}
	// A node's command about a volume is judged where it is applied,
	// against the state it changes (asnode.go): it goes on with the node
	// the caller's certificate names. A forwarded one was wrapped by the
	// member that received it.
	if id, cerr := callerOf(ctx); cerr == nil && id.Role == pki.RoleNode && !req.Forwarded && needsNodeCheck(c) {
		c = &AsNode{Node: id.Name, Command: req.Command}
	}
	res, err := a.applyForwarded(ctx, c, req.Forwarded)
	if errors.Is(err, pki.ErrPermissionDenied) {
		a.logRefusal(ctx, "Apply", err)
	}
	return &ApplyResponse{Result: res, Error: toWire(err)}, nil
}

func (a *Agent) read(ctx context.Context, req *ReadRequest) (*ReadResponse, error) {
	if !req.Linearizable {
		return a.localRead(), nil
	}
	var out *ReadResponse
	err := a.linearizableRead(ctx, req.Forwarded,
		func() { out = a.localRead() },
		func(ctx context.Context, cl *Client) error {
			var resp ReadResponse
			if err := cl.invokeOnce(ctx, "Read", &ReadRequest{Linearizable: true, Forwarded: true}, &resp); err != nil {
				return err
			}
			out = &resp
			return fromWire(resp.Error)
		})
	if err != nil {
		return &ReadResponse{Error: toWire(err)}, nil
	}
	return out, nil
}

// linearizableRead runs local on this member's state when it leads and
// has passed a read barrier, else remote against the leader (once: a
// forwarded request is never forwarded again).
func (a *Agent) linearizableRead(ctx context.Context, forwarded bool, local func(), remote func(context.Context, *Client) error) error {
	return a.onLeader(ctx, forwarded, true,
		func() error {
			if err := a.store.ReadBarrier(ctx); err != nil {
				return err
			}
			local()
			return nil
		}, remote)
}

func (a *Agent) localRead() *ReadResponse {
	var st *State
	var idx uint64
	a.store.FSM().View(func(s *State) { st = s.Clone() })
	idx = a.store.AppliedIndex()
	return &ReadResponse{State: st, AppliedIndex: idx}
}

// getVolume answers with one live volume: its cost does not grow with the
// number of volumes in the store, nor with the deleted ones.
func (a *Agent) getVolume(ctx context.Context, req *GetVolumeRequest) (*GetVolumeResponse, error) {
	if !req.Linearizable {
		return a.localVolume(req.VolumeID), nil
	}
	var out *GetVolumeResponse
	err := a.linearizableRead(ctx, req.Forwarded,
		func() { out = a.localVolume(req.VolumeID) },
		func(ctx context.Context, cl *Client) error {
			fwd := *req
			fwd.Forwarded = true
			var resp GetVolumeResponse
			err := cl.invokeOnce(ctx, "GetVolume", &fwd, &resp)
			if status.Code(err) == codes.Unimplemented {
				// The leader runs a build without GetVolume (a rolling
				// upgrade): read the whole state from it instead.
				var r ReadResponse
				if err := cl.invokeOnce(ctx, "Read", &ReadRequest{Linearizable: true, Forwarded: true}, &r); err != nil {
					return err
				}
				if err := fromWire(r.Error); err != nil {
					return err
				}
				resp = *volumeAnswer(r.State, req.VolumeID, r.AppliedIndex)
			} else if err != nil {
				return err
			}
			out = &resp
			return fromWire(resp.Error)
		})
	if err != nil {
		return &GetVolumeResponse{Error: toWire(err)}, nil
	}
	return out, nil
}

func (a *Agent) localVolume(id string) *GetVolumeResponse {
	var out *GetVolumeResponse
	a.store.FSM().View(func(s *State) { out = volumeAnswer(s, id, 0) })
	out.AppliedIndex = a.store.AppliedIndex()
	return out
}

// volumeAnswer is the answer to a GetVolume of id on s: a copy of the
// volume, or ErrNotFound when it does not exist or is deleted.
func volumeAnswer(s *State, id string, index uint64) *GetVolumeResponse {
	resp := &GetVolumeResponse{AppliedIndex: index}
	if s == nil {
		resp.Error = toWire(errors.New("meta: read answered without a state"))
		return resp
	}
	v, err := s.liveVolume(id)
	if err != nil {
		resp.Error = toWire(err)
		return resp
	}
	resp.Volume = v.Clone()
	return resp
}

// watch streams the changes from req.FromIndex on (see watch.go), each
// event as soon as this member applied it, until the watcher leaves or the
// member stops. An event that says nothing to this watcher is not sent.
func (a *Agent) watch(req *WatchRequest, stream grpc.ServerStream) error {
	from := req.FromIndex
	for {
		changed := a.store.FSM().Changed()
		if ev := a.store.FSM().WatchEvent(from, req.Node, req.VolumeID); ev != nil {
			if !ev.empty() {
				if err := stream.SendMsg(ev); err != nil {
					return err
				}
			}
			from = ev.Index
		}
		select {
		case <-stream.Context().Done():
			return nil
		case <-a.ctx.Done():
			return nil
		case <-changed:
		}
	}
}

func (a *Agent) status(ctx context.Context, _ *StatusRequest) (*StatusResponse, error) {
	resp := &StatusResponse{Self: a.store.NodeID(), AppliedIndex: a.store.AppliedIndex()}
	resp.Leader, _ = a.store.Leader()
	members, err := a.store.Members()
	if err != nil {
		resp.Error = toWire(err)
		return resp, nil
	}
	a.store.FSM().View(func(s *State) {
		resp.ClusterID = s.ClusterID
		for _, m := range members {
			sm := StatusMember{Member: m}
			if n, ok := s.Nodes[m.ID]; ok {
				sm.APIAddr = n.APIAddr
			}
			resp.Members = append(resp.Members, sm)
		}
		for _, n := range s.SortedNodes() {
			c := *n
			resp.Nodes = append(resp.Nodes, &c)
		}
	})
	return resp, nil
}

func (a *Agent) join(ctx context.Context, req *JoinRequest) (*JoinResponse, error) {
	if req.NodeID == "" || req.RaftAddr == "" || req.APIAddr == "" {
		return &JoinResponse{Error: toWire(fmt.Errorf("join needs a node id, a raft address and an API address: %w", ErrInvalidArgument))}, nil
	}
	var clusterID string
	err := a.onLeader(ctx, req.Forwarded, true,
		func() error {
			a.store.FSM().View(func(s *State) { clusterID = s.ClusterID })
			if req.ClusterID != "" && clusterID != "" && req.ClusterID != clusterID {
				return fmt.Errorf("node %s has the data dir of cluster %s; this is cluster %s: %w", req.NodeID, req.ClusterID, clusterID, ErrClusterMismatch)
			}
			return a.store.AddVoter(req.NodeID, req.RaftAddr)
		},
		func(ctx context.Context, cl *Client) error {
			fwd := *req
			fwd.Forwarded = true
			var resp JoinResponse
			if err := cl.invokeOnce(ctx, "Join", &fwd, &resp); err != nil {
				return err
			}
			clusterID = resp.ClusterID
			return fromWire(resp.Error)
		})
	return &JoinResponse{ClusterID: clusterID, Error: toWire(err)}, nil
}

func (a *Agent) info(ctx context.Context, _ *InfoRequest) (*InfoResponse, error) {
	resp := &InfoResponse{
		NodeID: a.store.NodeID(), RaftAddr: a.store.RaftAddr(), APIAddr: a.APIAddr(),
		HasState: a.store.HasState(),
	}
	a.store.FSM().View(func(s *State) { resp.ClusterID = s.ClusterID })
	resp.Leader, _ = a.store.Leader()
	return resp, nil
}
