package csi

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cairn-csi/cairn/replication/meta"
)

// StorageClass parameter keys the driver accepts (docs/architecture.md,
// "StorageClass parameters").
const (
	ParamReplicas            = "replicas"
	ParamWriteQuorum         = "writeQuorum"
	ParamDataLocality        = "dataLocality"
	ParamStaleReplicaTimeout = "staleReplicaTimeout"
	ParamMaxIOPS             = "maxIOPS"
	ParamMinIOPS             = "minIOPS"
	ParamMaxBandwidth        = "maxBandwidth"
	ParamBurstDuration       = "burstDuration"
	ParamFSType              = "csi.storage.k8s.io/fstype"
	// ParamChecksumAlgorithm: "crc32c" (the default) or "none"
	// (docs/integrity.md).
	ParamChecksumAlgorithm = meta.ParamChecksumAlgorithm
)

// AcceptedParameters lists every parameter key a StorageClass may use
// (besides the csi.storage.k8s.io/ keys the sidecars add).
var AcceptedParameters = []string{ParamReplicas, ParamWriteQuorum, ParamDataLocality, ParamStaleReplicaTimeout,
	ParamMaxIOPS, ParamMinIOPS, ParamMaxBandwidth, ParamBurstDuration, ParamFSType, ParamChecksumAlgorithm}

// Params are validated StorageClass parameters.
type Params struct {
	Replicas            int
	WriteQuorum         int // 0: a majority
	DataLocality        string
	StaleReplicaTimeout time.Duration // 0: the cluster's default
	MaxIOPS, MinIOPS    uint64
	MaxBandwidth        uint64 // bytes per second
	BurstDuration       time.Duration
	FSType              string // "" when not given
	ChecksumAlgorithm   string // meta.ChecksumCRC32C or meta.ChecksumNone
}

// ParseParams validates parameters; the error names the bad key.
func ParseParams(in map[string]string) (Params, error) {
	p := Params{Replicas: 3, DataLocality: "disabled", ChecksumAlgorithm: meta.ChecksumCRC32C}
	keys := make([]string, 0, len(in))
	for k := range in {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := strings.TrimSpace(in[k])
		bad := func(want string) error {
			return fmt.Errorf("parameter %q: value %q: want %s: %w", k, in[k], want, errInvalid)
		}
		switch k {
		case ParamReplicas:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 5 {
				return p, bad("a whole number from 1 to 5")
			}
			p.Replicas = n
		case ParamWriteQuorum:
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 5 {
				return p, bad("a whole number from 1 to replicas")
			}
			p.WriteQuorum = n
		case ParamDataLocality:
			if v != "disabled" && v != "best-effort" {
				return p, bad(`"disabled" or "best-effort"`)
			}
			p.DataLocality = v
		case ParamStaleReplicaTimeout:
			d, err := parseDurationOrMinutes(v)
			if err != nil || d <= 0 {
				return p, bad(`a positive duration such as "10m" (a bare number is minutes)`)
			}
			p.StaleReplicaTimeout = d
		case ParamMaxIOPS, ParamMinIOPS:
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return p, bad("a whole number of I/O operations per second")
			}
			if k == ParamMaxIOPS {
				p.MaxIOPS = n
			} else {
				p.MinIOPS = n
			}
		case ParamMaxBandwidth:
			n, err := ParseQuantity(v)
			if err != nil {
				return p, bad(`bytes per second, such as "100Mi"`)
			}
			p.MaxBandwidth = n
		case ParamBurstDuration:
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return p, bad(`a positive duration such as "1s"`)
			}
			p.BurstDuration = d
		case ParamChecksumAlgorithm:
			a, err := meta.ChecksumAlgorithm(map[string]string{k: v})
			if err != nil {
				return p, bad(`"crc32c" or "none"`)
			}
			p.ChecksumAlgorithm = a
		case ParamFSType:
			if v != "ext4" && v != "xfs" {
				return p, bad(`"ext4" or "xfs"`)
			}
			p.FSType = v
		default:
			if strings.HasPrefix(k, "csi.storage.k8s.io/") {
				continue // pvc/pv names from --extra-create-metadata, secrets' names …
			}
			return p, fmt.Errorf("unknown parameter %q (accepted: %s): %w", k, strings.Join(AcceptedParameters, ", "), errInvalid)
		}
	}
	if p.WriteQuorum > p.Replicas {
		return p, fmt.Errorf("parameter %q: %d is more than replicas (%d): %w", ParamWriteQuorum, p.WriteQuorum, p.Replicas, errInvalid)
	}
	if p.MaxIOPS > 0 && p.MinIOPS > p.MaxIOPS {
		return p, fmt.Errorf("parameter %q: %d is more than maxIOPS (%d): %w", ParamMinIOPS, p.MinIOPS, p.MaxIOPS, errInvalid)
	}
	return p, nil
}

func parseDurationOrMinutes(s string) (time.Duration, error) {
	if n, err := strconv.ParseUint(s, 10, 32); err == nil {
		return time.Duration(n) * time.Minute, nil
	}
	return time.ParseDuration(s)
}

// ParseQuantity parses "100Mi", "1G", "4096".
func ParseQuantity(s string) (uint64, error) {
	units := []struct {
		suffix string
		mult   uint64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}}
	mult := uint64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, err
	}
	if n != 0 && mult > ^uint64(0)/n {
		return 0, fmt.Errorf("%s is too large", s)
	}
	return n * mult, nil
}

// volumeParameters is what the store records of the StorageClass.
func (p Params) volumeParameters() map[string]string {
	out := map[string]string{ParamDataLocality: p.DataLocality}
	// Only a choice other than the default is recorded, so volumes created
	// before the key existed keep matching their CreateVolume retries.
	if p.ChecksumAlgorithm != "" && p.ChecksumAlgorithm != meta.ChecksumCRC32C {
		out[ParamChecksumAlgorithm] = p.ChecksumAlgorithm
	}
	if p.StaleReplicaTimeout > 0 {
		out[ParamStaleReplicaTimeout] = p.StaleReplicaTimeout.String()
	}
	if p.MaxIOPS > 0 {
		out[ParamMaxIOPS] = strconv.FormatUint(p.MaxIOPS, 10)
	}
	if p.MinIOPS > 0 {
		out[ParamMinIOPS] = strconv.FormatUint(p.MinIOPS, 10)
	}
	if p.MaxBandwidth > 0 {
		out[ParamMaxBandwidth] = strconv.FormatUint(p.MaxBandwidth, 10)
	}
	if p.BurstDuration > 0 {
		out[ParamBurstDuration] = p.BurstDuration.String()
	}
	if p.FSType != "" {
		out[ParamFSType] = p.FSType
	}
	return out
}
