package meta

import (
	"reflect"
	"strings"
	"testing"
)

// Two generations as the replica package draws them.
const (
	genA = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a"
	genB = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"
)

// TestApplySetReplicaGeneration: the generation is a compare-and-set of its
// own, set once on a healthy replica and freely on a rebuilding one; it
// moves no epoch and touches nothing but that one field. Every failure
// leaves the state as it was (the harness checks that too).
func TestApplySetReplicaGeneration(t *testing.T) {
	tests := []struct {
		name    string
		state   ReplicaState // of replica rid, the first of v1
		stored  string       // its generation before the command
		cmd     func(rid string) *SetReplicaGeneration
		wantErr error
	}{
		{name: "healthy: first record", state: ReplicaHealthy, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genA}
		}},
		{name: "healthy: same again (a retry)", state: ReplicaHealthy, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genA}
		}},
		{name: "healthy: same again, whatever it expected", state: ReplicaHealthy, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genA, Expect: genB}
		}},
		{name: "healthy: another copy", state: ReplicaHealthy, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genB, Expect: genA}
		}, wantErr: ErrFailedPrecondition},
		{name: "healthy: first record, but one was made meanwhile", state: ReplicaHealthy, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genB}
		}, wantErr: ErrGenerationMismatch},
		{name: "rebuilding: first record", state: ReplicaRebuilding, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genB}
		}},
		{name: "rebuilding: a new blank copy", state: ReplicaRebuilding, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genB, Expect: genA}
		}},
		{name: "rebuilding: expected another", state: ReplicaRebuilding, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genB, Expect: "c0c0"}
		}, wantErr: ErrGenerationMismatch},
		{name: "failed", state: ReplicaFailed, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genA}
		}, wantErr: ErrFailedPrecondition},
		{name: "failed: same again", state: ReplicaFailed, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genA, Expect: genA}
		}},
		{name: "stale", state: ReplicaStale, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genB, Expect: genA}
		}, wantErr: ErrFailedPrecondition},
		{name: "empty generation", state: ReplicaRebuilding, stored: genA, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Expect: genA}
		}, wantErr: ErrInvalidArgument},
		{name: "generation too long", state: ReplicaHealthy, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: strings.Repeat("a", MaxGenerationLen+1)}
		}, wantErr: ErrInvalidArgument},
		{name: "unknown volume", state: ReplicaHealthy, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "nope", ReplicaID: rid, Generation: genA}
		}, wantErr: ErrNotFound},
		{name: "unknown replica", state: ReplicaHealthy, cmd: func(rid string) *SetReplicaGeneration {
			return &SetReplicaGeneration{VolumeID: "v1", ReplicaID: "v1-r77", Generation: genA}
		}, wantErr: ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			h.cluster(3, 10)
			rid := replicaInState(h, ReplicaHealthy)
			if tt.stored != "" {
				h.must(&SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: tt.stored})
			}
			switch tt.state {
			case ReplicaHealthy:
			case ReplicaRebuilding:
				h.setReplica("v1", rid, ReplicaFailed)
				h.setReplica("v1", rid, ReplicaRebuilding)
			default:
				h.setReplica("v1", rid, tt.state)
			}
			before := h.volume("v1")
			cmd := tt.cmd(rid)
			if tt.wantErr != nil {
				h.fails(cmd, tt.wantErr)
				return
			}
			res := h.must(cmd)
			after := h.volume("v1")
			if !reflect.DeepEqual(res.Volume, after) {
				t.Fatalf("result %+v, stored %+v", res.Volume, after)
			}
			want := before.Clone()
			want.Replicas[0].Generation = cmd.Generation
			if !reflect.DeepEqual(after, want) {
				t.Fatalf("volume = %+v\nwant %+v (the generation changed, nothing else, no epoch)", after, want)
			}
		})
	}
}

// TestReplicaGenerationOutlivesStateChanges: ejecting a replica, rebuilding
// it and marking it healthy keep its recorded generation; a replacement
// starts without one.
func TestReplicaGenerationOutlivesStateChanges(t *testing.T) {
	h := newHarness(t)
	h.cluster(4, 10)
	v := h.createVolume("v1", 1, 3)
	rid := v.Replicas[0].ID
	h.must(&SetReplicaGeneration{VolumeID: "v1", ReplicaID: rid, Generation: genA})
	for _, st := range []ReplicaState{ReplicaFailed, ReplicaRebuilding, ReplicaHealthy} {
		v = h.setReplica("v1", rid, st)
		if g := v.Replicas[0].Generation; g != genA {
			t.Fatalf("after %s the generation is %q, want %q", st, g, genA)
		}
	}
	v = h.setReplica("v1", rid, ReplicaFailed)
	v = h.must(&ReplaceReplica{VolumeID: "v1", ReplicaID: rid, ExpectEpoch: v.Epoch}).Volume
	if r := v.Replicas[0]; r.ID == rid || r.Generation != "" || r.State != ReplicaRebuilding {
		t.Fatalf("replacement %+v: want a new id, rebuilding, no generation", r)
	}
}
