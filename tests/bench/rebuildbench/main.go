// Command rebuildbench measures how fast a replica is rebuilt, next to cp of
// the same amount of data on the same disk (issue 16, part 4):
//
//   - a delta rebuild: a replica's node is down while a share (-changed) of
//     the volume is rewritten, then comes back, and only the extents that
//     changed are copied;
//   - a full rebuild: the node stays down past the volume's stale-replica
//     timeout, the store places a new replica on the third node, and the
//     whole volume is copied there.
//
// No foreground I/O runs during either rebuild. Usage:
//
//	go run ./tests/bench/rebuildbench [-size 4Gi] [-changed 10] [-stale 20s] [-node-arg FLAG]... [-dir DIR] [-keep] [-v]
//
// It prints a table and never fails on a number; it exits 1 if something
// cannot be set up or cleanup leaves something behind. README.md says more.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

type options struct {
	benchkit.Flags
	size, changed int64 // bytes, percent
	stale         time.Duration
}

func main() {
	var o options
	var size string
	flag.StringVar(&size, "size", "4Gi", "volume size, all of it written before the rebuilds")
	flag.Int64Var(&o.changed, "changed", 10, "percent of the volume rewritten while a replica's node is down (delta rebuild)")
	flag.DurationVar(&o.stale, "stale", 20*time.Second, "the volume's stale-replica timeout: the full rebuild starts this long after its node went down")
	o.Register("the dev cluster and the file cp copies")
	flag.Parse()
	n, err := benchkit.ParseSize(size)
	if err != nil || n < 64<<20 || o.changed <= 0 || o.changed > 100 || o.stale < 5*time.Second {
		fmt.Fprintln(os.Stderr, "rebuildbench: -size must be at least 64Mi, -changed 1 to 100, -stale at least 5s")
		os.Exit(2)
	}
	o.size = int64(n)
	ctx, stop := benchkit.SignalContext()
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "rebuildbench:", err)
		if ctx.Err() != nil {
			os.Exit(130)
		}
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "rebuildbench: "+format+"\n", args...)
}

// result is one measured copy.
type result struct {
	what    string
	bytes   uint64 // copied
	took    time.Duration
	comment string
}

func (r result) mibps() float64 { return float64(r.bytes) / (1 << 20) / r.took.Seconds() }

func run(ctx context.Context, o options) (err error) {
	root, bin, err := benchkit.BuildCairn(ctx, "rebuildbench", o.Verbose, logf)
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp(o.Parent, "cairn-rebuildbench-")
	if err != nil {
		return err
	}
	clusterDir := filepath.Join(tmp, "cluster")
	nodes, servers, err := benchkit.DevUp(ctx, root, bin, clusterDir, o.NodeArgs, o.Verbose, logf)
	keep := o.Keep
	defer func() {
		benchkit.DevDown(context.WithoutCancel(ctx), root, bin, clusterDir, keep, o.Verbose, logf, nodes)
		if left := leftovers(tmp); left != "" {
			err = errors.Join(err, fmt.Errorf("left behind under %s: %s", tmp, left))
			keep = true
		}
		benchkit.RemoveTemp(tmp, keep, logf)
	}()
	if err != nil {
		return err
	}
	cmd := func(name string, args ...string) ([]byte, error) {
		return benchkit.Command(ctx, root, o.Verbose, logf, name, args...)
	}
	ctl := func(args ...string) ([]byte, error) {
		return cmd(bin, append([]string{"ctl", "--server", servers}, args...)...)
	}
	get := func(id string) (*meta.Volume, error) {
		out, err := ctl("volume", "get", id, "-o", "json")
		if err != nil {
			return nil, err
		}
		var v meta.Volume
		if err := json.Unmarshal(out, &v); err != nil {
			return nil, fmt.Errorf("volume get %s: %w", id, err)
		}
		return &v, nil
	}

	// A 2-replica volume, one replica on node-1 (whose engine serves the
	// export and runs the rebuilds), the other on node-2 or node-3; the
	// third node takes the replacement.
	out, err := ctl("volume", "create", "rebuild", "--size", strconv.FormatInt(o.size, 10), "--replicas", "2", "--write-quorum", "1",
		"--preferred-node", nodes[0].ID, "--stale-replica-timeout", o.stale.String(), "-o", "json")
	if err != nil {
		return err
	}
	var v meta.Volume
	if err := json.Unmarshal(out, &v); err != nil {
		return fmt.Errorf("volume create: %w", err)
	}
	var away string
	for _, r := range v.Replicas {
		if r.Node != nodes[0].ID {
			away = r.Node
		}
	}
	if away == "" {
		return fmt.Errorf("volume %s has no replica off %s: %+v", v.ID, nodes[0].ID, v.Replicas)
	}
	sock := filepath.Join(tmp, "rebuild.sock")
	if _, err := ctl("volume", "export", v.ID, "--node", nodes[0].ID, "--nbd", sock); err != nil {
		return err
	}
	defer func() {
		if _, uerr := ctl("volume", "unexport", v.ID); uerr != nil {
			err = errors.Join(err, uerr)
		}
	}()
	uri := "--uri=nbd+unix:///?socket=" + sock
	fio := func(args ...string) error {
		c := benchkit.FioCommand(ctx, o.Verbose, logf, append([]string{"--ioengine=nbd", uri, "--direct=1", "--output-format=terse"}, args...)...)
		if b, err := c.CombinedOutput(); err != nil {
			return fmt.Errorf("fio %s: %w: %s", strings.Join(args, " "), err, b)
		}
		return nil
	}
	logf("writing the whole %s volume %s (replicas on %s and %s)", benchkit.HumanBytes(uint64(o.size)), v.ID, nodes[0].ID, away)
	if err := fio("--name=fill", "--rw=write", "--bs=1M", "--iodepth=8", "--size="+strconv.FormatInt(o.size, 10)); err != nil {
		return err
	}

	var results []result
	// Delta: the replica's node misses -changed of the volume.
	changed := o.size * o.changed / 100 / (1 << 20) * (1 << 20)
	if _, err := cmd(bin, "dev", "kill", "--dir", clusterDir, away); err != nil {
		return err
	}
	logf("%s killed; rewriting %s at random 1 MiB blocks", away, benchkit.HumanBytes(uint64(changed)))
	if err := fio("--name=change", "--rw=randwrite", "--bs=1M", "--iodepth=8", "--size="+strconv.FormatInt(o.size, 10),
		"--io_size="+strconv.FormatInt(changed, 10)); err != nil {
		return err
	}
	start := time.Now()
	if _, err := cmd(bin, "dev", "start", "--dir", clusterDir, away); err != nil {
		return err
	}
	rb, took, err := waitRebuilt(ctx, get, v.ID, func(r meta.Replica) bool { return r.Node == away }, start)
	if err != nil {
		return err
	}
	results = append(results, result{what: fmt.Sprintf("delta rebuild (%d%% changed)", o.changed), bytes: rb.BytesCopied, took: took,
		comment: fmt.Sprintf("compared %s; from the node's restart until its replica is healthy", benchkit.HumanBytes(rb.BytesCompared))})

	// Full: the node stays down; the store replaces its replica.
	if _, err := cmd(bin, "dev", "kill", "--dir", clusterDir, away); err != nil {
		return err
	}
	logf("%s killed again; waiting %v for the store to place a new replica", away, o.stale)
	start = time.Time{}
	rb, took, err = waitRebuilt(ctx, get, v.ID, func(r meta.Replica) bool { return r.Node != away && r.Node != nodes[0].ID }, start)
	if err != nil {
		return err
	}
	results = append(results, result{what: "full rebuild (new node)", bytes: rb.BytesCopied, took: took,
		comment: "from the new replica's placement until it is healthy"})

	// The reference: cp of as much data on the same disk, cold.
	src := filepath.Join(tmp, "cp-source")
	if _, err := cmd("dd", "if=/dev/urandom", "of="+src, "bs=1M", "count="+strconv.FormatInt(o.size>>20, 10), "status=none"); err != nil {
		return err
	}
	cpTook, err := timedCopy(ctx, cmd, src, filepath.Join(tmp, "cp-copy"))
	if err != nil {
		return err
	}
	cp := result{what: "cp of a file as large as the volume", bytes: uint64(o.size), took: cpTook, comment: "page cache dropped first; sync included"}

	print(o, v.ID, nodes[0].ID, away, results, cp)
	return nil
}

// waitRebuilt waits until the volume has a healthy replica that match
// picks, whose rebuild is recorded done, and returns that rebuild's
// progress and how long it took since start (or, when start is zero, since
// the replica first appeared).
func waitRebuilt(ctx context.Context, get func(string) (*meta.Volume, error), id string, match func(meta.Replica) bool, start time.Time) (meta.RebuildProgress, time.Duration, error) {
	deadline := time.Now().Add(30 * time.Minute)
	lastLog := time.Now()
	for {
		v, err := get(id)
		if err != nil {
			return meta.RebuildProgress{}, 0, err
		}
		for _, r := range v.Replicas {
			if !match(r) {
				continue
			}
			if start.IsZero() {
				start = time.Now()
				logf("replica %s placed on %s", r.ID, r.Node)
			}
			rb := v.Rebuild
			if r.State == meta.ReplicaHealthy && rb != nil && rb.ReplicaID == r.ID && rb.Done {
				return *rb, time.Since(start), nil
			}
			if time.Since(lastLog) >= 5*time.Second && rb != nil && rb.ReplicaID == r.ID {
				lastLog = time.Now()
				logf("rebuilding %s: compared %s of %s, copied %s", r.ID, benchkit.HumanBytes(rb.BytesCompared), benchkit.HumanBytes(rb.BytesTotal), benchkit.HumanBytes(rb.BytesCopied))
			}
		}
		if time.Now().After(deadline) {
			return meta.RebuildProgress{}, 0, fmt.Errorf("volume %s: no rebuilt replica within 30 min: %+v", id, v.Replicas)
		}
		if err := benchkit.Sleep(ctx, 200*time.Millisecond); err != nil {
			return meta.RebuildProgress{}, 0, err
		}
	}
}

// timedCopy drops the page cache, then times cp src dst and a sync.
func timedCopy(ctx context.Context, cmd func(string, ...string) ([]byte, error), src, dst string) (time.Duration, error) {
	if _, err := cmd("sync"); err != nil {
		return 0, err
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0); err != nil {
		return 0, fmt.Errorf("drop the page cache (needs root): %w", err)
	}
	start := time.Now()
	if _, err := cmd("cp", "--sparse=never", src, dst); err != nil {
		return 0, err
	}
	if _, err := cmd("sync", dst); err != nil {
		return 0, err
	}
	took := time.Since(start)
	return took, errors.Join(os.Remove(src), os.Remove(dst))
}

func print(o options, vol, engine, away string, results []result, cp result) {
	fmt.Printf("rebuildbench: replica rebuilds next to cp on the same disk\n")
	fmt.Printf("date:     %s\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Printf("machine:  %s\n", benchkit.Machine())
	if len(o.NodeArgs) > 0 {
		fmt.Printf("nodes:    every node agent runs with %s\n", strings.Join(o.NodeArgs, " "))
	} else {
		fmt.Printf("nodes:    the node agents' defaults (--rebuild-rate 200Mi, which paces rebuilds only beside foreground I/O)\n")
	}
	fmt.Printf("volume:   %s, %s, 2 replicas, write quorum 1 (%s, whose engine rebuilds, and %s), every byte written; no foreground I/O during the rebuilds\n",
		vol, benchkit.HumanBytes(uint64(o.size)), engine, away)
	fmt.Println()
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "copy\tcopied\ttook\tMiB/s\tvs cp\t")
	for _, r := range append(results, cp) {
		fmt.Fprintf(w, "%s\t%s\t%s\t%.0f\t%.2f\t%s\n", r.what, benchkit.HumanBytes(r.bytes), r.took.Round(100*time.Millisecond), r.mibps(), r.mibps()/cp.mibps(), r.comment)
	}
	_ = w.Flush()
	full := results[len(results)-1]
	verdict := "not met"
	if full.mibps() >= 0.5*cp.mibps() {
		verdict = "met"
	}
	fmt.Printf("\nfull rebuild: %.2f × cp, target ≥ 0.5: %s\n", full.mibps()/cp.mibps(), verdict)
}

// leftovers names mounts and loop devices under dir.
func leftovers(dir string) string {
	var left []string
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) > 4 && strings.HasPrefix(f[4], dir) {
				left = append(left, "mount "+f[4])
			}
		}
	}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			left = append(left, "loop "+filepath.Base(filepath.Dir(filepath.Dir(f))))
		}
	}
	return strings.Join(left, ", ")
}
