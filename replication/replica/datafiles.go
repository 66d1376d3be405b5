package replica

// DataFiles returns the paths of the data files of the replica's layers,
// oldest first, the head last: what the node's deduplication pass reads
// and shares (replication/dedup). A sealed layer's file may be a hard
// link that a restored replica shares. Nil for a closed replica.
func (r *Replica) DataFiles() []string {
	r.epochMu.RLock()
	defer r.epochMu.RUnlock()
	if r.closed {
		return nil
	}
	out := make([]string, 0, len(r.below)+1)
	for _, lf := range r.below {
		if lf.data != nil {
			out = append(out, lf.data.Name())
		}
	}
	return append(out, r.data.Name())
}
