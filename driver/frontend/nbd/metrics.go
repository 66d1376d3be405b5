package nbd

import "github.com/prometheus/client_golang/prometheus"

// op indexes the per-command metrics.
type op uint8

const (
	opRead op = iota
	opWrite
	opDisc
	opFlush
	opTrim
	opWriteZeroes
	opOther
	numOps
)

var opNames = [numOps]string{"read", "write", "disc", "flush", "trim", "write_zeroes", "other"}

// opOf maps a command type to its metrics index.
func opOf(typ uint16) op {
	switch typ {
	case cmdRead:
		return opRead
	case cmdWrite:
		return opWrite
	case cmdDisc:
		return opDisc
	case cmdFlush:
		return opFlush
	case cmdTrim:
		return opTrim
	case cmdWriteZeroes:
		return opWriteZeroes
	}
	return opOther
}

// Metrics are one server's Prometheus metrics. They carry a constant label
// export, so the servers of several volumes can share one registry. Nothing
// is registered globally: the caller registers Collectors.
type Metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec

	// Children resolved once, so the request path does no label lookups.
	byOp [numOps]opMetrics
}

type opMetrics struct {
	requests prometheus.Counter
	duration prometheus.Observer
	errors   prometheus.Counter
}

func newMetrics(export string, extra map[string]string) *Metrics {
	labels := prometheus.Labels{"export": export}
	for k, v := range extra {
		labels[k] = v
	}
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "cairn_nbd_requests_total",
			Help:        "NBD requests received, by command.",
			ConstLabels: labels,
		}, []string{"op"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:        "cairn_nbd_request_duration_seconds",
			Help:        "Time from reading an NBD request header until its reply is ready to send, by command.",
			ConstLabels: labels,
			Buckets:     prometheus.ExponentialBuckets(10e-6, 2, 20), // 10 µs … ~5 s
		}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name:        "cairn_nbd_errors_total",
			Help:        "NBD requests answered with an error, by command.",
			ConstLabels: labels,
		}, []string{"op"}),
	}
	for i, name := range opNames {
		m.byOp[i] = opMetrics{
			requests: m.requests.WithLabelValues(name),
			duration: m.duration.WithLabelValues(name),
			errors:   m.errors.WithLabelValues(name),
		}
	}
	return m
}

// Collectors returns the metrics to register.
func (m *Metrics) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.duration, m.errors}
}
