package storagenode

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

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
	logicalDesc = prometheus.NewDesc("cairn_replica_logical_bytes",
		"For a replica of a volume with compression: the data its layers hold before compression (cairn_replica_allocated_bytes is after; their ratio is what compression left).",
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
	ch <- logicalDesc
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
		if r, err := u.server.Get(info.ID); err == nil && r.Compressed() {
			out = append(out, prometheus.MustNewConstMetric(logicalDesc, prometheus.GaugeValue, float64(r.LogicalBytes()), vol, info.ID))
		}
		_, snaps, ok := spaceOf(u.server, info.ID)
		if !ok {
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

// spaceOf reads what replica id takes on disk and what each of its
// snapshots holds; not ok for a replica that cannot be read now (being
// deleted, closed): it is left out until the next look.
func spaceOf(server *replica.Server, id string) (allocated uint64, snaps []replica.SnapshotUsage, ok bool) {
	r, err := server.Get(id)
	if err != nil {
		return 0, nil, false
	}
	snaps, err = r.SnapshotUsage()
	if err != nil {
		return 0, nil, false
	}
	return r.Info().AllocatedBytes, snaps, true
}

// usageInterval is how often a node looks at whether the space its
// replicas take changed enough to report to the store (recordUsage).
const usageInterval = 10 * time.Second

// recordUsage reports to the store, for each volume whose first healthy
// replica is on this node, the space that replica takes and what each of
// the volume's snapshots holds there, its chain's depth and the progress
// of a flatten or a snapshot deletion running on it (RecordUsage), when the space changed by
// more than a MiB, the depth or the progress changed, or a snapshot has no
// figures recorded yet:
// operators see it in cairn ctl. One node per volume reports, and only
// changes, so the log stays small.
func (n *Node) recordUsage() {
	type job struct {
		vol   *meta.Volume
		rep   string
		snaps map[string]*meta.Snapshot
	}
	var jobs []job
	n.cfg.FSM.View(func(s *meta.State) {
		bySource := map[string]map[string]*meta.Snapshot{}
		for _, sn := range s.Snapshots {
			if bySource[sn.SourceVolumeID] == nil {
				bySource[sn.SourceVolumeID] = map[string]*meta.Snapshot{}
			}
			x := *sn
			bySource[sn.SourceVolumeID][sn.ID] = &x
		}
		for _, v := range n.here.vols {
			// The node of the first healthy replica on a node that is up
			// reports, as it serves an unattached volume's snapshots.
			if r, ok := firstHealthy(s, v); ok && r.Node == n.cfg.NodeID {
				jobs = append(jobs, job{vol: v, rep: r.ID, snaps: bySource[v.ID]})
			}
		}
	})
	for _, j := range jobs {
		allocated, usage, ok := spaceOf(n.server, j.rep)
		if !ok {
			continue
		}
		cmd := &meta.RecordUsage{VolumeID: j.vol.ID, ReplicaID: j.rep, AllocatedBytes: allocated,
			Snapshots: map[string]meta.SnapshotSpace{}}
		if r, err := n.server.Get(j.rep); err == nil {
			cmd.Depth = r.Depth()
		}
		n.mu.Lock()
		if f, ok := n.flatteningNow[j.rep]; ok {
			cmd.Flatten = &f
		}
		n.mu.Unlock()
		if d, ok := n.server.Deleting(j.rep); ok {
			cmd.Merge = &meta.LayerProgress{Layer: d.Snapshot, DoneBytes: d.DoneBytes, TotalBytes: d.TotalBytes}
		}
		u := j.vol.Usage
		changed := u == nil || u.ReplicaID != j.rep || far(u.AllocatedBytes, cmd.AllocatedBytes) ||
			u.Depth != cmd.Depth || !sameProgress(u.Flatten, cmd.Flatten) || !sameProgress(u.Merge, cmd.Merge)
		for _, u := range usage {
			sn, ok := j.snaps[u.ID]
			if !ok {
				continue // a layer inherited from a restore's source: not this volume's snapshot
			}
			sp := meta.SnapshotSpace{HeldBytes: u.HeldBytes, AloneBytes: u.FreedByDelete}
			cmd.Snapshots[u.ID] = sp
			changed = changed || sn.Space == nil || far(sn.Space.HeldBytes, sp.HeldBytes) || far(sn.Space.AloneBytes, sp.AloneBytes)
		}
		if !changed {
			continue
		}
		ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
		_, err := n.cfg.Meta.Apply(ctx, cmd)
		cancel()
		if err != nil {
			n.log.Debug("space of a replica not recorded; will try again", zap.String("volume_id", j.vol.ID), zap.String("replica_id", j.rep), zap.Error(err))
		}
	}
}

// sameProgress reports whether two reports of an operation's progress say
// the same.
func sameProgress(a, b *meta.LayerProgress) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}

// far reports whether two byte counts differ by more than a MiB.
func far(a, b uint64) bool { return max(a, b)-min(a, b) > 1<<20 }
