package storagenode

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
)

// recordReservable records in the store what this node's disks can promise
// to guaranteed volumes (Config.ReservableIOPS), when its copy of the store
// says otherwise: at the first pass after a start with a new value, and
// again at later passes until it lands (the command waits for every store
// member to read it: replication/meta gate.go).
func (n *Node) recordReservable() {
	var have uint64
	known := false
	n.cfg.FSM.View(func(s *meta.State) {
		if node := s.Nodes[n.cfg.NodeID]; node != nil {
			have, known = node.ReservableIOPS, true
		}
	})
	if !known || have == n.cfg.ReservableIOPS {
		return
	}
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if _, err := n.cfg.Meta.Apply(ctx, &meta.SetNodeReservable{NodeID: n.cfg.NodeID, IOPS: n.cfg.ReservableIOPS}); err != nil {
		n.log.Debug("reservable IOPS not recorded; will try again", zap.Uint64("reservable_iops", n.cfg.ReservableIOPS), zap.Error(err))
		return
	}
	n.log.Info("reservable IOPS recorded", zap.Uint64("reservable_iops", n.cfg.ReservableIOPS), zap.Uint64("previous", have))
}
