// Package cron reads standard 5-field cron expressions, for scheduled
// snapshots (the StorageClass parameter snapshotSchedule, issue 12), and
// says which slot is due.
//
// The fields are minute (0-59), hour (0-23), day of month (1-31), month
// (1-12 or JAN-DEC) and day of week (0-7, 0 and 7 both Sunday, or SUN-SAT).
// Each field is "*" or a comma-separated list of values, ranges "a-b", and
// steps "*/n" or "a-b/n" (or "a/n": from a to the field's end). As in
// cron, when both day of month and day of week are restricted (neither is
// "*"), a day matches if either does. Times are taken in the location of
// the time given (the store uses UTC).
package cron

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ErrInvalid is wrapped by every parse error.
var ErrInvalid = errors.New("invalid cron expression")

// Schedule is a parsed expression.
type Schedule struct {
	expr                         string
	minute, hour, dom, month     uint64 // bit i set: value i matches
	dow                          uint64 // bits 0-6, Sunday 0
	domRestricted, dowRestricted bool
}

type field struct {
	name     string
	min, max int
	names    []string // names[i] stands for min+i
}

var fields = [5]field{
	{name: "minute", min: 0, max: 59},
	{name: "hour", min: 0, max: 23},
	{name: "day of month", min: 1, max: 31},
	{name: "month", min: 1, max: 12, names: []string{"JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"}},
	{name: "day of week", min: 0, max: 7, names: []string{"SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"}},
}

// Parse reads a 5-field expression. An error names the field that is wrong
// and what it accepts.
func Parse(expr string) (*Schedule, error) {
	parts := strings.Fields(expr)
	if len(parts) != 5 {
		return nil, fmt.Errorf("%w: %q has %d fields, want 5 (minute hour day-of-month month day-of-week)", ErrInvalid, expr, len(parts))
	}
	s := &Schedule{expr: strings.Join(parts, " ")}
	dst := []*uint64{&s.minute, &s.hour, &s.dom, &s.month, &s.dow}
	for i, p := range parts {
		bits, err := parseField(p, fields[i])
		if err != nil {
			return nil, fmt.Errorf("%w: field %d (%s) %q: %v", ErrInvalid, i+1, fields[i].name, p, err)
		}
		*dst[i] = bits
	}
	if s.dow&(1<<7) != 0 { // 7 is Sunday too
		s.dow = s.dow&^(1<<7) | 1
	}
	s.domRestricted = parts[2] != "*"
	s.dowRestricted = parts[4] != "*"
	return s, nil
}

func parseField(p string, f field) (uint64, error) {
	var bits uint64
	for item := range strings.SplitSeq(p, ",") {
		rng, stepStr, hasStep := strings.Cut(item, "/")
		step := 1
		if hasStep {
			n, err := strconv.Atoi(stepStr)
			if err != nil || n < 1 || n > f.max-f.min+1 {
				return 0, fmt.Errorf("step %q is not a number from 1 to %d", stepStr, f.max-f.min+1)
			}
			step = n
		}
		lo, hi := f.min, f.max
		switch {
		case rng == "*":
		case strings.Contains(rng, "-"):
			a, b, _ := strings.Cut(rng, "-")
			var err error
			if lo, err = value(a, f); err != nil {
				return 0, err
			}
			if hi, err = value(b, f); err != nil {
				return 0, err
			}
			if lo > hi {
				return 0, fmt.Errorf("range %q runs backwards", rng)
			}
		default:
			v, err := value(rng, f)
			if err != nil {
				return 0, err
			}
			lo = v
			if !hasStep {
				hi = v
			}
		}
		for v := lo; v <= hi; v += step {
			bits |= 1 << v
		}
	}
	return bits, nil
}

func value(s string, f field) (int, error) {
	for i, n := range f.names {
		if strings.EqualFold(s, n) {
			return f.min + i, nil
		}
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < f.min || v > f.max {
		accepted := fmt.Sprintf("a number from %d to %d", f.min, f.max)
		if f.names != nil {
			accepted += fmt.Sprintf(" or a name (%s-%s)", f.names[0], f.names[len(f.names)-1])
		}
		return 0, fmt.Errorf("%q is not %s", s, accepted)
	}
	return v, nil
}

// String returns the expression as parsed (fields separated by one space).
func (s *Schedule) String() string { return s.expr }

// horizon bounds the search for a slot: an expression that matches no day
// in that long (February 30th) has no slot.
const horizon = 5 * 366

func (s *Schedule) dayMatches(t time.Time) bool {
	if s.month&(1<<int(t.Month())) == 0 {
		return false
	}
	dom := s.dom&(1<<t.Day()) != 0
	dow := s.dow&(1<<int(t.Weekday())) != 0
	if s.domRestricted && s.dowRestricted {
		return dom || dow
	}
	return dom && dow
}

// Next returns the first slot strictly after t, and false if there is none
// within five years.
func (s *Schedule) Next(t time.Time) (time.Time, bool) {
	t = t.Truncate(time.Minute).Add(time.Minute)
	day := time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, t.Location())
	for range horizon {
		if s.dayMatches(day) {
			from := 0
			if day.Equal(time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, t.Location())) {
				from = t.Hour()*60 + t.Minute()
			}
			for m := from; m < 24*60; m++ {
				if s.hour&(1<<(m/60)) != 0 && s.minute&(1<<(m%60)) != 0 {
					return time.Date(day.Year(), day.Month(), day.Day(), m/60, m%60, 0, 0, day.Location()), true
				}
			}
		}
		day = day.AddDate(0, 0, 1)
	}
	return time.Time{}, false
}

// Prev returns the last slot at or before t, and false if there is none
// within five years.
func (s *Schedule) Prev(t time.Time) (time.Time, bool) {
	t = t.Truncate(time.Minute)
	day := time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, t.Location())
	for range horizon {
		if s.dayMatches(day) {
			from := 24*60 - 1
			if day.Equal(time.Date(t.Year(), t.Month(), t.Day(), 0, 0, 0, 0, t.Location())) {
				from = t.Hour()*60 + t.Minute()
			}
			for m := from; m >= 0; m-- {
				if s.hour&(1<<(m/60)) != 0 && s.minute&(1<<(m%60)) != 0 {
					return time.Date(day.Year(), day.Month(), day.Day(), m/60, m%60, 0, 0, day.Location()), true
				}
			}
		}
		day = day.AddDate(0, 0, -1)
	}
	return time.Time{}, false
}

// Due says which slot to take now, given the slot taken last (zero: none
// yet): the latest slot after last and at or before now. However many
// slots were missed (the scheduler was down), one is due, once: the
// latest. false: nothing is due.
func (s *Schedule) Due(last, now time.Time) (time.Time, bool) {
	slot, ok := s.Prev(now)
	if !ok || !slot.After(last) {
		return time.Time{}, false
	}
	return slot, true
}
