package meta

import (
	"errors"
	"reflect"
	"slices"
	"testing"

	"github.com/cairn-csi/cairn/internal/pki"
)

// asNode wraps c as sent by node.
func asNode(t *testing.T, node string, c Command) *AsNode {
	t.Helper()
	b, err := Encode(c)
	if err != nil {
		t.Fatal(err)
	}
	return &AsNode{Node: node, Command: b}
}

// TestAsNodeReachesOnlyItsVolumes: a node's command about a volume or a
// replica applies only when the node holds that replica, serves the
// volume, or (for a volume attached nowhere) holds one of its replicas;
// a refusal changes nothing.
func TestAsNodeReachesOnlyItsVolumes(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 100)
	v := h.createVolume("v", 1, 2)
	a, b := v.Replicas[0], v.Replicas[1]
	var others []string
	for i := 1; i <= 4; i++ {
		if n := nodeName(i); n != a.Node && n != b.Node {
			others = append(others, n)
		}
	}
	server, outsider := others[0], others[1]
	h.attach("v", server)

	usage := func(r Replica) *RecordUsage {
		return &RecordUsage{VolumeID: "v", ReplicaID: r.ID, AllocatedBytes: 4096}
	}
	abnormal := &SetVolumeCondition{VolumeID: "v", Abnormal: true, Message: "test"}
	normal := &SetVolumeCondition{VolumeID: "v"}
	refused := func(node string, c Command) {
		t.Helper()
		before := h.volume("v")
		err := h.fails(asNode(t, node, c), pki.ErrPermissionDenied)
		t.Logf("%s: %v", node, err)
		if after := h.volume("v"); !reflect.DeepEqual(before, after) {
			t.Errorf("a refused %T from %s changed the volume:\n%+v\nthen\n%+v", c, node, before, after)
		}
	}

	// Attached to server, which holds no replica.
	refused(outsider, abnormal)
	refused(outsider, usage(a))
	refused(outsider, &SetReplicaState{VolumeID: "v", ReplicaID: a.ID, State: ReplicaFailed, ExpectEpoch: h.volume("v").Epoch})
	refused(a.Node, usage(b)) // a sibling's replica, while another node serves the volume
	h.must(asNode(t, a.Node, usage(a)))
	h.must(asNode(t, server, usage(b)))
	h.must(asNode(t, server, abnormal))
	h.must(asNode(t, a.Node, normal)) // it holds one of the replicas
	if c := h.volume("v").Condition; c != nil {
		t.Errorf("condition %+v after the normal one, want none", c)
	}

	// Attached nowhere: a maintenance engine on either replica's node
	// speaks for the volume; the former server does not.
	h.must(&DetachVolume{VolumeID: "v", NodeID: server, ExpectEpoch: h.volume("v").Epoch})
	h.must(asNode(t, a.Node, usage(b)))
	refused(server, usage(a))
	refused(server, abnormal)

	// Managers' commands are never a node's.
	refused(a.Node, &DeleteVolume{VolumeID: "v"})
	refused(a.Node, &SetParameters{VolumeID: "v", Parameters: map[string]string{"maxIOPS": "1"}})

	// A node forgets a snapshot only once its user deleted it.
	h.readySnapshot("s1", "v")
	refused(a.Node, &DeleteSnapshot{SnapshotID: "s1"})
	refused(outsider, &DeleteSnapshot{SnapshotID: "s1"})
	h.must(&MarkSnapshotDeleting{SnapshotID: "s1"})
	refused(outsider, &DeleteSnapshot{SnapshotID: "s1"})
	h.must(asNode(t, a.Node, &DeleteSnapshot{SnapshotID: "s1"}))

	// What is not there is not found, as for anyone.
	h.fails(asNode(t, outsider, &SetVolumeCondition{VolumeID: "nope", Abnormal: true}), ErrNotFound)

	// A node's own registration needs no state check.
	h.must(asNode(t, outsider, &NodeHeartbeat{NodeID: outsider, Time: 200}))

	// Envelopes: an AsNode inside an AsNode is refused; a Request inside
	// one keeps its retry semantics (applied once, answered again).
	h.fails(asNode(t, a.Node, asNode(t, a.Node, usage(a))), ErrBadCommand)
	inner, err := Encode(usage(a))
	if err != nil {
		t.Fatal(err)
	}
	req := &Request{ID: "retry-1", Command: inner}
	first := h.must(asNode(t, a.Node, req))
	again := h.must(asNode(t, a.Node, req))
	if !reflect.DeepEqual(first, again) {
		t.Errorf("a retried request gave %+v, then %+v", first, again)
	}
	refused(outsider, &Request{ID: "retry-2", Command: inner})
}

// TestNeedsNodeCheck: the meta API wraps exactly the commands scopeOf
// judges, also inside a Request envelope.
func TestNeedsNodeCheck(t *testing.T) {
	for _, c := range []Command{
		&SetReplicaState{}, &SetReplicaGeneration{}, &RecordUsage{}, &RebuildProgressUpdate{}, &SetVolumeCondition{},
		&ScrubProgressUpdate{}, &ReportLag{}, &LeaseNonces{}, &SetSnapshotReady{}, &DeleteSnapshot{}, &Request{ID: "x", Command: mustEncode(t, &SetReplicaState{})},
	} {
		if !needsNodeCheck(c) {
			t.Errorf("%T: not checked against the state", c)
		}
	}
	for _, c := range []Command{&RegisterNode{}, &NodeHeartbeat{}, &AttachVolume{}, &AdvanceEpoch{}, &SetNodeDisks{}, &Request{ID: "x", Command: mustEncode(t, &NodeHeartbeat{})}} {
		if needsNodeCheck(c) {
			t.Errorf("%T: checked against the state, though the meta API judges it alone", c)
		}
	}
	// Every command type is either a manager's, judged against the state,
	// or named here as one a node sends about itself (or the store only).
	own := []CommandType{CmdRegisterNode, CmdNodeHeartbeat, CmdSetNodeState, CmdAttachVolume, CmdDetachVolume, CmdAdvanceEpoch,
		CmdSetNodeReservable, CmdSetNodeDisks, CmdRequest, CmdAsNode, CmdSetNodeDedup, CmdSetNodeFeatures}
	for typ := CommandType(1); typ <= lastCommandType; typ++ {
		c := newCommand(typ)
		if c == nil {
			t.Fatalf("no command of type %d", typ)
		}
		_, _, scoped := scopeOf(&State{}, c)
		if managerOnly(c) || scoped || slices.Contains(own, typ) {
			continue
		}
		t.Errorf("%T (type %d): decide whether a node may send it, and under which check (asnode.go)", c, typ)
	}
	if err := nodeMay(&State{}, "n1", &InitCluster{}); !errors.Is(err, pki.ErrPermissionDenied) {
		t.Errorf("InitCluster from a node: %v, want permission denied", err)
	}
}
