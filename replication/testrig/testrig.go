// Package testrig runs what the tests of the replication packages and of
// their users need: a volume store of one member and replica servers, all
// on real TCP on 127.0.0.1, and nodes whose replica server is silent: it
// accepts connections and never answers, so an engine that dials it waits
// until its I/O timeout, as it would for a node cut off by a partition.
package testrig

import (
	"context"
	"net"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Rig is a volume store and the replica servers of its nodes.
type Rig struct {
	t   *testing.T
	Log *zap.Logger
	// Store is the store's only member; Store.Store().FSM() is its state.
	Store *meta.Agent
	// Meta reaches the store.
	Meta *meta.Client
	// Servers are the replica servers by node id (none for silent nodes).
	Servers map[string]*replica.Server
}

// StartStore starts a store of one member, "meta-1", that holds no
// replicas, and a client of it; both stop when the test ends.
func StartStore(t testing.TB, log *zap.Logger) (*meta.Agent, *meta.Client) {
	t.Helper()
	store, err := meta.StartAgent(meta.AgentConfig{
		Store:   meta.StoreConfig{NodeID: "meta-1", DataDir: filepath.Join(t.TempDir(), "meta"), RaftBind: "127.0.0.1:0", TimeoutMultiplier: 0.2, Logger: log},
		APIBind: "127.0.0.1:0", BootstrapExpect: 1,
		HeartbeatInterval: 100 * time.Millisecond, NodeDownAfter: time.Hour,
		DiskUsage: func() (uint64, uint64, error) { return 0, 0, nil }, // no capacity: no replica is placed on it
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := meta.NewClient([]string{store.APIAddr()})
	if err != nil {
		store.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		store.Close()
	})
	return store, c
}

// New starts a store (StartStore). The nodes that hold replicas are added
// with AddNode and AddSilentNode.
func New(t *testing.T) *Rig {
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	store, c := StartStore(t, log)
	r := &Rig{t: t, Log: log, Store: store, Meta: c, Servers: map[string]*replica.Server{}}
	t.Cleanup(func() { // before the store's (cleanups run last first)
		for _, s := range r.Servers {
			s.Close()
		}
	})
	return r
}

// Ctx is a context for one step of a test, ended when the test ends.
func (r *Rig) Ctx() context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	r.t.Cleanup(cancel)
	return ctx
}

// AddNode starts a replica server for node id and registers the node.
func (r *Rig) AddNode(id string) *replica.Server {
	r.t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		r.t.Fatal(err)
	}
	srv := replica.NewServer(r.Log, filepath.Join(r.t.TempDir(), id))
	go func() { _ = srv.Serve(lis) }()
	r.Servers[id] = srv
	r.register(id, lis.Addr().String())
	return srv
}

// AddSilentNode registers node id with a replica server address that
// accepts connections and never answers (SilentListener).
func (r *Rig) AddSilentNode(id string) <-chan struct{} {
	r.t.Helper()
	addr, accepted := SilentListener(r.t, "127.0.0.1:0")
	r.register(id, addr)
	return accepted
}

// SilentListener listens on addr, accepts connections and never answers
// them, until the test ends. It returns the address it listens on, and a
// channel that receives once for each accepted connection (it holds 16;
// more are not reported).
func SilentListener(t *testing.T, addr string) (string, <-chan struct{}) {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan struct{}, 16)
	var conns []net.Conn // used by the accepting goroutine, then by the cleanup
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c) // held open, read from by nobody
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		<-done
		for _, c := range conns {
			c.Close()
		}
	})
	return lis.Addr().String(), accepted
}

func (r *Rig) register(id, dataAddr string) {
	r.t.Helper()
	if _, err := r.Meta.Apply(r.Ctx(), &meta.RegisterNode{Node: meta.Node{
		ID: id, RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:1", DataAddr: dataAddr,
		CapacityBytes: 10 << 30, FreeBytes: 10 << 30,
	}}); err != nil {
		r.t.Fatal(err)
	}
}

// CreateVolume records a volume of size bytes with one replica on each of
// the nodes on (the first is the preferred node, and the rig's nodes should
// be just these), and creates the replicas on the nodes that are not silent.
func (r *Rig) CreateVolume(name string, size uint64, on ...string) *meta.Volume {
	r.t.Helper()
	res, err := r.Meta.Apply(r.Ctx(), &meta.CreateVolume{ID: "vol-" + name, Name: name, SizeBytes: size, Replicas: len(on), PreferredNode: on[0]})
	if err != nil {
		r.t.Fatal(err)
	}
	v := res.Volume
	var placed []string
	for _, rep := range v.Replicas {
		placed = append(placed, rep.Node)
		if srv, ok := r.Servers[rep.Node]; ok {
			if _, err := srv.CreateWith(rep.ID, size, replica.CreateOptions{}); err != nil {
				r.t.Fatal(err)
			}
		}
	}
	if !sameNodes(placed, on) {
		r.t.Fatalf("volume %s placed on %v, want %v", v.ID, placed, on)
	}
	return v
}

func sameNodes(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// Attach attaches volume id to node, exported over NBD on socket if it is
// not empty.
func (r *Rig) Attach(id, node, socket string) *meta.Volume {
	r.t.Helper()
	ctx := r.Ctx()
	v, err := r.Meta.Volume(ctx, id)
	if err != nil {
		r.t.Fatal(err)
	}
	res, err := r.Meta.Apply(ctx, &meta.AttachVolume{VolumeID: id, NodeID: node, ExpectEpoch: v.Epoch, NBDSocket: socket})
	if err != nil {
		r.t.Fatal(err)
	}
	return res.Volume
}
