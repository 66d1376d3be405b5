package agent

import (
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairn-csi/cairn/iosched"
)

// schedMetrics turns an I/O scheduler's observations into Prometheus
// metrics. Its methods run under the scheduler's lock: they only update
// counters.
//
// A node has two schedulers, each with its own set: cairn_iosched_* for the
// engines' QoS scheduler (the volume I/Os of this node's attachments, held
// to their limits) and cairn_disk_sched_* for the replica server's disk
// scheduler (every operation on this node's replicas, from engines on any
// node). One request is seen by both when its engine and replica share a
// node, and the two waits add up.
type schedMetrics struct {
	queueWait    *prometheus.HistogramVec
	throttled    *prometheus.CounterVec
	deadlineMiss *prometheus.CounterVec
	ops          *prometheus.CounterVec
	bytes        *prometheus.CounterVec
	spareLimit   prometheus.Gauge // the QoS scheduler's only: the disk scheduler runs no latency guard
}

// newSchedMetrics registers the QoS scheduler's metrics, cairn_iosched_*.
// Besides those both schedulers have, it has the latency guard's gauge.
func newSchedMetrics(reg prometheus.Registerer) *schedMetrics {
	m := registerSchedMetrics(reg, "iosched", "QoS scheduler (this node's engines)")
	m.spareLimit = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cairn_iosched_spare_limit_iops",
		Help: "QoS scheduler (this node's engines): rate of I/Os beyond reservations the latency guard allows while a reserved volume is busy, counting one per 64 KiB of larger reads and writes (0: no limit).",
	})
	reg.MustRegister(m.spareLimit)
	return m
}

// newDiskSchedMetrics registers the disk scheduler's metrics,
// cairn_disk_sched_* (not cairn_iosched_disk_*: dashboards and the noisy-
// neighbour benchmark select the QoS scheduler's by that prefix).
func newDiskSchedMetrics(reg prometheus.Registerer) *schedMetrics {
	return registerSchedMetrics(reg, "disk_sched", "Disk scheduler (this node's replicas)")
}

// registerSchedMetrics registers the metrics cairn_<subsystem>_* of the
// scheduler that what names (it starts their help texts).
func registerSchedMetrics(reg prometheus.Registerer, subsystem, what string) *schedMetrics {
	name := func(s string) string { return "cairn_" + subsystem + "_" + s }
	m := &schedMetrics{
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: name("queue_wait_seconds"), Help: what + ": time an I/O waited in the scheduler, by volume and class.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}, []string{"volume_id", "class"}),
		throttled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: name("throttled_seconds_total"), Help: what + ": time I/Os waited for tokens (QoS limits), by volume.",
		}, []string{"volume_id"}),
		deadlineMiss: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: name("deadline_misses_total"), Help: what + ": I/Os dispatched after their deadline, by volume and class.",
		}, []string{"volume_id", "class"}),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: name("dispatched_total"), Help: what + ": I/Os let through, by volume and operation.",
		}, []string{"volume_id", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: name("dispatched_bytes_total"), Help: what + ": bytes let through, by volume and operation.",
		}, []string{"volume_id", "op"}),
	}
	reg.MustRegister(m.queueWait, m.throttled, m.deadlineMiss, m.ops, m.bytes)
	return m
}

func (m *schedMetrics) QueueWait(vol string, c iosched.Class, d time.Duration) {
	m.queueWait.WithLabelValues(vol, c.String()).Observe(d.Seconds())
}
func (m *schedMetrics) Throttled(vol string, d time.Duration) {
	m.throttled.WithLabelValues(vol).Add(d.Seconds())
}
func (m *schedMetrics) DeadlineMiss(vol string, c iosched.Class) {
	m.deadlineMiss.WithLabelValues(vol, c.String()).Inc()
}
func (m *schedMetrics) Dispatched(vol string, op iosched.Op, bytes uint64) {
	m.ops.WithLabelValues(vol, op.String()).Inc()
	m.bytes.WithLabelValues(vol, op.String()).Add(float64(bytes))
}
func (m *schedMetrics) SpareLimit(iops float64) {
	if m.spareLimit == nil {
		return
	}
	if math.IsInf(iops, 1) {
		iops = 0
	}
	m.spareLimit.Set(iops)
}

// tokenCollector reports the QoS scheduler's token buckets at each scrape,
// cairn_iosched_tokens{volume_id, bucket}: reading them when asked costs
// nothing per I/O, where a gauge kept current would cost on every request.
// Only limited buckets are reported; the disk scheduler holds no limits.
type tokenCollector struct {
	sched *iosched.Scheduler
	desc  *prometheus.Desc
}

func newTokenCollector(sched *iosched.Scheduler) *tokenCollector {
	return &tokenCollector{sched: sched, desc: prometheus.NewDesc("cairn_iosched_tokens",
		"QoS scheduler (this node's engines): tokens in a volume's bucket now, I/Os for bucket=iops and bytes for bucket=bytes "+
			"(at most limit × burst duration; negative while a request larger than the bucket is paid off). Limited buckets only.",
		[]string{"volume_id", "bucket"}, nil)}
}

func (c *tokenCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *tokenCollector) Collect(ch chan<- prometheus.Metric) {
	for _, v := range c.sched.Tokens(nil) {
		if v.IOPSLimited {
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, v.IOPS, v.Volume, "iops")
		}
		if v.BytesLimited {
			ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, v.Bytes, v.Volume, "bytes")
		}
	}
}
