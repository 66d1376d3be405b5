package meta

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// newerEntries are log entries as a build newer than this one could write
// them: a known command at a version above commandVersion (with the field
// that version added), a command type this build does not know, a known
// command with a field it lacks, and such a command wrapped in a Request.
func newerEntries(t *testing.T) map[string][]byte {
	t.Helper()
	inner := cmdBytes(CmdDeleteVolume, commandVersion+1, `{"volume_id":"v1","deleted_at":5}`)
	req, err := json.Marshal(&Request{ID: "req-1", Command: inner})
	if err != nil {
		t.Fatal(err)
	}
	return map[string][]byte{
		"newer version with a new field":   cmdBytes(CmdDeleteVolume, commandVersion+1, `{"volume_id":"v1","deleted_at":5}`),
		"newer version, same fields":       cmdBytes(CmdDeleteVolume, commandVersion+1, `{"volume_id":"v1"}`),
		"new command type":                 cmdBytes(lastCommandType+1, commandVersion, `{"volume_id":"v1"}`),
		"new field without a new version":  cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":"v1","deleted_at":5}`),
		"request wrapping a newer command": cmdBytes(CmdRequest, commandVersion, string(req)),
	}
}

// TestDecodeNewerEntry: Decode tells an entry of a newer build from garbage
// (command.go, rule 2). Both are errors wrapping ErrBadCommand; only the
// first wraps ErrNewerCommand, which halts the FSM.
func TestDecodeNewerEntry(t *testing.T) {
	for name, b := range newerEntries(t) {
		if name == "request wrapping a newer command" {
			continue // the Request itself decodes; its command does not (see TestFSMHaltsOnNewerEntry)
		}
		t.Run(name, func(t *testing.T) {
			c, err := Decode(b)
			if !errors.Is(err, ErrNewerCommand) || !errors.Is(err, ErrBadCommand) {
				t.Fatalf("Decode(%q) = %#v, %v; want an error wrapping ErrNewerCommand and ErrBadCommand", b, c, err)
			}
		})
	}
	for name, b := range map[string][]byte{
		"type 0":                     cmdBytes(0, commandVersion, `{}`),
		"version 0":                  cmdBytes(CmdDeleteVolume, 0, `{"volume_id":"v1"}`),
		"bad JSON":                   cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":`),
		"wrong field type":           cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":5}`),
		"trailing bytes":             cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":"v1"}}`),
		"unknown field and bad JSON": cmdBytes(CmdDeleteVolume, commandVersion, `{"volume_id":"v1","x":`),
	} {
		t.Run("garbage "+name, func(t *testing.T) {
			_, err := Decode(b)
			if !errors.Is(err, ErrBadCommand) || errors.Is(err, ErrNewerCommand) {
				t.Fatalf("Decode(%q) error %v; want ErrBadCommand and not ErrNewerCommand", b, err)
			}
		})
	}
}

// TestWriteVersionReadable: a build never writes a version it cannot read
// (rule 3 of command.go lets it write an older one).
func TestWriteVersionReadable(t *testing.T) {
	if writeVersion < 1 || writeVersion > commandVersion {
		t.Fatalf("writeVersion %d, commandVersion %d: a build writes a version it reads", writeVersion, commandVersion)
	}
	b, err := Encode(&DeleteVolume{VolumeID: "v1"})
	if err != nil {
		t.Fatal(err)
	}
	if b[1] != writeVersion {
		t.Fatalf("Encode wrote version %d, want writeVersion %d", b[1], writeVersion)
	}
	if _, err := Decode(b); err != nil {
		t.Fatalf("Decode of this build's own entry: %v", err)
	}
}

// TestFSMHaltsOnNewerEntry: a member that meets an entry of a newer build
// applies nothing from then on, rather than skip that one entry and apply
// the next ones on a state that newer members no longer have. It takes no
// snapshot either: the snapshot would count the skipped entries as applied.
func TestFSMHaltsOnNewerEntry(t *testing.T) {
	for name, b := range newerEntries(t) {
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			h.createVolume("v1", 1, 3)
			before := h.state()
			h.index++
			res := h.f.Apply(&raft.Log{Index: h.index, Type: raft.LogCommand, Data: b}).(*applyResult)
			if !errors.Is(res.Err, ErrNewerCommand) {
				t.Fatalf("Apply(%q) = %v, want an error wrapping ErrNewerCommand", b, res.Err)
			}
			if h.f.Halted() == nil {
				t.Fatal("FSM not halted after an entry of a newer build")
			}
			// The next entry, one this build reads well, is not applied.
			next, _ := Encode(&SetVolumeCondition{VolumeID: before.SortedVolumes()[0].ID, Abnormal: true, Message: "x"})
			h.index++
			res = h.f.Apply(&raft.Log{Index: h.index, Type: raft.LogCommand, Data: next}).(*applyResult)
			if !errors.Is(res.Err, ErrNewerCommand) {
				t.Fatalf("entry after the halt answered %v, want the halt", res.Err)
			}
			if got := h.state(); !statesEqual(before, got) {
				t.Fatalf("halted FSM changed its state:\nbefore %s\n after %s", dumpJSON(before), dumpJSON(got))
			}
			if got := h.f.AppliedIndex(); got != h.index {
				t.Fatalf("AppliedIndex = %d, want %d (raft counts the entry as applied)", got, h.index)
			}
			if _, err := h.f.Snapshot(); !errors.Is(err, ErrNewerCommand) {
				t.Fatalf("Snapshot of a halted FSM = %v, want the halt", err)
			}
		})
	}
}

// TestAgentStopsOnNewerEntry: a member whose FSM halted stops itself
// (Agent.Fatal), so that it serves no state that newer members have left.
func TestAgentStopsOnNewerEntry(t *testing.T) {
	a, _ := startTestAgent(t, nil)
	f := a.store.raft.Apply(cmdBytes(lastCommandType+1, commandVersion, `{"volume_id":"v1"}`), 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-a.Fatal():
		if !errors.Is(err, ErrNewerCommand) {
			t.Fatalf("member stopped with %v, want an error wrapping ErrNewerCommand", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("member did not stop after an entry of a newer build")
	}
}

// TestGatedTypeWaitsForEveryMember: the leader writes a gated command type
// (ExpandVolume) only once every member's heartbeat said its build reads it
// (command.go, rule 3; gate.go).
func TestGatedTypeWaitsForEveryMember(t *testing.T) {
	a, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v := testCreate(t, ctx, c, "grow")
	// A lone member reads what it writes.
	if _, err := c.Apply(ctx, &ExpandVolume{VolumeID: v.ID, SizeBytes: 2 * gib}); err != nil {
		t.Fatalf("ExpandVolume on a one-member cluster: %v", err)
	}
	// A second member whose build is older, as its heartbeat says: no
	// entry of the new type may reach the log.
	f := a.store.raft.AddNonvoter("old-member", "127.0.0.1:1", 0, 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	a.noteCommandTypes("old-member", uint8(CmdScrubProgress))
	_, err := c.Apply(ctx, &ExpandVolume{VolumeID: v.ID, SizeBytes: 3 * gib})
	if !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("ExpandVolume with an older member = %v, want ErrFailedPrecondition", err)
	}
	if got, _ := c.Volume(ctx, v.ID); got.SizeBytes != 2*gib {
		t.Fatalf("refused expansion changed the size to %d", got.SizeBytes)
	}
	// Other commands are not held up.
	if _, err := c.Apply(ctx, &SetVolumeCondition{VolumeID: v.ID}); err != nil {
		t.Fatalf("an older command while a member is older: %v", err)
	}
	a.noteCommandTypes("old-member", uint8(lastCommandType))
	if _, err := c.Apply(ctx, &ExpandVolume{VolumeID: v.ID, SizeBytes: 3 * gib}); err != nil {
		t.Fatalf("ExpandVolume once every member reads it: %v", err)
	}
}

// TestGatedTypeAppliedPassesSilentMembers: once an entry of a gated type
// is in the log, a member that has not reported (down when leadership
// moved) holds up only newer types: it must read the applied type anyway.
func TestGatedTypeAppliedPassesSilentMembers(t *testing.T) {
	a, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v := testCreate(t, ctx, c, "grow")
	if _, err := c.Apply(ctx, &ExpandVolume{VolumeID: v.ID, SizeBytes: 2 * gib}); err != nil {
		t.Fatalf("ExpandVolume on a one-member cluster: %v", err)
	}
	var applied CommandType
	a.store.FSM().View(func(s *State) { applied = s.MaxCommandType })
	if applied != CmdExpandVolume {
		t.Fatalf("MaxCommandType after one ExpandVolume = %d, want %d", applied, CmdExpandVolume)
	}
	if got := a.store.FSM().state.Clone().MaxCommandType; got != applied {
		t.Fatalf("Clone kept MaxCommandType %d, want %d", got, applied)
	}
	// A member that never reports: a second expansion goes through.
	f := a.store.raft.AddNonvoter("silent-member", "127.0.0.1:1", 0, 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, &ExpandVolume{VolumeID: v.ID, SizeBytes: 3 * gib}); err != nil {
		t.Fatalf("ExpandVolume (applied before) with a silent member: %v", err)
	}
	// A type never applied still waits for it, then is refused by name.
	_, err := c.Apply(ctx, &LeaseNonces{})
	if !errors.Is(err, ErrFailedPrecondition) || !strings.Contains(err.Error(), "silent-member") {
		t.Fatalf("LeaseNonces (never applied) with a silent member = %v, want ErrFailedPrecondition naming it", err)
	}
	// Nor does a member whose node the store marked down: it runs no
	// build now.
	if _, err := c.Apply(ctx, &RegisterNode{Node: Node{ID: "silent-member", RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:2"}, Time: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Apply(ctx, &SetNodeState{NodeID: "silent-member", State: NodeDown, Time: 2}); err != nil {
		t.Fatal(err)
	}
	// (It reaches apply, which refuses it for its missing volume.)
	if _, err := c.Apply(ctx, &LeaseNonces{}); !errors.Is(err, ErrNotFound) || strings.Contains(err.Error(), "silent-member") {
		t.Fatalf("LeaseNonces with the silent member's node down: %v, want it through the gate (then not found)", err)
	}
	// A member that says its build is older still holds up the applied type.
	a.noteCommandTypes("silent-member", uint8(CmdScrubProgress))
	if _, err := c.Apply(ctx, &ExpandVolume{VolumeID: v.ID, SizeBytes: 4 * gib}); !errors.Is(err, ErrFailedPrecondition) {
		t.Fatalf("ExpandVolume with a member of an older build = %v, want ErrFailedPrecondition", err)
	}
}

// TestRetireVolumeWithAnOlderMember: Client.RetireVolume sends RetireVolume
// (no read of the whole state), and while a member's build cannot read it
// still deletes a volume without snapshots, by DeleteVolume.
func TestRetireVolumeWithAnOlderMember(t *testing.T) {
	a, c := startTestAgent(t, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stateOf := func(id string) VolumeState {
		var st VolumeState
		a.store.FSM().View(func(s *State) { st = s.Volumes[id].State })
		return st
	}
	v1 := testCreate(t, ctx, c, "retire-1")
	v2 := testCreate(t, ctx, c, "retire-2")
	if _, err := c.RetireVolume(ctx, v1.ID); err != nil {
		t.Fatalf("RetireVolume: %v", err)
	}
	if st := stateOf(v1.ID); st != VolumeDeleted {
		t.Fatalf("RetireVolume of a volume without snapshots left it %v", st)
	}
	// The fallback would have written a DeleteVolume (type 6).
	var maxType CommandType
	a.store.FSM().View(func(s *State) { maxType = s.MaxCommandType })
	if maxType != CmdRetireVolume {
		t.Fatalf("RetireVolume with every member reading it: the newest type applied is %d, want RetireVolume (%d)", maxType, CmdRetireVolume)
	}

	f := a.store.raft.AddNonvoter("old-member", "127.0.0.1:1", 0, 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	a.noteCommandTypes("old-member", uint8(CmdRestoreVolume))
	if _, err := c.RetireVolume(ctx, v2.ID); err != nil {
		t.Fatalf("RetireVolume while a member reads only up to RestoreVolume: %v", err)
	}
	if st := stateOf(v2.ID); st != VolumeDeleted {
		t.Fatalf("RetireVolume with an older member left the volume %v", st)
	}
}
