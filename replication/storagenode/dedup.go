package storagenode

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/dedup"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// Deduplication on a node (docs/deduplication.md). At its start the node
// probes each of its data directories (can its file system share blocks
// between files?) and records the answers in the store (SetNodeDedup),
// which then places volumes with deduplication only where it can. Every
// DedupInterval, for each data directory that can, it runs a pass
// (replication/dedup) over the layer files of the replicas there whose
// volume has deduplication on, its reads at the disk scheduler's lowest
// class (scrub). A pass that a restart cut short resumes at the start.

// While foreground I/O has reached the node's disk scheduler within
// dedupQuiet, the pass waits dedupBusyPause before each extent it reads or
// shares (at most 16 MiB/s of 64 KiB extents), and parks dedupBusyYield
// between the 8 KiB pieces of an extent it hashes (backgroundYield). The
// scheduler's background class orders the disk, not the CPU, and hashing
// is CPU work that a node agent running on one CPU (--gomaxprocs) would
// otherwise put in front of its engines (tests/bench/spacebench measured
// a foreground p99 at 15x its value alone without the pause, and 1.3x to
// 2.3x with a 2 ms pause).
const (
	dedupQuiet     = 100 * time.Millisecond
	dedupBusyPause = 4 * time.Millisecond
	// dedupBusyYield is how long the pass parks between the 8 KiB
	// pieces of an extent it hashes while foreground I/O is recent
	// (backgroundYield).
	dedupBusyYield = 50 * time.Microsecond
)

// DefaultDedupInterval is how often a node runs its deduplication passes
// when Config.DedupInterval is 0.
const DefaultDedupInterval = time.Hour

// dedupDir is one data directory of the node, by disk type.
type dedupDir struct {
	diskType string // "" for the default disk
	root     string // the data directory: replicas/ and dedup/ are in it
	why      string // "" if it can share blocks, else why not
}

// dedupMetrics are the deduplication passes' counters.
type dedupMetrics struct {
	passes   *prometheus.CounterVec
	hashed   *prometheus.CounterVec
	shared   *prometheus.CounterVec
	progress *prometheus.GaugeVec
	// Per replica of a volume with deduplication (recordSpace).
	replicaShared, replicaSaved *prometheus.GaugeVec
}

func newDedupMetrics() dedupMetrics {
	return dedupMetrics{
		passes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cairn_dedup_passes_total",
			Help: "Deduplication passes this node finished, by disk type (\"default\" for the default disk)."}, []string{"disk_type"}),
		hashed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cairn_dedup_hashed_bytes_total",
			Help: "Bytes of replica layers the deduplication passes read and hashed."}, []string{"disk_type"}),
		shared: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "cairn_dedup_shared_bytes_total",
			Help: "Bytes the deduplication passes found equal to other extents and shared with them (space freed)."}, []string{"disk_type"}),
		progress: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "cairn_dedup_pass_progress_ratio",
			Help: "Progress of the running deduplication pass, from 0 to 1: hashing is the first half, sharing the second."}, []string{"disk_type"}),
		replicaShared: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "cairn_replica_shared_bytes",
			Help: "Bytes of a replica's layers (of a volume with deduplication) whose blocks another file on the node uses too."}, []string{"volume_id", "replica_id"}),
		replicaSaved: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "cairn_replica_dedup_saved_bytes",
			Help: "Bytes of a replica's layers that use the blocks of an equal extent another file keeps (the last deduplication pass's count): the space sharing saves."}, []string{"volume_id", "replica_id"}),
	}
}

func (m dedupMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.passes, m.hashed, m.shared, m.progress, m.replicaShared, m.replicaSaved}
}

// label is the metrics' name of a disk type.
func label(diskType string) string {
	if diskType == "" {
		return volspec.DiskTypeDefault
	}
	return diskType
}

// probeDedup probes every data directory of the node.
func (n *Node) probeDedup() []dedupDir {
	dirs := []dedupDir{{root: n.cfg.DataDir}}
	for _, t := range slices.Sorted(maps.Keys(n.cfg.DiskDirs)) {
		dirs = append(dirs, dedupDir{diskType: t, root: n.cfg.DiskDirs[t]})
	}
	for i := range dirs {
		// The probe's files go in the data directory, beside replicas/
		// (never among the replicas, where a crash could leave one for
		// the server to find).
		d := &dirs[i]
		err := os.MkdirAll(d.root, 0o755)
		if err == nil {
			err = dedup.Probe(d.root)
		}
		if err != nil {
			d.why = err.Error()
			n.log.Info("data directory cannot share blocks: volumes with deduplication go elsewhere",
				zap.String("disk_type", label(d.diskType)), zap.Error(err))
			continue
		}
		n.log.Info("data directory can share blocks: it takes volumes with deduplication",
			zap.String("disk_type", label(d.diskType)), zap.String("dir", d.root), zap.String("fs", dedup.FSName(d.root)))
	}
	return dirs
}

// recordDedup records what the probes found in the store, when it says
// otherwise; false while that failed (a store that does not read the
// command yet refuses it: tried again later).
func (n *Node) recordDedup(dirs []dedupDir) bool {
	want := map[string]string{}
	for _, d := range dirs {
		want[d.diskType] = d.why
	}
	var have map[string]string
	known := false
	n.cfg.FSM.View(func(s *meta.State) {
		if node := s.Nodes[n.cfg.NodeID]; node != nil {
			have, known = node.Dedup, true
		}
	})
	if !known {
		return false
	}
	if maps.Equal(have, want) {
		return true
	}
	ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
	defer cancel()
	if _, err := n.cfg.Meta.Apply(ctx, &meta.SetNodeDedup{NodeID: n.cfg.NodeID, Disks: want}); err != nil {
		n.log.Debug("deduplication support not recorded; will try again", zap.Error(err))
		return false
	}
	return true
}

// dedupLoop probes, records, and runs the passes until the node closes.
func (n *Node) dedupLoop() {
	if n.cfg.FSM == nil || n.cfg.Meta == nil {
		return // a node without a store (tests of the replica server alone)
	}
	dirs := n.probeDedup()
	every := n.cfg.DedupInterval
	if every == 0 {
		every = DefaultDedupInterval
	}
	recorded := false
	// A pass cut short by a restart resumes at once; a new one waits for
	// the interval.
	next := time.Now().Add(every)
	for _, d := range dirs {
		if d.why == "" && dedup.Pending(filepath.Join(d.root, "dedup")) {
			next = time.Now()
		}
	}
	for {
		if !recorded {
			recorded = n.recordDedup(dirs)
		}
		if every > 0 && !time.Now().Before(next) {
			for _, d := range dirs {
				if d.why == "" {
					n.dedupPass(d)
				}
			}
			next = time.Now().Add(every)
		}
		wait := time.Until(next)
		switch {
		case !recorded:
			wait = 3 * time.Second // as the realizer retries the disks' record
		case every < 0:
			wait = usageInterval
		}
		select {
		case <-n.ctx.Done():
			return
		case <-n.dedupNow:
			next = time.Now()
		case <-time.After(max(wait, 0)):
		}
	}
}

// DedupNow starts the deduplication passes now rather than at the next
// interval (tests, and an operator through the node's admin endpoints).
func (n *Node) DedupNow() {
	select {
	case n.dedupNow <- struct{}{}:
	default:
	}
}

// dedupPass runs one pass over data directory d.
func (n *Node) dedupPass(d dedupDir) {
	var srcs []dedup.Source
	reps := map[string]*replica.Replica{}
	for _, id := range n.dedupReplicas(d.diskType) {
		r, err := n.server.Get(id)
		if err != nil {
			continue // not here yet, or being deleted
		}
		reps[id] = r
		for _, p := range r.DataFiles() {
			srcs = append(srcs, dedup.Source{Key: id + "/" + filepath.Base(p), Path: p})
		}
	}
	work := filepath.Join(d.root, "dedup")
	if len(srcs) == 0 && !dedup.Pending(work) {
		return
	}
	lbl := label(d.diskType)
	ctx := replica.WithClass(n.ctx, iosched.Scrub)
	var hashed uint64 // counted so far, from Progress
	cfg := dedup.Config{Dir: work, Logger: n.log.With(zap.String("disk_type", lbl)),
		Admit: func(ctx context.Context, src dedup.Source, bytes uint64) (func(), error) {
			r := reps[filepath.Dir(src.Key)]
			if r == nil {
				return func() {}, nil // a resumed pass's replica: read unscheduled
			}
			return n.backgroundStep(ctx, r, bytes)
		},
		Yield: n.backgroundYield,
		Progress: func(p dedup.Progress) {
			ratio := float64(p.Done) / float64(max(p.Total, 1)) / 2
			if p.Phase == "share" {
				ratio += 0.5
			} else if p.Done > hashed {
				n.dedupMetrics.hashed.WithLabelValues(lbl).Add(float64(p.Done - hashed))
				hashed = p.Done
			}
			n.dedupMetrics.progress.WithLabelValues(lbl).Set(ratio)
		}}
	st, err := dedup.Pass(ctx, cfg, srcs)
	n.dedupMetrics.progress.DeleteLabelValues(lbl)
	if st.HashedBytes > hashed {
		n.dedupMetrics.hashed.WithLabelValues(lbl).Add(float64(st.HashedBytes - hashed))
	}
	n.dedupMetrics.shared.WithLabelValues(lbl).Add(float64(st.SharedBytes))
	if err != nil {
		if n.ctx.Err() == nil {
			n.log.Warn("deduplication pass stopped; it resumes at the next one", zap.String("disk_type", lbl), zap.Error(err))
		}
		return
	}
	n.dedupMetrics.passes.WithLabelValues(lbl).Inc()
	// What each replica shares, read from the file system's extent maps
	// once per pass (not at every report: a deduplicated 1 TiB replica
	// has millions of extents), and what the pass counted it saves.
	found := map[string]sharing{}
	for key, b := range st.Saved {
		id := filepath.Dir(key) // a resumed pass's replica may not be in reps
		s := found[id]
		s.saved += b
		found[id] = s
	}
	for id, r := range reps {
		s := found[id]
		for _, p := range r.DataFiles() {
			if sp, err := dedup.SpaceOf(p); err == nil { // a layer merged away meanwhile: left out
				s.shared += sp.SharedBytes
			}
		}
		found[id] = s
	}
	n.mu.Lock()
	maps.Copy(n.dedupFound, found)
	n.mu.Unlock()
}

// sharing is what the last deduplication pass found of one replica.
type sharing struct {
	shared, saved uint64 // meta.ReplicaSpace's SharedBytes and DedupSavedBytes
}

// recordSpace reports to the store what each replica on this node of a
// volume with deduplication or compression takes on disk
// (RecordReplicaSpace), when it
// moved by more than a MiB: `cairn ctl volume get` shows it. Called by the
// realizer goroutine.
func (n *Node) recordSpace() {
	n.dedupMetrics.replicaShared.Reset()
	n.dedupMetrics.replicaSaved.Reset()
	for _, v := range n.here.vols {
		spec, err := v.Spec()
		if err != nil || !spec.Deduplication && spec.Compression == "" {
			continue
		}
		for _, rep := range v.Replicas {
			if rep.Node != n.cfg.NodeID {
				continue
			}
			sp, ok := n.spaceOfReplica(rep.ID)
			if !ok {
				continue
			}
			n.dedupMetrics.replicaShared.WithLabelValues(v.ID, rep.ID).Set(float64(sp.SharedBytes))
			n.dedupMetrics.replicaSaved.WithLabelValues(v.ID, rep.ID).Set(float64(sp.DedupSavedBytes))
			if old := rep.Space; old != nil && !far(old.AllocatedBytes, sp.AllocatedBytes) &&
				!far(old.SharedBytes, sp.SharedBytes) && !far(old.DedupSavedBytes, sp.DedupSavedBytes) &&
				!far(old.LogicalBytes, sp.LogicalBytes) {
				continue
			}
			ctx, cancel := context.WithTimeout(n.ctx, 10*time.Second)
			_, err := n.cfg.Meta.Apply(ctx, &meta.RecordReplicaSpace{VolumeID: v.ID, ReplicaID: rep.ID, Space: sp})
			cancel()
			if err != nil {
				n.log.Debug("space of a replica not recorded; will try again", zap.String("volume_id", v.ID), zap.String("replica_id", rep.ID), zap.Error(err))
			}
		}
	}
}

// spaceOfReplica is what replica id takes now (its layers' allocated
// bytes) and what the last pass found it shares and saves; not ok for a
// replica that cannot be read now.
func (n *Node) spaceOfReplica(id string) (meta.ReplicaSpace, bool) {
	r, err := n.server.Get(id)
	if err != nil {
		return meta.ReplicaSpace{}, false
	}
	sp := meta.ReplicaSpace{AllocatedBytes: r.Info().AllocatedBytes}
	if r.Compressed() {
		sp.LogicalBytes = r.LogicalBytes()
	}
	n.mu.Lock()
	found := n.dedupFound[id]
	n.mu.Unlock()
	sp.SharedBytes = min(found.shared, sp.AllocatedBytes)
	sp.DedupSavedBytes = min(found.saved, sp.AllocatedBytes)
	return sp, true
}

// dedupReplicas lists the replicas on this node's disk of type t whose
// volume has deduplication on.
func (n *Node) dedupReplicas(t string) []string {
	var ids []string
	n.cfg.FSM.View(func(s *meta.State) {
		for _, v := range s.Volumes {
			if v.State == meta.VolumeDeleted {
				continue
			}
			spec, err := v.Spec()
			if err != nil || !spec.Deduplication || spec.DiskType != t {
				continue
			}
			for _, r := range v.Replicas {
				if r.Node == n.cfg.NodeID {
					ids = append(ids, r.ID)
				}
			}
		}
	})
	slices.Sort(ids)
	return ids
}
