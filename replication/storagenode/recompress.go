package storagenode

import (
	"context"
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Recompression on a node (docs/compression.md). A small write into an
// extent stored compressed stores the extent raw, so random small writes
// turn a compressed replica raw over time. Every RecompressInterval the
// node goes over the replicas here of volumes with compression and stores
// those extents compressed again (replica.Recompress): reads at the disk
// scheduler's lowest class (scrub), with the deduplication pass's pause
// while foreground I/O is recent (backgroundStep), since compressing is
// CPU work.

// DefaultRecompressInterval is how often a node recompresses when
// Config.RecompressInterval is 0.
const DefaultRecompressInterval = 10 * time.Minute

// recompressMetrics count what recompression did.
type recompressMetrics struct {
	bytes  prometheus.Counter
	passes prometheus.Counter
}

func newRecompressMetrics() recompressMetrics {
	return recompressMetrics{
		bytes: prometheus.NewCounter(prometheus.CounterOpts{Name: "cairn_recompressed_bytes_total",
			Help: "Bytes of extents (before compression) that small writes had left raw and this node stored compressed again."}),
		passes: prometheus.NewCounter(prometheus.CounterOpts{Name: "cairn_recompress_passes_total",
			Help: "Recompression passes this node finished over its replicas of volumes with compression."}),
	}
}

func (m recompressMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.bytes, m.passes}
}

// recompressLoop runs a pass every RecompressInterval until the node
// closes.
func (n *Node) recompressLoop() {
	every := n.cfg.RecompressInterval
	if every == 0 {
		every = DefaultRecompressInterval
	}
	if every < 0 || n.cfg.FSM == nil {
		return
	}
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-time.After(every):
		}
		n.recompressPass()
	}
}

// recompressPass recompresses each replica here of a volume with
// compression.
func (n *Node) recompressPass() {
	ctx := replica.WithClass(n.ctx, iosched.Scrub)
	for _, id := range n.compressedReplicas() {
		r, err := n.server.Get(id)
		if err != nil {
			continue // not here yet, or being deleted
		}
		start := time.Now()
		st, err := r.Recompress(ctx, func(ctx context.Context) (func(), error) {
			return n.backgroundStep(ctx, r, 2*replica.RecompressStepBytes)
		})
		n.recompress.bytes.Add(float64(st.Bytes))
		log := n.log.With(zap.String("volume_id", meta.VolumeOfReplica(id)), zap.String("replica_id", id))
		if err != nil {
			if n.ctx.Err() == nil {
				log.Warn("recompression stopped; it goes on at the next pass", zap.Error(err))
			}
			continue
		}
		if st.Extents > 0 {
			log.Info("extents that small writes left raw stored compressed again", zap.Uint64("extents", st.Extents),
				zap.Uint64("bytes", st.Bytes), zap.Duration("took", time.Since(start)))
		}
	}
	n.recompress.passes.Inc()
}

// compressedReplicas lists the replicas on this node whose volume has
// compression on.
func (n *Node) compressedReplicas() []string {
	var ids []string
	n.cfg.FSM.View(func(s *meta.State) {
		for _, v := range s.Volumes {
			if v.State == meta.VolumeDeleted {
				continue
			}
			if spec, err := v.Spec(); err != nil || spec.Compression == "" {
				continue
			}
			for _, r := range v.Replicas {
				if r.Node == n.cfg.NodeID {
					ids = append(ids, r.ID)
				}
			}
		}
	})
	return ids
}

// backgroundStep admits one step of a background job on replica r that
// reads bytes: while foreground I/O has reached the disk scheduler within
// dedupQuiet it first waits dedupBusyPause, then it takes r's admission
// in ctx's class. It returns what to call when the step is done.
func (n *Node) backgroundStep(ctx context.Context, r *replica.Replica, bytes uint64) (func(), error) {
	if s := n.cfg.DiskSched; s != nil && !s.ForegroundIdle(dedupQuiet) {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(dedupBusyPause):
		}
	}
	t, err := r.Admit(ctx, replica.OpRead, bytes)
	if err != nil {
		return nil, err
	}
	return t.Done, nil
}

// backgroundYield is called between pieces of a background job's CPU work
// (dedup.Config.Yield). While foreground I/O is recent it parks the job
// for dedupBusyYield: with the processor idle the runtime polls the
// network and runs the engines' goroutines waiting on it, which
// runtime.Gosched would not (it picks the yielding goroutine again
// first); otherwise it only yields.
func (n *Node) backgroundYield() {
	if s := n.cfg.DiskSched; s != nil && !s.ForegroundIdle(dedupQuiet) {
		time.Sleep(dedupBusyYield)
		return
	}
	runtime.Gosched()
}
