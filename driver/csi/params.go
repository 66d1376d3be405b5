package csi

import (
	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// StorageClass parameters are volspec's: it owns their keys, units, defaults
// and validation (replication/volspec/doc.go). The driver adds only what
// comes from CSI itself: the consumer's node, for data locality.

// TopologyNodeKey is the topology key naming a node (its node id). Every
// node reports it (NodeGetInfo), so that the topology CreateVolume prefers
// names the node the volume's pod was scheduled to.
const TopologyNodeKey = "topology.csi.cairn.io/node"

// preferredNode is the node that gets one of the volume's replicas, or ""
// for none: with dataLocality best-effort, the node named by the first
// preferred topology that names one. With WaitForFirstConsumer the
// provisioner puts the selected node's topology first in Preferred (CSI
// TopologyRequirement); with Immediate binding the first is some node of the
// requisite ones, which costs nothing: best-effort then places a replica on
// a node of the allowed zones, as placement would anyway. Placement skips a
// preferred node that is down or full (replication/placement, rule 3).
func preferredNode(s volspec.Spec, req *csipb.TopologyRequirement) string {
	if s.DataLocality != volspec.LocalityBestEffort {
		return ""
	}
	for _, t := range req.GetPreferred() {
		if n := t.GetSegments()[TopologyNodeKey]; n != "" {
			return n
		}
	}
	return ""
}
