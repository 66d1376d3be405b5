package nbd

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"time"
)

// ListenUnix listens on a unix socket at path, readable and writable by the
// owner only (0600). A socket file left behind by a process that is gone is
// removed first; a socket something still answers on, or a path that is not
// a socket, is an error rather than something to delete.
//
// The mode is set right after bind, so the socket's directory should not be
// writable or searchable by others (as under /run or the kubelet's plugin
// directory).
func ListenUnix(path string) (net.Listener, error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil:
		if fi.Mode()&fs.ModeSocket == 0 {
			return nil, fmt.Errorf("nbd: %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, 200*time.Millisecond); err == nil {
			_ = c.Close() // only probed for liveness; nothing was written
			return nil, fmt.Errorf("nbd: %s: a server is already listening", path)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("nbd: remove stale socket: %w", err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("nbd: %w", err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		_ = l.Close() // the chmod error is the one to report
		return nil, fmt.Errorf("nbd: %w", err)
	}
	return l, nil
}
