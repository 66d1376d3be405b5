package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/cairn-csi/cairn/driver/frontend"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const testExport = "vol-1"

// startServer serves b on a fresh unix socket until the test ends.
func startServer(t testing.TB, b frontend.Backend, opts Options) (*Server, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	var log *zap.Logger
	if tt, ok := t.(*testing.T); ok {
		log = zaptest.NewLogger(tt, zaptest.Level(zap.InfoLevel))
	}
	s := NewServer(log, testExport, b, opts)
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return s, path
}

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestCommandsReachBackend(t *testing.T) {
	const size = 1 << 20
	b := newFileBackend(t, size)
	_, path := startServer(t, b, Options{})
	c := dialExport(t, path, testExport)
	if c.size != size {
		t.Fatalf("size %d, want %d", c.size, size)
	}
	want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn)
	if c.tflags != want {
		t.Fatalf("transmission flags %#x, want %#x", c.tflags, want)
	}

	data := pattern(64<<10, 1)
	steps := []struct {
		name  string
		typ   uint16
		flags uint16
		off   uint64
		len   uint32
		check func(t *testing.T)
	}{
		{"write", cmdWrite, 0, 4096, uint32(len(data)), func(t *testing.T) {
			if b.writes.Load() != 1 || b.fuaWrites.Load() != 0 {
				t.Errorf("writes %d fua %d, want 1 and 0", b.writes.Load(), b.fuaWrites.Load())
			}
		}},
		{"write FUA", cmdWrite, cmdFlagFUA, 4096, uint32(len(data)), func(t *testing.T) {
			if b.fuaWrites.Load() != 1 {
				t.Errorf("FUA writes %d, want 1", b.fuaWrites.Load())
			}
		}},
		{"read", cmdRead, 0, 4096, uint32(len(data)), nil},
		{"flush", cmdFlush, 0, 0, 0, func(t *testing.T) {
			if b.flushes.Load() != 1 {
				t.Errorf("flushes %d, want 1", b.flushes.Load())
			}
		}},
		{"trim", cmdTrim, 0, 8192, 4096, func(t *testing.T) {
			if b.trims.Load() != 1 {
				t.Errorf("trims %d, want 1", b.trims.Load())
			}
		}},
		{"trim FUA flushes", cmdTrim, cmdFlagFUA, 8192, 4096, func(t *testing.T) {
			if b.trims.Load() != 2 || b.flushes.Load() != 2 {
				t.Errorf("trims %d flushes %d, want 2 and 2", b.trims.Load(), b.flushes.Load())
			}
		}},
		{"write zeroes", cmdWriteZeroes, 0, 16384, 8192, func(t *testing.T) {
			if b.zeroes.Load() != 1 || b.fuaZeroes.Load() != 0 {
				t.Errorf("zeroes %d fua %d, want 1 and 0", b.zeroes.Load(), b.fuaZeroes.Load())
			}
		}},
		{"write zeroes FUA NO_HOLE", cmdWriteZeroes, cmdFlagFUA | cmdFlagNoHole, 20480, 4096, func(t *testing.T) {
			if b.zeroes.Load() != 2 || b.fuaZeroes.Load() != 1 {
				t.Errorf("zeroes %d fua %d, want 2 and 1", b.zeroes.Load(), b.fuaZeroes.Load())
			}
		}},
		{"zero-length read is a no-op", cmdRead, 0, size, 0, nil},
		{"flush with FUA", cmdFlush, cmdFlagFUA, 0, 0, nil},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			var payload []byte
			if st.typ == cmdWrite {
				payload = data[:st.len]
			}
			errno, got := c.do(st.typ, st.flags, st.off, st.len, payload)
			if errno != 0 {
				t.Fatalf("errno %d", errno)
			}
			if st.typ == cmdRead && !bytes.Equal(got, data[:st.len]) {
				t.Fatalf("read back differs")
			}
			if st.check != nil {
				st.check(t)
			}
		})
	}

	// Trimmed and zeroed ranges read back as zeroes (the file backend
	// punches holes for both); the rest of the write is intact.
	for _, r := range []struct{ off, len uint64 }{{8192, 4096}, {16384, 8192}} {
		errno, got := c.do(cmdRead, 0, r.off, uint32(r.len), nil)
		if errno != 0 || !bytes.Equal(got, make([]byte, r.len)) {
			t.Fatalf("read of zeroed range %+v: errno %d, zero %v", r, errno, bytes.Equal(got, make([]byte, r.len)))
		}
	}
	errno, got := c.do(cmdRead, 0, 12288, 4096, nil)
	if errno != 0 || !bytes.Equal(got, data[8192:12288]) {
		t.Fatalf("read between zeroed ranges: errno %d", errno)
	}
	c.send(cmdDisc, 0, 0, 0, nil)
	c.expectClosed()
}

func TestRequestErrors(t *testing.T) {
	const size = 1 << 20
	const maxReq = 64 << 10
	for _, ro := range []bool{false, true} {
		b := newFileBackend(t, size)
		_, path := startServer(t, b, Options{MaxRequestBytes: maxReq, ReadOnly: ro})
		c := dialExport(t, path, "") // the default export
		if got := c.tflags&tflagReadOnly != 0; got != ro {
			t.Fatalf("READ_ONLY flag %v, want %v", got, ro)
		}
		// EPERM comes first on a read-only export; otherwise the range check.
		wr := func(rw, ro uint32) uint32 {
			if c.tflags&tflagReadOnly != 0 {
				return ro
			}
			return rw
		}
		cases := []struct {
			name    string
			typ     uint16
			flags   uint16
			off     uint64
			len     uint32
			payload int
			want    uint32
		}{
			{"read past end", cmdRead, 0, size, 512, 0, errInval},
			{"read across end", cmdRead, 0, size - 512, 1024, 0, errInval},
			{"read offset overflow", cmdRead, 0, ^uint64(0) - 100, 512, 0, errInval},
			{"read too long", cmdRead, 0, 0, maxReq + 1, 0, errInval},
			{"read with DF flag", cmdRead, 1 << 2, 0, 512, 0, errInval},
			{"read with unknown flag", cmdRead, 1 << 9, 0, 512, 0, errInval},
			{"write across end", cmdWrite, 0, size - 512, 1024, 1024, wr(errNoSpc, errPerm)},
			{"write too long is drained", cmdWrite, 0, 0, maxReq + 4096, maxReq + 4096, errInval},
			{"write with NO_HOLE", cmdWrite, cmdFlagNoHole, 0, 512, 512, errInval},
			{"write", cmdWrite, 0, 0, 512, 512, wr(0, errPerm)},
			{"trim past end", cmdTrim, 0, size, 4096, 0, wr(errNoSpc, errPerm)},
			{"write zeroes across end", cmdWriteZeroes, 0, size - 4096, 8192, 0, wr(errNoSpc, errPerm)},
			{"write zeroes with FAST_ZERO", cmdWriteZeroes, 1 << 4, 0, 4096, 0, errInval},
			{"trim", cmdTrim, 0, 0, 4096, 0, wr(0, errPerm)},
			{"write zeroes", cmdWriteZeroes, 0, 0, 4096, 0, wr(0, errPerm)},
			{"flush with offset", cmdFlush, 0, 4096, 0, 0, errInval},
			{"cache (not offered)", 5, 0, 0, 4096, 0, errInval},
			{"block status (not negotiated)", 7, 0, 0, 4096, 0, errInval},
			{"unknown command", 0x7777, 0, 0, 0, 0, errInval},
		}
		for _, tc := range cases {
			t.Run(fmt.Sprintf("ro=%v/%s", ro, tc.name), func(t *testing.T) {
				before := b.mutating()
				errno, _ := c.do(tc.typ, tc.flags, tc.off, tc.len, make([]byte, tc.payload))
				if errno != tc.want {
					t.Fatalf("errno %d, want %d", errno, tc.want)
				}
				if tc.want != 0 && b.mutating() != before {
					t.Fatalf("a refused request reached the backend")
				}
				// The stream is still framed: a good request works.
				if errno, _ := c.do(cmdRead, 0, 0, 512, nil); errno != 0 {
					t.Fatalf("follow-up read: errno %d", errno)
				}
			})
		}
	}
}

func TestBackendErrors(t *testing.T) {
	b := newFileBackend(t, 1<<20)
	_, path := startServer(t, b, Options{})
	c := dialExport(t, path, testExport)
	cases := []struct {
		name string
		err  error
		want uint32
	}{
		{"wrapped ENOSPC", fmt.Errorf("replica r1: %w", syscall.ENOSPC), errNoSpc},
		{"EDQUOT", &os.PathError{Op: "write", Path: "x", Err: syscall.EDQUOT}, errNoSpc},
		{"context canceled", fmt.Errorf("engine: %w", context.Canceled), errIO},
		{"read-only file system", syscall.EROFS, errPerm},
		{"quorum lost", errors.New("engine: quorum lost"), errIO},
		{"EINVAL is not passed on", syscall.EINVAL, errIO},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b.fail.Store(&tc.err)
			defer b.fail.Store(nil)
			for _, typ := range []uint16{cmdRead, cmdWrite, cmdFlush, cmdTrim, cmdWriteZeroes} {
				var length uint32
				var payload []byte
				if typ != cmdFlush {
					length = 4096
				}
				if typ == cmdWrite {
					payload = make([]byte, length)
				}
				errno, data := c.do(typ, 0, 0, length, payload)
				if errno != tc.want {
					t.Errorf("%s: errno %d, want %d", opNames[opOf(typ)], errno, tc.want)
				}
				if len(data) != 0 {
					t.Errorf("%s: an error reply carried %d bytes of data", opNames[opOf(typ)], len(data))
				}
			}
		})
	}
}

func TestProtocolViolationsCloseOnlyThatConnection(t *testing.T) {
	b := newFileBackend(t, 1<<20)
	_, path := startServer(t, b, Options{MaxRequestBytes: 64 << 10})
	good := dialExport(t, path, testExport)

	bad := func(frame []byte, more ...byte) func(t *testing.T, c *testClient) {
		return func(t *testing.T, c *testClient) { c.write(append(frame, more...)) }
	}
	cases := []struct {
		name string
		send func(t *testing.T, c *testClient)
	}{
		{"garbage frame", bad(bytes.Repeat([]byte{0xa5}, requestHeaderLen))},
		{"reply magic instead of request magic", bad(binary.BigEndian.AppendUint32(nil, magicSimpleReply), make([]byte, 24)...)},
		{"truncated header then hang-up", func(t *testing.T, c *testClient) {
			c.write(appendRequestHeader(nil, request{typ: cmdRead, length: 512})[:20])
			if err := c.nc.(*net.UnixConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
		}},
		{"truncated write payload then hang-up", func(t *testing.T, c *testClient) {
			c.write(appendRequestHeader(nil, request{typ: cmdWrite, length: 4096}))
			c.write(make([]byte, 100))
			if err := c.nc.(*net.UnixConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
		}},
		{"write too large to drain", func(t *testing.T, c *testClient) {
			c.write(appendRequestHeader(nil, request{typ: cmdWrite, length: 1 << 30}))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := b.total()
			c := dialExport(t, path, testExport)
			tc.send(t, c)
			c.expectClosed()
			if b.total() != before {
				t.Fatalf("backend called %d times", b.total()-before)
			}
			// The other connection and new ones still work.
			if errno, _ := good.do(cmdRead, 0, 0, 4096, nil); errno != 0 {
				t.Fatalf("other connection: errno %d", errno)
			}
			if errno, _ := dialExport(t, path, testExport).do(cmdRead, 0, 0, 4096, nil); errno != 0 {
				t.Fatalf("new connection: errno %d", errno)
			}
		})
	}
}

func TestHandshake(t *testing.T) {
	const size = 1 << 20
	const maxReq = 1 << 20
	b := newFileBackend(t, size)
	_, path := startServer(t, b, Options{MaxRequestBytes: maxReq})

	start := func(t *testing.T, clientFlags uint32) *testClient {
		c, hflags := dialRaw(t, path)
		if hflags != flagFixedNewstyle|flagNoZeroes {
			t.Fatalf("handshake flags %#x", hflags)
		}
		c.write(binary.BigEndian.AppendUint32(nil, clientFlags))
		return c
	}
	expectReply := func(t *testing.T, c *testClient, code, want uint32) []byte {
		t.Helper()
		typ, data := c.readOptionReply(code)
		if typ != want {
			t.Fatalf("option %d: reply %#x, want %#x", code, typ, want)
		}
		return data
	}

	t.Run("list", func(t *testing.T) {
		c := start(t, flagCFixedNewstyle)
		c.sendOption(optList, nil)
		data := expectReply(t, c, optList, repServer)
		if n := binary.BigEndian.Uint32(data); string(data[4:4+n]) != testExport {
			t.Fatalf("listed %q", data[4:])
		}
		expectReply(t, c, optList, repAck)
		c.sendOption(optList, []byte("x"))
		expectReply(t, c, optList, repErrInvalid)
	})
	t.Run("unsupported options", func(t *testing.T) {
		c := start(t, flagCFixedNewstyle|flagCNoZeroes)
		for _, code := range []uint32{optStructuredRepl, optStartTLS, 9, 10, 11, 0, 4, 12345} {
			c.sendOption(code, []byte("some data"))
			expectReply(t, c, code, repErrUnsup)
		}
		c.sendOption(optAbort, nil)
		expectReply(t, c, optAbort, repAck)
		c.expectClosed()
	})
	t.Run("info then go", func(t *testing.T) {
		c := start(t, flagCFixedNewstyle|flagCNoZeroes)
		c.sendOption(optInfo, goData("no-such-volume"))
		expectReply(t, c, optInfo, repErrUnknown)
		c.sendOption(optInfo, []byte{0, 0, 0, 9, 'x'}) // name longer than the data
		expectReply(t, c, optInfo, repErrInvalid)
		c.sendOption(optInfo, goData(testExport, infoBlockSize, infoName, 2, 77))
		var sawExport, sawBlock, sawName bool
		for done := false; !done; {
			typ, data := c.readOptionReply(optInfo)
			switch {
			case typ == repAck:
				done = true
			case typ != repInfo:
				t.Fatalf("reply %#x", typ)
			case binary.BigEndian.Uint16(data) == infoExport:
				sawExport = true
				if got := binary.BigEndian.Uint64(data[2:]); got != size {
					t.Errorf("size %d", got)
				}
			case binary.BigEndian.Uint16(data) == infoBlockSize:
				sawBlock = true
				mn, pref, mx := binary.BigEndian.Uint32(data[2:]), binary.BigEndian.Uint32(data[6:]), binary.BigEndian.Uint32(data[10:])
				if mn != 1 || pref != 4096 || mx != maxReq {
					t.Errorf("block sizes %d/%d/%d, want 1/4096/%d", mn, pref, mx, maxReq)
				}
			case binary.BigEndian.Uint16(data) == infoName:
				sawName = true
				if string(data[2:]) != testExport {
					t.Errorf("name %q", data[2:])
				}
			}
		}
		if !sawExport || !sawBlock || !sawName {
			t.Fatalf("export %v block size %v name %v", sawExport, sawBlock, sawName)
		}
		// INFO leaves negotiation open; GO with no info requests ends it.
		c.sendOption(optGo, goData(""))
		for {
			if typ, _ := c.readOptionReply(optGo); typ == repAck {
				break
			}
		}
		c.tflags = tflagHasFlags
		if errno, _ := c.do(cmdRead, 0, 0, 512, nil); errno != 0 {
			t.Fatalf("read errno %d", errno)
		}
	})
	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("export name noZeroes=%v", noZeroes), func(t *testing.T) {
			flags := uint32(flagCFixedNewstyle)
			if noZeroes {
				flags |= flagCNoZeroes
			}
			c := start(t, flags)
			c.sendOption(optExportName, []byte(testExport))
			var ending [10]byte
			c.readFull(ending[:])
			if got := binary.BigEndian.Uint64(ending[:]); got != size {
				t.Fatalf("size %d", got)
			}
			if !noZeroes {
				pad := make([]byte, 124)
				c.readFull(pad)
				if !bytes.Equal(pad, make([]byte, 124)) {
					t.Fatalf("padding not zero")
				}
			}
			if errno, _ := c.do(cmdRead, 0, 0, 512, nil); errno != 0 {
				t.Fatalf("read errno %d", errno)
			}
		})
	}
	closes := []struct {
		name string
		send func(c *testClient)
	}{
		{"export name unknown", func(c *testClient) { c.sendOption(optExportName, []byte("other")) }},
		{"option too long", func(c *testClient) {
			h := binary.BigEndian.AppendUint64(nil, magicOption)
			h = binary.BigEndian.AppendUint32(h, optInfo)
			h = binary.BigEndian.AppendUint32(h, maxOptionLen+1)
			c.write(h)
		}},
		{"bad option magic", func(c *testClient) { c.write(bytes.Repeat([]byte{1}, 16)) }},
	}
	for _, tc := range closes {
		t.Run(tc.name, func(t *testing.T) {
			c := start(t, flagCFixedNewstyle)
			tc.send(c)
			c.expectClosed()
		})
	}
	t.Run("unknown client flags", func(t *testing.T) {
		c := start(t, flagCFixedNewstyle|1<<7)
		c.expectClosed()
	})
	if b.mutating()+b.flushes.Load() != 0 {
		t.Fatalf("negotiation changed the backend")
	}
}

// slowBackend holds every call until released and tracks concurrency.
type slowBackend struct {
	*memBackend
	delay          time.Duration
	inFlight, peak atomic.Int64
}

func (b *slowBackend) enter() func() {
	n := b.inFlight.Add(1)
	for {
		p := b.peak.Load()
		if n <= p || b.peak.CompareAndSwap(p, n) {
			break
		}
	}
	// Later requests finish first, so replies go out of order.
	time.Sleep(b.delay * time.Duration(1+rand.IntN(4)))
	return func() { b.inFlight.Add(-1) }
}

func (b *slowBackend) ReadAt(ctx context.Context, p []byte, off uint64) error {
	defer b.enter()()
	return b.memBackend.ReadAt(ctx, p, off)
}

func (b *slowBackend) WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error {
	defer b.enter()()
	return b.memBackend.WriteAt(ctx, p, off, fua)
}

func TestConcurrentRequests(t *testing.T) {
	const maxInFlight = 8
	b := &slowBackend{memBackend: newMemBackend(1 << 20), delay: 2 * time.Millisecond}
	_, path := startServer(t, b, Options{MaxInFlight: maxInFlight})
	c := dialExport(t, path, testExport)

	// Each 4 KiB block gets a distinct pattern; all writes are pipelined,
	// then all reads.
	const n = 64
	blocks := make(map[uint64][]byte)
	for i := range n {
		blocks[uint64(i)] = pattern(4096, uint64(i))
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range n {
			c.send(cmdWrite, 0, uint64(i)*4096, 4096, blocks[uint64(i)])
		}
	})
	outOfOrder := false
	for i := range n {
		h, errno, _ := c.reply(0)
		if errno != 0 {
			t.Fatalf("write handle %d: errno %d", h, errno)
		}
		outOfOrder = outOfOrder || h != uint64(i+1)
	}
	wg.Wait()
	handles := make(map[uint64]uint64) // handle → block
	wg.Go(func() {
		for i := range n {
			handles[c.send(cmdRead, 0, uint64(i)*4096, 4096, nil)] = uint64(i)
		}
	})
	wg.Wait()
	for range n {
		h, errno, data := c.reply(4096)
		if errno != 0 {
			t.Fatalf("read handle %d: errno %d", h, errno)
		}
		blk, ok := handles[h]
		if !ok {
			t.Fatalf("reply for unknown handle %d", h)
		}
		delete(handles, h)
		if !bytes.Equal(data, blocks[blk]) {
			t.Fatalf("block %d read back wrong", blk)
		}
	}
	if p := b.peak.Load(); p > maxInFlight || p < 2 {
		t.Fatalf("peak concurrency %d, want 2..%d", p, maxInFlight)
	}
	if !outOfOrder {
		t.Log("replies happened to come back in order")
	}
}

// blockingBackend blocks reads until their context is cancelled.
type blockingBackend struct {
	*memBackend
	started chan struct{}
}

func (b *blockingBackend) ReadAt(ctx context.Context, p []byte, off uint64) error {
	b.started <- struct{}{}
	<-ctx.Done()
	return ctx.Err()
}

func TestCloseWithClientsConnected(t *testing.T) {
	defer goleak.VerifyNone(t)
	b := &blockingBackend{memBackend: newMemBackend(1 << 20), started: make(chan struct{}, 1)}
	path := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(zaptest.NewLogger(t), testExport, b, Options{})
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()

	idle := dialExport(t, path, testExport) // in transmission, idle
	negotiating, _ := dialRaw(t, path)      // stuck in the handshake
	busy := dialExport(t, path, testExport) // a request in the backend
	busy.send(cmdRead, 0, 0, 4096, nil)
	<-b.started

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	for _, c := range []*testClient{idle, negotiating, busy} {
		c.expectClosed()
	}
	if err := s.Serve(l); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("Serve after Close: %v", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left behind: %v", err)
	}
}

func TestServeReturnsWhenListenerClosed(t *testing.T) {
	defer goleak.VerifyNone(t)
	l, err := ListenUnix(filepath.Join(t.TempDir(), "nbd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	s := NewServer(nil, testExport, newMemBackend(4096), Options{})
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	time.Sleep(10 * time.Millisecond)
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	t.Run("stale socket is replaced", func(t *testing.T) {
		path := filepath.Join(dir, "stale.sock")
		l, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		l.(*net.UnixListener).SetUnlinkOnClose(false)
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		l, err = ListenUnix(path)
		if err != nil {
			t.Fatalf("ListenUnix over a stale socket: %v", err)
		}
		defer func() { _ = l.Close() }()
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Fatalf("mode %v, want 0600", fi.Mode().Perm())
		}
		t.Run("live socket is refused", func(t *testing.T) {
			if l2, err := ListenUnix(path); err == nil {
				_ = l2.Close()
				t.Fatal("ListenUnix took over a live socket")
			}
		})
	})
	t.Run("regular file is refused", func(t *testing.T) {
		path := filepath.Join(dir, "file")
		if err := os.WriteFile(path, []byte("data"), 0o600); err != nil {
			t.Fatal(err)
		}
		if l, err := ListenUnix(path); err == nil {
			_ = l.Close()
			t.Fatal("ListenUnix replaced a regular file")
		}
		if got, err := os.ReadFile(path); err != nil || string(got) != "data" {
			t.Fatalf("file changed: %q %v", got, err)
		}
	})
}

func TestMetrics(t *testing.T) {
	b := newFileBackend(t, 1<<20)
	s, path := startServer(t, b, Options{})
	reg := prometheus.NewPedanticRegistry()
	for _, c := range s.Metrics().Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	// A second export's metrics register beside the first.
	other := NewServer(nil, "vol-2", b, Options{})
	for _, c := range other.Metrics().Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatalf("second server's metrics: %v", err)
		}
	}
	if err := other.Close(); err != nil {
		t.Fatal(err)
	}

	c := dialExport(t, path, testExport)
	c.do(cmdWrite, 0, 0, 4096, make([]byte, 4096))
	c.do(cmdRead, 0, 0, 4096, nil)
	c.do(cmdRead, 0, 1<<20, 4096, nil) // EINVAL
	c.do(cmdFlush, 0, 0, 0, nil)

	got := metricValues(t, reg, testExport)
	want := map[string]float64{
		"cairn_nbd_requests_total/read":           2,
		"cairn_nbd_requests_total/write":          1,
		"cairn_nbd_requests_total/flush":          1,
		"cairn_nbd_errors_total/read":             1,
		"cairn_nbd_errors_total/write":            0,
		"cairn_nbd_request_duration_seconds/read": 2,
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
}

// metricValues gathers reg and returns, for one export, counter values and
// histogram sample counts keyed "name/op".
func metricValues(t *testing.T, reg prometheus.Gatherer, export string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = lp.GetValue()
			}
			if labels["export"] != export {
				continue
			}
			key := mf.GetName() + "/" + labels["op"]
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				got[key] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return got
}

// serverMetrics registers s's metrics in a fresh registry.
func serverMetrics(t *testing.T, s *Server) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	for _, c := range s.Metrics().Collectors() {
		if err := reg.Register(c); err != nil {
			t.Fatal(err)
		}
	}
	return reg
}
