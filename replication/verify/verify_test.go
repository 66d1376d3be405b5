package verify_test

import (
	"bytes"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/testrig"
	"github.com/cairn-csi/cairn/replication/verify"
)

// TestVolume: blank replicas are identical; a block changed on one replica
// alone is reported as its extent, and only that one.
func TestVolume(t *testing.T) {
	rig := testrig.New(t)
	rig.AddNode("n1")
	rig.AddNode("n2")
	v := rig.CreateVolume("v", 16<<20, "n1", "n2")

	rep, err := verify.Volume(rig.Ctx(), rig.Meta, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Identical || len(rep.Differing) != 0 || len(rep.Replicas) != 2 || rep.Extents < 2 {
		t.Fatalf("blank volume: %+v, want 2 identical replicas of several extents", rep)
	}

	// Change one block in the last extent of one replica only.
	last := rep.Extents - 1
	r := v.Replicas[1]
	rr, err := rig.Servers[r.Node].Get(r.ID)
	if err != nil {
		t.Fatal(err)
	}
	off := last*rep.ExtentBytes + 4096
	if err := rr.WriteAt(rr.Epoch(), bytes.Repeat([]byte{0x5a}, 4096), off, true); err != nil {
		t.Fatal(err)
	}
	rep, err = verify.Volume(rig.Ctx(), rig.Meta, v.ID)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Identical || !slices.Equal(rep.Differing, []uint64{last}) {
		t.Fatalf("after a write to %s alone: %+v, want extent %d differing", r.ID, rep, last)
	}

	if _, err := verify.Volume(rig.Ctx(), rig.Meta, "vol-none"); !errors.Is(err, meta.ErrNotFound) {
		t.Fatalf("verify of an unknown volume = %v, want ErrNotFound", err)
	}
}

// TestVolumeWhileClaimed: an engine claiming a replica between verify's
// two requests (a rebuild starting elsewhere does) fences the checksum
// read; verify starts over at the new epoch instead of failing.
func TestVolumeWhileClaimed(t *testing.T) {
	rig := testrig.New(t)
	rig.AddNode("n1")
	rig.AddNode("n2")
	v := rig.CreateVolume("v", 16<<20, "n1", "n2")
	r := v.Replicas[0]
	rr, err := rig.Servers[r.Node].Get(r.ID)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	claimed := make(chan uint64)
	go func() {
		var n uint64
		defer func() { claimed <- n }()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := rr.Claim(rr.Epoch() + 1); err != nil {
				t.Error(err)
				return
			}
			n++
			time.Sleep(time.Millisecond)
		}
	}()
	for i := 0; i < 200; i++ {
		rep, err := verify.Volume(rig.Ctx(), rig.Meta, v.ID)
		if err != nil {
			close(stop)
			<-claimed
			t.Fatalf("verify %d while claims go on: %v", i, err)
		}
		if !rep.Identical {
			t.Fatalf("verify %d: %+v, want identical", i, rep)
		}
	}
	close(stop)
	t.Logf("200 verifies identical while %d claims moved the epoch", <-claimed)
}
