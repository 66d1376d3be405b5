// Package qos checks the I/O scheduler's limits on real I/O: fio through
// NBD against a volume of a local cluster of real processes.
package qos

import (
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

// fioIOPS runs fio at iodepth 32 over NBD and returns read+write IOPS,
// leaving out a ramp of 2 s (the token bucket's burst).
func fioIOPS(t *testing.T, sock, rw string, seconds int) float64 {
	t.Helper()
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatal("fio is not installed (make test installs it with scripts/install-deps.sh)")
	}
	out := filepath.Join(t.TempDir(), "fio.json")
	cmd := exec.Command("fio", "--name=qos", "--ioengine=nbd", "--uri=nbd+unix:///?socket="+sock, "--rw="+rw, "--bs=4k",
		"--iodepth=32", fmt.Sprintf("--runtime=%d", seconds), "--ramp_time=2", "--time_based", "--output-format=json", "--output="+out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("fio: %v\n%s", err, b)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var res struct {
		Jobs []struct {
			Read  struct{ IOPS float64 } `json:"read"`
			Write struct{ IOPS float64 } `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &res); err != nil || len(res.Jobs) == 0 {
		t.Fatalf("fio output: %v\n%s", err, raw)
	}
	return res.Jobs[0].Read.IOPS + res.Jobs[0].Write.IOPS
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
	if err := json.Unmarshal([]byte(cairn(t, "ctl", "--server", server, "volume", "create", "qos", "--size", "256Mi",
		"--replicas", "3", "--max-iops", "500", "-o", "json")), &v); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "qos.sock")
	cairn(t, "ctl", "--server", server, "volume", "export", v.ID, "--node", "node-1", "--nbd", sock)

	got := fioIOPS(t, sock, "randrw", 8)
	fioDone := time.Now()
	t.Logf("maxIOPS 500: fio at iodepth 32 measured %.0f IOPS (%.1f%% off)", got, 100*(got-500)/500)
	if !within(got, 500, 0.10) {
		t.Errorf("measured %.0f IOPS with maxIOPS 500; want within ±10%%", got)
	}
	// Node-1's engine held the volume to its limit: its /metrics show the
	// time it was throttled and what its IOPS bucket holds: fio drained
	// it, and it has refilled at 500 a second only since fio stopped (50
	// more for fio's exit, before fioDone); full is 500. It has no bytes
	// bucket, having no bandwidth limit.
	m, err := benchkit.Scrape(context.Background(), nodes[0].Metrics)
	if err != nil {
		t.Fatal(err)
	}
	refill := math.Min(500, 500*time.Since(fioDone).Seconds()+50)
	throttled, ok1 := m[`cairn_iosched_throttled_seconds_total{volume_id="`+v.ID+`"}`]
	tokens, ok2 := m[`cairn_iosched_tokens{bucket="iops",volume_id="`+v.ID+`"}`]
	_, hasBytes := m[`cairn_iosched_tokens{bucket="bytes",volume_id="`+v.ID+`"}`]
	t.Logf("node-1 metrics: throttled %.2fs, IOPS bucket holds %.1f tokens (at most %.0f since fio stopped)", throttled, tokens, refill)
	if !ok1 || !ok2 || throttled <= 0 || tokens < 0 || tokens > refill || hasBytes {
		t.Errorf("node-1 reports throttled %.2fs (present %v), IOPS tokens %.1f (present %v), a bytes bucket %v; "+
			"want more than 0 s, 0 to %.0f tokens, no bytes bucket", throttled, ok1, tokens, ok2, hasBytes, refill)
	}

	// The limit changes on the live volume.
	cairn(t, "ctl", "--server", server, "volume", "set-qos", v.ID, "--max-iops", "1500")
	time.Sleep(1500 * time.Millisecond) // the engine polls its volume twice a second
	got = fioIOPS(t, sock, "randread", 5)
	t.Logf("after set-qos 1500: %.0f IOPS", got)
	if !within(got, 1500, 0.10) {
		t.Errorf("measured %.0f IOPS after set-qos --max-iops 1500; want within ±10%%", got)
	}
}
