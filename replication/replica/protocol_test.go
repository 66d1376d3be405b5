package replica

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"testing"

	"github.com/cairn-csi/cairn/iosched"
)

func TestRequestHeaderRoundTrip(t *testing.T) {
	for _, h := range []RequestHeader{
		{Op: OpOpen, Handle: 1, Offset: 1 << 30, PayloadLen: 3},
		{Op: OpWrite, Flags: FlagFUA, Handle: 1<<64 - 1, Epoch: 1<<64 - 2, Offset: 1<<64 - 3, Length: 4096, PayloadLen: 4096},
		{Op: OpChecksums, Handle: 42, Epoch: 7, Offset: 9, Length: 100},
		{Op: OpWrite, Flags: FlagFUA | FlagRebuild, Handle: 43, Epoch: 7, Offset: 4096, Length: 512, PayloadLen: 512},
		{Op: OpReadExtent, Flags: FlagScrub, Handle: 44, Epoch: 7, Offset: 3},
		{Op: Op(200), Flags: 0x80, Length: 1<<32 - 1},
	} {
		b := AppendRequestHeader(nil, h)
		if len(b) != RequestHeaderLen {
			t.Fatalf("encoded header is %d bytes", len(b))
		}
		if binary.BigEndian.Uint32(b) != RequestMagic {
			t.Fatalf("magic %x", b[:4])
		}
		got, err := DecodeRequestHeader(b)
		if err != nil {
			t.Fatalf("%+v: %v", h, err)
		}
		if got != h {
			t.Fatalf("decoded %+v, want %+v", got, h)
		}
	}
}

func TestDecodeRequestHeaderErrors(t *testing.T) {
	valid := AppendRequestHeader(nil, RequestHeader{Op: OpPing, Handle: 77})
	edit := func(f func(b []byte)) []byte { b := slices.Clone(valid); f(b); return b }
	for _, tc := range []struct {
		name       string
		b          []byte
		wantHandle uint64
	}{
		{"short", valid[:39], 0},
		{"bad magic", edit(func(b []byte) { b[0] = 0 }), 0},
		{"reply magic", edit(func(b []byte) { binary.BigEndian.PutUint32(b, ReplyMagic) }), 0},
		{"reserved", edit(func(b []byte) { b[7] = 1 }), 77},
		{"payload too large", edit(func(b []byte) { binary.BigEndian.PutUint32(b[36:], MaxPayload+1) }), 77},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := DecodeRequestHeader(tc.b)
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("got %v, want ErrProtocol", err)
			}
			if h.Handle != tc.wantHandle {
				t.Errorf("handle %d, want %d", h.Handle, tc.wantHandle)
			}
		})
	}
	// Exactly MaxPayload is fine.
	b := edit(func(b []byte) { binary.BigEndian.PutUint32(b[36:], MaxPayload) })
	if _, err := DecodeRequestHeader(b); err != nil {
		t.Fatal(err)
	}
}

func TestValidateRequest(t *testing.T) {
	ok := []RequestHeader{
		{Op: OpOpen, Offset: 4096, PayloadLen: 2},
		{Op: OpOpen, PayloadLen: MaxIDLen},
		{Op: OpClaim, Epoch: 3},
		{Op: OpRead, Epoch: 1, Offset: 5, Length: MaxPayload},
		{Op: OpRead, Epoch: 1},
		{Op: OpWrite, Epoch: 1, Length: 10, PayloadLen: 10, Flags: FlagFUA},
		{Op: OpFlush, Epoch: 1},
		{Op: OpTrim, Epoch: 1, Offset: 1, Length: 1<<32 - 1},
		{Op: OpWriteZeroes, Epoch: 1, Offset: 1, Length: 5, Flags: FlagFUA},
		{Op: OpChecksums, Epoch: 1, Offset: 3, Length: MaxChecksumsPerRequest},
		{Op: OpReadExtent, Epoch: 1, Offset: 3},
		{Op: OpDirty, Offset: 3, Length: 10},
		{Op: OpMarkClean, Epoch: 1, Offset: 3},
		{Op: OpInfo},
		{Op: OpInfo, Flags: FlagGeneration},
		{Op: OpPing, Handle: 5},
		{Op: OpRead, Epoch: 1, Length: 8, Flags: FlagRebuild},
		{Op: OpWrite, Epoch: 1, Length: 1, PayloadLen: 1, Flags: FlagFUA | FlagScrub},
		{Op: OpFlush, Epoch: 1, Flags: FlagRebuild},
		{Op: OpTrim, Epoch: 1, Length: 1, Flags: FlagScrub},
		{Op: OpWriteZeroes, Epoch: 1, Length: 1, Flags: FlagFUA | FlagRebuild},
		{Op: OpChecksums, Epoch: 1, Length: 1, Flags: FlagRebuild},
		{Op: OpReadExtent, Epoch: 1, Flags: FlagScrub},
	}
	for _, h := range ok {
		if err := ValidateRequest(h); err != nil {
			t.Errorf("%+v: %v", h, err)
		}
	}
	bad := map[string]RequestHeader{
		"op 0":                 {Op: 0},
		"unknown op":           {Op: opLimit},
		"open without id":      {Op: OpOpen},
		"open id too long":     {Op: OpOpen, PayloadLen: MaxIDLen + 1},
		"open with epoch":      {Op: OpOpen, Epoch: 1, PayloadLen: 2},
		"claim with payload":   {Op: OpClaim, Epoch: 1, PayloadLen: 1},
		"claim with offset":    {Op: OpClaim, Epoch: 1, Offset: 1},
		"read too long":        {Op: OpRead, Length: MaxPayload + 1},
		"read with FUA":        {Op: OpRead, Flags: FlagFUA, Length: 1},
		"write short payload":  {Op: OpWrite, Length: 10, PayloadLen: 9},
		"write unknown flag":   {Op: OpWrite, Flags: 0x10, Length: 1, PayloadLen: 1},
		"write + generation":   {Op: OpWrite, Flags: FlagGeneration, Length: 1, PayloadLen: 1},
		"open + generation":    {Op: OpOpen, PayloadLen: 1, Flags: FlagGeneration},
		"info with a class":    {Op: OpInfo, Flags: FlagRebuild},
		"two classes":          {Op: OpRead, Flags: FlagRebuild | FlagScrub, Length: 1},
		"claim with a class":   {Op: OpClaim, Epoch: 1, Flags: FlagRebuild},
		"open with a class":    {Op: OpOpen, PayloadLen: 1, Flags: FlagScrub},
		"ping with a class":    {Op: OpPing, Flags: FlagRebuild},
		"mark clean + class":   {Op: OpMarkClean, Epoch: 1, Flags: FlagRebuild},
		"flush with length":    {Op: OpFlush, Length: 1},
		"checksums too many":   {Op: OpChecksums, Length: MaxChecksumsPerRequest + 1},
		"read extent + length": {Op: OpReadExtent, Length: 1},
		"dirty with epoch":     {Op: OpDirty, Epoch: 1},
		"info with offset":     {Op: OpInfo, Offset: 1},
		"ping with payload":    {Op: OpPing, PayloadLen: 4},
	}
	for name, h := range bad {
		t.Run(name, func(t *testing.T) {
			if err := ValidateRequest(h); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("got %v, want ErrInvalidArgument", err)
			}
		})
	}
}

// TestClassFlags: each class has its own flag, the flags map back to their
// class, and exactly the ops the disk scheduler runs take them.
func TestClassFlags(t *testing.T) {
	for _, c := range []iosched.Class{iosched.Foreground, iosched.Rebuild, iosched.Scrub} {
		f := classFlag(c)
		if got := classOfFlags(f | FlagFUA); got != c {
			t.Errorf("class %v → flag %#02x → class %v", c, f, got)
		}
		if (f == 0) != (c == iosched.Foreground) {
			t.Errorf("class %v has flag %#02x", c, f)
		}
	}
	if FlagRebuild&FlagFUA != 0 || FlagScrub&FlagFUA != 0 || FlagRebuild == FlagScrub {
		t.Fatal("class flags overlap")
	}
	for op := Op(1); op < opLimit; op++ {
		_, _, ok := schedOp(op, 1, 4096)
		if ok != scheduled(op) {
			t.Errorf("%v: scheduled %v, but schedOp says %v", op, scheduled(op), ok)
		}
	}
}

func TestDecodeRequest(t *testing.T) {
	req := Request{RequestHeader: RequestHeader{Op: OpWrite, Handle: 9, Epoch: 2, Offset: 512, Length: 5}, Payload: []byte("hello")}
	frame := AppendRequest(nil, req)
	stream := append(slices.Clone(frame), AppendRequest(nil, Request{RequestHeader: RequestHeader{Op: OpPing, Handle: 10}})...)
	got, n, err := DecodeRequest(stream)
	if err != nil {
		t.Fatal(err)
	}
	if n != len(frame) || got.Handle != 9 || got.PayloadLen != 5 || string(got.Payload) != "hello" {
		t.Fatalf("decoded %+v (%d bytes)", got, n)
	}
	got, n2, err := DecodeRequest(stream[n:])
	if err != nil || got.Op != OpPing || n2 != RequestHeaderLen {
		t.Fatalf("second frame: %+v, %d, %v", got, n2, err)
	}
	for cut := 0; cut < len(frame); cut++ {
		if _, _, err := DecodeRequest(frame[:cut]); !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("frame cut at %d: got %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
	if _, _, err := DecodeRequest([]byte("GET / HTTP/1.1\r\n")); !errors.Is(err, ErrProtocol) {
		t.Fatalf("HTTP request: got %v, want ErrProtocol", err)
	}
}

func TestReplyHeader(t *testing.T) {
	h := ReplyHeader{Status: StatusFenced, Handle: 1<<63 + 5, PayloadLen: 17}
	b := AppendReplyHeader(nil, h)
	if len(b) != ReplyHeaderLen {
		t.Fatalf("encoded reply header is %d bytes", len(b))
	}
	got, err := DecodeReplyHeader(b)
	if err != nil || got != h {
		t.Fatalf("decoded %+v, %v; want %+v", got, err, h)
	}
	for name, bad := range map[string][]byte{
		"short":     b[:23],
		"magic":     append([]byte{0, 0, 0, 0}, b[4:]...),
		"reserved":  append(slices.Clone(b[:20]), 0, 0, 0, 1),
		"too large": binary.BigEndian.AppendUint32(append(slices.Clone(b[:16]), 0xFF, 0xFF, 0xFF, 0xFF), 0),
	} {
		if _, err := DecodeReplyHeader(bad); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v, want ErrProtocol", name, err)
		}
	}
}

func TestPayloadCodecs(t *testing.T) {
	in := Info{ID: "pvc-123.r0", Size: 1 << 40, ExtentSize: 4 << 20, Epoch: 9, CleanEpoch: 8, CleanGeneration: 77, DirtyExtents: 3, AllocatedBytes: 12345}
	b := AppendInfo(nil, in)
	got, err := DecodeInfo(b)
	if err != nil || got != in {
		t.Fatalf("DecodeInfo = %+v, %v; want %+v", got, err, in)
	}
	for n := 0; n < len(b); n++ {
		if _, err := DecodeInfo(b[:n]); !errors.Is(err, ErrProtocol) {
			t.Fatalf("info cut at %d: got %v", n, err)
		}
	}
	sums := []uint32{0, 1, 0xDEADBEEF}
	if got, err := DecodeUint32s(AppendUint32s(nil, sums)); err != nil || !slices.Equal(got, sums) {
		t.Fatalf("u32 list: %v, %v", got, err)
	}
	exts := []uint64{0, 3, 1<<64 - 1}
	if got, err := DecodeUint64s(AppendUint64s(nil, exts)); err != nil || !slices.Equal(got, exts) {
		t.Fatalf("u64 list: %v, %v", got, err)
	}
	if _, err := DecodeUint32s(make([]byte, 5)); !errors.Is(err, ErrProtocol) {
		t.Error("u32 list of 5 bytes accepted")
	}
	if _, err := DecodeUint64s(make([]byte, 12)); !errors.Is(err, ErrProtocol) {
		t.Error("u64 list of 12 bytes accepted")
	}
}

func TestStatusMapping(t *testing.T) {
	for _, s := range []error{ErrFenced, ErrNotClaimed, ErrOutOfRange, ErrNotFound, ErrInvalidArgument} {
		st := statusOf(s)
		if err := (&RemoteError{Status: st, Message: "x"}); !errors.Is(err, s) {
			t.Errorf("%v → %v does not map back", s, st)
		}
	}
	if st := statusOf(ErrCorrupt); st != StatusIOError {
		t.Errorf("ErrCorrupt → %v, want io_error", st)
	}
	if !errors.Is(&RemoteError{Status: StatusIOError}, ErrIO) || !errors.Is(&RemoteError{Status: 99}, ErrIO) {
		t.Error("io error status does not map to ErrIO")
	}
}

// FuzzDecodeRequest feeds arbitrary bytes to the frame decoder: it never
// panics, and whatever it accepts re-encodes to exactly the bytes it took.
func FuzzDecodeRequest(f *testing.F) {
	f.Add(AppendRequest(nil, Request{RequestHeader: RequestHeader{Op: OpOpen, Handle: 1, Offset: 65536}, Payload: []byte("r")}))
	f.Add(AppendRequest(nil, Request{RequestHeader: RequestHeader{Op: OpWrite, Flags: FlagFUA, Handle: 2, Epoch: 1, Length: 4}, Payload: []byte("data")}))
	f.Add(AppendRequestHeader(nil, RequestHeader{Op: OpChecksums, Handle: 3, Epoch: 1, Length: 4}))
	f.Add(AppendRequest(nil, Request{RequestHeader: RequestHeader{Op: OpWrite, Flags: FlagFUA | FlagRebuild, Handle: 4, Epoch: 1, Length: 4}, Payload: []byte("data")}))
	f.Add(AppendRequestHeader(nil, RequestHeader{Op: OpInfo, Flags: FlagGeneration, Handle: 5}))
	f.Add([]byte{0xCA, 0x1B, 0x00, 0x01})
	f.Add([]byte("not a frame"))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, n, err := DecodeRequest(b)
		if err != nil {
			if !errors.Is(err, ErrProtocol) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("error %v is neither ErrProtocol nor io.ErrUnexpectedEOF", err)
			}
			return
		}
		if n < RequestHeaderLen || n > len(b) || n != RequestHeaderLen+int(req.PayloadLen) || len(req.Payload) != int(req.PayloadLen) {
			t.Fatalf("decoded %d of %d bytes, payload %d/%d", n, len(b), len(req.Payload), req.PayloadLen)
		}
		if !bytes.Equal(AppendRequest(nil, req), b[:n]) {
			t.Fatalf("re-encoding differs from the input")
		}
		if err := ValidateRequest(req.RequestHeader); err != nil && !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("ValidateRequest error %v is not ErrInvalidArgument", err)
		}
		h, err := DecodeRequestHeader(b)
		if err != nil || h != req.RequestHeader {
			t.Fatalf("DecodeRequestHeader disagrees: %+v, %v", h, err)
		}
		// The payload decoders must not panic on anything either.
		_, _ = DecodeInfo(req.Payload)
		_, _ = DecodeUint32s(req.Payload)
		_, _ = DecodeUint64s(req.Payload)
	})
}
