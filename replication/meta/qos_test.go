package meta

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseQoS(t *testing.T) {
	tests := []struct {
		name string
		p    map[string]string
		want QoS
		// badKey, when set, is the key the error must name; the error
		// wraps ErrInvalidArgument.
		badKey string
	}{
		{name: "nil map is unlimited", p: nil},
		{name: "empty map is unlimited", p: map[string]string{}},
		{name: "other keys are ignored", p: map[string]string{"replicas": "3", "fsType": "xfs", "maxiops": "x"}},
		{name: "every key", p: map[string]string{
			ParamMaxIOPS: "1000", ParamMinIOPS: "200", ParamMaxBandwidth: "104857600", ParamBurstDuration: "2s"},
			want: QoS{MaxIOPS: 1000, MinIOPS: 200, MaxBytesPerSec: 104857600, BurstDuration: 2 * time.Second}},
		{name: "maxIOPS alone", p: map[string]string{ParamMaxIOPS: "500"}, want: QoS{MaxIOPS: 500}},
		{name: "minIOPS alone", p: map[string]string{ParamMinIOPS: "500"}, want: QoS{MinIOPS: 500}},
		{name: "maxBandwidth alone", p: map[string]string{ParamMaxBandwidth: "1"}, want: QoS{MaxBytesPerSec: 1}},
		{name: "burstDuration alone", p: map[string]string{ParamBurstDuration: "250ms"}, want: QoS{BurstDuration: 250 * time.Millisecond}},
		{name: "burstDuration compound", p: map[string]string{ParamBurstDuration: "1m30s"}, want: QoS{BurstDuration: 90 * time.Second}},
		{name: "burstDuration one nanosecond", p: map[string]string{ParamBurstDuration: "1ns"}, want: QoS{BurstDuration: 1}},
		{name: "zero means unlimited", p: map[string]string{ParamMaxIOPS: "0", ParamMinIOPS: "0", ParamMaxBandwidth: "0"}},
		{name: "leading zeros", p: map[string]string{ParamMaxIOPS: "0100"}, want: QoS{MaxIOPS: 100}},
		{name: "largest uint64", p: map[string]string{ParamMaxBandwidth: "18446744073709551615"}, want: QoS{MaxBytesPerSec: 1<<64 - 1}},
		{name: "empty values are absent", p: map[string]string{
			ParamMaxIOPS: "", ParamMinIOPS: "", ParamMaxBandwidth: "", ParamBurstDuration: ""}},
		{name: "minIOPS equal to maxIOPS", p: map[string]string{ParamMaxIOPS: "300", ParamMinIOPS: "300"},
			want: QoS{MaxIOPS: 300, MinIOPS: 300}},
		// maxIOPS 0 is "unlimited", so any minIOPS is below it.
		{name: "minIOPS with unlimited maxIOPS", p: map[string]string{ParamMaxIOPS: "0", ParamMinIOPS: "300"},
			want: QoS{MinIOPS: 300}},
		{name: "minIOPS with empty maxIOPS", p: map[string]string{ParamMaxIOPS: "", ParamMinIOPS: "300"},
			want: QoS{MinIOPS: 300}},

		{name: "minIOPS above maxIOPS", p: map[string]string{ParamMaxIOPS: "100", ParamMinIOPS: "101"}, badKey: ParamMinIOPS},
		{name: "minIOPS far above maxIOPS", p: map[string]string{ParamMaxIOPS: "1", ParamMinIOPS: "18446744073709551615"}, badKey: ParamMinIOPS},
		{name: "maxIOPS negative", p: map[string]string{ParamMaxIOPS: "-1"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS plus sign", p: map[string]string{ParamMaxIOPS: "+5"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS fraction", p: map[string]string{ParamMaxIOPS: "1.5"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS exponent", p: map[string]string{ParamMaxIOPS: "1e3"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS hex", p: map[string]string{ParamMaxIOPS: "0x10"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS underscore", p: map[string]string{ParamMaxIOPS: "1_000"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS space", p: map[string]string{ParamMaxIOPS: " 5"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS word", p: map[string]string{ParamMaxIOPS: "unlimited"}, badKey: ParamMaxIOPS},
		{name: "maxIOPS overflow", p: map[string]string{ParamMaxIOPS: "18446744073709551616"}, badKey: ParamMaxIOPS},
		{name: "minIOPS not a number", p: map[string]string{ParamMinIOPS: "ten"}, badKey: ParamMinIOPS},
		{name: "maxBandwidth with a unit", p: map[string]string{ParamMaxBandwidth: "100Mi"}, badKey: ParamMaxBandwidth},
		{name: "maxBandwidth negative", p: map[string]string{ParamMaxBandwidth: "-1"}, badKey: ParamMaxBandwidth},
		{name: "burstDuration zero", p: map[string]string{ParamBurstDuration: "0s"}, badKey: ParamBurstDuration},
		{name: "burstDuration bare zero", p: map[string]string{ParamBurstDuration: "0"}, badKey: ParamBurstDuration},
		{name: "burstDuration negative", p: map[string]string{ParamBurstDuration: "-1s"}, badKey: ParamBurstDuration},
		{name: "burstDuration without a unit", p: map[string]string{ParamBurstDuration: "5"}, badKey: ParamBurstDuration},
		{name: "burstDuration not a duration", p: map[string]string{ParamBurstDuration: "soon"}, badKey: ParamBurstDuration},
		{name: "burstDuration unknown unit", p: map[string]string{ParamBurstDuration: "1d"}, badKey: ParamBurstDuration},
		// One bad key among good ones is still refused, and named.
		{name: "bad bandwidth among good keys", p: map[string]string{
			ParamMaxIOPS: "10", ParamMinIOPS: "5", ParamMaxBandwidth: "fast", ParamBurstDuration: "1s"}, badKey: ParamMaxBandwidth},
		{name: "bad burst among good keys", p: map[string]string{
			ParamMaxIOPS: "10", ParamMinIOPS: "5", ParamMaxBandwidth: "10", ParamBurstDuration: "-5ms"}, badKey: ParamBurstDuration},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before map[string]string
			if tt.p != nil {
				before = make(map[string]string, len(tt.p))
				for k, v := range tt.p {
					before[k] = v
				}
			}
			got, err := ParseQoS(tt.p)
			if !reflect.DeepEqual(tt.p, before) {
				t.Errorf("ParseQoS changed its argument: %v, was %v", tt.p, before)
			}
			if tt.badKey != "" {
				if !errors.Is(err, ErrInvalidArgument) {
					t.Fatalf("ParseQoS(%v) = %+v, %v; want an error wrapping ErrInvalidArgument", tt.p, got, err)
				}
				if !strings.Contains(err.Error(), `"`+tt.badKey+`"`) {
					t.Errorf("ParseQoS(%v) error %q does not name %q", tt.p, err, tt.badKey)
				}
				if v := tt.p[tt.badKey]; tt.badKey != ParamMinIOPS && !strings.Contains(err.Error(), `"`+v+`"`) {
					t.Errorf("ParseQoS(%v) error %q does not quote the bad value %q", tt.p, err, v)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseQoS(%v): %v", tt.p, err)
			}
			if got != tt.want {
				t.Errorf("ParseQoS(%v) = %+v, want %+v", tt.p, got, tt.want)
			}
		})
	}
}

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
