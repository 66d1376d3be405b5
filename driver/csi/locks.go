package csi

import (
	"sync"
)

// volumeLocks keeps two CSI operations on one volume from interleaving: the
// second one fails at once (errBusy, which toStatus makes Aborted, as the
// CSI spec asks), and the caller (a sidecar, kubelet) retries.
type volumeLocks struct {
	mu   sync.Mutex
	busy map[string]bool
}

func newVolumeLocks() *volumeLocks { return &volumeLocks{busy: map[string]bool{}} }

// lock takes the lock of id, or returns an error wrapping errBusy.
func (l *volumeLocks) lock(id string) (unlock func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.busy[id] {
		return nil, failf(errBusy, "an operation on %s is already in progress", id)
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
		return nil, failf(errInvalid, "volume id is required")
	}
	return l.lock(id)
}
