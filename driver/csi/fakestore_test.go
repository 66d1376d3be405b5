package csi

import (
	"context"
	"fmt"
	"maps"
	"sync"

	"github.com/cairn-csi/cairn/replication/meta"
)

// fakeStore is a VolumeStore in memory for the CSI services' unit tests. It
// keeps the store's contract as the driver relies on it (idempotent create by
// name, tombstones for deleted volumes, one attachment per volume, errors
// wrapping the meta sentinels) without Raft, placement or I/O. fail injects
// an error into the named method ("Apply", "State", "Volume", "Attach",
// "Detach", "Status", "Info").
type fakeStore struct {
	mu      sync.Mutex
	st      *meta.State
	nextID  int
	fail    map[string]error
	applied []meta.Command
	leader  string
}

var _ VolumeStore = (*fakeStore)(nil)

// newFakeStore returns a store with the given nodes up, each with capacity bytes.
func newFakeStore(capacity uint64, nodes ...string) *fakeStore {
	f := &fakeStore{st: meta.NewState(), fail: map[string]error{}, leader: "m1"}
	for _, n := range nodes {
		f.st.Nodes[n] = &meta.Node{ID: n, State: meta.NodeUp, CapacityBytes: capacity}
	}
	return f
}

func (f *fakeStore) injected(method string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fail[method]
}

func (f *fakeStore) Apply(_ context.Context, cmd meta.Command) (meta.Result, error) {
	if err := f.injected("Apply"); err != nil {
		return meta.Result{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applied = append(f.applied, cmd)
	switch c := cmd.(type) {
	case *meta.CreateVolume:
		return f.create(c)
	case *meta.DeleteVolume:
		v, err := f.live(c.VolumeID)
		if err != nil {
			return meta.Result{}, err
		}
		if v.Attachment != nil {
			return meta.Result{}, fmt.Errorf("volume %s is attached to %s: %w", v.ID, v.Attachment.Node, meta.ErrFailedPrecondition)
		}
		v.State = meta.VolumeDeleted
		v.Epoch++
		return meta.Result{Volume: v.Clone()}, nil
	case *meta.SetParameters:
		v, err := f.live(c.VolumeID)
		if err != nil {
			return meta.Result{}, err
		}
		if v.Parameters == nil {
			v.Parameters = map[string]string{}
		}
		for k, val := range c.Parameters {
			if val == "" {
				delete(v.Parameters, k)
			} else {
				v.Parameters[k] = val
			}
		}
		return meta.Result{Volume: v.Clone()}, nil
	case *meta.ExpandVolume:
		// The store's rule: a size reached is a success, nothing shrinks.
		v, err := f.live(c.VolumeID)
		if err != nil {
			return meta.Result{}, err
		}
		v.SizeBytes = max(v.SizeBytes, c.SizeBytes)
		return meta.Result{Volume: v.Clone()}, nil
	}
	return meta.Result{}, fmt.Errorf("fake store: command %T is not faked", cmd)
}

// create is the store's idempotent create: the same name with the same
// request answers the existing volume, with another request AlreadyExists.
func (f *fakeStore) create(c *meta.CreateVolume) (meta.Result, error) {
	quorum := c.WriteQuorum
	if quorum == 0 {
		quorum = c.Replicas/2 + 1
	}
	for _, v := range f.st.Volumes {
		if v.Name != c.Name || v.State == meta.VolumeDeleted {
			continue
		}
		if v.SizeBytes == c.SizeBytes && v.ReplicaCount == c.Replicas && v.WriteQuorum == quorum && maps.Equal(v.Parameters, c.Parameters) {
			return meta.Result{Volume: v.Clone()}, nil
		}
		return meta.Result{}, fmt.Errorf("volume name %q is taken by %s: %w", c.Name, v.ID, meta.ErrAlreadyExists)
	}
	f.nextID++
	v := &meta.Volume{
		ID: fmt.Sprintf("vol-%d", f.nextID), Name: c.Name, SizeBytes: c.SizeBytes, Parameters: c.Parameters,
		AccessType: c.AccessType, State: meta.VolumeAvailable, ReplicaCount: c.Replicas, WriteQuorum: quorum, Epoch: 1,
	}
	for i := 0; i < c.Replicas; i++ {
		v.Replicas = append(v.Replicas, meta.Replica{ID: fmt.Sprintf("%s-r%d", v.ID, i+1), State: meta.ReplicaHealthy})
	}
	f.st.Volumes[v.ID] = v
	return meta.Result{Volume: v.Clone()}, nil
}

func (f *fakeStore) live(id string) (*meta.Volume, error) {
	v, ok := f.st.Volumes[id]
	if !ok || v.State == meta.VolumeDeleted {
		return nil, fmt.Errorf("volume %q: %w", id, meta.ErrNotFound)
	}
	return v, nil
}

func (f *fakeStore) State(_ context.Context, _ bool) (*meta.State, error) {
	if err := f.injected("State"); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st.Clone(), nil
}

func (f *fakeStore) Volume(_ context.Context, id string) (*meta.Volume, error) {
	return f.onVolume("Volume", id, nil)
}

func (f *fakeStore) Attach(_ context.Context, id, node string, readOnly bool, nbdSocket string) (*meta.Volume, error) {
	return f.onVolume("Attach", id, func(v *meta.Volume) error {
		if _, ok := f.st.Nodes[node]; !ok {
			return fmt.Errorf("node %q: %w", node, meta.ErrNotFound)
		}
		if a := v.Attachment; a != nil && (a.Node != node || a.ReadOnly != readOnly) {
			return fmt.Errorf("volume %s is attached to %s: %w", id, a.Node, meta.ErrFailedPrecondition)
		}
		if v.Attachment == nil {
			v.Attachment = &meta.Attachment{Node: node, ReadOnly: readOnly, NBDSocket: nbdSocket}
			v.Epoch++
		}
		return nil
	})
}

func (f *fakeStore) Detach(_ context.Context, id, node string) (*meta.Volume, error) {
	return f.onVolume("Detach", id, func(v *meta.Volume) error {
		if v.Attachment != nil && (node == "" || v.Attachment.Node == node) {
			v.Attachment = nil
			v.Epoch++
		}
		return nil
	})
}

// onVolume is the shape of the per-volume calls: the injected error, the
// live volume (NotFound otherwise), change (if any) under the lock, and a
// copy of the result.
func (f *fakeStore) onVolume(method, id string, change func(v *meta.Volume) error) (*meta.Volume, error) {
	if err := f.injected(method); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	v, err := f.live(id)
	if err != nil {
		return nil, err
	}
	if change != nil {
		if err := change(v); err != nil {
			return nil, err
		}
	}
	return v.Clone(), nil
}

func (f *fakeStore) Status(context.Context) (*meta.StatusResponse, error) {
	if err := f.injected("Status"); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return &meta.StatusResponse{Leader: f.leader}, nil
}

func (f *fakeStore) Info(context.Context) (*meta.InfoResponse, error) {
	if err := f.injected("Info"); err != nil {
		return nil, err
	}
	return &meta.InfoResponse{NodeID: "m1"}, nil
}

// volumeByName returns the stored live volume of a CSI name, for assertions.
func (f *fakeStore) volumeByName(name string) *meta.Volume {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, v := range f.st.Volumes {
		if v.Name == name && v.State != meta.VolumeDeleted {
			return v.Clone()
		}
	}
	return nil
}

// lastCreate returns the last CreateVolume command applied, or nil.
func (f *fakeStore) lastCreate() *meta.CreateVolume {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.applied) - 1; i >= 0; i-- {
		if c, ok := f.applied[i].(*meta.CreateVolume); ok {
			return c
		}
	}
	return nil
}

// The snapshot calls: the fake keeps no snapshots (the real store's
// snapshot path is tested against real clusters: tests/sanity, tests/csie2e).
var errFakeSnapshots = fmt.Errorf("the fake store keeps no snapshots: %w", meta.ErrFailedPrecondition)

// TakeSnapshot counts as a command that reached the store (applied), so
// that a test can tell a refused request never got here.
func (f *fakeStore) TakeSnapshot(_ context.Context, vol, name string) (*meta.Snapshot, error) {
	f.mu.Lock()
	f.applied = append(f.applied, &meta.CreateSnapshot{Name: name, SourceVolumeID: vol})
	f.mu.Unlock()
	return nil, errFakeSnapshots
}

func (f *fakeStore) DeleteSnapshot(context.Context, string) error { return errFakeSnapshots }

func (f *fakeStore) Restore(context.Context, meta.CreateVolume, string, string) (*meta.Volume, error) {
	return nil, errFakeSnapshots
}

// RetireVolume deletes as DeleteVolume does: the fake has no snapshots to
// keep a volume for.
func (f *fakeStore) RetireVolume(ctx context.Context, id string) (*meta.Volume, error) {
	res, err := f.Apply(ctx, &meta.DeleteVolume{VolumeID: id})
	return res.Volume, err
}
