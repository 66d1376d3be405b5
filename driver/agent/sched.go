package agent

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairn-csi/cairn/iosched"
)

// The node's two I/O schedulers and their policy.
//
// The QoS scheduler orders every volume I/O of this node's engines. Its
// depth (Config.IOSchedDepth) bounds the I/Os in flight across all volumes;
// QoS limits apply per volume. A quarter of the depth is kept for volumes
// under their reservation (minIOPS), so that a flood on spare capacity
// cannot make them wait for a slot; and while such a volume is busy, the
// flood runs only a few I/Os at once (Config.IOSchedSpareWhileReserved),
// because on a node whose CPUs serve both, every flood I/O in flight slows
// the reserved volume's I/Os down too.
//
// The latency guard (Config.IOSchedLatencyTolerance) goes further: it slows
// the flood's rate, not only its concurrency, while the reserved volume's
// I/Os take longer than on a quiet node. It acts in the QoS scheduler only:
// the disk scheduler holds no reservations.
//
// The disk scheduler orders the replica server's disk I/O: operations on
// this node's replicas, from the engines of every node (this node's own in
// process). It holds no QoS limits (the engines charged those once); it
// shares the disk fairly across volumes and lets rebuild and scrub yield to
// foreground I/O.

// reservationBurst is how many I/Os a reserved volume may have served under
// its reservation back to back, in both schedulers: applications send I/O a
// few at a time (a queue depth of 4 to 8), and with strict spacing all but
// the first of such a burst would queue behind the flood.
const reservationBurst = 8

// diskSchedDepth is the number of disk operations that run at once. 32 is
// the command queue of a SATA or SAS disk and about where an NVMe drive
// stops gaining throughput from more parallel small I/O: beyond what the
// device can overlap, more concurrency only moves the waiting into the
// kernel and the device, which serve it in arrival order, blind to volumes
// and classes. It is also half of what one engine connection may have in
// flight (64), so a single busy engine makes a queue form here, where
// fairness and class priority can act; a depth as large as the QoS
// scheduler's would let a flood take the whole disk before any ordering
// applied.
const diskSchedDepth = 32

// newSchedulers starts the QoS scheduler and the disk scheduler, with their
// metrics in reg.
func newSchedulers(cfg Config, reg prometheus.Registerer) (sched, disk *iosched.Scheduler, err error) {
	sched, err = iosched.New(iosched.Config{Depth: cfg.IOSchedDepth, ReservedSlots: cfg.IOSchedDepth / 4,
		SpareSlotsWhileReserved: cfg.IOSchedSpareWhileReserved, ReservationBurst: reservationBurst,
		LatencyTolerance: cfg.IOSchedLatencyTolerance,
		Observer:         newSchedMetrics(reg), Disabled: cfg.NoIOSched})
	if err != nil {
		return nil, nil, fmt.Errorf("--iosched-depth %d, --iosched-spare-while-reserved %d, --iosched-latency-tolerance %v: %w",
			cfg.IOSchedDepth, cfg.IOSchedSpareWhileReserved, cfg.IOSchedLatencyTolerance, err)
	}
	reg.MustRegister(newTokenCollector(sched))
	disk, err = iosched.New(iosched.Config{Depth: diskSchedDepth, ReservedSlots: diskSchedDepth / 4,
		SpareSlotsWhileReserved: min(cfg.IOSchedSpareWhileReserved, diskSchedDepth-diskSchedDepth/4),
		ReservationBurst:        reservationBurst,
		Observer:                newDiskSchedMetrics(reg), Disabled: cfg.NoIOSched})
	if err != nil {
		sched.Close()
		return nil, nil, err
	}
	return sched, disk, nil
}
