package volspec

import (
	"errors"
	"maps"
	"strings"
	"testing"

	"github.com/cairn-csi/cairn/replication/cron"
)

// TestSnapshotScheduleParam: a cron expression is accepted and stored as
// cron reads it back; a bad one is refused naming the key and the field that
// is wrong, in the request form (a StorageClass) and in the stored form (the
// store's CreateVolume).
func TestSnapshotScheduleParam(t *testing.T) {
	s, err := Parse(map[string]string{KeySnapshotSchedule: " 0  */6 * * * ", KeySnapshotRetain: "3"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{KeyDataLocality: LocalityBestEffort, KeySnapshotSchedule: "0 */6 * * *", KeySnapshotRetain: "3"}
	if s.SnapshotSchedule != "0 */6 * * *" || s.Retain() != 3 || !maps.Equal(s.Params(), want) {
		t.Fatalf("spec %+v, params %v; want schedule %q, retain 3, params %v", s, s.Params(), "0 */6 * * *", want)
	}
	if sched, err := s.Schedule(); err != nil || sched.String() != "0 */6 * * *" {
		t.Fatalf("Schedule() = %v, %v", sched, err)
	}
	back, err := Decode(s.Params())
	back.Replicas = s.Replicas
	if err != nil || back != s {
		t.Fatalf("Decode(Params()) = %+v, %v; want %+v", back, err, s)
	}
	// Two spellings of one schedule are the same value (a --param given
	// twice, a retry) and record the same map.
	if !SameValue(KeySnapshotSchedule, "0 */6 * * *", "0\t*/6 * * *") || SameValue(KeySnapshotSchedule, "0 */6 * * *", "0 */4 * * *") {
		t.Fatal("SameValue of schedules")
	}

	for _, in := range []map[string]string{nil, {KeySnapshotSchedule: ""}, {KeySnapshotSchedule: "  "}} {
		s, err := Parse(in)
		if err != nil || s.SnapshotSchedule != "" || s.Retain() != DefaultSnapshotRetain {
			t.Fatalf("Parse(%v) = %+v, %v; want no schedule and retain %d", in, s, err, DefaultSnapshotRetain)
		}
		if sched, err := s.Schedule(); sched != nil || err != nil {
			t.Fatalf("no schedule: Schedule() = %v, %v", sched, err)
		}
		if _, ok := s.Params()[KeySnapshotSchedule]; ok {
			t.Fatal("no schedule is recorded; volumes made before the key existed would stop matching their retries")
		}
	}

	for _, c := range []struct {
		expr    string
		mention []string
	}{
		{"0 25 * * *", []string{"field 2 (hour)", `"25"`, "0 to 23"}},
		{"*/0 * * * *", []string{"field 1 (minute)", "step"}},
		{"0 0 * JANUARY *", []string{"field 4 (month)", "JAN-DEC"}},
		{"0 0 * * 8", []string{"field 5 (day of week)"}},
		{"0 */6 * *", []string{"4 fields, want 5"}},
		{"@daily", []string{"1 fields, want 5"}},
	} {
		for name, parse := range map[string]func(map[string]string) (Spec, error){"Parse": Parse, "Decode": Decode} {
			_, err := parse(map[string]string{KeySnapshotSchedule: c.expr})
			var e *Error
			if !errors.As(err, &e) || e.Key != KeySnapshotSchedule || !errors.Is(err, ErrInvalid) {
				t.Errorf("%s(%q) = %v; want an *Error for %s", name, c.expr, err, KeySnapshotSchedule)
				continue
			}
			for _, m := range append([]string{`"snapshotSchedule"`, "cron expression"}, c.mention...) {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("%s(%q): %q does not mention %s", name, c.expr, err, m)
				}
			}
		}
	}
	// The schedule's parser is cron's, so the two never disagree on what
	// an expression means.
	if _, err := cron.Parse("0 25 * * *"); !errors.Is(err, cron.ErrInvalid) {
		t.Fatal(err)
	}
}

func TestSnapshotRetainParam(t *testing.T) {
	for v, want := range map[string]int{"1": 1, "7": 7, " 30 ": 30} {
		s, err := Parse(map[string]string{KeySnapshotRetain: v})
		if err != nil || s.Retain() != want {
			t.Errorf("Parse(snapshotRetain=%q) = %+v, %v; want %d", v, s, err, want)
		}
	}
	if s := Default(); s.Retain() != DefaultSnapshotRetain || s.Params()[KeySnapshotRetain] != "" {
		t.Fatalf("default retain: %d, stored %q", s.Retain(), s.Params()[KeySnapshotRetain])
	}
	for _, v := range []string{"0", "-1", "seven", "1.5", ""} {
		_, err := Parse(map[string]string{KeySnapshotRetain: v})
		var e *Error
		if !errors.As(err, &e) || e.Key != KeySnapshotRetain || !strings.Contains(err.Error(), `"snapshotRetain"`) || !strings.Contains(err.Error(), "1 or more") {
			t.Errorf("Parse(snapshotRetain=%q) = %v; want an error naming the key and what it takes", v, err)
		}
	}
	if _, err := Decode(map[string]string{KeySnapshotRetain: "0"}); err == nil {
		t.Error("Decode accepts snapshotRetain 0")
	}
	if Mutable(KeySnapshotSchedule) || Mutable(KeySnapshotRetain) {
		t.Error("the schedule's keys are mutable; an older member's SetParameters would refuse them")
	}
}

// TestSnapshotLimitParam: the default (64) is not recorded; 1 to 128 are;
// anything else is refused naming the key and the range.
func TestSnapshotLimitParam(t *testing.T) {
	if s := Default(); s.Limit() != DefaultSnapshotLimit || s.Params()[KeySnapshotLimit] != "" {
		t.Fatalf("default limit: %d, stored %q", s.Limit(), s.Params()[KeySnapshotLimit])
	}
	s, err := Parse(map[string]string{KeySnapshotLimit: "10"})
	if err != nil || s.Limit() != 10 || s.Params()[KeySnapshotLimit] != "10" {
		t.Fatalf("limit 10: %d, %v, stored %q", s.Limit(), err, s.Params()[KeySnapshotLimit])
	}
	for _, v := range []string{"0", "-1", "129", "many", ""} {
		_, err := Parse(map[string]string{KeySnapshotLimit: v})
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `"snapshotLimit"`) || !strings.Contains(err.Error(), "1 to 128") {
			t.Errorf("snapshotLimit %q: %v, want an error naming the key and the range", v, err)
		}
	}
}
