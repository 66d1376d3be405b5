package main

import (
	"errors"
	"testing"
	"time"
)

// TestJudge checks the model's verdicts on hand-made block contents: the
// last acknowledged write and uncertain ones after it pass; an older write
// is stale; zeroes, a flipped bit, another block's or another round's write
// are lost.
func TestJudge(t *testing.T) {
	const salt = 0xfeed
	m := newModel(8*blockSize, salt)
	// Block 1: acknowledged 1, then 2; then 3 failed (uncertain).
	for _, w := range []struct {
		id  uint64
		err error
	}{{1, nil}, {2, nil}, {3, errors.New("EIO")}} {
		m.begin(1)
		m.end(1, w.id, w.err)
	}
	content := func(salt, id uint64, b int) []byte {
		p := make([]byte, blockSize)
		blockContent(p, salt, id, b)
		return p
	}
	flipped := content(salt, 2, 1)
	flipped[1000] ^= 0x10
	for _, tc := range []struct {
		name  string
		block int
		got   []byte
		want  verdict
	}{
		{"never written, zeroes", 0, content(salt, 0, 0), blockOK},
		{"last acknowledged", 1, content(salt, 2, 1), blockOK},
		{"uncertain after it", 1, content(salt, 3, 1), blockOK},
		{"older write", 1, content(salt, 1, 1), blockStale},
		{"zeroes", 1, content(salt, 0, 1), blockLost},
		{"a flipped bit", 1, flipped, blockLost},
		{"another block's write", 1, content(salt, 2, 2), blockLost},
		{"another round's write", 1, content(salt+1, 2, 1), blockLost},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := m.judge(tc.block, tc.got, make([]byte, blockSize))
			if got != tc.want {
				t.Errorf("verdict %d (%s), want %d", got, why, tc.want)
			}
		})
	}
}

// TestSchedule checks that each pass of the schedule runs every kind once.
func TestSchedule(t *testing.T) {
	c := &campaign{o: &options{seed: 7, rounds: 25, kinds: faultKinds}}
	s := c.schedule()
	if len(s) != 25 {
		t.Fatalf("%d rounds, want 25", len(s))
	}
	for pass := 0; pass+len(faultKinds) <= len(s); pass += len(faultKinds) {
		seen := map[Kind]bool{}
		for _, k := range s[pass : pass+len(faultKinds)] {
			seen[k.kind] = true
		}
		if len(seen) != len(faultKinds) {
			t.Errorf("pass at round %d covers %d of %d kinds", pass+1, len(seen), len(faultKinds))
		}
	}
}

func TestParseBounds(t *testing.T) {
	for _, tc := range []struct {
		in     string
		lo, hi time.Duration
		bad    bool
	}{
		{"3s:8s", 3 * time.Second, 8 * time.Second, false},
		{"2s", 2 * time.Second, 2 * time.Second, false},
		{"8s:3s", 0, 0, true},
		{"0s", 0, 0, true},
		{"x", 0, 0, true},
	} {
		lo, hi, err := parseBounds(tc.in)
		if (err != nil) != tc.bad || lo != tc.lo || hi != tc.hi {
			t.Errorf("parseBounds(%q) = %v, %v, %v", tc.in, lo, hi, err)
		}
	}
}
