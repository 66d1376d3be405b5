package csi

import (
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// volumeLocks keeps two CSI operations on one volume from interleaving: the
// second one gets Aborted at once, as the CSI spec asks, and the caller
// (a sidecar, kubelet) retries.
type volumeLocks struct {
	mu   sync.Mutex
	busy map[string]bool
}

func newVolumeLocks() *volumeLocks { return &volumeLocks{busy: map[string]bool{}} }

// lock takes the lock of id, or returns an Aborted error.
func (l *volumeLocks) lock(id string) (unlock func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.busy[id] {
		return nil, status.Errorf(codes.Aborted, "an operation on %s is already in progress", id)
	}
	l.busy[id] = true
	return func() {
		l.mu.Lock()
		delete(l.busy, id)
		l.mu.Unlock()
	}, nil
}

// lockVolume checks that a request names a volume and takes its lock: the
// first two steps of every RPC on one volume.
func (l *volumeLocks) lockVolume(id string) (unlock func(), err error) {
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "volume id is required")
	}
	return l.lock(id)
}
