package main

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairn-csi/cairn/iosched"
)

// schedMetrics turns the I/O scheduler's observations into Prometheus
// metrics. Its methods run under the scheduler's lock: they only update
// counters.
type schedMetrics struct {
	queueWait    *prometheus.HistogramVec
	throttled    *prometheus.CounterVec
	deadlineMiss *prometheus.CounterVec
	ops          *prometheus.CounterVec
	bytes        *prometheus.CounterVec
}

var classNames = map[iosched.Class]string{iosched.Foreground: "foreground", iosched.Rebuild: "rebuild", iosched.Scrub: "scrub"}
var opNames = map[iosched.Op]string{iosched.Read: "read", iosched.Write: "write", iosched.Flush: "flush", iosched.Discard: "discard"}

func newSchedMetrics(reg prometheus.Registerer) *schedMetrics {
	m := &schedMetrics{
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "cairn_iosched_queue_wait_seconds", Help: "Time an I/O waited in the scheduler, by volume and class.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}, []string{"volume_id", "class"}),
		throttled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_iosched_throttled_seconds_total", Help: "Time I/Os waited for tokens (QoS limits), by volume.",
		}, []string{"volume_id"}),
		deadlineMiss: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_iosched_deadline_misses_total", Help: "I/Os dispatched after their deadline, by volume and class.",
		}, []string{"volume_id", "class"}),
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_iosched_dispatched_total", Help: "I/Os let through, by volume and operation.",
		}, []string{"volume_id", "op"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cairn_iosched_dispatched_bytes_total", Help: "Bytes let through, by volume and operation.",
		}, []string{"volume_id", "op"}),
	}
	reg.MustRegister(m.queueWait, m.throttled, m.deadlineMiss, m.ops, m.bytes)
	return m
}

func (m *schedMetrics) QueueWait(vol string, c iosched.Class, d time.Duration) {
	m.queueWait.WithLabelValues(vol, classNames[c]).Observe(d.Seconds())
}
func (m *schedMetrics) Throttled(vol string, d time.Duration) {
	m.throttled.WithLabelValues(vol).Add(d.Seconds())
}
func (m *schedMetrics) DeadlineMiss(vol string, c iosched.Class) {
	m.deadlineMiss.WithLabelValues(vol, classNames[c]).Inc()
}
func (m *schedMetrics) Dispatched(vol string, op iosched.Op, bytes uint64) {
	m.ops.WithLabelValues(vol, opNames[op]).Inc()
	m.bytes.WithLabelValues(vol, opNames[op]).Add(float64(bytes))
}
