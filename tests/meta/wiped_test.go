package meta_test

import (
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/tests/cluster"
)

// Scenario: member 0 loses its whole data dir (raft log, snapshots, the
// files that bind it to its id and cluster), as when its disk is replaced,
// and starts again under the same id and addresses with the same
// --bootstrap-expect and --peers. Two cases: the other members run and have
// a leader; or every member restarts at once, with the raft links cut so
// that no leader exists while member 0 looks at its peers (they answer it,
// with raft state but no leader and, before their log is replayed, no
// cluster id either).
// Invariant: member 0 never bootstraps a cluster of its own; it rejoins the
// existing one and catches up with every write, and the cluster stays one:
// one cluster id, three voters.
func TestWipedMemberRejoins(t *testing.T) {
	for _, allRestart := range []bool{false, true} {
		name := "others running"
		if allRestart {
			name = "all restart without a leader"
		}
		t.Run(name, func(t *testing.T) {
			c := cluster.MakeCluster(t, 3)
			cl := c.Client(t)
			before := mustCreate(t, cl, "before", 5)
			st := c.WaitConverged(t)
			clusterID := st.ClusterID
			bootstraps := func() int {
				return c.Logs().FilterMessage("bootstrapping cluster").FilterField(zap.String("node_id", c.NodeID(0))).Len()
			}
			formed := bootstraps()

			var while []string
			if allRestart {
				for i := range c.N() {
					if err := c.Kill(i); err != nil {
						t.Fatal(err)
					}
				}
				c.Partition([]int{0})
				c.Partition([]int{1})
			} else {
				if err := c.Kill(0); err != nil {
					t.Fatal(err)
				}
				while = mustCreate(t, cl, "while-down", 5)
			}
			if err := os.RemoveAll(c.DataDir(0)); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(c.DataDir(0), 0o750); err != nil {
				t.Fatal(err)
			}
			// Member 0 decides to bootstrap or join in the background after
			// Restart returns: wait for the decision before judging it.
			decided := func() {
				waitFor(t, 10*time.Second, "member 0 to bootstrap or join", func() bool {
					joins := c.Logs().FilterMessage("found a running cluster; joining it").FilterField(zap.String("node_id", c.NodeID(0)))
					return bootstraps() > formed || joins.Len() > 0
				})
			}
			if allRestart {
				c.Restart(t, 1)
				c.Restart(t, 2)
				c.Restart(t, 0)
				decided() // while none of its peers leads
				c.Heal()
			} else {
				c.Restart(t, 0)
				decided()
			}
			if n := bootstraps() - formed; n > 0 {
				t.Fatalf("member 0 bootstrapped a cluster of its own over the existing one (%d times)", n)
			}

			marker := mustCreate(t, cl, "marker", 1)
			l := c.Leader(t)
			target := c.Agent(l).Store().FSM().AppliedIndex()
			waitFor(t, 30*time.Second, fmt.Sprintf("member 0 to apply index %d", target), func() bool {
				ms, ok := c.LocalState(0)
				return ok && ms.AppliedIndex >= target
			})
			final := c.WaitConverged(t)
			if final.ClusterID != clusterID {
				t.Fatalf("cluster id %q after the restart, was %q", final.ClusterID, clusterID)
			}
			mine, _ := c.LocalState(0)
			if m := missing(volumeNames(mine.State), append(append(before, while...), marker...)); len(m) > 0 {
				t.Fatalf("member 0 lacks volumes: %v", m)
			}
			members, err := c.Agent(l).Store().Members()
			if err != nil {
				t.Fatal(err)
			}
			if len(members) != 3 {
				t.Fatalf("raft configuration has %d members, want 3: %+v", len(members), members)
			}
			if got := c.Agent(0).Store().LocalClusterID(); got != clusterID {
				waitFor(t, 10*time.Second, "member 0 to record its cluster id", func() bool {
					return c.Agent(0).Store().LocalClusterID() == clusterID
				})
			}
		})
	}
}
