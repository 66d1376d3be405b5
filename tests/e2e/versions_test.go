//go:build e2e

package e2e

import (
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/cairn-csi/cairn/tests/e2e/localkube"
)

// TestSidecarVersionsMatchDeploy: the sidecars built here are the
// versions whose images deploy/kubernetes pins, so the e2e tests what a
// user installs.
func TestSidecarVersionsMatchDeploy(t *testing.T) {
	images := map[string]string{}
	re := regexp.MustCompile(`image: registry\.k8s\.io/sig-storage/([a-z-]+):(v[0-9.]+)`)
	for _, f := range []string{"controller.yaml", "node.yaml"} {
		b, err := os.ReadFile(filepath.Join("..", "..", "deploy", "kubernetes", f))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			images[m[1]] = m[2]
		}
	}
	for _, sc := range localkube.Sidecars {
		for _, cmd := range sc.Cmds {
			if cmd == "snapshot-controller" {
				continue // the cluster's, not in deploy/kubernetes
			}
			if got, ok := images[cmd]; !ok {
				t.Errorf("deploy/kubernetes has no image of %s", cmd)
			} else if got != sc.Version {
				t.Errorf("%s: deploy/kubernetes pins %s, the e2e builds %s", cmd, got, sc.Version)
			}
		}
	}
}
