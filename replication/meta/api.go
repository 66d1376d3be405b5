package meta

import (
	"context"
	"encoding/json"

	"google.golang.org/grpc"
)

// The meta API is a small gRPC service whose messages are the JSON-encoded Go
// structs below (a JSON codec instead of protobuf keeps the schema in one
// place, next to the FSM commands it carries). Every member serves it;
// followers forward writes and linearizable reads to the leader.

const metaService = "cairn.meta.v1.Meta"

// maxMessageBytes bounds one meta API message; a Read answer carries the
// whole state, which outgrows gRPC's 4 MiB default with many volumes.
const maxMessageBytes = 256 << 20

// jsonCodec marshals gRPC messages as JSON.
type jsonCodec struct{}

func (jsonCodec) Marshal(v any) ([]byte, error)   { return json.Marshal(v) }
func (jsonCodec) Unmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
func (jsonCodec) Name() string                    { return "json" }

// ApplyRequest carries one encoded command (see Encode).
type ApplyRequest struct {
	Command []byte `json:"command"`
	// Forwarded is set by a follower passing the request to the leader; the
	// receiver then answers itself or says it is not the leader.
	Forwarded bool `json:"forwarded,omitempty"`
}

// ApplyResponse is the command's result or error.
type ApplyResponse struct {
	Result Result     `json:"result"`
	Error  *WireError `json:"error,omitempty"`
}

// ReadRequest asks for the whole state.
type ReadRequest struct {
	// Linearizable reads are answered by the leader after confirming its
	// leadership; others by the member asked, possibly stale.
	Linearizable bool `json:"linearizable,omitempty"`
	Forwarded    bool `json:"forwarded,omitempty"`
}

// ReadResponse holds a copy of the state.
type ReadResponse struct {
	State        *State     `json:"state,omitempty"`
	AppliedIndex uint64     `json:"applied_index"`
	Error        *WireError `json:"error,omitempty"`
}

// GetVolumeRequest asks for one live volume.
type GetVolumeRequest struct {
	VolumeID string `json:"volume_id"`
	// Linearizable reads are answered by the leader after confirming its
	// leadership; others by the member asked, possibly stale.
	Linearizable bool `json:"linearizable,omitempty"`
	Forwarded    bool `json:"forwarded,omitempty"`
}

// GetVolumeResponse holds a copy of the volume, or ErrNotFound (also for a
// deleted volume).
type GetVolumeResponse struct {
	Volume       *Volume    `json:"volume,omitempty"`
	AppliedIndex uint64     `json:"applied_index"`
	Error        *WireError `json:"error,omitempty"`
}

// StatusRequest asks a member for the cluster's status as it sees it.
type StatusRequest struct{}

// StatusMember is one raft member in a status answer.
type StatusMember struct {
	Member
	APIAddr string `json:"api_addr,omitempty"`
}

// StatusResponse describes the cluster.
type StatusResponse struct {
	ClusterID    string         `json:"cluster_id"`
	Self         string         `json:"self"`
	Leader       string         `json:"leader"`
	Members      []StatusMember `json:"members"`
	Nodes        []*Node        `json:"nodes"`
	AppliedIndex uint64         `json:"applied_index"`
	Error        *WireError     `json:"error,omitempty"`
}

// JoinRequest asks the leader to add a member.
type JoinRequest struct {
	NodeID    string `json:"node_id"`
	RaftAddr  string `json:"raft_addr"`
	APIAddr   string `json:"api_addr"`
	ClusterID string `json:"cluster_id,omitempty"` // the joiner's, if its data dir has one
	Forwarded bool   `json:"forwarded,omitempty"`
}

// JoinResponse names the cluster joined.
type JoinResponse struct {
	ClusterID string     `json:"cluster_id"`
	Error     *WireError `json:"error,omitempty"`
}

// InfoRequest asks a member about itself (used to form a cluster).
type InfoRequest struct{}

// InfoResponse describes one member.
type InfoResponse struct {
	NodeID    string `json:"node_id"`
	RaftAddr  string `json:"raft_addr"`
	APIAddr   string `json:"api_addr"`
	ClusterID string `json:"cluster_id,omitempty"`
	HasState  bool   `json:"has_state"`
	Leader    string `json:"leader,omitempty"`
}

// HeartbeatRequest tells the leader a node is alive, with its disk figures.
type HeartbeatRequest struct {
	NodeID        string `json:"node_id"`
	CapacityBytes uint64 `json:"capacity_bytes"`
	FreeBytes     uint64 `json:"free_bytes"`
	// CommandTypes is the highest command type the node's build reads (0
	// from a build older than the field): the leader writes a command type
	// from firstGatedType on only once every member reads it (gate.go).
	CommandTypes uint8 `json:"command_types,omitempty"`
	Forwarded    bool  `json:"forwarded,omitempty"`
}

// HeartbeatResponse acknowledges a heartbeat.
type HeartbeatResponse struct {
	Error *WireError `json:"error,omitempty"`
}

// metaServer is what the gRPC service calls; Agent implements it.
type metaServer interface {
	apply(context.Context, *ApplyRequest) (*ApplyResponse, error)
	read(context.Context, *ReadRequest) (*ReadResponse, error)
	getVolume(context.Context, *GetVolumeRequest) (*GetVolumeResponse, error)
	status(context.Context, *StatusRequest) (*StatusResponse, error)
	join(context.Context, *JoinRequest) (*JoinResponse, error)
	info(context.Context, *InfoRequest) (*InfoResponse, error)
	heartbeat(context.Context, *HeartbeatRequest) (*HeartbeatResponse, error)
	watch(*WatchRequest, grpc.ServerStream) error
}

// unary describes one method whose handler is h.
func unary[Req any, Resp any](name string, h func(metaServer, context.Context, *Req) (*Resp, error)) grpc.MethodDesc {
	return grpc.MethodDesc{
		MethodName: name,
		Handler: func(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
			req := new(Req)
			if err := dec(req); err != nil {
				return nil, err
			}
			call := func(ctx context.Context, r any) (any, error) { return h(srv.(metaServer), ctx, r.(*Req)) }
			if icpt == nil {
				return call(ctx, req)
			}
			return icpt(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + metaService + "/" + name}, call)
		},
	}
}

var metaServiceDesc = grpc.ServiceDesc{
	ServiceName: metaService,
	HandlerType: (*metaServer)(nil),
	Methods: []grpc.MethodDesc{
		unary("Apply", metaServer.apply),
		unary("Read", metaServer.read),
		unary("GetVolume", metaServer.getVolume),
		unary("Status", metaServer.status),
		unary("Join", metaServer.join),
		unary("Info", metaServer.info),
		unary("Heartbeat", metaServer.heartbeat),
	},
	Streams: []grpc.StreamDesc{{
		StreamName: "Watch",
		Handler: func(srv any, stream grpc.ServerStream) error {
			req := new(WatchRequest)
			if err := stream.RecvMsg(req); err != nil {
				return err
			}
			return srv.(metaServer).watch(req, stream)
		},
		ServerStreams: true,
	}},
	Metadata: "cairn/meta/v1",
}

// methodPath is the full gRPC method name.
func methodPath(name string) string { return "/" + metaService + "/" + name }
