package meta

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/cairn-csi/cairn/replication/volspec"
)

func TestApplyInitCluster(t *testing.T) {
	tests := []struct {
		name      string
		pre       []Command
		cmd       *InitCluster
		wantErr   error
		wantID    string
		wantRatio float64
	}{
		{name: "first init sets id and ratio", cmd: &InitCluster{ClusterID: "c1", OverProvisioningRatio: 2},
			wantID: "c1", wantRatio: 2},
		{name: "zero ratio is allowed", cmd: &InitCluster{ClusterID: "c1"}, wantID: "c1"},
		{name: "empty id", cmd: &InitCluster{}, wantErr: ErrInvalidArgument},
		{name: "negative ratio", cmd: &InitCluster{ClusterID: "c1", OverProvisioningRatio: -1}, wantErr: ErrInvalidArgument},
		{name: "same id again is a no-op", pre: []Command{&InitCluster{ClusterID: "c1", OverProvisioningRatio: 2}},
			cmd: &InitCluster{ClusterID: "c1", OverProvisioningRatio: 3}, wantID: "c1", wantRatio: 2},
		{name: "different id", pre: []Command{&InitCluster{ClusterID: "c1"}},
			cmd: &InitCluster{ClusterID: "c2"}, wantErr: ErrClusterMismatch, wantID: "c1"},
		{name: "empty id after init", pre: []Command{&InitCluster{ClusterID: "c1"}},
			cmd: &InitCluster{}, wantErr: ErrInvalidArgument, wantID: "c1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			for _, c := range tt.pre {
				h.must(c)
			}
			res, err := h.apply(tt.cmd)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("apply = %v, want %v", err, tt.wantErr)
			}
			if !reflect.DeepEqual(res, Result{}) {
				t.Errorf("result = %+v, want empty", res)
			}
			s := h.state()
			if s.ClusterID != tt.wantID || s.OverProvisioningRatio != tt.wantRatio {
				t.Errorf("state cluster %q ratio %v, want %q %v", s.ClusterID, s.OverProvisioningRatio, tt.wantID, tt.wantRatio)
			}
		})
	}
}

func TestApplyRegisterNode(t *testing.T) {
	full := Node{ID: "n1", RaftAddr: "n1:7000", APIAddr: "n1:7001", DataAddr: "n1:7002", Zone: "z", Region: "r",
		State: NodeDown, CapacityBytes: 10 * gib, FreeBytes: 4 * gib, LastHeartbeat: 1}
	with := func(f func(n *Node)) Node { n := full; f(&n); return n }
	tests := []struct {
		name    string
		node    Node
		wantErr error
	}{
		{"full", full, nil},
		{"minimal", Node{ID: "n1", RaftAddr: "a", APIAddr: "b"}, nil},
		{"no id", with(func(n *Node) { n.ID = "" }), ErrInvalidArgument},
		{"no raft address", with(func(n *Node) { n.RaftAddr = "" }), ErrInvalidArgument},
		{"no API address", with(func(n *Node) { n.APIAddr = "" }), ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			res, err := h.apply(&RegisterNode{Node: tt.node, Time: 77})
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("apply = %v, want %v", err, tt.wantErr)
				}
				if len(h.state().Nodes) != 0 {
					t.Fatal("a refused node was stored")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := tt.node
			want.State = NodeUp // a registering node is up, whatever the command says
			want.LastHeartbeat = 77
			if got := h.node(tt.node.ID); !reflect.DeepEqual(got, &want) {
				t.Fatalf("stored node = %+v, want %+v", got, want)
			}
			if !reflect.DeepEqual(res.Node, &want) || res.Volume != nil || res.Snapshot != nil {
				t.Fatalf("result = %+v, want node %+v", res, want)
			}
		})
	}

	t.Run("re-register updates the node", func(t *testing.T) {
		h := newHarness(t)
		h.must(&RegisterNode{Node: full, Time: 1})
		h.must(&RegisterNode{Node: Node{ID: "n1", RaftAddr: "new:1", APIAddr: "new:2", CapacityBytes: 20 * gib}, Time: 2})
		got := h.node("n1")
		want := &Node{ID: "n1", RaftAddr: "new:1", APIAddr: "new:2", CapacityBytes: 20 * gib, State: NodeUp, LastHeartbeat: 2}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("node = %+v, want %+v", got, want)
		}
		if n := len(h.state().Nodes); n != 1 {
			t.Fatalf("%d nodes after re-register, want 1", n)
		}
	})
	t.Run("result is a copy", func(t *testing.T) {
		h := newHarness(t)
		res := h.must(&RegisterNode{Node: full, Time: 1})
		res.Node.Zone = "mutated"
		if h.node("n1").Zone != "z" {
			t.Fatal("the result aliases the stored node")
		}
	})
}

func TestApplyNodeHeartbeat(t *testing.T) {
	tests := []struct {
		name     string
		cmd      *NodeHeartbeat
		preState NodeState
		wantErr  error
	}{
		{name: "unknown node", cmd: &NodeHeartbeat{NodeID: "nope", Time: 5}, wantErr: ErrNotFound},
		{name: "empty node id", cmd: &NodeHeartbeat{Time: 5}, wantErr: ErrNotFound},
		{name: "up node", cmd: &NodeHeartbeat{NodeID: "n1", CapacityBytes: 50 * gib, FreeBytes: 7 * gib, Time: 500}, preState: NodeUp},
		{name: "draining node stays draining", cmd: &NodeHeartbeat{NodeID: "n1", CapacityBytes: 50 * gib, FreeBytes: 7 * gib, Time: 500}, preState: NodeDraining},
		{name: "down node stays down", cmd: &NodeHeartbeat{NodeID: "n1", CapacityBytes: 50 * gib, FreeBytes: 7 * gib, Time: 500}, preState: NodeDown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(1, 10)
			if tt.preState != "" {
				h.must(&SetNodeState{NodeID: "n1", State: tt.preState, Time: 1})
			}
			before := h.node("n1")
			if tt.wantErr != nil {
				h.fails(tt.cmd, tt.wantErr)
				return
			}
			res := h.must(tt.cmd)
			want := *before
			want.CapacityBytes, want.FreeBytes, want.LastHeartbeat = tt.cmd.CapacityBytes, tt.cmd.FreeBytes, tt.cmd.Time
			if got := h.node("n1"); !reflect.DeepEqual(got, &want) {
				t.Fatalf("node = %+v, want %+v", got, want)
			}
			if !reflect.DeepEqual(res.Node, &want) {
				t.Fatalf("result node = %+v, want %+v", res.Node, want)
			}
		})
	}
}

func TestApplySetNodeState(t *testing.T) {
	tests := []struct {
		name          string
		cmd           *SetNodeState
		wantErr       error
		wantHeartbeat int64
	}{
		{name: "unknown node", cmd: &SetNodeState{NodeID: "nope", State: NodeDown}, wantErr: ErrNotFound},
		{name: "empty state", cmd: &SetNodeState{NodeID: "n1"}, wantErr: ErrInvalidArgument},
		{name: "bad state", cmd: &SetNodeState{NodeID: "n1", State: "sleeping"}, wantErr: ErrInvalidArgument},
		{name: "wrong case", cmd: &SetNodeState{NodeID: "n1", State: "Up"}, wantErr: ErrInvalidArgument},
		{name: "down keeps the heartbeat", cmd: &SetNodeState{NodeID: "n1", State: NodeDown, Time: 900}, wantHeartbeat: 100},
		{name: "draining keeps the heartbeat", cmd: &SetNodeState{NodeID: "n1", State: NodeDraining, Time: 900}, wantHeartbeat: 100},
		{name: "up records the time", cmd: &SetNodeState{NodeID: "n1", State: NodeUp, Time: 900}, wantHeartbeat: 900},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(1, 10) // registered at time 100
			if tt.wantErr != nil {
				h.fails(tt.cmd, tt.wantErr)
				return
			}
			res := h.must(tt.cmd)
			got := h.node("n1")
			if got.State != tt.cmd.State || got.LastHeartbeat != tt.wantHeartbeat {
				t.Fatalf("node state %q heartbeat %d, want %q %d", got.State, got.LastHeartbeat, tt.cmd.State, tt.wantHeartbeat)
			}
			if !reflect.DeepEqual(res.Node, got) {
				t.Fatalf("result %+v, stored %+v", res.Node, got)
			}
		})
	}
}

// checkPlacedVolume checks what every freshly created volume must satisfy.
func checkPlacedVolume(t *testing.T, s *State, v *Volume) {
	t.Helper()
	if len(v.Replicas) != v.ReplicaCount {
		t.Fatalf("volume has %d replicas, want %d", len(v.Replicas), v.ReplicaCount)
	}
	if v.Epoch != 1 {
		t.Errorf("new volume epoch %d, want 1", v.Epoch)
	}
	if v.NextReplicaSeq != v.ReplicaCount {
		t.Errorf("NextReplicaSeq %d, want %d", v.NextReplicaSeq, v.ReplicaCount)
	}
	nodes := map[string]bool{}
	for i, r := range v.Replicas {
		if want := fmt.Sprintf("%s-r%d", v.ID, i+1); r.ID != want {
			t.Errorf("replica %d id %q, want %q", i, r.ID, want)
		}
		if r.State != ReplicaHealthy {
			t.Errorf("replica %s is %s, want healthy", r.ID, r.State)
		}
		if nodes[r.Node] {
			t.Errorf("two replicas on node %s", r.Node)
		}
		nodes[r.Node] = true
		n, ok := s.Nodes[r.Node]
		if !ok {
			t.Errorf("replica on unregistered node %q", r.Node)
		} else if n.State != NodeUp {
			t.Errorf("replica placed on %s node %s", n.State, n.ID)
		}
	}
	if v.Attachment != nil {
		t.Errorf("new volume is attached: %+v", v.Attachment)
	}
}

func TestApplyCreateVolume(t *testing.T) {
	base := CreateVolume{ID: "v1", Name: "pvc-1", SizeBytes: gib, Replicas: 3, CreatedAt: 5}
	with := func(f func(c *CreateVolume)) *CreateVolume { c := base; f(&c); return &c }
	tests := []struct {
		name        string
		cmd         *CreateVolume
		wantErr     error
		wantQuorum  int
		wantState   VolumeState
		wantNodes   []string // when the placement is determined
		wantInError string   // for ResourceExhausted: the reason names this
	}{
		{name: "three replicas", cmd: &base, wantQuorum: 2, wantState: VolumeAvailable},
		{name: "explicit quorum", cmd: with(func(c *CreateVolume) { c.WriteQuorum = 3 }), wantQuorum: 3, wantState: VolumeAvailable},
		{name: "quorum 1 of 3", cmd: with(func(c *CreateVolume) { c.WriteQuorum = 1 }), wantQuorum: 1, wantState: VolumeAvailable},
		{name: "default quorum of 1", cmd: with(func(c *CreateVolume) { c.Replicas = 1 }), wantQuorum: 1, wantState: VolumeAvailable},
		{name: "default quorum of 2", cmd: with(func(c *CreateVolume) { c.Replicas = 2 }), wantQuorum: 2, wantState: VolumeAvailable},
		{name: "default quorum of 4", cmd: with(func(c *CreateVolume) { c.Replicas = 4 }), wantQuorum: 3, wantState: VolumeAvailable},
		{name: "default quorum of 5", cmd: with(func(c *CreateVolume) { c.Replicas = 5 }), wantQuorum: 3, wantState: VolumeAvailable},
		{name: "content source provisions first", cmd: with(func(c *CreateVolume) { c.ContentSource = "snap-1" }),
			wantQuorum: 2, wantState: VolumeProvisioning},
		{name: "preferred node first", cmd: with(func(c *CreateVolume) { c.Replicas = 1; c.PreferredNode = "n4" }),
			wantQuorum: 1, wantState: VolumeAvailable, wantNodes: []string{"n4"}},
		{name: "allowed zones", cmd: with(func(c *CreateVolume) { c.Replicas = 2; c.AllowedZones = []string{"zone-b"} }),
			wantQuorum: 2, wantState: VolumeAvailable, wantNodes: []string{"n2", "n4"}},
		{name: "spread over zones", cmd: with(func(c *CreateVolume) { c.Replicas = 2 }),
			wantQuorum: 2, wantState: VolumeAvailable, wantNodes: []string{"n1", "n2"}},

		// Parameters are validated in volspec's stored form; keys the store
		// does not know pass (a newer client's), as does the replica count
		// some clients also record.
		{name: "stored-form parameters", cmd: with(func(c *CreateVolume) {
			c.Parameters = map[string]string{"dataLocality": "best-effort", "maxBandwidth": "1048576", "staleReplicaTimeout": "10m0s",
				"checksumAlgorithm": "none", "replicas": "3", "aKeyFromANewerVersion": "x"}
		}), wantQuorum: 2, wantState: VolumeAvailable},

		{name: "bad maxIOPS", cmd: with(func(c *CreateVolume) { c.Parameters = map[string]string{"maxIOPS": "lots"} }),
			wantErr: ErrInvalidArgument, wantInError: `"maxIOPS"`},
		{name: "request-form bandwidth", cmd: with(func(c *CreateVolume) { c.Parameters = map[string]string{"maxBandwidth": "100Mi"} }),
			wantErr: ErrInvalidArgument, wantInError: `"maxBandwidth"`},
		{name: "minIOPS above maxIOPS", cmd: with(func(c *CreateVolume) { c.Parameters = map[string]string{"maxIOPS": "10", "minIOPS": "20"} }),
			wantErr: ErrInvalidArgument, wantInError: `"minIOPS"`},
		{name: "unknown checksum", cmd: with(func(c *CreateVolume) { c.Parameters = map[string]string{"checksumAlgorithm": "md5"} }),
			wantErr: ErrInvalidArgument, wantInError: "md5"},
		{name: "no id", cmd: with(func(c *CreateVolume) { c.ID = "" }), wantErr: ErrInvalidArgument},
		{name: "no name", cmd: with(func(c *CreateVolume) { c.Name = "" }), wantErr: ErrInvalidArgument},
		{name: "zero size", cmd: with(func(c *CreateVolume) { c.SizeBytes = 0 }), wantErr: ErrInvalidArgument},
		{name: "zero replicas", cmd: with(func(c *CreateVolume) { c.Replicas = 0 }), wantErr: ErrInvalidArgument},
		{name: "negative replicas", cmd: with(func(c *CreateVolume) { c.Replicas = -1 }), wantErr: ErrInvalidArgument},
		{name: "too many replicas", cmd: with(func(c *CreateVolume) { c.Replicas = MaxReplicas + 1 }), wantErr: ErrInvalidArgument},
		{name: "negative quorum", cmd: with(func(c *CreateVolume) { c.WriteQuorum = -1 }), wantErr: ErrInvalidArgument},
		{name: "quorum above replicas", cmd: with(func(c *CreateVolume) { c.WriteQuorum = 4 }), wantErr: ErrInvalidArgument},
		{name: "more replicas than nodes", cmd: with(func(c *CreateVolume) { c.Replicas = 5 }), wantErr: ErrResourceExhausted,
			wantInError: "n5"}, // n5 is down: the reason names it
		{name: "larger than any disk", cmd: with(func(c *CreateVolume) { c.SizeBytes = 11 * gib }), wantErr: ErrResourceExhausted,
			wantInError: "space"},
		{name: "no node in allowed zone", cmd: with(func(c *CreateVolume) { c.AllowedZones = []string{"zone-x"} }), wantErr: ErrResourceExhausted,
			wantInError: "zone"},
		{name: "not enough nodes in allowed zone", cmd: with(func(c *CreateVolume) { c.AllowedZones = []string{"zone-a"} }), wantErr: ErrResourceExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(4, 10, "zone-a", "zone-b") // n1,n3 in zone-a; n2,n4 in zone-b
			h.addNode("n5", "zone-a", 10)
			h.must(&SetNodeState{NodeID: "n5", State: NodeDown})
			h.addNode("n6", "zone-b", 10)
			h.must(&SetNodeState{NodeID: "n6", State: NodeDraining})
			if tt.cmd.Replicas == 5 && tt.wantErr == nil {
				h.must(&SetNodeState{NodeID: "n5", State: NodeUp})
			}
			if tt.wantErr != nil {
				err := h.fails(tt.cmd, tt.wantErr)
				if tt.wantInError != "" && !strings.Contains(err.Error(), tt.wantInError) {
					t.Errorf("error %q does not give the reason (%q)", err, tt.wantInError)
				}
				return
			}
			res := h.must(tt.cmd)
			s := h.state()
			v := s.Volumes[tt.cmd.ID]
			if v == nil {
				t.Fatal("volume not stored")
			}
			if !reflect.DeepEqual(res.Volume, v) {
				t.Fatalf("result %+v differs from stored %+v", res.Volume, v)
			}
			checkPlacedVolume(t, s, v)
			want := &Volume{ID: tt.cmd.ID, Name: tt.cmd.Name, SizeBytes: tt.cmd.SizeBytes, Parameters: tt.cmd.Parameters,
				AccessType: tt.cmd.AccessType, State: tt.wantState, ReplicaCount: tt.cmd.Replicas, WriteQuorum: tt.wantQuorum,
				Replicas: v.Replicas, Epoch: 1, ContentSource: tt.cmd.ContentSource, NextReplicaSeq: tt.cmd.Replicas, CreatedAt: tt.cmd.CreatedAt}
			if !reflect.DeepEqual(v, want) {
				t.Fatalf("volume = %+v\nwant %+v", v, want)
			}
			if tt.wantNodes != nil {
				var got []string
				for _, r := range v.Replicas {
					got = append(got, r.Node)
				}
				if !reflect.DeepEqual(got, tt.wantNodes) {
					t.Fatalf("placed on %v, want %v", got, tt.wantNodes)
				}
			}
		})
	}
}

func TestApplyCreateVolumeIdempotency(t *testing.T) {
	first := CreateVolume{ID: "v1", Name: "pvc-1", SizeBytes: 2 * gib, Replicas: 3,
		Parameters: map[string]string{"replicas": "3", "dataLocality": "disabled"}, ContentSource: "", CreatedAt: 1}
	with := func(f func(c *CreateVolume)) *CreateVolume { c := first; f(&c); return &c }
	tests := []struct {
		name    string
		cmd     *CreateVolume
		wantErr error
	}{
		{"same request", &first, nil},
		{"same request with another id", with(func(c *CreateVolume) { c.ID = "v2" }), nil},
		{"explicit default quorum", with(func(c *CreateVolume) { c.WriteQuorum = 2 }), nil},
		{"later creation time", with(func(c *CreateVolume) { c.CreatedAt = 99 }), nil},
		{"different size", with(func(c *CreateVolume) { c.SizeBytes = 3 * gib }), ErrAlreadyExists},
		{"different replicas", with(func(c *CreateVolume) { c.Replicas = 2 }), ErrAlreadyExists},
		{"different quorum", with(func(c *CreateVolume) { c.WriteQuorum = 3 }), ErrAlreadyExists},
		{"different parameters", with(func(c *CreateVolume) { c.Parameters = map[string]string{"replicas": "2"} }), ErrAlreadyExists},
		{"no parameters", with(func(c *CreateVolume) { c.Parameters = nil }), ErrAlreadyExists},
		{"different content source", with(func(c *CreateVolume) { c.ContentSource = "snap-1" }), ErrAlreadyExists},
		// A volume recorded with the old default locality matches a retry
		// made after the default changed: locality only steered placement.
		{"other locality only", with(func(c *CreateVolume) {
			c.Parameters = map[string]string{"replicas": "3", "dataLocality": "best-effort"}
		}), nil},
		{"same id, other name", with(func(c *CreateVolume) { c.Name = "pvc-other" }), ErrAlreadyExists},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(4, 10)
			orig := h.must(&first).Volume
			if tt.wantErr != nil {
				h.fails(tt.cmd, tt.wantErr)
				return
			}
			before := h.state()
			res := h.must(tt.cmd)
			if !reflect.DeepEqual(res.Volume, orig) {
				t.Fatalf("idempotent create returned %+v, want the original %+v", res.Volume, orig)
			}
			if after := h.state(); !reflect.DeepEqual(before, after) {
				t.Fatalf("idempotent create changed the state:\n%s", dumpJSON(after))
			}
		})
	}
	t.Run("empty and nil parameters are the same", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		v := h.must(&CreateVolume{ID: "v1", Name: "n", SizeBytes: gib, Replicas: 1}).Volume
		res := h.must(&CreateVolume{ID: "v1", Name: "n", SizeBytes: gib, Replicas: 1, Parameters: map[string]string{}})
		if !reflect.DeepEqual(res.Volume, v) {
			t.Fatalf("got %+v, want %+v", res.Volume, v)
		}
	})
}

// TestApplyCreateVolumeCapacity: thin provisioning counts the replicas already
// placed, honours the over-provisioning ratio and forgets deleted volumes.
func TestApplyCreateVolumeCapacity(t *testing.T) {
	t.Run("allocation accumulates", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(1, 10)
		h.createVolume("a", 6, 1)
		h.fails(&CreateVolume{ID: "b", Name: "pvc-b", SizeBytes: 5 * gib, Replicas: 1}, ErrResourceExhausted)
		h.createVolume("c", 4, 1) // exactly full
		h.fails(&CreateVolume{ID: "d", Name: "pvc-d", SizeBytes: 1, Replicas: 1}, ErrResourceExhausted)
		// A deleted volume no longer counts.
		h.must(&DeleteVolume{VolumeID: "a"})
		h.createVolume("b", 5, 1)
	})
	t.Run("over-provisioning ratio", func(t *testing.T) {
		h := newHarness(t)
		h.must(&InitCluster{ClusterID: "c", OverProvisioningRatio: 2})
		h.addNode("n1", "", 10)
		h.createVolume("a", 15, 1)
		h.createVolume("b", 5, 1)
		h.fails(&CreateVolume{ID: "c", Name: "pvc-c", SizeBytes: 1, Replicas: 1}, ErrResourceExhausted)
	})
	t.Run("least used node first", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		h.must(&CreateVolume{ID: "a", Name: "a", SizeBytes: 5 * gib, Replicas: 1, PreferredNode: "n1"})
		h.must(&CreateVolume{ID: "b", Name: "b", SizeBytes: 3 * gib, Replicas: 1, PreferredNode: "n2"})
		v := h.createVolume("c", 1, 1)
		if v.Replicas[0].Node != "n3" {
			t.Fatalf("placed on %s, want the empty node n3", v.Replicas[0].Node)
		}
		v = h.createVolume("d", 1, 2)
		if v.Replicas[0].Node != "n3" || v.Replicas[1].Node != "n2" {
			t.Fatalf("placed on %v, want [n3 n2]", v.Replicas)
		}
	})
	t.Run("no nodes at all", func(t *testing.T) {
		h := newHarness(t)
		h.must(&InitCluster{ClusterID: "c"})
		h.fails(&CreateVolume{ID: "a", Name: "a", SizeBytes: 1, Replicas: 1}, ErrResourceExhausted)
	})
	t.Run("no up nodes", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		for i := 1; i <= 3; i++ {
			h.must(&SetNodeState{NodeID: nodeName(i), State: NodeDown})
		}
		h.fails(&CreateVolume{ID: "a", Name: "a", SizeBytes: 1, Replicas: 1}, ErrResourceExhausted)
	})
}

func TestApplyDeleteVolume(t *testing.T) {
	tests := []struct {
		from    VolumeState
		id      string
		wantErr error
	}{
		{VolumePending, "v1", nil},
		{VolumeProvisioning, "v1", nil},
		{VolumeAvailable, "v1", nil},
		{VolumeFailed, "v1", nil},
		{VolumeAttached, "v1", ErrFailedPrecondition},
		{VolumeReleasing, "v1", ErrFailedPrecondition},
		{VolumeDeleted, "v1", ErrNotFound},
		{VolumeAvailable, "nope", ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(string(tt.from)+"/"+tt.id, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			volumeInState(h, tt.from)
			id := tt.id
			if tt.wantErr != nil {
				h.fails(&DeleteVolume{VolumeID: id}, tt.wantErr)
				return
			}
			before := h.volume(id)
			res := h.must(&DeleteVolume{VolumeID: id})
			after := h.volume(id)
			if after == nil {
				t.Fatal("DeleteVolume removed the record; it must stay as a tombstone until PurgeVolume")
			}
			if after.State != VolumeDeleted || after.Epoch != before.Epoch+1 {
				t.Fatalf("after delete: state %s epoch %d, want deleted, %d", after.State, after.Epoch, before.Epoch+1)
			}
			if !reflect.DeepEqual(res.Volume, after) {
				t.Fatalf("result %+v, stored %+v", res.Volume, after)
			}
			// Only state and epoch changed.
			before.State, before.Epoch = after.State, after.Epoch
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("delete changed more than state and epoch:\n%+v\n%+v", before, after)
			}
			for _, v := range h.state().SortedVolumes() {
				if v.ID == id {
					t.Fatal("deleted volume is listed by SortedVolumes")
				}
			}
		})
	}

	t.Run("name can be reused", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		old := h.createVolume("v1", 1, 3)
		h.must(&DeleteVolume{VolumeID: "v1"})
		// Same name and request, new id: a new volume, not the tombstone.
		res := h.must(&CreateVolume{ID: "v2", Name: old.Name, SizeBytes: old.SizeBytes, Replicas: 3})
		if res.Volume.ID != "v2" || res.Volume.State != VolumeAvailable {
			t.Fatalf("re-created volume = %+v", res.Volume)
		}
		// Even with a different size.
		h.must(&DeleteVolume{VolumeID: "v2"})
		h.must(&CreateVolume{ID: "v3", Name: old.Name, SizeBytes: 2 * gib, Replicas: 1})
		// The tombstone's id is still taken until it is purged.
		h.must(&DeleteVolume{VolumeID: "v3"})
		h.fails(&CreateVolume{ID: "v1", Name: old.Name, SizeBytes: gib, Replicas: 3}, ErrAlreadyExists)
		h.must(&PurgeVolume{VolumeID: "v1"})
		h.must(&CreateVolume{ID: "v1", Name: old.Name, SizeBytes: gib, Replicas: 3})
	})
}

func TestApplyAttachVolume(t *testing.T) {
	tests := []struct {
		name      string
		setup     func(h *harness)
		cmd       func(v *Volume) *AttachVolume
		wantErr   error
		wantEpoch func(v *Volume) uint64 // for successes
	}{
		{name: "attach", cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantEpoch: func(v *Volume) uint64 { return v.Epoch + 1 }},
		{name: "attach read-only to a node without a replica", setup: func(h *harness) { h.addNode("n9", "", 10) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n9", ReadOnly: true, ExpectEpoch: v.Epoch}
			}, wantEpoch: func(v *Volume) uint64 { return v.Epoch + 1 }},
		{name: "stale epoch", cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch - 1}
		}, wantErr: ErrEpochMismatch},
		{name: "future epoch", cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch + 1}
		}, wantErr: ErrEpochMismatch},
		{name: "unknown volume", cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "nope", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantErr: ErrNotFound},
		{name: "deleted volume", setup: func(h *harness) { h.must(&DeleteVolume{VolumeID: "v1"}) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantErr: ErrNotFound},
		{name: "unknown node", cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "v1", NodeID: "nope", ExpectEpoch: v.Epoch}
		}, wantErr: ErrNotFound},
		{name: "down node", setup: func(h *harness) { h.must(&SetNodeState{NodeID: "n1", State: NodeDown}) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "draining node", setup: func(h *harness) { h.must(&SetNodeState{NodeID: "n1", State: NodeDraining}) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "RWO: attached elsewhere", setup: func(h *harness) { h.attach("v1", "n2") },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "same node, other read-only flag", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ReadOnly: true, ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "idempotent re-attach", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantEpoch: func(v *Volume) uint64 { return v.Epoch }},
		{name: "idempotent retry with the pre-attach epoch", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch - 1}
			}, wantEpoch: func(v *Volume) uint64 { return v.Epoch }},
		{name: "attach with an NBD socket", cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockA, ExpectEpoch: v.Epoch}
		}, wantEpoch: func(v *Volume) uint64 { return v.Epoch + 1 }},
		{name: "idempotent re-attach with the same NBD socket", setup: func(h *harness) { h.attachNBD("v1", "n1", sockA) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockA, ExpectEpoch: v.Epoch}
			}, wantEpoch: func(v *Volume) uint64 { return v.Epoch }},
		{name: "idempotent retry with the same NBD socket and the pre-attach epoch", setup: func(h *harness) { h.attachNBD("v1", "n1", sockA) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockA, ExpectEpoch: v.Epoch - 1}
			}, wantEpoch: func(v *Volume) uint64 { return v.Epoch }},
		{name: "same node, other NBD socket", setup: func(h *harness) { h.attachNBD("v1", "n1", sockA) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockB, ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "same node, NBD socket added", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockA, ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "same node, NBD socket dropped", setup: func(h *harness) { h.attachNBD("v1", "n1", sockA) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "same node and NBD socket, other read-only flag", setup: func(h *harness) { h.attachNBD("v1", "n1", sockA) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ReadOnly: true, NBDSocket: sockA, ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "other node, same NBD socket", setup: func(h *harness) { h.attachNBD("v1", "n2", sockA) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockA, ExpectEpoch: v.Epoch}
			}, wantErr: ErrFailedPrecondition},
		{name: "provisioning volume", setup: func(h *harness) {
			h.must(&DeleteVolume{VolumeID: "v1"})
			h.must(&PurgeVolume{VolumeID: "v1"})
			h.must(&CreateVolume{ID: "v1", Name: "p", SizeBytes: gib, Replicas: 3, ContentSource: "s"})
		}, cmd: func(v *Volume) *AttachVolume {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantErr: ErrIllegalTransition},
		{name: "failed volume", setup: func(h *harness) { h.must(&SetVolumeState{VolumeID: "v1", State: VolumeFailed}) },
			cmd: func(v *Volume) *AttachVolume {
				return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}, wantErr: ErrIllegalTransition},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.createVolume("v1", 1, 3)
			if tt.setup != nil {
				tt.setup(h)
			}
			before := h.volume("v1")
			cmd := tt.cmd(before)
			if tt.wantErr != nil {
				h.fails(cmd, tt.wantErr)
				return
			}
			res := h.must(cmd)
			after := h.volume("v1")
			if !reflect.DeepEqual(res.Volume, after) {
				t.Fatalf("result %+v, stored %+v", res.Volume, after)
			}
			if want := tt.wantEpoch(before); after.Epoch != want {
				t.Fatalf("epoch %d → %d, want %d", before.Epoch, after.Epoch, want)
			}
			wantAtt := &Attachment{Node: cmd.NodeID, ReadOnly: cmd.ReadOnly, NBDSocket: cmd.NBDSocket}
			if after.State != VolumeAttached || !reflect.DeepEqual(after.Attachment, wantAtt) {
				t.Fatalf("state %s attachment %+v, want attached %+v", after.State, after.Attachment, wantAtt)
			}
			// Nothing else moved.
			before.State, before.Attachment, before.Epoch = after.State, after.Attachment, after.Epoch
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("attach changed more than state, attachment and epoch:\n%+v\n%+v", before, after)
			}
		})
	}
}

// NBD sockets for the attach tests.
const (
	sockA = "/run/cairn/nbd/a.sock"
	sockB = "/run/cairn/nbd/b.sock"
)

// TestApplyAttachDetachNBDSocket: a detach forgets the socket, and the next
// attach may name another one.
func TestApplyAttachDetachNBDSocket(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	h.createVolume("v1", 1, 3)
	v := h.attachNBD("v1", "n1", sockA)
	if want := (&Attachment{Node: "n1", NBDSocket: sockA}); !reflect.DeepEqual(v.Attachment, want) {
		t.Fatalf("attachment %+v, want %+v", v.Attachment, want)
	}
	h.fails(&AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockB, ExpectEpoch: v.Epoch}, ErrFailedPrecondition)
	v = h.must(&DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}).Volume
	if v.Attachment != nil {
		t.Fatalf("detached volume keeps attachment %+v", v.Attachment)
	}
	v2 := h.attachNBD("v1", "n1", sockB)
	if v2.Epoch != v.Epoch+1 || v2.Attachment.NBDSocket != sockB {
		t.Fatalf("re-attach with another socket: epoch %d (want %d), attachment %+v", v2.Epoch, v.Epoch+1, v2.Attachment)
	}
}

func TestApplyDetachVolume(t *testing.T) {
	tests := []struct {
		name       string
		attach     string // node to attach to first ("" = leave detached)
		releasing  bool
		cmd        func(v *Volume) *DetachVolume
		wantErr    error
		wantChange bool
	}{
		{name: "detach", attach: "n1", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantChange: true},
		{name: "detach from any node", attach: "n2", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", ExpectEpoch: v.Epoch}
		}, wantChange: true},
		{name: "detach a releasing volume", attach: "n1", releasing: true, cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantChange: true},
		{name: "already detached", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch + 7}
		}},
		{name: "stale epoch", attach: "n1", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch - 1}
		}, wantErr: ErrEpochMismatch},
		{name: "future epoch", attach: "n1", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch + 1}
		}, wantErr: ErrEpochMismatch},
		{name: "attached to another node", attach: "n1", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "v1", NodeID: "n2", ExpectEpoch: v.Epoch}
		}, wantErr: ErrFailedPrecondition},
		{name: "unknown volume", attach: "n1", cmd: func(v *Volume) *DetachVolume {
			return &DetachVolume{VolumeID: "nope", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantErr: ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.createVolume("v1", 1, 3)
			if tt.attach != "" {
				h.attach("v1", tt.attach)
			}
			if tt.releasing {
				h.must(&SetVolumeState{VolumeID: "v1", State: VolumeReleasing})
			}
			before := h.volume("v1")
			cmd := tt.cmd(before)
			if tt.wantErr != nil {
				h.fails(cmd, tt.wantErr)
				return
			}
			res := h.must(cmd)
			after := h.volume("v1")
			if !reflect.DeepEqual(res.Volume, after) {
				t.Fatalf("result %+v, stored %+v", res.Volume, after)
			}
			if !tt.wantChange {
				if !reflect.DeepEqual(before, after) {
					t.Fatalf("idempotent detach changed the volume:\n%+v\n%+v", before, after)
				}
				return
			}
			if after.Epoch != before.Epoch+1 || after.State != VolumeAvailable || after.Attachment != nil {
				t.Fatalf("after detach: epoch %d (was %d), state %s, attachment %+v", after.Epoch, before.Epoch, after.State, after.Attachment)
			}
		})
	}

	t.Run("attach elsewhere after detach", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		v := h.createVolume("v1", 1, 3)
		v = h.attach("v1", "n1")
		// A second writer is refused while the first holds it, with the current epoch.
		h.fails(&AttachVolume{VolumeID: "v1", NodeID: "n2", ExpectEpoch: v.Epoch}, ErrFailedPrecondition)
		v = h.must(&DetachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}).Volume
		// The old engine's epoch is fenced out: attaching with it fails.
		h.fails(&AttachVolume{VolumeID: "v1", NodeID: "n2", ExpectEpoch: v.Epoch - 1}, ErrEpochMismatch)
		v2 := h.attach("v1", "n2")
		if v2.Epoch != v.Epoch+1 || v2.Attachment.Node != "n2" {
			t.Fatalf("re-attach: %+v", v2)
		}
	})
}

// replicaInState builds a three-replica volume and brings its first replica
// into state st through legal commands; it returns the replica id.
func replicaInState(h *harness, st ReplicaState) string {
	h.t.Helper()
	v := h.createVolume("v1", 1, 3)
	id := v.Replicas[0].ID
	switch st {
	case ReplicaHealthy:
	case ReplicaStale:
		h.setReplica("v1", id, ReplicaStale)
	case ReplicaFailed:
		h.setReplica("v1", id, ReplicaFailed)
	case ReplicaRebuilding:
		h.setReplica("v1", id, ReplicaFailed)
		h.setReplica("v1", id, ReplicaRebuilding)
	default:
		h.t.Fatalf("no way to reach replica state %q", st)
	}
	return id
}

var allReplicaStates = []ReplicaState{ReplicaHealthy, ReplicaRebuilding, ReplicaStale, ReplicaFailed}

func TestApplySetReplicaStateAllPairs(t *testing.T) {
	legal := func(from, to ReplicaState) bool {
		for _, s := range replicaTransitions[from] {
			if s == to {
				return true
			}
		}
		return false
	}
	for _, from := range allReplicaStates {
		for _, to := range append(allReplicaStates, "bogus", "") {
			t.Run(fmt.Sprintf("%s→%s", from, to), func(t *testing.T) {
				h := newHarness(t)
				h.cluster(3, 10)
				rid := replicaInState(h, from)
				before := h.volume("v1")
				cmd := &SetReplicaState{VolumeID: "v1", ReplicaID: rid, State: to, ExpectEpoch: before.Epoch}
				if !legal(from, to) {
					h.fails(cmd, ErrIllegalTransition)
					return
				}
				res := h.must(cmd)
				after := h.volume("v1")
				if !reflect.DeepEqual(res.Volume, after) {
					t.Fatalf("result %+v, stored %+v", res.Volume, after)
				}
				if after.Epoch != before.Epoch+1 {
					t.Fatalf("epoch %d → %d, want +1", before.Epoch, after.Epoch)
				}
				want := before.Clone()
				want.Replicas[0].State = to
				want.Epoch++
				if !reflect.DeepEqual(after, want) {
					t.Fatalf("volume = %+v\nwant %+v", after, want)
				}
			})
		}
	}
}

func TestApplySetReplicaState(t *testing.T) {
	t.Run("errors", func(t *testing.T) {
		tests := []struct {
			name    string
			cmd     func(v *Volume) *SetReplicaState
			wantErr error
		}{
			{"stale epoch", func(v *Volume) *SetReplicaState {
				return &SetReplicaState{VolumeID: v.ID, ReplicaID: v.Replicas[0].ID, State: ReplicaFailed, ExpectEpoch: v.Epoch - 1}
			}, ErrEpochMismatch},
			{"future epoch", func(v *Volume) *SetReplicaState {
				return &SetReplicaState{VolumeID: v.ID, ReplicaID: v.Replicas[0].ID, State: ReplicaFailed, ExpectEpoch: v.Epoch + 1}
			}, ErrEpochMismatch},
			{"unknown volume", func(v *Volume) *SetReplicaState {
				return &SetReplicaState{VolumeID: "nope", ReplicaID: v.Replicas[0].ID, State: ReplicaFailed, ExpectEpoch: v.Epoch}
			}, ErrNotFound},
			{"unknown replica", func(v *Volume) *SetReplicaState {
				return &SetReplicaState{VolumeID: v.ID, ReplicaID: v.ID + "-r9", State: ReplicaFailed, ExpectEpoch: v.Epoch}
			}, ErrNotFound},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				h := newHarness(t)
				h.cluster(3, 10)
				v := h.createVolume("v1", 1, 3)
				h.fails(tt.cmd(v), tt.wantErr)
			})
		}
	})

	t.Run("never eject the last healthy replica", func(t *testing.T) {
		for _, to := range []ReplicaState{ReplicaFailed, ReplicaStale} {
			for replicas := 1; replicas <= 3; replicas++ {
				t.Run(fmt.Sprintf("%d replicas to %s", replicas, to), func(t *testing.T) {
					h := newHarness(t)
					h.cluster(3, 10)
					v := h.createVolume("v1", 1, replicas)
					for i := 0; i < replicas-1; i++ {
						v = h.setReplica("v1", v.Replicas[i].ID, to)
					}
					if v.HealthyReplicas() != 1 {
						t.Fatalf("%d healthy replicas, want 1", v.HealthyReplicas())
					}
					h.fails(&SetReplicaState{VolumeID: "v1", ReplicaID: v.Replicas[replicas-1].ID, State: to, ExpectEpoch: v.Epoch}, ErrQuorumLost)
				})
			}
		}
	})

	t.Run("deleted volume", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		v := h.createVolume("v1", 1, 3)
		v = h.must(&DeleteVolume{VolumeID: "v1"}).Volume
		h.fails(&SetReplicaState{VolumeID: "v1", ReplicaID: v.Replicas[0].ID, State: ReplicaFailed, ExpectEpoch: v.Epoch}, ErrNotFound)
	})

	t.Run("eject then rebuild back to healthy", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		v := h.createVolume("v1", 1, 3)
		r := v.Replicas[1].ID
		for i, st := range []ReplicaState{ReplicaFailed, ReplicaRebuilding, ReplicaHealthy, ReplicaStale, ReplicaRebuilding, ReplicaHealthy} {
			v2 := h.setReplica("v1", r, st)
			if v2.Epoch != v.Epoch+uint64(i)+1 {
				t.Fatalf("step %d: epoch %d, want %d", i, v2.Epoch, v.Epoch+uint64(i)+1)
			}
		}
	})
}

func TestApplyReplaceReplica(t *testing.T) {
	tests := []struct {
		name    string
		nodes   int
		state   ReplicaState // of the replaced replica
		cmd     func(v *Volume, rid string) *ReplaceReplica
		wantErr error
	}{
		{name: "failed replica", nodes: 4, state: ReplicaFailed},
		{name: "stale replica", nodes: 4, state: ReplicaStale},
		{name: "rebuilding replica", nodes: 4, state: ReplicaRebuilding},
		{name: "healthy replica", nodes: 4, state: ReplicaHealthy, wantErr: ErrFailedPrecondition},
		{name: "no spare node", nodes: 3, state: ReplicaFailed, wantErr: ErrResourceExhausted},
		{name: "stale epoch", nodes: 4, state: ReplicaFailed, cmd: func(v *Volume, rid string) *ReplaceReplica {
			return &ReplaceReplica{VolumeID: v.ID, ReplicaID: rid, ExpectEpoch: v.Epoch - 1}
		}, wantErr: ErrEpochMismatch},
		{name: "future epoch", nodes: 4, state: ReplicaFailed, cmd: func(v *Volume, rid string) *ReplaceReplica {
			return &ReplaceReplica{VolumeID: v.ID, ReplicaID: rid, ExpectEpoch: v.Epoch + 1}
		}, wantErr: ErrEpochMismatch},
		{name: "unknown replica", nodes: 4, state: ReplicaFailed, cmd: func(v *Volume, rid string) *ReplaceReplica {
			return &ReplaceReplica{VolumeID: v.ID, ReplicaID: "v1-r77", ExpectEpoch: v.Epoch}
		}, wantErr: ErrNotFound},
		{name: "unknown volume", nodes: 4, state: ReplicaFailed, cmd: func(v *Volume, rid string) *ReplaceReplica {
			return &ReplaceReplica{VolumeID: "nope", ReplicaID: rid, ExpectEpoch: v.Epoch}
		}, wantErr: ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(tt.nodes, 10)
			rid := replicaInState(h, tt.state)
			before := h.volume("v1")
			cmd := &ReplaceReplica{VolumeID: "v1", ReplicaID: rid, ExpectEpoch: before.Epoch}
			if tt.cmd != nil {
				cmd = tt.cmd(before, rid)
			}
			if tt.wantErr != nil {
				h.fails(cmd, tt.wantErr)
				return
			}
			res := h.must(cmd)
			after := h.volume("v1")
			if !reflect.DeepEqual(res.Volume, after) {
				t.Fatalf("result %+v, stored %+v", res.Volume, after)
			}
			if after.Epoch != before.Epoch+1 {
				t.Fatalf("epoch %d → %d, want +1", before.Epoch, after.Epoch)
			}
			if len(after.Replicas) != len(before.Replicas) {
				t.Fatalf("replica count %d → %d", len(before.Replicas), len(after.Replicas))
			}
			nr := after.Replicas[0] // the replaced one was first; it keeps its slot
			if want := fmt.Sprintf("v1-r%d", before.NextReplicaSeq+1); nr.ID != want || after.NextReplicaSeq != before.NextReplicaSeq+1 {
				t.Fatalf("new replica id %q (seq %d), want %q", nr.ID, after.NextReplicaSeq, want)
			}
			if nr.State != ReplicaRebuilding {
				t.Fatalf("new replica is %s, want rebuilding", nr.State)
			}
			for _, r := range before.Replicas {
				if r.Node == nr.Node {
					t.Fatalf("new replica on %s, which held a replica of the volume (%s)", nr.Node, r.ID)
				}
				if r.ID == nr.ID {
					t.Fatalf("replica id %s reused", r.ID)
				}
			}
			for i := 1; i < len(after.Replicas); i++ {
				if !reflect.DeepEqual(after.Replicas[i], before.Replicas[i]) {
					t.Fatalf("replica %d changed: %+v → %+v", i, before.Replicas[i], after.Replicas[i])
				}
			}
		})
	}

	t.Run("ids are never reused", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(6, 10)
		v := h.createVolume("v1", 1, 2)
		seen := map[string]bool{v.Replicas[0].ID: true, v.Replicas[1].ID: true}
		for i := 0; i < 6; i++ {
			rid := v.Replicas[1].ID
			if v.Replicas[1].State == ReplicaHealthy {
				v = h.setReplica("v1", rid, ReplicaFailed)
			}
			v = h.must(&ReplaceReplica{VolumeID: "v1", ReplicaID: rid, ExpectEpoch: v.Epoch}).Volume
			nid := v.Replicas[1].ID
			if seen[nid] {
				t.Fatalf("replica id %s handed out twice", nid)
			}
			seen[nid] = true
		}
	})

	t.Run("replacement goes to the zone that lost a replica", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(6, 10, "zone-a", "zone-b", "zone-c") // n1,n4 a; n2,n5 b; n3,n6 c
		v := h.createVolume("v1", 1, 3)
		zoneOf := map[string]string{}
		h.f.View(func(s *State) {
			for id, n := range s.Nodes {
				zoneOf[id] = n.Zone
			}
		})
		lost := v.Replicas[2]
		v = h.setReplica("v1", lost.ID, ReplicaFailed)
		v = h.must(&ReplaceReplica{VolumeID: "v1", ReplicaID: lost.ID, ExpectEpoch: v.Epoch}).Volume
		if got, want := zoneOf[v.Replicas[2].Node], zoneOf[lost.Node]; got != want {
			t.Fatalf("replacement in %s, want %s (the zone that lost its replica)", got, want)
		}
	})

	t.Run("never back onto the replaced node", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(2, 10)
		h.addNode("n3", "", 10)
		h.must(&SetNodeState{NodeID: "n3", State: NodeDown})
		v2 := h.createVolume("v2", 1, 2) // on n1 and n2
		v2 = h.setReplica("v2", v2.Replicas[0].ID, ReplicaFailed)
		// Only the replaced replica's own node and the other replica's node are up.
		h.fails(&ReplaceReplica{VolumeID: "v2", ReplicaID: v2.Replicas[0].ID, ExpectEpoch: v2.Epoch}, ErrResourceExhausted)
	})
}

var allVolumeStates = []VolumeState{
	VolumePending, VolumeProvisioning, VolumeAvailable, VolumeAttached,
	VolumeReleasing, VolumeDeleted, VolumeFailed,
}

// volumeInState creates volume v1 and brings it into state st; a pending
// volume, which no command produces, is made through a snapshot.
func volumeInState(h *harness, st VolumeState) {
	h.t.Helper()
	switch st {
	case VolumeProvisioning:
		h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 3, ContentSource: "snap-0"})
		return
	}
	h.createVolume("v1", 1, 3)
	switch st {
	case VolumePending:
		s := h.state()
		s.Volumes["v1"].State = VolumePending
		h.restoreState(s)
	case VolumeAvailable:
	case VolumeAttached:
		h.attach("v1", "n1")
	case VolumeReleasing:
		h.attach("v1", "n1")
		h.must(&SetVolumeState{VolumeID: "v1", State: VolumeReleasing})
	case VolumeFailed:
		h.must(&SetVolumeState{VolumeID: "v1", State: VolumeFailed})
	case VolumeDeleted:
		h.must(&DeleteVolume{VolumeID: "v1"})
	default:
		h.t.Fatalf("no way to reach volume state %q", st)
	}
	if got := h.volume("v1").State; got != st {
		h.t.Fatalf("set-up volume is %s, want %s", got, st)
	}
}

func TestCheckTransitionTable(t *testing.T) {
	for _, from := range allVolumeStates {
		if _, ok := volumeTransitions[from]; !ok {
			t.Errorf("state %s has no row in volumeTransitions", from)
		}
		for _, to := range allVolumeStates {
			legal := false
			for _, s := range volumeTransitions[from] {
				legal = legal || s == to
			}
			err := checkTransition(from, to)
			if legal && err != nil {
				t.Errorf("checkTransition(%s, %s) = %v, want nil", from, to, err)
			}
			if !legal && !errors.Is(err, ErrIllegalTransition) {
				t.Errorf("checkTransition(%s, %s) = %v, want ErrIllegalTransition", from, to, err)
			}
		}
		if err := checkTransition(from, "bogus"); !errors.Is(err, ErrIllegalTransition) {
			t.Errorf("checkTransition(%s, bogus) = %v", from, err)
		}
	}
	for _, to := range volumeTransitions[VolumeDeleted] {
		t.Errorf("deleted is terminal, but the table allows deleted → %s", to)
	}
}

// TestApplySetVolumeStateAllPairs tries every (from, to) pair of lifecycle
// states through SetVolumeState.
func TestApplySetVolumeStateAllPairs(t *testing.T) {
	legal := func(from, to VolumeState) bool {
		for _, s := range volumeTransitions[from] {
			if s == to {
				return true
			}
		}
		return false
	}
	for _, from := range allVolumeStates {
		for _, to := range append(allVolumeStates, "bogus", "") {
			var wantErr error
			switch {
			case from == VolumeDeleted:
				wantErr = ErrNotFound // a tombstone is not a live volume
			case to == VolumeAttached || to == VolumeDeleted:
				wantErr = ErrInvalidArgument // these have their own commands
			case to == VolumeAvailable && (from == VolumeAttached || from == VolumeReleasing):
				wantErr = ErrFailedPrecondition // still attached: DetachVolume fences the engine
			case !legal(from, to):
				wantErr = ErrIllegalTransition
			}
			t.Run(fmt.Sprintf("%s→%s", from, to), func(t *testing.T) {
				h := newHarness(t)
				h.cluster(3, 10)
				volumeInState(h, from)
				before := h.volume("v1")
				cmd := &SetVolumeState{VolumeID: "v1", State: to}
				if wantErr != nil {
					h.fails(cmd, wantErr)
					if got := h.volume("v1").State; got != from {
						t.Fatalf("refused transition left the volume %s, want %s", got, from)
					}
					return
				}
				res := h.must(cmd)
				after := h.volume("v1")
				if !reflect.DeepEqual(res.Volume, after) {
					t.Fatalf("result %+v, stored %+v", res.Volume, after)
				}
				if after.State != to {
					t.Fatalf("state %s, want %s", after.State, to)
				}
				if to == VolumeAvailable && after.Attachment != nil {
					t.Fatalf("available volume still attached: %+v", after.Attachment)
				}
				// Only the state (and, going to available, the attachment and
				// epoch) may change.
				want := before.Clone()
				want.State = to
				if to == VolumeAvailable {
					want.Attachment = nil
					want.Epoch = after.Epoch
				}
				if !reflect.DeepEqual(after, want) {
					t.Fatalf("volume = %+v\nwant %+v", after, want)
				}
				if after.Epoch < before.Epoch {
					t.Fatalf("epoch went back from %d to %d", before.Epoch, after.Epoch)
				}
			})
		}
	}
	t.Run("unknown volume", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		h.fails(&SetVolumeState{VolumeID: "nope", State: VolumeFailed}, ErrNotFound)
	})
}

// knownBugSetVolumeStateDetach: SetVolumeState(available) on an attached or
// releasing volume (apply.go, applySetVolumeState) clears the attachment
// without incrementing the epoch, breaking "every change of attachment
// increments the epoch" (docs/architecture.md, "Store contract"): the old
// engine's epoch stays valid after its attachment is gone. Set this to false
// once fixed; the test below and the property test then enforce the rule.
const knownBugSetVolumeStateDetach = false

// TestSetVolumeStateClearingAttachmentMovesEpoch: clearing an attachment
// through SetVolumeState must either be refused (use DetachVolume, which is
// compare-and-set) or increment the epoch.
func TestSetVolumeStateClearingAttachmentMovesEpoch(t *testing.T) {
	if knownBugSetVolumeStateDetach {
		t.Skip("known bug: applySetVolumeState clears the attachment without an epoch increment (see knownBugSetVolumeStateDetach)")
	}
	for _, from := range []string{"attached", "releasing", "failed while attached"} {
		t.Run(from, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			if from == "failed while attached" {
				volumeInState(h, VolumeAttached)
				h.must(&SetVolumeState{VolumeID: "v1", State: VolumeFailed}) // keeps the attachment
			} else {
				volumeInState(h, VolumeState(from))
			}
			before := h.volume("v1")
			if _, err := h.apply(&SetVolumeState{VolumeID: "v1", State: VolumeAvailable}); err != nil {
				return // refused: fine, DetachVolume is the way
			}
			if after := h.volume("v1"); after.Attachment == nil && after.Epoch <= before.Epoch {
				t.Fatalf("attachment %+v cleared at epoch %d without an increment", before.Attachment, after.Epoch)
			}
		})
	}
}

func TestApplySnapshots(t *testing.T) {
	t.Run("create", func(t *testing.T) {
		tests := []struct {
			name    string
			setup   func(h *harness)
			cmd     *CreateSnapshot
			wantErr error
			want    *Snapshot
		}{
			{name: "new", cmd: &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1", CreatedAt: 9},
				want: &Snapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1", SizeBytes: 2 * gib, CreatedAt: 9}},
			{name: "of an attached volume", setup: func(h *harness) { h.attach("v1", "n1") },
				cmd:  &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1", CreatedAt: 9},
				want: &Snapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1", SizeBytes: 2 * gib, CreatedAt: 9}},
			{name: "idempotent: same name and source", setup: func(h *harness) {
				h.must(&CreateSnapshot{ID: "s0", Name: "vs-1", SourceVolumeID: "v1", CreatedAt: 1})
			}, cmd: &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1", CreatedAt: 9},
				want: &Snapshot{ID: "s0", Name: "vs-1", SourceVolumeID: "v1", SizeBytes: 2 * gib, CreatedAt: 1}},
			{name: "same name, other source", setup: func(h *harness) {
				h.createVolume("v2", 1, 1)
				h.must(&CreateSnapshot{ID: "s0", Name: "vs-1", SourceVolumeID: "v2"})
			}, cmd: &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"}, wantErr: ErrAlreadyExists},
			{name: "same id, other name", setup: func(h *harness) {
				h.must(&CreateSnapshot{ID: "s1", Name: "vs-0", SourceVolumeID: "v1"})
			}, cmd: &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"}, wantErr: ErrAlreadyExists},
			{name: "no id", cmd: &CreateSnapshot{Name: "vs-1", SourceVolumeID: "v1"}, wantErr: ErrInvalidArgument},
			{name: "no name", cmd: &CreateSnapshot{ID: "s1", SourceVolumeID: "v1"}, wantErr: ErrInvalidArgument},
			{name: "no source", cmd: &CreateSnapshot{ID: "s1", Name: "vs-1"}, wantErr: ErrInvalidArgument},
			{name: "unknown source", cmd: &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "nope"}, wantErr: ErrNotFound},
			{name: "deleted source", setup: func(h *harness) { h.must(&DeleteVolume{VolumeID: "v1"}) },
				cmd: &CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"}, wantErr: ErrNotFound},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				h := newHarness(t)
				h.cluster(3, 10)
				h.createVolume("v1", 2, 3)
				if tt.setup != nil {
					tt.setup(h)
				}
				if tt.wantErr != nil {
					h.fails(tt.cmd, tt.wantErr)
					return
				}
				before := h.state()
				res := h.must(tt.cmd)
				if !reflect.DeepEqual(res.Snapshot, tt.want) || res.Volume != nil || res.Node != nil {
					t.Fatalf("result %+v, want snapshot %+v", res, tt.want)
				}
				after := h.state()
				if got := after.Snapshots[tt.want.ID]; !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("stored %+v, want %+v", got, tt.want)
				}
				// A snapshot changes no volume.
				if !reflect.DeepEqual(before.Volumes, after.Volumes) {
					t.Fatal("CreateSnapshot changed a volume")
				}
			})
		}
	})

	t.Run("delete", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		h.createVolume("v1", 1, 3)
		h.must(&CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1"})
		h.must(&CreateSnapshot{ID: "s2", Name: "vs-2", SourceVolumeID: "v1"})
		h.fails(&DeleteSnapshot{SnapshotID: "nope"}, ErrNotFound)
		h.fails(&DeleteSnapshot{}, ErrNotFound)
		if res := h.must(&DeleteSnapshot{SnapshotID: "s1"}); !reflect.DeepEqual(res, Result{}) {
			t.Fatalf("result %+v, want empty", res)
		}
		s := h.state()
		if _, ok := s.Snapshots["s1"]; ok || len(s.Snapshots) != 1 {
			t.Fatalf("snapshots after delete: %+v", s.Snapshots)
		}
		h.fails(&DeleteSnapshot{SnapshotID: "s1"}, ErrNotFound)
		// The name is free again.
		h.must(&CreateSnapshot{ID: "s3", Name: "vs-1", SourceVolumeID: "v1"})
	})
}

func TestApplyPurgeVolume(t *testing.T) {
	tests := []struct {
		name    string
		state   VolumeState
		id      string
		wantErr error
	}{
		{"deleted", VolumeDeleted, "v1", nil},
		{"unknown", VolumeAvailable, "nope", ErrNotFound},
		{"pending", VolumePending, "v1", ErrFailedPrecondition},
		{"provisioning", VolumeProvisioning, "v1", ErrFailedPrecondition},
		{"available", VolumeAvailable, "v1", ErrFailedPrecondition},
		{"attached", VolumeAttached, "v1", ErrFailedPrecondition},
		{"releasing", VolumeReleasing, "v1", ErrFailedPrecondition},
		{"failed", VolumeFailed, "v1", ErrFailedPrecondition},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			volumeInState(h, tt.state)
			if tt.wantErr != nil {
				h.fails(&PurgeVolume{VolumeID: tt.id}, tt.wantErr)
				return
			}
			before := h.state()
			if res := h.must(&PurgeVolume{VolumeID: tt.id}); !reflect.DeepEqual(res, Result{}) {
				t.Fatalf("result %+v, want empty", res)
			}
			after := h.state()
			delete(before.Volumes, tt.id)
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("purge changed more than the volume:\n%s", dumpJSON(after))
			}
			h.fails(&PurgeVolume{VolumeID: tt.id}, ErrNotFound)
		})
	}
}

func TestApplyUnknownCommandType(t *testing.T) {
	// A Command implementation apply has no case for (a programming error)
	// gets an error, not a panic.
	s := NewState()
	if _, err := apply(s, foreignCommand{}); !errors.Is(err, ErrBadCommand) {
		t.Fatalf("apply(foreign) = %v, want ErrBadCommand", err)
	}
	if _, err := apply(s, nil); !errors.Is(err, ErrBadCommand) {
		t.Fatalf("apply(nil) = %v, want ErrBadCommand", err)
	}
}

type foreignCommand struct{}

func (foreignCommand) Type() CommandType { return 250 }

// TestTransitionTablesPinned pins the lifecycle tables (docs/architecture.md,
// "Lifecycles"), so that a change to them is a deliberate edit of this
// test too; the pair tests above derive their expectations from the tables.
func TestTransitionTablesPinned(t *testing.T) {
	wantVolume := map[VolumeState][]VolumeState{
		VolumePending:      {VolumeProvisioning, VolumeAvailable, VolumeFailed, VolumeDeleted},
		VolumeProvisioning: {VolumeAvailable, VolumeFailed, VolumeDeleted},
		VolumeAvailable:    {VolumeAttached, VolumeDeleted, VolumeFailed},
		VolumeAttached:     {VolumeReleasing, VolumeAvailable, VolumeFailed},
		VolumeReleasing:    {VolumeAvailable, VolumeFailed},
		VolumeFailed:       {VolumeAvailable, VolumeDeleted},
		VolumeDeleted:      {},
	}
	if !reflect.DeepEqual(volumeTransitions, wantVolume) {
		t.Errorf("volumeTransitions = %v\nwant %v", volumeTransitions, wantVolume)
	}
	wantReplica := map[ReplicaState][]ReplicaState{
		ReplicaHealthy:    {ReplicaStale, ReplicaFailed, ReplicaFollowing},
		ReplicaRebuilding: {ReplicaHealthy, ReplicaFailed, ReplicaStale},
		ReplicaStale:      {ReplicaRebuilding, ReplicaFailed},
		ReplicaFailed:     {ReplicaRebuilding},
		ReplicaFollowing:  {ReplicaHealthy, ReplicaFailed, ReplicaStale},
	}
	if !reflect.DeepEqual(replicaTransitions, wantReplica) {
		t.Errorf("replicaTransitions = %v\nwant %v", replicaTransitions, wantReplica)
	}
}

// rebuildingVolume builds volume v1 with three replicas on a four-node
// cluster and brings its first replica into state st; it returns the replica
// id.
func rebuildingVolume(h *harness, st ReplicaState) string {
	h.t.Helper()
	h.cluster(4, 10)
	return replicaInState(h, st)
}

func TestApplyRebuildProgress(t *testing.T) {
	const total = gib
	tests := []struct {
		name    string
		state   ReplicaState // of replica rid, the first of v1
		setup   func(h *harness, rid string)
		cmd     func(rid string) *RebuildProgressUpdate
		wantErr error
	}{
		{name: "rebuilding: progress", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total / 2, BytesCopied: total / 8}
		}},
		{name: "rebuilding: nothing done yet", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total}
		}},
		{name: "rebuilding: all compared and copied", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total, BytesCopied: total}
		}},
		{name: "rebuilding: done", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total, BytesCopied: 3, Done: true}
		}},
		{name: "rebuilding: zero total", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid}
		}},
		{name: "rebuilding: replaces earlier progress", state: ReplicaRebuilding,
			setup: func(h *harness, rid string) {
				h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total / 2})
			}, cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total / 4}
			}},
		{name: "rebuilding: while attached", state: ReplicaRebuilding,
			setup: func(h *harness, rid string) { h.attachNBD("v1", "n2", sockA) },
			cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 1, BytesCopied: 1}
			}},
		{name: "healthy: done (reported after the replica was marked healthy)", state: ReplicaHealthy,
			cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total, BytesCopied: total, Done: true}
			}},

		{name: "healthy: not done", state: ReplicaHealthy, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 1}
		}, wantErr: ErrFailedPrecondition},
		{name: "stale: not done", state: ReplicaStale, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 1}
		}, wantErr: ErrFailedPrecondition},
		{name: "failed: not done", state: ReplicaFailed, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 1}
		}, wantErr: ErrFailedPrecondition},
		{name: "healthy: not done, earlier progress kept", state: ReplicaRebuilding,
			setup: func(h *harness, rid string) {
				h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total, BytesCopied: 5})
				h.setReplica("v1", rid, ReplicaHealthy)
			}, cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 1}
			}, wantErr: ErrFailedPrecondition},
		{name: "compared beyond total", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total + 1}
		}, wantErr: ErrInvalidArgument},
		{name: "copied beyond total", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: total, BytesCopied: total + 1}
		}, wantErr: ErrInvalidArgument},
		{name: "progress with zero total", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesCompared: 1}
		}, wantErr: ErrInvalidArgument},
		{name: "compared beyond total, done", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: 1, BytesCompared: 1 << 63, Done: true}
		}, wantErr: ErrInvalidArgument},
		{name: "beyond total, earlier progress kept", state: ReplicaRebuilding,
			setup: func(h *harness, rid string) {
				h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 7, BytesCopied: 3})
			}, cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, BytesCompared: 2 * total}
			}, wantErr: ErrInvalidArgument},
		{name: "unknown volume", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "nope", ReplicaID: rid, BytesTotal: total}
		}, wantErr: ErrNotFound},
		{name: "unknown volume, done", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "nope", ReplicaID: rid, BytesTotal: total, Done: true}
		}, wantErr: ErrNotFound},
		{name: "empty volume id", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{ReplicaID: rid, BytesTotal: total}
		}, wantErr: ErrNotFound},
		{name: "unknown replica", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: "v1-r77", BytesTotal: total}
		}, wantErr: ErrNotFound},
		{name: "unknown replica, done", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: "v1-r77", BytesTotal: total, Done: true}
		}, wantErr: ErrNotFound},
		{name: "empty replica id", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", BytesTotal: total}
		}, wantErr: ErrNotFound},
		{name: "unknown replica beyond total", state: ReplicaRebuilding, cmd: func(rid string) *RebuildProgressUpdate {
			return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: "v1-r77", BytesTotal: 1, BytesCompared: 2}
		}, wantErr: ErrNotFound},
		{name: "replica of another volume", state: ReplicaRebuilding,
			setup: func(h *harness, rid string) { h.createVolume("v2", 1, 2) },
			cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: "v2-r1", BytesTotal: total}
			}, wantErr: ErrNotFound},
		{name: "replaced replica", state: ReplicaFailed,
			setup: func(h *harness, rid string) {
				h.must(&ReplaceReplica{VolumeID: "v1", ReplicaID: rid, ExpectEpoch: h.volume("v1").Epoch})
			}, cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, Done: true}
			}, wantErr: ErrNotFound},
		{name: "deleted volume", state: ReplicaRebuilding,
			setup: func(h *harness, rid string) { h.must(&DeleteVolume{VolumeID: "v1"}) },
			cmd: func(rid string) *RebuildProgressUpdate {
				return &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: total, Done: true}
			}, wantErr: ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			rid := rebuildingVolume(h, tt.state)
			if tt.setup != nil {
				tt.setup(h, rid)
			}
			cmd := tt.cmd(rid)
			before := h.state()
			if tt.wantErr != nil {
				h.fails(cmd, tt.wantErr)
				// The harness checks this after every failed entry; say it
				// here too, since it is the point of these cases.
				if after := h.state(); !reflect.DeepEqual(before, after) {
					t.Fatalf("refused update changed the state:\n%s", dumpJSON(after))
				}
				return
			}
			res := h.must(cmd)
			after := h.state()
			v := after.Volumes["v1"]
			if !reflect.DeepEqual(res.Volume, v) || res.Node != nil || res.Snapshot != nil {
				t.Fatalf("result %+v, stored volume %+v", res, v)
			}
			wantRebuild := &RebuildProgress{ReplicaID: cmd.ReplicaID, BytesTotal: cmd.BytesTotal,
				BytesCompared: cmd.BytesCompared, BytesCopied: cmd.BytesCopied, Done: cmd.Done}
			if !reflect.DeepEqual(v.Rebuild, wantRebuild) {
				t.Fatalf("rebuild progress %+v, want %+v", v.Rebuild, wantRebuild)
			}
			// Only the progress moved: no epoch, replica, attachment or
			// state change, and no other volume or node touched.
			want := before.Clone()
			want.Volumes["v1"].Rebuild = wantRebuild
			if !reflect.DeepEqual(after, want) {
				t.Fatalf("progress update changed more than Volume.Rebuild:\nbefore %s\n after %s", dumpJSON(before), dumpJSON(after))
			}
			if v.Epoch != before.Volumes["v1"].Epoch {
				t.Fatalf("epoch %d → %d, want unchanged", before.Volumes["v1"].Epoch, v.Epoch)
			}
			// The result is a copy.
			res.Volume.Rebuild.BytesCopied = 12345
			if h.volume("v1").Rebuild.BytesCopied == 12345 {
				t.Fatal("the result aliases the stored rebuild progress")
			}
		})
	}

	// A progress update is not a compare-and-set: it needs no epoch, and the
	// engine's next compare-and-set still sees the epoch it knew.
	t.Run("engine epoch survives progress", func(t *testing.T) {
		h := newHarness(t)
		rid := rebuildingVolume(h, ReplicaRebuilding)
		v := h.volume("v1")
		for i := uint64(0); i <= 4; i++ {
			h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: 4, BytesCompared: i, BytesCopied: i / 2})
		}
		v2 := h.must(&SetReplicaState{VolumeID: "v1", ReplicaID: rid, State: ReplicaHealthy, ExpectEpoch: v.Epoch}).Volume
		if v2.Epoch != v.Epoch+1 || v2.Rebuild == nil || v2.Rebuild.BytesCompared != 4 {
			t.Fatalf("after rebuild: %+v (rebuild %+v)", v2, v2.Rebuild)
		}
		h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: 4, BytesCompared: 4, BytesCopied: 2, Done: true})
		if got := h.volume("v1"); got.Epoch != v2.Epoch || !got.Rebuild.Done {
			t.Fatalf("done report: epoch %d (want %d), rebuild %+v", got.Epoch, v2.Epoch, got.Rebuild)
		}
	})

	// The volume records one rebuild: progress of another replica replaces it.
	t.Run("another replica's progress replaces the record", func(t *testing.T) {
		h := newHarness(t)
		rid := rebuildingVolume(h, ReplicaRebuilding)
		v := h.volume("v1")
		other := v.Replicas[1].ID
		h.setReplica("v1", other, ReplicaFailed)
		h.setReplica("v1", other, ReplicaRebuilding)
		h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: 10, BytesCompared: 5})
		h.must(&RebuildProgressUpdate{VolumeID: "v1", ReplicaID: other, BytesTotal: 20, BytesCopied: 1})
		want := &RebuildProgress{ReplicaID: other, BytesTotal: 20, BytesCopied: 1}
		if got := h.volume("v1").Rebuild; !reflect.DeepEqual(got, want) {
			t.Fatalf("rebuild %+v, want %+v", got, want)
		}
	})

	// Every replica state: not done is refused unless rebuilding; done is
	// recorded whatever the state.
	for _, st := range allReplicaStates {
		for _, done := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s done=%v", st, done), func(t *testing.T) {
				h := newHarness(t)
				rid := rebuildingVolume(h, st)
				cmd := &RebuildProgressUpdate{VolumeID: "v1", ReplicaID: rid, BytesTotal: 8, BytesCompared: 8, BytesCopied: 1, Done: done}
				if st != ReplicaRebuilding && !done {
					h.fails(cmd, ErrFailedPrecondition)
					return
				}
				before := h.volume("v1")
				after := h.must(cmd).Volume
				if after.Epoch != before.Epoch || after.Rebuild == nil || after.Rebuild.Done != done {
					t.Fatalf("epoch %d → %d, rebuild %+v", before.Epoch, after.Epoch, after.Rebuild)
				}
			})
		}
	}
}

// setParametersBase are the parameters volume v1 of TestApplySetParameters
// is created with: two keys SetParameters may not change, two it may.
var setParametersBase = map[string]string{"replicas": "2", "fsType": "xfs", volspec.KeyMaxIOPS: "1000", volspec.KeyBurstDuration: "1s"}

// withParams returns a copy of setParametersBase changed by kv (key, value
// pairs; an empty value removes the key).
func withParams(kv ...string) map[string]string {
	out := map[string]string{}
	for k, v := range setParametersBase {
		out[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			delete(out, kv[i])
		} else {
			out[kv[i]] = kv[i+1]
		}
	}
	return out
}

func TestApplySetParameters(t *testing.T) {
	p := func(kv ...string) map[string]string {
		out := map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			out[kv[i]] = kv[i+1]
		}
		return out
	}
	tests := []struct {
		name   string
		setup  func(h *harness)
		volume string // default v1
		params map[string]string
		// want is v1's parameters after a success.
		want    map[string]string
		wantErr error
		// badKey is the key a refusal must name.
		badKey string
	}{
		{name: "add a key, keep the others", params: p(volspec.KeyMaxBandwidth, "1048576"),
			want: withParams(volspec.KeyMaxBandwidth, "1048576")},
		{name: "change a key", params: p(volspec.KeyMaxIOPS, "2500"), want: withParams(volspec.KeyMaxIOPS, "2500")},
		{name: "empty value removes the key", params: p(volspec.KeyBurstDuration, ""), want: withParams(volspec.KeyBurstDuration, "")},
		{name: "remove a key that is not there", params: p(volspec.KeyMinIOPS, ""), want: withParams()},
		{name: "remove every QoS key", params: p(volspec.KeyMaxIOPS, "", volspec.KeyBurstDuration, ""),
			want: map[string]string{"replicas": "2", "fsType": "xfs"}},
		{name: "every key at once", params: p(volspec.KeyMaxIOPS, "5000", volspec.KeyMinIOPS, "100", volspec.KeyMaxBandwidth, "1", volspec.KeyBurstDuration, "250ms"),
			want: withParams(volspec.KeyMaxIOPS, "5000", volspec.KeyMinIOPS, "100", volspec.KeyMaxBandwidth, "1", volspec.KeyBurstDuration, "250ms")},
		{name: "remove maxIOPS and set minIOPS above it", params: p(volspec.KeyMaxIOPS, "", volspec.KeyMinIOPS, "5000"),
			want: withParams(volspec.KeyMaxIOPS, "", volspec.KeyMinIOPS, "5000")},
		{name: "minIOPS equal to maxIOPS", params: p(volspec.KeyMinIOPS, "1000"), want: withParams(volspec.KeyMinIOPS, "1000")},
		{name: "unlimited maxIOPS under any minIOPS", params: p(volspec.KeyMaxIOPS, "0", volspec.KeyMinIOPS, "7000"),
			want: withParams(volspec.KeyMaxIOPS, "0", volspec.KeyMinIOPS, "7000")},
		{name: "raise maxIOPS and minIOPS together", setup: func(h *harness) {
			h.must(&SetParameters{VolumeID: "v1", Parameters: p(volspec.KeyMinIOPS, "900")})
		}, params: p(volspec.KeyMaxIOPS, "3000", volspec.KeyMinIOPS, "2000"), want: withParams(volspec.KeyMaxIOPS, "3000", volspec.KeyMinIOPS, "2000")},
		{name: "the same values again", params: p(volspec.KeyMaxIOPS, "1000", volspec.KeyBurstDuration, "1s"), want: withParams()},
		{name: "no parameters changes nothing", params: nil, want: withParams()},
		{name: "an empty map changes nothing", params: map[string]string{}, want: withParams()},
		{name: "attached volume", setup: func(h *harness) { h.attachNBD("v1", h.volume("v1").Replicas[0].Node, sockA) },
			params: p(volspec.KeyMaxIOPS, "10"), want: withParams(volspec.KeyMaxIOPS, "10")},
		{name: "failed volume", setup: func(h *harness) { h.must(&SetVolumeState{VolumeID: "v1", State: VolumeFailed}) },
			params: p(volspec.KeyMaxIOPS, "10"), want: withParams(volspec.KeyMaxIOPS, "10")},
		{name: "replica ejected", setup: func(h *harness) { h.setReplica("v1", h.volume("v1").Replicas[0].ID, ReplicaFailed) },
			params: p(volspec.KeyMaxIOPS, "10"), want: withParams(volspec.KeyMaxIOPS, "10")},

		{name: "immutable key", params: p("replicas", "3"), wantErr: ErrInvalidArgument, badKey: "replicas"},
		{name: "immutable key removed", params: p("fsType", ""), wantErr: ErrInvalidArgument, badKey: "fsType"},
		{name: "immutable key set to its value", params: p("replicas", "2"), wantErr: ErrInvalidArgument, badKey: "replicas"},
		{name: "immutable key among good ones", params: p(volspec.KeyMaxIOPS, "5", "fsType", "ext4", volspec.KeyBurstDuration, ""),
			wantErr: ErrInvalidArgument, badKey: "fsType"},
		{name: "unknown key", params: p("maxLatency", "5ms"), wantErr: ErrInvalidArgument, badKey: "maxLatency"},
		{name: "key in another case", params: p("maxiops", "5"), wantErr: ErrInvalidArgument, badKey: "maxiops"},
		{name: "empty key", params: p("", "5"), wantErr: ErrInvalidArgument, badKey: ""},
		{name: "maxIOPS not a number", params: p(volspec.KeyMaxIOPS, "lots"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMaxIOPS},
		{name: "maxIOPS negative", params: p(volspec.KeyMaxIOPS, "-1"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMaxIOPS},
		{name: "minIOPS a fraction", params: p(volspec.KeyMinIOPS, "0.5"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMinIOPS},
		{name: "maxBandwidth with a unit", params: p(volspec.KeyMaxBandwidth, "10MiB"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMaxBandwidth},
		{name: "burstDuration zero", params: p(volspec.KeyBurstDuration, "0s"), wantErr: ErrInvalidArgument, badKey: volspec.KeyBurstDuration},
		{name: "burstDuration negative", params: p(volspec.KeyBurstDuration, "-2s"), wantErr: ErrInvalidArgument, badKey: volspec.KeyBurstDuration},
		{name: "burstDuration without a unit", params: p(volspec.KeyBurstDuration, "3"), wantErr: ErrInvalidArgument, badKey: volspec.KeyBurstDuration},
		{name: "bad value among good ones", params: p(volspec.KeyMaxIOPS, "5000", volspec.KeyMaxBandwidth, "fast", volspec.KeyBurstDuration, ""),
			wantErr: ErrInvalidArgument, badKey: volspec.KeyMaxBandwidth},
		{name: "minIOPS above the stored maxIOPS", params: p(volspec.KeyMinIOPS, "1001"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMinIOPS},
		{name: "minIOPS above maxIOPS in one command", params: p(volspec.KeyMaxIOPS, "100", volspec.KeyMinIOPS, "200"),
			wantErr: ErrInvalidArgument, badKey: volspec.KeyMinIOPS},
		{name: "maxIOPS below the stored minIOPS", setup: func(h *harness) {
			h.must(&SetParameters{VolumeID: "v1", Parameters: p(volspec.KeyMinIOPS, "500")})
		}, params: p(volspec.KeyMaxIOPS, "499"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMinIOPS},
		// The store refuses a change that leaves a bad value behind, even
		// one the command does not touch. CreateVolume refuses bad values
		// now, but a store from before it did may hold one: the snapshot
		// stands for it.
		{name: "a stored bad value must be fixed first", setup: func(h *harness) {
			h.must(&CreateVolume{ID: "v-bad", Name: "pvc-v-bad", SizeBytes: gib, Replicas: 1, CreatedAt: 1})
			st := h.state()
			st.Volumes["v-bad"].Parameters = p(volspec.KeyMaxIOPS, "lots")
			h.restoreState(st)
		}, volume: "v-bad", params: p(volspec.KeyBurstDuration, "1s"), wantErr: ErrInvalidArgument, badKey: volspec.KeyMaxIOPS},

		{name: "unknown volume", volume: "nope", params: p(volspec.KeyMaxIOPS, "5"), wantErr: ErrNotFound},
		{name: "unknown volume, bad key", volume: "nope", params: p("replicas", "5"), wantErr: ErrNotFound},
		{name: "empty volume id", volume: "-", params: p(volspec.KeyMaxIOPS, "5"), wantErr: ErrNotFound},
		{name: "deleted volume", setup: func(h *harness) {
			h.createVolume("v-del", 1, 1)
			h.must(&DeleteVolume{VolumeID: "v-del"})
		}, volume: "v-del", params: p(volspec.KeyMaxIOPS, "5"), wantErr: ErrNotFound},
		{name: "purged volume", setup: func(h *harness) {
			h.createVolume("v-del", 1, 1)
			h.must(&DeleteVolume{VolumeID: "v-del"})
			h.must(&PurgeVolume{VolumeID: "v-del"})
		}, volume: "v-del", params: p(volspec.KeyMaxIOPS, "5"), wantErr: ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 2, Parameters: withParams(), CreatedAt: 1})
			h.must(&CreateVolume{ID: "v2", Name: "pvc-v2", SizeBytes: gib, Replicas: 2,
				Parameters: p(volspec.KeyMaxIOPS, "7"), CreatedAt: 2})
			if tt.setup != nil {
				tt.setup(h)
			}
			id := tt.volume
			switch id {
			case "":
				id = "v1"
			case "-":
				id = ""
			}
			cmd := &SetParameters{VolumeID: id, Parameters: tt.params}
			before := h.state()
			if tt.wantErr != nil {
				err := h.fails(cmd, tt.wantErr)
				// The harness checks this after every failed entry; say it
				// here too, since it is the point of these cases.
				if after := h.state(); !reflect.DeepEqual(before, after) {
					t.Fatalf("refused SetParameters changed the state:\nbefore %s\n after %s", dumpJSON(before), dumpJSON(after))
				}
				if tt.badKey != "" && !strings.Contains(err.Error(), fmt.Sprintf("%q", tt.badKey)) {
					t.Errorf("error %q does not name parameter %q", err, tt.badKey)
				}
				return
			}
			res := h.must(cmd)
			after := h.state()
			v := after.Volumes[id]
			if !reflect.DeepEqual(res.Volume, v) || res.Node != nil || res.Snapshot != nil {
				t.Fatalf("result %+v, stored volume %+v", res, v)
			}
			if !reflect.DeepEqual(v.Parameters, tt.want) {
				t.Fatalf("parameters %v, want %v", v.Parameters, tt.want)
			}
			if _, err := volspec.Decode(v.Parameters); err != nil {
				t.Fatalf("stored parameters do not parse: %v", err)
			}
			// Only the parameters moved: no epoch, replica, attachment or
			// state change, and no other volume or node touched.
			if v.Epoch != before.Volumes[id].Epoch {
				t.Fatalf("epoch %d → %d, want unchanged", before.Volumes[id].Epoch, v.Epoch)
			}
			want := before.Clone()
			want.Volumes[id].Parameters = tt.want
			if !reflect.DeepEqual(after, want) {
				t.Fatalf("SetParameters changed more than the volume's parameters:\nbefore %s\n after %s", dumpJSON(before), dumpJSON(after))
			}
			// Neither the result nor the command aliases the stored map.
			res.Volume.Parameters[volspec.KeyMaxIOPS] = "12345"
			for k := range tt.params {
				tt.params[k] = "54321"
			}
			if got := h.volume(id).Parameters; !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("stored parameters changed through the result or the command: %v", got)
			}
		})
	}

	// QoS changes never fence an engine: the epoch it holds stays good for
	// its next compare-and-set.
	t.Run("engine epoch survives parameter changes", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		v := h.createVolume("v1", 1, 2)
		v = h.attach("v1", v.Replicas[0].Node)
		for _, iops := range []string{"100", "200", "", "300"} {
			got := h.must(&SetParameters{VolumeID: "v1", Parameters: p(volspec.KeyMaxIOPS, iops)}).Volume
			if got.Epoch != v.Epoch || !reflect.DeepEqual(got.Attachment, v.Attachment) || !reflect.DeepEqual(got.Replicas, v.Replicas) {
				t.Fatalf("SetParameters moved epoch %d → %d, attachment %+v → %+v", v.Epoch, got.Epoch, v.Attachment, got.Attachment)
			}
		}
		h.must(&DetachVolume{VolumeID: "v1", NodeID: v.Attachment.Node, ExpectEpoch: v.Epoch})
	})

	// Applied through a snapshot, a changed volume reads back the same, and
	// the restored FSM answers the next change the same way.
	t.Run("parameters survive a snapshot", func(t *testing.T) {
		h := newHarness(t)
		h.cluster(3, 10)
		h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 2, Parameters: withParams(), CreatedAt: 1})
		h.must(&SetParameters{VolumeID: "v1", Parameters: p(volspec.KeyMaxIOPS, "", volspec.KeyMaxBandwidth, "4096")})
		r := newHarness(t)
		r.restoreState(h.state())
		if a, b := h.state(), r.state(); !reflect.DeepEqual(a, b) {
			t.Fatalf("restored state differs:\n%s\n%s", dumpJSON(b), dumpJSON(a))
		}
		c := &SetParameters{VolumeID: "v1", Parameters: p(volspec.KeyMinIOPS, "9")}
		r1, err1 := h.apply(c)
		r2, err2 := r.apply(c)
		if err1 != nil || err2 != nil || !reflect.DeepEqual(r1, r2) {
			t.Fatalf("after restore: (%+v, %v) vs original (%+v, %v)", r2, err2, r1, err1)
		}
	})
}

// knownBugSetParametersNoneLeft: applySetParameters (apply.go) always stores
// a new, non-nil map, so a volume left without parameters (all removed, or
// an empty SetParameters on a volume created without any) holds an empty map
// where a snapshot restores nil: a restored member is no longer deeply equal
// to the others, and answers with another Result. Set this to false once
// applySetParameters stores nil for an empty map; the test below and the
// randomized test then enforce it.
const knownBugSetParametersNoneLeft = false

func TestApplySetParametersNoneLeft(t *testing.T) {
	if knownBugSetParametersNoneLeft {
		t.Skip("known bug: applySetParameters leaves an empty map that a snapshot restores as nil (see knownBugSetParametersNoneLeft)")
	}
	for _, tt := range []struct {
		name   string
		create map[string]string
		params map[string]string
	}{
		{"remove the last key", map[string]string{volspec.KeyMaxIOPS: "5"}, map[string]string{volspec.KeyMaxIOPS: ""}},
		{"empty command on a volume without parameters", nil, nil},
		{"empty map on a volume without parameters", nil, map[string]string{}},
		{"remove a key from a volume without parameters", nil, map[string]string{volspec.KeyMinIOPS: ""}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.must(&CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 2, Parameters: tt.create, CreatedAt: 1})
			res := h.must(&SetParameters{VolumeID: "v1", Parameters: tt.params})
			r := newHarness(t)
			r.restoreState(h.state())
			if a, b := h.state(), r.state(); !reflect.DeepEqual(a, b) {
				t.Fatalf("restored state differs: parameters %#v, restored %#v", a.Volumes["v1"].Parameters, b.Volumes["v1"].Parameters)
			}
			if got := r.volume("v1"); !reflect.DeepEqual(res.Volume, got) {
				t.Fatalf("result %#v, restored volume %#v", res.Volume.Parameters, got.Parameters)
			}
		})
	}
}

// knownBugSetParametersErrorOrder: applySetParameters (apply.go) checks the
// keys of a command in map order, so a command with several keys it may not
// change is refused naming a random one of them. That message is remembered
// in the request table (State.Requests), which is replicated and
// snapshotted: members applying the same request store different states.
// Set this to false once the keys are checked in a fixed order; the test
// below and the randomized test (whose generator then sends several bad
// keys at once) enforce it.
const knownBugSetParametersErrorOrder = false

func TestApplySetParametersErrorIsDeterministic(t *testing.T) {
	if knownBugSetParametersErrorOrder {
		t.Skip("known bug: applySetParameters names a random one of several refused keys (see knownBugSetParametersErrorOrder)")
	}
	cmd := &SetParameters{VolumeID: "v1", Parameters: map[string]string{
		"replicas": "3", "fsType": "ext4", "maxLatency": "1ms", "zone": "a", volspec.KeyMaxIOPS: "x", volspec.KeyMinIOPS: "-1"}}
	var first *State
	for i := 0; i < 20; i++ {
		h := newHarness(t)
		h.cluster(3, 10)
		h.createVolume("v1", 1, 2)
		_, err := h.apply(wrap(t, "req-1", cmd))
		if !errors.Is(err, ErrInvalidArgument) {
			t.Fatalf("apply = %v, want ErrInvalidArgument", err)
		}
		if s := h.state(); first == nil {
			first = s
		} else if !reflect.DeepEqual(s.Requests, first.Requests) {
			t.Fatalf("the same request left different records:\n%s\n%s", dumpJSON(first.Requests), dumpJSON(s.Requests))
		}
	}
}

// wrap encodes c into a Request with the given id, as Client.Apply sends it.
func wrap(t testing.TB, id string, c Command) *Request {
	t.Helper()
	b, err := Encode(c)
	if err != nil {
		t.Fatalf("Encode(%#v): %v", c, err)
	}
	return &Request{ID: id, Command: b}
}

// sameAnswer fails the test unless (res, err) is (wantRes, wantErr): equal
// results, and errors of the same sentinel with the same message, or none.
func sameAnswer(t testing.TB, what string, res Result, err error, wantRes Result, wantErr error) {
	t.Helper()
	if !reflect.DeepEqual(res, wantRes) || !reflect.DeepEqual(toWire(err), toWire(wantErr)) {
		t.Fatalf("%s = (%+v, %v), want (%+v, %v)", what, res, err, wantRes, wantErr)
	}
}

// TestApplyRequestAppliesOnce: a command in a Request is applied once however
// often the request is sent, and a retry gets the first answer, error
// included; under another id it is another request and is applied again. A
// twin FSM applying the bare command once and then again gives the expected
// answers and states.
func TestApplyRequestAppliesOnce(t *testing.T) {
	cluster3 := func(h *harness) { h.cluster(3, 10) }
	withVolume := func(h *harness) { h.cluster(3, 10); h.createVolume("v1", 1, 3) }
	tests := []struct {
		name  string
		setup func(h *harness)
		cmd   func(s *State) Command
		// first and again are the errors of the bare command applied once
		// and then a second time.
		first, again error
	}{
		{name: "init cluster (an empty result)",
			cmd: func(*State) Command { return &InitCluster{ClusterID: "c1", OverProvisioningRatio: 2} }},
		{name: "register node", cmd: func(*State) Command {
			return &RegisterNode{Node: Node{ID: "n1", RaftAddr: "n1:7000", APIAddr: "n1:7001", CapacityBytes: gib}, Time: 5}
		}},
		{name: "create volume (idempotent by name)", setup: cluster3, cmd: func(*State) Command {
			return &CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 3, CreatedAt: 1}
		}},
		{name: "attach volume (idempotent when attached so)", setup: withVolume, cmd: func(s *State) Command {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", NBDSocket: sockA, ExpectEpoch: s.Volumes["v1"].Epoch}
		}},
		{name: "set replica state (compare-and-set)", setup: withVolume, cmd: func(s *State) Command {
			v := s.Volumes["v1"]
			return &SetReplicaState{VolumeID: "v1", ReplicaID: v.Replicas[0].ID, State: ReplicaStale, ExpectEpoch: v.Epoch}
		}, again: ErrEpochMismatch},
		{name: "replace replica (compare-and-set, places a replica)", setup: func(h *harness) {
			h.cluster(5, 10)
			v := h.createVolume("v1", 1, 3)
			h.setReplica("v1", v.Replicas[0].ID, ReplicaFailed)
		}, cmd: func(s *State) Command {
			v := s.Volumes["v1"]
			return &ReplaceReplica{VolumeID: "v1", ReplicaID: v.Replicas[0].ID, ExpectEpoch: v.Epoch}
		}, again: ErrNotFound}, // the replica it names is gone
		{name: "delete volume", setup: withVolume, cmd: func(*State) Command { return &DeleteVolume{VolumeID: "v1"} },
			again: ErrNotFound},
		{name: "delete snapshot", setup: func(h *harness) {
			withVolume(h)
			h.must(&CreateSnapshot{ID: "s1", Name: "vs-1", SourceVolumeID: "v1", CreatedAt: 2})
		}, cmd: func(*State) Command { return &DeleteSnapshot{SnapshotID: "s1"} }, again: ErrNotFound},
		{name: "failing: volume not found", setup: cluster3, cmd: func(*State) Command { return &DeleteVolume{VolumeID: "nope"} },
			first: ErrNotFound, again: ErrNotFound},
		{name: "failing: stale epoch", setup: withVolume, cmd: func(s *State) Command {
			return &AttachVolume{VolumeID: "v1", NodeID: "n1", ExpectEpoch: s.Volumes["v1"].Epoch + 1}
		}, first: ErrEpochMismatch, again: ErrEpochMismatch},
		{name: "failing: cluster mismatch", setup: cluster3, cmd: func(*State) Command { return &InitCluster{ClusterID: "other"} },
			first: ErrClusterMismatch, again: ErrClusterMismatch},
		{name: "failing: no room", setup: func(h *harness) { h.cluster(2, 10) }, cmd: func(*State) Command {
			return &CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 3}
		}, first: ErrResourceExhausted, again: ErrResourceExhausted},
		{name: "failing: illegal transition", setup: withVolume, cmd: func(*State) Command {
			return &SetVolumeState{VolumeID: "v1", State: VolumeReleasing}
		}, first: ErrIllegalTransition, again: ErrIllegalTransition},
		{name: "set parameters (the same values again change nothing)", setup: withVolume, cmd: func(*State) Command {
			return &SetParameters{VolumeID: "v1", Parameters: map[string]string{volspec.KeyMaxIOPS: "800", volspec.KeyBurstDuration: "2s"}}
		}},
		{name: "failing: parameter not mutable", setup: withVolume, cmd: func(*State) Command {
			return &SetParameters{VolumeID: "v1", Parameters: map[string]string{volspec.KeyMaxIOPS: "800", "replicas": "5"}}
		}, first: ErrInvalidArgument, again: ErrInvalidArgument},
		{name: "failing: minIOPS above maxIOPS", setup: withVolume, cmd: func(*State) Command {
			return &SetParameters{VolumeID: "v1", Parameters: map[string]string{volspec.KeyMaxIOPS: "100", volspec.KeyMinIOPS: "200"}}
		}, first: ErrInvalidArgument, again: ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			direct, wrapped := newHarness(t), newHarness(t)
			if tt.setup != nil {
				tt.setup(direct)
				tt.setup(wrapped)
			}
			before := wrapped.state()
			c := tt.cmd(before)

			// The bare command, applied once and then again.
			res1, err1 := direct.apply(c)
			once := direct.state()
			res2, err2 := direct.apply(c)
			twice := direct.state()
			for _, e := range []struct{ got, want error }{{err1, tt.first}, {err2, tt.again}} {
				if !errors.Is(e.got, e.want) || (e.want == nil && e.got != nil) {
					t.Fatalf("bare command: errors (%v, %v), want (%v, %v)", err1, err2, tt.first, tt.again)
				}
			}

			// In a request: applied once, with its record.
			res, err := wrapped.apply(wrap(t, "req-a", c))
			sameAnswer(t, "request", res, err, res1, err1)
			after := wrapped.state()
			if got := stripRequests(after); !reflect.DeepEqual(got, once) {
				t.Fatalf("the request changed the state otherwise than its command:\n%s\nwant\n%s", dumpJSON(got), dumpJSON(once))
			}
			wantRecs := append(append([]RequestRecord(nil), before.Requests...), RequestRecord{ID: "req-a", Result: res1, Err: toWire(err1)})
			if !reflect.DeepEqual(after.Requests, wantRecs) {
				t.Fatalf("request table %s, want %s", dumpJSON(after.Requests), dumpJSON(wantRecs))
			}
			// Sent again: the first answer, and nothing changes.
			for i := 0; i < 2; i++ {
				res, err := wrapped.apply(wrap(t, "req-a", c))
				sameAnswer(t, "repeated request", res, err, res1, err1)
				if got := wrapped.state(); !reflect.DeepEqual(got, after) {
					t.Fatalf("repeated request changed the state:\n%s\nwant\n%s", dumpJSON(got), dumpJSON(after))
				}
			}
			// Under another id: applied again.
			res, err = wrapped.apply(wrap(t, "req-b", c))
			sameAnswer(t, "request with another id", res, err, res2, err2)
			afterB := wrapped.state()
			if got := stripRequests(afterB); !reflect.DeepEqual(got, twice) {
				t.Fatalf("the second request changed the state otherwise than its command:\n%s\nwant\n%s", dumpJSON(got), dumpJSON(twice))
			}
			if n := len(afterB.Requests); n != len(before.Requests)+2 || afterB.Requests[n-1].ID != "req-b" {
				t.Fatalf("request table after two requests: %s", dumpJSON(afterB.Requests))
			}
			// The first id still gets the first answer.
			res, err = wrapped.apply(wrap(t, "req-a", c))
			sameAnswer(t, "first request, sent a third time", res, err, res1, err1)
			if got := wrapped.state(); !reflect.DeepEqual(got, afterB) {
				t.Fatalf("repeated request changed the state")
			}
		})
	}
}

// TestApplyRequestSameIDOtherCommand: the id decides what a retry is; a
// different command under a remembered id is not applied and gets the
// remembered answer.
func TestApplyRequestSameIDOtherCommand(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	first := h.must(wrap(t, "req-a", &CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 3}))
	_, failed := h.apply(wrap(t, "req-b", &DeleteVolume{VolumeID: "nope"}))
	if !errors.Is(failed, ErrNotFound) {
		t.Fatalf("delete of an unknown volume: %v, want ErrNotFound", failed)
	}
	want := h.state()
	for _, c := range []Command{
		&DeleteVolume{VolumeID: "v1"},
		&CreateVolume{ID: "v2", Name: "pvc-v2", SizeBytes: gib, Replicas: 1},
		&InitCluster{ClusterID: "other"},
	} {
		res, err := h.apply(wrap(t, "req-a", c))
		sameAnswer(t, fmt.Sprintf("%T under req-a", c), res, err, first, nil)
		res, err = h.apply(wrap(t, "req-b", c))
		sameAnswer(t, fmt.Sprintf("%T under req-b", c), res, err, Result{}, failed)
		if got := h.state(); !reflect.DeepEqual(got, want) {
			t.Fatalf("%T under a remembered id changed the state:\n%s", c, dumpJSON(got))
		}
	}
}

// TestApplyRequestRefused: a request without an id, one in a request, and
// one whose command does not decode are refused as a whole: an error, no
// change, no record, so the id stays free.
func TestApplyRequestRefused(t *testing.T) {
	create := mustEncode(t, &CreateVolume{ID: "v2", Name: "pvc-v2", SizeBytes: gib, Replicas: 1})
	tests := []struct {
		name string
		req  *Request
		want error
	}{
		{"no id", &Request{Command: create}, ErrInvalidArgument},
		{"no id, no command", &Request{}, ErrInvalidArgument},
		{"no id, a request inside", &Request{Command: mustEncode(t, &Request{ID: "r2", Command: create})}, ErrInvalidArgument},
		{"request in a request", &Request{ID: "r1", Command: mustEncode(t, &Request{ID: "r2", Command: create})}, ErrBadCommand},
		{"request in a request, same id", &Request{ID: "r1", Command: mustEncode(t, &Request{ID: "r1", Command: create})}, ErrBadCommand},
		{"request in a request, remembered inner id", &Request{ID: "r1", Command: mustEncode(t, &Request{ID: "seen", Command: create})}, ErrBadCommand},
		{"request in a request without an id", &Request{ID: "r1", Command: mustEncode(t, &Request{})}, ErrBadCommand},
		{"no command", &Request{ID: "r1"}, ErrBadCommand},
		{"empty command", &Request{ID: "r1", Command: []byte{}}, ErrBadCommand},
		{"one byte", &Request{ID: "r1", Command: []byte{byte(CmdCreateVolume)}}, ErrBadCommand},
		{"unknown type", &Request{ID: "r1", Command: cmdBytes(200, commandVersion, `{}`)}, ErrBadCommand},
		{"type 0", &Request{ID: "r1", Command: cmdBytes(0, commandVersion, `{}`)}, ErrBadCommand},
		{"future version", &Request{ID: "r1", Command: cmdBytes(CmdDeleteVolume, commandVersion+1, `{"volume_id":"v1"}`)}, ErrBadCommand},
		{"bad JSON", &Request{ID: "r1", Command: cmdBytes(CmdCreateVolume, commandVersion, `{"id":`)}, ErrBadCommand},
		{"unknown field", &Request{ID: "r1", Command: cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":"v1","force":true}`)}, ErrBadCommand},
		{"trailing brace", &Request{ID: "r1", Command: cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":"v1"}}`)}, ErrBadCommand},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			seen := h.must(wrap(t, "seen", &CreateVolume{ID: "v1", Name: "pvc-v1", SizeBytes: gib, Replicas: 3}))
			before := h.state()
			err := h.fails(tt.req, tt.want)
			if tt.req.ID != "" {
				// A command that does not decode: the error is Decode's.
				if _, decErr := Decode(tt.req.Command); decErr != nil && err.Error() != decErr.Error() {
					t.Errorf("error %q, want Decode's %q", err, decErr)
				}
			}
			if got := h.state(); !reflect.DeepEqual(got, before) {
				t.Fatalf("refused request changed the state:\n%s", dumpJSON(got))
			}
			// The remembered request is still remembered, and a refused id
			// was not: a good request under it is applied.
			res, err := h.apply(wrap(t, "seen", &DeleteVolume{VolumeID: "v1"}))
			sameAnswer(t, "remembered request", res, err, seen, nil)
			if tt.req.ID != "" {
				res := h.must(wrap(t, tt.req.ID, &CreateVolume{ID: "v2", Name: "pvc-v2", SizeBytes: gib, Replicas: 1}))
				if res.Volume == nil || res.Volume.ID != "v2" || h.volume("v2") == nil {
					t.Fatalf("request %q after its refusal = %+v, want volume v2 created", tt.req.ID, res)
				}
			}
		})
	}
}

// TestApplyRequestEviction: the table keeps the last MaxRememberedRequests
// requests; the oldest is forgotten first, and a forgotten id is a new
// request again. It drives apply on a bare State: the harness copies the
// state, table and all, twice per entry.
func TestApplyRequestEviction(t *testing.T) {
	const max = MaxRememberedRequests
	s := NewState()
	if _, err := apply(s, &RegisterNode{Node: Node{ID: "n1", RaftAddr: "n1:7000", APIAddr: "n1:7001"}}); err != nil {
		t.Fatal(err)
	}
	// Request req-i reports i free bytes, and its result says so.
	reqs := make([]*Request, max+1)
	for i := range reqs {
		reqs[i] = wrap(t, fmt.Sprintf("req-%d", i), &NodeHeartbeat{NodeID: "n1", FreeBytes: uint64(i), Time: int64(i)})
	}
	send := func(i int) uint64 {
		t.Helper()
		res, err := apply(s, reqs[i])
		if err != nil || res.Node == nil {
			t.Fatalf("request %d = (%+v, %v)", i, res, err)
		}
		return res.Node.FreeBytes
	}
	free := func() uint64 { return s.Nodes["n1"].FreeBytes }
	checkTable := func(first, last string) {
		t.Helper()
		if n := len(s.Requests); n != max || s.Requests[0].ID != first || s.Requests[n-1].ID != last {
			t.Fatalf("table of %d records from %s to %s, want %d from %s to %s",
				n, s.Requests[0].ID, s.Requests[n-1].ID, max, first, last)
		}
	}

	for i := 0; i < max; i++ {
		if got := send(i); got != uint64(i) {
			t.Fatalf("request %d answered %d", i, got)
		}
	}
	checkTable("req-0", fmt.Sprintf("req-%d", max-1))
	// Full, and nothing forgotten yet.
	if got := send(0); got != 0 || free() != max-1 {
		t.Fatalf("req-0 repeated in a full table: answered %d, node has %d free; want 0 and %d", got, free(), max-1)
	}
	checkTable("req-0", fmt.Sprintf("req-%d", max-1))

	// One request more: the oldest is forgotten.
	if got := send(max); got != max {
		t.Fatalf("request %d answered %d", max, got)
	}
	checkTable("req-1", fmt.Sprintf("req-%d", max))
	// Every id still remembered gets its own answer and changes nothing
	// (the index was rebuilt after the eviction moved every record).
	want := s.Clone()
	for i := 1; i <= max; i++ {
		if got := send(i); got != uint64(i) {
			t.Fatalf("remembered request %d answered %d", i, got)
		}
	}
	if !statesEqual(s.Clone(), want) {
		t.Fatal("repeating remembered requests changed the state")
	}

	// The forgotten one is applied again, and remembered again.
	if got := send(0); got != 0 || free() != 0 {
		t.Fatalf("forgotten req-0: answered %d, node has %d free; want it applied again", got, free())
	}
	checkTable("req-2", "req-0")
	if _, err := apply(s, &NodeHeartbeat{NodeID: "n1", FreeBytes: 12345}); err != nil {
		t.Fatal(err)
	}
	if got := send(0); got != 0 || free() != 12345 {
		t.Fatalf("req-0 repeated: answered %d, node has %d free; want 0 and 12345", got, free())
	}

	t.Run("a table over the bound is cut down to it", func(t *testing.T) {
		// A snapshot written under a larger bound.
		s := NewState()
		for i := 0; i < max+5; i++ {
			s.Requests = append(s.Requests, RequestRecord{ID: fmt.Sprintf("old-%d", i)})
		}
		if _, err := apply(s, wrap(t, "new", &InitCluster{ClusterID: "c"})); err != nil {
			t.Fatal(err)
		}
		if n := len(s.Requests); n != max || s.Requests[0].ID != "old-6" || s.Requests[n-1].ID != "new" {
			t.Fatalf("table of %d records from %s to %s, want %d from old-6 to new", n, s.Requests[0].ID, s.Requests[n-1].ID, max)
		}
		if _, err := apply(s, wrap(t, "old-6", &InitCluster{ClusterID: "other"})); err != nil {
			t.Fatalf("remembered old-6: %v, want its remembered success", err)
		}
		if _, err := apply(s, wrap(t, "old-5", &InitCluster{ClusterID: "other"})); !errors.Is(err, ErrClusterMismatch) {
			t.Fatalf("forgotten old-5: %v, want it applied (ErrClusterMismatch)", err)
		}
	})
}

// TestApplyAdvanceEpoch: only the holder of a volume (its attached node, or
// nobody for a volume with no attachment) moves the epoch, compare-and-set,
// and nothing else changes.
func TestApplyAdvanceEpoch(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(h *harness)
		cmd     func(v *Volume) *AdvanceEpoch
		wantErr error
	}{
		{name: "attached node", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AdvanceEpoch {
				return &AdvanceEpoch{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
			}},
		{name: "no attachment, maintenance", cmd: func(v *Volume) *AdvanceEpoch {
			return &AdvanceEpoch{VolumeID: "v1", ExpectEpoch: v.Epoch}
		}},
		{name: "another node", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AdvanceEpoch {
				return &AdvanceEpoch{VolumeID: "v1", NodeID: "n2", ExpectEpoch: v.Epoch}
			},
			wantErr: ErrFailedPrecondition},
		{name: "maintenance while attached", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd:     func(v *Volume) *AdvanceEpoch { return &AdvanceEpoch{VolumeID: "v1", ExpectEpoch: v.Epoch} },
			wantErr: ErrFailedPrecondition},
		{name: "node but no attachment", cmd: func(v *Volume) *AdvanceEpoch {
			return &AdvanceEpoch{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch}
		}, wantErr: ErrFailedPrecondition},
		{name: "stale epoch", setup: func(h *harness) { h.attach("v1", "n1") },
			cmd: func(v *Volume) *AdvanceEpoch {
				return &AdvanceEpoch{VolumeID: "v1", NodeID: "n1", ExpectEpoch: v.Epoch - 1}
			}, wantErr: ErrEpochMismatch},
		{name: "unknown volume", cmd: func(v *Volume) *AdvanceEpoch {
			return &AdvanceEpoch{VolumeID: "nope", ExpectEpoch: v.Epoch}
		}, wantErr: ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.createVolume("v1", 1, 3)
			if tt.setup != nil {
				tt.setup(h)
			}
			before := h.volume("v1")
			cmd := tt.cmd(before)
			if tt.wantErr != nil {
				h.fails(cmd, tt.wantErr)
				if after := h.volume("v1"); !reflect.DeepEqual(before, after) {
					t.Fatalf("a refused command changed the volume:\n%+v\n%+v", before, after)
				}
				return
			}
			res := h.must(cmd)
			after := h.volume("v1")
			if !reflect.DeepEqual(res.Volume, after) {
				t.Fatalf("result %+v, stored %+v", res.Volume, after)
			}
			if after.Epoch != before.Epoch+1 {
				t.Fatalf("epoch %d → %d, want +1", before.Epoch, after.Epoch)
			}
			before.Epoch = after.Epoch
			if !reflect.DeepEqual(before, after) {
				t.Fatalf("advance changed more than the epoch:\n%+v\n%+v", before, after)
			}
		})
	}
}
