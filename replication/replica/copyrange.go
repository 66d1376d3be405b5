package replica

import (
	"errors"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// Moving a layer's data into another (a deletion's merge, a flatten:
// layers.go, flatten.go) uses what the file system offers, best first:
//
//   - FICLONERANGE: the target shares the source's extents (xfs with
//     reflink, btrfs). Nothing is copied, and the merge takes no extra
//     space for the blocks it moves, not even a step's worth.
//   - copy_file_range: the kernel copies, without the data passing through
//     this process (ext4 and every other file system).
//   - a read and a write, where neither works.
//
// With checksums the source's blocks are read and verified first, so that
// a block that fails its sum never travels silently; they are then cloned
// if the file system can, and otherwise written from what was read. A
// file system that refuses one of the calls is not asked again by this
// replica.

// moveStats counts the bytes moved each way, for tests and the log.
type moveStats struct {
	cloned, copied, written atomic.Uint64
	noClone, noCopy         atomic.Bool
}

// moveData makes [off, off+len(buf)) of to's data file hold what from's
// holds (buf is scratch of that length).
func (r *Replica) moveData(from, to layerFiles, buf []byte, off uint64) error {
	n := uint64(len(buf))
	verified := from.sums != nil
	// A compressed layer's files are not at the volume's offsets byte for
	// byte: only a read and a write move its data.
	pf, pt := plainFile(from.data), plainFile(to.data)
	inKernel := pf != nil && pt != nil
	if verified {
		if err := r.readCheckedIn(from, buf, off); err != nil {
			return err
		}
	}
	if inKernel && !r.moves.noClone.Load() {
		err := unix.IoctlFileCloneRange(int(pt.Fd()), &unix.FileCloneRange{
			Src_fd: int64(pf.Fd()), Src_offset: off, Src_length: n, Dest_offset: off})
		if err == nil {
			r.moves.cloned.Add(n)
			return nil
		}
		if unsupported(err) {
			r.moves.noClone.Store(true)
		}
	}
	if inKernel && !verified && !r.moves.noCopy.Load() {
		done, err := copyRange(pf, pt, off, n)
		if err == nil && done == n {
			r.moves.copied.Add(n)
			return nil
		}
		if unsupported(err) {
			r.moves.noCopy.Store(true)
		}
	}
	if !verified {
		if err := r.readFile(from.data, buf, off); err != nil {
			return err
		}
	}
	if _, err := to.data.WriteAt(buf, int64(off)); err != nil {
		return err
	}
	r.moves.written.Add(n)
	return nil
}

// copyRange copies [off, off+n) of from into to at the same offset with
// copy_file_range, and returns how much it copied: less than n when the
// source ends first (the caller then writes the rest).
func copyRange(from, to *os.File, off, n uint64) (uint64, error) {
	var done uint64
	for done < n {
		roff, woff := int64(off+done), int64(off+done)
		c, err := unix.CopyFileRange(int(from.Fd()), &roff, int(to.Fd()), &woff, int(n-done), 0)
		if err != nil {
			return done, err
		}
		if c == 0 {
			break // the source's end
		}
		done += uint64(c)
	}
	return done, nil
}

// unsupported reports whether err says the file system (or the kernel)
// cannot do the call at all, rather than not for this range.
func unsupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EXDEV) ||
		errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENOTSUP)
}
