package main

import (
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/cairn-csi/cairn/driver/agent"
)

func TestParseSize(t *testing.T) {
	cases := []struct {
		in   string
		want uint64
		err  bool
	}{
		{"0", 0, false},
		{"4096", 4096, false},
		{"64Mi", 64 << 20, false},
		{"1Gi", 1 << 30, false},
		{"2Ti", 2 << 40, false},
		{"500M", 500e6, false},
		{"1k", 1000, false},
		{" 8Ki ", 8 << 10, false},
		{"", 0, true},
		{"Mi", 0, true},
		{"-1Gi", 0, true},
		{"1.5Gi", 0, true},
		{"1GiB", 0, true},
		{"99999999999Pi", 0, true}, // overflows uint64
	}
	for _, c := range cases {
		t.Run(c.in, func(t *testing.T) {
			got, err := parseSize(c.in)
			if c.err {
				if err == nil {
					t.Fatalf("parseSize(%q) = %d, want an error", c.in, got)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("parseSize(%q) = %d, %v; want %d", c.in, got, err, c.want)
			}
		})
	}
}

func TestFormatSize(t *testing.T) {
	for in, want := range map[uint64]string{0: "0 B", 1023: "1023 B", 1 << 20: "1 MiB", 1536 << 20: "1.5 GiB", 1 << 40: "1 TiB"} {
		if got := formatSize(in); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

func TestNodeOptionsValidate(t *testing.T) {
	valid := func() nodeOptions {
		return nodeOptions{Config: agent.Config{ID: "n1", DataDir: "d", RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:2", DataAddr: "127.0.0.1:3",
			StaleReplicaTimeout:   time.Minute,
			RaftTimeoutMultiplier: 1, HeartbeatInterval: time.Second, NodeDownAfter: 10 * time.Second, IOSchedDepth: 256}, RebuildRate: "200Mi", Insecure: true}
	}
	cases := []struct {
		name   string
		change func(*nodeOptions)
		want   string
	}{
		{"valid", func(*nodeOptions) {}, ""},
		{"id with slash", func(o *nodeOptions) { o.ID = "a/b" }, "--id"},
		{"id with a space", func(o *nodeOptions) { o.ID = "a b" }, "--id"},
		{"id too long for a label value", func(o *nodeOptions) { o.ID = strings.Repeat("n", 64) }, "--id"},
		{"id ending in a dash", func(o *nodeOptions) { o.ID = "node-" }, "--id"},
		{"longest id", func(o *nodeOptions) { o.ID = strings.Repeat("n", 63) }, ""},
		{"id with dots and underscores", func(o *nodeOptions) { o.ID = "rack1.node_2" }, ""},
		{"bootstrap too big", func(o *nodeOptions) { o.BootstrapExpect = 9 }, "--bootstrap-expect 9"},
		{"down before heartbeat", func(o *nodeOptions) { o.NodeDownAfter = time.Second }, "--node-down-after"},
		{"negative heartbeat", func(o *nodeOptions) { o.HeartbeatInterval = -1 }, "--heartbeat-interval"},
		{"single-node bootstrap", func(o *nodeOptions) { o.BootstrapExpect = 1 }, ""},
		{"bad rebuild rate", func(o *nodeOptions) { o.RebuildRate = "fast" }, "--rebuild-rate"},
		{"negative gomaxprocs", func(o *nodeOptions) { o.GoMaxProcs = -1 }, "--gomaxprocs -1"},
		{"one CPU", func(o *nodeOptions) { o.GoMaxProcs = 1 }, ""},
		{"bad data address", func(o *nodeOptions) { o.DataAddr = "nowhere" }, "--data-addr"},
		{"zero stale timeout", func(o *nodeOptions) { o.StaleReplicaTimeout = 0 }, "--stale-replica-timeout"},
		{"zero scheduler depth", func(o *nodeOptions) { o.IOSchedDepth = 0 }, "--iosched-depth"},
		{"neither TLS nor insecure", func(o *nodeOptions) { o.Insecure = false }, "--tls-dir is required"},
		{"TLS directory", func(o *nodeOptions) { o.Insecure, o.TLSFlags.Dir = false, "/etc/cairn/n1" }, ""},
		{"TLS and insecure", func(o *nodeOptions) { o.TLSFlags.Dir = "/etc/cairn/n1" }, "exclude each other"},
		{"TLS key missing", func(o *nodeOptions) { o.Insecure, o.TLSFlags.CA, o.TLSFlags.Cert = false, "ca.crt", "tls.crt" }, "--tls-key"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			o := valid()
			c.change(&o)
			err := o.Validate()
			if c.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Validate = %v, want a message naming %s", err, c.want)
			}
		})
	}
}

func TestParseDataDirs(t *testing.T) {
	for _, c := range []struct {
		in        string
		dir       string
		disks     map[string]string
		noDefault bool
		bad       string
	}{
		{in: "/d", dir: "/d"},
		{in: "/d,hdd=/h", dir: "/d", disks: map[string]string{"hdd": "/h"}},
		{in: "nvme-ssd=/n,hdd=/h", dir: "/n", disks: map[string]string{"nvme-ssd": "/n", "hdd": "/h"}, noDefault: true},
		{in: "hdd=/h,default=/d", dir: "/d", disks: map[string]string{"hdd": "/h"}},
		{in: "HDD=/h", bad: `disk type "HDD"`},
		{in: "hdd=", bad: "has no path"},
		{in: "hdd=/a,hdd=/b", bad: "two directories of type hdd"},
		{in: "/a,/b", bad: "two directories of type default"},
	} {
		dir, disks, noDefault, err := parseDataDirs(c.in)
		if c.bad != "" {
			if err == nil || !strings.Contains(err.Error(), c.bad) {
				t.Errorf("parseDataDirs(%q) = %v, want an error with %q", c.in, err, c.bad)
			}
			continue
		}
		if err != nil || dir != c.dir || !maps.Equal(disks, c.disks) || noDefault != c.noDefault {
			t.Errorf("parseDataDirs(%q) = %q, %v, %v, %v", c.in, dir, disks, noDefault, err)
		}
	}
}
