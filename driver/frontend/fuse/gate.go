//go:build linux

package fuse

import (
	"sync"
	"time"
)

// gate lets the file system's requests in until it is closed, when the
// server is left to a successor (Server.Leave). After that, a request that
// arrives is not served: it waits until the process exits, and the kernel
// keeps it for the next server, which has it sent again (docs/restart.md).
// close waits for the requests already inside to finish, so that every
// answer the kernel got was given while the engines were still open.
type gate struct {
	mu     sync.RWMutex
	closed bool
	inside sync.WaitGroup
	// freed ends the wait of held requests: after an unmount nobody can
	// take them over, and they are answered with an error.
	freed    chan struct{}
	freeOnce sync.Once
}

func newGate() gate { return gate{freed: make(chan struct{})} }

// enter admits a request (true), or holds it until free and returns false.
// An admitted request must call exit.
func (g *gate) enter() bool {
	g.mu.RLock()
	if g.closed {
		g.mu.RUnlock()
		<-g.freed
		return false
	}
	g.inside.Add(1)
	g.mu.RUnlock()
	return true
}

func (g *gate) exit() { g.inside.Done() }

// close stops admitting requests and waits up to wait for those inside;
// it reports whether they all finished.
func (g *gate) close(wait time.Duration) bool {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	done := make(chan struct{})
	go func() { g.inside.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(wait):
		return false
	}
}

// free releases the requests held since close.
func (g *gate) free() { g.freeOnce.Do(func() { close(g.freed) }) }
