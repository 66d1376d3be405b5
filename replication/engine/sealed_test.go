package engine

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// createEncrypted records an encrypted volume of size bytes (3 replicas),
// creates its replicas at their size and attaches it to n1. It returns
// the volume and its data key.
func (r *rig) createEncrypted(name string, size uint64) (*meta.Volume, []byte) {
	r.t.Helper()
	w, key, err := crypt.NewDataKey([]byte("a passphrase"))
	if err != nil {
		r.t.Fatal(err)
	}
	cv := &meta.CreateVolume{ID: "vol-" + name, Name: name, SizeBytes: size, Replicas: 3,
		Parameters: map[string]string{"encryption": crypt.Cipher}, Encryption: w}
	res, err := r.meta.Apply(r.ctx(), meta.CreateCommand(cv))
	if err != nil {
		r.t.Fatal(err)
	}
	for _, rep := range res.Volume.Replicas {
		if _, err := r.servers[rep.Node].srv.CreateWith(rep.ID, res.Volume.ReplicaBytes(), replica.CreateOptions{Checksums: r.checksums}); err != nil {
			r.t.Fatal(err)
		}
	}
	return r.attach(res.Volume.ID, "n1"), key
}

func (r *rig) openSealed(id string, key []byte) (*Engine, error) {
	return r.openSealedWrapped(id, key, nil)
}

// openSealedWrapped opens the engine on n1 with key. It waits for a slow
// replica up to IOTimeout (no replica deadline): these tests count what
// reaches the replicas, and a loaded machine must not eject one.
func (r *rig) openSealedWrapped(id string, key []byte, wrap func(meta.Replica, replicaConn) replicaConn) (*Engine, error) {
	e, err := Open(r.ctx(), Config{VolumeID: id, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 10 * time.Second,
		ReplicaDeadline: -1, CleanInterval: time.Hour, DataKey: key, wrapConn: wrap})
	if err == nil {
		r.t.Cleanup(func() { _ = e.Close(context.Background()) })
	}
	return e, err
}

// physContents reads a replica's whole bytes (ciphertext and entries).
func (r *rig) physContents(v *meta.Volume, rep meta.Replica) []byte {
	r.t.Helper()
	rr, err := r.servers[rep.Node].srv.Get(rep.ID)
	if err != nil {
		r.t.Fatal(err)
	}
	buf := make([]byte, v.ReplicaBytes())
	if err := rr.ReadAt(rr.Epoch(), buf, 0); err != nil {
		r.t.Fatal(err)
	}
	return buf
}

// TestEncryptedVolume: an encrypted volume reads back every write, whole or
// in part of a block, across group boundaries, trims and restarts; its
// replicas hold no plaintext; it does not open without its key, and then
// claims nothing.
func TestEncryptedVolume(t *testing.T) {
	r := newRig(t, 3)
	const size = 4 * mib
	v, key := r.createEncrypted("enc", size)
	if v.ReplicaBytes() != crypt.PhysicalSize(size) || v.ReplicaBytes() <= size {
		t.Fatalf("replica bytes %d for %d", v.ReplicaBytes(), size)
	}

	epoch := v.Epoch
	if _, err := r.openSealed(v.ID, nil); !errors.Is(err, ErrNeedsKey) {
		t.Fatalf("open without the key: %v, want ErrNeedsKey", err)
	}
	if after, _ := r.meta.Volume(r.ctx(), v.ID); after.Epoch != epoch {
		t.Fatalf("an open without the key moved the epoch from %d to %d", epoch, after.Epoch)
	}

	e, err := r.openSealed(v.ID, key)
	if err != nil {
		t.Fatal(err)
	}
	if e.Size() != size {
		t.Fatalf("size %d, want the logical %d", e.Size(), size)
	}
	ctx := r.ctx()
	model, write := r.modelWriter(e, size, 7)
	pattern := bytes.Repeat([]byte("CAIRN-PLAINTEXT!"), 64<<10/16)
	if err := e.WriteAt(ctx, pattern, 1*mib, false); err != nil {
		t.Fatal(err)
	}
	copy(model[1*mib:], pattern)
	for _, w := range []struct {
		off uint64
		n   int
	}{
		{0, 4096}, {512, 512}, {4096*127 - 100, 9000}, {4096 * 128, 4096 * 300}, {size - 700, 700}, {3 * mib, 1 << 20}, {12345, 1},
	} {
		write(w.off, w.n)
	}
	check := func(e *Engine, what string) {
		t.Helper()
		got := make([]byte, size)
		if err := e.ReadAt(ctx, got, 0); err != nil {
			t.Fatalf("%s: read: %v", what, err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("%s: the volume does not read back what was written", what)
		}
		for _, n := range []struct{ off, n uint64 }{{511, 3000}, {4096*128 - 10, 20}, {size - 1, 1}} {
			p := make([]byte, n.n)
			if err := e.ReadAt(ctx, p, n.off); err != nil || !bytes.Equal(p, model[n.off:n.off+n.n]) {
				t.Fatalf("%s: read %d+%d: %v", what, n.off, n.n, err)
			}
		}
	}
	check(e, "after writes")

	// Trims and zeroes, whole blocks and parts of them, read as zeroes.
	if err := e.Trim(ctx, 4096*2+100, 4096*3); err != nil {
		t.Fatal(err)
	}
	clear(model[4096*2+100 : 4096*5+100])
	if err := e.WriteZeroes(ctx, 3*mib+10, 4096*130, false); err != nil {
		t.Fatal(err)
	}
	clear(model[3*mib+10 : 3*mib+10+4096*130])
	check(e, "after trims")

	v = r.healthyIdentical(v.ID, nil)
	for _, rep := range v.Replicas {
		if phys := r.physContents(v, rep); bytes.Contains(phys, []byte("CAIRN-PLAINTEXT!")) {
			t.Fatalf("replica %s holds plaintext", rep.ID)
		}
	}
	leaseOf := func(b uint64) uint64 {
		entry := r.physContents(v, v.Replicas[0])[crypt.EntryOffset(b):][:crypt.EntrySize]
		return binary.BigEndian.Uint64(append([]byte{0, 0, 0}, entry[:5]...))
	}
	first := leaseOf(0)

	// A restart takes a new lease: the nonces of new writes differ.
	if err := e.Close(ctx); err != nil {
		t.Fatal(err)
	}
	e2, err := r.openSealed(v.ID, key)
	if err != nil {
		t.Fatal(err)
	}
	check(e2, "after a restart")
	model, write = r.modelWriterOver(e2, model, 8)
	write(0, 4096)
	if second := leaseOf(0); first == 0 || second <= first {
		t.Fatalf("nonce leases %d then %d: want a new, larger one after the restart", first, second)
	}
	check(e2, "after a write past the restart")
}

// TestEncryptedTamperRepaired: a block whose ciphertext was changed on a
// replica (with a valid checksum) fails authentication; the read
// returns the data from a replica whose copy authenticates and the bad copy
// is rewritten. A block changed on every replica fails with ErrIO and marks
// the volume abnormal.
func TestEncryptedTamperRepaired(t *testing.T) {
	r := newRig(t, 3)
	// With block checksums, as volumes have by default: the changes below
	// are made through the replicas, which store valid sums for them, so
	// only the authentication can catch them.
	r.checksums = true
	v, key := r.createEncrypted("tamper", 2*mib)
	e, err := r.openSealed(v.ID, key)
	if err != nil {
		t.Fatal(err)
	}
	ctx := r.ctx()
	model, write := r.modelWriter(e, 2*mib, 3)
	write(0, 2*mib)
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	flip := func(rep meta.Replica, b uint64) {
		t.Helper()
		rr, err := r.servers[rep.Node].srv.Get(rep.ID)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 1)
		off := crypt.DataOffset(b) + 77
		if err := rr.ReadAt(rr.Epoch(), p, off); err != nil {
			t.Fatal(err)
		}
		p[0] ^= 0x40
		if err := rr.WriteAt(rr.Epoch(), p, off, false); err != nil {
			t.Fatal(err)
		}
	}
	// Every replica but one has block 9 changed: whichever the engine
	// reads first, it fails, and the one good copy serves and repairs.
	for _, rep := range v.Replicas[:2] {
		flip(rep, 9)
	}
	before := r.physContents(v, v.Replicas[2])
	repairs := testutil.ToFloat64(metricSealRepairs.WithLabelValues(v.ID))
	got := make([]byte, 4096)
	if err := e.ReadAt(ctx, got, 9*4096); err != nil || !bytes.Equal(got, model[9*4096:10*4096]) {
		t.Fatalf("read of a tampered block: %v (right data %v)", err, bytes.Equal(got, model[9*4096:10*4096]))
	}
	r.healthyIdentical(v.ID, nil)
	if after := r.physContents(v, v.Replicas[2]); !bytes.Equal(before, after) {
		t.Fatal("the good copy changed")
	}
	if n := testutil.ToFloat64(metricSealRepairs.WithLabelValues(v.ID)) - repairs; n != 2 {
		t.Fatalf("cairn_engine_decrypt_repairs_total rose by %v, want 2 (two replicas rewritten)", n)
	}

	// Changed everywhere: EIO, never wrong data, and the condition says so.
	for _, rep := range v.Replicas {
		flip(rep, 20)
	}
	lost := testutil.ToFloat64(metricSealUnrecoverable.WithLabelValues(v.ID))
	if err := e.ReadAt(ctx, got, 20*4096); !errors.Is(err, ErrIO) {
		t.Fatalf("read of a block changed on every replica: %v, want ErrIO", err)
	}
	if n := testutil.ToFloat64(metricSealUnrecoverable.WithLabelValues(v.ID)) - lost; n != 1 {
		t.Fatalf("cairn_engine_decrypt_unrecoverable_total rose by %v, want 1", n)
	}
	if vv, _ := r.meta.Volume(ctx, v.ID); vv.Condition == nil || !vv.Condition.Abnormal {
		t.Fatalf("condition %+v, want abnormal", vv.Condition)
	}
	// A block moved to another address fails too: copy block 30's
	// ciphertext and entry over block 31's on every replica.
	for _, rep := range v.Replicas {
		rr, _ := r.servers[rep.Node].srv.Get(rep.ID)
		data, entry := make([]byte, 4096), make([]byte, crypt.EntrySize)
		_ = rr.ReadAt(rr.Epoch(), data, crypt.DataOffset(30))
		_ = rr.ReadAt(rr.Epoch(), entry, crypt.EntryOffset(30))
		_ = rr.WriteAt(rr.Epoch(), data, crypt.DataOffset(31), false)
		_ = rr.WriteAt(rr.Epoch(), entry, crypt.EntryOffset(31), false)
	}
	if err := e.ReadAt(ctx, got, 31*4096); !errors.Is(err, ErrIO) {
		t.Fatalf("read of a block moved from another address: %v, want ErrIO", err)
	}
}

// modelWriterOver is modelWriter over an existing model.
func (r *rig) modelWriterOver(e *Engine, model []byte, seed uint64) ([]byte, func(off uint64, n int)) {
	m, write := r.modelWriter(e, uint64(len(model)), seed)
	copy(m, model)
	return m, write
}

// countingConn counts the writes that reach a replica, by kind.
type countingConn struct {
	replicaConn
	plain, pairs *atomic.Int64
}

func (c *countingConn) WriteAt(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool) error {
	c.plain.Add(1)
	return c.replicaConn.WriteAt(ctx, epoch, p, off, fua)
}

func (c *countingConn) WriteAtSums(ctx context.Context, epoch uint64, p []byte, off uint64, fua bool, pieces []uint32) error {
	c.plain.Add(1)
	return c.replicaConn.WriteAtSums(ctx, epoch, p, off, fua, pieces)
}

func (c *countingConn) WritePair(ctx context.Context, epoch uint64, p []byte, off uint64, pair replica.Pair, fua bool) error {
	c.pairs.Add(1)
	return c.replicaConn.WritePair(ctx, epoch, p, off, pair, fua)
}

// TestEncryptedWritesArePairs: every user write of an encrypted volume
// reaches each replica as write pairs, one per group it touches (data and
// entries in one request), never as a lone write of either, so no replica
// can take a block without its entry.
func TestEncryptedWritesArePairs(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v, key := r.createEncrypted("pairs", 4*mib)
	var plain atomic.Int64
	pairs := map[string]*atomic.Int64{}
	for _, rep := range v.Replicas {
		pairs[rep.ID] = &atomic.Int64{}
	}
	e, err := r.openSealedWrapped(v.ID, key, func(rep meta.Replica, c replicaConn) replicaConn {
		return &countingConn{replicaConn: c, plain: &plain, pairs: pairs[rep.ID]}
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := r.ctx()
	// Blocks 120..260: three groups (8, 128 and 5 blocks), and a 512-byte
	// write inside one block.
	p := bytes.Repeat([]byte{7}, 141*4096)
	if err := e.WriteAt(ctx, p, 120*4096, false); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(ctx, p[:512], 5*4096+512, false); err != nil {
		t.Fatal(err)
	}
	// At least one pair per group on every replica (a retry after a
	// failed attempt sends more), and no lone write anywhere.
	if plain.Load() != 0 {
		t.Fatalf("%d lone writes reached the replicas, want none", plain.Load())
	}
	for id, n := range pairs {
		if n.Load() < 3+1 {
			t.Fatalf("replica %s got %d pair writes, want at least 4 (3 groups and a 512-byte write)", id, n.Load())
		}
	}
	got := make([]byte, len(p))
	if err := e.ReadAt(ctx, got, 120*4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
	r.healthyIdentical(v.ID, nil)
}

// TestEncryptedStaleEntryCache: a cached metadata block older than the
// replicas' (a fill that raced a write) costs a retry, never wrong data.
func TestEncryptedStaleEntryCache(t *testing.T) {
	r := newRig(t, 3)
	v, key := r.createEncrypted("stale", 2*mib)
	e, err := r.openSealed(v.ID, key)
	if err != nil {
		t.Fatal(err)
	}
	ctx := r.ctx()
	old := bytes.Repeat([]byte{1}, 4096)
	if err := e.WriteAt(ctx, old, 3*4096, false); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := e.ReadAt(ctx, got, 3*4096); err != nil || !bytes.Equal(got, old) {
		t.Fatalf("first read: %v", err)
	}
	stale := make([]byte, 4096)
	if !e.seal.entries.get(0, stale[:crypt.GroupBlocks*crypt.EntrySize]) {
		t.Fatal("a read did not cache its group's metadata block")
	}
	next := bytes.Repeat([]byte{2}, 4096)
	if err := e.WriteAt(ctx, next, 3*4096, false); err != nil {
		t.Fatal(err)
	}
	e.seal.entries.put(0, stale) // as a fill that raced the write would
	if err := e.ReadAt(ctx, got, 3*4096); err != nil || !bytes.Equal(got, next) {
		t.Fatalf("read over a stale cached entry: %v, the new data %v", err, bytes.Equal(got, next))
	}
	r.healthyIdentical(v.ID, nil)
}

// TestEncryptedLocalRotRepaired: the engine reads the ciphertext of its
// node's own replica without the replica's sums (GCM authenticates it;
// replica.ReadAtAuthenticated). A bit that rots in that replica's file,
// behind its back, must still be caught and repaired: the block fails to
// open, the read again under the lock reads it checked, and the checksum
// repair rewrites it from a good copy.
func TestEncryptedLocalRotRepaired(t *testing.T) {
	r := newRig(t, 3)
	r.checksums = true
	v, key := r.createEncrypted("rot", 2*mib)
	e, err := Open(r.ctx(), Config{VolumeID: v.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 10 * time.Second,
		ReplicaDeadline: -1, CleanInterval: time.Hour, DataKey: key, Local: r.servers["n1"].srv})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	ctx := r.ctx()
	model, write := r.modelWriter(e, 2*mib, 5)
	write(0, 2*mib)
	if err := e.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	var local meta.Replica
	for _, rep := range v.Replicas {
		if rep.Node == "n1" {
			local = rep
		}
	}
	if local.ID == "" {
		t.Fatal("no replica on n1, the engine's node")
	}
	r.flipBit(local, int64(crypt.DataOffset(33)+1000))
	if r.verifies(v, local) == nil {
		t.Fatal("premise: the flipped bit does not fail the replica's sums")
	}
	repairs := testutil.ToFloat64(metricChecksumRepairs.WithLabelValues(v.ID))
	got := make([]byte, 8192)
	if err := e.ReadAt(ctx, got, 32*4096); err != nil || !bytes.Equal(got, model[32*4096:34*4096]) {
		t.Fatalf("read over a rotten block of the local replica: %v (right data %v)", err, bytes.Equal(got, model[32*4096:34*4096]))
	}
	if err := r.verifies(v, local); err != nil {
		t.Fatalf("the local replica was not repaired: %v", err)
	}
	if n := testutil.ToFloat64(metricChecksumRepairs.WithLabelValues(v.ID)) - repairs; n < 1 {
		t.Fatalf("checksum repairs rose by %v, want at least 1", n)
	}
	r.healthyIdentical(v.ID, nil)
}
