package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

// Snapshot faults (issue 12, docs/snapshots.md "The control plane"). The
// campaign asks the store for snapshots (meta.Client.TakeSnapshot, as the
// CSI controller does) and leaves the cut to whichever node serves the
// volume, so every path the control plane has is taken: the engine's node
// cutting under a frozen or partitioned replica, a snapshot asked for
// while the engine's node is dead or frozen and taken by the node the
// export moved to, a deletion's merge cut short by SIGKILL and resumed.
//
// Each snapshot that gets ready is restored into a new volume
// (meta.Client.Restore: hard links of the layers on the holders' nodes),
// exported, read whole and judged against the model as it was at the cut
// (model.judgeAt): a block must hold the last write acknowledged before
// TakeSnapshot was called, or a write of it started before TakeSnapshot
// returned.

// snapshotBound is how long a snapshot may take to get ready before it
// counts as not taken in time. The node serving the volume retries a
// failed cut at each pass, so a snapshot that misses it is asked for
// again once the volume has healed: then it must get ready.
const snapshotBound = 30 * time.Second

// snapTake is one snapshot the round asked for.
type snapTake struct {
	name, id         string
	called, returned time.Time // TakeSnapshot was called; it returned (ready, or gave up)
	ready            bool      // ready within snapshotBound
	late             bool      // ready only when asked again after the volume healed
	err              error     // why it was not ready in time
	holders          []string  // the replicas that sealed it
	deleted          bool      // the round deleted it (delete-snapshot-crash)
}

// snapResult is what a round found about its snapshots.
type snapResult struct {
	// Asked for; ready within the bound; ready only when asked again after
	// the round healed. The others were not checked: the round ended first.
	taken, ready, late   int
	stuck                int // not ready even after the volume healed: nothing explains that
	restores             int // restored and read whole against the model
	lost, stale, newer   int // blocks of restored snapshots (see judgeAt)
	divergent            int // extents in which a restored volume's replicas differ
	deletions, resumed   int // snapshots deleted; deletions that finished after the crash
	killsMidMerge, kills int // SIGKILLs of the serving node that cut its replica's merge short; all of them
	leftover             int // replicas that still list a deleted snapshot's layer once its record is gone
}

func (s *snapResult) failed() bool {
	return s.stuck > 0 || s.lost+s.stale+s.newer+s.divergent > 0 || s.resumed < s.deletions || s.leftover > 0
}

func (s *snapResult) add(o snapResult) {
	s.taken += o.taken
	s.ready += o.ready
	s.late += o.late
	s.stuck += o.stuck
	s.restores += o.restores
	s.lost += o.lost
	s.stale += o.stale
	s.newer += o.newer
	s.divergent += o.divergent
	s.deletions += o.deletions
	s.resumed += o.resumed
	s.killsMidMerge += o.killsMidMerge
	s.kills += o.kills
	s.leftover += o.leftover
}

// metaClient returns a store client of the nodes the campaign has not
// killed or frozen. Close it after use.
func (c *cluster) metaClient() (*meta.Client, error) {
	creds, err := pki.Load(pki.FilesIn(c.ctlTLS(), "tls"))
	if err != nil {
		return nil, err
	}
	return meta.NewClient(strings.Split(c.servers(), ","), meta.WithTLS(creds))
}

// takeSnapshot asks the store for snapshot name of volume vol and waits up
// to snapshotBound for it to be ready. It runs beside the round's own
// goroutine (the snapshotter), so it takes the volume's id, not r.vol.
func (r *round) takeSnapshot(ctx context.Context, vol, name string) *snapTake {
	t := &snapTake{name: name}
	mc, err := r.cl.metaClient()
	if err != nil {
		t.err = err
		return t
	}
	defer mc.Close()
	tctx, cancel := context.WithTimeout(ctx, snapshotBound)
	defer cancel()
	t.called = time.Now()
	sn, err := mc.TakeSnapshot(tctx, vol, name)
	t.returned = time.Now()
	if sn != nil {
		t.id, t.holders = sn.ID, sn.Replicas
	}
	t.ready, t.err = err == nil, err
	return t
}

func (r *round) addSnap(t *snapTake) {
	r.snapMu.Lock()
	r.snaps = append(r.snaps, t)
	r.snapMu.Unlock()
}

// startSnapshotter takes up to most snapshots, one after another, from the
// moment the fault is injected until it is lifted: the first at a random
// point of the fault's first half second (the engine may not have noticed
// the fault yet), the next 200–700 ms after the last one returned.
func (r *round) startSnapshotter(ctx context.Context, most int) {
	rng := rand.New(rand.NewPCG(r.rng.Uint64(), 0x5a9))
	vol := r.vol.ID
	r.snapWG.Go(func() {
		select {
		case <-r.faulted:
		case <-ctx.Done():
			return
		}
		for i := 1; i <= most; i++ {
			pause := time.Duration(200+rng.IntN(500)) * time.Millisecond
			if i == 1 {
				pause = time.Duration(rng.IntN(500)) * time.Millisecond
			}
			select {
			case <-r.lifted:
				return
			case <-ctx.Done():
				return
			case <-time.After(pause):
			}
			t := r.takeSnapshot(ctx, vol, fmt.Sprintf("torture-%d-snap-%d", r.n, i))
			r.addSnap(t)
			if t.ready {
				r.say("snapshot %s (%s) ready in %v, held by %v", t.name, t.id, t.returned.Sub(t.called).Round(time.Millisecond), t.holders)
			} else {
				r.say("snapshot %s (%s) not ready in %v: %v", t.name, t.id, t.returned.Sub(t.called).Round(time.Millisecond), t.err)
			}
		}
	})
}

// when describes t's time against the round's fault.
func (r *round) when(t *snapTake) string {
	at := t.called.Sub(r.faultAt)
	switch {
	case r.faultAt.IsZero() || at < 0:
		return "before the fault"
	case !r.liftAt.IsZero() && t.called.After(r.liftAt):
		return fmt.Sprintf("%v after the lift", t.called.Sub(r.liftAt).Round(time.Millisecond))
	default:
		return fmt.Sprintf("%v into the fault", at.Round(time.Millisecond))
	}
}

// checkSnapshots, once the volume has healed and its data checked: every
// snapshot deleted must be gone, and every other one ready (asked for
// again if it missed its bound) and restored, read whole and judged
// against the model at its cut.
func (r *round) checkSnapshots(ctx context.Context) error {
	r.snapWG.Wait()
	if len(r.snaps) == 0 {
		return nil
	}
	mc, err := r.cl.metaClient()
	if err != nil {
		return err
	}
	defer mc.Close()
	s := &r.res.snap
	for _, t := range r.snaps {
		if t.deleted {
			s.deletions++
			if err := r.waitSnapshotGone(ctx, mc, t); err != nil {
				r.res.problems = append(r.res.problems, err.Error())
				r.say("SNAPSHOT: %v", err)
				continue
			}
			s.resumed++
			r.checkLeftover(t)
			continue
		}
		took := t.returned.Sub(t.called).Round(time.Millisecond)
		if !t.ready {
			// Not ready within its bound while the fault acted, which the
			// fault may explain. The volume has healed now: its serving
			// node must take it (the same name gives the same snapshot).
			tctx, cancel := context.WithTimeout(ctx, snapshotBound)
			sn, err := mc.TakeSnapshot(tctx, r.vol.ID, t.name)
			cancel()
			if err != nil {
				s.stuck++
				p := fmt.Sprintf("snapshot %s (asked for %s): not ready within %v (%v), nor within %v of asking again once the volume had healed: %v",
					t.name, r.when(t), snapshotBound, t.err, snapshotBound, err)
				r.res.problems = append(r.res.problems, p)
				r.say("SNAPSHOT: %s", p)
				continue
			}
			r.note(fmt.Sprintf("snapshot %s (asked for %s) not ready within %v (%v); ready when asked again after healing",
				t.name, r.when(t), took, t.err))
			// The cut fell somewhere between the first call and now.
			t.late, t.id, t.holders, t.returned = true, sn.ID, sn.Replicas, time.Now()
			s.late++
		} else {
			r.note(fmt.Sprintf("snapshot %s (%s) asked for %s, ready in %v, held by %d replicas", t.name, t.id, r.when(t), took, len(t.holders)))
		}
		if err := r.checkRestore(ctx, mc, t); err != nil {
			return err
		}
	}
	return nil
}

// checkRestore restores snapshot t into a new volume, exports it on a
// random node, judges every block against the model at t's cut, compares
// the new volume's replicas and removes it. The new volume has as many
// replicas as hold the snapshot, up to 3, so that every replica is made of
// its layers; or, one time in two while every node is up, one more, placed
// where the layers are not and filled by a rebuild with them flattened
// (docs/snapshots.md, "Chain depth and flattening"): its replicas are
// compared once it is healthy too.
func (r *round) checkRestore(ctx context.Context, mc *meta.Client, t *snapTake) error {
	replicas := min(3, max(1, len(t.holders)))
	elsewhere := replicas < nodes && len(r.cl.nodeIDs()) == nodes && r.rng.IntN(2) == 0
	if elsewhere {
		replicas++
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	v, err := mc.Restore(rctx, meta.CreateVolume{Name: t.name + "-restore", SizeBytes: r.o.size, Replicas: replicas}, t.id, "")
	cancel()
	if err != nil {
		return fmt.Errorf("restore snapshot %s (%s): %w", t.name, t.id, err)
	}
	r.restored = append(r.restored, v.ID)
	node := pick(r.rng, r.cl.nodeIDs())
	r.exports++
	sock := filepath.Join(r.cl.sockDir, fmt.Sprintf("r%d.%d-%s.sock", r.n, r.exports, node))
	if _, err := r.cl.export(ctx, v.ID, node, sock); err != nil {
		return fmt.Errorf("export %s, restored from %s: %w", v.ID, t.name, err)
	}
	conn, err := r.dial(ctx, sock)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	res, err := r.m.checkAt(cctx, conn, t.called, t.returned)
	cancel()
	_ = conn.Close()
	if err != nil {
		return fmt.Errorf("read %s, restored from %s: %w", v.ID, t.name, err)
	}
	s := &r.res.snap
	s.restores++
	s.lost, s.stale, s.newer = s.lost+res.lost, s.stale+res.stale, s.newer+res.newer
	for _, p := range res.problems {
		r.res.problems = append(r.res.problems, fmt.Sprintf("snapshot %s (%s, restored as %s): %s", t.name, t.id, v.ID, p))
	}
	if bad := res.lost + res.stale + res.newer; bad > 0 {
		r.say("SNAPSHOT DATA: %s restored on %s: %d blocks lost, %d stale, %d newer than the cut (asked for %s, ready %v later):\n    %s",
			t.name, node, res.lost, res.stale, res.newer, r.when(t), t.returned.Sub(t.called).Round(time.Millisecond), strings.Join(res.problems, "\n    "))
	} else {
		r.say("snapshot %s restored as %s (%d replicas), exported on %s: all %d blocks match the model at its cut", t.name, v.ID, replicas, node, r.m.blocks())
	}
	if elsewhere {
		if err := r.waitAllHealthy(ctx, v.ID); err != nil {
			return fmt.Errorf("%s, restored from %s with a replica where its layers are not: %w", v.ID, t.name, err)
		}
		r.say("snapshot %s restored as %s: the replica placed where its layers are not is healthy", t.name, v.ID)
	}
	rep, err := r.cl.verify(ctx, v.ID)
	if err != nil {
		return err
	}
	if elsewhere && len(rep.Replicas) != replicas {
		p := fmt.Sprintf("snapshot %s restored as %s: verify compared replicas %v, want all %d", t.name, v.ID, rep.Replicas, replicas)
		r.res.problems = append(r.res.problems, p)
		s.divergent++
		r.say("DIVERGENT: %s", p)
	}
	if differing := slices.Compact(slices.Sorted(slices.Values(rep.Differing))); !rep.Identical {
		s.divergent += len(differing)
		p := fmt.Sprintf("snapshot %s restored as %s: healthy replicas %v differ in %d of %d extents: %v", t.name, v.ID, rep.Replicas, len(differing), rep.Extents, differing)
		r.res.problems = append(r.res.problems, p)
		r.say("DIVERGENT: %s", p)
	}
	if err := r.cl.removeVolume(ctx, v.ID); err != nil {
		r.say("remove restored volume %s: %v", v.ID, err)
	} else {
		r.restored = slices.DeleteFunc(r.restored, func(id string) bool { return id == v.ID })
	}
	return nil
}

// waitAllHealthy waits up to two minutes until every replica of volume id
// is healthy (a restore's replica being rebuilt, while the restore is
// exported and its engine rebuilds it).
func (r *round) waitAllHealthy(ctx context.Context, id string) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		v, err := r.cl.volume(ctx, id)
		if err == nil && v.healthy() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not every replica healthy within 2m (%s, %v)", v.summary(), err)
		}
		if err := benchkit.Sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

// waitSnapshotGone waits until deleted snapshot t's record is gone: the
// node serving the volume forgets it once every healthy replica merged its
// layer away. It must within the heal timeout of the lift.
func (r *round) waitSnapshotGone(ctx context.Context, mc *meta.Client, t *snapTake) error {
	deadline := r.liftAt.Add(r.o.healTimeout)
	for {
		sn, err := mc.Snapshot(ctx, t.id)
		if errors.Is(err, meta.ErrNotFound) {
			r.note(fmt.Sprintf("deleted snapshot %s (%s) forgotten %v after the lift", t.name, t.id, time.Since(r.liftAt).Round(time.Millisecond)))
			return nil
		}
		if time.Now().After(deadline) {
			why := fmt.Sprint(err)
			if sn != nil {
				why = fmt.Sprintf("deleting %v, last error %q", sn.Deleting, sn.Error)
			}
			return fmt.Errorf("deleted snapshot %s (%s) still recorded %v after the lift (%s): the deletion did not resume",
				t.name, t.id, r.o.healTimeout, why)
		}
		if err := benchkit.Sleep(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

// checkLeftover looks for deleted snapshot t in the chain record of every
// replica of the volume: once the store has forgotten it, no replica may
// keep its layer (it would hold its space for good: no one asks for the
// merge again).
func (r *round) checkLeftover(t *snapTake) {
	for _, rep := range r.vol.Replicas {
		l, path, err := r.chainLayer(rep.Node, rep.ID, t.id)
		switch {
		case err != nil:
			r.note(err.Error())
		case l != nil:
			r.res.snap.leftover++
			p := fmt.Sprintf("deleted snapshot %s (%s) is forgotten by the store, but replica %s on %s still lists its layer (deleting %v) in %s",
				t.name, t.id, rep.ID, rep.Node, l.Deleting, path)
			r.res.problems = append(r.res.problems, p)
			r.say("SNAPSHOT: %s", p)
		}
	}
}

// chainEntry is an entry of a replica's chain record (replication/layer).
type chainEntry struct {
	ID       string `json:"id"`
	Deleting bool   `json:"deleting"`
}

// chainLayer reads the chain record of replica id on node and returns
// snapshot snap's entry in it (nil if it has none) and the record's path.
// A replica without a record is a single layer, no snapshot's.
func (r *round) chainLayer(node, id, snap string) (*chainEntry, string, error) {
	n, ok := r.cl.node(node)
	if !ok {
		return nil, "", fmt.Errorf("no node %s", node)
	}
	path := filepath.Join(n.DataDir, "replicas", id, "chain")
	raw, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, path, nil
	}
	if err != nil {
		return nil, path, err
	}
	var rec struct {
		Layers []chainEntry `json:"layers"`
	}
	if err := json.Unmarshal(raw, &rec); err != nil {
		return nil, path, fmt.Errorf("%s: %w", path, err)
	}
	for i := range rec.Layers {
		if rec.Layers[i].ID == snap {
			return &rec.Layers[i], path, nil
		}
	}
	return nil, path, nil
}

// forgetSnapshots removes the round's snapshots from the store once its
// volume is deleted: a snapshot of a deleted volume is forgotten at once
// (its layers went with the replicas).
func (r *round) forgetSnapshots(ctx context.Context) {
	if len(r.snaps) == 0 {
		return
	}
	mc, err := r.cl.metaClient()
	if err != nil {
		r.say("forget the round's snapshots: %v", err)
		return
	}
	defer mc.Close()
	st, err := mc.State(ctx, true)
	if err != nil {
		r.say("forget the round's snapshots: %v", err)
		return
	}
	for id, sn := range st.Snapshots {
		if sn.SourceVolumeID == r.vol.ID {
			if err := mc.DeleteSnapshot(ctx, id); err != nil {
				r.say("forget snapshot %s: %v", id, err)
			}
		}
	}
}

// runDeleteSnapCrash is the delete-snapshot-crash fault: a first snapshot,
// the volume overwritten (so that the first snapshot's layer holds blocks
// the next does not, and blocks it does), a second snapshot, more writes
// (so that the second's layer is not the head), then the first deleted and
// the node serving the volume, which holds a replica, killed while its
// replica merges the layer away. The kill lands at a point drawn per
// round: when the node starts the deletion, or when its replica logs 25,
// 50 or 75 % of the merge. The export moves to another node at once, or
// comes back once the node restarts (drawn). After the round the deletion
// must have finished (the record gone) and left no layer behind, and the
// second snapshot must restore to its own cut.
func runDeleteSnapCrash(ctx context.Context, r *round) error {
	vol := r.vol.ID
	take := func(i int) (*snapTake, error) {
		t := r.takeSnapshot(ctx, vol, fmt.Sprintf("torture-%d-snap-%d", r.n, i))
		if !t.ready {
			return nil, fmt.Errorf("snapshot %s not ready within %v with no fault acting: %v", t.name, snapshotBound, t.err)
		}
		r.addSnap(t)
		r.say("snapshot %s (%s) ready in %v, held by %v", t.name, t.id, t.returned.Sub(t.called).Round(time.Millisecond), t.holders)
		return t, nil
	}
	first, err := take(1)
	if err != nil {
		return err
	}
	if err := r.waitAcked(ctx, int64(r.m.blocks()), time.Minute, "writes after the first snapshot"); err != nil {
		return err
	}
	if _, err := take(2); err != nil {
		return err
	}
	if err := r.waitAcked(ctx, int64(r.m.blocks()/2), time.Minute, "writes after the second snapshot"); err != nil {
		return err
	}

	old := r.engine
	if err := r.deleteAndKill(ctx, first); err != nil {
		return err
	}
	var tErr error
	takeover := r.rng.IntN(2) == 0
	if takeover {
		tErr = r.takeOver(ctx, pick(r.rng, without(r.cl.nodeIDs(), old)))
	} else {
		r.w.stop()
	}
	r.holdRest(ctx)
	if err := r.lift(func() error { return r.cl.start(ctx, old) }, "restart %s", old); err != nil || tErr != nil {
		return errors.Join(tErr, err)
	}
	if !takeover {
		return r.exportAgain(ctx)
	}
	return nil
}

// deleteAndKill deletes snapshot t and SIGKILLs the node serving the
// volume at a point of the deletion drawn per round: when the node starts
// it (then after 0–100 ms more), or when the first of the other replicas
// logs 25, 50 or 75 % of its merge. The serving node's own replica merges
// in process, without logs or progress metric (replication/engine
// localReplica.DeleteSnapshot passes no progress), so the others' merges,
// which run at the same time, tell how far the deletion is. Where the kill
// landed is read afterwards from the killed replica's chain record: the
// layer marked deleting means its merge was cut short.
func (r *round) deleteAndKill(ctx context.Context, t *snapTake) error {
	victim := r.engine
	at := r.rng.IntN(4)
	delay := time.Duration(r.rng.IntN(101)) * time.Millisecond
	point := []string{`"msg":"removing a deleted snapshot's layers from the replicas"`, t.id}
	desc := fmt.Sprintf("%v after it starts the deletion", delay)
	if at > 0 {
		point = []string{`"msg":"deleting a snapshot"`, t.id, fmt.Sprintf(`"percent":%d`, 25*at)}
		desc, delay = fmt.Sprintf("when another replica has merged %d %%", 25*at), 0
	}
	done := []string{`"msg":"snapshot deleted"`, t.id}
	offsets := r.cl.logOffsets()
	var tails []*logTail
	for _, n := range r.cl.nodes() {
		if n.ID == victim || r.replicaID(n.ID) != "" {
			tails = append(tails, &logTail{path: n.Log, off: offsets[n.ID]})
		}
	}
	mc, err := r.cl.metaClient()
	if err != nil {
		return err
	}
	err = mc.DeleteSnapshot(ctx, t.id)
	mc.Close()
	if err != nil {
		return fmt.Errorf("delete snapshot %s: %w", t.id, err)
	}
	t.deleted = true
	seen := ""
	for deadline := time.Now().Add(30 * time.Second); seen == "" && time.Now().Before(deadline); {
		for _, tl := range tails {
			for _, l := range tl.lines() {
				if i := matchLine(l, [][]string{point, done}); i >= 0 && seen == "" {
					seen = l
					if i == 1 {
						desc = "when a replica had finished its merge already"
					}
				}
			}
		}
		if err := benchkit.Sleep(ctx, 2*time.Millisecond); err != nil {
			return err
		}
	}
	if seen == "" {
		r.note(fmt.Sprintf("no replica logged the deletion of %s within 30s; killing anyway", t.id))
	}
	_ = benchkit.Sleep(ctx, delay)
	id := r.replicaID(victim)
	if err := r.inject(func() error { return r.cl.kill(ctx, victim) }, "kill -9 %s (serves the volume, holds replica %s) %s of snapshot %s", victim, id, desc, t.id); err != nil {
		return err
	}
	r.res.snap.kills++
	l, path, err := r.chainLayer(victim, id, t.id)
	switch {
	case err != nil:
		r.note(fmt.Sprintf("where the kill landed is unknown: %v", err))
	case l == nil:
		r.note(fmt.Sprintf("the kill came after %s's replica had finished its merge (%s lists no layer of %s)", victim, path, t.id))
	case !l.Deleting:
		r.note(fmt.Sprintf("the kill came before %s's replica began its merge (%s lists %s, not deleting)", victim, path, t.id))
	default:
		r.res.snap.killsMidMerge++
		r.say("the kill cut %s's merge short (%s lists %s, deleting)", victim, path, t.id)
	}
	return nil
}
