//go:build e2e

// Package e2e runs Cairn on a real single-node Kubernetes built from source
// (package localkube) and checks what only a real cluster exercises:
// kubelet's staging and publish paths and plugin registration, the
// sidecars, WaitForFirstConsumer with capacity tracking, the attach/detach
// controller. See README.md; run it with `make e2e` (as root).
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/tests/e2e/localkube"
	"github.com/cairn-csi/cairn/tests/logcheck"
)

var (
	cacheFlag = flag.String("e2e.cache", "", "directory of the cached builds (default: the user cache directory's cairn-e2e)")
	runFlag   = flag.String("e2e.run", "", "run directory: the cluster's state and logs (default: CACHE/run)")
	keepFlag  = flag.Bool("e2e.keep", false, "leave the cluster running after the tests (clean up with the next run, or see README.md)")
	buildOnly = flag.Bool("e2e.build-only", false, "build (or find in the cache) what the tests need, then stop: no cluster, no tests")
	baseLater = flag.Bool("e2e.base-later", false, "leave the Cairn image's base out of the build: a host-process run builds it beside its tests (make e2e)")
	modeFlag  = flag.String("e2e.cairn", "host", "how Cairn runs: host (a dev cluster of host processes, every scenario) or pods (the Helm chart in containerd on one node, scenario 1; pods_test.go)")
)

// Parallel tests: every test that only uses volumes of its own (its own
// namespace, claims and StorageClasses) calls t.Parallel, and make e2e runs
// them eight at a time: most of their time is spent waiting for pods,
// kubelet and the sidecars, so running them side by side cuts the suite's
// wall time from about 7 min to about 4. TestNodeAgentKilled does not: it
// kills the node agent that serves every pod's volume on the node. Go runs
// the tests that are not parallel first, then the parallel ones together.

// hostOnly skips a test when Cairn runs as pods on one node: that mode
// runs scenario 1 only (README.md, "Cairn as pods").
func hostOnly(t *testing.T) {
	t.Helper()
	if env.cairn.pods {
		t.Skip("-e2e.cairn=pods runs scenario 1 (TestReplicatedExt4) only: one node, one store member, one replica")
	}
}

// env is the cluster the tests share, set up by TestMain.
var env *cluster

// cluster is the running Kubernetes with Cairn on it.
type cluster struct {
	kube  *localkube.Run
	cairn *cairnDeployment
	bins  *localkube.Binaries
}

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "tests/e2e needs root: it runs containerd, kubelet, mounts and loop devices")
		os.Exit(1)
	}
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// phase prints how long a phase of the run took.
func phase(name string, start time.Time) {
	fmt.Printf("=== phase %-28s %s\n", name, time.Since(start).Round(100*time.Millisecond))
}

func run(m *testing.M) (code int, err error) {
	total := time.Now()
	cache := *cacheFlag
	if cache == "" {
		uc, err := os.UserCacheDir()
		if err != nil {
			return 1, err
		}
		cache = filepath.Join(uc, "cairn-e2e")
	}
	runDir := *runFlag
	if runDir == "" {
		runDir = filepath.Join(cache, "run")
	}
	src, err := os.Getwd() // go test runs in the package's directory
	if err != nil {
		return 1, err
	}

	start := time.Now()
	// A host-process run needs no Cairn image: it builds the image's base
	// and the chart renderer beside its tests, whose CPU is mostly idle
	// (kubelet's and the sidecars' timers), for the pods run that follows
	// in make e2e. Cold, the base took the Kubernetes build about 1 min
	// longer beside it, and the renderer made the pods run 1 min 20 s
	// longer (tests/e2e/README.md, "Timing").
	hostRun := *modeFlag == "host" && !*buildOnly
	b := &localkube.Builder{CacheDir: cache, SourceDir: src, Progress: os.Stdout, BaseLater: *baseLater || hostRun}
	bins, err := b.Build()
	if err != nil {
		return 1, err
	}
	if *modeFlag != "host" && *modeFlag != "pods" {
		return 2, fmt.Errorf("-e2e.cairn=%q: want host or pods", *modeFlag)
	}
	repo := filepath.Join(src, "..", "..")
	cairnBin, err := buildCairn(cache, repo)
	if err != nil {
		return 1, err
	}
	phase("build", start)
	if *buildOnly {
		return 0, nil
	}

	start = time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	kube, err := localkube.Up(ctx, localkube.Options{Dir: runDir, Bins: bins, Progress: os.Stdout})
	if err != nil {
		return 1, err
	}
	env = &cluster{kube: kube, bins: bins}
	defer func() {
		if *keepFlag {
			fmt.Printf("leaving the cluster running (-e2e.keep): kubectl --kubeconfig %s; logs in %s/logs\n", kube.Kubeconfig, runDir)
			return
		}
		start := time.Now()
		if env.cairn != nil {
			if derr := env.cairn.down(); derr != nil {
				fmt.Fprintln(os.Stderr, "stop cairn:", derr)
			}
		}
		if cerr := kube.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("clean up: %w", cerr)
		}
		phase("teardown", start)
		if code != 0 || err != nil {
			fmt.Printf("logs of the failed run are in %s/logs\n", runDir)
		}
		phase("total", total)
	}()
	phase("kubernetes up", start)

	start = time.Now()
	if *modeFlag == "pods" {
		env.cairn, err = deployCairnPods(ctx, kube, bins, b, cairnBin, repo)
	} else {
		env.cairn, err = deployCairn(ctx, kube, bins, cairnBin, filepath.Join(repo, "deploy", "kubernetes"))
	}
	if err != nil {
		printLogs(kube, 40)
		return 1, err
	}
	phase("cairn up", start)

	var baseDone, renderDone <-chan error
	besideStart := time.Now()
	if hostRun {
		baseDone = b.StartBase()
		done := make(chan error, 1)
		go func() {
			_, err := buildHelmRender(cache, repo)
			done <- err
		}()
		renderDone = done
	}
	start = time.Now()
	code = m.Run()
	phase("tests", start)
	if hostRun {
		if err := <-baseDone; err != nil {
			return 1, fmt.Errorf("the Cairn image's base, built beside the tests: %w", err)
		}
		if err := <-renderDone; err != nil {
			return 1, fmt.Errorf("built beside the tests: %w", err)
		}
		phase("pods run's builds (beside)", besideStart)
	}
	if lines := forbiddenInLogs(kube); len(lines) > 0 {
		fmt.Printf("the sidecars were refused by RBAC (deploy/kubernetes/rbac-*.yaml):\n%s\n", strings.Join(lines, "\n"))
		code = 1
	}
	if lines := refusedInLogs(); len(lines) > 0 {
		fmt.Printf("Cairn's role checks refused a call of its own components (docs/security.md):\n%s\n", strings.Join(lines, "\n"))
		code = 1
	}
	if code != 0 {
		printLogs(kube, 40)
	}
	return code, nil
}

// refusedInLogs returns the lines of Cairn's logs where mutual TLS or the
// role checks refused a caller (logcheck.Refusals).
func refusedInLogs() []string {
	var out []string
	for name, path := range env.cairn.logs() {
		b, err := os.ReadFile(path)
		if err != nil {
			out = append(out, err.Error())
			continue
		}
		for _, l := range logcheck.Refusals(string(b)) {
			if len(out) < 20 {
				out = append(out, name+": "+l)
			}
		}
	}
	return out
}

// buildCairn builds the cairn binary under test (the Go build cache makes
// a warm build quick), static as the Dockerfile builds it: the same binary
// runs as a host process and in the image (pods_test.go).
func buildCairn(cache, repo string) (string, error) {
	out := filepath.Join(cache, "cairn-under-test", "cairn")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/cairn")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build cairn: %w", err)
	}
	return out, nil
}

// forbiddenInLogs returns the sidecars' log lines where the API server
// refused them: the RBAC in deploy/kubernetes lacks a rule they use. The
// snapshotter's probe for group snapshot CRDs is expected (Cairn has no
// group snapshots; the sidecar turns the feature off).
func forbiddenInLogs(kube *localkube.Run) []string {
	var out []string
	logs := kube.Logs()
	if env.cairn != nil {
		logs = env.cairn.allLogs()
	}
	for name, path := range logs {
		if !strings.HasPrefix(name, "csi-") {
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			out = append(out, err.Error())
			continue
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, "forbidden") && !strings.Contains(l, "VolumeGroupSnapshot CRDs were not found") {
				out = append(out, name+": "+l)
				if len(out) > 20 {
					return out
				}
			}
		}
	}
	return out
}

// printLogs prints the last lines of every process's log.
func printLogs(kube *localkube.Run, n int) {
	logs := kube.Logs()
	if env != nil && env.cairn != nil {
		logs = env.cairn.allLogs()
	}
	names := make([]string, 0, len(logs))
	for k := range logs {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, name := range names {
		fmt.Printf("--- last %d lines of %s (%s) ---\n%s\n", n, name, logs[name], localkube.Tail(logs[name], n))
	}
}
