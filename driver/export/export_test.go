package export_test

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/driver/export"
	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/testrig"
)

// promptly bounds the start of an export whose replica answers: an export
// held up behind an engine open waiting for a silent replica would take
// that engine's I/O timeout (10 s), or the export's open timeout (30 s).
const promptly = 5 * time.Second

// TestExportDoesNotWaitForAnotherVolume: volume a is exported on this node
// but its only replica's server accepts connections and never answers, so
// its engine's open is stuck; volume b, exported after it, is served at
// once, and the manager still closes promptly.
func TestExportDoesNotWaitForAnotherVolume(t *testing.T) {
	rig := testrig.New(t)
	rig.AddNode("n1")
	accepted := rig.AddSilentNode("s1")
	a := rig.CreateVolume("a", 4<<20, "s1")
	b := rig.CreateVolume("b", 4<<20, "n1")

	reg := attach.New(attach.Config{NodeID: "n1", Meta: rig.Meta, Logger: rig.Log})
	m := export.Start(export.Config{NodeID: "n1", FSM: rig.Store.Store().FSM(), Engines: reg, Logger: rig.Log})
	closed := false
	t.Cleanup(func() {
		if !closed {
			m.Close()
		}
		_ = reg.Close()
	})

	dir := t.TempDir()
	sockA, sockB := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	rig.Attach(a.ID, "n1", sockA)
	select {
	case <-accepted:
	case <-time.After(promptly):
		t.Fatalf("the export of %s did not dial its replica's server within %v", a.ID, promptly)
	}

	start := time.Now()
	rig.Attach(b.ID, "n1", sockB)
	for !slices.Contains(m.Exports(), b.ID) {
		if time.Since(start) > promptly {
			t.Fatalf("%s not exported within %v while %s's engine was opening (exports %v)", b.ID, promptly, a.ID, m.Exports())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The export answers: an NBD server greets a client with "NBDMAGIC".
	c, err := net.DialTimeout("unix", sockB, promptly)
	if err != nil {
		t.Fatalf("dial %s's NBD socket: %v", b.ID, err)
	}
	_ = c.SetDeadline(time.Now().Add(promptly))
	magic := make([]byte, 8)
	if _, err := io.ReadFull(c, magic); err != nil || string(magic) != "NBDMAGIC" {
		t.Fatalf("%s's NBD socket greeted with %q, %v; want NBDMAGIC", b.ID, magic, err)
	}
	c.Close()
	if got := m.Exports(); slices.Contains(got, a.ID) {
		t.Fatalf("%s exported (%v) although its only replica never answered", a.ID, got)
	}
	if _, err := os.Stat(sockA); err == nil {
		t.Fatalf("%s's socket exists although its engine never opened", a.ID)
	}

	// Close stops b and gives up a's open: it does not wait out the open.
	start = time.Now()
	m.Close()
	closed = true
	if took := time.Since(start); took > promptly {
		t.Errorf("Close took %v with an engine open stuck, want under %v", took, promptly)
	}
	if n := reg.Count(); n != 0 {
		t.Errorf("%d engines still open after the manager closed, want 0", n)
	}
}
