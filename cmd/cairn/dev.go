package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/internal/loopback"
	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/internal/proc"
	"github.com/cairn-csi/cairn/replication/meta"
)

// devCluster is DIR/cluster.json: what `cairn dev up` started. Later
// commands (kill, start, down, tests, the demo) read it.
type devCluster struct {
	Nodes      []*devNode     `json:"nodes"`
	Controller *devController `json:"controller,omitempty"`
	// TLSDir holds the cluster CA (ca/) and a --tls-dir per identity
	// (node-1/ …, controller/, ctl/) when the cluster runs with mutual
	// TLS (dev up --tls); "" for a plaintext cluster.
	TLSDir string `json:"tls_dir,omitempty"`
}

// metaClient returns a client of the cluster's meta API, with the ctl
// certificate when the cluster speaks TLS.
func (c *devCluster) metaClient(addrs []string) (*meta.Client, error) {
	var creds *pki.Credentials
	if c.TLSDir != "" {
		var err error
		if creds, err = pki.Load(pki.FilesIn(filepath.Join(c.TLSDir, "ctl"), tlsDirName)); err != nil {
			return nil, err
		}
	}
	return meta.NewClient(addrs, meta.WithTLS(creds))
}

// devCA makes the dev cluster's CA in dir/ca and issues a certificate for
// each node, the CSI controller and ctl, each in a directory of its own.
func devCA(dir string, nodes int) error {
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), "cairn dev cluster CA", 365*24*time.Hour)
	if err != nil {
		return err
	}
	ids := []pki.Identity{{Role: pki.RoleCtl, Name: "controller"}, {Role: pki.RoleCtl, Name: "ctl"}}
	for i := 1; i <= nodes; i++ {
		ids = append(ids, pki.Identity{Role: pki.RoleNode, Name: fmt.Sprintf("node-%d", i)})
	}
	for _, id := range ids {
		if err := ca.Issue(id, 90*24*time.Hour, pki.FilesIn(filepath.Join(dir, id.Name), tlsDirName)); err != nil {
			return err
		}
	}
	return nil
}

type devNode struct {
	ID      string   `json:"id"`
	Agent   string   `json:"agent"` // meta API host:port
	Raft    string   `json:"raft"`
	Data    string   `json:"data"` // replica server host:port
	CSI     string   `json:"csi,omitempty"`
	Metrics string   `json:"metrics"`
	PID     int      `json:"pid"`
	DataDir string   `json:"data_dir"`
	Log     string   `json:"log"`
	Args    []string `json:"args"`
	// Holder is the node's `cairn fuse-holder`, which keeps the staged
	// volumes' FUSE connection while the agent restarts.
	Holder *devHolder `json:"holder,omitempty"`
}

type devHolder struct {
	Socket string   `json:"socket"`
	PID    int      `json:"pid"`
	Log    string   `json:"log"`
	Args   []string `json:"args"`
}

// proc lets the holder process be started, checked and stopped like a
// node's.
func (h *devHolder) proc() *devNode {
	return &devNode{ID: holderProcID, CSI: h.Socket, PID: h.PID, Log: h.Log, Args: h.Args}
}

// holderProcID names a holder's process in devNode.alive.
const holderProcID = "fuse-holder"

// startHolder starts the node's holder unless it runs.
func (n *devNode) startHolder() error {
	if n.Holder == nil {
		return nil
	}
	p := n.Holder.proc()
	if p.alive() {
		return nil
	}
	if err := p.start(); err != nil {
		return err
	}
	n.Holder.PID = p.PID
	// The agent asks for it at start: wait for its socket.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unixpacket", n.Holder.Socket); err == nil {
			_ = c.Close()
			return nil
		}
		if !p.alive() {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("the fuse holder of %s did not listen on %s: %s", n.ID, n.Holder.Socket, tail(n.Holder.Log, 3))
}

type devController struct {
	CSI  string   `json:"csi"`
	PID  int      `json:"pid"`
	Log  string   `json:"log"`
	Args []string `json:"args"`
}

// proc lets the controller process be started, checked and stopped like a
// node's.
func (c *devController) proc() *devNode {
	return &devNode{ID: "controller", CSI: c.CSI, PID: c.PID, Log: c.Log, Args: c.Args}
}

const clusterFile = "cluster.json"

func loadDevCluster(dir string) (*devCluster, error) {
	b, err := os.ReadFile(filepath.Join(dir, clusterFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no dev cluster in %s (no %s): start one with `cairn dev up --dir %s`", dir, clusterFile, dir)
	}
	if err != nil {
		return nil, err
	}
	var c devCluster
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, clusterFile), err)
	}
	return &c, nil
}

func (c *devCluster) save(dir string) error {
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, clusterFile+".tmp")
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, clusterFile))
}

func (c *devCluster) node(id string) (*devNode, error) {
	var ids []string
	for _, n := range c.Nodes {
		if n.ID == id {
			return n, nil
		}
		ids = append(ids, n.ID)
	}
	return nil, fmt.Errorf("no node %q in this dev cluster (nodes: %s)", id, strings.Join(ids, ", "))
}

func (c *devCluster) agents() []string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, n.Agent)
	}
	return out
}

// alive reports whether this node's agent is still there: running, or
// exiting and maybe still holding its ports, its Raft log's lock and
// /dev/fuse (internal/proc). PIDs get reused: the marker tells ours.
func (n *devNode) alive() bool {
	marker := "\x00--id\x00" + n.ID + "\x00"
	switch n.ID {
	case "controller":
		marker = "\x00--endpoint\x00" + n.CSI + "\x00"
	case holderProcID:
		marker = "\x00--socket\x00" + n.CSI + "\x00"
	}
	return proc.Holds(n.PID, marker)
}

// start launches the node agent in its own session, detached from this
// process, with its output in its log file.
func (n *devNode) start() error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(n.Log, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(exe, n.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", n.ID, err)
	}
	n.PID = cmd.Process.Pid
	return cmd.Process.Release()
}

// stop sends sig and waits up to wait for the process to go.
func (n *devNode) stop(sig syscall.Signal, wait time.Duration) bool {
	if !n.alive() {
		return true
	}
	_ = syscall.Kill(n.PID, sig)
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		if !n.alive() {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return !n.alive()
}

func newDevCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a local development cluster on 127.0.0.1",
		Example: `  cairn dev up --nodes 3 --dir .demo
  cairn dev kill --dir .demo node-2
  cairn dev start --dir .demo node-2
  cairn dev down --dir .demo`,
	}
	cmd.AddCommand(newDevUpCommand(), newDevKillCommand(), newDevStartCommand(), newDevDownCommand(), newDevCSICommand())
	return cmd
}

func newDevUpCommand() *cobra.Command {
	var nodes int
	var dir string
	var wait time.Duration
	var zones bool
	var staleTimeout time.Duration
	var nodeArgs, diskTypes []string
	var withTLS, insecure bool
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Start N node agents in the background and wait for the cluster",
		Example: `  cairn dev up --nodes 3 --dir .demo
  export CAIRN_TLS_DIR=.demo/pki/ctl    # ctl's certificate
  cairn dev up --nodes 3 --dir .plain --insecure`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nodes < 1 || nodes > 7 {
				return fmt.Errorf("--nodes %d: want 1 to 7", nodes)
			}
			if dir == "" {
				return errors.New("--dir is required")
			}
			if insecure && cmd.Flags().Changed("tls") && withTLS {
				return errors.New("--tls and --insecure exclude each other")
			}
			withTLS = withTLS && !insecure
			abs, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			if old, err := loadDevCluster(abs); err == nil {
				for _, n := range old.Nodes {
					if n.alive() {
						return fmt.Errorf("a dev cluster already runs in %s (%s is pid %d): run `cairn dev down --dir %s` first", dir, n.ID, n.PID, dir)
					}
				}
				return fmt.Errorf("%s holds a stopped dev cluster: restart its nodes with `cairn dev start`, or remove it with `cairn dev down --dir %s`", dir, dir)
			}
			if err := os.MkdirAll(abs, 0o755); err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			c, st, err := startDevCluster(cmd, abs, nodes, zones, withTLS, staleTimeout, nodeArgs, diskTypes, wait)
			if err != nil {
				return err
			}
			fmt.Fprintf(w, "cluster %s is up: leader %s, %d nodes up; CSI controller at %s\n", st.ClusterID, st.Leader, len(st.Nodes), c.Controller.CSI)
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tMETA API\tMETRICS\tPID\tLOG")
			for _, n := range c.Nodes {
				fmt.Fprintf(tw, "%s\t%s\thttp://%s/metrics\t%d\t%s\n", n.ID, n.Agent, n.Metrics, n.PID, n.Log)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			fmt.Fprintf(w, "wrote %s\n", filepath.Join(dir, clusterFile))
			if c.TLSDir != "" {
				fmt.Fprintf(w, "every port speaks mutual TLS; for cairn ctl: export CAIRN_TLS_DIR=%s\n", filepath.Join(c.TLSDir, "ctl"))
			}
			return nil
		},
	}
	cmd.Flags().IntVar(&nodes, "nodes", 3, "number of node agents")
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the cluster's data, logs and cluster.json (required)")
	cmd.Flags().DurationVar(&wait, "wait", 60*time.Second, "how long to wait for the cluster to form")
	cmd.Flags().BoolVar(&zones, "zones", false, "spread the nodes over three topology zones")
	cmd.Flags().DurationVar(&staleTimeout, "stale-replica-timeout", 10*time.Minute, "replace a replica whose node stays down this long")
	cmd.Flags().StringArrayVar(&nodeArgs, "node-arg", nil, "extra flag for every node agent, repeatable (e.g. --node-arg=--pprof)")
	cmd.Flags().BoolVar(&withTLS, "tls", true, "run every port with mutual TLS: a CA in DIR/pki and a certificate for each node, the controller and ctl (the default)")
	cmd.Flags().BoolVar(&insecure, "insecure", false, "run the node agents with --insecure: every port in plaintext, open to anyone who can reach it, and ctl needs no certificate")
	cmd.Flags().StringSliceVar(&diskTypes, "disk-types", nil, "give every node a data directory of each of these disk types besides its default one (e.g. nvme-ssd,hdd)")
	return cmd
}

// waitCluster polls until there is a leader and want nodes are up.
func waitCluster(ctx context.Context, c *devCluster, want int) (*meta.StatusResponse, error) {
	client, err := c.metaClient(c.agents())
	if err != nil {
		return nil, err
	}
	defer client.Close()
	var last error
	for {
		for _, n := range c.Nodes {
			if !n.alive() {
				return nil, fmt.Errorf("%s exited", n.ID)
			}
		}
		st, err := client.Status(ctx)
		if err == nil {
			up := 0
			for _, n := range st.Nodes {
				if n.State == meta.NodeUp {
					up++
				}
			}
			if st.Leader != "" && up >= want {
				return st, nil
			}
			last = fmt.Errorf("leader %q, %d of %d nodes up", st.Leader, up, want)
		} else {
			last = err
		}
		select {
		case <-ctx.Done():
			return nil, last
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// startDevCluster starts the node agents and the CSI controller of a dev
// cluster in abs on fresh ports, writes cluster.json and waits for the
// cluster to form. On failure it stops what it started.
func startDevCluster(cmd *cobra.Command, abs string, nodes int, zones, withTLS bool, staleTimeout time.Duration, nodeArgs, diskTypes []string, wait time.Duration) (*devCluster, *meta.StatusResponse, error) {
	w := cmd.OutOrStdout()
	// Each node on a loopback address of its own, so that its ports are
	// still free when it restarts (see package loopback).
	addrs, err := loopback.Addrs(nodes, 4)
	if err != nil {
		return nil, nil, fmt.Errorf("reserve ports: %w", err)
	}
	c := &devCluster{}
	if withTLS {
		c.TLSDir = filepath.Join(abs, "pki")
		if err := devCA(c.TLSDir, nodes); err != nil {
			return nil, nil, fmt.Errorf("make the dev cluster's CA: %w", err)
		}
	}
	var apis []string
	for i := 0; i < nodes; i++ {
		apis = append(apis, addrs[i][1])
	}
	for i := 0; i < nodes; i++ {
		id := fmt.Sprintf("node-%d", i+1)
		ndir := filepath.Join(abs, id)
		if err := os.MkdirAll(ndir, 0o755); err != nil {
			return c, nil, err
		}
		n := &devNode{
			ID: id, Raft: addrs[i][0], Agent: apis[i], Metrics: addrs[i][2], Data: addrs[i][3],
			DataDir: filepath.Join(ndir, "data"), Log: filepath.Join(ndir, "node.log"),
		}
		n.CSI = "unix://" + filepath.Join(ndir, "csi.sock")
		n.Holder = &devHolder{Socket: filepath.Join(ndir, "fdhold.sock"), Log: filepath.Join(ndir, "fuse-holder.log")}
		n.Holder.Args = []string{"fuse-holder", "--socket", n.Holder.Socket, "--log-format", "json"}
		dataDirs := n.DataDir
		for _, t := range diskTypes {
			// The node's data directory of each other disk type.
			dataDirs += "," + t + "=" + filepath.Join(ndir, "disk-"+t)
		}
		n.Args = []string{"node", "--id", id, "--data-dir", dataDirs,
			"--csi-endpoint", n.CSI, "--csi-allowed-roots", abs,
			"--raft-addr", n.Raft, "--api-addr", n.Agent, "--metrics-addr", n.Metrics, "--data-addr", n.Data,
			"--bootstrap-expect", strconv.Itoa(nodes), "--peers", strings.Join(apis, ","),
			"--raft-timeout-multiplier", "0.5", "--heartbeat-interval", "500ms", "--node-down-after", "3s",
			"--log-format", "json", "--stale-replica-timeout", staleTimeout.String(), "--fd-holder", n.Holder.Socket}
		if zones {
			n.Args = append(n.Args, "--zone", fmt.Sprintf("zone-%c", 'a'+i%3))
		}
		if c.TLSDir != "" {
			n.Args = append(n.Args, "--tls-dir", filepath.Join(c.TLSDir, id))
		} else {
			n.Args = append(n.Args, "--insecure")
		}
		n.Args = append(n.Args, nodeArgs...)
		c.Nodes = append(c.Nodes, n)
	}
	for _, n := range c.Nodes {
		if err := n.startHolder(); err != nil {
			stopAll(c)
			return c, nil, err
		}
		if err := n.start(); err != nil {
			stopAll(c)
			return c, nil, err
		}
	}
	ctrlDir := filepath.Join(abs, "controller")
	if err := os.MkdirAll(ctrlDir, 0o755); err != nil {
		stopAll(c)
		return c, nil, err
	}
	ctrl := &devNode{ID: "controller", Log: filepath.Join(ctrlDir, "controller.log"),
		CSI: "unix://" + filepath.Join(ctrlDir, "csi.sock")}
	ctrl.Args = []string{"controller", "--endpoint", ctrl.CSI, "--meta", strings.Join(apis, ","), "--log-format", "json"}
	if c.TLSDir != "" {
		ctrl.Args = append(ctrl.Args, "--tls-dir", filepath.Join(c.TLSDir, "controller"))
	}
	if err := ctrl.start(); err != nil {
		stopAll(c)
		return c, nil, err
	}
	c.Controller = &devController{CSI: ctrl.CSI, PID: ctrl.PID, Log: ctrl.Log, Args: ctrl.Args}
	if err := c.save(abs); err != nil {
		stopAll(c)
		return c, nil, err
	}
	fmt.Fprintf(w, "started %d node agents; waiting for a leader and %d registered nodes …\n", nodes, nodes)
	ctx, cancel := context.WithTimeout(cmd.Context(), wait)
	defer cancel()
	st, err := waitCluster(ctx, c, nodes)
	if err != nil {
		for _, n := range c.Nodes {
			fmt.Fprintf(cmd.ErrOrStderr(), "--- last lines of %s ---\n%s\n", n.Log, tail(n.Log, 10))
		}
		stopAll(c)
		return c, nil, fmt.Errorf("cluster did not form within %v: %w (node logs above; stopped the nodes)", wait, err)
	}
	return c, st, nil
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func stopAll(c *devCluster) {
	procs := c.Nodes
	if c.Controller != nil {
		procs = append([]*devNode{c.Controller.proc()}, procs...)
	}
	for _, n := range c.Nodes {
		if n.Holder != nil {
			procs = append(procs, n.Holder.proc()) // after the agents
		}
	}
	for _, n := range procs {
		if !n.stop(syscall.SIGTERM, 10*time.Second) {
			n.stop(syscall.SIGKILL, 5*time.Second)
		}
	}
}

func newDevKillCommand() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:     "kill NODE_ID",
		Short:   "Kill one node agent with SIGKILL (a crash)",
		Example: `  cairn dev kill --dir .demo node-2`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, n, err := devNodeArg(dir, args[0])
			if err != nil {
				return err
			}
			if !n.alive() {
				return fmt.Errorf("%s is not running", n.ID)
			}
			pid := n.PID
			if !n.stop(syscall.SIGKILL, 10*time.Second) {
				return fmt.Errorf("%s (pid %d) did not die after SIGKILL", n.ID, pid)
			}
			n.PID = 0
			if err := c.save(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "killed %s (pid %d) with SIGKILL\n", n.ID, pid)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "the dev cluster's directory (required)")
	return cmd
}

func devNodeArg(dir, id string) (*devCluster, *devNode, error) {
	if dir == "" {
		return nil, nil, errors.New("--dir is required")
	}
	c, err := loadDevCluster(dir)
	if err != nil {
		return nil, nil, err
	}
	n, err := c.node(id)
	return c, n, err
}

func newDevStartCommand() *cobra.Command {
	var dir string
	var wait time.Duration
	cmd := &cobra.Command{
		Use:     "start NODE_ID",
		Short:   "Restart a stopped node agent with its data dir",
		Example: `  cairn dev start --dir .demo node-2`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, n, err := devNodeArg(dir, args[0])
			if err != nil {
				return err
			}
			if n.alive() {
				return fmt.Errorf("%s is already running (pid %d)", n.ID, n.PID)
			}
			if err := n.startHolder(); err != nil {
				return err
			}
			if err := n.start(); err != nil {
				return err
			}
			if err := c.save(dir); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "started %s (pid %d); waiting for it to answer …\n", n.ID, n.PID)
			ctx, cancel := context.WithTimeout(cmd.Context(), wait)
			defer cancel()
			leader, err := waitMember(ctx, c, n)
			if err != nil {
				return fmt.Errorf("%s did not come back within %v: %w (see %s)", n.ID, wait, err, n.Log)
			}
			if leader == "" {
				fmt.Fprintf(cmd.OutOrStdout(), "%s answers, but sees no leader yet (are enough members up for a quorum?)\n", n.ID)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "%s is back; leader is %s\n", n.ID, leader)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "the dev cluster's directory (required)")
	cmd.Flags().DurationVar(&wait, "wait", 30*time.Second, "how long to wait for the node to rejoin")
	return cmd
}

// waitMember polls the node's own API until it answers, then gives it a few
// seconds to find a leader (which needs a quorum of members up). It returns
// the leader's id, or "" when none was seen.
func waitMember(ctx context.Context, c *devCluster, n *devNode) (string, error) {
	client, err := c.metaClient([]string{n.Agent})
	if err != nil {
		return "", err
	}
	defer client.Close()
	var answered time.Time
	for {
		if !n.alive() {
			return "", fmt.Errorf("process exited: %s", tail(n.Log, 3))
		}
		info, err := client.Info(ctx)
		if err == nil {
			if info.Leader != "" {
				return info.Leader, nil
			}
			if answered.IsZero() {
				answered = time.Now()
			} else if time.Since(answered) > 5*time.Second {
				return "", nil
			}
		}
		select {
		case <-ctx.Done():
			if !answered.IsZero() {
				return "", nil
			}
			return "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func newDevDownCommand() *cobra.Command {
	var dir string
	var keep bool
	cmd := &cobra.Command{
		Use:     "down",
		Short:   "Stop every node agent of the dev cluster and remove what it made",
		Example: `  cairn dev down --dir .demo`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return errors.New("--dir is required")
			}
			c, err := loadDevCluster(dir)
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			// Filesystems on the volumes go first: they hold the loop
			// devices that the node agents' FUSE files back.
			if err := cleanupDevMounts(abs(dir)); err != nil {
				fmt.Fprintf(w, "warning: %v\n", err)
			}
			for _, n := range c.Nodes {
				if !n.alive() {
					continue
				}
				if !n.stop(syscall.SIGTERM, 10*time.Second) {
					fmt.Fprintf(w, "%s did not stop on SIGTERM; sending SIGKILL\n", n.ID)
					n.stop(syscall.SIGKILL, 5*time.Second)
				}
				fmt.Fprintf(w, "stopped %s (pid %d)\n", n.ID, n.PID)
				n.PID = 0
			}
			for _, n := range c.Nodes {
				if n.Holder == nil {
					continue
				}
				if p := n.Holder.proc(); p.alive() {
					if !p.stop(syscall.SIGTERM, 10*time.Second) {
						p.stop(syscall.SIGKILL, 5*time.Second)
					}
					fmt.Fprintf(w, "stopped the fuse holder of %s (pid %d)\n", n.ID, p.PID)
				}
				n.Holder.PID = 0
			}
			if c.Controller != nil {
				if p := c.Controller.proc(); p.alive() {
					if !p.stop(syscall.SIGTERM, 10*time.Second) {
						p.stop(syscall.SIGKILL, 5*time.Second)
					}
					fmt.Fprintf(w, "stopped the CSI controller (pid %d)\n", p.PID)
				}
				c.Controller.PID = 0
			}
			if err := cleanupDevMounts(abs(dir)); err != nil {
				fmt.Fprintf(w, "warning: %v\n", err)
			}
			if keep {
				return c.save(dir)
			}
			// The dev cluster's CA and certificates go with it: they are
			// its own, and a later dev up makes new ones.
			for _, n := range append([]string{"controller", "pki"}, nodeIDs(c)...) {
				if err := os.RemoveAll(filepath.Join(dir, n)); err != nil {
					return err
				}
			}
			if err := os.Remove(filepath.Join(dir, clusterFile)); err != nil {
				return err
			}
			_ = os.Remove(dir) // only if empty
			fmt.Fprintf(w, "removed the dev cluster in %s\n", dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "the dev cluster's directory (required)")
	cmd.Flags().BoolVar(&keep, "keep-data", false, "keep data dirs, logs and cluster.json")
	return cmd
}

func nodeIDs(c *devCluster) []string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, n.ID)
	}
	return out
}

func abs(p string) string {
	a, err := filepath.Abs(p)
	if err != nil {
		return p
	}
	return a
}

// cleanupDevMounts unmounts whatever the cluster's nodes left mounted under
// dir (staging and target mounts, FUSE mounts of killed nodes or left to
// their holders) and detaches loop devices whose backing file lay under
// dir: first the file systems on the volumes, newest first, then the loop
// devices, then the FUSE mounts. A loop device must go before the FUSE
// mount its file is in: that mount, busy, would only be detached lazily,
// and the loop device's backing file would no longer read as under dir.
func cleanupDevMounts(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var mounts, fuses []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) <= 4 || (f[4] != dir && !strings.HasPrefix(f[4], dir+"/")) {
			continue
		}
		if i := slices.Index(f, "-"); i > 0 && i+1 < len(f) && strings.HasPrefix(f[i+1], "fuse") {
			fuses = append(fuses, f[4])
		} else {
			mounts = append(mounts, f[4])
		}
	}
	var errs []string
	unmount := func(ms []string) {
		slices.Reverse(ms) // the newest mount first: bind mounts, then file systems
		for _, m := range ms {
			if err := syscall.Unmount(m, 0); err != nil {
				if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
					errs = append(errs, fmt.Sprintf("unmount %s: %v", m, err))
				}
			}
		}
	}
	unmount(mounts)
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, bf := range loops {
		back, err := os.ReadFile(bf)
		if err != nil || !strings.HasPrefix(strings.TrimSpace(string(back)), dir+"/") {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
		if err := exec.Command("losetup", "-d", dev).Run(); err != nil {
			errs = append(errs, fmt.Sprintf("detach %s: %v", dev, err))
		}
	}
	unmount(fuses)
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}
