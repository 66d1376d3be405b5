package dedup

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/internal/atomicfile"
)

const (
	// ExtentSize is the unit a pass hashes and shares. Offsets are aligned
	// to it in every file, so equal data at offsets that differ by other
	// than a multiple of it is not found (volumes, snapshots and clones
	// keep data at the volume's offsets, so theirs is).
	ExtentSize = 64 << 10
	// Buckets is how many bucket files the records are spread over: the
	// memory of the share phase is one of them.
	Buckets = 256

	hashLen                = 16
	recordLen              = hashLen + 4 + 8
	defaultCheckpointBytes = 256 << 20
	progressBytes          = 16 << 20

	progressName    = "progress.json"
	progressVersion = 1
)

// Source is a file a pass deduplicates.
type Source struct {
	// Key names the file in logs and in Admit: a replica and a layer.
	Key string `json:"key"`
	// Path is the file.
	Path string `json:"path"`
}

// Config configures a pass.
type Config struct {
	// Dir is the pass's work directory (bucket files, checkpoint); it is
	// created if missing, and emptied when the pass ends.
	Dir string
	// Admit, if set, is called before each read of a source (n bytes) and
	// before each share (n bytes of each of two sources); the pass waits
	// for it and calls done when the I/O is over. It is how the pass takes
	// its turn at the disk scheduler in the background class.
	Admit func(ctx context.Context, src Source, n uint64) (done func(), err error)
	// Logger receives the pass's lines (nil: none).
	Logger *zap.Logger
	// Progress, if set, is told the progress every 16 MiB hashed and
	// after each bucket shared.
	Progress func(Progress)
	// CheckpointBytes is how much the hash phase reads between
	// checkpoints (0: 256 MiB). The share phase checkpoints after each
	// bucket.
	CheckpointBytes uint64
	// Yield, if set, is called between the pieces of an extent being
	// hashed (every 8 KiB) instead of runtime.Gosched: a caller whose
	// foreground work waits on the network can park the pass briefly, so
	// that the runtime polls the network (Gosched alone picks the pass
	// again first).
	Yield func()
}

// Progress is where a pass is.
type Progress struct {
	// Phase is "hash" or "share".
	Phase string
	// Done and Total are bytes hashed and bytes to hash in the hash phase,
	// buckets shared and Buckets in the share phase.
	Done, Total uint64
}

// Stats is what a pass did.
type Stats struct {
	// Resumed is set when the pass went on from a checkpoint.
	Resumed bool `json:"resumed"`
	// HashedBytes is what was read and hashed (since the start of the
	// pass, over resumes).
	HashedBytes uint64 `json:"hashed_bytes"`
	// SharedBytes is what the kernel shared in this pass.
	SharedBytes uint64 `json:"shared_bytes"`
	// AlreadySharedBytes is what was found sharing blocks already (a
	// clone, an earlier pass).
	AlreadySharedBytes uint64 `json:"already_shared_bytes"`
	// DifferedExtents counts the candidates the kernel found not equal:
	// changed after they were hashed.
	DifferedExtents uint64 `json:"differed_extents"`
	// Saved is, by source key, the bytes of that source's extents that
	// use the blocks of an equal extent of another source (or of an
	// earlier offset of the same one) at the end of the pass, shared by
	// it or found shared: the space each source would take again without
	// deduplication. Of every set of equal extents, the first in the
	// pass's order keeps its bytes as its own, so the sum over the
	// sources is what the sharing saves on disk.
	Saved map[string]uint64 `json:"saved,omitempty"`
}

// checkpoint is the pass's state in progress.json.
type checkpoint struct {
	Version int       `json:"version"`
	Started time.Time `json:"started"`
	Sources []Source  `json:"sources"`
	// Phase 1: the next extent to hash is at Offset of Sources[Source];
	// the bucket files hold BucketLen bytes of records for what came
	// before.
	Hashed    bool    `json:"hashed"`
	Source    int     `json:"source"`
	Offset    uint64  `json:"offset"`
	BucketLen []int64 `json:"bucket_len"`
	Total     uint64  `json:"total"`
	// Phase 2: the next bucket to share.
	Bucket int   `json:"bucket"`
	Stats  Stats `json:"stats"`
}

// Pending reports whether dir holds a pass that was stopped before its end.
func Pending(dir string) bool {
	_, err := os.Stat(filepath.Join(dir, progressName))
	return err == nil
}

// Pass deduplicates sources: it hashes their extents, then shares the
// equal ones (see the package doc). If cfg.Dir holds the checkpoint of a
// pass that was stopped, that pass resumes with its own list of sources
// and sources is ignored. A source that is gone is passed over. On an
// error, or when ctx ends, the checkpoint stays for the next call.
func Pass(ctx context.Context, cfg Config, sources []Source) (Stats, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return Stats{}, err
	}
	p := &pass{cfg: cfg, log: cfg.Logger, files: map[int]*os.File{}}
	defer p.closeFiles()
	cp, err := p.load()
	if err != nil {
		return Stats{}, err
	}
	if cp == nil {
		cp, err = p.start(sources)
		if err != nil {
			return Stats{}, err
		}
	} else {
		cp.Stats.Resumed = true
		p.log.Info("deduplication pass resumes", zap.Int("sources", len(cp.Sources)), zap.Bool("hashed", cp.Hashed),
			zap.Int("source", cp.Source), zap.Uint64("offset", cp.Offset), zap.Int("bucket", cp.Bucket))
	}
	p.cp = cp
	if !cp.Hashed {
		if err := p.hash(ctx); err != nil {
			return cp.Stats, err
		}
	}
	if err := p.share(ctx); err != nil {
		return cp.Stats, err
	}
	p.log.Info("deduplication pass done", zap.Int("sources", len(cp.Sources)), zap.Uint64("hashed_bytes", cp.Stats.HashedBytes),
		zap.Uint64("shared_bytes", cp.Stats.SharedBytes), zap.Uint64("already_shared_bytes", cp.Stats.AlreadySharedBytes),
		zap.Uint64("differed_extents", cp.Stats.DifferedExtents), zap.Duration("took", time.Since(cp.Started)))
	return cp.Stats, p.clean()
}

type pass struct {
	cfg   Config
	log   *zap.Logger
	cp    *checkpoint
	files map[int]*os.File // source index → open file (nil: gone)
	open  int              // files not nil
}

func (p *pass) bucketPath(b int) string {
	return filepath.Join(p.cfg.Dir, fmt.Sprintf("bucket-%03d", b))
}

// load reads the checkpoint; nil if there is none. A checkpoint this build
// cannot read is dropped (the pass starts again: the index is only a hint).
func (p *pass) load() (*checkpoint, error) {
	b, err := os.ReadFile(filepath.Join(p.cfg.Dir, progressName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var cp checkpoint
	if err := json.Unmarshal(b, &cp); err != nil || cp.Version != progressVersion || len(cp.BucketLen) != Buckets {
		p.log.Warn("deduplication checkpoint not readable; the pass starts again", zap.String("dir", p.cfg.Dir), zap.Error(err))
		return nil, nil
	}
	// Cut the bucket files back to the checkpoint: records written after
	// it are written again. A bucket shorter than its checkpoint (a power
	// loss took unsynced records) just lacks those records.
	for i, n := range cp.BucketLen {
		if err := os.Truncate(p.bucketPath(i), n); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
	}
	return &cp, nil
}

// start begins a new pass over sources.
func (p *pass) start(sources []Source) (*checkpoint, error) {
	sources = slices.Clone(sources)
	slices.SortFunc(sources, func(a, b Source) int { return cmp.Compare(a.Key, b.Key) })
	cp := &checkpoint{Version: progressVersion, Started: time.Now(), Sources: sources, BucketLen: make([]int64, Buckets)}
	for _, s := range sources {
		if st, err := os.Stat(s.Path); err == nil {
			cp.Total += uint64(st.Size())
		}
	}
	for b := range Buckets {
		if err := os.WriteFile(p.bucketPath(b), nil, 0o600); err != nil {
			return nil, err
		}
	}
	if err := p.save(cp); err != nil {
		return nil, err
	}
	p.log.Info("deduplication pass starts", zap.Int("sources", len(sources)), zap.Uint64("bytes", cp.Total))
	return cp, nil
}

func (p *pass) save(cp *checkpoint) error {
	b, err := json.Marshal(cp)
	if err != nil {
		return err
	}
	return atomicfile.Write(p.cfg.Dir, progressName, b)
}

// clean removes the pass's files: the checkpoint first, so a crash in
// between leaves stray buckets that the next start truncates.
func (p *pass) clean() error {
	if err := os.Remove(filepath.Join(p.cfg.Dir, progressName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for b := range Buckets {
		if err := os.Remove(p.bucketPath(b)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// maxOpen bounds the sources a pass holds open at once: a node with many
// replicas and snapshots has thousands of layer files.
const maxOpen = 256

// file opens source i (read only: a root process may share blocks into a
// file it did not open for writing); nil if it is gone. To stay within
// maxOpen it may close another source, never source pin (one the caller
// still uses; -1 for none).
func (p *pass) file(i, pin int) *os.File {
	if f, ok := p.files[i]; ok {
		return f
	}
	if p.open >= maxOpen {
		for j, f := range p.files {
			if f != nil && j != pin {
				f.Close()
				delete(p.files, j)
				p.open--
				break
			}
		}
	}
	f, err := os.Open(p.cp.Sources[i].Path)
	if err != nil {
		p.log.Info("deduplication source gone; passed over", zap.String("source", p.cp.Sources[i].Key), zap.Error(err))
		p.files[i] = nil // not looked for again in this pass
		return nil
	}
	p.files[i] = f
	p.open++
	return f
}

// done closes source i when the pass is through with it for a while.
func (p *pass) done(i int) {
	if f := p.files[i]; f != nil {
		f.Close()
		delete(p.files, i)
		p.open--
	}
}

func (p *pass) closeFiles() {
	for _, f := range p.files {
		if f != nil {
			f.Close()
		}
	}
}

func (p *pass) admit(ctx context.Context, i int, n uint64) (func(), error) {
	if p.cfg.Admit == nil {
		return func() {}, nil
	}
	return p.cfg.Admit(ctx, p.cp.Sources[i], n)
}

func (p *pass) progress(phase string, done, total uint64) {
	if p.cfg.Progress != nil {
		p.cfg.Progress(Progress{Phase: phase, Done: done, Total: total})
	}
}

// hash is phase 1, from the checkpoint on.
func (p *pass) hash(ctx context.Context) error {
	cp := p.cp
	w := make([]*bufio.Writer, Buckets)
	for b := range Buckets {
		f, err := os.OpenFile(p.bucketPath(b), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return err
		}
		defer f.Close()
		w[b] = bufio.NewWriterSize(f, 4096)
	}
	flush := func() error {
		for b := range Buckets {
			if err := w[b].Flush(); err != nil {
				return err
			}
		}
		return nil
	}
	buf := make([]byte, ExtentSize)
	h := sha256.New()
	zero := make([]byte, ExtentSize)
	rec := make([]byte, recordLen)
	sinceCheckpoint := uint64(0)
	every := cmp.Or(p.cfg.CheckpointBytes, defaultCheckpointBytes)
	checkpointAt := func(src int, off uint64) error {
		if err := flush(); err != nil {
			return err
		}
		cp.Source, cp.Offset = src, off
		if err := p.save(cp); err != nil {
			return err
		}
		sinceCheckpoint = 0
		p.progress("hash", cp.Stats.HashedBytes, cp.Total)
		return nil
	}
	for ; cp.Source < len(cp.Sources); cp.Source, cp.Offset = cp.Source+1, 0 {
		i := cp.Source
		f := p.file(i, -1)
		if f == nil {
			continue
		}
		st, err := f.Stat()
		if err != nil {
			return err
		}
		size := uint64(st.Size())
		off := cp.Offset
		for off+ExtentSize <= size {
			if err := ctx.Err(); err != nil {
				return err
			}
			data, err := unix.Seek(int(f.Fd()), int64(off), unix.SEEK_DATA)
			if errors.Is(err, unix.ENXIO) {
				break // no data after off
			}
			if err != nil {
				return fmt.Errorf("%s: %w", f.Name(), err)
			}
			off = uint64(data) / ExtentSize * ExtentSize
			if off+ExtentSize > size {
				break
			}
			done, err := p.admit(ctx, i, ExtentSize)
			if err != nil {
				return err
			}
			_, err = f.ReadAt(buf, int64(off))
			done()
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("%s: %w", f.Name(), err)
			}
			cp.Stats.HashedBytes += ExtentSize
			sinceCheckpoint += ExtentSize
			if !bytes.Equal(buf, zero) {
				sum := hashYielding(h, buf, p.yield)
				copy(rec, sum[:hashLen])
				binary.LittleEndian.PutUint32(rec[hashLen:], uint32(i))
				binary.LittleEndian.PutUint64(rec[hashLen+4:], off)
				b := int(sum[0])
				if _, err := w[b].Write(rec); err != nil {
					return err
				}
				cp.BucketLen[b] += recordLen
			}
			off += ExtentSize
			if sinceCheckpoint >= every {
				if err := checkpointAt(i, off); err != nil {
					return err
				}
			} else if cp.Stats.HashedBytes%progressBytes == 0 {
				p.progress("hash", cp.Stats.HashedBytes, cp.Total)
			}
		}
		// Hashed in one go: closed now (the share phase opens the
		// sources it needs again; on an error return, Pass closes it).
		p.done(i)
	}
	if err := flush(); err != nil {
		return err
	}
	cp.Hashed = true
	if err := p.save(cp); err != nil {
		return err
	}
	p.progress("hash", cp.Stats.HashedBytes, cp.Total)
	return nil
}

// record is one hashed extent.
type record struct {
	hash [hashLen]byte
	src  int
	off  uint64
}

// share is phase 2, from the checkpoint on.
func (p *pass) share(ctx context.Context) error {
	cp := p.cp
	for cp.Bucket < Buckets {
		if err := ctx.Err(); err != nil {
			return err
		}
		b, err := os.ReadFile(p.bucketPath(cp.Bucket))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		recs := make([]record, 0, len(b)/recordLen)
		for len(b) >= recordLen {
			var r record
			copy(r.hash[:], b)
			r.src = int(binary.LittleEndian.Uint32(b[hashLen:]))
			r.off = binary.LittleEndian.Uint64(b[hashLen+4:])
			b = b[recordLen:]
			if r.src < len(cp.Sources) {
				recs = append(recs, r)
			}
		}
		slices.SortFunc(recs, func(a, b record) int {
			return cmp.Or(bytes.Compare(a.hash[:], b.hash[:]), cmp.Compare(a.src, b.src), cmp.Compare(a.off, b.off))
		})
		for lo := 0; lo < len(recs); {
			hi := lo + 1
			for hi < len(recs) && recs[hi].hash == recs[lo].hash {
				hi++
			}
			if hi-lo > 1 {
				if err := p.shareGroup(ctx, recs[lo:hi]); err != nil {
					return err
				}
			}
			lo = hi
		}
		cp.Bucket++
		if err := p.save(cp); err != nil {
			return err
		}
		p.progress("share", uint64(cp.Bucket), Buckets)
	}
	return nil
}

// saved adds n bytes to the savings of source i.
func (p *pass) saved(i int, n uint64) {
	if p.cp.Stats.Saved == nil {
		p.cp.Stats.Saved = map[string]uint64{}
	}
	p.cp.Stats.Saved[p.cp.Sources[i].Key] += n
}

// shareGroup shares the extents of one hash with the first of them that
// can still be opened.
func (p *pass) shareGroup(ctx context.Context, g []record) error {
	k := -1
	for j, r := range g {
		if p.file(r.src, -1) != nil {
			k = j
			break
		}
	}
	if k < 0 {
		return nil
	}
	keep := g[k]
	kf := p.file(keep.src, -1)
	for _, r := range g[k+1:] {
		if r.src == keep.src && r.off == keep.off {
			continue
		}
		f := p.file(r.src, keep.src)
		if f == nil {
			continue
		}
		if samePhysical(kf, keep.off, f, r.off, ExtentSize) {
			p.cp.Stats.AlreadySharedBytes += ExtentSize
			p.saved(r.src, ExtentSize)
			continue
		}
		done, err := p.admit(ctx, r.src, 2*ExtentSize)
		if err != nil {
			return err
		}
		arg := unix.FileDedupeRange{Src_offset: keep.off, Src_length: ExtentSize,
			Info: []unix.FileDedupeRangeInfo{{Dest_fd: int64(f.Fd()), Dest_offset: r.off}}}
		err = unix.IoctlFileDedupeRange(int(kf.Fd()), &arg)
		done()
		if err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EXDEV) {
				return fmt.Errorf("share %s with %s: %w: %w", p.cp.Sources[r.src].Key, p.cp.Sources[keep.src].Key, ErrUnsupported, err)
			}
			// The range moved under the pass (the file shrank, a
			// replica is being removed): not an error of the pass.
			p.log.Debug("extent not shared", zap.String("source", p.cp.Sources[r.src].Key), zap.Uint64("offset", r.off), zap.Error(err))
			continue
		}
		switch in := arg.Info[0]; {
		case in.Status == unix.FILE_DEDUPE_RANGE_SAME:
			p.cp.Stats.SharedBytes += in.Bytes_deduped
			p.saved(r.src, in.Bytes_deduped)
		case in.Status == unix.FILE_DEDUPE_RANGE_DIFFERS:
			p.cp.Stats.DifferedExtents++
		default:
			p.log.Debug("extent not shared", zap.String("source", p.cp.Sources[r.src].Key), zap.Uint64("offset", r.off),
				zap.Error(unix.Errno(-in.Status)))
		}
	}
	return nil
}

// hashPiece is how much of an extent hashYielding hashes between yields.
const hashPiece = 8 << 10

// hashYielding is SHA-256 of p, calling yield after each hashPiece.
// Hashing is CPU work, and a node agent may run its engines on one
// processor (--gomaxprocs=1): hashing 64 KiB in one go (about 120 µs here)
// held an engine's I/O behind it that long, which showed in the
// foreground's p99 (tests/bench/spacebench); a piece takes about 15 µs.
func hashYielding(h hash.Hash, p []byte, yield func()) [sha256.Size]byte {
	h.Reset()
	for len(p) > 0 {
		n := min(len(p), hashPiece)
		h.Write(p[:n])
		p = p[n:]
		yield()
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// yield is Config.Yield, or runtime.Gosched.
func (p *pass) yield() {
	if p.cfg.Yield != nil {
		p.cfg.Yield()
		return
	}
	runtime.Gosched()
}
