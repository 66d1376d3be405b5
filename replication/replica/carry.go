package replica

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/replication/layer"
)

// Carrying the chain of sealed layers to a replica being rebuilt
// (docs/snapshots.md, "Rebuild carries the chain").
//
// The rebuilder (engine/rebuild.go) makes a target's sealed layers equal to
// a healthy source's, oldest first, one extent at a time:
//
//   - Layers lists a replica's sealed layers;
//   - LayerSums gives a checksum per extent of a sealed layer, computed
//     once and then cached in memory (a sealed layer changes only when a
//     deletion merges into it, which drops its cache), so that comparing a
//     layer a second time reads nothing;
//   - ReadLayerExtent gives one extent of a sealed layer in its canonical
//     encoding (below), whose CRC32C is the extent's checksum;
//   - BeginLayer, WriteLayerExtent and SealLayer build a layer aside, under
//     a stem no chain record lists, and publish it at a position below the
//     head in one atomic rewrite of the record (layer.Chain.Insert). Until
//     then its files are strays: a crash leaves no half layer, and the next
//     open removes them; within one process a begin of the same layer at
//     the same place resumes it (the rebuilder compares before it copies);
//   - DropLayer takes a layer out without a merge, where a merge cannot run.
//
// A layer being deleted on the source is not carried; the layer above it
// is carried as it will be once the deletion's merge is done: the blocks of
// both (layer.Chain.HeldIn). So a deletion running on the source changes
// nothing the target receives.
//
// Encoding of one extent of a layer (big-endian), the payload of a
// LAYER_READ reply and of a LAYER_WRITE:
//
//	u32   n, the extent's length in bytes (the last extent may be short)
//	held  ceil(b/8) bytes, b = ceil(n/SumBlockSize) blocks: bit j%8 of byte
//	      j/8 set when the layer holds block j of the extent
//	zero  ceil(b/8) bytes: held blocks that read as zeros (no data follows)
//	sums  u32 per data block (held, not zero): its stored sum (storedSum)
//	data  the data blocks, in order (the volume's last block may be short)
//
// Zero blocks travel as a bit, and the target leaves a hole for them.

// LayerInfo names one sealed layer of a replica.
type LayerInfo struct {
	ID string
	// Deleting: the layer's snapshot is being deleted (the merge may be
	// unfinished); it is no snapshot any more.
	Deleting bool
}

// AppendLayerInfos encodes a LAYERS reply: per layer, u8 flags (1:
// deleting), u8 id length, the id.
func AppendLayerInfos(dst []byte, ls []LayerInfo) []byte {
	for _, l := range ls {
		var f byte
		if l.Deleting {
			f = 1
		}
		dst = append(dst, f, byte(len(l.ID)))
		dst = append(dst, l.ID...)
	}
	return dst
}

// DecodeLayerInfos decodes a LAYERS reply. Errors wrap ErrProtocol.
func DecodeLayerInfos(b []byte) ([]LayerInfo, error) {
	ls := []LayerInfo{}
	for len(b) > 0 {
		if len(b) < 2 || b[0] > 1 || len(b) < 2+int(b[1]) {
			return nil, fmt.Errorf("%w: bad layer list entry", ErrProtocol)
		}
		ls = append(ls, LayerInfo{ID: string(b[2 : 2+int(b[1])]), Deleting: b[0] == 1})
		b = b[2+int(b[1]):]
	}
	return ls, nil
}

// layerExtentMax is the longest encoding of an extent of n bytes.
func layerExtentMax(n uint64) uint64 {
	blocks := (n + SumBlockSize - 1) / SumBlockSize
	return 4 + 2*((blocks+7)/8) + 4*blocks + n
}

// layerExtent is a decoded extent encoding; its slices alias the input.
type layerExtent struct {
	n, blocks  uint64
	held, zero []byte
	sums       []byte // u32 per data block
	data       []byte
}

func bit(b []byte, j uint64) bool { return b[j/8]&(1<<(j%8)) != 0 }

// blockLen is the length of block j of an extent of n bytes.
func blockLen(n, j uint64) uint64 { return min(SumBlockSize, n-j*SumBlockSize) }

// decodeLayerExtent checks and decodes an extent encoding. Errors wrap
// ErrInvalidArgument.
func decodeLayerExtent(b []byte) (layerExtent, error) {
	bad := func(format string, args ...any) (layerExtent, error) {
		return layerExtent{}, fmt.Errorf("%w: layer extent: %s", ErrInvalidArgument, fmt.Sprintf(format, args...))
	}
	if len(b) < 4 {
		return bad("%d bytes", len(b))
	}
	var x layerExtent
	x.n = uint64(binary.BigEndian.Uint32(b))
	if x.n == 0 || x.n > MaxExtentSize {
		return bad("length %d", x.n)
	}
	x.blocks = (x.n + SumBlockSize - 1) / SumBlockSize
	mb := (x.blocks + 7) / 8
	if uint64(len(b)) < 4+2*mb {
		return bad("%d bytes for %d blocks", len(b), x.blocks)
	}
	x.held, x.zero = b[4:4+mb], b[4+mb:4+2*mb]
	var count, dataLen uint64
	for j := range x.blocks {
		switch {
		case bit(x.zero, j) && !bit(x.held, j):
			return bad("block %d zero but not held", j)
		case bit(x.held, j) && !bit(x.zero, j):
			count++
			dataLen += blockLen(x.n, j)
		}
	}
	for j := x.blocks; j < 8*mb; j++ {
		if bit(x.held, j) || bit(x.zero, j) {
			return bad("bits past block %d", x.blocks)
		}
	}
	rest := b[4+2*mb:]
	if uint64(len(rest)) != 4*count+dataLen {
		return bad("%d bytes of sums and data, the maps say %d", len(rest), 4*count+dataLen)
	}
	x.sums, x.data = rest[:4*count], rest[4*count:]
	return x, nil
}

// encodeLayerExtent appends the encoding of the extent [off, off+n) of a
// layer to dst. held has the layer's bits for the extent's blocks; read
// fills p with the layer's bytes [o, o+len(p)), a run of held blocks (a
// hole reads as zeros). scratch is at least n bytes.
func encodeLayerExtent(dst, scratch []byte, off, n uint64, held []byte, read func(p []byte, o uint64) error) ([]byte, error) {
	blocks := (n + SumBlockSize - 1) / SumBlockSize
	mb := (blocks + 7) / 8
	buf := scratch[:n]
	for j := uint64(0); j < blocks; {
		if !bit(held, j) {
			j++
			continue
		}
		e := j
		for e < blocks && bit(held, e) {
			e++
		}
		lo, hi := j*SumBlockSize, min(n, e*SumBlockSize)
		if err := read(buf[lo:hi], off+lo); err != nil {
			return nil, err
		}
		j = e
	}
	dst = binary.BigEndian.AppendUint32(dst, uint32(n))
	dst = append(dst, held[:mb]...)
	zi := len(dst)
	dst = append(dst, make([]byte, mb)...)
	var data []uint64
	for j := range blocks {
		if !bit(held, j) {
			continue
		}
		blk := buf[j*SumBlockSize : j*SumBlockSize+blockLen(n, j)]
		if allZero(blk) {
			dst[zi+int(j/8)] |= 1 << (j % 8)
			continue
		}
		data = append(data, j)
		dst = binary.BigEndian.AppendUint32(dst, storedSum(blk))
	}
	for _, j := range data {
		dst = append(dst, buf[j*SumBlockSize:j*SumBlockSize+blockLen(n, j)]...)
	}
	return dst, nil
}

func allZero(b []byte) bool {
	for len(b) >= writeChunk {
		if string(b[:writeChunk]) != string(zeroChunk[:]) {
			return false
		}
		b = b[writeChunk:]
	}
	return string(b) == string(zeroChunk[:len(b)])
}

// layerSumCache keeps the extent checksums of sealed layers, by stem. An
// entry is only ever filled under epochMu held shared and dropped under it
// held exclusively, so a drop cannot race with a fill.
//
// Memory: 4 bytes and a bit per extent and layer, allocated when a layer is
// first compared: 1 MiB for a 1 TiB volume's layer with 4 MiB extents.
type layerSumCache struct {
	mu     sync.Mutex
	layers map[string]*cachedSums
}

type cachedSums struct {
	sums []uint32
	have bitmap
}

// flatKey is the cache's key for the sums of the layer that flattening
// the chain up to the layer under stem would make (FlatSums): they change
// exactly when that layer's own sums may (a view never changes while its
// layer stays; a change below it drops it), so they go with them.
func flatKey(stem string) string { return stem + "#flat" }

func (c *layerSumCache) get(stem string, x uint64) (uint32, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.layers[stem]
	if e == nil || x >= uint64(len(e.sums)) || !e.have.has(x) {
		return 0, false
	}
	return e.sums[x], true
}

func (c *layerSumCache) put(stem string, x, extents uint64, v uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.layers == nil {
		c.layers = map[string]*cachedSums{}
	}
	e := c.layers[stem]
	if e == nil || uint64(len(e.sums)) < extents {
		ne := &cachedSums{sums: make([]uint32, extents), have: make(bitmap, bitmapLen(extents))}
		if e != nil {
			copy(ne.sums, e.sums)
			copy(ne.have, e.have)
		}
		e = ne
		c.layers[stem] = e
	}
	e.sums[x] = v
	e.have.set(x)
}

// drop forgets the sums of the given layers (nil: all).
func (c *layerSumCache) drop(stems []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if stems == nil {
		c.layers = nil
		return
	}
	for _, s := range stems {
		delete(c.layers, s)
		delete(c.layers, flatKey(s))
	}
}

// forgetSumsFrom drops the cached sums of the layers at position from and
// above: a change at from (a deletion marked or finished, a layer inserted
// or dropped) may change what each of them holds once merged. Callers hold
// epochMu exclusively.
func (r *Replica) forgetSumsFrom(from int) {
	var stems []string
	for i, e := range r.chain.Entries() {
		if i >= from {
			stems = append(stems, e.Stem)
		}
	}
	r.layerSums.drop(stems)
}

// Layers lists the replica's sealed layers, oldest first, those being
// deleted included (flagged).
func (r *Replica) Layers(epoch uint64) ([]LayerInfo, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return nil, err
	}
	es := r.chain.Entries()
	out := make([]LayerInfo, 0, len(es)-1)
	for _, e := range es[:len(es)-1] {
		out = append(out, LayerInfo{ID: e.ID, Deleting: e.Deleting})
	}
	return out, nil
}

// liveBelow is the position of the newest layer below k that is not being
// deleted; -1 if none. Callers hold epochMu.
func (r *Replica) liveBelow(k int) int {
	es := r.chain.Entries()
	for j := k - 1; j >= 0; j-- {
		if !es[j].Deleting {
			return j
		}
	}
	return -1
}

// LayerSums returns the checksum of each extent [first, first+count) of
// snapshot id's layer: the CRC32C of the extent's encoding (see above),
// from the cache when it has it. The epoch is checked before each extent,
// so a long scan does not hold up Claim.
func (r *Replica) LayerSums(epoch uint64, id string, first, count uint64) ([]uint32, error) {
	return r.eachExtentSum(first, count, func(x uint64) (uint32, error) { return r.layerExtentSum(epoch, id, x, false) })
}

// eachExtentSum returns sum(x) for each extent of [first, first+count).
func (r *Replica) eachExtentSum(first, count uint64, sum func(x uint64) (uint32, error)) ([]uint32, error) {
	if err := r.checkExtents(first, count); err != nil {
		return nil, err
	}
	sums := make([]uint32, 0, count)
	for x := first; x < first+count; x++ {
		v, err := sum(x)
		if err != nil {
			return nil, err
		}
		sums = append(sums, v)
	}
	return sums, nil
}

// layerExtentSum is the sum of extent x of snapshot id's layer, or with
// flat of the layer flattening the chain up to it would make, from the
// cache when it has it.
func (r *Replica) layerExtentSum(epoch uint64, id string, x uint64, flat bool) (uint32, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	k, err := r.sealedLayer(epoch, id, x)
	if err != nil {
		return 0, err
	}
	key := r.chain.Entries()[k].Stem
	if flat {
		key = flatKey(key)
	}
	if v, ok := r.layerSums.get(key, x); ok {
		return v, nil
	}
	buf := getBuf(int(layerExtentMax(r.extentSize)))
	defer putBuf(buf)
	_, v, err := r.encodeSealedExtent((*buf)[:0], k, x, flat)
	return v, err
}

// FlatSums is LayerSums of the layer that flattening layers 0 to id into
// one would make (Flatten): a bottom layer holding every block, as layer id
// shows it. A rebuild carries a restored volume's inherited layers in that
// form to a replica that has none of them (docs/snapshots.md, "Chain depth
// and flattening"). Cached as LayerSums are.
func (r *Replica) FlatSums(epoch uint64, id string, first, count uint64) ([]uint32, error) {
	return r.eachExtentSum(first, count, func(x uint64) (uint32, error) { return r.layerExtentSum(epoch, id, x, true) })
}

// sealedLayer checks the epoch and the extent and finds snapshot id's
// layer. Callers hold epochMu.
func (r *Replica) sealedLayer(epoch uint64, id string, x uint64) (int, error) {
	if err := r.checkEpoch(epoch); err != nil {
		return 0, err
	}
	if x >= r.extents {
		return 0, fmt.Errorf("replica %s: %w: extent %d, replica has %d", r.id, ErrOutOfRange, x, r.extents)
	}
	return r.snapshotLayer(id)
}

// encodeSealedExtent appends the encoding of extent x of sealed layer k to
// dst, and caches its sum. With flat, it is the encoding of the extent of
// the layer that flattening layers 0 to k would make (see FlatSums).
// Callers hold epochMu shared.
func (r *Replica) encodeSealedExtent(dst []byte, k int, x uint64, flat bool) ([]byte, uint32, error) {
	off, n := r.extentBounds(x)
	blocks := (n + SumBlockSize - 1) / SumBlockSize
	held := make([]byte, (blocks+7)/8)
	below := r.liveBelow(k)
	if flat {
		below = -1 // a bottom holds every block
	}
	if err := r.chain.HeldIn(k, below, off/SumBlockSize, blocks, held); err != nil {
		return nil, 0, fmt.Errorf("replica %s: %w", r.id, err)
	}
	scratch := getBuf(int(n))
	defer putBuf(scratch)
	start := len(dst)
	dst, err := encodeLayerExtent(dst, *scratch, off, n, held, func(p []byte, o uint64) error {
		return r.chain.SpansIn(k, o, uint64(len(p)), func(i int, so, m uint64) error {
			return r.readLayerRun(r.layerFilesOf(i), p[so-o:so-o+m], so)
		})
	})
	if err != nil {
		return nil, 0, err
	}
	v := crc32.Checksum(dst[start:], castagnoli)
	key := r.chain.Entries()[k].Stem
	if flat {
		key = flatKey(key)
	}
	r.layerSums.put(key, x, r.extents, v)
	return dst, v, nil
}

// readLayerRun reads whole blocks [o, o+len(p)) of one layer's files,
// verified when it keeps sums; a hole reads as zeros without a read.
func (r *Replica) readLayerRun(lf layerFiles, p []byte, o uint64) error {
	if fileHole(lf.data, o, uint64(len(p))) {
		clear(p)
		return nil
	}
	if lf.sums != nil {
		return r.readCheckedIn(lf, p, o)
	}
	return r.readFile(lf.data, p, o)
}

// ReadLayerExtent returns the encoding of extent x of snapshot id's layer
// (see above), in buf when it is large enough; with flat, of the layer
// that flattening layers 0 to id would make (see FlatSums).
func (r *Replica) ReadLayerExtent(epoch uint64, id string, x uint64, flat bool, buf []byte) ([]byte, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	k, err := r.sealedLayer(epoch, id, x)
	if err != nil {
		return nil, err
	}
	out, _, err := r.encodeSealedExtent(buf[:0], k, x, flat)
	return out, err
}

// layerBuild is a layer under construction (BeginLayer): its files exist
// under stem, which no chain record lists yet.
type layerBuild struct {
	id    string
	pos   int
	stem  string
	size  uint64 // the replica's size when it began
	files layerFiles
	m     *layer.BuildMap
}

// BeginLayer starts building snapshot id's layer, to be published at
// position pos of the chain (0: the bottom; at most the head's position).
// A build of the same layer at the same position, begun earlier and not
// published, is kept (resumed); any other is thrown away. The build holds
// no block yet.
func (r *Replica) BeginLayer(epoch uint64, id string, pos uint64) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	if !layer.ValidID(id) {
		return fmt.Errorf("replica %s: %w: layer id %q", r.id, ErrInvalidArgument, id)
	}
	if pos > uint64(r.chain.Head()) {
		return fmt.Errorf("replica %s: %w: position %d, the head is at %d", r.id, ErrInvalidArgument, pos, r.chain.Head())
	}
	r.buildMu.Lock()
	defer r.buildMu.Unlock()
	if b := r.build; b != nil && b.id == id && b.pos == int(pos) && b.size == r.size {
		return nil
	}
	r.discardBuild()
	stem := layer.NewStem()
	b := &layerBuild{id: id, pos: int(pos), stem: stem, size: r.size}
	path := func(kind string) string { return filepath.Join(r.dir, stem+"."+kind) }
	err := r.makeHeadFiles(stem) // an empty data file, and sums if the replica keeps them
	if err == nil {
		b.m, err = layer.CreateBuildMap(r.dir, stem, r.size)
	}
	if err == nil {
		b.files.data, err = openData(path(dataFileName))
	}
	if err == nil && r.sums != nil {
		b.files.sums, err = os.OpenFile(path(sumsFileName), os.O_RDWR, 0)
	}
	if err != nil {
		b.close()
		removeBuildFiles(r.dir, stem)
		return fmt.Errorf("replica %s: begin layer %s: %w", r.id, id, err)
	}
	r.build = b
	return nil
}

func (b *layerBuild) close() {
	_ = b.files.close() // only read or written; the files are strays now
	b.files = layerFiles{}
	if b.m != nil {
		_ = b.m.Close()
		b.m = nil
	}
}

func removeBuildFiles(dir, stem string) {
	for _, kind := range append([]string{"map"}, layerKinds...) {
		_ = os.Remove(filepath.Join(dir, stem+"."+kind)) // what is left, the next open removes
	}
}

// discardBuild throws away the layer under construction, if any. Callers
// hold buildMu (or the replica to themselves).
func (r *Replica) discardBuild() {
	if r.build == nil {
		return
	}
	r.build.close()
	removeBuildFiles(r.dir, r.build.stem)
	r.build = nil
}

// buildFor returns the build of layer id. Callers hold epochMu (checked)
// and buildMu.
func (r *Replica) buildFor(id string, x uint64) (*layerBuild, error) {
	b := r.build
	if b == nil || b.id != id {
		return nil, fmt.Errorf("replica %s: %w: no layer %s under construction", r.id, ErrNotFound, id)
	}
	if b.size != r.size {
		return nil, fmt.Errorf("replica %s: %w: the replica grew since layer %s was begun; begin it again", r.id, ErrInvalidArgument, id)
	}
	if x >= r.extents {
		return nil, fmt.Errorf("replica %s: %w: extent %d, replica has %d", r.id, ErrOutOfRange, x, r.extents)
	}
	return b, nil
}

// WriteLayerExtent makes extent x of the layer id under construction hold
// exactly what enc (an extent encoding) says: its data blocks, verified
// against their sums (damage → ErrChecksum, nothing written), holes for
// its zero blocks and for the blocks it does not hold, and its map bits.
func (r *Replica) WriteLayerExtent(epoch uint64, id string, x uint64, enc []byte) error {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	r.buildMu.Lock()
	defer r.buildMu.Unlock()
	b, err := r.buildFor(id, x)
	if err != nil {
		return err
	}
	le, err := decodeLayerExtent(enc)
	if err != nil {
		return err
	}
	off, n := r.extentBounds(x)
	if le.n != n {
		return fmt.Errorf("replica %s: %w: an extent of %d bytes for extent %d of %d", r.id, ErrInvalidArgument, le.n, x, n)
	}
	// Check every data block before anything is written.
	type run struct{ j0, j1, d0 uint64 } // blocks [j0, j1), their data from d0
	var runs []run
	var d, s uint64
	for j := range le.blocks {
		if !bit(le.held, j) || bit(le.zero, j) {
			continue
		}
		blk := le.data[d : d+blockLen(n, j)]
		if want := binary.BigEndian.Uint32(le.sums[4*s:]); storedSum(blk) != want {
			return fmt.Errorf("replica %s: %w: block %d of extent %d of layer %s: sent with sum %#08x, data gives %#08x",
				r.id, ErrChecksum, j, x, id, want, storedSum(blk))
		}
		if len(runs) > 0 && runs[len(runs)-1].j1 == j {
			runs[len(runs)-1].j1++
		} else {
			runs = append(runs, run{j, j + 1, d})
		}
		d += uint64(len(blk))
		s++
	}
	// The whole extent is punched first (a resumed build may hold other
	// contents there), then the data blocks written.
	if err := punchFile(b.files.data, off, n); err != nil {
		return fmt.Errorf("replica %s: layer %s: %w", r.id, id, err)
	}
	vs := make([]uint32, le.blocks)
	s = 0
	for _, rn := range runs {
		lo, hi := rn.j0*SumBlockSize, min(n, rn.j1*SumBlockSize)
		if _, err := b.files.data.WriteAt(le.data[rn.d0:rn.d0+hi-lo], int64(off+lo)); err != nil {
			return fmt.Errorf("replica %s: layer %s: %w", r.id, id, err)
		}
	}
	for j := range le.blocks {
		if bit(le.held, j) && !bit(le.zero, j) {
			vs[j] = binary.BigEndian.Uint32(le.sums[4*s:])
			s++
		}
	}
	if b.files.sums != nil {
		if err := r.writeSumsIn(b.files, vs, off/SumBlockSize); err != nil {
			return err
		}
	}
	return b.m.Set(off/SumBlockSize, le.blocks, le.held)
}

// BuildSums returns the checksum of each extent [first, first+count) of
// the layer id under construction, as LayerSums does for a sealed layer
// (not cached: the build changes). The rebuilder copies only the extents
// whose sums differ from the source's, so a resumed build skips what it
// has, and extents the layer does not touch cost no copy.
func (r *Replica) BuildSums(epoch uint64, id string, first, count uint64) ([]uint32, error) {
	return r.eachExtentSum(first, count, func(x uint64) (uint32, error) { return r.buildExtentSum(epoch, id, x) })
}

func (r *Replica) buildExtentSum(epoch uint64, id string, x uint64) (uint32, error) {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if err := r.checkEpoch(epoch); err != nil {
		return 0, err
	}
	r.buildMu.Lock()
	defer r.buildMu.Unlock()
	b, err := r.buildFor(id, x)
	if err != nil {
		return 0, err
	}
	off, n := r.extentBounds(x)
	blocks := (n + SumBlockSize - 1) / SumBlockSize
	held := make([]byte, (blocks+7)/8)
	if err := b.m.Get(off/SumBlockSize, blocks, held); err != nil {
		return 0, fmt.Errorf("replica %s: layer %s: %w", r.id, id, err)
	}
	scratch := getBuf(int(n))
	defer putBuf(scratch)
	enc := getBuf(int(layerExtentMax(n)))
	defer putBuf(enc)
	out, err := encodeLayerExtent((*enc)[:0], *scratch, off, n, held, func(p []byte, o uint64) error {
		return r.readLayerRun(b.files, p, o)
	})
	if err != nil {
		return 0, err
	}
	return crc32.Checksum(out, castagnoli), nil
}

// SealLayer publishes the layer id under construction: its files are
// synced, then the chain record lists it at the position BeginLayer named
// (layer.Chain.Insert: the commit point), replacing a sealed layer with the
// same id. A layer inserted at the bottom of a replica whose head is its
// only layer gets a new, empty head: the head's view is the rebuilder's to
// restore, after the layers (see layer.Chain.Insert).
func (r *Replica) SealLayer(epoch uint64, id string) error {
	r.mergeMu.Lock() // no deletion moves data between positions meanwhile
	defer r.mergeMu.Unlock()
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	if err := r.checkEpoch(epoch); err != nil {
		return err
	}
	// The build is taken out of the replica (buildMu only for that: with
	// epochMu held exclusively no other build operation runs, and a
	// failure below closes the replica, which takes buildMu).
	r.buildMu.Lock()
	b := r.build
	if b == nil || b.id != id {
		r.buildMu.Unlock()
		return fmt.Errorf("replica %s: %w: no layer %s under construction", r.id, ErrNotFound, id)
	}
	r.build = nil
	r.buildMu.Unlock()
	if b.size != r.size {
		b.close()
		removeBuildFiles(r.dir, b.stem)
		return fmt.Errorf("replica %s: %w: the replica grew since layer %s was begun; begin it again", r.id, ErrInvalidArgument, id)
	}
	err := syncData(b.files.data)
	if err == nil && b.files.sums != nil {
		err = unix.Fdatasync(int(b.files.sums.Fd()))
	}
	if err == nil {
		err = b.m.Sync()
	}
	b.close()
	if err != nil {
		removeBuildFiles(r.dir, b.stem)
		return fmt.Errorf("replica %s: seal layer %s: %w", r.id, id, err)
	}
	before := r.chain.Entries()
	headReplaced, err := r.chain.Insert(b.pos, id, b.stem, r.makeHeadFiles)
	if err != nil {
		if errors.Is(err, layer.ErrReopen) {
			r.closed = true
			_ = r.closeFiles()
			return fmt.Errorf("replica %s: seal layer %s: %w (the replica is closed; open it again)", r.id, id, err)
		}
		removeBuildFiles(r.dir, b.stem)
		if errors.Is(err, layer.ErrInvalid) || errors.Is(err, layer.ErrTooManyLayers) {
			return fmt.Errorf("replica %s: seal layer %s: %w: %v", r.id, id, ErrInvalidArgument, err)
		}
		return fmt.Errorf("replica %s: seal layer %s: %w", r.id, id, err)
	}
	r.layerSums.drop(stemsOf(before[b.pos:]))
	return r.reopenLayers(before, headReplaced, "seal layer "+id)
}

func stemsOf(es []layer.Entry) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.Stem
	}
	return out
}

// reopenLayers makes the replica's open files match its chain after a
// change of the list of layers (before: the list as it was): the files of
// layers that stayed are kept, those of new layers opened, those of layers
// gone closed; a new head is opened in place of the old. If that fails the
// replica stops (its chain on disk is right; opening it again works).
// Callers hold epochMu exclusively.
func (r *Replica) reopenLayers(before []layer.Entry, headReplaced bool, op string) error {
	old := make(map[string]layerFiles, len(r.below))
	for i, lf := range r.below {
		old[before[i].Stem] = lf
	}
	r.below = nil
	var err error
	if headReplaced {
		hf := r.headFiles()
		r.dropHeadMap()
		r.data, r.sums, r.sumsMap = nil, nil, nil
		_ = hf.close() // its data went into no layer: the head is new and empty
	}
	es := r.chain.Entries()
	for i := range len(es) - 1 {
		if lf, ok := old[es[i].Stem]; ok {
			delete(old, es[i].Stem)
			r.below = append(r.below, lf)
			continue
		}
		lf, oerr := r.openLayerFiles(i)
		if oerr != nil {
			err = oerr
			break
		}
		r.below = append(r.below, lf)
	}
	for _, lf := range old {
		_ = lf.close() // a layer gone from the chain: its files are removed
	}
	if err == nil && headReplaced {
		err = r.openHead()
	}
	if err != nil {
		r.closed = true
		_ = r.closeFiles()
		return fmt.Errorf("replica %s: %s: done, but the layers cannot be opened (reopen the replica): %w", r.id, op, err)
	}
	return nil
}

// DropLayer takes snapshot id's layer out of the chain without merging it
// (layer.Chain.Drop): the layers above it show less afterwards, which the
// rebuilder then restores. For a replica being rebuilt, when its source no
// longer has the snapshot and the layer cannot be merged away
// (DeleteSnapshot refuses: its child is shared). A layer being deleted may
// be dropped too.
func (r *Replica) DropLayer(epoch uint64, id string) error {
	r.mergeMu.Lock()
	defer r.mergeMu.Unlock()
	r.epochMu.Lock()
	defer r.epochMu.Unlock()
	k, err := r.findLayer(epoch, id)
	if err != nil {
		return err
	}
	before := r.chain.Entries()
	if err := r.chain.Drop(k); err != nil {
		if errors.Is(err, layer.ErrReopen) {
			r.closed = true
			_ = r.closeFiles()
			return fmt.Errorf("replica %s: drop layer %s: %w (the replica is closed; open it again)", r.id, id, err)
		}
		return fmt.Errorf("replica %s: drop layer %s: %w", r.id, id, err)
	}
	r.layerSums.drop(stemsOf(before[k:]))
	return r.reopenLayers(before, false, "drop layer "+id)
}

// LayerExtentData is the number of data bytes an extent encoding carries
// (blocks held and not zero): what a rebuild moved for it. enc must be an
// encoding that ReadLayerExtent returned.
func LayerExtentData(enc []byte) uint64 {
	le, err := decodeLayerExtent(enc)
	if err != nil {
		return 0
	}
	return uint64(len(le.data))
}
