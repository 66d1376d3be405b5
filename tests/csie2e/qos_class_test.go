package csie2e

import (
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestGuaranteedAdmission: on three nodes that can each promise 1000 IOPS
// (cairn node --reservable-iops), a guaranteed volume of 600 on three
// replicas is admitted; a second one of 600 is refused with
// ResourceExhausted saying which nodes cannot reserve it, and a burstable
// volume with the same minIOPS is not held back. Once the first is deleted,
// the second fits. A guaranteed class without minIOPS is refused by name.
func TestGuaranteedAdmission(t *testing.T) {
	c := startClusterOf(t, 3, "--reservable-iops=1000")
	create := func(name string, params map[string]string) (*csipb.Volume, error) {
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: 16 << 20},
			VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: params,
		})
		return resp.GetVolume(), err
	}
	guaranteed := map[string]string{"replicas": "3", "qosClass": "guaranteed", "minIOPS": "600"}
	// The nodes record what they can promise as they start: wait for it.
	var first *csipb.Volume
	waitFor(t, 30*time.Second, "the first guaranteed volume admitted", func() bool {
		v, err := create("g-first", guaranteed)
		first = v
		return err == nil
	})
	_, err := create("g-second", guaranteed)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "cannot reserve 600 IOPS") {
		t.Fatalf("a second guaranteed volume of 600 IOPS: %v, want ResourceExhausted naming the IOPS", err)
	}
	if _, err := create("b-same", map[string]string{"replicas": "3", "minIOPS": "600"}); err != nil {
		t.Fatalf("a burstable volume with minIOPS 600: %v", err)
	}
	if _, err := create("g-bad", map[string]string{"qosClass": "guaranteed"}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "set minIOPS") {
		t.Fatalf("guaranteed without minIOPS: %v", err)
	}
	if _, err := c.controller.DeleteVolume(ctx(t), &csipb.DeleteVolumeRequest{VolumeId: first.GetVolumeId()}); err != nil {
		t.Fatal(err)
	}
	if _, err := create("g-second", guaranteed); err != nil {
		t.Fatalf("the second guaranteed volume once the first is gone: %v", err)
	}
}
