package meta

import (
	"fmt"
	"maps"
	"reflect"
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
// replica there. It runs at every placement, over every volume: what it
// needs of a volume's parameters is decoded once per parameter map and
// kept (factsOf), or a store of 10 000 volumes would spend most of each
// CreateVolume decoding them (tests/bench/scalebench).
func (s *State) placementLoad(t string) (used, reserved map[string]uint64) {
	used, reserved = map[string]uint64{}, map[string]uint64{}
	for _, v := range s.Volumes {
		if v.State == VolumeDeleted {
			continue
		}
		f := s.factsOf(v)
		// A bad spec reads as the default type, with no reservation.
		onType := f.diskType == t || !f.valid && t == ""
		for _, r := range v.Replicas {
			if onType {
				used[r.Node] += v.ReplicaBytes()
			}
			reserved[r.Node] += f.minIOPS
		}
	}
	if len(s.placementMemo) > 2*len(s.Volumes)+1024 {
		for id := range s.placementMemo {
			if _, ok := s.Volumes[id]; !ok {
				delete(s.placementMemo, id)
			}
		}
	}
	return used, reserved
}

// placementFacts are what placement reads of a volume's parameters.
type placementFacts struct {
	// params is the map they were read from: a volume's Parameters are
	// replaced, never changed in place (applySetParameters), so the same
	// map means the same facts. Holding it keeps its address from being
	// reused by another map.
	params   map[string]string
	diskType string
	valid    bool   // the parameters decode
	minIOPS  uint64 // of a guaranteed volume, else 0
}

// factsOf returns v's placement facts, decoding its parameters only when
// they are not the ones decoded last time. It writes s's memo: callers
// hold s exclusively (the FSM's apply, or a private copy of the state).
func (s *State) factsOf(v *Volume) *placementFacts {
	if f := s.placementMemo[v.ID]; f != nil && sameMap(f.params, v.Parameters) {
		return f
	}
	spec, err := v.Spec()
	f := &placementFacts{params: v.Parameters, diskType: spec.DiskType, valid: err == nil}
	if err == nil && spec.Guaranteed() {
		f.minIOPS = spec.QoS.MinIOPS
	}
	if s.placementMemo == nil {
		s.placementMemo = map[string]*placementFacts{}
	}
	s.placementMemo[v.ID] = f
	return f
}

// sameMap reports whether a and b are the same map (or both nil).
func sameMap(a, b map[string]string) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
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
