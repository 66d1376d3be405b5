package meta_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/tests/cluster"
)

// ackLog records what a writer was told.
type ackLog struct {
	mu      sync.Mutex
	acked   map[string]string // volume name → id the store answered
	order   []string
	unknown []error
}

func (l *ackLog) ack(name, id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.acked[name] = id
	l.order = append(l.order, name)
}

func (l *ackLog) fail(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.unknown = append(l.unknown, err)
}

func (l *ackLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.order)
}

// Scenario: one writer creates volumes v-0, v-1, … through a client of all
// members while members — leader or follower, one at a time — are killed and
// restarted from their data dirs.
// Invariant (docs/architecture.md, "Guarantees", item 4): every create that
// was acknowledged is present, with the id the store answered, in a
// linearizable read through every member and in every member's own state once
// they have caught up.
func TestNoAcknowledgedWriteLost(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	cl := c.Client(t)
	log := &ackLog{acked: map[string]string{}}

	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			name := fmt.Sprintf("v-%d", i)
			octx, ocancel := context.WithTimeout(ctx, 5*time.Second)
			v, err := createVolume(octx, cl, name)
			ocancel()
			if err != nil {
				log.fail(fmt.Errorf("%s: %w", name, err))
				continue
			}
			log.ack(name, v.ID)
		}
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })

	// progress waits until the writer has n more acknowledged writes: with
	// a quorum up the store must keep committing.
	progress := func(n int, what string) {
		t.Helper()
		target := log.count() + n
		waitFor(t, 20*time.Second, fmt.Sprintf("%d acknowledged writes %s", n, what), func() bool { return log.count() >= target })
	}

	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))
	progress(5, "before any fault")
	kills := 0
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		victim := rng.IntN(c.N())
		if kills%2 == 0 {
			victim = c.Leader(t) // every other round takes the leader
		}
		if err := c.Kill(victim); err != nil {
			t.Fatal(err)
		}
		kills++
		progress(5, fmt.Sprintf("with %s down", c.NodeID(victim)))
		c.Restart(t, victim)
		progress(5, fmt.Sprintf("after %s restarted", c.NodeID(victim)))
	}
	cancel()
	wg.Wait()

	log.mu.Lock()
	acked, unknown := log.acked, len(log.unknown)
	log.mu.Unlock()
	t.Logf("%d kills; %d creates acknowledged, %d failed or outcome unknown", kills, len(acked), unknown)
	if len(acked) == 0 {
		t.Fatal("no write was acknowledged")
	}

	st := c.WaitConverged(t)
	check := func(where string, have map[string]string) {
		t.Helper()
		var lost []string
		for name, id := range acked {
			if have[name] != id {
				lost = append(lost, fmt.Sprintf("%s (acked as %s, found %q)", name, id, have[name]))
			}
		}
		if len(lost) > 0 {
			t.Fatalf("%s: %d acknowledged writes missing or changed: %v", where, len(lost), lost)
		}
	}
	check("converged state", idsByName(st))
	for i := range c.N() {
		ms, ok := c.LocalState(i)
		if !ok {
			t.Fatalf("member %s is down", c.NodeID(i))
		}
		check(fmt.Sprintf("%s's own state", c.NodeID(i)), idsByName(ms.State))
		got, err := c.MemberClient(t, i).State(ctxFor(t, 10*time.Second), true)
		if err != nil {
			t.Fatalf("linearizable read through %s: %v", c.NodeID(i), err)
		}
		check(fmt.Sprintf("linearizable read through %s", c.NodeID(i)), idsByName(got))
	}
}
