package workers

import (
	"runtime"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// TestPoolReusesWorkers: tasks given one after another run on one worker;
// tasks that overlap each get one; Close ends them all.
func TestPoolReusesWorkers(t *testing.T) {
	defer goleak.VerifyNone(t)
	p := New(time.Minute)
	var ids sync.Map
	done := make(chan struct{})
	for range 50 {
		p.Go(func() {
			ids.Store(goid(), true)
			done <- struct{}{}
		})
		<-done
		time.Sleep(time.Millisecond) // let the worker get back to waiting
	}
	n := 0
	ids.Range(func(any, any) bool { n++; return true })
	if n == 50 {
		t.Fatal("50 tasks one after another ran on 50 goroutines: no worker was used again")
	}
	t.Logf("50 tasks one after another ran on %d goroutine(s)", n)

	// Overlapping tasks: 8 run at once, none waits for another.
	release := make(chan struct{})
	var running sync.WaitGroup
	running.Add(8)
	for range 8 {
		p.Go(func() {
			running.Done()
			<-release
		})
	}
	running.Wait() // would hang if a task waited for a busy worker
	close(release)
	p.Close()
	p.wg.Wait()

	// After Close a task still runs.
	ran := make(chan struct{})
	p.Go(func() { close(ran) })
	<-ran
}

// TestPoolIdleWorkersEnd: a worker idle for the pool's idle time ends.
func TestPoolIdleWorkersEnd(t *testing.T) {
	defer goleak.VerifyNone(t)
	p := New(10 * time.Millisecond)
	ran := make(chan struct{})
	p.Go(func() { close(ran) })
	<-ran
	deadline := time.Now().Add(10 * time.Second)
	for {
		ended := make(chan struct{})
		go func() { p.wg.Wait(); close(ended) }()
		select {
		case <-ended:
			return
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("an idle worker did not end")
		}
	}
}

// goid is the running goroutine's id, from its stack header.
func goid() string {
	var buf [32]byte
	n := runtime.Stack(buf[:], false)
	s := string(buf[:n]) // "goroutine 123 [running]:..."
	for i := len("goroutine "); i < len(s); i++ {
		if s[i] == ' ' {
			return s[len("goroutine "):i]
		}
	}
	return s
}
