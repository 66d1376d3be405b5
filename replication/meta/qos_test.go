package meta

import (
	"reflect"
	"testing"
)

// TestMutableParametersPinned pins the keys SetParameters may change: the
// four QoS keys and nothing else (the CSI controller and cairn ctl read the
// same set).
func TestMutableParametersPinned(t *testing.T) {
	want := map[string]bool{"maxIOPS": true, "minIOPS": true, "maxBandwidth": true, "burstDuration": true}
	if !reflect.DeepEqual(MutableParameters, want) {
		t.Errorf("MutableParameters = %v, want %v", MutableParameters, want)
	}
	for _, k := range []string{ParamMaxIOPS, ParamMinIOPS, ParamMaxBandwidth, ParamBurstDuration} {
		if !want[k] {
			t.Errorf("QoS key constant %q is not one of the pinned names", k)
		}
	}
}
