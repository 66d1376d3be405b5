package csi

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"sync"
	"testing"

	"go.uber.org/zap"
	mount "k8s.io/mount-utils"

	"github.com/cairn-csi/cairn/driver/frontend"
	"github.com/cairn-csi/cairn/replication/attach"
)

// Fakes of the Node's seams (seams.go), so that its RPC logic runs without
// root, a kernel's FUSE and loop devices, or replicas. Each records what is
// left open, attached or mounted, and fails where a test tells it to.

// fakeEngine is a volume's engine that holds no data. Expand grows it to
// stored, the size the store records (0: its own), or fails with
// expandErr.
type fakeEngine struct {
	id        string
	size      uint64
	epoch     uint64
	stored    uint64
	expandErr error
}

func (e *fakeEngine) Expand(context.Context) (uint64, error) {
	if e.expandErr != nil {
		return e.size, e.expandErr
	}
	e.size = max(e.size, e.stored)
	return e.size, nil
}

func (e *fakeEngine) Size() uint64                                      { return e.size }
func (e *fakeEngine) Epoch() uint64                                     { return e.epoch }
func (*fakeEngine) ReadAt(context.Context, []byte, uint64) error        { return nil }
func (*fakeEngine) WriteAt(context.Context, []byte, uint64, bool) error { return nil }
func (*fakeEngine) Flush(context.Context) error                         { return nil }
func (*fakeEngine) Trim(context.Context, uint64, uint64) error          { return nil }
func (*fakeEngine) WriteZeroes(context.Context, uint64, uint64, bool) error {
	return nil
}

// fakeEngines is the engine registry: at most one engine per volume.
type fakeEngines struct {
	mu sync.Mutex
	// openErr[id] is what opening id's engine returns.
	openErr map[string]error
	// releaseErr are what the next releases return, in turn; after
	// attach.ErrBusy the engine stays open, as the registry's does.
	releaseErr []error
	// hold, if set, runs at the start of each Open: a test stops an open
	// there to see what other calls do meanwhile.
	hold     func(id string)
	open     map[string]*fakeEngine
	opens    int
	releases int
}

const fakeVolumeSize = 64 << 20

func (f *fakeEngines) Open(_ context.Context, id string, _ []byte) (volumeEngine, error) {
	f.mu.Lock()
	hold := f.hold
	f.mu.Unlock()
	if hold != nil {
		hold(id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.openErr[id]; err != nil {
		return nil, err
	}
	if _, ok := f.open[id]; ok {
		panic("BUG: test opened the engine of " + id + " twice")
	}
	f.opens++
	e := &fakeEngine{id: id, size: fakeVolumeSize, epoch: 3}
	f.open[id] = e
	return e, nil
}

func (f *fakeEngines) Takeover(ctx context.Context, id string, passphrase []byte) (volumeEngine, error) {
	return f.Open(ctx, id, passphrase)
}

func (f *fakeEngines) Release(_ context.Context, e volumeEngine) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.releases++
	var err error
	if len(f.releaseErr) > 0 {
		err, f.releaseErr = f.releaseErr[0], f.releaseErr[1:]
	}
	if errors.Is(err, attach.ErrBusy) {
		return err
	}
	delete(f.open, e.(*fakeEngine).id)
	return err
}

func (f *fakeEngines) openIDs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return sortedKeys(f.open)
}

// fakeFiles is the FUSE file system.
type fakeFiles struct {
	mu        sync.Mutex
	dir       string
	mountErr  error // what mounting it returns
	addErr    error // what Add returns
	files     map[string]frontend.Backend
	sizes     map[string]uint64 // what Resize gave each file
	mounts    int
	unmounted bool
}

func (f *fakeFiles) mount(_ *zap.Logger, dir string) (fileServer, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.mountErr != nil {
		return nil, f.mountErr
	}
	f.dir = dir
	f.mounts++
	return f, nil
}

func (f *fakeFiles) Add(name string, b frontend.Backend) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.addErr != nil {
		return "", f.addErr
	}
	f.files[name] = b
	return filepath.Join(f.dir, name), nil
}

func (f *fakeFiles) Resize(name string) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.files[name]
	if !ok {
		return 0, fmt.Errorf("no file %s", name)
	}
	if f.sizes == nil {
		f.sizes = map[string]uint64{}
	}
	f.sizes[name] = b.Size()
	return b.Size(), nil
}

func (f *fakeFiles) Remove(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.files, name)
	return nil
}

func (f *fakeFiles) Unmount() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unmounted = true
	return nil
}

func (f *fakeFiles) names() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return sortedKeys(f.files)
}

// fakeDevices are the loop devices.
type fakeDevices struct {
	mu        sync.Mutex
	attachErr error   // what Attach returns
	detachErr []error // what the next detaches return, in turn
	next      int
	attached  map[string]string // device → file
	detaches  int
	resized   []string // "device mount path" of each Resize
}

func (f *fakeDevices) Attach(path string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.attachErr != nil {
		return "", f.attachErr
	}
	dev := fmt.Sprintf("/dev/loop%d", f.next)
	f.next++
	f.attached[dev] = path
	return dev, nil
}

func (f *fakeDevices) Detach(dev string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.detaches++
	if len(f.detachErr) > 0 {
		err := f.detachErr[0]
		f.detachErr = f.detachErr[1:]
		if err != nil {
			return err
		}
	}
	delete(f.attached, dev)
	return nil
}

func (f *fakeDevices) Find(path string) (string, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for dev, p := range f.attached {
		if p == path {
			return dev, true
		}
	}
	return "", false
}

func (f *fakeDevices) Resize(dev, mountPath string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.resized = append(f.resized, dev+" "+mountPath)
	return nil
}

func (f *fakeDevices) devices() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return sortedKeys(f.attached)
}

// fakeMounter is mount-utils' fake mounter that also formats: a device is
// formatted at its first FormatAndMount, never again.
type fakeMounter struct {
	*mount.FakeMounter
	mu        sync.Mutex
	formatErr error             // what FormatAndMount returns
	formatted map[string]string // device → fs type
	formats   int
}

func (f *fakeMounter) FormatAndMount(source, target, fsType string, options []string) error {
	f.mu.Lock()
	if f.formatErr != nil {
		f.mu.Unlock()
		return f.formatErr
	}
	if _, ok := f.formatted[source]; !ok {
		f.formatted[source] = fsType
		f.formats++
	}
	f.mu.Unlock()
	return f.Mount(source, target, fsType, options)
}

// mountAt returns the mount at path, if any.
func (f *fakeMounter) mountAt(path string) (mount.MountPoint, bool) {
	mps, _ := f.List()
	for _, mp := range mps {
		if mp.Path == path {
			return mp, true
		}
	}
	return mount.MountPoint{}, false
}

// nodeFakes are a Node's fakes.
type nodeFakes struct {
	engines *fakeEngines
	files   *fakeFiles
	devices *fakeDevices
	mounter *fakeMounter
}

// newFakeNode returns a Node on fakes, whose paths must lie under root.
func newFakeNode(t *testing.T, maxVolumes int64) (*Node, *nodeFakes, string) {
	t.Helper()
	root := t.TempDir()
	f := &nodeFakes{
		engines: &fakeEngines{openErr: map[string]error{}, open: map[string]*fakeEngine{}},
		files:   &fakeFiles{files: map[string]frontend.Backend{}},
		devices: &fakeDevices{attached: map[string]string{}},
		mounter: &fakeMounter{FakeMounter: mount.NewFakeMounter(nil), formatted: map[string]string{}},
	}
	n := newNode(NodeConfig{NodeID: "n1", Zone: "a", MaxVolumes: maxVolumes, StateDir: filepath.Join(root, "state"),
		AllowedRoots: []string{root}, Mounter: f.mounter, Devices: f.devices}, f.engines, f.files.mount)
	return n, f, root
}

// leftovers says what is still open, attached or mounted, "" if nothing.
func (f *nodeFakes) leftovers() string {
	var s string
	if ids := f.engines.openIDs(); len(ids) > 0 {
		s += fmt.Sprintf(" engines %v", ids)
	}
	if names := f.files.names(); len(names) > 0 {
		s += fmt.Sprintf(" FUSE files %v", names)
	}
	if devs := f.devices.devices(); len(devs) > 0 {
		s += fmt.Sprintf(" loop devices %v", devs)
	}
	if mps, _ := f.mounter.List(); len(mps) > 0 {
		s += fmt.Sprintf(" mounts %v", mps)
	}
	return s
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

var errFake = errors.New("injected fault")
