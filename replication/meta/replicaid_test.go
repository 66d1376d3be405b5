package meta

import "testing"

func TestVolumeOfReplica(t *testing.T) {
	// The store's own ids come back to their volume.
	v := &Volume{ID: "vol-0123abcd"}
	for range 12 {
		if id := v.nextReplicaID(); VolumeOfReplica(id) != v.ID {
			t.Fatalf("VolumeOfReplica(%q) = %q, want %q", id, VolumeOfReplica(id), v.ID)
		}
	}
	for _, tc := range []struct{ id, want string }{
		{"pvc-6f1c-r1", "pvc-6f1c"},
		{"vol-a-r12", "vol-a"},
		{"vol-r-r3", "vol-r"}, // the last -r<n> counts
		{"my-rack-r0", "my-rack"},
		{"vol-rx", "vol-rx"}, // not a sequence
		{"vol-r", "vol-r"},   // no sequence
		{"-r1", "-r1"},       // no volume
		{"vol", "vol"},
	} {
		if got := VolumeOfReplica(tc.id); got != tc.want {
			t.Errorf("VolumeOfReplica(%q) = %q, want %q", tc.id, got, tc.want)
		}
	}
}
