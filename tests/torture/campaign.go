package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// options configure a campaign.
type options struct {
	rounds           int           // rounds in all; 0: one of each kind
	seed             uint64        // seeds the schedule and every round's choices
	kinds            []*faultKind  // the kinds to inject
	holdMin, holdMax time.Duration // each fault lasts a time drawn from [holdMin, holdMax]
	healTimeout      time.Duration // a volume not healed this long after the lift fails the round
	size             uint64        // each round's volume, bytes
	qd               int           // writes in flight
	keep             bool          // keep the work dir (cluster data, logs) after a failed campaign
	verbose          bool          // log every command and volume change
	strict           bool          // a missed stall or takeover target fails the campaign
	dir              string        // where to make the work dir
	bin              string        // a built cairn binary ("" builds one into the work dir)
	logf             func(string, ...any)
}

// campaign is one cluster and the rounds run on it.
type campaign struct {
	o       *options
	work    string
	cl      *cluster
	start   time.Time
	results []result
}

// nodes is the size of the campaign's cluster: three replicas and one node
// without a replica of a given volume, to take exports over to.
const nodes = 4

// newCampaign checks the machine, makes the work dir, builds cairn if
// needed and starts the cluster.
func newCampaign(ctx context.Context, o *options) (*campaign, error) {
	if err := isRoot(); err != nil {
		return nil, err
	}
	if slices.ContainsFunc(o.kinds, func(k *faultKind) bool { return k.kind == Partition }) {
		if err := nftAvailable(); err != nil {
			return nil, err
		}
	}
	for _, tool := range []string{"mkfs.ext4", "mount", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s not found: %w", tool, err)
		}
	}
	work, err := os.MkdirTemp(o.dir, "cairn-torture-")
	if err != nil {
		return nil, err
	}
	c := &campaign{o: o, work: work, start: time.Now()}
	if o.bin == "" {
		o.bin = filepath.Join(work, "cairn")
		if err := buildCairn(ctx, o.bin); err != nil {
			c.close(false)
			return nil, err
		}
	}
	smallFS := max(512<<20, 4*o.size)
	if c.cl, err = startCluster(ctx, o.bin, work, nodes, smallFS, o.verbose, o.logf); err != nil {
		c.close(false)
		return nil, err
	}
	return c, nil
}

// buildCairn builds ./cmd/cairn of the module this runs in into bin.
func buildCairn(ctx context.Context, bin string) error {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return errors.New("run the campaign inside the cairn module (go run ./tests/torture)")
	}
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/cairn")
	build.Dir = filepath.Dir(mod)
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/cairn: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// schedule is the campaign's sequence of fault kinds: shuffled passes over
// the selected kinds (seeded), so that every kind comes up once per pass.
func (c *campaign) schedule() []*faultKind {
	rng := rand.New(rand.NewPCG(c.o.seed, 0x5c4ed))
	n := c.o.rounds
	if n <= 0 {
		n = len(c.o.kinds)
	}
	var out []*faultKind
	for len(out) < n {
		for _, i := range rng.Perm(len(c.o.kinds)) {
			if len(out) < n {
				out = append(out, c.o.kinds[i])
			}
		}
	}
	return out
}

// runAll runs the scheduled rounds; it stops early only when the cluster
// cannot be restored or ctx ends.
func (c *campaign) runAll(ctx context.Context) error {
	sched := c.schedule()
	for i, k := range sched {
		if err := ctx.Err(); err != nil {
			return err
		}
		if _, err := c.runRound(ctx, i+1, len(sched), k); err != nil {
			return err
		}
	}
	return nil
}

// runRound runs round n of of, of kind k. Its choices come from the seed
// and n alone.
func (c *campaign) runRound(ctx context.Context, n, of int, k *faultKind) (result, error) {
	rng := rand.New(rand.NewPCG(c.o.seed, uint64(n)))
	hold := c.o.holdMin
	if span := c.o.holdMax - c.o.holdMin; span > 0 {
		hold += time.Duration(rng.Int64N(int64(span) + 1))
	}
	r := &round{o: c.o, cl: c.cl, n: n, of: of, kind: k, rng: rng, hold: hold, logf: c.o.logf}
	start := time.Now()
	res, err := r.run(ctx)
	verdict := "ok"
	if res.failed() {
		verdict = "FAILED"
	}
	c.o.logf("round %d/%d %s: %s in %v", n, of, k.kind, verdict, time.Since(start).Round(time.Millisecond))
	if ctx.Err() == nil {
		c.results = append(c.results, res)
	}
	return res, err
}

// close stops the cluster and removes the work dir; with keep (and -keep
// set) both stay for debugging.
func (c *campaign) close(failed bool) {
	keep := failed && c.o.keep
	if c.cl != nil {
		c.cl.close(keep)
	}
	if keep {
		c.o.logf("kept %s (cluster data, node logs; %s's data dir is the ext4 image %s)", c.work, c.clSmallNode(), filepath.Join(c.work, c.clSmallNode()+".img"))
		return
	}
	if err := os.RemoveAll(c.work); err != nil {
		c.o.logf("cleanup: %v", err)
	}
}

func (c *campaign) clSmallNode() string {
	if c.cl == nil {
		return fmt.Sprintf("node-%d", nodes)
	}
	return c.cl.smallFSNode
}
