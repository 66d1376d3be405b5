package cron

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func at(s string) time.Time {
	t, err := time.Parse("2006-01-02 15:04", s)
	if err != nil {
		panic(err)
	}
	return t
}

func TestNextAndPrev(t *testing.T) {
	cases := []struct {
		expr, from, next, prev string
	}{
		{"0 */6 * * *", "2026-12-05 11:50", "2026-12-05 12:00", "2026-12-05 06:00"},
		{"0 */6 * * *", "2026-12-05 12:00", "2026-12-05 18:00", "2026-12-05 12:00"},
		{"30 2 * * *", "2026-12-31 03:00", "2027-01-01 02:30", "2026-12-31 02:30"},
		{"*/15 9-17 * * MON-FRI", "2026-12-05 10:00", "2026-12-07 09:00", "2026-12-04 17:45"}, // a Saturday
		{"0 0 1 */3 *", "2026-12-05 00:00", "2027-01-01 00:00", "2026-10-01 00:00"},
		// Day of month and day of week both restricted: either matches.
		{"0 12 13 * 5", "2026-12-05 00:00", "2026-12-11 12:00", "2026-12-04 12:00"},
		{"0 0 * * 7", "2026-12-05 00:00", "2026-12-06 00:00", "2026-11-29 00:00"}, // 7 is Sunday
		{"5/20 * * * *", "2026-12-05 10:26", "2026-12-05 10:45", "2026-12-05 10:25"},
		{"0 0 29 feb *", "2026-12-05 00:00", "2028-02-29 00:00", "2024-02-29 00:00"},
	}
	for _, c := range cases {
		s, err := Parse(c.expr)
		if err != nil {
			t.Fatalf("%q: %v", c.expr, err)
		}
		if got, ok := s.Next(at(c.from)); !ok || !got.Equal(at(c.next)) {
			t.Errorf("%q Next(%s) = %v %v, want %s", c.expr, c.from, got, ok, c.next)
		}
		if got, ok := s.Prev(at(c.from)); !ok || !got.Equal(at(c.prev)) {
			t.Errorf("%q Prev(%s) = %v %v, want %s", c.expr, c.from, got, ok, c.prev)
		}
	}
}

func TestNoSlot(t *testing.T) {
	s, err := Parse("0 0 30 2 *")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Next(at("2026-01-01 00:00")); ok {
		t.Fatal("February 30th has a slot")
	}
	if _, ok := s.Due(time.Time{}, at("2026-01-01 00:00")); ok {
		t.Fatal("February 30th is due")
	}
}

// TestMissedSlotsAreTakenOnce: after the scheduler was down over several
// slots, one is due (the latest), and once taken nothing is due until the
// next slot.
func TestMissedSlotsAreTakenOnce(t *testing.T) {
	s, err := Parse("0 */6 * * *")
	if err != nil {
		t.Fatal(err)
	}
	last := at("2026-12-04 06:00")
	now := at("2026-12-05 13:10") // 12:00, 18:00, 00:00, 06:00 and 12:00 were missed
	slot, ok := s.Due(last, now)
	if !ok || !slot.Equal(at("2026-12-05 12:00")) {
		t.Fatalf("Due = %v %v, want the latest missed slot", slot, ok)
	}
	if _, ok := s.Due(slot, now.Add(time.Hour)); ok {
		t.Fatal("a slot is due again before the next one")
	}
	if slot2, ok := s.Due(slot, at("2026-12-05 18:00")); !ok || !slot2.Equal(at("2026-12-05 18:00")) {
		t.Fatalf("the next slot: %v %v", slot2, ok)
	}
	if first, ok := s.Due(time.Time{}, now); !ok || !first.Equal(at("2026-12-05 12:00")) {
		t.Fatalf("the first slot of a new schedule: %v %v", first, ok)
	}
}

func TestParseErrorsNameTheField(t *testing.T) {
	cases := map[string]string{
		"0 */6 * *":       "has 4 fields",
		"60 * * * *":      "field 1 (minute)",
		"0 24 * * *":      "field 2 (hour)",
		"0 0 0 * *":       "field 3 (day of month)",
		"0 0 * 13 *":      "field 4 (month)",
		"0 0 * * 8":       "field 5 (day of week)",
		"0 0 * * FOO":     "or a name (SUN-SAT)",
		"*/0 * * * *":     "step",
		"0 10-2 * * *":    "runs backwards",
		"0 0 * JAN-x *":   "field 4 (month)",
		"0 0 1,x * *":     "field 3 (day of month)",
		"0 0 1 1 1 extra": "has 6 fields",
	}
	for expr, want := range cases {
		_, err := Parse(expr)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), want) {
			t.Errorf("Parse(%q) = %v, want an ErrInvalid naming %q", expr, err, want)
		}
	}
	if s, err := Parse("  0   */6 * * *  "); err != nil || s.String() != "0 */6 * * *" {
		t.Fatalf("spaces: %v %v", s, err)
	}
}
