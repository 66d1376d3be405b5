package meta

import (
	"reflect"
	"testing"
	"time"
)

// TestRebuildRestartBackoff: the reconciler restarts a replica's rebuild
// after 2 s, 4 s, 8 s … and never waits more than a minute.
func TestRebuildRestartBackoff(t *testing.T) {
	now := time.Unix(1000, 0)
	var r rebuildRestarts
	want := []time.Duration{2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 32 * time.Second, time.Minute, time.Minute}
	for i, w := range want {
		r = r.restarted(now)
		if got := r.next.Sub(now); got != w {
			t.Fatalf("restart %d: next after %v, want %v", i+1, got, w)
		}
		if r.count != i+1 {
			t.Fatalf("restart %d: count %d", i+1, r.count)
		}
	}
}

var testPolicy = repairPolicy{HeartbeatInterval: time.Second, NodeDownAfter: 10 * time.Second, StaleReplicaTimeout: 10 * time.Minute}

// planNode is one node of a planner test: its state in the store and what
// the leader knows of it, as ages before the planner's now (negative: never).
type planNode struct {
	state NodeState
	heard time.Duration // since its last heartbeat to this leader
	known time.Duration // since this leader first knew of it
	down  time.Duration // since this leader saw it down
}

// planFixture builds the state and the leader's liveness a planner sees at now.
func planFixture(now time.Time, nodes map[string]planNode, vols ...*Volume) (*State, *liveness) {
	s := NewState()
	l := newLiveness()
	for id, n := range nodes {
		s.Nodes[id] = &Node{ID: id, State: n.state}
		if n.heard >= 0 {
			l.heard[id] = now.Add(-n.heard)
		}
		if n.known >= 0 {
			l.known[id] = now.Add(-n.known)
		}
		if n.state == NodeDown && n.down >= 0 {
			l.downAt[id] = now.Add(-n.down)
		}
	}
	for _, v := range vols {
		s.Volumes[v.ID] = v
	}
	return s, l
}

func planVol(id string, params map[string]string, reps ...Replica) *Volume {
	return &Volume{ID: id, State: VolumeAvailable, Epoch: 7, Parameters: params, Replicas: reps}
}

func rep(id, node string, st ReplicaState) Replica { return Replica{ID: id, Node: node, State: st} }

// alive is a node heard just now; silent one heard long ago; gone one down
// for an hour.
var (
	alive  = planNode{state: NodeUp, heard: 0, known: time.Hour}
	silent = planNode{state: NodeUp, heard: 5 * time.Second, known: time.Hour}
	gone   = planNode{state: NodeDown, heard: time.Hour, known: time.Hour, down: time.Hour}
)

func TestPlanRepairs(t *testing.T) {
	now := time.Unix(100000, 0)
	rebuild := func(v, r string) Command {
		return &SetReplicaState{VolumeID: v, ReplicaID: r, State: ReplicaRebuilding, ExpectEpoch: 7}
	}
	stale := func(v, r string) Command {
		return &SetReplicaState{VolumeID: v, ReplicaID: r, State: ReplicaStale, ExpectEpoch: 7}
	}
	replace := func(v, r string) Command { return &ReplaceReplica{VolumeID: v, ReplicaID: r, ExpectEpoch: 7} }
	tests := []struct {
		name    string
		nodes   map[string]planNode
		vols    []*Volume
		backoff map[string]time.Duration // replica id → next restart after now
		want    []Command
	}{
		{
			name:  "failed replica on a node heard just now rebuilds",
			nodes: map[string]planNode{"n1": alive, "n2": alive},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
			want:  []Command{rebuild("v1", "v1-r2")},
		},
		{
			name:  "stale replica on a node heard just now rebuilds",
			nodes: map[string]planNode{"n1": alive, "n2": alive},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaStale))},
			want:  []Command{rebuild("v1", "v1-r2")},
		},
		{
			name:  "failed replica on an up node not heard for three heartbeats waits",
			nodes: map[string]planNode{"n1": alive, "n2": silent},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
		},
		{
			name:  "failed replica on an up node never heard by this leader waits",
			nodes: map[string]planNode{"n1": alive, "n2": {state: NodeUp, heard: -1, known: 0}},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
		},
		{
			name:    "failed replica whose restart backs off waits",
			nodes:   map[string]planNode{"n1": alive, "n2": alive},
			vols:    []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
			backoff: map[string]time.Duration{"v1-r2": time.Second},
		},
		{
			name:    "failed replica whose back-off ran out rebuilds",
			nodes:   map[string]planNode{"n1": alive, "n2": alive},
			vols:    []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
			backoff: map[string]time.Duration{"v1-r2": 0},
			want:    []Command{rebuild("v1", "v1-r2")},
		},
		{
			name:  "healthy replica on a long-down node goes stale",
			nodes: map[string]planNode{"n1": alive, "n2": gone},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaHealthy))},
			want:  []Command{stale("v1", "v1-r2")},
		},
		{
			name:  "last healthy replica on a long-down node stays",
			nodes: map[string]planNode{"n1": alive, "n2": gone},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaRebuilding), rep("v1-r2", "n2", ReplicaHealthy))},
		},
		{
			name:  "failed replica on a long-down node is replaced",
			nodes: map[string]planNode{"n1": alive, "n2": gone},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
			want:  []Command{replace("v1", "v1-r2")},
		},
		{
			name:  "replica on a node down for less than the stale timeout stays",
			nodes: map[string]planNode{"n1": alive, "n2": {state: NodeDown, heard: time.Hour, known: time.Hour, down: time.Minute}},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaHealthy))},
		},
		{
			name:  "the volume's staleReplicaTimeout overrides the default",
			nodes: map[string]planNode{"n1": alive, "n2": {state: NodeDown, heard: time.Hour, known: time.Hour, down: time.Minute}},
			vols: []*Volume{planVol("v1", map[string]string{ParamStaleReplicaTimeout: "30s"},
				rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaHealthy))},
			want: []Command{stale("v1", "v1-r2")},
		},
		{
			name:  "a bad staleReplicaTimeout falls back to the default",
			nodes: map[string]planNode{"n1": alive, "n2": {state: NodeDown, heard: time.Hour, known: time.Hour, down: time.Minute}},
			vols: []*Volume{planVol("v1", map[string]string{ParamStaleReplicaTimeout: "soon"},
				rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaHealthy))},
		},
		{
			name:  "one step per volume, in replica order",
			nodes: map[string]planNode{"n1": alive, "n2": alive, "n3": alive},
			vols: []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy),
				rep("v1-r2", "n2", ReplicaFailed), rep("v1-r3", "n3", ReplicaStale))},
			want: []Command{rebuild("v1", "v1-r2")},
		},
		{
			name:  "volumes in id order, deleted ones left alone",
			nodes: map[string]planNode{"n1": alive, "n2": alive},
			vols: []*Volume{
				planVol("v2", nil, rep("v2-r1", "n1", ReplicaHealthy), rep("v2-r2", "n2", ReplicaFailed)),
				{ID: "v0", State: VolumeDeleted, Epoch: 7, Replicas: []Replica{rep("v0-r1", "n1", ReplicaHealthy), rep("v0-r2", "n2", ReplicaFailed)}},
				planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaStale)),
			},
			want: []Command{rebuild("v1", "v1-r2"), rebuild("v2", "v2-r2")},
		},
		{
			name:  "replica on a node the store does not know is left alone",
			nodes: map[string]planNode{"n1": alive},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n9", ReplicaFailed))},
		},
		{
			name:  "draining node: no rebuild on it",
			nodes: map[string]planNode{"n1": alive, "n2": {state: NodeDraining, heard: 0, known: time.Hour}},
			vols:  []*Volume{planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed))},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, l := planFixture(now, tt.nodes, tt.vols...)
			for id, d := range tt.backoff {
				l.rebuilds[id] = rebuildRestarts{count: 1, next: now.Add(d)}
			}
			var got []Command
			for _, st := range planRepairs(s, l, testPolicy, now) {
				got = append(got, st.Cmd)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("planRepairs =\n%s\nwant\n%s", dumpJSON(got), dumpJSON(tt.want))
			}
		})
	}
}

// TestNoteRepairsBacksOff: a planned rebuild starts the replica's back-off,
// which observe forgets once the replica is healthy again.
func TestNoteRepairsBacksOff(t *testing.T) {
	now := time.Unix(100000, 0)
	s, l := planFixture(now, map[string]planNode{"n1": alive, "n2": alive},
		planVol("v1", nil, rep("v1-r1", "n1", ReplicaHealthy), rep("v1-r2", "n2", ReplicaFailed)))
	steps := planRepairs(s, l, testPolicy, now)
	if len(steps) != 1 {
		t.Fatalf("planned %d steps, want 1", len(steps))
	}
	l.noteRepairs(steps, now)
	if got := l.rebuilds["v1-r2"]; got.count != 1 || !got.next.Equal(now.Add(firstRebuildRetry)) {
		t.Fatalf("back-off after one restart = %+v", got)
	}
	if steps := planRepairs(s, l, testPolicy, now.Add(time.Second)); len(steps) != 0 {
		t.Fatalf("planned %+v during the back-off", steps)
	}
	s.Volumes["v1"].Replicas[1].State = ReplicaHealthy
	l.observe(s, now)
	if _, ok := l.rebuilds["v1-r2"]; ok {
		t.Fatal("back-off of a healthy replica is remembered")
	}
}

func TestPlanNodeDowns(t *testing.T) {
	now := time.Unix(100000, 0)
	tests := []struct {
		name string
		node planNode
		down bool
	}{
		{"heard just now", alive, false},
		{"heard just within NodeDownAfter", planNode{state: NodeUp, heard: 10 * time.Second, known: time.Hour}, false},
		{"silent for longer than NodeDownAfter", planNode{state: NodeUp, heard: 11 * time.Second, known: time.Hour}, true},
		{"never heard, known for longer than NodeDownAfter", planNode{state: NodeUp, heard: -1, known: 11 * time.Second}, true},
		{"never heard, known for less than NodeDownAfter", planNode{state: NodeUp, heard: -1, known: 9 * time.Second}, false},
		{"heard before this leader knew it, known briefly", planNode{state: NodeUp, heard: time.Hour, known: time.Second}, false},
		{"already down", gone, false},
		{"draining and silent", planNode{state: NodeDraining, heard: time.Hour, known: time.Hour}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, l := planFixture(now, map[string]planNode{"n1": tt.node})
			got := planNodeDowns(s, l, testPolicy, now)
			var want []*SetNodeState
			if tt.down {
				want = []*SetNodeState{{NodeID: "n1", State: NodeDown, Time: now.UnixNano()}}
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("planNodeDowns = %s, want %s", dumpJSON(got), dumpJSON(want))
			}
		})
	}
}
