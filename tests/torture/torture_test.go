package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/tests/testbin"
)

// knownFailing lists the fault kinds that cannot pass on today's code, each
// with the part of issue #10 it waits for. TestTorture skips them (the
// program, go run ./tests/torture, runs and reports them all), unless
// CAIRN_TORTURE_KNOWN_FAILING=run, to try a fix. Remove an entry when its
// fix lands; the goal is an empty map.
var knownFailing = map[Kind]string{}

// targetsPending lists the fault kinds whose stall or takeover target
// (issue #10: no acknowledged write waits more than 2 s because of one
// frozen or partitioned replica; takeover off a frozen exporter in under
// 3 s) TestTorture does not enforce yet, with the fix it waits for. Their
// data is still checked, and the figures are logged. Remove an entry when
// its fix lands.
var targetsPending = map[Kind]string{}

// cairnBin is the binary under test, built once in TestMain.
var cairnBin string

func TestMain(m *testing.M) { testbin.Main(m, &cairnBin) }

// TestTorture runs one short round of every fault kind, in a fixed order
// with seed 1, on one 4-node cluster (see the package comment for what a
// round does). Invariants, per round: every block holds its last
// acknowledged write or an uncertain one after it; the healthy replicas are
// identical; the volume heals within a minute of the fault being lifted and
// writes go on; and, where the issue sets one and the fix has landed
// (targetsPending), the stall or takeover target holds. It needs root.
func TestTorture(t *testing.T) {
	if err := isRoot(); err != nil {
		t.Fatal(err)
	}
	if err := nftAvailable(); err != nil {
		t.Fatal(err)
	}
	// cur is the (sub)test that logs: the campaign logs from the test's
	// goroutine only, but each subtest must log to its own t.
	var mu sync.Mutex
	cur := t
	logf := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		cur.Helper()
		cur.Logf(format, args...)
	}
	o := &options{seed: 1, kinds: faultKinds, holdMin: 2 * time.Second, holdMax: 3 * time.Second,
		healTimeout: time.Minute, size: 64 << 20, qd: 4, dir: os.TempDir(), bin: cairnBin, logf: logf}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	c, err := newCampaign(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.close(false) })

	parent := t
	broken := false // the cluster could not be restored after a round
	for i, k := range faultKinds {
		t.Run(string(k.kind), func(t *testing.T) {
			mu.Lock()
			cur = t
			mu.Unlock()
			defer func() {
				mu.Lock()
				cur = parent
				mu.Unlock()
			}()
			if broken {
				t.Skip("the cluster could not be restored after an earlier round")
			}
			if why, ok := knownFailing[k.kind]; ok && os.Getenv("CAIRN_TORTURE_KNOWN_FAILING") != "run" {
				t.Skipf("known to fail until this lands: %s", why)
			}
			res, err := c.runRound(ctx, i+1, len(faultKinds), k)
			if err != nil {
				broken = true
				t.Fatal(err)
			}
			if res.failed() {
				t.Errorf("%s", describeFailure(res))
			}
			checkTargets(t, k, res)
		})
	}
	var b strings.Builder
	printReport(&b, o, c.results, time.Since(start), "")
	t.Logf("%s", b.String())
}

// checkTargets fails t when a round missed its kind's stall or takeover
// target, unless the fix it waits for is still pending.
func checkTargets(t *testing.T, k *faultKind, res result) {
	t.Helper()
	var missed []string
	if k.stallTarget > 0 && res.maxAck > k.stallTarget {
		missed = append(missed, fmt.Sprintf("an acknowledged write waited %v (target %v)", res.maxAck.Round(time.Millisecond), k.stallTarget))
	}
	if k.takeoverTarget > 0 && res.takeover > k.takeoverTarget {
		missed = append(missed, fmt.Sprintf("the takeover took %v (target %v)", res.takeover.Round(time.Millisecond), k.takeoverTarget))
	}
	if len(missed) == 0 {
		return
	}
	if why, ok := targetsPending[k.kind]; ok {
		t.Logf("target missed, not enforced until this lands: %s: %s", why, strings.Join(missed, "; "))
		return
	}
	t.Errorf("%s", strings.Join(missed, "; "))
}

func describeFailure(res result) string {
	var b strings.Builder
	fmt.Fprintf(&b, "round %d (%s): %d blocks lost, %d stale, %d divergent extents, healed %v", res.n, res.kind, res.lost, res.stale, res.divergent, res.healed)
	if sn := res.snap; sn.taken > 0 {
		fmt.Fprintf(&b, "; snapshots: %d taken, %d never ready, %d restored: %d blocks lost, %d stale, %d newer than the cut, %d divergent extents; %d of %d deletions resumed; %d replicas kept a deleted layer",
			sn.taken, sn.stuck, sn.restores, sn.lost, sn.stale, sn.newer, sn.divergent, sn.resumed, sn.deletions, sn.leftover)
	}
	if res.err != nil {
		fmt.Fprintf(&b, "; %v", res.err)
	}
	for _, p := range res.problems {
		fmt.Fprintf(&b, "\n  %s", p)
	}
	return b.String()
}
