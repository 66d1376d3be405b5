package meta

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// heartbeatLoop registers this node and keeps reporting it alive; it also
// binds the data dir to the cluster once the cluster id is known.
func (a *Agent) heartbeatLoop() {
	registered := false
	for a.sleep(a.cfg.HeartbeatInterval) {
		if err := a.store.FSM().Halted(); err != nil {
			// See the command-evolution rule in command.go: a member that
			// cannot read the log stops rather than serve a diverged state.
			a.fail(err)
			return
		}
		var clusterID string
		a.store.FSM().View(func(s *State) { clusterID = s.ClusterID })
		if clusterID != "" {
			if err := a.store.RecordClusterID(clusterID); err != nil {
				a.fail(err)
				return
			}
		}
		capacity, free, err := a.cfg.DiskUsage()
		if err != nil {
			a.log.Warn("cannot read data disk usage", zap.Error(err))
		}
		ctx, cancel := context.WithTimeout(a.ctx, a.cfg.HeartbeatInterval*2)
		if !registered {
			_, err = a.applyForwarded(ctx, &RegisterNode{Node: Node{
				ID: a.store.NodeID(), RaftAddr: a.store.RaftAddr(), APIAddr: a.APIAddr(),
				DataAddr: a.cfg.DataAddr,
				Zone:     a.cfg.Zone, Region: a.cfg.Region, CapacityBytes: capacity, FreeBytes: free,
			}}, false)
			if err == nil {
				registered = true
				a.log.Info("node registered")
			}
		} else {
			_, err = a.heartbeat(ctx, &HeartbeatRequest{NodeID: a.store.NodeID(), CapacityBytes: capacity, FreeBytes: free,
				CommandTypes: uint8(lastCommandType)})
			if errors.Is(err, ErrNotFound) {
				registered = false
			}
		}
		cancel()
		if err != nil && a.ctx.Err() == nil {
			a.log.Debug("heartbeat failed", zap.Error(err))
		}
	}
}

// Statfs returns the capacity and free bytes of the file system holding dir.
func Statfs(dir string) (uint64, uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	return st.Blocks * uint64(st.Bsize), st.Bavail * uint64(st.Bsize), nil
}

// recordHeartbeat runs on the leader for every heartbeat. Liveness stays in
// memory; the log only sees state changes and capacity changes (or one
// heartbeat per 30 s), so heartbeats do not flood the log.
func (a *Agent) recordHeartbeat(ctx context.Context, req *HeartbeatRequest) error {
	var node *Node
	a.store.FSM().View(func(s *State) {
		if n, ok := s.Nodes[req.NodeID]; ok {
			c := *n
			node = &c
		}
	})
	if node == nil {
		return fmt.Errorf("node %q is not registered: %w", req.NodeID, ErrNotFound)
	}
	now := time.Now()
	a.noteCommandTypes(req.NodeID, req.CommandTypes)
	a.mu.Lock()
	a.live.heartbeat(req.NodeID, now)
	last := a.lastHB[req.NodeID]
	a.mu.Unlock()
	if node.State == NodeDown {
		if _, err := a.store.Apply(ctx, &SetNodeState{NodeID: req.NodeID, State: NodeUp, Time: now.UnixNano()}); err != nil {
			return err
		}
		a.log.Info("node back up", zap.String("node", req.NodeID))
	}
	changed := differs(node.CapacityBytes, req.CapacityBytes, node.CapacityBytes/100) ||
		differs(node.FreeBytes, req.FreeBytes, node.CapacityBytes/100)
	if changed || now.Sub(last) > 30*time.Second {
		if _, err := a.store.Apply(ctx, &NodeHeartbeat{NodeID: req.NodeID, CapacityBytes: req.CapacityBytes, FreeBytes: req.FreeBytes, Time: now.UnixNano()}); err != nil {
			return err
		}
		a.mu.Lock()
		a.lastHB[req.NodeID] = now
		a.mu.Unlock()
	}
	return nil
}

func differs(a, b, tolerance uint64) bool {
	if a > b {
		return a-b > tolerance
	}
	return b-a > tolerance
}
