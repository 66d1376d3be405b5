package dataplane

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// flipBits flips bits of one byte in the data file of replica r, under the
// running node, as a failing disk would (docs/integrity.md).
func (c *devCluster) flipBits(r replicaJSON, off int64) {
	c.t.Helper()
	path := filepath.Join(c.node(r.Node).DataDir, "replicas", r.ID, "data")
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		c.t.Fatal(err)
	}
	b[0] ^= 0x81
	if _, err := f.WriteAt(b, off); err != nil {
		c.t.Fatal(err)
	}
}

type scrubJSON struct {
	Seq           uint64 `json:"seq"`
	BlocksTotal   uint64 `json:"blocks_total"`
	BlocksChecked uint64 `json:"blocks_checked"`
	Repaired      uint64 `json:"repaired"`
	Unrecoverable uint64 `json:"unrecoverable"`
	Done          bool   `json:"done"`
	Error         string `json:"error"`
}

// TestChecksumCorruptionUnderRunningVolume (issue 10, part 4): bits flipped
// in replicas' data files under a running, exported 3-replica volume.
// Invariants: reads return the written data (never the flipped bits); the
// replica read from is repaired and counted in the exporting node's
// metrics; `volume scrub` finds and repairs a flip in a replica nobody
// read; after that every replica is identical. Then the same block flipped
// on every replica: the read fails with EIO (never wrong data) and the
// volume's condition, as `volume get` shows it, is abnormal.
func TestChecksumCorruptionUnderRunningVolume(t *testing.T) {
	c := startCluster(t, 3)
	v := c.createVolume("sums", volSizeArg, "--replicas", "3")
	sock, _ := c.export(v.ID, "node-1", 20*time.Second)
	conn := c.dial(sock, 10*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const span = 4 << 20
	want := make([]byte, span)
	rng := rand.New(rand.NewPCG(42, 42))
	for i := range want {
		want[i] = byte(rng.Uint32())
	}
	if err := conn.WriteAt(ctx, want, 0, true); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := conn.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	v = c.mustVolume(v.ID)
	local := v.replicaOn("node-1")
	remote := v.replicaOn("node-3")
	if local == nil || remote == nil {
		t.Fatalf("replicas not on node-1 and node-3: %s", v.summary())
	}

	// The engine reads its local replica first: flip a bit there.
	const readBlock = 100 * 4096
	c.flipBits(*local, readBlock+17)
	got := make([]byte, 64<<10)
	if err := conn.ReadAt(ctx, got, readBlock); err != nil {
		t.Fatalf("read over a flipped bit: %v", err)
	}
	if !bytes.Equal(got, want[readBlock:readBlock+len(got)]) {
		t.Fatal("read returned the flipped data")
	}
	key := `cairn_engine_checksum_repairs_total{volume_id="` + v.ID + `"}`
	if n := c.metrics("node-1")[key]; n < 1 {
		t.Fatalf("node-1's %s is %v, want >= 1", key, n)
	}

	// A flip nobody reads: the scrub finds and repairs it.
	c.flipBits(*remote, 700*4096+3)
	out := c.mustCtl("volume", "scrub", v.ID, "-o", "json", "--timeout", "2m")
	var s scrubJSON
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("scrub output %q: %v", out, err)
	}
	t.Logf("scrub: %+v", s)
	if !s.Done || s.Repaired != 1 || s.Unrecoverable != 0 || s.BlocksChecked != 3*volSize/4096 {
		t.Fatalf("scrub %+v, want done, 1 repaired, 0 unrecoverable, %d checked", s, 3*volSize/4096)
	}
	if err := c.verify(v.ID); err != nil {
		t.Fatal(err)
	}
	table := c.mustCtl("volume", "get", v.ID)
	if !strings.Contains(table, "condition:    normal") || !strings.Contains(table, "1 repaired") {
		t.Fatalf("volume get after the scrub:\n%s", table)
	}

	// The same block flipped on every replica: EIO, never wrong data.
	const lostBlock = 200 * 4096
	for _, r := range v.Replicas {
		c.flipBits(r, lostBlock+5)
	}
	if err := conn.ReadAt(ctx, got[:4096], lostBlock); err == nil {
		t.Fatalf("read of a block bad on every replica succeeded (data equal to the written: %v)", bytes.Equal(got[:4096], want[lostBlock:lostBlock+4096]))
	} else if !isNBDErrno(err, nbdEIO) {
		t.Fatalf("read of a block bad on every replica: %v, want an NBD EIO reply", err)
	} else {
		t.Logf("read of a block bad everywhere: %v", err)
	}
	if err := conn.ReadAt(ctx, got[:4096], 0); err != nil || !bytes.Equal(got[:4096], want[:4096]) {
		t.Fatalf("read of a good block after the EIO: %v", err)
	}
	var cond struct {
		Condition *struct {
			Abnormal bool   `json:"abnormal"`
			Message  string `json:"message"`
		} `json:"condition"`
	}
	if err := json.Unmarshal([]byte(c.mustCtl("volume", "get", v.ID, "-o", "json")), &cond); err != nil {
		t.Fatal(err)
	}
	if cond.Condition == nil || !cond.Condition.Abnormal {
		t.Fatalf("volume condition %+v, want abnormal", cond.Condition)
	}
	t.Logf("condition: %s", cond.Condition.Message)
	if table := c.mustCtl("volume", "get", v.ID); !strings.Contains(table, "condition:    abnormal") {
		t.Fatalf("volume get does not show the abnormal condition:\n%s", table)
	}
	// The scrub reports it as unrecoverable and exits non-zero.
	r := c.ctl("volume", "scrub", v.ID, "--timeout", "2m")
	if r.code == 0 || !strings.Contains(r.stdout, "1 unrecoverable") {
		t.Fatalf("scrub with a lost block: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	t.Logf("%s", strings.TrimSpace(r.stdout))
}
