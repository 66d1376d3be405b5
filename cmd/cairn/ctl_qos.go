package main

import (
	"fmt"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cairn-csi/cairn/replication/meta"
)

// qosFlags are the QoS flags of volume create and volume set-qos.
type qosFlags struct {
	maxIOPS, minIOPS uint64
	maxBandwidth     string
	burst            time.Duration
}

func (q *qosFlags) add(fs *pflag.FlagSet) {
	fs.Uint64Var(&q.maxIOPS, "max-iops", 0, "I/O operations per second the volume may do (0: unlimited)")
	fs.Uint64Var(&q.minIOPS, "min-iops", 0, "I/O operations per second reserved for the volume (0: none)")
	fs.StringVar(&q.maxBandwidth, "max-bandwidth", "", "bytes per second the volume may read and write, e.g. 100Mi (0: unlimited)")
	fs.DurationVar(&q.burst, "burst-duration", 0, "how long the volume may run above its limits from saved tokens (default 1s)")
}

// parameters returns the QoS parameters of the flags that were set.
func (q *qosFlags) parameters(fs *pflag.FlagSet) (map[string]string, error) {
	p := map[string]string{}
	if fs.Changed("max-iops") {
		p[meta.ParamMaxIOPS] = strconv.FormatUint(q.maxIOPS, 10)
	}
	if fs.Changed("min-iops") {
		p[meta.ParamMinIOPS] = strconv.FormatUint(q.minIOPS, 10)
	}
	if fs.Changed("max-bandwidth") {
		n, err := parseSize(q.maxBandwidth)
		if err != nil {
			return nil, fmt.Errorf("--max-bandwidth: %w", err)
		}
		p[meta.ParamMaxBandwidth] = strconv.FormatUint(n, 10)
	}
	if fs.Changed("burst-duration") {
		if q.burst <= 0 {
			return nil, fmt.Errorf("--burst-duration %v must be positive", q.burst)
		}
		p[meta.ParamBurstDuration] = q.burst.String()
	}
	for k, v := range p {
		if v == "0" {
			p[k] = "" // 0 removes the limit
		}
	}
	if _, err := meta.ParseQoS(p); err != nil {
		return nil, err
	}
	return p, nil
}

func newVolumeSetQoSCommand(o *ctlOptions) *cobra.Command {
	q := &qosFlags{}
	cmd := &cobra.Command{
		Use:     "set-qos ID",
		Short:   "Change a live volume's QoS limits (applied by its engine within a second)",
		Example: `  cairn ctl --server 127.0.0.1:7002 volume set-qos vol-0123 --max-iops 500 --min-iops 100 --max-bandwidth 100Mi --burst-duration 1s`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := q.parameters(cmd.Flags())
			if err != nil {
				return err
			}
			if len(p) == 0 {
				return fmt.Errorf("give at least one of --max-iops, --min-iops, --max-bandwidth, --burst-duration")
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
			qos, _ := meta.ParseQoS(res.Volume.Parameters)
			fmt.Fprintf(cmd.OutOrStdout(), "volume %s: max IOPS %s, min IOPS %s, max bandwidth %s, burst %s\n", res.Volume.ID,
				limit(qos.MaxIOPS, strconv.FormatUint(qos.MaxIOPS, 10)), limit(qos.MinIOPS, strconv.FormatUint(qos.MinIOPS, 10)),
				limit(qos.MaxBytesPerSec, formatSize(qos.MaxBytesPerSec)+"/s"), burstOf(qos.BurstDuration))
			return nil
		},
	}
	q.add(cmd.Flags())
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
