package storagenode

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Space accounting (docs/snapshots.md): what each replica on this node
// takes on disk, and for each of its snapshots, what the snapshot's layer
// holds and what deleting it would free (the blocks it alone holds, since
// written again above it). Reading a snapshot's usage reads its layer's
// map whole (a bit per 4 KiB block), so a scrape reuses an answer up to
// usageMaxAge old.

const usageMaxAge = 30 * time.Second

var (
	allocatedDesc = prometheus.NewDesc("cairn_replica_allocated_bytes",
		"Disk space the replica's files take on this node (its snapshots' layers included; a layer shared by hard link with a restored volume counts in each).",
		[]string{"volume_id", "replica_id"}, nil)
	heldDesc = prometheus.NewDesc("cairn_snapshot_held_bytes",
		"What a snapshot's layer holds on this replica: the blocks written between the snapshot before it and this one.",
		[]string{"volume_id", "replica_id", "snapshot"}, nil)
	exclusiveDesc = prometheus.NewDesc("cairn_snapshot_exclusive_bytes",
		"What a snapshot alone holds on this replica: the space deleting it would free (its blocks written again since).",
		[]string{"volume_id", "replica_id", "snapshot"}, nil)
)

// usageCollector reports the space accounting of a replica server.
type usageCollector struct {
	server *replica.Server

	mu   sync.Mutex
	at   time.Time
	last []prometheus.Metric
}

func (u *usageCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- allocatedDesc
	ch <- heldDesc
	ch <- exclusiveDesc
}

func (u *usageCollector) Collect(ch chan<- prometheus.Metric) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.last == nil || time.Since(u.at) > usageMaxAge {
		u.last, u.at = u.measure(), time.Now()
	}
	for _, m := range u.last {
		ch <- m
	}
}

// measure reads the usage of every replica on the node. A replica that
// cannot be read now (being deleted, closed) is left out of this scrape.
func (u *usageCollector) measure() []prometheus.Metric {
	infos, _ := u.server.List()
	var out []prometheus.Metric
	for _, info := range infos {
		vol := meta.VolumeOfReplica(info.ID)
		out = append(out, prometheus.MustNewConstMetric(allocatedDesc, prometheus.GaugeValue, float64(info.AllocatedBytes), vol, info.ID))
		r, err := u.server.Get(info.ID)
		if err != nil {
			continue
		}
		snaps, err := r.SnapshotUsage()
		if err != nil {
			continue
		}
		for _, s := range snaps {
			out = append(out,
				prometheus.MustNewConstMetric(heldDesc, prometheus.GaugeValue, float64(s.HeldBytes), vol, info.ID, s.ID),
				prometheus.MustNewConstMetric(exclusiveDesc, prometheus.GaugeValue, float64(s.FreedByDelete), vol, info.ID, s.ID))
		}
	}
	return out
}
