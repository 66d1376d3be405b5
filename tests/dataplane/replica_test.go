package dataplane

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/replica"
)

// replicaPattern reads one replica directly from its replica server, at the
// replica's own epoch (reading changes nothing and fences nobody), and
// counts the blocks whose header names a write of pattern.
func replicaPattern(t *testing.T, addr, id string, size uint64, pattern byte) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rc, err := replica.Dial(ctx, addr, id, size)
	if err != nil {
		t.Fatalf("dial replica %s at %s: %v", id, addr, err)
	}
	defer rc.Close()
	info, err := rc.Info(ctx)
	if err != nil {
		t.Fatalf("replica %s: info: %v", id, err)
	}
	n := 0
	buf := make([]byte, 1<<20)
	for off := uint64(0); off < size; off += uint64(len(buf)) {
		if err := rc.ReadAt(ctx, info.Epoch, buf, off); err != nil {
			t.Fatalf("replica %s: read at %d: %v", id, off, err)
		}
		for i := 0; i < len(buf); i += blockSize {
			if id := binary.BigEndian.Uint64(buf[i:]); id != 0 && patternOf(id) == pattern {
				n++
			}
		}
	}
	return n
}
