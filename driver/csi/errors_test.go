package csi

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
)

func TestToStatus(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want codes.Code
	}{
		{"driver invalid", errInvalid, codes.InvalidArgument},
		{"driver not found", errNotFound, codes.NotFound},
		{"driver already exists", errAlreadyExists, codes.AlreadyExists},
		{"driver busy", errBusy, codes.Aborted},
		{"driver stale token", errStaleToken, codes.Aborted},
		{"engine registry busy", fmt.Errorf("close the engine of v1: %w", attach.ErrBusy), codes.Aborted},
		{"driver wrong order", errWrongOrder, codes.FailedPrecondition},
		{"driver no room", errNoRoom, codes.ResourceExhausted},
		{"driver out of range", errOutOfRange, codes.OutOfRange},
		{"store invalid", meta.ErrInvalidArgument, codes.InvalidArgument},
		{"store not found", meta.ErrNotFound, codes.NotFound},
		{"store already exists", meta.ErrAlreadyExists, codes.AlreadyExists},
		{"store failed precondition", meta.ErrFailedPrecondition, codes.FailedPrecondition},
		{"store illegal transition", meta.ErrIllegalTransition, codes.FailedPrecondition},
		{"store resource exhausted", meta.ErrResourceExhausted, codes.ResourceExhausted},
		{"store epoch mismatch", meta.ErrEpochMismatch, codes.Aborted},
		{"store no leader", meta.ErrNoLeader, codes.Unavailable},
		{"store not leader", meta.ErrNotLeader, codes.Unavailable},
		{"store outcome unknown", meta.ErrOutcomeUnknown, codes.Unavailable},
		{"deadline", context.DeadlineExceeded, codes.Unavailable},
		{"engine not attached", engine.ErrNotAttached, codes.FailedPrecondition},
		{"engine fenced", engine.ErrFenced, codes.FailedPrecondition},
		{"anything else", errors.New("disk on fire"), codes.Internal},
		{"wrapped store sentinel", fmt.Errorf("volume %q: %w", "v1", meta.ErrNotFound), codes.NotFound},
		{"twice wrapped", fmt.Errorf("attach: %w", fmt.Errorf("placement: %w", meta.ErrResourceExhausted)), codes.ResourceExhausted},
		{"failf", failf(errOutOfRange, "%d bytes is too large", 7), codes.OutOfRange},
		{"failf wrapped", fmt.Errorf("stage: %w", failf(errWrongOrder, "not staged")), codes.FailedPrecondition},
		// A cause formatted into a failure's message does not decide its code.
		{"failf with a formatted cause", failf(errInvalid, "bad: %v", meta.ErrNoLeader), codes.InvalidArgument},
		{"existing status", status.Error(codes.PermissionDenied, "no"), codes.PermissionDenied},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := toStatus(tc.err)
			s, ok := status.FromError(got)
			if !ok {
				t.Fatalf("toStatus(%v) = %v, not a status", tc.err, got)
			}
			if s.Code() != tc.want {
				t.Errorf("toStatus(%v) code = %s, want %s", tc.err, s.Code(), tc.want)
			}
			if _, wasStatus := status.FromError(tc.err); wasStatus {
				if got != tc.err {
					t.Errorf("toStatus changed the status %v into %v; a status must pass through", tc.err, got)
				}
				return
			}
			if s.Message() != tc.err.Error() {
				t.Errorf("toStatus(%v) message = %q, want the error's text %q", tc.err, s.Message(), tc.err.Error())
			}
		})
	}
	if err := toStatus(nil); err != nil {
		t.Errorf("toStatus(nil) = %v, want nil", err)
	}
}

// TestFailfMessage pins what callers read: the message as the driver wrote
// it, without the sentinel's text, so that replacing an inline status with
// failf changed no message.
func TestFailfMessage(t *testing.T) {
	err := failf(errNotFound, "volume %s does not exist", "v1")
	if got, want := status.Convert(toStatus(err)).Message(), "volume v1 does not exist"; got != want {
		t.Errorf("message = %q, want %q", got, want)
	}
	if !errors.Is(err, errNotFound) || errors.Is(err, errInvalid) {
		t.Errorf("failf(errNotFound, …) matches the wrong sentinels")
	}
}
