package meta

import (
	"fmt"
	"maps"
	"slices"

	"github.com/cairn-csi/cairn/replication/placement"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Disk types (the StorageClass key "type"; docs/architecture.md,
// "StorageClass parameters"). A node may serve data disks of several types;
// the default one's space is the node's CapacityBytes and FreeBytes, as
// always, and the others' are in Node.Disks, which the node records with
// SetNodeDisks (30). A volume's replicas go only on disks of its type, and
// use only their space; volumes of the default type use only the default
// disks. A typed volume is made by AdmitVolume (gated: admission.go), so a
// member that places volumes by type is the only kind there is once one
// exists.

// DiskSpace is one disk's size and free bytes.
type DiskSpace struct {
	CapacityBytes uint64 `json:"capacity_bytes"`
	FreeBytes     uint64 `json:"free_bytes"`
}

// SetNodeDisks records node NodeID's data disks of types other than the
// default (all of them: a type left out has no disk there any more).
type SetNodeDisks struct {
	NodeID string               `json:"node_id"`
	Disks  map[string]DiskSpace `json:"disks,omitempty"`
}

func (SetNodeDisks) Type() CommandType { return CmdSetNodeDisks }

func applySetNodeDisks(s *State, c *SetNodeDisks) (Result, error) {
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	for _, t := range slices.Sorted(maps.Keys(c.Disks)) {
		if t == volspec.DiskTypeDefault || !volspec.ValidDiskType(t) {
			return Result{}, fmt.Errorf("node %s: disk type %q: want 1 to 63 of a-z, 0-9 and -, not %q: %w",
				c.NodeID, t, volspec.DiskTypeDefault, ErrInvalidArgument)
		}
	}
	n.Disks = maps.Clone(c.Disks) // a new map: copies of the node handed out keep theirs
	if len(n.Disks) == 0 {
		n.Disks = nil
	}
	out := *n
	out.Disks = maps.Clone(n.Disks)
	return Result{Node: &out}, nil
}

// diskType is the type of the disks the volume's replicas are on ("" for
// the default).
func (v *Volume) diskType() string {
	spec, err := v.Spec()
	if err != nil {
		return ""
	}
	return spec.DiskType
}

// space is the size and free bytes of n's disk of type t ("" for the
// default one).
func (n *Node) space(t string) DiskSpace {
	if t == "" {
		return DiskSpace{CapacityBytes: n.CapacityBytes, FreeBytes: n.FreeBytes}
	}
	return n.Disks[t]
}

// PlacementNodesFor describes the cluster's nodes as placement sees them
// for a volume on disks of type t ("" for the default): topology,
// liveness, the capacity of their disk of that type, the bytes of the
// replicas already placed on disks of that type, and the IOPS they can
// promise and have promised to guaranteed volumes (admission.go).
func (s *State) PlacementNodesFor(t string) []placement.Node {
	used, reserved := s.placementLoad(t)
	out := make([]placement.Node, 0, len(s.Nodes))
	for _, n := range s.Nodes {
		out = append(out, placement.Node{
			ID: n.ID, Zone: n.Zone, Region: n.Region,
			Up:             n.State == NodeUp,
			CapacityBytes:  n.space(t).CapacityBytes,
			AllocatedBytes: used[n.ID],
			ReservableIOPS: n.ReservableIOPS,
			ReservedIOPS:   reserved[n.ID],
		})
	}
	return out
}

// placementLoad sums, per node, the sizes of the live volumes' replicas on
// disks of type t, and the minIOPS of the live guaranteed volumes with a
// replica there, reading each volume's parameters once.
func (s *State) placementLoad(t string) (used, reserved map[string]uint64) {
	used, reserved = map[string]uint64{}, map[string]uint64{}
	for _, v := range s.Volumes {
		if v.State == VolumeDeleted {
			continue
		}
		spec, err := v.Spec() // a bad spec reads as the default type, no reservation
		onType := spec.DiskType == t || err != nil && t == ""
		iops := uint64(0)
		if err == nil && spec.Guaranteed() {
			iops = spec.QoS.MinIOPS
		}
		for _, r := range v.Replicas {
			if onType {
				used[r.Node] += v.ReplicaBytes()
			}
			reserved[r.Node] += iops
		}
	}
	return used, reserved
}

// DiskSpace is the size and free bytes of node id's disk of type t ("" for
// the default one), as it last reported; zero for none.
func (s *State) DiskSpace(id, t string) DiskSpace {
	if n := s.Nodes[id]; n != nil {
		return n.space(t)
	}
	return DiskSpace{}
}

// typedPlacementError says which disk type a placement that failed was for.
func typedPlacementError(t string, err error) error {
	if t == "" {
		return placementError(err)
	}
	return fmt.Errorf("on disks of type %q: %w", t, placementError(err))
}
