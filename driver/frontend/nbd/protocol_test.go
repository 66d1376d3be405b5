package nbd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"
)

func TestParseRequestHeader(t *testing.T) {
	valid := appendRequestHeader(nil, request{flags: cmdFlagFUA, typ: cmdWrite, handle: 0x0102030405060708, offset: 1 << 40, length: 4096})
	cases := []struct {
		name    string
		in      []byte
		want    request
		wantErr error
	}{
		{"valid", valid, request{flags: cmdFlagFUA, typ: cmdWrite, handle: 0x0102030405060708, offset: 1 << 40, length: 4096}, nil},
		{"short", valid[:27], request{}, errShortFrame},
		{"long", append(append([]byte{}, valid...), 0), request{}, errShortFrame},
		{"empty", nil, request{}, errShortFrame},
		{"bad magic", append([]byte{0x25, 0x60, 0x95, 0x14}, valid[4:]...), request{}, errBadMagic},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseRequestHeader(tc.in)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestCheckRequest(t *testing.T) {
	const size = 1 << 20
	rw := limits{size: size, maxPayload: 64 << 10, maxDrain: 1 << 20}
	ro := rw
	ro.readOnly = true
	cases := []struct {
		name      string
		r         request
		lim       limits
		want      verdict
		wantErrno uint32
	}{
		{"read", request{typ: cmdRead, offset: 0, length: 4096}, rw, serve, 0},
		{"read to the end", request{typ: cmdRead, offset: size - 4096, length: 4096}, rw, serve, 0},
		{"empty read at the end", request{typ: cmdRead, offset: size}, rw, serve, 0},
		{"read past the end", request{typ: cmdRead, offset: size, length: 1}, rw, refuse, errInval},
		{"read offset wraps", request{typ: cmdRead, offset: ^uint64(0), length: 2}, rw, refuse, errInval},
		{"read at max payload", request{typ: cmdRead, length: 64 << 10}, rw, serve, 0},
		{"read above max payload", request{typ: cmdRead, length: 64<<10 + 1}, rw, refuse, errInval},
		{"read with FUA is served", request{typ: cmdRead, flags: cmdFlagFUA, length: 1}, rw, serve, 0},
		{"read with NO_HOLE", request{typ: cmdRead, flags: cmdFlagNoHole, length: 1}, rw, refuse, errInval},
		{"write", request{typ: cmdWrite, flags: cmdFlagFUA, length: 4096}, rw, serve, 0},
		{"write past the end", request{typ: cmdWrite, offset: size - 1, length: 2}, rw, refuse, errNoSpc},
		{"write above max payload is drained", request{typ: cmdWrite, length: 64<<10 + 1}, rw, refuse, errInval},
		{"write above drain limit hangs up", request{typ: cmdWrite, length: 1<<20 + 1}, rw, hangUp, errInval},
		{"write on read-only", request{typ: cmdWrite, length: 4096}, ro, refuse, errPerm},
		{"huge write on read-only hangs up", request{typ: cmdWrite, length: 1 << 31}, ro, hangUp, errInval},
		{"trim larger than max payload", request{typ: cmdTrim, length: 1 << 20}, rw, serve, 0},
		{"trim past the end", request{typ: cmdTrim, offset: 4096, length: size}, rw, refuse, errNoSpc},
		{"trim on read-only", request{typ: cmdTrim, length: 4096}, ro, refuse, errPerm},
		{"write zeroes NO_HOLE FUA", request{typ: cmdWriteZeroes, flags: cmdFlagNoHole | cmdFlagFUA, length: 4096}, rw, serve, 0},
		{"write zeroes FAST_ZERO", request{typ: cmdWriteZeroes, flags: 1 << 4, length: 4096}, rw, refuse, errInval},
		{"write zeroes on read-only", request{typ: cmdWriteZeroes, length: 4096}, ro, refuse, errPerm},
		{"flush", request{typ: cmdFlush}, ro, serve, 0},
		{"flush with length", request{typ: cmdFlush, length: 1}, rw, refuse, errInval},
		{"disc", request{typ: cmdDisc, offset: 7, length: 9}, rw, disconnect, 0},
		{"cache", request{typ: 5, length: 4096}, rw, refuse, errInval},
		{"block status", request{typ: 7, length: 4096}, rw, refuse, errInval},
		{"unknown", request{typ: 0xffff, length: 1 << 31}, rw, refuse, errInval},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v, errno := checkRequest(tc.r, tc.lim)
			if v != tc.want || (v != serve && v != disconnect && errno != tc.wantErrno) {
				t.Fatalf("got verdict %d errno %d, want %d errno %d", v, errno, tc.want, tc.wantErrno)
			}
		})
	}
}

func TestParseInfoRequest(t *testing.T) {
	cases := []struct {
		name    string
		in      []byte
		want    infoRequest
		wantErr bool
	}{
		{"default export, no infos", goData(""), infoRequest{}, false},
		{"name and infos", goData("vol", infoBlockSize, infoName), infoRequest{name: "vol", infos: []uint16{infoBlockSize, infoName}}, false},
		{"empty", nil, infoRequest{}, true},
		{"name length beyond data", []byte{0, 0, 1, 0, 'a', 0, 0}, infoRequest{}, true},
		{"missing count", []byte{0, 0, 0, 1, 'a'}, infoRequest{}, true},
		{"count beyond data", append(goData("a"), 0, 3)[:9], infoRequest{}, true},
		{"trailing bytes", append(goData("a"), 9), infoRequest{}, true},
		{"name too long", goData(string(bytes.Repeat([]byte{'n'}, maxNameLen+1))), infoRequest{}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseInfoRequest(tc.in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("error %v, want error %v", err, tc.wantErr)
			}
			if got.name != tc.want.name || len(got.infos) != len(tc.want.infos) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
			for i := range got.infos {
				if got.infos[i] != tc.want.infos[i] {
					t.Fatalf("got %+v, want %+v", got, tc.want)
				}
			}
		})
	}
}

// replyTypes splits a run of option replies into their types.
func replyTypes(t *testing.T, b []byte) []uint32 {
	t.Helper()
	var types []uint32
	for len(b) > 0 {
		if len(b) < 20 || binary.BigEndian.Uint64(b) != magicOptionReply {
			t.Fatalf("malformed option reply % x", b)
		}
		n := binary.BigEndian.Uint32(b[16:])
		types = append(types, binary.BigEndian.Uint32(b[12:]))
		b = b[20+n:]
	}
	return types
}

func TestNegotiateOption(t *testing.T) {
	exp := exportInfo{name: "vol", size: 1 << 30, tflags: tflagHasFlags, maxBlock: 1 << 20}
	cases := []struct {
		name  string
		code  uint32
		data  []byte
		types []uint32 // nil: the reply is not option replies
		next  phase
	}{
		{"go", optGo, goData("vol"), []uint32{repInfo, repInfo, repAck}, transmission},
		{"go default export with name info", optGo, goData("", infoName), []uint32{repInfo, repInfo, repInfo, repAck}, transmission},
		{"go unknown export", optGo, goData("other"), []uint32{repErrUnknown}, negotiating},
		{"go malformed", optGo, []byte{1}, []uint32{repErrInvalid}, negotiating},
		{"info", optInfo, goData("vol", infoBlockSize), []uint32{repInfo, repInfo, repAck}, negotiating},
		{"list", optList, nil, []uint32{repServer, repAck}, negotiating},
		{"abort", optAbort, nil, []uint32{repAck}, closeSession},
		{"structured reply", optStructuredRepl, nil, []uint32{repErrUnsup}, negotiating},
		{"starttls", optStartTLS, nil, []uint32{repErrUnsup}, negotiating},
		{"unknown", 0xdead, []byte("x"), []uint32{repErrUnsup}, negotiating},
		{"export name unknown", optExportName, []byte("other"), nil, closeSession},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := negotiateOption(exp, true, tc.code, tc.data)
			if res.next != tc.next {
				t.Fatalf("next %d, want %d", res.next, tc.next)
			}
			if tc.types == nil {
				if len(res.reply) != 0 {
					t.Fatalf("unexpected reply % x", res.reply)
				}
				return
			}
			got := replyTypes(t, res.reply)
			if len(got) != len(tc.types) {
				t.Fatalf("reply types %#x, want %#x", got, tc.types)
			}
			for i := range got {
				if got[i] != tc.types[i] {
					t.Fatalf("reply types %#x, want %#x", got, tc.types)
				}
			}
		})
	}
	t.Run("export name ending", func(t *testing.T) {
		for _, noZeroes := range []bool{false, true} {
			res := negotiateOption(exp, noZeroes, optExportName, []byte("vol"))
			want := 10
			if !noZeroes {
				want += 124
			}
			if res.next != transmission || len(res.reply) != want || binary.BigEndian.Uint64(res.reply) != exp.size {
				t.Fatalf("noZeroes=%v: next %d, reply % x", noZeroes, res.next, res.reply)
			}
		}
	})
}

func TestBuffers(t *testing.T) {
	for _, n := range []uint32{0, 1, 2, 3, 512, 4095, 4096, 4097, 1 << 20, 32 << 20} {
		p := getBuffer(n)
		if len(*p) != replyHeaderLen+int(n) || cap(*p)-replyHeaderLen < int(n) {
			t.Fatalf("getBuffer(%d): len %d cap %d", n, len(*p), cap(*p))
		}
		putBuffer(p)
		q := getBuffer(n)
		if len(*q) != replyHeaderLen+int(n) {
			t.Fatalf("reused getBuffer(%d): len %d", n, len(*q))
		}
		putBuffer(q)
	}
}

func TestOptionsDefaults(t *testing.T) {
	cases := []struct {
		in, want Options
	}{
		{Options{}, Options{MaxRequestBytes: 32 << 20, MaxInFlight: 64}},
		{Options{MaxRequestBytes: 1, MaxInFlight: -1}, Options{MaxRequestBytes: 4096, MaxInFlight: 64}},
		{Options{MaxRequestBytes: 1 << 31, MaxInFlight: 3, ReadOnly: true}, Options{MaxRequestBytes: 1 << 30, MaxInFlight: 3, ReadOnly: true}},
	}
	for _, tc := range cases {
		if got := tc.in.withDefaults(); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%+v.withDefaults() = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}
