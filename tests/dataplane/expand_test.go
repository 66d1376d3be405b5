package dataplane

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"
)

// TestNBDExportGrows: a volume exported over NBD is expanded with cairn
// ctl while exported. Its engine grows every replica and then itself; a
// new NBD connection sees the new size and writes at the new end; data
// before the old end is intact; the replicas verify identical at the new
// size; the exporting node counts the expansion and its replica grows.
func TestNBDExportGrows(t *testing.T) {
	const from, to = 16 << 20, 48 << 20
	c := startCluster(t, 3)
	v := c.createVolume("grow", "16Mi", "--replicas", "3")
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	if conn.Size() != from {
		t.Fatalf("export size %d, want %d", conn.Size(), from)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	head := bytes.Repeat([]byte("expand!\n"), (1<<20)/8)
	if err := conn.WriteAt(ctx, head, 0, true); err != nil {
		t.Fatal(err)
	}

	out := c.mustCtl("volume", "expand", v.ID, "--size", "48Mi")
	t.Logf("%s", out)
	var grown *nbdConn
	eventually(t, 20*time.Second, "a new NBD connection that sees the new size", func() error {
		conn := c.dial(sock, 10*time.Second)
		if conn.Size() != to {
			return fmt.Errorf("export size %d, want %d", conn.Size(), to)
		}
		grown = conn
		return nil
	})
	tail := bytes.Repeat([]byte{0x7e}, 1<<20)
	if err := grown.WriteAt(ctx, tail, to-uint64(len(tail)), true); err != nil {
		t.Fatalf("write the new last MiB: %v", err)
	}
	for _, c := range []struct {
		off  uint64
		want []byte
	}{{0, head}, {to - 1<<20, tail}} {
		got := make([]byte, len(c.want))
		if err := grown.ReadAt(ctx, got, c.off); err != nil || !bytes.Equal(got, c.want) {
			t.Fatalf("read back %d bytes at %d: %v (equal %v)", len(got), c.off, err, bytes.Equal(got, c.want))
		}
	}
	if err := grown.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.verify(v.ID); err != nil {
		t.Fatalf("replicas after the expansion: %v", err)
	}
	m := c.metrics("node-1")
	if m["cairn_engine_volume_expansions_total"] < 1 || m[`cairn_engine_replica_grows_total{result="ok"}`] < 3 {
		t.Fatalf("node-1 counted %v expansions and %v replica grows; want 1 and 3",
			m["cairn_engine_volume_expansions_total"], m[`cairn_engine_replica_grows_total{result="ok"}`])
	}
}
