package dataplane

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

// A small NBD client written from the protocol document (not from our
// server), so that the tests know exactly which requests the server
// acknowledged: fixed newstyle handshake, NBD_OPT_GO, simple replies; READ,
// WRITE (optionally FUA), FLUSH and DISC. Requests are pipelined: any number
// of goroutines may call ReadAt, WriteAt and Flush at once, and replies are
// matched to requests by handle.

const (
	nbdMagicInit        = 0x4e42444d41474943 // "NBDMAGIC"
	nbdMagicOption      = 0x49484156454f5054 // "IHAVEOPT"
	nbdMagicOptionReply = 0x0003e889045565a9
	nbdMagicRequest     = 0x25609513
	nbdMagicSimpleReply = 0x67446698

	nbdFlagFixedNewstyle  = 1 << 0
	nbdFlagNoZeroes       = 1 << 1
	nbdFlagCFixedNewstyle = 1 << 0
	nbdFlagCNoZeroes      = 1 << 1

	nbdTFlagHasFlags  = 1 << 0
	nbdTFlagReadOnly  = 1 << 1
	nbdTFlagSendFlush = 1 << 2
	nbdTFlagSendFUA   = 1 << 3

	nbdOptGo     = 7
	nbdRepAck    = 1
	nbdRepInfo   = 3
	nbdRepErrBit = 1 << 31

	nbdInfoExport = 0

	nbdCmdRead  = 0
	nbdCmdWrite = 1
	nbdCmdDisc  = 2
	nbdCmdFlush = 3

	nbdCmdFlagFUA = 1 << 0

	nbdEIO = 5
)

// nbdError is an error reply from the server: the request reached the
// server and it answered that the request failed.
type nbdError struct {
	Op    string
	Errno uint32
}

func (e *nbdError) Error() string {
	return fmt.Sprintf("nbd %s: server replied error %d", e.Op, e.Errno)
}

// errNBDClosed wraps every failure caused by the connection going away: the
// outcome of a request still in flight is then unknown.
var errNBDClosed = errors.New("nbd connection closed")

// isNBDErrno reports whether err is an error reply with that errno.
func isNBDErrno(err error, errno uint32) bool {
	var ne *nbdError
	return errors.As(err, &ne) && ne.Errno == errno
}

type nbdCall struct {
	op   string
	dst  []byte // READ: the reply's payload goes here
	done chan error
}

// nbdConn is one NBD client connection in the transmission phase.
type nbdConn struct {
	nc     net.Conn
	size   uint64
	tflags uint16

	wmu sync.Mutex // serialises request frames on the socket

	mu         sync.Mutex
	pending    map[uint64]*nbdCall
	nextHandle uint64
	err        error         // why the connection died
	dead       chan struct{} // closed when the reader stops
}

// dialNBD connects to the unix socket at path and negotiates the default
// export with NBD_OPT_GO.
func dialNBD(ctx context.Context, path string) (*nbdConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	c := &nbdConn{nc: nc, pending: map[uint64]*nbdCall{}, dead: make(chan struct{})}
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

func (c *nbdConn) handshake() error {
	var g [18]byte
	if _, err := io.ReadFull(c.nc, g[:]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if binary.BigEndian.Uint64(g[0:]) != nbdMagicInit || binary.BigEndian.Uint64(g[8:]) != nbdMagicOption {
		return fmt.Errorf("not a newstyle NBD server: greeting % x", g)
	}
	hflags := binary.BigEndian.Uint16(g[16:])
	if hflags&nbdFlagFixedNewstyle == 0 {
		return fmt.Errorf("server does not offer fixed newstyle (flags %#x)", hflags)
	}
	cflags := uint32(nbdFlagCFixedNewstyle)
	if hflags&nbdFlagNoZeroes != 0 {
		cflags |= nbdFlagCNoZeroes
	}
	// NBD_OPT_GO for the default export (empty name), no info requests.
	data := binary.BigEndian.AppendUint32(nil, 0)
	data = binary.BigEndian.AppendUint16(data, 0)
	b := binary.BigEndian.AppendUint32(nil, cflags)
	b = binary.BigEndian.AppendUint64(b, nbdMagicOption)
	b = binary.BigEndian.AppendUint32(b, nbdOptGo)
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
		if m := binary.BigEndian.Uint64(h[0:]); m != nbdMagicOptionReply {
			return fmt.Errorf("option reply magic %#x", m)
		}
		if o := binary.BigEndian.Uint32(h[8:]); o != nbdOptGo {
			return fmt.Errorf("reply to option %d, want %d", o, nbdOptGo)
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
		case typ == nbdRepAck:
			if !gotExport {
				return errors.New("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
			}
			return nil
		case typ == nbdRepInfo:
			if len(payload) >= 2 && binary.BigEndian.Uint16(payload) == nbdInfoExport {
				if len(payload) != 12 {
					return fmt.Errorf("NBD_INFO_EXPORT of %d bytes", len(payload))
				}
				c.size = binary.BigEndian.Uint64(payload[2:])
				c.tflags = binary.BigEndian.Uint16(payload[10:])
				gotExport = true
			}
		case typ&nbdRepErrBit != 0:
			return fmt.Errorf("NBD_OPT_GO refused: reply type %#x %q", typ, payload)
		default:
			return fmt.Errorf("unexpected option reply type %#x", typ)
		}
	}
}

// Size is the export size the server announced.
func (c *nbdConn) Size() uint64 { return c.size }

// readLoop reads simple replies and completes the matching calls.
func (c *nbdConn) readLoop() {
	var h [16]byte
	var err error
	for {
		if _, err = io.ReadFull(c.nc, h[:]); err != nil {
			break
		}
		if m := binary.BigEndian.Uint32(h[0:]); m != nbdMagicSimpleReply {
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
			call.done <- &nbdError{Op: call.op, Errno: errno}
			continue
		}
		if call.dst != nil {
			if _, err = io.ReadFull(c.nc, call.dst); err != nil {
				call.done <- fmt.Errorf("%s: read payload: %v: %w", call.op, err, errNBDClosed)
				break
			}
		}
		call.done <- nil
	}
	c.mu.Lock()
	c.err = err
	pending := c.pending
	c.pending = map[uint64]*nbdCall{}
	c.mu.Unlock()
	for _, call := range pending {
		call.done <- fmt.Errorf("%s: %v: %w", call.op, err, errNBDClosed)
	}
	close(c.dead)
	_ = c.nc.Close()
}

// do sends one request and waits for its reply. A ctx that ends leaves the
// request in flight (its outcome unknown) and returns ctx.Err().
func (c *nbdConn) do(ctx context.Context, op string, typ, flags uint16, off uint64, length uint32, payload, dst []byte) error {
	call, err := c.send(op, typ, flags, off, length, payload, dst)
	if err != nil {
		return err
	}
	return call.wait(ctx)
}

// send writes one request frame to the socket and returns the call whose
// reply is to come. When send returns, the whole frame is in the kernel.
func (c *nbdConn) send(op string, typ, flags uint16, off uint64, length uint32, payload, dst []byte) (*nbdCall, error) {
	call := &nbdCall{op: op, dst: dst, done: make(chan error, 1)}
	c.mu.Lock()
	if c.err != nil || isClosed(c.dead) {
		err := c.err
		c.mu.Unlock()
		return nil, fmt.Errorf("%s: %v: %w", op, err, errNBDClosed)
	}
	c.nextHandle++
	handle := c.nextHandle
	c.pending[handle] = call
	c.mu.Unlock()

	b := make([]byte, 0, 28+len(payload))
	b = binary.BigEndian.AppendUint32(b, nbdMagicRequest)
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

// wait waits for the call's reply.
func (call *nbdCall) wait(ctx context.Context) error {
	select {
	case err := <-call.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", call.op, ctx.Err())
	}
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
func (c *nbdConn) ReadAt(ctx context.Context, p []byte, off uint64) error {
	return c.do(ctx, "read", nbdCmdRead, 0, off, uint32(len(p)), nil, p)
}

// WriteAt writes p at off; with fua the server must make it durable first.
func (c *nbdConn) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	var flags uint16
	if fua {
		if c.tflags&nbdTFlagSendFUA == 0 {
			return errors.New("server does not accept FUA")
		}
		flags = nbdCmdFlagFUA
	}
	return c.do(ctx, "write", nbdCmdWrite, flags, off, uint32(len(p)), p, nil)
}

// SendWrite sends a WRITE without waiting for its reply: when it returns the
// request is in the socket (the server may not run yet); wait on the call.
func (c *nbdConn) SendWrite(p []byte, off uint64) (*nbdCall, error) {
	return c.send("write", nbdCmdWrite, 0, off, uint32(len(p)), p, nil)
}

// Flush asks the server to make every acknowledged write durable.
func (c *nbdConn) Flush(ctx context.Context) error {
	if c.tflags&nbdTFlagSendFlush == 0 {
		return errors.New("server does not accept FLUSH")
	}
	return c.do(ctx, "flush", nbdCmdFlush, 0, 0, 0, nil, nil)
}

// Close sends NBD_CMD_DISC (best effort) and closes the socket.
func (c *nbdConn) Close() error {
	if !isClosed(c.dead) {
		b := binary.BigEndian.AppendUint32(nil, nbdMagicRequest)
		b = binary.BigEndian.AppendUint16(b, 0)
		b = binary.BigEndian.AppendUint16(b, nbdCmdDisc)
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
