// Command torture is a randomized fault campaign against Cairn's replicated
// data path (issue #10): a 4-node `cairn dev` cluster of real processes, one
// fresh 3-replica volume per round exported over NBD, writes streaming
// through it while a fault is injected on a seeded random schedule, and a
// block-content model that knows every acknowledged write and every
// uncertain one (in flight when an error came).
//
//	go run ./tests/torture [-rounds N] [-seed S] [-faults KIND,…] [-duration MIN:MAX] [-keep] [-v]
//
// Each round: create a volume (placement and the export's node chosen at
// random within what the fault kind needs), export it, write the first half
// of it, stream random 64 KiB writes (4 in flight, every eighth with FUA)
// and, beside them, single-block reads judged against the model, inject the
// fault, hold it for a time drawn from -duration, lift it, wait
// until every replica is healthy (`cairn ctl volume get`), see writes go on,
// then read the whole volume back against the model and compare the healthy
// replicas (`cairn ctl volume verify`). The fault kinds (see -help):
//
//   - kill-replica, stop-replica: SIGKILL (then restart), or SIGSTOP (then
//     SIGCONT), of a node holding a replica, neither the engine's nor the
//     store leader.
//   - kill-engine, stop-engine: SIGKILL or SIGSTOP of the node serving the
//     export; the volume is exported on another node at once (a takeover),
//     the old node restarted or continued after the hold.
//   - kill-leader: SIGKILL of the store's leader (never the engine's node;
//     it may hold a replica), restarted after the hold.
//   - partition: nftables rules in a table of this process drop every TCP
//     packet to and from one replica node's replica server address. On
//     loopback all node-to-node connections leave from 127.0.0.1, so flows
//     can be told apart only by the address they go to: the partition cuts
//     the engine off that replica while raft and the meta API still connect.
//   - slow-replica: the replica node is frozen in bursts (SIGSTOP for 100–300
//     ms, SIGCONT for 50 ms, repeated). This kernel has no sch_netem
//     (CONFIG_NET_SCH_NETEM unset), so `tc netem` cannot add delay on lo;
//     bursts need no global state and slow everything the node does.
//   - disk-full: the last node's data dir is a small ext4 file system on a
//     loop device (made before `dev up`); the fault fills it with one
//     preallocated file, so writes to blocks the replica has not allocated yet
//     fail with ENOSPC (the volume's first half, written before the fault, is
//     allocated; its second half mostly is not).
//   - bit-flip: one bit flipped in each of 4 written blocks of the data file
//     (replicas/<replica-id>/data) of the replica the engine reads (on the
//     engine's own node), through the page cache; those blocks are not
//     written again before the check.
//   - delete-replica-dir: with writes paused, a replica node is killed, the
//     replica's directory deleted, the node restarted; writes resume.
//   - snapshot: one of kill-replica, stop-replica, partition, kill-engine and
//     stop-engine, with up to 4 snapshots asked for through the store while
//     it acts; each is then restored, read whole and judged against the
//     model at its cut (see snapshots.go).
//   - delete-snapshot-crash: two snapshots with writes between and after
//     them, the first deleted and the node serving the volume SIGKILLed
//     while the layer merges; the deletion must finish, leave no layer
//     behind, and the second snapshot restore to its cut.
//
// It prints a table per fault kind: rounds, writes acknowledged and failed,
// blocks lost and stale, divergent extents, unhealed rounds, time to heal (p50,
// max), the longest acknowledged write while the fault lasted and the
// takeover time, each against the targets where it sets one. It
// exits 1 on any loss, divergence, failure to heal or round that could not
// finish (with -strict, also on a missed target), 2 on bad flags and 130
// after Ctrl-C; the cluster, filter rules, mounts and loop devices are
// removed in every case (with -keep, a failed campaign's directory stays).
//
// It needs root, nftables (apt-get install -y nftables) for the partition
// fault, and mkfs.ext4, mount and losetup.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

func main() { os.Exit(run()) }

func run() int {
	o := &options{}
	var faults, duration, size string
	flag.IntVar(&o.rounds, "rounds", 0, "rounds in all, over shuffled passes of the fault kinds (0: one round of each kind)")
	flag.Uint64Var(&o.seed, "seed", 0, "seed of the schedule and of every round's choices (0: from the clock; printed)")
	flag.StringVar(&faults, "faults", "all", "comma-separated fault kinds to inject: "+kindNames())
	flag.StringVar(&duration, "duration", "2s:12s", "how long each fault is held: MIN:MAX (drawn per round) or one duration")
	flag.DurationVar(&o.healTimeout, "heal-timeout", 90*time.Second, "fail a round whose volume is not healthy this long after the fault is lifted")
	flag.StringVar(&size, "size", "64Mi", "size of each round's volume")
	flag.IntVar(&o.qd, "qd", 4, "writes in flight")
	flag.BoolVar(&o.keep, "keep", false, "keep the cluster directory (data dirs, node logs) when the campaign fails")
	flag.BoolVar(&o.strict, "strict", false, "also fail when a stall or takeover target is missed")
	flag.StringVar(&o.dir, "dir", os.TempDir(), "where to make the campaign's directory")
	flag.BoolVar(&o.verbose, "v", false, "log every command run and every change of the volume while healing")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./tests/torture [flags]\n\nfault kinds:\n%s\nflags:\n", kindsHelp())
		flag.PrintDefaults()
	}
	flag.Parse()
	bad := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "torture: "+format+"\n", args...)
		return 2
	}
	if flag.NArg() != 0 {
		return bad("unexpected arguments %q", flag.Args())
	}
	var err error
	if o.kinds, err = parseKinds(faults); err != nil {
		return bad("-faults: %v", err)
	}
	if o.holdMin, o.holdMax, err = parseBounds(duration); err != nil {
		return bad("-duration %q: %v", duration, err)
	}
	if o.size, err = benchkit.ParseSize(size); err != nil || o.size%(4<<20) != 0 {
		return bad("-size %q: want a multiple of 4Mi such as 64Mi", size)
	}
	if o.rounds < 0 || o.qd < 1 || o.healTimeout <= 0 {
		return bad("-rounds must not be negative, -qd at least 1, -heal-timeout positive")
	}
	if o.seed == 0 {
		o.seed = uint64(time.Now().UnixNano())
	}
	start := time.Now()
	o.logf = func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[%7.1fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	o.logf("seed %d (rerun with -seed %d)", o.seed, o.seed)

	ctx, stop := benchkit.SignalContext()
	defer stop()
	failed, err := campaignMain(ctx, o)
	switch {
	case ctx.Err() != nil:
	case err != nil:
	case failed:
		err = fmt.Errorf("the campaign found faults the volume did not survive (seed %d)", o.seed)
	}
	return benchkit.ExitCode(ctx, "torture", err)
}

// campaignMain runs the campaign and prints its report; failed means a
// round found loss, divergence or no healing.
func campaignMain(ctx context.Context, o *options) (failed bool, err error) {
	c, err := newCampaign(ctx, o)
	if err != nil {
		return false, err
	}
	// Deferred, so that a panic in a round still stops the nodes, the
	// partition rules and the loop-mounted file system.
	closed := false
	defer func() {
		if !closed {
			c.close(true)
		}
	}()
	runErr := c.runAll(ctx)
	env := fmt.Sprintf("%s, load %s, %s", benchkit.Kernel(), benchkit.LoadAvg(), gitDescribe())
	if len(c.results) > 0 {
		failed = printReport(os.Stdout, o, c.results, time.Since(c.start), env)
	}
	closed = true
	c.close(failed || runErr != nil)
	return failed, runErr
}

func gitDescribe() string {
	if d, err := benchkit.GitDescribe("."); err == nil {
		return "cairn " + d
	}
	return "cairn (version unknown)"
}

// parseBounds reads "MIN:MAX" or a single duration.
func parseBounds(s string) (lo, hi time.Duration, err error) {
	a, b, two := strings.Cut(s, ":")
	if lo, err = time.ParseDuration(a); err != nil {
		return 0, 0, err
	}
	hi = lo
	if two {
		if hi, err = time.ParseDuration(b); err != nil {
			return 0, 0, err
		}
	}
	if lo <= 0 || hi < lo {
		return 0, 0, fmt.Errorf("want 0 < MIN ≤ MAX")
	}
	return lo, hi, nil
}
