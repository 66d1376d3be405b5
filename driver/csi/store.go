package csi

import (
	"context"

	"github.com/cairn-csi/cairn/replication/meta"
)

// VolumeStore is what the CSI services need of the volume store: commands,
// reads, and the attach/detach compare-and-set loops. *meta.Client is the
// real one; unit tests give the Controller a fake, so that its RPC logic is
// tested without a Raft cluster or root.
type VolumeStore interface {
	// Apply commits a command.
	Apply(ctx context.Context, cmd meta.Command) (meta.Result, error)
	// State reads the whole state, through the leader when linearizable.
	State(ctx context.Context, linearizable bool) (*meta.State, error)
	// Volume returns one live volume, or an error wrapping meta.ErrNotFound.
	Volume(ctx context.Context, id string) (*meta.Volume, error)
	// Attach attaches a volume to a node; attaching it again the same way
	// changes nothing.
	Attach(ctx context.Context, id, node string, readOnly bool, nbdSocket string) (*meta.Volume, error)
	// Detach removes a volume's attachment if it is node's (any node's when
	// node is ""); a volume not attached is left as it is.
	Detach(ctx context.Context, id, node string) (*meta.Volume, error)
	// Status asks one member for the cluster status (Identity's Probe).
	Status(ctx context.Context) (*meta.StatusResponse, error)
	// Info asks one member about itself (a node's local Probe).
	Info(ctx context.Context) (*meta.InfoResponse, error)
	// TakeSnapshot asks for a snapshot and waits until it is ready or ctx
	// ends (then it returns the snapshot so far with ctx's error).
	TakeSnapshot(ctx context.Context, vol, name string) (*meta.Snapshot, error)
	// DeleteSnapshot deletes a snapshot; one already gone is a success.
	DeleteSnapshot(ctx context.Context, id string) error
	// RetireVolume deletes a volume, or hides it while snapshots of it
	// remain.
	RetireVolume(ctx context.Context, id string) (*meta.Volume, error)
	// Restore creates a volume from a snapshot, or clones fromVolume.
	Restore(ctx context.Context, cv meta.CreateVolume, snapID, fromVolume string) (*meta.Volume, error)
}

var _ VolumeStore = (*meta.Client)(nil)
