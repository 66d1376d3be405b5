package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/replication/meta"
)

func newVolumeExpandCommand(o *ctlOptions) *cobra.Command {
	var size string
	cmd := &cobra.Command{
		Use:   "expand ID --size SIZE",
		Short: "Grow a volume, online (volumes never shrink)",
		Long: `Grow a volume to --size, while it is attached and in use or not.

The store records the new size; the engine of an attached volume then grows
its replicas and its size within seconds (an NBD export's new connections see
it), and a replica whose node is down is grown when it returns, before it
serves. A file system on a CSI volume grows when kubelet calls
NodeExpandVolume. A size smaller than the volume's is refused.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume expand vol-0123456789abcdef --size 2Gi`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			want, err := parseSize(size)
			if err != nil {
				return fmt.Errorf("--size: %w", err)
			}
			if want == 0 || want%512 != 0 {
				return fmt.Errorf("--size %s: a volume's size is a positive number of 512-byte sectors", size)
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
			w := cmd.OutOrStdout()
			switch {
			case want < v.SizeBytes:
				return fmt.Errorf("volume %s is %s (%d bytes); --size %s (%d bytes) would shrink it, and volumes never shrink",
					v.ID, formatSize(v.SizeBytes), v.SizeBytes, size, want)
			case want == v.SizeBytes:
				if o.Output == "json" {
					return printJSON(w, v)
				}
				fmt.Fprintf(w, "volume %s is already %s\n", v.ID, formatSize(v.SizeBytes))
				return nil
			}
			res, err := c.Apply(ctx, &meta.ExpandVolume{VolumeID: v.ID, SizeBytes: want})
			if err != nil {
				return err
			}
			if res.Volume == nil {
				return errors.New("the store answered without the volume")
			}
			if o.Output == "json" {
				return printJSON(w, res.Volume)
			}
			fmt.Fprintf(w, "expanded volume %s from %s to %s\n", v.ID, formatSize(v.SizeBytes), formatSize(res.Volume.SizeBytes))
			return nil
		},
	}
	cmd.Flags().StringVar(&size, "size", "", "the new size, e.g. 2Gi (required; not less than the volume's)")
	_ = cmd.MarkFlagRequired("size")
	return cmd
}
