package main

import (
	"errors"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/driver/csi"
	"github.com/cairn-csi/cairn/replication/meta"
)

// controllerOptions configures `cairn controller`.
type controllerOptions struct {
	// Endpoint is the CSI socket the sidecars talk to.
	Endpoint string
	// Meta lists meta API addresses of store members.
	Meta []string
	// LogLevel and LogFormat shape the logs.
	LogLevel, LogFormat string
	// TLS names the controller's certificate (role ctl); none: plaintext.
	TLS tlsOptions
}

func (o *controllerOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint (unix socket)")
	fs.StringSliceVar(&o.Meta, "meta", nil, "meta API address(es) of the volume store members (required)")
	o.TLS.AddFlags(fs)
	fs.StringVar(&o.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&o.LogFormat, "log-format", "json", "json or console")
}

func (o *controllerOptions) Validate() error {
	var errs []string
	if o.Endpoint == "" {
		errs = append(errs, "--endpoint is required")
	}
	if len(o.Meta) == 0 {
		errs = append(errs, "--meta is required: the meta API address of any store member")
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func newControllerCommand() *cobra.Command {
	o := &controllerOptions{}
	cmd := &cobra.Command{
		Use:     "controller",
		Short:   "Run the CSI controller (Identity + Controller services)",
		Example: `  cairn controller --endpoint unix:///csi/csi.sock --meta cairn-meta.cairn-system.svc:7002`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := bindEnv(cmd.Flags()); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			log, err := newLogger(o.LogLevel, o.LogFormat)
			if err != nil {
				return err
			}
			defer func() { _ = log.Sync() }()
			creds, err := o.TLS.load()
			if err != nil {
				return err
			}
			m, err := meta.NewClient(o.Meta, meta.WithTLS(creds))
			if err != nil {
				return err
			}
			defer m.Close()
			lis, err := csi.Listen(o.Endpoint)
			if err != nil {
				return err
			}
			srv := csi.Serve(log, lis, &csi.Identity{Version: version, Meta: m, Log: log}, csi.NewController(m), nil)
			log.Info("CSI controller running", zap.String("endpoint", o.Endpoint), zap.Strings("meta", o.Meta), zap.String("version", version))
			sig := make(chan os.Signal, 1)
			signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
			s := <-sig
			log.Info("shutting down", zap.String("signal", s.String()))
			srv.Stop()
			return nil
		},
	}
	o.AddFlags(cmd.Flags())
	return cmd
}
