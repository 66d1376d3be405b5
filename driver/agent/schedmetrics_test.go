package agent

import (
	"fmt"
	"math"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cairn-csi/cairn/iosched"
)

// TestSchedMetricsOfBothSchedulers: the QoS and the disk scheduler register
// side by side in one registry, under prefixes that tell them apart.
func TestSchedMetricsOfBothSchedulers(t *testing.T) {
	reg := prometheus.NewRegistry()
	for _, m := range []*schedMetrics{newSchedMetrics(reg), newDiskSchedMetrics(reg)} {
		m.QueueWait("vol-1", iosched.Rebuild, time.Millisecond)
		m.Throttled("vol-1", time.Millisecond)
		m.DeadlineMiss("vol-1", iosched.Foreground)
		m.Dispatched("vol-1", iosched.Write, 4096)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range families {
		names = append(names, f.GetName())
		if help := f.GetHelp(); !strings.HasPrefix(help, "QoS scheduler") && !strings.HasPrefix(help, "Disk scheduler") {
			t.Errorf("%s: help %q does not say which scheduler", f.GetName(), help)
		}
	}
	sort.Strings(names)
	want := []string{
		"cairn_disk_sched_deadline_misses_total", "cairn_disk_sched_dispatched_bytes_total", "cairn_disk_sched_dispatched_total",
		"cairn_disk_sched_queue_wait_seconds", "cairn_disk_sched_throttled_seconds_total",
		"cairn_iosched_deadline_misses_total", "cairn_iosched_dispatched_bytes_total", "cairn_iosched_dispatched_total",
		"cairn_iosched_queue_wait_seconds", "cairn_iosched_spare_limit_iops", "cairn_iosched_throttled_seconds_total",
	}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("metrics %v, want %v", names, want)
	}
}

// TestSpareLimitGauge: the QoS scheduler's gauge shows the latency guard's
// limit, and 0 when the guard holds nothing (+Inf); the disk scheduler,
// which runs no guard, has no such gauge and ignores the call.
func TestSpareLimitGauge(t *testing.T) {
	reg := prometheus.NewRegistry()
	qos, disk := newSchedMetrics(reg), newDiskSchedMetrics(reg)
	disk.SpareLimit(123)
	gauge := func() float64 {
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range families {
			if f.GetName() == "cairn_iosched_spare_limit_iops" {
				return f.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatal("no cairn_iosched_spare_limit_iops")
		return 0
	}
	qos.SpareLimit(250)
	if got := gauge(); got != 250 {
		t.Errorf("after SpareLimit(250) the gauge is %v", got)
	}
	qos.SpareLimit(math.Inf(1))
	if got := gauge(); got != 0 {
		t.Errorf("after SpareLimit(+Inf) the gauge is %v, want 0 (no limit)", got)
	}
}

// TestTokenCollector: a scrape reports the QoS scheduler's limited buckets
// and nothing for unlimited ones.
func TestTokenCollector(t *testing.T) {
	sched, err := iosched.New(iosched.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer sched.Close()
	if err := sched.SetLimits("vol-1", iosched.Limits{MaxIOPS: 100}); err != nil {
		t.Fatal(err)
	}
	if err := sched.SetLimits("vol-2", iosched.Limits{}); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(newTokenCollector(sched))
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range families {
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			got = append(got, fmt.Sprintf("%s{%s,%s}=%v", f.GetName(), labels["volume_id"], labels["bucket"], m.GetGauge().GetValue()))
		}
	}
	if want := []string{"cairn_iosched_tokens{vol-1,iops}=100"}; strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("scrape %v, want %v", got, want)
	}
}
