package attach_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/testrig"
)

const mib = 1 << 20

// promptly bounds the open of a volume whose replica answers. The engine
// waits up to its I/O timeout (10 s) for a silent replica, so an open held
// up behind one would take that long.
const promptly = 5 * time.Second

type opened struct {
	e   *engine.Engine
	err error
}

// TestOpenDoesNotWaitForAnotherVolume: while the open of volume a is stuck
// (its only replica's server accepts the connection and never answers),
// volume b opens at once and serves I/O; a second open of a waits for the
// first (one open or close of a volume at a time), and gives up with
// ErrBusy when its context ends.
func TestOpenDoesNotWaitForAnotherVolume(t *testing.T) {
	rig := testrig.New(t)
	rig.AddNode("n1")
	accepted := rig.AddSilentNode("s1")
	a := rig.CreateVolume("a", 4*mib, "s1")
	b := rig.CreateVolume("b", 4*mib, "n1")
	rig.Attach(a.ID, "n1", "")
	rig.Attach(b.ID, "n1", "")

	reg := attach.New(attach.Config{NodeID: "n1", Meta: rig.Meta, Logger: rig.Log})
	t.Cleanup(func() {
		if err := reg.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	doneA := make(chan opened, 1)
	go func() {
		e, err := reg.Open(ctxA, a.ID)
		doneA <- opened{e, err}
	}()
	select {
	case <-accepted:
	case r := <-doneA:
		t.Fatalf("open of %s ended before its replica's server was dialled: %v", a.ID, r.err)
	case <-time.After(promptly):
		t.Fatalf("open of %s did not dial its replica's server within %v", a.ID, promptly)
	}

	start := time.Now()
	eb, err := reg.Open(rig.Ctx(), b.ID)
	if err != nil {
		t.Fatalf("open %s while %s's open is stuck: %v", b.ID, a.ID, err)
	}
	if took := time.Since(start); took > promptly {
		t.Errorf("open of %s took %v while %s's open was stuck, want under %v", b.ID, took, a.ID, promptly)
	}
	select {
	case r := <-doneA:
		t.Fatalf("open of %s ended (err %v) before %s's: the test proves nothing", a.ID, r.err, b.ID)
	default:
	}
	want := bytes.Repeat([]byte{0xb5}, 4096)
	if err := eb.WriteAt(rig.Ctx(), want, 0, true); err != nil {
		t.Fatalf("write %s: %v", b.ID, err)
	}
	got := make([]byte, len(want))
	if err := eb.ReadAt(rig.Ctx(), got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read %s: %v, same bytes %v", b.ID, err, bytes.Equal(got, want))
	}

	// The same volume does wait: its turn is the stuck open's.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if e, err := reg.Open(ctx2, a.ID); !errors.Is(err, attach.ErrBusy) {
		t.Fatalf("second open of %s during the first = %v, %v; want ErrBusy", a.ID, e, err)
	}

	if n := reg.Count(); n != 1 {
		t.Errorf("Count = %d with %s open, want 1", n, b.ID)
	}
	if err := reg.Release(rig.Ctx(), eb); err != nil {
		t.Errorf("release %s: %v", b.ID, err)
	}
	cancelA()
	select {
	case r := <-doneA:
		if r.err == nil {
			t.Fatalf("open of %s with a silent replica succeeded", a.ID)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("open of %s did not end after its context was cancelled", a.ID)
	}
	if n := reg.Count(); n != 0 {
		t.Errorf("Count = %d after every release, want 0", n)
	}
}

// TestClosedRefusesOpens: after Close, Open fails with ErrClosed, what was
// still open is closed, and a later release of it is harmless.
func TestClosedRefusesOpens(t *testing.T) {
	rig := testrig.New(t)
	rig.AddNode("n1")
	b := rig.CreateVolume("b", 4*mib, "n1")
	rig.Attach(b.ID, "n1", "")
	reg := attach.New(attach.Config{NodeID: "n1", Meta: rig.Meta, Logger: rig.Log})
	e, err := reg.Open(rig.Ctx(), b.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if n := reg.Count(); n != 0 {
		t.Errorf("Count = %d after Close, want 0", n)
	}
	if err := e.Flush(rig.Ctx()); !errors.Is(err, engine.ErrClosed) {
		t.Errorf("flush of an engine the registry closed = %v, want ErrClosed", err)
	}
	if _, err := reg.Open(rig.Ctx(), b.ID); !errors.Is(err, attach.ErrClosed) {
		t.Errorf("open after Close = %v, want ErrClosed", err)
	}
	// The user's own release, after the shutdown's, does nothing.
	if err := reg.Release(rig.Ctx(), e); err != nil {
		t.Errorf("release of an engine Close released = %v, want nil", err)
	}
}
