package meta

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/cairn-csi/cairn/replication/placement"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Deduplication (docs/deduplication.md): a volume with deduplication
// "true" has its replicas only on data directories that can share blocks
// between files, which each node probes at its start and records here.
// A CreateVolume that finds too few says which directories could not, and
// why, rather than placing the volume where the pass would do nothing.

// SetNodeDedup records, for each of node NodeID's data disks ("" for the
// default one, else its type), whether its data directory can share
// blocks: "" yes, otherwise why not (the node's own words, naming the
// directory and its file system). Gated (gate.go): an older member does
// not know the field.
type SetNodeDedup struct {
	NodeID string            `json:"node_id"`
	Disks  map[string]string `json:"disks"`
}

func (SetNodeDedup) Type() CommandType { return CmdSetNodeDedup }

func applySetNodeDedup(s *State, c *SetNodeDedup) (Result, error) {
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	for _, t := range slices.Sorted(maps.Keys(c.Disks)) {
		if t != "" && !volspec.ValidDiskType(t) {
			return Result{}, fmt.Errorf("node %s: disk type %q: %w", c.NodeID, t, ErrInvalidArgument)
		}
	}
	n.Dedup = maps.Clone(c.Disks) // a new map: copies of the node handed out keep theirs
	out := *n
	out.Disks, out.Dedup = maps.Clone(n.Disks), maps.Clone(n.Dedup)
	return Result{Node: &out}, nil
}

// dedupParam reports whether parameters ask for deduplication.
func dedupParam(params map[string]string) bool {
	s, err := volspec.Decode(params)
	return err == nil && s.Deduplication
}

// canDedup says whether node n's data directory of disk type t can share
// blocks, and if not, why (for the error of a placement that fell short).
func (n *Node) canDedup(t string) (bool, string) {
	why, ok := n.Dedup[t]
	switch {
	case !ok:
		return false, fmt.Sprintf("node %s has not said whether its data directory can share blocks (a build without deduplication, or its probe failed)", n.ID)
	case why != "":
		return false, fmt.Sprintf("node %s: %s", n.ID, why)
	}
	return true, ""
}

// placementNodes is PlacementNodesFor(t) for a volume of spec, without
// the nodes whose data directory of type t cannot share blocks when it has
// deduplication, and those that lack a feature it needs (features.go);
// unable says why for each node up left out.
func (s *State) placementNodes(t string, spec volspec.Spec) (nodes []placement.Node, unable unplaceable) {
	need := featuresOf(spec)
	for _, pn := range s.PlacementNodesFor(t) {
		n := s.Nodes[pn.ID]
		if ok, why := n.canDedup(t); spec.Deduplication && !ok {
			if pn.Up {
				unable.dedup = append(unable.dedup, why)
			}
			continue
		}
		if missing := n.lacks(need); len(missing) > 0 {
			if pn.Up {
				unable.features = append(unable.features, n.lacksWhy(missing))
			}
			continue
		}
		nodes = append(nodes, pn)
	}
	slices.Sort(unable.dedup)
	slices.Sort(unable.features)
	return nodes, unable
}

// unplaceable are the nodes up that placementNodes left out, and why.
type unplaceable struct{ dedup, features []string }

// wrap adds to a placement that failed the nodes it could not use and why.
func (u unplaceable) wrap(err error) error {
	if len(u.features) > 0 {
		err = fmt.Errorf("%d node(s) up lack a feature the volume needs: %s: %w", len(u.features), strings.Join(u.features, "; "), err)
	}
	return dedupPlacementError(err, u.dedup)
}

// dedupPlacementError adds to a placement that failed for a volume with
// deduplication the nodes it could not use and why.
func dedupPlacementError(err error, unable []string) error {
	if len(unable) == 0 {
		return err
	}
	return fmt.Errorf("deduplication \"true\" needs data directories that can share blocks, and %d node(s) up have none: %s: %w",
		len(unable), strings.Join(unable, "; "), err)
}

// ReplicaSpace is what a replica takes on its node's disk.
type ReplicaSpace struct {
	// AllocatedBytes is what the files of its layers hold, snapshots
	// included: the space its data would take without sharing.
	AllocatedBytes uint64 `json:"allocated_bytes"`
	// SharedBytes is the part of AllocatedBytes whose blocks another
	// file uses too (another volume, a snapshot, a clone).
	SharedBytes uint64 `json:"shared_bytes,omitempty"`
	// DedupSavedBytes is the part of AllocatedBytes that uses the blocks
	// of an equal extent another file keeps, as the node's last
	// deduplication pass counted it (replication/dedup, Stats.Saved): the
	// space sharing saves.
	DedupSavedBytes uint64 `json:"dedup_saved_bytes,omitempty"`
	// LogicalBytes, for a volume with compression, is the data its
	// layers hold before compression (AllocatedBytes is after): an extent
	// stored compressed counts whole (replication/zfile, Stats).
	LogicalBytes uint64 `json:"logical_bytes,omitempty"`
}

// CompressionRatio is what compression left of the data: allocated ÷
// logical bytes (1 without compression, or before any data).
func (s ReplicaSpace) CompressionRatio() float64 {
	if s.LogicalBytes == 0 {
		return 1
	}
	return float64(s.AllocatedBytes) / float64(s.LogicalBytes)
}

// PhysicalBytes is what the replica adds to its disk's use: its allocated
// bytes less what it shares with a file that keeps them.
func (s ReplicaSpace) PhysicalBytes() uint64 {
	return s.AllocatedBytes - min(s.DedupSavedBytes, s.AllocatedBytes)
}

// RecordReplicaSpace records what replica ReplicaID of volume VolumeID
// takes on its node's disk; its node sends it when the figures moved by
// more than a MiB.
type RecordReplicaSpace struct {
	VolumeID  string       `json:"volume_id"`
	ReplicaID string       `json:"replica_id"`
	Space     ReplicaSpace `json:"space"`
}

func (RecordReplicaSpace) Type() CommandType { return CmdRecordReplicaSpace }

func applyRecordReplicaSpace(s *State, c *RecordReplicaSpace) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	i, err := v.replicaIndex(c.ReplicaID)
	if err != nil {
		return Result{}, err
	}
	sp := c.Space
	v.Replicas[i].Space = &sp
	return Result{Volume: v.Clone()}, nil
}
