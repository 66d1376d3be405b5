package meta

import (
	"testing"

	"github.com/cairn-csi/cairn/replication/crypt"
)

// TestEncryptedVolumeRecord: an encrypted volume comes with its wrapped key
// and only through AdmitVolume; its replicas are larger than the volume by
// the blocks' metadata; a retry with another wrapped key finds it; a
// restore shares its key and must ask for encryption; nonce leases are
// handed out once each, cluster-wide, and only for encrypted volumes.
func TestEncryptedVolumeRecord(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 10)
	w, _, err := crypt.NewDataKey([]byte("p"))
	if err != nil {
		t.Fatal(err)
	}
	enc := map[string]string{"encryption": crypt.Cipher}
	cv := CreateVolume{ID: "v1", Name: "pvc-1", SizeBytes: gib, Replicas: 2, Parameters: enc, Encryption: w, CreatedAt: 1}
	if _, ok := CreateCommand(&cv).(*AdmitVolume); !ok {
		t.Fatal("an encrypted volume is not made through AdmitVolume")
	}
	h.fails(&AdmitVolume{CreateVolume: CreateVolume{ID: "v0", Name: "pvc-0", SizeBytes: gib, Replicas: 2, Parameters: enc}}, ErrInvalidArgument)
	h.fails(&AdmitVolume{CreateVolume: CreateVolume{ID: "v0", Name: "pvc-0", SizeBytes: gib, Replicas: 2, Encryption: w, Parameters: map[string]string{"type": "default"}}}, ErrInvalidArgument)
	v := h.must(CreateCommand(&cv)).Volume
	if !v.Encrypted() || v.Encryption.KeyID != w.KeyID || v.ReplicaBytes() != crypt.PhysicalSize(gib) || v.ReplicaBytes() <= gib {
		t.Fatalf("encrypted volume %+v, replica bytes %d", v, v.ReplicaBytes())
	}
	w2, _, _ := crypt.NewDataKey([]byte("p"))
	retry := cv
	retry.Encryption, retry.ID = w2, "v1-retry"
	if got := h.must(CreateCommand(&retry)).Volume; got.ID != "v1" || got.Encryption.KeyID != w.KeyID {
		t.Fatalf("a retry with another wrapped key: %+v, want the first volume and key", got)
	}

	// The gate holds an encrypted create as the type that brought
	// encryption; other admissions as their own.
	if ty, gated := gatedType(CreateCommand(&cv)); ty != CmdLeaseNonces || !gated {
		t.Fatalf("an encrypted create goes through the gate as type %d (gated %v), want %d", ty, gated, CmdLeaseNonces)
	}
	typed := &AdmitVolume{CreateVolume: CreateVolume{Parameters: map[string]string{"type": "hdd"}}}
	if ty, _ := gatedType(typed); ty != CmdAdmitVolume {
		t.Fatalf("a typed create goes through the gate as type %d, want %d", ty, CmdAdmitVolume)
	}
	// Not exported over NBD: the export cannot receive the passphrase.
	h.fails(&AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: "/run/x.sock", ExpectEpoch: v.Epoch}, ErrInvalidArgument)

	// Leases: cluster-wide, strictly increasing, only for encrypted volumes.
	plain := h.createVolume("v2", 1, 2)
	h.fails(&LeaseNonces{VolumeID: plain.ID}, ErrInvalidArgument)
	h.fails(&LeaseNonces{VolumeID: "nope"}, ErrNotFound)
	var last uint64
	for range 3 {
		l := h.must(&LeaseNonces{VolumeID: "v1"}).Lease
		if l <= last {
			t.Fatalf("lease %d after %d", l, last)
		}
		last = l
	}

	// A restore shares the source's key and must ask for encryption.
	h.must(&CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"})
	h.must(&SetSnapshotReady{SnapshotID: "s1", Replicas: []string{v.Replicas[0].ID, v.Replicas[1].ID}})
	restore := func(params map[string]string, key *crypt.WrappedKey) *RestoreVolume {
		return &RestoreVolume{CreateVolume: CreateVolume{ID: "r1", Name: "pvc-r1", SizeBytes: gib, Replicas: 2, Parameters: params,
			Encryption: key, ContentSource: "snapshot:s1", CreatedAt: 5}, SnapshotID: "s1"}
	}
	h.fails(restore(nil, nil), ErrInvalidArgument)
	h.fails(restore(enc, w2), ErrInvalidArgument)
	r := h.must(restore(enc, nil)).Volume
	if r.Encryption == nil || r.Encryption.KeyID != w.KeyID || string(r.Encryption.Sealed) != string(w.Sealed) {
		t.Fatalf("restored volume's key %+v, want the source's", r.Encryption)
	}
	if l := h.must(&LeaseNonces{VolumeID: "r1"}).Lease; l != last+1 {
		t.Fatalf("the clone's lease %d, want %d: leases are cluster-wide", l, last+1)
	}
	last++

	// A Raft snapshot keeps the count: a member restored from one must
	// never hand out a lease again (a nonce would repeat under the key).
	h.restoreState(h.state().Clone())
	if l := h.must(&LeaseNonces{VolumeID: "v1"}).Lease; l != last+1 {
		t.Fatalf("after a snapshot round trip, lease %d, want %d", l, last+1)
	}
}
