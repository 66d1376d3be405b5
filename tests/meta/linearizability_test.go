package meta_test

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/cluster"
)

// The register checked for linearizability is one volume's attachment
// guarded by its epoch (docs/architecture.md, "Store contract": changes of the
// attachment are a compare-and-set on the epoch and increment it).
//
// Model state: (epoch, attached node). Operations and their sequential
// specification, as apply.go defines them:
//
//	Read              → the state.
//	Attach(n, e)      attached to n already     → ok, unchanged (idempotent)
//	                  attached to another node  → failed precondition
//	                  epoch ≠ e                 → epoch mismatch
//	                  otherwise                 → ok, (epoch+1, n)
//	Detach(n, e)      not attached              → ok, unchanged (idempotent)
//	                  attached to another node  → failed precondition
//	                  epoch ≠ e                 → epoch mismatch
//	                  otherwise                 → ok, (epoch+1, "")
//
// Every node stays up during the test (NodeDownAfter is far longer), so an
// attach never fails for a node being down.
//
// A write whose outcome the client cannot know (a timeout, a lost leader, a
// transport error) is recorded as unknown with an infinite return time: it may
// take effect at any point after its call, or never. Failed reads are
// dropped: they change nothing.

type casOp int

const (
	opRead casOp = iota
	opAttach
	opDetach
)

type casResult int

const (
	resOK casResult = iota
	resEpochMismatch
	resPrecondition
	resUnknown
)

type casInput struct {
	Op     casOp
	Node   string
	Expect uint64
}

type casOutput struct {
	Result casResult
	// Epoch and Node: the volume as the answer showed it (reads and
	// successful writes).
	Epoch uint64
	Node  string
	Err   string // for the visualization
}

type casState struct {
	Epoch uint64
	Node  string
}

// casStep is the sequential specification: the answer the store must give to
// in at state s, and the state after.
func casStep(s casState, in casInput) (casOutput, casState) {
	switch in.Op {
	case opAttach:
		switch {
		case s.Node == in.Node:
			return casOutput{Result: resOK, Epoch: s.Epoch, Node: s.Node}, s
		case s.Node != "":
			return casOutput{Result: resPrecondition}, s
		case s.Epoch != in.Expect:
			return casOutput{Result: resEpochMismatch}, s
		}
		next := casState{Epoch: s.Epoch + 1, Node: in.Node}
		return casOutput{Result: resOK, Epoch: next.Epoch, Node: next.Node}, next
	case opDetach:
		switch {
		case s.Node == "":
			return casOutput{Result: resOK, Epoch: s.Epoch}, s
		case in.Node != "" && s.Node != in.Node:
			return casOutput{Result: resPrecondition}, s
		case s.Epoch != in.Expect:
			return casOutput{Result: resEpochMismatch}, s
		}
		next := casState{Epoch: s.Epoch + 1}
		return casOutput{Result: resOK, Epoch: next.Epoch}, next
	}
	return casOutput{Result: resOK, Epoch: s.Epoch, Node: s.Node}, s
}

// casModel is the model for porcupine. With resentMayApply, a write whose
// compare-and-set succeeds at its linearization point may answer anything:
// the known double-apply bug (TestKnownBugForwardRetryAppliesTwice) sends a
// command again after it was applied, and the caller gets the second copy's
// answer — a refusal, or an idempotent "ok" with a later epoch. A strict check
// trips over it in about one run in six. Everything else stays strict: every
// read, every state change (only a compare-and-set whose epoch matched may
// make one) and the answer of every write that changed nothing.
func casModel(initial casState, resentMayApply bool) porcupine.Model {
	nm := porcupine.NondeterministicModel{
		Init: func() []interface{} { return []interface{}{initial} },
		Step: func(state, input, output interface{}) []interface{} {
			s, in, out := state.(casState), input.(casInput), output.(casOutput)
			want, next := casStep(s, in)
			if out.Result == resUnknown {
				return []interface{}{next} // took effect here (or is linearized after everything)
			}
			var states []interface{}
			if out.Result == want.Result && (out.Result != resOK || (out.Epoch == want.Epoch && out.Node == want.Node)) {
				states = append(states, next)
			}
			if resentMayApply && next != s {
				states = append(states, next) // applied; the answer is a re-sent copy's
			}
			return states
		},
		Equal: func(a, b interface{}) bool { return a.(casState) == b.(casState) },
		DescribeOperation: func(input, output interface{}) string {
			in, out := input.(casInput), output.(casOutput)
			var call string
			switch in.Op {
			case opRead:
				call = "read()"
			case opAttach:
				call = fmt.Sprintf("attach(%s, epoch %d)", in.Node, in.Expect)
			case opDetach:
				call = fmt.Sprintf("detach(%s, epoch %d)", in.Node, in.Expect)
			}
			switch out.Result {
			case resOK:
				return fmt.Sprintf("%s → ok (epoch %d, node %q)", call, out.Epoch, out.Node)
			case resEpochMismatch:
				return call + " → epoch mismatch"
			case resPrecondition:
				return call + " → failed precondition"
			}
			return fmt.Sprintf("%s → unknown (%s)", call, out.Err)
		},
		DescribeState: func(state interface{}) string {
			s := state.(casState)
			return fmt.Sprintf("epoch %d, node %q", s.Epoch, s.Node)
		},
	}
	return nm.ToModel()
}

// history collects operations from concurrent clients.
type history struct {
	start time.Time
	mu    sync.Mutex
	ops   []porcupine.Operation
	// counts by outcome, for the log
	reads, writes, unknown, droppedReads int
}

func (h *history) now() int64 { return time.Since(h.start).Nanoseconds() }

func (h *history) add(client int, in casInput, out casOutput, call, ret int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if out.Result == resUnknown {
		ret = math.MaxInt64
		h.unknown++
	}
	if in.Op == opRead {
		h.reads++
	} else {
		h.writes++
	}
	h.ops = append(h.ops, porcupine.Operation{ClientId: client, Input: in, Call: call, Output: out, Return: ret})
}

// Scenario: four clients read the volume's (epoch, attachment) with
// linearizable reads and attach/detach it with the epoch they saw (sometimes a
// stale one) for ~10s, while the leader is killed every ~1.5s and the previous
// victim restarted.
// Invariant (docs/architecture.md, "Guarantees", item 4): the history is
// linearizable with respect to the model above (porcupine).
func TestEpochCASLinearizable(t *testing.T) {
	const (
		clients  = 4
		duration = 10 * time.Second
		killEach = 1500 * time.Millisecond
	)
	c := cluster.MakeCluster(t, 3, cluster.WithNodeDownAfter(10*time.Minute))
	vol, err := createVolume(ctxFor(t, 10*time.Second), c.Client(t), "lin")
	if err != nil {
		t.Fatal(err)
	}
	initial := casState{Epoch: vol.Epoch}
	nodes := []string{c.NodeID(0), c.NodeID(1), c.NodeID(2)}

	h := &history{start: time.Now()}
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	var wg sync.WaitGroup
	// Registered after MakeCluster's cleanup, so it runs first: the clients
	// stop before the members do, even when the test fails early.
	t.Cleanup(func() { cancel(); wg.Wait() })
	var unexpected sync.Map // error text → client, for errors outside the model
	for id := range clients {
		addrs := c.APIAddrs()
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(id)))
		rng.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
		cl := c.ClientOf(t, addrs...)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				runCASRound(ctx, id, cl, vol.ID, nodes, rng, h, &unexpected)
			}
		}()
	}

	// The nemesis: kill the leader every killEach; halfway to the next kill,
	// restart the victim and let it catch up.
	kills := 0
	for ctx.Err() == nil {
		round := time.Now()
		lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
		l, err := c.WaitLeader(lctx)
		lcancel()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			t.Fatal(err)
		}
		if err := c.Kill(l); err != nil {
			t.Fatal(err)
		}
		kills++
		sleepCtx(ctx, killEach/2-time.Since(round))
		c.Restart(t, l)
		sleepCtx(ctx, killEach-time.Since(round))
	}
	wg.Wait()

	unexpected.Range(func(k, v any) bool {
		t.Errorf("client %d: error outside the model: %v", v, k)
		return true
	})
	t.Logf("%d leader kills; %d operations: %d reads, %d writes (%d with unknown outcome), %d failed reads dropped",
		kills, len(h.ops), h.reads, h.writes, h.unknown, h.droppedReads)
	if h.writes == 0 || h.reads == 0 {
		t.Fatalf("the clients got nothing done")
	}

	model := casModel(initial, false) // strict: every answer must fit one linear order
	checkStart := time.Now()
	res, info := porcupine.CheckOperationsVerbose(model, h.ops, 60*time.Second)
	t.Logf("porcupine: %s in %v", res, time.Since(checkStart).Round(time.Millisecond))
	if res != porcupine.Ok {
		f, err := os.CreateTemp("", "cairn-linearizability-*.html")
		if err != nil {
			t.Fatalf("history is %s; cannot write the visualization: %v", res, err)
		}
		if err := porcupine.Visualize(model, info, f); err != nil {
			t.Errorf("visualize: %v", err)
		}
		if err := f.Close(); err != nil {
			t.Errorf("close %s: %v", f.Name(), err)
		}
		t.Fatalf("history of %d operations is %s (not linearizable or not decided); visualization: %s\n%s\n"+
			"(A write answered with a refusal, or with a later epoch than its own, whose effect reads show is\n"+
			"the known double-apply bug: see TestKnownBugForwardRetryAppliesTwice.)",
			len(h.ops), res, f.Name(), explainFailure(model, h.ops, info))
	}
}

// explainFailure describes where the longest linearization porcupine found
// gets stuck: the last operations it could place, the state they lead to,
// and the operations pending at that point, none of which can go next.
func explainFailure(model porcupine.Model, ops []porcupine.Operation, info porcupine.LinearizationInfo) string {
	var longest []porcupine.Operation // no partition: one history
	if parts := info.PartialLinearizationsOperations(); len(parts) > 0 {
		for _, l := range parts[0] {
			if len(l) > len(longest) {
				longest = l
			}
		}
	}
	type key struct {
		client    int
		call, ret int64
	}
	placed := map[key]bool{}
	state := model.Init()
	var lastRet int64
	var b strings.Builder
	fmt.Fprintf(&b, "longest linearization: %d of %d operations; its last steps:\n", len(longest), len(ops))
	for i, op := range longest {
		placed[key{op.ClientId, op.Call, op.Return}] = true
		_, state = model.Step(state, op.Input, op.Output)
		if op.Return != math.MaxInt64 && op.Return > lastRet {
			lastRet = op.Return
		}
		if i >= len(longest)-5 {
			fmt.Fprintf(&b, "  client %d [%s, %s] %s  ⇒ %s\n", op.ClientId, fmtTime(op.Call), fmtTime(op.Return),
				model.DescribeOperation(op.Input, op.Output), model.DescribeState(state))
		}
	}
	var pending []porcupine.Operation
	for _, op := range ops {
		if !placed[key{op.ClientId, op.Call, op.Return}] && op.Call <= lastRet+int64(time.Second) {
			pending = append(pending, op)
		}
	}
	sort.Slice(pending, func(i, j int) bool { return pending[i].Call < pending[j].Call })
	fmt.Fprintf(&b, "operations that cannot go next (called before %s + 1s):\n", fmtTime(lastRet))
	for i, op := range pending {
		if i == 15 {
			fmt.Fprintf(&b, "  … %d more\n", len(pending)-i)
			break
		}
		fmt.Fprintf(&b, "  client %d [%s, %s] %s\n", op.ClientId, fmtTime(op.Call), fmtTime(op.Return), model.DescribeOperation(op.Input, op.Output))
	}
	return b.String()
}

func fmtTime(ns int64) string {
	if ns == math.MaxInt64 {
		return "∞"
	}
	return fmt.Sprintf("%.4fs", float64(ns)/1e9)
}

// runCASRound reads the volume, then attaches or detaches it with the epoch
// read (now and then a stale one), recording both operations.
func runCASRound(ctx context.Context, id int, cl *meta.Client, volID string, nodes []string, rng *rand.Rand, h *history, unexpected *sync.Map) {
	opCtx := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 3*time.Second) }

	call := h.now()
	rctx, rcancel := opCtx()
	st, err := cl.State(rctx, true)
	rcancel()
	ret := h.now()
	if err != nil {
		h.mu.Lock()
		h.droppedReads++
		h.mu.Unlock()
		return
	}
	v, ok := st.Volumes[volID]
	if !ok {
		unexpected.Store(fmt.Sprintf("volume %s missing from a linearizable read", volID), id)
		return
	}
	seen := casState{Epoch: v.Epoch}
	if v.Attachment != nil {
		seen.Node = v.Attachment.Node
	}
	h.add(id, casInput{Op: opRead}, casOutput{Result: resOK, Epoch: seen.Epoch, Node: seen.Node}, call, ret)
	if ctx.Err() != nil {
		return
	}

	in := casInput{Op: opAttach, Node: nodes[rng.IntN(len(nodes))], Expect: seen.Epoch}
	if seen.Node != "" && rng.IntN(10) < 7 {
		in.Op = opDetach
		if rng.IntN(5) > 0 {
			in.Node = seen.Node
		}
	}
	if rng.IntN(10) == 0 && in.Expect > 1 {
		in.Expect-- // a stale epoch must be refused
	}
	var cmd meta.Command
	if in.Op == opAttach {
		cmd = &meta.AttachVolume{VolumeID: volID, NodeID: in.Node, ExpectEpoch: in.Expect}
	} else {
		cmd = &meta.DetachVolume{VolumeID: volID, NodeID: in.Node, ExpectEpoch: in.Expect}
	}
	call = h.now()
	wctx, wcancel := opCtx()
	res, err := cl.Apply(wctx, cmd)
	wcancel()
	ret = h.now()

	var out casOutput
	switch {
	case err == nil && res.Volume != nil:
		out = casOutput{Result: resOK, Epoch: res.Volume.Epoch}
		if res.Volume.Attachment != nil {
			out.Node = res.Volume.Attachment.Node
		}
	case err == nil:
		unexpected.Store("a successful attach/detach answered without the volume", id)
		out = casOutput{Result: resUnknown, Err: "no volume in answer"}
	case errors.Is(err, meta.ErrEpochMismatch):
		out = casOutput{Result: resEpochMismatch}
	case errors.Is(err, meta.ErrFailedPrecondition):
		out = casOutput{Result: resPrecondition}
	case errors.Is(err, meta.ErrNotFound), errors.Is(err, meta.ErrIllegalTransition),
		errors.Is(err, meta.ErrInvalidArgument), errors.Is(err, meta.ErrBadCommand):
		// Definite answers the model has no room for.
		unexpected.Store(err.Error(), id)
		out = casOutput{Result: resUnknown, Err: err.Error()}
	default:
		out = casOutput{Result: resUnknown, Err: err.Error()}
	}
	h.add(id, in, out, call, ret)
}

// sleepCtx waits d (if positive) or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// TestEpochCASModel checks the model itself on small histories: sequential
// legal ones, a write with unknown outcome that did take effect, and the
// double-apply pattern (a write refused whose effect is then read), which
// must be Illegal.
func TestEpochCASModel(t *testing.T) {
	type step struct {
		client    int
		in        casInput
		out       casOutput
		call, ret int64
	}
	read := func(e uint64, n string) (casInput, casOutput) {
		return casInput{Op: opRead}, casOutput{Result: resOK, Epoch: e, Node: n}
	}
	op := func(c int, in casInput, out casOutput, call, ret int64) step { return step{c, in, out, call, ret} }
	r1i, r1o := read(1, "")
	r4i, r4o := read(4, "n1")
	r2i, r2o := read(2, "n1")
	tests := []struct {
		name     string
		tolerant bool // resentMayApply
		steps    []step
		want     porcupine.CheckResult
	}{
		{"sequential", false, []step{
			op(0, r1i, r1o, 0, 1),
			op(0, casInput{opAttach, "n0", 1}, casOutput{Result: resOK, Epoch: 2, Node: "n0"}, 2, 3),
			op(0, casInput{opAttach, "n0", 1}, casOutput{Result: resOK, Epoch: 2, Node: "n0"}, 4, 5),
			op(0, casInput{opDetach, "n1", 2}, casOutput{Result: resPrecondition}, 6, 7),
			op(0, casInput{opDetach, "n0", 1}, casOutput{Result: resEpochMismatch}, 8, 9),
			op(0, casInput{opDetach, "n0", 2}, casOutput{Result: resOK, Epoch: 3}, 10, 11),
			op(1, casInput{opAttach, "n1", 3}, casOutput{Result: resUnknown}, 12, math.MaxInt64),
			op(0, r4i, r4o, 13, 14),
		}, porcupine.Ok},
		{"concurrent attaches, one wins", false, []step{
			op(0, casInput{opAttach, "n0", 1}, casOutput{Result: resPrecondition}, 0, 10),
			op(1, casInput{opAttach, "n1", 1}, casOutput{Result: resOK, Epoch: 2, Node: "n1"}, 1, 9),
			op(2, r2i, r2o, 11, 12),
		}, porcupine.Ok},
		{"refused write whose effect is read", false, []step{
			op(0, casInput{opAttach, "n1", 1}, casOutput{Result: resPrecondition}, 0, 10),
			op(1, r2i, r2o, 11, 12),
		}, porcupine.Illegal},
		{"refused write whose effect is read, tolerated", true, []step{
			op(0, casInput{opAttach, "n1", 1}, casOutput{Result: resPrecondition}, 0, 10),
			op(1, r2i, r2o, 11, 12),
		}, porcupine.Ok},
		{"refused write that could not apply, tolerated", true, []step{
			op(0, casInput{opAttach, "n1", 5}, casOutput{Result: resEpochMismatch}, 0, 10),
			op(1, r2i, r2o, 11, 12),
		}, porcupine.Illegal},
		{"applied write answered by its re-sent copy", false, []step{
			op(0, casInput{opAttach, "n1", 1}, casOutput{Result: resOK, Epoch: 4, Node: "n1"}, 0, 100),
			op(1, r2i, r2o, 10, 11),
			op(1, casInput{opDetach, "n1", 2}, casOutput{Result: resOK, Epoch: 3}, 12, 13),
			op(1, casInput{opAttach, "n1", 3}, casOutput{Result: resOK, Epoch: 4, Node: "n1"}, 14, 15),
		}, porcupine.Illegal},
		{"applied write answered by its re-sent copy, tolerated", true, []step{
			op(0, casInput{opAttach, "n1", 1}, casOutput{Result: resOK, Epoch: 4, Node: "n1"}, 0, 100),
			op(1, r2i, r2o, 10, 11),
			op(1, casInput{opDetach, "n1", 2}, casOutput{Result: resOK, Epoch: 3}, 12, 13),
			op(1, casInput{opAttach, "n1", 3}, casOutput{Result: resOK, Epoch: 4, Node: "n1"}, 14, 15),
		}, porcupine.Ok},
		{"write applied with a stale epoch, tolerated", true, []step{
			op(0, r2i, r2o, 0, 1),
			op(1, casInput{opDetach, "n1", 1}, casOutput{Result: resOK, Epoch: 3}, 2, 3),
		}, porcupine.Illegal},
		{"stale read, tolerated", true, []step{
			op(0, casInput{opAttach, "n1", 1}, casOutput{Result: resOK, Epoch: 2, Node: "n1"}, 0, 10),
			op(1, r1i, r1o, 11, 12),
		}, porcupine.Illegal},
		{"stale read", false, []step{
			op(0, casInput{opAttach, "n1", 1}, casOutput{Result: resOK, Epoch: 2, Node: "n1"}, 0, 10),
			op(1, r1i, r1o, 11, 12),
		}, porcupine.Illegal},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var ops []porcupine.Operation
			for _, s := range tc.steps {
				ops = append(ops, porcupine.Operation{ClientId: s.client, Input: s.in, Output: s.out, Call: s.call, Return: s.ret})
			}
			model := casModel(casState{Epoch: 1}, tc.tolerant)
			res, info := porcupine.CheckOperationsVerbose(model, ops, 10*time.Second)
			if res != tc.want {
				t.Fatalf("check = %s, want %s", res, tc.want)
			}
			if res == porcupine.Illegal {
				if msg := explainFailure(model, ops, info); !strings.Contains(msg, "cannot go next") {
					t.Fatalf("explanation lacks the pending operations:\n%s", msg)
				}
			}
		})
	}
}
