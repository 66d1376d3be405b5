package meta

import (
	"math"
	"sort"
)

// The watch: a stream of the changes of volumes and nodes from a raft index
// on. Each member keeps a bounded log of what its recent entries changed
// (ids only); a watcher gives the index of the last event it saw and gets
// the volumes and nodes changed since, as they are now. A watcher further
// behind than that log (or new, index 0, or behind a snapshot the member
// restored) gets the whole state again, marked Reset. The answers come from
// the member asked and may be stale: a decision that needs the newest state
// reads it linearizably (GetVolume).

// changeRecord says which volumes and nodes one applied entry changed.
type changeRecord struct {
	index   uint64
	volumes []string
	nodes   []string
}

// maxChangeRecords bounds the FSM's change log: at one entry per
// heartbeat of a large cluster, a few minutes of history. A var for tests.
var maxChangeRecords = 8192

// touched returns the ids of the volumes and nodes that applying c changed,
// given its result: every apply function that changes a volume or a node
// returns it, except PurgeVolume, which leaves nothing to return.
func touched(c Command, res Result) (vols, nodes []string) {
	if res.Volume != nil {
		vols = append(vols, res.Volume.ID)
	}
	if res.Node != nil {
		nodes = append(nodes, res.Node.ID)
	}
	if res.Volume == nil && res.Node == nil {
		if p, ok := insideRequest(c).(*PurgeVolume); ok {
			vols = append(vols, p.VolumeID)
		}
	}
	return vols, nodes
}

// record adds what the entry at index changed to the change log. Called
// with f.mu held.
func (f *FSM) record(index uint64, vols, nodes []string) {
	if f.changesFloor == math.MaxUint64 {
		// The first entry after a restored snapshot: changes since before
		// it are unknown.
		f.changesFloor = index - 1
	}
	if len(vols) == 0 && len(nodes) == 0 {
		return
	}
	f.changes = append(f.changes, changeRecord{index: index, volumes: vols, nodes: nodes})
	// Trimmed in halves, so that an entry does not copy the whole log.
	if drop := len(f.changes) - maxChangeRecords; drop >= max(maxChangeRecords/2, 1) {
		f.changesFloor = f.changes[drop-1].index
		f.changes = append(f.changes[:0:0], f.changes[drop:]...)
	}
}

// WatchRequest asks for the changes after index FromIndex.
type WatchRequest struct {
	// FromIndex is the Index of the last event the watcher saw (0: none,
	// start with the whole state).
	FromIndex uint64 `json:"from_index"`
	// Node, if set, limits the volumes to those with a replica on that
	// node or attached to it. Nodes are never filtered.
	Node string `json:"node,omitempty"`
	// VolumeID, if set, limits the volumes to that one.
	VolumeID string `json:"volume_id,omitempty"`
}

// WatchEvent is one answer of a watch.
type WatchEvent struct {
	// Index is the raft index the event brings the watcher to.
	Index uint64 `json:"index"`
	// Reset: the event holds the whole state (as filtered); the watcher
	// drops what it held before.
	Reset bool `json:"reset,omitempty"`
	// Volumes are the live volumes that changed (all of them on Reset), as
	// they are at Index.
	Volumes []*Volume `json:"volumes,omitempty"`
	// Removed are ids of volumes that changed and are now gone, deleted or
	// outside the filter.
	Removed []string `json:"removed,omitempty"`
	// Nodes are the nodes that changed (all of them on Reset).
	Nodes []*Node `json:"nodes,omitempty"`
}

func (e *WatchEvent) empty() bool {
	return !e.Reset && len(e.Volumes) == 0 && len(e.Removed) == 0 && len(e.Nodes) == 0
}

// watched says whether v is in a watch limited to node and to volume
// ("" for all).
func watched(v *Volume, node, volume string) bool {
	if v.State == VolumeDeleted || volume != "" && v.ID != volume {
		return false
	}
	if node == "" || v.Attachment != nil && v.Attachment.Node == node {
		return true
	}
	for _, r := range v.Replicas {
		if r.Node == node {
			return true
		}
	}
	return false
}

// WatchEvent returns the event that brings a watcher from index from to
// this member's state, or nil when it has nothing newer (the watcher may
// even be ahead of a member that lags; it waits for it). node and volume
// filter the volumes as in WatchRequest.
func (f *FSM) WatchEvent(from uint64, node, volume string) *WatchEvent {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if from != 0 && from >= f.applied {
		// Nothing newer here. This member may even lag the watcher (which
		// came from another one): it waits rather than take it back.
		return nil
	}
	reset := from == 0 || from < f.changesFloor
	ev := &WatchEvent{Index: f.applied, Reset: reset}
	if reset {
		for _, v := range f.state.Volumes {
			if watched(v, node, volume) {
				ev.Volumes = append(ev.Volumes, v.Clone())
			}
		}
		for _, n := range f.state.SortedNodes() {
			c := *n
			ev.Nodes = append(ev.Nodes, &c)
		}
	} else {
		vols, nodes := map[string]bool{}, map[string]bool{}
		for i := len(f.changes) - 1; i >= 0 && f.changes[i].index > from; i-- {
			for _, id := range f.changes[i].volumes {
				vols[id] = true
			}
			for _, id := range f.changes[i].nodes {
				nodes[id] = true
			}
		}
		for id := range vols {
			if volume != "" && id != volume {
				continue
			}
			if v, ok := f.state.Volumes[id]; ok && watched(v, node, volume) {
				ev.Volumes = append(ev.Volumes, v.Clone())
			} else {
				ev.Removed = append(ev.Removed, id)
			}
		}
		for id := range nodes {
			if n, ok := f.state.Nodes[id]; ok {
				c := *n
				ev.Nodes = append(ev.Nodes, &c)
			}
		}
		sort.Strings(ev.Removed)
		sort.Slice(ev.Nodes, func(i, j int) bool { return ev.Nodes[i].ID < ev.Nodes[j].ID })
	}
	sort.Slice(ev.Volumes, func(i, j int) bool { return ev.Volumes[i].ID < ev.Volumes[j].ID })
	return ev
}
