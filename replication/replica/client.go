package replica

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/cairn-csi/cairn/internal/pki"
)

// maxRangeChunk is the largest range one TRIM or WRITE_ZEROES frame carries
// (its length field is 32 bits); longer ranges are split.
const maxRangeChunk = 1 << 30

// dirtyPage is how many dirty extents the client asks for per DIRTY request.
const dirtyPage = 1 << 16

// Client is a pipelined connection to one replica on a replica server. Any
// number of goroutines may call its methods at once: each call gets its own
// handle and waits for its own reply, and replies may arrive in any order.
//
// A call whose ctx ends returns ctx.Err(). Its request may already have
// reached the server and may still be applied (a cancelled write can land);
// the connection stays usable. Only when a cancellation interrupts a frame
// halfway through being sent does the client close the connection, since the
// stream would otherwise desynchronise.
//
// Error statuses from the server come back as *RemoteError, which unwraps to
// the matching sentinel (ErrFenced, ErrNotClaimed, ErrOutOfRange, ErrNotFound,
// ErrInvalidArgument, ErrIO). A broken or closed connection gives errors
// wrapping ErrClosed; after that every call fails and the caller dials again.
//
// A data operation whose ctx carries a class (WithClass) is sent with that
// class's flag, so that the server's disk scheduler files it there.
type Client struct {
	nc        net.Conn
	replicaID string
	// opened is the replica as OPEN described it; set before Dial returns.
	opened Info

	// noClass is set once the server refused a class flag and took the same
	// request without it: a server older than the flags (during a rolling
	// upgrade). Requests on this connection go unmarked from then on.
	noClass atomic.Bool
	// noGeneration is set once the server refused FlagGeneration on INFO
	// and answered without it: a server older than generations. Info asks
	// without the flag on this connection from then on.
	noGeneration atomic.Bool
	// noPair is set once the server refused FlagPair (a server older than
	// it): pairs then go as two writes.
	noPair atomic.Bool
	// noSums is set once the server refused FlagSums (a server older than
	// checksums): writes go without their piece checksums from then on.
	noSums atomic.Bool

	queue chan *call    // frames for the writer goroutine, in send order
	dead  chan struct{} // closed when the connection fails or is closed

	mu         sync.Mutex
	pending    map[uint64]*call // calls awaiting their reply
	nextHandle uint64
	err        error // why the connection is dead; nil while it is alive

	wg sync.WaitGroup // the reader and writer goroutines
}

// callState tracks a call's frame through the writer; guarded by Client.mu.
type callState uint8

const (
	callQueued  callState = iota // handed to the writer, not yet picked up
	callWriting                  // the writer is copying its frame out
	callWritten                  // the writer no longer uses its payload
	callSkipped                  // abandoned before the writer picked it up
)

type call struct {
	h       RequestHeader
	payload []byte
	trailer []byte // sent right after payload (a WRITE's piece checksums)
	dst     []byte // a successful reply's payload is read into dst when set

	state   callState
	written chan struct{} // closed when the writer is done with payload
	done    chan struct{} // closed when reply and err are set

	reply []byte
	err   error
}

// Dial connects to the replica server at addr (TCP, with TCP_NODELAY) and
// opens replicaID, which must have size bytes (0: any size).
func Dial(ctx context.Context, addr, replicaID string, size uint64, opts ...DialOption) (*Client, error) {
	if err := validateID(replicaID); err != nil {
		return nil, err
	}
	var o dialOptions
	for _, opt := range opts {
		opt(&o)
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("replica %s: dial %s: %w", replicaID, addr, err)
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		if err := tc.SetNoDelay(true); err != nil {
			_ = nc.Close() // nothing sent yet
			return nil, fmt.Errorf("replica %s: set TCP_NODELAY: %w", replicaID, err)
		}
	}
	if o.tls != nil {
		tc := tls.Client(nc, o.tls.ClientConfig())
		if err := tc.HandshakeContext(ctx); err != nil {
			_ = nc.Close() // nothing sent yet
			return nil, fmt.Errorf("replica %s: TLS with %s: %w", replicaID, addr, err)
		}
		nc = tc
	}
	c := newClient(nc, replicaID)
	if err := c.open(ctx, size); err != nil {
		_ = c.Close() // always nil
		return nil, err
	}
	return c, nil
}

// DialOption configures Dial.
type DialOption func(*dialOptions)

type dialOptions struct {
	tls *pki.Credentials
}

// WithTLS has Dial speak mutual TLS with creds (nil: plaintext).
func WithTLS(creds *pki.Credentials) DialOption {
	return func(o *dialOptions) { o.tls = creds }
}

// newClient starts the reader and writer goroutines on nc; the caller still
// has to send OPEN.
func newClient(nc net.Conn, replicaID string) *Client {
	c := &Client{
		nc:        nc,
		replicaID: replicaID,
		queue:     make(chan *call, 2*maxInFlight),
		dead:      make(chan struct{}),
		pending:   make(map[uint64]*call),
	}
	c.wg.Add(2)
	go func() {
		defer c.wg.Done()
		c.readLoop()
	}()
	go func() {
		defer c.wg.Done()
		c.writeLoop()
	}()
	return c
}

// ReplicaID returns the id of the replica the client opened.
func (c *Client) ReplicaID() string { return c.replicaID }

// Close closes the connection; pending and later calls fail with ErrClosed.
// It waits for the client's goroutines and always returns nil.
func (c *Client) Close() error {
	c.fail(ErrClosed)
	c.wg.Wait()
	return nil
}

// fail marks the connection dead for cause, closes it, and fails every call
// still waiting for a reply. Only the first cause is kept.
func (c *Client) fail(cause error) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	if cause == ErrClosed {
		c.err = fmt.Errorf("replica %s: %w", c.replicaID, ErrClosed)
	} else {
		c.err = fmt.Errorf("replica %s: connection lost: %w: %w", c.replicaID, ErrClosed, cause)
	}
	pending := c.pending
	c.pending = make(map[uint64]*call)
	close(c.dead)
	c.mu.Unlock()
	_ = c.nc.Close() // the connection is being abandoned; its close error tells nothing
	for _, cl := range pending {
		cl.err = c.err
		close(cl.done)
	}
}

func (c *Client) deadErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// do sends one request, with the flag of ctx's class if it is a data
// operation, and waits for its reply payload.
func (c *Client) do(ctx context.Context, h RequestHeader, payload, dst []byte) ([]byte, error) {
	return c.doTrailer(ctx, h, payload, nil, dst)
}

// doTrailer is do with a trailer sent after the payload.
func (c *Client) doTrailer(ctx context.Context, h RequestHeader, payload, trailer, dst []byte) ([]byte, error) {
	if !scheduled(h.Op) || c.noClass.Load() {
		return c.roundTrip(ctx, h, payload, trailer, dst)
	}
	flag := classFlag(ClassOf(ctx))
	if flag == 0 {
		return c.roundTrip(ctx, h, payload, trailer, dst)
	}
	marked := h
	marked.Flags |= flag
	reply, err := c.roundTrip(ctx, marked, payload, trailer, dst)
	if !errors.Is(err, ErrInvalidArgument) {
		return reply, err
	}
	// A server that does not know the flag refuses the request before
	// running it (BadRequest), so sending it again unmarked is safe. The
	// request may also have been bad for another reason; then the second
	// answer is the same refusal and the connection keeps marking.
	reply, err = c.roundTrip(ctx, h, payload, trailer, dst)
	var remote *RemoteError
	if err == nil || errors.As(err, &remote) && !errors.Is(err, ErrInvalidArgument) {
		// The server answered the unmarked request past its validation:
		// the flag was what it refused, whatever the second answer (a
		// fenced write, an I/O error) says about the request itself.
		c.noClass.Store(true)
	}
	return reply, err
}

// roundTrip sends one request as it is and waits for its reply payload.
func (c *Client) roundTrip(ctx context.Context, h RequestHeader, payload, trailer, dst []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h.PayloadLen = uint32(len(payload) + len(trailer))
	cl := &call{h: h, payload: payload, trailer: trailer, dst: dst, written: make(chan struct{}), done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.nextHandle++
	cl.h.Handle = c.nextHandle
	c.pending[cl.h.Handle] = cl
	c.mu.Unlock()

	select {
	case c.queue <- cl:
	case <-ctx.Done():
		c.abandon(cl)
		return nil, ctx.Err()
	case <-c.dead:
		c.abandon(cl)
		return nil, c.deadErr()
	}
	select {
	case <-cl.done:
	case <-ctx.Done():
		if c.abandon(cl) {
			return nil, ctx.Err()
		}
		<-cl.done // the reader is completing it right now
	}
	c.release(cl)
	return cl.reply, cl.err
}

// abandon takes cl out of the pending calls so that its reply, if one comes,
// is discarded. It reports false when the reply is already being delivered.
// When cl's frame is only partly sent, the stream cannot be saved and the
// connection is closed. On return the writer no longer uses cl's payload.
func (c *Client) abandon(cl *call) bool {
	c.mu.Lock()
	_, mine := c.pending[cl.h.Handle]
	if mine {
		delete(c.pending, cl.h.Handle)
	}
	writing := cl.state == callWriting
	c.mu.Unlock()
	if !mine {
		return false
	}
	if writing {
		c.fail(errors.New("a request was cancelled while being sent"))
	}
	c.release(cl)
	return true
}

// release returns once the writer no longer uses cl's payload, so the
// caller may reuse its buffer.
func (c *Client) release(cl *call) {
	c.mu.Lock()
	st := cl.state
	if st == callQueued {
		cl.state = callSkipped
	}
	c.mu.Unlock()
	if st == callWriting || st == callWritten {
		<-cl.written
	}
}

// writeLoop sends queued frames in order. It flushes when the queue is empty,
// so frames queued together share a write.
//
// A call cancelled while queued is skipped, and the check for an empty
// queue runs after it too: the frame before it was left in the buffer
// because it was queued, and with nothing queued after it that frame would
// stay half-sent until its caller's timeout.
func (c *Client) writeLoop() {
	bw := bufio.NewWriterSize(c.nc, 64<<10)
	hdr := make([]byte, 0, RequestHeaderLen)
	for {
		var cl *call
		select {
		case cl = <-c.queue:
		case <-c.dead:
			return
		}
		var err error
		c.mu.Lock()
		skipped := cl.state == callSkipped
		if !skipped {
			cl.state = callWriting
		}
		c.mu.Unlock()
		if !skipped {
			err = c.writeFrame(bw, hdr, cl)
		}
		if err == nil && len(c.queue) == 0 {
			err = bw.Flush()
		}
		if err != nil {
			c.fail(fmt.Errorf("send: %w", err))
			return
		}
	}
}

// writeFrame puts cl's frame into bw and marks it written.
func (c *Client) writeFrame(bw *bufio.Writer, hdr []byte, cl *call) error {
	_, err := bw.Write(AppendRequestHeader(hdr[:0], cl.h))
	if err == nil && len(cl.payload) > 0 {
		_, err = bw.Write(cl.payload)
	}
	if err == nil && len(cl.trailer) > 0 {
		_, err = bw.Write(cl.trailer)
	}
	c.mu.Lock()
	cl.state = callWritten
	c.mu.Unlock()
	close(cl.written)
	return err
}

// readLoop delivers replies to their calls until the connection ends.
func (c *Client) readLoop() {
	br := bufio.NewReaderSize(c.nc, 64<<10)
	hdr := make([]byte, ReplyHeaderLen)
	for {
		if _, err := io.ReadFull(br, hdr); err != nil {
			c.fail(fmt.Errorf("receive: %w", err))
			return
		}
		rh, err := DecodeReplyHeader(hdr)
		if err != nil {
			c.fail(err)
			return
		}
		c.mu.Lock()
		cl := c.pending[rh.Handle]
		delete(c.pending, rh.Handle)
		c.mu.Unlock()
		if cl == nil {
			if rh.Handle == 0 && rh.Status != StatusOK {
				// The server rejected a frame it could not attribute and
				// is closing the connection.
				msg := make([]byte, rh.PayloadLen)
				_, _ = io.ReadFull(br, msg) // best effort: the message only explains
				c.fail(&RemoteError{Status: rh.Status, Message: string(msg)})
				return
			}
			// The reply to an abandoned call.
			if _, err := io.CopyN(io.Discard, br, int64(rh.PayloadLen)); err != nil {
				c.fail(fmt.Errorf("receive: %w", err))
				return
			}
			continue
		}
		cerr := c.readResult(br, cl, rh)
		if cerr != nil {
			c.fail(cerr)
			cl.err = c.deadErr()
		}
		close(cl.done)
		if cerr != nil {
			return
		}
	}
}

// readResult reads a reply's payload into cl. A returned error is a
// connection failure.
func (c *Client) readResult(br *bufio.Reader, cl *call, rh ReplyHeader) error {
	switch {
	case rh.Status != StatusOK:
		msg := make([]byte, rh.PayloadLen)
		if _, err := io.ReadFull(br, msg); err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		cl.err = &RemoteError{Status: rh.Status, Message: string(msg)}
	case cl.dst != nil:
		if int(rh.PayloadLen) != len(cl.dst) {
			return fmt.Errorf("%w: %d-byte reply to a %d-byte %s", ErrProtocol, rh.PayloadLen, len(cl.dst), cl.h.Op)
		}
		if _, err := io.ReadFull(br, cl.dst); err != nil {
			return fmt.Errorf("receive: %w", err)
		}
	default:
		cl.reply = make([]byte, rh.PayloadLen)
		if _, err := io.ReadFull(br, cl.reply); err != nil {
			return fmt.Errorf("receive: %w", err)
		}
	}
	return nil
}

func (c *Client) open(ctx context.Context, size uint64) error {
	reply, err := c.do(ctx, RequestHeader{Op: OpOpen, Offset: size}, []byte(c.replicaID), nil)
	if err != nil {
		return err
	}
	info, err := DecodeInfo(reply)
	if err != nil {
		return err
	}
	c.opened = info
	return nil
}

// Opened describes the replica as it was when the connection opened it
// (its size then, for the engine to grow a replica that missed a grow).
func (c *Client) Opened() Info { return c.opened }

// Claim makes epoch the replica's epoch; it is durable when Claim returns.
// See Replica.Claim.
func (c *Client) Claim(ctx context.Context, epoch uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpClaim, Epoch: epoch}, nil, nil)
	return err
}

// WriteAt writes p (at most MaxPayload bytes) at off; with fua the data is
// on stable storage when it returns. See Replica.WriteAt.
func (c *Client) WriteAt(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool) error {
	if len(p) > MaxPayload {
		return fmt.Errorf("%w: write of %d bytes exceeds %d", ErrInvalidArgument, len(p), MaxPayload)
	}
	h := RequestHeader{Op: OpWrite, Epoch: epoch, Offset: off, Length: uint32(len(p))}
	if fua {
		h.Flags = FlagFUA
	}
	_, err := c.do(ctx, h, p, nil)
	return err
}

// WriteAtSums is WriteAt with p's piece checksums (PieceSums(nil, p, off)),
// which the replica verifies before it writes: damage on the way →
// ErrChecksum, nothing written. A server that predates checksums gets the
// write without them, as does a write too large to carry them in one frame.
func (c *Client) WriteAtSums(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error {
	if pieces == nil || c.noSums.Load() || len(p)+4*len(pieces) > MaxPayload {
		return c.WriteAt(ctx, epoch, p, off, fua)
	}
	trailer := AppendUint32s(make([]byte, 0, 4*len(pieces)), pieces)
	h := RequestHeader{Op: OpWrite, Flags: FlagSums, Epoch: epoch, Offset: off, Length: uint32(len(p))}
	if fua {
		h.Flags |= FlagFUA
	}
	_, err := c.doTrailer(ctx, h, p, trailer, nil)
	if !errors.Is(err, ErrInvalidArgument) {
		return err
	}
	// As for the class flags (see do): an older server refuses the flag
	// before it runs anything.
	err = c.WriteAt(ctx, epoch, p, off, fua)
	var remote *RemoteError
	if err == nil || errors.As(err, &remote) && !errors.Is(err, ErrInvalidArgument) {
		c.noSums.Store(true)
	}
	return err
}

// WritePair writes p at off and pair.Data at pair.Off as one request (a
// WRITE with FlagPair; pair's pieces nil: without checksums). A server that
// predates the flag gets the two as two writes, as does a pair too large
// for one frame: then they are not one request any more.
func (c *Client) WritePair(ctx context.Context, epoch uint64, p []byte, off uint64, pair Pair, fua bool) error {
	// Checked here too: a server's refusal then means it predates the flag.
	if len(p) == 0 || len(pair.Data) == 0 || blockAlignedOverlap(off, uint64(len(p)), pair.Off, uint64(len(pair.Data))) {
		return fmt.Errorf("%w: write pair %d+%d and %d+%d empty or sharing a block", ErrInvalidArgument, off, len(p), pair.Off, len(pair.Data))
	}
	size := len(p) + pairHeaderLen + len(pair.Data) + 4*(len(pair.FirstPieces)+len(pair.SecondPieces))
	if c.noPair.Load() || size > MaxPayload {
		return c.writePairApart(ctx, epoch, p, off, pair, fua)
	}
	if c.noSums.Load() {
		pair.FirstPieces, pair.SecondPieces = nil, nil
	}
	h := RequestHeader{Op: OpWrite, Flags: FlagPair, Epoch: epoch, Offset: off, Length: uint32(len(p))}
	if pair.FirstPieces != nil {
		h.Flags |= FlagSums
	}
	if fua {
		h.Flags |= FlagFUA
	}
	_, err := c.doTrailer(ctx, h, p, AppendPair(nil, pair), nil)
	if !errors.Is(err, ErrInvalidArgument) {
		return err
	}
	// An older server refuses the flag before it runs anything.
	err = c.writePairApart(ctx, epoch, p, off, pair, fua)
	var remote *RemoteError
	if err == nil || errors.As(err, &remote) && !errors.Is(err, ErrInvalidArgument) {
		c.noPair.Store(true)
	}
	return err
}

func (c *Client) writePairApart(ctx context.Context, epoch uint64, p []byte, off uint64, pair Pair, fua bool) error {
	if err := c.WriteAtSums(ctx, epoch, pair.Data, pair.Off, fua, pair.SecondPieces); err != nil {
		return err
	}
	return c.WriteAtSums(ctx, epoch, p, off, fua, pair.FirstPieces)
}

// Rehash has the replica recompute the stored block checksums of extents
// [firstExtent, firstExtent+count) from their data; see Replica.Rehash.
func (c *Client) Rehash(ctx context.Context, epoch, firstExtent, count uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpRehash, Epoch: epoch, Offset: firstExtent, Length: uint32(count)}, nil, nil)
	return err
}

// Snapshot seals the replica's contents as snapshot id. See
// Replica.Snapshot.
func (c *Client) Snapshot(ctx context.Context, epoch uint64, id string) error {
	_, err := c.do(ctx, RequestHeader{Op: OpSnapshot, Epoch: epoch}, []byte(id), nil)
	return err
}

// PrepareSnapshot makes the files of the next snapshot's head ahead of it.
// See Replica.PrepareSnapshot.
func (c *Client) PrepareSnapshot(ctx context.Context, epoch uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpPrepareSnap, Epoch: epoch}, nil, nil)
	return err
}

// DeleteSnapshot removes snapshot id; it returns when the snapshot's unique
// data has moved. See Replica.DeleteSnapshot.
func (c *Client) DeleteSnapshot(ctx context.Context, epoch uint64, id string) error {
	_, err := c.do(ctx, RequestHeader{Op: OpDeleteSnapshot, Epoch: epoch}, []byte(id), nil)
	return err
}

// ReadSnapshotAt fills p (at most MaxPayload bytes) from off as snapshot id
// holds it. See Replica.ReadSnapshotAt.
func (c *Client) ReadSnapshotAt(ctx context.Context, epoch uint64, id string, p []byte, off uint64) error {
	if len(p) > MaxPayload {
		return fmt.Errorf("%w: read of %d bytes exceeds %d", ErrInvalidArgument, len(p), MaxPayload)
	}
	if p == nil {
		p = []byte{}
	}
	_, err := c.do(ctx, RequestHeader{Op: OpReadSnapshot, Epoch: epoch, Offset: off, Length: uint32(len(p))}, []byte(id), p)
	return err
}

// Layers lists the replica's sealed layers, oldest first. See
// Replica.Layers.
func (c *Client) Layers(ctx context.Context, epoch uint64) ([]LayerInfo, error) {
	reply, err := c.do(ctx, RequestHeader{Op: OpLayers, Epoch: epoch}, nil, nil)
	if err != nil {
		return nil, err
	}
	return DecodeLayerInfos(reply)
}

// LayerPart says which layer of a given id LayerSums is about.
type LayerPart uint8

const (
	// LayerSealed is the sealed layer (Replica.LayerSums).
	LayerSealed LayerPart = iota
	// LayerBuilding is the layer under construction (Replica.BuildSums).
	LayerBuilding
	// LayerFlat is the layer that flattening the chain up to the sealed
	// one would make (Replica.FlatSums).
	LayerFlat
)

// LayerSums returns the checksum of each extent [firstExtent,
// firstExtent+count) of snapshot id's layer, the part of it that part
// names. A server that predates LayerFlat refuses it (ErrInvalidArgument).
func (c *Client) LayerSums(ctx context.Context, epoch uint64, id string, part LayerPart, firstExtent, count uint64) ([]uint32, error) {
	h := RequestHeader{Op: OpLayerSums, Epoch: epoch}
	switch part {
	case LayerBuilding:
		h.Flags = FlagLayerBuild
	case LayerFlat:
		h.Flags = FlagLayerFlat
	}
	return c.extentSums(ctx, h, []byte(id), firstExtent, count)
}

// ReadLayerExtent returns extent x of snapshot id's layer, encoded (see
// carry.go); with flat, of the layer flattening the chain up to it would
// make. See Replica.ReadLayerExtent.
func (c *Client) ReadLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, flat bool) ([]byte, error) {
	h := RequestHeader{Op: OpLayerRead, Epoch: epoch, Offset: x}
	if flat {
		h.Flags = FlagLayerFlat
	}
	return c.do(ctx, h, []byte(id), nil)
}

// BeginLayer starts (or resumes) building snapshot id's layer for position
// pos. See Replica.BeginLayer.
func (c *Client) BeginLayer(ctx context.Context, epoch uint64, id string, pos uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpLayerBegin, Epoch: epoch, Offset: pos}, []byte(id), nil)
	return err
}

// WriteLayerExtent sets extent x of the layer id under construction to the
// encoding enc. See Replica.WriteLayerExtent.
func (c *Client) WriteLayerExtent(ctx context.Context, epoch uint64, id string, x uint64, enc []byte) error {
	if len(id) == 0 || len(id) > MaxSnapshotIDLen || len(enc)+1+len(id) > MaxPayload {
		return fmt.Errorf("%w: layer write of %d bytes for layer %q", ErrInvalidArgument, len(enc), id)
	}
	// The id goes first and the encoding after it as a trailer: one frame,
	// no copy of the extent.
	prefix := append([]byte{byte(len(id))}, id...)
	_, err := c.doTrailer(ctx, RequestHeader{Op: OpLayerWrite, Epoch: epoch, Offset: x, Length: uint32(len(enc))}, prefix, enc, nil)
	return err
}

// SealLayer publishes the layer id under construction. See
// Replica.SealLayer.
func (c *Client) SealLayer(ctx context.Context, epoch uint64, id string) error {
	_, err := c.do(ctx, RequestHeader{Op: OpLayerSeal, Epoch: epoch}, []byte(id), nil)
	return err
}

// DropLayer takes snapshot id's layer out without merging it. See
// Replica.DropLayer.
func (c *Client) DropLayer(ctx context.Context, epoch uint64, id string) error {
	_, err := c.do(ctx, RequestHeader{Op: OpLayerDrop, Epoch: epoch}, []byte(id), nil)
	return err
}

// ReadAt fills p (at most MaxPayload bytes) from off. On error p's content
// is undefined.
func (c *Client) ReadAt(ctx context.Context, epoch uint64, p []byte, off uint64) error {
	if len(p) > MaxPayload {
		return fmt.Errorf("%w: read of %d bytes exceeds %d", ErrInvalidArgument, len(p), MaxPayload)
	}
	if p == nil {
		p = []byte{}
	}
	_, err := c.do(ctx, RequestHeader{Op: OpRead, Epoch: epoch, Offset: off, Length: uint32(len(p))}, nil, p)
	return err
}

// Flush makes the replica's completed writes durable.
func (c *Client) Flush(ctx context.Context, epoch uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpFlush, Epoch: epoch}, nil, nil)
	return err
}

// Trim discards [off, off+length); it reads as zeros afterwards. Ranges over
// 1 GiB are sent as several requests, one after another.
func (c *Client) Trim(ctx context.Context, epoch, off, length uint64) error {
	return c.rangeOp(ctx, OpTrim, epoch, off, length)
}

// WriteZeroes makes [off, off+length) read as zeros. Ranges over 1 GiB are
// sent as several requests, one after another.
func (c *Client) WriteZeroes(ctx context.Context, epoch, off, length uint64) error {
	return c.rangeOp(ctx, OpWriteZeroes, epoch, off, length)
}

func (c *Client) rangeOp(ctx context.Context, op Op, epoch, off, length uint64) error {
	for {
		n := min(length, maxRangeChunk)
		if _, err := c.do(ctx, RequestHeader{Op: op, Epoch: epoch, Offset: off, Length: uint32(n)}, nil, nil); err != nil {
			return err
		}
		off, length = off+n, length-n
		if length == 0 {
			return nil
		}
	}
}

// Checksums returns the CRC32C of each extent in [firstExtent,
// firstExtent+count). Large counts are split into several requests.
func (c *Client) Checksums(ctx context.Context, epoch, firstExtent, count uint64) ([]uint32, error) {
	return c.extentSums(ctx, RequestHeader{Op: OpChecksums, Epoch: epoch}, nil, firstExtent, count)
}

// extentSums sends h (CHECKSUMS, LAYER_SUMS) for extents [firstExtent,
// firstExtent+count), split into requests whose replies fit a frame, and
// returns a u32 per extent.
func (c *Client) extentSums(ctx context.Context, h RequestHeader, payload []byte, firstExtent, count uint64) ([]uint32, error) {
	sums := make([]uint32, 0, min(count, MaxChecksumsPerRequest))
	for {
		n := min(count, MaxChecksumsPerRequest)
		h.Offset, h.Length = firstExtent, uint32(n)
		reply, err := c.do(ctx, h, payload, nil)
		if err != nil {
			return nil, err
		}
		part, err := DecodeUint32s(reply)
		if err != nil {
			return nil, err
		}
		if uint64(len(part)) != n {
			return nil, fmt.Errorf("%w: %d checksums in reply to a %s request for %d", ErrProtocol, len(part), h.Op, n)
		}
		sums = append(sums, part...)
		firstExtent, count = firstExtent+n, count-n
		if count == 0 {
			return sums, nil
		}
	}
}

// ReadExtent returns the bytes of extent index.
func (c *Client) ReadExtent(ctx context.Context, epoch, index uint64) ([]byte, error) {
	return c.do(ctx, RequestHeader{Op: OpReadExtent, Epoch: epoch, Offset: index}, nil, nil)
}

// DirtyExtents returns the replica's dirty extents in ascending order.
func (c *Client) DirtyExtents(ctx context.Context) ([]uint64, error) {
	var all []uint64
	first := uint64(0)
	for {
		reply, err := c.do(ctx, RequestHeader{Op: OpDirty, Offset: first, Length: dirtyPage}, nil, nil)
		if err != nil {
			return nil, err
		}
		part, err := DecodeUint64s(reply)
		if err != nil {
			return nil, err
		}
		all = append(all, part...)
		if len(part) < dirtyPage {
			if all == nil {
				all = []uint64{}
			}
			return all, nil
		}
		first = part[len(part)-1] + 1
	}
}

// MarkClean declares clean point (epoch, generation) on the replica; see
// Replica.MarkClean for when the engine may call it.
func (c *Client) MarkClean(ctx context.Context, epoch, generation uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpMarkClean, Epoch: epoch, Offset: generation}, nil, nil)
	return err
}

// Grow makes the replica size bytes long, durably; a size it already has
// (or passed) is a success. See Replica.Grow.
func (c *Client) Grow(ctx context.Context, epoch, size uint64) error {
	_, err := c.do(ctx, RequestHeader{Op: OpGrow, Epoch: epoch, Offset: size}, nil, nil)
	return err
}

// Info describes the replica, with its generation unless the server
// predates generations (then Generation is "").
func (c *Client) Info(ctx context.Context) (Info, error) {
	if !c.noGeneration.Load() {
		reply, err := c.do(ctx, RequestHeader{Op: OpInfo, Flags: FlagGeneration}, nil, nil)
		if !errors.Is(err, ErrInvalidArgument) {
			if err != nil {
				return Info{}, err
			}
			return DecodeInfo(reply)
		}
	}
	// A server that does not know the flag refuses INFO with it
	// (BadRequest); INFO changes nothing, so asking again is safe.
	reply, err := c.do(ctx, RequestHeader{Op: OpInfo}, nil, nil)
	if err != nil {
		return Info{}, err
	}
	c.noGeneration.Store(true)
	return DecodeInfo(reply)
}

// Ping checks that the server answers.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.do(ctx, RequestHeader{Op: OpPing}, nil, nil)
	return err
}
