package engine

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// TestBestEffortGetsAQuarterShare: two volumes on one node's QoS
// scheduler, each flooded by four writers, one of class burstable (the
// default) and one besteffort (volspec.BestEffortWeight, a quarter of the
// default share). With one request at a time let through, the besteffort
// volume completes about a fifth of the writes (25 / (100 + 25)): the
// class is in effect on real I/O. The share depends on the order the
// scheduler serves them in, not on how fast the machine is.
func TestBestEffortGetsAQuarterShare(t *testing.T) {
	r := newRig(t, 1)
	sched, err := iosched.New(iosched.Config{Depth: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer sched.Close()
	open := func(name string, params map[string]string) *Engine {
		spec, err := volspec.Parse(params)
		if err != nil {
			t.Fatal(err)
		}
		res, err := r.meta.Apply(r.ctx(), &meta.CreateVolume{ID: "vol-" + name, Name: name, SizeBytes: 16 * mib, Replicas: 1,
			Parameters: spec.Params()})
		if err != nil {
			t.Fatal(err)
		}
		rep := res.Volume.Replicas[0]
		if _, err := r.servers[rep.Node].srv.CreateWith(rep.ID, 16*mib, replica.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		r.attach(res.Volume.ID, "n1")
		e, err := Open(r.ctx(), Config{VolumeID: res.Volume.ID, NodeID: "n1", Meta: r.meta, Logger: r.log, IOTimeout: 5 * time.Second,
			CleanInterval: time.Hour, Sched: sched})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = e.Close(context.Background()) })
		return e
	}
	engines := map[string]*Engine{
		"burstable":  open("qos-burstable", nil),
		"besteffort": open("qos-besteffort", map[string]string{"qosClass": "besteffort"}),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	counts := map[string]*atomic.Int64{"burstable": {}, "besteffort": {}}
	var wg sync.WaitGroup
	for name, e := range engines {
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, 4096)
				for i := 0; ctx.Err() == nil; i++ {
					off := uint64((w*1024+i)%4096) * 4096
					if err := e.WriteAt(ctx, p, off, false); err != nil {
						if ctx.Err() == nil {
							t.Error(err)
						}
						return
					}
					counts[name].Add(1)
				}
			}()
		}
	}
	wg.Wait()
	be, bu := counts["besteffort"].Load(), counts["burstable"].Load()
	share := float64(be) / float64(be+bu)
	t.Logf("writes done: besteffort %d, burstable %d: a share of %.3f (want about 0.2)", be, bu, share)
	if be+bu < 200 || share < 0.12 || share > 0.3 {
		t.Fatalf("besteffort did %d writes and burstable %d: a share of %.3f, want 0.12–0.3", be, bu, share)
	}
}
