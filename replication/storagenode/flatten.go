package storagenode

import (
	"cmp"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Background flattening (docs/snapshots.md, "Chain depth and
// flattening"). A replica's chain is its own snapshots' layers on top of
// the layers it inherited from the snapshot it was restored from (shared by
// hard link with the source where it was made on the source's node). Each
// node flattens the inherited layers of its own replicas into one layer
// (replica.Flatten) past the chain's soft limit, and at once where nothing
// shares them: every view of the volume reads the same, reads of old data
// walk fewer maps, blocks written over in the lower layers stop taking
// space, and the source's layers are no longer held. Every node decides
// alone, from its replica's chain and its copy of the store; replicas of
// one volume may differ in how their chains are cut, which the rebuild,
// comparing layers by id and contents, copies across when it runs. One
// flatten runs at a time on a node; a failed one waits before the next
// attempt (the snapshot jobs' backoff).

// DefaultChainSoftLimit is the chain depth past which a node flattens a
// replica's inherited layers, when Config.ChainSoftLimit is 0.
const DefaultChainSoftLimit = 16

// flattenTarget returns the position in a replica's sealed layers (ids,
// oldest first) of the layer to flatten into, -1 for none, and why. The
// candidates are the run of layers at the bottom that are not the volume's
// own snapshots (they came with the restore), when it has two layers or
// more; the newest of them is the target when the chain (the head
// included) is deeper than limit, or when no other replica here shares
// any of them (shared, asked only then): a replica placed where the layers
// were not, or one whose source and sibling restores are gone. Sharing was
// all they were kept apart for; flattened, the blocks written over in the
// lower layers take no space.
func flattenTarget(ids []string, limit int, own func(id string) bool, shared func(k int) bool) (int, string) {
	k := -1
	for i, id := range ids {
		if own(id) {
			break
		}
		k = i
	}
	switch {
	case k < 1:
		return -1, ""
	case len(ids)+1 > limit:
		return k, "the chain is past its soft limit"
	case !shared(k):
		return k, "no other replica shares them"
	}
	return -1, ""
}

// flattenJob is one replica of this node to flatten.
type flattenJob struct {
	vol   string
	rep   *replica.Replica
	layer string
	k     int    // the layer's position: layers 0 to k become one
	depth int    // of the chain before, the head included
	why   string // flattenTarget's reason
}

// nextFlatten returns the first replica of this node that needs
// flattening and whose backoff is over.
func (n *Node) nextFlatten() (flattenJob, bool) {
	limit := n.cfg.ChainSoftLimit
	if limit == 0 {
		limit = DefaultChainSoftLimit
	}
	if limit < 0 {
		return flattenJob{}, false
	}
	type cand struct{ vol, rep string }
	var cands []cand
	own := map[string]string{} // snapshot id → its volume, for the volumes placed here
	n.cfg.FSM.View(func(s *meta.State) {
		for _, v := range n.here.vols {
			// Not while any replica of the volume is not healthy: a
			// rebuild carries layers by their positions in the chains.
			if v.State == meta.VolumeDeleted || slices.ContainsFunc(v.Replicas, func(r meta.Replica) bool { return r.State != meta.ReplicaHealthy }) {
				continue
			}
			for _, r := range v.Replicas {
				if r.Node == n.cfg.NodeID {
					cands = append(cands, cand{v.ID, r.ID})
				}
			}
		}
		for id, sn := range s.Snapshots {
			if _, ok := n.here.vols[sn.SourceVolumeID]; ok {
				own[id] = sn.SourceVolumeID
			}
		}
	})
	slices.SortFunc(cands, func(a, b cand) int { return cmp.Compare(a.vol, b.vol) })
	for _, c := range cands {
		n.mu.Lock()
		wait := time.Now().Before(n.flattenRetry[c.rep].after)
		n.mu.Unlock()
		if wait {
			continue
		}
		r, err := n.server.Get(c.rep)
		if err != nil {
			continue
		}
		ids := r.LayerIDs()
		k, why := flattenTarget(ids, limit, func(id string) bool { return own[id] == c.vol }, r.SharedUpTo)
		if k >= 0 {
			return flattenJob{vol: c.vol, rep: r, layer: ids[k], k: k, depth: len(ids) + 1, why: why}, true
		}
	}
	return flattenJob{}, false
}

// runFlattens starts the next flatten this node should do, if none runs.
func (n *Node) runFlattens() {
	n.mu.Lock()
	busy := n.flattening || n.ctx.Err() != nil
	n.mu.Unlock()
	if busy {
		return
	}
	j, ok := n.nextFlatten()
	if !ok {
		return
	}
	n.mu.Lock()
	n.flattening = true
	n.wg.Add(1)
	n.mu.Unlock()
	go func() {
		defer n.wg.Done()
		err := n.flatten(j)
		n.mu.Lock()
		n.flattening = false
		if err == nil {
			delete(n.flattenRetry, j.rep.ID())
		} else {
			n.flattenRetry[j.rep.ID()] = n.flattenRetry[j.rep.ID()].failed()
		}
		n.mu.Unlock()
		n.kick()
	}()
}

// flatten runs one job, logging its start, its progress (every tenth) and
// its end, and showing its progress in the metrics and to recordUsage.
func (n *Node) flatten(j flattenJob) error {
	log := n.log.With(zap.String("volume_id", j.vol), zap.String("replica_id", j.rep.ID()), zap.String("layer", j.layer))
	log.Info("flattening the layers the replica's volume was restored from: "+j.why,
		zap.Int("depth", j.depth), zap.Int("layers_flattened", j.k+1))
	start := time.Now()
	labels := prometheus.Labels{"volume_id": j.vol, "replica_id": j.rep.ID()}
	gauge := n.flattenProgress.With(labels)
	defer n.flattenProgress.Delete(labels)
	tenth := uint64(0)
	err := j.rep.Flatten(n.ctx, j.layer, func(done, total uint64) {
		gauge.Set(float64(done) / float64(total))
		n.mu.Lock()
		n.flatteningNow[j.rep.ID()] = meta.LayerProgress{Layer: j.layer, DoneBytes: done, TotalBytes: total}
		n.mu.Unlock()
		if t := done * 10 / total; t > tenth {
			tenth = t
			log.Info("flattening", zap.Uint64("done_bytes", done), zap.Uint64("total_bytes", total))
		}
	})
	n.mu.Lock()
	delete(n.flatteningNow, j.rep.ID())
	n.mu.Unlock()
	if err != nil {
		if n.ctx.Err() == nil {
			log.Warn("flattening failed; will try again", zap.Error(err))
		}
		return err
	}
	n.flattens.Inc()
	log.Info("flattened", zap.Int("depth", j.rep.Depth()), zap.Duration("took", time.Since(start)))
	return nil
}
