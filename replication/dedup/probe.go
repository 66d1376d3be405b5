package dedup

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Statfs magic numbers of the file systems a refusal names.
var fsNames = map[int64]string{
	0xEF53:     "ext4",
	0x58465342: "xfs",
	0x9123683E: "btrfs",
	0x01021994: "tmpfs",
	0x794C7630: "overlayfs",
	0x6969:     "nfs",
}

// FSName is the name of the file system dir is on ("unknown (0x…)" for one
// not listed).
func FSName(dir string) string {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return "unknown"
	}
	if n, ok := fsNames[int64(st.Type)]; ok {
		return n
	}
	return fmt.Sprintf("unknown (0x%x)", st.Type)
}

// ErrUnsupported is wrapped by Probe's answer for a data directory whose
// file system cannot share blocks between files.
var ErrUnsupported = errors.New("cannot share blocks between files")

// Probe reports whether files in dir can share blocks: it writes two small
// equal files there and asks the kernel to deduplicate them (the call a
// pass makes), then removes them. nil means yes; otherwise the error names
// the directory, its file system and the reason (wrapping ErrUnsupported
// when the file system does not support it).
func Probe(dir string) error {
	const n = 64 << 10
	fs := FSName(dir)
	buf := make([]byte, n)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	var files [2]*os.File
	for i := range files {
		f, err := os.CreateTemp(dir, ".dedup-probe-*")
		if err != nil {
			return fmt.Errorf("data directory %s (%s): %w", dir, fs, err)
		}
		defer os.Remove(f.Name())
		defer f.Close()
		if _, err := f.Write(buf); err != nil {
			return fmt.Errorf("data directory %s (%s): %w", dir, fs, err)
		}
		files[i] = f
	}
	arg := unix.FileDedupeRange{Src_offset: 0, Src_length: n,
		Info: []unix.FileDedupeRangeInfo{{Dest_fd: int64(files[1].Fd()), Dest_offset: 0}}}
	err := unix.IoctlFileDedupeRange(int(files[0].Fd()), &arg)
	switch {
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EXDEV):
		return fmt.Errorf("data directory %s (%s) %w: the file system has no shared extents (reflinks; xfs made with reflink=1, or btrfs, has them): %v",
			dir, fs, ErrUnsupported, err)
	case err != nil:
		return fmt.Errorf("data directory %s (%s): deduplication probe: %w", dir, fs, err)
	}
	if st := arg.Info[0].Status; st != unix.FILE_DEDUPE_RANGE_SAME || arg.Info[0].Bytes_deduped != n {
		return fmt.Errorf("data directory %s (%s) %w: the probe's equal files were not shared (status %d, %d bytes)",
			dir, fs, ErrUnsupported, st, arg.Info[0].Bytes_deduped)
	}
	return nil
}
