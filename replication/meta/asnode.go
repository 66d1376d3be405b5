package meta

import (
	"fmt"
	"strings"

	"github.com/cairn-csi/cairn/internal/pki"
)

// What a node agent's certificate may change in the store
// (docs/security.md, "What each identity may do").
//
// The meta API checks what it can from the request alone (auth.go): a node
// may not send the commands that manage volumes (managerOnly), and a
// command that names a node must name the caller's. A command about a
// volume or one of its replicas can only be judged against the state it is
// applied to: whether the caller holds one of the volume's replicas or has
// it attached. The agent that receives such a command from a node wraps it
// in AsNode with the node its certificate names, and the FSM checks it when
// it applies it (nodeMay), on every member alike and atomically with the
// change. A node's certificate therefore reaches only the volumes the store
// placed on that node or attached to it.

// AsNode is a command a node agent sent, with the node its certificate
// names. The agent that received it over mutual TLS writes Node; a node
// may send an AsNode for itself only (auth.go), and a store member that
// forwards one is trusted as Raft trusts it. It is written once every
// member reads it (command.go, rule 3); until then the receiving leader
// applies the bare command, checked by the meta API alone.
type AsNode struct {
	Node    string `json:"node"`
	Command []byte `json:"command"`
}

func (AsNode) Type() CommandType { return CmdAsNode }

// managerOnly reports the commands that manage volumes and snapshots,
// which only manager certificates (ctl) may send: a node agent never does.
func managerOnly(c Command) bool {
	switch c.(type) {
	case *InitCluster, *CreateVolume, *AdmitVolume, *DeleteVolume, *ExpandVolume, *SetParameters,
		*ReplaceReplica, *SetVolumeState, *CreateSnapshot, *MarkSnapshotDeleting,
		*RestoreVolume, *RetireVolume, *PurgeVolume, *PromoteVolume:
		return true
	}
	return false
}

// scopeOf returns the volume, and the replica if the command names one,
// that c changes when a node sends it; ok is false for a command that
// needs no check against the state (a node's own registration, liveness
// and disks, checked by the meta API).
func scopeOf(s *State, c Command) (volume, replica string, ok bool) {
	switch c := c.(type) {
	case *SetReplicaState:
		return c.VolumeID, c.ReplicaID, true
	case *SetReplicaGeneration:
		return c.VolumeID, c.ReplicaID, true
	case *RecordUsage:
		return c.VolumeID, c.ReplicaID, true
	case *RecordReplicaSpace:
		return c.VolumeID, c.ReplicaID, true
	case *RebuildProgressUpdate:
		return c.VolumeID, c.ReplicaID, true
	case *SetVolumeCondition:
		return c.VolumeID, "", true
	case *ScrubProgressUpdate:
		return c.VolumeID, "", true
	case *ReportLag:
		return c.VolumeID, "", true
	case *LeaseNonces:
		return c.VolumeID, "", true
	case *SetSnapshotReady:
		return snapshotVolume(s, c.SnapshotID), "", true
	case *DeleteSnapshot:
		return snapshotVolume(s, c.SnapshotID), "", true
	}
	return "", "", false
}

// snapshotVolume is the source volume of snapshot id ("" when there is no
// such snapshot: apply says it is not found).
func snapshotVolume(s *State, id string) string {
	if snap, found := s.Snapshots[id]; found {
		return snap.SourceVolumeID
	}
	return ""
}

// needsNodeCheck reports whether a command a node sent is judged against
// the state (sent as AsNode), looking inside a Request envelope.
func needsNodeCheck(c Command) bool {
	c = insideRequest(c)
	if c == nil {
		return false // apply refuses it
	}
	_, _, ok := scopeOf(&State{}, c)
	return ok
}

// nodeMay checks that node may apply c to s:
//   - a command about a replica comes from the replica's own node, or from
//     the node the volume is attached to (its engine), or, while the volume
//     is attached nowhere, from a node that holds one of its replicas (a
//     maintenance engine rebuilding or snapshotting it);
//   - a command about the volume as a whole, or one of its snapshots, comes
//     from the node it is attached to or from one that holds one of its
//     replicas;
//   - a snapshot's record is forgotten (DeleteSnapshot) only once its user
//     deleted it.
//
// A volume or replica the state lacks passes: apply then says it is not
// found, as it would to anyone.
func nodeMay(s *State, node string, c Command) error {
	if c = insideRequest(c); c == nil {
		return nil // apply refuses it with the decoding error
	}
	if managerOnly(c) {
		return fmt.Errorf("node %s may not send %s, a manager's command: %w", node, commandName(c), pki.ErrPermissionDenied)
	}
	// A node forgets a snapshot's record once it removed the layers of a
	// snapshot its user deleted (storagenode), never before.
	if d, ok := c.(*DeleteSnapshot); ok {
		if snap, found := s.Snapshots[d.SnapshotID]; found && !snap.Deleting {
			return fmt.Errorf("node %s may not forget snapshot %s: its user has not deleted it: %w", node, d.SnapshotID, pki.ErrPermissionDenied)
		}
	}
	volID, repID, scoped := scopeOf(s, c)
	if !scoped || volID == "" {
		return nil
	}
	v, found := s.Volumes[volID]
	if !found {
		return nil
	}
	attached := v.Attachment != nil && v.Attachment.Node == node
	holds := false
	for _, r := range v.Replicas {
		if r.Node == node {
			holds = true
		}
		if repID != "" && r.ID == repID && r.Node == node {
			return nil // its own replica
		}
	}
	switch {
	case attached:
		return nil
	case repID == "" && holds:
		return nil
	case repID != "" && holds && v.Attachment == nil:
		return nil
	}
	where := "attached nowhere"
	if v.Attachment != nil {
		where = "attached to " + v.Attachment.Node
	}
	if repID != "" {
		return fmt.Errorf("node %s may not send %s about replica %s of volume %s (%s): it neither holds that replica nor serves the volume: %w",
			node, commandName(c), repID, volID, where, pki.ErrPermissionDenied)
	}
	return fmt.Errorf("node %s may not send %s about volume %s (%s): it holds none of its replicas and does not serve it: %w",
		node, commandName(c), volID, where, pki.ErrPermissionDenied)
}

func applyAsNode(s *State, c *AsNode) (Result, error) {
	if c.Node == "" {
		return Result{}, fmt.Errorf("AsNode without a node: %w", ErrBadCommand)
	}
	inner, err := Decode(c.Command)
	if err != nil {
		return Result{}, err
	}
	if _, nested := inner.(*AsNode); nested {
		return Result{}, fmt.Errorf("an AsNode may not wrap another: %w", ErrBadCommand)
	}
	if err := nodeMay(s, c.Node, inner); err != nil {
		return Result{}, err
	}
	return apply(s, inner)
}

// commandName is c's type name, for messages: "SetReplicaState".
func commandName(c Command) string {
	return strings.TrimPrefix(fmt.Sprintf("%T", c), "*meta.")
}
