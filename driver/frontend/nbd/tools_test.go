package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// These tests drive the server with real NBD clients: libnbd's nbdinfo and
// nbdcopy, fio's nbd engine and libnbd's Python binding. Each skips when
// its tool is not installed (Debian: libnbd-bin fio python3-libnbd).

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is not installed (Debian: apt-get install libnbd-bin fio python3-libnbd)", name)
	}
	return p
}

func nbdURI(socket string) string { return "nbd+unix:///?socket=" + socket }

// runTool runs a client and fails the test with its output if it fails.
func runTool(t *testing.T, timeout time.Duration, name string, args ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, out, stderr.Bytes())
	}
	return out
}

func TestNbdinfo(t *testing.T) {
	nbdinfo := needTool(t, "nbdinfo")
	const size = 8 << 20
	for _, ro := range []bool{false, true} {
		_, path := startServer(t, newFileBackend(t, size), Options{ReadOnly: ro})
		out := runTool(t, 30*time.Second, nbdinfo, "--json", nbdURI(path))
		var info struct {
			Exports []struct {
				Size         uint64 `json:"export-size"`
				ReadOnly     bool   `json:"is_read_only"`
				CanMultiConn bool   `json:"can_multi_conn"`
				CanFUA       bool   `json:"can_fua"`
				CanTrim      bool   `json:"can_trim"`
				CanZero      bool   `json:"can_zero"`
				CanFlush     bool   `json:"can_flush"`
				BlockMax     uint32 `json:"block_size_maximum"`
			} `json:"exports"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatalf("nbdinfo output: %v\n%s", err, out)
		}
		if len(info.Exports) != 1 {
			t.Fatalf("nbdinfo saw %d exports:\n%s", len(info.Exports), out)
		}
		e := info.Exports[0]
		if e.Size != size || e.ReadOnly != ro || !e.CanMultiConn || !e.CanFUA || !e.CanTrim || !e.CanZero || !e.CanFlush {
			t.Fatalf("nbdinfo (read-only %v) reported %+v:\n%s", ro, e, out)
		}
		if e.BlockMax != defaultMaxRequestBytes {
			t.Fatalf("maximum block size %d, want %d", e.BlockMax, defaultMaxRequestBytes)
		}
	}
	// --list goes through NBD_OPT_LIST and NBD_OPT_INFO.
	_, path := startServer(t, newFileBackend(t, size), Options{})
	if out := runTool(t, 30*time.Second, nbdinfo, "--list", "--json", nbdURI(path)); !bytes.Contains(out, []byte(`"`+testExport+`"`)) {
		t.Fatalf("nbdinfo --list does not name %q:\n%s", testExport, out)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	nbdcopy := needTool(t, "nbdcopy")
	const size = 8 << 20
	b := newFileBackend(t, size)
	_, path := startServer(t, b, Options{})
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	dst := filepath.Join(dir, "dst.img")
	want := pattern(size, 42)
	if err := os.WriteFile(src, want, 0o600); err != nil {
		t.Fatal(err)
	}
	// nbdcopy opens several connections when CAN_MULTI_CONN is offered.
	runTool(t, 60*time.Second, nbdcopy, "--flush", src, nbdURI(path))
	if b.writes.Load() == 0 || b.flushes.Load() == 0 {
		t.Fatalf("nbdcopy in: writes %d flushes %d", b.writes.Load(), b.flushes.Load())
	}
	runTool(t, 60*time.Second, nbdcopy, nbdURI(path), dst)
	got, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("copied out %d bytes that differ from the %d copied in", len(got), len(want))
	}
}

func TestFioVerify(t *testing.T) {
	fio := needTool(t, "fio")
	if out, err := exec.Command(fio, "--enghelp=nbd").CombinedOutput(); err != nil {
		t.Skipf("this fio has no nbd engine: %v %s", err, out)
	}
	_, path := startServer(t, newFileBackend(t, 8<<20), Options{})
	runTool(t, 2*time.Minute, fio,
		"--name=verify", "--ioengine=nbd", "--uri="+nbdURI(path),
		"--rw=randrw", "--bs=4k", "--iodepth=16", "--size=4M",
		"--runtime=2", "--time_based",
		"--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
		"--verify_state_save=0", // else fio leaves a state file in the package directory
		"--output-format=terse")
}

// pythonWithLibnbd finds a python3 on PATH that can import libnbd's binding
// (the first python3 on PATH may be a private one without distro packages).
func pythonWithLibnbd(t *testing.T) string {
	t.Helper()
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(dir, "python3")
		if _, err := os.Stat(p); err != nil {
			continue
		}
		if exec.Command(p, "-c", "import nbd").Run() == nil {
			return p
		}
	}
	t.Skip("no python3 on PATH can import nbd (Debian: apt-get install python3-libnbd)")
	return ""
}

// TestLibnbdPython checks, through libnbd's Python binding, the commands fio
// and nbdcopy do not send: FUA, trim, write zeroes, flush, and the errors of
// a read-only export and of an out-of-range read.
func TestLibnbdPython(t *testing.T) {
	python := pythonWithLibnbd(t)
	const script = `
import errno, sys, nbd
ro = sys.argv[2] == "ro"
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.get_size() == 1 << 20
assert h.is_read_only() == ro
def expect(e, f, *a):
    try:
        f(*a)
    except nbd.Error as err:
        assert err.errnum == e, (f.__name__, err.errnum, err)
        return
    raise AssertionError(f.__name__ + " succeeded")
h.set_strict_mode(0)  # let requests the client would refuse reach the server
expect(errno.EINVAL, h.pread, 4096, (1 << 20) - 512)
if ro:
    expect(errno.EPERM, h.pwrite, b"x" * 4096, 0)
    expect(errno.EPERM, h.trim, 4096, 0)
    expect(errno.EPERM, h.zero, 4096, 0)
    h.flush()
else:
    h.pwrite(b"a" * 8192, 0, nbd.CMD_FLAG_FUA)
    h.trim(4096, 0, nbd.CMD_FLAG_FUA)
    h.zero(4096, 4096, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert h.pread(8192, 0) == bytes(8192)
    expect(errno.ENOSPC, h.pwrite, b"x" * 1024, (1 << 20) - 512)
h.shutdown()
`
	for _, ro := range []bool{false, true} {
		b := newFileBackend(t, 1<<20)
		s, path := startServer(t, b, Options{ReadOnly: ro})
		reg := serverMetrics(t, s)
		mode := "rw"
		if ro {
			mode = "ro"
		}
		runTool(t, 30*time.Second, python, "-c", script, nbdURI(path), mode)
		// The refusals came from the server, not from libnbd.
		m := metricValues(t, reg, testExport)
		// One refused write each way: ENOSPC, or EPERM on the read-only export.
		if m["cairn_nbd_errors_total/read"] != 1 || m["cairn_nbd_errors_total/write"] != 1 {
			t.Fatalf("server counted read errors %v, write errors %v", m["cairn_nbd_errors_total/read"], m["cairn_nbd_errors_total/write"])
		}
		if ro && (m["cairn_nbd_errors_total/trim"] != 1 || m["cairn_nbd_errors_total/write_zeroes"] != 1) {
			t.Fatalf("server counted trim errors %v, write_zeroes errors %v", m["cairn_nbd_errors_total/trim"], m["cairn_nbd_errors_total/write_zeroes"])
		}
		if ro {
			if b.mutating() != 0 {
				t.Fatalf("read-only export: %d writes reached the backend", b.mutating())
			}
			continue
		}
		if b.fuaWrites.Load() != 1 || b.trims.Load() != 1 || b.zeroes.Load() != 1 || b.fuaZeroes.Load() != 1 || b.flushes.Load() < 2 {
			t.Fatalf("backend saw FUA writes %d, trims %d, zeroes %d (FUA %d), flushes %d",
				b.fuaWrites.Load(), b.trims.Load(), b.zeroes.Load(), b.fuaZeroes.Load(), b.flushes.Load())
		}
	}
}
