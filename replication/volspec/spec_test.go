package volspec

import (
	"errors"
	"maps"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestParseQuantity: the union of what ctl's parseSize and the driver's
// ParseQuantity accepted before they became this one function.
func TestParseQuantity(t *testing.T) {
	good := map[string]uint64{
		"0": 0, "4096": 4096, " 8Ki ": 8 << 10,
		"64Mi": 64 << 20, "1Gi": 1 << 30, "2Ti": 2 << 40, "1Pi": 1 << 50,
		"1k": 1000, "1K": 1000, "500M": 500e6, "1G": 1e9, "3T": 3e12, "2P": 2e15,
		"100Mi": 100 << 20, "18446744073709551615": 1<<64 - 1,
	}
	for in, want := range good {
		if got, err := ParseQuantity(in); err != nil || got != want {
			t.Errorf("ParseQuantity(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", " ", "Mi", "-1Gi", "1.5Gi", "1GiB", "10MiB", "1e6", "+5", "fast", "1 Gi", "16384Pi", "99999999999Pi", "18446744073709551616"} {
		if got, err := ParseQuantity(in); err == nil {
			t.Errorf("ParseQuantity(%q) = %d, want an error", in, got)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	for _, in := range []map[string]string{nil, {}, {"csi.storage.k8s.io/pvc/name": "data", "csi.storage.k8s.io/provisioner-secret-name": "x"}} {
		s, err := Parse(in)
		if err != nil || s != Default() {
			t.Fatalf("Parse(%v) = %+v, %v; want the default %+v", in, s, err, Default())
		}
	}
	d := Default()
	if d.Replicas != 3 || d.WriteQuorum != 0 || d.DataLocality != LocalityBestEffort || d.ChecksumAlgorithm != ChecksumCRC32C || !d.Checksummed() {
		t.Fatalf("default %+v", d)
	}
}

func TestParseEveryKey(t *testing.T) {
	in := map[string]string{
		KeyReplicas: "3", KeyWriteQuorum: "2", KeyDataLocality: "best-effort",
		KeyStaleReplicaTimeout: "15", KeyMaxIOPS: "5000", KeyMinIOPS: "100",
		KeyMaxBandwidth: "100Mi", KeyBurstDuration: "2s", KeyFSType: "xfs",
		KeyChecksumAlgorithm: "none", "csi.storage.k8s.io/pv/name": "pv-1",
	}
	got, err := Parse(in)
	want := Spec{Replicas: 3, WriteQuorum: 2, DataLocality: LocalityBestEffort, StaleReplicaTimeout: 15 * time.Minute,
		QoS:    QoS{MaxIOPS: 5000, MinIOPS: 100, MaxBytesPerSec: 100 << 20, BurstDuration: 2 * time.Second},
		FSType: "xfs", ChecksumAlgorithm: ChecksumNone}
	if err != nil || got != want {
		t.Fatalf("Parse = %+v, %v\nwant %+v", got, err, want)
	}
	// Spaces around a value are not part of it.
	if s, err := Parse(map[string]string{KeyReplicas: " 2 ", KeyStaleReplicaTimeout: " 90s"}); err != nil || s.Replicas != 2 || s.StaleReplicaTimeout != 90*time.Second {
		t.Fatalf("trimmed: %+v, %v", s, err)
	}
	if s, err := Parse(map[string]string{KeyChecksumAlgorithm: ""}); err != nil || s.ChecksumAlgorithm != ChecksumCRC32C {
		t.Fatalf("empty checksumAlgorithm: %+v, %v; want the default", s, err)
	}
}

// TestParseRefuses: every refusal wraps ErrInvalid, is an *Error for the
// key, and its message names the key, the value and what is accepted.
func TestParseRefuses(t *testing.T) {
	cases := []struct {
		in      map[string]string
		key     string
		mention []string
	}{
		{map[string]string{KeyReplicas: "0"}, KeyReplicas, []string{`"0"`, "1 to 5"}},
		{map[string]string{KeyReplicas: "6"}, KeyReplicas, []string{"1 to 5"}},
		{map[string]string{KeyReplicas: "three"}, KeyReplicas, []string{`"three"`}},
		{map[string]string{KeyReplicas: ""}, KeyReplicas, nil},
		{map[string]string{KeyReplicas: "2", KeyWriteQuorum: "3"}, KeyWriteQuorum, []string{"more than replicas (2)"}},
		{map[string]string{KeyWriteQuorum: "0"}, KeyWriteQuorum, []string{"1 to replicas"}},
		{map[string]string{KeyDataLocality: "strict"}, KeyDataLocality, []string{`"disabled" or "best-effort"`}},
		{map[string]string{KeyStaleReplicaTimeout: "-1m"}, KeyStaleReplicaTimeout, []string{"positive duration"}},
		{map[string]string{KeyStaleReplicaTimeout: "soon"}, KeyStaleReplicaTimeout, nil},
		{map[string]string{KeyStaleReplicaTimeout: "0"}, KeyStaleReplicaTimeout, nil},
		{map[string]string{KeyMaxIOPS: "-5"}, KeyMaxIOPS, []string{"whole number"}},
		{map[string]string{KeyMaxIOPS: "100", KeyMinIOPS: "200"}, KeyMinIOPS, []string{"more than maxIOPS (100)"}},
		{map[string]string{KeyMaxBandwidth: "fast"}, KeyMaxBandwidth, []string{"100Mi", "Ki, Mi"}},
		{map[string]string{KeyMaxBandwidth: "10MiB"}, KeyMaxBandwidth, nil},
		{map[string]string{KeyBurstDuration: "0s"}, KeyBurstDuration, []string{"positive duration"}},
		{map[string]string{KeyBurstDuration: "3"}, KeyBurstDuration, nil},
		{map[string]string{KeyFSType: "btrfs"}, KeyFSType, []string{`"ext4" or "xfs"`}},
		{map[string]string{KeyChecksumAlgorithm: "sha256"}, KeyChecksumAlgorithm, []string{`"sha256"`, `"crc32c" or "none"`}},
		{map[string]string{"replica": "3"}, "replica", []string{"unknown", KeyReplicas, KeyChecksumAlgorithm}},
		{map[string]string{"fsType": "ext4"}, "fsType", []string{"unknown"}},
		{map[string]string{"maxiops": "5"}, "maxiops", []string{"unknown"}},
		// The first bad key in sorted order is the one named.
		{map[string]string{KeyReplicas: "9", KeyMaxIOPS: "x"}, KeyMaxIOPS, nil},
	}
	for _, c := range cases {
		_, err := Parse(c.in)
		var e *Error
		if !errors.Is(err, ErrInvalid) || !errors.As(err, &e) || e.Key != c.key {
			t.Errorf("Parse(%v) = %v; want an *Error for %q wrapping ErrInvalid", c.in, err, c.key)
			continue
		}
		for _, m := range append([]string{`"` + c.key + `"`}, c.mention...) {
			if !strings.Contains(err.Error(), m) {
				t.Errorf("Parse(%v): %q does not mention %s", c.in, err, m)
			}
		}
	}
}

// TestStoredFormIsTheOldOne: Params writes exactly the map the driver
// recorded before this package, so a CreateVolume retried across an upgrade
// still finds its volume (the store compares the maps). The one change is
// the default dataLocality, now best-effort; the store's comparison leaves
// that key out (PlacementOnly, meta's TestCreateRetryAcrossLocalityDefault).
func TestStoredFormIsTheOldOne(t *testing.T) {
	cases := []struct {
		in, want map[string]string
	}{
		{nil, map[string]string{KeyDataLocality: "best-effort"}},
		{map[string]string{KeyReplicas: "2", KeyFSType: "ext4"}, map[string]string{KeyDataLocality: "best-effort", KeyFSType: "ext4"}},
		{map[string]string{KeyChecksumAlgorithm: "crc32c"}, map[string]string{KeyDataLocality: "best-effort"}},
		{map[string]string{KeyMaxIOPS: "0", KeyBurstDuration: "1s"}, map[string]string{KeyDataLocality: "best-effort", KeyBurstDuration: "1s"}},
		{map[string]string{
			KeyReplicas: "3", KeyWriteQuorum: "2", KeyDataLocality: "best-effort",
			KeyStaleReplicaTimeout: "15", KeyMaxIOPS: "5000", KeyMinIOPS: "100",
			KeyMaxBandwidth: "100Mi", KeyBurstDuration: "2s", KeyFSType: "xfs", KeyChecksumAlgorithm: "none",
		}, map[string]string{
			KeyDataLocality: "best-effort", KeyStaleReplicaTimeout: "15m0s", KeyMaxIOPS: "5000", KeyMinIOPS: "100",
			KeyMaxBandwidth: "104857600", KeyBurstDuration: "2s", KeyFSType: "xfs", KeyChecksumAlgorithm: "none",
		}},
	}
	for _, c := range cases {
		s, err := Parse(c.in)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.Params(); !reflect.DeepEqual(got, c.want) {
			t.Errorf("Parse(%v).Params() = %v, want %v", c.in, got, c.want)
		}
	}
}

// TestRoundTrip: what Params writes, Decode reads back to the same spec
// (less the replica count and quorum, which the store keeps in typed
// fields), and writing that again gives the same map.
func TestRoundTrip(t *testing.T) {
	specs := []Spec{
		Default(),
		{Replicas: 1, DataLocality: LocalityBestEffort, ChecksumAlgorithm: ChecksumNone, FSType: FSExt4},
		{Replicas: 5, WriteQuorum: 5, DataLocality: LocalityDisabled, ChecksumAlgorithm: ChecksumCRC32C,
			StaleReplicaTimeout: 90 * time.Second, QoS: QoS{MaxIOPS: 1, MinIOPS: 1, MaxBytesPerSec: 1<<64 - 1, BurstDuration: 250 * time.Millisecond}},
		{Replicas: 2, DataLocality: LocalityDisabled, ChecksumAlgorithm: ChecksumCRC32C, QoS: QoS{MinIOPS: 7000}},
	}
	for _, s := range specs {
		p := s.Params()
		got, err := Decode(p)
		if err != nil {
			t.Fatalf("Decode(%v): %v", p, err)
		}
		got.Replicas, got.WriteQuorum = s.Replicas, s.WriteQuorum
		if got != s {
			t.Errorf("round trip of %+v through %v gave %+v", s, p, got)
		}
		if again := got.Params(); !maps.Equal(again, p) {
			t.Errorf("Params not stable: %v then %v", p, again)
		}
	}
}

// TestDecodeReadsOldState: maps stored by earlier versions (the driver's,
// ctl's, tests' hand-made ones) still decode; unknown and typed-field keys
// are ignored, an empty value is absent.
func TestDecodeReadsOldState(t *testing.T) {
	cases := []struct {
		in   map[string]string
		want Spec
	}{
		{nil, Spec{DataLocality: LocalityDisabled, ChecksumAlgorithm: ChecksumCRC32C}},
		// ctl never recorded dataLocality.
		{map[string]string{KeyStaleReplicaTimeout: "10m0s", KeyChecksumAlgorithm: "none", KeyMaxIOPS: "500"},
			Spec{DataLocality: LocalityDisabled, ChecksumAlgorithm: ChecksumNone, StaleReplicaTimeout: 10 * time.Minute, QoS: QoS{MaxIOPS: 500}}},
		{map[string]string{"replicas": "2", "fsType": "xfs", KeyMaxIOPS: "1000", KeyBurstDuration: "1s", "fromTheFuture": "x"},
			Spec{DataLocality: LocalityDisabled, ChecksumAlgorithm: ChecksumCRC32C, QoS: QoS{MaxIOPS: 1000, BurstDuration: time.Second}}},
		{map[string]string{KeyMaxIOPS: "", KeyMinIOPS: "5000", KeyChecksumAlgorithm: ""},
			Spec{DataLocality: LocalityDisabled, ChecksumAlgorithm: ChecksumCRC32C, QoS: QoS{MinIOPS: 5000}}},
	}
	for _, c := range cases {
		got, err := Decode(c.in)
		if err != nil || got != c.want {
			t.Errorf("Decode(%v) = %+v, %v; want %+v", c.in, got, err, c.want)
		}
	}
}

// TestDecodeIsStrictOnSyntax: the stored form has one spelling per value;
// an older member of the store accepts no other, so neither does Decode.
func TestDecodeIsStrictOnSyntax(t *testing.T) {
	for _, c := range []struct {
		in  map[string]string
		key string
	}{
		{map[string]string{KeyMaxBandwidth: "10Mi"}, KeyMaxBandwidth},
		{map[string]string{KeyMaxBandwidth: "1.5"}, KeyMaxBandwidth},
		{map[string]string{KeyStaleReplicaTimeout: "15"}, KeyStaleReplicaTimeout},
		{map[string]string{KeyMaxIOPS: "lots"}, KeyMaxIOPS},
		{map[string]string{KeyMinIOPS: "-1"}, KeyMinIOPS},
		{map[string]string{KeyBurstDuration: "5"}, KeyBurstDuration},
		{map[string]string{KeyBurstDuration: "0s"}, KeyBurstDuration},
		{map[string]string{KeyMaxIOPS: "100", KeyMinIOPS: "200"}, KeyMinIOPS},
		{map[string]string{KeyDataLocality: "strict"}, KeyDataLocality},
		{map[string]string{KeyChecksumAlgorithm: "md5"}, KeyChecksumAlgorithm},
		{map[string]string{KeyFSType: "btrfs"}, KeyFSType},
	} {
		_, err := Decode(c.in)
		var e *Error
		if !errors.As(err, &e) || e.Key != c.key || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `"`+c.key+`"`) {
			t.Errorf("Decode(%v) = %v; want an error naming %q", c.in, err, c.key)
		}
	}
}

func TestChanges(t *testing.T) {
	got, err := Changes(map[string]string{KeyMaxIOPS: "0", KeyMaxBandwidth: "1Mi", KeyBurstDuration: "2s"})
	want := map[string]string{KeyMaxIOPS: "", KeyMaxBandwidth: "1048576", KeyBurstDuration: "2s"}
	if err != nil || !maps.Equal(got, want) {
		t.Fatalf("Changes = %v, %v; want %v", got, err, want)
	}
	if got, err := Changes(nil); err != nil || len(got) != 0 {
		t.Fatalf("no changes: %v, %v", got, err)
	}
	for _, c := range []struct {
		in      map[string]string
		key     string
		mention string
	}{
		{map[string]string{KeyReplicas: "3"}, KeyReplicas, "minIOPS"},
		{map[string]string{KeyMaxIOPS: "5", "zone": "a"}, "zone", "mutable"},
		{map[string]string{KeyMaxIOPS: "lots"}, KeyMaxIOPS, "whole number"},
		{map[string]string{KeyMaxIOPS: "10", KeyMinIOPS: "20"}, KeyMinIOPS, "maxIOPS"},
	} {
		_, err := Changes(c.in)
		var e *Error
		if !errors.As(err, &e) || e.Key != c.key || !strings.Contains(err.Error(), c.mention) {
			t.Errorf("Changes(%v) = %v; want an error naming %q and mentioning %q", c.in, err, c.key, c.mention)
		}
	}
	if got := MutableKeys(); !reflect.DeepEqual(got, []string{KeyMaxIOPS, KeyMinIOPS, KeyMaxBandwidth, KeyBurstDuration}) {
		t.Fatalf("MutableKeys = %v", got)
	}
}

func TestSameValue(t *testing.T) {
	for _, c := range []struct {
		key, a, b string
		same      bool
	}{
		{KeyMaxBandwidth, "100Mi", "104857600", true},
		{KeyMaxBandwidth, "1M", "1Mi", false},
		{KeyStaleReplicaTimeout, "15", "15m", true},
		{KeyStaleReplicaTimeout, "15", "15s", false},
		{KeyReplicas, "3", " 3", true},
		{KeyReplicas, "3", "2", false},
		{KeyChecksumAlgorithm, "", "crc32c", true},
		{KeyMaxIOPS, "x", "x", true},
		{KeyMaxIOPS, "x", "y", false},
		{"nope", "1", "01", false},
	} {
		if got := SameValue(c.key, c.a, c.b); got != c.same {
			t.Errorf("SameValue(%s, %q, %q) = %v", c.key, c.a, c.b, got)
		}
	}
}

func TestKeys(t *testing.T) {
	want := []string{"replicas", "writeQuorum", "dataLocality", "staleReplicaTimeout", "maxIOPS", "minIOPS",
		"maxBandwidth", "burstDuration", "csi.storage.k8s.io/fstype", "checksumAlgorithm", "snapshotSchedule", "snapshotRetain",
		"snapshotLimit", "qosClass", "consistencyLevel", "replicationMode", "encryption", "deduplication", "compression", "type",
		"replicationFactor", "iops", "throughput"}
	if got := Keys(); !reflect.DeepEqual(got, want) {
		t.Fatalf("Keys = %v, want %v", got, want)
	}
	// Every key parses a valid value and refuses garbage: a key added to
	// the table without a parser that refuses anything would pass silently.
	for _, k := range Keys() {
		if _, err := Parse(map[string]string{k: "\x00garbage"}); err == nil {
			t.Errorf("key %s accepts garbage", k)
		}
	}
}

// TestChecksumAlgorithmParam (from the driver's params_test.go): the
// default is crc32c and not recorded, none is recorded, anything else is
// refused by name.
func TestChecksumAlgorithmParam(t *testing.T) {
	s, err := Parse(nil)
	if err != nil || s.ChecksumAlgorithm != ChecksumCRC32C {
		t.Fatalf("default: %q, %v; want crc32c", s.ChecksumAlgorithm, err)
	}
	if _, ok := s.Params()[KeyChecksumAlgorithm]; ok {
		t.Fatal("the default is recorded in the volume's parameters; volumes made before the key existed would stop matching their CreateVolume retries")
	}
	s, err = Parse(map[string]string{KeyChecksumAlgorithm: "none"})
	if err != nil || s.ChecksumAlgorithm != ChecksumNone || s.Params()[KeyChecksumAlgorithm] != "none" || s.Checksummed() {
		t.Fatalf("none: %+v, %v", s, err)
	}
	_, err = Parse(map[string]string{KeyChecksumAlgorithm: "sha256"})
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "checksumAlgorithm") || !strings.Contains(err.Error(), "sha256") {
		t.Fatalf("unknown value: %v, want an invalid-argument error naming the key and the value", err)
	}
}

// designParameters are the parameters of the StorageClass in the design
// (deploy/examples/design-storageclass.yaml holds it whole).
var designParameters = map[string]string{
	"type": "nvme-ssd", "iops": "50000", "throughput": "1000Mi", "replicationFactor": "3",
	"replicationMode": "synchronous", "consistencyLevel": "strong", "encryption": "aes-256-gcm",
	"checksumAlgorithm": "crc32c", "deduplication": "true", "compression": "lz4", "snapshotSchedule": "0 */6 * * *",
	"qosClass": "guaranteed", "minIOPS": "10000", "maxIOPS": "50000", "burstDuration": "60s",
}

// TestDesignKeys: every key of the design's StorageClass is known, and each
// value takes effect on its own. Together they are refused at compression,
// which cannot go with encryption; naming both.
func TestDesignKeys(t *testing.T) {
	for k, v := range designParameters {
		// With the class's minIOPS: guaranteed needs it.
		if _, err := Parse(map[string]string{k: v, KeyMinIOPS: designParameters[KeyMinIOPS]}); err != nil {
			t.Errorf("%s: %q: %v", k, v, err)
		}
	}
	_, err := Parse(designParameters)
	var pe *Error
	if !errors.As(err, &pe) || pe.Key != KeyCompression || !strings.Contains(pe.Problem, `encryption "aes-256-gcm"`) {
		t.Fatalf("the design's class: %v, want compression refused with encryption, naming both", err)
	}
}

// TestEncryptionParam: aes-256-gcm is recorded, none (the default) is not.
func TestEncryptionParam(t *testing.T) {
	s, err := Parse(map[string]string{"encryption": "aes-256-gcm"})
	if err != nil || !s.Encrypted() || s.Params()["encryption"] != "aes-256-gcm" {
		t.Fatalf("aes-256-gcm: %+v, %v", s, err)
	}
	d, err := Decode(s.Params())
	if err != nil || !d.Encrypted() {
		t.Fatalf("stored form: %+v, %v", d, err)
	}
	s, err = Parse(map[string]string{"encryption": "none"})
	if _, recorded := s.Params()["encryption"]; err != nil || s.Encrypted() || recorded {
		t.Fatalf("none: %+v, %v", s, err)
	}
}

// TestSynonyms: replicationFactor, iops and throughput read as replicas,
// maxIOPS and maxBandwidth, are recorded under those keys, and may be given
// with them only with values that mean the same.
func TestSynonyms(t *testing.T) {
	s, err := Parse(map[string]string{"replicationFactor": "2", "iops": "500", "throughput": "1Mi", "maxBandwidth": "1048576"})
	if err != nil {
		t.Fatal(err)
	}
	if s.Replicas != 2 || s.QoS.MaxIOPS != 500 || s.QoS.MaxBytesPerSec != 1<<20 {
		t.Fatalf("spec %+v", s)
	}
	if got := s.Params(); got[KeyMaxIOPS] != "500" || got[KeyMaxBandwidth] != "1048576" || got["iops"] != "" || got["throughput"] != "" {
		t.Fatalf("stored %v, want them under maxIOPS and maxBandwidth", got)
	}
	for _, c := range []map[string]string{
		{"replicas": "3", "replicationFactor": "2"},
		{"maxIOPS": "100", "iops": "200"},
		{"maxBandwidth": "1Gi", "throughput": "1000Mi"},
	} {
		_, err := Parse(c)
		var pe *Error
		if !errors.As(err, &pe) || !strings.Contains(pe.Problem, "differs from") || synonyms[pe.Key] == "" {
			t.Errorf("Parse(%v) = %v, want a refusal of the synonym naming the conflict", c, err)
		}
	}
	if _, err := Parse(map[string]string{"replicationFactor": "9"}); err == nil || !strings.Contains(err.Error(), "the same as replicas") {
		t.Fatalf("replicationFactor 9: %v", err)
	}
}

// TestQoSClassAndConsistency: besteffort is recorded and gets a quarter of
// the default share, and reserves nothing; burstable and strong are the
// defaults and not recorded; a value that is neither is refused listing
// the accepted ones.
func TestQoSClassAndConsistency(t *testing.T) {
	s, err := Parse(map[string]string{"qosClass": "besteffort", "maxIOPS": "100", "consistencyLevel": "eventual"})
	if err != nil {
		t.Fatal(err)
	}
	if s.QoS.Weight() != BestEffortWeight || s.Params()[KeyQoSClass] != QoSBestEffort || s.Params()[KeyConsistencyLevel] != ConsistencyEventual {
		t.Fatalf("spec %+v, stored %v", s, s.Params())
	}
	back, err := Decode(s.Params())
	if err != nil || back.QoS != s.QoS || back.ConsistencyLevel != ConsistencyEventual {
		t.Fatalf("decoded %+v, %v", back, err)
	}
	s, err = Parse(map[string]string{"replicationMode": "asynchronous"})
	if err != nil || !s.Async() || s.Params()[KeyReplicationMode] != ReplicationAsync {
		t.Fatalf("asynchronous: %+v, stored %v, %v", s, s.Params(), err)
	}
	if back, err := Decode(s.Params()); err != nil || !back.Async() {
		t.Fatalf("asynchronous decoded: %+v, %v", back, err)
	}
	s, err = Parse(map[string]string{"qosClass": "burstable", "consistencyLevel": "strong", "replicationMode": "synchronous"})
	if err != nil || s.QoS.Weight() != 0 || len(s.Params()) != 1 { // dataLocality only
		t.Fatalf("defaults: %+v, stored %v, %v", s, s.Params(), err)
	}
	for _, c := range []struct {
		in   map[string]string
		want string
	}{
		{map[string]string{"qosClass": "besteffort", "minIOPS": "10"}, "reserves nothing"},
		{map[string]string{"qosClass": "gold"}, `"burstable" (the default), "besteffort" or "guaranteed" (with minIOPS)`},
		{map[string]string{"qosClass": "guaranteed"}, "set minIOPS"},
		{map[string]string{"consistencyLevel": "linearizable"}, `"strong" (the default) or "eventual"`},
		{map[string]string{"replicationMode": "semi"}, `"synchronous" (the default) or "asynchronous"`},
		{map[string]string{"deduplication": "yes"}, `want "false"`},
		{map[string]string{"encryption": "aes-128-xts"}, `"none" (the default) or "aes-256-gcm"`},
		{map[string]string{"compression": "zstd"}, `"none" (the default) or "lz4"`},
		{map[string]string{"compression": "lz4", "encryption": "aes-256-gcm"}, `"compression": "lz4" cannot go with encryption "aes-256-gcm"`},
	} {
		if _, err := Parse(c.in); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Parse(%v) = %v, want an error with %q", c.in, err, c.want)
		}
	}
}

// TestDiskTypeOf: the disk type read alone, by Parse's rule, whatever the
// other keys hold.
func TestDiskTypeOf(t *testing.T) {
	for _, tc := range []struct {
		in   map[string]string
		want string
	}{
		{map[string]string{}, ""},
		{map[string]string{KeyDiskType: DiskTypeDefault}, ""},
		{map[string]string{KeyDiskType: " nvme-ssd ", KeyCompression: CompressionLZ4}, "nvme-ssd"},
		{map[string]string{KeyDiskType: "hdd", "colour": "blue"}, "hdd"},
		{map[string]string{KeyDiskType: "NVMe"}, ""},
		{map[string]string{KeyDiskType: ""}, ""},
	} {
		if got := DiskTypeOf(tc.in); got != tc.want {
			t.Errorf("DiskTypeOf(%v) = %q, want %q", tc.in, got, tc.want)
		}
		if s, err := Parse(tc.in); err == nil && s.DiskType != tc.want {
			t.Errorf("Parse(%v).DiskType = %q, DiskTypeOf %q: they must agree", tc.in, s.DiskType, tc.want)
		}
	}
}

// TestDeduplication: "true" is recorded and reads back; "false" is the
// default and not recorded, so a volume made before the key existed
// matches a retry of its create.
func TestDeduplication(t *testing.T) {
	s, err := Parse(map[string]string{KeyDeduplication: "true"})
	if err != nil || !s.Deduplication {
		t.Fatalf("Parse(deduplication: true) = %+v, %v", s, err)
	}
	stored := s.Params()
	if stored[KeyDeduplication] != "true" {
		t.Errorf("stored form %v lacks deduplication: true", stored)
	}
	back, err := Decode(stored)
	if err != nil || !back.Deduplication {
		t.Errorf("Decode(%v) = %+v, %v", stored, back, err)
	}
	off, err := Parse(map[string]string{KeyDeduplication: "false"})
	if err != nil || off.Deduplication {
		t.Fatalf("Parse(deduplication: false) = %+v, %v", off, err)
	}
	if _, ok := off.Params()[KeyDeduplication]; ok {
		t.Errorf("deduplication: false is recorded: %v", off.Params())
	}
}

// TestCompression: lz4 is recorded and reads back; none is the default and
// not recorded.
func TestCompression(t *testing.T) {
	s, err := Parse(map[string]string{KeyCompression: "lz4"})
	if err != nil || s.Compression != CompressionLZ4 || s.Params()[KeyCompression] != "lz4" {
		t.Fatalf("Parse(compression: lz4) = %+v, %v", s, err)
	}
	back, err := Decode(s.Params())
	if err != nil || back.Compression != CompressionLZ4 {
		t.Errorf("Decode(%v) = %+v, %v", s.Params(), back, err)
	}
	off, err := Parse(map[string]string{KeyCompression: "none"})
	if _, ok := off.Params()[KeyCompression]; err != nil || off.Compression != "" || ok {
		t.Fatalf("Parse(compression: none) = %+v (stored %v), %v", off, off.Params(), err)
	}
}
