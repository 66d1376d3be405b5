// Package workers runs short tasks on goroutines that stay for the next
// one.
//
// A goroutine started for each request begins on a small stack, and on a
// deep call path (a write through the engine, a replica connection, the
// replica and the file system) grows it by copying, on every request: a
// profile of a 3-replica volume under 4 KiB random writes put 5% of the
// node agents' CPU in runtime.morestack. A worker that stays keeps its
// grown stack, and a request handed to an idle one costs a channel send.
package workers

import (
	"sync"
	"time"
)

// Pool runs tasks on idle workers, starting one when none is idle; a worker
// idle for longer than the pool's idle time ends. The zero Pool is not
// usable; call New.
type Pool struct {
	tasks chan func()
	idle  time.Duration
	quit  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup // the workers (tests wait for them)
}

// New returns a pool whose workers end after idle without a task.
func New(idle time.Duration) *Pool {
	return &Pool{tasks: make(chan func()), idle: idle, quit: make(chan struct{})}
}

// Go runs f on an idle worker, or on a new one when none is idle, so it
// never waits for a task to finish. After Close, or on a nil Pool, f runs
// on a goroutine of its own.
func (p *Pool) Go(f func()) {
	if p == nil {
		go f()
		return
	}
	select {
	case p.tasks <- f:
		return
	default:
	}
	select {
	case <-p.quit:
		go f()
		return
	default:
	}
	p.wg.Add(1)
	go p.work(f)
}

func (p *Pool) work(f func()) {
	defer p.wg.Done()
	f()
	t := time.NewTimer(p.idle)
	defer t.Stop()
	for {
		select {
		case f = <-p.tasks:
			f()
			t.Reset(p.idle)
		case <-t.C:
			return
		case <-p.quit:
			return
		}
	}
}

// Close ends the idle workers; a busy one ends when its task returns.
// Tasks given after Close still run, each on its own goroutine.
func (p *Pool) Close() {
	if p == nil {
		return
	}
	p.once.Do(func() { close(p.quit) })
}
