// Package qos checks the I/O scheduler's limits on real I/O: fio through
// NBD against a volume of a local cluster of real processes.
package qos

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

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
	raw, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cl struct {
		Nodes []struct{ Agent, Metrics string } `json:"nodes"`
	}
	if err := json.Unmarshal(raw, &cl); err != nil {
		t.Fatal(err)
	}
	var agents []string
	for _, n := range cl.Nodes {
		agents = append(agents, n.Agent)
	}
	server := strings.Join(agents, ",")
	var v struct{ ID string }
	if err := json.Unmarshal([]byte(cairn(t, "ctl", "--server", server, "volume", "create", "qos", "--size", "256Mi",
		"--replicas", "3", "--max-iops", "500", "-o", "json")), &v); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "qos.sock")
	cairn(t, "ctl", "--server", server, "volume", "export", v.ID, "--node", "node-1", "--nbd", sock)

	got := fioIOPS(t, sock, "randrw", 8)
	t.Logf("maxIOPS 500: fio at iodepth 32 measured %.0f IOPS (%.1f%% off)", got, 100*(got-500)/500)
	if !within(got, 500, 0.10) {
		t.Errorf("measured %.0f IOPS with maxIOPS 500; want within ±10%%", got)
	}
	// Node-1's engine held the volume to its limit: its /metrics show the
	// time it was throttled and what its IOPS bucket holds (at most the
	// burst, 500 × 1 s).
	throttled := metric(t, cl.Nodes[0].Metrics, "cairn_iosched_throttled_seconds_total", `volume_id="`+v.ID+`"`)
	tokens := metric(t, cl.Nodes[0].Metrics, "cairn_iosched_tokens", `bucket="iops"`, `volume_id="`+v.ID+`"`)
	t.Logf("node-1 metrics: throttled %.2fs, IOPS bucket holds %.1f tokens", throttled, tokens)
	if throttled <= 0 || tokens > 500 {
		t.Errorf("node-1 reports %.2fs throttled and %.1f IOPS tokens; want more than 0 s and at most 500 tokens", throttled, tokens)
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

// metric scrapes addr's /metrics and returns the value of the sample of
// name whose labels include all of labels (name="value" each).
func metric(t *testing.T, addr, name string, labels ...string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name+"{") {
			continue
		}
		sample, value, ok := strings.Cut(line, "} ")
		if !ok {
			continue
		}
		all := true
		for _, l := range labels {
			all = all && strings.Contains(sample, l)
		}
		if all {
			f, err := strconv.ParseFloat(value, 64)
			if err != nil {
				t.Fatalf("%s: %q: %v", addr, line, err)
			}
			return f
		}
	}
	t.Fatalf("%s/metrics has no %s with %v", addr, name, labels)
	return 0
}
