// Package atomicfile replaces small files so that a crash leaves either the
// old contents or the new, never a mix: the new contents go to a temporary
// file that is synced and then renamed over the old one, and the directory
// is synced so the rename itself survives a power loss.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write replaces dir/name with data. A leftover dir/name.tmp from an
// interrupted Write is harmless and is overwritten by the next one.
func Write(dir, name string, data []byte) error {
	tmp := filepath.Join(dir, name+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close() // the write error is the one to report
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return err
	}
	return SyncDir(dir)
}

// SyncDir makes a directory's entries (creations, renames, removals) durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	if err := d.Sync(); err != nil {
		_ = d.Close() // read-only handle: nothing written through it
		return err
	}
	return d.Close()
}

// CreateSized creates a new file at path (it must not exist) of size bytes,
// sparse, and syncs it: after a crash it exists with that size or not at
// all once its directory is synced.
func CreateSized(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close() // the truncate error is the one to report
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}
