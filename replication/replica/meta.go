package replica

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"math/bits"

	"github.com/cairn-csi/cairn/internal/atomicfile"
)

// Geometry limits of a replica.
const (
	// DefaultExtentSize is the dirty-tracking and checksum granule used when
	// Open is given an extent size of 0 for a new replica.
	DefaultExtentSize = 4 << 20
	// MinExtentSize and MaxExtentSize bound the extent size, which must be a
	// power of two. MaxExtentSize keeps one extent within one reply frame.
	MinExtentSize = 4 << 10
	MaxExtentSize = 16 << 20
	// MaxExtents bounds the number of extents, so the dirty bitmap stays
	// small (2 MiB at most) and the meta file cheap to rewrite.
	MaxExtents = 1 << 24
	// SectorSize: a replica's size must be a multiple of it.
	SectorSize = 512
	// MaxIDLen is the longest replica id.
	MaxIDLen = 128
	// MaxGenerationLen is the longest replica generation.
	MaxGenerationLen = 64
)

const (
	dataFileName = "data"
	metaFileName = "meta"

	metaMagic uint32 = 0xCA1B3E7A
	// metaVersion is what encodeMeta writes. Version 1 had no generation;
	// decodeMeta still reads it (see openExisting).
	metaVersion uint16 = 2
	// metaFixedLen is the shortest meta record (version 1) without id,
	// bitmap and CRC.
	metaFixedLen = 4 + 2 + 2 + 6*8 + 2 + 4
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// metaState is everything a replica keeps in its meta file.
type metaState struct {
	ID string
	// Generation names this copy of the replica's data: drawn at random when
	// the replica is created and never changed, so a replica created again
	// under the same id (its directory lost) has another one. Empty only in
	// a decoded version-1 file.
	Generation string
	Size       uint64
	ExtentSize uint64
	// Epoch is the highest epoch the replica has accepted (Claim).
	Epoch uint64
	// CleanEpoch and CleanGeneration name the last clean point (MarkClean).
	CleanEpoch      uint64
	CleanGeneration uint64
	// Dirty has bit i set when extent i may have been written since the last
	// clean point.
	Dirty bitmap
}

// Meta file layout, big-endian:
//
//	magic u32 | version u16 | reserved u16 (0)
//	size u64 | extent size u64 | epoch u64 | clean epoch u64 | clean generation u64
//	extent count u64
//	id length u16 | id
//	generation length u8 | generation     (version 2 on; not in version 1)
//	bitmap length u32 | bitmap
//	CRC32C u32 of everything before it
//
// encodeMeta writes version 2; the generation must be set.
func encodeMeta(m *metaState) []byte {
	if validateGeneration(m.Generation) != nil {
		panic(fmt.Sprintf("BUG: replica %s: meta file without a valid generation (%q)", m.ID, m.Generation))
	}
	b := make([]byte, 0, metaFixedLen+len(m.ID)+1+len(m.Generation)+len(m.Dirty)+4)
	b = binary.BigEndian.AppendUint32(b, metaMagic)
	b = binary.BigEndian.AppendUint16(b, metaVersion)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint64(b, m.Size)
	b = binary.BigEndian.AppendUint64(b, m.ExtentSize)
	b = binary.BigEndian.AppendUint64(b, m.Epoch)
	b = binary.BigEndian.AppendUint64(b, m.CleanEpoch)
	b = binary.BigEndian.AppendUint64(b, m.CleanGeneration)
	b = binary.BigEndian.AppendUint64(b, extentCount(m.Size, m.ExtentSize))
	b = binary.BigEndian.AppendUint16(b, uint16(len(m.ID)))
	b = append(b, m.ID...)
	b = append(b, byte(len(m.Generation)))
	b = append(b, m.Generation...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(m.Dirty)))
	b = append(b, m.Dirty...)
	return binary.BigEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// decodeMeta parses a meta file of version 1 or 2 (a version-1 file gives an
// empty generation). Every failure wraps ErrCorrupt and says what is wrong;
// it never panics, whatever b holds.
func decodeMeta(b []byte) (metaState, error) {
	var m metaState
	bad := func(format string, args ...any) (metaState, error) {
		return metaState{}, fmt.Errorf("%w: meta file: %s", ErrCorrupt, fmt.Sprintf(format, args...))
	}
	if len(b) < metaFixedLen+4 {
		return bad("%d bytes, shorter than the %d-byte minimum", len(b), metaFixedLen+4)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if magic := binary.BigEndian.Uint32(body); magic != metaMagic {
		return bad("bad magic %#x", magic)
	}
	if got := crc32.Checksum(body, castagnoli); got != sum {
		return bad("checksum mismatch (stored %#x, computed %#x)", sum, got)
	}
	version := binary.BigEndian.Uint16(body[4:])
	if version != 1 && version != metaVersion {
		return bad("unsupported version %d", version)
	}
	if r := binary.BigEndian.Uint16(body[6:]); r != 0 {
		return bad("reserved field is %#x, want 0", r)
	}
	p := body[8:]
	m.Size = binary.BigEndian.Uint64(p)
	m.ExtentSize = binary.BigEndian.Uint64(p[8:])
	m.Epoch = binary.BigEndian.Uint64(p[16:])
	m.CleanEpoch = binary.BigEndian.Uint64(p[24:])
	m.CleanGeneration = binary.BigEndian.Uint64(p[32:])
	count := binary.BigEndian.Uint64(p[40:])
	p = p[48:]
	if err := validateGeometry(m.Size, m.ExtentSize); err != nil {
		return bad("%v", err)
	}
	if want := extentCount(m.Size, m.ExtentSize); count != want {
		return bad("extent count %d, want %d for size %d", count, want, m.Size)
	}
	idLen := int(binary.BigEndian.Uint16(p))
	p = p[2:]
	if idLen > len(p) {
		return bad("id length %d beyond the end of the file", idLen)
	}
	m.ID = string(p[:idLen])
	p = p[idLen:]
	if err := validateID(m.ID); err != nil {
		return bad("%v", err)
	}
	if version >= 2 {
		if len(p) < 1 {
			return bad("truncated before the generation")
		}
		genLen := int(p[0])
		p = p[1:]
		if genLen > len(p) {
			return bad("generation length %d beyond the end of the file", genLen)
		}
		m.Generation = string(p[:genLen])
		p = p[genLen:]
		if err := validateGeneration(m.Generation); err != nil {
			return bad("%v", err)
		}
	}
	if len(p) < 4 {
		return bad("truncated before the dirty bitmap")
	}
	bmLen := uint64(binary.BigEndian.Uint32(p))
	p = p[4:]
	if want := bitmapLen(count); bmLen != want {
		return bad("dirty bitmap of %d bytes, want %d", bmLen, want)
	}
	if uint64(len(p)) != bmLen {
		return bad("%d bytes after the dirty bitmap header, want %d", len(p), bmLen)
	}
	m.Dirty = bitmap(append([]byte(nil), p...))
	if m.Dirty.hasBitsFrom(count) {
		return bad("dirty bitmap has bits beyond extent %d", count)
	}
	return m, nil
}

// validateGeometry checks a replica's size and extent size.
func validateGeometry(size, extentSize uint64) error {
	switch {
	case size == 0 || size%SectorSize != 0:
		return fmt.Errorf("%w: size %d is not a positive multiple of %d", ErrInvalidArgument, size, SectorSize)
	case extentSize < MinExtentSize || extentSize > MaxExtentSize || bits.OnesCount64(extentSize) != 1:
		return fmt.Errorf("%w: extent size %d is not a power of two in [%d, %d]", ErrInvalidArgument, extentSize, MinExtentSize, MaxExtentSize)
	case extentCount(size, extentSize) > MaxExtents:
		return fmt.Errorf("%w: size %d with extent size %d gives more than %d extents", ErrInvalidArgument, size, extentSize, MaxExtents)
	}
	return nil
}

// validateID accepts 1–MaxIDLen characters from [A-Za-z0-9._-], starting with
// a letter or digit: safe as a file name, never "." or "..", never hidden.
func validateID(id string) error {
	if len(id) == 0 || len(id) > MaxIDLen {
		return fmt.Errorf("%w: replica id must be 1-%d characters, got %d", ErrInvalidArgument, MaxIDLen, len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return fmt.Errorf("%w: replica id %q: only [A-Za-z0-9._-] allowed, starting with a letter or digit", ErrInvalidArgument, id)
		}
	}
	return nil
}

// validateGeneration accepts 1–MaxGenerationLen characters from
// [A-Za-z0-9._-]; newGeneration makes 32 lowercase hex digits.
func validateGeneration(g string) error {
	if len(g) == 0 || len(g) > MaxGenerationLen {
		return fmt.Errorf("%w: generation must be 1-%d characters, got %d", ErrInvalidArgument, MaxGenerationLen, len(g))
	}
	for i := 0; i < len(g); i++ {
		c := g[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("%w: generation %q: only [A-Za-z0-9._-] allowed", ErrInvalidArgument, g)
		}
	}
	return nil
}

// newGeneration draws a generation: 128 random bits as hex, so that two
// copies made under the same replica id never share one.
func newGeneration() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (it crashes the program instead)
	return hex.EncodeToString(b[:])
}

func extentCount(size, extentSize uint64) uint64 {
	if extentSize == 0 {
		return 0
	}
	return size/extentSize + min(size%extentSize, 1)
}

func bitmapLen(extents uint64) uint64 { return (extents + 7) / 8 }

// bitmap is a set of extent indexes: bit i%8 of byte i/8 stands for extent i.
type bitmap []byte

func (b bitmap) has(i uint64) bool { return b[i/8]&(1<<(i%8)) != 0 }
func (b bitmap) set(i uint64)      { b[i/8] |= 1 << (i % 8) }

// hasAll reports whether every extent in [first, last] is in the set.
func (b bitmap) hasAll(first, last uint64) bool {
	for i := first; i <= last; i++ {
		if !b.has(i) {
			return false
		}
	}
	return true
}

// hasBitsFrom reports whether any bit at index >= n is set.
func (b bitmap) hasBitsFrom(n uint64) bool {
	if n/8 >= uint64(len(b)) {
		return false
	}
	if b[n/8]>>(n%8) != 0 {
		return true
	}
	for _, x := range b[n/8+1:] {
		if x != 0 {
			return true
		}
	}
	return false
}

func (b bitmap) count() uint64 {
	var n int
	for _, x := range b {
		n += bits.OnesCount8(x)
	}
	return uint64(n)
}

// list returns up to max members >= from in ascending order (max <= 0: all).
func (b bitmap) list(from uint64, max int) []uint64 {
	out := []uint64{}
	for byteIdx := from / 8; byteIdx < uint64(len(b)); byteIdx++ {
		x := b[byteIdx]
		for x != 0 {
			bit := uint64(bits.TrailingZeros8(x))
			x &= x - 1
			i := byteIdx*8 + bit
			if i < from {
				continue
			}
			if max > 0 && len(out) == max {
				return out
			}
			out = append(out, i)
		}
	}
	return out
}

func (b bitmap) clone() bitmap { return append(bitmap(nil), b...) }

// writeFileAtomic replaces dir/name with data so that after a crash the file
// holds either its old or its new content: write a temporary file, fsync it,
// rename it over the old one and fsync the directory.
func writeFileAtomic(dir, name string, data []byte) error {
	return atomicfile.Write(dir, name, data)
}

// syncDir makes a directory's entries (creations, renames, removals) durable.
func syncDir(dir string) error { return atomicfile.SyncDir(dir) }
