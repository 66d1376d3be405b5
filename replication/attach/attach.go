// Package attach owns the engines of one node. Every engine the node runs,
// for a CSI staging, an NBD export or a maintenance rebuild, is opened and
// closed through the node's Registry: it holds the wiring they share (the
// node, the store, the schedulers, the local replica server, the rebuild
// pace) and orders the opens and closes of each volume.
//
// Locking: no lock of the Registry covers more than one volume while an
// engine opens, closes or does I/O. engine.Open can wait for a silent
// replica up to its I/O timeout (10 s), and a caller's own timeout can be
// longer; while it waits, every other volume of the node opens and closes
// as if nothing happened.
package attach

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/replication/engine"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"

	"github.com/cairn-csi/cairn/internal/pki"
)

// Errors of the Registry.
var (
	// ErrClosed is what Open returns once the Registry is closed.
	ErrClosed = errors.New("engine registry closed")
	// ErrBusy: the context ended while another open or close of the same
	// volume ran on this node. Nothing was done; the caller may retry.
	ErrBusy = errors.New("another open or close of the volume is running on this node")
)

// Config is the wiring every engine of the node shares.
type Config struct {
	// NodeID is this node's id in the store.
	NodeID string
	// Meta reaches the volume store.
	Meta *meta.Client
	// TLS is this node's identity for other nodes' replica servers
	// (engine.Config.TLS; nil: plaintext).
	TLS *pki.Credentials
	// Logger receives the engines' lines.
	Logger *zap.Logger
	// RebuildBytesPerSecond paces the engines' rebuild copies while the
	// node has foreground I/O (0: unpaced).
	RebuildBytesPerSecond uint64
	// ReplicaDeadline is engine.Config.ReplicaDeadline of attached volumes'
	// engines (0: its default).
	ReplicaDeadline time.Duration
	// ScrubInterval is engine.Config.ScrubInterval of attached volumes'
	// engines (0: scrub only when asked).
	ScrubInterval time.Duration
	// Sched is the node's QoS scheduler (nil: none).
	Sched *iosched.Scheduler
	// Local is this node's replica server, reached in process (nil: over
	// TCP like the others).
	Local *replica.Server
}

// Registry opens and closes the engines of one node.
type Registry struct {
	cfg Config
	log *zap.Logger

	// mu guards the fields below. It is held only to read or change them,
	// never across an engine's open, close or I/O.
	mu     sync.Mutex
	closed bool
	vols   map[string]*volume        // volumes with an engine, or a caller holding or awaiting their turn
	owner  map[*engine.Engine]string // open engine → its volume
}

// volume is one volume's turn: a one-token channel held across each open
// and close of the volume's engines on this node. Two opens of one volume
// then cannot claim its replicas with the same epoch at once, and a close's
// last flush does not race the next open on this node.
type volume struct {
	turn    chan struct{}
	users   int // callers holding or awaiting turn
	engines int // open engines
}

// New returns an empty Registry.
func New(cfg Config) *Registry {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	return &Registry{cfg: cfg, log: cfg.Logger.Named("attach").With(zap.String("node_id", cfg.NodeID)),
		vols: map[string]*volume{}, owner: map[*engine.Engine]string{}}
}

// Open opens the engine of volume id, attached to this node, for a
// frontend (a CSI staging, an NBD export). ctx bounds the wait for the
// volume's turn and the open.
func (r *Registry) Open(ctx context.Context, id string) (*engine.Engine, error) {
	return r.OpenWith(ctx, id, nil)
}

// OpenWith is Open of a volume that may be encrypted: passphrase unwraps
// its data key (replication/crypt). A wrong one fails with
// crypt.ErrWrongKey, and none with engine.ErrNeedsKey, before anything is
// claimed or written. A plain volume ignores it.
func (r *Registry) OpenWith(ctx context.Context, id string, passphrase []byte) (*engine.Engine, error) {
	cfg := r.engineConfig(id)
	cfg.ReplicaDeadline, cfg.ScrubInterval = r.cfg.ReplicaDeadline, r.cfg.ScrubInterval
	if len(passphrase) > 0 {
		v, err := r.cfg.Meta.Volume(ctx, id)
		if err != nil {
			return nil, fmt.Errorf("read volume %s: %w", id, err)
		}
		if v.Encrypted() {
			if cfg.DataKey, err = v.Encryption.Unwrap(passphrase); err != nil {
				return nil, fmt.Errorf("volume %s (key id %s): %w", id, v.Encryption.KeyID, err)
			}
		}
	}
	return r.open(ctx, cfg)
}

// Takeover is OpenWith for a volume whose engine on this node died with
// its process (an agent restarted while the volume stayed staged): it first
// moves the volume's epoch on, so that the claims of the new engine fence
// every request of the dead one still queued at a replica. The volume must
// be attached to this node.
func (r *Registry) Takeover(ctx context.Context, id string, passphrase []byte) (*engine.Engine, error) {
	v, err := r.cfg.Meta.Volume(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("read volume %s: %w", id, err)
	}
	if _, err := r.cfg.Meta.Apply(ctx, &meta.AdvanceEpoch{VolumeID: id, NodeID: r.cfg.NodeID, ExpectEpoch: v.Epoch}); err != nil {
		return nil, fmt.Errorf("volume %s: a new epoch for the takeover: %w", id, err)
	}
	return r.OpenWith(ctx, id, passphrase)
}

// engineConfig is the wiring every engine of this node shares.
func (r *Registry) engineConfig(id string) engine.Config {
	return engine.Config{VolumeID: id, NodeID: r.cfg.NodeID, Meta: r.cfg.Meta, TLS: r.cfg.TLS, Logger: r.cfg.Logger,
		RebuildBytesPerSecond: r.cfg.RebuildBytesPerSecond, Sched: r.cfg.Sched, Local: r.cfg.Local}
}

// OpenMaintenance opens a maintenance engine of the unattached volume id,
// which serves no I/O and rebuilds its replicas (engine.Config.Maintenance);
// onRebuilt is called after each finished rebuild. It gets no replica
// deadline and no scrub interval: it waits for no writes, and scrubbing is
// the attached engine's.
func (r *Registry) OpenMaintenance(ctx context.Context, id string, onRebuilt func(engine.RebuildStats)) (*engine.Engine, error) {
	cfg := r.engineConfig(id)
	cfg.Maintenance, cfg.OnRebuilt = true, onRebuilt
	return r.open(ctx, cfg)
}

func (r *Registry) open(ctx context.Context, cfg engine.Config) (*engine.Engine, error) {
	id := cfg.VolumeID
	v, err := r.take(ctx, id, false)
	if err != nil {
		return nil, err
	}
	defer r.give(id, v)
	e, err := engine.Open(ctx, cfg)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	closed := r.closed
	if !closed {
		r.owner[e] = id
		v.engines++
	}
	r.mu.Unlock()
	if closed {
		// Close ran while this engine opened: it must not outlive the
		// registry that no longer lists it.
		cctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = e.Close(cctx)
		return nil, fmt.Errorf("volume %s: %w", id, ErrClosed)
	}
	return e, nil
}

// Release flushes and closes e, an engine this Registry opened, in its
// volume's turn. ctx bounds the wait for the turn and the close; if the
// turn does not come in time, Release returns ErrBusy and e stays open and
// registered. Any other error is the close's: e is closed and forgotten.
// Releasing an engine already released does nothing: a user's release and
// a shutdown's (Close, a frontend stopping) may meet.
func (r *Registry) Release(ctx context.Context, e *engine.Engine) error {
	r.mu.Lock()
	id, ok := r.owner[e]
	r.mu.Unlock()
	if !ok {
		return nil
	}
	v, err := r.take(ctx, id, true)
	if err != nil {
		return err
	}
	defer r.give(id, v)
	r.mu.Lock()
	_, ok = r.owner[e] // another release may have had the turn first
	r.mu.Unlock()
	if !ok {
		return nil
	}
	err = e.Close(ctx)
	r.mu.Lock()
	delete(r.owner, e)
	v.engines--
	r.mu.Unlock()
	return err
}

// Find returns an open engine of volume id that is not fenced, or nil: a
// task on the volume (a snapshot) uses the engine already serving it
// rather than open another, which would fence it. Its owner may release
// it meanwhile; the task's operations then fail and it tries again.
func (r *Registry) Find(id string) *engine.Engine {
	r.mu.Lock()
	defer r.mu.Unlock()
	for e, vol := range r.owner {
		if vol != id {
			continue
		}
		select {
		case <-e.Fenced():
		default:
			return e
		}
	}
	return nil
}

// Count reports how many engines are open.
func (r *Registry) Count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.owner)
}

// Close refuses further opens and closes the engines still open (their
// users should have released them first; what is left is logged). Each
// close gets its own 10 s.
func (r *Registry) Close() error {
	r.mu.Lock()
	r.closed = true
	left := make([]*engine.Engine, 0, len(r.owner))
	for e := range r.owner {
		left = append(left, e)
	}
	r.mu.Unlock()
	var errs []error
	for _, e := range left {
		r.log.Warn("engine still open when the registry closes", zap.String("volume_id", r.volumeOf(e)))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		errs = append(errs, r.Release(ctx, e))
		cancel()
	}
	return errors.Join(errs...)
}

func (r *Registry) volumeOf(e *engine.Engine) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.owner[e]
}

// take waits for volume id's turn. Only a release may take it once the
// Registry is closed.
func (r *Registry) take(ctx context.Context, id string, release bool) (*volume, error) {
	r.mu.Lock()
	if r.closed && !release {
		r.mu.Unlock()
		return nil, fmt.Errorf("volume %s: %w", id, ErrClosed)
	}
	v, ok := r.vols[id]
	if !ok {
		v = &volume{turn: make(chan struct{}, 1)}
		r.vols[id] = v
	}
	v.users++
	r.mu.Unlock()
	select {
	case v.turn <- struct{}{}:
		return v, nil
	case <-ctx.Done():
		r.leave(id, v)
		return nil, fmt.Errorf("volume %s: %w: %w", id, ErrBusy, ctx.Err())
	}
}

// give ends volume id's turn.
func (r *Registry) give(id string, v *volume) {
	<-v.turn
	r.leave(id, v)
}

// leave drops one user of v, and v itself once nothing refers to it.
func (r *Registry) leave(id string, v *volume) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v.users--
	if v.users == 0 && v.engines == 0 {
		delete(r.vols, id)
	}
}
