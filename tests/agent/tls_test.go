package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/cairn-csi/cairn/driver/agent"
	"github.com/cairn-csi/cairn/internal/loopback"
	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
)

// refusedWithin bounds a call expected to be refused. A refusal the
// client retries (the meta client retries while no member answers at the
// transport level, as it does for a refused handshake) ends with it.
const refusedWithin = 3 * time.Second

// TestTLSRefusesStrangersOnEveryPort: one node agent with a node
// certificate serves its meta API, its replica port and Raft in mutual
// TLS. Each caller gets what its role allows: a ctl certificate manages
// volumes and reads replicas, a monitor one only reads the store, a node
// certificate speaks for its own node only; a plaintext peer and a
// certificate of another CA get nothing. Nothing a refused caller sent
// changes the store.
func TestTLSRefusesStrangersOnEveryPort(t *testing.T) {
	dir := t.TempDir()
	pkiDir := filepath.Join(dir, "pki")
	ca, err := pki.InitCA(pkiDir, "cairn-test", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	node1 := issue(t, ca, pkiDir, pki.RoleNode, "node-1")
	ctl := issue(t, ca, pkiDir, pki.RoleCtl, "ctl")
	mon := issue(t, ca, pkiDir, pki.RoleMonitor, "mon")
	node2 := issue(t, ca, pkiDir, pki.RoleNode, "node-2")
	// A ctl certificate of another CA that trusts the cluster's CA: the
	// client accepts the node, and only the node can refuse it.
	otherDir := filepath.Join(dir, "other-ca")
	other, err := pki.InitCA(otherDir, "another-cluster", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	otherFiles := pki.FilesIn(otherDir, "ctl")
	otherFiles.CA = filepath.Join(pkiDir, pki.CACertFile)
	if err := other.Issue(pki.Identity{Role: pki.RoleCtl, Name: "ctl"}, time.Hour, otherFiles); err != nil {
		t.Fatal(err)
	}
	stranger := load(t, otherFiles)

	addrs, err := loopback.Addrs(2, 3)
	if err != nil {
		t.Fatal(err)
	}
	self := addrs[0]
	a := startTLSAgent(t, dir, "node-1", self, node1, 1, nil)
	apiAddr, raftAddr, dataAddr := a.APIAddr(), self[0], self[2]

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	c := metaClient(t, apiAddr, ctl)
	waitLeader(ctx, t, c)
	waitRegistered(ctx, t, c, "node-1")

	// a. The meta API: each role gets what it may do.
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("ctl: Status: %v", err)
	}
	if st.Leader != "node-1" {
		t.Fatalf("ctl: Status names leader %q, want node-1", st.Leader)
	}
	res, err := c.Apply(ctx, &meta.CreateVolume{Name: "tls-a", SizeBytes: 16 << 20, Replicas: 1})
	if err != nil {
		t.Fatalf("ctl: create a volume: %v", err)
	}
	vol := res.Volume
	if vol == nil || len(vol.Replicas) != 1 || vol.Replicas[0].Node != "node-1" {
		t.Fatalf("ctl: created volume %+v, want one replica on node-1", vol)
	}
	created := []string{vol.ID}

	plain := metaClient(t, apiAddr, nil)
	if err := refusedStatus(t, plain); err == nil {
		t.Error("plaintext client: Status succeeded against a TLS meta API")
	} else {
		t.Logf("plaintext client: Status refused: %v", err)
	}
	strangerMeta := metaClient(t, apiAddr, stranger)
	if err := refusedStatus(t, strangerMeta); err == nil {
		t.Error("ctl certificate of another CA: Status succeeded")
	} else {
		t.Logf("another CA's ctl certificate: Status refused: %v", err)
	}
	if _, err := refusedApply(t, strangerMeta, &meta.CreateVolume{Name: "tls-stranger", SizeBytes: 16 << 20, Replicas: 1}); err == nil {
		t.Error("ctl certificate of another CA: created a volume")
	}

	monitor := metaClient(t, apiAddr, mon)
	if _, err := monitor.Status(ctx); err != nil {
		t.Errorf("monitor: Status: %v", err)
	}
	if _, err := monitor.State(ctx, true); err != nil {
		t.Errorf("monitor: read the state: %v", err)
	}
	if _, err := monitor.Volume(ctx, vol.ID); err != nil {
		t.Errorf("monitor: read volume %s: %v", vol.ID, err)
	}
	_, err = refusedApply(t, monitor, &meta.CreateVolume{Name: "tls-monitor", SizeBytes: 16 << 20, Replicas: 1})
	switch {
	case err == nil:
		t.Error("monitor: created a volume")
	case !meta.IsUnauthorized(err):
		t.Errorf("monitor: volume creation failed with %v; want an error meta.IsUnauthorized recognizes", err)
	default:
		t.Logf("monitor: volume creation refused, meta.IsUnauthorized: %v", err)
	}

	// b. Join and Heartbeat: node agents only, each for itself.
	n2 := metaClient(t, apiAddr, node2)
	err = refusedHeartbeat(t, n2, &meta.HeartbeatRequest{NodeID: "node-1", CapacityBytes: 1, FreeBytes: 1})
	expectUnauthorized(t, "node-2: heartbeat for node-1", err)
	err = refusedHeartbeat(t, c, &meta.HeartbeatRequest{NodeID: "node-1", CapacityBytes: 1, FreeBytes: 1})
	expectUnauthorized(t, "ctl: heartbeat for node-1", err)
	err = refusedHeartbeat(t, monitor, &meta.HeartbeatRequest{NodeID: "node-1", CapacityBytes: 1, FreeBytes: 1})
	expectUnauthorized(t, "monitor: heartbeat for node-1", err)
	intruder := addrs[1]
	err = refusedJoin(t, c, &meta.JoinRequest{NodeID: "intruder", RaftAddr: intruder[0], APIAddr: intruder[1]})
	expectUnauthorized(t, "ctl: join", err)
	err = refusedJoin(t, monitor, &meta.JoinRequest{NodeID: "intruder", RaftAddr: intruder[0], APIAddr: intruder[1]})
	expectUnauthorized(t, "monitor: join", err)
	err = refusedJoin(t, n2, &meta.JoinRequest{NodeID: "node-1", RaftAddr: intruder[0], APIAddr: intruder[1]})
	expectUnauthorized(t, "node-2: join as node-1", err)
	// Claiming to forward another node's request: only store members
	// forward, and node-2 is none.
	err = refusedJoin(t, n2, &meta.JoinRequest{NodeID: "node-9", RaftAddr: intruder[0], APIAddr: intruder[1], Forwarded: true})
	expectUnauthorized(t, "node-2: join of node-9 marked forwarded", err)
	err = refusedHeartbeat(t, n2, &meta.HeartbeatRequest{NodeID: "node-1", CapacityBytes: 1, FreeBytes: 1, Forwarded: true})
	expectUnauthorized(t, "node-2: heartbeat for node-1 marked forwarded", err)
	// A node's commands about a node are about itself.
	_, err = n2.Apply(ctx, &meta.RegisterNode{Node: meta.Node{ID: "node-1", RaftAddr: intruder[0], APIAddr: intruder[1]}})
	expectUnauthorized(t, "node-2: register node-1", err)
	_, err = n2.Apply(ctx, &meta.AttachVolume{VolumeID: "any", NodeID: "node-1"})
	expectUnauthorized(t, "node-2: attach a volume to node-1", err)
	// Managing volumes is for ctl certificates.
	_, err = n2.Apply(ctx, &meta.CreateVolume{Name: "tls-node", SizeBytes: 16 << 20, Replicas: 1})
	expectUnauthorized(t, "node-2: create a volume", err)
	_, err = n2.Apply(ctx, &meta.DeleteVolume{VolumeID: vol.ID})
	expectUnauthorized(t, "node-2: delete a volume", err)
	// A node's commands about a volume or a replica reach only the volumes
	// it holds a replica of or has attached; node-2 has neither of vol.
	rep := vol.Replicas[0]
	_, err = n2.Apply(ctx, &meta.SetReplicaState{VolumeID: vol.ID, ReplicaID: rep.ID, State: meta.ReplicaFailed, ExpectEpoch: vol.Epoch})
	expectUnauthorized(t, "node-2: mark node-1's replica failed", err)
	_, err = n2.Apply(ctx, &meta.SetVolumeCondition{VolumeID: vol.ID, Abnormal: true, Message: "forged by node-2"})
	expectUnauthorized(t, "node-2: mark the volume abnormal", err)
	_, err = n2.Apply(ctx, &meta.RecordUsage{VolumeID: vol.ID, ReplicaID: rep.ID, AllocatedBytes: 1})
	expectUnauthorized(t, "node-2: report the usage of node-1's replica", err)
	_, err = n2.Apply(ctx, &meta.SetReplicaGeneration{VolumeID: vol.ID, ReplicaID: rep.ID, Generation: "forged", Expect: rep.Generation})
	expectUnauthorized(t, "node-2: relabel node-1's replica", err)
	// Nor can it claim to be node-1 by wrapping the command itself.
	inner, err := meta.Encode(&meta.SetVolumeCondition{VolumeID: vol.ID, Abnormal: true, Message: "forged by node-2"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = n2.Apply(ctx, &meta.AsNode{Node: "node-1", Command: inner})
	expectUnauthorized(t, "node-2: a command wrapped as node-1's", err)
	// Control: the replica's own node may report its usage.
	n1 := metaClient(t, apiAddr, node1)
	if _, err := n1.Apply(ctx, &meta.RecordUsage{VolumeID: vol.ID, ReplicaID: rep.ID, AllocatedBytes: 4096}); err != nil {
		t.Errorf("node-1: report the usage of its own replica: %v", err)
	}

	// c. Nothing the refused callers sent changed the store.
	st2, err := c.State(ctx, true)
	if err != nil {
		t.Fatalf("ctl: read the state: %v", err)
	}
	var volumes []string
	for id := range st2.Volumes {
		volumes = append(volumes, id)
	}
	slices.Sort(volumes)
	if !slices.Equal(volumes, created) {
		t.Errorf("the store holds volumes %v, want only %v (the ctl client's)", volumes, created)
	}
	var nodes []string
	for id := range st2.Nodes {
		nodes = append(nodes, id)
	}
	if len(nodes) != 1 || nodes[0] != "node-1" {
		t.Errorf("the store holds nodes %v, want only node-1", nodes)
	}
	if v := st2.Volumes[vol.ID]; v == nil {
		t.Errorf("volume %s is gone", vol.ID)
	} else {
		// The realizer may have recorded the replica's generation since.
		if v.Condition != nil || v.Replicas[0].State == meta.ReplicaFailed || v.Replicas[0].Generation == "forged" {
			t.Errorf("volume %s changed under node-2's refused commands: condition %+v, replica %+v (was %+v)", vol.ID, v.Condition, v.Replicas[0], rep)
		}
	}
	if n := st2.Nodes["node-1"]; n == nil || n.RaftAddr != raftAddr || n.APIAddr != apiAddr || n.DataAddr != dataAddr {
		t.Errorf("node-1 is registered as %+v, want raft %s, API %s, data %s", n, raftAddr, apiAddr, dataAddr)
	} else if n.CapacityBytes == 1 {
		t.Errorf("node-1's capacity is the one node-2's refused heartbeat named")
	}
	st3, err := c.Status(ctx)
	if err != nil {
		t.Fatalf("ctl: Status: %v", err)
	}
	if len(st3.Members) != 1 || st3.Members[0].ID != "node-1" || st3.Members[0].RaftAddr != raftAddr {
		t.Errorf("raft members %+v, want node-1 alone at %s", st3.Members, raftAddr)
	}

	// d. The replica port.
	vol = waitGeneration(ctx, t, c, vol.ID)
	rid := vol.Replicas[0].ID
	nodeRC := dialReplica(t, dataAddr, rid, node1)
	info, err := nodeRC.Info(ctx)
	if err != nil {
		t.Fatalf("node-1: Info of replica %s: %v", rid, err)
	}
	if info.Size == 0 || info.ExtentSize == 0 {
		t.Fatalf("node-1: Info of replica %s: %+v", rid, info)
	}

	if rc, err := tryDialReplica(dataAddr, rid, nil); err == nil {
		err = pingReplica(rc)
		rc.Close()
		if err == nil {
			t.Error("plaintext: dialled a replica and pinged it")
		}
	} else {
		t.Logf("plaintext: replica dial refused: %v", err)
	}
	if rc, err := tryDialReplica(dataAddr, rid, stranger); err == nil {
		err = pingReplica(rc)
		rc.Close()
		if err == nil {
			t.Error("ctl certificate of another CA: dialled a replica and pinged it")
		}
	} else {
		t.Logf("another CA's ctl certificate: replica dial refused: %v", err)
	}
	if rc, err := tryDialReplica(dataAddr, rid, mon); err == nil {
		err = pingReplica(rc)
		rc.Close()
		if err == nil {
			t.Error("monitor: dialled a replica and pinged it")
		}
	} else {
		t.Logf("monitor: replica dial refused: %v", err)
	}

	ctlRC := dialReplica(t, dataAddr, rid, ctl)
	cinfo, err := ctlRC.Info(ctx)
	if err != nil {
		t.Fatalf("ctl: Info of replica %s: %v", rid, err)
	}
	extents := cinfo.Size / cinfo.ExtentSize
	sums, err := ctlRC.Checksums(ctx, cinfo.Epoch, 0, extents)
	if err != nil {
		t.Errorf("ctl: Checksums of replica %s: %v", rid, err)
	} else if uint64(len(sums)) != extents {
		t.Errorf("ctl: %d checksums of replica %s, want %d", len(sums), rid, extents)
	}
	ones := bytes.Repeat([]byte{0xa5}, 4096)
	for name, call := range map[string]func(context.Context) error{
		"WriteAt": func(ctx context.Context) error { return ctlRC.WriteAt(ctx, cinfo.Epoch, ones, 0, false) },
		"Claim":   func(ctx context.Context) error { return ctlRC.Claim(ctx, cinfo.Epoch+1) },
		"Trim":    func(ctx context.Context) error { return ctlRC.Trim(ctx, cinfo.Epoch, 0, 4096) },
		"ReadAt":  func(ctx context.Context) error { return ctlRC.ReadAt(ctx, cinfo.Epoch, make([]byte, 4096), 0) },
	} {
		cctx, ccancel := context.WithTimeout(ctx, refusedWithin)
		err := call(cctx)
		ccancel()
		switch {
		case err == nil:
			t.Errorf("ctl: %s on replica %s succeeded", name, rid)
		case !errors.Is(err, replica.ErrInvalidArgument) || !strings.Contains(err.Error(), "node certificate"):
			t.Errorf("ctl: %s on replica %s failed with %v; want ErrInvalidArgument naming the node certificate it needs", name, rid, err)
		}
	}
	// The connection still serves what a ctl certificate may do.
	if err := ctlRC.Ping(ctx); err != nil {
		t.Errorf("ctl: Ping after the refused calls: %v", err)
	}
	after, err := nodeRC.Info(ctx)
	if err != nil {
		t.Fatalf("node-1: Info of replica %s: %v", rid, err)
	}
	if after.Epoch != info.Epoch || after.DirtyExtents != info.DirtyExtents {
		t.Errorf("replica %s changed under the ctl certificate's refused calls: %+v, then %+v", rid, info, after)
	}
	got := make([]byte, len(ones))
	if err := nodeRC.ReadAt(ctx, after.Epoch, got, 0); err != nil {
		t.Errorf("node-1: read replica %s: %v", rid, err)
	} else if !bytes.Equal(got, make([]byte, len(got))) {
		t.Errorf("replica %s holds data the ctl certificate's refused write carried", rid)
	}

	// e. The Raft port: node certificates only.
	if err := raftRefuses(raftAddr, ctl.ClientConfig()); err != nil {
		t.Errorf("raft: ctl certificate: %v", err)
	}
	if err := raftRefuses(raftAddr, mon.ClientConfig()); err != nil {
		t.Errorf("raft: monitor certificate: %v", err)
	}
	if err := raftRefuses(raftAddr, stranger.ClientConfig()); err != nil {
		t.Errorf("raft: another CA's ctl certificate: %v", err)
	}
	if err := raftClosesGarbage(raftAddr); err != nil {
		t.Errorf("raft: plaintext: %v", err)
	}
	// A node certificate of a node that is no store member: raft would
	// follow its AppendEntries if it posed as a leader with a newer term.
	if err := raftRefuses(raftAddr, node2.ClientConfig()); err != nil {
		t.Errorf("raft: node-2's certificate (no store member): %v", err)
	}
	// Control: a member's certificate is admitted; the connection stays
	// open while the node waits for the raft preamble.
	if err := raftKeepsOpen(raftAddr, node1.ClientConfig()); err != nil {
		t.Errorf("raft: node-1's certificate (a member): %v", err)
	}

	// The store still serves its own node's calls.
	if _, err := c.Volume(ctx, vol.ID); err != nil {
		t.Errorf("ctl: read volume %s at the end: %v", vol.ID, err)
	}
}

// TestTLSClusterServesVolumeIO: three node agents in mutual TLS form a
// cluster (Info and Join between members, Raft), and each node's realizer
// creates its replica of a three-replica volume and records its
// generation through the meta API: every link between them works in TLS.
func TestTLSClusterServesVolumeIO(t *testing.T) {
	dir := t.TempDir()
	pkiDir := filepath.Join(dir, "pki")
	ca, err := pki.InitCA(pkiDir, "cairn-test", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"node-1", "node-2", "node-3"}
	creds := map[string]*pki.Credentials{}
	for _, id := range ids {
		creds[id] = issue(t, ca, pkiDir, pki.RoleNode, id)
	}
	ctl := issue(t, ca, pkiDir, pki.RoleCtl, "ctl")
	addrs, err := loopback.Addrs(len(ids), 3)
	if err != nil {
		t.Fatal(err)
	}
	var peers, apis []string
	for _, a := range addrs {
		peers = append(peers, a[1])
	}
	for i, id := range ids {
		a := startTLSAgent(t, dir, id, addrs[i], creds[id], len(ids), peers)
		apis = append(apis, a.APIAddr())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	c := metaClient(t, strings.Join(apis, ","), ctl)
	waitLeader(ctx, t, c)
	for _, id := range ids {
		waitRegistered(ctx, t, c, id)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Members) != len(ids) {
		t.Fatalf("raft members %+v, want %d", st.Members, len(ids))
	}
	res, err := c.Apply(ctx, &meta.CreateVolume{Name: "tls-3", SizeBytes: 16 << 20, Replicas: 3})
	if err != nil {
		t.Fatalf("ctl: create a volume: %v", err)
	}
	vol := waitGeneration(ctx, t, c, res.Volume.ID)
	dataAddr := map[string]string{}
	for i, id := range ids {
		dataAddr[id] = addrs[i][2]
	}
	for _, r := range vol.Replicas {
		if r.State != meta.ReplicaHealthy {
			t.Errorf("replica %s on %s is %s", r.ID, r.Node, r.State)
		}
		// Dialled by another node, as an engine or a rebuild would.
		from := ids[(slices.Index(ids, r.Node)+1)%len(ids)]
		rc := dialReplica(t, dataAddr[r.Node], r.ID, creds[from])
		info, err := rc.Info(ctx)
		if err != nil {
			t.Errorf("%s: Info of replica %s on %s: %v", from, r.ID, r.Node, err)
			continue
		}
		if info.Generation != r.Generation {
			t.Errorf("replica %s on %s has generation %q, the store %q", r.ID, r.Node, info.Generation, r.Generation)
		}
		t.Logf("replica %s on %s: %d bytes, generation %s, read by %s", r.ID, r.Node, info.Size, info.Generation, from)
	}
}

// issue issues a certificate for role/name from ca into dir and loads it.
func issue(t *testing.T, ca *pki.CA, dir, role, name string) *pki.Credentials {
	t.Helper()
	f := pki.FilesIn(dir, name)
	if err := ca.Issue(pki.Identity{Role: role, Name: name}, time.Hour, f); err != nil {
		t.Fatal(err)
	}
	return load(t, f)
}

func load(t *testing.T, f pki.Files) *pki.Credentials {
	t.Helper()
	creds, err := pki.Load(f)
	if err != nil {
		t.Fatal(err)
	}
	return creds
}

// startTLSAgent starts node agent id on addrs (raft, API, data) with creds,
// without CSI (no FUSE: no root needed), and closes it at the end.
func startTLSAgent(t *testing.T, dir, id string, addrs []string, creds *pki.Credentials, expect int, peers []string) *agent.Agent {
	t.Helper()
	a, err := agent.Start(agent.Config{
		ID: id, DataDir: filepath.Join(dir, id),
		RaftAddr: addrs[0], APIAddr: addrs[1], DataAddr: addrs[2],
		BootstrapExpect: expect, Peers: peers, RaftTimeoutMultiplier: 0.2,
		HeartbeatInterval: 200 * time.Millisecond, NodeDownAfter: time.Hour, StaleReplicaTimeout: time.Hour,
		IOSchedDepth: 256, IOSchedSpareWhileReserved: 2,
		TLS:     creds,
		Version: "test", Logger: zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).With(zap.String("agent", id)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := a.Close(); err != nil {
			t.Errorf("agent %s Close: %v", id, err)
		}
	})
	return a
}

// metaClient is a meta client of addrs (comma-separated) presenting creds
// (nil: plaintext), closed at the end.
func metaClient(t *testing.T, addrs string, creds *pki.Credentials) *meta.Client {
	t.Helper()
	c, err := meta.NewClient(strings.Split(addrs, ","), meta.WithTLS(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// waitLeader waits up to 20 s for the cluster to have a leader.
func waitLeader(ctx context.Context, t *testing.T, c *meta.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		st, err := c.Status(ctx)
		if err == nil && st.Leader != "" {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("no leader within 20 s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitRegistered waits for node id's first heartbeat to register it.
func waitRegistered(ctx context.Context, t *testing.T, c *meta.Client, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		st, err := c.State(ctx, true)
		if err == nil && st.Nodes[id] != nil && st.Nodes[id].DataAddr != "" && st.Nodes[id].CapacityBytes > 0 {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%s did not register within 20 s: %v", id, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitGeneration waits until every replica of volume id has its generation
// recorded: its node's realizer created it and told the store.
func waitGeneration(ctx context.Context, t *testing.T, c *meta.Client, id string) *meta.Volume {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	for {
		v, err := c.Volume(ctx, id)
		if err == nil && !slices.ContainsFunc(v.Replicas, func(r meta.Replica) bool { return r.Generation == "" }) {
			return v
		}
		if ctx.Err() != nil {
			t.Fatalf("the replicas of volume %s were not all created within 20 s: %+v, %v", id, v, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func refusedStatus(t *testing.T, c *meta.Client) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), refusedWithin)
	defer cancel()
	_, err := c.Status(ctx)
	return err
}

func refusedApply(t *testing.T, c *meta.Client, cmd meta.Command) (meta.Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), refusedWithin)
	defer cancel()
	return c.Apply(ctx, cmd)
}

func refusedHeartbeat(t *testing.T, c *meta.Client, req *meta.HeartbeatRequest) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), refusedWithin)
	defer cancel()
	return c.Heartbeat(ctx, req)
}

func refusedJoin(t *testing.T, c *meta.Client, req *meta.JoinRequest) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), refusedWithin)
	defer cancel()
	_, err := c.Join(ctx, req)
	return err
}

// expectUnauthorized checks that what was refused, was refused for the
// caller's role or name, and at once rather than at the deadline.
func expectUnauthorized(t *testing.T, what string, err error) {
	t.Helper()
	switch {
	case err == nil:
		t.Errorf("%s: accepted", what)
	case !meta.IsUnauthorized(err):
		t.Errorf("%s: failed with %v; want an error meta.IsUnauthorized recognizes", what, err)
	default:
		t.Logf("%s: refused: %v", what, err)
	}
}

// tryDialReplica dials replica id at addr with creds (nil: plaintext).
func tryDialReplica(addr, id string, creds *pki.Credentials) (*replica.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), refusedWithin)
	defer cancel()
	return replica.Dial(ctx, addr, id, 0, replica.WithTLS(creds))
}

func dialReplica(t *testing.T, addr, id string, creds *pki.Credentials) *replica.Client {
	t.Helper()
	rc, err := tryDialReplica(addr, id, creds)
	if err != nil {
		t.Fatalf("dial replica %s at %s as %s: %v", id, addr, creds.Identity(), err)
	}
	t.Cleanup(func() { rc.Close() })
	return rc
}

func pingReplica(rc *replica.Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), refusedWithin)
	defer cancel()
	return rc.Ping(ctx)
}

// raftRefuses dials the raft port with cfg and reports an error unless the
// handshake fails or the node closes the connection at once.
func raftRefuses(addr string, cfg *tls.Config) error {
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return nil // the handshake failed
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	var b [1]byte
	n, err := conn.Read(b[:])
	if err == nil {
		return fmt.Errorf("the node sent %d bytes to a connection it should refuse", n)
	}
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return errors.New("the node kept the connection open for 5 s")
	}
	return nil
}

// raftClosesGarbage sends plaintext garbage to the raft port and reports an
// error unless the node closes the connection within 5 s.
func raftClosesGarbage(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	// Something that is not a TLS record: a raft preamble in plaintext.
	if _, err := conn.Write(append([]byte{9}, "127.0.0.1"...)); err != nil {
		return nil // closed already
	}
	var b [64]byte
	for {
		_, err := conn.Read(b[:])
		if err == nil {
			continue // a TLS alert, say
		}
		if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
			return errors.New("the node kept a plaintext connection open for 5 s")
		}
		return nil
	}
}

// raftKeepsOpen dials the raft port with cfg and reports an error unless
// the connection is still open a moment after the handshake.
func raftKeepsOpen(addr string, cfg *tls.Config) error {
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	var b [1]byte
	_, err = conn.Read(b[:])
	if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
		return nil
	}
	return fmt.Errorf("the node closed a node's connection: %v", err)
}
