package meta

import (
	"testing"
	"time"
)

// TestRebuildRestartBackoff: the reconciler restarts a replica's rebuild
// after 2 s, 4 s, 8 s … and never waits more than a minute.
func TestRebuildRestartBackoff(t *testing.T) {
	now := time.Unix(1000, 0)
	var r rebuildRestarts
	want := []time.Duration{2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, time.Minute, time.Minute}
	for i, w := range want {
		r = r.restarted(now)
		if got := r.next.Sub(now); got != w {
			t.Fatalf("restart %d: next after %v, want %v", i+1, got, w)
		}
		if r.count != i+1 {
			t.Fatalf("restart %d: count %d", i+1, r.count)
		}
	}
}
