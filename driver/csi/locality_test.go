package csi

import (
	"context"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/cairn-csi/cairn/replication/meta"
)

// startStore runs a one-member volume store on 127.0.0.1 with storage
// nodes n1..nN registered (10 GiB each, no zone); its own member holds no
// capacity, so placement never picks it.
func startStore(t *testing.T, nodes int) *meta.Client {
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	agent, err := meta.StartAgent(meta.AgentConfig{
		Store:   meta.StoreConfig{NodeID: "meta-1", DataDir: filepath.Join(t.TempDir(), "meta"), RaftBind: "127.0.0.1:0", TimeoutMultiplier: 0.2, Logger: log},
		APIBind: "127.0.0.1:0", BootstrapExpect: 1,
		HeartbeatInterval: 100 * time.Millisecond, NodeDownAfter: time.Hour,
		DiskUsage: func() (uint64, uint64, error) { return 0, 0, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = agent.Close() })
	c, err := meta.NewClient([]string{agent.APIAddr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	for i := 1; i <= nodes; i++ {
		if _, err := c.Apply(testCtx(t), &meta.RegisterNode{Node: meta.Node{
			ID: fmt.Sprintf("n%d", i), RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:1", DataAddr: "127.0.0.1:1",
			CapacityBytes: 10 << 30, FreeBytes: 10 << 30,
		}}); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// onNode is the topology a WaitForFirstConsumer provisioner prefers for a
// pod scheduled to node: that node's segments (NodeGetInfo).
func onNode(node string) *csipb.TopologyRequirement {
	seg := map[string]string{TopologyZoneKey: DefaultZone, TopologyNodeKey: node}
	return &csipb.TopologyRequirement{
		Requisite: []*csipb.Topology{{Segments: seg}},
		Preferred: []*csipb.Topology{{Segments: seg}},
	}
}

// TestDataLocality: dataLocality best-effort puts a replica on the node the
// preferred topology names; disabled ignores it; a preferred node that
// cannot take the replica is skipped, not an error.
func TestDataLocality(t *testing.T) {
	c := NewController(startStore(t, 4))
	create := func(name string, params map[string]string, ar *csipb.TopologyRequirement) []string {
		t.Helper()
		res, err := c.CreateVolume(testCtx(t), &csipb.CreateVolumeRequest{Name: name, Parameters: params,
			VolumeCapabilities: []*csipb.VolumeCapability{testMountCap}, AccessibilityRequirements: ar,
			CapacityRange: &csipb.CapacityRange{RequiredBytes: 1 << 30}})
		if err != nil {
			t.Fatalf("CreateVolume %s: %v", name, err)
		}
		v, err := c.Meta.Volume(testCtx(t), res.GetVolume().GetVolumeId())
		if err != nil {
			t.Fatal(err)
		}
		var nodes []string
		for _, r := range v.Replicas {
			nodes = append(nodes, r.Node)
		}
		return nodes
	}
	off := map[string]string{"replicas": "1", "dataLocality": "disabled"}
	local := map[string]string{"replicas": "1", "dataLocality": "best-effort"}

	// All nodes empty: without locality, the id breaks the tie (n1).
	if got := create("disabled", off, onNode("n3")); !slices.Equal(got, []string{"n1"}) {
		t.Fatalf("dataLocality disabled, pod on n3: replica on %v, want n1 (placement's own choice)", got)
	}
	// Best-effort is the default: a class that does not name it follows
	// the pod too.
	if got := create("default", map[string]string{"replicas": "1"}, onNode("n4")); !slices.Equal(got, []string{"n4"}) {
		t.Fatalf("dataLocality unset, pod on n4: replica on %v, want n4 (best-effort is the default)", got)
	}
	for i, n := range []string{"n3", "n4", "n1", "n3"} {
		if got := create(fmt.Sprintf("local-%d", i), local, onNode(n)); !slices.Equal(got, []string{n}) {
			t.Fatalf("dataLocality best-effort, pod on %s: replica on %v", n, got)
		}
	}
	// A retry finds the same volume (the preferred node is not part of
	// what makes two requests the same).
	if got := create("local-0", local, onNode("n2")); !slices.Equal(got, []string{"n3"}) {
		t.Fatalf("retry: replicas %v, want the first answer's n3", got)
	}
	three := map[string]string{"replicas": "3", "dataLocality": "best-effort"}
	if got := create("local-three", three, onNode("n2")); len(got) != 3 || got[0] != "n2" {
		t.Fatalf("3 replicas, pod on n2: %v, want n2 first", got)
	}
	// A node the store does not know (or that is full) is skipped.
	if got := create("local-nowhere", local, onNode("nope")); len(got) != 1 || got[0] == "nope" {
		t.Fatalf("pod on an unknown node: %v", got)
	}
	// Without a preferred topology (Immediate binding, no topology) the
	// volume is placed as usual.
	if got := create("local-none", local, nil); len(got) != 1 {
		t.Fatalf("no topology: %v", got)
	}
}

func TestNodeGetInfoNamesTheNode(t *testing.T) {
	n := &Node{cfg: NodeConfig{NodeID: "n7"}}
	res, err := n.NodeGetInfo(context.Background(), &csipb.NodeGetInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{TopologyZoneKey: DefaultZone, TopologyNodeKey: "n7"}
	if got := res.GetAccessibleTopology().GetSegments(); !maps.Equal(got, want) {
		t.Fatalf("segments %v, want %v", got, want)
	}
}
