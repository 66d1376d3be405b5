package storagenode

import (
	"context"
	"maps"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
)

// recordDisks records in the store the size and free bytes of this node's
// data disks of types other than the default (Config.DiskDirs;
// meta.SetNodeDisks), when its copy of the store says otherwise: another
// set of types, another size, or free bytes a GiB or more away. The default
// disk is the heartbeat's. Until every store member reads the command (a
// rolling upgrade), it is refused and tried again at a later pass. It
// reports whether the store has the record now: false until this node's
// copy of the store knows the node (right after a start), or while the
// record is refused, and the realizer then tries again at its next pass
// rather than a usageInterval later.
func (n *Node) recordDisks() bool {
	want := map[string]meta.DiskSpace{}
	for t, dir := range n.cfg.DiskDirs {
		capacity, free, err := meta.Statfs(dir)
		if err != nil {
			n.log.Warn("cannot measure a data disk", zap.String("disk_type", t), zap.String("dir", dir), zap.Error(err))
			continue
		}
		want[t] = meta.DiskSpace{CapacityBytes: capacity, FreeBytes: free}
	}
	var have map[string]meta.DiskSpace
	known := false
	n.cfg.FSM.View(func(s *meta.State) {
		if node := s.Nodes[n.cfg.NodeID]; node != nil {
			have, known = maps.Clone(node.Disks), true
		}
	})
	if !known {
		return false
	}
	if sameDisks(have, want) {
		return true
	}
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if _, err := n.cfg.Meta.Apply(ctx, &meta.SetNodeDisks{NodeID: n.cfg.NodeID, Disks: want}); err != nil {
		n.log.Debug("data disks not recorded; will try again", zap.Error(err))
		return false
	}
	n.log.Info("data disks recorded", zap.Any("disks", want))
	return true
}

// sameDisks reports whether two records of a node's typed disks say the
// same: the same types and sizes, free bytes within a GiB.
func sameDisks(a, b map[string]meta.DiskSpace) bool {
	if len(a) != len(b) {
		return false
	}
	for t, x := range a {
		y, ok := b[t]
		if !ok || x.CapacityBytes != y.CapacityBytes || max(x.FreeBytes, y.FreeBytes)-min(x.FreeBytes, y.FreeBytes) >= 1<<30 {
			return false
		}
	}
	return true
}
