package csi

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
)

// Sentinel errors of the driver's own checks. Each names a condition, not a
// code: toStatus alone decides the code, after the CSI spec's error tables.
var (
	// errInvalid marks a driver-level validation failure.
	errInvalid = errors.New("invalid argument")
	// errNotFound: the request names a volume, node or path that does not exist.
	errNotFound = errors.New("not found")
	// errAlreadyExists: the request conflicts with what already exists
	// under the same name or id.
	errAlreadyExists = errors.New("already exists")
	// errBusy: another operation on the same volume is running.
	errBusy = errors.New("operation in progress")
	// errStaleToken: a list's starting token is not one the driver gave
	// out, or the list has shrunk under it; the caller starts over.
	errStaleToken = errors.New("stale starting token")
	// errWrongOrder: the request does not fit the volume's state now
	// (publish before stage, a second node while attached, staged at
	// another path).
	errWrongOrder = errors.New("failed precondition")
	// errNoRoom: the node or cluster cannot hold another volume.
	errNoRoom = errors.New("resource exhausted")
	// errOutOfRange: no allowed volume size satisfies the request.
	errOutOfRange = errors.New("out of range")
)

// failure is an error of the driver's own checks: the message the caller
// reads, and the sentinel that picks its code. The sentinel stays out of the
// message, so that the text a CO shows is exactly the reason.
type failure struct {
	msg  string
	kind error
}

func (f *failure) Error() string { return f.msg }
func (f *failure) Unwrap() error { return f.kind }

// failf returns an error of the given kind (one of the sentinels above) with
// a formatted message. Arguments are formatted, never wrapped: the kind
// alone decides the code.
func failf(kind error, format string, args ...any) error {
	return &failure{msg: fmt.Sprintf(format, args...), kind: kind}
}

// toStatus maps an error from below the driver, or of the driver's own
// checks, to the CSI status code the spec names for it. It is the one place
// that does so; an error that already is a status passes through.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Internal
	switch {
	case errors.Is(err, meta.ErrInvalidArgument), errors.Is(err, errInvalid):
		code = codes.InvalidArgument
	case errors.Is(err, meta.ErrNotFound), errors.Is(err, errNotFound):
		code = codes.NotFound
	case errors.Is(err, meta.ErrAlreadyExists), errors.Is(err, errAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, meta.ErrFailedPrecondition), errors.Is(err, meta.ErrIllegalTransition),
		errors.Is(err, engine.ErrNotAttached), errors.Is(err, engine.ErrFenced), errors.Is(err, errWrongOrder):
		code = codes.FailedPrecondition
	case errors.Is(err, meta.ErrResourceExhausted), errors.Is(err, errNoRoom):
		code = codes.ResourceExhausted
	case errors.Is(err, errOutOfRange):
		code = codes.OutOfRange
	case errors.Is(err, meta.ErrEpochMismatch), errors.Is(err, errBusy), errors.Is(err, errStaleToken), errors.Is(err, attach.ErrBusy):
		code = codes.Aborted
	case errors.Is(err, meta.ErrNoLeader), errors.Is(err, meta.ErrNotLeader), errors.Is(err, meta.ErrOutcomeUnknown),
		errors.Is(err, context.DeadlineExceeded):
		code = codes.Unavailable
	}
	return status.Error(code, err.Error())
}
