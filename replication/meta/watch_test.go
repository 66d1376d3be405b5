package meta

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/volspec"
)

func volumeIDs(vs []*Volume) []string {
	var out []string
	for _, v := range vs {
		out = append(out, v.ID)
	}
	return out
}

// TestWatchEvents: a watcher from index 0 gets the whole state; from the
// index of its last event, what changed since, as it is now; nothing when
// nothing changed; and the whole state again (Reset) once it has fallen
// behind the change log or the member restored a snapshot.
func TestWatchEvents(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 100)
	v1 := h.createVolume("v1", 1, 1)
	v2 := h.createVolume("v2", 1, 1)

	ev := h.f.WatchEvent(0, "", "")
	if !ev.Reset || !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1", "v2"}) || len(ev.Nodes) != 3 || ev.Index != h.index {
		t.Fatalf("first event = %s", dumpJSON(ev))
	}
	if got := h.f.WatchEvent(ev.Index, "", ""); got != nil {
		t.Fatalf("event with nothing new: %s", dumpJSON(got))
	}
	from := ev.Index
	h.must(&SetVolumeCondition{VolumeID: v1.ID, Abnormal: true, Message: "m"})
	h.must(&DeleteVolume{VolumeID: v2.ID})
	ev = h.f.WatchEvent(from, "", "")
	if ev.Reset || !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1"}) || !reflect.DeepEqual(ev.Removed, []string{"v2"}) ||
		len(ev.Nodes) != 0 || ev.Index != h.index {
		t.Fatalf("event after a change of v1 and the delete of v2 = %s", dumpJSON(ev))
	}
	if ev.Volumes[0].Condition == nil {
		t.Fatalf("v1 as it was, not as it is: %s", dumpJSON(ev.Volumes[0]))
	}
	from = ev.Index
	h.must(&PurgeVolume{VolumeID: v2.ID})
	if ev = h.f.WatchEvent(from, "", ""); !reflect.DeepEqual(ev.Removed, []string{"v2"}) {
		t.Fatalf("event after the purge of v2 = %s", dumpJSON(ev))
	}
	from = ev.Index

	// A watcher limited to a node sees only the volumes there.
	node := v1.Replicas[0].Node
	var other string
	for id := range h.state().Nodes {
		if id != node {
			other = id
		}
	}
	if ev = h.f.WatchEvent(0, other, ""); len(ev.Volumes) != 0 || len(ev.Nodes) != 3 {
		t.Fatalf("watch of node %s, which holds no replica: %s", other, dumpJSON(ev))
	}
	if ev = h.f.WatchEvent(0, node, ""); !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1"}) {
		t.Fatalf("watch of node %s, which holds v1: %s", node, dumpJSON(ev))
	}
	// A watcher of one volume sees that one only, and not the changes of others.
	if ev = h.f.WatchEvent(0, "", "v1"); !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1"}) {
		t.Fatalf("watch of v1: %s", dumpJSON(ev))
	}
	// From before the delete and the purge of v2, which are all that changed.
	if ev = h.f.WatchEvent(from-2, "", "v1"); !ev.empty() {
		t.Fatalf("watch of v1 across the delete and purge of v2: %s", dumpJSON(ev))
	}

	// Fallen behind the change log: the whole state again.
	defer func(n int) { maxChangeRecords = n }(maxChangeRecords)
	maxChangeRecords = 3
	for i := range 5 {
		h.must(&SetVolumeCondition{VolumeID: v1.ID, Abnormal: i%2 == 0})
	}
	if ev = h.f.WatchEvent(from, "", ""); !ev.Reset || !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1"}) {
		t.Fatalf("event for a watcher behind the change log = %s", dumpJSON(ev))
	}
	if ev = h.f.WatchEvent(h.index-2, "", ""); ev.Reset || !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1"}) {
		t.Fatalf("event for a watcher within the change log = %s", dumpJSON(ev))
	}

	// A restored snapshot: the changes that led to it are not known.
	var buf bytes.Buffer
	if err := WriteSnapshot(&buf, h.state()); err != nil {
		t.Fatal(err)
	}
	if err := h.f.Restore(nopCloser{&buf}); err != nil {
		t.Fatal(err)
	}
	if ev = h.f.WatchEvent(h.index-1, "", ""); !ev.Reset {
		t.Fatalf("event after a restore = %s", dumpJSON(ev))
	}
	// A watcher ahead of this member (it came from another one) waits for
	// it, even when the member has no change log to give: a whole state
	// older than the watcher's would take it back.
	if ev = h.f.WatchEvent(h.index+5, "", ""); ev != nil {
		t.Fatalf("event for a watcher ahead of the member = %s", dumpJSON(ev))
	}
	h.must(&SetVolumeCondition{VolumeID: v1.ID})
	if ev = h.f.WatchEvent(h.index-1, "", ""); ev.Reset || !reflect.DeepEqual(volumeIDs(ev.Volumes), []string{"v1"}) {
		t.Fatalf("event for the entry after a restore = %s", dumpJSON(ev))
	}
}

// watchView is what a watcher builds from the events it gets.
type watchView struct {
	mu      sync.Mutex
	index   uint64
	resets  int
	volumes map[string]*Volume
	nodes   map[string]*Node
}

func (w *watchView) apply(ev *WatchEvent) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if ev.Reset {
		w.resets++
		w.volumes, w.nodes = map[string]*Volume{}, map[string]*Node{}
	}
	for _, v := range ev.Volumes {
		w.volumes[v.ID] = v
	}
	for _, id := range ev.Removed {
		delete(w.volumes, id)
	}
	for _, n := range ev.Nodes {
		w.nodes[n.ID] = n
	}
	w.index = ev.Index
	return nil
}

// matches says whether the view holds the live volumes and the nodes of s.
func (w *watchView) matches(s *State) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	live := map[string]*Volume{}
	for _, v := range s.SortedVolumes() {
		live[v.ID] = v
	}
	return reflect.DeepEqual(w.volumes, live) && reflect.DeepEqual(w.nodes, s.Nodes)
}

// TestWatchOverTheAPI: a watcher over the meta API follows creates,
// changes and deletes; one that comes back with the index it reached gets
// only what changed since, not the whole state.
func TestWatchOverTheAPI(t *testing.T) {
	_, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	state := func() *State {
		s, err := c.State(ctx, true)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}

	w := &watchView{}
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Watch(wctx, WatchRequest{}, w.apply) }()
	v1 := testCreate(t, ctx, c, "one")
	v2 := testCreate(t, ctx, c, "two")
	if _, err := c.Apply(ctx, &SetParameters{VolumeID: v1.ID, Parameters: map[string]string{volspec.KeyMaxIOPS: "100"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, &DeleteVolume{VolumeID: v2.ID}); err != nil {
		t.Fatal(err)
	}
	// Compared with a fresh read each time: heartbeats change the node.
	waitUntil(t, 10*time.Second, "the watcher to see the store's state", func() bool { return w.matches(state()) })
	stop()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Watch ended with %v, want context.Canceled", err)
	}
	if w.resets != 1 {
		t.Fatalf("watcher got %d resets, want the first event only", w.resets)
	}

	// Away for a while, then back from where it was.
	testCreate(t, ctx, c, "three")
	resets := w.resets
	wctx, stop = context.WithCancel(ctx)
	defer stop()
	go func() { done <- c.Watch(wctx, WatchRequest{FromIndex: w.index}, w.apply) }()
	waitUntil(t, 10*time.Second, "the returning watcher to catch up", func() bool { return w.matches(state()) })
	if w.resets != resets {
		t.Fatal("a watcher back within the change log got the whole state again")
	}

	// fn's error ends the watch.
	boom := errors.New("boom")
	if err := c.Watch(ctx, WatchRequest{}, func(*WatchEvent) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Watch ended with %v, want fn's error", err)
	}
}
