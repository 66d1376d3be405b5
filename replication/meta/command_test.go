package meta

import (
	"bytes"
	"errors"
	"reflect"
	"testing"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// fullCommands returns one command of every type with every field set, so a
// round trip exercises every JSON name. The test below fails when a command
// type is added without a case here.
func fullCommands() []Command {
	return []Command{
		&InitCluster{ClusterID: "c1", OverProvisioningRatio: 1.5},
		&RegisterNode{Node: Node{
			ID: "n1", RaftAddr: "10.0.0.1:7000", APIAddr: "10.0.0.1:7001", DataAddr: "10.0.0.1:7002",
			Zone: "zone-a", Region: "region-1", State: NodeDraining,
			CapacityBytes: 100 << 30, FreeBytes: 40 << 30, LastHeartbeat: 1_700_000_000_000_000_000,
		}, Time: 1_700_000_000_000_000_001},
		&NodeHeartbeat{NodeID: "n1", CapacityBytes: 100 << 30, FreeBytes: 39 << 30, Time: 42},
		&SetNodeState{NodeID: "n1", State: NodeDown, Time: 43},
		&CreateVolume{
			ID: "vol-1", Name: "pvc-1", SizeBytes: 1 << 30,
			Parameters: map[string]string{"replicas": "3", "dataLocality": "best-effort"},
			AccessType: "block", Replicas: 3, WriteQuorum: 2, ContentSource: "snap-0",
			AllowedZones: []string{"zone-a", "zone-b"}, PreferredNode: "n1", CreatedAt: 44,
		},
		&DeleteVolume{VolumeID: "vol-1"},
		&AttachVolume{VolumeID: "vol-1", NodeID: "n2", ReadOnly: true, ExpectEpoch: 7, NBDSocket: "/run/cairn/nbd/vol-1.sock"},
		&DetachVolume{VolumeID: "vol-1", NodeID: "n2", ExpectEpoch: 8},
		&SetReplicaState{VolumeID: "vol-1", ReplicaID: "vol-1-r2", State: ReplicaStale, ExpectEpoch: 9},
		&ReplaceReplica{VolumeID: "vol-1", ReplicaID: "vol-1-r2", ExpectEpoch: 10},
		&SetVolumeState{VolumeID: "vol-1", State: VolumeReleasing},
		&CreateSnapshot{ID: "snap-1", Name: "vs-1", SourceVolumeID: "vol-1", CreatedAt: 45},
		&DeleteSnapshot{SnapshotID: "snap-1"},
		&PurgeVolume{VolumeID: "vol-1"},
		&RebuildProgressUpdate{VolumeID: "vol-1", ReplicaID: "vol-1-r4", BytesTotal: 1 << 30,
			BytesCompared: 1 << 29, BytesCopied: 1 << 20, Done: true},
		&Request{ID: "req-1", Command: []byte{byte(CmdDeleteVolume), 1, '{', '}'}},
		// An empty value (remove the key) must survive the round trip too.
		&SetParameters{VolumeID: "vol-1", Parameters: map[string]string{
			volspec.KeyMaxIOPS: "500", volspec.KeyMinIOPS: "100", volspec.KeyMaxBandwidth: "104857600", volspec.KeyBurstDuration: ""}},
		&SetReplicaGeneration{VolumeID: "vol-1", ReplicaID: "vol-1-r2", Generation: "00112233445566778899aabbccddeeff", Expect: "ffeeddccbbaa99887766554433221100"},
		&AdvanceEpoch{VolumeID: "vol-1", NodeID: "n2", ExpectEpoch: 11},
		&SetVolumeCondition{VolumeID: "vol-1", Abnormal: true, Message: "block 7 verifies on no replica"},
		&ScrubProgressUpdate{VolumeID: "vol-1", Progress: ScrubProgress{Seq: 2, BlocksTotal: 100, BlocksChecked: 100,
			Repaired: 1, Unrecoverable: 1, Done: true, Error: "e", StartedAt: 46, FinishedAt: 47}},
		&ExpandVolume{VolumeID: "vol-1", SizeBytes: 2 << 30},
		&SetSnapshotReady{SnapshotID: "snap-1", Replicas: []string{"vol-1-r1"}},
		&SetSnapshotReady{SnapshotID: "snap-1", Error: "e"},
		&MarkSnapshotDeleting{SnapshotID: "snap-1"},
		&RestoreVolume{CreateVolume: CreateVolume{ID: "vol-2", Name: "n", SizeBytes: 1 << 30, Replicas: 3, ContentSource: "snapshot:snap-1", CreatedAt: 48}, SnapshotID: "snap-1"},
		&RetireVolume{VolumeID: "vol-1"},
		&RecordUsage{VolumeID: "vol-1", ReplicaID: "vol-1-r1", AllocatedBytes: 7, Snapshots: map[string]SnapshotSpace{"snap-1": {HeldBytes: 5, AloneBytes: 2}}},
		&SetNodeReservable{NodeID: "node-1", IOPS: 20000},
		&SetNodeDisks{NodeID: "node-1", Disks: map[string]DiskSpace{"hdd": {CapacityBytes: 1 << 40, FreeBytes: 1 << 39}}},
		&AdmitVolume{CreateVolume: CreateVolume{ID: "vol-3", Name: "g", SizeBytes: 1 << 30, Replicas: 3,
			Parameters: map[string]string{"qosClass": "guaranteed", "minIOPS": "100"}, CreatedAt: 49}},
		&AsNode{Node: "n2", Command: []byte{byte(CmdSetVolumeCondition), 1, '{', '}'}},
	}
}

// allCommandTypes lists every command type; types are append-only.
var allCommandTypes = []CommandType{
	CmdInitCluster, CmdRegisterNode, CmdNodeHeartbeat, CmdSetNodeState,
	CmdCreateVolume, CmdDeleteVolume, CmdAttachVolume, CmdDetachVolume,
	CmdSetReplicaState, CmdReplaceReplica, CmdSetVolumeState,
	CmdCreateSnapshot, CmdDeleteSnapshot, CmdPurgeVolume, CmdRebuildProgress, CmdRequest,
	CmdSetParameters, CmdSetReplicaGeneration,
}

// TestCommandTypeNumbersAreStable pins the on-disk type numbers: changing one
// makes every existing log unreadable.
func TestCommandTypeNumbersAreStable(t *testing.T) {
	for i, ct := range allCommandTypes {
		if want := CommandType(i + 1); ct != want {
			t.Errorf("command type #%d is %d, want %d (types are append-only)", i, ct, want)
		}
	}
	tests := []struct {
		t    CommandType
		want Command
	}{
		{0, nil},
		{CmdInitCluster, &InitCluster{}},
		{CmdRegisterNode, &RegisterNode{}},
		{CmdNodeHeartbeat, &NodeHeartbeat{}},
		{CmdSetNodeState, &SetNodeState{}},
		{CmdCreateVolume, &CreateVolume{}},
		{CmdDeleteVolume, &DeleteVolume{}},
		{CmdAttachVolume, &AttachVolume{}},
		{CmdDetachVolume, &DetachVolume{}},
		{CmdSetReplicaState, &SetReplicaState{}},
		{CmdReplaceReplica, &ReplaceReplica{}},
		{CmdSetVolumeState, &SetVolumeState{}},
		{CmdCreateSnapshot, &CreateSnapshot{}},
		{CmdDeleteSnapshot, &DeleteSnapshot{}},
		{CmdPurgeVolume, &PurgeVolume{}},
		{CmdRebuildProgress, &RebuildProgressUpdate{}},
		{CmdRequest, &Request{}},
		{CmdSetParameters, &SetParameters{}},
		{CmdSetReplicaGeneration, &SetReplicaGeneration{}},
		{CmdAdvanceEpoch, &AdvanceEpoch{}},
		{CmdSetVolumeCondition, &SetVolumeCondition{}},
		{CmdScrubProgress, &ScrubProgressUpdate{}},
		{CmdExpandVolume, &ExpandVolume{}},
		{CmdSetSnapshotReady, &SetSnapshotReady{}},
		{CmdMarkSnapshotDeleting, &MarkSnapshotDeleting{}},
		{CmdRestoreVolume, &RestoreVolume{}},
		{CmdRetireVolume, &RetireVolume{}},
		{CmdRecordUsage, &RecordUsage{}},
		{CmdSetNodeReservable, &SetNodeReservable{}},
		{CmdAdmitVolume, &AdmitVolume{}},
		{CmdSetNodeDisks, &SetNodeDisks{}},
		{CmdLeaseNonces, &LeaseNonces{}},
		{CmdReportLag, &ReportLag{}},
		{CmdPromoteVolume, &PromoteVolume{}},
		{CmdAsNode, &AsNode{}},
		{CmdSetNodeDedup, &SetNodeDedup{}},
		{CmdRecordReplicaSpace, &RecordReplicaSpace{}},
		{CmdSetNodeFeatures, &SetNodeFeatures{}},
		{CmdSetNodeFeatures + 1, nil},
		{200, nil},
		{255, nil},
	}
	for _, tt := range tests {
		got := newCommand(tt.t)
		if !reflect.DeepEqual(got, tt.want) {
			t.Errorf("newCommand(%d) = %#v, want %#v", tt.t, got, tt.want)
			continue
		}
		if got != nil && got.Type() != tt.t {
			t.Errorf("newCommand(%d).Type() = %d", tt.t, got.Type())
		}
	}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	seen := map[CommandType]bool{}
	for _, c := range fullCommands() {
		seen[c.Type()] = true
		t.Run(reflect.TypeOf(c).Elem().Name(), func(t *testing.T) {
			b, err := Encode(c)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			if len(b) < 2 || CommandType(b[0]) != c.Type() || b[1] != commandVersion {
				t.Fatalf("Encode header = % x, want type %d version %d", b[:min(len(b), 2)], c.Type(), commandVersion)
			}
			got, err := Decode(b)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if reflect.TypeOf(got).Kind() != reflect.Pointer {
				t.Fatalf("Decode returned %T, want a pointer", got)
			}
			if !reflect.DeepEqual(got, c) {
				t.Fatalf("round trip:\n got %#v\nwant %#v", got, c)
			}
			// A command passed by value encodes the same and decodes to the pointer.
			byValue := reflect.ValueOf(c).Elem().Interface().(Command)
			b2, err := Encode(byValue)
			if err != nil {
				t.Fatalf("Encode by value: %v", err)
			}
			if !bytes.Equal(b, b2) {
				t.Fatalf("Encode(value) = %q, Encode(pointer) = %q", b2, b)
			}
			// Zero values round-trip too.
			zero := newCommand(c.Type())
			bz, err := Encode(zero)
			if err != nil {
				t.Fatalf("Encode zero: %v", err)
			}
			gz, err := Decode(bz)
			if err != nil || !reflect.DeepEqual(gz, zero) {
				t.Fatalf("zero round trip = %#v, %v; want %#v", gz, err, zero)
			}
		})
	}
	for _, ct := range allCommandTypes {
		if !seen[ct] {
			t.Errorf("command type %d has no round-trip case in fullCommands", ct)
		}
	}
}

// TestEncodeGolden pins the wire format: type byte, version byte, and the
// JSON names of every field, which are part of the on-disk log.
func TestEncodeGolden(t *testing.T) {
	tests := []struct {
		c    Command
		want string
	}{
		{&InitCluster{ClusterID: "c1", OverProvisioningRatio: 1.5},
			"\x01\x01" + `{"cluster_id":"c1","over_provisioning_ratio":1.5}`},
		{&RegisterNode{Node: Node{ID: "n1", RaftAddr: "r:1", APIAddr: "a:1", DataAddr: "d:1", Zone: "z", Region: "rg", State: NodeUp, CapacityBytes: 10, FreeBytes: 5, LastHeartbeat: 7}, Time: 8},
			"\x02\x01" + `{"node":{"id":"n1","raft_addr":"r:1","api_addr":"a:1","data_addr":"d:1","zone":"z","region":"rg","state":"up","capacity_bytes":10,"free_bytes":5,"last_heartbeat":7},"time":8}`},
		{&NodeHeartbeat{NodeID: "n1", CapacityBytes: 10, FreeBytes: 5, Time: 9},
			"\x03\x01" + `{"node_id":"n1","capacity_bytes":10,"free_bytes":5,"time":9}`},
		{&SetNodeState{NodeID: "n1", State: NodeDraining, Time: 9},
			"\x04\x01" + `{"node_id":"n1","state":"draining","time":9}`},
		{&CreateVolume{ID: "v1", Name: "pvc-1", SizeBytes: 1024, Parameters: map[string]string{"replicas": "3"}, AccessType: "block", Replicas: 3, WriteQuorum: 2, ContentSource: "snap-1", AllowedZones: []string{"a"}, PreferredNode: "n1", CreatedAt: 11},
			"\x05\x01" + `{"id":"v1","name":"pvc-1","size":1024,"parameters":{"replicas":"3"},"access_type":"block","replicas":3,"write_quorum":2,"content_source":"snap-1","allowed_zones":["a"],"preferred_node":"n1","created_at":11}`},
		{&DeleteVolume{VolumeID: "v1"},
			"\x06\x01" + `{"volume_id":"v1"}`},
		{&AttachVolume{VolumeID: "v1", NodeID: "n1", ReadOnly: true, ExpectEpoch: 3},
			"\x07\x01" + `{"volume_id":"v1","node_id":"n1","read_only":true,"expect_epoch":3}`},
		{&AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: 3, NBDSocket: "/run/cairn/v1.sock"},
			"\x07\x01" + `{"volume_id":"v1","node_id":"n1","expect_epoch":3,"nbd_socket":"/run/cairn/v1.sock"}`},
		{&DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: 4},
			"\x08\x01" + `{"volume_id":"v1","node_id":"n1","expect_epoch":4}`},
		{&SetReplicaState{VolumeID: "v1", ReplicaID: "v1-r1", State: ReplicaFailed, ExpectEpoch: 5},
			"\x09\x01" + `{"volume_id":"v1","replica_id":"v1-r1","state":"failed","expect_epoch":5}`},
		{&ReplaceReplica{VolumeID: "v1", ReplicaID: "v1-r1", ExpectEpoch: 6},
			"\x0a\x01" + `{"volume_id":"v1","replica_id":"v1-r1","expect_epoch":6}`},
		{&SetVolumeState{VolumeID: "v1", State: VolumeFailed},
			"\x0b\x01" + `{"volume_id":"v1","state":"failed"}`},
		{&CreateSnapshot{ID: "s1", Name: "snap", SourceVolumeID: "v1", CreatedAt: 12},
			"\x0c\x01" + `{"id":"s1","name":"snap","source_volume_id":"v1","created_at":12}`},
		{&DeleteSnapshot{SnapshotID: "s1"},
			"\x0d\x01" + `{"snapshot_id":"s1"}`},
		{&PurgeVolume{VolumeID: "v1"},
			"\x0e\x01" + `{"volume_id":"v1"}`},
		{&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: "v1-r4", BytesTotal: 1024, BytesCompared: 512, BytesCopied: 256, Done: true},
			"\x0f\x01" + `{"volume_id":"v1","replica_id":"v1-r4","bytes_total":1024,"bytes_compared":512,"bytes_copied":256,"done":true}`},
		{&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: "v1-r4", BytesTotal: 1024, BytesCompared: 1024},
			"\x0f\x01" + `{"volume_id":"v1","replica_id":"v1-r4","bytes_total":1024,"bytes_compared":1024,"bytes_copied":0}`},
		// The inner command travels as base64: "BgF7fQ==" is \x06\x01{}.
		{&Request{ID: "req-1", Command: []byte("\x06\x01{}")},
			"\x10\x01" + `{"id":"req-1","command":"BgF7fQ=="}`},
		{&Request{ID: "req-2", Command: []byte("\x06\x01" + `{"volume_id":"v1"}`)},
			"\x10\x01" + `{"id":"req-2","command":"BgF7InZvbHVtZV9pZCI6InYxIn0="}`},
		{&Request{ID: "req-3"},
			"\x10\x01" + `{"id":"req-3","command":null}`},
		// Map keys are written sorted, so the bytes are stable; an empty
		// value (remove the key) is written as "".
		{&SetParameters{VolumeID: "v1", Parameters: map[string]string{volspec.KeyMaxIOPS: "500", volspec.KeyMinIOPS: "", volspec.KeyBurstDuration: "2s", volspec.KeyMaxBandwidth: "1048576"}},
			"\x11\x01" + `{"volume_id":"v1","parameters":{"burstDuration":"2s","maxBandwidth":"1048576","maxIOPS":"500","minIOPS":""}}`},
		{&SetParameters{VolumeID: "v1"},
			"\x11\x01" + `{"volume_id":"v1","parameters":null}`},
	}
	for _, tt := range tests {
		t.Run(reflect.TypeOf(tt.c).Elem().Name(), func(t *testing.T) {
			got, err := Encode(tt.c)
			if err != nil {
				t.Fatalf("Encode: %v", err)
			}
			if string(got) != tt.want {
				t.Errorf("Encode =\n%q\nwant\n%q", got, tt.want)
			}
			// And an entry written by this format still decodes.
			c, err := Decode([]byte(tt.want))
			if err != nil || !reflect.DeepEqual(c, tt.c) {
				t.Errorf("Decode(golden) = %#v, %v; want %#v", c, err, tt.c)
			}
		})
	}
}

func cmdBytes(t CommandType, version byte, body string) []byte {
	return append([]byte{byte(t), version}, body...)
}

func TestDecodeBadBytes(t *testing.T) {
	const okBody = `{"cluster_id":"c1"}`
	tests := []struct {
		name string
		b    []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"one byte", []byte{byte(CmdInitCluster)}},
		{"one byte zero", []byte{0}},
		{"header only", []byte{byte(CmdInitCluster), commandVersion}},
		{"unknown type 0", cmdBytes(0, commandVersion, okBody)},
		{"unknown type 38", cmdBytes(CmdSetNodeFeatures+1, commandVersion, `{}`)},
		{"unknown type 200", cmdBytes(200, commandVersion, okBody)},
		{"unknown type 255", cmdBytes(255, commandVersion, `{}`)},
		{"version 0", cmdBytes(CmdInitCluster, 0, okBody)},
		{"version 2", cmdBytes(CmdInitCluster, 2, okBody)},
		{"version 255", cmdBytes(CmdInitCluster, 255, okBody)},
		{"type 0 version 0", []byte{0, 0}},
		{"whitespace body", cmdBytes(CmdInitCluster, commandVersion, " \n\t")},
		{"bad JSON", cmdBytes(CmdInitCluster, commandVersion, `{"cluster_id":`)},
		{"open brace", cmdBytes(CmdInitCluster, commandVersion, `{`)},
		{"not JSON", cmdBytes(CmdInitCluster, commandVersion, `hello`)},
		{"binary body", cmdBytes(CmdInitCluster, commandVersion, "\x00\xff\xfe")},
		{"array body", cmdBytes(CmdInitCluster, commandVersion, `[]`)},
		{"string body", cmdBytes(CmdInitCluster, commandVersion, `"c1"`)},
		{"number body", cmdBytes(CmdDeleteVolume, commandVersion, `6`)},
		{"wrong field type", cmdBytes(CmdInitCluster, commandVersion, `{"cluster_id":5}`)},
		{"float for int", cmdBytes(CmdCreateVolume, commandVersion, `{"replicas":1.5}`)},
		{"negative for uint", cmdBytes(CmdCreateVolume, commandVersion, `{"size":-1}`)},
		{"overflowing uint", cmdBytes(CmdAttachVolume, commandVersion, `{"expect_epoch":18446744073709551616}`)},
		{"overflowing float", cmdBytes(CmdInitCluster, commandVersion, `{"over_provisioning_ratio":1e400}`)},
		{"unknown field", cmdBytes(CmdInitCluster, commandVersion, `{"cluster_id":"c1","bogus":1}`)},
		{"unknown nested field", cmdBytes(CmdRegisterNode, commandVersion, `{"node":{"id":"n1","bogus":1}}`)},
		{"field of another command", cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":"v","expect_epoch":1}`)},
		{"trailing garbage", cmdBytes(CmdInitCluster, commandVersion, okBody+` x`)},
		{"trailing object", cmdBytes(CmdInitCluster, commandVersion, okBody+`{}`)},
		{"trailing number", cmdBytes(CmdInitCluster, commandVersion, okBody+`1`)},
		{"trailing comma", cmdBytes(CmdInitCluster, commandVersion, okBody+`,`)},
		// dec.More() reports false before a closing delimiter, so these two
		// were once accepted.
		{"trailing close brace", cmdBytes(CmdInitCluster, commandVersion, okBody+`}`)},
		{"trailing close bracket", cmdBytes(CmdInitCluster, commandVersion, okBody+`]`)},
		{"trailing open string", cmdBytes(CmdInitCluster, commandVersion, okBody+`"`)},
		{"trailing NUL", cmdBytes(CmdInitCluster, commandVersion, okBody+"\x00")},
		{"negative rebuild total", cmdBytes(CmdRebuildProgress, commandVersion, `{"volume_id":"v","replica_id":"r","bytes_total":-1}`)},
		{"overflowing rebuild count", cmdBytes(CmdRebuildProgress, commandVersion, `{"bytes_copied":18446744073709551616}`)},
		{"float rebuild count", cmdBytes(CmdRebuildProgress, commandVersion, `{"bytes_compared":0.5}`)},
		{"string for done", cmdBytes(CmdRebuildProgress, commandVersion, `{"volume_id":"v","done":"true"}`)},
		{"number for done", cmdBytes(CmdRebuildProgress, commandVersion, `{"volume_id":"v","done":1}`)},
		{"rebuild progress with an epoch", cmdBytes(CmdRebuildProgress, commandVersion, `{"volume_id":"v","replica_id":"r","expect_epoch":1}`)},
		{"rebuild progress with a state", cmdBytes(CmdRebuildProgress, commandVersion, `{"volume_id":"v","replica_id":"r","state":"healthy"}`)},
		{"rebuild progress body is an array", cmdBytes(CmdRebuildProgress, commandVersion, `[]`)},
		{"rebuild progress trailing brace", cmdBytes(CmdRebuildProgress, commandVersion, `{"volume_id":"v"}}`)},
		{"number for nbd_socket", cmdBytes(CmdAttachVolume, commandVersion, `{"volume_id":"v","nbd_socket":5}`)},
		{"nbd socket in detach", cmdBytes(CmdDetachVolume, commandVersion, `{"volume_id":"v","nbd_socket":"/s"}`)},
		{"request command not base64", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":"!!"}`)},
		{"request command unpadded base64", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":"BgF7fQ"}`)},
		{"request command is a number", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":6}`)},
		{"request command is an object", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":{"volume_id":"v"}}`)},
		{"request command byte out of range", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":[6,1,256]}`)},
		{"request id is a number", cmdBytes(CmdRequest, commandVersion, `{"id":1,"command":"BgF7fQ=="}`)},
		{"request with the fields of its command", cmdBytes(CmdRequest, commandVersion, `{"id":"r","volume_id":"v"}`)},
		{"request trailing brace", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":"BgF7fQ=="}}`)},
		{"request body is an array", cmdBytes(CmdRequest, commandVersion, `[]`)},
		{"set parameters is an array", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":["maxIOPS","5"]}`)},
		{"set parameters is a string", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":"maxIOPS=5"}`)},
		{"set parameters value is a number", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":500}}`)},
		{"set parameters value is a bool", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":true}}`)},
		{"set parameters value is an object", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":{"v":"5"}}}`)},
		{"set parameters volume id is a number", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":1,"parameters":{}}`)},
		{"set parameters with an epoch", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{},"expect_epoch":1}`)},
		{"set parameters with the create field name", cmdBytes(CmdSetParameters, commandVersion, `{"id":"v","parameters":{}}`)},
		{"set parameters trailing brace", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":"5"}}}`)},
		{"set parameters unterminated map", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":"5"`)},
		{"set parameters body is an array", cmdBytes(CmdSetParameters, commandVersion, `[]`)},
		{"second command", append(cmdBytes(CmdInitCluster, commandVersion, okBody), cmdBytes(CmdInitCluster, commandVersion, okBody)...)},
	}
	// Every command type refuses a field it does not have.
	for _, ct := range allCommandTypes {
		tests = append(tests, struct {
			name string
			b    []byte
		}{"unknown field in type " + reflect.TypeOf(newCommand(ct)).Elem().Name(), cmdBytes(ct, commandVersion, `{"not_a_field":true}`)})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Decode(tt.b)
			if !errors.Is(err, ErrBadCommand) {
				t.Fatalf("Decode(%q) = %#v, %v; want an error wrapping ErrBadCommand", tt.b, c, err)
			}
			if c != nil {
				t.Errorf("Decode(%q) returned command %#v with its error", tt.b, c)
			}
		})
	}
}

func TestDecodeAccepts(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
		want Command
	}{
		{"trailing whitespace", cmdBytes(CmdInitCluster, commandVersion, "{\"cluster_id\":\"c1\"} \r\n\t"),
			&InitCluster{ClusterID: "c1"}},
		{"leading whitespace", cmdBytes(CmdDeleteVolume, commandVersion, " \n{\"volume_id\":\"v\"}"),
			&DeleteVolume{VolumeID: "v"}},
		{"missing fields are zero", cmdBytes(CmdAttachVolume, commandVersion, `{"volume_id":"v"}`),
			&AttachVolume{VolumeID: "v"}},
		{"empty object", cmdBytes(CmdPurgeVolume, commandVersion, `{}`), &PurgeVolume{}},
		{"rebuild progress without done is not done", cmdBytes(CmdRebuildProgress, commandVersion,
			`{"volume_id":"v","replica_id":"v-r2","bytes_total":10,"bytes_compared":4,"bytes_copied":2}`),
			&RebuildProgressUpdate{VolumeID: "v", ReplicaID: "v-r2", BytesTotal: 10, BytesCompared: 4, BytesCopied: 2}},
		{"rebuild progress decodes beyond its total (apply refuses it)", cmdBytes(CmdRebuildProgress, commandVersion,
			`{"bytes_total":1,"bytes_compared":2,"done":false}`),
			&RebuildProgressUpdate{BytesTotal: 1, BytesCompared: 2}},
		{"attach without nbd_socket has none", cmdBytes(CmdAttachVolume, commandVersion, `{"volume_id":"v","node_id":"n1","expect_epoch":2}`),
			&AttachVolume{VolumeID: "v", NodeID: "n1", ExpectEpoch: 2}},
		// Decode leaves the inner command alone: apply decodes it and
		// refuses it when it is bad, a request, or without an id.
		{"request with an inner command that does not decode", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":"AAE="}`),
			&Request{ID: "r", Command: []byte{0, 1}}},
		{"request in a request", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":"EAF7ImlkIjoicjIifQ=="}`),
			&Request{ID: "r", Command: []byte("\x10\x01" + `{"id":"r2"}`)}},
		{"request without an id", cmdBytes(CmdRequest, commandVersion, `{"command":"BgF7fQ=="}`),
			&Request{Command: []byte("\x06\x01{}")}},
		{"request without a command", cmdBytes(CmdRequest, commandVersion, `{"id":"r"}`), &Request{ID: "r"}},
		{"request with an empty command", cmdBytes(CmdRequest, commandVersion, `{"id":"r","command":""}`),
			&Request{ID: "r", Command: []byte{}}},
		// Decode does not judge keys or values: apply refuses a key that is
		// not mutable or a value volspec.Decode does not read.
		{"set parameters with any key and value", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"replicas":"3","maxIOPS":"lots"}}`),
			&SetParameters{VolumeID: "v", Parameters: map[string]string{"replicas": "3", volspec.KeyMaxIOPS: "lots"}}},
		{"set parameters with an empty map", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{}}`),
			&SetParameters{VolumeID: "v", Parameters: map[string]string{}}},
		{"set parameters without parameters", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v"}`),
			&SetParameters{VolumeID: "v"}},
		// encoding/json stores a null map value as the zero string, which
		// apply reads as "remove the key".
		{"set parameters null value is empty", cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":null}}`),
			&SetParameters{VolumeID: "v", Parameters: map[string]string{volspec.KeyMaxIOPS: ""}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Decode(tt.b)
			if err != nil {
				t.Fatalf("Decode(%q): %v", tt.b, err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("Decode(%q) = %#v, want %#v", tt.b, got, tt.want)
			}
		})
	}
}

// normalizeEmpty returns a copy of the command with empty maps and slices set
// to nil: JSON's omitempty drops them, so after one decode–encode cycle an
// empty collection reads back as nil, while one without omitempty (a
// Request's empty command, "") reads back empty. That is the only difference
// a round trip may introduce.
func normalizeEmpty(c Command) Command {
	v := reflect.New(reflect.TypeOf(c).Elem())
	v.Elem().Set(reflect.ValueOf(c).Elem())
	normalizeValue(v.Elem())
	return v.Interface().(Command)
}

func normalizeValue(v reflect.Value) {
	switch v.Kind() {
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Field(i).CanSet() {
				normalizeValue(v.Field(i))
			}
		}
	case reflect.Map, reflect.Slice:
		if !v.IsNil() && v.Len() == 0 {
			v.Set(reflect.Zero(v.Type()))
		}
	}
}

// FuzzDecode checks that Decode never panics, that every error it returns
// wraps ErrBadCommand, and that whatever it accepts re-encodes into bytes that
// decode to the same command (modulo empty collections, see normalizeEmpty)
// and re-encode identically.
func FuzzDecode(f *testing.F) {
	for _, c := range fullCommands() {
		b, err := Encode(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		zb, err := Encode(newCommand(c.Type()))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(zb)
	}
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Add(cmdBytes(CmdInitCluster, 2, `{"cluster_id":"c1"}`))
	f.Add(cmdBytes(CmdInitCluster, commandVersion, `{"cluster_id":"c1"}}`))
	f.Add(cmdBytes(CmdCreateVolume, commandVersion, `{"parameters":{},"allowed_zones":[]}`))
	f.Add(cmdBytes(CmdRegisterNode, commandVersion, `{"node":null}`))
	f.Add(cmdBytes(CmdSetParameters, commandVersion, `{"volume_id":"v","parameters":{"maxIOPS":null,"minIOPS":""}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := Decode(b)
		if err != nil {
			if !errors.Is(err, ErrBadCommand) {
				t.Fatalf("Decode(%q) error %v does not wrap ErrBadCommand", b, err)
			}
			if c != nil {
				t.Fatalf("Decode(%q) returned %#v with error %v", b, c, err)
			}
			return
		}
		if c == nil {
			t.Fatalf("Decode(%q) = nil, nil", b)
		}
		if c.Type() != CommandType(b[0]) {
			t.Fatalf("Decode(%q).Type() = %d, want %d", b, c.Type(), b[0])
		}
		e1, err := Encode(c)
		if err != nil {
			t.Fatalf("Encode(%#v) of a decoded command: %v", c, err)
		}
		c2, err := Decode(e1)
		if err != nil {
			t.Fatalf("Decode(Encode(Decode(%q))) = %v", b, err)
		}
		if !reflect.DeepEqual(normalizeEmpty(c), normalizeEmpty(c2)) {
			t.Fatalf("re-decoded command differs:\n first %#v\nsecond %#v", c, c2)
		}
		e2, err := Encode(c2)
		if err != nil {
			t.Fatalf("Encode(%#v): %v", c2, err)
		}
		if !bytes.Equal(e1, e2) {
			t.Fatalf("encoding is not stable:\n%q\n%q", e1, e2)
		}
	})
}
