package meta_test

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/cluster"
)

// Scenario: three fresh members with BootstrapExpect 3.
// Invariant: they form one cluster — three voters, one leader all agree on,
// one cluster id — and every node registers and is up with its disk figures.
func TestClusterForms(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	leader := c.Leader(t)

	var clusterID string
	for i := range c.N() {
		st, err := c.MemberClient(t, i).Status(ctxFor(t, 10*time.Second))
		if err != nil {
			t.Fatalf("status of %s: %v", c.NodeID(i), err)
		}
		if st.Self != c.NodeID(i) {
			t.Errorf("member %d answers as %q, want %q", i, st.Self, c.NodeID(i))
		}
		if st.Leader != c.NodeID(leader) {
			t.Errorf("%s sees leader %q, want %q", c.NodeID(i), st.Leader, c.NodeID(leader))
		}
		if st.ClusterID == "" {
			t.Errorf("%s has no cluster id", c.NodeID(i))
		}
		if clusterID == "" {
			clusterID = st.ClusterID
		} else if st.ClusterID != clusterID {
			t.Errorf("%s is in cluster %q, %s in %q", c.NodeID(i), st.ClusterID, c.NodeID(0), clusterID)
		}
		if len(st.Members) != 3 {
			t.Errorf("%s lists %d raft members, want 3: %+v", c.NodeID(i), len(st.Members), st.Members)
		}
		leaders := 0
		for _, m := range st.Members {
			if !m.Voter {
				t.Errorf("%s: member %s is not a voter", c.NodeID(i), m.ID)
			}
			if m.RaftAddr != c.RaftAddr(c.Index(m.ID)) {
				t.Errorf("%s: member %s at %s, want %s", c.NodeID(i), m.ID, m.RaftAddr, c.RaftAddr(c.Index(m.ID)))
			}
			if m.Leader {
				leaders++
			}
		}
		if leaders != 1 {
			t.Errorf("%s: %d members flagged leader, want 1", c.NodeID(i), leaders)
		}
	}

	st, err := c.Client(t).State(ctxFor(t, 10*time.Second), true)
	if err != nil {
		t.Fatalf("linearizable read: %v", err)
	}
	if len(st.Nodes) != 3 {
		t.Fatalf("%d nodes registered, want 3", len(st.Nodes))
	}
	for i := range c.N() {
		n, ok := st.Nodes[c.NodeID(i)]
		if !ok {
			t.Errorf("node %s is not registered", c.NodeID(i))
			continue
		}
		if n.State != meta.NodeUp || n.APIAddr != c.APIAddr(i) || n.RaftAddr != c.RaftAddr(i) || n.CapacityBytes != cluster.DiskCapacity {
			t.Errorf("node %s = %+v, want up at api %s raft %s with capacity %d", n.ID, n, c.APIAddr(i), c.RaftAddr(i), uint64(cluster.DiskCapacity))
		}
	}
	c.WaitConverged(t)
}

// Scenario: kill the leader (three times, restarting the victim in between).
// Invariant: the two survivors elect a new leader and commit writes; the
// time to a new leader is logged.
func TestLeaderFailover(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	cl := c.Client(t)
	mustCreate(t, cl, "before", 3)

	var elections []time.Duration
	var acked []string
	for round := range 3 {
		old := c.Leader(t)
		start := time.Now()
		if err := c.Kill(old); err != nil {
			t.Fatal(err)
		}
		nl := c.Leader(t)
		elected := time.Since(start)
		if nl == old {
			t.Fatalf("round %d: killed leader %s still counted as leader", round, c.NodeID(old))
		}
		name := fmt.Sprintf("after-failover-%d", round)
		if _, err := createVolume(ctxFor(t, 10*time.Second), cl, name); err != nil {
			t.Fatalf("round %d: write with %s down: %v", round, c.NodeID(old), err)
		}
		acked = append(acked, name)
		written := time.Since(start)
		elections = append(elections, elected)
		t.Logf("failover: new leader after %d ms (%s → %s); first write committed after %d ms",
			elected.Milliseconds(), c.NodeID(old), c.NodeID(nl), written.Milliseconds())
		c.Restart(t, old)
		c.WaitConverged(t)
	}
	sort.Slice(elections, func(i, j int) bool { return elections[i] < elections[j] })
	t.Logf("failover: election times %v (median %v)", elections, elections[len(elections)/2])

	st, err := cl.State(ctxFor(t, 10*time.Second), true)
	if err != nil {
		t.Fatal(err)
	}
	if m := missing(volumeNames(st), append(acked, "before-0", "before-1", "before-2")); len(m) > 0 {
		t.Fatalf("acknowledged volumes missing after failovers: %v", m)
	}
}

// Scenario: kill a follower, commit writes without it, restart it from its
// data dir.
// Invariant: it catches up — its FSM reaches the leader's applied index and
// holds the same volumes.
func TestRestartedMemberCatchesUp(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	cl := c.Client(t)
	mustCreate(t, cl, "before", 5)
	leader := c.Leader(t)
	f := (leader + 1) % c.N()
	if err := c.Kill(f); err != nil {
		t.Fatal(err)
	}
	names := mustCreate(t, cl, "while-down", 20)

	c.Restart(t, f)
	// A marker written after the restart: the member has caught up once it
	// has applied the marker's index.
	mustCreate(t, cl, "marker", 1)
	l := c.Leader(t)
	target := c.Agent(l).Store().FSM().AppliedIndex()
	waitFor(t, 30*time.Second, fmt.Sprintf("%s to apply index %d", c.NodeID(f), target), func() bool {
		ms, ok := c.LocalState(f)
		return ok && ms.AppliedIndex >= target
	})
	st := c.WaitConverged(t)
	mine, _ := c.LocalState(f)
	if m := missing(volumeNames(mine.State), names); len(m) > 0 {
		t.Fatalf("restarted member lacks volumes written while it was down: %v", m)
	}
	if got, want := len(mine.State.Volumes), len(st.Volumes); got != want {
		t.Fatalf("restarted member has %d volumes, the cluster %d", got, want)
	}
}

// Scenario: with TrailingLogs 5 and SnapshotThreshold 10, kill a follower,
// commit 100 writes, snapshot both live members (their logs are compacted
// past what the follower has: whichever leads when it returns must send a
// snapshot), restart the follower.
// Invariant: the follower catches up through InstallSnapshot and then holds
// the leader's state.
func TestSnapshotInstallAfterCompaction(t *testing.T) {
	const trailing = 5
	c := cluster.MakeCluster(t, 3,
		cluster.WithTrailingLogs(trailing),
		cluster.WithSnapshotThreshold(10),
		cluster.WithSnapshotInterval(100*time.Millisecond))
	cl := c.Client(t)
	mustCreate(t, cl, "before", 3)

	leader := c.Leader(t)
	f := (leader + 1) % c.N()
	behind := statUint(t, c.Agent(f).Store().Stats(), "last_log_index")
	if err := c.Kill(f); err != nil {
		t.Fatal(err)
	}
	names := mustCreate(t, cl, "while-down", 100)

	// Snapshot both live members, not only the leader: leadership may move
	// while the follower restarts (a busy CI machine misses a heartbeat),
	// and whichever member leads then sends its own snapshot.
	l := c.Leader(t)
	snapIndex := uint64(math.MaxUint64) // the lowest of the live members'
	for i := range c.N() {
		if i == f {
			continue
		}
		if err := c.Agent(i).Store().Snapshot(); err != nil && !errors.Is(err, raft.ErrNothingNewToSnapshot) {
			t.Fatalf("snapshot on %s: %v", c.NodeID(i), err)
		}
		snapIndex = min(snapIndex, statUint(t, c.Agent(i).Store().Stats(), "last_snapshot_index"))
	}
	// Each keeps only `trailing` entries behind its snapshot, so the
	// follower's next entry is gone from every log it could be sent from.
	if snapIndex <= behind+trailing {
		t.Fatalf("live members' snapshots (lowest at %d) do not compact past the follower's last index %d", snapIndex, behind)
	}
	t.Logf("follower %s stopped at index %d; leader %s; live members' snapshots at %d or later", c.NodeID(f), behind, c.NodeID(l), snapIndex)

	installs := func() int {
		return c.Logs().FilterMessage("Installed remote snapshot").FilterField(zap.String("node_id", c.NodeID(f))).Len()
	}
	before := installs()
	c.Restart(t, f)
	st := c.WaitConverged(t)
	if m := missing(volumeNames(st), names); len(m) > 0 {
		t.Fatalf("converged state lacks acknowledged volumes: %v", m)
	}
	mine, _ := c.LocalState(f)
	if m := missing(volumeNames(mine.State), names); len(m) > 0 {
		t.Fatalf("restarted member lacks volumes: %v", m)
	}
	a := c.Agent(f)
	if a == nil {
		t.Fatalf("member %s is down", c.NodeID(f))
	}
	if got := statUint(t, a.Store().Stats(), "last_snapshot_index"); got < snapIndex {
		t.Errorf("restarted member's last snapshot index %d, want ≥ %d, the live members' lowest", got, snapIndex)
	}
	// raft logs the install after it has restored the snapshot and
	// updated its stats, so the line may come a moment after the index.
	waitFor(t, 10*time.Second, fmt.Sprintf("%s to log \"Installed remote snapshot\"", c.NodeID(f)), func() bool {
		return installs() > before
	})
}

// Scenario: cut the leader's raft links to both followers (its API stays
// reachable), write on it, write on the majority, heal.
// Invariant: the isolated leader cannot commit and steps down; the majority
// elects a leader and commits; after healing, the write the minority took is
// nowhere and every acknowledged write is everywhere.
func TestPartitionedLeaderCannotCommit(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	cl := c.Client(t)
	acked := mustCreate(t, cl, "before", 3)

	old := c.Leader(t)
	var majority []int
	for i := range c.N() {
		if i != old {
			majority = append(majority, i)
		}
	}
	c.Partition([]int{old})
	t.Logf("partitioned leader %s from %s and %s", c.NodeID(old), c.NodeID(majority[0]), c.NodeID(majority[1]))

	// The isolated leader takes the write into its log but cannot commit it.
	oldStore := c.Agent(old).Store()
	_, err := oldStore.Apply(ctxFor(t, 5*time.Second), &meta.CreateVolume{
		ID: "vol-minority", Name: "minority", SizeBytes: volumeSize, Replicas: 1, CreatedAt: time.Now().UnixNano(),
	})
	if err == nil {
		t.Fatalf("isolated leader %s committed a write without a quorum", c.NodeID(old))
	}
	if !isAmbiguous(err) {
		t.Fatalf("isolated leader's write failed with %v, want no leader / not leader / outcome unknown / timeout", err)
	}
	t.Logf("isolated leader's write: %v", err)

	nl := c.Leader(t)
	if nl == old {
		t.Fatalf("isolated member %s still leads", c.NodeID(old))
	}
	waitFor(t, 10*time.Second, "the isolated leader to step down", func() bool { return !oldStore.IsLeader() })
	mcl := c.ClientOf(t, c.APIAddr(majority[0]), c.APIAddr(majority[1]))
	if _, err := createVolume(ctxFor(t, 10*time.Second), mcl, "majority"); err != nil {
		t.Fatalf("majority write: %v", err)
	}
	acked = append(acked, "majority")
	if ms, _ := c.LocalState(old); volumeNames(ms.State)["minority"] || volumeNames(ms.State)["majority"] {
		t.Fatalf("isolated member applied %v", volumeNames(ms.State))
	}

	c.Heal()
	final := c.Leader(t)
	t.Logf("after heal: leader %s", c.NodeID(final))
	if id, _ := oldStore.Leader(); final != old && id != c.NodeID(final) {
		t.Errorf("old leader follows %q, want %q", id, c.NodeID(final))
	}
	// A write after healing commits on all three.
	if _, err := createVolume(ctxFor(t, 10*time.Second), cl, "after-heal"); err != nil {
		t.Fatalf("write after heal: %v", err)
	}
	acked = append(acked, "after-heal")
	st := c.WaitConverged(t)
	if volumeNames(st)["minority"] {
		t.Fatalf("the write the isolated leader could not commit is in the final state")
	}
	if _, ok := st.Volumes["vol-minority"]; ok {
		t.Fatalf("volume vol-minority exists after heal")
	}
	if m := missing(volumeNames(st), acked); len(m) > 0 {
		t.Fatalf("acknowledged writes missing: %v", m)
	}
	for i := range c.N() {
		got, err := c.MemberClient(t, i).State(ctxFor(t, 10*time.Second), true)
		if err != nil {
			t.Fatalf("linearizable read through %s: %v", c.NodeID(i), err)
		}
		if volumeNames(got)["minority"] {
			t.Fatalf("linearizable read through %s shows the uncommitted write", c.NodeID(i))
		}
		if m := missing(volumeNames(got), acked); len(m) > 0 {
			t.Fatalf("linearizable read through %s lacks %v", c.NodeID(i), m)
		}
	}
}

// Scenario: a follower stops (its heartbeats stop), then comes back.
// Invariant: the leader marks its node down after NodeDownAfter and up again
// once it heartbeats; the other nodes stay registered.
func TestNodeMarkedDownAndUp(t *testing.T) {
	c := cluster.MakeCluster(t, 3)
	leader := c.Leader(t)
	f := (leader + 1) % c.N()
	start := time.Now()
	if err := c.Kill(f); err != nil {
		t.Fatal(err)
	}
	c.WaitNodeState(t, f, meta.NodeDown)
	t.Logf("node %s marked down %d ms after it stopped", c.NodeID(f), time.Since(start).Milliseconds())

	start = time.Now()
	c.Restart(t, f)
	c.WaitNodeState(t, f, meta.NodeUp)
	t.Logf("node %s up again %d ms after restart", c.NodeID(f), time.Since(start).Milliseconds())
	c.WaitNodesUp(t, 3)
}

// waitFor polls cond until it holds or fails the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// statUint reads one of raft's numeric stats.
func statUint(t *testing.T, stats map[string]string, key string) uint64 {
	t.Helper()
	v, err := strconv.ParseUint(stats[key], 10, 64)
	if err != nil {
		t.Fatalf("raft stat %s = %q: %v", key, stats[key], err)
	}
	return v
}
