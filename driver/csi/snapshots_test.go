package csi

import (
	"context"
	"slices"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/cairn-csi/cairn/replication/meta"
)

// The snapshot services' own logic: filters, paging, what users see, and
// the sizes of restored volumes. Taking, restoring and deleting go through
// a real cluster in tests/csie2e and tests/sanity.

func TestListSnapshotsFiltersAndPages(t *testing.T) {
	c, f := newTestController()
	ctx := context.Background()
	for _, sn := range []*meta.Snapshot{
		{ID: "s1", Name: "a", SourceVolumeID: "v1", ReadyToUse: true},
		{ID: "s2", Name: "b", SourceVolumeID: "v2", ReadyToUse: true},
		{ID: "s3", Name: "c", SourceVolumeID: "v1"},
		{ID: "s4", Name: "d", SourceVolumeID: "v1", Deleting: true},
		{ID: "s5", Name: meta.CloneSnapshotName("x"), SourceVolumeID: "v1", ReadyToUse: true},
	} {
		f.st.Snapshots[sn.ID] = sn
	}
	list := func(req *csipb.ListSnapshotsRequest) ([]string, string) {
		t.Helper()
		resp, err := c.ListSnapshots(ctx, req)
		wantCode(t, err, codes.OK)
		var ids []string
		for _, e := range resp.GetEntries() {
			ids = append(ids, e.GetSnapshot().GetSnapshotId())
		}
		return ids, resp.GetNextToken()
	}
	for _, tc := range []struct {
		name string
		req  *csipb.ListSnapshotsRequest
		want []string
		next string
	}{
		{"all users see", &csipb.ListSnapshotsRequest{}, []string{"s1", "s2", "s3"}, ""},
		{"by volume", &csipb.ListSnapshotsRequest{SourceVolumeId: "v1"}, []string{"s1", "s3"}, ""},
		{"by id", &csipb.ListSnapshotsRequest{SnapshotId: "s2"}, []string{"s2"}, ""},
		{"a deleted id", &csipb.ListSnapshotsRequest{SnapshotId: "s4"}, nil, ""},
		{"first page", &csipb.ListSnapshotsRequest{MaxEntries: 2}, []string{"s1", "s2"}, "2"},
		{"second page", &csipb.ListSnapshotsRequest{MaxEntries: 2, StartingToken: "2"}, []string{"s3"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ids, next := list(tc.req)
			if !slices.Equal(ids, tc.want) || next != tc.next {
				t.Fatalf("ListSnapshots = %v, next %q; want %v, next %q", ids, next, tc.want, tc.next)
			}
		})
	}
	_, err := c.ListSnapshots(ctx, &csipb.ListSnapshotsRequest{StartingToken: "9"})
	wantCode(t, err, codes.Aborted)
	_, err = c.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: "s4"})
	wantCode(t, err, codes.NotFound)
	got, err := c.GetSnapshot(ctx, &csipb.GetSnapshotRequest{SnapshotId: "s1"})
	wantCode(t, err, codes.OK)
	if got.GetSnapshot().GetSourceVolumeId() != "v1" || !got.GetSnapshot().GetReadyToUse() {
		t.Fatalf("GetSnapshot s1 = %v", got.GetSnapshot())
	}
}

func TestCreateSnapshotRefusesBadInput(t *testing.T) {
	c, f := newTestController()
	ctx := context.Background()
	vol := mustCreate(t, c, "pvc-1")
	for _, tc := range []struct {
		name string
		req  *csipb.CreateSnapshotRequest
		want codes.Code
	}{
		{"no name", &csipb.CreateSnapshotRequest{SourceVolumeId: vol}, codes.InvalidArgument},
		{"no source", &csipb.CreateSnapshotRequest{Name: "s"}, codes.InvalidArgument},
		{"a name of Cairn's own", &csipb.CreateSnapshotRequest{Name: meta.CloneSnapshotName("x"), SourceVolumeId: vol}, codes.InvalidArgument},
		{"a scheduled snapshot's name", &csipb.CreateSnapshotRequest{Name: meta.ScheduledSnapshotName(vol, time.Date(2026, 12, 5, 6, 0, 0, 0, time.UTC)),
			SourceVolumeId: vol}, codes.InvalidArgument},
		{"an unknown parameter", &csipb.CreateSnapshotRequest{Name: "s", SourceVolumeId: vol, Parameters: map[string]string{"colour": "blue"}}, codes.InvalidArgument},
		{"an unknown volume", &csipb.CreateSnapshotRequest{Name: "s", SourceVolumeId: "nope"}, codes.NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(f.applied)
			_, err := c.CreateSnapshot(ctx, tc.req)
			wantCode(t, err, tc.want)
			if len(f.applied) != before {
				t.Fatalf("a refused request reached the store: %v", f.applied[before:])
			}
		})
	}
	if err := CheckSnapshotParameters(map[string]string{"csi.storage.k8s.io/volumesnapshot/name": "x"}); err != nil {
		t.Fatalf("the sidecar's own keys are refused: %v", err)
	}
	_, err := c.DeleteSnapshot(ctx, &csipb.DeleteSnapshotRequest{})
	wantCode(t, err, codes.InvalidArgument)
}

func TestRestoreSize(t *testing.T) {
	src := &restoreSource{bytes: 64 << 20}
	for _, tc := range []struct {
		name     string
		req, lim int64
		want     uint64
		code     codes.Code
	}{
		{"no range: the source's size", 0, 0, 64 << 20, codes.OK},
		{"the same", 64 << 20, 0, 64 << 20, codes.OK},
		{"larger", 100 << 20, 0, 100 << 20, codes.OK},
		{"a limit above", 0, 128 << 20, 64 << 20, codes.OK},
		{"smaller", 32 << 20, 0, 0, codes.OutOfRange},
		{"a limit below", 0, 32 << 20, 0, codes.OutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := src.size(&csipb.CapacityRange{RequiredBytes: tc.req, LimitBytes: tc.lim})
			if tc.code != codes.OK {
				wantCode(t, toStatus(err), tc.code)
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("size = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}
