// Package dedup shares identical extents of files on one filesystem: the
// background deduplication pass of a node's data directory
// (docs/deduplication.md).
//
// A pass has two phases.
//
//  1. Hash. Every ExtentSize-aligned extent that holds data (SEEK_DATA and
//     SEEK_HOLE skip the holes; all-zero extents are skipped too) is read
//     and hashed with SHA-256. A record of 28 bytes (the first 16 bytes of
//     the hash, the file's index, the offset) is appended to one of Buckets
//     bucket files in the work directory, chosen by the hash's first byte.
//  2. Share. Each bucket file is read whole, sorted by hash, and every
//     extent whose hash equals an earlier one's is handed to the kernel's
//     FIDEDUPERANGE against that earlier extent. The kernel locks both
//     files, compares the two ranges byte by byte and shares the blocks
//     only if they are equal, so a hash collision, or a write that changed
//     an extent after it was hashed, shares nothing. Writes after that land
//     in the file system's copy on write: a shared extent is never changed
//     under another file.
//
// Memory is bounded by one bucket, not by the node: 1/Buckets of the
// records. A 1 TiB data directory full of data has 16 Mi extents of 64 KiB,
// 448 MiB of records on disk, and 1.75 MiB of records in memory at a time.
//
// The index is a hint, never a source of truth: a lost or stale record
// costs a missed share or a compare that fails, never data. That is why
// the bucket files are not synced. A checkpoint (progress.json, replaced
// atomically) records where the pass is, so a pass killed midway resumes
// where its last checkpoint was.
package dedup
