// Package pki is Cairn's cluster certificate authority and the mutual TLS
// every port speaks (issue 15; docs/security.md): one cluster CA signs a
// certificate per identity, and each side of every connection checks the
// other's against the CA.
//
// An identity is a role and a name. The role is the certificate's
// Organization, the name its CommonName:
//   - RoleNode: a node agent, named by its node id. It may speak Raft, join
//     the store, send heartbeats for itself and open replicas.
//   - RoleCtl: `cairn ctl` and the CSI controller: they manage volumes.
//   - RoleMonitor: read-only access to the store (status, volumes, watch).
//
// Hostnames are not checked: nodes reach each other by address, and what a
// connection may do follows from the peer's role and name, checked by each
// service against the requests it receives.
package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// The roles an identity can have.
const (
	RoleNode    = "node"
	RoleCtl     = "ctl"
	RoleMonitor = "monitor"
)

// Roles lists every role.
var Roles = []string{RoleNode, RoleCtl, RoleMonitor}

// Sentinel errors; match them with errors.Is.
var (
	// ErrUnauthenticated: the peer presented no certificate, or one the
	// cluster CA did not sign, or an expired one.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied: the peer's role may not do what it asked.
	ErrPermissionDenied = errors.New("permission denied")
)

// Identity is who a certificate names.
type Identity struct {
	Role string
	Name string
}

func (id Identity) String() string { return id.Role + "/" + id.Name }

// File names in a directory of credentials (Files).
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// Files are the paths of one identity's credentials: the CA bundle it
// trusts (one or more certificates: during a CA rotation, the old and the
// new), its certificate and its key.
type Files struct {
	CA, Cert, Key string
}

// FilesIn names the credentials of name in dir: ca.crt, NAME.crt, NAME.key.
func FilesIn(dir, name string) Files {
	return Files{CA: filepath.Join(dir, CACertFile), Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key")}
}

// CA is a certificate authority that can issue certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
	// PEM is the CA certificate, PEM-encoded.
	PEM []byte
	// Trust is what the CA directory's ca.crt holds: this CA, and during
	// a rotation the other CA too. Issue gives it to every certificate it
	// writes, so that a pod issued its certificate mid-rotation trusts
	// both (docs/security.md, "On Kubernetes").
	Trust []byte
}

// InitCA creates a new CA in dir (ca.crt, and ca.key readable by its owner
// only) valid for validity, and refuses to overwrite one.
func InitCA(dir, name string, validity time.Duration) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Stat(p); err == nil {
			return nil, fmt.Errorf("pki: %s exists: a CA is already there (remove it to start over, which invalidates every certificate it issued)", p)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"cairn-ca"}},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	ca := &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
	ca.Trust = ca.PEM
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := writeKey(keyPath, key); err != nil {
		return nil, err
	}
	if err := os.WriteFile(certPath, ca.PEM, 0o644); err != nil {
		return nil, err
	}
	return ca, nil
}

// LoadCA reads the CA in dir: ca.key, and in ca.crt the certificate of
// that key. ca.crt may hold other CAs besides (a bundle, during a
// rotation), in any order; they become the CA's Trust.
func LoadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("pki: the CA certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("pki: the CA key: %w", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, fmt.Errorf("pki: %s holds no PEM key", filepath.Join(dir, CAKeyFile))
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: %s holds no ECDSA CA: %w", dir, err)
	}
	for _, cert := range ParseBundle(certPEM) {
		if pub, ok := cert.PublicKey.(*ecdsa.PublicKey); ok && cert.IsCA && pub.Equal(&key.PublicKey) {
			return &CA{Cert: cert, Key: key, PEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), Trust: certPEM}, nil
		}
	}
	return nil, fmt.Errorf("pki: %s holds no ECDSA CA: no CA certificate in %s matches %s", dir, CACertFile, CAKeyFile)
}

// Issue signs a certificate for id, valid for validity, and writes it with
// its key and the CA's Trust to f (the key readable by its owner only; an
// existing CA bundle is left as it is: it may hold more than this CA).
func (ca *CA) Issue(id Identity, validity time.Duration, f Files) error {
	certPEM, keyPEM, err := ca.issuePEM(id, validity)
	if err != nil {
		return err
	}
	for _, p := range []string{f.Cert, f.Key, f.CA} {
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			return err
		}
	}
	if err := writeFileAtomic(f.Key, keyPEM, 0o600); err != nil {
		return err
	}
	if err := writeFileAtomic(f.Cert, certPEM, 0o644); err != nil {
		return err
	}
	if _, err := os.Stat(f.CA); errors.Is(err, os.ErrNotExist) {
		trust := ca.Trust
		if len(trust) == 0 {
			trust = ca.PEM
		}
		return writeFileAtomic(f.CA, trust, 0o644)
	}
	return nil
}

func (ca *CA) issuePEM(id Identity, validity time.Duration) (certPEM, keyPEM []byte, err error) {
	if !slices.Contains(Roles, id.Role) {
		return nil, nil, fmt.Errorf("pki: role %q: want one of %v", id.Role, Roles)
	}
	if id.Name == "" {
		return nil, nil, errors.New("pki: an identity needs a name")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	notAfter := now.Add(validity)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: id.Name, Organization: []string{id.Role}},
		NotBefore:    now.Add(-5 * time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		// Every identity is both: a node serves and dials, a client
		// only dials, and one kind of certificate keeps it simple.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

func newSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

// writeFileAtomic writes data to path through a temporary file and a
// rename, so that a reader (a running agent reloading its certificate)
// never sees half of it.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// IdentityOf reads the identity a verified certificate names.
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	if len(cert.Subject.Organization) != 1 || !slices.Contains(Roles, cert.Subject.Organization[0]) || cert.Subject.CommonName == "" {
		return Identity{}, fmt.Errorf("%w: certificate %q (organization %v) names no Cairn role", ErrUnauthenticated, cert.Subject.CommonName, cert.Subject.Organization)
	}
	return Identity{Role: cert.Subject.Organization[0], Name: cert.Subject.CommonName}, nil
}

// PeerIdentity is the identity of the peer of a connection made with
// ServerConfig or ClientConfig, whose handshake verified the peer's chain
// against the cluster CA (or failed).
func PeerIdentity(cs tls.ConnectionState) (Identity, error) {
	if !cs.HandshakeComplete || len(cs.PeerCertificates) == 0 {
		return Identity{}, fmt.Errorf("%w: the peer presented no certificate the cluster CA signed", ErrUnauthenticated)
	}
	return IdentityOf(cs.PeerCertificates[0])
}

// Credentials are one identity's TLS material, read from Files and read
// again when the files change (a rotation needs no restart). Safe for
// concurrent use.
type Credentials struct {
	files Files

	mu      sync.Mutex
	checked time.Time // when their times were last looked at
	mtimes  [3]time.Time
	cert    *tls.Certificate
	pool    *x509.CertPool
	id      Identity
	expires time.Time
}

// reloadEvery bounds how often the files' times are looked at.
const reloadEvery = 5 * time.Second

// Load reads f.
func Load(f Files) (*Credentials, error) {
	c := &Credentials{files: f}
	if err := c.reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Identity is the identity the credentials' certificate names.
func (c *Credentials) Identity() Identity {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.id
}

// NotAfter is when the certificate expires.
func (c *Credentials) NotAfter() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.expires
}

// Files are the paths the credentials are read from.
func (c *Credentials) Files() Files { return c.files }

func (c *Credentials) reload() error {
	var mt [3]time.Time
	for i, p := range []string{c.files.CA, c.files.Cert, c.files.Key} {
		fi, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("pki: %w", err)
		}
		mt[i] = fi.ModTime()
	}
	caPEM, err := os.ReadFile(c.files.CA)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("pki: %s holds no PEM certificate", c.files.CA)
	}
	pair, err := tls.LoadX509KeyPair(c.files.Cert, c.files.Key)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Errorf("pki: %s: %w", c.files.Cert, err)
	}
	pair.Leaf = leaf
	id, err := IdentityOf(leaf)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", c.files.Cert, err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cert, c.pool, c.id, c.expires, c.mtimes = &pair, pool, id, leaf.NotAfter, mt
	c.checked = time.Now()
	return nil
}

// current returns the certificate and CA pool, reading the files again if
// they changed since (at most every reloadEvery). A failed reload keeps
// what was loaded: a rotation half written is tried again later.
func (c *Credentials) current() (*tls.Certificate, *x509.CertPool) {
	c.mu.Lock()
	stale := time.Since(c.checked) > reloadEvery
	if stale {
		c.checked = time.Now()
	}
	mt := c.mtimes
	c.mu.Unlock()
	if stale {
		changed := false
		for i, p := range []string{c.files.CA, c.files.Cert, c.files.Key} {
			if fi, err := os.Stat(p); err == nil && !fi.ModTime().Equal(mt[i]) {
				changed = true
			}
		}
		if changed {
			_ = c.reload()
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert, c.pool
}

// verify checks a peer's chain against the current CA pool and returns its
// identity.
func (c *Credentials) verify(rawCerts [][]byte) (Identity, error) {
	if len(rawCerts) == 0 {
		return Identity{}, fmt.Errorf("%w: the peer presented no certificate", ErrUnauthenticated)
	}
	_, pool := c.current()
	certs := make([]*x509.Certificate, len(rawCerts))
	for i, raw := range rawCerts {
		cert, err := x509.ParseCertificate(raw)
		if err != nil {
			return Identity{}, fmt.Errorf("%w: %v", ErrUnauthenticated, err)
		}
		certs[i] = cert
	}
	inter := x509.NewCertPool()
	for _, cert := range certs[1:] {
		inter.AddCert(cert)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return Identity{}, fmt.Errorf("%w: %v", ErrUnauthenticated, err)
	}
	return IdentityOf(certs[0])
}

// ServerConfig is the TLS configuration of a port that requires a client
// certificate from the cluster CA. Which roles may do what is the
// service's to check (PeerIdentity, Allow).
func (c *Credentials) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			cert, _ := c.current()
			return cert, nil
		},
		// The chain is verified below against the CA pool of the moment
		// (it changes in a rotation), so the standard check, bound to
		// one pool, is off. VerifyConnection, unlike
		// VerifyPeerCertificate, also runs when a session is resumed
		// from a ticket: a certificate whose CA was dropped from the
		// bundle is refused then too.
		ClientAuth: tls.RequireAnyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, err := c.verify(rawOf(cs.PeerCertificates))
			return err
		},
	}
}

// ClientConfig is the TLS configuration for dialing a Cairn port: it
// presents this identity's certificate and accepts a server whose
// certificate the cluster CA signed for a node.
func (c *Credentials) ClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _ := c.current()
			return cert, nil
		},
		// Nodes are dialed by address, not by a name in their
		// certificate: the chain and the role are checked instead, on
		// every handshake, resumed ones included.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			id, err := c.verify(rawOf(cs.PeerCertificates))
			if err != nil {
				return err
			}
			if id.Role != RoleNode {
				return fmt.Errorf("%w: the server is %s, not a node", ErrUnauthenticated, id)
			}
			return nil
		},
	}
}

// rawOf returns the DER encodings of certs.
func rawOf(certs []*x509.Certificate) [][]byte {
	raw := make([][]byte, len(certs))
	for i, cert := range certs {
		raw[i] = cert.Raw
	}
	return raw
}

// Allow returns ErrPermissionDenied unless id has one of roles.
func Allow(id Identity, what string, roles ...string) error {
	if slices.Contains(roles, id.Role) {
		return nil
	}
	return fmt.Errorf("%w: %s may not %s (needs role %v)", ErrPermissionDenied, id, what, roles)
}

// ParseBundle returns the certificates of a PEM bundle (those it can parse).
func ParseBundle(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return out
		}
		if cert, err := x509.ParseCertificate(block.Bytes); err == nil {
			out = append(out, cert)
		}
	}
}
