package localkube

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// pki is the run's certificates and keys: a CA, the API server's serving
// certificate, the service-account signing key and the bearer tokens of
// the cluster's users (--token-auth-file).
type pki struct {
	dir                            string
	caCert, serverCert, serverKey  string
	saKey, saPub, tokenFile        string
	adminToken, nodeToken, cmToken string
	schedToken                     string
}

// newPKI writes the run's keys into dir. nodeName is kubelet's node, whose
// token is system:node:NAME in system:nodes (the Node authorizer's rule).
func newPKI(dir, nodeName string, ips []net.IP) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{dir: dir,
		caCert: filepath.Join(dir, "ca.crt"), serverCert: filepath.Join(dir, "apiserver.crt"), serverKey: filepath.Join(dir, "apiserver.key"),
		saKey: filepath.Join(dir, "sa.key"), saPub: filepath.Join(dir, "sa.pub"), tokenFile: filepath.Join(dir, "tokens.csv")}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now().Add(-time.Hour)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cairn-e2e-ca"},
		NotBefore: now, NotAfter: now.Add(7 * 24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: now, NotAfter: now.Add(7 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: append([]net.IP{net.ParseIP("127.0.0.1")}, ips...),
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{}
	files[p.caCert] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	files[p.serverCert] = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER})
	for path, key := range map[string]*ecdsa.PrivateKey{p.serverKey: srvKey, p.saKey: saKey} {
		der, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return nil, err
		}
		files[path] = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	files[p.saPub] = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	p.adminToken, p.nodeToken, p.cmToken, p.schedToken = token(), token(), token(), token()
	// token,user,uid,"groups". The control plane's components are
	// masters: the cluster under test is Cairn, not Kubernetes' bootstrap
	// roles. kubelet is a real node, limited by the Node authorizer.
	files[p.tokenFile] = []byte(strings.Join([]string{
		p.adminToken + `,admin,admin,"system:masters"`,
		p.nodeToken + ",system:node:" + nodeName + `,node,"system:nodes"`,
		p.cmToken + `,system:kube-controller-manager,kcm,"system:masters"`,
		p.schedToken + `,system:kube-scheduler,sched,"system:masters"`,
	}, "\n") + "\n")
	for path, b := range files {
		if err := os.WriteFile(path, b, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func token() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic("BUG: crypto/rand failed: " + err.Error())
	}
	return hex.EncodeToString(b)
}

// writeKubeconfig writes a kubeconfig for server with a bearer token.
func writeKubeconfig(path, server, caCert, token string) error {
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: %s
    certificate-authority: %s
users:
- name: user
  user:
    token: %s
contexts:
- name: e2e
  context: {cluster: e2e, user: user}
current-context: e2e
`, server, caCert, token)
	return os.WriteFile(path, []byte(cfg), 0o600)
}
