package csi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/driver/frontend"
	"github.com/cairn-csi/cairn/driver/frontend/fuse"
)

// Resume takes over the volumes that an earlier agent of this node staged
// and left in the descriptor holder (NodeConfig.Holder): it opens each
// one's engine again (a takeover, at a new epoch), resumes serving the
// FUSE mount through the held descriptor, and has the kernel send again
// what the earlier agent had read and not answered. The loop devices and
// the file systems on them never noticed, beyond a pause. Call it before
// serving CSI; ctx bounds the engines' opening (the store may still be
// electing a leader). A held mount whose connection is gone is forgotten,
// and the node starts afresh as without a holder.
func (n *Node) Resume(ctx context.Context) error {
	if n.holder == nil {
		return nil
	}
	entries, err := n.holder.list()
	if err != nil {
		n.log.Warn("the descriptor holder does not answer: volumes staged by an earlier agent cannot be taken over, and the ones staged now will not survive a restart",
			zap.String("holder", n.cfg.Holder), zap.Error(err))
		return nil
	}
	var vols []string
	mounted := false
	for _, e := range entries {
		if e.Name == holdFUSE {
			mounted = true
		} else if id, ok := strings.CutPrefix(e.Name, holdVolumePrefix); ok {
			vols = append(vols, id)
		}
	}
	if !mounted {
		n.forgetHeld(vols)
		return nil
	}
	start := time.Now()
	dev, rawMount, err := n.holder.get(holdFUSE)
	if err != nil {
		return fmt.Errorf("take the FUSE descriptor back from the holder: %w", err)
	}
	var m holdMount
	if err := json.Unmarshal(rawMount, &m); err != nil || m.Dir == "" {
		_ = dev.Close()
		n.forgetHeld(vols)
		return fmt.Errorf("the holder's record of the FUSE mount is unreadable (%q): %v", rawMount, err)
	}
	n.log.Info("taking over the volumes an earlier agent left staged", zap.String("dir", m.Dir), zap.Strings("volumes", vols))

	type resumed struct {
		s    *stagedVolume
		meta json.RawMessage
	}
	got := map[string]resumed{}
	files := map[string]frontend.Backend{}
	for _, id := range vols {
		f, raw, err := n.holder.get(holdVolumePrefix + id)
		if f != nil {
			_ = f.Close() // the same connection as dev's
		}
		var hv holdVolume
		if err == nil {
			err = json.Unmarshal(raw, &hv)
		}
		if err != nil {
			n.log.Error("the holder's record of a staged volume is unreadable: it is not taken over", zap.String("volume_id", id), zap.Error(err))
			_ = n.holder.drop(holdVolumePrefix + id)
			continue
		}
		e, err := n.openForResume(ctx, id, []byte(hv.Passphrase))
		if err != nil {
			// Its requests fail (the file is not served): its pod sees
			// I/O errors, as without a holder.
			n.log.Error("the engine of a volume staged by the earlier agent did not open: it is not taken over", zap.String("volume_id", id), zap.Error(err))
			_ = n.holder.drop(holdVolumePrefix + id)
			continue
		}
		s := &stagedVolume{engine: e, file: id, staging: hv.Staging, block: hv.Block}
		got[id] = resumed{s: s, meta: raw}
		files[id] = e
	}
	fs, err := resumeFUSE(n.log, m.Dir, dev, files)
	if err != nil {
		_ = dev.Close()
		for _, r := range got {
			_ = n.release(r.s.engine)
		}
		_ = n.holder.drop(holdFUSE)
		n.forgetHeld(vols)
		if errors.Is(err, fuse.ErrConnectionGone) {
			n.log.Warn("the FUSE mount the holder kept is gone: starting afresh", zap.String("dir", m.Dir), zap.Error(err))
			return nil
		}
		return fmt.Errorf("resume the FUSE mount at %s: %w", m.Dir, err)
	}
	n.fsMu.Lock()
	n.fs = fs
	n.fsMu.Unlock()
	h := fs.(handover)
	n.holder.remember(holdFUSE, h.Device(), rawMount)
	for id, r := range got {
		// Only now: finding the loop device resolves the file's path,
		// which waits for the FUSE server.
		if dev, ok := n.devices.Find(filepath.Join(m.Dir, id)); ok {
			r.s.dev = dev
		}
	}
	n.mu.Lock()
	for id, r := range got {
		r.s.fs = fs
		n.staged[id] = r.s
		n.holder.remember(holdVolumePrefix+id, h.Device(), r.meta)
	}
	n.mu.Unlock()
	ids := make([]string, 0, len(got))
	for id, r := range got {
		ids = append(ids, id)
		n.log.Info("volume taken over", zap.String("volume_id", id), zap.String("device", r.s.dev), zap.String("staging", r.s.staging),
			zap.Bool("block", r.s.block), zap.Uint64("epoch", r.s.engine.Epoch()))
	}
	slices.Sort(ids)
	n.log.Info("volumes taken over from the earlier agent", zap.Strings("volumes", ids), zap.Int("lost", len(vols)-len(got)),
		zap.Duration("took", time.Since(start)))
	return nil
}

// openForResume opens a volume's engine, retrying until ctx ends: right
// after a restart the store may have no leader yet.
func (n *Node) openForResume(ctx context.Context, id string, passphrase []byte) (volumeEngine, error) {
	for attempt := 1; ; attempt++ {
		e, err := n.engines.Takeover(ctx, id, passphrase)
		if err == nil {
			return e, nil
		}
		n.log.Info("engine not open yet; retrying", zap.String("volume_id", id), zap.Int("attempt", attempt), zap.Error(err))
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// forgetHeld drops the holder's records of the given volumes.
func (n *Node) forgetHeld(vols []string) {
	for _, id := range vols {
		_ = n.holder.drop(holdVolumePrefix + id)
	}
}
