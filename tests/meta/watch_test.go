package meta_test

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/cluster"
)

// Scenario: a watcher follows a three-member cluster while each member in
// turn is killed (among them, whichever the watcher's stream was on),
// volumes are created and deleted meanwhile, and the member restarts.
// Invariant: the watcher's view, built from its events alone, comes to
// hold exactly the live volumes of a linearizable read after every round.
func TestWatchSurvivesMemberLoss(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	cl := c.Client(t)
	var mu sync.Mutex
	view := map[string]*meta.Volume{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- c.Client(t).Watch(ctx, meta.WatchRequest{}, func(ev *meta.WatchEvent) error {
			mu.Lock()
			defer mu.Unlock()
			if ev.Reset {
				clear(view)
			}
			for _, v := range ev.Volumes {
				view[v.ID] = v
			}
			for _, id := range ev.Removed {
				delete(view, id)
			}
			return nil
		})
	}()
	defer func() {
		cancel()
		<-done
	}()
	converged := func(round int) {
		t.Helper()
		waitFor(t, 20*time.Second, fmt.Sprintf("round %d: the watcher to hold the store's live volumes", round), func() bool {
			st, err := cl.State(ctxFor(t, 5*time.Second), true)
			if err != nil {
				return false
			}
			live := map[string]*meta.Volume{}
			for _, v := range st.SortedVolumes() {
				live[v.ID] = v
			}
			mu.Lock()
			defer mu.Unlock()
			return reflect.DeepEqual(view, live)
		})
	}
	before := mustCreate(t, cl, "before", 3)
	converged(0)
	for i := range c.N() {
		if err := c.Kill(i); err != nil {
			t.Fatal(err)
		}
		mustCreate(t, cl, fmt.Sprintf("round-%d", i), 2)
		st, err := cl.State(ctxFor(t, 10*time.Second), true)
		if err != nil {
			t.Fatal(err)
		}
		victim := idsByName(st)[before[i]]
		if _, err := cl.Apply(ctxFor(t, 10*time.Second), &meta.DeleteVolume{VolumeID: victim}); err != nil {
			t.Fatalf("round %d: delete %s: %v", i, before[i], err)
		}
		converged(i + 1)
		c.Restart(t, i)
		c.WaitConverged(t)
	}
}
