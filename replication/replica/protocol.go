package replica

import (
	"encoding/binary"
	"fmt"
	"io"
)

// The replica protocol: frames over one TCP connection, all integers
// big-endian. The client sends request frames, the server answers each with
// one reply frame carrying the request's handle. Requests are pipelined and
// replies may come back in any order.
//
// Request frame: a fixed 40-byte header, then PayloadLen bytes of payload.
//
//	 0  magic        u32  RequestMagic
//	 4  op           u8
//	 5  flags        u8   FlagFUA, FlagRebuild, FlagScrub, FlagGeneration,
//	                      FlagSums; other bits must be 0
//	 6  reserved     u16  must be 0
//	 8  handle       u64  chosen by the client, echoed in the reply
//	16  epoch        u64
//	24  offset       u64
//	32  length       u32
//	36  payload len  u32  at most MaxPayload
//
// Reply frame: a fixed 24-byte header, then PayloadLen bytes of payload. For
// an error status the payload is a UTF-8 message.
//
//	 0  magic        u32  ReplyMagic
//	 4  status       u32  Status
//	 8  handle       u64
//	16  payload len  u32  at most MaxPayload
//	20  reserved     u32  0
//
// What each op does with the fields (fields not named must be 0):
//
//	op            epoch  offset          length            payload    reply payload
//	OPEN          -      expected size   -                 replica id Info
//	                     (0: any)
//	CLAIM         new    -               -                 -          -
//	READ          yes    byte offset     bytes             -          the data
//	WRITE         yes    byte offset     bytes             the data   -
//	                                                       [+ sums]
//	FLUSH         yes    -               -                 -          -
//	TRIM          yes    byte offset     bytes             -          -
//	WRITE_ZEROES  yes    byte offset     bytes             -          -
//	CHECKSUMS     yes    first extent    extent count      -          count × u32 CRC32C
//	READ_EXTENT   yes    extent index    -                 -          the extent's bytes
//	DIRTY         -      first extent    max entries       -          u64 extent indexes
//	                                     (0: all that fit)
//	MARK_CLEAN    yes    generation      -                 -          -
//	INFO          -      -               -                 -          Info (with its
//	                                                                  generation if
//	                                                                  FlagGeneration)
//	PING          -      -               -                 -          -
//	REHASH        yes    first extent    extent count      -          -
//	GROW          yes    new size        -                 -          -
//	SNAPSHOT      yes    -               -                 snapshot   -
//	                                                       id
//	DELETE_SNAP   yes    -               -                 snapshot   -
//	                                                       id
//	READ_SNAP     yes    byte offset     bytes             snapshot   the data
//	                                                       id
//	PREPARE_SNAP  yes    -               -                 -          -
//	LAYERS        yes    -               -                 -          layer list
//	LAYER_SUMS    yes    first extent    extent count      snapshot   count × u32
//	                                                       id
//	LAYER_READ    yes    extent index    -                 snapshot   layer extent
//	                                                       id
//	LAYER_BEGIN   yes    position        -                 snapshot   -
//	                                                       id
//	LAYER_WRITE   yes    extent index    encoding length   u8 id len, -
//	                                                       id, layer
//	                                                       extent
//	LAYER_SEAL    yes    -               -                 snapshot   -
//	                                                       id
//	LAYER_DROP    yes    -               -                 snapshot   -
//	                                                       id
//
// A WRITE with FlagPair writes two ranges as one request: after the first
// range's data (Length bytes at Offset) come the second range's offset (u64)
// and length (u32) and its data, then, with FlagSums, the piece checksums of
// the first range and of the second. The replica verifies both before it
// writes either, and a sender whose request did not arrive whole has written
// neither: an encrypted volume's block and its entry never part that way
// (docs/encryption.md). A server older than the flag answers BadRequest.
//
// A WRITE with FlagSums carries, after its data, the CRC32C (Castagnoli) of
// each SumBlockSize-aligned piece of the data (SumPieces of them, u32 each,
// computed by the sender over the bytes it sent); the replica verifies them
// before it writes anything and answers Checksum on a mismatch. A server
// older than the flag answers BadRequest and the client sends the write
// again without it. REHASH recomputes the stored block checksums of the
// extents from their data (resync after an unclean stop). GROW makes the
// replica the new size, durably (online expansion; a size already reached
// is a success that changes nothing, and nothing ever shrinks). SNAPSHOT
// seals the replica's contents as a snapshot (docs/snapshots.md),
// DELETE_SNAP removes one (it runs until the snapshot's unique data has
// moved), READ_SNAP reads one, PREPARE_SNAP makes the files of the next
// snapshot's head ahead of it (so that SNAPSHOT, which the engine sends
// with writes held, has less to do). A server older than any of these ops
// answers BadRequest.
//
// The LAYER ops carry a replica's chain of sealed layers to a replica being
// rebuilt (carry.go has the encodings): LAYERS lists the sealed layers
// (per layer u8 flags, 1 = being deleted, u8 id length, id), LAYER_SUMS
// gives a checksum per extent of one (of the layer under construction with
// FlagLayerBuild; with FlagLayerFlat, of the layer that flattening the
// chain up to it would make), LAYER_READ one extent of it (held and zero
// bitmaps, block sums, data; FlagLayerFlat likewise), LAYER_BEGIN starts building a layer at a position
// below the head, LAYER_WRITE sets one extent of it, LAYER_SEAL publishes
// it (the chain record is the commit point) and LAYER_DROP takes a sealed
// layer out without merging it.
//
// A connection must send OPEN (once) before anything but PING. FUA is allowed
// on WRITE, TRIM and WRITE_ZEROES: the replica syncs before replying.
//
// FlagRebuild or FlagScrub (at most one of them) says which I/O class of the
// node's disk scheduler a data operation (READ, WRITE, FLUSH, TRIM,
// WRITE_ZEROES, CHECKSUMS, READ_EXTENT) belongs to; neither means foreground,
// so a client that never sets them is served as before this flag existed.
// The other ops do no scheduled disk I/O and take neither.
//
// FlagGeneration, allowed on INFO only, asks for the replica's generation
// after the Info (see AppendInfoGeneration). Without it the reply is the
// Info a server sent before generations existed, which a client that
// predates them requires to the byte. A new client that meets an older
// server gets BadRequest (the flag is not allowed there), asks again
// without it and takes the generation as unknown ("").
//
// A header with a bad magic, a non-zero reserved field or a payload longer
// than MaxPayload breaks the framing: the server answers BadRequest (handle 0
// if the magic is bad) and closes the connection. Any other invalid request
// gets a BadRequest reply and the connection goes on.
const (
	RequestMagic     uint32 = 0xCA1B0001
	ReplyMagic       uint32 = 0xCA1B8001
	RequestHeaderLen        = 40
	ReplyHeaderLen          = 24
	// MaxPayload bounds the payload of any frame, and so one READ or WRITE.
	MaxPayload = 32 << 20
	// FlagFUA asks for the data to be on stable storage before the reply.
	FlagFUA uint8 = 1
	// FlagRebuild marks rebuild traffic: the server admits it in the disk
	// scheduler's Rebuild class, behind foreground I/O.
	FlagRebuild uint8 = 1 << 1
	// FlagScrub marks scrub (verification) traffic: the Scrub class, the
	// least urgent.
	FlagScrub uint8 = 1 << 2
	// FlagGeneration asks INFO to carry the replica's generation.
	FlagGeneration uint8 = 1 << 3

	// FlagSums on WRITE: the payload ends with the data's piece checksums.
	FlagSums uint8 = 1 << 4
	// FlagPair on WRITE: a second range follows the data, written with it
	// as one request (an encrypted volume's blocks and their entries; see
	// "A WRITE with FlagPair" below).
	FlagPair uint8 = 1 << 7
	// FlagLayerBuild on LAYER_SUMS: the sums of the layer under
	// construction with that id, not of the sealed one.
	FlagLayerBuild uint8 = 1 << 5
	// FlagLayerFlat on LAYER_SUMS and LAYER_READ: the layer that
	// flattening the layers up to the one with that id would make (a
	// bottom holding every block as that layer shows it), not the layer.
	FlagLayerFlat uint8 = 1 << 6

	// flagsClass are the class bits; setting both is invalid.
	flagsClass = FlagRebuild | FlagScrub
)

// Op is a request's operation. Values are part of the wire protocol: never
// renumber, never reuse.
type Op uint8

// Operations.
const (
	OpOpen           Op = 1
	OpClaim          Op = 2
	OpRead           Op = 3
	OpWrite          Op = 4
	OpFlush          Op = 5
	OpTrim           Op = 6
	OpWriteZeroes    Op = 7
	OpChecksums      Op = 8
	OpReadExtent     Op = 9
	OpDirty          Op = 10
	OpMarkClean      Op = 11
	OpInfo           Op = 12
	OpPing           Op = 13
	OpRehash         Op = 14
	OpGrow           Op = 15
	OpSnapshot       Op = 16
	OpDeleteSnapshot Op = 17
	OpReadSnapshot   Op = 18
	OpPrepareSnap    Op = 19
	OpLayers         Op = 20
	OpLayerSums      Op = 21
	OpLayerRead      Op = 22
	OpLayerBegin     Op = 23
	OpLayerWrite     Op = 24
	OpLayerSeal      Op = 25
	OpLayerDrop      Op = 26
	opLimit             = 27 // one past the highest op
)

// opSpec says which header fields an op uses; unused fields must be 0.
type opSpec struct {
	name      string
	epoch     bool
	offset    bool
	length    bool
	maxLength uint32 // when length is used; 0: no limit beyond the u32
	flags     uint8  // flags allowed
	payload   payloadRule
}

type payloadRule uint8

const (
	payloadNone        payloadRule = iota
	payloadIsData                  // payload length == length field
	payloadIsOpenID                // 1..MaxIDLen bytes of replica id
	payloadIsSnapID                // 1..MaxSnapshotIDLen bytes of snapshot id
	payloadIsLayerData             // u8 n, n (1..MaxSnapshotIDLen) bytes of snapshot id, length bytes
)

// MaxSnapshotIDLen bounds a snapshot id on the wire (the replica checks its
// characters).
const MaxSnapshotIDLen = 128

// opSpecs is the table ValidateRequest checks requests against.
var opSpecs = [opLimit]opSpec{
	OpOpen:           {name: "open", offset: true, payload: payloadIsOpenID},
	OpClaim:          {name: "claim", epoch: true},
	OpRead:           {name: "read", epoch: true, offset: true, length: true, maxLength: MaxPayload, flags: flagsClass},
	OpWrite:          {name: "write", epoch: true, offset: true, length: true, maxLength: MaxPayload, flags: FlagFUA | flagsClass | FlagSums | FlagPair, payload: payloadIsData},
	OpFlush:          {name: "flush", epoch: true, flags: flagsClass},
	OpTrim:           {name: "trim", epoch: true, offset: true, length: true, flags: FlagFUA | flagsClass},
	OpWriteZeroes:    {name: "write_zeroes", epoch: true, offset: true, length: true, flags: FlagFUA | flagsClass},
	OpChecksums:      {name: "checksums", epoch: true, offset: true, length: true, maxLength: MaxChecksumsPerRequest, flags: flagsClass},
	OpReadExtent:     {name: "read_extent", epoch: true, offset: true, flags: flagsClass},
	OpDirty:          {name: "dirty", offset: true, length: true, maxLength: MaxDirtyPerReply},
	OpMarkClean:      {name: "mark_clean", epoch: true, offset: true},
	OpInfo:           {name: "info", flags: FlagGeneration},
	OpPing:           {name: "ping"},
	OpRehash:         {name: "rehash", epoch: true, offset: true, length: true, flags: flagsClass},
	OpGrow:           {name: "grow", epoch: true, offset: true},
	OpSnapshot:       {name: "snapshot", epoch: true, payload: payloadIsSnapID},
	OpDeleteSnapshot: {name: "delete_snapshot", epoch: true, payload: payloadIsSnapID},
	OpReadSnapshot:   {name: "read_snapshot", epoch: true, offset: true, length: true, maxLength: MaxPayload, payload: payloadIsSnapID},
	OpPrepareSnap:    {name: "prepare_snapshot", epoch: true},
	OpLayers:         {name: "layers", epoch: true},
	OpLayerSums:      {name: "layer_sums", epoch: true, offset: true, length: true, maxLength: MaxChecksumsPerRequest, flags: flagsClass | FlagLayerBuild | FlagLayerFlat, payload: payloadIsSnapID},
	OpLayerRead:      {name: "layer_read", epoch: true, offset: true, flags: flagsClass | FlagLayerFlat, payload: payloadIsSnapID},
	OpLayerBegin:     {name: "layer_begin", epoch: true, offset: true, payload: payloadIsSnapID},
	OpLayerWrite:     {name: "layer_write", epoch: true, offset: true, length: true, maxLength: MaxPayload - 1 - MaxSnapshotIDLen, flags: flagsClass, payload: payloadIsLayerData},
	OpLayerSeal:      {name: "layer_seal", epoch: true, payload: payloadIsSnapID},
	OpLayerDrop:      {name: "layer_drop", epoch: true, payload: payloadIsSnapID},
}

// Limits that keep a reply within MaxPayload.
const (
	MaxChecksumsPerRequest = MaxPayload / 4
	MaxDirtyPerReply       = MaxPayload / 8
)

func (o Op) String() string {
	if o < opLimit && opSpecs[o].name != "" {
		return opSpecs[o].name
	}
	return fmt.Sprintf("op_%d", uint8(o))
}

// RequestHeader is a decoded request header.
type RequestHeader struct {
	Op         Op
	Flags      uint8
	Handle     uint64
	Epoch      uint64
	Offset     uint64
	Length     uint32
	PayloadLen uint32
}

// Request is a request header with its payload.
type Request struct {
	RequestHeader
	Payload []byte
}

// ReplyHeader is a decoded reply header.
type ReplyHeader struct {
	Status     Status
	Handle     uint64
	PayloadLen uint32
}

// AppendRequestHeader appends the 40-byte encoding of h to dst.
func AppendRequestHeader(dst []byte, h RequestHeader) []byte {
	dst = binary.BigEndian.AppendUint32(dst, RequestMagic)
	dst = append(dst, byte(h.Op), h.Flags, 0, 0)
	dst = binary.BigEndian.AppendUint64(dst, h.Handle)
	dst = binary.BigEndian.AppendUint64(dst, h.Epoch)
	dst = binary.BigEndian.AppendUint64(dst, h.Offset)
	dst = binary.BigEndian.AppendUint32(dst, h.Length)
	return binary.BigEndian.AppendUint32(dst, h.PayloadLen)
}

// DecodeRequestHeader decodes the first RequestHeaderLen bytes of b. It
// checks only what the framing depends on — magic, reserved field, payload
// length — and every error it returns wraps ErrProtocol: the stream cannot be
// trusted after it. When the magic is right the returned header is filled in
// even on error, so the server can answer with the request's handle.
func DecodeRequestHeader(b []byte) (RequestHeader, error) {
	if len(b) < RequestHeaderLen {
		return RequestHeader{}, fmt.Errorf("%w: request header is %d bytes, want %d", ErrProtocol, len(b), RequestHeaderLen)
	}
	if m := binary.BigEndian.Uint32(b); m != RequestMagic {
		return RequestHeader{}, fmt.Errorf("%w: bad request magic %#08x", ErrProtocol, m)
	}
	h := RequestHeader{
		Op:         Op(b[4]),
		Flags:      b[5],
		Handle:     binary.BigEndian.Uint64(b[8:]),
		Epoch:      binary.BigEndian.Uint64(b[16:]),
		Offset:     binary.BigEndian.Uint64(b[24:]),
		Length:     binary.BigEndian.Uint32(b[32:]),
		PayloadLen: binary.BigEndian.Uint32(b[36:]),
	}
	if r := binary.BigEndian.Uint16(b[6:]); r != 0 {
		return h, fmt.Errorf("%w: reserved header field is %#04x, want 0", ErrProtocol, r)
	}
	if h.PayloadLen > MaxPayload {
		return h, fmt.Errorf("%w: payload of %d bytes exceeds the %d-byte maximum", ErrProtocol, h.PayloadLen, MaxPayload)
	}
	return h, nil
}

// ValidateRequest checks a header against its op's rules (opSpecs). Errors
// wrap ErrInvalidArgument; the connection can go on after one.
func ValidateRequest(h RequestHeader) error {
	if h.Op == 0 || h.Op >= opLimit {
		return fmt.Errorf("%w: unknown op %d", ErrInvalidArgument, uint8(h.Op))
	}
	spec := opSpecs[h.Op]
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrInvalidArgument, spec.name, fmt.Sprintf(format, args...))
	}
	switch {
	case h.Flags&^spec.flags != 0:
		return bad("flags %#02x not allowed", h.Flags)
	case h.Flags&flagsClass == flagsClass:
		return bad("flags %#02x name two classes", h.Flags)
	case h.Flags&(FlagLayerBuild|FlagLayerFlat) == FlagLayerBuild|FlagLayerFlat:
		return bad("flags %#02x ask for a layer being built and a flattened one", h.Flags)
	case !spec.epoch && h.Epoch != 0:
		return bad("epoch must be 0")
	case !spec.offset && h.Offset != 0:
		return bad("offset must be 0")
	case !spec.length && h.Length != 0:
		return bad("length must be 0")
	case spec.maxLength != 0 && h.Length > spec.maxLength:
		return bad("length %d exceeds %d", h.Length, spec.maxLength)
	}
	switch spec.payload {
	case payloadNone:
		if h.PayloadLen != 0 {
			return bad("takes no payload, got %d bytes", h.PayloadLen)
		}
	case payloadIsData:
		want := uint64(h.Length)
		if h.Flags&FlagPair != 0 {
			// The second range's size is in the payload (DecodePair).
			if uint64(h.PayloadLen) < want+pairHeaderLen {
				return bad("payload of %d bytes, too short for %d bytes and a second range", h.PayloadLen, want)
			}
			break
		}
		if h.Flags&FlagSums != 0 {
			want += 4 * SumPieces(h.Offset, uint64(h.Length))
		}
		if uint64(h.PayloadLen) != want {
			return bad("payload of %d bytes, length field and flags say %d", h.PayloadLen, want)
		}
	case payloadIsOpenID:
		if h.PayloadLen == 0 || h.PayloadLen > MaxIDLen {
			return bad("replica id of %d bytes, want 1-%d", h.PayloadLen, MaxIDLen)
		}
	case payloadIsSnapID:
		if h.PayloadLen == 0 || h.PayloadLen > MaxSnapshotIDLen {
			return bad("snapshot id of %d bytes, want 1-%d", h.PayloadLen, MaxSnapshotIDLen)
		}
	case payloadIsLayerData:
		if uint64(h.PayloadLen) < uint64(h.Length)+2 || uint64(h.PayloadLen)-uint64(h.Length) > 1+MaxSnapshotIDLen {
			return bad("payload of %d bytes for %d bytes of layer data and a snapshot id", h.PayloadLen, h.Length)
		}
	}
	return nil
}

// AppendRequest appends the encoding of req to dst; req.PayloadLen is taken
// from len(req.Payload).
func AppendRequest(dst []byte, req Request) []byte {
	req.PayloadLen = uint32(len(req.Payload))
	return append(AppendRequestHeader(dst, req.RequestHeader), req.Payload...)
}

// DecodeRequest decodes one whole request frame from the front of b and
// returns it with the number of bytes it took. The payload aliases b. Framing
// errors wrap ErrProtocol; a b that ends inside the frame gives
// io.ErrUnexpectedEOF. It does not call ValidateRequest.
func DecodeRequest(b []byte) (Request, int, error) {
	if len(b) < RequestHeaderLen {
		if len(b) >= 4 && binary.BigEndian.Uint32(b) != RequestMagic {
			return Request{}, 0, fmt.Errorf("%w: bad request magic %#08x", ErrProtocol, binary.BigEndian.Uint32(b))
		}
		return Request{}, 0, io.ErrUnexpectedEOF
	}
	h, err := DecodeRequestHeader(b)
	if err != nil {
		return Request{}, 0, err
	}
	end := RequestHeaderLen + int(h.PayloadLen)
	if len(b) < end {
		return Request{}, 0, io.ErrUnexpectedEOF
	}
	return Request{RequestHeader: h, Payload: b[RequestHeaderLen:end:end]}, end, nil
}

// AppendReplyHeader appends the 24-byte encoding of h to dst.
func AppendReplyHeader(dst []byte, h ReplyHeader) []byte {
	dst = binary.BigEndian.AppendUint32(dst, ReplyMagic)
	dst = binary.BigEndian.AppendUint32(dst, uint32(h.Status))
	dst = binary.BigEndian.AppendUint64(dst, h.Handle)
	dst = binary.BigEndian.AppendUint32(dst, h.PayloadLen)
	return binary.BigEndian.AppendUint32(dst, 0)
}

// DecodeReplyHeader decodes the first ReplyHeaderLen bytes of b. Errors wrap
// ErrProtocol.
func DecodeReplyHeader(b []byte) (ReplyHeader, error) {
	if len(b) < ReplyHeaderLen {
		return ReplyHeader{}, fmt.Errorf("%w: reply header is %d bytes, want %d", ErrProtocol, len(b), ReplyHeaderLen)
	}
	if m := binary.BigEndian.Uint32(b); m != ReplyMagic {
		return ReplyHeader{}, fmt.Errorf("%w: bad reply magic %#08x", ErrProtocol, m)
	}
	h := ReplyHeader{
		Status:     Status(binary.BigEndian.Uint32(b[4:])),
		Handle:     binary.BigEndian.Uint64(b[8:]),
		PayloadLen: binary.BigEndian.Uint32(b[16:]),
	}
	if r := binary.BigEndian.Uint32(b[20:]); r != 0 {
		return h, fmt.Errorf("%w: reserved reply field is %#08x, want 0", ErrProtocol, r)
	}
	if h.PayloadLen > MaxPayload {
		return h, fmt.Errorf("%w: reply payload of %d bytes exceeds the %d-byte maximum", ErrProtocol, h.PayloadLen, MaxPayload)
	}
	return h, nil
}

// infoFixedLen is the encoded Info without its id.
const infoFixedLen = 7*8 + 2

// AppendInfo appends the wire encoding of an Info: size, extent size, epoch,
// clean epoch, clean generation, dirty extents, allocated bytes (u64 each),
// then the id (u16 length, bytes). The generation is left out: this is the
// reply to OPEN, and to INFO without FlagGeneration.
func AppendInfo(dst []byte, in Info) []byte {
	for _, v := range [...]uint64{in.Size, in.ExtentSize, in.Epoch, in.CleanEpoch, in.CleanGeneration, in.DirtyExtents, in.AllocatedBytes} {
		dst = binary.BigEndian.AppendUint64(dst, v)
	}
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(in.ID)))
	return append(dst, in.ID...)
}

// AppendInfoGeneration appends what AppendInfo does, then the generation
// (u8 length, bytes; at most MaxGenerationLen): the reply to INFO with
// FlagGeneration.
func AppendInfoGeneration(dst []byte, in Info) []byte {
	dst = AppendInfo(dst, in)
	g := in.Generation[:min(len(in.Generation), MaxGenerationLen)]
	dst = append(dst, byte(len(g)))
	return append(dst, g...)
}

// DecodeInfo decodes an Info encoded by AppendInfo (its Generation is then
// "") or AppendInfoGeneration. Errors wrap ErrProtocol.
func DecodeInfo(b []byte) (Info, error) {
	if len(b) < infoFixedLen {
		return Info{}, fmt.Errorf("%w: info of %d bytes, want at least %d", ErrProtocol, len(b), infoFixedLen)
	}
	var v [7]uint64
	for i := range v {
		v[i] = binary.BigEndian.Uint64(b[8*i:])
	}
	idLen := int(binary.BigEndian.Uint16(b[56:]))
	if len(b) < infoFixedLen+idLen {
		return Info{}, fmt.Errorf("%w: info of %d bytes, its id length says %d", ErrProtocol, len(b), infoFixedLen+idLen)
	}
	in := Info{
		ID: string(b[infoFixedLen : infoFixedLen+idLen]), Size: v[0], ExtentSize: v[1], Epoch: v[2],
		CleanEpoch: v[3], CleanGeneration: v[4], DirtyExtents: v[5], AllocatedBytes: v[6],
	}
	rest := b[infoFixedLen+idLen:]
	if len(rest) == 0 {
		return in, nil
	}
	if genLen := int(rest[0]); len(rest) != 1+genLen || genLen > MaxGenerationLen {
		return Info{}, fmt.Errorf("%w: info with %d bytes after its id, its generation length says %d", ErrProtocol, len(rest), 1+genLen)
	}
	in.Generation = string(rest[1:])
	return in, nil
}

// AppendUint32s appends each value as a big-endian u32 (the CHECKSUMS reply).
func AppendUint32s(dst []byte, vs []uint32) []byte {
	for _, v := range vs {
		dst = binary.BigEndian.AppendUint32(dst, v)
	}
	return dst
}

// DecodeUint32s decodes a list of big-endian u32. Errors wrap ErrProtocol.
func DecodeUint32s(b []byte) ([]uint32, error) {
	if len(b)%4 != 0 {
		return nil, fmt.Errorf("%w: u32 list of %d bytes", ErrProtocol, len(b))
	}
	vs := make([]uint32, len(b)/4)
	for i := range vs {
		vs[i] = binary.BigEndian.Uint32(b[4*i:])
	}
	return vs, nil
}

// AppendUint64s appends each value as a big-endian u64 (the DIRTY reply).
func AppendUint64s(dst []byte, vs []uint64) []byte {
	for _, v := range vs {
		dst = binary.BigEndian.AppendUint64(dst, v)
	}
	return dst
}

// DecodeUint64s decodes a list of big-endian u64. Errors wrap ErrProtocol.
func DecodeUint64s(b []byte) ([]uint64, error) {
	if len(b)%8 != 0 {
		return nil, fmt.Errorf("%w: u64 list of %d bytes", ErrProtocol, len(b))
	}
	vs := make([]uint64, len(b)/8)
	for i := range vs {
		vs[i] = binary.BigEndian.Uint64(b[8*i:])
	}
	return vs, nil
}

// pairHeaderLen is the second range's offset and length in a WRITE with
// FlagPair.
const pairHeaderLen = 12

// Pair is the second range of a WRITE with FlagPair, with the piece
// checksums of both ranges when the request has FlagSums.
type Pair struct {
	Off          uint64
	Data         []byte
	FirstPieces  []uint32
	SecondPieces []uint32
}

// AppendPair appends the part of a FlagPair WRITE's payload that follows
// the first range's data.
func AppendPair(dst []byte, p Pair) []byte {
	dst = binary.BigEndian.AppendUint64(dst, p.Off)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(p.Data)))
	dst = append(dst, p.Data...)
	if p.FirstPieces != nil {
		dst = AppendUint32s(dst, p.FirstPieces)
		dst = AppendUint32s(dst, p.SecondPieces)
	}
	return dst
}

// DecodePair reads what follows a FlagPair WRITE's first range (h's) from
// rest, checking every length against the header and flags.
func DecodePair(h RequestHeader, rest []byte) (Pair, error) {
	if len(rest) < pairHeaderLen {
		return Pair{}, fmt.Errorf("%w: write pair: %d bytes after the data", ErrProtocol, len(rest))
	}
	p := Pair{Off: binary.BigEndian.Uint64(rest)}
	n := uint64(binary.BigEndian.Uint32(rest[8:]))
	rest = rest[pairHeaderLen:]
	if n == 0 || n > uint64(len(rest)) {
		return Pair{}, fmt.Errorf("%w: write pair: second range of %d bytes, %d left", ErrProtocol, n, len(rest))
	}
	p.Data, rest = rest[:n], rest[n:]
	var sums uint64
	if h.Flags&FlagSums != 0 {
		sums = SumPieces(h.Offset, uint64(h.Length)) + SumPieces(p.Off, n)
	}
	if uint64(len(rest)) != 4*sums {
		return Pair{}, fmt.Errorf("%w: write pair: %d bytes of checksums, want %d", ErrProtocol, len(rest), 4*sums)
	}
	if sums > 0 {
		all, err := DecodeUint32s(rest)
		if err != nil {
			return Pair{}, err
		}
		k := SumPieces(h.Offset, uint64(h.Length))
		p.FirstPieces, p.SecondPieces = all[:k], all[k:]
	}
	return p, nil
}
