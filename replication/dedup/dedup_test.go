package dedup

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/internal/testfs"
)

// mountFS mounts a new file system of fstype (testfs.Mount) for the test
// and returns its mount point.
func mountFS(t *testing.T, fstype string, size int64) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "mnt")
	testfs.Mount(t, fstype, size, mnt)
	return mnt
}

func usedBytes(t *testing.T, dir string) uint64 { return testfs.Used(t, dir) }

// content is n bytes that do not repeat at any ExtentSize boundary: the
// same seed gives the same bytes.
func content(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// cloneFile makes dst share all of src's blocks (FICLONE), as Cairn
// clones a replica's layer on a file system with reflinks.
func cloneFile(t *testing.T, src, dst string) {
	t.Helper()
	s, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	d, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := unix.IoctlFileClone(int(d.Fd()), int(s.Fd())); err != nil {
		t.Fatalf("FICLONE %s → %s: %v", src, dst, err)
	}
}

func sumOf(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func TestProbe(t *testing.T) {
	xfs := mountFS(t, "xfs", 512<<20)
	if err := Probe(xfs); err != nil {
		t.Errorf("Probe(xfs with reflink=1) = %v, want nil", err)
	}
	ext4 := mountFS(t, "ext4", 256<<20)
	err := Probe(ext4)
	if !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Probe(ext4) = %v, want ErrUnsupported", err)
	}
	for _, want := range []string{ext4, "(ext4)", "reflink"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("Probe(ext4) = %q, want it to name %q", err, want)
		}
	}
	left, _ := filepath.Glob(filepath.Join(ext4, ".dedup-probe-*"))
	left2, _ := filepath.Glob(filepath.Join(xfs, ".dedup-probe-*"))
	if len(left)+len(left2) > 0 {
		t.Errorf("Probe left files: %v %v", left, left2)
	}
}

// TestPassFiveClonesFiveCopies is the check: five clones and five
// independent volumes written with the same 256 MiB take at most 1.2× one
// copy after a pass, and a write to one of them changes no other.
func TestPassFiveClonesFiveCopies(t *testing.T) {
	const size = 256 << 20
	mnt := mountFS(t, "xfs", 4<<30)
	base := usedBytes(t, mnt)
	data := content(1, size)
	var srcs []Source
	for i := range 5 {
		p := filepath.Join(mnt, fmt.Sprintf("volume-%d", i))
		writeFile(t, p, data)
		srcs = append(srcs, Source{Key: fmt.Sprintf("volume-%d", i), Path: p})
	}
	for i := range 5 {
		p := filepath.Join(mnt, fmt.Sprintf("clone-%d", i))
		cloneFile(t, srcs[0].Path, p)
		srcs = append(srcs, Source{Key: fmt.Sprintf("clone-%d", i), Path: p})
	}
	before := usedBytes(t, mnt) - base
	t.Logf("before the pass: %d MiB in use for 10 × %d MiB", before>>20, size>>20)

	var progress []Progress
	cfg := Config{Dir: filepath.Join(mnt, "dedup"), Progress: func(p Progress) { progress = append(progress, p) }}
	st, err := Pass(context.Background(), cfg, srcs)
	if err != nil {
		t.Fatal(err)
	}
	after := usedBytes(t, mnt) - base
	t.Logf("after: %d MiB in use (%.2f× one copy); stats %+v", after>>20, float64(after)/size, st)
	if after > size*12/10 {
		t.Errorf("after the pass %d MiB in use, want at most 1.2 × %d MiB", after>>20, size>>20)
	}
	if st.HashedBytes != 10*size {
		t.Errorf("hashed %d bytes, want %d", st.HashedBytes, 10*size)
	}
	if st.SharedBytes < 4*size || st.AlreadySharedBytes < 5*size-ExtentSize {
		t.Errorf("shared %d MiB and found %d MiB already shared, want at least %d and %d", st.SharedBytes>>20, st.AlreadySharedBytes>>20, 4*size>>20, 5*size>>20)
	}
	if want := (Progress{Phase: "share", Done: Buckets, Total: Buckets}); len(progress) == 0 || progress[len(progress)-1] != want {
		t.Errorf("progress %v, want it to end at %+v", progress, want)
	}
	if Pending(cfg.Dir) {
		t.Errorf("a finished pass left its checkpoint")
	}
	var saved uint64
	for _, s := range srcs {
		saved += st.Saved[s.Key]
	}
	// clone-0 comes first in the pass's order (by key): it keeps its
	// blocks as its own, and every other file saves all of its bytes.
	if st.Saved["clone-0"] != 0 || saved != 9*size {
		t.Errorf("saved %v (total %d MiB), want nothing for clone-0, which keeps its blocks, and 9 × %d MiB in all", st.Saved, saved>>20, size>>20)
	}
	sp, err := SpaceOf(srcs[3].Path)
	if err != nil {
		t.Fatal(err)
	}
	if sp.AllocatedBytes != size || sp.SharedBytes != size {
		t.Errorf("SpaceOf(volume-3) = %+v, want %d allocated and shared", sp, size)
	}

	// A write to one volume changes that volume only.
	want := sha256.Sum256(data)
	f, err := os.OpenFile(srcs[2].Path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	patch := bytes.Repeat([]byte("overwritten "), 100000)
	if _, err := f.WriteAt(patch, 3<<20+512); err != nil {
		t.Fatal(err)
	}
	f.Close()
	changed := append([]byte(nil), data...)
	copy(changed[3<<20+512:], patch)
	for i, s := range srcs {
		got := sumOf(t, s.Path)
		switch {
		case i == 2 && got != sha256.Sum256(changed):
			t.Errorf("%s does not hold what was written to it", s.Key)
		case i != 2 && got != want:
			t.Errorf("%s changed when %s was written", s.Key, srcs[2].Key)
		}
	}

	// A second pass finds the rest shared already. It shares again only
	// what the write unshared: the extents it touched and, since xfs
	// copies on write in units of its CoW extent size (128 KiB by
	// default), some unchanged neighbours of theirs in volume-2.
	st, err = Pass(context.Background(), cfg, srcs)
	if err != nil {
		t.Fatal(err)
	}
	if st.SharedBytes > 2<<20 || st.AlreadySharedBytes < 9*size-(2<<20) || st.DifferedExtents != 0 {
		t.Errorf("second pass: %+v, want at most 2 MiB newly shared (around the write) and the rest already shared", st)
	}
}

// TestPassSharesNothingDifferent: files of different data, and a zero
// file, share nothing and keep their data.
func TestPassSharesNothingDifferent(t *testing.T) {
	mnt := mountFS(t, "xfs", 512<<20)
	var srcs []Source
	for i := range 3 {
		p := filepath.Join(mnt, fmt.Sprintf("f%d", i))
		writeFile(t, p, content(uint64(10+i), 8<<20))
		srcs = append(srcs, Source{Key: fmt.Sprintf("f%d", i), Path: p})
	}
	zp := filepath.Join(mnt, "zeros")
	writeFile(t, zp, make([]byte, 4<<20))
	srcs = append(srcs, Source{Key: "zeros", Path: zp}, Source{Key: "gone", Path: filepath.Join(mnt, "missing")})
	st, err := Pass(context.Background(), Config{Dir: filepath.Join(mnt, "dedup")}, srcs)
	if err != nil {
		t.Fatal(err)
	}
	if st.SharedBytes != 0 || st.AlreadySharedBytes != 0 {
		t.Errorf("stats %+v, want nothing shared", st)
	}
	for i := range 3 {
		if sumOf(t, srcs[i].Path) != sha256.Sum256(content(uint64(10+i), 8<<20)) {
			t.Errorf("%s changed", srcs[i].Key)
		}
	}
}

// The kill test runs a pass in a child process (this test binary again),
// kills it with SIGKILL midway, and resumes the pass here.
const childEnv = "CAIRN_DEDUP_TEST_CHILD"

type childSpec struct {
	Dir     string   `json:"dir"`
	Sources []Source `json:"sources"`
	// SlowPhase is the phase whose I/O the child slows down, so that the
	// parent can kill it there.
	SlowPhase string `json:"slow_phase"`
}

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		var c childSpec
		if err := json.Unmarshal([]byte(spec), &c); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		cfg := Config{Dir: c.Dir, CheckpointBytes: 1 << 20, Admit: func(_ context.Context, _ Source, n uint64) (func(), error) {
			if (c.SlowPhase == "hash") == (n == ExtentSize) {
				time.Sleep(2 * time.Millisecond)
			}
			return func() {}, nil
		}}
		if _, err := Pass(context.Background(), cfg, c.Sources); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestPassResumesAfterKill kills a pass with SIGKILL in each phase while
// another process overwrites one of the files, then resumes it: no file
// loses a byte, the pass goes on from its checkpoint, and the equal files
// end up shared.
func TestPassResumesAfterKill(t *testing.T) {
	for _, phase := range []string{"hash", "share"} {
		t.Run(phase, func(t *testing.T) {
			const size = 32 << 20
			mnt := mountFS(t, "xfs", 1<<30)
			base := usedBytes(t, mnt)
			data := content(7, size)
			var srcs []Source
			for i := range 4 {
				p := filepath.Join(mnt, fmt.Sprintf("v%d", i))
				writeFile(t, p, data)
				srcs = append(srcs, Source{Key: fmt.Sprintf("v%d", i), Path: p})
			}
			dir := filepath.Join(mnt, "dedup")
			spec, _ := json.Marshal(childSpec{Dir: dir, Sources: srcs, SlowPhase: phase})
			cmd := exec.Command(os.Args[0], "-test.run", "^$")
			cmd.Env = append(os.Environ(), childEnv+"="+string(spec))
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()

			// Wait until the child is in the phase, past its first
			// checkpoint there.
			deadline := time.Now().Add(2 * time.Minute)
			for {
				b, _ := os.ReadFile(filepath.Join(dir, progressName))
				var cp checkpoint
				if json.Unmarshal(b, &cp) == nil && ((phase == "hash" && !cp.Hashed && cp.Source >= 1) || (phase == "share" && cp.Hashed && cp.Bucket >= 40)) {
					break
				}
				select {
				case err := <-exited:
					t.Fatalf("the pass ended before it could be killed in its %s phase: %v: %s", phase, err, stderr.String())
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("the pass did not reach its %s phase: %s", phase, b)
				}
				time.Sleep(5 * time.Millisecond)
			}
			// Overwrite part of v1 while the pass runs, then kill it.
			f, err := os.OpenFile(srcs[1].Path, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			patch := content(99, 2<<20)
			if _, err := f.WriteAt(patch, 5<<20); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			<-exited
			if !Pending(dir) {
				t.Fatal("no checkpoint left by the killed pass")
			}
			changed := append([]byte(nil), data...)
			copy(changed[5<<20:], patch)

			st, err := Pass(context.Background(), Config{Dir: dir}, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !st.Resumed {
				t.Errorf("the pass started again instead of resuming")
			}
			for i, s := range srcs {
				want := sha256.Sum256(data)
				if i == 1 {
					want = sha256.Sum256(changed)
				}
				if sumOf(t, s.Path) != want {
					t.Errorf("%s lost data", s.Key)
				}
			}
			// A last pass picks up what the killed one could not know.
			if _, err := Pass(context.Background(), Config{Dir: dir}, srcs); err != nil {
				t.Fatal(err)
			}
			used := usedBytes(t, mnt) - base
			t.Logf("resumed pass %+v; in use at the end %d MiB for 4 × %d MiB", st, used>>20, size>>20)
			// One copy, plus v1's 2 MiB of its own.
			if used > (size+2<<20)*12/10 {
				t.Errorf("%d MiB in use at the end, want at most 1.2 × %d MiB", used>>20, (size+2<<20)>>20)
			}
		})
	}
}

// TestPassManySources: more sources than a pass keeps open (maxOpen), all
// equal: every one ends up sharing the first one's blocks.
func TestPassManySources(t *testing.T) {
	mnt := mountFS(t, "xfs", 512<<20)
	base := usedBytes(t, mnt)
	data := content(3, 2*ExtentSize)
	var srcs []Source
	for i := range maxOpen + 44 {
		p := filepath.Join(mnt, fmt.Sprintf("f%03d", i))
		writeFile(t, p, data)
		srcs = append(srcs, Source{Key: fmt.Sprintf("f%03d", i), Path: p})
	}
	st, err := Pass(context.Background(), Config{Dir: filepath.Join(mnt, "dedup")}, srcs)
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(len(srcs)-1) * 2 * ExtentSize; st.SharedBytes != want {
		t.Errorf("shared %d bytes, want %d (every file but the first, whole)", st.SharedBytes, want)
	}
	if used := usedBytes(t, mnt) - base; used > 4<<20 {
		t.Errorf("%d KiB in use for %d equal files of 128 KiB, want about one", used>>10, len(srcs))
	}
}
