package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
)

// runCtl runs `cairn ctl ARGS…` and returns what it printed.
func runCtl(args ...string) (string, error) {
	cmd := newCtlCommand()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

// TestSnapshotArgsRefusedBeforeDialling: bad input fails with an error
// naming it before any server is asked (none answers at 127.0.0.1:1).
func TestSnapshotArgsRefusedBeforeDialling(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"snapshot", "create", "vol-1"}, "accepts 2 arg(s)"},
		{[]string{"snapshot", "create", "vol-1", meta.HiddenSnapshotPrefix + "x"}, "Cairn's own"},
		{[]string{"snapshot", "create", "vol-1", "sched-vol-1-202612050600"}, "scheduled snapshots"},
		{[]string{"snapshot", "list", "a", "b"}, "accepts at most 1 arg(s)"},
		{[]string{"snapshot", "list", " "}, "volume id is empty"},
		{[]string{"snapshot", "get"}, "accepts 1 arg(s)"},
		{[]string{"snapshot", "delete"}, "accepts 1 arg(s)"},
		{[]string{"volume", "create", "x"}, "--size"},
		{[]string{"volume", "create", "x", "--from-snapshot", "snap-1", "--from-volume", "vol-1"}, "give one of them"},
		{[]string{"volume", "create", "x", "--from-snapshot", "snap-1", "--preferred-node", "n1"}, "--preferred-node"},
		{[]string{"volume", "create", "x", "--from-volume", "vol-1", "--size", "0"}, "--size must be more than 0"},
		{[]string{"volume", "create", "x", "--from-volume", "vol-1", "--size", "lots"}, "--size"},
		{[]string{"volume", "create", "x", "--size", "1Gi", "--snapshot-schedule", "0 25 * * *"}, "field 2 (hour)"},
		{[]string{"volume", "create", "x", "--size", "1Gi", "--snapshot-retain", "-2"}, "--snapshot-retain -2"},
	} {
		out, err := runCtl(append([]string{"--server", "127.0.0.1:1", "--timeout", "2s"}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v (printed %q); want an error mentioning %q", c.args, err, out, c.want)
		}
		if strings.Contains(err.Error(), "no member answered") {
			t.Errorf("%q dialled the server before refusing: %v", c.args, err)
		}
	}
}

func TestListSnapshotsAndTable(t *testing.T) {
	st := meta.NewState()
	at := func(min int) int64 { return time.Date(2026, 12, 5, 10, min, 0, 0, time.UTC).UnixNano() }
	for _, sn := range []*meta.Snapshot{
		{ID: "s3", Name: "c", SourceVolumeID: "v1", SizeBytes: 1 << 30, CreatedAt: at(3), Error: "replica v1-r2 unreachable"},
		{ID: "s1", Name: "a", SourceVolumeID: "v1", SizeBytes: 1 << 30, CreatedAt: at(1), ReadyToUse: true,
			Space: &meta.SnapshotSpace{HeldBytes: 512 << 20, AloneBytes: 64 << 20}},
		{ID: "s2", Name: "b", SourceVolumeID: "v2", SizeBytes: 64 << 20, CreatedAt: at(2)},
		{ID: "s4", Name: "d", SourceVolumeID: "v1", CreatedAt: at(4), ReadyToUse: true, Deleting: true},
		{ID: "s5", Name: meta.HiddenSnapshotPrefix + "clone-x", SourceVolumeID: "v1", CreatedAt: at(5), ReadyToUse: true},
	} {
		st.Snapshots[sn.ID] = sn
	}
	ids := func(snaps []*meta.Snapshot) string {
		var out []string
		for _, sn := range snaps {
			out = append(out, sn.ID)
		}
		return strings.Join(out, " ")
	}
	for _, c := range []struct {
		vol  string
		all  bool
		want string
	}{
		{"", false, "s1 s2 s3"},
		{"", true, "s1 s2 s3 s4 s5"},
		{"v1", false, "s1 s3"},
		{"v2", true, "s2"},
		{"v9", true, ""},
	} {
		if got := ids(listSnapshots(st, c.vol, c.all)); got != c.want {
			t.Errorf("listSnapshots(%q, all %v) = %q, want %q", c.vol, c.all, got, c.want)
		}
	}
	var out bytes.Buffer
	if err := printSnapshotTable(&out, listSnapshots(st, "", true)); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 6 || strings.Join(strings.Fields(lines[0]), " ") != "ID NAME VOLUME SIZE HELD ALONE READY CREATED STATE" {
		t.Fatalf("table:\n%s", out.String())
	}
	for i, want := range []string{
		"s1 a v1 1 GiB 512 MiB 64 MiB true 2026-12-05T10:01:00Z ready",
		"s2 b v2 64 MiB - - false 2026-12-05T10:02:00Z pending",
		"s3 c v1 1 GiB - - false 2026-12-05T10:03:00Z error: replica v1-r2 unreachable",
		"s4 d v1 0 B - - true 2026-12-05T10:04:00Z deleting",
	} {
		if got := strings.Join(strings.Fields(lines[i+1]), " "); got != want {
			t.Errorf("row %d: %q, want %q", i+1, got, want)
		}
	}
}

func TestPrintSnapshot(t *testing.T) {
	slot := time.Date(2026, 12, 5, 6, 0, 0, 0, time.UTC)
	var out bytes.Buffer
	sn := &meta.Snapshot{ID: "s1", Name: meta.ScheduledSnapshotName("v1", slot), SourceVolumeID: "v1", SizeBytes: 1 << 30,
		CreatedAt: slot.Add(3 * time.Second).UnixNano(), ReadyToUse: true, Replicas: []string{"v1-r1", "v1-r2"}}
	if err := printSnapshot(&out, "table", sn); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"id:", "s1", "size:", "1 GiB (1073741824 bytes)", "ready:", "true", "state:", "ready",
		"scheduled:", "slot 2026-12-05T06:00:00Z", "held by:", "v1-r1, v1-r2"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("printSnapshot does not show %q:\n%s", want, out.String())
		}
	}
}

// startCtlStore starts a one-member store on loopback TCP, with node n1
// registered, and plays the part of the node that takes snapshots: every
// snapshot asked for is marked ready, held by its volume's replicas.
func startCtlStore(t *testing.T) string {
	t.Helper()
	a, err := meta.StartAgent(meta.AgentConfig{
		Store:           meta.StoreConfig{NodeID: "n1", DataDir: t.TempDir(), RaftBind: "127.0.0.1:0", TimeoutMultiplier: 0.2},
		APIBind:         "127.0.0.1:0",
		BootstrapExpect: 1, HeartbeatInterval: 50 * time.Millisecond, NodeDownAfter: time.Second,
		DiskUsage: func() (uint64, uint64, error) { return 100 << 30, 100 << 30, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	c, err := meta.NewClient([]string{a.APIAddr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := c.State(ctx, true)
		if err == nil && st.Nodes["n1"] != nil && st.Nodes["n1"].State == meta.NodeUp {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node n1 not registered: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
			st, err := c.State(ctx, false)
			if err != nil {
				continue
			}
			for _, sn := range st.Snapshots {
				v := st.Volumes[sn.SourceVolumeID]
				if sn.ReadyToUse || sn.Deleting || v == nil {
					continue
				}
				var holders []string
				for _, r := range v.Replicas {
					holders = append(holders, r.ID)
				}
				_, _ = c.Apply(ctx, &meta.SetSnapshotReady{SnapshotID: sn.ID, Replicas: holders})
			}
		}
	}()
	return a.APIAddr()
}

// TestSnapshotCommandsOnAStore: the snapshot commands and volume create
// --from-snapshot | --from-volume against a real store.
func TestSnapshotCommandsOnAStore(t *testing.T) {
	addr := startCtlStore(t)
	ctl := func(args ...string) (string, error) {
		return runCtl(append([]string{"--server", addr, "--timeout", "10s"}, args...)...)
	}
	jsonOf := func(v any, args ...string) {
		t.Helper()
		out, err := ctl(append(args, "-o", "json")...)
		if err != nil {
			t.Fatalf("%q: %v\n%s", args, err, out)
		}
		if err := json.Unmarshal([]byte(out), v); err != nil {
			t.Fatalf("%q printed %q: %v", args, out, err)
		}
	}
	var vol meta.Volume
	jsonOf(&vol, "volume", "create", "data", "--size", "64Mi", "--replicas", "1", "--snapshot-schedule", "0 */6 * * *")
	if vol.Parameters["snapshotSchedule"] != "0 */6 * * *" {
		t.Fatalf("volume parameters %v: want the schedule recorded", vol.Parameters)
	}

	out, err := ctl("snapshot", "create", vol.ID, "before-upgrade")
	if err != nil {
		t.Fatalf("snapshot create: %v\n%s", err, out)
	}
	for _, want := range []string{"before-upgrade", "ready:", "true", "64 MiB"} {
		if !strings.Contains(out, want) {
			t.Errorf("snapshot create printed %q; want %q in it", out, want)
		}
	}
	var sn meta.Snapshot
	jsonOf(&sn, "snapshot", "create", vol.ID, "before-upgrade") // the same one again
	if !sn.ReadyToUse || sn.SizeBytes != 64<<20 || sn.SourceVolumeID != vol.ID {
		t.Fatalf("snapshot %+v", sn)
	}
	var listed []*meta.Snapshot
	jsonOf(&listed, "snapshot", "list", vol.ID)
	if len(listed) != 1 || listed[0].ID != sn.ID {
		t.Fatalf("list of %s: %+v, want %s alone", vol.ID, listed, sn.ID)
	}
	if out, err := ctl("snapshot", "list", "vol-nope"); err == nil || !errors.Is(err, meta.ErrNotFound) {
		t.Errorf("list of an unknown volume: %v\n%s", err, out)
	}
	if out, err := ctl("snapshot", "get", sn.ID); err != nil || !strings.Contains(out, sn.ID) || !strings.Contains(out, "ready") {
		t.Errorf("snapshot get: %v\n%s", err, out)
	}
	if _, err := ctl("snapshot", "get", "snap-nope"); !errors.Is(err, meta.ErrNotFound) {
		t.Errorf("get of an unknown snapshot: %v", err)
	}

	// Restore: the size is the snapshot's unless asked; smaller is refused.
	if _, err := ctl("volume", "create", "small", "--from-snapshot", sn.ID, "--size", "32Mi", "--replicas", "1"); err == nil ||
		!strings.Contains(err.Error(), "smaller than snapshot") {
		t.Errorf("restore into a smaller size: %v", err)
	}
	var restored meta.Volume
	jsonOf(&restored, "volume", "create", "copy", "--from-snapshot", sn.ID, "--replicas", "1")
	if restored.SizeBytes != 64<<20 || restored.ContentSource != "snapshot:"+sn.ID {
		t.Fatalf("restored volume %+v", restored)
	}
	out, err = ctl("volume", "create", "clone", "--from-volume", vol.ID, "--size", "128Mi", "--replicas", "1")
	if err != nil || !strings.Contains(out, "as a clone of volume "+vol.ID) || !strings.Contains(out, "made from:    volume "+vol.ID) {
		t.Fatalf("clone: %v\n%s", err, out)
	}

	out, err = ctl("snapshot", "delete", sn.ID)
	if err != nil || !strings.Contains(out, "deleted snapshot "+sn.ID) {
		t.Fatalf("snapshot delete: %v\n%s", err, out)
	}
	jsonOf(&listed, "snapshot", "list", vol.ID)
	if len(listed) != 0 {
		t.Fatalf("after delete, list shows %+v", listed)
	}
	jsonOf(&listed, "snapshot", "list", vol.ID, "--all")
	if len(listed) == 0 || !listed[0].Deleting {
		t.Fatalf("after delete, list --all shows %+v; want the deleting snapshot", listed)
	}
	if _, err := ctl("snapshot", "delete", "snap-nope"); !errors.Is(err, meta.ErrNotFound) {
		t.Errorf("delete of an unknown snapshot: %v", err)
	}
	if _, err := ctl("volume", "create", "again", "--from-snapshot", sn.ID); !errors.Is(err, meta.ErrNotFound) {
		t.Errorf("restore from a deleted snapshot: %v", err)
	}

	// A volume whose snapshot records remain is hidden, not deleted: the
	// layers they need stay.
	out, err = ctl("volume", "delete", vol.ID)
	if err != nil || !strings.Contains(out, "hidden until its snapshots are deleted") {
		t.Fatalf("volume delete with a snapshot left: %v\n%s", err, out)
	}
	if out, err := ctl("volume", "list"); err != nil || !strings.Contains(out, "kept for its snapshots") {
		t.Errorf("volume list after hiding: %v\n%s", err, out)
	}
	out, err = ctl("volume", "delete", restored.ID)
	if err != nil || strings.TrimSpace(out) != "deleted volume "+restored.ID {
		t.Fatalf("volume delete without snapshots: %v\n%s", err, out)
	}
}
