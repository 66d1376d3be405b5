//go:build linux

package fuse

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"
)

// TestGateHoldsRequestsAfterClose: Leave's gate waits for the requests
// inside, holds the ones that come later until freed, and reports a
// request that does not finish in time.
func TestGateHoldsRequestsAfterClose(t *testing.T) {
	g := newGate()
	if !g.enter() {
		t.Fatal("an open gate refused a request")
	}
	closed := make(chan bool)
	go func() { closed <- g.close(5 * time.Second) }()
	select {
	case <-closed:
		t.Fatal("close returned while a request was inside")
	case <-time.After(50 * time.Millisecond):
	}
	later := make(chan bool)
	go func() { later <- g.enter() }()
	g.exit()
	if ok := <-closed; !ok {
		t.Fatal("close reported a request unfinished after it exited")
	}
	select {
	case <-later:
		t.Fatal("a request that came after close was let in")
	case <-time.After(50 * time.Millisecond):
	}
	g.free()
	if admitted := <-later; admitted {
		t.Fatal("a held request was admitted after free; want it refused")
	}

	g2 := newGate()
	g2.enter()
	if g2.close(20 * time.Millisecond) {
		t.Fatal("close reported success while a request stayed inside")
	}
	g2.exit() // ends close's waiter
}

// TestNodeIDsStableAcrossServers: a volume gets the same node id in every
// server (what lets a resumed agent serve the kernel's references), and a
// removed file the kernel still references keeps its id from a new file of
// the same name.
func TestNodeIDsStableAcrossServers(t *testing.T) {
	a := newVolumeFS(context.Background(), zap.NewNop())
	b := newVolumeFS(context.Background(), zap.NewNop())
	for _, name := range []string{"vol-1", "vol-2", "pvc-0123"} {
		if err := a.add(name, newMemBackend(4096), 4096); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"pvc-0123", "vol-2", "vol-1"} { // another order
		if err := b.add(name, newMemBackend(4096), 4096); err != nil {
			t.Fatal(err)
		}
		if ia, ib := a.byName[name].ino, b.byName[name].ino; ia != ib || ia <= 1 {
			t.Fatalf("%s: node id %d in one server, %d in the other", name, ia, ib)
		}
	}
	old := a.byName["vol-1"]
	old.lookups = 1 // the kernel still references it
	if err := a.remove("vol-1", 0); err != nil {
		t.Fatal(err)
	}
	if err := a.add("vol-1", newMemBackend(4096), 4096); err != nil {
		t.Fatal(err)
	}
	if a.byName["vol-1"].ino == old.ino {
		t.Fatal("a new file took the node id of a removed one the kernel still references")
	}
}

// TestAdoptHandlesAfterResume: a resumed file system serves a file handle
// the earlier process handed out, by the node the request names; a fresh
// one refuses it.
func TestAdoptHandlesAfterResume(t *testing.T) {
	fresh := newVolumeFS(context.Background(), zap.NewNop())
	resumed := newVolumeFS(context.Background(), zap.NewNop())
	resumed.resumed = true
	for _, fs := range []*volumeFS{fresh, resumed} {
		if err := fs.add("vol", newMemBackend(4096), 4096); err != nil {
			t.Fatal(err)
		}
	}
	ino := resumed.byName["vol"].ino
	if h := fresh.handle(ino, 7); h != nil {
		t.Fatal("a fresh server served a handle it never gave")
	}
	h := resumed.handle(ino, 7)
	if h == nil || h.f.name != "vol" {
		t.Fatalf("a resumed server did not adopt the earlier handle: %+v", h)
	}
	if again := resumed.handle(ino, 7); again != h {
		t.Fatal("the adopted handle was not kept")
	}
	if f := resumed.byName["vol"]; f.opens != 1 {
		t.Fatalf("adopted handle counted %d times, want 1", f.opens)
	}
	if h := resumed.handle(ino+1, 8); h != nil {
		t.Fatal("a handle of an unknown node was adopted")
	}
	if resumed.nextFh <= 8 {
		t.Fatalf("new handles start at %d, at or below ones the kernel may hold", resumed.nextFh)
	}
}
