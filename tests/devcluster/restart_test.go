package devcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/tests/nbdclient"
)

// TestAgentRestartKeepsMountedVolume is issue 15's restart test, with real
// processes: a 3-replica ext4 volume published on node-1 of a dev cluster
// (whose nodes each run a `cairn fuse-holder`), a writer that fsyncs every
// 4 KiB record (QD1) and fio at QD32 on the mount. node-1's agent is killed
// with SIGKILL and started again, then stopped with SIGTERM and started from
// another binary (a rolling upgrade). Neither writer may see an I/O error,
// the file system must stay read-write, and every acknowledged record must
// read back. A second volume, exported over NBD by the same agent, serves
// again after each restart. The longest pause the fsync writer saw is logged.
func TestAgentRestartKeepsMountedVolume(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: FUSE, loop devices, mkfs and mount")
	}
	dir := filepath.Join(t.TempDir(), "cluster")
	var loop, vol string
	t.Cleanup(func() {
		if r := run(t, "dev", "down", "--dir", dir); r.code != 0 {
			t.Errorf("dev down: exit %d: %s%s", r.code, r.stdout, r.stderr)
		}
		if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && bytes.Contains(b, []byte(dir)) {
			t.Errorf("mounts under %s left after dev down", dir)
		}
		if loop == "" {
			return
		}
		if b, err := os.ReadFile(filepath.Join("/sys/block", loop, "loop", "backing_file")); err == nil && strings.HasSuffix(strings.TrimSpace(string(b)), "/"+vol) {
			t.Errorf("/dev/%s is still attached to %s after dev down", loop, strings.TrimSpace(string(b)))
			_ = exec.Command("losetup", "-d", "/dev/"+loop).Run()
		}
	})
	// With mutual TLS, as users should run it: the restarted agent takes
	// its engines back over TLS connections to the replicas.
	mustRun(t, "dev", "up", "--nodes", "3", "--dir", dir, "--tls")
	vol = strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "create", "restart-data", "--size", "256Mi",
		"--param", "replicas=3", "--param", "csi.storage.k8s.io/fstype=ext4"))
	mnt := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "publish", vol, "--node", "node-1"))
	loop = loopOf(t, filepath.Join(dir, "node-1", "data", "csi", "fuse", vol))

	// A second volume exported over NBD by the same agent: its export
	// must come back after each restart (NBD clients reconnect).
	servers := agentsOf(t, dir)
	nbdVol := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "create", "restart-nbd", "--size", "16Mi", "--param", "replicas=3"))
	nbdSock := filepath.Join(dir, "nbd.sock")
	mustRun(t, "ctl", "--server", servers, "--tls-dir", filepath.Join(dir, "pki", "ctl"), "volume", "export", nbdVol, "--node", "node-1", "--nbd", nbdSock)
	nbdBlock := func(gen byte) []byte { return bytes.Repeat([]byte{gen}, 4096) }
	nbdWrite(t, nbdSock, nbdBlock(1))

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	w := startSyncWriter(t, ctx, filepath.Join(mnt, "records"))
	var fio *exec.Cmd
	var fioOut bytes.Buffer
	if path, err := exec.LookPath("fio"); err == nil {
		// Random 4 KiB direct writes at QD32, each block verified when
		// read back (verify_backlog), for as long as the test runs.
		fio = exec.Command(path, "--name=qd32", "--filename="+filepath.Join(mnt, "fio.dat"), "--size=32M",
			"--rw=randwrite", "--bs=4k", "--iodepth=32", "--ioengine=libaio", "--direct=1",
			"--time_based", "--runtime=600", "--verify=crc32c", "--verify_backlog=1024", "--verify_fatal=1", "--verify_state_save=0",
			"--output-format=terse")
		fio.Stdout, fio.Stderr = &fioOut, &fioOut
		if err := fio.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if fio.ProcessState == nil {
				_ = fio.Process.Kill()
				_ = fio.Wait()
			}
		}()
	} else {
		t.Log("fio is not installed (make deps installs it): only the fsync writer runs")
	}
	waitRecords := func(n int64) {
		t.Helper()
		eventually(t, 30*time.Second, fmt.Sprintf("%d acknowledged records", n), func() error {
			if err := w.failed(); err != nil {
				t.Fatalf("the fsync writer failed: %v", err)
			}
			if got := w.acked(); got < n {
				return fmt.Errorf("%d acknowledged", got)
			}
			return nil
		})
	}
	waitRecords(200)

	// A crash: SIGKILL, then the same binary again.
	mustRun(t, "dev", "kill", "--dir", dir, "node-1")
	mustRun(t, "dev", "start", "--dir", dir, "node-1")
	waitRecords(w.acked() + 200)

	// A rolling upgrade: SIGTERM, then another binary.
	pid := nodePID(t, dir, "node-1")
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "node-1 exits on SIGTERM", func() error {
		if processAlive(pid) {
			return errors.New("still running")
		}
		return nil
	})
	upgraded := filepath.Join(t.TempDir(), "cairn-next")
	copyFile(t, cairnBin, upgraded)
	if out, err := exec.Command(upgraded, "dev", "start", "--dir", dir, "node-1").CombinedOutput(); err != nil {
		t.Fatalf("dev start with the next binary: %v\n%s", err, out)
	}
	waitRecords(w.acked() + 200)

	stop()
	werr, pause := w.wait()
	if fio != nil {
		// On SIGINT fio stops, prints its summary and exits with a
		// status that only says it was signalled; the summary's fifth
		// field is the job's error (an I/O error, a failed verify).
		_ = fio.Process.Signal(syscall.SIGINT)
		err := fio.Wait()
		out := fioOut.String()
		var line string
		for l := range strings.SplitSeq(out, "\n") {
			if strings.HasPrefix(l, "3;") {
				line = l
			}
		}
		if f := strings.Split(line, ";"); len(f) < 5 || f[4] != "0" {
			t.Errorf("fio QD32 failed across the restarts (%v):\n%s", err, out)
		} else {
			t.Log("fio QD32: no error across the restarts")
		}
	}
	if werr != nil {
		t.Fatalf("the fsync writer failed across the restarts: %v", werr)
	}
	t.Logf("fsync writer: %d records acknowledged; longest write+fsync across the two restarts: %v", w.acked(), pause)
	if opts, super := mountOptions(t, mnt); !strings.HasPrefix(opts, "rw") || !strings.HasPrefix(super, "rw") {
		t.Fatalf("%s is mounted %q (file system %q) after the restarts, want rw", mnt, opts, super)
	}

	// The NBD export came back with the agent: what was written before
	// the restarts reads back, and it takes writes.
	nbdCheck(t, nbdSock, nbdBlock(1))
	nbdWrite(t, nbdSock, nbdBlock(2))
	nbdCheck(t, nbdSock, nbdBlock(2))

	// kubelet asks again after a restart: staging and publishing a volume
	// that is staged must succeed and change nothing.
	if again := strings.TrimSpace(mustRun(t, "dev", "csi", "--dir", dir, "publish", vol, "--node", "node-1")); again != mnt {
		t.Fatalf("publish after the restarts gave %s, want %s", again, mnt)
	}
	log := readFile(t, filepath.Join(dir, "node-1", "node.log"))
	if n := strings.Count(log, `"volumes taken over from the earlier agent"`); n != 2 {
		t.Errorf("node-1's log tells %d takeovers, want 2", n)
	}
	if strings.Contains(log, `"lost":1`) {
		t.Errorf("node-1's log tells of a volume not taken over")
	}

	// Every acknowledged record reads back, from the disk, not the cache.
	syscall.Sync()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
	w.verify(t)

	// And the volume still unstages cleanly: its record came back with
	// the takeover.
	mustRun(t, "dev", "csi", "--dir", dir, "unpublish", vol, "--node", "node-1")
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil && bytes.Contains(b, []byte(filepath.Join(dir, "kubelet"))) {
		t.Errorf("the volume's mounts are left after unpublish")
	}
}

// syncWriter appends 4 KiB records, each fsynced, and counts those
// acknowledged.
type syncWriter struct {
	path string
	done chan struct{}

	mu      sync.Mutex
	n       int64
	err     error
	longest time.Duration
}

func startSyncWriter(t *testing.T, ctx context.Context, path string) *syncWriter {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	w := &syncWriter{path: path, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		defer f.Close()
		for n := int64(0); ctx.Err() == nil; n++ {
			start := time.Now()
			_, err := f.Write(record(n))
			if err == nil {
				err = f.Sync()
			}
			took := time.Since(start)
			w.mu.Lock()
			w.longest = max(w.longest, took)
			if err != nil {
				w.err = fmt.Errorf("record %d: %w", n, err)
				w.mu.Unlock()
				return
			}
			w.n = n + 1
			w.mu.Unlock()
		}
	}()
	return w
}

func record(n int64) []byte {
	return bytes.Repeat([]byte(fmt.Sprintf("%015d\n", n)), 4096/16)
}

func (w *syncWriter) acked() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.n
}

func (w *syncWriter) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

func (w *syncWriter) wait() (error, time.Duration) {
	<-w.done
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err, w.longest
}

// verify checks that the file begins with every acknowledged record.
func (w *syncWriter) verify(t *testing.T) {
	t.Helper()
	f, err := os.Open(w.path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for n := int64(0); n < w.n; n++ {
		if _, err := io.ReadFull(f, buf); err != nil {
			t.Fatalf("record %d of %d acknowledged: %v", n, w.n, err)
		}
		if !bytes.Equal(buf, record(n)) {
			t.Fatalf("record %d of %d acknowledged reads back as %q…", n, w.n, buf[:32])
		}
	}
}

// agentsOf lists the dev cluster's meta API addresses, for ctl --server.
func agentsOf(t *testing.T, dir string) string {
	t.Helper()
	var addrs []string
	for _, n := range decode[clusterJSON](t, readFile(t, filepath.Join(dir, "cluster.json"))).Nodes {
		addrs = append(addrs, n.Agent)
	}
	return strings.Join(addrs, ",")
}

// nbdWrite writes p at offset 0 of the NBD export at sock, durably.
func nbdWrite(t *testing.T, sock string, p []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := nbdDial(t, ctx, sock)
	defer c.Close()
	if err := c.WriteAt(ctx, p, 0, true); err != nil {
		t.Fatalf("NBD write at %s: %v", sock, err)
	}
}

// nbdCheck reads offset 0 of the NBD export at sock and compares it to want.
func nbdCheck(t *testing.T, sock string, want []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := nbdDial(t, ctx, sock)
	defer c.Close()
	got := make([]byte, len(want))
	if err := c.ReadAt(ctx, got, 0); err != nil {
		t.Fatalf("NBD read at %s: %v", sock, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("NBD export at %s reads %x…, want %x…", sock, got[:8], want[:8])
	}
}

// nbdDial connects to the export at sock, waiting for it to come back.
func nbdDial(t *testing.T, ctx context.Context, sock string) *nbdclient.Conn {
	t.Helper()
	for {
		c, err := nbdclient.Dial(ctx, sock)
		if err == nil {
			return c
		}
		select {
		case <-ctx.Done():
			t.Fatalf("NBD export at %s: %v", sock, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// loopOf returns the loop device (loopN) whose backing file is path.
func loopOf(t *testing.T, path string) string {
	t.Helper()
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.TrimSpace(string(b)) == path {
			return filepath.Base(filepath.Dir(filepath.Dir(f)))
		}
	}
	t.Fatalf("no loop device is backed by %s", path)
	return ""
}

func nodePID(t *testing.T, dir, id string) int {
	t.Helper()
	cl := decode[clusterJSON](t, readFile(t, filepath.Join(dir, "cluster.json")))
	for _, n := range cl.Nodes {
		if n.ID == id {
			return n.PID
		}
	}
	t.Fatalf("no %s in cluster.json", id)
	return 0
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

// mountOptions returns the options of the mount at path, and those of its
// file system (ext4 remounts itself read-only on errors there).
func mountOptions(t *testing.T, path string) (mnt, super string) {
	t.Helper()
	for line := range strings.SplitSeq(readFile(t, "/proc/self/mountinfo"), "\n") {
		f := strings.Fields(line)
		if len(f) <= 5 || f[4] != path {
			continue
		}
		for i := 6; i+3 < len(f)+1; i++ {
			if f[i] == "-" && i+3 < len(f) {
				return f[5], f[i+3]
			}
		}
		return f[5], ""
	}
	t.Fatalf("%s is not mounted", path)
	return "", ""
}
