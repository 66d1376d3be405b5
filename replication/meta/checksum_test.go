package meta

import (
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/cairn-csi/cairn/replication/volspec"
)

func TestChecksumAlgorithmParameter(t *testing.T) {
	for in, want := range map[string]bool{"": true, "crc32c": true, "none": false, "md5": false} {
		if got := (&Volume{Parameters: map[string]string{volspec.KeyChecksumAlgorithm: in}}).Checksummed(); got != want {
			t.Errorf("%q: Checksummed %v, want %v", in, got, want)
		}
	}
	_, err := (&Volume{Parameters: map[string]string{volspec.KeyChecksumAlgorithm: "md5"}}).Spec()
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), volspec.KeyChecksumAlgorithm) || !strings.Contains(err.Error(), "md5") {
		t.Fatalf("unknown value: %v, want ErrInvalidArgument naming the key and the value", err)
	}
	if !(&Volume{}).Checksummed() || (&Volume{Parameters: map[string]string{volspec.KeyChecksumAlgorithm: "none"}}).Checksummed() {
		t.Fatal("Checksummed: default must be on, none off")
	}
	// A bad value of another key does not turn checksums off (or on).
	if !(&Volume{Parameters: map[string]string{volspec.KeyMaxIOPS: "lots"}}).Checksummed() ||
		(&Volume{Parameters: map[string]string{volspec.KeyMaxIOPS: "lots", volspec.KeyChecksumAlgorithm: "none"}}).Checksummed() {
		t.Fatal("Checksummed depends on another key's value")
	}
}

// TestApplyVolumeConditionAndScrub: the condition and the scrub progress
// change nothing but themselves, survive encoding, and refuse bad input.
func TestApplyVolumeConditionAndScrub(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	h.createVolume("v1", 1, 3)
	before := h.volume("v1")
	res := h.must(&SetVolumeCondition{VolumeID: "v1", Abnormal: true, Message: "block 7 verifies on no replica"})
	after := h.volume("v1")
	if !reflect.DeepEqual(res.Volume, after) || after.Condition == nil || !after.Condition.Abnormal || after.Condition.Message == "" {
		t.Fatalf("condition not recorded: %+v", after.Condition)
	}
	if after.Epoch != before.Epoch {
		t.Fatal("a condition moved the epoch")
	}
	h.must(&SetVolumeCondition{VolumeID: "v1"})
	if c := h.volume("v1").Condition; c != nil {
		t.Fatalf("condition %+v after clearing", c)
	}
	h.fails(&SetVolumeCondition{VolumeID: "v1", Abnormal: true, Message: strings.Repeat("x", 2000)}, ErrInvalidArgument)
	h.fails(&SetVolumeCondition{VolumeID: "nope", Abnormal: true}, ErrNotFound)

	p := ScrubProgress{Seq: 3, BlocksTotal: 100, BlocksChecked: 40, Repaired: 1}
	h.must(&ScrubProgressUpdate{VolumeID: "v1", Progress: p})
	if got := h.volume("v1").Scrub; got == nil || *got != p {
		t.Fatalf("scrub progress %+v, want %+v", got, p)
	}
	h.fails(&ScrubProgressUpdate{VolumeID: "v1", Progress: ScrubProgress{Seq: 3, BlocksTotal: 1, BlocksChecked: 2}}, ErrInvalidArgument)
	// The next scrub is asked for; a late report of scrub 3 must not undo it.
	next := ScrubProgress{Seq: 4}
	h.must(&ScrubProgressUpdate{VolumeID: "v1", Progress: next})
	h.fails(&ScrubProgressUpdate{VolumeID: "v1", Progress: ScrubProgress{Seq: 3, BlocksTotal: 100, BlocksChecked: 100, Done: true}}, ErrFailedPrecondition)
	if got := h.volume("v1").Scrub; got == nil || *got != next {
		t.Fatalf("scrub after a stale report %+v, want %+v", got, next)
	}

	for _, c := range []Command{&SetVolumeCondition{VolumeID: "v1", Abnormal: true, Message: "m"}, &ScrubProgressUpdate{VolumeID: "v1", Progress: p}} {
		b, err := Encode(c)
		if err != nil {
			t.Fatal(err)
		}
		got, err := Decode(b)
		if err != nil || !reflect.DeepEqual(got, c) {
			t.Fatalf("%T round trip: %+v, %v", c, got, err)
		}
	}
}
