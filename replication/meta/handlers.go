package meta

import (
	"context"
	"fmt"
)

// The meta API handlers. Errors of the store travel inside the response
// (WireError) so that the client sees the same sentinel; a gRPC error means
// the transport failed.

func (a *Agent) apply(ctx context.Context, req *ApplyRequest) (*ApplyResponse, error) {
	c, err := Decode(req.Command)
	if err != nil {
		return &ApplyResponse{Error: toWire(err)}, nil
	}
	res, err := a.applyForwarded(ctx, c, req.Forwarded)
	return &ApplyResponse{Result: res, Error: toWire(err)}, nil
}

func (a *Agent) read(ctx context.Context, req *ReadRequest) (*ReadResponse, error) {
	if !req.Linearizable {
		return a.localRead(), nil
	}
	var out *ReadResponse
	err := a.onLeader(ctx, req.Forwarded, true,
		func() error {
			if err := a.store.ReadBarrier(ctx); err != nil {
				return err
			}
			out = a.localRead()
			return nil
		},
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

func (a *Agent) localRead() *ReadResponse {
	var st *State
	var idx uint64
	a.store.FSM().View(func(s *State) { st = s.Clone() })
	idx = a.store.AppliedIndex()
	return &ReadResponse{State: st, AppliedIndex: idx}
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
