package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Kind names a fault kind (the -faults flag takes these names).
type Kind string

// The fault kinds. Each round injects one of them into a fresh volume while
// writes stream through NBD, holds it for the round's hold time, lifts it,
// waits for the volume to heal and checks the data.
const (
	KillReplica      Kind = "kill-replica"
	StopReplica      Kind = "stop-replica"
	KillEngine       Kind = "kill-engine"
	StopEngine       Kind = "stop-engine"
	KillLeader       Kind = "kill-leader"
	Partition        Kind = "partition"
	SlowReplica      Kind = "slow-replica"
	DiskFull         Kind = "disk-full"
	BitFlip          Kind = "bit-flip"
	DeleteReplicaDir Kind = "delete-replica-dir"
	Snapshot         Kind = "snapshot"
	DeleteSnapCrash  Kind = "delete-snapshot-crash"
)

// faultKind is how one kind of fault is set up, injected and lifted.
type faultKind struct {
	kind Kind
	what string // one line: what the fault does
	// stallTarget is the longest an acknowledged write may wait while the
	// fault lasts, per the targets (0: the issue sets none).
	stallTarget time.Duration
	// takeoverTarget bounds the time from the fault to the first write
	// acknowledged through the export on another node (0: none set).
	takeoverTarget time.Duration
	// place, if set, names the node the volume's placement should prefer.
	place func(r *round) string
	// engineOn, if set, narrows the nodes the volume may be exported on.
	engineOn func(r *round) []string
	run      func(ctx context.Context, r *round) error
	// with, if set, makes the kind of others: each round injects one of
	// them (drawn), with its placement, export and run; run is unused.
	with []Kind
	// snapshots, if set, is how many snapshots the round takes through
	// the store while the fault acts (see snapshots.go); each one that
	// gets ready is restored and checked against the model at its cut.
	snapshots int
}

// faultKinds lists every kind, in the order the report prints them.
var faultKinds = []*faultKind{
	{
		kind: KillReplica, what: "SIGKILL a node holding a replica (not the engine's, not the store leader), restart it",
		run: func(ctx context.Context, r *round) error {
			victim, err := r.replicaVictim(ctx)
			if err != nil {
				return err
			}
			if err := r.inject(func() error { return r.cl.kill(ctx, victim) }, "kill -9 %s (replica %s)", victim, r.replicaID(victim)); err != nil {
				return err
			}
			r.holdRest(ctx)
			return r.lift(func() error { return r.cl.start(ctx, victim) }, "restart %s", victim)
		},
	},
	{
		kind: StopReplica, what: "SIGSTOP a node holding a replica (not the engine's, not the store leader), SIGCONT it",
		stallTarget: 2 * time.Second,
		run: func(ctx context.Context, r *round) error {
			victim, err := r.replicaVictim(ctx)
			if err != nil {
				return err
			}
			if err := r.inject(func() error { return r.cl.stop(victim) }, "SIGSTOP %s (replica %s)", victim, r.replicaID(victim)); err != nil {
				return err
			}
			r.holdRest(ctx)
			return r.lift(func() error { return r.cl.cont(victim) }, "SIGCONT %s", victim)
		},
	},
	{
		kind: KillEngine, what: "SIGKILL the node serving the export, export on another node at once, restart the old one",
		engineOn: func(r *round) []string { return without(r.cl.nodeIDs(), r.leader) },
		run: func(ctx context.Context, r *round) error {
			old := r.engine
			if err := r.inject(func() error { return r.cl.kill(ctx, old) }, "kill -9 %s (the engine's node)", old); err != nil {
				return err
			}
			err := r.takeOver(ctx, pick(r.rng, without(r.cl.nodeIDs(), old)))
			r.holdRest(ctx)
			return errors.Join(err, r.lift(func() error { return r.cl.start(ctx, old) }, "restart %s", old))
		},
	},
	{
		kind: StopEngine, what: "SIGSTOP the node serving the export, export on another node at once, SIGCONT the old one",
		takeoverTarget: 3 * time.Second,
		engineOn:       func(r *round) []string { return without(r.cl.nodeIDs(), r.leader) },
		run: func(ctx context.Context, r *round) error {
			old := r.engine
			if err := r.inject(func() error { return r.cl.stop(old) }, "SIGSTOP %s (the engine's node)", old); err != nil {
				return err
			}
			err := r.takeOver(ctx, pick(r.rng, without(r.cl.nodeIDs(), old)))
			r.holdRest(ctx)
			return errors.Join(err, r.lift(func() error { return r.cl.cont(old) }, "SIGCONT %s", old))
		},
	},
	{
		kind: KillLeader, what: "SIGKILL the store's leader (not the engine's node; it may hold a replica), restart it",
		engineOn: func(r *round) []string { return without(r.cl.nodeIDs(), r.leader) },
		run: func(ctx context.Context, r *round) error {
			leader, err := r.cl.leader(ctx)
			if err != nil || leader == "" {
				return fmt.Errorf("no leader to kill: %v", err)
			}
			role := "no replica"
			if id := r.replicaID(leader); id != "" {
				role = "replica " + id
			}
			if err := r.inject(func() error { return r.cl.kill(ctx, leader) }, "kill -9 the leader %s (%s)", leader, role); err != nil {
				return err
			}
			var tErr error
			if leader == r.engine { // leadership moved to the engine's node since the round began
				r.note("the leader was the engine's node by then: took the export over")
				tErr = r.takeOver(ctx, pick(r.rng, without(r.cl.nodeIDs(), leader)))
			}
			r.holdRest(ctx)
			return errors.Join(tErr, r.lift(func() error { return r.cl.start(ctx, leader) }, "restart %s", leader))
		},
	},
	{
		kind: Partition, what: "drop all TCP to and from one replica node's replica server (nftables), then remove the rules",
		stallTarget: 2 * time.Second,
		run: func(ctx context.Context, r *round) error {
			victim, err := r.replicaVictim(ctx)
			if err != nil {
				return err
			}
			n, _ := r.cl.node(victim)
			if r.cl.nft == nil {
				r.cl.nft = newNFTTable()
			}
			if err := r.inject(func() error { return r.cl.nft.dropTCP(n.Data) }, "partition: drop TCP to/from %s's replica server %s (replica %s)", victim, n.Data, r.replicaID(victim)); err != nil {
				return err
			}
			r.holdRest(ctx)
			return r.lift(r.cl.nft.remove, "remove the partition")
		},
	},
	{
		kind: SlowReplica, what: "freeze a replica node in bursts (SIGSTOP 100–300 ms, SIGCONT 50 ms, repeated), then let it run",
		stallTarget: 2 * time.Second,
		run: func(ctx context.Context, r *round) error {
			victim, err := r.replicaVictim(ctx)
			if err != nil {
				return err
			}
			stopped := time.Duration(100+r.rng.IntN(201)) * time.Millisecond
			const running = 50 * time.Millisecond
			quit, done := make(chan struct{}), make(chan struct{})
			if err := r.inject(func() error {
				go func() {
					defer close(done)
					for {
						if err := r.cl.stop(victim); err != nil {
							return
						}
						select {
						case <-quit:
						case <-time.After(stopped):
						}
						_ = r.cl.cont(victim)
						r.cl.setDown(victim, true) // keep ctl away from it while the bursts go on
						select {
						case <-quit:
							return
						case <-time.After(running):
						}
					}
				}()
				return nil
			}, "slow %s (replica %s): SIGSTOP %v, SIGCONT %v, repeated", victim, r.replicaID(victim), stopped, running); err != nil {
				return err
			}
			r.holdRest(ctx)
			return r.lift(func() error {
				close(quit)
				<-done
				return r.cl.cont(victim)
			}, "let %s run", victim)
		},
	},
	{
		kind: DiskFull, what: "fill the small file system that is the last node's data dir (it holds a replica), then free it",
		place:    func(r *round) string { return r.cl.smallFSNode },
		engineOn: func(r *round) []string { return without(r.cl.nodeIDs(), r.cl.smallFSNode) },
		run: func(ctx context.Context, r *round) error {
			victim := r.cl.smallFSNode
			if r.replicaID(victim) == "" {
				return fmt.Errorf("placement put no replica on %s (the small file system): %s", victim, r.vol.summary())
			}
			var took int64
			if err := r.inject(func() error {
				var err error
				took, err = r.cl.smallFS.fill()
				return err
			}, "fill %s's data dir (replica %s)", victim, r.replicaID(victim)); err != nil {
				return err
			}
			r.note(fmt.Sprintf("filler took %s; %d bytes left free", formatBytes(uint64(took)), r.cl.smallFS.free()))
			r.holdRest(ctx)
			return r.lift(r.cl.smallFS.unfill, "free %s's data dir", victim)
		},
	},
	{
		kind: BitFlip, what: "flip one bit in each of 4 written blocks of the replica the engine reads (its node's own)",
		engineOn: func(r *round) []string {
			var out []string
			for _, rep := range r.vol.Replicas {
				out = append(out, rep.Node)
			}
			return out
		},
		run: func(ctx context.Context, r *round) error {
			victim := r.engine
			id := r.replicaID(victim)
			n, _ := r.cl.node(victim)
			path := filepath.Join(n.DataDir, "replicas", id, "data")
			// The blocks stay reserved in the model until the round ends, so
			// that no write covers a flipped bit before the check.
			var blocks []int
			for len(blocks) < 4 {
				b := r.rng.IntN(r.m.blocks() / 2) // the filled half
				if slices.Contains(blocks, b) || !r.m.begin(b) {
					continue
				}
				blocks = append(blocks, b)
			}
			slices.Sort(blocks)
			if err := r.inject(func() error {
				for _, b := range blocks {
					off := int64(b)*blockSize + int64(r.rng.IntN(blockSize))
					if err := flipBit(path, off, uint(r.rng.IntN(8))); err != nil {
						return err
					}
				}
				return nil
			}, "flip a bit in blocks %v of %s's replica %s (%s)", blocks, victim, id, path); err != nil {
				return err
			}
			r.holdRest(ctx)
			return r.lift(func() error { return nil }, "nothing to lift: the flipped bits stay")
		},
	},
	{
		kind: DeleteReplicaDir, what: "unexport the volume, SIGKILL a replica node, delete its replica's directory, restart it, export again",
		run: func(ctx context.Context, r *round) error {
			victim, err := r.replicaVictim(ctx)
			if err != nil {
				return err
			}
			id := r.replicaID(victim)
			n, _ := r.cl.node(victim)
			dir := filepath.Join(n.DataDir, "replicas", id)
			if _, err := os.Stat(dir); err != nil {
				return fmt.Errorf("replica dir: %w", err)
			}
			// The volume is detached while the node is away, so no engine
			// has a write fail on the dead replica and ejects it: only the
			// replica's identity can tell the next engine that the
			// directory that comes back is not the one it had.
			if err := r.pauseWrites(); err != nil {
				return err
			}
			// unexport returns once the store has detached the volume; the
			// engine then flushes and declares a clean point. Killing a
			// replica node before that leaves dirty extents, which the
			// next engine resyncs over the new empty replica: the fault
			// would then depend on a race. Wait for the engine to close.
			from := r.cl.logOffsets()[r.engine]
			if _, err := r.cl.ctl(ctx, 30*time.Second, "volume", "unexport", r.vol.ID); err != nil {
				return err
			}
			line, err := r.cl.waitLogLine(ctx, r.engine, from, 30*time.Second, `"msg":"export stopped"`, r.vol.ID)
			if err != nil {
				return err
			}
			if strings.Contains(line, `"error"`) {
				r.note("the old export did not close cleanly: " + line)
			}
			if err := r.inject(func() error {
				if err := r.cl.kill(ctx, victim); err != nil {
					return err
				}
				return os.RemoveAll(dir)
			}, "volume unexported; kill -9 %s, rm -r %s", victim, dir); err != nil {
				return err
			}
			r.holdRest(ctx)
			if err := r.lift(func() error { return r.cl.start(ctx, victim) }, "restart %s", victim); err != nil {
				return err
			}
			return r.exportAgain(ctx)
		},
	},
	{
		kind: Snapshot, what: "take snapshots through the store while a replica or the engine's node is killed, frozen or partitioned; restore each, check it at its cut",
		// The faults a cut must get through: a replica that dies, freezes
		// or is cut off while the engine flushes and seals (it is ejected,
		// the snapshot is taken on the others), and the engine's node
		// dying or freezing with a snapshot asked for (the node the export
		// moves to must take it).
		with:      []Kind{KillReplica, StopReplica, Partition, KillEngine, StopEngine},
		snapshots: 4,
	},
	{
		kind: DeleteSnapCrash, what: "snapshot, overwrite, snapshot, overwrite; delete the first and SIGKILL the serving node mid-merge, restart it",
		// The node that serves the volume must hold a replica, so that the
		// kill cuts a merge short on disk; not the leader, so that the kill
		// is that and nothing more.
		engineOn: func(r *round) []string {
			var out []string
			for _, rep := range r.vol.Replicas {
				if rep.Node != r.leader {
					out = append(out, rep.Node)
				}
			}
			return out
		},
		run: runDeleteSnapCrash,
	},
}

// kindByName returns the fault kind called name.
func kindByName(name Kind) (*faultKind, bool) {
	for _, k := range faultKinds {
		if k.kind == name {
			return k, true
		}
	}
	return nil, false
}

// parseKinds reads the -faults list ("" or "all": every kind).
func parseKinds(list string) ([]*faultKind, error) {
	if list == "" || list == "all" {
		return faultKinds, nil
	}
	var out []*faultKind
	for _, name := range strings.Split(list, ",") {
		k, ok := kindByName(Kind(strings.TrimSpace(name)))
		if !ok {
			return nil, fmt.Errorf("unknown fault kind %q (kinds: %s)", name, kindNames())
		}
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out, nil
}

func kindNames() string {
	var s []string
	for _, k := range faultKinds {
		s = append(s, string(k.kind))
	}
	return strings.Join(s, ",")
}
