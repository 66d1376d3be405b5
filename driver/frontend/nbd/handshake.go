package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// exportInfo is what the handshake tells a client about the export.
type exportInfo struct {
	name     string
	size     uint64
	tflags   uint16
	maxBlock uint32
}

// matches reports whether a client asking for name gets this export. The
// empty name is the default export.
func (e exportInfo) matches(name string) bool {
	return name == "" || name == e.name
}

// phase is where negotiation goes after an option.
type phase uint8

const (
	negotiating  phase = iota // wait for the next option
	transmission              // the export is chosen: serve requests
	closeSession              // send the reply (if any), then close
)

// optionResult is the server's answer to one option: the bytes to send and
// what happens next.
type optionResult struct {
	reply []byte
	next  phase
}

// negotiateOption answers one option of the fixed newstyle handshake. It does
// no I/O, so the whole negotiation can be tested and fuzzed without a socket.
//
// We offer one export, simple replies only, and no TLS: structured replies,
// STARTTLS, meta contexts and anything unknown get NBD_REP_ERR_UNSUP, which
// well-behaved clients (libnbd, qemu, nbd-client) treat as "not available".
func negotiateOption(exp exportInfo, noZeroes bool, code uint32, data []byte) optionResult {
	switch code {
	case optExportName:
		// The legacy ending: no error can be returned, so an unknown export
		// closes the session, as the protocol asks.
		if !exp.matches(string(data)) {
			return optionResult{next: closeSession}
		}
		b := make([]byte, 0, 10+124)
		b = binary.BigEndian.AppendUint64(b, exp.size)
		b = binary.BigEndian.AppendUint16(b, exp.tflags)
		if !noZeroes {
			b = append(b, make([]byte, 124)...)
		}
		return optionResult{reply: b, next: transmission}

	case optAbort:
		return optionResult{reply: appendOptionReply(nil, code, repAck, nil), next: closeSession}

	case optList:
		if len(data) != 0 {
			return optionResult{reply: appendOptionReply(nil, code, repErrInvalid, nil)}
		}
		entry := binary.BigEndian.AppendUint32(nil, uint32(len(exp.name)))
		entry = append(entry, exp.name...)
		b := appendOptionReply(nil, code, repServer, entry)
		return optionResult{reply: appendOptionReply(b, code, repAck, nil)}

	case optInfo, optGo:
		req, err := parseInfoRequest(data)
		if err != nil {
			return optionResult{reply: appendOptionReply(nil, code, repErrInvalid, nil)}
		}
		if !exp.matches(req.name) {
			return optionResult{reply: appendOptionReply(nil, code, repErrUnknown, []byte("no such export"))}
		}
		var b []byte
		// NBD_INFO_EXPORT is always sent; block sizes too, whether asked for
		// or not (clients must ignore info they did not request).
		info := binary.BigEndian.AppendUint16(nil, infoExport)
		info = binary.BigEndian.AppendUint64(info, exp.size)
		info = binary.BigEndian.AppendUint16(info, exp.tflags)
		b = appendOptionReply(b, code, repInfo, info)
		info = binary.BigEndian.AppendUint16(info[:0], infoBlockSize)
		info = binary.BigEndian.AppendUint32(info, 1)
		info = binary.BigEndian.AppendUint32(info, preferredBlockSz)
		info = binary.BigEndian.AppendUint32(info, exp.maxBlock)
		b = appendOptionReply(b, code, repInfo, info)
		for _, t := range req.infos {
			if t == infoName {
				info = binary.BigEndian.AppendUint16(info[:0], infoName)
				info = append(info, exp.name...)
				b = appendOptionReply(b, code, repInfo, info)
				break
			}
		}
		b = appendOptionReply(b, code, repAck, nil)
		if code == optGo {
			return optionResult{reply: b, next: transmission}
		}
		return optionResult{reply: b}

	default:
		// NBD_OPT_STRUCTURED_REPLY, NBD_OPT_STARTTLS, meta contexts,
		// extended headers and options we have never heard of.
		return optionResult{reply: appendOptionReply(nil, code, repErrUnsup, nil)}
	}
}

// maxOptions bounds the options one client may send before choosing an
// export; a client that keeps negotiating is treated as hostile.
const maxOptions = 256

// errAborted is a session the client ended during negotiation.
var errAborted = errors.New("nbd: client ended negotiation")

// handshake runs the fixed newstyle negotiation on rw. It returns nil when the
// client has chosen the export and transmission starts; otherwise the error
// says why the session ends (errAborted for a soft disconnect, io.EOF when
// the client left).
func handshake(rw io.ReadWriter, exp exportInfo) error {
	greeting := make([]byte, 0, 18)
	greeting = binary.BigEndian.AppendUint64(greeting, magicInit)
	greeting = binary.BigEndian.AppendUint64(greeting, magicOption)
	greeting = binary.BigEndian.AppendUint16(greeting, flagFixedNewstyle|flagNoZeroes)
	if _, err := rw.Write(greeting); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(rw, cf[:]); err != nil {
		return err
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return fmt.Errorf("nbd: unknown client flags %#x", clientFlags)
	}
	// A client that did not set NBD_FLAG_C_FIXED_NEWSTYLE still gets fixed
	// newstyle replies, which the protocol allows.
	noZeroes := clientFlags&flagCNoZeroes != 0

	var hdr [optionHeaderLen]byte
	var data []byte
	for range maxOptions {
		if _, err := io.ReadFull(rw, hdr[:]); err != nil {
			return err
		}
		h, err := parseOptionHeader(hdr[:])
		if err != nil {
			return err
		}
		if cap(data) < int(h.length) {
			data = make([]byte, h.length)
		}
		data = data[:h.length]
		if _, err := io.ReadFull(rw, data); err != nil {
			return err
		}
		res := negotiateOption(exp, noZeroes, h.code, data)
		if len(res.reply) > 0 {
			if _, err := rw.Write(res.reply); err != nil {
				return err
			}
		}
		switch res.next {
		case transmission:
			return nil
		case closeSession:
			if h.code == optAbort {
				return errAborted
			}
			return fmt.Errorf("nbd: client asked for unknown export %q", truncate(data, 64))
		}
	}
	return fmt.Errorf("nbd: more than %d options without choosing an export", maxOptions)
}

// truncate returns at most n bytes of b as a string, for log messages.
func truncate(b []byte, n int) string {
	if len(b) > n {
		b = b[:n]
	}
	return string(b)
}
