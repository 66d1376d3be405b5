package meta

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/internal/pki"
)

// Client talks to the meta API of one or more members. Any member answers:
// followers forward writes to the leader. The client moves on to the next
// address when a member cannot be reached, and retries while the cluster has
// no leader, until its context ends.
type Client struct {
	addrs []string
	// tls, if set, is the identity the client presents (mutual TLS);
	// nil dials in plaintext.
	tls *pki.Credentials

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
	next  int // index of the address that answered last
}

// NewClient returns a client for the given member API addresses
// ("host:port"). It connects lazily.
func NewClient(addrs []string, opts ...ClientOption) (*Client, error) {
	var clean []string
	for _, a := range addrs {
		if a = strings.TrimSpace(a); a != "" {
			clean = append(clean, a)
		}
	}
	if len(clean) == 0 {
		return nil, errors.New("meta client: no server address given")
	}
	// Start at a random member so that many clients given the same list do
	// not all land on the first one.
	c := &Client{addrs: clean, conns: map[string]*grpc.ClientConn{}, next: rand.IntN(len(clean))}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// ClientOption configures NewClient.
type ClientOption func(*Client)

// WithTLS has the client speak mutual TLS with creds (nil: plaintext).
func WithTLS(creds *pki.Credentials) ClientOption {
	return func(c *Client) { c.tls = creds }
}

// Close closes every connection.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for a, cc := range c.conns {
		cc.Close()
		delete(c.conns, a)
	}
	return nil
}

func (c *Client) conn(addr string) (*grpc.ClientConn, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc, ok := c.conns[addr]; ok {
		return cc, nil
	}
	creds := insecure.NewCredentials()
	if c.tls != nil {
		creds = credentials.NewTLS(c.tls.ClientConfig())
	}
	cc, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(jsonCodec{}), grpc.MaxCallRecvMsgSize(maxMessageBytes)))
	if err != nil {
		return nil, fmt.Errorf("meta client: %s: %w", addr, err)
	}
	c.conns[addr] = cc
	return cc, nil
}

// tlsHint explains a connection failure that a TLS mismatch causes: a
// plaintext client whose server closes at once (it wants a handshake), or a
// TLS client refused in the handshake.
func tlsHint(err error, withTLS bool) string {
	msg := err.Error()
	switch {
	case !withTLS && strings.Contains(msg, "server preface"):
		return "does the cluster require mutual TLS? give a certificate: --tls-dir"
	case withTLS && (strings.Contains(msg, "tls:") || strings.Contains(msg, "certificate")):
		return "the TLS handshake failed: is the certificate from this cluster's CA, and the server a node?"
	}
	return ""
}

// invokeOnce calls method on the addresses in turn until one answers at the
// transport level. It does not look at the answer's own error.
func (c *Client) invokeOnce(ctx context.Context, method string, req, resp any) error {
	c.mu.Lock()
	start := c.next
	c.mu.Unlock()
	var lastErr error
	for i := range c.addrs {
		idx := (start + i) % len(c.addrs)
		cc, err := c.conn(c.addrs[idx])
		if err != nil {
			lastErr = err
			continue
		}
		// One unreachable member must not eat the whole deadline.
		actx, cancel := context.WithTimeout(ctx, attemptTimeout(ctx, len(c.addrs)-i))
		err = cc.Invoke(actx, methodPath(method), req, resp)
		cancel()
		if err == nil {
			c.mu.Lock()
			c.next = idx
			c.mu.Unlock()
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		lastErr = fmt.Errorf("%s: %w", c.addrs[idx], err)
		if code := status.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
			return lastErr
		}
		if hint := tlsHint(err, c.tls != nil); hint != "" {
			lastErr = fmt.Errorf("%w (%s)", lastErr, hint)
		}
	}
	return fmt.Errorf("no member answered (%v): %w", lastErr, ErrNoLeader)
}

// attemptTimeout shares what is left of ctx among the remaining addresses,
// between 1 and 10 seconds each.
func attemptTimeout(ctx context.Context, remaining int) time.Duration {
	d := 10 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		d = time.Until(dl) / time.Duration(remaining)
	}
	if d < time.Second {
		d = time.Second
	}
	if d > 10*time.Second {
		d = 10 * time.Second
	}
	return d
}

// retryable says whether a call may be repeated: nothing was applied.
func retryable(err error) bool {
	return errors.Is(err, ErrNoLeader) || errors.Is(err, ErrNotLeader)
}

// call invokes method and retries while the cluster has no leader, and
// after an answer of ErrOutcomeUnknown. answer extracts the response's own
// error.
//
// Every method sent through call may be repeated: reads, joins and
// heartbeats change nothing twice, and Apply wraps its command in a Request
// whose id stays the same for every retry, so the store applies it once.
// A command whose outcome is unknown (the leader lost leadership while
// committing it) is therefore sent again: the answer says whether it was
// applied, which its caller (an engine ejecting a replica) must know.
func (c *Client) call(ctx context.Context, method string, req, resp any, answer func() error) error {
	backoff := 20 * time.Millisecond
	for {
		// A JSON answer leaves the fields it omits as they were: clear
		// the last attempt's answer (its error above all) first.
		reflect.ValueOf(resp).Elem().SetZero()
		err := c.invokeOnce(ctx, method, req, resp)
		if err == nil {
			err = answer()
		}
		if err == nil || !retryable(err) && !errors.Is(err, ErrOutcomeUnknown) {
			return err
		}
		// This member has no leader (it may be cut off from the majority):
		// ask the next one.
		c.mu.Lock()
		c.next = (c.next + 1) % len(c.addrs)
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-time.After(backoff):
		}
		if backoff < 500*time.Millisecond {
			backoff *= 2
		}
	}
}

// Apply commits a command through any member.
//
// The command travels wrapped in a Request with an id of its own, the same
// for every retry: if an answer is lost and the command is sent again, the
// store applies it once and answers the retry with the first result.
func (c *Client) Apply(ctx context.Context, cmd Command) (Result, error) {
	inner, err := Encode(cmd)
	if err != nil {
		return Result{}, err
	}
	b, err := Encode(&Request{ID: newID("req"), Command: inner})
	if err != nil {
		return Result{}, err
	}
	var resp ApplyResponse
	err = c.call(ctx, "Apply", &ApplyRequest{Command: b}, &resp, func() error { return fromWire(resp.Error) })
	return resp.Result, err
}

// State reads the whole state; linearizable reads go through the leader.
func (c *Client) State(ctx context.Context, linearizable bool) (*State, error) {
	var resp ReadResponse
	err := c.call(ctx, "Read", &ReadRequest{Linearizable: linearizable}, &resp, func() error { return fromWire(resp.Error) })
	if err != nil {
		return nil, err
	}
	if resp.State == nil {
		return nil, errors.New("meta: read answered without a state")
	}
	return resp.State, nil
}

// Status asks one member for the cluster status.
func (c *Client) Status(ctx context.Context) (*StatusResponse, error) {
	var resp StatusResponse
	err := c.call(ctx, "Status", &StatusRequest{}, &resp, func() error { return fromWire(resp.Error) })
	return &resp, err
}

// Info asks a member about itself.
func (c *Client) Info(ctx context.Context) (*InfoResponse, error) {
	var resp InfoResponse
	err := c.invokeOnce(ctx, "Info", &InfoRequest{}, &resp)
	return &resp, err
}

// Join asks the cluster to add a member.
func (c *Client) Join(ctx context.Context, req *JoinRequest) (*JoinResponse, error) {
	var resp JoinResponse
	err := c.call(ctx, "Join", req, &resp, func() error { return fromWire(resp.Error) })
	return &resp, err
}

// Heartbeat reports a node alive to the leader.
func (c *Client) Heartbeat(ctx context.Context, req *HeartbeatRequest) error {
	var resp HeartbeatResponse
	return c.call(ctx, "Heartbeat", req, &resp, func() error { return fromWire(resp.Error) })
}

// Volume returns one live volume, read linearizably: the leader answers
// after confirming that it still leads, so the volume is at least as new
// as every change acknowledged before the call. A deleted volume is
// ErrNotFound. The answer carries that one volume, not the whole state.
func (c *Client) Volume(ctx context.Context, id string) (*Volume, error) {
	var resp GetVolumeResponse
	err := c.call(ctx, "GetVolume", &GetVolumeRequest{VolumeID: id, Linearizable: true}, &resp, func() error { return fromWire(resp.Error) })
	if status.Code(err) == codes.Unimplemented {
		// A member of a build without GetVolume (a rolling upgrade).
		s, err := c.State(ctx, true)
		if err != nil {
			return nil, err
		}
		return s.liveVolume(id)
	}
	if err != nil {
		return nil, err
	}
	if resp.Volume == nil {
		return nil, errors.New("meta: GetVolume answered without a volume")
	}
	return resp.Volume, nil
}

// Watch follows the store's volumes and nodes (see watch.go): fn gets every
// event from req.FromIndex on, in order, until ctx ends (Watch then returns
// ctx's error) or fn returns an error (Watch returns it). A stream that
// breaks is opened again, at the next member, from the Index of the last
// event fn got; a member that no longer holds the changes since then
// answers with the whole state (Reset). Events come from the member asked
// and may lag the leader.
func (c *Client) Watch(ctx context.Context, req WatchRequest, fn func(*WatchEvent) error) error {
	backoff := 20 * time.Millisecond
	for {
		err := c.watchOnce(ctx, &req, fn)
		var stop *watchStop
		if errors.As(err, &stop) {
			return stop.err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		c.mu.Lock()
		c.next = (c.next + 1) % len(c.addrs)
		c.mu.Unlock()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, time.Second)
	}
}

// watchStop carries fn's error out of watchOnce: it ends the watch.
type watchStop struct{ err error }

func (s *watchStop) Error() string { return s.err.Error() }

// watchOnce runs one stream against the current member, moving
// req.FromIndex along with the events.
func (c *Client) watchOnce(ctx context.Context, req *WatchRequest, fn func(*WatchEvent) error) error {
	c.mu.Lock()
	addr := c.addrs[c.next]
	c.mu.Unlock()
	cc, err := c.conn(addr)
	if err != nil {
		return err
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := cc.NewStream(sctx, &metaServiceDesc.Streams[0], methodPath("Watch"))
	if err != nil {
		return err
	}
	if err := stream.SendMsg(req); err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	for {
		var ev WatchEvent
		if err := stream.RecvMsg(&ev); err != nil {
			return err
		}
		if err := fn(&ev); err != nil {
			return &watchStop{err}
		}
		req.FromIndex = ev.Index
	}
}

// Attach attaches volume id to node (read-only or not, optionally exported
// over NBD on nbdSocket), retrying the compare-and-set while the epoch moves
// under it. Attaching to the node it is already attached to, the same way,
// changes nothing. A volume attached elsewhere gives ErrFailedPrecondition.
func (c *Client) Attach(ctx context.Context, id, node string, readOnly bool, nbdSocket string) (*Volume, error) {
	for {
		v, err := c.Volume(ctx, id)
		if err != nil {
			return nil, err
		}
		res, err := c.Apply(ctx, &AttachVolume{VolumeID: id, NodeID: node, ReadOnly: readOnly, NBDSocket: nbdSocket, ExpectEpoch: v.Epoch})
		if errors.Is(err, ErrEpochMismatch) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return res.Volume, nil
	}
}

// Detach removes volume id's attachment if it is node's (any node's when
// node is ""), retrying the compare-and-set while the epoch moves. A volume
// that is not attached is left as it is.
func (c *Client) Detach(ctx context.Context, id, node string) (*Volume, error) {
	for {
		v, err := c.Volume(ctx, id)
		if err != nil {
			return nil, err
		}
		if v.Attachment == nil || (node != "" && v.Attachment.Node != node) {
			return v, nil
		}
		res, err := c.Apply(ctx, &DetachVolume{VolumeID: id, NodeID: v.Attachment.Node, ExpectEpoch: v.Epoch})
		if errors.Is(err, ErrEpochMismatch) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return res.Volume, nil
	}
}
