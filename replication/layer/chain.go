// Package layer keeps the chain of a replica's layers and the index of which
// layer holds each block (docs/snapshots.md).
//
// A replica's data is a stack of layers, oldest first: read-only layers that
// snapshots sealed, and on top the one writable head. Every layer is a
// sparse file at the volume's offsets; a block reads from the newest layer
// that holds it. The bottom layer holds every block (a hole in it reads as
// zeros, which is what a never-written block is). Every other layer has a
// map file: one bit per BlockSize block, set once the layer holds the
// block's data (written or zeroed). Correctness never rests on the file
// system's hole map: a hole in an upper layer whose bit is set reads as
// zeros, a hole whose bit is clear reads from below.
//
// The package does no data I/O. The replica reads and writes the layers'
// data (and checksum) files and asks the chain where a block lives (Spans),
// records the blocks it wrote into the head (MarkHeld), and calls Seal to
// take a snapshot and MergeRange/FinishMerge to remove a layer.
//
// Memory: the map files are used through shared mappings (the page cache,
// not the Go heap). In the heap the chain keeps one uint16 per Granule of
// the volume, the index of the newest layer that holds any block of the
// granule, so that a read of a granule that only the bottom holds (the
// common case) costs one load, and a read elsewhere starts its search at the
// right layer: 2 bytes per 64 KiB, 32 KiB per GiB.
//
// The list of layers lives in the file "chain", replaced atomically; it is
// the commit point of Seal and FinishMerge. A replica without that file is a
// chain of one layer, the files "data" and "sums" that replicas had before
// layers existed, so old replicas open unchanged.
package layer

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/internal/atomicfile"
)

const (
	// BlockSize is the unit a layer holds or does not hold: the checksum
	// block of the replica (replica.SumBlockSize).
	BlockSize = 4096
	// Granule is the span of the volume that one entry of the in-memory
	// index covers.
	Granule = 64 << 10
	// DefaultMaxLayers bounds the chain when Open is given no limit.
	DefaultMaxLayers = 256
	// MaxLayers is the most any chain can have: the index holds a layer's
	// position in a uint16.
	MaxLayers = 1<<16 - 1

	blocksPerGranule = Granule / BlockSize
	recordName       = "chain"
	stemPrefix       = "layer-"
	mapKind          = "map"
	pendingKind      = "pending"
	recordVersion    = 1
)

// Errors, to be matched with errors.Is.
var (
	ErrTooManyLayers = errors.New("layer: chain has reached its limit of layers")
	ErrExists        = errors.New("layer: a layer with that id is in the chain")
	ErrNotFound      = errors.New("layer: no such layer")
	ErrShared        = errors.New("layer: the layer is shared with another replica")
	ErrCorrupt       = errors.New("layer: chain record or map file is damaged")
	ErrInvalid       = errors.New("layer: invalid argument")
	ErrUnmerged      = errors.New("layer: the layer still holds blocks its child does not")
	// ErrReopen: a Seal failed after its commit point may have passed;
	// the chain in memory may not be the one on disk. Close and open it
	// again.
	ErrReopen = errors.New("layer: the chain must be opened again")
)

// Entry names one layer of a chain.
type Entry struct {
	// ID names the layer's contents wherever it is: a layer linked into
	// several replicas (a clone, a restore) has the same ID in each. A
	// sealed layer's ID is the snapshot that sealed it; the head has none.
	ID string `json:"id,omitempty"`
	// Stem is the start of the layer's file names in the replica's
	// directory (Stem.map, Stem.data, …); empty for the layer that
	// predates chains, whose files are "data" and "sums".
	Stem string `json:"stem,omitempty"`
	// Deleting: the layer's snapshot is being deleted (MarkDeleting); its
	// data may be partly freed, so it must not be read as a snapshot.
	Deleting bool `json:"deleting,omitempty"`
}

type record struct {
	Version int     `json:"version"`
	Layers  []Entry `json:"layers"`
}

// Chain is a replica's list of layers and its block index. Spans and
// MarkHeld may run concurrently with each other (the replica's own locks
// keep a block's read and write apart); Seal, Grow and FinishMerge need the
// chain to themselves (no Spans or MarkHeld running).
type Chain struct {
	dir       string
	size      uint64 // the volume's, in bytes
	blocks    uint64
	maxLayers int
	kinds     []string
	layers    []*layer
	// top holds two uint16 per word: for granule g, the position of the
	// newest layer holding any of its blocks (0: only the bottom). Words,
	// not uint16s, because Go's atomics are 32 bits at least.
	top []uint32
	// touched has a bit per page of the head's pending bits that MarkHeld
	// wrote to since the last Sync, so that Sync does not scan the rest.
	touched []uint32
	syncMu  sync.Mutex // one Sync at a time
	// spare is the stem of files made ahead for the next head
	// (PrepareSpare), for a volume of spareBlocks blocks; "" if none.
	spareMu     sync.Mutex
	spare       string
	spareBlocks uint64
	// unclean is what Open found in the head's pending file (Recover).
	unclean Unclean
}

type layer struct {
	Entry
	mapFile  *os.File // nil for the bottom
	bits     []byte   // mapFile's mapping; nil if the file is empty
	writable bool     // mapped read-write although sealed (a merge writes into it)
	// pending (the head only) has the bits of blocks written since the
	// last Sync, as long as bits: the part of pendingMap past the header
	// of pendingFile (the stem's "pending" file). See Sync and Recover.
	pending     []byte
	pendingMap  []byte
	pendingFile *os.File
}

// Options are a chain's settings.
type Options struct {
	// MaxLayers bounds the number of layers, the head included; 0 means
	// DefaultMaxLayers.
	MaxLayers int
	// Kinds are the kinds of file the replica keeps per layer besides the
	// map ("data", "sums"): the files FinishMerge removes with a layer,
	// and those of the layer from before chains that Open removes once the
	// record no longer lists it.
	Kinds []string
}

// Open reads the chain of the replica in dir, whose volume is size bytes.
// Files of layers that the record does not list (left by a Seal or a
// FinishMerge that a crash interrupted) are removed. Pending bits that a
// stop without a Sync left in the head's pending file count as held until
// Recover (or a Sync) settles them; Unclean reports them.
func Open(dir string, size uint64, opts Options) (*Chain, error) {
	maxLayers := opts.MaxLayers
	if maxLayers == 0 {
		maxLayers = DefaultMaxLayers
	}
	if maxLayers < 1 || maxLayers > MaxLayers {
		return nil, fmt.Errorf("%w: a limit of %d layers (want 1 to %d)", ErrInvalid, maxLayers, MaxLayers)
	}
	entries, err := readRecord(dir)
	if err != nil {
		return nil, err
	}
	c := &Chain{dir: dir, size: size, blocks: blocksOf(size), maxLayers: maxLayers, kinds: opts.Kinds}
	for i, e := range entries {
		l := &layer{Entry: e}
		c.layers = append(c.layers, l)
		if i == 0 {
			continue // the bottom holds every block; its map, if any, is not read
		}
		if err := c.openMap(l, i == len(entries)-1); err != nil {
			_ = c.Close() // the map error is the one to report
			return nil, err
		}
	}
	if err := c.removeStrays(); err != nil {
		_ = c.Close()
		return nil, err
	}
	if err := c.buildIndex(); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// buildIndex computes the index from the maps: for every granule, the
// newest layer holding any of its blocks. Open does it once; a change that
// moves layers to other positions (Insert, Drop) does it again.
func (c *Chain) buildIndex() error {
	c.top = make([]uint32, (c.granules()+1)/2)
	return c.guard("build the index", func() {
		for g := range c.granules() {
			c.setTop(g, c.newestHolderOfGranule(g, len(c.layers)-1))
		}
	})
}

func readRecord(dir string) ([]Entry, error) {
	raw, err := os.ReadFile(filepath.Join(dir, recordName))
	if errors.Is(err, fs.ErrNotExist) {
		return []Entry{{}}, nil // a replica from before chains: one layer
	}
	if err != nil {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal(raw, &rec); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrCorrupt, filepath.Join(dir, recordName), err)
	}
	if rec.Version != recordVersion {
		return nil, fmt.Errorf("%w: %s has version %d, this build reads %d", ErrCorrupt, filepath.Join(dir, recordName), rec.Version, recordVersion)
	}
	if len(rec.Layers) == 0 || len(rec.Layers) > MaxLayers {
		return nil, fmt.Errorf("%w: %s lists %d layers", ErrCorrupt, filepath.Join(dir, recordName), len(rec.Layers))
	}
	stems := map[string]bool{}
	for i, e := range rec.Layers {
		if e.Stem == "" && i != 0 || stems[e.Stem] || e.Stem != "" && !validStem(e.Stem) {
			return nil, fmt.Errorf("%w: %s: layer %d has stem %q", ErrCorrupt, filepath.Join(dir, recordName), i, e.Stem)
		}
		stems[e.Stem] = true
	}
	return rec.Layers, nil
}

func (c *Chain) writeRecord(entries []Entry) error {
	raw, err := json.Marshal(record{Version: recordVersion, Layers: entries})
	if err != nil {
		return err
	}
	return atomicfile.Write(c.dir, recordName, raw)
}

// openMap opens and maps layer l's map file, read-write for the head.
func (c *Chain) openMap(l *layer, head bool) error {
	flag, prot := os.O_RDONLY, unix.PROT_READ
	if head {
		flag, prot = os.O_RDWR, unix.PROT_READ|unix.PROT_WRITE
	}
	f, err := os.OpenFile(c.path(l.Stem, mapKind), flag, 0)
	if err != nil {
		return fmt.Errorf("%w: layer %q: %v", ErrCorrupt, l.Stem, err)
	}
	l.mapFile = f
	if head {
		// The head's map covers the whole volume (Grow extends it); a
		// sealed layer's may be shorter, if the volume grew after it was
		// sealed: bits past its end are clear.
		if err := f.Truncate(int64(mapBytes(c.blocks))); err != nil {
			return fmt.Errorf("layer %q: size the map: %w", l.Stem, err)
		}
	}
	if err := mapFile(l, prot); err != nil {
		return err
	}
	if head {
		return c.openPending(l)
	}
	return nil
}

// pageBytes is the span of a pending map that one bit of touched covers.
const pageBytes = 4096

// unmapPending unmaps and closes l's pending file; its bits stay in it.
func (l *layer) unmapPending() error {
	var err error
	if l.pendingMap != nil {
		err = unix.Munmap(l.pendingMap)
		l.pendingMap, l.pending = nil, nil
	}
	if l.pendingFile != nil {
		err = errors.Join(err, l.pendingFile.Close())
		l.pendingFile = nil
	}
	return err
}

func mapFile(l *layer, prot int) error {
	st, err := l.mapFile.Stat()
	if err != nil {
		return err
	}
	n := st.Size() &^ 3 // whole words only
	if n == 0 {
		return nil
	}
	m, err := unix.Mmap(int(l.mapFile.Fd()), 0, int(n), prot, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("layer %q: map %s: %w", l.Stem, l.mapFile.Name(), err)
	}
	l.bits = m
	return nil
}

func (l *layer) unmap() error {
	err := l.unmapPending()
	if l.bits != nil {
		err = unix.Munmap(l.bits)
		l.bits = nil
	}
	if l.mapFile != nil {
		err = errors.Join(err, l.mapFile.Close())
		l.mapFile = nil
	}
	return err
}

// Close unmaps and closes the map files. The bits of blocks written since
// the last Sync stay in the head's pending file, as after a process crash:
// the next Open finds them and Recover settles them. Sync first to make
// them durable.
func (c *Chain) Close() error {
	var err error
	for _, l := range c.layers {
		err = errors.Join(err, l.unmap())
	}
	return err
}

// removeStrays removes the files of layers that the record does not list.
func (c *Chain) removeStrays() error {
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return err
	}
	listed := map[string]bool{}
	for _, l := range c.layers {
		listed[l.Stem] = true
	}
	head := c.layers[len(c.layers)-1].Stem
	for _, e := range ents {
		stem, kind, _ := strings.Cut(e.Name(), ".")
		if !strings.HasPrefix(stem, stemPrefix) || listed[stem] && (kind != pendingKind || stem == head) {
			// Not a layer's, or a listed layer's, but for the pending
			// file of a sealed one: Seal removes it (empty) once the
			// layer is sealed, a crash may leave it.
			continue
		}
		if err := os.Remove(filepath.Join(c.dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	stray := []string{recordName + ".tmp"}
	if !listed[""] {
		stray = append(stray, c.kinds...) // the pre-chain files, merged away
	}
	for _, name := range stray {
		if err := os.Remove(filepath.Join(c.dir, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// Path returns the file of kind ("data", "sums", …) of layer i.
func (c *Chain) Path(i int, kind string) string { return c.path(c.layers[i].Stem, kind) }

func (c *Chain) path(stem, kind string) string {
	if stem == "" {
		return filepath.Join(c.dir, kind)
	}
	return filepath.Join(c.dir, stem+"."+kind)
}

// Len returns the number of layers, the head included.
func (c *Chain) Len() int { return len(c.layers) }

// Head returns the position of the head, the one writable layer.
func (c *Chain) Head() int { return len(c.layers) - 1 }

// Entries returns the layers, oldest first.
func (c *Chain) Entries() []Entry {
	out := make([]Entry, len(c.layers))
	for i, l := range c.layers {
		out[i] = l.Entry
	}
	return out
}

func blocksOf(size uint64) uint64 { return (size + BlockSize - 1) / BlockSize }

// mapBytes is the size of a map file for blocks blocks: whole 32-bit words.
func mapBytes(blocks uint64) uint64 { return (blocks + 31) / 32 * 4 }

func (c *Chain) granules() uint64 { return (c.blocks + blocksPerGranule - 1) / blocksPerGranule }

// The map files are bit arrays: block b is bit b%8 of byte b/8. They are
// read and written as little-endian 32-bit words (bit b%32 of word b/32,
// the same bit), with atomic operations, because two writes of
// neighbouring blocks set bits of the same word at the same time.
func init() {
	var w uint32 = 1
	if *(*byte)(unsafe.Pointer(&w)) != 1 {
		panic("layer: the map files' word access assumes a little-endian machine")
	}
}

// word returns the word of m that holds block b's bit; nil past m's end (a
// layer sealed before the volume grew has a shorter map).
func word(m []byte, b uint64) *uint32 {
	i := b / 32 * 4
	if i+4 > uint64(len(m)) {
		return nil
	}
	return (*uint32)(unsafe.Pointer(&m[i]))
}

// load is the word of l's bits (durable or pending) that holds block b.
func (l *layer) load(b uint64) uint32 {
	var v uint32
	if w := word(l.bits, b); w != nil {
		v = atomic.LoadUint32(w)
	}
	if w := word(l.pending, b); w != nil {
		v |= atomic.LoadUint32(w)
	}
	return v
}

func (l *layer) has(b uint64) bool { return l.load(b)&(1<<(b%32)) != 0 }

// hasDurable is has without the pending bits: the layer holds the block
// in a way a crash keeps.
func (l *layer) hasDurable(b uint64) bool {
	w := word(l.bits, b)
	return w != nil && atomic.LoadUint32(w)&(1<<(b%32)) != 0
}

// anyInGranule reports whether l holds any block of granule g (16 blocks:
// half of one word).
func (l *layer) anyInGranule(g uint64) bool {
	b := g * blocksPerGranule
	return l.load(b)>>(b%32)&(1<<blocksPerGranule-1) != 0
}

func (c *Chain) getTop(g uint64) int {
	return int(atomic.LoadUint32(&c.top[g/2]) >> (16 * (g % 2)) & 0xffff)
}

// setTop stores v as granule g's top; the other half of the word is kept.
func (c *Chain) setTop(g uint64, v int) {
	p, shift := &c.top[g/2], 16*(g%2)
	for {
		old := atomic.LoadUint32(p)
		nw := old&^(0xffff<<shift) | uint32(v)<<shift
		if old == nw || atomic.CompareAndSwapUint32(p, old, nw) {
			return
		}
	}
}

// raiseTop makes granule g's top at least v.
func (c *Chain) raiseTop(g uint64, v int) {
	p, shift := &c.top[g/2], 16*(g%2)
	for {
		old := atomic.LoadUint32(p)
		if int(old>>shift&0xffff) >= v {
			return
		}
		if atomic.CompareAndSwapUint32(p, old, old&^(0xffff<<shift)|uint32(v)<<shift) {
			return
		}
	}
}

// newestHolderOfGranule is the newest layer at or below from that holds
// any block of granule g; 0 if none above the bottom does.
func (c *Chain) newestHolderOfGranule(g uint64, from int) int {
	for i := from; i >= 1; i-- {
		if c.layers[i].anyInGranule(g) {
			return i
		}
	}
	return 0
}

// holder is the newest layer at or below last that holds block b.
func (c *Chain) holder(b uint64, last int) int {
	for i := min(c.getTop(b/blocksPerGranule), last); i >= 1; i-- {
		if c.layers[i].has(b) {
			return i
		}
	}
	return 0
}

// guard runs fn with faults on the mapped map files turned into an error:
// a page that cannot be read (an I/O error of the disk) or made writable
// (the disk is full) arrives as a memory fault, not as an error.
func (c *Chain) guard(op string, fn func()) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		p := recover()
		if p == nil {
			return
		}
		if _, fault := p.(interface{ Addr() uintptr }); !fault {
			panic(p) // not a memory fault: a bug, not the disk
		}
		err = fmt.Errorf("layer: %s in %s: fault on a mapped map file (the disk failed, or is full): %v", op, c.dir, p)
	}()
	fn()
	return nil
}

// Spans calls fn for each run of [off, off+n) that one layer holds, in
// order: layer i holds the bytes [o, o+m). A chain of one layer gives one
// run.
func (c *Chain) Spans(off, n uint64, fn func(i int, o, m uint64) error) error {
	return c.SpansIn(len(c.layers)-1, off, n, fn)
}

// SpansIn is Spans in the volume as layers 0 to last show it: the contents
// of the snapshot that sealed layer last.
func (c *Chain) SpansIn(last int, off, n uint64, fn func(i int, o, m uint64) error) error {
	if last < 0 || last >= len(c.layers) {
		return fmt.Errorf("%w: layer %d of %d", ErrInvalid, last, len(c.layers))
	}
	if last == 0 || n == 0 {
		return fn(0, off, n)
	}
	type run struct {
		i    int
		o, m uint64
	}
	var small [8]run
	runs := small[:0]
	end := off + n
	if err := c.guard("find the layers of a read", func() {
		for o := off; o < end; {
			b := o / BlockSize
			h := c.holder(b, last)
			e := min(end, (b+1)*BlockSize)
			for e < end && c.holder(e/BlockSize, last) == h {
				e = min(end, e+BlockSize)
			}
			runs = append(runs, run{h, o, e - o})
			o = e
		}
	}); err != nil {
		return err
	}
	for _, r := range runs {
		if err := fn(r.i, r.o, r.m); err != nil {
			return err
		}
	}
	return nil
}

// Holder returns the layer that holds the block at byte offset off.
func (c *Chain) Holder(off uint64) (i int, err error) {
	if len(c.layers) == 1 {
		return 0, nil
	}
	err = c.guard("find the layer of a block", func() { i = c.holder(off/BlockSize, len(c.layers)-1) })
	return i, err
}

// MarkHeld records that the head now holds every block that [off, off+n)
// touches. The caller has written those blocks whole into the head (a
// block the range covers in part was first copied up from its holder, see
// Holder), and calls MarkHeld after the data write returned: until the bit
// is set, reads go on to find the block below. The bits are pending until
// the next Sync, in the head's pending file, which is never synced: a
// process crash leaves them in the page cache, where the next Open finds
// them, with the data (Recover); a power loss keeps any part of either (see
// Sync). Only atomics on the words: writes of neighbouring blocks set bits
// of one word at the same time, and touched tells Sync which pages to scan.
func (c *Chain) MarkHeld(off, n uint64) error {
	if len(c.layers) == 1 || n == 0 {
		return nil // the bottom holds everything already
	}
	h := len(c.layers) - 1
	head := c.layers[h]
	first, last := off/BlockSize, (off+n-1)/BlockSize
	return c.guard("record written blocks", func() {
		for b := first; b <= last; {
			// Set up to a word's worth of bits at once.
			e := min(last+1, (b/32+1)*32)
			mask := uint32(1<<(e-b)-1) << (b % 32)
			if e-b == 32 {
				mask = ^uint32(0)
			}
			atomic.OrUint32(word(head.pending, b), mask)
			p := b / 8 / pageBytes
			atomic.OrUint32(&c.touched[p/32], 1<<(p%32))
			b = e
		}
		for g := first / blocksPerGranule; g <= last/blocksPerGranule; g++ {
			c.raiseTop(g, h)
		}
	})
}

// Sync makes the blocks written into the head before it was called
// durable: their data (syncData, the caller's fdatasync of the head's data
// file), then their bits in the map file. The order is the point. A bit
// that reached the disk before its block's data would, after a power
// loss, make the block read from the head's file what never reached it
// (zeros, where the block's old contents lie intact in a layer below).
// So MarkHeld sets bits in the pending file only (never synced), and Sync
// moves the pending bits it found before syncData, whose data writes had
// returned before their bits were set, into the map after syncData
// succeeded, and syncs the map. A write that a crash caught before a Sync
// is settled by the next Open (Recover): after a process crash its data
// and its pending bit are both in the page cache and it reads as written;
// after a power loss it reads as written only where its data is found
// intact, and as its old contents elsewhere, as from a disk that lost its
// cache. Reads see a moved bit throughout: it is set in the map before it
// is cleared from pending.
//
// Syncs run one at a time: a Sync that found nothing to move while another
// still held bits waiting for its data sync would otherwise return before
// writes that completed ahead of it were recorded.
func (c *Chain) Sync(syncData func() error) error {
	c.syncMu.Lock()
	defer c.syncMu.Unlock()
	if len(c.layers) == 1 {
		return syncData()
	}
	head := c.layers[len(c.layers)-1]
	type moving struct {
		b uint64 // the first block of the word
		v uint32
	}
	var words []moving
	var pages []uint64
	retouch := func() {
		for _, p := range pages {
			atomic.OrUint32(&c.touched[p/32], 1<<(p%32))
		}
	}
	if err := c.guard("find written blocks", func() {
		for j := range c.touched {
			for t := atomic.SwapUint32(&c.touched[j], 0); t != 0; t &= t - 1 {
				pages = append(pages, uint64(j)*32+uint64(bits.TrailingZeros32(t)))
			}
		}
		for _, p := range pages {
			for b := p * pageBytes * 8; b < min(uint64(len(head.pending))*8, (p+1)*pageBytes*8); b += 32 {
				if v := atomic.LoadUint32(word(head.pending, b)); v != 0 {
					words = append(words, moving{b, v})
				}
			}
		}
	}); err != nil {
		retouch()
		return err
	}
	if err := syncData(); err != nil {
		retouch()
		return err
	}
	if err := c.guard("record synced blocks", func() {
		for _, w := range words {
			atomic.OrUint32(word(head.bits, w.b), w.v)
			atomic.AndUint32(word(head.pending, w.b), ^w.v)
		}
	}); err != nil {
		retouch()
		return err
	}
	// A page whose pending bits were set again meanwhile is touched
	// already: MarkHeld marks the page after it sets a bit.
	if err := unix.Fdatasync(int(head.mapFile.Fd())); err != nil {
		return fmt.Errorf("layer: sync the head's map in %s: %w", c.dir, err)
	}
	c.settled()
	return nil
}

// Seal makes the head a read-only layer with the given id (the snapshot's)
// and starts a new, empty head. It costs the same for any size of volume
// or amount of data: no data moves. syncData makes the head's data
// durable (as for Sync). prepare creates the new head's other files (its
// empty data file of the volume's size, its sums) under the stem it is
// given, durably; the chain creates the map. The caller holds the chain to
// itself. The new record is the commit point: a crash before it leaves the
// old chain (and files that the next Open removes), a crash after it the
// new one.
func (c *Chain) Seal(id string, syncData func() error, prepare func(stem string) error) error {
	if !validID(id) {
		return fmt.Errorf("%w: layer id %q", ErrInvalid, id)
	}
	if len(c.layers) >= c.maxLayers {
		return fmt.Errorf("%w (%d)", ErrTooManyLayers, c.maxLayers)
	}
	if c.find(id) >= 0 {
		return fmt.Errorf("%w: %q", ErrExists, id)
	}
	if err := c.Sync(syncData); err != nil {
		return err
	}
	stem, err := c.takeSpare()
	if err != nil {
		return err
	}
	if stem == "" {
		if stem, err = c.makeHeadFiles(prepare); err != nil {
			return err
		}
	}
	nl := &layer{Entry: Entry{Stem: stem}}
	f, err := os.OpenFile(c.path(stem, mapKind), os.O_RDWR, 0)
	if err != nil {
		return err
	}
	nl.mapFile = f
	entries := c.Entries()
	entries[len(entries)-1].ID = id
	entries = append(entries, nl.Entry)
	if err := c.writeRecord(entries); err != nil {
		// The record may have been replaced before the error (a failed
		// sync of the directory after the rename): which chain is on disk
		// is unknown, so the chain must be opened again.
		_ = nl.unmap()
		return fmt.Errorf("%w: record the sealed chain: %v", ErrReopen, err)
	}
	old := c.layers[len(c.layers)-1]
	old.ID = id
	// Its pending bits are none: Sync moved every bit, and no write ran
	// since. A sealed layer has no pending file; one that a crash (or a
	// failed removal) leaves, Open removes.
	err = old.unmapPending()
	_ = os.Remove(c.path(old.Stem, pendingKind))
	if err == nil {
		err = mapFile(nl, unix.PROT_READ|unix.PROT_WRITE)
	}
	if err == nil {
		err = c.openPending(nl)
	}
	if err != nil {
		// The record names the new head already; the next Open maps it.
		_ = nl.unmap()
		return fmt.Errorf("%w: the chain is sealed but its new head cannot be used: %v", ErrReopen, err)
	}
	c.layers = append(c.layers, nl)
	return nil
}

// makeHeadFiles creates the files of a new head: its empty map, durably,
// and through prepare the caller's. Until a record lists them they are
// strays, which the next Open removes.
func (c *Chain) makeHeadFiles(prepare func(stem string) error) (string, error) {
	stem := NewStem()
	if err := atomicfile.CreateSized(c.path(stem, mapKind), int64(mapBytes(c.blocks))); err != nil {
		return "", err
	}
	if err := prepare(stem); err != nil {
		c.removeFiles(stem)
		return "", fmt.Errorf("layer: prepare the new head %s: %w", stem, err)
	}
	return stem, nil
}

// removeFiles removes the files of a layer that no record lists, as far as
// it can (what is left, the next Open removes).
func (c *Chain) removeFiles(stem string) {
	for _, kind := range append([]string{mapKind, pendingKind}, c.kinds...) {
		_ = os.Remove(c.path(stem, kind))
	}
}

// PrepareSpare makes the files of the next head ahead of the next Seal,
// which then only has to record them: creating and syncing files is most
// of the time a seal takes, and a seal holds writes. The replica calls it
// after a seal, in the background. Callers hold the chain shared (no Seal
// or Grow running); concurrent calls make one spare.
func (c *Chain) PrepareSpare(prepare func(stem string) error) error {
	c.spareMu.Lock()
	defer c.spareMu.Unlock()
	if c.spare != "" {
		return nil
	}
	stem, err := c.makeHeadFiles(prepare)
	if err != nil {
		return err
	}
	c.spare, c.spareBlocks = stem, c.blocks
	return nil
}

// takeSpare returns the spare head's stem ("" if there is none), removing
// a spare made for another size of volume.
func (c *Chain) takeSpare() (string, error) {
	c.spareMu.Lock()
	defer c.spareMu.Unlock()
	stem := c.spare
	c.spare = ""
	if stem != "" && c.spareBlocks != c.blocks {
		c.removeFiles(stem)
		return "", nil
	}
	return stem, nil
}

func (c *Chain) find(id string) int {
	for i, l := range c.layers {
		if l.ID == id {
			return i
		}
	}
	return -1
}

// Find returns the position of the layer with the given id.
func (c *Chain) Find(id string) (int, error) {
	if i := c.find(id); id != "" && i >= 0 {
		return i, nil
	}
	return -1, fmt.Errorf("%w: %q in %s", ErrNotFound, id, c.dir)
}

// Grow extends the index and the head's map to a volume of size bytes.
// Sealed layers keep their maps: the blocks past their end are not theirs.
func (c *Chain) Grow(size uint64) error {
	blocks := blocksOf(size)
	if blocks < c.blocks {
		return fmt.Errorf("%w: shrink from %d to %d blocks", ErrInvalid, c.blocks, blocks)
	}
	if blocks == c.blocks {
		c.size = max(c.size, size)
		return nil
	}
	if len(c.layers) > 1 {
		head := c.layers[len(c.layers)-1]
		if err := head.mapFile.Truncate(int64(mapBytes(blocks))); err != nil {
			return fmt.Errorf("layer: grow the head's map: %w", err)
		}
		if err := head.mapFile.Sync(); err != nil {
			return err
		}
		// The new mappings are made before the old ones go, so that a
		// failure leaves the head as it was (its map and pending files
		// only longer). The pending bits stay where they are, in the
		// file; only the mapping grows.
		nl := &layer{Entry: head.Entry, mapFile: head.mapFile}
		if err := mapFile(nl, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			return err
		}
		pm, err := mapPending(head.pendingFile, len(nl.bits))
		if err != nil {
			_ = unix.Munmap(nl.bits)
			return fmt.Errorf("layer: grow the head's pending bits: %w", err)
		}
		oldBits, oldPending := head.bits, head.pendingMap
		head.bits, head.pendingMap, head.pending = nl.bits, pm, pm[pendingHeader:]
		touched := make([]uint32, touchedLen(len(head.pending)))
		copy(touched, c.touched)
		c.touched = touched
		if oldBits != nil {
			_ = unix.Munmap(oldBits) // only fails on a bad address
		}
		_ = unix.Munmap(oldPending)
	}
	c.size, c.blocks = size, blocks
	top := make([]uint32, (c.granules()+1)/2)
	copy(top, c.top)
	c.top = top
	return nil
}

func validStem(s string) bool {
	return strings.HasPrefix(s, stemPrefix) && validID(strings.TrimPrefix(s, stemPrefix))
}

// validID accepts what is safe in a file name and a record: 1–128 of
// [A-Za-z0-9_-].
func validID(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// NewStem returns a fresh stem for a layer's files.
func NewStem() string { return stemPrefix + randomHex() }

// Assemble writes the chain of a new replica in dir, which holds no chain
// yet: sealed are the layers it shares with another replica (a restore or a
// clone), oldest first, whose files the caller has linked into dir under
// the stems given; head is the stem of its new, empty head, whose map
// Assemble creates (the caller creates its other files). The volume is
// size bytes, at least as large as the sealed layers'.
func Assemble(dir string, sealed []Entry, head string, size uint64) error {
	if len(sealed)+1 > MaxLayers {
		return fmt.Errorf("%w: %d layers", ErrTooManyLayers, len(sealed)+1)
	}
	stems, ids := map[string]bool{head: true}, map[string]bool{}
	if !validStem(head) {
		return fmt.Errorf("%w: head stem %q", ErrInvalid, head)
	}
	for _, e := range sealed {
		if !validStem(e.Stem) || !validID(e.ID) || stems[e.Stem] || ids[e.ID] {
			return fmt.Errorf("%w: layer %+v", ErrInvalid, e)
		}
		stems[e.Stem], ids[e.ID] = true, true
	}
	if err := atomicfile.CreateSized(filepath.Join(dir, head+"."+mapKind), int64(mapBytes(blocksOf(size)))); err != nil {
		return err
	}
	c := &Chain{dir: dir}
	return c.writeRecord(append(append([]Entry(nil), sealed...), Entry{Stem: head}))
}

func randomHex() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	return hex.EncodeToString(b[:])
}

// popcount counts the set bits of l's map among the first blocks blocks.
func (l *layer) popcount(blocks uint64) uint64 {
	var n uint64
	for i := uint64(0); i+4 <= uint64(len(l.bits)) && i/4*32 < blocks; i += 4 {
		w := l.load(i / 4 * 32)
		if rest := blocks - i/4*32; rest < 32 {
			w &= 1<<rest - 1
		}
		n += uint64(bits.OnesCount32(w))
	}
	return n
}
