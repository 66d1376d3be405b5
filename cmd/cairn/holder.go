package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/internal/fdhold"
)

// newFUSEHolderCommand is `cairn fuse-holder`: the small, stable process
// that keeps a duplicate of the node agent's FUSE descriptor, so that the
// volumes staged on the node keep their connection while the agent
// restarts or is upgraded (docs/restart.md).
func newFUSEHolderCommand() *cobra.Command {
	var socket, logLevel, logFormat string
	cmd := &cobra.Command{
		Use:   "fuse-holder",
		Short: "Hold the node agent's FUSE descriptors across its restarts",
		Long: `Hold the node agent's FUSE descriptors across its restarts.

The node agent (cairn node --fd-holder SOCKET) gives this process a duplicate
of the /dev/fuse descriptor that serves the volumes staged on the node. While
one is held, a crash, kill or upgrade of the agent does not end the FUSE
connection: the loop devices and the file systems on them wait, and the next
agent takes the descriptor back and serves on.

Run one per node and keep it running: stopping it while no agent runs ends
every staged volume's connection. To upgrade it, stop it while the agent
runs and start the new one; the agent gives it what it held within seconds.`,
		Example: `  cairn fuse-holder --socket /var/lib/cairn/fdhold.sock`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := bindEnv(cmd.Flags()); err != nil {
				return err
			}
			if socket == "" {
				return fmt.Errorf("--socket is required")
			}
			log, err := newLogger(logLevel, logFormat)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			if err := os.MkdirAll(filepath.Dir(socket), 0o750); err != nil {
				return err
			}
			l, err := fdhold.Listen(socket)
			if err != nil {
				return err
			}
			// Its entries carry the volumes' passphrases: root only.
			if err := os.Chmod(socket, 0o600); err != nil {
				_ = l.Close()
				return err
			}
			h := fdhold.New(log)
			served := make(chan error, 1)
			go func() { served <- h.Serve(l) }()
			log.Info("fuse holder running", zap.String("socket", socket), zap.String("version", version))
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
			select {
			case s := <-sig:
				log.Info("shutting down: the descriptors held are let go", zap.String("signal", s.String()))
			case err = <-served:
			}
			_ = l.Close()
			return errors.Join(err, h.Close())
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "unix socket to listen on; the node agent's --fd-holder (required)")
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.Flags().StringVar(&logFormat, "log-format", "json", "json or console")
	return cmd
}
