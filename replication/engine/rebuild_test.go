package engine

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/iosched/ioschedtest"
	"github.com/cairn-csi/cairn/replication/replica"
)

// classCounter counts the requests a disk scheduler let go, by class.
type classCounter struct {
	iosched.NopObserver
	mu sync.Mutex
	n  map[iosched.Class]int
}

func (c *classCounter) QueueWait(_ string, class iosched.Class, _ time.Duration) {
	c.mu.Lock()
	c.n[class]++
	c.mu.Unlock()
}

func (c *classCounter) count(class iosched.Class) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[class]
}

// startScheduledServer is startServer for a replica server with a disk
// scheduler of its own, whose grants the returned counter counts.
func (r *rig) startScheduledServer(node, dir, addr string) *classCounter {
	r.t.Helper()
	counter := &classCounter{n: map[iosched.Class]int{}}
	sched, err := iosched.New(iosched.Config{Depth: 4, Observer: counter})
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(sched.Close)
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		r.t.Fatal(err)
	}
	s := &replicaServer{srv: replica.NewServerWithConfig(replica.ServerConfig{Logger: r.log, DataDir: dir, Sched: sched}),
		lis: lis, addr: lis.Addr().String(), dir: dir}
	go func() { _ = s.srv.Serve(lis) }()
	r.servers[node] = s
	return counter
}

// TestRebuildIsBackgroundOnEveryDisk: the rebuild's compare and copy
// requests reach the disk schedulers of both its source (the engine's own
// replica, in process) and its target (over TCP) in the Rebuild class,
// while the volume's own writes stay foreground.
func TestRebuildIsBackgroundOnEveryDisk(t *testing.T) {
	r := newRig(t, 3)
	r.heartbeat("n1", "n2", "n3")
	var source *classCounter
	for _, node := range []string{"n1", "n3"} {
		old := r.servers[node]
		r.kill(node)
		if c := r.startScheduledServer(node, old.dir, old.addr); node == "n1" {
			source = c
		}
	}
	v := r.createVolume("bg", 16*mib, 3, 0, "n1")
	rebuilt := make(chan RebuildStats, 4)
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 2 * time.Second,
		CleanInterval: 200 * time.Millisecond, WatchInterval: 100 * time.Millisecond, Local: r.servers["n1"].srv,
		OnRebuilt: func(s RebuildStats) { rebuilt <- s }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	model := make([]byte, v.SizeBytes)
	write := func(off uint64, b byte) {
		p := bytes.Repeat([]byte{b}, 64<<10)
		if err := e.WriteAt(ctx, p, off, false); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	write(0, 1)
	if err := e.CleanPoint(ctx); err != nil {
		t.Fatal(err)
	}
	n3 := r.servers["n3"]
	r.kill("n3")
	write(5*mib, 2) // while n3 is away: its replica is ejected, then rebuilt
	write(9*mib, 3)
	if source.count(iosched.Foreground) == 0 {
		t.Fatal("the engine's writes to its own replica did not pass the disk scheduler")
	}
	if n := source.count(iosched.Rebuild); n != 0 {
		t.Fatalf("%d rebuild requests before any rebuild", n)
	}
	target := r.startScheduledServer("n3", n3.dir, n3.addr)
	select {
	case st := <-rebuilt:
		if st.BytesCopied == 0 {
			t.Fatalf("rebuild copied nothing: %+v", st)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no rebuild finished within 30s")
	}
	// Each disk sees a checksum per extent, and per copied extent a read
	// (the source) or a write (the target).
	extents := int(v.SizeBytes / replica.DefaultExtentSize)
	for name, c := range map[string]*classCounter{"source (in process)": source, "target (over TCP)": target} {
		if got := c.count(iosched.Rebuild); got < extents+1 {
			t.Errorf("the %s disk saw %d rebuild requests, want at least %d", name, got, extents+1)
		}
	}
	r.healthyIdentical(v.ID, model)
}

// TestRebuildPaceOnlyBesideForegroundIO: the rebuild's pace
// (RebuildBytesPerSecond) holds copies back while the node's scheduler has
// seen a foreground request within rebuildQuiet, and lets them run at once
// otherwise. At 1 KiB/s, 4 MiB would be due in more than an hour: an idle
// node's copy returns at once, a busy node's is still waiting when its
// context ends. The scheduler's clock moves only when the test says, so
// "within rebuildQuiet" does not depend on how loaded the machine is.
func TestRebuildPaceOnlyBesideForegroundIO(t *testing.T) {
	clock := ioschedtest.NewFrozenClock(time.Unix(1e9, 0))
	sched, err := iosched.New(iosched.Config{Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	defer sched.Close()
	e := &Engine{cfg: Config{RebuildBytesPerSecond: 1 << 10, Sched: sched}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := range 3 {
		if err := e.paceRebuild(ctx, 4*mib); err != nil {
			t.Fatalf("copy %d on an idle node: %v", i, err)
		}
	}
	if err := sched.SetLimits("fg", iosched.Limits{}); err != nil {
		t.Fatal(err)
	}
	tk, err := sched.Acquire(ctx, iosched.Request{Volume: "fg", Op: iosched.Write, Bytes: 4096, Class: iosched.Foreground})
	if err != nil {
		t.Fatal(err)
	}
	tk.Done()
	busy, cancelBusy := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelBusy()
	if err := e.paceRebuild(busy, 4*mib); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("copy beside foreground I/O: %v, want it held back by the pace until its context ended", err)
	}
	clock.Advance(rebuildQuiet) // quiet again
	if err := e.paceRebuild(ctx, 4*mib); err != nil {
		t.Fatalf("copy after %v without foreground I/O: %v", rebuildQuiet, err)
	}
}
