package storagenode

import (
	"strings"
	"testing"

	"github.com/cairn-csi/cairn/replication/replica"
)

// TestFlattenTarget: the layer to flatten into is the newest of the
// inherited run at the bottom, when that run has two layers or more, and
// the chain is past the limit or nothing else shares the run.
func TestFlattenTarget(t *testing.T) {
	own := func(id string) bool { return id[0] == 'o' }
	chain := func(ids ...string) []replica.ChainLayer {
		var ls []replica.ChainLayer
		for _, id := range ids {
			ls = append(ls, replica.ChainLayer{ID: strings.TrimSuffix(id, "*"), Shared: strings.HasSuffix(id, "*")})
		}
		return ls
	}
	for _, c := range []struct {
		layers       []replica.ChainLayer
		depth, limit int
		want         string
	}{
		{chain("i1*", "i2*", "o1"), 4, 3, "i2"},
		{chain("i1*", "i2*", "o1"), 4, 4, ""},          // at the limit, shared
		{chain("i1", "i2*", "o1"), 4, 4, ""},           // one of them shared
		{chain("i1", "i2", "o1"), 4, 4, "i2"},          // at the limit, shared with nobody
		{chain("i1*", "o1", "o2"), 4, 3, ""},           // one inherited layer: nothing to gain
		{chain("i1", "o1", "o2"), 4, 3, ""},            // the same, unshared
		{chain("o1", "o2", "o3"), 4, 3, ""},            // the volume's own snapshots stay
		{chain("i1*", "i2*", "i3*"), 4, 3, "i3"},       // a restore with no snapshot of its own
		{chain("i1*", "o1", "i2*", "o2"), 5, 3, ""},    // only the run at the bottom
		{chain("i1*", "i2*", "o1", "i3*"), 5, 3, "i2"}, // a layer of unknown origin above stays
	} {
		if got := flattenTarget(c.layers, c.depth, c.limit, own); got != c.want {
			t.Errorf("flattenTarget(%+v, depth %d, limit %d) = %q, want %q", c.layers, c.depth, c.limit, got, c.want)
		}
	}
}
