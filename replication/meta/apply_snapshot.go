package meta

import (
	"cmp"
	"fmt"
	"slices"

	"github.com/cairn-csi/cairn/replication/placement"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// The snapshot commands (docs/snapshots.md, "The control plane"). A
// snapshot's record goes through: requested (CreateSnapshot), ready
// (SetSnapshotReady, with the replicas that sealed it), deleting
// (MarkSnapshotDeleting), gone (DeleteSnapshot). The node serving the
// source volume does the work between the steps.

func applyCreateSnapshot(s *State, c *CreateSnapshot) (Result, error) {
	if c.ID == "" || c.Name == "" || c.SourceVolumeID == "" {
		return Result{}, fmt.Errorf("snapshot needs an id, a name and a source volume: %w", ErrInvalidArgument)
	}
	for _, sn := range s.Snapshots {
		if sn.Name == c.Name && !sn.Deleting {
			if sn.SourceVolumeID == c.SourceVolumeID {
				out := *sn
				return Result{Snapshot: &out}, nil
			}
			return Result{}, fmt.Errorf("snapshot name %q is taken by a snapshot of %s: %w", c.Name, sn.SourceVolumeID, ErrAlreadyExists)
		}
	}
	if _, ok := s.Snapshots[c.ID]; ok {
		return Result{}, fmt.Errorf("snapshot id %q: %w", c.ID, ErrAlreadyExists)
	}
	v, err := s.liveVolume(c.SourceVolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Hidden {
		return Result{}, fmt.Errorf("volume %q was deleted: %w", v.ID, ErrNotFound)
	}
	sn := &Snapshot{ID: c.ID, Name: c.Name, SourceVolumeID: v.ID, SizeBytes: v.SizeBytes, CreatedAt: c.CreatedAt}
	s.Snapshots[sn.ID] = sn
	out := *sn
	return Result{Snapshot: &out}, nil
}

func applySetSnapshotReady(s *State, c *SetSnapshotReady) (Result, error) {
	sn, ok := s.Snapshots[c.SnapshotID]
	if !ok {
		return Result{}, fmt.Errorf("snapshot %q: %w", c.SnapshotID, ErrNotFound)
	}
	switch {
	case c.Error != "":
		if sn.ReadyToUse {
			return Result{}, fmt.Errorf("snapshot %s is ready; an error of an attempt to take it again is not recorded: %w", sn.ID, ErrFailedPrecondition)
		}
		sn.Error = c.Error
	case len(c.Replicas) == 0:
		return Result{}, fmt.Errorf("snapshot %s: a ready snapshot needs the replicas that hold it: %w", sn.ID, ErrInvalidArgument)
	case sn.ReadyToUse:
		// A retry of the node's report: the first one stands.
	default:
		sn.ReadyToUse, sn.Error = true, ""
		sn.Replicas = slices.Sorted(slices.Values(c.Replicas))
	}
	out := *sn
	out.Replicas = slices.Clone(sn.Replicas)
	return Result{Snapshot: &out}, nil
}

func applyMarkSnapshotDeleting(s *State, c *MarkSnapshotDeleting) (Result, error) {
	sn, ok := s.Snapshots[c.SnapshotID]
	if !ok {
		return Result{}, fmt.Errorf("snapshot %q: %w", c.SnapshotID, ErrNotFound)
	}
	sn.Deleting = true
	out := *sn
	out.Replicas = slices.Clone(sn.Replicas)
	return Result{Snapshot: &out}, nil
}

// applyDeleteSnapshot forgets a snapshot. If its volume is hidden and this
// was its last snapshot, the volume is deleted now (a hidden volume exists
// only in a cluster whose members all read RetireVolume, so older members
// never meet this case).
func applyDeleteSnapshot(s *State, c *DeleteSnapshot) (Result, error) {
	sn, ok := s.Snapshots[c.SnapshotID]
	if !ok {
		return Result{}, fmt.Errorf("snapshot %q: %w", c.SnapshotID, ErrNotFound)
	}
	delete(s.Snapshots, c.SnapshotID)
	v, ok := s.Volumes[sn.SourceVolumeID]
	if !ok || !v.Hidden || v.State == VolumeDeleted || s.hasSnapshots(v.ID) || v.Attachment != nil {
		return Result{}, nil
	}
	if checkTransition(v.State, VolumeDeleted) != nil {
		return Result{}, nil
	}
	v.State = VolumeDeleted
	v.Epoch++ // fences the maintenance engine that removed the snapshot
	return Result{Volume: v.Clone()}, nil
}

// RestorePending reports whether a volume restored from snapshot id still
// waits for a replica to be made from its layers: the snapshot's layers
// must stay on the source's replicas until then.
func (s *State) RestorePending(id string) bool {
	for _, v := range s.Volumes {
		if v.RestoredFrom != id || v.State == VolumeDeleted {
			continue
		}
		for _, r := range v.Replicas {
			if r.Source != "" && r.Generation == "" && r.State == ReplicaHealthy {
				return true
			}
		}
	}
	return false
}

// hasSnapshots reports whether any snapshot record names volume id.
func (s *State) hasSnapshots(id string) bool {
	for _, sn := range s.Snapshots {
		if sn.SourceVolumeID == id {
			return true
		}
	}
	return false
}

func applyRetireVolume(s *State, c *RetireVolume) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if v.Hidden {
		return Result{Volume: v.Clone()}, nil
	}
	if !s.hasSnapshots(v.ID) {
		return applyDeleteVolume(s, &DeleteVolume{VolumeID: v.ID})
	}
	if v.Attachment != nil {
		return Result{}, fmt.Errorf("volume %s is attached to %s: %w", v.ID, v.Attachment.Node, ErrFailedPrecondition)
	}
	v.Hidden = true
	return Result{Volume: v.Clone()}, nil
}

// checkCreate validates what every new volume needs and returns its write
// quorum.
func checkCreate(c *CreateVolume) (int, error) {
	switch {
	case c.ID == "" || c.Name == "":
		return 0, fmt.Errorf("volume needs an id and a name: %w", ErrInvalidArgument)
	case c.SizeBytes == 0:
		return 0, fmt.Errorf("volume %q: size is zero: %w", c.Name, ErrInvalidArgument)
	case c.Replicas < 1 || c.Replicas > MaxReplicas:
		return 0, fmt.Errorf("volume %q: replicas %d not in 1..%d: %w", c.Name, c.Replicas, MaxReplicas, ErrInvalidArgument)
	case c.WriteQuorum < 0 || c.WriteQuorum > c.Replicas:
		return 0, fmt.Errorf("volume %q: write quorum %d not in 1..%d: %w", c.Name, c.WriteQuorum, c.Replicas, ErrInvalidArgument)
	}
	if c.WriteQuorum == 0 {
		if (&Volume{Parameters: c.Parameters}).asyncParam() {
			return 1, nil // the engine's own replica (docs/replication-modes.md)
		}
		return c.Replicas/2 + 1, nil
	}
	return c.WriteQuorum, nil
}

// sameVolume reports whether v is what create c would make (an idempotent
// retry).
func sameVolume(v *Volume, c *CreateVolume, quorum int) bool {
	// The wrapped data keys are not compared: a retried CreateVolume wraps
	// a new random one, and the volume keeps its first. Whether there is
	// one is in the parameters (encryption).
	return v.SizeBytes == c.SizeBytes && v.ReplicaCount == c.Replicas && v.WriteQuorum == quorum &&
		sameParameters(v.Parameters, c.Parameters) && v.ContentSource == c.ContentSource
}

func applyRestoreVolume(s *State, c *RestoreVolume) (Result, error) {
	quorum, err := checkCreate(&c.CreateVolume)
	if err != nil {
		return Result{}, err
	}
	if v := s.volumeByName(c.Name); v != nil {
		if sameVolume(v, &c.CreateVolume, quorum) {
			return Result{Volume: v.Clone()}, nil
		}
		return Result{}, fmt.Errorf("volume name %q is taken by %s with size %d, %d replicas and source %q: %w",
			c.Name, v.ID, v.SizeBytes, v.ReplicaCount, v.ContentSource, ErrAlreadyExists)
	}
	if _, ok := s.Volumes[c.ID]; ok {
		return Result{}, fmt.Errorf("volume id %q: %w", c.ID, ErrAlreadyExists)
	}
	if c.ContentSource == "" {
		return Result{}, fmt.Errorf("volume %q: a restore names its content source: %w", c.Name, ErrInvalidArgument)
	}
	spec, err := volspec.Decode(c.Parameters)
	if err != nil {
		return Result{}, fmt.Errorf("volume %q: %w", c.Name, err)
	}
	sn, ok := s.Snapshots[c.SnapshotID]
	if !ok || sn.Deleting {
		return Result{}, fmt.Errorf("snapshot %q: %w", c.SnapshotID, ErrNotFound)
	}
	if !sn.ReadyToUse {
		return Result{}, fmt.Errorf("snapshot %s is not ready yet: %w", sn.ID, ErrFailedPrecondition)
	}
	if c.SizeBytes < sn.SizeBytes {
		return Result{}, fmt.Errorf("volume %q: %d bytes is smaller than snapshot %s (%d bytes): volumes cannot shrink: %w",
			c.Name, c.SizeBytes, sn.ID, sn.SizeBytes, ErrInvalidArgument)
	}
	src, ok := s.Volumes[sn.SourceVolumeID]
	if !ok || src.State == VolumeDeleted {
		return Result{}, fmt.Errorf("snapshot %s: its volume %s is gone: %w", sn.ID, sn.SourceVolumeID, ErrFailedPrecondition)
	}
	if spec.Checksummed() != src.Checksummed() {
		// The restored replicas share the source's layers, sums included
		// or not: the new volume cannot choose otherwise.
		return Result{}, fmt.Errorf("volume %q: checksumAlgorithm must be the source volume's (checksums %v): a restore shares its layers: %w",
			c.Name, src.Checksummed(), ErrInvalidArgument)
	}
	if spec.Encrypted() != src.Encrypted() {
		// The restored replicas share the source's layers, encrypted
		// under its data key or not at all.
		return Result{}, fmt.Errorf("volume %q: encryption must be the source volume's (%s): a restore shares its layers: %w",
			c.Name, map[bool]string{true: volspec.EncryptionAESGCM, false: volspec.EncryptionNone}[src.Encrypted()], ErrInvalidArgument)
	}
	if srcSpec, _ := src.Spec(); spec.Compression != srcSpec.Compression {
		// The restored replicas share the source's layers, compressed
		// or not (replication/replica, datafile.go).
		return Result{}, fmt.Errorf("volume %q: compression must be the source volume's (%q): a restore shares its layers: %w",
			c.Name, cmp.Or(srcSpec.Compression, volspec.CompressionNone), ErrInvalidArgument)
	}
	if c.Encryption != nil {
		return Result{}, fmt.Errorf("volume %q: a restore shares its source's data key; it brings none of its own: %w", c.Name, ErrInvalidArgument)
	}
	if spec.DiskType != src.diskType() {
		// Hard links stay on the source's disks (disktypes.go).
		return Result{}, fmt.Errorf("volume %q: type must be the source volume's (%q): a restore shares its layers: %w",
			c.Name, src.diskType(), ErrInvalidArgument)
	}
	// Readable at once: the replicas made from the snapshot's layers hold
	// its data from the start.
	v := newVolume(&c.CreateVolume, quorum)
	v.RestoredFrom = sn.ID
	v.Encryption = src.Encryption.Clone()
	// The replicas that sealed the snapshot first, then the source's other
	// healthy replicas: a replica placed since received the snapshot's
	// layers with its rebuild. One whose node turns out not to have them
	// is failed there and rebuilt from the others (storagenode.restore).
	var used, unableSrc []string
	for _, sealed := range []bool{true, false} {
		for _, r := range src.Replicas {
			if len(used) == c.Replicas {
				break
			}
			n := s.Nodes[r.Node]
			if r.State != ReplicaHealthy || slices.Contains(sn.Replicas, r.ID) != sealed || n == nil || n.State != NodeUp ||
				len(c.AllowedZones) > 0 && !slices.Contains(c.AllowedZones, n.Zone) || slices.Contains(used, r.Node) {
				continue
			}
			if ok, why := n.canDedup(spec.DiskType); spec.Deduplication && !ok {
				// Not where the pass could share its blocks: placed
				// anew below, and rebuilt.
				if !slices.Contains(unableSrc, why) {
					unableSrc = append(unableSrc, why)
				}
				continue
			}
			used = append(used, r.Node)
			v.Replicas = append(v.Replicas, Replica{ID: v.nextReplicaID(), Node: r.Node, State: ReplicaHealthy, Source: r.ID})
		}
	}
	if len(used) == 0 {
		return Result{}, dedupPlacementError(fmt.Errorf("snapshot %s: no healthy replica of its volume is on a node that is up (and in the allowed zones): %w",
			sn.ID, ErrFailedPrecondition), unableSrc)
	}
	if more := c.Replicas - len(used); more > 0 {
		rspec, _ := volspec.Decode(c.Parameters) // decoded above (spec)
		candidates, unable := s.placementNodes(v.diskType(), rspec)
		nodes, err := placement.Place(candidates, placement.Request{
			Replicas: more, SizeBytes: replicaBytes(c.SizeBytes, src.Encrypted()), OverProvisioningRatio: s.OverProvisioningRatio,
			Exclude: used, AllowedZones: c.AllowedZones,
		})
		if err != nil {
			return Result{}, fmt.Errorf("volume %q: %w", c.Name, unable.wrap(typedPlacementError(v.diskType(), err)))
		}
		for _, node := range nodes {
			// Filled from the replicas above, through a rebuild.
			v.Replicas = append(v.Replicas, Replica{ID: v.nextReplicaID(), Node: node, State: ReplicaRebuilding})
		}
	}
	s.Volumes[v.ID] = v
	return Result{Volume: v.Clone()}, nil
}

func applyRecordUsage(s *State, c *RecordUsage) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if _, err := v.replicaIndex(c.ReplicaID); err != nil {
		return Result{}, err
	}
	v.Usage = &VolumeUsage{ReplicaID: c.ReplicaID, AllocatedBytes: c.AllocatedBytes, Depth: c.Depth}
	if c.Flatten != nil {
		f := *c.Flatten
		v.Usage.Flatten = &f
	}
	if c.Merge != nil {
		m := *c.Merge
		v.Usage.Merge = &m
	}
	for id, sp := range c.Snapshots {
		if sn, ok := s.Snapshots[id]; ok && sn.SourceVolumeID == v.ID {
			x := sp
			sn.Space = &x
		}
	}
	return Result{Volume: v.Clone()}, nil
}
