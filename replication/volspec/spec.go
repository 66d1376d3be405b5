package volspec

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cairn-csi/cairn/replication/cron"
)

// Parameter keys (StorageClass parameters of the same names).
const (
	KeyReplicas            = "replicas"
	KeyWriteQuorum         = "writeQuorum"
	KeyDataLocality        = "dataLocality"
	KeyStaleReplicaTimeout = "staleReplicaTimeout"
	KeyMaxIOPS             = "maxIOPS"
	KeyMinIOPS             = "minIOPS"
	KeyMaxBandwidth        = "maxBandwidth"
	KeyBurstDuration       = "burstDuration"
	KeyFSType              = "csi.storage.k8s.io/fstype"
	KeyChecksumAlgorithm   = "checksumAlgorithm"
	KeySnapshotSchedule    = "snapshotSchedule"
	KeySnapshotRetain      = "snapshotRetain"
	KeySnapshotLimit       = "snapshotLimit"
	KeyQoSClass            = "qosClass"
	KeyConsistencyLevel    = "consistencyLevel"
	KeyReplicationMode     = "replicationMode"
	KeyEncryption          = "encryption"
	KeyDeduplication       = "deduplication"
	KeyCompression         = "compression"
	KeyDiskType            = "type"

	// Synonyms, as the design's StorageClass spells them (request form
	// only: the stored form keeps the key each one stands for).
	KeyReplicationFactor = "replicationFactor" // replicas
	KeyIOPS              = "iops"              // maxIOPS
	KeyThroughput        = "throughput"        // maxBandwidth
)

// synonyms maps each synonym to the key it stands for. Giving both with
// values that mean different things is refused.
var synonyms = map[string]string{
	KeyReplicationFactor: KeyReplicas,
	KeyIOPS:              KeyMaxIOPS,
	KeyThroughput:        KeyMaxBandwidth,
}

// sidecarPrefix marks the keys the CSI sidecars add (pvc and pv names from
// --extra-create-metadata, secrets' names …); Parse ignores them, except
// KeyFSType.
const sidecarPrefix = "csi.storage.k8s.io/"

// Values and bounds.
const (
	DefaultReplicas = 3
	MaxReplicas     = 5

	// LocalityDisabled places replicas by zone spread and balance alone.
	LocalityDisabled = "disabled"
	// LocalityBestEffort also puts one replica on the node that consumes the
	// volume, when it has room (replication/placement, rule 3). It is the
	// default: under WaitForFirstConsumer the pod's node then reads its own
	// replica, and a node without a suitable disk is simply passed over.
	LocalityBestEffort = "best-effort"

	// ChecksumCRC32C keeps a CRC32C per 4 KiB block on every replica and
	// checks it on the wire and on every read (docs/integrity.md). The
	// default.
	ChecksumCRC32C = "crc32c"
	// ChecksumNone keeps no block checksums.
	ChecksumNone = "none"

	FSExt4 = "ext4"
	FSXFS  = "xfs"

	// DefaultSnapshotRetain is how many scheduled snapshots of a volume
	// are kept when snapshotRetain is not given.
	DefaultSnapshotRetain = 7
	// DefaultSnapshotLimit bounds a volume's snapshots when snapshotLimit
	// is not given, and MaxSnapshotLimit when it is: a replica's chain
	// holds at most 256 layers (replication/layer), and a restored
	// volume's chain starts with its source's.
	DefaultSnapshotLimit = 64
	MaxSnapshotLimit     = 128

	// QoS classes (docs/architecture.md, "StorageClass parameters", has
	// each one's promise). Burstable, the default: limits, a reservation
	// if minIOPS is given, the default share of spare capacity. Best
	// effort: no reservation and a quarter of the default share
	// (BestEffortWeight). Guaranteed: minIOPS is required, and the volume
	// is admitted only on nodes whose disks can still promise it
	// (replication/placement, ReserveIOPS).
	QoSBurstable  = "burstable"
	QoSBestEffort = "besteffort"
	QoSGuaranteed = "guaranteed"
	// BestEffortWeight is a best-effort volume's share of spare capacity,
	// against iosched.DefaultWeight (100) for the others.
	BestEffortWeight = 25

	ConsistencyStrong   = "strong"
	ConsistencyEventual = "eventual"
	ReplicationSync     = "synchronous"
	ReplicationAsync    = "asynchronous"
	EncryptionNone      = "none"
	EncryptionAESGCM    = "aes-256-gcm"
	CompressionNone     = "none"
	CompressionLZ4      = "lz4"
	DiskTypeDefault     = "default"
)

// ErrInvalid is wrapped by every error of this package. replication/meta
// uses it as its ErrInvalidArgument, so a refusal keeps its code wherever it
// is made.
var ErrInvalid = errors.New("invalid argument")

// Error is a refused parameter.
type Error struct {
	Key string
	// Problem says what is wrong with the value and what would do.
	Problem string
}

func (e *Error) Error() string {
	return fmt.Sprintf("parameter %q: %s: %v", e.Key, e.Problem, ErrInvalid)
}

func (e *Error) Unwrap() error { return ErrInvalid }

// Spec is a volume's parameters, typed.
type Spec struct {
	// Replicas is the number of full copies, 1 to MaxReplicas.
	Replicas int
	// WriteQuorum is how many replicas acknowledge a write; 0 is a majority.
	WriteQuorum int
	// DataLocality is LocalityDisabled or LocalityBestEffort.
	DataLocality string
	// Encryption is EncryptionAESGCM, or "" for none.
	Encryption string
	// StaleReplicaTimeout is how long a replica's node may be down before
	// the replica is replaced; 0 is the cluster's default.
	StaleReplicaTimeout time.Duration
	QoS                 QoS
	// FSType is the filesystem of a mount volume; "" leaves it to the
	// volume capability (or the node's default).
	FSType string
	// ChecksumAlgorithm is ChecksumCRC32C or ChecksumNone.
	ChecksumAlgorithm string
	// SnapshotSchedule is a 5-field cron expression (replication/cron),
	// in UTC, with its fields separated by one space; "" takes no
	// scheduled snapshots. The store's leader takes them.
	SnapshotSchedule string
	// SnapshotRetain is how many scheduled snapshots to keep; 0 is
	// DefaultSnapshotRetain (see Retain).
	SnapshotRetain int
	// SnapshotLimit is how many snapshots the volume may have; 0 is
	// DefaultSnapshotLimit (see Limit).
	SnapshotLimit int
	// DiskType is the type of the disks the volume's replicas go on, ""
	// for DiskTypeDefault.
	DiskType string
	// ConsistencyLevel is ConsistencyEventual, or "" for
	// ConsistencyStrong (the default). Eventual lets a read use the
	// engine's own replica while it follows (asynchronous mode), which may
	// miss the latest writes; with synchronous replication every replica a
	// read may use holds every acknowledged write, so both read the same
	// (docs/replication-modes.md).
	ConsistencyLevel string
	// ReplicationMode is ReplicationAsync, or "" for ReplicationSync (the
	// default): asynchronously, a write is acknowledged once the write
	// quorum (default 1: the engine's own replica) has it, and the other
	// replicas follow from a bounded queue.
	ReplicationMode string
	// Deduplication puts the replicas on data directories that can share
	// blocks between files, where the node's background pass shares the
	// equal extents of the volumes that have it on (replication/dedup).
	Deduplication bool
	// Compression is CompressionLZ4, or "" for CompressionNone (the
	// default): each replica keeps its data LZ4-compressed per 64 KiB
	// extent (docs/compression.md).
	Compression string
}

// Async reports whether the volume is replicated asynchronously.
func (s Spec) Async() bool { return s.ReplicationMode == ReplicationAsync }

// QoS are a volume's I/O limits; zero means unlimited (or the scheduler's
// default burst of one second). Comparable: the engine compares the limits it
// reads with those it last gave the scheduler.
type QoS struct {
	MaxIOPS, MinIOPS uint64
	MaxBytesPerSec   uint64
	BurstDuration    time.Duration
	// Class is QoSBestEffort, or "" for QoSBurstable (the default).
	Class string
}

// Weight is the volume's share of the disks' spare capacity for the
// scheduler (iosched.Limits.Weight; 0 is the default share).
func (q QoS) Weight() uint32 {
	if q.Class == QoSBestEffort {
		return BestEffortWeight
	}
	return 0
}

// Default is the spec of a StorageClass without parameters.
func Default() Spec {
	return Spec{Replicas: DefaultReplicas, DataLocality: LocalityBestEffort, ChecksumAlgorithm: ChecksumCRC32C}
}

// Encrypted reports whether the volume's blocks are encrypted at rest.
func (s Spec) Encrypted() bool { return s.Encryption == EncryptionAESGCM }

// Checksummed reports whether the volume keeps block checksums.
func (s Spec) Checksummed() bool { return s.ChecksumAlgorithm == ChecksumCRC32C }

// Schedule returns the volume's snapshot schedule, or nil when it has none.
// A spec from Parse or Decode without an error always parses.
func (s Spec) Schedule() (*cron.Schedule, error) {
	if s.SnapshotSchedule == "" {
		return nil, nil
	}
	return cron.Parse(s.SnapshotSchedule)
}

// Limit is how many snapshots the volume may have at once, its users' and
// its scheduled ones together.
func (s Spec) Limit() int {
	if s.SnapshotLimit <= 0 {
		return DefaultSnapshotLimit
	}
	return s.SnapshotLimit
}

// Retain is how many scheduled snapshots to keep.
func (s Spec) Retain() int {
	if s.SnapshotRetain <= 0 {
		return DefaultSnapshotRetain
	}
	return s.SnapshotRetain
}

// form says which syntax a value is read in (see doc.go).
type form int

const (
	request form = iota
	stored
)

// param describes one key: how to read it into a Spec and how to write it
// in the stored form.
type param struct {
	key string
	// want says what values are accepted, in each form.
	want, wantStored string
	// mutable: SetParameters (a VolumeAttributesClass, `ctl volume
	// set-qos`) may change it on a live volume.
	mutable bool
	// parse reads v into s; false refuses it.
	parse func(s *Spec, v string, f form) bool
	// why, when set, says what is wrong with a value parse refused, where
	// "want …" alone would not point at the mistake (which field of a
	// cron expression).
	why func(v string) string
	// format writes the stored form; "" leaves the key out. nil: the key is
	// not stored (it travels in typed fields), and Decode ignores it.
	format func(s Spec) string
}

// paramsBase is every key but the synonyms, in the order errors list them.
var paramsBase = []param{
	{key: KeyReplicas, want: fmt.Sprintf("a whole number from 1 to %d", MaxReplicas),
		parse: func(s *Spec, v string, _ form) bool {
			n, err := strconv.Atoi(v)
			s.Replicas = n
			return err == nil && n >= 1 && n <= MaxReplicas
		}},
	{key: KeyWriteQuorum, want: "a whole number from 1 to replicas",
		parse: func(s *Spec, v string, _ form) bool {
			n, err := strconv.Atoi(v)
			s.WriteQuorum = n
			return err == nil && n >= 1 && n <= MaxReplicas
		}},
	{key: KeyDataLocality, want: strconv.Quote(LocalityDisabled) + " or " + strconv.Quote(LocalityBestEffort),
		parse: func(s *Spec, v string, _ form) bool {
			s.DataLocality = v
			return v == LocalityDisabled || v == LocalityBestEffort
		},
		// Always recorded: volumes made before the default was left out
		// must keep matching their CreateVolume retries. It only steers
		// placement, so a retry that differs only here still matches
		// (PlacementOnly): volumes made when the default was "disabled"
		// record that.
		format: func(s Spec) string { return s.DataLocality }},
	{key: KeyStaleReplicaTimeout,
		want:       `a positive duration such as "10m" (a bare number is minutes)`,
		wantStored: `a positive Go duration such as "10m0s"`,
		parse: func(s *Spec, v string, f form) bool {
			d, err := time.ParseDuration(v)
			if f == request {
				if n, nerr := strconv.ParseUint(v, 10, 32); nerr == nil {
					d, err = time.Duration(n)*time.Minute, nil
				}
			}
			s.StaleReplicaTimeout = d
			return err == nil && d > 0
		},
		format: func(s Spec) string { return durationOrEmpty(s.StaleReplicaTimeout) }},
	{key: KeyMaxIOPS, want: "a whole number of I/O operations per second", mutable: true,
		parse:  func(s *Spec, v string, _ form) bool { return parseUint(&s.QoS.MaxIOPS, v) },
		format: func(s Spec) string { return uintOrEmpty(s.QoS.MaxIOPS) }},
	{key: KeyMinIOPS, want: "a whole number of I/O operations per second", mutable: true,
		parse:  func(s *Spec, v string, _ form) bool { return parseUint(&s.QoS.MinIOPS, v) },
		format: func(s Spec) string { return uintOrEmpty(s.QoS.MinIOPS) }},
	{key: KeyMaxBandwidth, mutable: true,
		want:       `bytes per second, a whole number with an optional unit such as "100Mi" (` + unitList + `)`,
		wantStored: "a whole number of bytes per second",
		parse: func(s *Spec, v string, f form) bool {
			if f == stored {
				return parseUint(&s.QoS.MaxBytesPerSec, v)
			}
			n, err := ParseQuantity(v)
			s.QoS.MaxBytesPerSec = n
			return err == nil
		},
		format: func(s Spec) string { return uintOrEmpty(s.QoS.MaxBytesPerSec) }},
	{key: KeyBurstDuration, want: `a positive duration such as "1s"`, mutable: true,
		parse: func(s *Spec, v string, _ form) bool {
			d, err := time.ParseDuration(v)
			s.QoS.BurstDuration = d
			return err == nil && d > 0
		},
		format: func(s Spec) string { return durationOrEmpty(s.QoS.BurstDuration) }},
	{key: KeyFSType, want: strconv.Quote(FSExt4) + " or " + strconv.Quote(FSXFS),
		parse: func(s *Spec, v string, _ form) bool {
			s.FSType = v
			return v == FSExt4 || v == FSXFS
		},
		format: func(s Spec) string { return s.FSType }},
	{key: KeyChecksumAlgorithm, want: strconv.Quote(ChecksumCRC32C) + " or " + strconv.Quote(ChecksumNone),
		parse: func(s *Spec, v string, _ form) bool {
			if v == "" {
				v = ChecksumCRC32C
			}
			// A bad value is kept, so that Checksummed says no to it.
			s.ChecksumAlgorithm = v
			return v == ChecksumCRC32C || v == ChecksumNone
		},
		// Only a choice other than the default is recorded, so volumes
		// created before the key existed keep matching their CreateVolume
		// retries.
		format: func(s Spec) string {
			if s.ChecksumAlgorithm == ChecksumCRC32C {
				return ""
			}
			return s.ChecksumAlgorithm
		}},
	// The schedule is stored as cron reads it back (fields separated by
	// one space), so that two spellings of one schedule record the same map.
	// Not mutable: an older member's SetParameters refuses keys it does not
	// know, so changing it on a live volume needs a gated command first.
	{key: KeySnapshotSchedule,
		want: `a 5-field cron expression in UTC (minute hour day-of-month month day-of-week), such as "0 */6 * * *"`,
		parse: func(s *Spec, v string, _ form) bool {
			s.SnapshotSchedule = ""
			if v == "" {
				return true // no schedule, as when the key is absent
			}
			sched, err := cron.Parse(v)
			if err != nil {
				s.SnapshotSchedule = v
				return false
			}
			s.SnapshotSchedule = sched.String()
			return true
		},
		why: func(v string) string {
			if _, err := cron.Parse(v); err != nil {
				return err.Error()
			}
			return ""
		},
		format: func(s Spec) string { return s.SnapshotSchedule }},
	{key: KeySnapshotRetain, want: fmt.Sprintf("a whole number of scheduled snapshots to keep, 1 or more (default %d)", DefaultSnapshotRetain),
		parse: func(s *Spec, v string, _ form) bool {
			n, err := strconv.Atoi(v)
			s.SnapshotRetain = n
			return err == nil && n >= 1
		},
		format: func(s Spec) string {
			if s.SnapshotRetain <= 0 {
				return ""
			}
			return strconv.Itoa(s.SnapshotRetain)
		}},
	{key: KeySnapshotLimit, want: fmt.Sprintf("a whole number of snapshots the volume may have, 1 to %d (default %d)", MaxSnapshotLimit, DefaultSnapshotLimit),
		parse: func(s *Spec, v string, _ form) bool {
			n, err := strconv.Atoi(v)
			s.SnapshotLimit = n
			return err == nil && n >= 1 && n <= MaxSnapshotLimit
		},
		format: func(s Spec) string {
			if s.SnapshotLimit <= 0 {
				return ""
			}
			return strconv.Itoa(s.SnapshotLimit)
		}},
	// Not mutable: an older member's SetParameters refuses keys it does
	// not know. Recorded only when not the default, so that volumes made
	// before the key existed keep matching their CreateVolume retries.
	{key: KeyQoSClass,
		want: strconv.Quote(QoSBurstable) + " (the default), " + strconv.Quote(QoSBestEffort) + " or " +
			strconv.Quote(QoSGuaranteed) + " (with minIOPS)",
		parse: func(s *Spec, v string, _ form) bool {
			return choose(&s.QoS.Class, v, QoSBurstable, QoSBestEffort, QoSGuaranteed)
		},
		format: func(s Spec) string { return s.QoS.Class }},
	{key: KeyConsistencyLevel, want: strconv.Quote(ConsistencyStrong) + " (the default) or " + strconv.Quote(ConsistencyEventual),
		parse: func(s *Spec, v string, _ form) bool {
			return choose(&s.ConsistencyLevel, v, ConsistencyStrong, ConsistencyEventual)
		},
		format: func(s Spec) string { return s.ConsistencyLevel }},
	// Not mutable (the engine's replica set depends on it). Recorded only
	// when not the default.
	{key: KeyReplicationMode, want: strconv.Quote(ReplicationSync) + " (the default) or " + strconv.Quote(ReplicationAsync),
		parse: func(s *Spec, v string, _ form) bool {
			return choose(&s.ReplicationMode, v, ReplicationSync, ReplicationAsync)
		},
		format: func(s Spec) string { return s.ReplicationMode }},
	// Recorded only when on. The volume's data key, wrapped, is kept
	// beside the parameters (meta.Volume.Encryption; docs/encryption.md).
	{key: KeyEncryption, want: strconv.Quote(EncryptionNone) + " (the default) or " + strconv.Quote(EncryptionAESGCM),
		parse: func(s *Spec, v string, _ form) bool {
			return choose(&s.Encryption, v, EncryptionNone, EncryptionAESGCM)
		},
		format: func(s Spec) string { return s.Encryption }},
	// Not mutable: the volume's replicas were placed on data directories
	// that can share blocks (meta.SetNodeDedup) only if it was on. Recorded
	// only when on.
	{key: KeyDeduplication, want: `"false" (the default) or "true" (replicas go on data directories that can share blocks: xfs with reflink=1 or btrfs)`,
		parse: func(s *Spec, v string, _ form) bool {
			s.Deduplication = v == "true"
			return v == "true" || v == "false"
		},
		format: func(s Spec) string {
			if s.Deduplication {
				return "true"
			}
			return ""
		}},
	// Not mutable: a replica's layers are made compressed or not when it
	// is created (replication/replica, datafile.go). Recorded only when on.
	{key: KeyCompression, want: strconv.Quote(CompressionNone) + " (the default) or " + strconv.Quote(CompressionLZ4) +
		" (each 64 KiB extent stored LZ4-compressed where that saves a 4 KiB block)",
		parse: func(s *Spec, v string, _ form) bool {
			return choose(&s.Compression, v, CompressionNone, CompressionLZ4)
		},
		format: func(s Spec) string { return s.Compression }},
	// Recorded only when not the default.
	{key: KeyDiskType, want: strconv.Quote(DiskTypeDefault) + " or another disk type: 1 to 63 of a-z, 0-9 and - (a node serves it with cairn node --data-dir TYPE=PATH)",
		parse: func(s *Spec, v string, _ form) bool {
			if v == DiskTypeDefault {
				s.DiskType = ""
				return true
			}
			s.DiskType = v
			return ValidDiskType(v)
		},
		format: func(s Spec) string { return s.DiskType }},
}

// params is every key, the synonyms last, in the order errors list them.
var params = append(slices.Clone(paramsBase), synonym(KeyReplicationFactor), synonym(KeyIOPS), synonym(KeyThroughput))

// choose sets *dst to "" for the default value def, to v for one of
// others, and reports whether v was either.
func choose(dst *string, v, def string, others ...string) bool {
	switch {
	case v == def:
		*dst = ""
	case slices.Contains(others, v):
		*dst = v
	default:
		return false
	}
	return true
}

// synonym is a key that stands for another (synonyms): it reads as that
// one and is recorded under it.
func synonym(key string) param {
	of := synonyms[key]
	i := slices.IndexFunc(paramsBase, func(p param) bool { return p.key == of })
	p := paramsBase[i]
	return param{key: key, want: p.want + " (the same as " + of + ")", parse: p.parse, why: p.why}
}

func parseUint(dst *uint64, v string) bool {
	n, err := strconv.ParseUint(v, 10, 64)
	*dst = n
	return err == nil
}

func uintOrEmpty(n uint64) string {
	if n == 0 {
		return ""
	}
	return strconv.FormatUint(n, 10)
}

func durationOrEmpty(d time.Duration) string {
	if d <= 0 {
		return ""
	}
	return d.String()
}

func lookup(key string) (*param, bool) {
	i := slices.IndexFunc(params, func(p param) bool { return p.key == key })
	if i < 0 {
		return nil, false
	}
	return &params[i], true
}

// Keys lists every key Parse accepts, besides the csi.storage.k8s.io/ keys
// the sidecars add.
func Keys() []string {
	out := make([]string, len(params))
	for i, p := range params {
		out[i] = p.key
	}
	return out
}

// MutableKeys lists the keys SetParameters may change on a live volume.
func MutableKeys() []string {
	var out []string
	for _, p := range params {
		if p.mutable {
			out = append(out, p.key)
		}
	}
	return out
}

// Mutable reports whether key may change on a live volume.
func Mutable(key string) bool {
	p, ok := lookup(key)
	return ok && p.mutable
}

// PlacementOnly reports whether key only steers where a new volume's
// replicas go, so that two CreateVolume requests differing only in it ask for
// the same volume (the store's idempotency check).
func PlacementOnly(key string) bool { return key == KeyDataLocality }

// Parse reads parameters in the request form (a StorageClass, ctl's
// --param), over Default. Values are trimmed of spaces. The error names the
// first bad key in sorted order.
func Parse(in map[string]string) (Spec, error) {
	s := Default()
	for _, k := range slices.Sorted(maps.Keys(in)) {
		p, ok := lookup(k)
		if !ok {
			if strings.HasPrefix(k, sidecarPrefix) {
				continue
			}
			return s, &Error{Key: k, Problem: "unknown parameter (accepted: " + strings.Join(Keys(), ", ") + ")"}
		}
		if v := strings.TrimSpace(in[k]); !p.parse(&s, v, request) {
			return s, badValue(p, v, request)
		}
	}
	for _, alias := range slices.Sorted(maps.Keys(synonyms)) {
		key := synonyms[alias]
		a, okA := in[alias]
		k, okK := in[key]
		if okA && okK && !SameValue(key, k, a) {
			return s, &Error{Key: alias, Problem: fmt.Sprintf("value %q differs from %s %q, which it stands for: give one of them", a, key, k)}
		}
	}
	if s.WriteQuorum > s.Replicas {
		return s, &Error{Key: KeyWriteQuorum, Problem: fmt.Sprintf("%d is more than replicas (%d)", s.WriteQuorum, s.Replicas)}
	}
	if s.Compression != "" && s.Encrypted() {
		return s, &Error{Key: KeyCompression, Problem: fmt.Sprintf("%q cannot go with %s %q: encrypted blocks do not compress, "+
			"and compressing before encrypting would let the space each block takes tell how compressible its plain text is; "+
			"give one of them (docs/compression.md)", s.Compression, KeyEncryption, s.Encryption)}
	}
	return s, checkQoS(s)
}

// DiskTypeOf reads the disk type of request-form parameters on its own, by
// the rule Parse applies to it: "" for the default type, and for a value
// Parse refuses. GetCapacity uses it to answer for a class whose other keys
// Parse refuses: with WaitForFirstConsumer, CreateVolume (which names the
// bad key) runs only if capacity is published for the class.
func DiskTypeOf(in map[string]string) string {
	p, _ := lookup(KeyDiskType)
	var s Spec
	if !p.parse(&s, strings.TrimSpace(in[KeyDiskType]), request) {
		return ""
	}
	return s.DiskType
}

// Decode reads parameters in the stored form (Volume.Parameters) over
// Default: keys it does not know, the replica count and the write quorum are
// ignored, and an empty value is an absent key (see doc.go). Replicas and
// WriteQuorum are left zero.
//
// The error names the first bad key in sorted order, but every key is read:
// a reader after one field is not misled by a bad value of another (a bad
// checksumAlgorithm reads as no checksums; see Spec.Checksummed).
func Decode(in map[string]string) (Spec, error) {
	s := Default()
	s.Replicas = 0
	// A stored volume without the key was made when locality was off by
	// default (or by ctl, which recorded none).
	s.DataLocality = LocalityDisabled
	var first error
	for _, k := range slices.Sorted(maps.Keys(in)) {
		p, ok := lookup(k)
		if !ok || p.format == nil || in[k] == "" {
			continue
		}
		if !p.parse(&s, in[k], stored) && first == nil {
			first = badValue(p, in[k], stored)
		}
	}
	if first != nil {
		return s, first
	}
	return s, checkQoS(s)
}

// Params returns s in the stored form: what the store records.
func (s Spec) Params() map[string]string {
	out := map[string]string{}
	for _, p := range params {
		if p.format == nil {
			continue
		}
		if v := p.format(s); v != "" {
			out[p.key] = v
		}
	}
	return out
}

// Changes reads the request-form parameters of a change to a live volume
// (a VolumeAttributesClass, `ctl volume set-qos`): only mutable keys, checked
// together as Parse checks them. It returns them in the stored form, as
// SetParameters takes them: a zero limit becomes "", which removes the key.
func Changes(in map[string]string) (map[string]string, error) {
	for _, k := range slices.Sorted(maps.Keys(in)) {
		if !Mutable(k) {
			return nil, &Error{Key: k, Problem: "cannot be changed on a live volume (mutable: " + strings.Join(MutableKeys(), ", ") + ")"}
		}
	}
	s, err := Parse(in)
	if err != nil {
		return nil, err
	}
	st := s.Params()
	out := make(map[string]string, len(in))
	for k := range in {
		out[k] = st[k]
	}
	return out, nil
}

// SameValue reports whether two request-form values of key mean the same
// ("100Mi" and "104857600"); a value that does not parse is the same only as
// itself.
func SameValue(key, a, b string) bool {
	if a == b {
		return true
	}
	p, ok := lookup(key)
	if !ok {
		return false
	}
	var sa, sb Spec
	if !p.parse(&sa, strings.TrimSpace(a), request) || !p.parse(&sb, strings.TrimSpace(b), request) {
		return false
	}
	return sa == sb
}

func badValue(p *param, v string, f form) error {
	want := p.want
	if f == stored && p.wantStored != "" {
		want = p.wantStored
	}
	if p.why != nil {
		if why := p.why(v); why != "" {
			return &Error{Key: p.key, Problem: fmt.Sprintf("value %q: %s; want %s", v, why, want)}
		}
	}
	return &Error{Key: p.key, Problem: fmt.Sprintf("value %q: want %s", v, want)}
}

func checkQoS(s Spec) error {
	if q := s.QoS; q.MaxIOPS > 0 && q.MinIOPS > q.MaxIOPS {
		return &Error{Key: KeyMinIOPS, Problem: fmt.Sprintf("%d is more than maxIOPS (%d)", q.MinIOPS, q.MaxIOPS)}
	}
	if q := s.QoS; q.Class == QoSBestEffort && q.MinIOPS > 0 {
		return &Error{Key: KeyQoSClass, Problem: fmt.Sprintf("%q reserves nothing, and minIOPS asks for %d: drop minIOPS, or use %q", QoSBestEffort, q.MinIOPS, QoSBurstable)}
	}
	if q := s.QoS; q.Class == QoSGuaranteed && q.MinIOPS == 0 {
		return &Error{Key: KeyQoSClass, Problem: fmt.Sprintf("%q promises minIOPS, and none is given: set minIOPS", QoSGuaranteed)}
	}
	return nil
}

// ValidDiskType reports whether t can name a disk type: 1 to 63 of a-z,
// 0-9 and -.
func ValidDiskType(t string) bool {
	if len(t) == 0 || len(t) > 63 {
		return false
	}
	for _, c := range t {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Guaranteed reports whether the volume is of class guaranteed: placed only
// where its minIOPS can still be promised.
func (s Spec) Guaranteed() bool { return s.QoS.Class == QoSGuaranteed }
