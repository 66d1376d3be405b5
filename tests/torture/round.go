package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cairn-csi/cairn/tests/bench/benchkit"
	"github.com/cairn-csi/cairn/tests/nbdclient"
)

// result is what one round found.
type result struct {
	n    int
	kind Kind
	sub  Kind // the fault a kind made of others injected (snapshot)

	acked, writeErrors int64 // writes acknowledged / failed (error reply or broken connection)
	reads, readErrors  int64 // reads of single blocks while the writes went on / failed
	lost, stale        int   // blocks read back wrong, at the end or while the writes went on (see verdict)
	uncertain          int   // blocks whose content the model could not pin down
	divergent          int   // extents in which the healthy replicas differ (volume verify)
	healed             bool
	heal               time.Duration // from lifting the fault to every replica healthy
	maxAck             time.Duration // longest acknowledged write in flight between the fault and the heal
	takeover           time.Duration // from the fault to the first write acknowledged on another node (0: none)
	snap               snapResult    // the snapshot kinds' figures

	err      error    // what ended the round early, or failed in it (export, check, verify …)
	problems []string // blocks that differ from the model, replicas that differ
	notes    []string
}

// failed reports whether the round found loss, divergence, no healing or an
// error.
func (res *result) failed() bool {
	return res.err != nil || res.lost > 0 || res.stale > 0 || res.divergent > 0 || !res.healed || res.snap.failed()
}

// round is one fault injected into a fresh volume.
type round struct {
	o    *options
	cl   *cluster
	n    int
	of   int
	kind *faultKind
	rng  *rand.Rand
	hold time.Duration
	logf func(format string, args ...any)

	leader  string // the store's leader when the round began
	vol     volume
	engine  string // the node serving the export
	sock    string // its NBD socket
	conn    *nbdclient.Conn
	conns   []*nbdclient.Conn
	exports int // exports made, to name their sockets
	m       *model
	w       *writer // the writer on conn
	writers []*writer
	ios     ioLog

	faultAt, liftAt time.Time
	faulted, lifted chan struct{} // closed at inject and at lift, for the snapshotter
	res             result

	// The snapshot kinds: the snapshots asked for in the round, the
	// snapshotter that takes them while the fault acts, the volumes
	// restored from them (removed at teardown if a check did not).
	snapMu   sync.Mutex
	snaps    []*snapTake
	snapWG   sync.WaitGroup
	restored []string

	readLost, readStale int      // blocks the readers found wrong while writes went on
	readProblems        []string // the first of them
}

func (r *round) say(format string, args ...any) {
	r.logf("round %d/%d %s: %s", r.n, r.of, r.kind.kind, fmt.Sprintf(format, args...))
}

func (r *round) note(s string) {
	r.res.notes = append(r.res.notes, s)
	r.say("%s", s)
}

// run runs the round. A non-nil error means the cluster could not be
// restored afterwards and the campaign cannot go on.
func (r *round) run(ctx context.Context) (result, error) {
	r.res = result{n: r.n, kind: r.kind.kind}
	r.faulted, r.lifted = make(chan struct{}), make(chan struct{})
	logFrom := r.cl.logOffsets()
	r.res.err = r.steps(ctx)
	if r.res.err != nil {
		r.say("FAILED: %v", r.res.err)
	}
	r.teardown()
	if r.res.failed() && ctx.Err() == nil {
		if ex := r.cl.logExcerpt(logFrom, 12); ex != "" {
			r.logf("round %d/%d %s: what the nodes logged (warnings, errors, ejections, rebuilds; last lines):\n%s", r.n, r.of, r.kind.kind, ex)
		}
	}
	rctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := r.cl.restore(rctx); err != nil {
		return r.res, fmt.Errorf("restore the cluster after round %d: %w", r.n, err)
	}
	return r.res, nil
}

func (r *round) steps(ctx context.Context) error {
	var err error
	if err := r.waitLeader(ctx); err != nil {
		return err
	}
	// A kind made of others (snapshot) takes the setup and the injection
	// of one of them, drawn per round.
	fault := r.kind
	if len(r.kind.with) > 0 {
		name := r.kind.with[r.rng.IntN(len(r.kind.with))]
		var ok bool
		if fault, ok = kindByName(name); !ok {
			return fmt.Errorf("BUG: kind %s is made of the unknown kind %s", r.kind.kind, name)
		}
		r.res.sub = fault.kind
	}
	preferred := ""
	if fault.place != nil {
		preferred = fault.place(r)
	} else if r.rng.IntN(2) == 0 {
		preferred = pick(r.rng, r.cl.nodeIDs())
	}
	name := fmt.Sprintf("torture-%d-%s", r.n, r.kind.kind)
	if r.vol, err = r.cl.createVolume(ctx, name, r.o.size, preferred); err != nil {
		return err
	}
	candidates := r.cl.nodeIDs()
	if fault.engineOn != nil {
		candidates = fault.engineOn(r)
	}
	if len(candidates) == 0 {
		return fmt.Errorf("no node may serve the export (%s)", r.vol.summary())
	}
	r.engine = pick(r.rng, candidates)
	if err := r.export(ctx, r.engine); err != nil {
		return err
	}
	with := ""
	if fault != r.kind {
		with = ", fault " + string(fault.kind)
	}
	r.say("volume %s %s, leader %s, hold %v%s", r.vol.ID, r.vol.summary(), r.leader, r.hold.Round(time.Millisecond), with)

	r.m = newModel(r.o.size, r.rng.Uint64())
	fctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	err = r.m.fill(fctx, r.conn, 0, r.m.blocks()/2, 8)
	cancel()
	if err != nil {
		return fmt.Errorf("fill the first half of the volume: %w", err)
	}
	r.startWrites()
	if err := r.waitAcked(ctx, 50, 30*time.Second, "writes before the fault"); err != nil {
		return err
	}

	if r.kind.snapshots > 0 {
		r.startSnapshotter(ctx, r.kind.snapshots)
	}
	if err := fault.run(ctx, r); err != nil {
		return err
	}
	if r.liftAt.IsZero() {
		return errors.New("BUG: the fault was never lifted")
	}

	// The longest acknowledged write is taken over the writes in flight at
	// some time between the fault and the heal, once they have all ended:
	// writes held up by the fault often end only after the lift.
	_, healedAt, err := r.waitHealed(ctx)
	if err != nil {
		r.stopWrites()
		r.res.maxAck = r.ios.maxAcked(r.faultAt, healedAt)
		return err
	}
	err = r.waitAcked(ctx, 20, 30*time.Second, "writes after healing")
	r.stopWrites()
	r.res.maxAck = r.ios.maxAcked(r.faultAt, healedAt)
	if err != nil {
		return err
	}
	if err := r.checkData(ctx); err != nil {
		return err
	}
	return r.checkSnapshots(ctx)
}

// waitLeader waits until the store has a leader (a node restarted by the
// last round may still be catching up).
func (r *round) waitLeader(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		leader, err := r.cl.leader(ctx)
		if err == nil && leader != "" {
			r.leader = leader
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no store leader within 30s: %v", err)
		}
		if err := benchkit.Sleep(ctx, 250*time.Millisecond); err != nil {
			return err
		}
	}
}

// export exports the volume on nodeID (on a socket of its own) and
// connects to it.
func (r *round) export(ctx context.Context, nodeID string) error {
	r.exports++
	sock := filepath.Join(r.cl.sockDir, fmt.Sprintf("r%d.%d-%s.sock", r.n, r.exports, nodeID))
	v, err := r.cl.export(ctx, r.vol.ID, nodeID, sock)
	if err != nil {
		return err
	}
	r.vol, r.sock = v, sock
	conn, err := r.dial(ctx, sock)
	if err != nil {
		return err
	}
	if conn.Size() != r.o.size {
		return fmt.Errorf("export size %d, want %d", conn.Size(), r.o.size)
	}
	r.engine, r.conn = nodeID, conn
	return nil
}

// dial connects to an NBD socket, retrying for 10 s (the socket may be a
// stale file until the node listens).
func (r *round) dial(ctx context.Context, sock string) (*nbdclient.Conn, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		conn, err := nbdclient.Dial(dctx, sock)
		cancel()
		if err == nil {
			r.conns = append(r.conns, conn)
			return conn, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil, fmt.Errorf("connect to %s: %w", sock, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (r *round) startWrites() {
	r.w = startWriter(r.m, r.conn, &r.ios, r.rng.Uint64(), r.o.qd)
	r.writers = append(r.writers, r.w)
}

// pauseWrites stops the writer and waits for its writes in flight.
func (r *round) pauseWrites() error {
	r.w.stop()
	if !r.w.wait(30 * time.Second) {
		return errors.New("writes still in flight 30s after pausing them")
	}
	return nil
}

func (r *round) resumeWrites() { r.startWrites() }

// exportAgain exports the volume on a random node, once the writes were
// paused or their connection died with its node, and writes through it.
func (r *round) exportAgain(ctx context.Context) error {
	target := pick(r.rng, r.cl.nodeIDs())
	if err := r.export(ctx, target); err != nil {
		return fmt.Errorf("export again on %s: %w", target, err)
	}
	r.say("exported again on %s: %s", target, r.vol.summary())
	r.resumeWrites()
	return nil
}

// waitAcked waits until the current writer has n more writes acknowledged.
func (r *round) waitAcked(ctx context.Context, n int64, timeout time.Duration, what string) error {
	w := r.w
	target := w.acked.Load() + n
	deadline := time.Now().Add(timeout)
	for w.acked.Load() < target {
		if time.Now().After(deadline) || isClosed(w.stopc) {
			return fmt.Errorf("%s: %d of %d writes acknowledged within %v (first error: %v)", what, w.acked.Load()-(target-n), n, timeout, w.err())
		}
		if err := benchkit.Sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

// inject injects the fault (do) and marks its time; desc says what it was.
func (r *round) inject(do func() error, desc string, args ...any) error {
	r.faultAt = time.Now()
	r.say("fault: %s", fmt.Sprintf(desc, args...))
	err := do()
	closeOnce(r.faulted)
	if err != nil {
		return fmt.Errorf("inject the fault: %w", err)
	}
	return nil
}

// holdRest waits until the fault has lasted the round's hold time.
func (r *round) holdRest(ctx context.Context) {
	_ = benchkit.Sleep(ctx, time.Until(r.faultAt.Add(r.hold)))
}

// lift lifts the fault (do) and marks its time.
func (r *round) lift(do func() error, desc string, args ...any) error {
	r.liftAt = time.Now()
	r.say("lift after %v: %s", r.liftAt.Sub(r.faultAt).Round(time.Millisecond), fmt.Sprintf(desc, args...))
	closeOnce(r.lifted)
	if err := do(); err != nil {
		return fmt.Errorf("lift the fault: %w", err)
	}
	return nil
}

// takeOver moves the export to target, as an orchestrator would after its
// node failed: the writer on the old export starts nothing more (its writes
// in flight stay as they are), and a new one writes through target. The
// takeover time runs from the fault to the first write acknowledged there.
func (r *round) takeOver(ctx context.Context, target string) error {
	r.w.stop()
	before := r.vol.Epoch
	if err := r.export(ctx, target); err != nil {
		return fmt.Errorf("take over on %s: %w", target, err)
	}
	r.startWrites()
	select {
	case <-r.w.firstAck:
	case <-time.After(60 * time.Second):
		return fmt.Errorf("take over on %s: no write acknowledged within 60s (first error: %v)", target, r.w.err())
	case <-ctx.Done():
		return ctx.Err()
	}
	r.res.takeover = time.Duration(r.w.firstAckAt.Load() - r.faultAt.UnixNano())
	r.say("takeover: export on %s at epoch %d (was %d), first write acknowledged %v after the fault",
		target, r.vol.Epoch, before, r.res.takeover.Round(time.Millisecond))
	return nil
}

// replicaID is the id of the volume's replica on nodeID ("" if none).
func (r *round) replicaID(nodeID string) string {
	if rep := r.vol.replicaOn(nodeID); rep != nil {
		return rep.ID
	}
	return ""
}

// replicaVictim picks a node that holds a replica of the volume and is
// neither the engine's nor the store leader, so that the fault hits one
// replica and nothing else.
func (r *round) replicaVictim(ctx context.Context) (string, error) {
	if v, err := r.cl.volume(ctx, r.vol.ID); err == nil {
		r.vol = v
	}
	leader, err := r.cl.leader(ctx)
	if err != nil {
		return "", err
	}
	var cands []string
	for _, rep := range r.vol.Replicas {
		if rep.Node != r.engine && rep.Node != leader && rep.State == "healthy" {
			cands = append(cands, rep.Node)
		}
	}
	if len(cands) == 0 {
		return "", fmt.Errorf("no healthy replica away from the engine (%s) and the leader (%s): %s", r.engine, leader, r.vol.summary())
	}
	return pick(r.rng, cands), nil
}

// waitHealed polls the volume until it has healed and returns when it was
// first seen healthy for good (the heal time runs to then) and when that was
// confirmed. Healed means: the replica set is complete and every replica in
// it healthy, and still so after a write made since has been acknowledged.
// The store alone can say healthy too early: an engine still stuck on a
// replica it has not ejected yet has not healed.
func (r *round) waitHealed(ctx context.Context) (healthyAt, confirmedAt time.Time, err error) {
	deadline := r.liftAt.Add(r.o.healTimeout)
	last := ""
	for {
		ackedSince := !healthyAt.IsZero() && r.ios.ackedSince(healthyAt)
		v, err := r.cl.volume(ctx, r.vol.ID)
		now := time.Now()
		if err == nil {
			r.vol = v
			if s := v.summary(); s != last && r.o.verbose {
				r.say("volume: %s", s)
				last = s
			}
			switch {
			case !v.healthy():
				healthyAt = time.Time{}
			case healthyAt.IsZero():
				healthyAt = now
			case ackedSince:
				r.res.healed, r.res.heal = true, healthyAt.Sub(r.liftAt)
				r.say("healed %v after the lift: %s", r.res.heal.Round(time.Millisecond), v.summary())
				return healthyAt, now, nil
			}
		}
		if now.After(deadline) {
			why := "volume: " + r.vol.summary()
			if err != nil {
				why = err.Error()
			} else if !healthyAt.IsZero() {
				why += "; no write acknowledged since it was seen healthy"
			}
			return time.Time{}, now, fmt.Errorf("not healed within %v of the lift (%s)", r.o.healTimeout, why)
		}
		if err := benchkit.Sleep(ctx, 200*time.Millisecond); err != nil {
			return time.Time{}, now, err
		}
	}
}

// stopWrites stops every writer of the round and waits for their writes in
// flight; a connection whose writes do not come back within 30 s is closed,
// which leaves their outcome unknown.
func (r *round) stopWrites() {
	for _, w := range r.writers {
		w.stop()
	}
	for _, w := range r.writers {
		if !w.wait(30 * time.Second) {
			r.note("writes stuck for 30s on an old connection; closed it")
			_ = w.conn.Close()
			w.wait(10 * time.Second)
		}
	}
}

// countWrites sums what the round's writers saw; the blocks their readers
// found wrong count as lost or stale.
func (r *round) countWrites() {
	r.res.acked, r.res.writeErrors, r.res.reads, r.res.readErrors = 0, 0, 0, 0
	r.readLost, r.readStale, r.readProblems = 0, 0, nil
	for _, w := range r.writers {
		r.res.acked += w.acked.Load()
		r.res.writeErrors += w.failed.Load()
		r.res.reads += w.reads.Load()
		r.res.readErrors += w.readErrors.Load()
		w.mu.Lock()
		r.readLost += w.readLost
		r.readStale += w.readStale
		r.readProblems = append(r.readProblems, w.badReads...)
		w.mu.Unlock()
	}
}

// checkData reads the whole volume back against the model, then compares
// the healthy replicas (volume verify).
func (r *round) checkData(ctx context.Context) error {
	conn := r.conn
	select {
	case <-conn.Dead():
		r.note("the export's connection broke; reconnecting to check")
		var err error
		if conn, err = r.dial(ctx, r.sock); err != nil {
			return err
		}
	default:
	}
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	res, err := r.m.check(cctx, conn)
	cancel()
	r.countWrites()
	r.res.lost, r.res.stale, r.res.uncertain = res.lost+r.readLost, res.stale+r.readStale, r.m.uncertain()
	r.res.problems = append(r.res.problems, r.readProblems...)
	r.res.problems = append(r.res.problems, res.problems...)
	if r.readLost+r.readStale > 0 {
		r.say("DATA: while writes went on, reads found %d blocks lost, %d stale:\n    %s", r.readLost, r.readStale, strings.Join(r.readProblems, "\n    "))
	}
	if err != nil {
		return fmt.Errorf("read the volume back: %w", err)
	}
	if res.lost+res.stale > 0 {
		r.say("DATA: read back, %d blocks lost, %d stale of %d:\n    %s", res.lost, res.stale, r.m.blocks(), strings.Join(res.problems, "\n    "))
	} else {
		r.say("read back: all %d blocks match the model (%d uncertain); %d writes acknowledged, %d failed; %d reads on the way, %d failed",
			r.m.blocks(), r.res.uncertain, r.res.acked, r.res.writeErrors, r.res.reads, r.res.readErrors)
	}
	rep, err := r.cl.verify(ctx, r.vol.ID)
	if err != nil {
		return err
	}
	// verify lists an extent once per replica that differs from the first.
	differing := slices.Compact(slices.Sorted(slices.Values(rep.Differing)))
	r.res.divergent = len(differing)
	if !rep.Identical {
		p := fmt.Sprintf("volume verify: healthy replicas %v differ in %d of %d extents: %v", rep.Replicas, len(differing), rep.Extents, differing)
		r.res.problems = append(r.res.problems, p)
		r.say("DIVERGENT: %s", p)
	} else {
		r.say("verify: %d healthy replicas identical over %d extents", len(rep.Replicas), rep.Extents)
	}
	if len(rep.Replicas) < r.vol.ReplicaCount {
		return fmt.Errorf("the volume degraded again after healing: verify found %d healthy replicas of %d", len(rep.Replicas), r.vol.ReplicaCount)
	}
	return nil
}

// teardown closes the round's connections and removes its volume; the
// cluster itself is restored by run.
func (r *round) teardown() {
	closeOnce(r.faulted)
	closeOnce(r.lifted) // the snapshotter starts no more
	for _, w := range r.writers {
		w.stop()
	}
	r.snapWG.Wait() // bounded: each snapshot is waited for snapshotBound at most
	for _, c := range r.conns {
		_ = c.Close()
	}
	r.countWrites()
	r.res.snap.taken = len(r.snaps)
	r.res.snap.ready = 0
	for _, t := range r.snaps {
		if t.ready {
			r.res.snap.ready++
		}
	}
	if r.vol.ID == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A frozen or killed node cannot take part; restore first.
	if err := r.cl.restore(ctx); err != nil {
		r.say("restore before removing the volume: %v", err)
	}
	for _, id := range r.restored {
		if err := r.cl.removeVolume(ctx, id); err != nil {
			r.say("remove restored volume %s: %v", id, err)
		}
	}
	if err := r.cl.removeVolume(ctx, r.vol.ID); err != nil {
		r.say("remove volume %s: %v", r.vol.ID, err)
	}
	r.forgetSnapshots(ctx)
}
