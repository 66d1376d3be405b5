package meta

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"sync"

	"github.com/hashicorp/raft"
)

// FSM is the store's state machine: hashicorp/raft feeds it committed log
// entries, it applies them to State. It is safe for concurrent readers.
type FSM struct {
	mu      sync.RWMutex
	state   *State
	applied uint64 // raft index of the last applied entry

	// changed is closed and replaced after every apply, so watchers can wait
	// for the next change without polling.
	changed chan struct{}

	// changes is what recent entries changed, for watchers (watch.go);
	// from changesFloor on it is complete.
	changes      []changeRecord
	changesFloor uint64

	// halted is set at the first entry written by a newer build (see the
	// command-evolution rule in command.go); from then on nothing is
	// applied and no snapshot is taken.
	halted error
}

// applyResult is what FSM.Apply returns to raft (and raft hands to the
// caller of Raft.Apply through the future's Response).
type applyResult struct {
	Result Result
	Err    error
}

// NewFSM returns an FSM with empty state.
func NewFSM() *FSM {
	return &FSM{state: NewState(), changed: make(chan struct{})}
}

// Apply applies one committed log entry. It never panics on bad bytes: a
// command that does not decode or is illegal gives an error result and
// leaves the state unchanged. An entry of a newer build (ErrNewerCommand,
// also inside a Request) halts the FSM instead: skipping it while newer
// members apply it would make the states diverge (command.go).
func (f *FSM) Apply(l *raft.Log) interface{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applied = l.Index
	defer f.notify()
	if f.halted != nil {
		return &applyResult{Err: f.halted}
	}
	if l.Type != raft.LogCommand {
		return &applyResult{}
	}
	c, err := Decode(l.Data)
	if err == nil {
		var res Result
		// apply changes nothing when it fails, so a halt inside a Request
		// leaves the state as it was before this entry.
		if res, err = apply(f.state, c); !errors.Is(err, ErrNewerCommand) {
			var vols, nodes []string
			if err == nil {
				vols, nodes = touched(c, res)
			}
			f.record(l.Index, vols, nodes)
			return &applyResult{Result: res, Err: err}
		}
	}
	if errors.Is(err, ErrNewerCommand) {
		// This entry answers with its own error; the ones after it, with
		// the halt.
		f.halted = fmt.Errorf("store halted at raft index %d, an entry this build cannot read; upgrade this member: %w", l.Index, err)
	}
	return &applyResult{Err: err}
}

// Halted returns the reason the FSM stopped applying entries, or nil.
func (f *FSM) Halted() error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.halted
}

// notify wakes everyone waiting in Changed. Called with f.mu held.
func (f *FSM) notify() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// Changed returns a channel closed at the next applied entry.
func (f *FSM) Changed() <-chan struct{} {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.changed
}

// View runs fn with the current state under the read lock. fn must not keep
// references into the state after it returns; Clone what you need.
func (f *FSM) View(fn func(s *State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

// AppliedIndex is the raft index of the last entry applied to this FSM.
func (f *FSM) AppliedIndex() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.applied
}

// Snapshot captures the state for raft's snapshot store. The copy is taken
// under the lock; Persist then writes it without holding it.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.halted != nil {
		// A snapshot would mark the entries skipped since as applied.
		return nil, f.halted
	}
	return &fsmSnapshot{state: f.state.Clone()}, nil
}

// Restore replaces the whole state with a snapshot. A corrupt snapshot is an
// error and leaves the state as it was. A halted FSM stays halted: a
// snapshot sent by a newer leader may hold state this build cannot read.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	s, err := ReadSnapshot(rc)
	if err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = s
	// Watchers get the whole state again: the changes that led here are
	// not known.
	f.changes, f.changesFloor = nil, math.MaxUint64
	f.notify()
	return nil
}

// snapshotMagic starts every snapshot; the digit is the format version.
var snapshotMagic = [8]byte{'C', 'A', 'I', 'R', 'N', 'S', 'N', '1'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// WriteSnapshot writes the whole state as one stream:
// magic, body length (uint64 BE), CRC32C of the body (uint32 BE), JSON body.
func WriteSnapshot(w io.Writer, s *State) error {
	body, err := json.Marshal(s)
	if err != nil {
		return fmt.Errorf("encode snapshot: %w", err)
	}
	var hdr [20]byte
	copy(hdr[:8], snapshotMagic[:])
	binary.BigEndian.PutUint64(hdr[8:16], uint64(len(body)))
	binary.BigEndian.PutUint32(hdr[16:20], crc32.Checksum(body, castagnoli))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err = w.Write(body)
	return err
}

// maxSnapshotBytes guards against a corrupt length field asking for a huge
// allocation.
const maxSnapshotBytes = 1 << 30

// ReadSnapshot reads what WriteSnapshot wrote and checks it.
func ReadSnapshot(r io.Reader) (*State, error) {
	var hdr [20]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("snapshot header: %w", err)
	}
	if !bytes.Equal(hdr[:8], snapshotMagic[:]) {
		return nil, fmt.Errorf("snapshot does not start with %q: not a Cairn store snapshot, or corrupt", snapshotMagic[:])
	}
	n := binary.BigEndian.Uint64(hdr[8:16])
	if n > maxSnapshotBytes {
		return nil, fmt.Errorf("snapshot claims %d bytes, more than the %d allowed: corrupt", n, maxSnapshotBytes)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, fmt.Errorf("snapshot body (%d bytes): %w", n, err)
	}
	if got, want := crc32.Checksum(body, castagnoli), binary.BigEndian.Uint32(hdr[16:20]); got != want {
		return nil, fmt.Errorf("snapshot checksum %08x, header says %08x: corrupt", got, want)
	}
	s := &State{}
	if err := json.Unmarshal(body, s); err != nil {
		return nil, fmt.Errorf("decode snapshot: %w", err)
	}
	if s.Nodes == nil || s.Volumes == nil || s.Snapshots == nil {
		return nil, fmt.Errorf("snapshot lacks nodes, volumes or snapshots: corrupt")
	}
	for id, n := range s.Nodes {
		if n == nil {
			return nil, fmt.Errorf("snapshot has an empty node %q: corrupt", id)
		}
	}
	for id, v := range s.Volumes {
		if v == nil {
			return nil, fmt.Errorf("snapshot has an empty volume %q: corrupt", id)
		}
	}
	for id, sn := range s.Snapshots {
		if sn == nil {
			return nil, fmt.Errorf("snapshot has an empty snapshot record %q: corrupt", id)
		}
	}
	return s, nil
}

type fsmSnapshot struct{ state *State }

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := WriteSnapshot(sink, s.state); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}
