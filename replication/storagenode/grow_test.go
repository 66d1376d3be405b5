package storagenode

import (
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
)

// TestRealizerGrowsReplicasOfAnExpandedVolume: a volume no engine serves is
// expanded while one of its nodes is stopped. The running node grows its
// replica to the new size; the stopped one grows its own when it starts
// again, before any engine asks. Neither replica's generation changes: it
// is the same copy, larger.
func TestRealizerGrowsReplicasOfAnExpandedVolume(t *testing.T) {
	r := newStoreRig(t)
	r.start("n1")
	r.start("n2")
	res, err := r.meta.Apply(r.ctx(), &meta.CreateVolume{ID: "vol-g", Name: "g", SizeBytes: 8 << 20, Replicas: 2})
	if err != nil {
		t.Fatal(err)
	}
	gens := map[string]string{}
	for _, rep := range res.Volume.Replicas {
		gens[rep.ID] = r.waitReplica("vol-g", rep.ID, "created and recorded", func(x meta.Replica) bool {
			return x.Generation != "" && r.onDisk(x.Node, x.ID) == x.Generation
		}).Generation
	}
	r.stop("n2")
	if _, err := r.meta.Apply(r.ctx(), &meta.ExpandVolume{VolumeID: "vol-g", SizeBytes: 24 << 20}); err != nil {
		t.Fatal(err)
	}
	sizeOn := func(rep meta.Replica) uint64 {
		rr, err := r.nodes[rep.Node].Server().Get(rep.ID)
		if err != nil {
			t.Fatal(err)
		}
		return rr.Size()
	}
	waitSize := func(rep meta.Replica) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for sizeOn(rep) != 24<<20 {
			if time.Now().After(deadline) {
				t.Fatalf("replica %s on %s is %d bytes, want %d", rep.ID, rep.Node, sizeOn(rep), 24<<20)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if g := r.onDisk(rep.Node, rep.ID); g != gens[rep.ID] {
			t.Fatalf("replica %s has generation %s after growing, want %s", rep.ID, g, gens[rep.ID])
		}
	}
	for _, rep := range res.Volume.Replicas {
		if rep.Node == "n1" {
			waitSize(rep)
		}
	}
	r.start("n2")
	for _, rep := range res.Volume.Replicas {
		waitSize(rep)
	}
}
