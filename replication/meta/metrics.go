package meta

import (
	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
)

// storeMetrics are the store's Prometheus metrics. Gauges are read at scrape
// time from raft and the FSM, so they never go stale.
type storeMetrics struct {
	commitLatency prometheus.Histogram
	// scheduledSnapshots and scheduledDeletions count what this member's
	// snapshot schedules did while it led (schedule.go).
	scheduledSnapshots prometheus.Counter
	scheduledDeletions *prometheus.CounterVec
	collectors         []prometheus.Collector
}

func newStoreMetrics(s *Store) *storeMetrics {
	m := &storeMetrics{
		commitLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cairn_meta_commit_latency_seconds",
			Help:    "Time from proposing a command on the leader to its commit and apply.",
			Buckets: prometheus.ExponentialBuckets(0.0002, 2, 16),
		}),
		scheduledSnapshots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cairn_meta_scheduled_snapshots_total",
			Help: "Scheduled snapshots this member asked for while it led (snapshotSchedule).",
		}),
		scheduledDeletions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_meta_scheduled_snapshot_deletions_total",
			Help: "Scheduled snapshots this member deleted while it led, by reason: retention (snapshotRetain), superseded (not taken before the next slot), volume_deleted.",
		}, []string{"reason"}),
	}
	for _, reason := range []string{retireRetention, retireSuperseded, retireVolumeDeleted} {
		m.scheduledDeletions.WithLabelValues(reason) // shown from 0, not from the first deletion
	}
	m.collectors = []prometheus.Collector{
		m.commitLatency, m.scheduledSnapshots, m.scheduledDeletions,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "cairn_meta_raft_leader",
			Help: "1 if this member is the raft leader, else 0.",
		}, func() float64 {
			if s.raft != nil && s.raft.State() == raft.Leader {
				return 1
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "cairn_meta_raft_state",
			Help: "Raft state of this member: 0 follower, 1 candidate, 2 leader, 3 shutdown.",
		}, func() float64 {
			if s.raft == nil {
				return 3
			}
			return float64(s.raft.State())
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "cairn_meta_raft_term",
			Help: "Current raft term seen by this member.",
		}, func() float64 {
			if s.raft == nil {
				return 0
			}
			return float64(s.raft.CurrentTerm())
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "cairn_meta_applied_index",
			Help: "Raft index of the last entry applied to this member's state.",
		}, func() float64 {
			if s.raft == nil {
				return 0
			}
			return float64(s.raft.AppliedIndex())
		}),
		&stateCollector{fsm: s.fsm,
			nodes: prometheus.NewDesc("cairn_meta_nodes", "Storage nodes known to the store, by state.", []string{"state"}, nil),
			vols:  prometheus.NewDesc("cairn_meta_volumes", "Volumes known to the store, by lifecycle state.", []string{"state"}, nil),
		},
	}
	return m
}

// Register adds the store's metrics to r.
func (s *Store) Register(r prometheus.Registerer) error {
	for _, c := range s.metrics.collectors {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// stateCollector counts nodes and volumes by state at scrape time.
type stateCollector struct {
	fsm   *FSM
	nodes *prometheus.Desc
	vols  *prometheus.Desc
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.nodes; ch <- c.vols }

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	nodes := map[NodeState]int{NodeUp: 0, NodeDown: 0, NodeDraining: 0}
	vols := map[VolumeState]int{}
	c.fsm.View(func(s *State) {
		for _, n := range s.Nodes {
			nodes[n.State]++
		}
		for _, v := range s.Volumes {
			vols[v.State]++
		}
	})
	for st, n := range nodes {
		ch <- prometheus.MustNewConstMetric(c.nodes, prometheus.GaugeValue, float64(n), string(st))
	}
	for st, n := range vols {
		ch <- prometheus.MustNewConstMetric(c.vols, prometheus.GaugeValue, float64(n), string(st))
	}
}
