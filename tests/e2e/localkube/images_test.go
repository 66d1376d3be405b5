package localkube

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// repoRoot is the repository's root, from this package's directory (where
// go test runs the tests).
var repoRoot = filepath.Join("..", "..", "..")

// dockerfileAptPackages returns the packages of the Dockerfile's apt-get
// install command and the suite of its debian:<suite>-slim base image.
func dockerfileAptPackages(t *testing.T, dockerfile string) (pkgs []string, suite string) {
	t.Helper()
	// Join continuation lines: the install command spans several.
	text := strings.ReplaceAll(dockerfile, "\\\n", " ")
	for _, line := range strings.Split(text, "\n") {
		fields := strings.Fields(line)
		if len(fields) >= 2 && strings.EqualFold(fields[0], "FROM") {
			if m := regexp.MustCompile(`^debian:([a-z]+)(-slim)?$`).FindStringSubmatch(fields[1]); m != nil {
				suite = m[1]
			}
		}
		if len(fields) == 0 || !strings.EqualFold(fields[0], "RUN") {
			continue
		}
		for _, cmd := range regexp.MustCompile(`&&|;|\|\|`).Split(strings.Join(fields[1:], " "), -1) {
			words := strings.Fields(cmd)
			i := slices.Index(words, "apt-get")
			if i < 0 {
				continue
			}
			rest := words[i+1:]
			// Options may come before the subcommand (apt-get -y install).
			for len(rest) > 0 && strings.HasPrefix(rest[0], "-") {
				rest = rest[1:]
			}
			if len(rest) == 0 || rest[0] != "install" {
				continue
			}
			if pkgs != nil {
				t.Fatalf("the Dockerfile has more than one apt-get install; this test reads one")
			}
			pkgs = []string{}
			for _, w := range rest[1:] {
				if !strings.HasPrefix(w, "-") {
					pkgs = append(pkgs, w)
				}
			}
		}
	}
	return pkgs, suite
}

// TestCairnImagePackagesMatchDockerfile: the e2e's Cairn image has the
// packages of the released one, on the same Debian release.
func TestCairnImagePackagesMatchDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	pkgs, suite := dockerfileAptPackages(t, string(b))
	if len(pkgs) == 0 {
		t.Fatal("found no apt-get install line in the Dockerfile")
	}
	for _, p := range pkgs {
		if !slices.Contains(CairnImagePackages, p) {
			t.Errorf("the Dockerfile installs %s, CairnImagePackages (tests/e2e/localkube/images.go) lacks it", p)
		}
	}
	for _, p := range CairnImagePackages {
		if !slices.Contains(pkgs, p) {
			t.Errorf("CairnImagePackages (tests/e2e/localkube/images.go) has %s, the Dockerfile does not install it", p)
		}
	}
	if suite != cairnSuite {
		t.Errorf("the Dockerfile's Debian base is %q, the e2e's Cairn image is built on %q (cairnSuite)", suite, cairnSuite)
	}
}

func TestDockerfileAptPackagesParser(t *testing.T) {
	got, suite := dockerfileAptPackages(t, "FROM golang:1 AS b\nFROM debian:trixie-slim\nRUN apt-get update \\\n  && DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends \\\n    a b \\\n    c && rm -rf x\n")
	if !slices.Equal(got, []string{"a", "b", "c"}) || suite != "trixie" {
		t.Errorf("got %q, %q; want [a b c], trixie", got, suite)
	}
}

// TestLocalImagesCoverDeploy: every image deploy/kubernetes names has a
// local stand-in, and each is an image that Build or CairnImage writes.
func TestLocalImagesCoverDeploy(t *testing.T) {
	local := LocalImages()
	files, err := filepath.Glob(filepath.Join(repoRoot, "deploy", "kubernetes", "*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes: %v", err)
	}
	re := regexp.MustCompile(`(?m)^\s*(?:-\s+)?image:\s*["']?([^"'\s]+)`)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range re.FindAllStringSubmatch(string(b), -1) {
			if _, ok := local[m[1]]; !ok {
				t.Errorf("%s: image %s has no local image in LocalImages (tests/e2e/localkube/images.go)", filepath.Base(f), m[1])
			}
		}
	}
	built := map[string]bool{CairnImageRef: true}
	bins := &Binaries{Sidecar: map[string]string{}}
	for _, im := range binaryImages(bins) {
		built[im.ref] = true
	}
	for up, ref := range local {
		if !built[ref] {
			t.Errorf("LocalImages maps %s to %s, which nothing builds", up, ref)
		}
	}
}
