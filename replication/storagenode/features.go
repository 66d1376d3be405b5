package storagenode

import (
	"context"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
)

// nodeFeatures are what this build can do for a volume beyond what every
// build does; the store places a volume that needs one only on nodes that
// recorded it (replication/meta, features.go). Sorted.
var nodeFeatures = []string{meta.FeatureCompressionLZ4}

// recordFeatures records nodeFeatures in the store once this node is
// registered, and again whenever the record differs (a build with other
// features). A build older than features records nothing, and keeps
// what a newer one recorded: its replicas of a volume with compression
// are then made uncompressed (docs/compression.md). Called by the
// realizer goroutine, which retries.
func (n *Node) recordFeatures() {
	var have []string
	known := false
	n.cfg.FSM.View(func(s *meta.State) {
		if node := s.Nodes[n.cfg.NodeID]; node != nil {
			have, known = slices.Clone(node.Features), true
		}
	})
	if !known || slices.Equal(have, nodeFeatures) {
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if _, err := n.cfg.Meta.Apply(ctx, &meta.SetNodeFeatures{NodeID: n.cfg.NodeID, Features: nodeFeatures}); err != nil {
		n.log.Debug("features not recorded; will try again", zap.Strings("features", nodeFeatures), zap.Error(err))
		return
	}
	n.log.Info("features recorded", zap.Strings("features", nodeFeatures), zap.Strings("previous", have))
}
