package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// testClient is a minimal NBD client for the tests: it negotiates by hand and
// sends one request at a time unless told otherwise.
type testClient struct {
	t      testing.TB
	nc     net.Conn
	size   uint64
	tflags uint16
	handle uint64
}

// dialRaw connects and reads the server's greeting, returning the handshake
// flags; the caller continues the negotiation.
func dialRaw(t testing.TB, path string) (*testClient, uint16) {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nc.Close() }) // may already be closed by the test
	if err := nc.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	c := &testClient{t: t, nc: nc}
	var g [18]byte
	c.readFull(g[:])
	if binary.BigEndian.Uint64(g[0:]) != magicInit || binary.BigEndian.Uint64(g[8:]) != magicOption {
		t.Fatalf("bad greeting % x", g)
	}
	return c, binary.BigEndian.Uint16(g[16:])
}

// dialExport connects and enters transmission with NBD_OPT_GO.
func dialExport(t testing.TB, path, name string) *testClient {
	t.Helper()
	c, _ := dialRaw(t, path)
	c.write(binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes))
	c.sendOption(optGo, goData(name, infoBlockSize))
	for {
		typ, data := c.readOptionReply(optGo)
		switch typ {
		case repInfo:
			if binary.BigEndian.Uint16(data) == infoExport {
				c.size = binary.BigEndian.Uint64(data[2:])
				c.tflags = binary.BigEndian.Uint16(data[10:])
			}
		case repAck:
			return c
		default:
			t.Fatalf("NBD_OPT_GO: reply type %#x", typ)
		}
	}
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func (c *testClient) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("write: %v", err)
	}
}

func (c *testClient) readFull(b []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("read: %v", err)
	}
}

func (c *testClient) sendOption(code uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOption)
	b = binary.BigEndian.AppendUint32(b, code)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

func (c *testClient) readOptionReply(code uint32) (typ uint32, data []byte) {
	c.t.Helper()
	var h [20]byte
	c.readFull(h[:])
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOptionReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	if got := binary.BigEndian.Uint32(h[8:]); got != code {
		c.t.Fatalf("reply to option %d, want %d", got, code)
	}
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	c.readFull(data)
	return binary.BigEndian.Uint32(h[12:]), data
}

// send writes one request (and payload) and returns its handle.
func (c *testClient) send(typ, flags uint16, off uint64, length uint32, payload []byte) uint64 {
	c.t.Helper()
	c.handle++
	b := appendRequestHeader(nil, request{flags: flags, typ: typ, handle: c.handle, offset: off, length: length})
	c.write(append(b, payload...))
	return c.handle
}

// reply reads one simple reply; for a successful READ of readLen bytes the
// data follows.
func (c *testClient) reply(readLen uint32) (handle uint64, errno uint32, data []byte) {
	c.t.Helper()
	var h [replyHeaderLen]byte
	c.readFull(h[:])
	if m := binary.BigEndian.Uint32(h[0:]); m != magicSimpleReply {
		c.t.Fatalf("reply magic %#x", m)
	}
	errno = binary.BigEndian.Uint32(h[4:])
	handle = binary.BigEndian.Uint64(h[8:])
	if errno == 0 && readLen > 0 {
		data = make([]byte, readLen)
		c.readFull(data)
	}
	return handle, errno, data
}

// do sends one request and waits for its reply.
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) (uint32, []byte) {
	c.t.Helper()
	h := c.send(typ, flags, off, length, payload)
	var readLen uint32
	if typ == cmdRead {
		readLen = length
	}
	got, errno, data := c.reply(readLen)
	if got != h {
		c.t.Fatalf("reply for handle %d, want %d", got, h)
	}
	return errno, data
}

// expectClosed asserts the server closes the connection without a reply.
func (c *testClient) expectClosed() {
	c.t.Helper()
	var b [1]byte
	n, err := c.nc.Read(b[:])
	if err == nil {
		c.t.Fatalf("connection still open: read %d bytes % x", n, b[:n])
	}
	if err != io.EOF {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			c.t.Fatalf("connection still open: %v", err)
		}
	}
}

func (c *testClient) String() string { return fmt.Sprintf("client %v", c.nc.LocalAddr()) }
