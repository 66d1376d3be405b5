package dataplane

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/replica"
)

// replicaPattern reads one replica directly from its replica server, at the
// replica's own epoch (reading changes nothing and fences nobody), and
// counts the blocks whose header names a write of pattern.
func replicaPattern(t *testing.T, addr, id string, size uint64, pattern byte, opts ...replica.DialOption) int {
	t.Helper()
	n, err := scanReplica(addr, id, size, pattern, opts...)
	if err != nil {
		t.Fatalf("replica %s: %v", id, err)
	}
	return n
}

// scanReplica counts the blocks of replica id at addr whose header names
// pattern.
func scanReplica(addr, id string, size uint64, pattern byte, opts ...replica.DialOption) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rc, err := replica.Dial(ctx, addr, id, size, opts...)
	if err != nil {
		return 0, fmt.Errorf("dial at %s: %w", addr, err)
	}
	defer rc.Close()
	// The replica may be claimed at a newer epoch while it is read (a
	// rebuild starting): then the read is fenced, and the scan starts over
	// at the replica's new epoch.
	for attempt := 0; ; attempt++ {
		info, err := rc.Info(ctx)
		if err != nil {
			return 0, fmt.Errorf("info: %w", err)
		}
		n, err := scanPattern(ctx, rc, info.Epoch, size, pattern)
		if errors.Is(err, replica.ErrFenced) && attempt < 10 {
			continue
		}
		return n, err
	}
}

// scanPattern counts the blocks of rc whose header names pattern.
func scanPattern(ctx context.Context, rc *replica.Client, epoch, size uint64, pattern byte) (int, error) {
	n := 0
	buf := make([]byte, 1<<20)
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		if err := rc.ReadAt(ctx, epoch, buf, off); err != nil {
			return 0, fmt.Errorf("read at %d: %w", off, err)
		}
		for i := 0; i < len(buf); i += blockSize {
			if id := binary.BigEndian.Uint64(buf[i:]); id != 0 && patternOf(id) == pattern {
				n++
			}
		}
	}
	return n, nil
}
