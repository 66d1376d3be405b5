package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/replication/volspec"
)

// addQoSFlags adds the QoS flags of volume create and volume set-qos. They
// are other spellings of the QoS keys (qosSpecFlags): their values are read
// back from the flag set and parsed by volspec, like a StorageClass's.
func addQoSFlags(fs *pflag.FlagSet) {
	fs.Uint64("max-iops", 0, "I/O operations per second the volume may do (0: unlimited)")
	fs.Uint64("min-iops", 0, "I/O operations per second reserved for the volume (0: none)")
	fs.String("max-bandwidth", "", "bytes per second the volume may read and write, e.g. 100Mi (0: unlimited)")
	fs.Duration("burst-duration", 0, "how long the volume may run above its limits from saved tokens (default 1s)")
}

func newVolumeSetQoSCommand(o *ctlOptions) *cobra.Command {
	var params []string
	cmd := &cobra.Command{
		Use:     "set-qos ID",
		Short:   "Change a live volume's QoS limits (applied by its engine within a second)",
		Example: `  cairn ctl --server 127.0.0.1:7002 volume set-qos vol-0123 --max-iops 500 --min-iops 100 --max-bandwidth 100Mi --burst-duration 1s`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			in, err := newSpecInput(cmd.Flags(), qosSpecFlags, params)
			if err != nil {
				return err
			}
			p, err := in.changes()
			if err != nil {
				return err
			}
			if len(p) == 0 {
				return fmt.Errorf("give at least one of --max-iops, --min-iops, --max-bandwidth, --burst-duration, --param")
			}
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			res, err := c.Apply(ctx, &meta.SetParameters{VolumeID: args[0], Parameters: p})
			if err != nil {
				return err
			}
			if o.Output == "json" {
				return printJSON(cmd.OutOrStdout(), res.Volume)
			}
			spec, _ := res.Volume.Spec()
			qos := spec.QoS
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: max IOPS %s, min IOPS %s, max bandwidth %s, burst %s\n", res.Volume.ID,
				limit(qos.MaxIOPS, strconv.FormatUint(qos.MaxIOPS, 10)), limit(qos.MinIOPS, strconv.FormatUint(qos.MinIOPS, 10)),
				limit(qos.MaxBytesPerSec, formatSize(qos.MaxBytesPerSec)+"/s"), burstOf(qos.BurstDuration))
			return nil
		},
	}
	addQoSFlags(cmd.Flags())
	cmd.Flags().StringArrayVar(&params, "param", nil, "QoS parameter KEY=VALUE, as a VolumeAttributesClass says it (repeatable): "+strings.Join(volspec.MutableKeys(), ", "))
	return cmd
}

func limit(n uint64, s string) string {
	if n == 0 {
		return "unlimited"
	}
	return s
}

func burstOf(d time.Duration) string {
	if d == 0 {
		return "1s (default)"
	}
	return d.String()
}
