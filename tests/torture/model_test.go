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

// TestJudgeAt checks the verdicts on a snapshot's blocks against a block's
// history: with the snapshot asked for at 10 and ready at 20, block 1
// wrote 1 (acknowledged at 2), 2 (acknowledged at 5), 3 (started at 8,
// acknowledged at 12), 4 (started at 15, failed) and 5 (started at 25).
func TestJudgeAt(t *testing.T) {
	const salt = 0xbeef
	m := newModel(8*blockSize, salt)
	t0 := time.Unix(1000, 0)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	for _, w := range []struct {
		id         uint64
		start, end int
		err        error
	}{{1, 1, 2, nil}, {2, 4, 5, nil}, {3, 8, 12, nil}, {4, 15, 18, errors.New("EIO")}, {5, 25, 26, nil}} {
		m.begin(1)
		m.startAt(1, w.id, at(w.start), false)
		m.endAt(1, w.id, w.err, at(w.end))
	}
	// Block 2: written once, acknowledged only after the call.
	m.begin(2)
	m.startAt(2, 6, at(9), false)
	m.endAt(2, 6, nil, at(11))
	content := func(id uint64, b int) []byte {
		p := make([]byte, blockSize)
		blockContent(p, salt, id, b)
		return p
	}
	torn := content(3, 1)
	copy(torn[blockSize/2:], content(2, 1)[blockSize/2:])
	for _, tc := range []struct {
		name  string
		block int
		got   []byte
		want  verdict
	}{
		{"never written, zeroes", 0, content(0, 0), blockOK},
		{"last acknowledged before the call", 1, content(2, 1), blockOK},
		{"acknowledged after the call, started before", 1, content(3, 1), blockOK},
		{"failed, started before ready", 1, content(4, 1), blockOK},
		{"an older write", 1, content(1, 1), blockStale},
		{"started after ready", 1, content(5, 1), blockNewer},
		{"zeroes where a write was acknowledged", 1, content(0, 1), blockLost},
		{"torn", 1, torn, blockLost},
		{"another block's write", 1, content(6, 2), blockLost},
		{"zeroes before the first acknowledgement", 2, content(0, 2), blockOK},
		{"the first write, in flight at the call", 2, content(6, 2), blockOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := m.judgeAt(tc.block, tc.got, make([]byte, blockSize), at(10), at(20))
			if got != tc.want {
				t.Errorf("verdict %d (%s), want %d", got, why, tc.want)
			}
		})
	}
}
