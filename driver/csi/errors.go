package csi

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
)

// toStatus maps an error from below the driver to the CSI status code the
// spec names for it. It is the one place that does so.
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
	case errors.Is(err, meta.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, meta.ErrAlreadyExists):
		code = codes.AlreadyExists
	case errors.Is(err, meta.ErrFailedPrecondition), errors.Is(err, meta.ErrIllegalTransition),
		errors.Is(err, engine.ErrNotAttached), errors.Is(err, engine.ErrFenced):
		code = codes.FailedPrecondition
	case errors.Is(err, meta.ErrResourceExhausted):
		code = codes.ResourceExhausted
	case errors.Is(err, meta.ErrEpochMismatch):
		code = codes.Aborted
	case errors.Is(err, meta.ErrNoLeader), errors.Is(err, meta.ErrNotLeader), errors.Is(err, meta.ErrOutcomeUnknown),
		errors.Is(err, context.DeadlineExceeded):
		code = codes.Unavailable
	}
	return status.Error(code, err.Error())
}

// errInvalid marks a driver-level validation failure.
var errInvalid = errors.New("invalid argument")
