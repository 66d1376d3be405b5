package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cairn-csi/cairn/internal/pki"
)

// tlsOptions are the mutual TLS flags of `cairn node`, `controller` and
// `ctl` (docs/security.md): the CA bundle to trust and this process's
// certificate and key, given one by one or as a directory holding ca.crt,
// tls.crt and tls.key (the layout of a Kubernetes TLS Secret).
type tlsOptions struct {
	Dir, CA, Cert, Key string
}

// tlsDirName is the file name stem of the certificate and key in a
// --tls-dir: tls.crt and tls.key.
const tlsDirName = "tls"

func (o *tlsOptions) AddFlags(fs *pflag.FlagSet) {
	fs.StringVar(&o.Dir, "tls-dir", "", "directory with ca.crt, tls.crt and tls.key: the cluster CA and this identity's certificate (mutual TLS)")
	fs.StringVar(&o.CA, "tls-ca", "", "the cluster CA bundle (PEM; during a CA rotation, the old and the new CA); overrides --tls-dir's ca.crt")
	fs.StringVar(&o.Cert, "tls-cert", "", "this identity's certificate (PEM); overrides --tls-dir's tls.crt")
	fs.StringVar(&o.Key, "tls-key", "", "this identity's key (PEM); overrides --tls-dir's tls.key")
}

// files resolves the flags; ok is false when none is set.
func (o *tlsOptions) files() (f pki.Files, ok bool, err error) {
	if o.Dir != "" {
		f = pki.FilesIn(o.Dir, tlsDirName)
	}
	if o.CA != "" {
		f.CA = o.CA
	}
	if o.Cert != "" {
		f.Cert = o.Cert
	}
	if o.Key != "" {
		f.Key = o.Key
	}
	if f == (pki.Files{}) {
		return f, false, nil
	}
	var missing []string
	for flag, v := range map[string]string{"--tls-ca": f.CA, "--tls-cert": f.Cert, "--tls-key": f.Key} {
		if v == "" {
			missing = append(missing, flag)
		}
	}
	if len(missing) > 0 {
		return f, false, fmt.Errorf("mutual TLS needs the CA, a certificate and its key: %s missing (or give --tls-dir)", strings.Join(missing, ", "))
	}
	return f, true, nil
}

// load reads the credentials, or returns nil when no TLS flag is set.
func (o *tlsOptions) load() (*pki.Credentials, error) {
	f, ok, err := o.files()
	if err != nil || !ok {
		return nil, err
	}
	c, err := pki.Load(f)
	if err != nil {
		return nil, fmt.Errorf("mutual TLS: %w", err)
	}
	return c, nil
}

// newCACommand is `cairn ca`: the cluster CA and its certificates.
func newCACommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Make the cluster CA and issue certificates for nodes, the controller and ctl",
		Long: `Make the cluster CA and issue certificates (docs/security.md).

Every port of a node agent (Raft, the meta API, the replica port) speaks mutual
TLS with certificates of one cluster CA. A certificate names a role and a name:
  node     a node agent, named by its node id: Raft, joining, its own heartbeats, replicas
  ctl      cairn ctl and the CSI controller: managing volumes
  monitor  read-only access to the store`,
	}
	cmd.AddCommand(newCAInitCommand(), newCAIssueCommand())
	return cmd
}

func newCAInitCommand() *cobra.Command {
	var dir, name string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:     "init --dir DIR",
		Short:   "Create a new cluster CA (DIR/ca.crt and DIR/ca.key)",
		Example: `  cairn ca init --dir /etc/cairn/ca`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return errors.New("--dir is required")
			}
			ca, err := pki.InitCA(dir, name, validity)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "CA %q created in %s (valid until %s); keep %s secret\n",
				name, dir, ca.Cert.NotAfter.UTC().Format(time.RFC3339), filepath.Join(dir, pki.CAKeyFile))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the CA's certificate and key (required)")
	cmd.Flags().StringVar(&name, "name", "cairn cluster CA", "the CA's name")
	cmd.Flags().DurationVar(&validity, "validity", 10*365*24*time.Hour, "how long the CA is valid")
	return cmd
}

func newCAIssueCommand() *cobra.Command {
	var caDir, role, name, out string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "issue --ca-dir DIR --role ROLE --name NAME --out DIR",
		Short: "Issue a certificate: OUT/tls.crt, OUT/tls.key and the CA's OUT/ca.crt",
		Example: `  cairn ca issue --ca-dir /etc/cairn/ca --role node --name node-1 --out /etc/cairn/node-1
  cairn ca issue --ca-dir /etc/cairn/ca --role ctl --name admin --out ~/.cairn`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caDir == "" || out == "" || name == "" {
				return errors.New("--ca-dir, --name and --out are required")
			}
			ca, err := pki.LoadCA(caDir)
			if err != nil {
				return err
			}
			if err := ca.Issue(pki.Identity{Role: role, Name: name}, validity, pki.FilesIn(out, tlsDirName)); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s/%s in %s (--tls-dir %s)\n", role, name, out, out)
			return nil
		},
	}
	cmd.Flags().StringVar(&caDir, "ca-dir", "", "the CA's directory (cairn ca init --dir; required): ca.key, and ca.crt with its certificate, possibly bundled with another CA during a rotation (the bundle is what OUT/ca.crt trusts)")
	cmd.Flags().StringVar(&role, "role", pki.RoleNode, "node, ctl or monitor")
	cmd.Flags().StringVar(&name, "name", "", "the identity's name: a node's id for role node (required)")
	cmd.Flags().StringVar(&out, "out", "", "directory to write ca.crt, tls.crt and tls.key to (required)")
	cmd.Flags().DurationVar(&validity, "validity", 365*24*time.Hour, "how long the certificate is valid (at most the CA's remaining validity)")
	return cmd
}

// certStatus describes credentials for `cairn ctl cert status`.
func certStatus(c *pki.Credentials) (string, error) {
	var b strings.Builder
	id := c.Identity()
	left := time.Until(c.NotAfter()).Round(time.Hour)
	fmt.Fprintf(&b, "identity: %s\nexpires:  %s (in %s)\n", id, c.NotAfter().UTC().Format(time.RFC3339), left)
	caPEM, err := os.ReadFile(c.Files().CA)
	if err != nil {
		return "", err
	}
	for _, ca := range pki.ParseBundle(caPEM) {
		fmt.Fprintf(&b, "trusts:   CA %q, expires %s\n", ca.Subject.CommonName, ca.NotAfter.UTC().Format(time.RFC3339))
	}
	return b.String(), nil
}

// peerCertificate dials addr with mutual TLS and returns the identity and
// expiry of the certificate the server presents.
func peerCertificate(ctx context.Context, addr string, creds *pki.Credentials) (pki.Identity, time.Time, error) {
	d := tls.Dialer{Config: creds.ClientConfig()}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return pki.Identity{}, time.Time{}, err
	}
	defer c.Close()
	cs := c.(*tls.Conn).ConnectionState()
	id, err := pki.PeerIdentity(cs)
	if err != nil {
		return pki.Identity{}, time.Time{}, err
	}
	return id, cs.PeerCertificates[0].NotAfter, nil
}
