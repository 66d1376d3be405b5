package csie2e

import (
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"sigs.k8s.io/yaml"
)

// TestDesignStorageClass: the StorageClass of the design
// (deploy/examples/design-storageclass.yaml), decoded from the file, on
// three nodes that serve nvme-ssd disks and can promise 20000 IOPS each,
// with the Secret its encryption names passed as the sidecars pass it.
// As it is, CreateVolume refuses it: compression lz4 cannot go with
// encryption (docs/compression.md), and the refusal names both. With
// compression "none", and deduplication "false" (these nodes' data
// directories are on the host's file system, which cannot share blocks:
// TestDeduplication has one that can), every other key is in effect: the volume is provisioned encrypted on nvme-ssd directories,
// admitted as guaranteed, with its limits and snapshot schedule recorded;
// it is staged, written, read back and verified.
func TestDesignStorageClass(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "deploy", "examples", "design-storageclass.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var sc struct {
		Provisioner string            `json:"provisioner"`
		Parameters  map[string]string `json:"parameters"`
	}
	if err := yaml.Unmarshal(raw, &sc); err != nil {
		t.Fatal(err)
	}
	if sc.Provisioner != "csi.cairn.io" || len(sc.Parameters) != 15+4 {
		t.Fatalf("the design's class: provisioner %q, %d parameters (want its 15 and 4 secret references)", sc.Provisioner, len(sc.Parameters))
	}
	// The provisioner and kubelet read the Secret the class names and pass
	// its keys as the CSI secrets.
	secrets := map[string]string{"encryptionPassphrase": "design passphrase"}
	c := startClusterWith(t, 3, []string{"--disk-types", "nvme-ssd"}, "--reservable-iops=20000")
	create := func(name string, params map[string]string) (*csipb.Volume, error) {
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: params, Secrets: secrets,
		})
		return resp.GetVolume(), err
	}
	if _, err := create("design-as-is", sc.Parameters); status.Code(err) != codes.InvalidArgument ||
		!strings.Contains(err.Error(), `"compression"`) || !strings.Contains(err.Error(), `encryption "aes-256-gcm"`) {
		t.Fatalf("the design's class as it is: %v, want InvalidArgument naming compression and encryption", err)
	}
	today := maps.Clone(sc.Parameters)
	today["deduplication"], today["compression"] = "false", "none"
	var v *csipb.Volume
	waitFor(t, 30*time.Second, "the class provisioned (nodes record their disks and IOPS first)", func() bool {
		v, err = create("design-today", today)
		return err == nil
	})
	id := v.GetVolumeId()
	rec := c.volumeJSON(id)
	spec, err := rec.Spec()
	if err != nil {
		t.Fatal(err)
	}
	if spec.Replicas != 3 || spec.DiskType != "nvme-ssd" || !spec.Guaranteed() || spec.QoS.MinIOPS != 10000 ||
		spec.QoS.MaxIOPS != 50000 || spec.QoS.MaxBytesPerSec != 1000<<20 || spec.SnapshotSchedule != "0 */6 * * *" ||
		!spec.Encrypted() || rec.Encryption == nil {
		t.Fatalf("the volume's recorded spec %+v", spec)
	}
	// The nodes make their replicas after CreateVolume returns, when they
	// see the volume in the store (replication/storagenode): wait for each.
	for _, r := range rec.Replicas {
		dir := filepath.Join(c.dir, r.Node, "disk-nvme-ssd", "replicas", r.ID)
		waitFor(t, 30*time.Second, "replica "+r.ID+" in "+r.Node+"'s nvme-ssd directory", func() bool {
			_, err := os.Stat(dir)
			return err == nil
		})
	}
	staging, target := c.attachWith(id, "node-1", mountCap, secrets)
	sums := map[string][32]byte{}
	writeFiles(t, target, "design", 4, 51, sums)
	syncFS(t, target)
	c.detach(id, "node-1", staging, target)
	staging, target = c.attachWith(id, "node-3", mountCap, secrets)
	checkExactly(t, target, sums)
	c.detach(id, "node-3", staging, target)
}
