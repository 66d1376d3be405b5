package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// startServer starts a server on 127.0.0.1 over dir and stops it at cleanup.
func startServer(t testing.TB, dir string) (*Server, string) {
	t.Helper()
	return startServerWithConfig(t, ServerConfig{DataDir: dir})
}

// startServerWithConfig is startServer for a server configured by cfg (a
// nil cfg.Logger logs to the test).
func startServerWithConfig(t testing.TB, cfg ServerConfig) (*Server, string) {
	t.Helper()
	if cfg.Logger == nil {
		if tt, ok := t.(*testing.T); ok {
			cfg.Logger = zaptest.NewLogger(tt, zaptest.Level(zap.InfoLevel))
		} else {
			cfg.Logger = zap.NewNop()
		}
	}
	s := NewServerWithConfig(cfg)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("server Close: %v", err)
		}
		if err := <-served; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return s, l.Addr().String()
}

// mustCreate creates replica id of testSize on s.
func mustCreate(t testing.TB, s *Server, id string) *Replica {
	t.Helper()
	r, err := s.Create(id, testSize)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func dial(t testing.TB, addr, id string, size uint64) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, id, size)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestClientServerRoundTrip(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	r := mustCreate(t, s, "vol1-r0")
	c := dial(t, addr, "vol1-r0", testSize)
	ctx := testCtx(t)
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Claim(ctx, 3); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	model := make([]byte, testSize)
	for i := 0; i < 100; i++ {
		n := 1 + rng.IntN(200<<10)
		off := rng.IntN(testSize - n + 1)
		p := make([]byte, n)
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if err := c.WriteAt(ctx, 3, p, uint64(off), i%10 == 0); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	got := make([]byte, testSize)
	if err := c.ReadAt(ctx, 3, got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("data read back differs from what was written")
	}
	if err := c.Flush(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if err := c.Trim(ctx, 3, testExtent, testExtent); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteZeroes(ctx, 3, 3*testExtent, 2*testExtent); err != nil {
		t.Fatal(err)
	}
	clear(model[testExtent : 2*testExtent])
	clear(model[3*testExtent : 5*testExtent])
	sums, err := c.Checksums(ctx, 3, 0, testSize/DefaultExtentSize+1)
	if err != nil {
		t.Fatal(err)
	}
	local, err := r.Checksums(3, 0, r.Extents())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(sums, local) {
		t.Fatalf("remote checksums %08x, local %08x", sums, local)
	}
	ext, err := c.ReadExtent(ctx, 3, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ext, model) {
		t.Fatal("ReadExtent differs from model")
	}
	dirty, err := c.DirtyExtents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(dirty, []uint64{0}) {
		t.Fatalf("DirtyExtents = %v, want [0]", dirty)
	}
	if err := c.MarkClean(ctx, 3, 1); err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := Info{ID: "vol1-r0", Generation: r.Generation(), Size: testSize, ExtentSize: DefaultExtentSize, Epoch: 3, CleanEpoch: 3, CleanGeneration: 1, AllocatedBytes: info.AllocatedBytes}
	if info != want {
		t.Fatalf("Info = %+v, want %+v", info, want)
	}
	if dirty, err := c.DirtyExtents(ctx); err != nil || len(dirty) != 0 {
		t.Fatalf("DirtyExtents after MarkClean = %v, %v", dirty, err)
	}
}

func TestClientErrorsMapToSentinels(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	mustCreate(t, s, "r1")
	ctx := testCtx(t)
	if _, err := Dial(ctx, addr, "missing", 0); !errors.Is(err, ErrNotFound) {
		t.Errorf("Dial unknown replica: got %v, want ErrNotFound", err)
	}
	if _, err := Dial(ctx, addr, "r1", 2*testSize); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("Dial with wrong size: got %v, want ErrInvalidArgument", err)
	}
	c := dial(t, addr, "r1", 0)
	if err := c.Claim(ctx, 5); err != nil {
		t.Fatal(err)
	}
	before := make([]byte, 4096)
	if err := c.ReadAt(ctx, 5, before, 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"write epoch 4", c.WriteAt(ctx, 4, []byte("old engine"), 0, true), ErrFenced},
		{"claim epoch 4", c.Claim(ctx, 4), ErrFenced},
		{"read epoch 6", c.ReadAt(ctx, 6, make([]byte, 1), 0), ErrNotClaimed},
		{"write past end", c.WriteAt(ctx, 5, []byte{1, 2}, testSize-1, false), ErrOutOfRange},
		{"mark clean epoch 4", c.MarkClean(ctx, 4, 1), ErrFenced},
		{"oversized write", c.WriteAt(ctx, 5, make([]byte, MaxPayload+1), 0, false), ErrInvalidArgument},
	} {
		var re *RemoteError
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, tc.err, tc.want)
		} else if tc.want != ErrInvalidArgument && !errors.As(tc.err, &re) {
			t.Errorf("%s: %T is not a *RemoteError", tc.name, tc.err)
		}
	}
	after := make([]byte, 4096)
	if err := c.ReadAt(ctx, 5, after, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Fatal("a fenced write changed the data")
	}
	if got := metricValue(t, s.metrics.fenced); got != 3 {
		t.Errorf("cairn_replica_fenced_total = %v, want 3", got)
	}
	if got := metricValue(t, s.metrics.ops.WithLabelValues("write")); got < 2 {
		t.Errorf(`cairn_replica_ops_total{op="write"} = %v, want >= 2`, got)
	}
	reg := prometheus.NewRegistry()
	for _, col := range s.Collectors() {
		if err := reg.Register(col); err != nil {
			t.Fatal(err)
		}
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, fam := range families {
		seen[fam.GetName()] = true
	}
	for _, name := range []string{"cairn_replica_ops_total", "cairn_replica_op_duration_seconds", "cairn_replica_fenced_total"} {
		if !seen[name] {
			t.Errorf("metric %s not gathered", name)
		}
	}
}

// TestFencingOverNetwork: an engine at the old epoch keeps writing through its
// client while a new engine claims through another connection. No old-epoch
// write issued after the claim returned succeeds, and the data read right
// after the claim never changes again.
func TestFencingOverNetwork(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	mustCreate(t, s, "r1")
	oldEngine, newEngine := dial(t, addr, "r1", testSize), dial(t, addr, "r1", testSize)
	ctx := testCtx(t)
	if err := oldEngine.Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}
	var claimDone atomic.Bool
	var late atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := bytes.Repeat([]byte{byte(w + 1)}, 4096)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				after := claimDone.Load()
				err := oldEngine.WriteAt(ctx, 1, p, uint64((w*16+i%16)*4096), false)
				if err == nil && after {
					late.Add(1)
				}
				if err != nil && !errors.Is(err, ErrFenced) {
					t.Errorf("old engine write: %v", err)
					return
				}
			}
		}()
	}
	time.Sleep(20 * time.Millisecond)
	if err := newEngine.Claim(ctx, 2); err != nil {
		t.Fatal(err)
	}
	claimDone.Store(true)
	snapshot := make([]byte, testSize)
	if err := newEngine.ReadAt(ctx, 2, snapshot, 0); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	close(stop)
	wg.Wait()
	if n := late.Load(); n != 0 {
		t.Fatalf("%d old-epoch writes succeeded after the claim returned", n)
	}
	now := make([]byte, testSize)
	if err := newEngine.ReadAt(ctx, 2, now, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(now, snapshot) {
		t.Fatal("data changed after the new epoch was claimed")
	}
	if got := metricValue(t, s.metrics.fenced); got == 0 {
		t.Error("no fenced request counted")
	}
}

// TestPipelining runs 64 goroutines through one client, each writing and
// reading back its own region, with random sizes.
func TestPipelining(t *testing.T) {
	const workers, region = 64, 64 << 10
	s, addr := startServer(t, t.TempDir())
	if _, err := s.Create("r1", workers*region); err != nil {
		t.Fatal(err)
	}
	c := dial(t, addr, "r1", workers*region)
	ctx := testCtx(t)
	if err := c.Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 99))
			base := uint64(w * region)
			model := make([]byte, region)
			for i := 0; i < 40; i++ {
				n := 1 + rng.IntN(16<<10)
				off := rng.IntN(region - n + 1)
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if err := c.WriteAt(ctx, 1, p, base+uint64(off), false); err != nil {
					t.Error(err)
					return
				}
				copy(model[off:], p)
				got := make([]byte, region)
				if err := c.ReadAt(ctx, 1, got, base); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got, model) {
					t.Errorf("worker %d op %d: region differs from model", w, i)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// fakeServer accepts a client over net.Pipe: it answers OPEN and then hands
// every later request header to requests, leaving the reply to the test.
func fakeServer(t *testing.T) (*Client, <-chan RequestHeader, func(ReplyHeader, []byte)) {
	t.Helper()
	srv, cli := net.Pipe()
	requests := make(chan RequestHeader, 16)
	var wmu sync.Mutex
	reply := func(h ReplyHeader, payload []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		h.PayloadLen = uint32(len(payload))
		_, _ = srv.Write(append(AppendReplyHeader(nil, h), payload...))
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(requests)
		for {
			hdr := make([]byte, RequestHeaderLen)
			if _, err := io.ReadFull(srv, hdr); err != nil {
				return
			}
			h, err := DecodeRequestHeader(hdr)
			if err != nil {
				return
			}
			if _, err := io.CopyN(io.Discard, srv, int64(h.PayloadLen)); err != nil {
				return
			}
			if h.Op == OpOpen {
				reply(ReplyHeader{Handle: h.Handle}, AppendInfo(nil, Info{ID: "r1", Size: testSize, ExtentSize: testExtent}))
				continue
			}
			requests <- h
		}
	}()
	c := newClient(cli, "r1")
	if err := c.open(context.Background(), testSize); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		srv.Close()
		<-done
	})
	return c, requests, reply
}

func TestClientContextCancellation(t *testing.T) {
	c, requests, reply := fakeServer(t)

	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.Ping(canceled); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ping with a cancelled ctx: got %v", err)
	}

	// The server does not answer in time: the call returns the ctx's error.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	p := make([]byte, 8)
	if err := c.ReadAt(ctx, 1, p, 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ReadAt: got %v, want DeadlineExceeded", err)
	}
	stale := <-requests
	// The late reply is discarded, never written into p, and the
	// connection stays usable.
	reply(ReplyHeader{Handle: stale.Handle}, bytes.Repeat([]byte{0xEE}, 8))
	errc := make(chan error, 1)
	go func() { errc <- c.Flush(context.Background(), 1) }()
	h := <-requests
	if h.Op != OpFlush {
		t.Fatalf("got %v, want flush", h.Op)
	}
	reply(ReplyHeader{Handle: h.Handle}, nil)
	if err := <-errc; err != nil {
		t.Fatalf("Flush after a cancelled call: %v", err)
	}
	if !bytes.Equal(p, make([]byte, 8)) {
		t.Fatal("a late reply was written into the buffer of a call that had returned")
	}
	// Replies may come in any order.
	errs := make(chan error, 2)
	go func() { errs <- c.Claim(context.Background(), 2) }()
	h1 := <-requests
	go func() { errs <- c.WriteAt(context.Background(), 2, []byte("x"), 0, false) }()
	h2 := <-requests
	reply(ReplyHeader{Handle: h2.Handle, Status: StatusFenced}, []byte("fenced"))
	reply(ReplyHeader{Handle: h1.Handle}, nil)
	var gotFenced, gotOK int
	for i := 0; i < 2; i++ {
		switch err := <-errs; {
		case err == nil:
			gotOK++
		case errors.Is(err, ErrFenced):
			gotFenced++
		default:
			t.Fatalf("unexpected %v", err)
		}
	}
	if gotOK != 1 || gotFenced != 1 {
		t.Fatalf("%d ok and %d fenced replies, want 1 and 1", gotOK, gotFenced)
	}
}

// gatedConn is a connection whose next Write, once armed, waits until
// it is let go.
type gatedConn struct {
	net.Conn
	armed   atomic.Bool
	blocked chan struct{} // receives when an armed Write starts waiting
	letGo   chan struct{}
}

func (g *gatedConn) Write(p []byte) (int, error) {
	if g.armed.CompareAndSwap(true, false) {
		g.blocked <- struct{}{}
		<-g.letGo
	}
	return g.Conn.Write(p)
}

// TestClientSendsFrameBeforeCancelledOne: a request cancelled while queued
// behind another must not keep the other's last bytes in the client's
// buffer. The writer did not flush after a frame when another was queued,
// and then skipped the cancelled one without flushing: the first request
// sat half-sent until its own timeout (seen as a replica ejected for a write
// that timed out while its server waited for the rest of the frame).
func TestClientSendsFrameBeforeCancelledOne(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	mustCreate(t, s, "r1")
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	g := &gatedConn{Conn: nc, blocked: make(chan struct{}), letGo: make(chan struct{})}
	c := newClient(g, "r1")
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.open(ctx, testSize); err != nil {
		t.Fatal(err)
	}
	if err := c.Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}
	// A write a little over the writer's 64 KiB buffer: the buffer's worth
	// goes to the connection (and waits at the gate), the rest is buffered.
	p := bytes.Repeat([]byte{7}, 64<<10+4096)
	g.armed.Store(true)
	wrote := make(chan error, 1)
	go func() { wrote <- c.WriteAt(ctx, 1, p, 0, false) }()
	<-g.blocked
	// A second request queues behind it and is cancelled before it is sent.
	fctx, fcancel := context.WithCancel(ctx)
	flushed := make(chan error, 1)
	go func() { flushed <- c.Flush(fctx, 1) }()
	for len(c.queue) == 0 {
		time.Sleep(time.Millisecond)
	}
	fcancel()
	if err := <-flushed; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled Flush: %v", err)
	}
	close(g.letGo)
	select {
	case err := <-wrote:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the write never completed: its last bytes stayed in the client's buffer")
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(ctx, 1, got, 0); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, p))
	}
}

func TestClientCloseFailsPendingCalls(t *testing.T) {
	c, requests, _ := fakeServer(t)
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		go func() { errs <- c.Flush(context.Background(), 1) }()
	}
	for i := 0; i < 8; i++ {
		<-requests
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 8; i++ {
		if err := <-errs; !errors.Is(err, ErrClosed) {
			t.Fatalf("pending call: got %v, want ErrClosed", err)
		}
	}
	if err := c.Ping(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("call after Close: got %v, want ErrClosed", err)
	}
}

func TestClientServerCloseLeaksNothing(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	dir := t.TempDir()
	s := NewServer(zap.NewNop(), dir)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	mustCreate(t, s, "r1")
	ctx := testCtx(t)
	var clients []*Client
	for i := 0; i < 4; i++ {
		c, err := Dial(ctx, l.Addr().String(), "r1", testSize)
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
	}
	if err := clients[0].Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}
	// Leave calls in flight while both sides close.
	var wg sync.WaitGroup
	for _, c := range clients {
		for j := 0; j < 16; j++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := 0; k < 50; k++ {
					if err := c.WriteAt(ctx, 1, make([]byte, 4096), uint64(j*4096), false); err != nil {
						return
					}
				}
			}()
		}
	}
	time.Sleep(10 * time.Millisecond)
	if err := clients[0].Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-served; !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve: %v", err)
	}
	wg.Wait()
	for _, c := range clients[1:] {
		if err := c.Ping(ctx); !errors.Is(err, ErrClosed) {
			t.Errorf("Ping after the server closed: got %v, want ErrClosed", err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestServerReplicaLifecycle(t *testing.T) {
	dir := t.TempDir()
	s, addr := startServer(t, dir)
	if _, err := s.Create("a", testSize); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create("a", testSize); err != nil {
		t.Errorf("Create again with the same size: %v", err)
	}
	if _, err := s.Create("a", 2*testSize); !errors.Is(err, ErrExists) {
		t.Errorf("Create with another size: got %v, want ErrExists", err)
	}
	if _, err := s.Create("b", 2*testSize); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create("../c", testSize); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("Create with a path id: got %v", err)
	}
	ctx := testCtx(t)
	c := dial(t, addr, "b", 0)
	if err := c.Claim(ctx, 7); err != nil {
		t.Fatal(err)
	}
	infos, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 || infos[0].ID != "a" || infos[1].ID != "b" || infos[1].Epoch != 7 {
		t.Fatalf("List = %+v", infos)
	}
	if err := s.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("a"); err != nil {
		t.Errorf("Delete again: %v", err)
	}
	if _, err := s.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Delete: got %v, want ErrNotFound", err)
	}

	// A new server over the same directory finds b, with its epoch.
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create("x", testSize); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Create after Close: got %v", err)
	}
	s2, addr2 := startServer(t, dir)
	infos, err = s2.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || infos[0].ID != "b" || infos[0].Epoch != 7 || infos[0].Size != 2*testSize {
		t.Fatalf("List after restart = %+v", infos)
	}
	c2 := dial(t, addr2, "b", 2*testSize)
	if err := c2.WriteAt(ctx, 6, []byte{1}, 0, false); !errors.Is(err, ErrFenced) {
		t.Fatalf("old epoch after restart: got %v, want ErrFenced", err)
	}
	// A replica deleted under a connection fails its requests.
	if err := s2.Delete("b"); err != nil {
		t.Fatal(err)
	}
	if err := c2.Flush(ctx, 7); !errors.Is(err, ErrIO) {
		t.Fatalf("request to a deleted replica: got %v, want ErrIO", err)
	}
}

// rawConn speaks the protocol by hand, to send what the client never would.
type rawConn struct {
	t  *testing.T
	nc net.Conn
}

func rawDial(t *testing.T, addr string) *rawConn {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	if err := nc.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	return &rawConn{t: t, nc: nc}
}

func (c *rawConn) send(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

func (c *rawConn) reply() (ReplyHeader, string) {
	c.t.Helper()
	hdr := make([]byte, ReplyHeaderLen)
	if _, err := io.ReadFull(c.nc, hdr); err != nil {
		c.t.Fatal(err)
	}
	h, err := DecodeReplyHeader(hdr)
	if err != nil {
		c.t.Fatal(err)
	}
	payload := make([]byte, h.PayloadLen)
	if _, err := io.ReadFull(c.nc, payload); err != nil {
		c.t.Fatal(err)
	}
	return h, string(payload)
}

func (c *rawConn) expectEOF() {
	c.t.Helper()
	if n, err := c.nc.Read(make([]byte, 1)); err != io.EOF {
		c.t.Fatalf("read after a fatal frame: %d, %v; want EOF", n, err)
	}
}

func TestServerProtocolErrors(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	mustCreate(t, s, "r1")
	frame := func(h RequestHeader, payload []byte) []byte {
		return AppendRequest(nil, Request{RequestHeader: h, Payload: payload})
	}
	t.Run("recoverable", func(t *testing.T) {
		c := rawDial(t, addr)
		expect := func(handle uint64, status Status) {
			t.Helper()
			h, msg := c.reply()
			if h.Handle != handle || h.Status != status {
				t.Fatalf("reply %+v %q; want handle %d status %v", h, msg, handle, status)
			}
		}
		c.send(frame(RequestHeader{Op: OpPing, Handle: 1}, nil))
		expect(1, StatusOK)
		c.send(frame(RequestHeader{Op: OpRead, Handle: 2, Length: 1}, nil))
		expect(2, StatusBadRequest) // before OPEN
		c.send(frame(RequestHeader{Op: 99, Handle: 3}, []byte("skipped payload")))
		expect(3, StatusBadRequest)
		c.send(frame(RequestHeader{Op: OpOpen, Handle: 4}, []byte("nope")))
		expect(4, StatusNotFound)
		c.send(frame(RequestHeader{Op: OpOpen, Handle: 5, Offset: testSize}, []byte("r1")))
		expect(5, StatusOK)
		c.send(frame(RequestHeader{Op: OpOpen, Handle: 6}, []byte("r1")))
		expect(6, StatusBadRequest) // second OPEN
		c.send(frame(RequestHeader{Op: OpWrite, Handle: 7, Length: 3}, []byte("abcd")))
		expect(7, StatusBadRequest) // length and payload disagree
		c.send(frame(RequestHeader{Op: OpWrite, Handle: 8, Length: 4}, []byte("abcd")))
		expect(8, StatusOK)
	})
	t.Run("bad magic", func(t *testing.T) {
		c := rawDial(t, addr)
		c.send([]byte("GET /metrics HTTP/1.1\r\nHost: replica.example\r\n\r\n"))
		h, msg := c.reply()
		if h.Status != StatusBadRequest || h.Handle != 0 {
			t.Fatalf("reply %+v %q", h, msg)
		}
		c.expectEOF()
	})
	t.Run("payload too large", func(t *testing.T) {
		c := rawDial(t, addr)
		h := AppendRequestHeader(nil, RequestHeader{Op: OpWrite, Handle: 11, Length: MaxPayload + 1, PayloadLen: MaxPayload + 1})
		c.send(h)
		rh, msg := c.reply()
		if rh.Status != StatusBadRequest || rh.Handle != 11 {
			t.Fatalf("reply %+v %q", rh, msg)
		}
		c.expectEOF()
	})
	if got := metricValue(t, s.metrics.rejected); got < 6 {
		t.Errorf("cairn_replica_rejected_requests_total = %v, want >= 6", got)
	}
}

func benchServer(b *testing.B, sums bool) (*Client, uint64) {
	const size, span = 1 << 30, 256 << 20
	dir := b.TempDir()
	s, addr := startServer(b, dir)
	if _, err := s.CreateWith("bench", size, CreateOptions{Checksums: sums}); err != nil {
		b.Fatal(err)
	}
	c := dial(b, addr, "bench", size)
	ctx := context.Background()
	if err := c.Claim(ctx, 1); err != nil {
		b.Fatal(err)
	}
	// Dirty every extent of the span first: the benchmark measures steady
	// state, not the one meta write per newly dirtied extent.
	for off := uint64(0); off < span; off += DefaultExtentSize {
		if err := c.WriteAt(ctx, 1, make([]byte, 4096), off, false); err != nil {
			b.Fatal(err)
		}
	}
	return c, span
}

// BenchmarkWrite4K: 4 KiB writes at random aligned offsets, client → server
// over loopback, many goroutines through one pipelined client; with and
// without block checksums.
func BenchmarkWrite4K(b *testing.B) {
	for _, sums := range []bool{false, true} {
		b.Run(fmt.Sprintf("sums=%v", sums), func(b *testing.B) { benchWrite4K(b, sums) })
	}
}

func benchWrite4K(b *testing.B, sums bool) {
	c, span := benchServer(b, sums)
	b.SetBytes(4096)
	b.SetParallelism(32)
	var seed atomic.Uint64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 1))
		p := make([]byte, 4096)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		ctx := context.Background()
		for pb.Next() {
			off := rng.Uint64N(span/4096) * 4096
			if err := c.WriteAt(ctx, 1, p, off, false); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkRead4K is BenchmarkWrite4K for reads.
func BenchmarkRead4K(b *testing.B) {
	for _, sums := range []bool{false, true} {
		b.Run(fmt.Sprintf("sums=%v", sums), func(b *testing.B) { benchRead4K(b, sums) })
	}
}

func benchRead4K(b *testing.B, sums bool) {
	c, span := benchServer(b, sums)
	b.SetBytes(4096)
	b.SetParallelism(32)
	var seed atomic.Uint64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(seed.Add(1), 2))
		p := make([]byte, 4096)
		ctx := context.Background()
		for pb.Next() {
			off := rng.Uint64N(span/4096) * 4096
			if err := c.ReadAt(ctx, 1, p, off); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkWrite4KSerial: one writer, so ns/op is the round-trip latency.
func BenchmarkWrite4KSerial(b *testing.B) {
	c, span := benchServer(b, false)
	b.SetBytes(4096)
	p := make([]byte, 4096)
	ctx := context.Background()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := c.WriteAt(ctx, 1, p, uint64(i*4096)%span, false); err != nil {
			b.Fatal(err)
		}
	}
}

// metricValue reads a counter or gauge.
func metricValue(t testing.TB, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	switch {
	case d.Counter != nil:
		return d.Counter.GetValue()
	case d.Gauge != nil:
		return d.Gauge.GetValue()
	}
	t.Fatalf("metric %v is neither a counter nor a gauge", m.Desc())
	return 0
}

// TestServerTypedDirs: a replica of a disk type is made in the server's
// directory of that type, found there by List and by a new server, restored
// from on the same disk, and deleted from it; a type the server has no
// directory of is refused.
func TestServerTypedDirs(t *testing.T) {
	def, hdd := t.TempDir(), t.TempDir()
	cfg := ServerConfig{DataDir: def, TypedDirs: map[string]string{"hdd": hdd}}
	s := NewServerWithConfig(cfg)
	r, err := s.CreateWith("t-r1", testSize, CreateOptions{DiskType: "hdd"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(hdd, "t-r1")); err != nil {
		t.Fatalf("not in the hdd directory: %v", err)
	}
	if !s.Has("t-r1") || s.Has("t-r9") {
		t.Fatalf("Has(t-r1) = %v, Has(t-r9) = %v; want true, false", s.Has("t-r1"), s.Has("t-r9"))
	}
	if _, err := s.CreateWith("t-r2", testSize, CreateOptions{DiskType: "nvme"}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("a type without a directory: %v, want ErrInvalidArgument", err)
	}
	claimed(t, r, 1)
	if err := r.WriteAt(1, randBytes(4096, 1), 0, false); err != nil {
		t.Fatal(err)
	}
	if err := r.Snapshot(1, "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateFromSnapshot("t-r3", "t-r1", "s1", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(hdd, "t-r3")); err != nil {
		t.Fatalf("the restore is not on its source's disk: %v", err)
	}
	if _, err := s.CreateWith("d-r1", testSize, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s = NewServerWithConfig(cfg)
	defer s.Close()
	infos, err := s.List()
	if err != nil || len(infos) != 3 {
		t.Fatalf("a new server lists %+v, %v; want the three replicas", infos, err)
	}
	if err := s.Delete("t-r1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(hdd, "t-r1")); !os.IsNotExist(err) {
		t.Fatalf("t-r1 is still in the hdd directory: %v", err)
	}
}
