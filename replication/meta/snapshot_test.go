package meta

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"io"
	"reflect"
	"testing"

	"github.com/hashicorp/raft"
)

// memSink is a raft.SnapshotSink over a buffer.
type memSink struct {
	bytes.Buffer
	closed, canceled int
	failWrites       bool
}

var _ raft.SnapshotSink = (*memSink)(nil)

func (s *memSink) ID() string { return "mem-snapshot" }

func (s *memSink) Write(p []byte) (int, error) {
	if s.failWrites {
		return 0, errors.New("disk full")
	}
	return s.Buffer.Write(p)
}

func (s *memSink) Cancel() error { s.canceled++; return nil }
func (s *memSink) Close() error  { s.closed++; return nil }

// trackingReader is the io.ReadCloser handed to Restore; it records Close.
type trackingReader struct {
	io.Reader
	closed int
}

func (r *trackingReader) Close() error { r.closed++; return nil }

// persist takes a snapshot of f and persists it into a memSink.
func persist(t *testing.T, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	defer snap.Release()
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatalf("Persist: %v", err)
	}
	if sink.closed != 1 || sink.canceled != 0 {
		t.Fatalf("Persist closed the sink %d times and cancelled it %d times; want 1 and 0", sink.closed, sink.canceled)
	}
	return sink.Bytes()
}

// richHarness builds, through Apply only, a state with every kind of object:
// zoned nodes in every node state, volumes in every reachable lifecycle state,
// attachments, replicas in every state, a replaced replica, snapshots, and a
// deleted volume (tombstone).
func richHarness(t *testing.T) *harness {
	t.Helper()
	h := newHarness(t)
	h.must(&InitCluster{ClusterID: "rich", OverProvisioningRatio: 1.5})
	for i, z := range []string{"a", "a", "b", "b", "c", "c"} {
		id := nodeName(i + 1)
		h.must(&RegisterNode{Node: Node{
			ID: id, RaftAddr: id + ":7000", APIAddr: id + ":7001", DataAddr: id + ":7002",
			Zone: "zone-" + z, Region: "region-1", CapacityBytes: 100 * gib, FreeBytes: 90 * gib,
		}, Time: int64(1000 + i)})
	}
	h.must(&NodeHeartbeat{NodeID: "n2", CapacityBytes: 120 * gib, FreeBytes: 80 * gib, Time: 2000})

	// available, with parameters, all healthy
	h.must(&CreateVolume{ID: "v-avail", Name: "pvc-avail", SizeBytes: 5 * gib, Replicas: 3,
		Parameters: map[string]string{"replicas": "3", "fsType": "xfs"}, AccessType: "mount", CreatedAt: 1})
	// attached read-only, with a failed replica that was replaced (rebuilding)
	v := h.createVolume("v-att", 2, 3)
	h.must(&AttachVolume{VolumeID: "v-att", NodeID: v.Replicas[0].Node, ReadOnly: true, ExpectEpoch: v.Epoch})
	v = h.setReplica("v-att", v.Replicas[1].ID, ReplicaFailed)
	v = h.must(&ReplaceReplica{VolumeID: "v-att", ReplicaID: v.Replicas[1].ID, ExpectEpoch: v.Epoch}).Volume
	// ... whose rebuild is under way
	h.must(&RebuildProgressUpdate{VolumeID: "v-att", ReplicaID: v.Replicas[1].ID, BytesTotal: 2 * gib, BytesCompared: gib, BytesCopied: gib / 4})
	// releasing, exported over NBD
	v = h.createVolume("v-rel", 1, 2)
	h.attachNBD("v-rel", v.Replicas[1].Node, "/run/cairn/nbd/v-rel.sock")
	h.must(&SetVolumeState{VolumeID: "v-rel", State: VolumeReleasing})
	// provisioning, from a snapshot, with a stale replica
	h.must(&CreateSnapshot{ID: "s-1", Name: "vs-1", SourceVolumeID: "v-avail", CreatedAt: 5})
	h.must(&CreateVolume{ID: "v-prov", Name: "pvc-prov", SizeBytes: 5 * gib, Replicas: 2, WriteQuorum: 1, ContentSource: "s-1", CreatedAt: 6})
	v = h.volume("v-prov")
	h.setReplica("v-prov", v.Replicas[0].ID, ReplicaStale)
	// failed
	h.createVolume("v-fail", 1, 1)
	h.must(&SetVolumeState{VolumeID: "v-fail", State: VolumeFailed})
	// deleted (a tombstone), its name reused
	h.createVolume("v-del", 1, 2)
	h.must(&DeleteVolume{VolumeID: "v-del"})
	h.must(&CreateVolume{ID: "v-del2", Name: "pvc-v-del", SizeBytes: 1 * gib, Replicas: 2})
	h.must(&CreateSnapshot{ID: "s-2", Name: "vs-2", SourceVolumeID: "v-att", CreatedAt: 7})
	// node states: n5 down, n6 draining
	h.must(&SetNodeState{NodeID: "n5", State: NodeDown, Time: 3000})
	h.must(&SetNodeState{NodeID: "n6", State: NodeDraining, Time: 3001})
	return h
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	src := richHarness(t)
	want := src.state()
	// Sanity: the state is as rich as intended.
	states := map[VolumeState]bool{}
	for _, v := range want.Volumes {
		states[v.State] = true
	}
	for _, st := range []VolumeState{VolumeAvailable, VolumeAttached, VolumeReleasing, VolumeProvisioning, VolumeFailed, VolumeDeleted} {
		if !states[st] {
			t.Fatalf("rich state has no %s volume", st)
		}
	}
	if r := want.Volumes["v-att"].Rebuild; r == nil || r.BytesCompared == 0 {
		t.Fatalf("rich state has no rebuild progress: %+v", r)
	}
	if a := want.Volumes["v-rel"].Attachment; a == nil || a.NBDSocket == "" {
		t.Fatalf("rich state has no NBD attachment: %+v", a)
	}
	data := persist(t, src.f)

	dst := newHarness(t)
	dst.cluster(2, 1) // some previous state, which Restore must replace whole
	dst.createVolume("old", 1, 1)
	changed := dst.f.Changed()
	rc := &trackingReader{Reader: bytes.NewReader(data)}
	if err := dst.f.Restore(rc); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if rc.closed != 1 {
		t.Errorf("Restore closed its reader %d times, want 1", rc.closed)
	}
	if got := dst.state(); !reflect.DeepEqual(got, want) {
		t.Fatalf("restored state differs:\n got %s\nwant %s", dumpJSON(got), dumpJSON(want))
	}
	select {
	case <-changed:
	default:
		t.Error("Restore did not close the Changed channel")
	}
	// The restored FSM behaves like the original: the same command gives the
	// same result and the same state.
	for _, c := range []Command{
		&CreateVolume{ID: "v-new", Name: "pvc-new", SizeBytes: 3 * gib, Replicas: 3},
		&DetachVolume{VolumeID: "v-att", ExpectEpoch: want.Volumes["v-att"].Epoch},
		&ReplaceReplica{VolumeID: "v-prov", ReplicaID: want.Volumes["v-prov"].Replicas[0].ID, ExpectEpoch: want.Volumes["v-prov"].Epoch},
		&RebuildProgressUpdate{VolumeID: "v-att", ReplicaID: want.Volumes["v-att"].Rebuild.ReplicaID, BytesTotal: 2 * gib, BytesCompared: 2 * gib, BytesCopied: gib},
		&AttachVolume{VolumeID: "v-rel", NodeID: want.Volumes["v-rel"].Attachment.Node, NBDSocket: "/run/cairn/nbd/v-rel.sock"},
	} {
		r1, err1 := src.apply(c)
		r2, err2 := dst.apply(c)
		if err1 != nil || err2 != nil || !reflect.DeepEqual(r1, r2) {
			t.Fatalf("%T after restore: (%+v, %v) vs original (%+v, %v)", c, r2, err2, r1, err1)
		}
	}
	if a, b := src.state(), dst.state(); !reflect.DeepEqual(a, b) {
		t.Fatalf("states diverged after restore:\n%s\n%s", dumpJSON(a), dumpJSON(b))
	}
}

// TestSnapshotIsPointInTime: what Persist writes is the state at Snapshot(),
// whatever is applied between the two calls.
func TestSnapshotIsPointInTime(t *testing.T) {
	h := richHarness(t)
	want := h.state()
	snap, err := h.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	h.createVolume("later", 1, 1)
	h.must(&DeleteVolume{VolumeID: "v-avail"})
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	got, err := ReadSnapshot(&sink)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("snapshot holds later changes:\n%s", dumpJSON(got))
	}
}

func TestSnapshotPersistWriteErrorCancels(t *testing.T) {
	h := richHarness(t)
	snap, err := h.f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{failWrites: true}
	if err := snap.Persist(sink); err == nil {
		t.Fatal("Persist into a failing sink succeeded")
	}
	if sink.canceled != 1 || sink.closed != 0 {
		t.Fatalf("failed Persist: cancelled %d, closed %d; want 1, 0", sink.canceled, sink.closed)
	}
}

// TestWriteReadSnapshotEveryField sets every field of every type, including
// ones richHarness leaves at zero (RebuildProgress.Done), and an empty state.
func TestWriteReadSnapshotEveryField(t *testing.T) {
	full := NewState()
	full.ClusterID = "c"
	full.OverProvisioningRatio = 2.25
	full.Nodes["n1"] = &Node{ID: "n1", RaftAddr: "r", APIAddr: "a", DataAddr: "d", Zone: "z", Region: "rg",
		State: NodeDraining, CapacityBytes: 1 << 40, FreeBytes: 1 << 39, LastHeartbeat: -5}
	full.Volumes["v1"] = &Volume{ID: "v1", Name: "pvc", SizeBytes: 1 << 30,
		Parameters: map[string]string{"k": "v"}, AccessType: "block", State: VolumePending,
		ReplicaCount: 2, WriteQuorum: 1,
		Replicas:       []Replica{{ID: "v1-r1", Node: "n1", State: ReplicaHealthy}, {ID: "v1-r3", Node: "n2", State: ReplicaRebuilding}},
		Epoch:          1<<64 - 1,
		Attachment:     &Attachment{Node: "n1", ReadOnly: true, NBDSocket: "/run/cairn/nbd/v1.sock"},
		ContentSource:  "vol-0",
		Rebuild:        &RebuildProgress{ReplicaID: "v1-r3", BytesTotal: 1 << 30, BytesCompared: 1 << 29, BytesCopied: 1 << 20, Done: true},
		NextReplicaSeq: 3, CreatedAt: 99}
	full.Snapshots["s1"] = &Snapshot{ID: "s1", Name: "vs", SourceVolumeID: "v1", SizeBytes: 1 << 30, CreatedAt: 100, ReadyToUse: true}
	n1, s1 := *full.Nodes["n1"], *full.Snapshots["s1"]
	full.Requests = []RequestRecord{
		{ID: "req-1", Result: Result{Volume: full.Volumes["v1"].Clone(), Node: &n1, Snapshot: &s1}},
		{ID: "req-2", Err: &WireError{Code: "epoch_mismatch", Message: "volume v1 is at epoch 3, caller saw 2: epoch changed"}},
		{ID: "req-3", Err: &WireError{Code: "internal", Message: "something else"}},
	}

	for name, s := range map[string]*State{"empty": NewState(), "every field": full} {
		t.Run(name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := WriteSnapshot(&buf, s); err != nil {
				t.Fatal(err)
			}
			got, err := ReadSnapshot(&buf)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, s) {
				t.Fatalf("round trip:\n got %s\nwant %s", dumpJSON(got), dumpJSON(s))
			}
		})
	}
}

// TestSnapshotHeaderFormat pins the stream layout: magic, body length
// (uint64 BE), CRC32C of the body (uint32 BE), body.
func TestSnapshotHeaderFormat(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteSnapshot(&buf, NewState()); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	if string(b[:8]) != "CAIRNSN1" {
		t.Fatalf("magic = %q", b[:8])
	}
	body := b[20:]
	if n := binary.BigEndian.Uint64(b[8:16]); n != uint64(len(body)) {
		t.Fatalf("length field %d, body %d bytes", n, len(body))
	}
	if c := binary.BigEndian.Uint32(b[16:20]); c != crc32.Checksum(body, crc32.MakeTable(crc32.Castagnoli)) {
		t.Fatalf("checksum field %08x does not match the body", c)
	}
}

// snapshotWithBody frames body as a snapshot with a correct header, so the
// checks after the checksum can be reached.
func snapshotWithBody(body string) []byte {
	hdr := make([]byte, 20)
	copy(hdr, "CAIRNSN1")
	binary.BigEndian.PutUint64(hdr[8:16], uint64(len(body)))
	binary.BigEndian.PutUint32(hdr[16:20], crc32.Checksum([]byte(body), crc32.MakeTable(crc32.Castagnoli)))
	return append(hdr, body...)
}

func TestRestoreCorruptSnapshotKeepsState(t *testing.T) {
	good := persist(t, richHarness(t).f)
	mutate := func(fn func(b []byte) []byte) []byte { return fn(bytes.Clone(good)) }
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"bad magic", mutate(func(b []byte) []byte { b[0] = 'X'; return b })},
		{"other format version", mutate(func(b []byte) []byte { b[7] = '2'; return b })},
		{"truncated magic", good[:5]},
		{"truncated header", good[:12]},
		{"header only", good[:20]},
		{"truncated body", good[:len(good)-1]},
		{"half body", good[:20+(len(good)-20)/2]},
		{"flipped byte in body", mutate(func(b []byte) []byte { b[20+(len(b)-20)/2] ^= 0x01; return b })},
		{"flipped last byte", mutate(func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b })},
		{"flipped checksum", mutate(func(b []byte) []byte { b[18] ^= 0xff; return b })},
		{"length one short", mutate(func(b []byte) []byte {
			binary.BigEndian.PutUint64(b[8:16], uint64(len(b)-21))
			return b
		})},
		{"length one long", mutate(func(b []byte) []byte {
			binary.BigEndian.PutUint64(b[8:16], uint64(len(b)-19))
			return b
		})},
		{"huge length", mutate(func(b []byte) []byte { binary.BigEndian.PutUint64(b[8:16], 1<<62); return b })},
		{"max length", mutate(func(b []byte) []byte { binary.BigEndian.PutUint64(b[8:16], 1<<64-1); return b })},
		{"length just over limit", mutate(func(b []byte) []byte {
			binary.BigEndian.PutUint64(b[8:16], maxSnapshotBytes+1)
			return b
		})},
		// Correct framing and checksum, bad content.
		{"body not JSON", snapshotWithBody("not json")},
		{"nodes null", snapshotWithBody(`{"cluster_id":"x","nodes":null,"volumes":{},"snapshots":{}}`)},
		{"volumes null", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":null,"snapshots":{}}`)},
		{"snapshots null", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":{},"snapshots":null}`)},
		{"unknown volume field type", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":{"v":{"epoch":"one"}},"snapshots":{}}`)},
		{"snapshots wrong type", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":{},"snapshots":[]}`)},
		{"requests wrong type", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":{},"snapshots":{},"requests":{}}`)},
		{"request id wrong type", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":{},"snapshots":{},"requests":[{"id":1}]}`)},
		{"request error wrong type", snapshotWithBody(`{"cluster_id":"x","nodes":{},"volumes":{},"snapshots":{},"requests":[{"id":"r","error":"not_found"}]}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.createVolume("keep", 1, 3)
			before := h.state()
			rc := &trackingReader{Reader: bytes.NewReader(tt.data)}
			err := h.f.Restore(rc)
			if err == nil {
				t.Fatalf("Restore of a corrupt snapshot succeeded; state now %s", dumpJSON(h.state()))
			}
			if rc.closed != 1 {
				t.Errorf("Restore closed its reader %d times, want 1", rc.closed)
			}
			if after := h.state(); !reflect.DeepEqual(before, after) {
				t.Fatalf("failed Restore (%v) changed the state:\n%s", err, dumpJSON(after))
			}
			if _, err := ReadSnapshot(bytes.NewReader(tt.data)); err == nil {
				t.Fatal("ReadSnapshot accepted it")
			}
		})
	}
}

// TestRestoreMissingCollections: WriteSnapshot always writes every
// collection, so a well-framed body that leaves one out (or holds a null
// entry) is corrupt: Restore refuses it and keeps the state it had.
func TestRestoreMissingCollections(t *testing.T) {
	for _, body := range []string{`{}`, `null`, `{"cluster_id":"test-cluster","nodes":{}}`,
		`{"nodes":{"x":null},"volumes":{},"snapshots":{}}`,
		`{"nodes":{},"volumes":{"v":null},"snapshots":{}}`,
		`{"nodes":{},"volumes":{},"snapshots":{"s":null}}`} {
		t.Run(body, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(1, 10)
			before := h.state()
			if err := h.f.Restore(&trackingReader{Reader: bytes.NewReader(snapshotWithBody(body))}); err == nil {
				t.Fatalf("Restore accepted %s", body)
			}
			if after := h.state(); !reflect.DeepEqual(before, after) {
				t.Fatalf("refused Restore changed the state")
			}
		})
	}
}

// TestSnapshotRequestsJSON pins the request table's part of the snapshot
// format. An empty table is left out, so a state without requests encodes
// as it did before requests existed.
func TestSnapshotRequestsJSON(t *testing.T) {
	s := NewState()
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"cluster_id":"","over_provisioning_ratio":0,"nodes":{},"volumes":{},"snapshots":{}}`; string(b) != want {
		t.Errorf("empty state = %s, want %s", b, want)
	}
	s.Requests = []RequestRecord{
		{ID: "r1", Result: Result{Snapshot: &Snapshot{ID: "s1", Name: "vs", SourceVolumeID: "v1", SizeBytes: 1, CreatedAt: 2}}},
		{ID: "r2", Err: &WireError{Code: "not_found", Message: `volume "v": not found`}},
	}
	if b, err = json.Marshal(s); err != nil {
		t.Fatal(err)
	}
	want := `{"cluster_id":"","over_provisioning_ratio":0,"nodes":{},"volumes":{},"snapshots":{},"requests":[` +
		`{"id":"r1","result":{"snapshot":{"id":"s1","name":"vs","source_volume_id":"v1","size":1,"created_at":2,"ready_to_use":false}}},` +
		`{"id":"r2","result":{},"error":{"code":"not_found","message":"volume \"v\": not found"}}]}`
	if string(b) != want {
		t.Errorf("state with requests =\n%s\nwant\n%s", b, want)
	}
}

// TestSnapshotRestoreRemembersRequests: the request table travels in the
// snapshot. A restored FSM answers a repeated id as the original would,
// without applying it, and forgets the requests of the state it replaced:
// its index is rebuilt from the restored table, not kept from before.
func TestSnapshotRestoreRemembersRequests(t *testing.T) {
	src := newHarness(t)
	src.cluster(3, 10)
	create := &CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 3}
	created := src.must(wrap(t, "req-create", create))
	missing := &DeleteVolume{VolumeID: "nope"}
	_, failed := src.apply(wrap(t, "req-fail", missing))
	if !errors.Is(failed, ErrNotFound) {
		t.Fatalf("delete of an unknown volume: %v", failed)
	}
	// A compare-and-set: applied again, it would fail.
	stale := &SetReplicaState{VolumeID: "v1", ReplicaID: created.Volume.Replicas[0].ID, State: ReplicaStale, ExpectEpoch: created.Volume.Epoch}
	marked := src.must(wrap(t, "req-stale", stale))
	want := src.state()
	data := persist(t, src.f)

	// The FSM restored into remembers requests of its own, two under ids
	// the snapshot also has, with other answers at other places.
	dst := newHarness(t)
	dst.cluster(2, 10)
	other := &CreateVolume{ID: "old", Name: "pvc-old", SizeBytes: gib, Replicas: 1}
	dst.must(wrap(t, "req-old", other))
	dst.must(wrap(t, "req-fail", &RegisterNode{Node: Node{ID: "n9", RaftAddr: "n9:7000", APIAddr: "n9:7001"}}))
	if _, err := dst.apply(wrap(t, "req-create", missing)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delete of an unknown volume: %v", err)
	}
	if err := dst.f.Restore(&trackingReader{Reader: bytes.NewReader(data)}); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if got := dst.state(); !reflect.DeepEqual(got, want) {
		t.Fatalf("restored state differs:\n got %s\nwant %s", dumpJSON(got), dumpJSON(want))
	}

	type answer struct {
		res Result
		err error
	}
	answers := map[string]answer{"req-create": {created, nil}, "req-fail": {Result{}, failed}, "req-stale": {marked, nil}}
	for _, tt := range []struct {
		id string
		c  Command
	}{
		{"req-create", create},
		{"req-fail", missing},
		{"req-stale", stale},
		{"req-stale", missing}, // another command under a remembered id
		{"req-old", other},     // only the replaced state knew it
		{"req-old", other},
	} {
		res, err := dst.apply(wrap(t, tt.id, tt.c))
		a, remembered := answers[tt.id]
		if !remembered {
			// New here as in the original: both apply it alike.
			wantRes, wantErr := src.apply(wrap(t, tt.id, tt.c))
			if wantErr != nil {
				t.Fatalf("original, %s: %v", tt.id, wantErr)
			}
			a = answer{wantRes, wantErr}
			answers[tt.id] = a
			want = src.state()
		}
		sameAnswer(t, "restored FSM, "+tt.id, res, err, a.res, a.err)
		if got := dst.state(); !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: restored FSM and original differ:\n got %s\nwant %s", tt.id, dumpJSON(got), dumpJSON(want))
		}
	}
	if dst.volume("old") == nil {
		t.Fatal("req-old, new to the restored FSM, was not applied")
	}
}

// TestRestoreSnapshotWithoutRequests: a snapshot written before requests
// existed has no table; the restored FSM starts one.
func TestRestoreSnapshotWithoutRequests(t *testing.T) {
	h := newHarness(t)
	h.restoreState(NewState())
	register := func(time int64) Command {
		return &RegisterNode{Node: Node{ID: "n1", RaftAddr: "n1:7000", APIAddr: "n1:7001"}, Time: time}
	}
	first := h.must(wrap(t, "r1", register(1)))
	res, err := h.apply(wrap(t, "r1", register(2)))
	sameAnswer(t, "repeated request", res, err, first, nil)
	if n := h.node("n1"); n == nil || n.LastHeartbeat != 1 {
		t.Fatalf("node after a repeated request: %+v, want the first registration (heartbeat 1)", n)
	}
}
