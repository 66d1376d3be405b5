package meta

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/cairn-csi/cairn/replication/crypt"
)

// CommandType tags each Raft log entry of the store. The numbers are part of
// the on-disk format: append new types at the end; never renumber or reuse one.
type CommandType uint8

// Command types.
const (
	CmdInitCluster          CommandType = 1
	CmdRegisterNode         CommandType = 2
	CmdNodeHeartbeat        CommandType = 3
	CmdSetNodeState         CommandType = 4
	CmdCreateVolume         CommandType = 5
	CmdDeleteVolume         CommandType = 6
	CmdAttachVolume         CommandType = 7
	CmdDetachVolume         CommandType = 8
	CmdSetReplicaState      CommandType = 9
	CmdReplaceReplica       CommandType = 10
	CmdSetVolumeState       CommandType = 11
	CmdCreateSnapshot       CommandType = 12
	CmdDeleteSnapshot       CommandType = 13
	CmdPurgeVolume          CommandType = 14
	CmdRebuildProgress      CommandType = 15
	CmdRequest              CommandType = 16
	CmdSetParameters        CommandType = 17
	CmdSetReplicaGeneration CommandType = 18
	CmdAdvanceEpoch         CommandType = 19
	CmdSetVolumeCondition   CommandType = 20
	CmdScrubProgress        CommandType = 21
	CmdExpandVolume         CommandType = 22
	CmdSetSnapshotReady     CommandType = 23
	CmdMarkSnapshotDeleting CommandType = 24
	CmdRestoreVolume        CommandType = 25
	CmdRetireVolume         CommandType = 26
	CmdRecordUsage          CommandType = 27
	CmdSetNodeReservable    CommandType = 28
	CmdAdmitVolume          CommandType = 29
	CmdSetNodeDisks         CommandType = 30
	CmdLeaseNonces          CommandType = 31
	CmdReportLag            CommandType = 32
	CmdPromoteVolume        CommandType = 33
	CmdAsNode               CommandType = 34
	CmdSetNodeDedup         CommandType = 35
	CmdRecordReplicaSpace   CommandType = 36
	CmdSetNodeFeatures      CommandType = 37
)

// commandVersion is the highest command version this build reads, and
// writeVersion the one it writes. They differ for one release each time a
// version is added: see "Command evolution" below before changing either.
const (
	commandVersion = 1
	writeVersion   = 1
)

// lastCommandType is the highest command type this build knows.
const lastCommandType = CmdSetNodeFeatures

// Command is one change to the store's state.
type Command interface {
	Type() CommandType
}

// InitCluster gives a new cluster its identity; the first leader commits it.
type InitCluster struct {
	ClusterID             string  `json:"cluster_id"`
	OverProvisioningRatio float64 `json:"over_provisioning_ratio"`
}

// RegisterNode adds a node or updates its addresses, topology and capacity.
type RegisterNode struct {
	Node Node  `json:"node"`
	Time int64 `json:"time"`
}

// NodeHeartbeat records a node's capacity and liveness.
type NodeHeartbeat struct {
	NodeID        string `json:"node_id"`
	CapacityBytes uint64 `json:"capacity_bytes"`
	FreeBytes     uint64 `json:"free_bytes"`
	Time          int64  `json:"time"`
}

// SetNodeState marks a node up, down or draining.
type SetNodeState struct {
	NodeID string    `json:"node_id"`
	State  NodeState `json:"state"`
	Time   int64     `json:"time"`
}

// CreateVolume records a new volume and places its replicas. Placement runs
// inside Apply, on the replicated state, so every member computes the same.
type CreateVolume struct {
	ID            string            `json:"id"`
	Name          string            `json:"name"`
	SizeBytes     uint64            `json:"size"`
	Parameters    map[string]string `json:"parameters,omitempty"`
	AccessType    string            `json:"access_type,omitempty"`
	Replicas      int               `json:"replicas"`
	WriteQuorum   int               `json:"write_quorum,omitempty"`
	ContentSource string            `json:"content_source,omitempty"`
	AllowedZones  []string          `json:"allowed_zones,omitempty"`
	PreferredNode string            `json:"preferred_node,omitempty"`
	CreatedAt     int64             `json:"created_at"`
	// Encryption is the data key of a volume with encryption aes-256-gcm,
	// wrapped (replication/crypt). Only through AdmitVolume, which the gate
	// then holds as type 31 (gate.go), so that no member that would drop it
	// applies it.
	Encryption *crypt.WrappedKey `json:"encryption,omitempty"`
}

// DeleteVolume marks a volume deleted (a tombstone until its replicas are gone).
type DeleteVolume struct {
	VolumeID string `json:"volume_id"`
}

// AttachVolume gives one node the right to write a volume. Compare-and-set on
// the epoch; increments it.
type AttachVolume struct {
	VolumeID    string `json:"volume_id"`
	NodeID      string `json:"node_id"`
	ReadOnly    bool   `json:"read_only,omitempty"`
	ExpectEpoch uint64 `json:"expect_epoch"`
	// NBDSocket, when set, asks the node to export the volume over NBD on
	// this unix socket (cairn ctl volume export).
	NBDSocket string `json:"nbd_socket,omitempty"`
}

// DetachVolume takes the attachment away. Compare-and-set on the epoch;
// increments it.
type DetachVolume struct {
	VolumeID    string `json:"volume_id"`
	NodeID      string `json:"node_id"`
	ExpectEpoch uint64 `json:"expect_epoch"`
}

// SetReplicaState moves one replica to a new state (eject, mark rebuilt).
// Compare-and-set on the epoch; increments it.
type SetReplicaState struct {
	VolumeID    string       `json:"volume_id"`
	ReplicaID   string       `json:"replica_id"`
	State       ReplicaState `json:"state"`
	ExpectEpoch uint64       `json:"expect_epoch"`
}

// ReplaceReplica drops a replica and places a new one, in state rebuilding, on
// another node. Compare-and-set on the epoch; increments it.
type ReplaceReplica struct {
	VolumeID    string `json:"volume_id"`
	ReplicaID   string `json:"replica_id"`
	ExpectEpoch uint64 `json:"expect_epoch"`
}

// SetVolumeState moves a volume through its lifecycle (see volumeTransitions).
type SetVolumeState struct {
	VolumeID string      `json:"volume_id"`
	State    VolumeState `json:"state"`
}

// CreateSnapshot records a snapshot of a volume.
type CreateSnapshot struct {
	ID             string `json:"id"`
	Name           string `json:"name"`
	SourceVolumeID string `json:"source_volume_id"`
	CreatedAt      int64  `json:"created_at"`
}

// DeleteSnapshot removes a snapshot record: the node that took the
// snapshot applies it once the replicas dropped its layer (after
// MarkSnapshotDeleting). The last record of a hidden volume (RetireVolume)
// takes the volume with it: it becomes deleted, and its replicas go.
type DeleteSnapshot struct {
	SnapshotID string `json:"snapshot_id"`
}

// PurgeVolume forgets a deleted volume once nothing of it is left on disk.
type PurgeVolume struct {
	VolumeID string `json:"volume_id"`
}

// RebuildProgressUpdate records how far the rebuild of one replica has come.
// It changes no replica set and no epoch.
type RebuildProgressUpdate struct {
	VolumeID      string `json:"volume_id"`
	ReplicaID     string `json:"replica_id"`
	BytesTotal    uint64 `json:"bytes_total"`
	BytesCompared uint64 `json:"bytes_compared"`
	BytesCopied   uint64 `json:"bytes_copied"`
	Done          bool   `json:"done,omitempty"`
}

// Request wraps a client's command with an id that stays the same when the
// client sends it again (after a lost answer or a leader change). The FSM
// remembers the results of recent requests and answers a repeated one with
// the first result, without applying it twice.
type Request struct {
	ID      string `json:"id"`
	Command []byte `json:"command"`
}

// SetParameters changes a live volume's mutable parameters (the QoS keys:
// maxIOPS, minIOPS, maxBandwidth, burstDuration). An empty value removes
// the key. It changes no replica set and no epoch.
type SetParameters struct {
	VolumeID   string            `json:"volume_id"`
	Parameters map[string]string `json:"parameters"`
}

// SetReplicaGeneration records the generation of the copy a replica stands
// for: compare-and-set on the generation recorded so far (Expect), so that
// two nodes or engines never overwrite each other's finding unseen.
// Recording the generation already recorded succeeds and changes nothing.
// A healthy replica's generation is recorded once and never replaced: a
// healthy replica with another copy on disk is ejected, not re-labelled. A
// rebuilding replica's may change (its node made a new, blank copy). It
// changes no replica set and no epoch.
type SetReplicaGeneration struct {
	VolumeID   string `json:"volume_id"`
	ReplicaID  string `json:"replica_id"`
	Generation string `json:"generation"`
	Expect     string `json:"expect"`
}

// AdvanceEpoch increments a volume's epoch without changing its replica set
// or attachment. The engine that holds the volume asks for it after a write
// it could neither acknowledge nor resolve by ejection (a cancelled request,
// a failed ejection): claiming the replicas with the new epoch fences every
// request of that write still queued at a replica. NodeID is the node the
// volume is attached to, or empty for a volume with no attachment (a
// maintenance engine, or an engine closing after its detach). Compare-and-set
// on the epoch.
type AdvanceEpoch struct {
	VolumeID    string `json:"volume_id"`
	NodeID      string `json:"node_id,omitempty"`
	ExpectEpoch uint64 `json:"expect_epoch"`
}

// SetVolumeCondition records whether a volume's data is known damaged: the
// engine sets Abnormal when a block verified on no replica (the read got
// EIO), and clears it when a scrub finds every block verifying again. It is
// what the CSI VolumeCondition reports. It changes no replica set and no
// epoch.
type SetVolumeCondition struct {
	VolumeID string `json:"volume_id"`
	Abnormal bool   `json:"abnormal,omitempty"`
	Message  string `json:"message,omitempty"`
}

// ScrubProgressUpdate records how far a scrub of a volume has come (see
// ScrubProgress). It changes no replica set and no epoch.
type ScrubProgressUpdate struct {
	VolumeID string        `json:"volume_id"`
	Progress ScrubProgress `json:"progress"`
}

// ExpandVolume grows a volume to SizeBytes (online expansion). A size the
// volume already has, or a smaller one, is a success that changes nothing
// and answers with the volume as it is: volumes never shrink, and a retry
// of an expansion that was applied finds it done. The replicas are grown
// after the store records the size (docs/expansion.md). It changes no
// replica set and no epoch. Written only once every member reads it
// (command.go, rule 3; Agent.checkMembersRead).
type ExpandVolume struct {
	VolumeID  string `json:"volume_id"`
	SizeBytes uint64 `json:"size"`
}

// SetSnapshotReady records the outcome of taking a snapshot (CreateSnapshot
// records the request): the replicas that sealed it, after which it is
// ready to use; or, with Error set, why it could not be taken yet (the
// node retries). It changes no replica set and no epoch. Written only once
// every member reads it (rule 3), as are the types after it.
type SetSnapshotReady struct {
	SnapshotID string   `json:"snapshot_id"`
	Replicas   []string `json:"replicas,omitempty"`
	Error      string   `json:"error,omitempty"`
}

// MarkSnapshotDeleting hides a snapshot from users and asks the node that
// took it to remove its layers (docs/snapshots.md); DeleteSnapshot then
// forgets the record.
type MarkSnapshotDeleting struct {
	SnapshotID string `json:"snapshot_id"`
}

// RestoreVolume creates a volume holding what a ready snapshot holds. Its
// replicas go first to the nodes of the source's healthy replicas (those
// that sealed the snapshot first; the others received it with their
// rebuild),
// where each is made from the snapshot's layers by hard links (its Source
// names the replica it is made from) and is healthy from the start; any
// more are placed as for a new volume, in state rebuilding, and receive a
// copy from those. ContentSource says what the user asked for
// ("snapshot:<id>" or "volume:<id>", a clone through a hidden snapshot).
type RestoreVolume struct {
	CreateVolume
	SnapshotID string `json:"snapshot_id"`
}

// RetireVolume deletes a volume as DeleteVolume does, unless snapshots of
// it remain: then the volume is hidden (its name is free, users no longer
// see it) and kept for them, until DeleteSnapshot removes the last one.
type RetireVolume struct {
	VolumeID string `json:"volume_id"`
}

// RecordUsage records the space a volume's replica takes on its node and
// what each of the volume's snapshots holds there (docs/snapshots.md,
// "Space"), for operators: the node of the volume's first healthy replica
// reports it when it changed. It changes no replica set and no epoch.
type RecordUsage struct {
	VolumeID       string                   `json:"volume_id"`
	ReplicaID      string                   `json:"replica_id"`
	AllocatedBytes uint64                   `json:"allocated_bytes"`
	Snapshots      map[string]SnapshotSpace `json:"snapshots,omitempty"`
	// Depth, Flatten and Merge: see VolumeUsage.
	Depth   int            `json:"depth,omitempty"`
	Flatten *LayerProgress `json:"flatten,omitempty"`
	Merge   *LayerProgress `json:"merge,omitempty"`
}

// Type implementations.
func (InitCluster) Type() CommandType           { return CmdInitCluster }
func (RegisterNode) Type() CommandType          { return CmdRegisterNode }
func (NodeHeartbeat) Type() CommandType         { return CmdNodeHeartbeat }
func (SetNodeState) Type() CommandType          { return CmdSetNodeState }
func (CreateVolume) Type() CommandType          { return CmdCreateVolume }
func (DeleteVolume) Type() CommandType          { return CmdDeleteVolume }
func (AttachVolume) Type() CommandType          { return CmdAttachVolume }
func (DetachVolume) Type() CommandType          { return CmdDetachVolume }
func (SetReplicaState) Type() CommandType       { return CmdSetReplicaState }
func (ReplaceReplica) Type() CommandType        { return CmdReplaceReplica }
func (SetVolumeState) Type() CommandType        { return CmdSetVolumeState }
func (CreateSnapshot) Type() CommandType        { return CmdCreateSnapshot }
func (DeleteSnapshot) Type() CommandType        { return CmdDeleteSnapshot }
func (PurgeVolume) Type() CommandType           { return CmdPurgeVolume }
func (RebuildProgressUpdate) Type() CommandType { return CmdRebuildProgress }
func (Request) Type() CommandType               { return CmdRequest }
func (SetParameters) Type() CommandType         { return CmdSetParameters }
func (SetReplicaGeneration) Type() CommandType  { return CmdSetReplicaGeneration }
func (AdvanceEpoch) Type() CommandType          { return CmdAdvanceEpoch }
func (SetVolumeCondition) Type() CommandType    { return CmdSetVolumeCondition }
func (ScrubProgressUpdate) Type() CommandType   { return CmdScrubProgress }
func (ExpandVolume) Type() CommandType          { return CmdExpandVolume }
func (SetSnapshotReady) Type() CommandType      { return CmdSetSnapshotReady }
func (MarkSnapshotDeleting) Type() CommandType  { return CmdMarkSnapshotDeleting }
func (RestoreVolume) Type() CommandType         { return CmdRestoreVolume }
func (RetireVolume) Type() CommandType          { return CmdRetireVolume }
func (RecordUsage) Type() CommandType           { return CmdRecordUsage }

// newCommand returns an empty command of type t, or nil for an unknown type.
func newCommand(t CommandType) Command {
	switch t {
	case CmdInitCluster:
		return &InitCluster{}
	case CmdRegisterNode:
		return &RegisterNode{}
	case CmdNodeHeartbeat:
		return &NodeHeartbeat{}
	case CmdSetNodeState:
		return &SetNodeState{}
	case CmdCreateVolume:
		return &CreateVolume{}
	case CmdDeleteVolume:
		return &DeleteVolume{}
	case CmdAttachVolume:
		return &AttachVolume{}
	case CmdDetachVolume:
		return &DetachVolume{}
	case CmdSetReplicaState:
		return &SetReplicaState{}
	case CmdReplaceReplica:
		return &ReplaceReplica{}
	case CmdSetVolumeState:
		return &SetVolumeState{}
	case CmdCreateSnapshot:
		return &CreateSnapshot{}
	case CmdDeleteSnapshot:
		return &DeleteSnapshot{}
	case CmdPurgeVolume:
		return &PurgeVolume{}
	case CmdRebuildProgress:
		return &RebuildProgressUpdate{}
	case CmdRequest:
		return &Request{}
	case CmdSetParameters:
		return &SetParameters{}
	case CmdSetReplicaGeneration:
		return &SetReplicaGeneration{}
	case CmdAdvanceEpoch:
		return &AdvanceEpoch{}
	case CmdSetVolumeCondition:
		return &SetVolumeCondition{}
	case CmdScrubProgress:
		return &ScrubProgressUpdate{}
	case CmdExpandVolume:
		return &ExpandVolume{}
	case CmdSetSnapshotReady:
		return &SetSnapshotReady{}
	case CmdMarkSnapshotDeleting:
		return &MarkSnapshotDeleting{}
	case CmdRestoreVolume:
		return &RestoreVolume{}
	case CmdRetireVolume:
		return &RetireVolume{}
	case CmdRecordUsage:
		return &RecordUsage{}
	case CmdSetNodeReservable:
		return &SetNodeReservable{}
	case CmdAdmitVolume:
		return &AdmitVolume{}
	case CmdSetNodeDisks:
		return &SetNodeDisks{}
	case CmdLeaseNonces:
		return &LeaseNonces{}
	case CmdReportLag:
		return &ReportLag{}
	case CmdPromoteVolume:
		return &PromoteVolume{}
	case CmdAsNode:
		return &AsNode{}
	case CmdSetNodeDedup:
		return &SetNodeDedup{}
	case CmdRecordReplicaSpace:
		return &RecordReplicaSpace{}
	case CmdSetNodeFeatures:
		return &SetNodeFeatures{}
	}
	return nil
}

// Encode writes a command as [type][version][JSON body]. The body's schema is
// the Go struct of that type; its JSON names are part of the on-disk format.
func Encode(c Command) ([]byte, error) {
	body, err := json.Marshal(c)
	if err != nil {
		return nil, fmt.Errorf("encode %T: %w", c, err)
	}
	out := make([]byte, 0, 2+len(body))
	out = append(out, byte(c.Type()), writeVersion)
	return append(out, body...), nil
}

// Command evolution.
//
// The raft log outlives every build: an entry written by one version is
// applied by every member, whatever version each runs, and again at every
// replay. Two members must never apply the same entry differently, or
// their states diverge with no error anywhere. Hence:
//
//  1. A command's JSON names and meaning never change. A new field, or a
//     field that comes to mean something new, is a new version of the
//     whole encoding (commandVersion); a new kind of change is a new command
//     type, appended to the list above. A build reads every version up to
//     its own: an older body lacks the newer fields and decodes to their
//     zero values, which must mean what the older version meant.
//  2. An entry a member cannot read — a command type above lastCommandType,
//     a version above commandVersion, or a field its struct lacks — comes
//     from a newer build. The member does not skip it: skipping while newer
//     members apply it is the divergence this rule exists to prevent.
//     Decode says ErrNewerCommand; the FSM then halts (applies nothing
//     more, takes no snapshot; see FSM.Halted) and the agent stops the
//     member (Agent.Fatal). Raft replays the entry into it after an
//     upgrade. Bytes that are not a command of any version (bad JSON, type
//     or version 0) stay ErrBadCommand: an error result that changes
//     nothing, as before.
//  3. So that a rolling upgrade does not halt the members not yet
//     upgraded, a new version or type is written only once every member
//     reads it: the release that adds it decodes it but does not write it
//     (commandVersion moves up, writeVersion stays, and no path issues the
//     new type), and a later release, installed only over that one, writes
//     it. A member that skipped that release halts rather than diverges (2).
//     Or, within one release: the leader writes the new type only after
//     every member of the raft configuration has said, through the meta
//     API's Info (command_types), that it reads it, and refuses the command
//     otherwise (FailedPrecondition; Agent.checkMembersRead). An older
//     member cannot say so, so nothing it cannot read reaches the log while
//     it is a member. Types 22 (ExpandVolume) to 36 are written so.
//
// Version 1 with types 1 to 21 is the first release's command set, written
// from the start: no earlier release exists that would have to read it. So
// types 18 to 21 (replica generations, AdvanceEpoch, volume conditions,
// scrub progress), added together with this rule, are written by the
// release that adds them; rule 3 holds for everything added after it.
//
// TestDecodeNewerEntry, TestFSMHaltsOnNewerEntry, TestAgentStopsOnNewerEntry,
// TestWriteVersionReadable and TestGatedTypeWaitsForEveryMember hold the
// rule.

// insideRequest returns the command a Request envelope carries (nil if it
// does not decode), or c itself.
func insideRequest(c Command) Command {
	if r, ok := c.(*Request); ok {
		inner, err := Decode(r.Command)
		if err != nil {
			return nil
		}
		return inner
	}
	return c
}

// Decode parses what Encode wrote. Bad bytes give an error wrapping
// ErrBadCommand, and an entry of a newer build one wrapping ErrNewerCommand
// too; Decode never panics.
func Decode(b []byte) (Command, error) {
	if len(b) < 2 {
		return nil, fmt.Errorf("command of %d bytes is too short: %w", len(b), ErrBadCommand)
	}
	t, version := CommandType(b[0]), b[1]
	if t == 0 || version == 0 {
		return nil, fmt.Errorf("command type %d version %d: %w", t, version, ErrBadCommand)
	}
	if t > lastCommandType || version > commandVersion {
		return nil, fmt.Errorf("command type %d version %d: this build knows types up to %d and reads versions up to %d: %w: %w",
			t, version, lastCommandType, commandVersion, ErrNewerCommand, ErrBadCommand)
	}
	c := newCommand(t)
	if c == nil {
		return nil, fmt.Errorf("unknown command type %d: %w", t, ErrBadCommand)
	}
	if err := decodeBody(b[2:], c, true); err != nil {
		// A body that decodes once unknown fields are allowed carries a
		// field this build lacks: written by a newer one (rule 2).
		if decodeBody(b[2:], newCommand(t), false) == nil {
			return nil, fmt.Errorf("command type %d: %v: %w: %w", t, err, ErrNewerCommand, ErrBadCommand)
		}
		return nil, fmt.Errorf("command type %d: %v: %w", t, err, ErrBadCommand)
	}
	return c, nil
}

// decodeBody decodes one JSON value into c, and nothing after it.
func decodeBody(body []byte, c Command, strict bool) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	if strict {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(c); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF { // dec.More misses a trailing '}' or ']'
		return errors.New("trailing bytes")
	}
	return nil
}
