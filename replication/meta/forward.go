package meta

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"
)

// leaderClient returns a client for the leader's meta API, or an error
// wrapping ErrNoLeader when no leader (or its address) is known.
func (a *Agent) leaderClient() (*Client, error) {
	id, _ := a.store.Leader()
	if id == "" {
		return nil, fmt.Errorf("no leader known: %w", ErrNoLeader)
	}
	var addr string
	a.store.FSM().View(func(s *State) {
		if n, ok := s.Nodes[id]; ok {
			addr = n.APIAddr
		}
	})
	if addr == "" {
		return nil, fmt.Errorf("leader %s has not registered its API address yet: %w", id, ErrNoLeader)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	c, ok := a.peers[addr]
	if !ok {
		var err error
		if c, err = NewClient([]string{addr}, WithTLS(a.cfg.TLS)); err != nil {
			return nil, err
		}
		a.peers[addr] = c
	}
	return c, nil
}

// forwardAttempt bounds one forwarded call to the leader. A leader that is
// frozen (SIGSTOP, a stalled VM) still holds its connections open, so
// without a bound the call would wait for the caller's whole deadline while
// the rest of the cluster elects a new leader within a few seconds.
const forwardAttempt = 3 * time.Second

// onLeader runs local when this member leads, else remote against the
// leader; a request that was itself forwarded is never forwarded again. It
// retries while there is no leader (nothing was applied), until ctx ends.
//
// repeatable says whether remote may be sent again after an attempt to
// the leader went unanswered: true for reads and for commands the store
// applies once however often they arrive. A call that is not repeatable
// ends with ErrOutcomeUnknown instead.
func (a *Agent) onLeader(ctx context.Context, forwarded, repeatable bool, local func() error, remote func(context.Context, *Client) error) error {
	for {
		var err error
		if a.store.IsLeader() {
			err = local()
		} else if forwarded {
			return fmt.Errorf("%s: %w", a.store.NodeID(), ErrNotLeader)
		} else {
			var c *Client
			if c, err = a.leaderClient(); err == nil {
				err = a.forward(ctx, c, repeatable, remote)
			}
		}
		if err == nil || !retryable(err) || errors.Is(err, ErrOutcomeUnknown) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%v: %w", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// forward runs remote against the leader within forwardAttempt. When the
// leader does not answer in time while ctx still runs, the error says so
// and is retryable (ErrNoLeader) or, for a call that is not repeatable,
// ErrOutcomeUnknown.
func (a *Agent) forward(ctx context.Context, c *Client, repeatable bool, remote func(context.Context, *Client) error) error {
	actx, cancel := context.WithTimeout(ctx, forwardAttempt)
	defer cancel()
	err := remote(actx, c)
	if err == nil || actx.Err() == nil {
		return err
	}
	// The leader did not answer in time, or the caller's own deadline came
	// first: either way the caller learns that no leader answered, not a
	// bare "context deadline exceeded" that it cannot act on.
	leader, _ := a.store.Leader()
	if !repeatable {
		return fmt.Errorf("leader %s did not answer within %v: %w", leader, forwardAttempt, ErrOutcomeUnknown)
	}
	return fmt.Errorf("leader %s did not answer within %v: %w", leader, forwardAttempt, ErrNoLeader)
}

// registers returns the node a RegisterNode command (or a Request that
// wraps one) registers.
func registers(c Command) (string, bool) {
	if r, ok := insideRequest(c).(*RegisterNode); ok {
		return r.Node.ID, true
	}
	return "", false
}

// prepareInner prepares the command an envelope (Request, AsNode) carries
// in *b, refusing one that nests the same envelope again.
func prepareInner(b *[]byte, nested func(Command) bool) error {
	inner, err := Decode(*b)
	if err != nil {
		return err
	}
	if nested(inner) {
		return fmt.Errorf("a %s may not wrap another: %w", commandName(inner), ErrBadCommand)
	}
	if err := prepare(inner); err != nil {
		return err
	}
	*b, err = Encode(inner)
	return err
}

// prepare fills in what the leader decides for a client's command: fresh
// ids and timestamps. It refuses commands that only the store issues.
func prepare(c Command) error {
	now := time.Now().UnixNano()
	switch c := c.(type) {
	case *Request:
		return prepareInner(&c.Command, func(inner Command) bool { _, ok := inner.(*Request); return ok })
	case *AsNode:
		return prepareInner(&c.Command, func(inner Command) bool { _, ok := inner.(*AsNode); return ok })
	case *InitCluster:
		return fmt.Errorf("InitCluster is issued by the leader only: %w", ErrInvalidArgument)
	case *CreateVolume:
		if c.ID == "" {
			c.ID = NewVolumeID()
		}
		if c.CreatedAt == 0 {
			c.CreatedAt = now
		}
	case *RestoreVolume:
		if c.ID == "" {
			c.ID = NewVolumeID()
		}
		if c.CreatedAt == 0 {
			c.CreatedAt = now
		}
	case *AdmitVolume:
		if c.ID == "" {
			c.ID = NewVolumeID()
		}
		if c.CreatedAt == 0 {
			c.CreatedAt = now
		}
	case *CreateSnapshot:
		if c.ID == "" {
			c.ID = NewSnapshotID()
		}
		if c.CreatedAt == 0 {
			c.CreatedAt = now
		}
	case *RegisterNode:
		c.Time = now
	case *NodeHeartbeat:
		c.Time = now
	case *SetNodeState:
		c.Time = now
	}
	return nil
}

// applyForwarded commits c on the leader, forwarding if need be.
func (a *Agent) applyForwarded(ctx context.Context, c Command, forwarded bool) (Result, error) {
	var res Result
	// A Request carries its own id: the store applies it once however
	// often it is sent, so an unanswered forward may be sent again.
	inner := c
	if an, ok := c.(*AsNode); ok {
		if d, err := Decode(an.Command); err == nil {
			inner = d
		}
	}
	_, repeatable := inner.(*Request)
	err := a.onLeader(ctx, forwarded, repeatable,
		func() (err error) {
			if err = prepare(c); err != nil {
				return err
			}
			if err = a.checkMembersRead(ctx, c); err != nil {
				an, wrapped := c.(*AsNode)
				if !wrapped || !errors.Is(err, ErrFailedPrecondition) {
					return err
				}
				// A member cannot read AsNode yet (a rolling upgrade):
				// the bare command, as the meta API checked it.
				a.log.Debug("a member cannot read AsNode yet: applying the node's command without the store's check",
					zap.String("node", an.Node), zap.Error(err))
				// an.Command was prepared with it.
				if c, err = Decode(an.Command); err != nil {
					return err
				}
				if err = a.checkMembersRead(ctx, c); err != nil {
					return err
				}
			}
			if id, ok := registers(c); ok {
				// A node that registers is alive now. Registering marks
				// it up; without this its silence would still count from
				// before (a node restarted after it was marked down), and
				// the next tick would mark it down again until its first
				// heartbeat: an export or a stage on it in between fails.
				a.mu.Lock()
				a.live.heartbeat(id, time.Now())
				a.mu.Unlock()
			}
			res, err = a.store.Apply(ctx, c)
			return err
		},
		func(ctx context.Context, cl *Client) error {
			b, err := Encode(c)
			if err != nil {
				return err
			}
			var resp ApplyResponse
			if err := cl.invokeOnce(ctx, "Apply", &ApplyRequest{Command: b, Forwarded: true}, &resp); err != nil {
				return err
			}
			res = resp.Result
			return fromWire(resp.Error)
		})
	return res, err
}

func (a *Agent) heartbeat(ctx context.Context, req *HeartbeatRequest) (*HeartbeatResponse, error) {
	err := a.onLeader(ctx, req.Forwarded, true,
		func() error { return a.recordHeartbeat(ctx, req) },
		func(ctx context.Context, cl *Client) error {
			fwd := *req
			fwd.Forwarded = true
			var resp HeartbeatResponse
			if err := cl.invokeOnce(ctx, "Heartbeat", &fwd, &resp); err != nil {
				return err
			}
			return fromWire(resp.Error)
		})
	return &HeartbeatResponse{Error: toWire(err)}, err
}
