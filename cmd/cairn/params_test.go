package main

import (
	"io"
	"maps"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// specOf parses args with cmd's flags and reads them as newSpecInput does
// for that command.
func specOf(t *testing.T, cmd *cobra.Command, flags []specFlag, args []string) (*specInput, error) {
	t.Helper()
	if err := cmd.ParseFlags(args); err != nil {
		t.Fatalf("flags %v: %v", args, err)
	}
	params, err := cmd.Flags().GetStringArray("param")
	if err != nil {
		t.Fatal(err)
	}
	return newSpecInput(cmd.Flags(), flags, params)
}

// TestVolumeCreateParams: ctl's flags and --param say what a StorageClass
// says, through the same parser; an error names what the operator typed.
func TestVolumeCreateParams(t *testing.T) {
	cases := []struct {
		args             []string
		replicas, quorum int
		params           map[string]string // the stored form
		err              []string
	}{
		{args: nil, replicas: 3, params: map[string]string{"dataLocality": "best-effort"}},
		{args: []string{"--replicas", "2", "--write-quorum", "0", "--stale-replica-timeout", "0s"}, replicas: 2,
			params: map[string]string{"dataLocality": "best-effort"}},
		{args: []string{"--replicas", "5", "--write-quorum", "4", "--stale-replica-timeout", "10m", "--checksum-algorithm", "none",
			"--max-iops", "500", "--min-iops", "0", "--max-bandwidth", "1Mi", "--burst-duration", "2s"}, replicas: 5, quorum: 4,
			params: map[string]string{"dataLocality": "best-effort", "staleReplicaTimeout": "10m0s", "checksumAlgorithm": "none",
				"maxIOPS": "500", "maxBandwidth": "1048576", "burstDuration": "2s"}},
		{args: []string{"--param", "replicas=2", "--param", "writeQuorum=1", "--param", "maxBandwidth=1Ki", "--param", "staleReplicaTimeout=15",
			"--param", "csi.storage.k8s.io/fstype=xfs", "--param", "minIOPS=10"}, replicas: 2, quorum: 1,
			params: map[string]string{"dataLocality": "best-effort", "maxBandwidth": "1024", "staleReplicaTimeout": "15m0s",
				"csi.storage.k8s.io/fstype": "xfs", "minIOPS": "10"}},
		// The same value twice, spelled differently, is no conflict.
		{args: []string{"--max-bandwidth", "1Mi", "--param", "maxBandwidth=1048576", "--replicas", "3", "--param", "replicas=3"}, replicas: 3,
			params: map[string]string{"dataLocality": "best-effort", "maxBandwidth": "1048576"}},
		{args: []string{"--param", "maxIOPS=7", "--param", "maxIOPS=7"}, replicas: 3, params: map[string]string{"dataLocality": "best-effort", "maxIOPS": "7"}},

		{args: []string{"--max-bandwidth", "1Mi", "--param", "maxBandwidth=2Mi"}, err: []string{"--max-bandwidth 1Mi", "maxBandwidth=2Mi", "disagree"}},
		{args: []string{"--replicas", "2", "--param", "replicas=3"}, err: []string{"--replicas 2", "disagree"}},
		{args: []string{"--param", "maxIOPS=7", "--param", "maxIOPS=8"}, err: []string{"maxIOPS", "twice"}},
		{args: []string{"--replicas", "9"}, err: []string{"--replicas 9", `"replicas"`, "1 to 5"}},
		{args: []string{"--replicas", "2", "--write-quorum", "3"}, err: []string{"--write-quorum 3", "more than replicas (2)"}},
		{args: []string{"--write-quorum", "-1"}, err: []string{"--write-quorum -1"}},
		{args: []string{"--burst-duration", "0s"}, err: []string{"--burst-duration 0s", "positive"}},
		{args: []string{"--max-bandwidth", "fast"}, err: []string{"--max-bandwidth fast"}},
		{args: []string{"--checksum-algorithm", "md5"}, err: []string{"--checksum-algorithm md5", `"crc32c" or "none"`}},
		{args: []string{"--param", "replicaz=3"}, err: []string{"--param replicaz=3", "unknown", "writeQuorum"}},
		{args: []string{"--param", "dataLocality=strict"}, err: []string{"--param dataLocality=strict", "best-effort"}},
		{args: []string{"--param", "replicas"}, err: []string{"KEY=VALUE"}},
		{args: []string{"--param", "=3"}, err: []string{"KEY=VALUE"}},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			in, err := specOf(t, newVolumeCreateCommand(&ctlOptions{}), createSpecFlags, c.args)
			var s volspec.Spec
			if err == nil {
				s, err = in.spec()
			}
			if c.err != nil {
				if err == nil {
					t.Fatalf("no error; spec %+v", s)
				}
				for _, m := range c.err {
					if !strings.Contains(err.Error(), m) {
						t.Errorf("error %q does not mention %q", err, m)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.Replicas != c.replicas || s.WriteQuorum != c.quorum || !maps.Equal(s.Params(), c.params) {
				t.Fatalf("replicas %d, quorum %d, params %v; want %d, %d, %v", s.Replicas, s.WriteQuorum, s.Params(), c.replicas, c.quorum, c.params)
			}
		})
	}
}

// TestVolumeCreateRefusesBeforeDialling: a bad parameter, or best-effort
// locality without a node to follow, fails before any server is asked.
func TestVolumeCreateRefusesBeforeDialling(t *testing.T) {
	for args, want := range map[string]string{
		"--param dataLocality=best-effort": "--preferred-node",
		"--param maxIOPS=lots":             "--param maxIOPS=lots",
		"--replicas 0":                     "--replicas 0",
	} {
		cmd := newVolumeCreateCommand(&ctlOptions{Servers: []string{"127.0.0.1:1"}})
		cmd.SetArgs(append([]string{"x", "--size", "1Mi"}, strings.Fields(args)...))
		cmd.SetOut(io.Discard)
		cmd.SetErr(io.Discard)
		if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want an error mentioning %s", args, err, want)
		}
	}
}

func TestSetQoSParams(t *testing.T) {
	cases := []struct {
		args []string
		want map[string]string
		err  string
	}{
		{args: []string{"--max-iops", "0", "--max-bandwidth", "2Mi"}, want: map[string]string{"maxIOPS": "", "maxBandwidth": "2097152"}},
		{args: []string{"--param", "minIOPS=5", "--min-iops", "5", "--burst-duration", "1s"}, want: map[string]string{"minIOPS": "5", "burstDuration": "1s"}},
		{args: nil, want: map[string]string{}},
		{args: []string{"--param", "replicas=2"}, err: "cannot be changed"},
		{args: []string{"--max-iops", "10", "--min-iops", "20"}, err: "--min-iops 20"},
		{args: []string{"--burst-duration", "0s"}, err: "--burst-duration 0s"},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			in, err := specOf(t, newVolumeSetQoSCommand(&ctlOptions{}), qosSpecFlags, c.args)
			var got map[string]string
			if err == nil {
				got, err = in.changes()
			}
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("%v, %v; want an error mentioning %q", got, err, c.err)
				}
				return
			}
			if err != nil || !maps.Equal(got, c.want) {
				t.Fatalf("%v, %v; want %v", got, err, c.want)
			}
		})
	}
}
