package meta

import (
	"errors"
	"strings"
	"testing"
)

// TestAsyncFollowersAndPromotion: an asynchronous volume's write quorum is
// 1; its followers' lag is recorded; when the node of its healthy replica
// is down, attaching elsewhere is refused naming the promote command; a
// promotion needs AcceptDataLoss, picks the follower with the most writes,
// reports it, and the volume attaches again.
func TestAsyncFollowersAndPromotion(t *testing.T) {
	h := newHarness(t)
	h.cluster(3, 10)
	v := h.must(&CreateVolume{ID: "a", Name: "pvc-a", SizeBytes: gib, Replicas: 3, CreatedAt: 1,
		Parameters: map[string]string{"replicationMode": "asynchronous"}}).Volume
	if v.WriteQuorum != 1 || !v.Async() {
		t.Fatalf("asynchronous volume: quorum %d, async %v; want 1, true", v.WriteQuorum, v.Async())
	}
	sync := h.createVolume("s", 1, 3)
	if sync.WriteQuorum != 2 || sync.Async() {
		t.Fatalf("synchronous volume: quorum %d, async %v; want 2, false", sync.WriteQuorum, sync.Async())
	}
	h.attach("a", "n1")
	// The engine on n1 keeps its own replica healthy and the others follow.
	var healthy string
	for _, r := range h.volume("a").Replicas {
		if r.Node == "n1" {
			healthy = r.ID
			continue
		}
		h.setReplica("a", r.ID, ReplicaFollowing)
	}
	fol := h.volume("a").Following()
	if len(fol) != 2 {
		t.Fatalf("followers %+v, want 2", fol)
	}
	// Lag reports: only followers, only at the current epoch.
	v = h.volume("a")
	h.fails(&ReportLag{VolumeID: "a", ExpectEpoch: v.Epoch, Lags: map[string]*ReplicaLag{healthy: {Writes: 1}}}, ErrFailedPrecondition)
	h.fails(&ReportLag{VolumeID: "a", ExpectEpoch: v.Epoch - 1, Lags: map[string]*ReplicaLag{fol[0].ID: {Writes: 1}}}, ErrEpochMismatch)
	h.must(&ReportLag{VolumeID: "a", ExpectEpoch: v.Epoch, Lags: map[string]*ReplicaLag{
		fol[0].ID: {Writes: 40, Bytes: 40 << 12, Seconds: 0.5, Applied: 960, ReportedAt: 7},
		fol[1].ID: {Writes: 3, Bytes: 3 << 12, Seconds: 0.01, Applied: 997, ReportedAt: 7},
	}})
	if got := h.volume("a"); got.Epoch != v.Epoch || got.Replicas[1].Lag == nil && got.Replicas[2].Lag == nil {
		t.Fatalf("after a lag report: %+v (epoch %d, was %d)", got.Replicas, got.Epoch, v.Epoch)
	}

	// n1 dies: the volume is detached by the operator; attaching on n2 is
	// refused while its healthy replica's node is down.
	h.must(&DetachVolume{VolumeID: "a", ExpectEpoch: h.volume("a").Epoch})
	h.must(&SetNodeState{NodeID: "n1", State: NodeDown, Time: 1})
	err := h.fails(&AttachVolume{VolumeID: "a", NodeID: "n2", ExpectEpoch: h.volume("a").Epoch}, ErrFailedPrecondition)
	for _, want := range []string{"replicated asynchronously", healthy + " on n1", "cairn ctl volume promote a --accept-data-loss", "40 writes"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refused attach %q does not say %q", err, want)
		}
	}
	// A synchronous volume is not held so.
	h.must(&AttachVolume{VolumeID: "s", NodeID: "n2", ExpectEpoch: h.volume("s").Epoch})

	epoch := h.volume("a").Epoch
	if err := h.fails(&PromoteVolume{VolumeID: "a", ExpectEpoch: epoch}, ErrInvalidArgument); !strings.Contains(err.Error(), "--accept-data-loss") {
		t.Fatalf("promotion without AcceptDataLoss: %v", err)
	}
	res := h.must(&PromoteVolume{VolumeID: "a", AcceptDataLoss: true, ExpectEpoch: epoch})
	if res.Promoted == nil || res.Promoted.ID != fol[1].ID || res.Promoted.Lag == nil || res.Promoted.Lag.Writes != 3 {
		t.Fatalf("promoted %+v, want %s (applied 997, 3 writes behind)", res.Promoted, fol[1].ID)
	}
	after := h.volume("a")
	for _, r := range after.Replicas {
		want := map[string]ReplicaState{healthy: ReplicaStale, fol[0].ID: ReplicaFollowing, fol[1].ID: ReplicaHealthy}[r.ID]
		if r.State != want {
			t.Errorf("after promotion %s is %s, want %s", r.ID, r.State, want)
		}
	}
	if after.Epoch != epoch+1 {
		t.Fatalf("promotion epoch %d, want %d", after.Epoch, epoch+1)
	}
	h.must(&AttachVolume{VolumeID: "a", NodeID: "n2", ExpectEpoch: after.Epoch})
	// Nothing to promote while a healthy replica's node is up.
	h.must(&DetachVolume{VolumeID: "a", ExpectEpoch: h.volume("a").Epoch})
	if err := h.fails(&PromoteVolume{VolumeID: "a", AcceptDataLoss: true, ExpectEpoch: h.volume("a").Epoch}, ErrFailedPrecondition); !strings.Contains(err.Error(), "nothing to promote") {
		t.Fatalf("promotion with a healthy replica up: %v", err)
	}
	// The gate holds the first follower as type 32.
	if ty, gated := gatedType(&SetReplicaState{State: ReplicaFollowing}); ty != CmdReportLag || !gated {
		t.Fatalf("SetReplicaState to following goes through the gate as %d (gated %v), want %d", ty, gated, CmdReportLag)
	}
	if ty, _ := gatedType(&PromoteVolume{}); ty != CmdReportLag {
		t.Fatalf("PromoteVolume goes through the gate as %d, want %d (its sibling, applied before any follower exists)", ty, CmdReportLag)
	}
	if !errors.Is(checkReplicaTransition(ReplicaFollowing, ReplicaRebuilding), ErrIllegalTransition) {
		t.Fatal("a follower went straight to rebuilding")
	}
}
