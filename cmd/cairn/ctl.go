package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/internal/pki"
	"github.com/cairn-csi/cairn/replication/crypt"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// ctlOptions are the flags shared by every `cairn ctl` command.
type ctlOptions struct {
	// Servers are meta API addresses of any members.
	Servers []string
	// Output is "table" or "json".
	Output string
	// Timeout bounds each command.
	Timeout time.Duration
	// TLS names the ctl certificate (mutual TLS); none: plaintext.
	TLS tlsOptions
	// creds are the loaded credentials (nil: plaintext), set by client.
	creds *pki.Credentials
}

func (o *ctlOptions) Validate() error {
	if len(o.Servers) == 0 {
		return errors.New("--server is required (or CAIRN_SERVER): the meta API address of any member, e.g. 127.0.0.1:7002")
	}
	if o.Output != "table" && o.Output != "json" {
		return fmt.Errorf("-o %q: want table or json", o.Output)
	}
	if o.Timeout <= 0 {
		return fmt.Errorf("--timeout %v must be positive", o.Timeout)
	}
	return nil
}

// client validates the options and returns a meta client and a context.
func (o *ctlOptions) client(cmd *cobra.Command) (*meta.Client, context.Context, context.CancelFunc, error) {
	if err := bindEnv(cmd.Flags()); err != nil {
		return nil, nil, nil, err
	}
	if err := o.Validate(); err != nil {
		return nil, nil, nil, err
	}
	creds, err := o.TLS.load()
	if err != nil {
		return nil, nil, nil, err
	}
	o.creds = creds
	c, err := meta.NewClient(o.Servers, meta.WithTLS(o.creds))
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(cmd.Context(), o.Timeout)
	return c, ctx, func() { cancel(); c.Close() }, nil
}

func newCtlCommand() *cobra.Command {
	o := &ctlOptions{}
	cmd := &cobra.Command{
		Use:   "ctl",
		Short: "Inspect and change a Cairn cluster",
		Example: `  cairn ctl --server 127.0.0.1:7002 status
  cairn ctl --server 127.0.0.1:7002 volume create data --size 1Gi --replicas 3 -o json`,
	}
	pf := cmd.PersistentFlags()
	pf.StringSliceVar(&o.Servers, "server", nil, "meta API address(es) of any member(s)")
	pf.StringVarP(&o.Output, "output", "o", "table", "output format: table or json")
	o.TLS.AddFlags(pf)
	pf.DurationVar(&o.Timeout, "timeout", 30*time.Second, "give up after this long")
	cmd.AddCommand(newStatusCommand(o), newVolumeCommand(o), newSnapshotCommand(o), newCertCommand(o))
	return cmd
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// statusJSON is the shape of `ctl status -o json`.
type statusJSON struct {
	ClusterID string             `json:"cluster_id"`
	Leader    string             `json:"leader"`
	Members   []statusMemberJSON `json:"members"`
	Nodes     []statusNodeJSON   `json:"nodes"`
}

type statusMemberJSON struct {
	ID          string `json:"id"`
	Address     string `json:"address"` // meta API address
	RaftAddress string `json:"raft_address"`
	Voter       bool   `json:"voter"`
	Leader      bool   `json:"leader"`
}

type statusNodeJSON struct {
	ID            string `json:"id"`
	State         string `json:"state"`
	Zone          string `json:"zone,omitempty"`
	CapacityBytes uint64 `json:"capacity_bytes"`
	FreeBytes     uint64 `json:"free_bytes"`
}

func newStatusCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "status",
		Short:   "Show the leader, the raft members and the nodes",
		Example: `  cairn ctl --server 127.0.0.1:7002 status -o json`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			out := statusJSON{ClusterID: st.ClusterID, Leader: st.Leader, Members: []statusMemberJSON{}, Nodes: []statusNodeJSON{}}
			for _, m := range st.Members {
				out.Members = append(out.Members, statusMemberJSON{ID: m.ID, Address: m.APIAddr, RaftAddress: m.RaftAddr, Voter: m.Voter, Leader: m.Leader})
			}
			for _, n := range st.Nodes {
				out.Nodes = append(out.Nodes, statusNodeJSON{ID: n.ID, State: string(n.State), Zone: n.Zone, CapacityBytes: n.CapacityBytes, FreeBytes: n.FreeBytes})
			}
			w := cmd.OutOrStdout()
			if o.Output == "json" {
				return printJSON(w, out)
			}
			leader := out.Leader
			if leader == "" {
				leader = "(none: no quorum, or an election is running)"
			}
			fmt.Fprintf(w, "cluster %s   leader %s\n\n", orDash(out.ClusterID), leader)
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "MEMBER\tAPI ADDRESS\tRAFT ADDRESS\tVOTER\tROLE\tNODE STATE\tZONE\tFREE / CAPACITY")
			nodes := map[string]statusNodeJSON{}
			for _, n := range out.Nodes {
				nodes[n.ID] = n
			}
			for _, m := range out.Members {
				role := "follower"
				if m.Leader {
					role = "leader"
				}
				n, ok := nodes[m.ID]
				state, space := "unregistered", "-"
				if ok {
					state, space = n.State, formatSize(n.FreeBytes)+" / "+formatSize(n.CapacityBytes)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%v\t%s\t%s\t%s\t%s\n", m.ID, orDash(m.Address), m.RaftAddress, m.Voter, role, state, orDash(n.Zone), space)
			}
			return tw.Flush()
		},
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newVolumeCommand(o *ctlOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "volume", Short: "List, show, create, expand and delete volumes"}
	cmd.AddCommand(newVolumeListCommand(o), newVolumeGetCommand(o), newVolumeCreateCommand(o), newVolumeDeleteCommand(o),
		newVolumeExportCommand(o), newVolumeUnexportCommand(o), newVolumeVerifyCommand(o), newVolumeSetQoSCommand(o), newVolumeScrubCommand(o), newVolumeExpandCommand(o),
		newVolumePromoteCommand(o))
	return cmd
}

func newVolumeListCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "list",
		Short:   "List volumes",
		Example: `  cairn ctl --server 127.0.0.1:7002 volume list`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := c.State(ctx, true)
			if err != nil {
				return err
			}
			vols := st.SortedVolumes()
			if vols == nil {
				vols = []*meta.Volume{}
			}
			w := cmd.OutOrStdout()
			if o.Output == "json" {
				return printJSON(w, vols)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tSIZE\tSTATE\tEPOCH\tATTACHED\tREPLICAS")
			for _, v := range vols {
				state := string(v.State)
				if v.Hidden {
					state += " (deleted, kept for its snapshots)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", v.ID, v.Name, formatSize(v.SizeBytes), state, v.Epoch, attachedTo(v), replicaSummary(v))
			}
			return tw.Flush()
		},
	}
}

func attachedTo(v *meta.Volume) string {
	if v.Attachment == nil {
		return "-"
	}
	return v.Attachment.Node
}

// replicaSummary reads like "3/3 healthy" or "2/3 healthy, 1 rebuilding".
func replicaSummary(v *meta.Volume) string {
	counts := map[meta.ReplicaState]int{}
	for _, r := range v.Replicas {
		counts[r.State]++
	}
	s := fmt.Sprintf("%d/%d healthy", counts[meta.ReplicaHealthy], v.ReplicaCount)
	for _, st := range []meta.ReplicaState{meta.ReplicaFollowing, meta.ReplicaRebuilding, meta.ReplicaStale, meta.ReplicaFailed} {
		if counts[st] > 0 {
			s += fmt.Sprintf(", %d %s", counts[st], st)
		}
	}
	return s
}

func newVolumeGetCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "get ID",
		Short:   "Show one volume",
		Example: `  cairn ctl --server 127.0.0.1:7002 volume get vol-0123456789abcdef -o json`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			v, err := c.Volume(ctx, args[0])
			if err != nil {
				return err
			}
			return printVolume(cmd.OutOrStdout(), o.Output, v)
		},
	}
}

func printVolume(w io.Writer, format string, v *meta.Volume) error {
	if format == "json" {
		return printJSON(w, v)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "id:\t%s\nname:\t%s\nsize:\t%s (%d bytes)\nstate:\t%s\nepoch:\t%d\nattached to:\t%s\nwrite quorum:\t%d of %d\n",
		v.ID, v.Name, formatSize(v.SizeBytes), v.SizeBytes, v.State, v.Epoch, attachedTo(v), v.WriteQuorum, v.ReplicaCount)
	if err := tw.Flush(); err != nil {
		return err
	}
	if c := v.Condition; c != nil && c.Abnormal {
		fmt.Fprintf(w, "condition:    abnormal: %s\n", c.Message)
	} else {
		fmt.Fprintf(w, "condition:    normal\n")
	}
	if u := v.Usage; u != nil {
		fmt.Fprintf(w, "on disk:      %s on replica %s, snapshots included\n", formatSize(u.AllocatedBytes), u.ReplicaID)
		if u.Depth > 0 {
			fmt.Fprintf(w, "chain:        %d layers, the head included (a new snapshot is refused at %d)\n", u.Depth, meta.ChainDepthHardLimit)
		}
		if f := u.Flatten; f != nil {
			progressBar(w, "flattening into "+f.Layer, f.DoneBytes, f.TotalBytes)
			fmt.Fprintln(w)
		}
		if m := u.Merge; m != nil {
			progressBar(w, "deleting snapshot "+m.Layer, m.DoneBytes, m.TotalBytes)
			fmt.Fprintln(w)
		}
	}
	for _, r := range v.Replicas {
		if sp := r.Space; sp != nil {
			fmt.Fprintf(w, "space:        replica %s on %s: %s\n", r.ID, r.Node, formatSpace(*sp))
		}
	}
	if spec, err := v.Spec(); err == nil {
		fmt.Fprintf(w, "checksums:    %s\n", spec.ChecksumAlgorithm)
		if spec.Compression != "" {
			fmt.Fprintf(w, "compression:  %s (each 64 KiB extent stored compressed where that saves a 4 KiB block)\n", spec.Compression)
		}
		if spec.Deduplication {
			fmt.Fprintf(w, "deduplication: on (replicas on data directories that share blocks; a node's pass shares equal extents every --dedup-interval)\n")
		}
		if spec.Async() {
			level := spec.ConsistencyLevel
			if level == "" {
				level = "strong"
			}
			fmt.Fprintf(w, "replication:  asynchronous (acknowledged by %d; reads %s)\n", v.WriteQuorum, level)
		}
		if v.Encryption != nil {
			fmt.Fprintf(w, "encryption:   %s (key id %s)\n", v.Encryption.Cipher, v.Encryption.KeyID)
		}
		if spec.SnapshotSchedule != "" {
			fmt.Fprintf(w, "snapshots:    on schedule %q (UTC), the newest %d kept\n", spec.SnapshotSchedule, spec.Retain())
		}
	}
	if kind, id := meta.ParseContentSource(v.ContentSource); kind != "" {
		fmt.Fprintf(w, "made from:    %s %s\n", kind, id)
	}
	if s := v.Scrub; s != nil {
		if s.Done {
			fmt.Fprintf(w, "last scrub:   #%d, %s: %d blocks checked, %d repaired, %d unrecoverable\n", s.Seq,
				time.Unix(0, s.FinishedAt).UTC().Format(time.RFC3339), s.BlocksChecked, s.Repaired, s.Unrecoverable)
		} else {
			progressBar(w, fmt.Sprintf("scrub #%d", s.Seq), s.BlocksChecked, s.BlocksTotal)
			fmt.Fprintln(w)
		}
	}
	if rb := v.Rebuild; rb != nil {
		label := "rebuild of " + rb.ReplicaID
		if rb.Done {
			label = "last rebuild (" + rb.ReplicaID + ", done)"
		}
		progressBar(w, label, rb.BytesCompared, rb.BytesTotal)
		fmt.Fprintf(w, "  compared %s, copied %s of %s\n", formatSize(rb.BytesCompared), formatSize(rb.BytesCopied), formatSize(rb.BytesTotal))
	}
	fmt.Fprintln(w, "replicas:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  ID\tNODE\tSTATE\tLAG")
	for _, r := range v.Replicas {
		lag := "-"
		if r.State == meta.ReplicaFollowing {
			lag = r.Lag.String()
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", r.ID, r.Node, r.State, lag)
	}
	return tw.Flush()
}

func newVolumeCreateCommand(o *ctlOptions) *cobra.Command {
	var size, preferred, passFile string
	var wait bool
	var from restoreSource
	var params []string
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a volume and place its replicas, blank or from a snapshot or another volume",
		Long: `Create a volume and place its replicas.

Every StorageClass parameter can be given with --param KEY=VALUE, validated as
the CSI driver validates it; the other flags are spellings of some of them.

With --from-snapshot the volume holds what the snapshot holds; with
--from-volume it is a clone of the volume as it is now (through a snapshot
taken for it and deleted again). Its replicas go first to the nodes that hold
the snapshot, where they are made at once from its layers, whatever the size.
--size defaults to the source's; a larger one grows the copy, a smaller one is
refused.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume create data --size 64Mi --replicas 3
  cairn ctl --server 127.0.0.1:7002 volume create db --size 1Gi --param maxBandwidth=100Mi --param dataLocality=best-effort --preferred-node node-2
  cairn ctl --server 127.0.0.1:7002 volume create data-copy --from-snapshot snap-0123456789abcdef
  cairn ctl --server 127.0.0.1:7002 volume create data-clone --from-volume vol-0123456789abcdef --size 2Gi`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := from.check(preferred); err != nil {
				return err
			}
			var bytes uint64
			if size != "" || !from.set() {
				var err error
				if bytes, err = parseSize(size); err != nil {
					return fmt.Errorf("--size: %w", err)
				}
				if bytes == 0 {
					return errors.New("--size must be more than 0")
				}
			}
			in, err := newSpecInput(cmd.Flags(), createSpecFlags, params)
			if err != nil {
				return err
			}
			spec, err := in.spec()
			if err != nil {
				return err
			}
			// A StorageClass's best-effort follows the pod's node; ctl has
			// no pod, so the operator names the node. A restored volume's
			// replicas go where the snapshot is instead.
			// The default best-effort with no node named places as
			// disabled does; only asking for it needs the node.
			if by, asked := in.from[volspec.KeyDataLocality]; asked && spec.DataLocality == volspec.LocalityBestEffort && preferred == "" && !from.set() {
				return fmt.Errorf("%s: name the node to keep a replica on with --preferred-node", by)
			}
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			cv := meta.CreateVolume{Name: args[0], SizeBytes: bytes, Replicas: spec.Replicas, WriteQuorum: spec.WriteQuorum,
				Parameters: spec.Params(), PreferredNode: preferred}
			if spec.Encrypted() && !from.set() {
				// As CSI does with the provisioner's Secret: a new data
				// key, wrapped by the passphrase.
				if passFile == "" {
					return fmt.Errorf("%s: an encrypted volume needs --passphrase-file (the file holds the passphrase that wraps its key)", in.from[volspec.KeyEncryption])
				}
				pass, err := os.ReadFile(passFile)
				if err != nil {
					return fmt.Errorf("--passphrase-file: %w", err)
				}
				if cv.Encryption, _, err = crypt.NewDataKey(pass); err != nil {
					return fmt.Errorf("--passphrase-file %s: %w", passFile, err)
				}
			}
			var v *meta.Volume
			if from.set() {
				v, err = from.restore(ctx, c, cv)
			} else {
				var res meta.Result
				res, err = c.Apply(ctx, meta.CreateCommand(&cv))
				v = res.Volume
			}
			if err != nil {
				return err
			}
			if wait && from.set() {
				if v, err = waitFilled(ctx, c, v.ID, cmd.ErrOrStderr()); err != nil {
					return err
				}
			}
			if o.Output == "json" {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created volume %s%s\n", v.ID, from.describe())
			return printVolume(cmd.OutOrStdout(), "table", v)
		},
	}
	cmd.Flags().BoolVar(&wait, "wait", false, "with --from-snapshot or --from-volume: wait (within --timeout) until every replica holds the data, showing the copies' progress")
	cmd.Flags().StringVar(&size, "size", "", "volume size, e.g. 64Mi or 10Gi (required, unless the volume is made from a snapshot or a volume: then the source's size)")
	cmd.Flags().Int("replicas", volspec.DefaultReplicas, fmt.Sprintf("number of replicas (1 to %d)", volspec.MaxReplicas))
	cmd.Flags().Int("write-quorum", 0, "healthy replicas a write needs (0: a majority)")
	cmd.Flags().Duration("stale-replica-timeout", 0, "replace a replica whose node stays down this long (0: the cluster's default)")
	addQoSFlags(cmd.Flags())
	cmd.Flags().StringVar(&preferred, "preferred-node", "", "place a replica on this node if it has room (data locality: the engine there reads its own replica)")
	cmd.Flags().String("checksum-algorithm", volspec.ChecksumCRC32C, "block checksums: crc32c (every block verified on write and read) or none")
	cmd.Flags().String("snapshot-schedule", "", `take a snapshot on this 5-field cron schedule, in UTC, e.g. "0 */6 * * *" (the store's leader takes them)`)
	cmd.Flags().Int("snapshot-retain", 0, fmt.Sprintf("how many scheduled snapshots to keep (0: %d)", volspec.DefaultSnapshotRetain))
	cmd.Flags().StringVar(&from.snapshot, "from-snapshot", "", "make the volume from this snapshot (an id)")
	cmd.Flags().StringVar(&from.volume, "from-volume", "", "make the volume a clone of this volume (an id)")
	cmd.Flags().StringArrayVar(&params, "param", nil, paramFlagHelp)
	cmd.Flags().StringVar(&passFile, "passphrase-file", "", "with --param encryption=aes-256-gcm: a file whose bytes, a final newline included, are the passphrase that wraps the volume's key (as kubectl create secret --from-file takes them; CSI staging then needs the same)")
	return cmd
}

// waitFilled waits until every replica of the restored volume id holds its
// data: those made from the snapshot's layers are made (their generation
// recorded), and those placed elsewhere are rebuilt from them, whose copy
// it shows as a progress bar on w.
func waitFilled(ctx context.Context, c *meta.Client, id string, w io.Writer) (*meta.Volume, error) {
	for {
		v, err := c.Volume(ctx, id)
		if err != nil {
			return nil, err
		}
		filled := v.HealthyReplicas() == v.ReplicaCount
		for _, r := range v.Replicas {
			filled = filled && r.Generation != ""
		}
		if rb := v.Rebuild; rb != nil && !rb.Done && rb.BytesTotal > 0 {
			progressBar(w, "\rcopying to "+rb.ReplicaID, rb.BytesCompared, rb.BytesTotal)
		}
		if filled {
			if v.Rebuild != nil {
				fmt.Fprintln(w)
			}
			return v, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("volume %s: %d of %d replicas hold its data so far: %w", id, v.HealthyReplicas(), v.ReplicaCount, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func newVolumePromoteCommand(o *ctlOptions) *cobra.Command {
	var accept bool
	cmd := &cobra.Command{
		Use:   "promote ID --accept-data-loss",
		Short: "Make a follower of an asynchronous volume healthy when its healthy replicas' nodes are down",
		Long: `An asynchronous volume's followers may lack its latest acknowledged writes, so
while every healthy replica is on a node that is down the volume is not attached
again. Bring a node back if you can. Otherwise promote: the follower that had
applied the most writes becomes healthy, the acknowledged writes it lacks are
lost, and the replicas that were healthy are rebuilt from it when their nodes
return. The command prints the recovery point: how far that follower was behind
at the engine's last report. The volume must be detached.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume promote vol-0123456789abcdef --accept-data-loss`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !accept {
				return fmt.Errorf("promoting a follower of %s loses the acknowledged writes it lacks; run again with --accept-data-loss to do it anyway", args[0])
			}
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			v, err := c.Volume(ctx, args[0])
			if err != nil {
				return err
			}
			res, err := c.Apply(ctx, &meta.PromoteVolume{VolumeID: v.ID, AcceptDataLoss: true, ExpectEpoch: v.Epoch})
			if err != nil {
				return err
			}
			p := res.Promoted
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: replica %s on %s promoted to healthy\nrecovery point: %s\n", v.ID, p.ID, p.Node, p.Lag)
			return nil
		},
	}
	cmd.Flags().BoolVar(&accept, "accept-data-loss", false, "lose the acknowledged writes the follower lacks")
	return cmd
}

func newVolumeDeleteCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a volume (refused while it is attached)",
		Long: `Delete a volume. While snapshots of it remain, it is hidden instead: its name
is free, CSI no longer lists it (volume list shows it marked "deleted, kept for
its snapshots"), and it goes with its last snapshot. Its scheduled snapshots
(snapshotSchedule) are deleted with it.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume delete vol-0123456789abcdef`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			// Not DeleteVolume: that would take the volume's replicas, and
			// with them the layers its snapshots live in.
			v, err := c.RetireVolume(ctx, strings.TrimSpace(args[0]))
			if err != nil {
				return err
			}
			if v != nil && v.Hidden {
				fmt.Fprintf(cmd.OutOrStdout(), "deleted volume %s; it stays hidden until its snapshots are deleted\n", v.ID)
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted volume %s\n", strings.TrimSpace(args[0]))
			return nil
		},
	}
}

// newCertCommand is `cairn ctl cert`: the certificates this client uses.
func newCertCommand(o *ctlOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "cert", Short: "Show the mutual TLS certificates in use"}
	cmd.AddCommand(&cobra.Command{
		Use:     "status",
		Short:   "Show this client's identity, when its certificate expires, and the CAs it trusts",
		Example: `  cairn ctl --tls-dir ~/.cairn cert status`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := bindEnv(cmd.Flags()); err != nil {
				return err
			}
			creds, err := o.TLS.load()
			if err != nil {
				return err
			}
			if creds == nil {
				return errors.New("no certificate given: --tls-dir (or CAIRN_TLS_DIR), or --tls-ca, --tls-cert and --tls-key")
			}
			out, err := certStatus(creds)
			if err != nil {
				return err
			}
			fmt.Fprint(cmd.OutOrStdout(), out)
			if len(o.Servers) == 0 {
				return nil
			}
			// With --server: every member's certificate, as its meta
			// API presents it in the handshake.
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := c.Status(ctx)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "\nMEMBER\tAPI ADDRESS\tCERTIFICATE\tEXPIRES\tIN")
			for _, m := range st.Members {
				id, notAfter, err := peerCertificate(ctx, m.APIAddr, creds)
				if err != nil {
					fmt.Fprintf(tw, "%s\t%s\t%v\t\t\n", m.ID, m.APIAddr, err)
					continue
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.ID, m.APIAddr, id, notAfter.UTC().Format(time.RFC3339), time.Until(notAfter).Round(time.Hour))
			}
			return tw.Flush()
		},
	})
	return cmd
}

// formatSpace says what a replica takes on its disk (meta.ReplicaSpace):
// with compression, the data written, what compression stored it in and
// their ratio; with deduplication, what sharing saves.
func formatSpace(sp meta.ReplicaSpace) string {
	if sp.LogicalBytes > 0 {
		out := fmt.Sprintf("%s written (snapshots included), compressed into %s (ratio %.2f)",
			formatSize(sp.LogicalBytes), formatSize(sp.AllocatedBytes), sp.CompressionRatio())
		if sp.DedupSavedBytes == 0 && sp.SharedBytes == 0 {
			return out
		}
		return fmt.Sprintf("%s, %s on disk of its own: %s saved by deduplication; %s shares blocks with other volumes, snapshots or clones",
			out, formatSize(sp.PhysicalBytes()), formatSize(sp.DedupSavedBytes), formatSize(sp.SharedBytes))
	}
	return fmt.Sprintf("%s written (snapshots included), %s on disk of its own: %s saved by deduplication; %s shares blocks with other volumes, snapshots or clones",
		formatSize(sp.AllocatedBytes), formatSize(sp.PhysicalBytes()), formatSize(sp.DedupSavedBytes), formatSize(sp.SharedBytes))
}
