package replica

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// TestClaimAboveTheStoreRefused: with EpochOf, a claim over the network at
// most one above the store's epoch of the volume is taken; one further
// above waits for the node's copy of the store to catch up, and is refused
// if it does not, leaving the replica's epoch as it was: a bogus claim
// cannot fence the volume's writers for good.
func TestClaimAboveTheStoreRefused(t *testing.T) {
	var storeEpoch atomic.Uint64
	storeEpoch.Store(5)
	s, addr := startServerWithConfig(t, ServerConfig{DataDir: t.TempDir(), EpochOf: func(id string) (uint64, bool) {
		if id != "vol1-r0" {
			return 0, false
		}
		return storeEpoch.Load(), true
	}})
	r := mustCreate(t, s, "vol1-r0")
	c := dial(t, addr, "vol1-r0", testSize)
	ctx := testCtx(t)
	if err := c.Claim(ctx, 6); err != nil {
		t.Fatalf("claim of the store's epoch plus one: %v", err)
	}
	start := time.Now()
	err := c.Claim(ctx, 1_000_000)
	if !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("claim far above the store's epoch: %v, want ErrInvalidArgument", err)
	}
	if waited := time.Since(start); waited < claimCatchUp/2 {
		t.Errorf("refused after %v: it did not wait for the store to catch up", waited)
	}
	if got := r.Epoch(); got != 6 {
		t.Fatalf("after a refused claim the replica is at epoch %d, want 6", got)
	}
	// The node's copy of the store catches up while the claim waits.
	go func() {
		time.Sleep(200 * time.Millisecond)
		storeEpoch.Store(9)
	}()
	if err := c.Claim(ctx, 10); err != nil {
		t.Fatalf("claim that the store caught up with: %v", err)
	}
	if got := r.Epoch(); got != 10 {
		t.Fatalf("replica at epoch %d, want 10", got)
	}
}
