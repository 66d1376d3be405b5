package dataplane

import (
	"bytes"
	"fmt"
	"os"
	"testing"
	"time"
)

// TestUnexportDuringWritesLeavesIdenticalReplicas (issue 10, 2b): a
// replica node freezes (SIGSTOP) while writes stream, so the writes in
// flight reach two replicas and wait for the third; then the volume is
// unexported, which cancels them. The node closing the engine must leave
// identical healthy replicas: the cancelled writes are resolved (new epoch,
// the frozen replica ejected since it cannot be claimed, the extents made
// identical) before the clean point, not hidden by it.
func TestUnexportDuringWritesLeavesIdenticalReplicas(t *testing.T) {
	// No replica deadline (negative: the full I/O timeout): the writes in
	// flight must still be waiting for node-3 when the unexport cancels
	// them, or this test would watch an ordinary ejection instead.
	c := startCluster(t, 3, "--node-arg=--replica-deadline=-1s")
	v := c.createVolume("unexport", volSizeArg, "--replicas", "3")
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	m := newModel(volSize)
	w := startWriter(t, m, conn, 'A', 5, 8, false)
	w.waitAcked(t, 200, 60*time.Second, "writes before the freeze")

	c.stop("node-3")
	time.Sleep(500 * time.Millisecond) // the writes in flight now wait for node-3
	acked := w.acked.Load()
	c.mustCtl("volume", "unexport", v.ID)
	t.Logf("froze node-3 and unexported after %d acknowledged writes", acked)
	log := c.node("node-1").Log
	eventually(t, 60*time.Second, "node-1 stops the export", func() error {
		b, err := os.ReadFile(log)
		if err != nil {
			return err
		}
		if !bytes.Contains(b, []byte(`"export stopped"`)) {
			return fmt.Errorf("no export-stopped line in %s yet", log)
		}
		return nil
	})
	// Resume node-3 before waiting for the writer: a write still held by
	// the frozen node would otherwise hold the test until its timeout.
	c.cont("node-3")
	w.stop()
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"operation failed after it was sent`, `"failed writes resolved: replicas identical again"`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Fatalf("node-1's log has no %s line: the cancelled writes were not resolved as this test means to show", want)
		}
	}
	if err := c.verify(v.ID); err != nil {
		t.Fatalf("after the unexport: %v", err)
	}
	final := c.mustVolume(v.ID)
	t.Logf("after the unexport: %s", final.summary())

	// Every acknowledged write is there, through a new export elsewhere.
	sock2, _ := c.export(v.ID, "node-2", 30*time.Second)
	checkModel(t, m, c.dial(sock2, 10*time.Second), "read back on node-2")
	c.waitVolume(v.ID, 90*time.Second, "all replicas healthy again", allHealthy)
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
}
