package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/pflag"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// specFlag is a ctl flag that is another spelling of a volume parameter:
// its value goes through volspec like the StorageClass key's.
type specFlag struct {
	flag, key string
	// unset is the flag value that means "the key's default" (and is not a
	// value of the key), or "" when every value is the key's.
	unset string
}

// qosSpecFlags are the flags of the mutable keys (volume set-qos).
var qosSpecFlags = []specFlag{
	{"max-iops", volspec.KeyMaxIOPS, ""},
	{"min-iops", volspec.KeyMinIOPS, ""},
	{"max-bandwidth", volspec.KeyMaxBandwidth, ""},
	{"burst-duration", volspec.KeyBurstDuration, ""},
}

// createSpecFlags are the flags of volume create that spell keys.
var createSpecFlags = append([]specFlag{
	{"replicas", volspec.KeyReplicas, ""},
	{"write-quorum", volspec.KeyWriteQuorum, "0"},                   // a majority
	{"stale-replica-timeout", volspec.KeyStaleReplicaTimeout, "0s"}, // the cluster's default
	{"checksum-algorithm", volspec.KeyChecksumAlgorithm, ""},
	{"snapshot-schedule", volspec.KeySnapshotSchedule, ""},
	{"snapshot-retain", volspec.KeySnapshotRetain, "0"}, // the default
}, qosSpecFlags...)

// paramFlagHelp is the help of --param.
var paramFlagHelp = "volume parameter KEY=VALUE, as a StorageClass says it (repeatable): " + strings.Join(volspec.Keys(), ", ")

// parseParamFlags reads --param KEY=VALUE arguments; a key given twice with
// different values is an error.
func parseParamFlags(args []string) (map[string]string, error) {
	out := map[string]string{}
	for _, kv := range args {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--param %q: want KEY=VALUE", kv)
		}
		if prev, dup := out[k]; dup && !volspec.SameValue(k, prev, v) {
			return nil, fmt.Errorf("--param %s given twice: %q and %q", k, prev, v)
		}
		out[k] = v
	}
	return out, nil
}

// specInput is the request-form parameters of a ctl command: the flags of
// flags that were set, and --param. It remembers where each key came from,
// so that an error names what the operator typed.
type specInput struct {
	params map[string]string
	// from names the flag or --param that gave each key.
	from map[string]string
}

func newSpecInput(fs *pflag.FlagSet, flags []specFlag, paramArgs []string) (*specInput, error) {
	params, err := parseParamFlags(paramArgs)
	if err != nil {
		return nil, err
	}
	in := &specInput{params: params, from: map[string]string{}}
	for k, v := range params {
		in.from[k] = fmt.Sprintf("--param %s=%s", k, v)
	}
	for _, f := range flags {
		if !fs.Changed(f.flag) {
			continue
		}
		v := fs.Lookup(f.flag).Value.String()
		if f.unset != "" && v == f.unset {
			continue
		}
		if p, ok := params[f.key]; ok && !volspec.SameValue(f.key, p, v) {
			return nil, fmt.Errorf("--%s %s and --param %s=%s disagree", f.flag, v, f.key, p)
		}
		in.params[f.key] = v
		in.from[f.key] = fmt.Sprintf("--%s %s", f.flag, v)
	}
	return in, nil
}

// explain prefixes a volspec error with the flag or --param it came from.
func (in *specInput) explain(err error) error {
	var e *volspec.Error
	if errors.As(err, &e) {
		if from, ok := in.from[e.Key]; ok {
			return fmt.Errorf("%s: %w", from, err)
		}
	}
	return err
}

// spec parses the input as a new volume's parameters.
func (in *specInput) spec() (volspec.Spec, error) {
	s, err := volspec.Parse(in.params)
	return s, in.explain(err)
}

// changes parses the input as a change to a live volume's parameters, in
// the stored form SetParameters takes.
func (in *specInput) changes() (map[string]string, error) {
	c, err := volspec.Changes(in.params)
	return c, in.explain(err)
}
