package deploy

import (
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// TestTLSWiring: the manifests run the node agents and the controller with
// mutual TLS (docs/security.md), each with a certificate its pod issues as
// it starts: an init container runs `cairn ca issue` with the CA's Secret
// and writes into a memory volume that the cairn container reads with
// --tls-dir. The node's certificate names the node (the store checks it
// against the agent's --id, which is the node name too); the controller's
// has role ctl, as has the csi-sanity pod's controller. The CA key is
// mounted into nothing that keeps running.
func TestTLSWiring(t *testing.T) {
	s := load(t, installDir)
	for _, c := range []struct{ where, role, name string }{
		{"DaemonSet cairn-node", "node", "$(NODE_NAME)"},
		{"Deployment cairn-controller", "ctl", "controller"},
	} {
		p := podNamed(t, s, c.where)
		checkTLS(t, p, c.role, c.name, "cairn-ca")
		if c.role == "node" {
			agent := oneContainer(t, p, "cairn")
			if id, _ := flag(agent.Args, "id"); id != c.name {
				t.Errorf("%s: the agent's --id %q is not the certificate's name %q", c.where, id, c.name)
			}
		}
	}
	// The csi-sanity pod's private controller too.
	checkTLS(t, podNamed(t, load(t, sanityDir), "Pod cairn-sanity"), "ctl", "csi-sanity", "cairn-ca")
}

// TestHelmChartTLSValues: tls.caSecret names the Secret, and tls.enabled
// false gives plaintext, said with --insecure, and no certificate.
func TestHelmChartTLSValues(t *testing.T) {
	out, err := renderChart(t, "storage", "tls.caSecret=my-ca", "tls.validity=720h")
	if err != nil {
		t.Fatal(err)
	}
	s := loadUnder(t, out, ".")
	for _, c := range []struct{ where, role string }{
		{"DaemonSet cairn-node", "node"},
		{"Deployment cairn-controller", "ctl"},
	} {
		issuer := checkTLS(t, podNamed(t, s, c.where), c.role, "", "my-ca")
		if v, _ := flag(issuer.Args, "validity"); v != "720h" {
			t.Errorf("%s: certificate validity %q, want tls.validity's 720h", c.where, v)
		}
	}

	out, err = renderChart(t, "storage", "tls.enabled=false")
	if err != nil {
		t.Fatal(err)
	}
	s = loadUnder(t, out, ".")
	for _, where := range []string{"DaemonSet cairn-node", "Deployment cairn-controller"} {
		p := podNamed(t, s, where)
		if len(p.spec.InitContainers) != 0 {
			t.Errorf("%s: tls.enabled=false, but init containers %v", where, p.spec.InitContainers)
		}
		c := oneContainer(t, p, "cairn")
		if _, ok := flag(c.Args, "tls-dir"); ok {
			t.Errorf("%s: tls.enabled=false, but --tls-dir", where)
		}
		_, insecure := flag(c.Args, "insecure")
		if isNode := where == "DaemonSet cairn-node"; insecure != isNode {
			// The controller has no such flag: without TLS options it
			// speaks plaintext.
			t.Errorf("%s: --insecure given %v, want %v", where, insecure, isNode)
		}
	}
}

// podNamed returns the pod template of the object where ("KIND NAME").
func podNamed(t *testing.T, s *set, where string) podTemplate {
	t.Helper()
	kind, name, _ := strings.Cut(where, " ")
	for _, p := range s.pods() {
		// manifest.String: "FILE#N (GROUP/VERSION/KIND NAME)".
		if strings.HasSuffix(p.where, "/"+kind+" "+name+")") {
			return p
		}
	}
	t.Fatalf("no %s", where)
	return podTemplate{}
}

// checkTLS checks p's TLS wiring (see TestTLSWiring) and returns the init
// container that issues the certificate. An empty name is not checked.
func checkTLS(t *testing.T, p podTemplate, certRole, name, caSecret string) *corev1.Container {
	t.Helper()
	c := oneContainer(t, p, "cairn")
	dir := mustFlag(t, p.where, c, "tls-dir")
	if _, ok := flag(c.Args, "insecure"); ok {
		t.Errorf("%s: --insecure beside --tls-dir", p.where)
	}
	var issuers []*corev1.Container
	for i := range p.spec.InitContainers {
		ic := &p.spec.InitContainers[i]
		if role(ic) == "cairn" && slices.Equal(ic.Args[:min(2, len(ic.Args))], []string{"ca", "issue"}) {
			issuers = append(issuers, ic)
		}
	}
	if len(issuers) != 1 {
		t.Fatalf("%s: %d init containers run `cairn ca issue`, want 1", p.where, len(issuers))
	}
	ic := issuers[0]
	if ic.RestartPolicy != nil {
		t.Errorf("%s: %s has restartPolicy %s: it must finish before the agent starts", p.where, ic.Name, *ic.RestartPolicy)
	}
	if r, _ := flag(ic.Args, "role"); r != certRole {
		t.Errorf("%s: the certificate's role %q, want %q", p.where, r, certRole)
	}
	if n, _ := flag(ic.Args, "name"); name != "" && n != name {
		t.Errorf("%s: the certificate's name %q, want %q", p.where, n, name)
	}
	if name == "$(NODE_NAME)" {
		if e := envVar(ic, "NODE_NAME"); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
			t.Errorf("%s: %s's NODE_NAME %+v, want the field spec.nodeName", p.where, ic.Name, e)
		}
	}
	// The issuer writes where the agent reads: the same memory volume.
	out := mustFlag(t, p.where, ic, "out")
	wm, wrel := mountFor(ic, out)
	rm, rrel := mountFor(c, dir)
	if wm == nil || rm == nil || wm.Name != rm.Name || wrel != rrel {
		t.Errorf("%s: %s writes %s (%+v) but cairn reads --tls-dir %s (%+v)", p.where, ic.Name, out, wm, dir, rm)
	} else if v := volume(p.spec, wm.Name); v == nil || v.EmptyDir == nil || v.EmptyDir.Medium != corev1.StorageMediumMemory {
		t.Errorf("%s: the certificate's volume %s is not a memory emptyDir: %+v", p.where, wm.Name, v)
	} else if !rm.ReadOnly {
		t.Errorf("%s: cairn mounts its certificate's volume %s writable", p.where, rm.Name)
	}
	// The CA comes from the Secret, and only the issuer sees it.
	caDir := mustFlag(t, p.where, ic, "ca-dir")
	cm, _ := mountFor(ic, caDir)
	if cm == nil {
		t.Fatalf("%s: %s's --ca-dir %s is on no volume", p.where, ic.Name, caDir)
	}
	if v := volume(p.spec, cm.Name); v == nil || v.Secret == nil || v.Secret.SecretName != caSecret {
		t.Errorf("%s: the CA volume %s is %+v, want the Secret %s", p.where, cm.Name, v, caSecret)
	}
	for _, lc := range longRunning(p.spec) {
		for _, m := range lc.VolumeMounts {
			if m.Name == cm.Name {
				t.Errorf("%s: %s mounts the CA's Secret (and its key) for as long as it runs", p.where, lc.Name)
			}
		}
	}
	return ic
}
