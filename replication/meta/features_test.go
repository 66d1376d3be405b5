package meta

import (
	"slices"
	"strings"
	"testing"

	"github.com/cairn-csi/cairn/replication/crypt"
)

// TestCompressionPlacement: a volume with compression goes only on nodes
// that recorded the feature; too few of them is ResourceExhausted naming
// the nodes that did not; volumes without it go anywhere; a restore keeps
// its source's compression; the create of such a volume is gated as
// SetNodeFeatures, and a node's record of its features speaks for it.
func TestCompressionPlacement(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	for _, n := range []string{"n1", "n2"} {
		got := h.must(&SetNodeFeatures{NodeID: n, Features: []string{FeatureCompressionLZ4, FeatureCompressionLZ4}}).Node
		if !slices.Equal(got.Features, []string{FeatureCompressionLZ4}) {
			t.Fatalf("%s's features %v", n, got.Features)
		}
	}
	h.fails(&SetNodeFeatures{NodeID: "n9", Features: []string{FeatureCompressionLZ4}}, ErrNotFound)
	lz4 := func(id string, replicas int) *CreateVolume {
		return &CreateVolume{ID: id, Name: "pvc-" + id, SizeBytes: gib, Replicas: replicas,
			Parameters: map[string]string{"compression": "lz4"}}
	}
	if got := replicaNodes(h.must(lz4("c1", 2)).Volume); !slices.Equal(got, []string{"n1", "n2"}) {
		t.Fatalf("c1 on %v, want n1 and n2, the nodes that can compress", got)
	}
	err := h.fails(lz4("c2", 3), ErrResourceExhausted)
	if !strings.Contains(err.Error(), "node n3 has not said it can do "+FeatureCompressionLZ4) {
		t.Errorf("refusal %q does not name n3 and the feature", err)
	}
	if got := replicaNodes(h.must(&CreateVolume{ID: "p1", Name: "pvc-p1", SizeBytes: gib, Replicas: 3}).Volume); len(got) != 3 {
		t.Fatalf("a volume without compression on %v, want every node", got)
	}
	if st := h.state().Clone(); !slices.Equal(st.Nodes["n1"].Features, []string{FeatureCompressionLZ4}) {
		t.Errorf("a clone of the state lost n1's features: %v", st.Nodes["n1"].Features)
	}

	// A restore shares its source's layers: compressed or not as it is.
	h.readySnapshot("s1", "c1")
	restore := func(id string, params map[string]string) *RestoreVolume {
		return &RestoreVolume{CreateVolume: CreateVolume{ID: id, Name: "pvc-" + id, SizeBytes: gib, Replicas: 2, Parameters: params,
			ContentSource: "snapshot:s1"}, SnapshotID: "s1"}
	}
	err = h.fails(restore("r1", nil), ErrInvalidArgument)
	if !strings.Contains(err.Error(), `compression must be the source volume's ("lz4")`) {
		t.Errorf("a plain restore of a compressed volume: %v", err)
	}
	h.must(restore("r2", map[string]string{"compression": "lz4"}))

	for _, c := range []Command{lz4("x", 1), &AdmitVolume{CreateVolume: *lz4("y", 1)}, restore("z", map[string]string{"compression": "lz4"})} {
		if typ, gated := gatedType(c); typ != CmdSetNodeFeatures || !gated {
			t.Errorf("%T with compression gated as %d (%v), want %d", c, typ, gated, CmdSetNodeFeatures)
		}
	}
	// The stored form, as a client of the store may send it, is checked
	// too: compression with encryption is refused.
	sealed := lz4("e1", 1)
	sealed.Parameters["encryption"] = "aes-256-gcm"
	sealed.Encryption = &crypt.WrappedKey{}
	if err := h.fails(sealed, ErrInvalidArgument); !strings.Contains(err.Error(), "cannot go with encryption") {
		t.Errorf("compression with encryption: %v", err)
	}
	if got := nodesNamedBy(mustEncode(t, &SetNodeFeatures{NodeID: "n2"})); !slices.Equal(got, []string{"n2"}) {
		t.Errorf("SetNodeFeatures names %v, want [n2]", got)
	}
}

func mustEncode(t *testing.T, c Command) []byte {
	t.Helper()
	b, err := Encode(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
