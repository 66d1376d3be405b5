package storagenode

import "github.com/cairn-csi/cairn/replication/meta"

// What the realizer does about one replica that the store places on this
// node, given its state and recorded generation in the store and the copy
// on this node's disk (see replication/replica/replica.go for generations,
// replication/engine/identity.go for the engine's side of the same rule).
//
// The rule it keeps: a blank replica is made only where no data can be
// lost by it, that is for a replica whose generation the store has never
// recorded (a new volume: every engine records its replicas' generations
// before it serves I/O, and so does this realizer when it creates one) or
// for a replica that is rebuilding (the rebuild compares and copies every
// extent). A replica the store trusts with data that this disk no longer
// holds is reported and marked failed; the leader's reconciler then puts it
// to rebuilding, and it is made again, blank, and rebuilt from a replica
// that holds the data.
type replicaAction int

const (
	// actNone: the disk and the store agree.
	actNone replicaAction = iota
	// actCreate: create a blank copy and record its generation.
	actCreate
	// actRecord: record the generation of the copy on disk.
	actRecord
	// actFail: the store trusts data this disk does not hold: report it and
	// mark the replica failed (the last healthy replica stays as it is).
	actFail
	// actWait: failed or stale, and the copy on disk is not the recorded
	// one or is missing: nothing to do until the replica rebuilds.
	actWait
)

func (a replicaAction) String() string {
	return [...]string{"none", "create", "record", "fail", "wait"}[a]
}

// decide is the realizer's rule as a table:
//
//	on disk          state       recorded  action
//	missing          healthy     ""        create  (a new volume)
//	missing          healthy     g         fail    (its data is gone)
//	missing          rebuilding  any       create  (blank, then rebuilt)
//	missing          failed/stale any      wait
//	present, g       any         g         none
//	present, g       healthy     ""        record
//	present, g       rebuilding  any       record
//	present, g       failed/stale ""/h     wait
//	present, g       healthy     h         fail    (another copy: not the data)
//	present, none    any         any       none    (a server older than generations)
func decide(state meta.ReplicaState, recorded string, present bool, onDisk string) replicaAction {
	if state == meta.ReplicaFollowing {
		// A follower of an asynchronous volume was healthy first, and
		// holds the data as a healthy replica does (if not the latest).
		state = meta.ReplicaHealthy
	}
	if !present {
		switch {
		case state == meta.ReplicaRebuilding:
			return actCreate
		case state == meta.ReplicaHealthy && recorded == "":
			return actCreate
		case state == meta.ReplicaHealthy:
			return actFail
		}
		return actWait
	}
	switch {
	case onDisk == "" || onDisk == recorded:
		return actNone
	case state == meta.ReplicaRebuilding, state == meta.ReplicaHealthy && recorded == "":
		return actRecord
	case state == meta.ReplicaHealthy:
		return actFail
	}
	return actWait
}
