package csie2e

import (
	"bytes"
	"crypto/sha256"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestEncryptedVolumeThroughCSI: a volume of encryption aes-256-gcm, made
// and staged through the CSI services with the passphrase as Kubernetes
// passes it (the provisioner's and the node-stage Secret's
// encryptionPassphrase). Without the secret neither works, and a wrong one
// fails at stage without moving the volume's epoch. With it, ext4 on the
// volume holds files that read back on another node, while no replica file
// on any node holds a known pattern written in them. A clone stays
// encrypted, shares the key and reads the same files; a clone asking for no
// encryption is refused.
func TestEncryptedVolumeThroughCSI(t *testing.T) {
	c := startClusterOf(t, 3)
	secret := map[string]string{"encryptionPassphrase": "correct horse battery staple"}
	params := map[string]string{"encryption": "aes-256-gcm"}
	create := func(name string, params, secrets map[string]string, src *csipb.VolumeContentSource) (*csipb.Volume, error) {
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: name, CapacityRange: &csipb.CapacityRange{RequiredBytes: 64 << 20},
			VolumeCapabilities: []*csipb.VolumeCapability{mountCap}, Parameters: params, Secrets: secrets,
			VolumeContentSource: src,
		})
		return resp.GetVolume(), err
	}
	if _, err := create("enc-nosecret", params, nil, nil); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "encryptionPassphrase") {
		t.Fatalf("CreateVolume without the secret: %v, want InvalidArgument naming encryptionPassphrase", err)
	}
	v, err := create("enc", params, secret, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := v.GetVolumeId()
	if v.GetCapacityBytes() != 64<<20 {
		t.Fatalf("capacity %d, want the 64 MiB asked for (the blocks' metadata is on top)", v.GetCapacityBytes())
	}
	rec := c.volumeJSON(id)
	if rec.Encryption == nil || rec.Encryption.KeyID == "" || len(rec.Encryption.Sealed) != 48 {
		t.Fatalf("the volume's record keeps no wrapped key: %+v", rec.Encryption)
	}

	// Stage without the secret, then with a wrong one: refused, nothing
	// claimed (the epoch the attachment gave stays).
	node := c.nodes["node-1"]
	if _, err := c.controller.ControllerPublishVolume(ctx(t), &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: "node-1", VolumeCapability: mountCap}); err != nil {
		t.Fatal(err)
	}
	epoch := c.volumeJSON(id).Epoch
	staging := filepath.Join(c.dir, "kubelet", "node-1", "staging", id)
	for _, bad := range []map[string]string{nil, {"encryptionPassphrase": "wrong horse"}} {
		_, err := node.NodeStageVolume(ctx(t), &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap, Secrets: bad})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "encryptionPassphrase") {
			t.Fatalf("NodeStageVolume with secrets %v: %v, want InvalidArgument naming encryptionPassphrase", keysOf(bad), err)
		}
		t.Logf("stage with secrets %v: %v", keysOf(bad), err)
	}
	if after := c.volumeJSON(id).Epoch; after != epoch {
		t.Fatalf("failed stages moved the epoch from %d to %d", epoch, after)
	}
	if _, err := c.controller.ControllerUnpublishVolume(ctx(t), &csipb.ControllerUnpublishVolumeRequest{VolumeId: id, NodeId: "node-1"}); err != nil {
		t.Fatal(err)
	}

	staging, target := c.attachWith(id, "node-1", mountCap, secret)
	sums := map[string][32]byte{}
	writeFiles(t, target, "enc", 3, 71, sums)
	pattern := bytes.Repeat([]byte("CAIRN-E2E-PLAINTEXT-PATTERN!"), 40000)
	if err := os.WriteFile(filepath.Join(target, "pattern"), pattern, 0o644); err != nil {
		t.Fatal(err)
	}
	sums["pattern"] = sha256.Sum256(pattern)
	syncFS(t, target)
	c.detach(id, "node-1", staging, target)

	// No replica file holds the pattern.
	checked := 0
	for _, r := range c.volumeJSON(id).Replicas {
		dir := filepath.Join(c.dir, r.Node, "data", "replicas", r.ID)
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if bytes.Contains(b, []byte("CAIRN-E2E-PLAINTEXT")) {
				t.Errorf("%s holds plaintext", path)
			}
			checked += len(b)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("read %d bytes of replica files: no plaintext", checked)

	staging, target = c.attachWith(id, "node-2", mountCap, secret)
	checkExactly(t, target, sums)
	c.detach(id, "node-2", staging, target)

	// A clone: encrypted with the source's key, whatever secret comes
	// with its CreateVolume; asking for none is refused.
	src := &csipb.VolumeContentSource{Type: &csipb.VolumeContentSource_Volume{Volume: &csipb.VolumeContentSource_VolumeSource{VolumeId: id}}}
	if _, err := create("enc-clone-plain", nil, nil, src); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "encryption") {
		t.Fatalf("a plain clone of an encrypted volume: %v, want InvalidArgument naming encryption", err)
	}
	clone, err := create("enc-clone", params, secret, src)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.volumeJSON(clone.GetVolumeId()).Encryption; got == nil || got.KeyID != rec.Encryption.KeyID {
		t.Fatalf("the clone's key %+v, want the source's (key id %s)", got, rec.Encryption.KeyID)
	}
	staging, target = c.attachWith(clone.GetVolumeId(), "node-3", mountCap, secret)
	checkExactly(t, target, sums)
	c.detach(clone.GetVolumeId(), "node-3", staging, target)

	// The same through the tools: cairn dev csi passes --secret as the CSI
	// secrets, and ctl wraps a key with --passphrase-file.
	devID := strings.TrimSpace(cairn(t, "dev", "csi", "--dir", c.dir, "create", "enc-dev", "--size", "64Mi",
		"--param", "encryption=aes-256-gcm", "--secret", "encryptionPassphrase=dev horse"))
	if out, err := exec.Command(cairnBin, "dev", "csi", "--dir", c.dir, "publish", devID, "--node", "node-2",
		"--secret", "encryptionPassphrase=wrong").CombinedOutput(); err == nil || !strings.Contains(string(out), "does not unwrap") {
		t.Fatalf("dev csi publish with a wrong --secret: %v\n%s", err, out)
	}
	cairn(t, "dev", "csi", "--dir", c.dir, "unpublish", devID, "--node", "node-2")
	mnt := strings.TrimSpace(cairn(t, "dev", "csi", "--dir", c.dir, "publish", devID, "--node", "node-2",
		"--secret", "encryptionPassphrase=dev horse"))
	if err := os.WriteFile(filepath.Join(mnt, "f"), pattern[:4096], 0o644); err != nil {
		t.Fatal(err)
	}
	cairn(t, "dev", "csi", "--dir", c.dir, "unpublish", devID, "--node", "node-2")
	if got := c.volumeJSON(devID).Encryption; got == nil {
		t.Fatal("dev csi create made a plain volume")
	}

	passFile := filepath.Join(t.TempDir(), "passphrase")
	if err := os.WriteFile(passFile, []byte("ctl horse\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := cairnCmd("ctl", "--server", c.agents, "volume", "create", "enc-ctl", "--size", "64Mi",
		"--param", "encryption=aes-256-gcm").CombinedOutput(); err == nil || !strings.Contains(string(out), "--passphrase-file") {
		t.Fatalf("ctl volume create encrypted without --passphrase-file: %v\n%s", err, out)
	}
	out := cairn(t, "ctl", "--server", c.agents, "volume", "create", "enc-ctl", "--size", "64Mi",
		"--param", "encryption=aes-256-gcm", "--passphrase-file", passFile)
	if !strings.Contains(out, "encryption:   aes-256-gcm (key id ") {
		t.Fatalf("ctl volume create --passphrase-file printed no key id:\n%s", out)
	}
	// Exported over NBD it cannot be: the export gets no passphrase.
	ctlID := strings.Fields(out)[2]
	if out, err := cairnCmd("ctl", "--server", c.agents, "volume", "export", ctlID, "--node", "node-1",
		"--nbd", filepath.Join(t.TempDir(), "enc.sock")).CombinedOutput(); err == nil || !strings.Contains(string(out), "encrypted") {
		t.Fatalf("ctl volume export of an encrypted volume: %v\n%s", err, out)
	}
	// The file's bytes, newline included, are the passphrase: CSI staging
	// with them works.
	staging, target = c.attachWith(ctlID, "node-3", mountCap, map[string]string{"encryptionPassphrase": "ctl horse\n"})
	c.detach(ctlID, "node-3", staging, target)
}

func keysOf(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}
