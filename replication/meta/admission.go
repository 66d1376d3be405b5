package meta

import (
	"fmt"
)

// Admission of guaranteed volumes (docs/architecture.md, "StorageClass
// parameters"). A node says how many IOPS its disks can promise
// (SetNodeReservable, from `cairn node --reservable-iops`); a volume of QoS
// class guaranteed holds its minIOPS on the node of each of its replicas;
// such a volume is placed, and its replicas replaced, only on nodes that
// still have its minIOPS unreserved.
//
// A guaranteed volume is made by AdmitVolume, a command of its own written
// through the command gate (gate.go): a member of an older build, which
// knows nothing of classes, would place it without admission and its state
// would part from the others'. Once one exists, every member reads type 29
// and so knows the rules below, which the older commands (ReplaceReplica,
// SetParameters) then apply to it too.

// SetNodeReservable records what node NodeID's disks can promise to
// guaranteed volumes, in IOPS (0: nothing; such volumes go elsewhere).
type SetNodeReservable struct {
	NodeID string `json:"node_id"`
	IOPS   uint64 `json:"iops"`
}

// AdmitVolume creates a volume with the placement rules newer than
// CreateVolume's: a guaranteed volume's replicas only where its minIOPS
// can still be promised, and a volume of a disk type only on disks of that
// type (disktypes.go). CreateCommand picks it for such volumes.
type AdmitVolume struct {
	CreateVolume
}

func (SetNodeReservable) Type() CommandType { return CmdSetNodeReservable }
func (AdmitVolume) Type() CommandType       { return CmdAdmitVolume }

func applySetNodeReservable(s *State, c *SetNodeReservable) (Result, error) {
	n, ok := s.Nodes[c.NodeID]
	if !ok {
		return Result{}, fmt.Errorf("node %q: %w", c.NodeID, ErrNotFound)
	}
	n.ReservableIOPS = c.IOPS
	out := *n
	return Result{Node: &out}, nil
}

func applyAdmitVolume(s *State, c *AdmitVolume) (Result, error) {
	v := &Volume{Parameters: c.Parameters}
	spec, err := v.Spec()
	if err != nil {
		return Result{}, fmt.Errorf("volume %q: %w", c.Name, err)
	}
	if !spec.Guaranteed() && spec.DiskType == "" && !spec.Encrypted() {
		return Result{}, fmt.Errorf("volume %q: AdmitVolume is for qosClass guaranteed, a disk type or encryption: %w", c.Name, ErrInvalidArgument)
	}
	return createVolume(s, &c.CreateVolume, v.guaranteedIOPS(), spec.DiskType)
}

// guaranteedIOPS is the minIOPS the volume holds on each of its replicas'
// nodes: 0 unless it is of class guaranteed.
func (v *Volume) guaranteedIOPS() uint64 {
	spec, err := v.Spec()
	if err != nil || !spec.Guaranteed() {
		return 0
	}
	return spec.QoS.MinIOPS
}

// CreateCommand is the command that creates volume cv: AdmitVolume for a
// guaranteed one, one of a disk type or an encrypted one, cv itself
// otherwise.
func CreateCommand(cv *CreateVolume) Command {
	if v := (&Volume{Parameters: cv.Parameters}); v.guaranteedIOPS() > 0 || v.diskType() != "" || cv.Encryption != nil {
		return &AdmitVolume{CreateVolume: *cv}
	}
	return cv
}

// checkRestorable refuses a restore or clone into a guaranteed volume: its
// replicas go where the snapshot's layers are, which RestoreVolume does
// without admission.
func checkRestorable(cv CreateVolume) error {
	if (&Volume{Parameters: cv.Parameters}).guaranteedIOPS() > 0 {
		return fmt.Errorf("volume %q: a restore or clone cannot be of qosClass guaranteed yet (its replicas go where the snapshot is, "+
			"without admission): restore into burstable: %w", cv.Name, ErrFailedPrecondition)
	}
	return nil
}
