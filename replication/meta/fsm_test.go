package meta

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/volspec"
)

const gib = uint64(1) << 30

// harness drives one FSM the way hashicorp/raft does: one committed log entry
// at a time, with increasing indexes. Every entry it applies also checks the
// FSM's first rule, a command that fails leaves the state deeply unchanged,
// and the rules of the request table (see checkEntry).
type harness struct {
	t     testing.TB
	f     *FSM
	index uint64
	// last is the state after the entry applyLog applied last, while lastCh
	// (the FSM's Changed channel then) shows nothing was applied or restored
	// since; it saves a copy of the state per entry.
	last   *State
	lastCh <-chan struct{}
}

func newHarness(t testing.TB) *harness {
	return &harness{t: t, f: NewFSM()}
}

// state returns a deep copy of the FSM's state.
func (h *harness) state() *State {
	return fsmState(h.f)
}

func fsmState(f *FSM) *State {
	var c *State
	f.View(func(s *State) { c = s.Clone() })
	return c
}

// current returns the FSM's state like state does, but shares it with the
// harness: read it, never change it.
func (h *harness) current() *State {
	if h.last == nil || h.f.Changed() != h.lastCh {
		h.last, h.lastCh = h.state(), h.f.Changed()
	}
	return h.last
}

// applyLog feeds one raw log entry to the FSM and returns its result.
func (h *harness) applyLog(typ raft.LogType, data []byte) (Result, error) {
	h.t.Helper()
	before := h.current()
	h.index++
	resp := h.f.Apply(&raft.Log{Index: h.index, Term: 1, Type: typ, Data: data, AppendedAt: time.Unix(0, 0)})
	r, ok := resp.(*applyResult)
	if !ok || r == nil {
		h.t.Fatalf("FSM.Apply returned %T (%v), want *applyResult", resp, resp)
	}
	if got := h.f.AppliedIndex(); got != h.index {
		h.t.Fatalf("AppliedIndex = %d after applying index %d", got, h.index)
	}
	checkEntry(h.t, typ, data, before, h.current(), r.Result, r.Err)
	checkChangeLog(h.t, h.f, h.index, before, h.current())
	checkIndex(h.t, h.f)
	if halt := h.f.Halted(); halt != nil {
		if !errors.Is(r.Err, ErrNewerCommand) {
			h.t.Fatalf("FSM halted (%v) at an entry that answered %v", halt, r.Err)
		}
		// Random or corrupted bytes often look like an entry of a newer
		// build, and halt the FSM (TestFSMHaltsOnNewerEntry). The entry
		// changed nothing (checked above): the harness goes on like a
		// member that never saw it.
		h.f.mu.Lock()
		h.f.halted = nil
		h.f.mu.Unlock()
	}
	return r.Result, r.Err
}

// checkEntry checks what one applied entry did to the state, as far as the
// entry alone tells:
//   - a Request whose id is remembered changes nothing and answers with the
//     remembered result and error;
//   - a new Request adds exactly its own record (the result it returned, or
//     its inner command's error), dropping the oldest when the table is full;
//     when its inner command fails, that record is the only change;
//   - a Request refused as such (no id, an inner command that does not
//     decode, a request in a request) is an error and changes nothing;
//   - any other failing entry changes nothing, and no other entry touches the
//     request table.
func checkEntry(t testing.TB, typ raft.LogType, data []byte, before, after *State, res Result, err error) {
	t.Helper()
	req := requestOf(typ, data)
	if errors.Is(err, pki.ErrPermissionDenied) {
		req = nil // an AsNode refused before its Request was looked at
	}
	if req != nil {
		if rec := rememberedRequest(before, req.ID); rec != nil {
			if !statesEqual(before, after) {
				t.Fatalf("repeated request %q changed the state:\nbefore %s\n after %s", req.ID, dumpJSON(before), dumpJSON(after))
			}
			if !reflect.DeepEqual(res, rec.Result) || !reflect.DeepEqual(toWire(err), rec.Err) {
				t.Fatalf("repeated request %q answered (%+v, %v), remembered (%+v, %+v)", req.ID, res, err, rec.Result, rec.Err)
			}
			return
		}
		refusal := requestRefusal(req)
		if refusal == nil {
			want := withRecord(before.Requests, RequestRecord{ID: req.ID, Result: res, Err: toWire(err)})
			if !recordsEqual(after.Requests, want) {
				t.Fatalf("request %q (%v): request table\n%s\nwant\n%s", req.ID, err, dumpJSON(after.Requests), dumpJSON(want))
			}
			if err != nil {
				wantState := before.Clone()
				wantState.Requests = want
				if !statesEqual(after, wantState) {
					t.Fatalf("request %q: failing inner command (%v) changed more than the request table:\nbefore %s\n after %s",
						req.ID, err, dumpJSON(before), dumpJSON(after))
				}
			}
			return
		}
		if !errors.Is(err, refusal) {
			t.Fatalf("request %+v: error %v, want one wrapping %q", req, err, refusal)
		}
	}
	if err != nil && !statesEqual(before, after) {
		t.Fatalf("failed entry (%v) changed the state:\nbefore %s\n after %s", err, dumpJSON(before), dumpJSON(after))
	}
	if !recordsEqual(before.Requests, after.Requests) {
		t.Fatalf("entry %q, not a new request, changed the request table:\nbefore %s\n after %s", data, dumpJSON(before.Requests), dumpJSON(after.Requests))
	}
}

// checkChangeLog checks that the FSM's change log (watch.go) names every
// volume and node that the entry at index changed from before to after.
func checkChangeLog(t testing.TB, f *FSM, index uint64, before, after *State) {
	t.Helper()
	var vols, nodes []string
	for id, v := range after.Volumes {
		if w, ok := before.Volumes[id]; !ok || !reflect.DeepEqual(v, w) {
			vols = append(vols, id)
		}
	}
	for id := range before.Volumes {
		if _, ok := after.Volumes[id]; !ok {
			vols = append(vols, id)
		}
	}
	for id, n := range after.Nodes {
		if m, ok := before.Nodes[id]; !ok || !reflect.DeepEqual(n, m) {
			nodes = append(nodes, id)
		}
	}
	if len(vols) == 0 && len(nodes) == 0 {
		return
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	var rec changeRecord
	if n := len(f.changes); n > 0 {
		rec = f.changes[n-1]
	}
	if rec.index != index || !subset(vols, rec.volumes) || !subset(nodes, rec.nodes) {
		t.Fatalf("entry %d changed volumes %v and nodes %v; the change log says %+v", index, vols, nodes, rec)
	}
}

func subset(a, b []string) bool {
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return true
}

// requestOf returns the Request a log entry carries, or nil.
func requestOf(typ raft.LogType, data []byte) *Request {
	if typ != raft.LogCommand {
		return nil
	}
	c, err := Decode(data)
	if err != nil {
		return nil
	}
	if an, ok := c.(*AsNode); ok {
		// A node's command, checked against the state (asnode.go)
		// before the Request inside is looked at.
		if c, err = Decode(an.Command); err != nil {
			return nil
		}
	}
	req, _ := c.(*Request)
	return req
}

// rememberedRequest returns the record of request id in s, or nil. An empty
// id is never remembered.
func rememberedRequest(s *State, id string) *RequestRecord {
	if id == "" {
		return nil
	}
	for i := len(s.Requests) - 1; i >= 0; i-- {
		if s.Requests[i].ID == id {
			return &s.Requests[i]
		}
	}
	return nil
}

// requestRefusal returns the error a new request is refused with before its
// inner command is applied, or nil when the inner command gets applied.
func requestRefusal(req *Request) error {
	if req.ID == "" {
		return ErrInvalidArgument
	}
	inner, err := Decode(req.Command)
	if err != nil {
		return ErrBadCommand
	}
	if _, nested := inner.(*Request); nested {
		return ErrBadCommand
	}
	return nil
}

// withRecord returns a copy of the request table recs with rec appended,
// keeping the newest MaxRememberedRequests.
func withRecord(recs []RequestRecord, rec RequestRecord) []RequestRecord {
	if n := len(recs) - MaxRememberedRequests + 1; n > 0 {
		recs = recs[n:]
	}
	return append(append([]RequestRecord(nil), recs...), rec)
}

// stripRequests returns a copy of s without its request table.
func stripRequests(s *State) *State {
	c := s.Clone()
	c.Requests = nil
	return c
}

// statesEqual is reflect.DeepEqual for states, quick on request tables whose
// records share their pointers (a state and its clone, or the same FSM
// before and after an entry). A table of a few thousand records compared
// with reflect.DeepEqual at every step would make the randomized test slow.
func statesEqual(a, b *State) bool {
	sa, sb := *a, *b
	sa.Requests, sb.Requests = nil, nil
	return reflect.DeepEqual(&sa, &sb) && recordsEqual(a.Requests, b.Requests)
}

// recordsEqual is reflect.DeepEqual for request tables, quick on records
// that share their pointers.
func recordsEqual(a, b []RequestRecord) bool {
	if (a == nil) != (b == nil) || len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] && !reflect.DeepEqual(a[i], b[i]) {
			return false
		}
	}
	return true
}

// sameStep reports whether two FSMs fed the same log, a and b, still agree
// after one more entry, given that they agreed before it: everything but the
// request table deeply equal, and the tables of the same length with the
// same newest record (the harness has checked that each table changed by
// at most that record). Every so often (full) the tables are compared whole.
func sameStep(a, b *State, full bool) bool {
	if full {
		return statesEqual(a, b)
	}
	sa, sb := *a, *b
	sa.Requests, sb.Requests = nil, nil
	if !reflect.DeepEqual(&sa, &sb) || len(a.Requests) != len(b.Requests) {
		return false
	}
	n := len(a.Requests)
	return n == 0 || reflect.DeepEqual(a.Requests[n-1], b.Requests[n-1])
}

// apply encodes c and applies it as the next command entry.
func (h *harness) apply(c Command) (Result, error) {
	h.t.Helper()
	b, err := Encode(c)
	if err != nil {
		h.t.Fatalf("Encode(%#v): %v", c, err)
	}
	return h.applyLog(raft.LogCommand, b)
}

// must applies c and fails the test if it returns an error.
func (h *harness) must(c Command) Result {
	h.t.Helper()
	res, err := h.apply(c)
	if err != nil {
		h.t.Fatalf("apply %T %+v: %v", c, c, err)
	}
	return res
}

// fails applies c and checks that it fails with want (errors.Is).
func (h *harness) fails(c Command, want error) error {
	h.t.Helper()
	res, err := h.apply(c)
	if !errors.Is(err, want) {
		h.t.Fatalf("apply %T %+v = (%+v, %v), want an error wrapping %q", c, c, res, err, want)
	}
	if !reflect.DeepEqual(res, Result{}) {
		h.t.Errorf("failed apply %T returned a non-empty result %+v", c, res)
	}
	return err
}

// volume returns a copy of volume id (nil when it does not exist).
func (h *harness) volume(id string) *Volume {
	var v *Volume
	h.f.View(func(s *State) {
		if x, ok := s.Volumes[id]; ok {
			v = x.Clone()
		}
	})
	return v
}

func (h *harness) node(id string) *Node {
	var n *Node
	h.f.View(func(s *State) {
		if x, ok := s.Nodes[id]; ok {
			c := *x
			n = &c
		}
	})
	return n
}

// restoreState replaces the FSM's state with s through a snapshot, which is
// how tests reach states no command produces (a pending volume).
func (h *harness) restoreState(s *State) {
	h.t.Helper()
	var buf bytes.Buffer
	if err := WriteSnapshot(&buf, s); err != nil {
		h.t.Fatalf("WriteSnapshot: %v", err)
	}
	if err := h.f.Restore(nopCloser{&buf}); err != nil {
		h.t.Fatalf("Restore: %v", err)
	}
}

type nopCloser struct{ *bytes.Buffer }

func (nopCloser) Close() error { return nil }

// cluster sets the cluster up and registers nodes n1..nN, each with capacity
// GiB of disk; zones, when given, label the nodes in turn.
func (h *harness) cluster(nodes int, capacityGiB uint64, zones ...string) {
	h.t.Helper()
	h.must(&InitCluster{ClusterID: "test-cluster"})
	for i := 1; i <= nodes; i++ {
		zone := ""
		if len(zones) > 0 {
			zone = zones[(i-1)%len(zones)]
		}
		h.addNode(nodeName(i), zone, capacityGiB)
	}
}

func nodeName(i int) string { return "n" + string(rune('0'+i)) }

func (h *harness) addNode(id, zone string, capacityGiB uint64) {
	h.t.Helper()
	h.must(&RegisterNode{Node: Node{
		ID: id, RaftAddr: id + ":7000", APIAddr: id + ":7001", Zone: zone,
		CapacityBytes: capacityGiB * gib, FreeBytes: capacityGiB * gib,
	}, Time: 100})
}

// createVolume creates volume id (named "pvc-"+id) and returns it.
func (h *harness) createVolume(id string, sizeGiB uint64, replicas int) *Volume {
	h.t.Helper()
	res := h.must(&CreateVolume{ID: id, Name: "pvc-" + id, SizeBytes: sizeGiB * gib, Replicas: replicas, CreatedAt: 1})
	return res.Volume
}

func (h *harness) attach(id, node string) *Volume {
	h.t.Helper()
	v := h.volume(id)
	return h.must(&AttachVolume{VolumeID: id, NodeID: node, ExpectEpoch: v.Epoch}).Volume
}

// attachNBD attaches volume id to node, exported on an NBD socket.
func (h *harness) attachNBD(id, node, socket string) *Volume {
	h.t.Helper()
	v := h.volume(id)
	return h.must(&AttachVolume{VolumeID: id, NodeID: node, NBDSocket: socket, ExpectEpoch: v.Epoch}).Volume
}

func (h *harness) setReplica(id, replica string, st ReplicaState) *Volume {
	h.t.Helper()
	v := h.volume(id)
	return h.must(&SetReplicaState{VolumeID: id, ReplicaID: replica, State: st, ExpectEpoch: v.Epoch}).Volume
}

func dumpJSON(v any) string {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err.Error()
	}
	return string(b)
}

func TestFSMNonCommandLogTypesChangeNothing(t *testing.T) {
	valid, err := Encode(&InitCluster{ClusterID: "other"})
	if err != nil {
		t.Fatal(err)
	}
	types := []raft.LogType{
		raft.LogNoop, raft.LogBarrier, raft.LogConfiguration,
		raft.LogAddPeerDeprecated, raft.LogRemovePeerDeprecated, raft.LogType(200),
	}
	for _, typ := range types {
		for label, data := range map[string][]byte{"no data": nil, "a valid command": valid, "garbage": []byte("garbage")} {
			t.Run(typ.String()+"/"+label, func(t *testing.T) {
				h := newHarness(t)
				h.cluster(3, 10)
				h.createVolume("v1", 1, 3)
				before := h.state()
				changed := h.f.Changed()
				res, err := h.applyLog(typ, data)
				if err != nil || !reflect.DeepEqual(res, Result{}) {
					t.Fatalf("Apply(%s) = (%+v, %v), want an empty result", typ, res, err)
				}
				if after := h.state(); !reflect.DeepEqual(before, after) {
					t.Fatalf("Apply(%s) changed the state:\n%s", typ, dumpJSON(after))
				}
				select {
				case <-changed:
				default:
					t.Errorf("Changed channel not closed after a %s entry", typ)
				}
			})
		}
	}
}

func TestFSMApplyGarbage(t *testing.T) {
	tests := []struct {
		name string
		data []byte
	}{
		{"nil", nil},
		{"empty", []byte{}},
		{"one byte", []byte{7}},
		{"unknown type", []byte{0, 1, '{', '}'}},
		{"unknown type 200", []byte{200, 1, '{', '}'}},
		{"future version", []byte{byte(CmdDeleteVolume), 2, '{', '}'}},
		{"bad JSON", []byte{byte(CmdCreateVolume), 1, '{'}},
		{"random", []byte{0x9c, 0x01, 0xff, 0x00, 0x13, 0x37}},
		{"trailing brace", cmdBytes(CmdInitCluster, commandVersion, `{"cluster_id":"x"}}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.createVolume("v1", 1, 3)
			_, err := h.applyLog(raft.LogCommand, tt.data) // checks the state is unchanged
			if !errors.Is(err, ErrBadCommand) {
				t.Fatalf("Apply(%q) error = %v, want ErrBadCommand", tt.data, err)
			}
		})
	}
}

// TestFSMApplyNeverPanics feeds every prefix and every one-byte corruption of
// real commands through Apply.
func TestFSMApplyNeverPanics(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	h.createVolume("vol-1", 1, 3)
	for _, c := range fullCommands() {
		b, err := Encode(c)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i <= len(b); i++ {
			h.applyLog(raft.LogCommand, b[:i])
		}
		for i := range b {
			for _, x := range []byte{0x00, 0xff, '"', '}', b[i] ^ 0x20} {
				m := bytes.Clone(b)
				m[i] = x
				h.applyLog(raft.LogCommand, m)
			}
		}
	}
}

func TestFSMAppliedIndexAndChanged(t *testing.T) {
	f := NewFSM()
	if got := f.AppliedIndex(); got != 0 {
		t.Fatalf("fresh FSM AppliedIndex = %d", got)
	}
	ch := f.Changed()
	b, _ := Encode(&InitCluster{ClusterID: "c"})
	f.Apply(&raft.Log{Index: 17, Type: raft.LogCommand, Data: b})
	select {
	case <-ch:
	default:
		t.Fatal("Changed not closed after Apply")
	}
	if got := f.AppliedIndex(); got != 17 {
		t.Fatalf("AppliedIndex = %d, want 17", got)
	}
	ch2 := f.Changed()
	select {
	case <-ch2:
		t.Fatal("new Changed channel already closed")
	default:
	}
	// A failing command still counts as applied (raft committed it).
	f.Apply(&raft.Log{Index: 18, Type: raft.LogCommand, Data: []byte("junk")})
	if got := f.AppliedIndex(); got != 18 {
		t.Fatalf("AppliedIndex after a failing entry = %d, want 18", got)
	}
	select {
	case <-ch2:
	default:
		t.Fatal("Changed not closed after a failing entry")
	}
}

// TestFSMConcurrentReaders runs readers against a writer under -race.
func TestFSMConcurrentReaders(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 100)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				case <-h.f.Changed():
				case <-time.After(time.Millisecond):
				}
				h.f.View(func(s *State) { _ = s.SortedVolumes() })
				_ = h.f.AppliedIndex()
				snap, err := h.f.Snapshot()
				if err != nil {
					t.Error(err)
					return
				}
				var sink memSink
				if err := snap.Persist(&sink); err != nil {
					t.Error(err)
				}
				snap.Release()
			}
		}()
	}
	for i := 0; i < 50; i++ {
		id := "v" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		v := h.createVolume(id, 1, 2)
		h.attach(id, v.Replicas[0].Node)
	}
	close(stop)
	wg.Wait()
}

// cmdGen generates random commands, valid and invalid, over a small universe
// of ids so that commands collide often. Some go wrapped in a Request, the
// way clients send them, and some are retries of a recent request.
type cmdGen struct {
	rng  *rand.Rand
	step int
	// recent holds the latest requests generated, for retries.
	recent  []*Request
	nextReq int
}

func (g *cmdGen) pick(xs ...string) string { return xs[g.rng.IntN(len(xs))] }

func (g *cmdGen) nodeID() string { return nodeName(1 + g.rng.IntN(7)) } // n7 is never registered

func (g *cmdGen) volumeID() string { return fmt.Sprintf("v%d", g.rng.IntN(10)) }

// epoch returns the volume's current epoch most of the time, else a nearby
// wrong one.
func (g *cmdGen) epoch(s *State, id string) uint64 {
	cur := uint64(0)
	if v, ok := s.Volumes[id]; ok {
		cur = v.Epoch
	}
	if g.rng.IntN(4) != 0 {
		return cur
	}
	return uint64(g.rng.IntN(int(cur) + 3))
}

// replicaID returns one of the volume's replicas most of the time, else a
// made-up (possibly former) one.
func (g *cmdGen) replicaID(s *State, id string) string {
	if v, ok := s.Volumes[id]; ok && len(v.Replicas) > 0 && g.rng.IntN(5) != 0 {
		return v.Replicas[g.rng.IntN(len(v.Replicas))].ID
	}
	return fmt.Sprintf("%s-r%d", id, 1+g.rng.IntN(8))
}

func (g *cmdGen) replicaState() ReplicaState {
	return ReplicaState(g.pick("healthy", "healthy", "rebuilding", "stale", "failed", "failed", "bogus"))
}

// next returns the next log entry: its raft type, its bytes and the command
// (nil for entries that are not commands).
func (g *cmdGen) next(s *State) (raft.LogType, []byte, Command) {
	g.step++
	var c Command
	switch {
	case g.step == 1:
		c = &InitCluster{ClusterID: "prop", OverProvisioningRatio: 1.5}
	case g.step <= 6:
		c = g.registerNode(nodeName(g.step - 1))
	default:
		c = g.random(s)
		if c != nil {
			c = g.request(s, c)
		}
	}
	if c == nil {
		switch g.rng.IntN(3) {
		case 0:
			return raft.LogNoop, nil, nil
		case 1:
			return raft.LogBarrier, []byte("junk"), nil
		default:
			b := make([]byte, g.rng.IntN(8))
			for i := range b {
				b[i] = byte(g.rng.IntN(256))
			}
			return raft.LogCommand, b, nil
		}
	}
	b, err := Encode(c)
	if err != nil {
		panic(fmt.Sprintf("BUG: encode %T: %v", c, err))
	}
	return raft.LogCommand, b, c
}

// request sends c as is, wraps it in a new Request, or replaces it by a
// retry of a recent request, now and then with another command under the
// same id (which must not be applied either). Rarely the request is one the
// FSM refuses: no id, an inner command that does not decode, a request in a
// request.
func (g *cmdGen) request(s *State, c Command) Command {
	encode := func(c Command) []byte {
		b, err := Encode(c)
		if err != nil {
			panic(fmt.Sprintf("BUG: encode %T: %v", c, err))
		}
		return b
	}
	switch n := g.rng.IntN(100); {
	case n < 10 && len(g.recent) > 0:
		old := g.recent[g.rng.IntN(len(g.recent))]
		if g.rng.IntN(4) == 0 {
			return &Request{ID: old.ID, Command: encode(c)}
		}
		return old
	case n < 12:
		return &Request{ID: "", Command: encode(c)}
	case n < 14:
		return &Request{ID: g.newRequestID(), Command: []byte{byte(c.Type()), commandVersion, '{'}}
	case n < 16:
		inner := &Request{ID: g.newRequestID(), Command: encode(c)}
		return &Request{ID: g.newRequestID(), Command: encode(inner)}
	case n < 40:
		req := &Request{ID: g.newRequestID(), Command: encode(c)}
		g.recent = append(g.recent, req)
		if len(g.recent) > 32 {
			g.recent = g.recent[1:]
		}
		return req
	}
	return c
}

func (g *cmdGen) newRequestID() string {
	g.nextReq++
	return fmt.Sprintf("req-%d", g.nextReq)
}

func (g *cmdGen) registerNode(id string) Command {
	zone := []string{"zone-a", "zone-b", "zone-c"}[g.rng.IntN(3)]
	capacity := uint64(8+g.rng.IntN(32)) * gib
	return &RegisterNode{Node: Node{ID: id, RaftAddr: id + ":7000", APIAddr: id + ":7001", Zone: zone,
		CapacityBytes: capacity, FreeBytes: capacity}, Time: int64(g.step)}
}

func (g *cmdGen) random(s *State) Command {
	vid := g.volumeID()
	switch g.rng.IntN(39) {
	case 0:
		return &InitCluster{ClusterID: g.pick("prop", "prop", "other", ""), OverProvisioningRatio: float64(g.rng.IntN(3)) - 0.5}
	case 1:
		return g.registerNode(g.pick("n1", "n2", "n3", "n4", "n5", "n6", ""))
	case 2:
		return &NodeHeartbeat{NodeID: g.nodeID(), CapacityBytes: uint64(g.rng.IntN(40)) * gib, Time: int64(g.step)}
	case 3, 4:
		return &SetNodeState{NodeID: g.nodeID(), State: NodeState(g.pick("up", "up", "up", "down", "draining", "sleeping")), Time: int64(g.step)}
	case 5, 6, 7, 8:
		c := &CreateVolume{
			ID: vid, Name: fmt.Sprintf("pvc-%d", g.rng.IntN(7)),
			SizeBytes: uint64(1+g.rng.IntN(4)) * gib, Replicas: 1 + g.rng.IntN(3),
			CreatedAt: int64(g.step),
		}
		if g.rng.IntN(5) == 0 {
			c.WriteQuorum = g.rng.IntN(4)
		}
		if g.rng.IntN(10) == 0 { // out of range
			c.SizeBytes, c.Replicas = uint64(g.rng.IntN(2)), g.rng.IntN(8)-1
		}
		if g.rng.IntN(4) == 0 {
			c.ContentSource = "snap-x"
		}
		if g.rng.IntN(4) == 0 {
			c.Parameters = map[string]string{"replicas": fmt.Sprint(c.Replicas)}
		}
		if g.rng.IntN(6) == 0 {
			c.AllowedZones = []string{g.pick("zone-a", "zone-b", "zone-c")}
		}
		if g.rng.IntN(4) == 0 {
			c.PreferredNode = g.nodeID()
		}
		return c
	case 9:
		return &DeleteVolume{VolumeID: vid}
	case 10, 11, 12:
		return &AttachVolume{VolumeID: vid, NodeID: g.nodeID(), ReadOnly: g.rng.IntN(5) == 0, ExpectEpoch: g.epoch(s, vid),
			NBDSocket: g.pick("", "", "/run/nbd/a.sock", "/run/nbd/b.sock")}
	case 13, 14:
		node := g.nodeID()
		if g.rng.IntN(3) == 0 {
			node = ""
		} else if v, ok := s.Volumes[vid]; ok && v.Attachment != nil && g.rng.IntN(2) == 0 {
			node = v.Attachment.Node
		}
		return &DetachVolume{VolumeID: vid, NodeID: node, ExpectEpoch: g.epoch(s, vid)}
	case 15, 16, 17, 18:
		return &SetReplicaState{VolumeID: vid, ReplicaID: g.replicaID(s, vid), State: g.replicaState(), ExpectEpoch: g.epoch(s, vid)}
	case 19, 20, 21:
		return &ReplaceReplica{VolumeID: vid, ReplicaID: g.replicaID(s, vid), ExpectEpoch: g.epoch(s, vid)}
	case 22, 23:
		return &SetVolumeState{VolumeID: vid, State: allVolumeStates[g.rng.IntN(len(allVolumeStates))]}
	case 24:
		return &CreateSnapshot{ID: fmt.Sprintf("s%d", g.rng.IntN(5)), Name: fmt.Sprintf("vs-%d", g.rng.IntN(4)), SourceVolumeID: vid, CreatedAt: int64(g.step)}
	case 25:
		return &DeleteSnapshot{SnapshotID: fmt.Sprintf("s%d", g.rng.IntN(5))}
	case 26, 27:
		return &PurgeVolume{VolumeID: vid}
	case 28, 29, 30:
		return g.rebuildProgress(s, vid)
	case 31, 32:
		return g.setParameters(vid)
	case 33, 34:
		return g.setReplicaGeneration(s, vid)
	case 35:
		return &SetNodeReservable{NodeID: g.nodeID(), IOPS: uint64(g.rng.IntN(4)) * 500}
	case 36:
		// A guaranteed volume (minIOPS 0 to 1000 in steps of 250; 0 and a
		// burstable class are refused), placed by admission.
		params := map[string]string{"qosClass": g.pick("guaranteed", "guaranteed", "burstable"),
			"minIOPS": fmt.Sprint(250 * g.rng.IntN(5))}
		if g.rng.IntN(2) == 0 { // of a disk type, that some nodes have (case 37)
			params["type"] = g.pick("hdd", "ssd", "Bad")
		}
		return &AdmitVolume{CreateVolume: CreateVolume{ID: vid, Name: fmt.Sprintf("pvc-%d", g.rng.IntN(7)),
			SizeBytes: uint64(1+g.rng.IntN(4)) * gib, Replicas: 1 + g.rng.IntN(3), Parameters: params, CreatedAt: int64(g.step)}}
	case 37:
		disks := map[string]DiskSpace{}
		for _, t := range []string{"hdd", "ssd", "default", "Bad"} {
			if g.rng.IntN(3) == 0 {
				c := uint64(g.rng.IntN(16)) * gib
				disks[t] = DiskSpace{CapacityBytes: c, FreeBytes: c / 2}
			}
		}
		return &SetNodeDisks{NodeID: g.nodeID(), Disks: disks}
	}
	return nil // a non-command entry or garbage
}

// rebuildProgress reports the rebuild of a replica, preferring a rebuilding
// one; now and then it is done, or claims more than its total.
func (g *cmdGen) rebuildProgress(s *State, vid string) *RebuildProgressUpdate {
	rid := g.replicaID(s, vid)
	total := uint64(g.rng.IntN(4)) * gib
	if v, ok := s.Volumes[vid]; ok {
		total = v.SizeBytes
		for _, r := range v.Replicas {
			if r.State == ReplicaRebuilding && g.rng.IntN(3) != 0 {
				rid = r.ID
				break
			}
		}
	}
	c := &RebuildProgressUpdate{VolumeID: vid, ReplicaID: rid, BytesTotal: total, Done: g.rng.IntN(4) == 0}
	if total > 0 {
		c.BytesCompared = g.rng.Uint64N(total + 1)
		c.BytesCopied = g.rng.Uint64N(c.BytesCompared + 1)
	}
	if g.rng.IntN(8) == 0 { // beyond the total
		if g.rng.IntN(2) == 0 {
			c.BytesCompared = total + 1 + g.rng.Uint64N(gib)
		} else {
			c.BytesCopied = total + 1
		}
	}
	return c
}

// setReplicaGeneration records one of a few generations for a replica,
// expecting the one recorded most of the time, else another (often "").
func (g *cmdGen) setReplicaGeneration(s *State, vid string) *SetReplicaGeneration {
	rid := g.replicaID(s, vid)
	c := &SetReplicaGeneration{VolumeID: vid, ReplicaID: rid, Generation: g.pick("g1", "g2", "g3", "")}
	if v, ok := s.Volumes[vid]; ok && g.rng.IntN(3) != 0 {
		if i, err := v.replicaIndex(rid); err == nil {
			c.Expect = v.Replicas[i].Generation
			return c
		}
	}
	c.Expect = g.pick("", "", "g1", "g2")
	return c
}

// setParameters changes one to three QoS keys, mostly to good values, now
// and then to bad ones (not a number, a zero burst, minIOPS above maxIOPS)
// or with a key that is not mutable.
func (g *cmdGen) setParameters(vid string) *SetParameters {
	values := map[string][]string{
		volspec.KeyMaxIOPS:       {"", "0", "200", "500", "1000", "lots"},
		volspec.KeyMinIOPS:       {"", "0", "100", "500", "800", "-1"},
		volspec.KeyMaxBandwidth:  {"", "1048576", "104857600", "1.5"},
		volspec.KeyBurstDuration: {"", "1s", "250ms", "0s", "5"},
	}
	keys := []string{volspec.KeyMaxIOPS, volspec.KeyMinIOPS, volspec.KeyMaxBandwidth, volspec.KeyBurstDuration}
	c := &SetParameters{VolumeID: vid, Parameters: map[string]string{}}
	for n := 1 + g.rng.IntN(3); n > 0; n-- {
		k := keys[g.rng.IntN(len(keys))]
		c.Parameters[k] = values[k][g.rng.IntN(len(values[k]))]
	}
	if g.rng.IntN(8) == 0 {
		c.Parameters[g.pick("replicas", "fsType", "maxiops")] = g.pick("", "3")
		if !knownBugSetParametersErrorOrder && g.rng.IntN(2) == 0 {
			c.Parameters["zone"] = "a" // two refused keys
		}
	}
	if knownBugSetParametersNoneLeft {
		// Never leave a volume without parameters: it would hold an empty
		// map that a snapshot restores as nil (see the constant).
		has := false
		for _, v := range c.Parameters {
			has = has || v != ""
		}
		if !has {
			c.Parameters[volspec.KeyMaxBandwidth] = "1048576"
		}
	}
	return c
}

// setParametersOutcome is what applying c to s must give: the volume's
// parameters after it, or the sentinel it is refused with.
func setParametersOutcome(s *State, c *SetParameters) (map[string]string, error) {
	v, ok := s.Volumes[c.VolumeID]
	if !ok || v.State == VolumeDeleted {
		return nil, ErrNotFound
	}
	next := map[string]string{}
	for k, val := range v.Parameters {
		next[k] = val
	}
	for k, val := range c.Parameters {
		if !volspec.Mutable(k) {
			return nil, ErrInvalidArgument
		}
		if val == "" {
			delete(next, k)
		} else {
			next[k] = val
		}
	}
	after, err := volspec.Decode(next)
	if err != nil {
		return nil, ErrInvalidArgument
	}
	// A guaranteed volume keeps the minIOPS its nodes admitted.
	if before, _ := volspec.Decode(v.Parameters); before.Guaranteed() && after.QoS.MinIOPS != before.QoS.MinIOPS {
		return nil, ErrFailedPrecondition
	}
	if len(next) == 0 {
		return nil, nil // no parameters, as a snapshot restores them
	}
	return next, nil
}

// casTarget returns the volume and expected epoch of a compare-and-set command.
func casTarget(c Command) (string, uint64, bool) {
	switch c := c.(type) {
	case *AttachVolume:
		return c.VolumeID, c.ExpectEpoch, true
	case *DetachVolume:
		return c.VolumeID, c.ExpectEpoch, true
	case *SetReplicaState:
		return c.VolumeID, c.ExpectEpoch, true
	case *ReplaceReplica:
		return c.VolumeID, c.ExpectEpoch, true
	}
	return "", 0, false
}

// propertyChecker holds what the invariants need across steps.
type propertyChecker struct {
	t *testing.T
	// everReplicas[volume][replica] records every replica id a volume has
	// had, so a reused id is caught.
	everReplicas map[string]map[string]bool
	// exempted counts violations of the epoch rule explained by
	// knownBugSetVolumeStateDetach.
	exempted int
}

func (p *propertyChecker) check(step int, c Command, cmdErr error, prev, cur *State) {
	t := p.t
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("step %d, %T %+v (err %v): %s", step, c, c, cmdErr, fmt.Sprintf(format, args...))
	}
	if sp, ok := c.(*SetParameters); ok {
		// SetParameters succeeds exactly when the volume is live, every key
		// is mutable and the result parses; then it changes that volume's
		// parameters and nothing else.
		params, wantErr := setParametersOutcome(prev, sp)
		if wantErr != nil {
			if !errors.Is(cmdErr, wantErr) {
				fail("want an error wrapping %q", wantErr)
			}
		} else {
			if cmdErr != nil {
				fail("want success, parameters %v", params)
			}
			want := prev.Clone()
			want.Requests = cur.Requests // the harness checks the request table
			want.Volumes[sp.VolumeID].Parameters = params
			if !reflect.DeepEqual(cur, want) {
				fail("SetParameters changed more than the volume's parameters, or not as asked:\nbefore %s\n after %s",
					dumpJSON(prev.Volumes[sp.VolumeID]), dumpJSON(cur.Volumes[sp.VolumeID]))
			}
		}
	}
	if cmdErr != nil {
		if w := toWire(cmdErr); w.Code == "internal" {
			fail("error wraps no store sentinel")
		}
		return // the harness checked that the state did not change
	}
	switch c := c.(type) {
	case *SetReplicaGeneration:
		// It records the generation of one replica and changes nothing else.
		want := prev.Clone()
		want.Requests = cur.Requests // the harness checks the request table
		v := want.Volumes[c.VolumeID]
		if v == nil || v.State == VolumeDeleted {
			fail("generation recorded for a volume that is not live")
		}
		i, err := v.replicaIndex(c.ReplicaID)
		if err != nil {
			fail("generation recorded for a replica not in the set: %v", err)
		}
		v.Replicas[i].Generation = c.Generation
		if !reflect.DeepEqual(cur, want) {
			fail("SetReplicaGeneration changed more than one generation:\nbefore %s\n after %s",
				dumpJSON(prev.Volumes[c.VolumeID]), dumpJSON(cur.Volumes[c.VolumeID]))
		}
	case *RebuildProgressUpdate:
		// Progress changes Volume.Rebuild of one volume and nothing else.
		pv := prev.Volumes[c.VolumeID]
		if pv == nil || pv.State == VolumeDeleted {
			fail("progress recorded for a volume that is not live")
		}
		i, err := pv.replicaIndex(c.ReplicaID)
		if err != nil {
			fail("progress recorded for a replica not in the set: %v", err)
		}
		if !c.Done && pv.Replicas[i].State != ReplicaRebuilding {
			fail("progress recorded for a %s replica", pv.Replicas[i].State)
		}
		want := prev.Clone()
		want.Requests = cur.Requests // the harness checks the request table
		want.Volumes[c.VolumeID].Rebuild = &RebuildProgress{ReplicaID: c.ReplicaID, BytesTotal: c.BytesTotal,
			BytesCompared: c.BytesCompared, BytesCopied: c.BytesCopied, Done: c.Done}
		if !reflect.DeepEqual(cur, want) {
			fail("progress update changed more than Volume.Rebuild:\n%s", dumpJSON(cur.Volumes[c.VolumeID]))
		}
	case *AttachVolume:
		// Whether it attached or was an idempotent retry, the volume is now
		// attached exactly as asked.
		want := &Attachment{Node: c.NodeID, ReadOnly: c.ReadOnly, NBDSocket: c.NBDSocket}
		if v := cur.Volumes[c.VolumeID]; v == nil {
			fail("attach succeeded but the volume is gone")
		} else if !reflect.DeepEqual(v.Attachment, want) {
			fail("attach succeeded but the attachment is %+v, want %+v", v.Attachment, want)
		}
	}
	if id, expect, ok := casTarget(c); ok {
		if v, ok := prev.Volumes[id]; ok && v.Epoch != expect && !reflect.DeepEqual(v, cur.Volumes[id]) {
			fail("a compare-and-set with epoch %d changed volume at epoch %d", expect, v.Epoch)
		}
	}
	for id, pv := range prev.Volumes {
		if _, ok := cur.Volumes[id]; !ok {
			if pc, ok := c.(*PurgeVolume); !ok || pc.VolumeID != id || pv.State != VolumeDeleted {
				fail("volume %s (%s) vanished", id, pv.State)
			}
			delete(p.everReplicas, id) // a purged id starts afresh
		}
	}
	for id, v := range cur.Volumes {
		pv, existed := prev.Volumes[id]
		if !existed {
			cc, ok := c.(*CreateVolume)
			if ac, admitted := c.(*AdmitVolume); admitted {
				cc, ok = &ac.CreateVolume, true
				// Admission: each replica's node could still promise
				// the volume's minIOPS.
				// Counted here, apart from the code under test: the IOPS
				// reserved and the bytes placed on disks of the new
				// volume's type, per node, before the command.
				spec, _ := volspec.Decode(v.Parameters)
				minIOPS := uint64(0)
				if spec.QoS.Class == volspec.QoSGuaranteed {
					minIOPS = spec.QoS.MinIOPS
				}
				reserved, placed := map[string]uint64{}, map[string]uint64{}
				for _, pv := range prev.Volumes {
					ps, err := volspec.Decode(pv.Parameters)
					if pv.State == VolumeDeleted || err != nil {
						continue
					}
					for _, r := range pv.Replicas {
						if ps.QoS.Class == volspec.QoSGuaranteed {
							reserved[r.Node] += ps.QoS.MinIOPS
						}
						if ps.DiskType == spec.DiskType {
							placed[r.Node] += pv.SizeBytes
						}
					}
				}
				ratio := prev.OverProvisioningRatio
				if ratio <= 0 {
					ratio = 1 // placement's default
				}
				for _, r := range v.Replicas {
					n := prev.Nodes[r.Node]
					if minIOPS > 0 && (n == nil || n.ReservableIOPS < reserved[r.Node]+minIOPS) {
						fail("guaranteed volume %s (%d IOPS) placed on %s, which could not promise it (reserved %d)", id, minIOPS, r.Node, reserved[r.Node])
					}
					// And of a disk type, on a disk of that type with room.
					if dt := spec.DiskType; dt != "" && (n == nil || float64(placed[r.Node]+v.SizeBytes) > float64(n.Disks[dt].CapacityBytes)*ratio+1) {
						fail("volume %s of type %s placed on %s, which has no such disk with room (%d placed there)", id, dt, r.Node, placed[r.Node])
					}
				}
			}
			if !ok || cc.ID != id {
				fail("volume %s appeared", id)
			}
			if v.Epoch != 1 {
				fail("new volume %s at epoch %d", id, v.Epoch)
			}
		} else {
			if v.Epoch < pv.Epoch {
				fail("volume %s epoch went back %d → %d", id, pv.Epoch, v.Epoch)
			}
			if v.Epoch > pv.Epoch+1 {
				fail("volume %s epoch jumped %d → %d", id, pv.Epoch, v.Epoch)
			}
			p.checkGenerations(fail, c, pv, v)
			attachmentChanged := !reflect.DeepEqual(pv.Attachment, v.Attachment)
			replicasChanged := !reflect.DeepEqual(withoutGenerations(pv.Replicas), withoutGenerations(v.Replicas))
			if (attachmentChanged || replicasChanged) && v.Epoch == pv.Epoch {
				sv, isSetState := c.(*SetVolumeState)
				if knownBugSetVolumeStateDetach && isSetState && sv.State == VolumeAvailable && !replicasChanged && v.Attachment == nil {
					p.exempted++
				} else {
					fail("volume %s: attachment %+v → %+v, replicas %+v → %+v at unchanged epoch %d",
						id, pv.Attachment, v.Attachment, pv.Replicas, v.Replicas, v.Epoch)
				}
			}
			if v.State != pv.State {
				if err := checkTransition(pv.State, v.State); err != nil {
					fail("volume %s: %v", id, err)
				}
			}
			if rc, ok := c.(*RebuildProgressUpdate); !reflect.DeepEqual(pv.Rebuild, v.Rebuild) && (!ok || rc.VolumeID != id) {
				fail("volume %s: rebuild progress %+v → %+v by another command", id, pv.Rebuild, v.Rebuild)
			}
			if v.NextReplicaSeq < pv.NextReplicaSeq {
				fail("volume %s NextReplicaSeq went back", id)
			}
			if v.ID != pv.ID || v.Name != pv.Name || v.SizeBytes != pv.SizeBytes || v.ReplicaCount != pv.ReplicaCount ||
				v.WriteQuorum != pv.WriteQuorum || v.CreatedAt != pv.CreatedAt || v.ContentSource != pv.ContentSource {
				fail("volume %s: an immutable field changed:\n%+v\n%+v", id, pv, v)
			}
			if sp, ok := c.(*SetParameters); !reflect.DeepEqual(pv.Parameters, v.Parameters) && (!ok || sp.VolumeID != id) {
				fail("volume %s: parameters %v → %v by another command", id, pv.Parameters, v.Parameters)
			}
		}
		p.checkVolume(fail, cur, v)
	}
}

// withoutGenerations copies rs with their generations cleared: recording a
// generation changes no replica set.
func withoutGenerations(rs []Replica) []Replica {
	out := append([]Replica(nil), rs...)
	for i := range out {
		out[i].Generation = ""
	}
	return out
}

// checkGenerations: only SetReplicaGeneration changes a replica's
// generation, and a replica that stays healthy keeps a generation once it
// has one (a healthy replica stands for one copy of the data).
func (p *propertyChecker) checkGenerations(fail func(string, ...any), c Command, pv, v *Volume) {
	sg, isSet := c.(*SetReplicaGeneration)
	for _, r := range v.Replicas {
		i, err := pv.replicaIndex(r.ID)
		if err != nil {
			if r.Generation != "" {
				fail("volume %s: new replica %s starts with generation %q", v.ID, r.ID, r.Generation)
			}
			continue
		}
		was := pv.Replicas[i]
		if was.Generation == r.Generation {
			continue
		}
		if !isSet || sg.VolumeID != v.ID || sg.ReplicaID != r.ID {
			fail("volume %s: replica %s generation %q → %q by another command", v.ID, r.ID, was.Generation, r.Generation)
		}
		if was.State == ReplicaHealthy && r.State == ReplicaHealthy && was.Generation != "" {
			fail("volume %s: healthy replica %s generation %q → %q", v.ID, r.ID, was.Generation, r.Generation)
		}
	}
}

func (p *propertyChecker) checkVolume(fail func(string, ...any), s *State, v *Volume) {
	if len(v.Replicas) != v.ReplicaCount {
		fail("volume %s has %d replicas, wants %d", v.ID, len(v.Replicas), v.ReplicaCount)
	}
	if v.WriteQuorum < 1 || v.WriteQuorum > v.ReplicaCount {
		fail("volume %s write quorum %d of %d", v.ID, v.WriteQuorum, v.ReplicaCount)
	}
	if v.State != VolumeDeleted && v.HealthyReplicas() == 0 {
		fail("live volume %s has no healthy replica: %+v", v.ID, v.Replicas)
	}
	ever := p.everReplicas[v.ID]
	if ever == nil {
		ever = map[string]bool{}
		p.everReplicas[v.ID] = ever
	}
	nodes, ids := map[string]bool{}, map[string]bool{}
	for _, r := range v.Replicas {
		if nodes[r.Node] {
			fail("volume %s has two replicas on node %s: %+v", v.ID, r.Node, v.Replicas)
		}
		nodes[r.Node] = true
		if ids[r.ID] {
			fail("volume %s has replica id %s twice", v.ID, r.ID)
		}
		ids[r.ID] = true
		if _, ok := s.Nodes[r.Node]; !ok {
			fail("replica %s on unknown node %s", r.ID, r.Node)
		}
		var seq int
		if _, err := fmt.Sscanf(strings.TrimPrefix(r.ID, v.ID+"-r"), "%d", &seq); err != nil || seq < 1 || seq > v.NextReplicaSeq {
			fail("replica id %s does not fit NextReplicaSeq %d", r.ID, v.NextReplicaSeq)
		}
		switch r.State {
		case ReplicaHealthy, ReplicaRebuilding, ReplicaStale, ReplicaFailed:
		default:
			fail("replica %s in unknown state %q", r.ID, r.State)
		}
	}
	// A replica id that left the set never comes back: ever[id] is true
	// while the replica is in the set, false once it has left.
	for id := range ever {
		if !ids[id] {
			ever[id] = false // gone for good
		}
	}
	for id := range ids {
		if was, seen := ever[id]; seen && !was {
			fail("volume %s: replica id %s came back", v.ID, id)
		}
		ever[id] = true
	}
	switch v.State {
	case VolumeAttached, VolumeReleasing:
		if v.Attachment == nil {
			fail("volume %s is %s without an attachment", v.ID, v.State)
		}
	case VolumePending, VolumeProvisioning, VolumeAvailable:
		if v.Attachment != nil {
			fail("volume %s is %s with attachment %+v", v.ID, v.State, v.Attachment)
		}
	case VolumeFailed, VolumeDeleted:
	default:
		fail("volume %s in unknown state %q", v.ID, v.State)
	}
	if r := v.Rebuild; r != nil && (r.BytesCompared > r.BytesTotal || r.BytesCopied > r.BytesTotal) {
		fail("volume %s: rebuild progress beyond its total: %+v", v.ID, r)
	}
	if v.Attachment != nil {
		if _, ok := s.Nodes[v.Attachment.Node]; !ok {
			fail("volume %s attached to unknown node %s", v.ID, v.Attachment.Node)
		}
	}
}

// TestFSMRandomized applies a few thousand random commands, valid and
// invalid, and checks the store's invariants after every step. A second FSM
// fed the same log must stay deeply equal (determinism), and a third FSM,
// restored from a snapshot of the first every few hundred steps and then fed
// the same log, too.
func TestFSMRandomized(t *testing.T) {
	const steps = 4000
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			g := &cmdGen{rng: rand.New(rand.NewPCG(seed, 0xCA1A))}
			a, b := newHarness(t), newHarness(t)
			var restored *harness
			p := &propertyChecker{t: t, everReplicas: map[string]map[string]bool{}}
			outcomes := map[string]int{}
			for step := 1; step <= steps; step++ {
				prev := a.current()
				typ, data, c := g.next(prev)
				resA, errA := a.applyLog(typ, data)
				resB, errB := b.applyLog(typ, data)
				if !reflect.DeepEqual(resA, resB) || fmt.Sprint(errA) != fmt.Sprint(errB) {
					t.Fatalf("step %d: same entry, different results: (%+v, %v) vs (%+v, %v)", step, resA, errA, resB, errB)
				}
				if restored != nil {
					resC, errC := restored.applyLog(typ, data)
					if !reflect.DeepEqual(resA, resC) || fmt.Sprint(errA) != fmt.Sprint(errC) {
						t.Fatalf("step %d: restored FSM answered (%+v, %v), original (%+v, %v)", step, resC, errC, resA, errA)
					}
				}
				cur := a.current()
				full := step%250 == 0 || step == steps
				if !sameStep(cur, b.current(), full) {
					t.Fatalf("step %d: two FSMs fed the same log differ", step)
				}
				if restored != nil && !sameStep(cur, restored.current(), full) {
					t.Fatalf("step %d: FSM restored from a snapshot differs from the original", step)
				}
				if c == nil {
					if typ == raft.LogCommand && errA == nil {
						t.Fatalf("step %d: garbage %q applied without error", step, data)
					}
					continue
				}
				if req, ok := c.(*Request); ok {
					outcome := "Request ok"
					if errA != nil {
						outcome = "Request error"
					}
					outcomes[outcome]++
					if rememberedRequest(prev, req.ID) != nil {
						// A retried request changes nothing (the harness
						// also checked that it got the first answer).
						outcomes["Request repeated"]++
						if !statesEqual(prev, cur) {
							t.Fatalf("step %d: repeated request %q changed the state:\n%s", step, req.ID, dumpJSON(cur))
						}
						continue
					}
					if requestRefusal(req) != nil {
						outcomes["Request refused"]++
						continue // the harness checked the error and that nothing changed
					}
					// A new request: its inner command was applied, and
					// must keep every invariant.
					inner, err := Decode(req.Command)
					if err != nil {
						t.Fatalf("step %d: inner command of %q: %v", step, req.ID, err)
					}
					c = inner
				}
				name := reflect.TypeOf(c).Elem().Name()
				if errA == nil {
					outcomes[name+" ok"]++
					if rp, ok := c.(*RebuildProgressUpdate); ok && !rp.Done {
						outcomes[name+" ok while rebuilding"]++
					}
				} else {
					outcomes[name+" error"]++
				}
				p.check(step, c, errA, prev, cur)
				if step%500 == 0 {
					restored = newHarness(t)
					if err := restored.f.Restore(&trackingReader{Reader: bytes.NewReader(persist(t, a.f))}); err != nil {
						t.Fatalf("step %d: restore: %v", step, err)
					}
					restored.index = a.index
				}
			}
			// The generator must have reached both outcomes of every command.
			for _, ct := range allCommandTypes {
				name := reflect.TypeOf(newCommand(ct)).Elem().Name()
				if outcomes[name+" ok"] == 0 || outcomes[name+" error"] == 0 {
					t.Errorf("%s: %d successes, %d errors; the generator should reach both", name, outcomes[name+" ok"], outcomes[name+" error"])
				}
			}
			// Retries and refused requests happen too.
			for _, o := range []string{"Request repeated", "Request refused"} {
				if outcomes[o] == 0 {
					t.Errorf("the generator never produced a %q", o)
				}
			}
			// Progress not marked done succeeds only on a rebuilding replica.
			if outcomes["RebuildProgressUpdate ok while rebuilding"] == 0 {
				t.Errorf("RebuildProgressUpdate never succeeded on a rebuilding replica")
			}
			live := len(a.state().SortedVolumes())
			t.Logf("outcomes %v; %d live volumes at the end; %d steps exempted by knownBugSetVolumeStateDetach", outcomes, live, p.exempted)
		})
	}
}

// checkIndex checks that the state's placement index, kept up to date
// entry by entry (noteChanged), matches one built afresh from the volumes.
// It builds the index first if the state has none, so that every later
// entry is checked.
func checkIndex(t testing.TB, f *FSM) {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.state.index == nil {
		f.state.placementIndex()
		return
	}
	kept := f.state.index
	fresh := (&State{Volumes: f.state.Volumes}).placementIndex()
	nonZero := func(m map[string]uint64) map[string]uint64 {
		out := map[string]uint64{}
		for k, v := range m {
			if v != 0 {
				out[k] = v
			}
		}
		return out
	}
	types := map[string]bool{}
	for typ := range kept.used {
		types[typ] = true
	}
	for typ := range fresh.used {
		types[typ] = true
	}
	for typ := range types {
		if a, b := nonZero(kept.used[typ]), nonZero(fresh.used[typ]); !reflect.DeepEqual(a, b) {
			t.Fatalf("placement index: used bytes on disks of type %q are %v, a fresh index says %v", typ, a, b)
		}
	}
	if a, b := nonZero(kept.reserved), nonZero(fresh.reserved); !reflect.DeepEqual(a, b) {
		t.Fatalf("placement index: reserved IOPS %v, a fresh index says %v", a, b)
	}
	if !reflect.DeepEqual(kept.byName, fresh.byName) {
		t.Fatalf("placement index: names %v, a fresh index says %v", kept.byName, fresh.byName)
	}
}
