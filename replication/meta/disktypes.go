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

// placementLoad returns, per node, the bytes of the live volumes' replicas
// on disks of type t, and the minIOPS of the live guaranteed volumes with
// a replica there. It runs at every placement: the sums are kept in the
// state's placement index, built once and then updated for each volume a
// command changes (noteChanged), so that a placement costs the same with
// 10 000 volumes as with ten (tests/bench/scalebench). The maps are the
// index's own: read them, do not change them.
func (s *State) placementLoad(t string) (used, reserved map[string]uint64) {
	ix := s.placementIndex()
	return ix.used[t], ix.reserved
}

// placementIndex is what placementLoad and volumeByName read, kept up to
// date by noteChanged. It is derived from Volumes alone, never serialized
// nor cloned: a state without one (restored, cloned, decoded) builds it
// at its first use.
type placementIndex struct {
	used     map[string]map[string]uint64 // disk type → node → replica bytes
	reserved map[string]uint64            // node → promised IOPS
	byName   map[string]string            // name → id of the live, visible volume
	shares   map[string]volumeShare       // volume id → what it added above
}

// volumeShare is what one volume adds to the index.
type volumeShare struct {
	name    string   // in byName (a live, visible volume), else ""
	types   []string // the disk types its bytes count for (none once deleted)
	nodes   []string // its replicas' nodes
	bytes   uint64   // per replica
	iops    uint64   // per replica, of a guaranteed volume
	counted bool     // not deleted: it adds to used and reserved
}

func shareOf(v *Volume) volumeShare {
	var sh volumeShare
	if v.State == VolumeDeleted {
		return sh
	}
	if !v.Hidden {
		sh.name = v.Name
	}
	sh.counted = true
	spec, err := v.Spec()
	// A bad spec counts for its type and for the default type, with no
	// reservation.
	sh.types = []string{spec.DiskType}
	if err != nil && spec.DiskType != "" {
		sh.types = append(sh.types, "")
	}
	if err == nil && spec.Guaranteed() {
		sh.iops = spec.QoS.MinIOPS
	}
	sh.bytes = v.ReplicaBytes()
	for _, r := range v.Replicas {
		sh.nodes = append(sh.nodes, r.Node)
	}
	return sh
}

// add adds (sign 1) or takes away (sign -1) a volume's share.
func (ix *placementIndex) add(id string, sh volumeShare, sign int) {
	if sh.name != "" {
		if sign > 0 {
			ix.byName[sh.name] = id
		} else if ix.byName[sh.name] == id {
			delete(ix.byName, sh.name)
		}
	}
	if !sh.counted {
		return
	}
	for _, t := range sh.types {
		used := ix.used[t]
		if used == nil {
			used = map[string]uint64{}
			ix.used[t] = used
		}
		for _, n := range sh.nodes {
			used[n] = addSigned(used[n], sh.bytes, sign)
		}
	}
	for _, n := range sh.nodes {
		ix.reserved[n] = addSigned(ix.reserved[n], sh.iops, sign)
	}
}

func addSigned(a, b uint64, sign int) uint64 {
	if sign > 0 {
		return a + b
	}
	return a - b
}

// placementIndex returns s's index, building it if s has none.
func (s *State) placementIndex() *placementIndex {
	if s.index != nil {
		return s.index
	}
	ix := &placementIndex{used: map[string]map[string]uint64{}, reserved: map[string]uint64{},
		byName: map[string]string{}, shares: make(map[string]volumeShare, len(s.Volumes))}
	// In id order, so that two live volumes of one name (which
	// CreateVolume never makes) resolve the same way on every member.
	for _, id := range slices.Sorted(maps.Keys(s.Volumes)) {
		sh := shareOf(s.Volumes[id])
		ix.shares[id] = sh
		ix.add(id, sh, 1)
	}
	s.index = ix
	return ix
}

// noteChanged brings the index up to date after a command changed (or
// removed) the volumes ids: apply calls it with the volumes the change
// log records (touched), which the FSM tests check are all that changed
// (checkChangeLog) and that the index then matches a fresh one
// (checkIndex).
func (s *State) noteChanged(ids []string) {
	ix := s.index
	if ix == nil {
		return // built at its first use
	}
	for _, id := range ids {
		if old, ok := ix.shares[id]; ok {
			ix.add(id, old, -1)
			delete(ix.shares, id)
		}
		if v, ok := s.Volumes[id]; ok {
			sh := shareOf(v)
			ix.shares[id] = sh
			ix.add(id, sh, 1)
		}
	}
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
