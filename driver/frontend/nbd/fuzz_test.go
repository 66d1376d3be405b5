package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// FuzzRequestHeader feeds arbitrary bytes to the request parser and checks
// that whatever checkRequest lets through is safe to hand to a backend.
func FuzzRequestHeader(f *testing.F) {
	f.Add(appendRequestHeader(nil, request{typ: cmdRead, handle: 1, offset: 4096, length: 4096}), uint64(1<<20), false)
	f.Add(appendRequestHeader(nil, request{typ: cmdWrite, flags: cmdFlagFUA, offset: 1<<20 - 1, length: 2}), uint64(1<<20), true)
	f.Add([]byte("not a request header at all!"), uint64(0), false)
	f.Fuzz(func(t *testing.T, data []byte, size uint64, readOnly bool) {
		r, err := parseRequestHeader(data)
		if err != nil {
			if len(data) == requestHeaderLen && binary.BigEndian.Uint32(data) == magicRequest {
				t.Fatalf("well-formed header refused: %v", err)
			}
			return
		}
		if !bytes.Equal(appendRequestHeader(nil, r), data) {
			t.Fatalf("header does not round-trip: % x → %+v", data, r)
		}
		lim := limits{size: size, readOnly: readOnly, maxPayload: 64 << 10, maxDrain: 1 << 20}
		v, errno := checkRequest(r, lim)
		switch v {
		case serve:
			if errno != 0 {
				t.Fatalf("served with errno %d", errno)
			}
			if r.flags&^allowedFlags[r.typ] != 0 {
				t.Fatalf("served with flags %#x", r.flags)
			}
			if r.typ == cmdFlush {
				return
			}
			if r.offset > size || uint64(r.length) > size-r.offset {
				t.Fatalf("served out of range: %+v size %d", r, size)
			}
			if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > lim.maxPayload {
				t.Fatalf("served oversized payload: %+v", r)
			}
			if readOnly && r.typ != cmdRead {
				t.Fatalf("served a write on a read-only export: %+v", r)
			}
		case refuse:
			if errno == 0 {
				t.Fatal("refused without an error")
			}
			if r.typ == cmdWrite && r.length > lim.maxDrain {
				t.Fatalf("would drain %d bytes", r.length)
			}
		case hangUp:
			if r.typ != cmdWrite || r.length <= lim.maxDrain {
				t.Fatalf("hang-up for %+v", r)
			}
		case disconnect:
			if r.typ != cmdDisc {
				t.Fatalf("disconnect for %+v", r)
			}
		}
	})
}

// FuzzHandshake plays arbitrary client bytes at a server over a pipe. The
// server must not panic or hang, must only make in-range backend calls, and
// must not touch the backend at all unless the bytes contain a request magic
// (no request can be served without one).
func FuzzHandshake(f *testing.F) {
	f.Add(fuzzSession(true))
	f.Add(fuzzSession(false))
	f.Add([]byte{0, 0, 0, 3, 'I', 'H', 'A', 'V', 'E', 'O', 'P', 'T', 0, 0, 0, 3, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		b := playSession(t, data)
		if p := b.bad.Load(); p != nil {
			t.Fatalf("backend misuse: %s", *p)
		}
		var magic [4]byte
		binary.BigEndian.PutUint32(magic[:], magicRequest)
		if !bytes.Contains(data, magic[:]) && b.total() != 0 {
			t.Fatalf("backend called %d times without any request magic in the input", b.total())
		}
		if b.mutating() == 0 && !bytes.Equal(b.data, make([]byte, len(b.data))) {
			t.Fatal("content changed without a write, trim or write-zeroes call")
		}
	})
}

// playSession sends data as the whole client side of a connection to a
// server over a pipe, reading and discarding replies, and returns the
// backend once the server has finished the session.
func playSession(t *testing.T, data []byte) *memBackend {
	b := newMemBackend(64 << 10)
	s := NewServer(nil, "fuzz", b, Options{MaxRequestBytes: 4096, MaxInFlight: 4})
	srv, cli := net.Pipe()
	c := s.newConn(srv)
	served := make(chan struct{})
	go func() {
		defer close(served)
		defer s.wg.Done()
		c.serve()
	}()
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		_, _ = io.Copy(io.Discard, cli) // replies; ends when cli closes
	}()
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		_, _ = cli.Write(data) // fails once the server hangs up, which is fine
		_ = cli.Close()        // the server sees EOF after data
	}()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		_ = cli.Close()
		t.Fatal("server did not finish the session (or stopped reading without hanging up)")
	}
	<-sent
	<-drained
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFuzzSessionIsServed(t *testing.T) {
	for _, useGo := range []bool{true, false} {
		b := playSession(t, fuzzSession(useGo))
		if p := b.bad.Load(); p != nil {
			t.Fatal(*p)
		}
		got := [5]int64{b.reads.Load(), b.writes.Load(), b.trims.Load(), b.zeroes.Load(), b.flushes.Load()}
		if got != [5]int64{1, 1, 1, 1, 1} {
			t.Fatalf("useGo=%v: reads, writes, trims, zeroes, flushes = %v, want one each", useGo, got)
		}
		if !bytes.Equal(b.data[512:528], bytes.Repeat([]byte{0xab}, 16)) {
			t.Fatalf("useGo=%v: write not applied", useGo)
		}
	}
}

// fuzzSession is a well-formed client session: negotiation (NBD_OPT_GO, or
// the legacy NBD_OPT_EXPORT_NAME), then one of each command and NBD_CMD_DISC.
func fuzzSession(useGo bool) []byte {
	b := binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes)
	opt := func(code uint32, data []byte) {
		b = binary.BigEndian.AppendUint64(b, magicOption)
		b = binary.BigEndian.AppendUint32(b, code)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		b = append(b, data...)
	}
	opt(optStructuredRepl, nil)
	if useGo {
		opt(optGo, goData("fuzz", infoBlockSize))
	} else {
		opt(optExportName, []byte("fuzz"))
	}
	req := func(typ, flags uint16, off uint64, length uint32, payload []byte) {
		b = appendRequestHeader(b, request{typ: typ, flags: flags, handle: uint64(len(b)), offset: off, length: length})
		b = append(b, payload...)
	}
	req(cmdWrite, cmdFlagFUA, 512, 16, bytes.Repeat([]byte{0xab}, 16))
	req(cmdRead, 0, 0, 1024, nil)
	req(cmdTrim, 0, 4096, 4096, nil)
	req(cmdWriteZeroes, cmdFlagNoHole, 8192, 4096, nil)
	req(cmdFlush, 0, 0, 0, nil)
	req(cmdDisc, 0, 0, 0, nil)
	return b
}
