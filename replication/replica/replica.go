package replica

import (
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/replication/layer"
)

// Replica is one replica's storage: dir/<id>/data, a sparse file of exactly
// Size bytes, and dir/<id>/meta, rewritten atomically, holding the replica's
// generation, the highest accepted epoch, the last clean point and the
// dirty-extent bitmap.
//
// The generation is drawn at random when the replica is created and lives
// only in its meta file, beside its data: a replica whose directory was lost
// and that is created again under the same id gets another generation, so
// the volume store, which records the generation of the copy that holds the
// volume's data, can tell it from the one it lost.
//
// Every method that takes an epoch checks it first: lower than the replica's
// epoch → ErrFenced, higher → ErrNotClaimed, and in both cases nothing
// changes. All methods are safe for concurrent use.
type Replica struct {
	dir        string // the replica's directory, <data dir>/<id>
	id         string
	generation string // never changes once the replica is open
	size       uint64
	extentSize uint64
	extents    uint64
	data       dataFile
	raw        syscall.RawConn // data's descriptor, for fdatasync and fallocate
	// sums holds a checksum per SumBlockSize block (sums.go); nil for a
	// replica without checksums. checksummed says the same, but never
	// changes once the replica is open, for readers without epochMu: the
	// head's files (sums among them) are replaced when a snapshot or a
	// rebuild's layer makes a new head.
	sums        *os.File
	checksummed bool
	// chain is the list of the replica's layers (snapshots, layers.go);
	// data, raw, sums and sumsMap are its head's files, below the sealed
	// layers' (index i: layer i), opened read-write for merges.
	chain   *layer.Chain
	below   []layerFiles
	dirLock *os.File   // the directory, locked (lockDir)
	mergeMu sync.Mutex // one snapshot deletion at a time (DeleteSnapshot)
	// moves counts how merges and flattens moved data (copyrange.go).
	moves moveStats
	// layerSums caches the extent checksums of sealed layers, for
	// rebuilds (carry.go); build is the layer a rebuild is building here,
	// guarded by buildMu (taken after epochMu).
	layerSums layerSumCache
	buildMu   sync.Mutex
	build     *layerBuild
	// sumsMap maps the whole sums file, shared and writable (nil when the
	// mapping failed: reads and writes then use pread and pwrite); see
	// readSumsMapped. Grow replaces it, with epochMu held exclusively.
	sumsMap []byte
	// headMap maps the head's data file for writes inside one block
	// (headmap.go); headMu guards it, under epochMu shared.
	headMu  sync.Mutex
	headMap headMap

	// epochMu serialises epoch changes against data I/O and is therefore held
	// across I/O: every data operation holds it shared for its whole
	// duration, while Claim, MarkClean, Grow and Close hold it exclusively. So when
	// Claim(e) returns no operation with an epoch below e is still running,
	// and none can start.
	epochMu sync.RWMutex
	// linkMu keeps a restore's links to the sealed layers apart from a
	// recompression pass over them (datafile.go): CreateFromSnapshot holds
	// it exclusively and counts links, Recompress's steps hold it shared.
	// Taken before epochMu.
	linkMu sync.RWMutex
	links  uint64
	// Written only with epochMu held exclusively; read with it held shared.
	// So are size and extents (Grow).
	epoch      uint64
	cleanEpoch uint64
	cleanGen   uint64
	closed     bool

	// mu guards the dirty-extent state; it is never held across I/O.
	// Invariant: durable ⊆ want, and durable is what the meta file on disk
	// holds (or a subset of it while a persist is in flight).
	mu         sync.Mutex
	persisted  *sync.Cond // signalled when a persist of the meta file ends
	want       bitmap     // extents that must be dirty before their write goes on
	durable    bitmap     // extents whose dirty bit is known to be on disk
	wantSeq    uint64     // incremented whenever want gains extents
	durableSeq uint64     // the wantSeq that the last successful persist covered
	persisting bool       // one goroutine at a time writes the marks
	// pending: the bytes of want changed since the last persist.
	pending pendingBytes
	// markAhead: extents marked past a write that looks sequential
	// (markDirty); set at open from markAheadBytes.
	markAhead uint64
	// bits is the dirty-bits file (dirtybits.go), nil until it exists;
	// used by the persisting goroutine, and by MarkClean and Close with
	// epochMu held exclusively.
	bits *os.File
	// marksWritten counts writes of the dirty-bits file (tests).
	marksWritten atomic.Uint64

	zeroSumOnce sync.Once
	zeroSum     uint32 // CRC32C of a full extent of zeros

	// unclean is what the open settled of writes an unclean stop left
	// unflushed (pending.go); set before the replica is published.
	unclean UncleanStop

	// adm is set by the Server that opens the replica, before any other
	// goroutine can reach it, and never changes afterwards.
	adm admission
}

// Info describes a replica.
type Info struct {
	ID string
	// Generation names this copy of the replica (see Replica); it has
	// nothing to do with CleanGeneration. Empty in an Info from a server
	// that predates generations.
	Generation string
	Size       uint64
	ExtentSize uint64
	// Epoch is the highest epoch the replica has accepted.
	Epoch uint64
	// CleanEpoch and CleanGeneration name the last clean point (MarkClean).
	CleanEpoch      uint64
	CleanGeneration uint64
	// DirtyExtents counts extents written since the last clean point.
	DirtyExtents uint64
	// AllocatedBytes is the disk space the data file occupies.
	AllocatedBytes uint64
}

// Open creates or opens the replica id stored under dir/<id>/.
//
// A new replica needs a size (a positive multiple of SectorSize); extentSize
// 0 means DefaultExtentSize. For an existing replica, size and extentSize 0
// accept whatever is stored, while other values must match it (ErrExists
// otherwise). size 0 and no replica on disk → ErrNotFound. A damaged or
// inconsistent replica → ErrCorrupt. Files held open by another Replica or
// process → ErrBusy.
//
// Creation is atomic: the replica is built in a hidden directory that is
// renamed into place, so a crash never leaves a half-made replica. A new
// replica gets a new random generation. A replica whose meta file predates
// generations (version 1) gets one when it is opened, written back at once.
func Open(dir, id string, size, extentSize uint64) (*Replica, error) {
	return OpenWith(dir, id, size, extentSize, CreateOptions{})
}

// CreateOptions are the choices made when a replica is created; an existing
// replica keeps those it was created with.
type CreateOptions struct {
	// Checksums keeps a checksum per SumBlockSize block in a sums file
	// beside the data (see sums.go).
	Checksums bool
	// Compression keeps the data LZ4-compressed, per 64 KiB extent, where
	// that saves a block (datafile.go, replication/zfile).
	Compression bool
	// DiskType, for Server.CreateWith, is the type of the server's data
	// directory to make the replica in ("": the default one).
	DiskType string
}

// OpenWith is Open with the options a new replica is created with.
func OpenWith(dir, id string, size, extentSize uint64, opts CreateOptions) (*Replica, error) {
	if err := validateID(id); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, id)
	_, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if size == 0 {
			return nil, fmt.Errorf("replica %s: %w", id, ErrNotFound)
		}
		if extentSize == 0 {
			extentSize = DefaultExtentSize
		}
		if err := validateGeometry(size, extentSize); err != nil {
			return nil, fmt.Errorf("replica %s: %w", id, err)
		}
		if err := create(dir, id, size, extentSize, opts); err != nil {
			return nil, fmt.Errorf("replica %s: create: %w", id, err)
		}
	case err != nil:
		return nil, fmt.Errorf("replica %s: %w", id, err)
	}
	r, err := openExisting(path, id)
	if err != nil {
		return nil, err
	}
	if size != 0 && size != r.size || extentSize != 0 && extentSize != r.extentSize {
		if cerr := r.Close(); cerr != nil {
			return nil, fmt.Errorf("replica %s: close: %w", id, cerr)
		}
		return nil, fmt.Errorf("replica %s: %w: it has size %d and extent size %d, asked for %d and %d",
			id, ErrExists, r.size, r.extentSize, size, extentSize)
	}
	return r, nil
}

// create builds a new replica in a hidden directory and renames it to
// dir/<id>. If another creator got there first, the existing replica wins.
func create(dir, id string, size, extentSize uint64, opts CreateOptions) error {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	err := buildHidden(dir, id, func(tmp string) error {
		if err := createData(filepath.Join(tmp, dataFileName), size, opts.Compression); err != nil {
			return err
		}
		if opts.Checksums {
			if err := createSumsFile(tmp, size); err != nil {
				return err
			}
		}
		m := metaState{ID: id, Generation: newGeneration(), Size: size, ExtentSize: extentSize,
			Dirty: make(bitmap, bitmapLen(extentCount(size, extentSize)))}
		return writeFileAtomic(tmp, metaFileName, encodeMeta(&m))
	})
	if errors.Is(err, errLostRace) {
		return nil
	}
	return err
}

// errLostRace: buildHidden found dir/<id> made by someone else meanwhile.
var errLostRace = errors.New("replica: another creator made it first")

// buildHidden builds replica id's directory: fill fills a hidden
// directory in dir, which is then renamed to dir/<id>, so a crash never
// leaves a half-made replica. If dir/<id> appears meanwhile → errLostRace,
// and the hidden directory is removed.
func buildHidden(dir, id string, fill func(tmp string) error) (err error) {
	if _, err := os.Stat(filepath.Join(dir, id)); err == nil {
		return errLostRace
	}
	tmp, err := os.MkdirTemp(dir, "."+id+".creating-")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = os.RemoveAll(tmp) // best effort: a hidden leftover is harmless
		}
	}()
	if err := fill(tmp); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, id)); err != nil {
		if _, serr := os.Stat(filepath.Join(dir, id)); serr == nil {
			return errLostRace
		}
		return err
	}
	return syncDir(dir)
}

func openExisting(path, id string) (*Replica, error) {
	raw, err := os.ReadFile(filepath.Join(path, metaFileName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("replica %s: %w: meta file missing in %s", id, ErrCorrupt, path)
	}
	if err != nil {
		return nil, fmt.Errorf("replica %s: %w", id, err)
	}
	m, err := decodeMeta(raw)
	if err != nil {
		return nil, fmt.Errorf("replica %s: %s: %w", id, filepath.Join(path, metaFileName), err)
	}
	if m.ID != id {
		return nil, fmt.Errorf("replica %s: %w: meta file names replica %q", id, ErrCorrupt, m.ID)
	}
	// A leftover temporary meta file is an interrupted rewrite; the
	// renamed-over file is authoritative.
	if err := os.Remove(filepath.Join(path, metaFileName+".tmp")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("replica %s: %w", id, err)
	}
	if err := readDirtyBits(path, m.Dirty, extentCount(m.Size, m.ExtentSize)); err != nil {
		return nil, fmt.Errorf("replica %s: %w", id, err)
	}
	r := &Replica{
		dir:        path,
		id:         id,
		generation: m.Generation,
		size:       m.Size,
		extentSize: m.ExtentSize,
		extents:    extentCount(m.Size, m.ExtentSize),
		epoch:      m.Epoch,
		cleanEpoch: m.CleanEpoch,
		cleanGen:   m.CleanGeneration,
		want:       m.Dirty,
		durable:    m.Dirty.clone(),
	}
	r.persisted = sync.NewCond(&r.mu)
	r.markAhead = markAheadExtents(r.extentSize)
	// The directory is locked before the chain is read: opening the chain
	// removes the files of an unfinished snapshot, which must not happen
	// under a process that is taking one.
	if err := r.lockDir(); err != nil {
		return nil, err
	}
	fail := func(err error) (*Replica, error) {
		r.closed = true
		_ = r.closeFiles() // the open error is the one to report
		return nil, err
	}
	if err := r.openChain(); err != nil {
		return fail(err)
	}
	if err := r.openHead(); err != nil {
		return fail(err)
	}
	if f, err := os.OpenFile(filepath.Join(path, dirtyBitsFileName), os.O_RDWR, 0); err == nil {
		r.bits = f // marks overwrite it; the next clean point clears it
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("replica %s: %w", id, err))
	}
	r.checksummed = r.sums != nil
	if err := r.settlePending(); err != nil {
		return fail(err)
	}
	if r.generation == "" {
		// A version-1 meta file: this copy gets its generation now, once,
		// and keeps it (the store records it on first sight). Written
		// before anything else can change the meta file.
		r.generation = newGeneration()
		m := r.snapshotMeta()
		if err := r.writeMeta(&m); err != nil {
			return fail(fmt.Errorf("replica %s: record a generation in the meta file: %w", id, err))
		}
	}
	return r, nil
}

// lockDir takes an exclusive lock on the replica's directory, held until
// Close: a second opener (another process, or another Open in this one)
// → ErrBusy.
func (r *Replica) lockDir() error {
	d, err := os.Open(r.dir)
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	if err := unix.Flock(int(d.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		_ = d.Close() // only read
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("replica %s: %w", r.id, ErrBusy)
		}
		return fmt.Errorf("replica %s: lock directory: %w", r.id, err)
	}
	r.dirLock = d
	return nil
}

func (r *Replica) checkDataFile() error {
	raw, err := lockFile(r.data).SyscallConn()
	if err != nil {
		return fmt.Errorf("replica %s: %w", r.id, err)
	}
	r.raw = raw
	if err := r.control(func(fd int) error { return unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) }); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("replica %s: %w", r.id, ErrBusy)
		}
		return fmt.Errorf("replica %s: lock data file: %w", r.id, err)
	}
	have, err := dataSize(r.data)
	if err != nil {
		return fmt.Errorf("replica %s: %w: data file: %v", r.id, ErrCorrupt, err)
	}
	// Longer than the meta file says: a grow that stopped before its
	// commit point (grow.go). Shorter: damage.
	if err := trimInterruptedGrow(r.data, have, r.size); err != nil {
		return fmt.Errorf("replica %s: cut the data file back to %d bytes after an interrupted grow: %w", r.id, r.size, err)
	}
	if have < r.size {
		return fmt.Errorf("replica %s: %w: data file is %d bytes, meta says %d", r.id, ErrCorrupt, have, r.size)
	}
	return nil
}

// control runs fn on the data file's descriptor; the descriptor cannot be
// closed while fn runs.
func (r *Replica) control(fn func(fd int) error) error {
	var ferr error
	if err := r.raw.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// ID returns the replica's id.
func (r *Replica) ID() string { return r.id }

// Generation returns the replica's generation: random, drawn when this copy
// was created, the same for as long as it exists.
func (r *Replica) Generation() string { return r.generation }

// Size returns the replica's size in bytes; Grow may raise it.
func (r *Replica) Size() uint64 {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	return r.size
}

// ExtentSize returns the size of the replica's extents.
func (r *Replica) ExtentSize() uint64 { return r.extentSize }

// Extents returns the number of extents; the last one may be short. Grow
// may raise it.
func (r *Replica) Extents() uint64 {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	return r.extents
}

// checkExtents admits extents [first, first+count). It takes epochMu
// shared: Grow changes the extent count under it.
func (r *Replica) checkExtents(first, count uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if first > r.extents || count > r.extents-first {
		return fmt.Errorf("replica %s: %w: extents %d+%d, replica has %d", r.id, ErrOutOfRange, first, count, r.extents)
	}
	return nil
}

// Epoch returns the highest epoch the replica has accepted.
func (r *Replica) Epoch() uint64 {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	return r.epoch
}

// checkEpoch admits a request. Callers hold epochMu (shared or exclusive).
func (r *Replica) checkEpoch(epoch uint64) error {
	switch {
	case r.closed:
		return fmt.Errorf("replica %s: %w", r.id, ErrClosed)
	case epoch < r.epoch:
		return fmt.Errorf("replica %s: %w (request epoch %d, replica epoch %d)", r.id, ErrFenced, epoch, r.epoch)
	case epoch > r.epoch:
		return fmt.Errorf("replica %s: %w (request epoch %d, replica epoch %d)", r.id, ErrNotClaimed, epoch, r.epoch)
	}
	return nil
}

// checkRange admits [off, off+n) within the replica.
func (r *Replica) checkRange(off, n uint64) error {
	if off > r.size || n > r.size-off {
		return fmt.Errorf("replica %s: %w: %d bytes at offset %d, size %d", r.id, ErrOutOfRange, n, off, r.size)
	}
	return nil
}

// Claim makes epoch the replica's epoch, durably, before it returns. A
// lower epoch → ErrFenced; the current epoch is accepted again (a retried
// claim). Claim waits for every operation in progress, so once it returns no
// operation with an older epoch runs or starts.
func (r *Replica) Claim(epoch uint64) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	switch {
	case r.closed:
		return fmt.Errorf("replica %s: %w", r.id, ErrClosed)
	case epoch < r.epoch:
		return fmt.Errorf("replica %s: claim: %w (claim epoch %d, replica epoch %d)", r.id, ErrFenced, epoch, r.epoch)
	case epoch == r.epoch:
		return nil
	}
	m := r.snapshotMeta()
	m.Epoch = epoch
	if err := r.writeMeta(&m); err != nil {
		return fmt.Errorf("replica %s: claim epoch %d: %w", r.id, epoch, err)
	}
	r.epoch = epoch
	r.setDurable(m.Dirty)
	return nil
}

// MarkClean declares a clean point: it clears the dirty-extent bitmap
// durably and records (epoch, generation) as the last clean point.
//
// The engine calls it after a flush that every healthy replica acknowledged.
// MarkClean waits for operations in progress on this replica; a write that
// arrives after it marks its extent dirty again. It is safe only if every
// write that reached any replica before this call is durable on every healthy
// replica: the engine must have no write outstanding between sending the
// clean-point Flush and the last MarkClean acknowledgement (hold new writes
// for that window), or a write that reached this replica but not another
// could drop out of the dirty union.
//
// Generations increase within an epoch, starting at 1: a MarkClean whose
// (epoch, generation) is not newer than the last clean point is a retry or a
// late duplicate and changes nothing.
func (r *Replica) MarkClean(epoch, generation uint64) error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if epoch == r.cleanEpoch && generation <= r.cleanGen {
		return nil
	}
	m := r.snapshotMeta()
	m.CleanEpoch, m.CleanGeneration = epoch, generation
	m.Dirty = make(bitmap, len(m.Dirty))
	if err := r.writeMeta(&m); err != nil {
		return fmt.Errorf("replica %s: mark clean: %w", r.id, err)
	}
	// After the meta file: a crash between the two leaves extents dirty
	// that need not be, never the reverse (dirtybits.go).
	if err := r.clearDirtyBits(len(m.Dirty)); err != nil {
		return fmt.Errorf("replica %s: mark clean: %w", r.id, err)
	}
	r.cleanEpoch, r.cleanGen = epoch, generation
	r.mu.Lock()
	r.want = m.Dirty.clone()
	r.mu.Unlock()
	r.setDurable(m.Dirty)
	return nil
}

// snapshotMeta copies the state to persist. Callers hold epochMu.
func (r *Replica) snapshotMeta() metaState {
	r.mu.Lock()
	defer r.mu.Unlock()
	return metaState{
		ID: r.id, Generation: r.generation, Size: r.size, ExtentSize: r.extentSize,
		Epoch: r.epoch, CleanEpoch: r.cleanEpoch, CleanGeneration: r.cleanGen,
		Dirty: r.want.clone(),
	}
}

// setDurable records that dirty is on disk and covers everything in want.
// Callers hold epochMu exclusively, so no persist is in flight.
func (r *Replica) setDurable(dirty bitmap) {
	r.mu.Lock()
	r.durable = dirty
	r.durableSeq = r.wantSeq
	r.pending = pendingBytes{}
	r.mu.Unlock()
}

func (r *Replica) writeMeta(m *metaState) error {
	return writeFileAtomic(r.dir, metaFileName, encodeMeta(m))
}

// markDirty makes sure extents [first, last] are marked dirty on disk before
// it returns. An extent already durable costs one bitmap lookup; otherwise
// the caller joins the next write of the dirty-bits file (group commit, see
// dirtybits.go): one goroutine writes the bytes of the bitmap that changed
// for everyone who added extents before it started, the others wait.
// Callers hold epochMu shared.
func (r *Replica) markDirty(first, last uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.durable.hasAll(first, last) {
		return nil
	}
	// A write that continues into an extent after a dirty one is likely
	// sequential: the extents ahead of it are marked in the same persist,
	// so that a sequential writer waits for a mark once per markAhead
	// extents instead of once per extent. Marking more than was written
	// costs a crash only the rehash of those extents (resync).
	if first > 0 && r.want.has(first-1) {
		last = min(r.extents-1, last+r.markAhead)
	}
	added := false
	for i := first; i <= last; i++ {
		if !r.want.has(i) {
			r.want.set(i)
			r.pending.add(int(i / 8))
			added = true
		}
	}
	if added {
		r.wantSeq++
	}
	mine := r.wantSeq
	for r.durableSeq < mine {
		if r.persisting {
			r.persisted.Wait()
			continue
		}
		r.persisting = true
		seq, span := r.wantSeq, r.pending
		r.pending = pendingBytes{}
		chunk := append(bitmap(nil), r.want[span.lo:span.hi]...)
		var full bitmap
		if r.bits == nil {
			full = r.want.clone()
		}
		r.mu.Unlock()
		err := r.persistDirty(span.lo, chunk, full)
		r.mu.Lock()
		r.persisting = false
		r.persisted.Broadcast()
		if err != nil {
			r.pending.union(span) // the next persist writes them again
			return fmt.Errorf("replica %s: mark extents %d-%d dirty: %w", r.id, first, last, err)
		}
		// Every bit want gained up to seq is in span: durable catches up.
		copy(r.durable[span.lo:span.hi], chunk)
		r.durableSeq = seq
	}
	return nil
}

// extentsOf returns the extents that [off, off+n) touches; n > 0.
func (r *Replica) extentsOf(off, n uint64) (first, last uint64) {
	return off / r.extentSize, (off + n - 1) / r.extentSize
}

// WriteAt writes p at off. The extents it touches are marked dirty on disk
// first. With fua the data is on stable storage when WriteAt returns;
// otherwise only after the next Flush.
func (r *Replica) WriteAt(epoch uint64, p []byte, off uint64, fua bool) error {
	return r.WriteAtSums(epoch, p, off, fua, nil)
}

// WriteAtSums is WriteAt with the CRC32C of each SumBlockSize-aligned piece
// of p (PieceSums), computed by the sender over exactly the bytes it sent:
// a piece that does not match → ErrChecksum, and nothing is written. pieces
// nil: nothing to verify (a replica with checksums computes them itself).
func (r *Replica) WriteAtSums(epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error {
	return r.writeAt(epoch, p, off, fua, pieces, true)
}

// WriteAtLocal is WriteAtSums for a caller in the same process that
// computed pieces over p itself (the engine's in-process replica): nothing
// travelled, so the pieces are used for the stored sums without being
// verified again. That saves a CRC pass over every write of the engine's
// own node.
func (r *Replica) WriteAtLocal(epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error {
	if pieces != nil && uint64(len(pieces)) != SumPieces(off, uint64(len(p))) {
		return fmt.Errorf("replica %s: %w: %d checksums for a write of %d pieces", r.id, ErrInvalidArgument, len(pieces), SumPieces(off, uint64(len(p))))
	}
	return r.writeAt(epoch, p, off, fua, pieces, false)
}

// WritePair writes p at off and pair.Data at pair.Off as one request (a
// WRITE with FlagPair): the pieces of both are verified before either is
// written, and a failure after that fails the whole request. The ranges
// must not overlap.
func (r *Replica) WritePair(epoch uint64, p []byte, off uint64, pair Pair, fua bool) error {
	return r.writePair(epoch, p, off, pair, fua, true)
}

// WritePairLocal is WritePair for a caller in the same process (see
// WriteAtLocal): its pieces are stored without being verified again.
func (r *Replica) WritePairLocal(epoch uint64, p []byte, off uint64, pair Pair, fua bool) error {
	if pair.FirstPieces != nil && (uint64(len(pair.FirstPieces)) != SumPieces(off, uint64(len(p))) ||
		uint64(len(pair.SecondPieces)) != SumPieces(pair.Off, uint64(len(pair.Data)))) {
		return fmt.Errorf("replica %s: %w: write pair checksums do not match its ranges", r.id, ErrInvalidArgument)
	}
	return r.writePair(epoch, p, off, pair, fua, false)
}

func (r *Replica) writePair(epoch uint64, p []byte, off uint64, pair Pair, fua bool, verify bool) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	n, m := uint64(len(p)), uint64(len(pair.Data))
	if err := r.checkRange(off, n); err != nil {
		return err
	}
	if err := r.checkRange(pair.Off, m); err != nil {
		return err
	}
	// Whole checksum blocks apart: each range's write may widen to whole
	// blocks (copy-up, partial-block sums).
	if n == 0 || m == 0 || blockAlignedOverlap(off, n, pair.Off, m) {
		return fmt.Errorf("replica %s: %w: write pair %d+%d and %d+%d empty or sharing a block", r.id, ErrInvalidArgument, off, n, pair.Off, m)
	}
	if verify && pair.FirstPieces != nil {
		if err := r.checkPieces(p, off, pair.FirstPieces); err != nil {
			return err
		}
		if err := r.checkPieces(pair.Data, pair.Off, pair.SecondPieces); err != nil {
			return err
		}
	}
	if err := r.writeData(pair.Data, pair.Off, pair.SecondPieces, false); err != nil {
		return err
	}
	if err := r.writeData(p, off, pair.FirstPieces, false); err != nil {
		return err
	}
	if fua {
		return r.syncHead()
	}
	return nil
}

// blockAlignedOverlap reports whether two ranges touch a common
// SumBlockSize block.
func blockAlignedOverlap(a, n, b, m uint64) bool {
	return a/SumBlockSize <= (b+m-1)/SumBlockSize && b/SumBlockSize <= (a+n-1)/SumBlockSize
}

func (r *Replica) writeAt(epoch uint64, p []byte, off uint64, fua bool, pieces []uint32, verify bool) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	n := uint64(len(p))
	if err := r.checkRange(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if err := r.writeData(p, off, pieces, verify); err != nil {
		return err
	}
	if fua {
		return r.syncHead()
	}
	if n >= earlyWritebackBytes {
		r.startWriteback(off, n)
	}
	return nil
}

// writeData is the body of a write of p at off, after its checks: verify
// the wire checksums, mark the extents dirty, write the data (whole blocks
// into the head if the replica has snapshots) and then its sums. Callers
// hold epochMu shared.
func (r *Replica) writeData(p []byte, off uint64, pieces []uint32, verify bool) error {
	n := uint64(len(p))
	if pieces != nil && verify {
		if err := r.checkPieces(p, off, pieces); err != nil {
			return err
		}
	}
	if r.sums != nil && inOneBlockInPart(off, n, r.size) {
		if m := r.headMapping(); m != nil {
			return r.writeInBlock(m, p, off)
		}
	}
	// With snapshots a write covering a block in part is widened to whole
	// blocks first (the copy-up reads and verifies the rest); its sums then
	// follow from the widened bytes, with no second read of those blocks.
	w, woff, buf, err := r.widen(p, off)
	if err != nil {
		return err
	}
	if buf != nil {
		defer putBuf(buf)
		pieces = nil // p's pieces, not w's
	}
	var sums []uint32
	if r.sums != nil {
		var small [16]uint32
		if sums, err = r.newSums(small[:0], w, woff, pieces); err != nil {
			return err
		}
	}
	if err := r.markDirty(r.extentsOf(off, n)); err != nil {
		return err
	}
	if err := r.pwrite(w, woff); err != nil {
		return fmt.Errorf("replica %s: write %d bytes at %d: %w", r.id, n, off, err)
	}
	if sums != nil {
		if err := r.writeSums(sums, off/SumBlockSize); err != nil {
			return err
		}
	}
	return r.markHeld(woff, uint64(len(w)))
}

// writeChunk bounds the size of one write(2) into a replica's data file, and
// with it the size of the page-cache folios the write creates (the kernel
// sizes a new folio to the write that brings it in; ext4 has large folios).
// A small write into a large folio costs in proportion to the folio: ext4
// walks every block of it. Measured on Linux 6.18, a 4 KiB overwrite took
// ~19 µs where the data had come in as 1 MiB writes and ~5 µs where it had
// come in as 64 KiB writes; writing 1 MiB as 16 pieces costs well under a
// microsecond more per piece. A filled volume that then takes random 4 KiB
// writes (a file system after mkfs and a copy, fio after its fill) runs
// several times faster that way. Pieces are aligned to writeChunk so that
// the folios are too.
const writeChunk = 64 << 10

// pwrite writes p at off in pieces no larger than writeChunk, each within
// one writeChunk-aligned block (see writeChunk).
func (r *Replica) pwrite(p []byte, off uint64) error {
	for len(p) > 0 {
		n := pieceLen(off, uint64(len(p)))
		if _, err := r.data.WriteAt(p[:n], int64(off)); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// pieceLen is the length of the piece of a left-byte write at off that
// goes in one write(2): up to the next writeChunk boundary.
func pieceLen(off, left uint64) uint64 {
	return min(left, writeChunk-off%writeChunk)
}

// earlyWritebackBytes is the smallest write whose writeback starts at once.
const earlyWritebackBytes = 256 << 10

// startWriteback asks the kernel to start writing the range to disk now,
// without waiting for it. A node holds several replicas on one disk, so
// large sequential writes dirty the page cache several times faster than a
// single file would; left alone, the kernel lets the dirty pages pile up
// to its limit and then stops the writing threads for up to 200 ms at a
// time (balance_dirty_pages), which shows as long stalls. Starting the
// writeback of large writes as they come keeps the dirty share low and
// the flow steady. Small random writes are left to the normal writeback,
// which can merge them. Failure only loses the hint.
func (r *Replica) startWriteback(off, n uint64) {
	if isCompressed(r.data) {
		return // its slots change under the writes; its Sync writes them
	}
	_ = r.control(func(fd int) error {
		return unix.SyncFileRange(fd, int64(off), int64(n), unix.SYNC_FILE_RANGE_WRITE)
	})
}

// precheck answers what ReadAt would answer for n bytes at off before any
// I/O, so the server can refuse a request before allocating its buffer.
func (r *Replica) precheck(epoch, off, n uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	return r.checkRange(off, n)
}

// ReadAt fills p from off. Never-written ranges and holes read as zeros.
// With checksums every block read is verified: a block whose data does not
// match its stored sum → ErrChecksum, naming the block.
func (r *Replica) ReadAt(epoch uint64, p []byte, off uint64) error {
	return r.readEpoch(epoch, p, off, true)
}

// ReadAtAuthenticated is ReadAt without the check of the stored sums, for
// a caller that authenticates what it reads by other means: the engine of
// an encrypted volume reading ciphertext, which AES-GCM opens against a tag
// it reads checked (docs/encryption.md, "Authentication"). The sums would
// catch nothing the tag does not, and checking them costs a read of the
// sums file and a CRC of the data. A block that fails to open is read again
// through ReadAt, so damage found that way is repaired as usual.
func (r *Replica) ReadAtAuthenticated(epoch uint64, p []byte, off uint64) error {
	return r.readEpoch(epoch, p, off, false)
}

// readEpoch is ReadAt, checking the stored sums if verify (and the replica
// keeps them).
func (r *Replica) readEpoch(epoch uint64, p []byte, off uint64, verify bool) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if err := r.checkRange(off, uint64(len(p))); err != nil {
		return err
	}
	if verify && r.sums != nil && len(p) > 0 {
		return r.readVerified(p, off)
	}
	return r.readAt(p, off)
}

// readAt reads [off, off+len(p)) from the layers that hold it, unchecked.
func (r *Replica) readAt(p []byte, off uint64) error {
	if !r.layered() {
		return r.readFile(r.data, p, off)
	}
	return r.chain.Spans(off, uint64(len(p)), func(i int, o, m uint64) error {
		return r.readFile(r.layerFilesOf(i).data, p[o-off:o-off+m], o)
	})
}

// readFile reads [off, off+len(p)) of one layer's data file. Past the end
// of the file it reads zeros: a layer sealed before the volume grew (or
// shared with a smaller volume) is shorter than the volume, and the
// blocks it lacks never held data in it. The head is always as long as
// the volume, so its reads never get there.
func (r *Replica) readFile(f dataFile, p []byte, off uint64) error {
	n, err := f.ReadAt(p, int64(off))
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	if err != nil {
		return fmt.Errorf("replica %s: read %d bytes at %d: %w", r.id, len(p), off, err)
	}
	return nil
}

// Flush makes every completed write durable (fdatasync of the data file,
// then of the sums file). The sums must be durable before a clean point
// clears the dirty bits (MarkClean follows a Flush): after a power loss a
// block whose data reached the disk and whose sum did not would otherwise
// read as corrupt outside any dirty extent, on every replica at once. A
// FUA write syncs its data only: its extent stays dirty until the next
// Flush, and resync recomputes the sums of dirty extents.
func (r *Replica) Flush(epoch uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if err := r.syncHead(); err != nil {
		return err
	}
	return r.syncSums()
}

// syncSums makes the head's sums durable (if the replica keeps any).
func (r *Replica) syncSums() error {
	if r.sums == nil {
		return nil
	}
	if err := unix.Fdatasync(int(r.sums.Fd())); err != nil {
		return fmt.Errorf("replica %s: fdatasync sums: %w", r.id, err)
	}
	return nil
}

func (r *Replica) fdatasync() error {
	if isCompressed(r.data) {
		if err := syncData(r.data); err != nil {
			return fmt.Errorf("replica %s: sync the compressed data: %w", r.id, err)
		}
		return nil
	}
	if err := r.control(unix.Fdatasync); err != nil {
		return fmt.Errorf("replica %s: fdatasync: %w", r.id, err)
	}
	return nil
}

// Trim discards [off, off+length): the range is punched out of the data file
// and reads as zeros afterwards, so replicas stay identical.
func (r *Replica) Trim(epoch, off, length uint64) error {
	return r.punch("trim", epoch, off, length)
}

// WriteZeroes makes [off, off+length) read as zeros, punching a hole.
func (r *Replica) WriteZeroes(epoch, off, length uint64) error {
	return r.punch("write zeroes", epoch, off, length)
}

func (r *Replica) punch(op string, epoch, off, length uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if err := r.checkRange(off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if err := r.markDirty(r.extentsOf(off, length)); err != nil {
		return err
	}
	if r.layered() {
		if err := r.punchLayered(off, length); err != nil {
			return fmt.Errorf("replica %s: %s %d bytes at %d: %w", r.id, op, length, off, err)
		}
		return nil
	}
	err := punchData(r.data, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		err = r.writeZeros(off, length) // a file system without hole punching
	}
	if err == nil && r.sums != nil {
		err = r.punchSums(off, length)
	}
	if err != nil {
		return fmt.Errorf("replica %s: %s %d bytes at %d: %w", r.id, op, length, off, err)
	}
	return nil
}

// zeroChunk is a writeChunk of zeros, never written to.
var zeroChunk [writeChunk]byte

func (r *Replica) writeZeros(off, length uint64) error {
	for length > 0 {
		n := pieceLen(off, length) // the pieces pwrite would cut
		if err := r.pwrite(zeroChunk[:n], off); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// extentBounds returns the byte range of extent i.
func (r *Replica) extentBounds(i uint64) (off, n uint64) {
	off = i * r.extentSize
	return off, min(r.extentSize, r.size-off)
}

// Checksums returns the CRC32C (Castagnoli) of each extent in
// [firstExtent, firstExtent+count); holes count as zeros. With block
// checksums every block read is verified (ErrChecksum), so a scrub's digest
// of an extent also checks it. The epoch is
// checked again before each extent, so a long scan does not hold up Claim.
func (r *Replica) Checksums(epoch, firstExtent, count uint64) ([]uint32, error) {
	r.epochMu.RLock()
	err := r.checkEpoch(epoch)
	r.epochMu.RUnlock()
	if err != nil {
		return nil, err
	}
	if err := r.checkExtents(firstExtent, count); err != nil {
		return nil, err
	}
	sums := make([]uint32, 0, count)
	buf := make([]byte, min(r.extentSize, 256<<10))
	for i := firstExtent; i < firstExtent+count; i++ {
		sum, err := r.extentChecksum(epoch, i, buf)
		if err != nil {
			return nil, err
		}
		sums = append(sums, sum)
	}
	return sums, nil
}

func (r *Replica) extentChecksum(epoch, i uint64, buf []byte) (uint32, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return 0, err
	}
	off, n := r.extentBounds(i)
	if n == r.extentSize && r.isHole(off, n) {
		return r.zeroExtentChecksum(), nil
	}
	var sum uint32
	for n > 0 {
		chunk := buf[:min(n, uint64(len(buf)))]
		if err := r.readBlocks(chunk, off); err != nil {
			return 0, err
		}
		sum = crc32.Update(sum, castagnoli, chunk)
		off, n = off+uint64(len(chunk)), n-uint64(len(chunk))
	}
	return sum, nil
}

// isHole reports whether [off, off+n) holds no data at all (SEEK_DATA finds
// none). When the file system cannot tell, it answers false and the caller
// reads the range.
func (r *Replica) isHole(off, n uint64) bool {
	if r.layered() {
		return r.isHoleLayered(off, n)
	}
	return fileHole(r.data, off, n)
}

func (r *Replica) zeroExtentChecksum() uint32 {
	r.zeroSumOnce.Do(func() {
		for left := r.extentSize; left > 0; {
			n := min(left, writeChunk)
			r.zeroSum = crc32.Update(r.zeroSum, castagnoli, zeroChunk[:n])
			left -= n
		}
	})
	return r.zeroSum
}

// ReadExtent returns the bytes of extent index (shorter for a short last
// extent); the rebuilder copies extents with it.
func (r *Replica) ReadExtent(epoch, index uint64) ([]byte, error) {
	return r.readExtentInto(epoch, index, nil)
}

// readExtentInto reads extent index into buf when it is large enough.
func (r *Replica) readExtentInto(epoch, index uint64, buf []byte) ([]byte, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return nil, err
	}
	if index >= r.extents {
		return nil, fmt.Errorf("replica %s: %w: extent %d, replica has %d", r.id, ErrOutOfRange, index, r.extents)
	}
	off, n := r.extentBounds(index)
	if uint64(cap(buf)) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if err := r.readBlocks(buf, off); err != nil {
		return nil, err
	}
	return buf, nil
}

// DirtyExtents returns the extents written since the last clean point, in
// ascending order.
func (r *Replica) DirtyExtents() []uint64 {
	return r.dirtyExtentsFrom(0, 0)
}

// dirtyExtentsFrom returns up to max dirty extents >= first (max <= 0: all).
func (r *Replica) dirtyExtentsFrom(first uint64, max int) []uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.want.list(first, max)
}

// Info describes the replica.
func (r *Replica) Info() Info {
	r.epochMu.RLock()
	info := Info{
		ID: r.id, Generation: r.generation, Size: r.size, ExtentSize: r.extentSize,
		Epoch: r.epoch, CleanEpoch: r.cleanEpoch, CleanGeneration: r.cleanGen,
	}
	if !r.closed {
		info.AllocatedBytes = allocatedBytes(r.data)
		for _, lf := range r.below {
			info.AllocatedBytes += allocatedBytes(lf.data)
		}
	}
	r.epochMu.RUnlock()
	r.mu.Lock()
	info.DirtyExtents = r.want.count()
	r.mu.Unlock()
	return info
}

// Close waits for operations in progress and closes the replica's files.
// Later operations fail with ErrClosed. Closing twice is fine.
func (r *Replica) Close() error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	return r.closeLocked()
}

func (r *Replica) closeLocked() error {
	if r.closed {
		return nil
	}
	r.closed = true
	// Unflushed writes stay in the page cache and reach the disk later;
	// Close is not a Flush, as for a block device. With snapshots the
	// head's written blocks are recorded durably only by a sync
	// (layer.Chain.Sync), so Close syncs the head: a clean stop leaves the
	// next open nothing to settle (pending.go), which after a power loss
	// could keep less than was written.
	var err error
	if r.data != nil && r.layered() {
		err = r.syncHead()
	}
	return errors.Join(err, r.closeFiles())
}

// closeFiles closes whatever of the replica's files are open.
func (r *Replica) closeFiles() error {
	var err error
	r.dropHeadMap()
	if r.sums != nil {
		if cerr := r.closeSums(); cerr != nil {
			err = fmt.Errorf("replica %s: close sums file: %w", r.id, cerr)
		}
		r.sums = nil
	}
	if r.data != nil {
		if cerr := r.data.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("replica %s: close data file: %w", r.id, cerr))
		}
		r.data = nil
	}
	// A layer under construction is a stray once the replica is closed
	// (the next open would remove its files); it is removed now.
	r.buildMu.Lock()
	r.discardBuild()
	r.buildMu.Unlock()
	if cerr := r.closeLayers(); cerr != nil {
		err = errors.Join(err, fmt.Errorf("replica %s: close layers: %w", r.id, cerr))
	}
	if r.bits != nil {
		err = errors.Join(err, r.bits.Close())
		r.bits = nil
	}
	if r.dirLock != nil {
		err = errors.Join(err, r.dirLock.Close())
		r.dirLock = nil
	}
	return err
}

// Remove closes the replica and deletes its files. The directory is first
// renamed to a hidden name, so a crash midway never leaves something that
// looks like a replica.
func (r *Replica) Remove() error {
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if err := r.closeLocked(); err != nil {
		return err
	}
	return removeReplicaDir(r.dir)
}

func removeReplicaDir(path string) error {
	parent, name := filepath.Split(filepath.Clean(path))
	tomb, err := os.MkdirTemp(parent, "."+name+".deleting-")
	if err != nil {
		return err
	}
	// Rename onto the fresh empty directory: atomic, and the name is unique.
	// (os.Rename refuses an existing target directory; rename(2) replaces
	// an empty one.)
	if err := syscall.Rename(path, tomb); err != nil {
		_ = os.Remove(tomb) // still empty
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("remove replica %s: %w", name, err)
	}
	if err := syncDir(parent); err != nil {
		return err
	}
	if err := os.RemoveAll(tomb); err != nil {
		return fmt.Errorf("remove replica %s: %w", name, err)
	}
	return nil
}

// isHiddenEntry reports whether a data-directory entry is a leftover of an
// interrupted create or remove rather than a replica.
func isHiddenEntry(name string) bool { return strings.HasPrefix(name, ".") }

// isLeftover reports whether name is the hidden directory of a replica
// create (buildHidden) or delete (removeReplicaDir) that did not finish.
func isLeftover(name string) bool {
	return isHiddenEntry(name) && (strings.Contains(name, ".creating-") || strings.Contains(name, ".deleting-"))
}
