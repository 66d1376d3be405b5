package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/replication/meta"
)

// Snapshots through the store (docs/snapshots.md): ctl records what it
// wants and the node serving the volume does it, as for the CSI driver.

func newSnapshotCommand(o *ctlOptions) *cobra.Command {
	cmd := &cobra.Command{Use: "snapshot", Short: "Take, list, show and delete snapshots of volumes"}
	cmd.AddCommand(newSnapshotCreateCommand(o), newSnapshotListCommand(o), newSnapshotGetCommand(o), newSnapshotDeleteCommand(o))
	return cmd
}

func newSnapshotCreateCommand(o *ctlOptions) *cobra.Command {
	var noWait bool
	cmd := &cobra.Command{
		Use:   "create VOLUME NAME",
		Short: "Take a snapshot of a volume and wait until it is ready",
		Long: `Take a crash-consistent snapshot of a volume, attached or not, named NAME, and
wait (up to --timeout) until the node serving the volume has taken it. The
same name and volume give the same snapshot: running the command again after a
timeout waits for the same one. The snapshot's size is the volume's.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 snapshot create vol-0123456789abcdef before-upgrade --timeout 2m`,
		Args:    cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vol, name := strings.TrimSpace(args[0]), args[1]
			if err := meta.CheckUserSnapshotName(vol, name); err != nil {
				return err
			}
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			var sn *meta.Snapshot
			if noWait {
				if sn, err = c.RequestSnapshot(ctx, vol, name); err != nil {
					return err
				}
			} else if sn, err = c.TakeSnapshot(ctx, vol, name); err != nil {
				if sn != nil && ctx.Err() != nil {
					return fmt.Errorf("snapshot %s is recorded but not ready within --timeout %v (run the command again to keep waiting): %w", sn.ID, o.Timeout, err)
				}
				return err
			}
			return printSnapshot(cmd.OutOrStdout(), o.Output, sn)
		},
	}
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "record the snapshot and return at once, before it is taken")
	return cmd
}

func newSnapshotListCommand(o *ctlOptions) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "list [VOLUME]",
		Short: "List snapshots, of every volume or of one",
		Long: `List snapshots, oldest first. STATE is ready, pending (asked for, not taken
yet), error (the last attempt's error; the node retries) or deleting (its
space is coming back). Snapshots being deleted and those Cairn takes for itself
(a clone's) are hidden unless --all is given.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 snapshot list
  cairn ctl --server 127.0.0.1:7002 snapshot list vol-0123456789abcdef --all -o json`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			vol := ""
			if len(args) == 1 {
				if vol = strings.TrimSpace(args[0]); vol == "" {
					return errors.New("the volume id is empty")
				}
			}
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			st, err := c.State(ctx, true)
			if err != nil {
				return err
			}
			snaps := listSnapshots(st, vol, all)
			if vol != "" && len(snaps) == 0 && st.Volumes[vol] == nil {
				return fmt.Errorf("volume %q: %w", vol, meta.ErrNotFound)
			}
			if o.Output == "json" {
				return printJSON(cmd.OutOrStdout(), snaps)
			}
			return printSnapshotTable(cmd.OutOrStdout(), snaps)
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "also list snapshots being deleted and Cairn's own")
	return cmd
}

// listSnapshots returns the snapshots of st (of volume vol, unless it is
// ""), oldest first, without the hidden ones unless all.
func listSnapshots(st *meta.State, vol string, all bool) []*meta.Snapshot {
	out := []*meta.Snapshot{}
	for _, sn := range st.Snapshots {
		if (vol == "" || sn.SourceVolumeID == vol) && (all || !sn.Hidden()) {
			out = append(out, sn)
		}
	}
	slices.SortFunc(out, func(a, b *meta.Snapshot) int {
		if c := cmp.Compare(a.CreatedAt, b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

// snapshotState says where a snapshot is in its life, for the STATE column.
func snapshotState(sn *meta.Snapshot) string {
	switch {
	case sn.Deleting:
		return "deleting"
	case sn.ReadyToUse:
		return "ready"
	case sn.Error != "":
		return "error: " + sn.Error
	}
	return "pending"
}

func formatCreated(ns int64) string {
	if ns == 0 {
		return "-"
	}
	return time.Unix(0, ns).UTC().Format(time.RFC3339)
}

func printSnapshotTable(w io.Writer, snaps []*meta.Snapshot) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tNAME\tVOLUME\tSIZE\tHELD\tALONE\tREADY\tCREATED\tSTATE")
	for _, sn := range snaps {
		held, alone := snapshotSpace(sn)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%v\t%s\t%s\n", sn.ID, sn.Name, sn.SourceVolumeID, formatSize(sn.SizeBytes),
			held, alone, sn.ReadyToUse, formatCreated(sn.CreatedAt), snapshotState(sn))
	}
	return tw.Flush()
}

// printSnapshot shows one snapshot, field by field (or as JSON).
func printSnapshot(w io.Writer, format string, sn *meta.Snapshot) error {
	if format == "json" {
		return printJSON(w, sn)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "id:\t%s\nname:\t%s\nvolume:\t%s\nsize:\t%s (%d bytes)\nready:\t%v\ncreated:\t%s\nstate:\t%s\n",
		sn.ID, sn.Name, sn.SourceVolumeID, formatSize(sn.SizeBytes), sn.SizeBytes, sn.ReadyToUse, formatCreated(sn.CreatedAt), snapshotState(sn))
	if slot, ok := meta.ScheduledSlot(sn); ok {
		fmt.Fprintf(tw, "scheduled:\tslot %s (snapshotSchedule)\n", slot.Format(time.RFC3339))
	}
	if sn.Hidden() && !sn.Deleting {
		fmt.Fprintf(tw, "hidden:\tyes (Cairn's own)\n")
	}
	if len(sn.Replicas) > 0 {
		fmt.Fprintf(tw, "held by:\t%s\n", strings.Join(sn.Replicas, ", "))
	}
	held, alone := snapshotSpace(sn)
	fmt.Fprintf(tw, "space:\t%s held, %s of it alone (freed by deleting it)\n", held, alone)
	return tw.Flush()
}

// snapshotSpace formats what a snapshot holds on a replica and what it
// alone holds ("-" until a node reported it: RecordUsage).
func snapshotSpace(sn *meta.Snapshot) (held, alone string) {
	if sn.Space == nil {
		return "-", "-"
	}
	return formatSize(sn.Space.HeldBytes), formatSize(sn.Space.AloneBytes)
}

func newSnapshotGetCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:     "get ID",
		Short:   "Show one snapshot",
		Example: `  cairn ctl --server 127.0.0.1:7002 snapshot get snap-0123456789abcdef -o json`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			sn, err := c.Snapshot(ctx, strings.TrimSpace(args[0]))
			if err != nil {
				return err
			}
			return printSnapshot(cmd.OutOrStdout(), o.Output, sn)
		},
	}
}

func newSnapshotDeleteCommand(o *ctlOptions) *cobra.Command {
	return &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a snapshot; its space comes back in the background",
		Long: `Delete a snapshot. It is gone for users at once (its name is free again) and
the node that holds it removes its layer in the background. A volume restored
or cloned from it keeps its data.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 snapshot delete snap-0123456789abcdef`,
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := strings.TrimSpace(args[0])
			c, ctx, done, err := o.client(cmd)
			if err != nil {
				return err
			}
			defer done()
			// DeleteSnapshot counts a snapshot already gone as deleted (a
			// retry); an operator who typed a wrong id wants to know.
			if _, err := c.Snapshot(ctx, id); err != nil {
				return err
			}
			if err := c.DeleteSnapshot(ctx, id); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted snapshot %s; its space comes back in the background\n", id)
			return nil
		},
	}
}

// restoreSource is what `volume create --from-snapshot | --from-volume`
// makes the new volume from.
type restoreSource struct {
	snapshot, volume string
}

func (r *restoreSource) set() bool { return r.snapshot != "" || r.volume != "" }

// check refuses what cannot go together, before any server is asked.
func (r *restoreSource) check(preferred string) error {
	r.snapshot, r.volume = strings.TrimSpace(r.snapshot), strings.TrimSpace(r.volume)
	switch {
	case r.snapshot != "" && r.volume != "":
		return errors.New("--from-snapshot and --from-volume: give one of them")
	case r.set() && preferred != "":
		return errors.New("--preferred-node cannot be given with --from-snapshot or --from-volume: the new replicas go first to the nodes that hold the snapshot")
	}
	return nil
}

func (r *restoreSource) describe() string {
	switch {
	case r.snapshot != "":
		return " from snapshot " + r.snapshot
	case r.volume != "":
		return " as a clone of volume " + r.volume
	}
	return ""
}

// restore creates cv from the source. A zero size is the source's; a
// smaller one is refused here, naming both sizes, before the store is
// asked (it refuses too).
func (r *restoreSource) restore(ctx context.Context, c *meta.Client, cv meta.CreateVolume) (*meta.Volume, error) {
	var srcSize uint64
	what := ""
	if r.snapshot != "" {
		sn, err := c.Snapshot(ctx, r.snapshot)
		if err == nil && sn.Deleting {
			err = fmt.Errorf("snapshot %q is being deleted: %w", sn.ID, meta.ErrNotFound)
		}
		if err != nil {
			return nil, err
		}
		if !sn.ReadyToUse {
			return nil, fmt.Errorf("snapshot %s is not ready yet (%s); try again once `snapshot get %s` says ready", sn.ID, snapshotState(sn), sn.ID)
		}
		srcSize, what = sn.SizeBytes, "snapshot "+sn.ID
	} else {
		v, err := c.Volume(ctx, r.volume)
		if err != nil {
			return nil, err
		}
		srcSize, what = v.SizeBytes, "volume "+v.ID
	}
	switch {
	case cv.SizeBytes == 0:
		cv.SizeBytes = srcSize
	case cv.SizeBytes < srcSize:
		return nil, fmt.Errorf("--size %s (%d bytes) is smaller than %s (%s, %d bytes), and volumes never shrink",
			formatSize(cv.SizeBytes), cv.SizeBytes, what, formatSize(srcSize), srcSize)
	}
	return c.Restore(ctx, cv, r.snapshot, r.volume)
}
