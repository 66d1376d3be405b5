package csie2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestDiskTypes: on three nodes with a default data directory and one of
// type hdd (cairn dev up --disk-types hdd, which gives each node
// --data-dir DIR,hdd=DIR2), a volume of type hdd has its replicas made in
// the hdd directories, not the default ones, and a default volume the
// other way round; GetCapacity counts each type; a type no node has is
// ResourceExhausted naming it, and GetCapacity of it is 0. The hdd volume
// is staged as ext4 and written.
func TestDiskTypes(t *testing.T) {
	c := startClusterWith(t, 3, []string{"--disk-types", "hdd"})
	create := func(name string, params map[string]string) (*csipb.Volume, error) {
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: 16 << 20},
			VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: params,
		})
		return resp.GetVolume(), err
	}
	capacity := func(params map[string]string) int64 {
		resp, err := c.controller.GetCapacity(ctx(t), &csipb.GetCapacityRequest{Parameters: params})
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetAvailableCapacity()
	}
	// The nodes record their hdd disks after they start: wait for all
	// three (GetCapacity is above 0 once one has).
	var hdd *csipb.Volume
	waitFor(t, 30*time.Second, "the hdd disks of three nodes", func() bool {
		v, err := create("typed-hdd", map[string]string{"replicas": "3", "type": "hdd"})
		if err != nil && status.Code(err) != codes.ResourceExhausted {
			t.Fatal(err)
		}
		hdd = v
		return err == nil
	})
	def, err := create("typed-default", map[string]string{"replicas": "3"})
	if err != nil {
		t.Fatal(err)
	}
	in := func(id, disk string) int {
		dirs, _ := filepath.Glob(filepath.Join(c.dir, "node-*", disk, "replicas", id+"-r*"))
		return len(dirs)
	}
	waitFor(t, 30*time.Second, "the replicas made", func() bool { return in(hdd.GetVolumeId(), "disk-hdd") == 3 && in(def.GetVolumeId(), "data") == 3 })
	if n, m := in(hdd.GetVolumeId(), "data"), in(def.GetVolumeId(), "disk-hdd"); n+m != 0 {
		t.Fatalf("%d replicas of the hdd volume on default disks, %d of the default one on hdd disks", n, m)
	}
	_, err = create("typed-nvme", map[string]string{"replicas": "1", "type": "nvme-ssd"})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), `type "nvme-ssd"`) {
		t.Fatalf("a type no node has: %v, want ResourceExhausted naming it", err)
	}
	if got := capacity(map[string]string{"type": "nvme-ssd"}); got != 0 {
		t.Fatalf("GetCapacity of nvme-ssd = %d, want 0", got)
	}
	staging, target := c.attach(hdd.GetVolumeId(), "node-2")
	if err := os.WriteFile(filepath.Join(target, "f"), []byte("on hdd"), 0o644); err != nil {
		t.Fatal(err)
	}
	syncFS(t, target)
	c.detach(hdd.GetVolumeId(), "node-2", staging, target)
}
