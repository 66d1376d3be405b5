package localkube

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

// KubernetesVersion is the Kubernetes the k8sbin module builds; its go.mod
// pins it, and the cache key covers the go.mod.
const KubernetesVersion = "v1.34.3"

// A Sidecar is a CSI sidecar at the version deploy/ pins.
type Sidecar struct {
	Module, Version string
	// Cmds are the commands under ./cmd/ to build.
	Cmds []string
}

// Sidecars are the versions deploy/kubernetes pins (tests/e2e checks that
// they agree with its images, and the build that tests/e2e/sidecars/go.mod
// requires them). They build together in that one module, so that their
// common dependencies (client-go, apimachinery, …: most of the work)
// compile once: one by one from their own module zips, a cold build of
// them took 23 min, and csi-provisioner on its own (its go.mod replaces
// the k8s.io modules with v0.36) 4 min 23 s beside 4 min 21 s for the
// others, against 5 min 42 s for all five together. Its command imports
// nothing of k8s.io/kubernetes (only its e2e tests do), so it builds
// against the others' k8s.io v0.37 as it is.
var Sidecars = []Sidecar{
	{Module: "github.com/kubernetes-csi/external-provisioner/v6", Version: "v6.4.0", Cmds: []string{"csi-provisioner"}},
	{Module: "github.com/kubernetes-csi/external-attacher/v4", Version: "v4.13.0", Cmds: []string{"csi-attacher"}},
	{Module: "github.com/kubernetes-csi/external-resizer/v2", Version: "v2.3.0", Cmds: []string{"csi-resizer"}},
	{Module: "github.com/kubernetes-csi/external-snapshotter/v8", Version: "v8.7.0", Cmds: []string{"csi-snapshotter", "snapshot-controller"}},
}

// staticEnv builds the sidecars and the stand-ins without cgo: statically
// linked, they also run in an image that holds nothing but the binary
// (linked against this machine's libc they would not). It is part of their
// cache keys, so that a dynamic build from before is never taken for one.
const staticEnv = "CGO_ENABLED=0"

// snapshotClient is the module whose config/crd holds the snapshot CRDs.
const snapshotClient = "github.com/kubernetes-csi/external-snapshotter/client/v8@v8.7.0"

// Binaries are the paths of everything a run needs that is built here.
type Binaries struct {
	Etcd, APIServer, ControllerManager, Scheduler, Kubelet, Kubectl string
	// Registrar registers a CSI node plugin with kubelet, and
	// LivenessProbe turns CSI Probe into GET /healthz: the stand-ins of
	// the module csistandins for csi-node-driver-registrar and
	// livenessprobe, which the module proxy does not serve.
	Registrar, LivenessProbe string
	// Sidecar maps a sidecar command name (csi-provisioner, …) to its binary.
	Sidecar map[string]string
	// PauseImage and BusyboxImage are docker-archive tarballs of
	// PauseImageRef and BusyboxImageRef.
	PauseImage, BusyboxImage string
	// Images maps the reference of each sidecar's and stand-in's image
	// (SidecarImageRef, RegistrarImageRef, LivenessProbeImageRef) to its
	// docker-archive tarball: one static binary at /<command>, its
	// entrypoint. LocalImages says which upstream image each replaces.
	// Cairn's own image comes from Builder.CairnImage.
	Images map[string]string
	// SnapshotCRDs is the directory of the VolumeSnapshot CRDs.
	SnapshotCRDs string
}

// Image references of the locally built images.
const (
	PauseImageRef   = "e2e.local/pause:1"
	BusyboxImageRef = "e2e.local/busybox:1"
)

// Builder builds the binaries once and keeps them in CacheDir, one
// directory per version (a content hash for the modules in this
// repository), so a warm run builds nothing.
type Builder struct {
	// CacheDir holds the built binaries (e.g. os.UserCacheDir()/cairn-e2e).
	CacheDir string
	// SourceDir is tests/e2e, which holds the k8sbin, sidecars, csistandins
	// and imagetool modules.
	SourceDir string
	// Progress gets a line per step and, while a build runs, a line every
	// 30 s.
	Progress io.Writer
	// BaseLater leaves the Cairn image's base out of Build: the caller
	// builds it with StartBase, beside something that leaves the CPU idle
	// (make e2e: the host-process run's tests). Beside the Kubernetes
	// build (both cores busy) it made that build about a minute longer.
	BaseLater bool

	// used are the directories under CacheDir/bin this Build uses;
	// usedMu guards it (the Cairn base is built beside the rest).
	usedMu sync.Mutex
	used   map[string]bool
	// imagesDir holds imagetool (and the pause and busybox images),
	// imagesKey is its source hash, cairnBaseLayer is the Cairn image's
	// base layer: found once, for Build and CairnImage.
	imagesDir, imagesKey, cairnBaseLayer string
	// debootstrap is the path of debootstrap, found with the base's key.
	debootstrap string
}

// Build builds (or finds in the cache) everything in Binaries.
func (b *Builder) Build() (*Binaries, error) {
	bins := &Binaries{Sidecar: map[string]string{}}
	// The Cairn image's base is mostly downloads and dpkg, the Go builds
	// are CPU: made side by side, the base adds little to a cold build.
	if _, err := b.imageTool(); err != nil {
		return nil, err
	}
	var baseDone <-chan error
	if b.BaseLater {
		// Kept by prune all the same: a later run builds it or finds it.
		if err := b.markBaseUsed(); err != nil {
			return nil, err
		}
	} else {
		baseDone = b.StartBase()
	}
	k8sDir := filepath.Join(b.SourceDir, "k8sbin")
	key, err := hashTree(k8sDir, kubeVersionLDFlags())
	if err != nil {
		return nil, err
	}
	dir, err := b.cached("kubernetes", KubernetesVersion+"-"+key, "Kubernetes "+KubernetesVersion+" and etcd (~10-16 min cold on 2 cores)", func(out string) error {
		pkgs := []string{"./etcd"}
		for _, c := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl"} {
			pkgs = append(pkgs, "k8s.io/kubernetes/cmd/"+c)
		}
		return b.goBuild(k8sDir, out, nil, []string{"-ldflags=" + kubeVersionLDFlags()}, pkgs...)
	})
	if err != nil {
		return nil, err
	}
	bins.Etcd = filepath.Join(dir, "etcd")
	bins.APIServer, bins.ControllerManager = filepath.Join(dir, "kube-apiserver"), filepath.Join(dir, "kube-controller-manager")
	bins.Scheduler, bins.Kubelet, bins.Kubectl = filepath.Join(dir, "kube-scheduler"), filepath.Join(dir, "kubelet"), filepath.Join(dir, "kubectl")

	scDir := filepath.Join(b.SourceDir, "sidecars")
	scKey, err := hashTree(scDir, staticEnv)
	if err != nil {
		return nil, err
	}
	// Checked on every run, not only when building: the cache key is the
	// module's go.mod, so a version bumped in Sidecars and deploy/ but
	// not there would otherwise keep the old binaries.
	if err := checkVersions(scDir, Sidecars); err != nil {
		return nil, err
	}
	dir, err = b.cached("sidecars", scKey, "the CSI sidecars (one module, static, ~6 min cold on 2 cores)", func(out string) error {
		return b.goBuild(scDir, out, []string{staticEnv}, nil, "tool")
	})
	if err != nil {
		return nil, err
	}
	for _, sc := range Sidecars {
		for _, c := range sc.Cmds {
			bins.Sidecar[c] = filepath.Join(dir, c)
		}
	}

	saDir := filepath.Join(b.SourceDir, "csistandins")
	saKey, err := hashTree(saDir, staticEnv)
	if err != nil {
		return nil, err
	}
	dir, err = b.cached("csistandins", saKey, "the registrar and livenessprobe stand-ins (static, ~1 min cold)", func(out string) error {
		return b.goBuild(saDir, out, []string{staticEnv}, nil, "./registrar", "./livenessprobe")
	})
	if err != nil {
		return nil, err
	}
	bins.Registrar, bins.LivenessProbe = filepath.Join(dir, "registrar"), filepath.Join(dir, "livenessprobe")

	crdDir, err := moduleDir(snapshotClient)
	if err != nil {
		return nil, err
	}
	bins.SnapshotCRDs = filepath.Join(crdDir, "config", "crd")

	dir, err = b.imageTool()
	if err != nil {
		return nil, err
	}
	bins.PauseImage, bins.BusyboxImage = filepath.Join(dir, "pause.tar"), filepath.Join(dir, "busybox.tar")
	if err := b.buildBinaryImages(bins); err != nil {
		return nil, err
	}
	// Built here, not only when CairnImage first needs it, so that a
	// warm cache has it and prune keeps it.
	if baseDone != nil {
		if err := <-baseDone; err != nil {
			return nil, err
		}
	}
	b.prune()
	return bins, nil
}

// prune removes the builds under CacheDir/bin that this Build did not use:
// another version, or a sidecar that is now built in sidecars/. Each takes
// hundreds of MB. A failure only warns: the run has what it needs. An
// interrupted build's directory may hold mounts (see removeTree), hence
// removeTree here and in cached rather than os.RemoveAll.
func (b *Builder) prune() {
	entries, err := os.ReadDir(filepath.Join(b.CacheDir, "bin"))
	if err != nil {
		fmt.Fprintf(b.Progress, "warning: cannot list the cached builds: %v\n", err)
		return
	}
	for _, e := range entries {
		p := filepath.Join(b.CacheDir, "bin", e.Name())
		if b.used[p] {
			continue
		}
		fmt.Fprintf(b.Progress, "removing an unused build: %s\n", p)
		if err := removeTree(p); err != nil {
			fmt.Fprintf(b.Progress, "warning: %v\n", err)
		}
	}
}

// cached returns CacheDir/bin/NAME-VERSION, building it with build first
// if it is not complete. build writes into a fresh directory that becomes
// NAME-VERSION only when it succeeds, so an interrupted build is never
// taken for a cached one. A new build removes the other versions of name.
func (b *Builder) cached(name, version, what string, build func(out string) error) (string, error) {
	final := filepath.Join(b.CacheDir, "bin", name+"-"+version)
	b.usedMu.Lock()
	if b.used == nil {
		b.used = map[string]bool{}
	}
	b.used[final] = true
	b.usedMu.Unlock()
	if _, err := os.Stat(filepath.Join(final, ".complete")); err == nil {
		fmt.Fprintf(b.Progress, "cached: %s (%s)\n", what, final)
		return final, nil
	}
	tmp := final + ".partial"
	// An interrupted build may have left mounts in there (debootstrap's
	// /proc and /sys in a chroot): removing through them would reach
	// this machine's files.
	if err := removeTree(tmp); err != nil {
		return "", err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", err
	}
	start := time.Now()
	fmt.Fprintf(b.Progress, "building %s …\n", what)
	stop := make(chan struct{})
	ticker := time.NewTicker(30 * time.Second)
	go func() {
		defer ticker.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ticker.C:
				fmt.Fprintf(b.Progress, "  … still building %s (%s)\n", what, time.Since(start).Round(time.Second))
			}
		}
	}()
	err := build(tmp)
	close(stop)
	if err != nil {
		return "", fmt.Errorf("build %s: %w", what, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, ".complete"), nil, 0o644); err != nil {
		return "", err
	}
	if err := os.RemoveAll(final); err != nil {
		return "", err
	}
	if err := os.Rename(tmp, final); err != nil {
		return "", err
	}
	fmt.Fprintf(b.Progress, "built %s in %s\n", what, time.Since(start).Round(time.Second))
	old, _ := filepath.Glob(filepath.Join(b.CacheDir, "bin", name+"-*"))
	for _, o := range old {
		if o != final && !strings.HasPrefix(strings.TrimPrefix(o, final), ".") {
			if err := removeTree(o); err != nil {
				return "", err
			}
		}
	}
	return final, nil
}

// kubeVersionLDFlags stamp the version into the Kubernetes binaries, as
// Kubernetes' own build does: without it they call themselves
// v0.0.0-master, and kubectl version and the Node's kubeletVersion say so.
func kubeVersionLDFlags() string {
	minor := strings.Split(KubernetesVersion, ".")[1]
	var fl []string
	for _, pkg := range []string{"k8s.io/component-base/version", "k8s.io/client-go/pkg/version"} {
		fl = append(fl, "-X "+pkg+".gitVersion="+KubernetesVersion, "-X "+pkg+".gitMajor=1", "-X "+pkg+".gitMinor="+minor, "-X "+pkg+".gitTreeState=clean")
	}
	return "-s -w " + strings.Join(fl, " ")
}

// goBuild runs go build -o out/ pkgs in dir, outside any workspace, with
// extra flags. The binaries carry no symbol tables (-s -w): linking is a
// good part of a build here, and nobody debugs them.
func (b *Builder) goBuild(dir, out string, env, flags []string, pkgs ...string) error {
	if len(flags) == 0 {
		flags = []string{"-ldflags=-s -w"}
	}
	args := append(append([]string{"build", "-trimpath", "-o", out + "/"}, flags...), pkgs...)
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), append([]string{"GOWORK=off", "GOFLAGS=-mod=mod"}, env...)...)
	cmd.Stdout, cmd.Stderr = b.Progress, b.Progress
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s (in %s): %w", strings.Join(args, " "), dir, err)
	}
	return nil
}

// checkVersions fails unless the module in dir builds each sidecar at its
// pinned version (MVS may have raised one that another requires).
func checkVersions(dir string, scs []Sidecar) error {
	for _, sc := range scs {
		cmd := exec.Command("go", "list", "-m", "-f", "{{.Version}}", sc.Module)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GOWORK=off")
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("go list -m %s (in %s): %v: %s", sc.Module, dir, err, out)
		}
		if got := strings.TrimSpace(string(out)); got != sc.Version {
			return fmt.Errorf("%s/go.mod builds %s %s, but deploy/ pins %s: go get %s@%s there", dir, sc.Module, got, sc.Version, sc.Module, sc.Version)
		}
	}
	return nil
}

// moduleDir downloads a module (path@version) into the module cache and
// returns its directory there.
func moduleDir(mv string) (string, error) {
	cmd := exec.Command("go", "mod", "download", "-json", mv)
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var info struct{ Dir, Error string }
	if jerr := json.Unmarshal(out, &info); jerr == nil && info.Error != "" {
		return "", fmt.Errorf("go mod download %s: %s", mv, info.Error)
	}
	if err != nil {
		return "", fmt.Errorf("go mod download %s: %v: %s", mv, err, stderr.String())
	}
	if info.Dir == "" {
		return "", fmt.Errorf("go mod download %s: no directory in %s", mv, out)
	}
	return info.Dir, nil
}

// hashTree returns a short hash of the go.mod, go.sum and .go files under
// dir, of the Go toolchain's version and of flags: the cache key of what
// it builds.
func hashTree(dir, flags string) (string, error) {
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".go") || d.Name() == "go.mod" || d.Name() == "go.sum") {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	h := sha256.New()
	ver, err := exec.Command("go", "env", "GOVERSION").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOVERSION: %w", err)
	}
	h.Write(ver)
	fmt.Fprintf(h, "flags %q\n", flags)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		rel, _ := filepath.Rel(dir, f)
		fmt.Fprintf(h, "%s %d\n", rel, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:12], nil
}

func hashFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}
