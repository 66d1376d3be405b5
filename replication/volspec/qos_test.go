package volspec

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestDecodeQoS: the QoS keys in the stored form, as the store's
// SetParameters, the engine and the realizer read them (this was meta's
// ParseQoS, whose cases all still hold).
func TestDecodeQoS(t *testing.T) {
	tests := []struct {
		name string
		p    map[string]string
		want QoS
		// badKey, when set, is the key the error must name; the error
		// wraps ErrInvalid.
		badKey string
	}{
		{name: "nil map is unlimited", p: nil},
		{name: "empty map is unlimited", p: map[string]string{}},
		{name: "other keys are ignored", p: map[string]string{"replicas": "3", "fsType": "xfs", "maxiops": "x"}},
		{name: "every key", p: map[string]string{
			KeyMaxIOPS: "1000", KeyMinIOPS: "200", KeyMaxBandwidth: "104857600", KeyBurstDuration: "2s"},
			want: QoS{MaxIOPS: 1000, MinIOPS: 200, MaxBytesPerSec: 104857600, BurstDuration: 2 * time.Second}},
		{name: "maxIOPS alone", p: map[string]string{KeyMaxIOPS: "500"}, want: QoS{MaxIOPS: 500}},
		{name: "minIOPS alone", p: map[string]string{KeyMinIOPS: "500"}, want: QoS{MinIOPS: 500}},
		{name: "maxBandwidth alone", p: map[string]string{KeyMaxBandwidth: "1"}, want: QoS{MaxBytesPerSec: 1}},
		{name: "burstDuration alone", p: map[string]string{KeyBurstDuration: "250ms"}, want: QoS{BurstDuration: 250 * time.Millisecond}},
		{name: "burstDuration compound", p: map[string]string{KeyBurstDuration: "1m30s"}, want: QoS{BurstDuration: 90 * time.Second}},
		{name: "burstDuration one nanosecond", p: map[string]string{KeyBurstDuration: "1ns"}, want: QoS{BurstDuration: 1}},
		{name: "zero means unlimited", p: map[string]string{KeyMaxIOPS: "0", KeyMinIOPS: "0", KeyMaxBandwidth: "0"}},
		{name: "leading zeros", p: map[string]string{KeyMaxIOPS: "0100"}, want: QoS{MaxIOPS: 100}},
		{name: "largest uint64", p: map[string]string{KeyMaxBandwidth: "18446744073709551615"}, want: QoS{MaxBytesPerSec: 1<<64 - 1}},
		{name: "empty values are absent", p: map[string]string{
			KeyMaxIOPS: "", KeyMinIOPS: "", KeyMaxBandwidth: "", KeyBurstDuration: ""}},
		{name: "minIOPS equal to maxIOPS", p: map[string]string{KeyMaxIOPS: "300", KeyMinIOPS: "300"},
			want: QoS{MaxIOPS: 300, MinIOPS: 300}},
		// maxIOPS 0 is "unlimited", so any minIOPS is below it.
		{name: "minIOPS with unlimited maxIOPS", p: map[string]string{KeyMaxIOPS: "0", KeyMinIOPS: "300"},
			want: QoS{MinIOPS: 300}},
		{name: "minIOPS with empty maxIOPS", p: map[string]string{KeyMaxIOPS: "", KeyMinIOPS: "300"},
			want: QoS{MinIOPS: 300}},

		{name: "minIOPS above maxIOPS", p: map[string]string{KeyMaxIOPS: "100", KeyMinIOPS: "101"}, badKey: KeyMinIOPS},
		{name: "minIOPS far above maxIOPS", p: map[string]string{KeyMaxIOPS: "1", KeyMinIOPS: "18446744073709551615"}, badKey: KeyMinIOPS},
		{name: "maxIOPS negative", p: map[string]string{KeyMaxIOPS: "-1"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS plus sign", p: map[string]string{KeyMaxIOPS: "+5"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS fraction", p: map[string]string{KeyMaxIOPS: "1.5"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS exponent", p: map[string]string{KeyMaxIOPS: "1e3"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS hex", p: map[string]string{KeyMaxIOPS: "0x10"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS underscore", p: map[string]string{KeyMaxIOPS: "1_000"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS space", p: map[string]string{KeyMaxIOPS: " 5"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS word", p: map[string]string{KeyMaxIOPS: "unlimited"}, badKey: KeyMaxIOPS},
		{name: "maxIOPS overflow", p: map[string]string{KeyMaxIOPS: "18446744073709551616"}, badKey: KeyMaxIOPS},
		{name: "minIOPS not a number", p: map[string]string{KeyMinIOPS: "ten"}, badKey: KeyMinIOPS},
		{name: "maxBandwidth with a unit", p: map[string]string{KeyMaxBandwidth: "100Mi"}, badKey: KeyMaxBandwidth},
		{name: "maxBandwidth negative", p: map[string]string{KeyMaxBandwidth: "-1"}, badKey: KeyMaxBandwidth},
		{name: "burstDuration zero", p: map[string]string{KeyBurstDuration: "0s"}, badKey: KeyBurstDuration},
		{name: "burstDuration bare zero", p: map[string]string{KeyBurstDuration: "0"}, badKey: KeyBurstDuration},
		{name: "burstDuration negative", p: map[string]string{KeyBurstDuration: "-1s"}, badKey: KeyBurstDuration},
		{name: "burstDuration without a unit", p: map[string]string{KeyBurstDuration: "5"}, badKey: KeyBurstDuration},
		{name: "burstDuration not a duration", p: map[string]string{KeyBurstDuration: "soon"}, badKey: KeyBurstDuration},
		{name: "burstDuration unknown unit", p: map[string]string{KeyBurstDuration: "1d"}, badKey: KeyBurstDuration},
		// One bad key among good ones is still refused, and named.
		{name: "bad bandwidth among good keys", p: map[string]string{
			KeyMaxIOPS: "10", KeyMinIOPS: "5", KeyMaxBandwidth: "fast", KeyBurstDuration: "1s"}, badKey: KeyMaxBandwidth},
		{name: "bad burst among good keys", p: map[string]string{
			KeyMaxIOPS: "10", KeyMinIOPS: "5", KeyMaxBandwidth: "10", KeyBurstDuration: "-5ms"}, badKey: KeyBurstDuration},
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
			s, err := Decode(tt.p)
			got := s.QoS
			if !reflect.DeepEqual(tt.p, before) {
				t.Errorf("Decode changed its argument: %v, was %v", tt.p, before)
			}
			if tt.badKey != "" {
				if !errors.Is(err, ErrInvalid) {
					t.Fatalf("Decode(%v) = %+v, %v; want an error wrapping ErrInvalid", tt.p, got, err)
				}
				if !strings.Contains(err.Error(), `"`+tt.badKey+`"`) {
					t.Errorf("Decode(%v) error %q does not name %q", tt.p, err, tt.badKey)
				}
				if v := tt.p[tt.badKey]; tt.badKey != KeyMinIOPS && !strings.Contains(err.Error(), `"`+v+`"`) {
					t.Errorf("Decode(%v) error %q does not quote the bad value %q", tt.p, err, v)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode(%v): %v", tt.p, err)
			}
			if got != tt.want {
				t.Errorf("Decode(%v) = %+v, want %+v", tt.p, got, tt.want)
			}
		})
	}
}
