// Package frontend holds what the two ways of presenting a volume to the
// kernel, the NBD server (driver/frontend/nbd) and the FUSE file server
// (driver/frontend/fuse), have in common: the storage they serve.
package frontend

import "context"

// Backend is the storage behind one exported volume: the engine
// (replication/engine) implements it.
//
// Its methods are called concurrently. Offsets and lengths are checked
// against Size before a call; a call with FUA set must not return until the
// data it wrote is durable. p is only valid during the call.
type Backend interface {
	// Size is the volume size in bytes; a frontend reads it once per
	// export (NBD: per connection; FUSE: when the file is added).
	Size() uint64
	ReadAt(ctx context.Context, p []byte, off uint64) error
	WriteAt(ctx context.Context, p []byte, off uint64, fua bool) error
	// Flush makes every write that has returned durable.
	Flush(ctx context.Context) error
	// Trim discards the range, which then reads as zeroes. NBD clients
	// may not rely on that, but the FUSE frontend does (the FUSE file's
	// punched holes must read as zeroes).
	Trim(ctx context.Context, off, length uint64) error
	// WriteZeroes makes the range read as zeroes.
	WriteZeroes(ctx context.Context, off, length uint64, fua bool) error
}
