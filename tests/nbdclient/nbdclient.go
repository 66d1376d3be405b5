// Package nbdclient is a small NBD client for the tests that drive Cairn's
// NBD exports (tests/dataplane, tests/torture). It is written from the
// protocol document, not from our server, so that a test knows exactly which
// requests the server acknowledged: fixed newstyle handshake, NBD_OPT_GO,
// simple replies; READ, WRITE (optionally FUA), FLUSH and DISC.
//
// Requests are pipelined: any number of goroutines may call ReadAt, WriteAt
// and Flush at once, and replies are matched to requests by handle. A request
// whose connection dies before its reply fails with an error wrapping
// ErrClosed: its outcome is unknown (it may or may not have been applied).
package nbdclient

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

const (
	magicInit        = 0x4e42444d41474943 // "NBDMAGIC"
	magicOption      = 0x49484156454f5054 // "IHAVEOPT"
	magicOptionReply = 0x0003e889045565a9
	magicRequest     = 0x25609513
	magicSimpleReply = 0x67446698

	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1

	tflagSendFlush = 1 << 2
	tflagSendFUA   = 1 << 3

	optGo     = 7
	repAck    = 1
	repInfo   = 3
	repErrBit = 1 << 31

	infoExport = 0

	cmdRead  = 0
	cmdWrite = 1
	cmdDisc  = 2
	cmdFlush = 3

	cmdFlagFUA = 1 << 0
)

// EIO is the errno of an NBD error reply for an I/O error.
const EIO = 5

// Error is an error reply from the server: the request reached the server
// and it answered that the request failed.
type Error struct {
	Op    string
	Errno uint32
}

func (e *Error) Error() string {
	return fmt.Sprintf("nbd %s: server replied error %d", e.Op, e.Errno)
}

// ErrClosed is wrapped by every failure caused by the connection going
// away: the outcome of a request still in flight is then unknown.
var ErrClosed = errors.New("nbd connection closed")

// IsErrno reports whether err is an error reply with that errno.
func IsErrno(err error, errno uint32) bool {
	var ne *Error
	return errors.As(err, &ne) && ne.Errno == errno
}

// Call is one request sent and waiting for its reply.
type Call struct {
	op   string
	dst  []byte // READ: the reply's payload goes here
	done chan error
}

// Wait waits for the call's reply. A ctx that ends leaves the request in
// flight (its outcome unknown) and returns ctx's error.
func (call *Call) Wait(ctx context.Context) error {
	select {
	case err := <-call.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", call.op, ctx.Err())
	}
}

// Conn is one NBD client connection in the transmission phase.
type Conn struct {
	nc     net.Conn
	size   uint64
	tflags uint16

	wmu sync.Mutex // serialises request frames on the socket

	mu         sync.Mutex
	pending    map[uint64]*Call
	nextHandle uint64
	err        error         // why the connection died
	dead       chan struct{} // closed when the reader stops
}

// Dial connects to the unix socket at path and negotiates the default export
// with NBD_OPT_GO. ctx bounds the connection and the handshake.
func Dial(ctx context.Context, path string) (*Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	c := &Conn{nc: nc, pending: map[uint64]*Call{}, dead: make(chan struct{})}
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	if err := c.handshake(); err != nil {
		_ = nc.Close()
		return nil, fmt.Errorf("nbd handshake on %s: %w", path, err)
	}
	_ = nc.SetDeadline(time.Time{})
	go c.readLoop()
	return c, nil
}

func (c *Conn) handshake() error {
	var g [18]byte
	if _, err := io.ReadFull(c.nc, g[:]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if binary.BigEndian.Uint64(g[0:]) != magicInit || binary.BigEndian.Uint64(g[8:]) != magicOption {
		return fmt.Errorf("not a newstyle NBD server: greeting % x", g)
	}
	hflags := binary.BigEndian.Uint16(g[16:])
	if hflags&flagFixedNewstyle == 0 {
		return fmt.Errorf("server does not offer fixed newstyle (flags %#x)", hflags)
	}
	cflags := uint32(flagCFixedNewstyle)
	if hflags&flagNoZeroes != 0 {
		cflags |= flagCNoZeroes
	}
	// NBD_OPT_GO for the default export (empty name), no info requests.
	data := binary.BigEndian.AppendUint32(nil, 0)
	data = binary.BigEndian.AppendUint16(data, 0)
	b := binary.BigEndian.AppendUint32(nil, cflags)
	b = binary.BigEndian.AppendUint64(b, magicOption)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	if _, err := c.nc.Write(b); err != nil {
		return err
	}
	gotExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.nc, h[:]); err != nil {
			return fmt.Errorf("option reply: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[0:]); m != magicOptionReply {
			return fmt.Errorf("option reply magic %#x", m)
		}
		if o := binary.BigEndian.Uint32(h[8:]); o != optGo {
			return fmt.Errorf("reply to option %d, want %d", o, optGo)
		}
		typ := binary.BigEndian.Uint32(h[12:])
		n := binary.BigEndian.Uint32(h[16:])
		if n > 1<<20 {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		payload := make([]byte, n)
		if _, err := io.ReadFull(c.nc, payload); err != nil {
			return fmt.Errorf("option reply data: %w", err)
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return errors.New("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return nil
		case typ == repInfo:
			if len(payload) >= 2 && binary.BigEndian.Uint16(payload) == infoExport {
				if len(payload) != 12 {
					return fmt.Errorf("NBD_INFO_EXPORT of %d bytes", len(payload))
				}
				c.size = binary.BigEndian.Uint64(payload[2:])
				c.tflags = binary.BigEndian.Uint16(payload[10:])
				gotExport = true
			}
		case typ&repErrBit != 0:
			return fmt.Errorf("NBD_OPT_GO refused: reply type %#x %q", typ, payload)
		default:
			return fmt.Errorf("unexpected option reply type %#x", typ)
		}
	}
}

// Size is the export size the server announced.
func (c *Conn) Size() uint64 { return c.size }

// readLoop reads simple replies and completes the matching calls.
func (c *Conn) readLoop() {
	var h [16]byte
	var err error
	for {
		if _, err = io.ReadFull(c.nc, h[:]); err != nil {
			break
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != magicSimpleReply {
			err = fmt.Errorf("reply magic %#x", m)
			break
		}
		errno := binary.BigEndian.Uint32(h[4:])
		handle := binary.BigEndian.Uint64(h[8:])
		c.mu.Lock()
		call, ok := c.pending[handle]
		delete(c.pending, handle)
		c.mu.Unlock()
		if !ok {
			err = fmt.Errorf("reply for unknown handle %d", handle)
			break
		}
		if errno != 0 {
			call.done <- &Error{Op: call.op, Errno: errno}
			continue
		}
		if call.dst != nil {
			if _, err = io.ReadFull(c.nc, call.dst); err != nil {
				call.done <- fmt.Errorf("%s: read payload: %v: %w", call.op, err, ErrClosed)
				break
			}
		}
		call.done <- nil
	}
	c.mu.Lock()
	c.err = err
	pending := c.pending
	c.pending = map[uint64]*Call{}
	c.mu.Unlock()
	for _, call := range pending {
		call.done <- fmt.Errorf("%s: %v: %w", call.op, err, ErrClosed)
	}
	close(c.dead)
	_ = c.nc.Close()
}

// send writes one request frame to the socket and returns the call whose
// reply is to come. When send returns, the whole frame is in the kernel.
func (c *Conn) send(op string, typ, flags uint16, off uint64, length uint32, payload, dst []byte) (*Call, error) {
	call := &Call{op: op, dst: dst, done: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil || isClosed(c.dead) {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("%s: %v: %w", op, err, ErrClosed)
	}
	c.nextHandle++
	handle := c.nextHandle
	c.pending[handle] = call
	c.mu.Unlock()

	b := make([]byte, 0, 28+len(payload))
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, length)
	b = append(b, payload...)
	c.wmu.Lock()
	_, err := c.nc.Write(b)
	c.wmu.Unlock()
	if err != nil {
		// A partial frame breaks the stream: close it; the reader fails
		// every pending call, this one included.
		_ = c.nc.Close()
	}
	return call, nil
}

func (c *Conn) do(ctx context.Context, op string, typ, flags uint16, off uint64, length uint32, payload, dst []byte) error {
	call, err := c.send(op, typ, flags, off, length, payload, dst)
	if err != nil {
		return err
	}
	return call.Wait(ctx)
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// ReadAt reads len(p) bytes at off.
func (c *Conn) ReadAt(ctx context.Context, p []byte, off uint64) error {
	return c.do(ctx, "read", cmdRead, 0, off, uint32(len(p)), nil, p)
}

// WriteAt writes p at off; with fua the server must make it durable first.
// A ctx that ends leaves the write in flight, its outcome unknown.
func (c *Conn) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	var flags uint16
	if fua {
		if c.tflags&tflagSendFUA == 0 {
			return errors.New("server does not accept FUA")
		}
		flags = cmdFlagFUA
	}
	return c.do(ctx, "write", cmdWrite, flags, off, uint32(len(p)), p, nil)
}

// SendWrite sends a WRITE without waiting for its reply: when it returns the
// request is in the socket (the server may not run yet); wait on the call.
func (c *Conn) SendWrite(p []byte, off uint64) (*Call, error) {
	return c.send("write", cmdWrite, 0, off, uint32(len(p)), p, nil)
}

// Flush asks the server to make every acknowledged write durable.
func (c *Conn) Flush(ctx context.Context) error {
	if c.tflags&tflagSendFlush == 0 {
		return errors.New("server does not accept FLUSH")
	}
	return c.do(ctx, "flush", cmdFlush, 0, 0, 0, nil, nil)
}

// Dead is closed once the connection has died (closed by either side).
func (c *Conn) Dead() <-chan struct{} { return c.dead }

// Close sends NBD_CMD_DISC (best effort) and closes the socket. Requests
// still in flight fail with ErrClosed.
func (c *Conn) Close() error {
	if !isClosed(c.dead) {
		b := binary.BigEndian.AppendUint32(nil, magicRequest)
		b = binary.BigEndian.AppendUint16(b, 0)
		b = binary.BigEndian.AppendUint16(b, cmdDisc)
		b = binary.BigEndian.AppendUint64(b, 0)
		b = binary.BigEndian.AppendUint64(b, 0)
		b = binary.BigEndian.AppendUint32(b, 0)
		c.wmu.Lock()
		_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.nc.Write(b) // the server may be gone already
		c.wmu.Unlock()
	}
	err := c.nc.Close()
	<-c.dead
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}
