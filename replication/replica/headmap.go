package replica

import (
	"fmt"
	"runtime/debug"

	"golang.org/x/sys/unix"
)

// Small writes into one block, through a mapping of the head's data file.
//
// A write that covers a checksum block in part must read the rest of the
// block, check it against its stored sum and store the sum of the merged
// block (newSums). Through pread and pwrite that is two system calls more
// than the write itself, and on an encrypted volume every write carries
// one: the 32-byte entries of its blocks go into their group's metadata
// block (replication/crypt). In a CPU profile of 4 KiB random writes at
// QD32 on a 3-replica encrypted volume, that pread and the entries' pwrite
// were a sixth of each replica's CPU. Through a shared mapping of the data
// file the read is a copy from memory and the write a store, as for the
// sums (readSumsMapped): the page cache is the same, so pread, pwrite,
// fdatasync and the mapping all see one file.
//
// The mapping belongs to one data file: a snapshot or a rebuild's layer
// replaces the head's files, and a grow makes the file longer, each with
// epochMu held exclusively, and each drops the mapping (dropHeadMap) so
// that no write ever lands in the file of a sealed layer. headMapping
// checks the file and the length again before every use. It is made on the
// first small write and only for a replica without layers (with layers a
// write covering a block in part is widened to whole blocks: widen).

// headMapMaxSize bounds the replicas whose data file is mapped. A
// page-table page, once filled in for a mapping, stays until munmap, even
// after the file's pages left the page cache: an encrypted volume writes
// entries into one block per 516 KiB, so its mapping may in time hold
// 1/512 of the volume's size in page tables, charged to the node agent
// (32 MiB for 16 GiB; 2 GiB for 1 TiB). Larger replicas keep pread and
// pwrite. Making the mapping again every so often would bound them too,
// but costs more than it saves: every write after it takes two page
// faults (measured: 4k random writes at QD32 on an encrypted volume fell
// from 0.88 to 0.54 of a plain one with a new mapping every 1024 writes).
const headMapMaxSize = 16 << 30

// headMap is a mapping of the head's data file (replica.go: headMap).
type headMap struct {
	f      dataFile // the data file mapped
	m      []byte   // [0, len(m)) of f, shared and writable
	failed bool     // mmap failed for f: use pread and pwrite
}

// inOneBlockInPart reports whether [off, off+n) lies inside one checksum
// block without covering it whole (n > 0; size is the replica's).
func inOneBlockInPart(off, n, size uint64) bool {
	bo := off / SumBlockSize * SumBlockSize
	be := min(bo+SumBlockSize, size)
	return off+n <= be && (off != bo || off+n != be)
}

// headMapping returns a mapping of the head's whole data file, or nil when
// there is none (layers, a compressed head, or mmap failed): the caller
// then uses pread and pwrite. Callers hold epochMu shared.
func (r *Replica) headMapping() []byte {
	if r.layered() || plainFile(r.data) == nil || r.size > headMapMaxSize {
		return nil
	}
	r.headMu.Lock()
	defer r.headMu.Unlock()
	hm := &r.headMap
	if hm.f == r.data {
		// Shorter than the replica: made before a grow that did not drop
		// it. Another write of this hold may be using it, so it stays.
		if hm.failed || uint64(len(hm.m)) < r.size {
			return nil
		}
		return hm.m
	}
	// None yet, or a stale one the swap forgot to drop (the swaps hold
	// epochMu exclusively, so nothing uses it now).
	r.unmapHeadLocked()
	hm.f = r.data
	m, err := unix.Mmap(int(plainFile(r.data).Fd()), 0, int(r.size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		hm.failed = true
		return nil
	}
	hm.m = m
	return m
}

// dropHeadMap unmaps the head's data file. Callers hold epochMu
// exclusively (no write uses the mapping) and call it whenever the head's
// data file is replaced, grows or closes.
func (r *Replica) dropHeadMap() {
	r.headMu.Lock()
	defer r.headMu.Unlock()
	r.unmapHeadLocked()
}

func (r *Replica) unmapHeadLocked() {
	if r.headMap.m != nil {
		_ = unix.Munmap(r.headMap.m) // only fails on a bad address
	}
	r.headMap = headMap{}
}

// writeInBlock is writeData for a write of p at off that lies inside one
// block of a replica with checksums and covers it in part, through the
// mapping m of the head's data file: the block is read from m and checked
// against its stored sum (a corrupt block is not given a new valid sum:
// ErrChecksum, and nothing is written), the extent is marked dirty, then p
// is stored into m and the merged block's sum into the sums. Only p's bytes
// are stored, never the rest of the block as read. A page of the mapping
// that cannot be read or made writable (an I/O error, a full disk) faults;
// the fault becomes the error.
func (r *Replica) writeInBlock(m []byte, p []byte, off uint64) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer r.onHeadFault(off, len(p), &err)
	bo := off / SumBlockSize * SumBlockSize
	be := min(bo+SumBlockSize, r.size)
	var want [1]uint32
	if err := r.readSums(want[:], bo/SumBlockSize); err != nil {
		return err
	}
	buf := getBuf(int(be - bo))
	defer putBuf(buf)
	b := *buf
	copy(b, m[bo:be])
	if err := r.checkBlocks(b, bo, want[:]); err != nil {
		return err
	}
	copy(b[off-bo:], p)
	sum := [1]uint32{storedSum(b)}
	if err := r.markDirty(r.extentsOf(off, uint64(len(p)))); err != nil {
		return err
	}
	copy(m[off:], p)
	return r.writeSums(sum[:], bo/SumBlockSize)
}

// onHeadFault, deferred with SetPanicOnFault on, recovers a memory fault on
// the mapped data file into *err. Any other panic is a bug and goes on.
func (r *Replica) onHeadFault(off uint64, n int, err *error) {
	p := recover()
	if p == nil {
		return
	}
	if _, fault := p.(interface{ Addr() uintptr }); !fault {
		panic(p)
	}
	*err = fmt.Errorf("replica %s: write %d bytes at %d: fault on the mapped data file (the disk failed, or is full): %v", r.id, n, off, p)
}
