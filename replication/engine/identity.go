package engine

import (
	"context"
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// A replica's generation names the copy of its data on its node's disk
// (see replication/replica/replica.go); the store records the generation of
// the copy it trusts (meta.Replica.Generation). A node that lost a replica's
// directory and made it again holds an empty copy under the same id, with
// another generation. Without this check the engine would claim that copy
// as healthy, read from it (the local replica first), and copy its zeros
// over the good replicas in the resync that follows an attach.
//
// Invariant: once checkIdentities returns, every healthy member's copy is
// the one whose generation the store records, and the store records a
// generation for every healthy member whose server reports one.

// identityVerdict is what the engine makes of a claimed member, from its
// state and generation in the store and the generation its server reports.
type identityVerdict int

const (
	// identityOK: the copy is the one the store means (or nothing can be
	// told: a server that predates generations).
	identityOK identityVerdict = iota
	// identityRecord: the store should record the copy's generation.
	identityRecord
	// identityLost: a healthy replica whose copy is not the one the store
	// trusts: it must not be read from, nor used as a source.
	identityLost
)

// verdictOf decides the fate of one claimed member:
//
//	state       store  server  verdict
//	healthy     ""     ""      ok       (a server older than generations)
//	healthy     ""     g       record   (the first engine to see it)
//	healthy     g      g       ok
//	healthy     g      ""/h    lost     (eject it; it is rebuilt)
//	rebuilding  any    ""      ok       (nothing to record)
//	rebuilding  g      g       ok
//	rebuilding  ""/g   h       record   (its node made a new blank copy;
//	                                     the rebuild compares every extent)
func verdictOf(state meta.ReplicaState, stored, reported string) identityVerdict {
	switch {
	case reported == stored:
		return identityOK
	case (state == meta.ReplicaHealthy || state == meta.ReplicaFollowing) && stored != "":
		// A follower was healthy first: its copy is recorded.
		return identityLost
	case reported == "":
		return identityOK
	}
	return identityRecord
}

// checkIdentities compares every claimed member's generation, as its
// server reports it, with the store's, and returns failed with the healthy
// members that hold another copy added: claimAll's caller ejects them before
// any I/O. It records in the store the generation of every claimed member
// whose generation the store does not know yet, so that a node that later
// loses the copy is caught too; a rebuilding member's new copy is recorded
// before its rebuild marks it healthy. An error means the store could not
// record one (no I/O may be served). Called with e.mu held for writing.
func (e *Engine) checkIdentities(ctx context.Context, failed []*member) ([]*member, error) {
	out := map[*member]bool{}
	for _, m := range failed {
		out[m] = true
	}
	var claimed []*member
	for _, m := range e.members {
		if !out[m] {
			claimed = append(claimed, m)
		}
	}
	index := make(map[*member]int, len(claimed))
	for i, m := range claimed {
		index[m] = i
	}
	infos := make([]replica.Info, len(claimed))
	errs := e.fanOut(ctx, claimed, func(ctx context.Context, m *member) error {
		info, err := m.client.Info(ctx)
		infos[index[m]] = info
		return err
	})
	for i, m := range claimed {
		r := m.replica
		log := e.log.With(zap.String("replica_id", r.ID), zap.String("node", r.Node), zap.Uint64("epoch", e.epoch))
		if errs[i] != nil {
			log.Warn("claim failed: cannot read the replica's generation", zap.Error(errs[i]))
			failed = append(failed, m)
			continue
		}
		got := infos[i].Generation
		switch verdictOf(r.State, r.Generation, got) {
		case identityOK:
		case identityLost:
			log.Error("replica does not hold the data the store trusts it with (its copy was lost or replaced); ejecting it",
				zap.String("generation_recorded", r.Generation), zap.String("generation_found", got))
			failed = append(failed, m)
		case identityRecord:
			_, err := e.cfg.Meta.Apply(ctx, &meta.SetReplicaGeneration{
				VolumeID: e.cfg.VolumeID, ReplicaID: r.ID, Generation: got, Expect: r.Generation,
			})
			switch {
			case err == nil:
				log.Info("replica generation recorded", zap.String("generation", got), zap.String("previous_generation", r.Generation),
					zap.String("state", string(r.State)))
				m.replica.Generation = got
			case errors.Is(err, meta.ErrGenerationMismatch), errors.Is(err, meta.ErrFailedPrecondition), errors.Is(err, meta.ErrNotFound):
				// Another copy was recorded meanwhile, or the replica left
				// the set or is no longer healthy or rebuilding: this copy is
				// not the one the store means.
				log.Warn("claim failed: the store would not record the replica's generation", zap.String("generation", got), zap.Error(err))
				failed = append(failed, m)
			default:
				return nil, fmt.Errorf("record generation of replica %s: %v: %w", r.ID, err, ErrIO)
			}
		}
	}
	return failed, nil
}
