package meta

import (
	"errors"
	"fmt"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Sentinel errors of the volume store. Callers match them with errors.Is; the
// driver maps them to CSI status codes in one place. They also cross the meta
// gRPC API by name (see errorCode / errorFromWire), so a client sees the same
// sentinel the leader returned.
var (
	ErrNotFound      = errors.New("not found")
	ErrAlreadyExists = errors.New("already exists")
	ErrNotLeader     = errors.New("not the leader")
	ErrNoLeader      = errors.New("no leader")
	ErrEpochMismatch = errors.New("epoch changed")
	// ErrGenerationMismatch: a replica's recorded generation is not the one
	// a SetReplicaGeneration expected.
	ErrGenerationMismatch = errors.New("replica generation changed")
	ErrIllegalTransition  = errors.New("illegal state transition")
	ErrFailedPrecondition = errors.New("failed precondition")
	ErrResourceExhausted  = errors.New("resource exhausted")
	// ErrInvalidArgument is volspec's sentinel: a volume parameter refused
	// by volspec, in a client or in apply, is an invalid argument of the
	// store too, with the same message.
	ErrInvalidArgument = volspec.ErrInvalid
	ErrBadCommand      = errors.New("bad command")
	// ErrNewerCommand: a log entry written by a newer build (a command type,
	// a version or a field this build does not know). It also wraps
	// ErrBadCommand. The FSM halts on it rather than skip it; see the
	// command-evolution rule in command.go.
	ErrNewerCommand    = errors.New("command from a newer version")
	ErrClusterMismatch = errors.New("cluster mismatch")
	ErrQuorumLost      = errors.New("quorum lost")
	// ErrOutcomeUnknown: leadership was lost while a command was in flight;
	// it may or may not have been committed. Read before retrying.
	ErrOutcomeUnknown = errors.New("outcome unknown")
)

// wireErrors names each sentinel on the wire. Names are stable: never rename one.
var wireErrors = map[string]error{
	"not_found":           ErrNotFound,
	"already_exists":      ErrAlreadyExists,
	"not_leader":          ErrNotLeader,
	"no_leader":           ErrNoLeader,
	"epoch_mismatch":      ErrEpochMismatch,
	"illegal_transition":  ErrIllegalTransition,
	"failed_precondition": ErrFailedPrecondition,
	"resource_exhausted":  ErrResourceExhausted,
	"invalid_argument":    ErrInvalidArgument,
	"bad_command":         ErrBadCommand,
	"cluster_mismatch":    ErrClusterMismatch,
	"quorum_lost":         ErrQuorumLost,
	"outcome_unknown":     ErrOutcomeUnknown,
	"generation_mismatch": ErrGenerationMismatch,
	// A node's certificate refused by the FSM (AsNode).
	"permission_denied": pki.ErrPermissionDenied,
}

// WireError is an error as it crosses the meta API: the sentinel's name and the
// full message.
type WireError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// toWire turns err into its wire form; nil stays nil.
func toWire(err error) *WireError {
	if err == nil {
		return nil
	}
	for name, sentinel := range wireErrors {
		if errors.Is(err, sentinel) {
			return &WireError{Code: name, Message: err.Error()}
		}
	}
	return &WireError{Code: "internal", Message: err.Error()}
}

// remoteError keeps the message of a remote error while unwrapping to the
// sentinel it was made from.
type remoteError struct {
	msg      string
	sentinel error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

// fromWire rebuilds an error from its wire form; nil stays nil.
func fromWire(w *WireError) error {
	if w == nil {
		return nil
	}
	if s, ok := wireErrors[w.Code]; ok {
		return &remoteError{msg: w.Message, sentinel: s}
	}
	return fmt.Errorf("%s", w.Message)
}
