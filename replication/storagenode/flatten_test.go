package storagenode

import (
	"slices"
	"strings"
	"testing"
)

// TestFlattenTarget: the layer to flatten into is the newest of the
// inherited run at the bottom, when that run has two layers or more, and
// the chain is past the limit or nothing else shares the run.
func TestFlattenTarget(t *testing.T) {
	own := func(id string) bool { return id[0] == 'o' }
	for _, c := range []struct {
		layers []string // a layer with a * is shared
		limit  int
		want   int
	}{
		{[]string{"i1*", "i2*", "o1"}, 3, 1},
		{[]string{"i1*", "i2*", "o1"}, 4, -1},       // at the limit, shared
		{[]string{"i1", "i2*", "o1"}, 4, -1},        // one of them shared
		{[]string{"i1", "i2", "o1"}, 4, 1},          // at the limit, shared with nobody
		{[]string{"i1*", "o1", "o2"}, 3, -1},        // one inherited layer: nothing to gain
		{[]string{"i1", "o1", "o2"}, 3, -1},         // the same, unshared
		{[]string{"o1", "o2", "o3"}, 3, -1},         // the volume's own snapshots stay
		{[]string{"i1*", "i2*", "i3*"}, 3, 2},       // a restore with no snapshot of its own
		{[]string{"i1*", "o1", "i2*", "o2"}, 3, -1}, // only the run at the bottom
		{[]string{"i1*", "i2*", "o1", "i3*"}, 3, 1}, // a layer of unknown origin above stays
		{[]string{"i1", "i2", "o1", "i3*"}, 9, 1},   // only the run's sharing counts
	} {
		ids := make([]string, len(c.layers))
		for i, l := range c.layers {
			ids[i] = strings.TrimSuffix(l, "*")
		}
		asked := -1
		shared := func(k int) bool {
			asked = k
			return slices.ContainsFunc(c.layers[:k+1], func(l string) bool { return strings.HasSuffix(l, "*") })
		}
		got, why := flattenTarget(ids, c.limit, own, shared)
		if got != c.want || (got >= 0) != (why != "") {
			t.Errorf("flattenTarget(%v, limit %d) = %d, %q; want %d", c.layers, c.limit, got, why, c.want)
		}
		if asked >= 0 && len(ids)+1 > c.limit {
			t.Errorf("flattenTarget(%v, limit %d) looked at the sharing of a chain past the limit", c.layers, c.limit)
		}
	}
}
