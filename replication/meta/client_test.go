package meta

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
)

// TestApplyRetriesOutcomeUnknown: when the leader loses leadership while a
// command is being committed, the member answers ErrOutcomeUnknown. The
// client sends the same request again (same request id, so the store
// applies it at most once) and returns the second answer, instead of
// leaving its caller (an engine ejecting a replica) unsure whether the
// ejection happened.
func TestApplyRetriesOutcomeUnknown(t *testing.T) {
	var mu sync.Mutex
	var ids []string
	srv := grpc.NewServer(grpc.ForceServerCodec(jsonCodec{}), grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
		var req ApplyRequest
		if err := stream.RecvMsg(&req); err != nil {
			return err
		}
		c, err := Decode(req.Command)
		if err != nil {
			return err
		}
		r, ok := c.(*Request)
		if !ok {
			return fmt.Errorf("client sent %T, want a *Request", c)
		}
		mu.Lock()
		ids = append(ids, r.ID)
		n := len(ids)
		mu.Unlock()
		resp := ApplyResponse{Result: Result{Volume: &Volume{ID: "v1", Epoch: 7}}}
		if n == 1 {
			resp = ApplyResponse{Error: toWire(fmt.Errorf("leadership lost while committing: %w", ErrOutcomeUnknown))}
		}
		return stream.SendMsg(&resp)
	}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	c, err := NewClient([]string{lis.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := c.Apply(ctx, &AdvanceEpoch{VolumeID: "v1", ExpectEpoch: 6})
	if err != nil {
		t.Fatalf("Apply: %v (want the retry's success)", err)
	}
	if res.Volume == nil || res.Volume.Epoch != 7 {
		t.Fatalf("result %+v, want the retry's volume at epoch 7", res)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ids) != 2 || ids[0] != ids[1] || ids[0] == "" {
		t.Fatalf("request ids sent: %q, want the same id twice", ids)
	}
}
