package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire constants of the NBD protocol (the "fixed newstyle" handshake and the
// simple-reply transmission phase). All integers are big-endian on the wire.
const (
	magicInit        = 0x4e42444d41474943 // "NBDMAGIC"
	magicOption      = 0x49484156454f5054 // "IHAVEOPT", sent by the server and in front of every option
	magicOptionReply = 0x0003e889045565a9
	magicRequest     = 0x25609513
	magicSimpleReply = 0x67446698

	// Handshake flags (server, 16 bits) and client flags (32 bits).
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1

	// Transmission flags (16 bits).
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8

	// Options.
	optExportName     = 1
	optAbort          = 2
	optList           = 3
	optStartTLS       = 5
	optInfo           = 6
	optGo             = 7
	optStructuredRepl = 8

	// Option reply types.
	repAck           = 1
	repServer        = 2
	repInfo          = 3
	repErrUnsup      = 1<<31 + 1
	repErrInvalid    = 1<<31 + 3
	repErrUnknown    = 1<<31 + 6
	repErrShutdown   = 1<<31 + 7
	infoExport       = 0
	infoName         = 1
	infoBlockSize    = 3
	preferredBlockSz = 4096

	// Commands.
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	// Command flags.
	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1

	// Error values of the simple reply. The protocol fixes these numbers; they
	// happen to equal Linux errno values.
	errPerm  = 1
	errIO    = 5
	errInval = 22
	errNoSpc = 28

	requestHeaderLen = 28
	replyHeaderLen   = 16
	optionHeaderLen  = 16

	// maxOptionLen bounds the data of one handshake option. Nothing we accept
	// needs more than an export name (at most 4096 bytes) and a few info
	// requests; a longer option is hostile and closes the connection.
	maxOptionLen = 64 << 10
	// maxNameLen is the protocol's bound on strings such as export names.
	maxNameLen = 4096
)

// errBadMagic and errShortFrame are protocol violations after which the
// connection is closed: the stream can no longer be trusted to be framed.
var (
	errBadMagic   = errors.New("nbd: bad magic")
	errShortFrame = errors.New("nbd: short frame")
)

// request is one transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

// parseRequestHeader decodes a request header. It checks only the framing
// (size and magic); what the request asks for is judged by checkRequest.
func parseRequestHeader(b []byte) (request, error) {
	if len(b) != requestHeaderLen {
		return request{}, errShortFrame
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return request{}, fmt.Errorf("%w: request magic %#x", errBadMagic, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		handle: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// appendRequestHeader encodes r; it is the inverse of parseRequestHeader and
// is used by tests and fuzzing.
func appendRequestHeader(dst []byte, r request) []byte {
	dst = binary.BigEndian.AppendUint32(dst, magicRequest)
	dst = binary.BigEndian.AppendUint16(dst, r.flags)
	dst = binary.BigEndian.AppendUint16(dst, r.typ)
	dst = binary.BigEndian.AppendUint64(dst, r.handle)
	dst = binary.BigEndian.AppendUint64(dst, r.offset)
	return binary.BigEndian.AppendUint32(dst, r.length)
}

// putReplyHeader writes a simple reply header into b[:replyHeaderLen].
func putReplyHeader(b []byte, errno uint32, handle uint64) {
	_ = b[replyHeaderLen-1]
	binary.BigEndian.PutUint32(b[0:4], magicSimpleReply)
	binary.BigEndian.PutUint32(b[4:8], errno)
	binary.BigEndian.PutUint64(b[8:16], handle)
}

// verdict is what the server does with a request after checkRequest.
type verdict uint8

const (
	// serve: hand the request to the backend.
	serve verdict = iota
	// refuse: reply with the error without touching the backend. A WRITE's
	// payload is read and discarded first, so the stream stays framed.
	refuse
	// disconnect: the client asked to end the session (NBD_CMD_DISC).
	disconnect
	// hangUp: the request cannot be answered without losing framing (a WRITE
	// payload too large to drain); close the connection.
	hangUp
)

// limits are the facts checkRequest judges a request against.
type limits struct {
	size       uint64 // export size in bytes, as told to the client
	readOnly   bool
	maxPayload uint32 // largest READ or WRITE length served
	maxDrain   uint32 // largest WRITE payload read and discarded when refused; >= maxPayload
}

// allowedFlags lists the command flags each command accepts. FUA is valid on
// every command once NBD_FLAG_SEND_FUA is advertised (the server may ignore
// it where nothing is written); NO_HOLE only on WRITE_ZEROES. Any other bit
// is EINVAL, as the protocol asks.
var allowedFlags = [...]uint16{
	cmdRead:        cmdFlagFUA,
	cmdWrite:       cmdFlagFUA,
	cmdFlush:       cmdFlagFUA,
	cmdTrim:        cmdFlagFUA,
	cmdWriteZeroes: cmdFlagFUA | cmdFlagNoHole,
}

// checkRequest decides whether r is served, refused with an error value, ends
// the session, or forces a hang-up. It is pure so that it can be fuzzed.
//
// Length limits apply to READ and WRITE only: those carry a payload that the
// server buffers. TRIM and WRITE_ZEROES may cover up to 4 GiB in one request
// (the kernel sends discards that large).
func checkRequest(r request, lim limits) (verdict, uint32) {
	switch r.typ {
	case cmdDisc:
		return disconnect, 0
	case cmdRead, cmdWrite, cmdFlush, cmdTrim, cmdWriteZeroes:
	default:
		// Unknown commands carry no payload we could know of.
		return refuse, errInval
	}
	refuseWith := func(errno uint32) (verdict, uint32) {
		if r.typ == cmdWrite && r.length > lim.maxDrain {
			return hangUp, errno
		}
		return refuse, errno
	}
	if r.flags&^allowedFlags[r.typ] != 0 {
		return refuseWith(errInval)
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > lim.maxPayload {
		return refuseWith(errInval)
	}
	if r.typ == cmdFlush {
		if r.offset != 0 || r.length != 0 {
			return refuse, errInval
		}
		return serve, 0
	}
	writes := r.typ != cmdRead
	if writes && lim.readOnly {
		return refuseWith(errPerm)
	}
	if r.offset > lim.size || uint64(r.length) > lim.size-r.offset {
		if writes {
			return refuseWith(errNoSpc)
		}
		return refuse, errInval
	}
	return serve, 0
}

// optionHeader is the fixed part of a handshake option sent by the client.
type optionHeader struct {
	code   uint32
	length uint32
}

// parseOptionHeader decodes an option header: magic, option code and data
// length. A length above maxOptionLen is an error (the connection closes).
func parseOptionHeader(b []byte) (optionHeader, error) {
	if len(b) != optionHeaderLen {
		return optionHeader{}, errShortFrame
	}
	if m := binary.BigEndian.Uint64(b[0:8]); m != magicOption {
		return optionHeader{}, fmt.Errorf("%w: option magic %#x", errBadMagic, m)
	}
	h := optionHeader{
		code:   binary.BigEndian.Uint32(b[8:12]),
		length: binary.BigEndian.Uint32(b[12:16]),
	}
	if h.length > maxOptionLen {
		return optionHeader{}, fmt.Errorf("nbd: option %d data of %d bytes exceeds %d", h.code, h.length, maxOptionLen)
	}
	return h, nil
}

// infoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// errInvalidOption marks option data that does not parse; the option gets
// NBD_REP_ERR_INVALID and negotiation goes on.
var errInvalidOption = errors.New("nbd: invalid option data")

// parseInfoRequest decodes NBD_OPT_INFO / NBD_OPT_GO data: a 32-bit name
// length, the name, a 16-bit count and that many 16-bit info types.
func parseInfoRequest(data []byte) (infoRequest, error) {
	if len(data) < 4 {
		return infoRequest{}, errInvalidOption
	}
	n := binary.BigEndian.Uint32(data[0:4])
	rest := data[4:]
	if n > maxNameLen || uint64(n) > uint64(len(rest)) {
		return infoRequest{}, errInvalidOption
	}
	req := infoRequest{name: string(rest[:n])}
	rest = rest[n:]
	if len(rest) < 2 {
		return infoRequest{}, errInvalidOption
	}
	count := int(binary.BigEndian.Uint16(rest[0:2]))
	rest = rest[2:]
	if len(rest) != 2*count {
		return infoRequest{}, errInvalidOption
	}
	if count > 0 {
		req.infos = make([]uint16, count)
		for i := range req.infos {
			req.infos[i] = binary.BigEndian.Uint16(rest[2*i:])
		}
	}
	return req, nil
}

// appendOptionReply appends one option reply to dst.
func appendOptionReply(dst []byte, code, typ uint32, data []byte) []byte {
	dst = binary.BigEndian.AppendUint64(dst, magicOptionReply)
	dst = binary.BigEndian.AppendUint32(dst, code)
	dst = binary.BigEndian.AppendUint32(dst, typ)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(data)))
	return append(dst, data...)
}
