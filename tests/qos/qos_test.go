// Package qos checks the I/O scheduler's limits on real I/O: fio through
// NBD against a volume of a local cluster of real processes.
package qos

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
	"github.com/cairn-csi/cairn/tests/testbin"
)

var cairnBin string

func TestMain(m *testing.M) { testbin.Main(m, &cairnBin) }

func cairn(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(cairnBin, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("cairn %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// ctlTLS is the certificate dev up issued for ctl in the cluster dir: the
// cluster speaks mutual TLS, as dev up makes it by default.
func ctlTLS(dir string) string { return filepath.Join(dir, "pki", "ctl") }

// fioIOPS runs fio at iodepth 32 over NBD and returns read+write IOPS,
// leaving out a ramp of 2 s (the token bucket's burst). If midway is not
// nil, it is called once while fio runs, halfway through its measured
// seconds.
func fioIOPS(t *testing.T, sock, rw string, seconds int, midway func()) float64 {
	t.Helper()
	iops, _ := fioRun(t, sock, rw, "4k", seconds, midway)
	return iops
}

// fioRun is fioIOPS with the block size given; it returns read+write IOPS
// and bytes per second.
func fioRun(t *testing.T, sock, rw, bs string, seconds int, midway func()) (float64, float64) {
	t.Helper()
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatal("fio is not installed (make test installs it with scripts/install-deps.sh)")
	}
	out := filepath.Join(t.TempDir(), "fio.json")
	cmd := exec.Command("fio", "--name=qos", "--ioengine=nbd", "--uri=nbd+unix:///?socket="+sock, "--rw="+rw, "--bs="+bs,
		"--iodepth=32", fmt.Sprintf("--runtime=%d", seconds), "--ramp_time=2", "--time_based", "--output-format=json", "--output="+out)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	if err := cmd.Start(); err != nil {
		t.Fatalf("fio: %v", err)
	}
	defer func() {
		if cmd.ProcessState == nil { // midway failed the test: do not leave fio running
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	}()
	if midway != nil {
		time.Sleep(2*time.Second + time.Duration(seconds)*time.Second/2)
		midway()
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("fio: %v\n%s", err, b.Bytes())
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		Jobs []struct {
			Read  fioSide `json:"read"`
			Write fioSide `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output: %v\n%s", err, raw)
	}
	j := res.Jobs[0]
	return j.Read.IOPS + j.Write.IOPS, j.Read.BWBytes + j.Write.BWBytes
}

// fioSide is one direction of a fio job's JSON result.
type fioSide struct {
	IOPS    float64 `json:"iops"`
	BWBytes float64 `json:"bw_bytes"`
}

func within(got, want, tolerance float64) bool {
	return got >= want*(1-tolerance) && got <= want*(1+tolerance)
}

func TestMaxIOPSHoldsOnRealIO(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cluster")
	t.Cleanup(func() { _, _ = exec.Command(cairnBin, "dev", "down", "--dir", dir).CombinedOutput() })
	cairn(t, "dev", "up", "--nodes", "3", "--dir", dir)
	nodes, server, err := benchkit.LoadCluster(dir)
	if err != nil {
		t.Fatal(err)
	}
	var v struct{ ID string }
	if err := json.Unmarshal([]byte(cairn(t, "ctl", "--tls-dir", ctlTLS(dir), "--server", server, "volume", "create", "qos", "--size", "256Mi",
		"--replicas", "3", "--max-iops", "500", "-o", "json")), &v); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "qos.sock")
	cairn(t, "ctl", "--tls-dir", ctlTLS(dir), "--server", server, "volume", "export", v.ID, "--node", "node-1", "--nbd", sock)

	// Halfway through fio, the IOPS bucket is in use: fio keeps more I/Os
	// queued than the limit lets through.
	var midway, midwayCount bucketScrape
	got := fioIOPS(t, sock, "randrw", 8, func() {
		midway = scrapeBucket(t, nodes[0].Metrics, v.ID)
		midwayCount = scrapeBucket(t, nodes[0].Metrics, v.ID)
	})
	t.Logf("maxIOPS 500: fio at iodepth 32 measured %.0f IOPS (%.1f%% off)", got, 100*(got-500)/500)
	if !within(got, 500, 0.10) {
		t.Errorf("measured %.0f IOPS with maxIOPS 500; want within ±10%%", got)
	}
	// Node-1's engine held the volume to its limit: its /metrics show the
	// time it was throttled and what its IOPS bucket holds. It has no bytes
	// bucket, having no bandwidth limit.
	//
	// What the bucket may hold follows from its books (iosched/bucket.go):
	// it earns 500 tokens a second, pays one for every I/O the scheduler
	// dispatches (cairn_iosched_dispatched_total, every op) and never
	// holds more than its burst, 500 × 1 s. So from the midway scrape
	// until after fio,
	//
	//	tokens(after) ≤ min(500, tokens(midway) + 500·(after − midway) − dispatched(midway..after))
	//
	// with equality, as the bucket is never full in between, but for the
	// scrapes' own durations: a scrape's values are read at some moment
	// between its start and end, so the bound runs from the midway scrape's
	// start to the after scrape's end, and counts the I/Os from a second
	// scrape made just after the midway one (the counter and the bucket
	// are read at different moments of one scrape, and I/Os go on
	// meanwhile). It holds however long fio and the node take to stop: the
	// bound this replaces, refilled since fio exited plus 50 tokens,
	// assumed fio exits within 100 ms of the bucket's last charge; on a
	// busy machine fio's teardown takes longer, and a late wake-up of the
	// scheduler adds the tokens it earned meanwhile, as a token bucket
	// should.
	after := scrapeBucket(t, nodes[0].Metrics, v.ID)
	maxTokens := math.Min(500, midway.tokens+500*after.end.Sub(midway.start).Seconds()-(after.dispatched-midwayCount.dispatched))
	t.Logf("node-1 metrics: throttled %.2fs, IOPS bucket holds %.1f tokens (%.1f halfway through fio, %.0f I/Os ago; at most %.1f)",
		after.throttled, after.tokens, midway.tokens, after.dispatched-midwayCount.dispatched, maxTokens)
	if !after.hasThrottled || !after.hasTokens || !midway.hasTokens || after.throttled <= 0 || after.tokens < 0 || after.tokens > maxTokens || after.hasBytes {
		t.Errorf("node-1 reports throttled %.2fs (present %v), IOPS tokens %.1f (present %v), a bytes bucket %v; "+
			"want more than 0 s, 0 to %.1f tokens, no bytes bucket", after.throttled, after.hasThrottled, after.tokens, after.hasTokens, after.hasBytes, maxTokens)
	}
	// With nothing dispatched, the bucket refills at exactly 500 a second:
	// between two scrapes it gains 500 × their distance, which lies between
	// the end of the first and the start of the second scrape and between
	// their start and end.
	time.Sleep(200 * time.Millisecond)
	later := scrapeBucket(t, nodes[0].Metrics, v.ID)
	lo := math.Min(500, after.tokens+500*later.start.Sub(after.end).Seconds())
	hi := math.Min(500, after.tokens+500*later.end.Sub(after.start).Seconds())
	t.Logf("node-1 metrics %v later: IOPS bucket holds %.1f tokens (refilled: %.1f to %.1f)", later.start.Sub(after.start).Round(time.Millisecond), later.tokens, lo, hi)
	if later.dispatched != after.dispatched || later.tokens < lo-1e-6 || later.tokens > hi+1e-6 {
		t.Errorf("with no I/O (%.0f dispatched meanwhile; want 0), node-1's IOPS bucket went from %.3f to %.3f tokens; want %.3f to %.3f",
			later.dispatched-after.dispatched, after.tokens, later.tokens, lo, hi)
	}

	// The limit changes on the live volume.
	cairn(t, "ctl", "--tls-dir", ctlTLS(dir), "--server", server, "volume", "set-qos", v.ID, "--max-iops", "1500")
	time.Sleep(1500 * time.Millisecond) // the engine polls its volume twice a second
	got = fioIOPS(t, sock, "randread", 5, nil)
	t.Logf("after set-qos 1500: %.0f IOPS", got)
	if !within(got, 1500, 0.10) {
		t.Errorf("measured %.0f IOPS after set-qos --max-iops 1500; want within ±10%%", got)
	}
}

// TestDesignLimitKeysHoldOnRealIO: the design StorageClass's names for the
// limits, iops and throughput, hold on real I/O as maxIOPS and maxBandwidth
// do (they are synonyms, replication/volspec).
func TestDesignLimitKeysHoldOnRealIO(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cluster")
	t.Cleanup(func() { _, _ = exec.Command(cairnBin, "dev", "down", "--dir", dir).CombinedOutput() })
	cairn(t, "dev", "up", "--nodes", "3", "--dir", dir)
	_, server, err := benchkit.LoadCluster(dir)
	if err != nil {
		t.Fatal(err)
	}
	export := func(name string, params ...string) string {
		t.Helper()
		args := []string{"ctl", "--tls-dir", ctlTLS(dir), "--server", server, "volume", "create", name, "--size", "256Mi", "--replicas", "2", "-o", "json"}
		for _, p := range params {
			args = append(args, "--param", p)
		}
		var v struct{ ID string }
		if err := json.Unmarshal([]byte(cairn(t, args...)), &v); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, name+".sock")
		cairn(t, "ctl", "--tls-dir", ctlTLS(dir), "--server", server, "volume", "export", v.ID, "--node", "node-1", "--nbd", sock)
		return sock
	}

	iops, _ := fioRun(t, export("design-iops", "iops=600"), "randread", "4k", 6, nil)
	t.Logf("iops 600: fio 4k randread at iodepth 32 measured %.0f IOPS (%.1f%% off)", iops, 100*(iops-600)/600)
	if !within(iops, 600, 0.10) {
		t.Errorf("measured %.0f IOPS with iops 600; want within ±10%%", iops)
	}
	const limit = 8 << 20 // throughput: 8Mi
	_, bw := fioRun(t, export("design-throughput", "throughput=8Mi"), "read", "1M", 6, nil)
	t.Logf("throughput 8Mi: fio 1M reads at iodepth 32 measured %.2f MiB/s (%.1f%% off)", bw/(1<<20), 100*(bw-limit)/limit)
	if !within(bw, limit, 0.10) {
		t.Errorf("measured %.2f MiB/s with throughput 8Mi; want within ±10%%", bw/(1<<20))
	}
}

// bucketScrape is what a node's /metrics say of a volume's IOPS bucket at
// one scrape, which the node answered at some moment between start and end.
type bucketScrape struct {
	start, end time.Time
	tokens     float64 // cairn_iosched_tokens{bucket="iops"}
	// dispatched counts the volume's I/Os the QoS scheduler let through, of
	// every op: each paid one IOPS token.
	dispatched              float64
	throttled               float64 // seconds, cairn_iosched_throttled_seconds_total
	hasTokens, hasThrottled bool
	hasBytes                bool // a bytes bucket is reported
}

// scrapeBucket scrapes addr's /metrics for volume id's IOPS bucket.
func scrapeBucket(t *testing.T, addr, id string) bucketScrape {
	t.Helper()
	b := bucketScrape{start: time.Now()}
	m, err := benchkit.Scrape(context.Background(), addr)
	b.end = time.Now()
	if err != nil {
		t.Fatal(err)
	}
	b.tokens, b.hasTokens = m[`cairn_iosched_tokens{bucket="iops",volume_id="`+id+`"}`]
	_, b.hasBytes = m[`cairn_iosched_tokens{bucket="bytes",volume_id="`+id+`"}`]
	b.throttled, b.hasThrottled = m[`cairn_iosched_throttled_seconds_total{volume_id="`+id+`"}`]
	for k, v := range m {
		if strings.HasPrefix(k, "cairn_iosched_dispatched_total{") && strings.Contains(k, `volume_id="`+id+`"`) {
			b.dispatched += v
		}
	}
	return b
}
