package csi

import (
	"context"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

var testMountCap = &csipb.VolumeCapability{
	AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
	AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// TestParameterErrorsAreInvalidArgument: a refused StorageClass or
// VolumeAttributesClass parameter is InvalidArgument naming the key, before
// the store is asked.
func TestParameterErrorsAreInvalidArgument(t *testing.T) {
	c := NewController(nil)
	for _, p := range []map[string]string{{"replicaz": "3"}, {"replicas": "9"}, {"maxBandwidth": "fast"}, {"dataLocality": "strict"}} {
		_, err := c.CreateVolume(context.Background(), &csipb.CreateVolumeRequest{Name: "x", Parameters: p,
			VolumeCapabilities: []*csipb.VolumeCapability{testMountCap}})
		var key string
		for k := range p {
			key = k
		}
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), key) {
			t.Errorf("CreateVolume with %v: %v; want InvalidArgument naming %s", p, err, key)
		}
	}
	for _, mp := range []map[string]string{{"replicas": "2"}, {"maxIOPS": "lots"}} {
		if _, err := mutableParameters(mp); status.Code(err) != codes.InvalidArgument {
			t.Errorf("mutable parameters %v: %v; want InvalidArgument", mp, err)
		}
	}
}
