package storagenode

import (
	"testing"

	"github.com/cairn-csi/cairn/replication/meta"
)

func TestServingNode(t *testing.T) {
	s := meta.NewState()
	for _, n := range []struct {
		id    string
		state meta.NodeState
	}{{"n1", meta.NodeDown}, {"n2", meta.NodeUp}, {"n3", meta.NodeUp}} {
		s.Nodes[n.id] = &meta.Node{ID: n.id, State: n.state}
	}
	replicas := []meta.Replica{
		{ID: "v-r1", Node: "n1", State: meta.ReplicaHealthy},    // its node is down
		{ID: "v-r2", Node: "n2", State: meta.ReplicaRebuilding}, // no data to cut yet
		{ID: "v-r3", Node: "n3", State: meta.ReplicaHealthy},
	}
	for _, tc := range []struct {
		name string
		v    *meta.Volume
		want string
	}{
		{"attached: its node", &meta.Volume{Replicas: replicas, Attachment: &meta.Attachment{Node: "n1"}}, "n1"},
		{"unattached: the first healthy replica on a node that is up", &meta.Volume{Replicas: replicas}, "n3"},
		{"no healthy replica on a node that is up: nobody", &meta.Volume{Replicas: replicas[:2]}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := servingNode(s, tc.v); got != tc.want {
				t.Fatalf("servingNode = %q, want %q", got, tc.want)
			}
		})
	}
}
