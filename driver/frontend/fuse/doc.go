// Package fuse is the "fuse" block frontend: the node agent serves one file
// per staged volume through FUSE and attaches a loop device to it with direct
// I/O and discard; /dev/loopN is then the volume's block device. It works on
// any Linux kernel with FUSE and loop, which is all some nodes have (no nbd,
// ublk, iSCSI or NVMe-TCP modules).
//
// How block requests reach the Backend (the engine):
//
//	block layer on /dev/loopN   loop driver (dio)        FUSE request   Backend
//	READ                        read_iter, IOCB_DIRECT   READ           ReadAt
//	WRITE                       write_iter, IOCB_DIRECT  WRITE          WriteAt(fua=false)
//	FLUSH (and FUA, see below)  vfs_fsync                FSYNC          Flush
//	DISCARD                     fallocate PUNCH_HOLE     FALLOCATE      Trim
//	WRITE_ZEROES, REQ_NOUNMAP   fallocate ZERO_RANGE     FALLOCATE      WriteZeroes
//	WRITE_ZEROES, may unmap     fallocate PUNCH_HOLE     FALLOCATE      Trim
//
// The loop driver advertises a volatile write cache without FUA, so the block
// layer turns a FUA write into a write followed by a FLUSH: durability requests
// from the filesystem reach the engine as Flush, which the engine sends to all
// healthy replicas. WriteAt is called with fua=true only for writes that carry
// O_DSYNC/O_SYNC semantics on the FUSE file itself (a process writing the file
// directly), which the kernel reports in the WRITE request's flags.
//
// Trim must leave the range reading as zeroes here, which is stricter than the
// NBD contract: the loop driver sends WRITE_ZEROES without REQ_NOUNMAP as a
// punch hole too, and a punched hole reads back as zeroes. The engine meets
// this (replicas punch holes in sparse files).
//
// Files are opened with FOPEN_DIRECT_IO, so the FUSE mount keeps no page cache
// of volume data: every byte lives in the engine. The mount negotiates
// asynchronous direct I/O (FUSE_ASYNC_DIO) and MaxBackground 128 so that the
// loop driver's queue depth reaches the engine as concurrent requests; without
// it the kernel serialises direct I/O per file and 4k QD32 IOPS halve.
package fuse
