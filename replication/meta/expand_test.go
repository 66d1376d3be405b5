package meta

import "testing"

// TestExpandVolume: the store records a larger size, answers a size already
// reached (or a smaller one) with the volume as it is, never shrinks, keeps
// the epoch, and refuses what would not fit or is not whole sectors.
func TestExpandVolume(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	v := h.createVolume("v1", 1, 3)
	attached := h.attach("v1", "n1")

	res := h.must(&ExpandVolume{VolumeID: "v1", SizeBytes: 2 * gib})
	if got := res.Volume.SizeBytes; got != 2*gib {
		t.Fatalf("expanded volume has size %d, want %d", got, 2*gib)
	}
	if got := h.volume("v1"); got.SizeBytes != 2*gib || got.Epoch != attached.Epoch || got.Attachment == nil {
		t.Fatalf("after expansion: size %d epoch %d attachment %v; want size %d, epoch %d kept, still attached",
			got.SizeBytes, got.Epoch, got.Attachment, 2*gib, attached.Epoch)
	}
	for _, size := range []uint64{2 * gib, gib, 512} {
		res := h.must(&ExpandVolume{VolumeID: "v1", SizeBytes: size})
		if res.Volume.SizeBytes != 2*gib {
			t.Fatalf("ExpandVolume to %d answered size %d, want the current %d", size, res.Volume.SizeBytes, 2*gib)
		}
	}
	before := h.state()
	h.fails(&ExpandVolume{VolumeID: "v1", SizeBytes: 3*gib + 1}, ErrInvalidArgument)
	// 10 GiB nodes: 3 + 9 more GiB on every replica's node does not fit.
	h.fails(&ExpandVolume{VolumeID: "v1", SizeBytes: 11 * gib}, ErrResourceExhausted)
	h.fails(&ExpandVolume{VolumeID: "nope", SizeBytes: 3 * gib}, ErrNotFound)
	if got := h.state(); !statesEqual(before, got) {
		t.Fatalf("refused expansions changed the state:\nbefore %s\n after %s", dumpJSON(before), dumpJSON(got))
	}
	h.must(&DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: attached.Epoch})
	h.must(&DeleteVolume{VolumeID: v.ID})
	h.fails(&ExpandVolume{VolumeID: "v1", SizeBytes: 3 * gib}, ErrNotFound)
}
