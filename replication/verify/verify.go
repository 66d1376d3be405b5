// Package verify compares the healthy replicas of a volume extent by
// extent, over the replica protocol: the check behind `cairn ctl volume
// verify`. It reads checksums only and changes nothing; it claims no epoch,
// so it fences no engine.
package verify

import (
	"context"
	"errors"
	"fmt"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// Report is what Volume found; it is also `volume verify -o json`.
type Report struct {
	VolumeID    string   `json:"volume_id"`
	Replicas    []string `json:"replicas"`
	Extents     uint64   `json:"extents"`
	ExtentBytes uint64   `json:"extent_bytes"`
	Differing   []uint64 `json:"differing_extents"`
	Identical   bool     `json:"identical"`
}

// Volume reads the CRC32C of every extent from every healthy replica of
// volume id and lists the extents where any replica differs from the first.
// The volume should be idle: a write in flight can make replicas differ for
// a moment.
func Volume(ctx context.Context, c *meta.Client, id string, opts ...replica.DialOption) (*Report, error) {
	st, err := c.State(ctx, true)
	if err != nil {
		return nil, err
	}
	v, ok := st.Volumes[id]
	if !ok || v.State == meta.VolumeDeleted {
		return nil, fmt.Errorf("volume %q: %w", id, meta.ErrNotFound)
	}
	rep := &Report{VolumeID: id, Differing: []uint64{}}
	var first []uint32
	for _, r := range v.Replicas {
		if r.State != meta.ReplicaHealthy {
			continue
		}
		n, ok := st.Nodes[r.Node]
		if !ok || n.DataAddr == "" {
			return nil, fmt.Errorf("replica %s: node %s has no replica server address", r.ID, r.Node)
		}
		sums, extentBytes, err := replicaChecksums(ctx, n.DataAddr, r.ID, v.ReplicaBytes(), opts...)
		if err != nil {
			return nil, fmt.Errorf("replica %s on %s: %w", r.ID, r.Node, err)
		}
		rep.Replicas = append(rep.Replicas, r.ID)
		rep.ExtentBytes = extentBytes
		if first == nil {
			first = sums
			rep.Extents = uint64(len(sums))
			continue
		}
		for i := range first {
			if i >= len(sums) || sums[i] != first[i] {
				rep.Differing = append(rep.Differing, uint64(i))
			}
		}
	}
	if len(rep.Replicas) == 0 {
		return nil, fmt.Errorf("volume %s has no healthy replica", id)
	}
	rep.Identical = len(rep.Differing) == 0
	return rep, nil
}

// fencedRetries bounds how often replicaChecksums starts over after an
// engine claimed a newer epoch between its two requests.
const fencedRetries = 5

// replicaChecksums reads every extent checksum of one replica, with the
// replica's own epoch (verify changes nothing and fences nobody). An engine
// may claim the replica between the Info and the Checksums request (a
// rebuild starting on another node does); the read is then fenced, and it
// starts over at the new epoch.
func replicaChecksums(ctx context.Context, addr, id string, size uint64, opts ...replica.DialOption) ([]uint32, uint64, error) {
	rc, err := replica.Dial(ctx, addr, id, size, opts...)
	if err != nil {
		return nil, 0, err
	}
	defer rc.Close()
	for attempt := 0; ; attempt++ {
		info, err := rc.Info(ctx)
		if err != nil {
			return nil, 0, err
		}
		extents := (info.Size + info.ExtentSize - 1) / info.ExtentSize
		sums, err := rc.Checksums(ctx, info.Epoch, 0, extents)
		if errors.Is(err, replica.ErrFenced) && attempt < fencedRetries {
			continue
		}
		return sums, info.ExtentSize, err
	}
}
