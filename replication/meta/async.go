package meta

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Asynchronous replication in the store (docs/replication-modes.md). The
// engine of an asynchronous volume keeps its write quorum of replicas
// healthy (they hold every acknowledged write) and turns the others into
// followers (ReplicaFollowing), which get the writes after they were
// acknowledged. The store keeps three things of it:
//
//   - which replicas follow: a follower is never a source, and the store
//     never makes one healthy on its own;
//   - how far each follower was behind at the engine's last report
//     (ReportLag, 32), for `volume get`, metrics and the CSI condition;
//   - the operator's decision to lose the writes a follower lacks when
//     every healthy replica's node is down (PromoteVolume, 33): until then
//     AttachVolume refuses, naming the command.
//
// The first SetReplicaState to ReplicaFollowing is held by the gate as if
// it were of type 32 (gate.go): a member of an older build does not know
// the state.

// ReplicaLag is how far a following replica is behind the acknowledged
// writes.
type ReplicaLag struct {
	// Writes and Bytes are the acknowledged writes (and their bytes) the
	// replica has not been sent yet.
	Writes uint64 `json:"writes"`
	Bytes  uint64 `json:"bytes"`
	// Seconds is the age of the oldest of them.
	Seconds float64 `json:"seconds"`
	// Resyncing: the queue overflowed, and the replica is being made equal
	// again by copying Extents dirty extents from a healthy replica.
	Resyncing bool   `json:"resyncing,omitempty"`
	Extents   uint64 `json:"extents,omitempty"`
	// Applied is the sequence number of the last write the replica has.
	// Writes are numbered from 1 at each engine start: Applied compares
	// only between reports of the same engine (Epoch, the epoch it wrote
	// with at the report, and Engine, when it started).
	Applied uint64 `json:"applied"`
	Epoch   uint64 `json:"epoch"`
	Engine  int64  `json:"engine"`
	// ReportedAt is when the engine measured this (unix nanoseconds).
	ReportedAt int64 `json:"reported_at"`
}

// Behind reports whether the replica lacked anything at the report.
func (l *ReplicaLag) Behind() bool {
	return l != nil && (l.Writes > 0 || l.Resyncing)
}

// String is the lag as `volume get` shows it.
func (l *ReplicaLag) String() string {
	if l == nil {
		return "no report yet"
	}
	at := time.Unix(0, l.ReportedAt).UTC().Format(time.RFC3339)
	if l.Resyncing {
		return fmt.Sprintf("lagging: queue overflowed, resyncing %d extents (at %s)", l.Extents, at)
	}
	return fmt.Sprintf("%d writes, %d bytes, %.3fs behind (at %s)", l.Writes, l.Bytes, l.Seconds, at)
}

// ReportLag records how far the followers of a volume are behind. Only the
// engine of the current epoch reports; the epoch does not change.
type ReportLag struct {
	VolumeID    string                 `json:"volume_id"`
	ExpectEpoch uint64                 `json:"expect_epoch"`
	Lags        map[string]*ReplicaLag `json:"lags"`
}

func (ReportLag) Type() CommandType { return CmdReportLag }

func applyReportLag(s *State, c *ReportLag) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	for id := range c.Lags {
		i, err := v.replicaIndex(id)
		if err != nil {
			return Result{}, err
		}
		if v.Replicas[i].State != ReplicaFollowing {
			return Result{}, fmt.Errorf("replica %s is %s, not following: %w", id, v.Replicas[i].State, ErrFailedPrecondition)
		}
	}
	for id, l := range c.Lags {
		i, _ := v.replicaIndex(id)
		x := *l
		v.Replicas[i].Lag = &x
	}
	// Watchers see the change (`volume get --watch`, the CSI condition);
	// the engine's watch finds its epoch unchanged and does nothing.
	return Result{Volume: v.Clone()}, nil
}

// PromoteVolume makes the most advanced follower of an asynchronous
// volume healthy when every healthy replica is on a node that is down, so
// that the volume can be attached again, losing the acknowledged writes
// that follower lacks. AcceptDataLoss must be set: the operator says so.
// The replicas that were healthy become stale (their nodes' copies are
// rebuilt from the promoted one when they return). Compare-and-set on the
// epoch; increments it.
type PromoteVolume struct {
	VolumeID       string `json:"volume_id"`
	AcceptDataLoss bool   `json:"accept_data_loss"`
	ExpectEpoch    uint64 `json:"expect_epoch"`
}

func (PromoteVolume) Type() CommandType { return CmdPromoteVolume }

func applyPromoteVolume(s *State, c *PromoteVolume) (Result, error) {
	v, err := s.liveVolume(c.VolumeID)
	if err != nil {
		return Result{}, err
	}
	if !c.AcceptDataLoss {
		return Result{}, fmt.Errorf("promoting a follower of %s loses the acknowledged writes it lacks; say so with --accept-data-loss: %w", v.ID, ErrInvalidArgument)
	}
	if err := checkEpoch(v, c.ExpectEpoch); err != nil {
		return Result{}, err
	}
	if v.Attachment != nil {
		return Result{}, fmt.Errorf("volume %s is attached to %s; detach it first: %w", v.ID, v.Attachment.Node, ErrFailedPrecondition)
	}
	if up := healthyOnUpNodes(s, v); len(up) > 0 {
		return Result{}, fmt.Errorf("volume %s has healthy replicas on nodes that are up (%s): nothing to promote: %w", v.ID, strings.Join(up, ", "), ErrFailedPrecondition)
	}
	best := -1
	for i, r := range v.Replicas {
		n := s.Nodes[r.Node]
		if r.State != ReplicaFollowing || n == nil || n.State != NodeUp {
			continue
		}
		if best < 0 || ahead(r.Lag, v.Replicas[best].Lag) {
			best = i
		}
	}
	if best < 0 {
		return Result{}, fmt.Errorf("volume %s has no following replica on a node that is up: %w", v.ID, ErrFailedPrecondition)
	}
	for i, r := range v.Replicas {
		if r.State == ReplicaHealthy {
			v.Replicas[i].State = ReplicaStale
		}
	}
	promoted := v.Replicas[best]
	v.Replicas[best].State = ReplicaHealthy
	v.Replicas[best].Lag = nil
	v.Epoch++
	return Result{Volume: v.Clone(), Promoted: &promoted}, nil
}

// ahead reports whether a follower whose last report is a had more of
// the acknowledged writes than one whose last report is b: a report of a
// later engine wins; within one engine, the more writes applied (fewer
// left, if equal).
func ahead(a, b *ReplicaLag) bool {
	switch {
	case a == nil:
		return false
	case b == nil:
		return true
	case a.Epoch != b.Epoch || a.Engine != b.Engine:
		return a.Epoch > b.Epoch || a.Epoch == b.Epoch && a.Engine > b.Engine
	case a.Applied != b.Applied:
		return a.Applied > b.Applied
	}
	return !a.Resyncing && b.Resyncing || a.Writes < b.Writes
}

// healthyOnUpNodes lists the healthy replicas of v whose nodes are up.
func healthyOnUpNodes(s *State, v *Volume) []string {
	var ids []string
	for _, r := range v.Replicas {
		if n := s.Nodes[r.Node]; r.State == ReplicaHealthy && n != nil && n.State == NodeUp {
			ids = append(ids, r.ID+" on "+r.Node)
		}
	}
	return ids
}

// checkFollowersAttach refuses to attach v when it has followers and none
// of its healthy replicas is on a node that is up: the engine would find
// no replica that holds every acknowledged write, and a follower is never
// promoted without the operator's word.
func checkFollowersAttach(s *State, v *Volume) error {
	var followers, down []string
	for _, r := range v.Replicas {
		switch r.State {
		case ReplicaFollowing:
			followers = append(followers, fmt.Sprintf("%s on %s (%s)", r.ID, r.Node, r.Lag))
		case ReplicaHealthy:
			down = append(down, r.ID+" on "+r.Node)
		}
	}
	if len(followers) == 0 || len(healthyOnUpNodes(s, v)) > 0 {
		return nil
	}
	slices.Sort(down)
	return fmt.Errorf("volume %s is replicated asynchronously and the replicas that hold every acknowledged write (%s) are on nodes that are down; "+
		"the followers may lack the latest writes: %s. Bring a node back, or accept losing those writes: cairn ctl volume promote %s --accept-data-loss: %w",
		v.ID, strings.Join(down, ", "), strings.Join(followers, "; "), v.ID, ErrFailedPrecondition)
}

// Async reports whether the volume is replicated asynchronously.
func (v *Volume) Async() bool { return v.asyncParam() }

func (v *Volume) asyncParam() bool {
	s, err := v.Spec()
	return err == nil && s.Async()
}

// Following lists the volume's following replicas.
func (v *Volume) Following() []Replica {
	var out []Replica
	for _, r := range v.Replicas {
		if r.State == ReplicaFollowing {
			out = append(out, r)
		}
	}
	return out
}

// ReportLag records the followers' lag of volume id at epoch.
func (c *Client) ReportLag(ctx context.Context, id string, epoch uint64, lags map[string]*ReplicaLag) error {
	_, err := c.Apply(ctx, &ReportLag{VolumeID: id, ExpectEpoch: epoch, Lags: lags})
	return err
}
