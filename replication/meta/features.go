package meta

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// Node features: what a node's build can do for a volume beyond what every
// build does. A node records them at its start (SetNodeFeatures), and a
// volume that needs one is placed only on nodes that said they have it: a
// node of an older build would otherwise make its replica without it and
// say nothing (docs/compression.md).

// FeatureCompressionLZ4: the node keeps the replicas of a volume with
// compression "lz4" compressed (replication/zfile).
const FeatureCompressionLZ4 = "compression-lz4"

// SetNodeFeatures records the features of node NodeID's build. Gated
// (gate.go): an older member does not know the command.
type SetNodeFeatures struct {
	NodeID   string   `json:"node_id"`
	Features []string `json:"features"`
}

func (SetNodeFeatures) Type() CommandType { return CmdSetNodeFeatures }

func applySetNodeFeatures(s *State, c *SetNodeFeatures) (Result, error) {
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	f := slices.Clone(c.Features)
	slices.Sort(f)
	n.Features = slices.Compact(f)
	out := *n
	out.Disks, out.Dedup, out.Features = maps.Clone(n.Disks), maps.Clone(n.Dedup), slices.Clone(n.Features)
	return Result{Node: &out}, nil
}

// featuresOf lists the node features a volume of spec needs.
func featuresOf(spec volspec.Spec) []string {
	if spec.Compression == volspec.CompressionLZ4 {
		return []string{FeatureCompressionLZ4}
	}
	return nil
}

// compressionParam reports whether parameters ask for compression.
func compressionParam(params map[string]string) bool {
	s, err := volspec.Decode(params)
	return err == nil && s.Compression != ""
}

// lacks returns the features of want node n has not said it has.
func (n *Node) lacks(want []string) []string {
	var out []string
	for _, f := range want {
		if !slices.Contains(n.Features, f) {
			out = append(out, f)
		}
	}
	return out
}

// lacksWhy says why node n cannot hold a replica that needs the features
// missing.
func (n *Node) lacksWhy(missing []string) string {
	return fmt.Sprintf("node %s has not said it can do %s (a build without it)", n.ID, strings.Join(missing, ", "))
}
