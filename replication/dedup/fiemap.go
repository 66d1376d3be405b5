package dedup

import (
	"encoding/binary"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FIEMAP (linux/fiemap.h): the file system's map of a file's extents, with
// a flag on the ones whose blocks another file (or another place in the
// same file) also uses.
const (
	fsIocFiemap       = 0xC020660B
	fiemapFlagSync    = 0x1
	fiemapExtentLast  = 0x1
	fiemapExtentUnkn  = 0x2
	fiemapExtentDelay = 0x4
	fiemapExtentShare = 0x2000

	fiemapHeaderLen = 32
	fiemapExtentLen = 56
	fiemapBatch     = 256
)

// mapping is one extent of a file's FIEMAP.
type mapping struct {
	logical, physical, length uint64
	flags                     uint32
}

// fiemap returns the file system's extents of f that overlap [off,
// off+n), syncing f's dirty pages first when sync is set (a delayed
// allocation has no physical address yet).
func fiemap(f *os.File, off, n uint64, sync bool) ([]mapping, error) {
	buf := make([]byte, fiemapHeaderLen+fiemapBatch*fiemapExtentLen)
	var out []mapping
	end := off + n
	for off < end {
		clear(buf[:fiemapHeaderLen])
		binary.NativeEndian.PutUint64(buf[0:], off)
		binary.NativeEndian.PutUint64(buf[8:], end-off)
		if sync {
			binary.NativeEndian.PutUint32(buf[16:], fiemapFlagSync)
		}
		binary.NativeEndian.PutUint32(buf[24:], fiemapBatch)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			return nil, fmt.Errorf("fiemap %s: %w", f.Name(), errno)
		}
		got := binary.NativeEndian.Uint32(buf[20:])
		if got == 0 {
			break
		}
		last := false
		for i := range got {
			e := buf[fiemapHeaderLen+i*fiemapExtentLen:]
			m := mapping{
				logical:  binary.NativeEndian.Uint64(e[0:]),
				physical: binary.NativeEndian.Uint64(e[8:]),
				length:   binary.NativeEndian.Uint64(e[16:]),
				flags:    binary.NativeEndian.Uint32(e[40:]),
			}
			out = append(out, m)
			off = m.logical + m.length
			last = last || m.flags&fiemapExtentLast != 0
		}
		if last {
			break
		}
	}
	return out, nil
}

// Space is what a file takes on its file system.
type Space struct {
	// AllocatedBytes is the bytes of the file's extents.
	AllocatedBytes uint64
	// SharedBytes is the part of AllocatedBytes whose blocks another file,
	// or another offset of this one, uses too.
	SharedBytes uint64
}

// SpaceOf reads the extent map of the file at path.
func SpaceOf(path string) (Space, error) {
	f, err := os.Open(path)
	if err != nil {
		return Space{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return Space{}, err
	}
	ms, err := fiemap(f, 0, uint64(st.Size()), false)
	if err != nil {
		return Space{}, err
	}
	var s Space
	for _, m := range ms {
		s.AllocatedBytes += m.length
		if m.flags&fiemapExtentShare != 0 {
			s.SharedBytes += m.length
		}
	}
	return s, nil
}

// samePhysical reports whether [aOff, aOff+n) of a and [bOff, bOff+n) of b
// are already one set of blocks: each maps to a single known extent, at
// the same physical address.
func samePhysical(a *os.File, aOff uint64, b *os.File, bOff, n uint64) bool {
	pa, ok := physicalOf(a, aOff, n)
	if !ok {
		return false
	}
	pb, ok := physicalOf(b, bOff, n)
	return ok && pa == pb
}

// physicalOf is the physical address of [off, off+n) of f when one known
// extent maps all of it.
func physicalOf(f *os.File, off, n uint64) (uint64, bool) {
	ms, err := fiemap(f, off, n, false)
	if err != nil || len(ms) != 1 {
		return 0, false
	}
	m := ms[0]
	if m.flags&(fiemapExtentUnkn|fiemapExtentDelay) != 0 || m.logical > off || m.logical+m.length < off+n {
		return 0, false
	}
	return m.physical + (off - m.logical), true
}
