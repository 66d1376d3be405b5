package meta

import (
	"reflect"
	"testing"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// TestMutableParametersPinned pins the keys SetParameters may change: the
// four QoS keys and nothing else (the CSI controller and cairn ctl read the
// same set).
func TestMutableParametersPinned(t *testing.T) {
	want := map[string]bool{"maxIOPS": true, "minIOPS": true, "maxBandwidth": true, "burstDuration": true}
	got := map[string]bool{}
	for _, k := range volspec.MutableKeys() {
		got[k] = true
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("volspec.MutableKeys() = %v, want %v", got, want)
	}
	for _, k := range []string{volspec.KeyMaxIOPS, volspec.KeyMinIOPS, volspec.KeyMaxBandwidth, volspec.KeyBurstDuration} {
		if !want[k] {
			t.Errorf("QoS key constant %q is not one of the pinned names", k)
		}
	}
}
