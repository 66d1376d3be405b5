package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/replica"
	"github.com/cairn-csi/cairn/replication/verify"
)

func newVolumeExportCommand(o *ctlOptions) *cobra.Command {
	var node, socket string
	var readOnly bool
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "export ID --node NODE_ID --nbd SOCKET_PATH",
		Short: "Attach a volume to a node and serve it there over NBD on a unix socket",
		Long: `Attach the volume to NODE_ID (a new epoch: an engine elsewhere is fenced)
and have that node's agent serve it over NBD on SOCKET_PATH. If the volume is
attached to another node, the attachment moves (a takeover).`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume export vol-0123 --node node-1 --nbd /tmp/vol.sock
  nbdinfo 'nbd+unix:///?socket=/tmp/vol.sock'`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if node == "" {
				return errors.New("--node is required")
			}
			if socket == "" || !strings.HasPrefix(socket, "/") {
				return fmt.Errorf("--nbd %q: want an absolute path for the unix socket", socket)
			}
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			v, err := attachWithTakeover(ctx, c, args[0], node, socket, readOnly)
			if err != nil {
				return err
			}
			if wait > 0 {
				if err := waitSocket(ctx, socket, wait); err != nil {
					return fmt.Errorf("volume %s attached to %s at epoch %d, but %w", v.ID, node, v.Epoch, err)
				}
			}
			if o.Output == "json" {
				return printJSON(cmd.OutOrStdout(), v)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s exported on %s at %s (epoch %d)\n", v.ID, node, socket, v.Epoch)
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "node that serves the volume (required)")
	cmd.Flags().StringVar(&socket, "nbd", "", "unix socket path for the NBD export on that node (required)")
	cmd.Flags().BoolVar(&readOnly, "read-only", false, "export read-only")
	cmd.Flags().DurationVar(&wait, "wait", 20*time.Second, "wait this long for the socket to appear (0: don't; needs the node on this machine)")
	return cmd
}

// attachWithTakeover attaches id to node with the NBD socket, first taking
// the attachment away from any other node (or from this node, exported
// differently).
func attachWithTakeover(ctx context.Context, c *meta.Client, id, node, socket string, readOnly bool) (*meta.Volume, error) {
	v, err := c.Volume(ctx, id)
	if err != nil {
		return nil, err
	}
	if a := v.Attachment; a != nil && !(a.Node == node && a.NBDSocket == socket && a.ReadOnly == readOnly) {
		if _, err := c.Detach(ctx, id, ""); err != nil {
			return nil, fmt.Errorf("take the attachment away from %s: %w", a.Node, err)
		}
	}
	return c.Attach(ctx, id, node, readOnly, socket)
}

func waitSocket(ctx context.Context, path string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the NBD socket %s did not appear within %v (see the node's log)", path, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func newVolumeUnexportCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "unexport ID",
		Short:   "Stop serving a volume and detach it (the node flushes first)",
		Example: `  cairn ctl --server 127.0.0.1:7002 volume unexport vol-0123`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			before, err := c.Volume(ctx, args[0])
			if err != nil {
				return err
			}
			if before.Attachment == nil {
				fmt.Fprintf(cmd.OutOrStdout(), "volume %s is not exported\n", before.ID)
				return nil
			}
			if _, err := c.Detach(ctx, args[0], ""); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s unexported from %s\n", before.ID, before.Attachment.Node)
			return nil
		},
	}
}

func newVolumeVerifyCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "verify ID",
		Short: "Compare all healthy replicas extent by extent; exit 1 on any difference",
		Long: `Reads the CRC32C of every extent from every healthy replica and compares
them. Run it while the volume is idle (unexported, or no writes in flight):
a write in flight can make replicas differ for a moment.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume verify vol-0123`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			rep, err := verify.Volume(ctx, c, args[0], replica.WithTLS(o.creds))
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if o.Output == "json" {
				if err := printJSON(w, rep); err != nil {
					return err
				}
			} else if rep.Identical {
				fmt.Fprintf(w, "volume %s: %d healthy replicas identical over %d extents (%s)\n", rep.VolumeID, len(rep.Replicas), rep.Extents, strings.Join(rep.Replicas, ", "))
			} else {
				fmt.Fprintf(w, "volume %s: replicas DIFFER in %d of %d extents: %v\n", rep.VolumeID, len(rep.Differing), rep.Extents, rep.Differing)
			}
			if !rep.Identical {
				return &exitError{code: 1, err: fmt.Errorf("volume %s: healthy replicas differ", rep.VolumeID)}
			}
			return nil
		},
	}
}

// progressBar draws "[#####.....]  45.0%".
func progressBar(w io.Writer, label string, done, total uint64) {
	const width = 30
	frac := 1.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	n := int(frac * width)
	fmt.Fprintf(w, "%s [%s%s] %5.1f%%", label, strings.Repeat("#", n), strings.Repeat(".", width-n), frac*100)
}
