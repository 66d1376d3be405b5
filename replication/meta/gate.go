package meta

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// The command gate: rule 3 of command evolution (command.go) within one
// release. A command type from firstGatedType on is written to the log only
// once every member of the raft configuration has said that it reads it;
// otherwise a member running an older build would meet an entry it cannot
// read and halt. Members say so in their heartbeats (HeartbeatRequest's
// CommandTypes, the highest type their build reads); the leader keeps the
// last word of each in memory, beside its liveness view. A heartbeat of an
// older build carries nothing, which reads as "not this type".
//
// Only the first entry of a type needs every member's word. A build reads
// every type up to its highest, so once an entry of type m is in the log
// (State.MaxCommandType = m), a member that has not reported since this
// member became leader (it is down, or its heartbeat is late) must read
// every t <= m anyway to apply the log it already holds: more such entries
// cannot stop it where the first would not. So a silent
// member holds up only types newer than every applied one; a member that
// said its build is older still holds up every gated type above its own.
//
// Nor does a silent member whose node the store has marked down: it runs
// no build at all now. If it comes back with a build that cannot read the
// new entry, it halts at it (rule 2 of command.go) instead of diverging,
// and is upgraded; waiting for it instead would hold up, for as long as
// it is gone, the very commands (a restore, a promotion) that work around
// its loss.

// firstGatedType is the first command type written through the gate.
const firstGatedType = CmdExpandVolume

// gateWait is the least a gated command waits for members that have not
// reported since this member became leader; it waits three heartbeat
// intervals when that is longer (a loaded node's heartbeat can be late).
const gateWait = 3 * time.Second

// gatedType returns the type of c, or of the command a Request wraps, and
// whether it is written through the gate.
func gatedType(c Command) (CommandType, bool) {
	if c = insideRequest(c); c == nil {
		return 0, false // apply refuses it anyway
	}
	return gateType(c)
}

// gateType is gatedType of a command that is not a Request.
func gateType(c Command) (CommandType, bool) {
	t := c.Type()
	// An encrypted volume's record is new with LeaseNonces: a member of
	// an older build would refuse the parameter or drop the key, so the
	// create waits for members that read that type.
	switch c := c.(type) {
	case *AdmitVolume:
		if c.Encryption != nil || (&Volume{Parameters: c.Parameters}).encryptedParam() {
			t = CmdLeaseNonces
		}
	case *RestoreVolume:
		if (&Volume{Parameters: c.Parameters}).encryptedParam() {
			t = CmdLeaseNonces
		}
	case *SetReplicaState:
		// Followers are new with ReportLag (async.go).
		if c.State == ReplicaFollowing {
			t = CmdReportLag
		}
	case *PromoteVolume:
		// Added in the same build as ReportLag, so a member that reads 32
		// reads 33; and there is a follower to promote only once a type
		// 32 entry passed the gate. Gated as 32, a promotion is not held
		// up by the very member whose death it answers (State.
		// MaxCommandType lets silent members pass for applied types).
		t = CmdReportLag
	}
	// Deduplication is new with SetNodeDedup, compression with
	// SetNodeFeatures: a member of an older build would refuse the
	// parameter.
	var params map[string]string
	switch c := c.(type) {
	case *CreateVolume:
		params = c.Parameters
	case *AdmitVolume:
		params = c.Parameters
	case *RestoreVolume:
		params = c.Parameters
	}
	if dedupParam(params) {
		t = max(t, CmdSetNodeDedup)
	}
	if compressionParam(params) {
		t = max(t, CmdSetNodeFeatures)
	}
	return t, t >= firstGatedType
}

// noteCommandTypes records what a member's heartbeat says it reads.
// Called on the leader.
func (a *Agent) noteCommandTypes(node string, types uint8) {
	a.mu.Lock()
	a.reads[node] = CommandType(types)
	a.mu.Unlock()
}

// checkMembersRead refuses c, on the leader, while some member of the raft
// configuration has not said that it reads c's type: ErrFailedPrecondition
// naming the members. Commands before firstGatedType pass at once.
func (a *Agent) checkMembersRead(ctx context.Context, c Command) error {
	t, gated := gatedType(c)
	if !gated {
		return nil
	}
	deadline := time.Now().Add(max(gateWait, 3*a.cfg.HeartbeatInterval))
	for {
		var applied CommandType
		down := map[string]bool{}
		a.store.FSM().View(func(s *State) {
			applied = s.MaxCommandType
			for id, n := range s.Nodes {
				if n.State == NodeDown {
					down[id] = true
				}
			}
		})
		members, err := a.store.Members()
		if err != nil {
			return err
		}
		var older, silent []string
		a.mu.Lock()
		for _, m := range members {
			if m.ID == a.store.NodeID() {
				continue // this build reads every type up to lastCommandType
			}
			switch reads, ok := a.reads[m.ID]; {
			case !ok:
				if t > applied && !down[m.ID] {
					silent = append(silent, m.ID)
				}
			case reads < t:
				older = append(older, m.ID)
			}
		}
		a.mu.Unlock()
		slices.Sort(older)
		slices.Sort(silent)
		if len(older) > 0 {
			return fmt.Errorf("members %s run a build that cannot read command type %d; upgrade every member first: %w",
				strings.Join(older, ", "), t, ErrFailedPrecondition)
		}
		if len(silent) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("members %s have not reported which commands they read (down, or not heard from since this leader took over); command type %d waits for every member: %w",
				strings.Join(silent, ", "), t, ErrFailedPrecondition)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
