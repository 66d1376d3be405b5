package meta

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/placement"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Result is what applying a command returns: the object it created or changed.
type Result struct {
	Volume   *Volume   `json:"volume,omitempty"`
	Node     *Node     `json:"node,omitempty"`
	Snapshot *Snapshot `json:"snapshot,omitempty"`
	// Lease is LeaseNonces's answer.
	Lease uint64 `json:"lease,omitempty"`
	// Promoted is PromoteVolume's answer: the follower made healthy, with
	// its last reported lag (the recovery point).
	Promoted *Replica `json:"promoted,omitempty"`
}

// MaxReplicas bounds a volume's replica count.
const MaxReplicas = volspec.MaxReplicas

// apply changes s by c. Every apply function validates first and mutates
// only when the whole command is legal, so an error leaves s unchanged.
// It does no I/O and reads no clock: the same log gives the same state on
// every member.
func apply(s *State, c Command) (Result, error) {
	res, err := applyCommand(s, c)
	// A Request's inner command comes through here too (applyRequest),
	// already decoded.
	if err == nil {
		vols, _ := touched(c, res)
		s.noteChanged(vols)
		if t, gated := gateType(c); gated && t > s.MaxCommandType {
			s.MaxCommandType = t
		}
	}
	return res, err
}

// applyCommand is apply's dispatch to each command's apply function.
func applyCommand(s *State, c Command) (Result, error) {
	switch c := c.(type) {
	case *InitCluster:
		return applyInitCluster(s, c)
	case *RegisterNode:
		return applyRegisterNode(s, c)
	case *NodeHeartbeat:
		return applyNodeHeartbeat(s, c)
	case *SetNodeState:
		return applySetNodeState(s, c)
	case *CreateVolume:
		return applyCreateVolume(s, c)
	case *DeleteVolume:
		return applyDeleteVolume(s, c)
	case *AttachVolume:
		return applyAttachVolume(s, c)
	case *DetachVolume:
		return applyDetachVolume(s, c)
	case *SetReplicaState:
		return applySetReplicaState(s, c)
	case *ReplaceReplica:
		return applyReplaceReplica(s, c)
	case *SetVolumeState:
		return applySetVolumeState(s, c)
	case *CreateSnapshot:
		return applyCreateSnapshot(s, c)
	case *DeleteSnapshot:
		return applyDeleteSnapshot(s, c)
	case *PurgeVolume:
		return applyPurgeVolume(s, c)
	case *RebuildProgressUpdate:
		return applyRebuildProgress(s, c)
	case *Request:
		return applyRequest(s, c)
	case *SetParameters:
		return applySetParameters(s, c)
	case *SetReplicaGeneration:
		return applySetReplicaGeneration(s, c)
	case *AdvanceEpoch:
		return applyAdvanceEpoch(s, c)
	case *SetVolumeCondition:
		return applySetVolumeCondition(s, c)
	case *ScrubProgressUpdate:
		return applyScrubProgress(s, c)
	case *ExpandVolume:
		return applyExpandVolume(s, c)
	case *SetSnapshotReady:
		return applySetSnapshotReady(s, c)
	case *MarkSnapshotDeleting:
		return applyMarkSnapshotDeleting(s, c)
	case *RestoreVolume:
		return applyRestoreVolume(s, c)
	case *RetireVolume:
		return applyRetireVolume(s, c)
	case *RecordUsage:
		return applyRecordUsage(s, c)
	case *SetNodeReservable:
		return applySetNodeReservable(s, c)
	case *AdmitVolume:
		return applyAdmitVolume(s, c)
	case *SetNodeDisks:
		return applySetNodeDisks(s, c)
	case *SetNodeDedup:
		return applySetNodeDedup(s, c)
	case *SetNodeFeatures:
		return applySetNodeFeatures(s, c)
	case *RecordReplicaSpace:
		return applyRecordReplicaSpace(s, c)
	case *LeaseNonces:
		return applyLeaseNonces(s, c)
	case *ReportLag:
		return applyReportLag(s, c)
	case *PromoteVolume:
		return applyPromoteVolume(s, c)
	case *AsNode:
		return applyAsNode(s, c)
	}
	return Result{}, fmt.Errorf("no apply function for %T: %w", c, ErrBadCommand)
}

func applyInitCluster(s *State, c *InitCluster) (Result, error) {
	if c.ClusterID == "" {
		return Result{}, fmt.Errorf("cluster id is empty: %w", ErrInvalidArgument)
	}
	if s.ClusterID != "" && s.ClusterID != c.ClusterID {
		return Result{}, fmt.Errorf("store belongs to cluster %s, not %s: %w", s.ClusterID, c.ClusterID, ErrClusterMismatch)
	}
	if c.OverProvisioningRatio < 0 {
		return Result{}, fmt.Errorf("over-provisioning ratio %v is negative: %w", c.OverProvisioningRatio, ErrInvalidArgument)
	}
	if s.ClusterID == "" {
		s.ClusterID = c.ClusterID
		s.OverProvisioningRatio = c.OverProvisioningRatio
	}
	return Result{}, nil
}

func applyRegisterNode(s *State, c *RegisterNode) (Result, error) {
	n := c.Node
	if n.ID == "" || n.RaftAddr == "" || n.APIAddr == "" {
		return Result{}, fmt.Errorf("node needs an id, a raft address and an API address: %w", ErrInvalidArgument)
	}
	n.State = NodeUp
	n.LastHeartbeat = c.Time
	s.Nodes[n.ID] = &n
	out := n
	return Result{Node: &out}, nil
}

func applyNodeHeartbeat(s *State, c *NodeHeartbeat) (Result, error) {
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	n.CapacityBytes, n.FreeBytes, n.LastHeartbeat = c.CapacityBytes, c.FreeBytes, c.Time
	out := *n
	return Result{Node: &out}, nil
}

func applySetNodeState(s *State, c *SetNodeState) (Result, error) {
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	switch c.State {
	case NodeUp, NodeDown, NodeDraining:
	default:
		return Result{}, fmt.Errorf("node state %q: %w", c.State, ErrInvalidArgument)
	}
	n.State = c.State
	if c.State == NodeUp {
		n.LastHeartbeat = c.Time
	}
	out := *n
	return Result{Node: &out}, nil
}

// PlacementNodes describes the cluster's nodes as placement sees them for
// a volume on the default disks (PlacementNodesFor).
func (s *State) PlacementNodes() []placement.Node { return s.PlacementNodesFor("") }

// placementError turns a placement failure into a store sentinel.
func placementError(err error) error {
	if errors.Is(err, placement.ErrInsufficientNodes) {
		return fmt.Errorf("placement: %v: %w", err, ErrResourceExhausted)
	}
	return fmt.Errorf("placement: %v: %w", err, ErrInvalidArgument)
}

// applyCreateVolume places on the default disks without reservations, as
// builds before AdmitVolume did: a member of one of them applies the same
// entry the same way (a typed or guaranteed volume comes as AdmitVolume).
func applyCreateVolume(s *State, c *CreateVolume) (Result, error) {
	return createVolume(s, c, 0, "")
}

// createVolume is CreateVolume, its replicas placed on disks of type
// diskType ("" for the default), and only on nodes that can still promise
// reserveIOPS when that is not 0 (AdmitVolume).
func createVolume(s *State, c *CreateVolume, reserveIOPS uint64, diskType string) (Result, error) {
	quorum, err := checkCreate(c)
	if err != nil {
		return Result{}, err
	}
	if v := s.volumeByName(c.Name); v != nil {
		// Idempotent create: the same request returns the same volume.
		if sameVolume(v, c, quorum) {
			return Result{Volume: v.Clone()}, nil
		}
		return Result{}, fmt.Errorf("volume name %q is taken by %s with size %d and %d replicas: %w",
			c.Name, v.ID, v.SizeBytes, v.ReplicaCount, ErrAlreadyExists)
	}
	if _, ok := s.Volumes[c.ID]; ok {
		return Result{}, fmt.Errorf("volume id %q: %w", c.ID, ErrAlreadyExists)
	}
	// The parameters must decode, as volspec's stored form: every reader
	// (engine, realizer, ctl) can then trust them. Unknown keys pass (see
	// replication/volspec/doc.go); clients refuse those before they get here.
	// After the idempotency check, so that a retry of a create made before
	// the store validated still finds its volume.
	spec, err := volspec.Decode(c.Parameters)
	if err != nil {
		return Result{}, fmt.Errorf("volume %q: %w", c.Name, err)
	}
	if err := checkEncryption(c, spec); err != nil {
		return Result{}, err
	}
	candidates, unable := s.placementNodes(diskType, spec)
	nodes, err := placement.Place(candidates, placement.Request{
		Replicas:              c.Replicas,
		SizeBytes:             replicaBytes(c.SizeBytes, spec.Encrypted()),
		OverProvisioningRatio: s.OverProvisioningRatio,
		AllowedZones:          c.AllowedZones,
		PreferredNode:         c.PreferredNode,
		ReserveIOPS:           reserveIOPS,
	})
	if err != nil {
		return Result{}, fmt.Errorf("volume %q: %w", c.Name, unable.wrap(typedPlacementError(diskType, err)))
	}
	// A new volume's replicas are all zeros, so they are identical and
	// healthy from the start; a volume with a content source is filled
	// first (provisioning).
	v := newVolume(c, quorum)
	if c.ContentSource != "" {
		v.State = VolumeProvisioning
	}
	for _, node := range nodes {
		v.Replicas = append(v.Replicas, Replica{ID: v.nextReplicaID(), Node: node, State: ReplicaHealthy})
	}
	s.Volumes[v.ID] = v
	return Result{Volume: v.Clone()}, nil
}

// newVolume is the volume create c makes, available, without replicas.
func newVolume(c *CreateVolume, quorum int) *Volume {
	return &Volume{
		ID: c.ID, Name: c.Name, SizeBytes: c.SizeBytes,
		Parameters: c.Parameters, AccessType: c.AccessType,
		State:         VolumeAvailable,
		ReplicaCount:  c.Replicas,
		WriteQuorum:   quorum,
		Epoch:         1,
		ContentSource: c.ContentSource,
		CreatedAt:     c.CreatedAt,
		Encryption:    c.Encryption.Clone(),
	}
}

// nextReplicaID hands out the volume's next replica id,
// "<volume id>-r<sequence>"; ids are never reused.
func (v *Volume) nextReplicaID() string {
	v.NextReplicaSeq++
	return fmt.Sprintf("%s-r%d", v.ID, v.NextReplicaSeq)
}

// VolumeOfReplica returns the id of the volume a replica id names, the
// inverse of the store's naming ("<volume id>-r<sequence>"). An id of
// another shape (made by hand, or by a test) stands for itself.
func VolumeOfReplica(id string) string {
	i := strings.LastIndex(id, "-r")
	if i <= 0 || i+2 == len(id) {
		return id
	}
	for _, c := range id[i+2:] {
		if c < '0' || c > '9' {
			return id
		}
	}
	return id[:i]
}

// sameParameters reports whether a CreateVolume retry asks for the volume
// that exists. Keys that only steered its placement do not count: a volume
// recorded with the old default locality still matches a retry after an
// upgrade changed it.
func sameParameters(a, b map[string]string) bool {
	strip := func(m map[string]string) map[string]string {
		out := make(map[string]string, len(m))
		for k, v := range m {
			if !volspec.PlacementOnly(k) {
				out[k] = v
			}
		}
		return out
	}
	return maps.Equal(strip(a), strip(b))
}

// liveVolume returns a volume that exists and is not deleted.
func (s *State) liveVolume(id string) (*Volume, error) {
	v, ok := s.Volumes[id]
	if !ok || v.State == VolumeDeleted {
		return nil, fmt.Errorf("volume %q: %w", id, ErrNotFound)
	}
	return v, nil
}

// checkEpoch is the compare-and-set guard of every replica-set and
// attachment change.
func checkEpoch(v *Volume, expect uint64) error {
	if v.Epoch != expect {
		return fmt.Errorf("volume %s is at epoch %d, caller saw %d: %w", v.ID, v.Epoch, expect, ErrEpochMismatch)
	}
	return nil
}

func applyDeleteVolume(s *State, c *DeleteVolume) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Hidden {
		// Deleted by its user already, and kept for its snapshots: the
		// last DeleteSnapshot deletes it (a hidden volume exists only
		// once every member reads RetireVolume).
		return Result{Volume: v.Clone()}, nil
	}
	if v.Attachment != nil {
		return Result{}, fmt.Errorf("volume %s is attached to %s: %w", v.ID, v.Attachment.Node, ErrFailedPrecondition)
	}
	if err := checkTransition(v.State, VolumeDeleted); err != nil {
		return Result{}, err
	}
	v.State = VolumeDeleted
	v.Epoch++ // fences any engine still holding the old epoch
	return Result{Volume: v.Clone()}, nil
}

func applyAttachVolume(s *State, c *AttachVolume) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Hidden {
		return Result{}, fmt.Errorf("volume %q was deleted (kept for its snapshots): %w", v.ID, ErrNotFound)
	}
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	if a := v.Attachment; a != nil {
		if a.Node == c.NodeID && a.ReadOnly == c.ReadOnly && a.NBDSocket == c.NBDSocket {
			return Result{Volume: v.Clone()}, nil // already so: idempotent
		}
		return Result{}, fmt.Errorf("volume %s is attached to %s (read-only %v): %w", v.ID, a.Node, a.ReadOnly, ErrFailedPrecondition)
	}
	if n.State != NodeUp {
		return Result{}, fmt.Errorf("node %s is %s: %w", n.ID, n.State, ErrFailedPrecondition)
	}
	if c.NBDSocket != "" && v.Encrypted() {
		// The node's export has no way to receive the passphrase; only
		// CSI staging brings it (docs/encryption.md). Only members that
		// know encryption hold encrypted volumes (gate.go).
		return Result{}, fmt.Errorf("volume %s is encrypted: it is served only through CSI staging, which brings its passphrase, not exported over NBD: %w",
			v.ID, ErrInvalidArgument)
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	if err := checkFollowersAttach(s, v); err != nil {
		return Result{}, err
	}
	if err := checkTransition(v.State, VolumeAttached); err != nil {
		return Result{}, err
	}
	v.State = VolumeAttached
	v.Attachment = &Attachment{Node: c.NodeID, ReadOnly: c.ReadOnly, NBDSocket: c.NBDSocket}
	v.Epoch++
	return Result{Volume: v.Clone()}, nil
}

func applyDetachVolume(s *State, c *DetachVolume) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Attachment == nil {
		return Result{Volume: v.Clone()}, nil // already detached: idempotent
	}
	if c.NodeID != "" && v.Attachment.Node != c.NodeID {
		return Result{}, fmt.Errorf("volume %s is attached to %s, not %s: %w", v.ID, v.Attachment.Node, c.NodeID, ErrFailedPrecondition)
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	if err := checkTransition(v.State, VolumeAvailable); err != nil {
		return Result{}, err
	}
	v.State = VolumeAvailable
	v.Attachment = nil
	v.Epoch++
	return Result{Volume: v.Clone()}, nil
}

// replicaIndex finds a replica of v by id.
func (v *Volume) replicaIndex(id string) (int, error) {
	for i, r := range v.Replicas {
		if r.ID == id {
			return i, nil
		}
	}
	return -1, fmt.Errorf("replica %q of volume %s: %w", id, v.ID, ErrNotFound)
}

func applySetReplicaState(s *State, c *SetReplicaState) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	i, err := v.replicaIndex(c.ReplicaID)
	if err != nil {
		return Result{}, err
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	r := v.Replicas[i]
	if err := checkReplicaTransition(r.State, c.State); err != nil {
		return Result{}, err
	}
	// Never eject the last healthy replica: it is the only one known to hold
	// every acknowledged write.
	if r.State == ReplicaHealthy && v.HealthyReplicas() == 1 {
		return Result{}, fmt.Errorf("replica %s is the last healthy replica of %s: %w", r.ID, v.ID, ErrQuorumLost)
	}
	v.Replicas[i].State = c.State
	v.Replicas[i].Lag = nil // a report belongs to one spell of following
	v.Epoch++
	return Result{Volume: v.Clone()}, nil
}

func applyReplaceReplica(s *State, c *ReplaceReplica) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	i, err := v.replicaIndex(c.ReplicaID)
	if err != nil {
		return Result{}, err
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	if v.Replicas[i].State == ReplicaHealthy {
		return Result{}, fmt.Errorf("replica %s is healthy; eject it before replacing it: %w", c.ReplicaID, ErrFailedPrecondition)
	}
	var exclude, zones []string
	for j, r := range v.Replicas {
		exclude = append(exclude, r.Node)
		if j != i {
			if n, ok := s.Nodes[r.Node]; ok {
				zones = append(zones, n.Zone)
			}
		}
	}
	vspec, _ := volspec.Decode(v.Parameters) // a live volume's parameters were checked when it was made
	candidates, unable := s.placementNodes(v.diskType(), vspec)
	nodes, err := placement.Place(candidates, placement.Request{
		Replicas: 1, SizeBytes: v.ReplicaBytes(), OverProvisioningRatio: s.OverProvisioningRatio,
		Exclude: exclude, ExistingZones: zones,
		ReserveIOPS: v.guaranteedIOPS(), // 0 but for a guaranteed volume (admission.go)
	})
	if err != nil {
		return Result{}, fmt.Errorf("replace replica %s: %w", c.ReplicaID, unable.wrap(typedPlacementError(v.diskType(), err)))
	}
	v.Replicas[i] = Replica{ID: v.nextReplicaID(), Node: nodes[0], State: ReplicaRebuilding}
	v.Epoch++
	return Result{Volume: v.Clone()}, nil
}

func applySetVolumeState(s *State, c *SetVolumeState) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if c.State == VolumeAttached || c.State == VolumeDeleted {
		// These carry an attachment or fence engines: use their own commands.
		return Result{}, fmt.Errorf("volume state %q is set by its own command: %w", c.State, ErrInvalidArgument)
	}
	if c.State == VolumeAvailable && v.Attachment != nil {
		// Taking an attachment away must fence its engine: DetachVolume
		// does that with a compare-and-set and a new epoch.
		return Result{}, fmt.Errorf("volume %s is attached to %s: detach it first: %w", v.ID, v.Attachment.Node, ErrFailedPrecondition)
	}
	if err := checkTransition(v.State, c.State); err != nil {
		return Result{}, err
	}
	v.State = c.State
	return Result{Volume: v.Clone()}, nil
}

func applyPurgeVolume(s *State, c *PurgeVolume) (Result, error) {
	v, ok := s.Volumes[c.VolumeID]
	if !ok {
		return Result{}, fmt.Errorf("volume %q: %w", c.VolumeID, ErrNotFound)
	}
	if v.State != VolumeDeleted {
		return Result{}, fmt.Errorf("volume %s is %s, not deleted: %w", v.ID, v.State, ErrFailedPrecondition)
	}
	delete(s.Volumes, c.VolumeID)
	return Result{}, nil
}

func applyRebuildProgress(s *State, c *RebuildProgressUpdate) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	i, err := v.replicaIndex(c.ReplicaID)
	if err != nil {
		return Result{}, err
	}
	if v.Replicas[i].State != ReplicaRebuilding && !c.Done {
		return Result{}, fmt.Errorf("replica %s is %s, not rebuilding: %w", c.ReplicaID, v.Replicas[i].State, ErrFailedPrecondition)
	}
	if c.BytesCompared > c.BytesTotal || c.BytesCopied > c.BytesTotal {
		return Result{}, fmt.Errorf("rebuild progress beyond its total: %w", ErrInvalidArgument)
	}
	v.Rebuild = &RebuildProgress{ReplicaID: c.ReplicaID, BytesTotal: c.BytesTotal,
		BytesCompared: c.BytesCompared, BytesCopied: c.BytesCopied, Done: c.Done}
	return Result{Volume: v.Clone()}, nil
}

// applyRequest applies a client request once: a request id already in the
// table gets the remembered answer and changes nothing.
func applyRequest(s *State, c *Request) (Result, error) {
	if c.ID == "" {
		return Result{}, fmt.Errorf("request without an id: %w", ErrInvalidArgument)
	}
	if s.requestIndex == nil {
		s.requestIndex = make(map[string]int, len(s.Requests))
		s.requestBase = 0
		for i, r := range s.Requests {
			s.requestIndex[r.ID] = i
		}
	}
	if pos, ok := s.requestIndex[c.ID]; ok {
		r := s.Requests[pos-s.requestBase]
		return cloneResult(r.Result), fromWire(r.Err)
	}
	inner, err := Decode(c.Command)
	if err != nil {
		return Result{}, err
	}
	if _, nested := inner.(*Request); nested {
		return Result{}, fmt.Errorf("request %s wraps another request: %w", c.ID, ErrBadCommand)
	}
	res, err := apply(s, inner)
	// Forget the oldest requests one at a time: re-slicing is O(1) and
	// append later copies only the live records.
	for len(s.Requests) >= MaxRememberedRequests {
		delete(s.requestIndex, s.Requests[0].ID)
		s.Requests = s.Requests[1:]
		s.requestBase++
	}
	s.Requests = append(s.Requests, RequestRecord{ID: c.ID, Result: cloneResult(res), Err: toWire(err)})
	s.requestIndex[c.ID] = s.requestBase + len(s.Requests) - 1
	return res, err
}

func cloneResult(r Result) Result {
	out := Result{}
	if r.Volume != nil {
		out.Volume = r.Volume.Clone()
	}
	if r.Node != nil {
		n := *r.Node
		out.Node = &n
	}
	if r.Snapshot != nil {
		sn := *r.Snapshot
		out.Snapshot = &sn
	}
	return out
}

func applySetParameters(s *State, c *SetParameters) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	next := map[string]string{}
	for k, val := range v.Parameters {
		next[k] = val
	}
	// Sorted: the error names the first bad key, and errors are part of the
	// replicated state (remembered request results).
	for _, k := range slices.Sorted(maps.Keys(c.Parameters)) {
		val := c.Parameters[k]
		if !volspec.Mutable(k) {
			return Result{}, fmt.Errorf("parameter %q cannot be changed on a live volume: %w", k, ErrInvalidArgument)
		}
		if val == "" {
			delete(next, k)
		} else {
			next[k] = val
		}
	}
	if _, err := volspec.Decode(next); err != nil {
		return Result{}, err
	}
	if was := v.guaranteedIOPS(); was > 0 && (&Volume{Parameters: next}).guaranteedIOPS() != was {
		// Its nodes promised this much (admission.go); a new amount
		// would need admitting again.
		return Result{}, fmt.Errorf("the minIOPS of guaranteed volume %s cannot change (its nodes admitted %d): %w", v.ID, was, ErrFailedPrecondition)
	}
	if len(next) == 0 {
		next = nil // as a snapshot restores it
	}
	v.Parameters = next
	return Result{Volume: v.Clone()}, nil
}

// MaxGenerationLen bounds a replica generation (the replica package draws
// 32 hex digits).
const MaxGenerationLen = 64

func applySetReplicaGeneration(s *State, c *SetReplicaGeneration) (Result, error) {
	if c.Generation == "" || len(c.Generation) > MaxGenerationLen {
		return Result{}, fmt.Errorf("replica generation must be 1-%d characters, got %d: %w", MaxGenerationLen, len(c.Generation), ErrInvalidArgument)
	}
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	i, err := v.replicaIndex(c.ReplicaID)
	if err != nil {
		return Result{}, err
	}
	r := &v.Replicas[i]
	if r.Generation == c.Generation {
		return Result{Volume: v.Clone()}, nil // already so: idempotent
	}
	if r.Generation != c.Expect {
		return Result{}, fmt.Errorf("replica %s has generation %q, caller expected %q: %w", r.ID, r.Generation, c.Expect, ErrGenerationMismatch)
	}
	switch {
	case r.State == ReplicaRebuilding:
	case r.State == ReplicaHealthy && r.Generation == "":
	case r.State == ReplicaHealthy:
		// Invariant: a healthy replica stands for one copy for as long as it
		// is healthy; a copy with another generation holds other data.
		return Result{}, fmt.Errorf("replica %s is healthy with generation %q; eject it before recording another: %w", r.ID, r.Generation, ErrFailedPrecondition)
	default:
		return Result{}, fmt.Errorf("replica %s is %s; its generation is recorded when it rebuilds: %w", r.ID, r.State, ErrFailedPrecondition)
	}
	r.Generation = c.Generation
	return Result{Volume: v.Clone()}, nil
}

// applyAdvanceEpoch increments the epoch of a volume held by c.NodeID (or,
// with no NodeID, of a volume with no attachment). Only the holder may ask:
// an engine that lost the attachment must not move the epoch under the new
// one.
func applyAdvanceEpoch(s *State, c *AdvanceEpoch) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	switch a := v.Attachment; {
	case c.NodeID == "" && a != nil:
		return Result{}, fmt.Errorf("volume %s is attached to %s: %w", v.ID, a.Node, ErrFailedPrecondition)
	case c.NodeID != "" && (a == nil || a.Node != c.NodeID):
		return Result{}, fmt.Errorf("volume %s is not attached to %s: %w", v.ID, c.NodeID, ErrFailedPrecondition)
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	v.Epoch++
	return Result{Volume: v.Clone()}, nil
}

// maxConditionMessage bounds a condition's message in the store.
const maxConditionMessage = 1024

func applySetVolumeCondition(s *State, c *SetVolumeCondition) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if len(c.Message) > maxConditionMessage {
		return Result{}, fmt.Errorf("condition message of %d bytes, at most %d: %w", len(c.Message), maxConditionMessage, ErrInvalidArgument)
	}
	if !c.Abnormal {
		v.Condition = nil
	} else {
		v.Condition = &VolumeCondition{Abnormal: true, Message: c.Message}
	}
	return Result{Volume: v.Clone()}, nil
}

func applyScrubProgress(s *State, c *ScrubProgressUpdate) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	p := c.Progress
	if p.BlocksChecked > p.BlocksTotal {
		return Result{}, fmt.Errorf("scrub progress beyond its total: %w", ErrInvalidArgument)
	}
	// A report of an older scrub (a late or retried one) must not erase
	// the request for the next one that cairn ctl is waiting on.
	if v.Scrub != nil && p.Seq < v.Scrub.Seq {
		return Result{}, fmt.Errorf("progress of scrub %d after scrub %d was asked for: %w", p.Seq, v.Scrub.Seq, ErrFailedPrecondition)
	}
	v.Scrub = &p
	return Result{Volume: v.Clone()}, nil
}

// applyExpandVolume records a volume's new, larger size. A size already
// reached is a success with the volume as it is (idempotent; nothing
// shrinks). Every node holding one of its replicas must have room for the
// growth under thin provisioning, the rule placement applies to a new
// replica: the replica files are sparse, but the space is promised.
func applyExpandVolume(s *State, c *ExpandVolume) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Hidden {
		return Result{}, fmt.Errorf("volume %q was deleted (kept for its snapshots): %w", v.ID, ErrNotFound)
	}
	if c.SizeBytes <= v.SizeBytes {
		return Result{Volume: v.Clone()}, nil
	}
	if c.SizeBytes%sectorSize != 0 {
		return Result{}, fmt.Errorf("volume %s: size %d is not a multiple of %d bytes: %w", v.ID, c.SizeBytes, sectorSize, ErrInvalidArgument)
	}
	if v.Encrypted() && c.SizeBytes%crypt.BlockSize != 0 {
		return Result{}, fmt.Errorf("volume %s: size %d of an encrypted volume is not a multiple of its %d-byte blocks: %w", v.ID, c.SizeBytes, crypt.BlockSize, ErrInvalidArgument)
	}
	// What each replica grows by (an encrypted one by its entries too).
	grow := replicaBytes(c.SizeBytes, v.Encrypted()) - v.ReplicaBytes()
	free := map[string]uint64{}
	for _, n := range s.PlacementNodesFor(v.diskType()) {
		free[n.ID] = n.FreeBytes(s.OverProvisioningRatio)
	}
	// Sorted by replica order: the error names the first node short of
	// room, the same on every member.
	for _, r := range v.Replicas {
		if f, ok := free[r.Node]; ok && f < grow {
			return Result{}, fmt.Errorf("volume %s: node %s has %d bytes free for replicas, growing to %d needs %d more: %w",
				v.ID, r.Node, f, c.SizeBytes, grow, ErrResourceExhausted)
		}
	}
	v.SizeBytes = c.SizeBytes
	return Result{Volume: v.Clone()}, nil
}

// sectorSize: a volume's size is whole sectors (the replica format's unit).
const sectorSize = 512
