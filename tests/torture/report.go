package main

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// kindSummary is the rounds of one fault kind taken together.
type kindSummary struct {
	k                  *faultKind
	rounds             int
	acked, writeErrors int64
	readErrors         int64
	lost, stale        int
	divergent          int // extents, summed over rounds
	unhealed, errors   int // rounds
	heals              []time.Duration
	maxAck             time.Duration
	takeovers          []time.Duration
	snap               snapResult // summed over rounds
	subs               []string   // the faults a kind made of others injected, with their counts
	failedRounds       []result
}

func summarize(kinds []*faultKind, results []result) []*kindSummary {
	var out []*kindSummary
	for _, k := range kinds {
		s := &kindSummary{k: k}
		for _, r := range results {
			if r.kind != k.kind {
				continue
			}
			s.rounds++
			s.acked += r.acked
			s.writeErrors += r.writeErrors
			s.readErrors += r.readErrors
			s.lost += r.lost
			s.stale += r.stale
			s.divergent += r.divergent
			if r.err != nil {
				s.errors++
			}
			if r.healed {
				s.heals = append(s.heals, r.heal)
			} else {
				s.unhealed++
			}
			s.maxAck = max(s.maxAck, r.maxAck)
			if r.takeover > 0 {
				s.takeovers = append(s.takeovers, r.takeover)
			}
			s.snap.add(r.snap)
			if r.sub != "" {
				s.subs = append(s.subs, string(r.sub))
			}
			if r.failed() {
				s.failedRounds = append(s.failedRounds, r)
			}
		}
		if s.rounds > 0 {
			out = append(out, s)
		}
	}
	return out
}

// failed: data lost, stale or divergent, a volume not healed, or a round
// that could not finish.
func (s *kindSummary) failed() bool { return len(s.failedRounds) > 0 }

// missesTarget reports whether the kind missed the stall or
// takeover target in some round.
func (s *kindSummary) missesTarget() bool {
	if t := s.k.stallTarget; t > 0 && s.maxAck > t {
		return true
	}
	if t := s.k.takeoverTarget; t > 0 && len(s.takeovers) > 0 && slices.Max(s.takeovers) > t {
		return true
	}
	return false
}

// printReport writes the table per fault kind, then what each failed round
// found. It returns whether the campaign failed (with strict, a missed
// target counts).
func printReport(w io.Writer, o *options, results []result, took time.Duration, env string) bool {
	sums := summarize(o.kinds, results)
	fmt.Fprintf(w, "\ncairn torture: seed %d, %d rounds, faults held %v–%v, %s volumes, %d writes in flight, took %v\n%s\n\n",
		o.seed, len(results), o.holdMin, o.holdMax, formatBytes(o.size), o.qd, took.Round(time.Second), env)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "fault kind\trounds\tacked\twrite errors\tread errors\tlost\tstale\tdivergent\tunhealed\terrors\theal p50\theal max\tlongest acked write\ttakeover max\tverdict\t")
	failed := false
	for _, s := range sums {
		verdict := "ok"
		switch {
		case s.failed():
			verdict = "FAIL"
		case s.missesTarget():
			verdict = "misses target"
		}
		if s.failed() || (o.strict && s.missesTarget()) {
			failed = true
		}
		healP50, healMax := "-", "-"
		if len(s.heals) > 0 {
			healP50, healMax = dur(percentile(s.heals, 0.5)), dur(slices.Max(s.heals))
		}
		takeover := "-"
		if len(s.takeovers) > 0 {
			takeover = withTarget(slices.Max(s.takeovers), s.k.takeoverTarget)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t\n",
			s.k.kind, s.rounds, s.acked, s.writeErrors, s.readErrors, s.lost, s.stale, s.divergent, s.unhealed, s.errors,
			healP50, healMax, withTarget(s.maxAck, s.k.stallTarget), takeover, verdict)
	}
	_ = tw.Flush()
	fmt.Fprint(w, `
  acked: writes acknowledged; write errors: writes answered with an error or cut off (their outcome is unknown);
  read errors: the same for the single-block reads made beside the writes. lost: blocks read back (beside the
  writes, or in the full read at the end) as no write of theirs (zeroes, corrupt, torn, misplaced); stale: as an
  older write (an acknowledged one rolled back); divergent: extents where healthy replicas differ (volume verify).
  unhealed: rounds whose volume was not fully healthy within the heal timeout; errors: rounds that could not finish.
  heal: from lifting the fault to all replicas healthy. longest acked write: while the fault lasted, until healed.
  takeover: from the fault to the first write acknowledged through the export on another node.
  Targets (issue #10): no acknowledged write waits more than 2s because of one frozen or partitioned replica
  (stop-replica, slow-replica, partition); takeover off a frozen exporter under 3s (stop-engine).
`)
	printSnapshotReport(w, sums)
	for _, s := range sums {
		for _, r := range s.failedRounds {
			kind := string(r.kind)
			if r.sub != "" {
				kind += ", " + string(r.sub)
			}
			fmt.Fprintf(w, "\nround %d (%s) failed:", r.n, kind)
			if r.err != nil {
				fmt.Fprintf(w, " %v", r.err)
			}
			if !r.healed && r.err == nil {
				fmt.Fprint(w, " not healed")
			}
			fmt.Fprintln(w)
			for _, p := range r.problems {
				fmt.Fprintf(w, "  %s\n", p)
			}
			for _, n := range r.notes {
				fmt.Fprintf(w, "  note: %s\n", n)
			}
		}
	}
	return failed
}

// printSnapshotReport writes the snapshot figures of the kinds that took
// snapshots, if any did.
func printSnapshotReport(w io.Writer, sums []*kindSummary) {
	if !slices.ContainsFunc(sums, func(s *kindSummary) bool { return s.snap.taken > 0 }) {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "snapshots of\trounds\ttaken\tready\tready late\tnever ready\trestores checked\tlost\tstale\tnewer\tdivergent\tdeletions resumed\tkills mid-merge\tlayers left\tverdict\t")
	for _, s := range sums {
		if s.snap.taken == 0 {
			continue
		}
		verdict := "ok"
		if s.snap.failed() {
			verdict = "FAIL"
		}
		sn := s.snap
		deletions, kills := "-", "-"
		if sn.deletions > 0 {
			deletions = fmt.Sprintf("%d/%d", sn.resumed, sn.deletions)
		}
		if sn.kills > 0 {
			kills = fmt.Sprintf("%d/%d", sn.killsMidMerge, sn.kills)
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\t%d\t%s\t\n",
			s.k.kind, s.rounds, sn.taken, sn.ready, sn.late, sn.stuck, sn.restores, sn.lost, sn.stale, sn.newer, sn.divergent,
			deletions, kills, sn.leftover, verdict)
	}
	_ = tw.Flush()
	for _, s := range sums {
		if len(s.subs) > 0 {
			counts := map[string]int{}
			for _, k := range s.subs {
				counts[k]++
			}
			var parts []string
			for _, k := range slices.Sorted(maps.Keys(counts)) {
				parts = append(parts, fmt.Sprintf("%s %d", k, counts[k]))
			}
			fmt.Fprintf(w, "  %s rounds injected: %s\n", s.k.kind, strings.Join(parts, ", "))
		}
	}
	fmt.Fprint(w, `
  taken: snapshots asked for through the store; ready: within 30s; ready late: only when asked again after the
  volume healed (the fault explains the delay); never ready: not even then (a failure); the rest were not checked
  (their round ended before, see its error). restores checked: snapshots
  restored into a new volume and read whole against the model at their cut, where a block must hold the last write
  acknowledged before the snapshot was asked for, or one started before it was ready. lost: zeroes where an
  acknowledged write was, or corrupt, torn, misplaced data; stale: an older write; newer: a write started after the
  snapshot was ready; divergent: extents where a restored volume's replicas differ. deletions resumed: deleted
  snapshots whose record was gone within the heal timeout of the lift, after their serving node was killed; kills
  mid-merge: kills that cut that node's replica's merge short (its chain lists the layer as deleting); layers
  left: replicas that still list a deleted snapshot's layer after the store forgot it.
`)
}

// withTarget prints d, and against target when there is one: "2.31s > 2s".
func withTarget(d, target time.Duration) string {
	if target == 0 {
		return dur(d)
	}
	if d > target {
		return fmt.Sprintf("%s > %v", dur(d), target)
	}
	return fmt.Sprintf("%s ≤ %v", dur(d), target)
}

func dur(d time.Duration) string {
	switch {
	case d <= 0:
		return "0"
	case d < time.Second:
		return fmt.Sprintf("%dms", d.Milliseconds())
	default:
		return fmt.Sprintf("%.2fs", d.Seconds())
	}
}

// percentile returns the p-quantile (nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

// kindsHelp describes every kind, one line each, for -help.
func kindsHelp() string {
	var b strings.Builder
	for _, k := range faultKinds {
		fmt.Fprintf(&b, "  %-19s %s\n", k.kind, k.what)
	}
	return b.String()
}
