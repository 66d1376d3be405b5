package csi

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
)

// Expansion's RPC logic on the fakes. The real growth (replicas, FUSE
// file, loop device, ext4 and xfs, under a writer) is tests/csie2e's.

func TestControllerExpandVolume(t *testing.T) {
	ctx := context.Background()
	c, f := newTestController()
	id := mustCreate(t, c, "pvc-1") // 64 MiB
	expand := func(vol string, r *csipb.CapacityRange) (*csipb.ControllerExpandVolumeResponse, error) {
		return c.ControllerExpandVolume(ctx, &csipb.ControllerExpandVolumeRequest{VolumeId: vol, CapacityRange: r, VolumeCapability: mountCap(writer)})
	}
	rng := func(req, lim int64) *csipb.CapacityRange {
		return &csipb.CapacityRange{RequiredBytes: req, LimitBytes: lim}
	}
	for _, tc := range []struct {
		name string
		vol  string
		r    *csipb.CapacityRange
		want codes.Code
	}{
		{"no volume id", "", rng(gib, 0), codes.InvalidArgument},
		{"no capacity range", id, nil, codes.InvalidArgument},
		{"empty capacity range", id, rng(0, 0), codes.InvalidArgument},
		{"negative", id, rng(-1, 0), codes.InvalidArgument},
		{"required above limit", id, rng(2*gib, gib), codes.InvalidArgument},
		{"unknown volume", "vol-nope", rng(gib, 0), codes.NotFound},
		{"limit below the size: a shrink", id, rng(0, 32<<20), codes.OutOfRange},
		{"past the largest volume", id, rng(MaxSize+1, 0), codes.OutOfRange},
		{"no whole MiB in range", id, rng(100<<20+1, 100<<20+2), codes.OutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			applied := len(f.applied)
			_, err := expand(tc.vol, tc.r)
			wantCode(t, err, tc.want)
			if len(f.applied) != applied {
				t.Fatalf("a refused expansion reached the store: %T", f.applied[len(f.applied)-1])
			}
			if got := f.volumeByName("pvc-1").SizeBytes; got != 64<<20 {
				t.Fatalf("a refused expansion changed the size to %d", got)
			}
		})
	}

	// Grows to whole MiB, and node expansion is required.
	resp, err := expand(id, rng(gib+1, 0))
	wantCode(t, err, codes.OK)
	if resp.GetCapacityBytes() != gib+SizeUnit || !resp.GetNodeExpansionRequired() {
		t.Fatalf("expand to 1 GiB + 1 byte: %v; want %d bytes and node expansion", resp, gib+SizeUnit)
	}
	if got := f.volumeByName("pvc-1").SizeBytes; got != gib+SizeUnit {
		t.Fatalf("store size %d, want %d", got, gib+SizeUnit)
	}
	// The same again, or less: the volume's size, nothing applied.
	applied := len(f.applied)
	for _, r := range []*csipb.CapacityRange{rng(gib+1, 0), rng(64<<20, 0), rng(0, 4*gib)} {
		resp, err := expand(id, r)
		wantCode(t, err, codes.OK)
		if resp.GetCapacityBytes() != gib+SizeUnit {
			t.Fatalf("expand with %v after growing: %v, want the current %d bytes", r, resp, gib+SizeUnit)
		}
	}
	if len(f.applied) != applied {
		t.Fatal("an expansion to a size already reached reached the store")
	}
	f.fail["Apply"] = meta.ErrResourceExhausted
	_, err = expand(id, rng(8*gib, 0))
	wantCode(t, err, codes.ResourceExhausted)
}

func TestNodeExpandVolume(t *testing.T) {
	ctx := context.Background()
	n, f, root := newFakeNode(t, 0)
	staging, target := filepath.Join(root, "staging"), filepath.Join(root, "target")
	if err := os.MkdirAll(target, 0o750); err != nil {
		t.Fatal(err)
	}
	wantCode(t, stage(n, "v1", staging, mountCap(writer)), codes.OK)
	wantCode(t, stage(n, "b1", filepath.Join(root, "bstaging"), blockCap(writer)), codes.OK)
	expand := func(id, path string, r *csipb.CapacityRange) (*csipb.NodeExpandVolumeResponse, error) {
		return n.NodeExpandVolume(ctx, &csipb.NodeExpandVolumeRequest{VolumeId: id, VolumePath: path, CapacityRange: r})
	}
	for _, tc := range []struct {
		name, id, path string
		want           codes.Code
	}{
		{"no volume id", "", target, codes.InvalidArgument},
		{"no volume path", "v1", "", codes.InvalidArgument},
		{"volume not staged here", "v9", "some/path", codes.NotFound},
		{"relative path", "v1", "some/path", codes.InvalidArgument},
		{"path outside the roots", "v1", "/etc/cairn", codes.InvalidArgument},
		{"path gone", "v1", filepath.Join(root, "gone"), codes.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := expand(tc.id, tc.path, nil)
			wantCode(t, err, tc.want)
			if len(f.devices.resized) != 0 {
				t.Fatalf("a refused expansion resized %v", f.devices.resized)
			}
		})
	}

	// The store says 128 MiB: the engine, the file and the device follow,
	// and the file system at the staging path grows.
	e := f.engines.open["v1"]
	e.stored = 128 << 20
	resp, err := expand("v1", target, &csipb.CapacityRange{RequiredBytes: 128 << 20})
	wantCode(t, err, codes.OK)
	if resp.GetCapacityBytes() != 128<<20 || f.files.sizes["v1"] != 128<<20 {
		t.Fatalf("expanded to %d, file %d; want 128 MiB both", resp.GetCapacityBytes(), f.files.sizes["v1"])
	}
	if want := []string{"/dev/loop0 " + staging}; !slices.Equal(f.devices.resized, want) {
		t.Fatalf("resized %v, want %v", f.devices.resized, want)
	}
	// A raw block volume: the device grows, no file system.
	f.engines.open["b1"].stored = 96 << 20
	wantCode(t, func() error { _, err := expand("b1", target, nil); return err }(), codes.OK)
	if want := []string{"/dev/loop0 " + staging, "/dev/loop1 "}; !slices.Equal(f.devices.resized, want) {
		t.Fatalf("resized %v, want %v", f.devices.resized, want)
	}
	// More than the store holds: the controller has not expanded it.
	_, err = expand("v1", target, &csipb.CapacityRange{RequiredBytes: 256 << 20})
	wantCode(t, err, codes.OutOfRange)
	// An engine that lost the volume to another node.
	e.expandErr = engine.ErrFenced
	_, err = expand("v1", target, nil)
	wantCode(t, err, codes.FailedPrecondition)
	if len(f.devices.resized) != 2 {
		t.Fatalf("failed expansions resized %v", f.devices.resized)
	}
}
