package main

import (
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/cairn-csi/cairn/replication/meta"
)

// newVolumeScrubCommand asks the engine of an attached volume for a scrub
// (docs/integrity.md) through the store and follows its progress there.
func newVolumeScrubCommand(o *ctlOptions) *cobra.Command {
	var noWait bool
	cmd := &cobra.Command{
		Use:   "scrub ID",
		Short: "Verify every block of every replica of a volume now, repairing what can be repaired",
		Long: `Asks the engine of the attached volume to read and verify every block of every
healthy replica (behind foreground I/O) and to rewrite blocks that fail their
checksum, or differ from the copy that verifies, from a verified copy. Shows a
progress bar and ends with a summary. A volume that is not attached is scrubbed
when it is next attached. Exits non-zero when blocks are unrecoverable.`,
		Example: `  cairn ctl --server 127.0.0.1:7002 volume scrub vol-0123456789abcdef --timeout 1h`,
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
			seq := uint64(1)
			switch s := v.Scrub; {
			case s != nil && !s.Done:
				seq = s.Seq // one is already asked for or running: follow it
			default:
				if s != nil {
					seq = s.Seq + 1
				}
				if _, err := c.Apply(ctx, &meta.ScrubProgressUpdate{VolumeID: v.ID, Progress: meta.ScrubProgress{Seq: seq}}); err != nil {
					return err
				}
			}
			w := cmd.OutOrStdout()
			if v.Attachment == nil && o.Output == "table" {
				fmt.Fprintf(w, "volume %s is not attached: its scrub runs when it is next attached\n", v.ID)
			}
			if noWait {
				fmt.Fprintf(w, "scrub %d of %s asked for\n", seq, v.ID)
				return nil
			}
			for {
				v, err = c.Volume(ctx, args[0])
				if err != nil {
					return err
				}
				s := v.Scrub
				if s != nil && s.Seq == seq && s.Done {
					if o.Output == "table" {
						progressBar(w, "\rscrub", s.BlocksChecked, s.BlocksTotal)
						fmt.Fprintln(w)
					}
					return printScrub(w, o.Output, v.ID, s, v.Condition)
				}
				if s != nil && s.Seq > seq {
					return fmt.Errorf("scrub %d of %s was superseded by scrub %d", seq, v.ID, s.Seq)
				}
				if o.Output == "table" && s != nil && s.Seq == seq && s.BlocksTotal > 0 {
					progressBar(w, "\rscrub", s.BlocksChecked, s.BlocksTotal)
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("scrub of %s not done within --timeout: %w", v.ID, ctx.Err())
				case <-time.After(500 * time.Millisecond):
				}
			}
		},
	}
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "ask for the scrub and return at once")
	return cmd
}

// errUnrecoverable makes `volume scrub` exit non-zero.
var errUnrecoverable = errors.New("blocks verify on no replica")

func printScrub(w io.Writer, format, id string, s *meta.ScrubProgress, cond *meta.VolumeCondition) error {
	if format == "json" {
		if err := printJSON(w, s); err != nil {
			return err
		}
	} else {
		took := time.Duration(s.FinishedAt - s.StartedAt).Round(time.Millisecond)
		fmt.Fprintf(w, "scrub %d of %s done in %v: %d blocks checked, %d repaired, %d unrecoverable\n",
			s.Seq, id, took, s.BlocksChecked, s.Repaired, s.Unrecoverable)
		if cond != nil && cond.Abnormal {
			fmt.Fprintf(w, "condition: abnormal: %s\n", cond.Message)
		}
	}
	switch {
	case s.Error != "":
		return fmt.Errorf("scrub of %s failed: %s", id, s.Error)
	case s.Unrecoverable > 0:
		return fmt.Errorf("scrub of %s: %d block(s): %w", id, s.Unrecoverable, errUnrecoverable)
	}
	return nil
}
