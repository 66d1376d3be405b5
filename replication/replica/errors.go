// Package replica is the replica side of Cairn's data path: the on-disk
// storage of one replica (a sparse data file and a small metadata file holding
// the highest accepted epoch and the dirty-extent map), the framed binary
// protocol spoken between an engine and a replica server, the server that
// hosts every replica of a node, and the pipelined client the engine uses.
//
// Invariant: a replica never changes its data or metadata on behalf of a
// request whose epoch is lower than the highest epoch it has accepted, and
// once Claim(e) has returned no request with an epoch lower than e is running.
package replica

import (
	"errors"
	"fmt"
)

// Sentinel errors. Callers match them with errors.Is, on both sides of the
// wire: the server turns them into a status code and the client turns the
// status code back into the same sentinel (see statusOf and errorOf).
var (
	// ErrFenced: the request carries an epoch lower than the one the replica
	// holds; a newer engine owns the replica.
	ErrFenced = errors.New("fenced: epoch lower than the replica's")
	// ErrNotClaimed: the request carries an epoch higher than the one the
	// replica holds; the engine must Claim it first.
	ErrNotClaimed = errors.New("epoch not claimed")
	// ErrOutOfRange: an offset, length or extent index beyond the replica.
	ErrOutOfRange = errors.New("out of range")
	// ErrNotFound: no replica with that id.
	ErrNotFound = errors.New("replica not found")
	// ErrExists: a replica with that id exists with a different size or
	// extent size.
	ErrExists = errors.New("replica exists with different parameters")
	// ErrCorrupt: a replica's metadata or data file is damaged or
	// inconsistent; the replica cannot be opened.
	ErrCorrupt = errors.New("replica corrupt")
	// ErrInvalidArgument: a malformed argument or request (bad id, bad size,
	// unknown op, bad flags …). On the wire this is status BadRequest.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrIO: the replica failed to read or write its files. Only the client
	// returns it (status IOError); locally the underlying error is returned.
	ErrIO = errors.New("replica I/O error")
	// ErrClosed: the replica, client or connection was closed.
	ErrClosed = errors.New("closed")
	// ErrBusy: the replica's files are already open elsewhere (another
	// process or another handle).
	ErrBusy = errors.New("replica in use")
	// ErrProtocol: the peer sent a frame that cannot be decoded; the
	// connection is closed because its framing can no longer be trusted.
	ErrProtocol = errors.New("replica protocol error")
	// ErrChecksum: data does not match its checksum — a write whose
	// payload arrived damaged (nothing was written), or a stored block that
	// no longer matches its stored sum (read, or the read of a block a
	// write covers in part). On the wire this is status Checksum.
	ErrChecksum = errors.New("checksum mismatch")
	// ErrSnapshotExists: the replica has a snapshot with that id already
	// (a retried SNAPSHOT finds it). On the wire this is status Exists.
	ErrSnapshotExists = errors.New("snapshot exists")
	// ErrServerClosed is returned by Server.Serve after Server.Close.
	ErrServerClosed = errors.New("replica server closed")
)

// Status is the result code in a reply frame. Values are part of the wire
// protocol: never renumber, never reuse.
type Status uint32

// Reply status codes.
const (
	StatusOK         Status = 0
	StatusFenced     Status = 1
	StatusNotClaimed Status = 2
	StatusOutOfRange Status = 3
	StatusNotFound   Status = 4
	StatusIOError    Status = 5
	StatusBadRequest Status = 6
	StatusChecksum   Status = 7
	StatusExists     Status = 8
)

func (s Status) String() string {
	switch s {
	case StatusOK:
		return "ok"
	case StatusFenced:
		return "fenced"
	case StatusNotClaimed:
		return "not_claimed"
	case StatusOutOfRange:
		return "out_of_range"
	case StatusNotFound:
		return "not_found"
	case StatusIOError:
		return "io_error"
	case StatusBadRequest:
		return "bad_request"
	case StatusChecksum:
		return "checksum"
	case StatusExists:
		return "exists"
	}
	return fmt.Sprintf("status_%d", uint32(s))
}

// statusOf maps an error to the status code sent on the wire. Anything that is
// not a known sentinel is an I/O error: the replica could not do its job.
func statusOf(err error) Status {
	switch {
	case err == nil:
		return StatusOK
	case errors.Is(err, ErrFenced):
		return StatusFenced
	case errors.Is(err, ErrNotClaimed):
		return StatusNotClaimed
	case errors.Is(err, ErrOutOfRange):
		return StatusOutOfRange
	case errors.Is(err, ErrNotFound):
		return StatusNotFound
	case errors.Is(err, ErrInvalidArgument), errors.Is(err, ErrProtocol):
		return StatusBadRequest
	case errors.Is(err, ErrChecksum):
		return StatusChecksum
	case errors.Is(err, ErrSnapshotExists):
		return StatusExists
	}
	return StatusIOError
}

// sentinelOf is the inverse of statusOf, used by the client.
func sentinelOf(s Status) error {
	switch s {
	case StatusFenced:
		return ErrFenced
	case StatusNotClaimed:
		return ErrNotClaimed
	case StatusOutOfRange:
		return ErrOutOfRange
	case StatusNotFound:
		return ErrNotFound
	case StatusBadRequest:
		return ErrInvalidArgument
	case StatusChecksum:
		return ErrChecksum
	case StatusExists:
		return ErrSnapshotExists
	}
	return ErrIO
}

// RemoteError is an error status returned by a replica server. It unwraps to
// the sentinel for its status, so errors.Is(err, ErrFenced) works on the
// client side.
type RemoteError struct {
	Status  Status
	Message string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("replica server: %s: %s", e.Status, e.Message)
}

// Unwrap returns the sentinel error for the status.
func (e *RemoteError) Unwrap() error { return sentinelOf(e.Status) }
