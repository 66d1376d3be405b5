package storagenode

import (
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cairn-csi/cairn/replication/attach"
	"github.com/cairn-csi/cairn/replication/meta"
)

// TestPlacedVolumesFollowsTheFSM: the realizer's view holds exactly the
// live volumes with a replica on its node, as the FSM's entries move them.
func TestPlacedVolumesFollowsTheFSM(t *testing.T) {
	f := meta.NewFSM()
	var index uint64
	// Each entry's own outcome is not visible from here; the views checked
	// below show that they applied.
	apply := func(c meta.Command) {
		t.Helper()
		b, err := meta.Encode(c)
		if err != nil {
			t.Fatal(err)
		}
		index++
		f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: b})
	}
	apply(&meta.InitCluster{ClusterID: "c", OverProvisioningRatio: 1})
	for _, id := range []string{"n1", "n2"} {
		apply(&meta.RegisterNode{Node: meta.Node{ID: id, RaftAddr: id + ":1", APIAddr: id + ":2", CapacityBytes: 1 << 40, FreeBytes: 1 << 40}})
	}
	apply(&meta.CreateVolume{ID: "a", Name: "a", SizeBytes: 1 << 30, Replicas: 1, PreferredNode: "n1"})
	apply(&meta.CreateVolume{ID: "b", Name: "b", SizeBytes: 1 << 30, Replicas: 1, PreferredNode: "n2"})
	apply(&meta.CreateVolume{ID: "c", Name: "c", SizeBytes: 1 << 30, Replicas: 2})

	var p placedVolumes
	check := func(what string, want ...string) {
		t.Helper()
		p.update(f, "n1")
		var got []string
		for id := range p.vols {
			got = append(got, id)
		}
		if len(got) != len(want) {
			t.Fatalf("%s: view holds %v, want %v", what, got, want)
		}
		for _, id := range want {
			if p.vols[id] == nil {
				t.Fatalf("%s: view holds %v, want %v", what, got, want)
			}
		}
	}
	check("first update", "a", "c")
	apply(&meta.SetVolumeCondition{VolumeID: "a", Abnormal: true})
	check("after a change of a", "a", "c")
	if p.vols["a"].Condition == nil {
		t.Fatal("view holds a as it was before its change")
	}
	apply(&meta.DeleteVolume{VolumeID: "c"})
	check("after the delete of c", "a")
	apply(&meta.CreateVolume{ID: "d", Name: "d", SizeBytes: 1 << 30, Replicas: 1, PreferredNode: "n1"})
	check("after the create of d", "a", "d")
}

// TestRealizerBehindKeepsReplicas: a realizer whose copy of the store is
// behind (here: empty, as a wiped or just restarted member's) and so does
// not see a replica placed on its node does not delete it; once the store
// itself drops the replica, the realizer deletes it even though its copy
// still says nothing.
func TestRealizerBehindKeepsReplicas(t *testing.T) {
	r := newStoreRig(t)
	r.start("n1")
	res, err := r.meta.Apply(r.ctx(), &meta.CreateVolume{Name: "v", SizeBytes: 1 << 20, Replicas: 1, PreferredNode: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	v := res.Volume
	rid := v.Replicas[0].ID
	r.waitReplica(v.ID, rid, "generation recorded", func(rep meta.Replica) bool { return rep.Generation != "" })
	r.stop("n1")

	// A node whose own copy of the store is empty: as far behind as can be.
	n, err := New(Config{NodeID: "n1", DataDir: r.dirs["n1"], Listen: r.addrs["n1"], FSM: meta.NewFSM(), Meta: r.meta, Logger: r.log})
	if err != nil {
		t.Fatal(err)
	}
	engines := attach.New(attach.Config{NodeID: "n1", Meta: r.meta, Logger: r.log, Local: n.Server()})
	n.Start(engines)
	r.nodes["n1"], r.engines["n1"] = n, engines
	time.Sleep(4 * time.Second) // the first pass and the next, every 3 s
	if r.onDisk("n1", rid) == "" {
		t.Fatal("a realizer behind the store deleted a replica the store still places on its node")
	}
	if _, err := r.meta.Apply(r.ctx(), &meta.DeleteVolume{VolumeID: v.ID}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for r.onDisk("n1", rid) != "" {
		if time.Now().After(deadline) {
			t.Fatal("replica of a deleted volume not deleted within 10 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}
