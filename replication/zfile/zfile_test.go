package zfile

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/internal/testlogs"
)

// jsonLogs is n bytes of generated JSON log lines: the compressible data
// of the issue.
func jsonLogs(r *rand.Rand, n int) []byte { return testlogs.JSON(r, n) }

func randomBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b
}

func mustRead(t *testing.T, f *File, off, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	if _, err := f.ReadAt(p, int64(off)); err != nil {
		t.Fatalf("read [%d, +%d): %v", off, n, err)
	}
	return p
}

// TestCompressibleAndRandom: JSON logs take at most half their size and
// read back exactly, also after a reopen; random data takes at most 1.02×
// its size and is stored raw.
func TestCompressibleAndRandom(t *testing.T) {
	const size = 16 << 20
	r := rand.New(rand.NewPCG(1, 2))
	for _, c := range []struct {
		name    string
		data    []byte
		maxPhys float64
	}{
		{"json logs", jsonLogs(r, size), 0.5},
		{"random", randomBytes(r, size), 1.02},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "data")
			f, err := Create(path, size)
			if err != nil {
				t.Fatal(err)
			}
			// Written as a file system would: 1 MiB at a time.
			for off := 0; off < size; off += 1 << 20 {
				if _, err := f.WriteAt(c.data[off:off+1<<20], int64(off)); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			st, err := f.Stats()
			if err != nil {
				t.Fatal(err)
			}
			ratio := float64(st.PhysicalBytes) / float64(st.LogicalBytes)
			t.Logf("%s: %d MiB logical, %.1f MiB physical (%.3f), %d extents compressed", c.name, st.LogicalBytes>>20, float64(st.PhysicalBytes)/(1<<20), ratio, st.CompressedExtents)
			if st.LogicalBytes != size || ratio > c.maxPhys {
				t.Errorf("%d logical bytes, physical %.3f of them; want %d and at most %.2f", st.LogicalBytes, ratio, size, c.maxPhys)
			}
			if !bytes.Equal(mustRead(t, f, 0, size), c.data) {
				t.Fatal("read back differs")
			}
			f.Close()
			if f, err = Open(path); err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if !bytes.Equal(mustRead(t, f, 0, size), c.data) {
				t.Fatal("read back after reopen differs")
			}
		})
	}
}

// TestAgainstModel: random whole and partial writes, punches, syncs and
// reopens read back as a plain byte slice would.
func TestAgainstModel(t *testing.T) {
	const size = 2<<20 + 12288 // a partial last extent
	r := rand.New(rand.NewPCG(3, 4))
	path := filepath.Join(t.TempDir(), "data")
	f, err := Create(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { f.Close() }()
	model := make([]byte, size)
	for i := range 1500 {
		switch k := r.IntN(10); {
		case k < 4: // whole extents, compressible or not
			e := r.IntN(size / ExtentSize)
			p := jsonLogs(r, ExtentSize)
			if r.IntN(3) == 0 {
				p = randomBytes(r, ExtentSize)
			}
			copy(model[e*ExtentSize:], p)
			if _, err := f.WriteAt(p, int64(e*ExtentSize)); err != nil {
				t.Fatal(err)
			}
		case k < 8: // anywhere, any length up to 3 extents
			n := 1 + r.IntN(3*ExtentSize)
			off := r.IntN(size - n)
			p := jsonLogs(r, n)
			copy(model[off:], p)
			if _, err := f.WriteAt(p, int64(off)); err != nil {
				t.Fatal(err)
			}
		case k == 8 && r.IntN(2) == 0:
			n := 1 + r.IntN(2*ExtentSize)
			off := r.IntN(size - n)
			clear(model[off : off+n])
			if err := f.Punch(uint64(off), uint64(n)); err != nil {
				t.Fatal(err)
			}
		case k == 8: // recompress what small writes left raw
			recompressAll(t, f)
		default:
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			if r.IntN(4) == 0 {
				f.Close()
				if f, err = Open(path); err != nil {
					t.Fatal(err)
				}
			}
		}
		if i%100 == 0 {
			if !bytes.Equal(mustRead(t, f, 0, size), model) {
				t.Fatalf("after op %d the file differs from the model", i)
			}
			checkCount(t, f)
		}
	}
	if !bytes.Equal(mustRead(t, f, 0, size), model) {
		t.Fatal("the file differs from the model")
	}
}

// checkCount checks that the running count of compressed extents is what
// a walk of the map finds, extent by extent.
func checkCount(t *testing.T, f *File) {
	t.Helper()
	var walked uint64
	for e := range extents(f.size) {
		if f.currentLocked(e) != 0 {
			walked++
		}
	}
	st, err := f.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.CompressedExtents != walked {
		t.Fatalf("Stats counts %d compressed extents, the map holds %d", st.CompressedExtents, walked)
	}
}

// recompressAll recompresses every extent NextRaw offers.
func recompressAll(t *testing.T, f *File) (done int) {
	t.Helper()
	for e, ok := f.NextRaw(0); ok; e, ok = f.NextRaw(e + 1) {
		did, err := f.Recompress(e)
		if err != nil {
			t.Fatal(err)
		}
		if did {
			done++
		}
	}
	return done
}

// TestRecompress: extents that small writes left raw are stored compressed
// again, once the map on disk no longer names their compressed slot, with
// the same content; an incompressible extent is tried once until it is
// written again.
func TestRecompress(t *testing.T) {
	const size = 1 << 20
	r := rand.New(rand.NewPCG(8, 8))
	path := filepath.Join(t.TempDir(), "data")
	f, err := Create(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { f.Close() }()
	model := jsonLogs(r, size)
	copy(model[:ExtentSize], randomBytes(r, ExtentSize)) // extent 0 does not compress
	if _, err := f.WriteAt(model, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	physical := func() uint64 {
		st, err := f.Stats()
		if err != nil {
			t.Fatal(err)
		}
		return st.PhysicalBytes
	}
	before := physical()
	// A small write into every compressed extent makes it raw.
	for e := 1; e < size/ExtentSize; e++ {
		p := jsonLogs(r, BlockSize)
		copy(model[e*ExtentSize+BlockSize:], p)
		if _, err := f.WriteAt(p, int64(e*ExtentSize+BlockSize)); err != nil {
			t.Fatal(err)
		}
	}
	if n := recompressAll(t, f); n != 0 {
		t.Fatalf("%d extents recompressed while the map on disk names their compressed slot", n)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	raw := physical()
	if n := recompressAll(t, f); n != size/ExtentSize-1 {
		t.Fatalf("%d extents recompressed, want %d", n, size/ExtentSize-1)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	after := physical()
	t.Logf("compressed %d KiB, raw after small writes %d KiB, recompressed %d KiB", before>>10, raw>>10, after>>10)
	if after > before+BlockSize*(size/ExtentSize) || after*2 > raw {
		t.Errorf("recompressed to %d bytes: compressed %d, raw %d", after, before, raw)
	}
	if _, ok := f.NextRaw(0); ok {
		t.Error("NextRaw offers an extent after everything was tried (extent 0 does not compress)")
	}
	if _, err := f.WriteAt(jsonLogs(r, BlockSize), 0); err != nil { // extent 0 is written again: tried again
		t.Fatal(err)
	}
	if e, ok := f.NextRaw(0); !ok || e != 0 {
		t.Errorf("NextRaw after a write to extent 0: %d, %v", e, ok)
	}
	copy(model, mustRead(t, f, 0, BlockSize))
	f.Close()
	if f, err = Open(path); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustRead(t, f, 0, size), model) {
		t.Fatal("the file does not read what was written")
	}
}

// The crash test's child (this binary again) runs ops until it is killed.
const crashEnv = "CAIRN_ZFILE_CRASH_CHILD"

const (
	crashSize  = 4 << 20
	syncEvery  = 16
	markerName = "marker"
)

// crashOp is op i of the stream a crash child runs: deterministic by seed.
type crashOp struct {
	punch      bool
	recompress bool // up to 4 extents from off's, content unchanged
	off        int
	data       []byte // nil for a punch
	n          int
	sync       bool
}

// crashOps generates the stream's ops from r in order.
func nextCrashOp(r *rand.Rand, i int) crashOp {
	if i%syncEvery == syncEvery-1 {
		return crashOp{sync: true}
	}
	switch k := r.IntN(9); {
	case k < 3:
		e := r.IntN(crashSize / ExtentSize)
		p := jsonLogs(r, ExtentSize)
		if k == 0 {
			p = randomBytes(r, ExtentSize)
		}
		return crashOp{off: e * ExtentSize, data: p, n: ExtentSize}
	case k < 7:
		n := BlockSize * (1 + r.IntN(4))
		off := BlockSize * r.IntN((crashSize-n)/BlockSize)
		return crashOp{off: off, data: jsonLogs(r, n), n: n}
	case k == 7:
		n := BlockSize * (1 + r.IntN(20))
		off := BlockSize * r.IntN((crashSize-n)/BlockSize)
		return crashOp{punch: true, off: off, n: n}
	default:
		return crashOp{recompress: true, off: ExtentSize * r.IntN(crashSize/ExtentSize)}
	}
}

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashEnv); dir != "" {
		os.Exit(crashChild(dir))
	}
	os.Exit(m.Run())
}

// crashChild starts from a file whose every extent holds compressed JSON
// (synced), then runs the op stream; before op i it records i+1 ops
// issued, after each sync the ops synced, in the marker file.
func crashChild(dir string) int {
	f, err := Open(filepath.Join(dir, "data"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	marker, err := os.OpenFile(filepath.Join(dir, markerName), os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	r := rand.New(rand.NewPCG(99, 1))
	var m [8]byte
	for i := 0; ; i++ {
		op := nextCrashOp(r, i)
		binary.LittleEndian.PutUint64(m[:], uint64(i+1))
		if _, err := marker.WriteAt(m[:], 0); err != nil {
			return 1
		}
		switch {
		case op.sync:
			err = f.Sync()
			if err == nil {
				binary.LittleEndian.PutUint64(m[:], uint64(i+1))
				_, err = marker.WriteAt(m[:], 8)
			}
		case op.punch:
			err = f.Punch(uint64(op.off), uint64(op.n))
		case op.recompress:
			e, ok := f.NextRaw(uint64(op.off / ExtentSize))
			for j := 0; ok && j < 4 && err == nil; j++ {
				_, err = f.Recompress(e)
				e, ok = f.NextRaw(e + 1)
			}
		default:
			_, err = f.WriteAt(op.data, int64(op.off))
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
	}
}

// TestKillDuringOverwrites is the crash test: a process overwrites
// a compressed file (whole extents, small writes into compressed extents,
// punches, recompressions, a sync every 16 ops) and is killed with SIGKILL
// at a random moment, five times. Reopened, every 4 KiB block holds its content as of
// the last sync, or what an op after it wrote there: a torn rewrite of an
// extent never loses the other blocks of that extent.
func TestKillDuringOverwrites(t *testing.T) {
	for round := range 5 {
		t.Run(strconv.Itoa(round), func(t *testing.T) {
			dir := t.TempDir()
			init := jsonLogs(rand.New(rand.NewPCG(5, uint64(round))), crashSize)
			f, err := Create(filepath.Join(dir, "data"), crashSize)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(init, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			if err := os.WriteFile(filepath.Join(dir, markerName), make([]byte, 16), 0o600); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "-test.run", "^$")
			cmd.Env = append(os.Environ(), crashEnv+"="+dir)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Kill it at a random moment after its first sync (a loaded
			// machine may take a while to start it).
			for deadline := time.Now().Add(time.Minute); ; {
				m, _ := os.ReadFile(filepath.Join(dir, markerName))
				if len(m) == 16 && binary.LittleEndian.Uint64(m[8:]) >= syncEvery {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatalf("the child made no sync in a minute: %s", stderr.String())
				}
				time.Sleep(time.Millisecond)
			}
			time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			if err := cmd.Wait(); err == nil || stderr.Len() > 0 {
				t.Fatalf("the child ended by itself: %v: %s", err, stderr.String())
			}
			m, err := os.ReadFile(filepath.Join(dir, markerName))
			if err != nil {
				t.Fatal(err)
			}
			issued, synced := int(binary.LittleEndian.Uint64(m)), int(binary.LittleEndian.Uint64(m[8:]))
			if synced < syncEvery {
				t.Fatalf("killed before its first sync (%d ops issued): nothing to check", issued)
			}

			// Replay: the content as of the last sync, and per block the
			// other contents ops after it may have left.
			r := rand.New(rand.NewPCG(99, 1))
			model := append([]byte(nil), init...)
			allowed := map[int][][]byte{}
			for i := 0; i < issued; i++ {
				op := nextCrashOp(r, i)
				if op.sync || op.recompress {
					continue
				}
				data := op.data
				if op.punch {
					data = make([]byte, op.n)
				}
				if i < synced {
					copy(model[op.off:], data)
					continue
				}
				for b := 0; b < op.n; b += BlockSize {
					blk := (op.off + b) / BlockSize
					allowed[blk] = append(allowed[blk], data[b:b+BlockSize])
				}
			}
			f, err = Open(filepath.Join(dir, "data"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got := mustRead(t, f, 0, crashSize)
			changed := 0
			for blk := range crashSize / BlockSize {
				g := got[blk*BlockSize : (blk+1)*BlockSize]
				if bytes.Equal(g, model[blk*BlockSize:(blk+1)*BlockSize]) {
					continue
				}
				ok := false
				for _, a := range allowed[blk] {
					ok = ok || bytes.Equal(g, a)
				}
				if !ok {
					t.Fatalf("block %d (extent %d) holds neither its content at the last sync (op %d) nor one written after it (up to op %d)",
						blk, blk*BlockSize/ExtentSize, synced, issued)
				}
				changed++
			}
			st, _ := f.Stats()
			t.Logf("killed after %d ops (%d synced): %d blocks hold writes after the last sync; %d extents compressed", issued, synced, changed, st.CompressedExtents)
			// The reopened file goes on working.
			if _, err := f.WriteAt(init[:ExtentSize], 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// The benchmarks compare a compressed file with a plain one (os.File), both
// in the same directory, filled with the same JSON logs: the pairs
// (4k random writes and reads, 1 MiB sequential writes and reads).
type store interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Close() error
}

const benchSize = 64 << 20

func benchStore(b *testing.B, kind string) store {
	b.Helper()
	path := filepath.Join(b.TempDir(), "data")
	var s store
	if kind == "lz4" {
		f, err := Create(path, benchSize)
		if err != nil {
			b.Fatal(err)
		}
		s = f
	} else {
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Truncate(benchSize); err != nil {
			b.Fatal(err)
		}
		s = f
	}
	data := jsonLogs(rand.New(rand.NewPCG(7, 7)), benchSize)
	for off := 0; off < benchSize; off += 1 << 20 {
		if _, err := s.WriteAt(data[off:off+1<<20], int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	if f, ok := s.(*File); ok {
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	b.Cleanup(func() { s.Close() })
	return s
}

func BenchmarkStore(b *testing.B) {
	for _, kind := range []string{"plain", "lz4"} {
		b.Run("randwrite-4k/"+kind, func(b *testing.B) {
			s := benchStore(b, kind)
			r := rand.New(rand.NewPCG(1, 1))
			p := jsonLogs(r, BlockSize)
			b.SetBytes(BlockSize)
			b.ResetTimer()
			for range b.N {
				if _, err := s.WriteAt(p, int64(BlockSize*r.IntN(benchSize/BlockSize))); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("randread-4k/"+kind, func(b *testing.B) {
			s := benchStore(b, kind)
			r := rand.New(rand.NewPCG(1, 1))
			p := make([]byte, BlockSize)
			b.SetBytes(BlockSize)
			b.ResetTimer()
			for range b.N {
				if _, err := s.ReadAt(p, int64(BlockSize*r.IntN(benchSize/BlockSize))); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("write-1m/"+kind, func(b *testing.B) {
			s := benchStore(b, kind)
			p := jsonLogs(rand.New(rand.NewPCG(2, 2)), 1<<20)
			b.SetBytes(1 << 20)
			b.ResetTimer()
			for i := range b.N {
				if _, err := s.WriteAt(p, int64(i%(benchSize>>20))<<20); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("read-1m/"+kind, func(b *testing.B) {
			s := benchStore(b, kind)
			p := make([]byte, 1<<20)
			b.SetBytes(1 << 20)
			b.ResetTimer()
			for i := range b.N {
				if _, err := s.ReadAt(p, int64(i%(benchSize>>20))<<20); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestRecompressLeavesSparseExtents: an extent whose raw slot has holes
// is not recompressed (it may take fewer blocks raw, and in a replica's
// layer its holes are blocks the layer does not hold); once every block
// is written it is. Close commits what Recompress did.
func TestRecompressLeavesSparseExtents(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	path := filepath.Join(t.TempDir(), "data")
	f, err := Create(path, 4*ExtentSize)
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, 4*ExtentSize)
	p := jsonLogs(r, BlockSize)
	copy(model[ExtentSize:], p)
	if _, err := f.WriteAt(p, ExtentSize); err != nil { // one block of extent 1
		t.Fatal(err)
	}
	if e, ok := f.NextRaw(0); ok {
		t.Fatalf("NextRaw offers extent %d, whose raw slot has holes", e)
	}
	if did, err := f.Recompress(1); err != nil || did {
		t.Fatalf("Recompress of a sparse extent: %v, %v", did, err)
	}
	for off := ExtentSize + BlockSize; off < 2*ExtentSize; off += BlockSize {
		p := jsonLogs(r, BlockSize)
		copy(model[off:], p)
		if _, err := f.WriteAt(p, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if e, ok := f.NextRaw(0); !ok || e != 1 {
		t.Fatalf("NextRaw = %d, %v; want extent 1, written whole", e, ok)
	}
	if did, err := f.Recompress(1); err != nil || !did {
		t.Fatalf("Recompress of a whole extent: %v, %v", did, err)
	}
	if err := f.Close(); err != nil { // commits the recompressed extent
		t.Fatal(err)
	}
	if f, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if st, err := f.Stats(); err != nil || st.CompressedExtents != 1 {
		t.Errorf("after a close and an open: %+v, %v; want extent 1 compressed", st, err)
	}
	if !bytes.Equal(mustRead(t, f, 0, len(model)), model) {
		t.Fatal("the file does not read what was written")
	}
}
