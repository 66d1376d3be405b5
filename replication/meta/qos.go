package meta

import (
	"fmt"
	"strconv"
	"time"
)

// Volume parameter keys for quality of service (StorageClass parameters of
// the same names, changeable on a live volume).
const (
	ParamMaxIOPS       = "maxIOPS"
	ParamMinIOPS       = "minIOPS"
	ParamMaxBandwidth  = "maxBandwidth" // bytes per second, stored as a plain number
	ParamBurstDuration = "burstDuration"
)

// QoS are a volume's I/O limits; zero means unlimited (or the default
// burst of one second).
type QoS struct {
	MaxIOPS, MinIOPS uint64
	MaxBytesPerSec   uint64
	BurstDuration    time.Duration
}

// ParseQoS reads the QoS keys of a volume's parameters; the error names the
// bad key.
func ParseQoS(p map[string]string) (QoS, error) {
	var q QoS
	num := func(key string) (uint64, error) {
		v, ok := p[key]
		if !ok || v == "" {
			return 0, nil
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parameter %q: %q is not a whole number: %w", key, v, ErrInvalidArgument)
		}
		return n, nil
	}
	var err error
	if q.MaxIOPS, err = num(ParamMaxIOPS); err != nil {
		return q, err
	}
	if q.MinIOPS, err = num(ParamMinIOPS); err != nil {
		return q, err
	}
	if q.MaxBytesPerSec, err = num(ParamMaxBandwidth); err != nil {
		return q, err
	}
	if v, ok := p[ParamBurstDuration]; ok && v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return q, fmt.Errorf("parameter %q: %q is not a positive duration: %w", ParamBurstDuration, v, ErrInvalidArgument)
		}
		q.BurstDuration = d
	}
	if q.MaxIOPS > 0 && q.MinIOPS > q.MaxIOPS {
		return q, fmt.Errorf("parameter %q: %d is more than %s %d: %w", ParamMinIOPS, q.MinIOPS, ParamMaxIOPS, q.MaxIOPS, ErrInvalidArgument)
	}
	return q, nil
}
