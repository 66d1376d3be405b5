package meta

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"

	"github.com/cairn-csi/cairn/replication/crypt"
)

// NodeState is the liveness of a storage node as the leader last judged it.
type NodeState string

// Node states.
const (
	NodeUp       NodeState = "up"
	NodeDown     NodeState = "down"
	NodeDraining NodeState = "draining"
)

// Node is one storage node: a member of the cluster with a data disk.
type Node struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	APIAddr  string `json:"api_addr"`
	// DataAddr is where the node's replica server listens (empty until it has one).
	DataAddr string    `json:"data_addr,omitempty"`
	Zone     string    `json:"zone,omitempty"`
	Region   string    `json:"region,omitempty"`
	State    NodeState `json:"state"`
	// CapacityBytes and FreeBytes describe the node's data disk.
	CapacityBytes uint64 `json:"capacity_bytes"`
	FreeBytes     uint64 `json:"free_bytes"`
	// ReservableIOPS is what the node's disks can promise to guaranteed
	// volumes (SetNodeReservable; admission.go).
	ReservableIOPS uint64 `json:"reservable_iops,omitempty"`
	// Disks are the node's data disks of a type other than the default,
	// by type (SetNodeDisks; disktypes.go). CapacityBytes and FreeBytes
	// are the default one's.
	Disks map[string]DiskSpace `json:"disks,omitempty"`
	// Dedup says, by disk type ("" for the default disk), whether the
	// node's data directory of that disk can share blocks between files:
	// "" yes, otherwise why not (SetNodeDedup; dedup.go). A type it has
	// not reported is taken as no.
	Dedup map[string]string `json:"dedup,omitempty"`
	// Features are what the node's build can do for a volume beyond what
	// every build does (SetNodeFeatures; features.go), sorted.
	Features []string `json:"features,omitempty"`
	// LastHeartbeat is the leader's clock (unix nanoseconds) at the node's last
	// recorded heartbeat. The leader records heartbeats in memory and commits
	// them only with state or capacity changes, so this lags by design.
	LastHeartbeat int64 `json:"last_heartbeat"`
}

// VolumeState is a volume's lifecycle state.
type VolumeState string

// Volume lifecycle states.
const (
	VolumePending      VolumeState = "pending"
	VolumeProvisioning VolumeState = "provisioning"
	VolumeAvailable    VolumeState = "available"
	VolumeAttached     VolumeState = "attached"
	VolumeReleasing    VolumeState = "releasing"
	VolumeDeleted      VolumeState = "deleted"
	VolumeFailed       VolumeState = "failed"
)

// volumeTransitions is the volume lifecycle: the only legal moves. A state
// machine is data, checked in one function (checkTransition).
var volumeTransitions = map[VolumeState][]VolumeState{
	VolumePending:      {VolumeProvisioning, VolumeAvailable, VolumeFailed, VolumeDeleted},
	VolumeProvisioning: {VolumeAvailable, VolumeFailed, VolumeDeleted},
	VolumeAvailable:    {VolumeAttached, VolumeDeleted, VolumeFailed},
	VolumeAttached:     {VolumeReleasing, VolumeAvailable, VolumeFailed},
	VolumeReleasing:    {VolumeAvailable, VolumeFailed},
	VolumeFailed:       {VolumeAvailable, VolumeDeleted},
	VolumeDeleted:      {},
}

// checkTransition returns ErrIllegalTransition unless from → to is in the table.
func checkTransition(from, to VolumeState) error {
	for _, s := range volumeTransitions[from] {
		if s == to {
			return nil
		}
	}
	return fmt.Errorf("volume %s → %s: %w", from, to, ErrIllegalTransition)
}

// ReplicaState is the state of one replica within its volume's replica set.
type ReplicaState string

// Replica states.
const (
	ReplicaHealthy    ReplicaState = "healthy"
	ReplicaRebuilding ReplicaState = "rebuilding"
	ReplicaStale      ReplicaState = "stale"
	ReplicaFailed     ReplicaState = "failed"
	// ReplicaFollowing: a replica of an asynchronous volume that receives
	// the writes after they were acknowledged (docs/replication-modes.md).
	// It may lack the latest acknowledged writes, so it is never a
	// source, and a volume whose healthy replicas are all on nodes that
	// are down is attached again only after `ctl volume promote
	// --accept-data-loss` (PromoteVolume).
	ReplicaFollowing ReplicaState = "following"
)

// replicaTransitions lists legal replica state moves.
var replicaTransitions = map[ReplicaState][]ReplicaState{
	ReplicaHealthy:    {ReplicaStale, ReplicaFailed, ReplicaFollowing},
	ReplicaRebuilding: {ReplicaHealthy, ReplicaFailed, ReplicaStale},
	ReplicaStale:      {ReplicaRebuilding, ReplicaFailed},
	ReplicaFailed:     {ReplicaRebuilding},
	ReplicaFollowing:  {ReplicaHealthy, ReplicaFailed, ReplicaStale},
}

func checkReplicaTransition(from, to ReplicaState) error {
	for _, s := range replicaTransitions[from] {
		if s == to {
			return nil
		}
	}
	return fmt.Errorf("replica %s → %s: %w", from, to, ErrIllegalTransition)
}

// Replica is one copy of a volume on one node.
type Replica struct {
	ID    string       `json:"id"`
	Node  string       `json:"node"`
	State ReplicaState `json:"state"`
	// Generation is the generation of the copy on the node's disk that
	// this replica stands for: drawn at random when that copy was created
	// and kept in its meta file (see replication/replica/replica.go), set
	// here by SetReplicaGeneration. Empty until it is first recorded. A
	// healthy replica whose copy on disk has another generation, or none,
	// has lost the data the store trusts it with.
	Generation string `json:"generation,omitempty"`
	// Source, for a replica of a restored volume placed where the
	// snapshot's layers are, names the replica on the same node it is made
	// from (RestoreVolume); the node makes it by hard links, not blank.
	Source string `json:"source,omitempty"`
	// Lag is how far a following replica was behind at the engine's last
	// report (ReportLag); nil for the others.
	Lag *ReplicaLag `json:"lag,omitempty"`
	// Space is what the replica takes on its node's disk, as its node
	// last reported (RecordReplicaSpace; reported for volumes with
	// deduplication); nil for none.
	Space *ReplicaSpace `json:"space,omitempty"`
}

// Attachment says which node's engine may write a volume.
type Attachment struct {
	Node     string `json:"node"`
	ReadOnly bool   `json:"read_only,omitempty"`
	// NBDSocket is the unix socket the node exports the volume on, if any.
	NBDSocket string `json:"nbd_socket,omitempty"`
}

// RebuildProgress is the progress of a replica rebuild, for operators.
type RebuildProgress struct {
	ReplicaID     string `json:"replica_id"`
	BytesTotal    uint64 `json:"bytes_total"`
	BytesCompared uint64 `json:"bytes_compared"`
	BytesCopied   uint64 `json:"bytes_copied"`
	Done          bool   `json:"done,omitempty"`
}

// VolumeCondition is set while a volume's data is known damaged: a block
// that verified on no replica. nil: normal.
type VolumeCondition struct {
	Abnormal bool   `json:"abnormal"`
	Message  string `json:"message,omitempty"`
}

// ScrubProgress is the progress and outcome of a volume's latest scrub, for
// operators (cairn ctl volume scrub).
type ScrubProgress struct {
	// Seq numbers the scrubs of the volume; a requested scrub waits for a
	// Seq above the one it saw.
	Seq           uint64 `json:"seq"`
	BlocksTotal   uint64 `json:"blocks_total"`
	BlocksChecked uint64 `json:"blocks_checked"`
	Repaired      uint64 `json:"repaired"`
	Unrecoverable uint64 `json:"unrecoverable"`
	Done          bool   `json:"done,omitempty"`
	Error         string `json:"error,omitempty"`
	StartedAt     int64  `json:"started_at,omitempty"`
	FinishedAt    int64  `json:"finished_at,omitempty"`
}

// Volume is a replicated block volume.
type Volume struct {
	ID         string            `json:"id"`
	Name       string            `json:"name"` // CSI name: the idempotency key
	SizeBytes  uint64            `json:"size"`
	Parameters map[string]string `json:"parameters,omitempty"`
	AccessType string            `json:"access_type,omitempty"` // "mount" or "block"
	State      VolumeState       `json:"state"`
	// ReplicaCount is the desired number of replicas.
	ReplicaCount int `json:"replica_count"`
	// WriteQuorum is the least number of healthy replicas a write needs.
	WriteQuorum int       `json:"write_quorum"`
	Replicas    []Replica `json:"replicas"`
	// Epoch increments with every change of replica set or attachment; engines
	// and replicas use it to fence stale writers.
	Epoch         uint64           `json:"epoch"`
	Attachment    *Attachment      `json:"attachment,omitempty"`
	ContentSource string           `json:"content_source,omitempty"`
	Rebuild       *RebuildProgress `json:"rebuild,omitempty"`
	// Condition is set while the volume's data is known damaged.
	Condition *VolumeCondition `json:"condition,omitempty"`
	// Scrub is the latest scrub's progress.
	Scrub *ScrubProgress `json:"scrub,omitempty"`
	// NextReplicaSeq numbers replicas so that a replacement never reuses an id.
	NextReplicaSeq int   `json:"next_replica_seq"`
	CreatedAt      int64 `json:"created_at"`
	// RestoredFrom is the snapshot a restored volume's replicas with a
	// Source are made from (RestoreVolume).
	RestoredFrom string `json:"restored_from,omitempty"`
	// Usage is the space a replica of the volume takes, as last reported.
	Usage *VolumeUsage `json:"usage,omitempty"`
	// Hidden: deleted by its user while snapshots of it remain
	// (RetireVolume). Its name is free and users do not see it; it stays,
	// with its replicas, until DeleteSnapshot removes the last snapshot.
	Hidden bool `json:"hidden,omitempty"`
	// Encryption is the wrapped data key of an encrypted volume
	// (docs/encryption.md); a restore or clone shares its source's.
	Encryption *crypt.WrappedKey `json:"encryption,omitempty"`
}

// Snapshot is a point-in-time copy of a volume (docs/snapshots.md).
// CreateSnapshot records the request; the node serving the volume takes
// it and SetSnapshotReady records the replicas that hold it.
type Snapshot struct {
	ID             string `json:"id"`
	Name           string `json:"name"`
	SourceVolumeID string `json:"source_volume_id"`
	SizeBytes      uint64 `json:"size"`
	CreatedAt      int64  `json:"created_at"`
	ReadyToUse     bool   `json:"ready_to_use"`
	// Replicas are the ids of the source's replicas that sealed it.
	Replicas []string `json:"replicas,omitempty"`
	// Error says why the snapshot could not be taken yet (it is retried).
	Error string `json:"error,omitempty"`
	// Deleting: deleted by its user; its layers are being removed, and
	// the record goes once they are (DeleteSnapshot).
	Deleting bool `json:"deleting,omitempty"`
	// Space is what the snapshot takes on one replica, as last reported
	// (RecordUsage); nil until then.
	Space *SnapshotSpace `json:"space,omitempty"`
}

// SnapshotSpace is what a snapshot's layer takes on a replica: what it
// holds, and what it alone holds (the space deleting it would free).
type SnapshotSpace struct {
	HeldBytes  uint64 `json:"held_bytes"`
	AloneBytes uint64 `json:"alone_bytes"`
}

// VolumeUsage is the disk space one of a volume's replicas takes on its
// node, snapshots' layers included, as last reported (RecordUsage).
type VolumeUsage struct {
	ReplicaID      string `json:"replica_id"`
	AllocatedBytes uint64 `json:"allocated_bytes"`
	// Depth is the number of layers in the replica's chain, the head
	// included (docs/snapshots.md, "Chain depth and flattening"); 0 if the
	// node that reported did not say.
	Depth int `json:"depth,omitempty"`
	// Flatten is the progress of a flatten running on that replica: Layer
	// is the layer flattened into.
	Flatten *LayerProgress `json:"flatten,omitempty"`
	// Merge is the progress of a snapshot deletion's merge running on that
	// replica: Layer is the snapshot.
	Merge *LayerProgress `json:"merge,omitempty"`
}

// LayerProgress is how far a long operation on a replica's layers has
// gone, in bytes of the volume.
type LayerProgress struct {
	Layer      string `json:"layer"`
	DoneBytes  uint64 `json:"done_bytes"`
	TotalBytes uint64 `json:"total_bytes"`
}

// HiddenSnapshotPrefix starts the names of the snapshots Cairn takes for
// itself (a clone is restored from one): users do not see them.
const HiddenSnapshotPrefix = "cairn-internal-"

// Hidden reports whether users should not see sn: deleted by them, or one
// Cairn took for itself.
func (sn *Snapshot) Hidden() bool {
	return sn.Deleting || strings.HasPrefix(sn.Name, HiddenSnapshotPrefix)
}

// State is the whole replicated state of the store. Only the FSM mutates it,
// and only inside Apply.
type State struct {
	ClusterID string `json:"cluster_id"`
	// OverProvisioningRatio bounds thin provisioning: the replicas placed on
	// a node may add up to its capacity times this ratio (0 means 1).
	OverProvisioningRatio float64              `json:"over_provisioning_ratio"`
	Nodes                 map[string]*Node     `json:"nodes"`
	Volumes               map[string]*Volume   `json:"volumes"`
	Snapshots             map[string]*Snapshot `json:"snapshots"`
	// NonceLeases counts the nonce leases handed out (LeaseNonces): each
	// number is given once in the cluster's life.
	NonceLeases uint64 `json:"nonce_leases,omitempty"`
	// MaxCommandType is the highest gated command type (gate.go) applied
	// so far: every member must read entries up to it already, so later
	// entries of these types need no word from a silent member.
	MaxCommandType CommandType `json:"max_command_type,omitempty"`
	// Requests remembers the results of the most recent client requests, in
	// the order they were applied, so that a request sent twice is applied
	// once (see Request). Bounded by MaxRememberedRequests.
	Requests []RequestRecord `json:"requests,omitempty"`
	// requestIndex maps a request id to its position in Requests plus
	// requestBase (the number of records forgotten since the index was
	// built); rebuilt when needed, never serialized.
	requestIndex map[string]int
	requestBase  int
	// index holds per-node sums and a name index over Volumes
	// (placementIndex); never serialized nor cloned.
	index *placementIndex
}

// RequestRecord is the remembered result of one client request.
type RequestRecord struct {
	ID     string     `json:"id"`
	Result Result     `json:"result"`
	Err    *WireError `json:"error,omitempty"`
}

// MaxRememberedRequests bounds State.Requests. A client retries for
// seconds, while this many requests take far longer to pass.
const MaxRememberedRequests = 4096

// NewState returns an empty state.
func NewState() *State {
	return &State{
		Nodes:     map[string]*Node{},
		Volumes:   map[string]*Volume{},
		Snapshots: map[string]*Snapshot{},
	}
}

// Clone returns a deep copy of v.
func (v *Volume) Clone() *Volume {
	c := *v
	if v.Parameters != nil {
		c.Parameters = make(map[string]string, len(v.Parameters))
		for k, val := range v.Parameters {
			c.Parameters[k] = val
		}
	}
	c.Replicas = append([]Replica(nil), v.Replicas...)
	for i, r := range c.Replicas {
		if r.Space != nil {
			sp := *r.Space
			c.Replicas[i].Space = &sp
		}
		if r.Lag != nil {
			l := *r.Lag
			c.Replicas[i].Lag = &l
		}
	}
	c.Encryption = v.Encryption.Clone()
	if v.Attachment != nil {
		a := *v.Attachment
		c.Attachment = &a
	}
	if v.Rebuild != nil {
		r := *v.Rebuild
		c.Rebuild = &r
	}
	if v.Condition != nil {
		x := *v.Condition
		c.Condition = &x
	}
	if v.Scrub != nil {
		x := *v.Scrub
		c.Scrub = &x
	}
	if v.Usage != nil {
		x := *v.Usage
		if x.Flatten != nil {
			f := *x.Flatten
			x.Flatten = &f
		}
		if x.Merge != nil {
			m := *x.Merge
			x.Merge = &m
		}
		c.Usage = &x
	}
	return &c
}

// HealthyReplicas counts the replicas in state healthy.
func (v *Volume) HealthyReplicas() int {
	n := 0
	for _, r := range v.Replicas {
		if r.State == ReplicaHealthy {
			n++
		}
	}
	return n
}

// Clone returns a deep copy of the state.
func (s *State) Clone() *State {
	c := NewState()
	c.ClusterID = s.ClusterID
	c.OverProvisioningRatio = s.OverProvisioningRatio
	c.NonceLeases = s.NonceLeases
	c.MaxCommandType = s.MaxCommandType
	for id, n := range s.Nodes {
		nc := *n
		nc.Disks = maps.Clone(n.Disks)
		nc.Dedup = maps.Clone(n.Dedup)
		nc.Features = slices.Clone(n.Features)
		c.Nodes[id] = &nc
	}
	for id, v := range s.Volumes {
		c.Volumes[id] = v.Clone()
	}
	for id, sn := range s.Snapshots {
		sc := *sn
		sc.Replicas = slices.Clone(sn.Replicas)
		if sn.Space != nil {
			sp := *sn.Space
			sc.Space = &sp
		}
		c.Snapshots[id] = &sc
	}
	c.Requests = append([]RequestRecord(nil), s.Requests...)
	return c
}

// SortedNodes returns the nodes ordered by id.
func (s *State) SortedNodes() []*Node {
	out := make([]*Node, 0, len(s.Nodes))
	for _, n := range s.Nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// SortedVolumes returns the volumes that are not deleted, ordered by id.
func (s *State) SortedVolumes() []*Volume {
	out := make([]*Volume, 0, len(s.Volumes))
	for _, v := range s.Volumes {
		if v.State != VolumeDeleted {
			out = append(out, v)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// volumeByName finds a live (not deleted) volume by CSI name.
func (s *State) volumeByName(name string) *Volume {
	if id, ok := s.placementIndex().byName[name]; ok {
		return s.Volumes[id]
	}
	return nil
}
