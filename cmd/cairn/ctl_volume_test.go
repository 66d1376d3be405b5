package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/cairn-csi/cairn/replication/meta"
)

// TestVolumeGetShowsLongOperations: cairn ctl volume get shows the chain's
// depth and a progress bar for a flatten and a snapshot deletion running
// on the replica that reports the volume's usage.
func TestVolumeGetShowsLongOperations(t *testing.T) {
	v := &meta.Volume{ID: "vol-1", Name: "pvc-1", SizeBytes: 1 << 30, ReplicaCount: 1, WriteQuorum: 1,
		Replicas: []meta.Replica{{ID: "vol-1-r1", Node: "n1", State: meta.ReplicaHealthy}},
		Usage: &meta.VolumeUsage{ReplicaID: "vol-1-r1", AllocatedBytes: 1 << 20, Depth: 5,
			Flatten: &meta.LayerProgress{Layer: "snap-a", DoneBytes: 1 << 29, TotalBytes: 1 << 30},
			Merge:   &meta.LayerProgress{Layer: "snap-b", DoneBytes: 1 << 28, TotalBytes: 1 << 30}}}
	var out bytes.Buffer
	if err := printVolume(&out, "table", v); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"chain:        5 layers", "flattening into snap-a", "50.0%", "deleting snapshot snap-b", "25.0%"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("volume get lacks %q:\n%s", want, out.String())
		}
	}
}

// TestVolumeGetShowsSpace: for a volume with deduplication, cairn ctl
// volume get shows each replica's bytes written, its own bytes on disk and
// what deduplication saved.
func TestVolumeGetShowsSpace(t *testing.T) {
	v := &meta.Volume{ID: "vol-1", Name: "pvc-1", SizeBytes: 1 << 30, ReplicaCount: 2, WriteQuorum: 2,
		Parameters: map[string]string{"deduplication": "true"},
		Replicas: []meta.Replica{
			{ID: "vol-1-r1", Node: "n1", State: meta.ReplicaHealthy,
				Space: &meta.ReplicaSpace{AllocatedBytes: 256 << 20, SharedBytes: 256 << 20, DedupSavedBytes: 192 << 20}},
			{ID: "vol-1-r2", Node: "n2", State: meta.ReplicaHealthy}}}
	var out bytes.Buffer
	if err := printVolume(&out, "table", v); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"replica vol-1-r1 on n1: 256 MiB written", "64 MiB on disk of its own", "192 MiB saved by deduplication", "deduplication: on"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("volume get lacks %q:\n%s", want, out.String())
		}
	}
	if strings.Contains(out.String(), "vol-1-r2 on n2:") {
		t.Errorf("volume get shows space for a replica that reported none:\n%s", out.String())
	}
}
