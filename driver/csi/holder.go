package csi

import (
	"encoding/json"
	"errors"
	"os"
	"sync"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/internal/fdhold"
)

// What the Node keeps in the descriptor holder (`cairn fuse-holder`,
// internal/fdhold), so that a restarted node agent finds its staged
// volumes serving and takes them over (Node.Resume, docs/restart.md):
//   - holdFUSE: the FUSE mount's /dev/fuse descriptor, with holdMount;
//   - holdVolumePrefix+id: for each staged volume, a duplicate of the
//     same descriptor (the holder keeps entries that carry one), with
//     holdVolume.
const (
	holdFUSE         = "fuse"
	holdVolumePrefix = "volume/"
)

// holdMount is the meta of holdFUSE.
type holdMount struct {
	// Dir is the mount point, as fuse.Server.Dir reported it.
	Dir string `json:"dir"`
}

// holdVolume is the meta of a staged volume's entry: what NodeStage was
// given and did, for a successor to rebuild its record of the staging.
type holdVolume struct {
	Staging string `json:"staging"`
	Block   bool   `json:"block,omitempty"`
	// Passphrase unwraps an encrypted volume's data key, which the
	// successor needs to open its engine. It lives only in the memory of
	// the holder, whose socket only root can reach.
	Passphrase string `json:"passphrase,omitempty"`
}

// holder is the Node's connection to the descriptor holder. It redials
// once when a call fails, and a holder that was restarted (it holds
// nothing) gets everything this node put again, so that it can be
// upgraded while the agent runs. Safe for concurrent use.
type holder struct {
	path string
	log  *zap.Logger

	mu   sync.Mutex
	c    *fdhold.Client
	held map[string]heldEntry // what was put, to put again
}

type heldEntry struct {
	f    *os.File
	meta json.RawMessage
}

func newHolder(path string, log *zap.Logger) *holder {
	return &holder{path: path, log: log, held: map[string]heldEntry{}}
}

// do runs fn on a connection, dialing (and putting everything again into a
// holder that lost it) when there is none or fn failed on a broken one.
func (h *holder) do(fn func(c *fdhold.Client) error) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for attempt := 0; ; attempt++ {
		if h.c == nil {
			c, err := fdhold.Dial(h.path)
			if err != nil {
				return err
			}
			h.c = c
			if err := h.refillLocked(); err != nil {
				_ = h.c.Close()
				h.c = nil
				return err
			}
		}
		err := fn(h.c)
		if err == nil || errors.Is(err, fdhold.ErrNotHeld) || attempt > 0 {
			return err
		}
		// The holder may have restarted: a new connection, once.
		_ = h.c.Close()
		h.c = nil
	}
}

// refillLocked puts into a fresh holder what this node had put into the
// one before it.
func (h *holder) refillLocked() error {
	if len(h.held) == 0 {
		return nil
	}
	entries, err := h.c.List()
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, e := range entries {
		have[e.Name] = true
	}
	for name, e := range h.held {
		if have[name] {
			continue
		}
		if err := h.c.Put(name, e.f, e.meta); err != nil {
			return err
		}
		h.log.Info("descriptor put again into a restarted holder", zap.String("name", name))
	}
	return nil
}

// put has the holder keep a duplicate of f under name.
func (h *holder) put(name string, f *os.File, meta any) error {
	b, err := json.Marshal(meta)
	if err != nil {
		return err
	}
	err = h.do(func(c *fdhold.Client) error { return c.Put(name, f, b) })
	h.mu.Lock()
	h.held[name] = heldEntry{f: f, meta: b} // put again by the next connection if this one failed
	h.mu.Unlock()
	return err
}

// remember records an entry the holder already holds (taken over at a
// resume), so that a restarted holder gets it again.
func (h *holder) remember(name string, f *os.File, meta json.RawMessage) {
	h.mu.Lock()
	h.held[name] = heldEntry{f: f, meta: meta}
	h.mu.Unlock()
}

// drop has the holder let name go; one it does not hold is no error.
func (h *holder) drop(name string) error {
	h.mu.Lock()
	delete(h.held, name)
	h.mu.Unlock()
	err := h.do(func(c *fdhold.Client) error { return c.Drop(name) })
	if errors.Is(err, fdhold.ErrNotHeld) {
		return nil
	}
	return err
}

// list returns the holder's entries.
func (h *holder) list() ([]fdhold.Entry, error) {
	var entries []fdhold.Entry
	err := h.do(func(c *fdhold.Client) error {
		var err error
		entries, err = c.List()
		return err
	})
	return entries, err
}

// get returns a duplicate of the descriptor held under name and its meta.
func (h *holder) get(name string) (*os.File, json.RawMessage, error) {
	var f *os.File
	var meta json.RawMessage
	err := h.do(func(c *fdhold.Client) error {
		var err error
		f, meta, err = c.Get(name)
		return err
	})
	return f, meta, err
}

// reachable reports whether the holder answers (and holds what was put).
func (h *holder) reachable() bool {
	_, err := h.list()
	return err == nil
}

func (h *holder) close() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.c != nil {
		_ = h.c.Close()
		h.c = nil
	}
}
