package localkube

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
)

// The images that stand for the ones Cairn's manifests name. They are
// built here, imported into containerd and never pulled: pods that use
// them need imagePullPolicy Never or IfNotPresent.
const (
	// RegistrarImageRef and LivenessProbeImageRef hold the stand-ins of
	// the module csistandins, whose upstream versions the module proxy
	// does not serve: hence "standin" rather than a version.
	RegistrarImageRef     = "e2e.local/csi-node-driver-registrar:standin"
	LivenessProbeImageRef = "e2e.local/livenessprobe:standin"
	// CairnImageRef is the image CairnImage writes.
	CairnImageRef = "e2e.local/cairn:dev"
)

// The images deploy/kubernetes names for the stand-ins and for Cairn
// (TestLocalImagesCoverDeploy checks that LocalImages maps each image
// there).
const (
	sigStorage            = "registry.k8s.io/sig-storage/"
	upstreamRegistrar     = sigStorage + "csi-node-driver-registrar:v2.18.0"
	upstreamLivenessProbe = sigStorage + "livenessprobe:v2.20.0"
	upstreamCairn         = "cairn:dev"
)

// SidecarImageRef is the local image of the sidecar command cmd built at
// version, e.g. e2e.local/csi-provisioner:v6.4.0.
func SidecarImageRef(cmd, version string) string {
	return "e2e.local/" + cmd + ":" + version
}

// LocalImages maps each image that deploy/kubernetes names (and
// snapshot-controller's, which it does not) to the local image built
// here that replaces it, e.g. registry.k8s.io/sig-storage/csi-provisioner:v6.4.0
// to e2e.local/csi-provisioner:v6.4.0 and cairn:dev to CairnImageRef: the
// table of a kustomize images override.
func LocalImages() map[string]string {
	m := map[string]string{
		upstreamRegistrar:     RegistrarImageRef,
		upstreamLivenessProbe: LivenessProbeImageRef,
		upstreamCairn:         CairnImageRef,
	}
	for _, sc := range Sidecars {
		for _, c := range sc.Cmds {
			m[sigStorage+c+":"+sc.Version] = SidecarImageRef(c, sc.Version)
		}
	}
	return m
}

// CairnImagePackages are the Debian packages of the Cairn image, the
// tools its node plugin runs: exactly those the Dockerfile's apt-get
// install line installs (TestCairnImagePackagesMatchDockerfile checks), so
// that the e2e runs Cairn with what the released image has.
var CairnImagePackages = []string{"e2fsprogs", "xfsprogs", "util-linux", "mount", "fuse3", "ca-certificates"}

const (
	// cairnSuite is the Debian release of the Dockerfile's base image
	// (debian:bookworm-slim; the test checks that too).
	cairnSuite = "bookworm"
	// cairnMirror is where debootstrap fetches the packages: the mirror
	// this machine's apt uses.
	cairnMirror = "http://deb.debian.org/debian"
	// cairnBaseRecipe is part of the base layer's cache key: bump it when
	// the way the base is made (buildCairnBase) changes.
	cairnBaseRecipe = "1"
)

// cairnBaseTrim are what buildCairnBase removes from the root filesystem
// (globs under it; also part of the cache key). The Dockerfile's image has
// none of it: apt's downloaded packages and indexes (its apt-get update
// brings them back), apt's binary caches, which it rebuilds, and the
// documentation, manuals and translations that debian:bookworm-slim
// leaves out (the copyright files stay, as there). That is about a
// quarter of the tree.
var cairnBaseTrim = []string{
	"var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
	"usr/share/doc/*/*", "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
	"usr/share/groff/*", "usr/share/lintian/*", "usr/share/linda/*",
}

// imageTool builds (or finds in the cache) imagetool and the pause and
// busybox images, which are made together, and returns their directory.
func (b *Builder) imageTool() (string, error) {
	if b.imagesDir != "" {
		return b.imagesDir, nil
	}
	imgDir := filepath.Join(b.SourceDir, "imagetool")
	imgKey, err := hashTree(imgDir, "")
	if err != nil {
		return "", err
	}
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return "", fmt.Errorf("busybox (Debian package busybox-static) not found: %w", err)
	}
	bbSum, err := hashFile(busybox)
	if err != nil {
		return "", err
	}
	dir, err := b.cached("images", imgKey+"-"+bbSum[:12], "imagetool and the pause and busybox images", func(out string) error {
		if err := b.goBuild(imgDir, out, []string{staticEnv}, nil, ".", "./pause"); err != nil {
			return err
		}
		tool := filepath.Join(out, "imagetool")
		for _, args := range [][]string{
			{"-tag", PauseImageRef, "-out", filepath.Join(out, "pause.tar"), "-file", filepath.Join(out, "pause") + "=/pause", "-entrypoint", "/pause"},
			{"-tag", BusyboxImageRef, "-out", filepath.Join(out, "busybox.tar"), "-file", busybox + "=/bin/busybox", "-busybox", "/bin/busybox", "-entrypoint", "/bin/sh"},
		} {
			if err := runImageTool(tool, args...); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	b.imagesDir, b.imagesKey = dir, imgKey
	return dir, nil
}

// runImageTool runs imagetool with args.
func runImageTool(tool string, args ...string) error {
	if o, err := exec.Command(tool, args...).CombinedOutput(); err != nil {
		return fmt.Errorf("imagetool %s: %v: %s", strings.Join(args, " "), err, o)
	}
	return nil
}

// A binaryImage is an image of one static binary at /name, its entrypoint.
type binaryImage struct{ ref, name, bin string }

// binaryImages lists the images of the sidecars and the stand-ins, in a
// fixed order. The stand-ins sit where the upstream images have their
// binaries (/csi-node-driver-registrar, /livenessprobe).
func binaryImages(bins *Binaries) []binaryImage {
	var imgs []binaryImage
	for _, sc := range Sidecars {
		for _, c := range sc.Cmds {
			imgs = append(imgs, binaryImage{ref: SidecarImageRef(c, sc.Version), name: c, bin: bins.Sidecar[c]})
		}
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].name < imgs[j].name })
	return append(imgs,
		binaryImage{ref: RegistrarImageRef, name: "csi-node-driver-registrar", bin: bins.Registrar},
		binaryImage{ref: LivenessProbeImageRef, name: "livenessprobe", bin: bins.LivenessProbe})
}

// buildBinaryImages writes the images of the sidecars and the stand-ins
// into bins.Images. Their cache key is imagetool's and the binaries'
// cache directories, which are named by the binaries' versions or source
// hashes: hashing 500 MB of binaries on every run would cost seconds.
func (b *Builder) buildBinaryImages(bins *Binaries) error {
	toolDir, err := b.imageTool()
	if err != nil {
		return err
	}
	imgs := binaryImages(bins)
	h := sha256.New()
	fmt.Fprintf(h, "imagetool %s\n", b.imagesKey)
	for _, im := range imgs {
		rel, err := filepath.Rel(b.CacheDir, im.bin)
		if err != nil {
			return err
		}
		fmt.Fprintf(h, "%s /%s %s\n", im.ref, im.name, rel)
	}
	key := hex.EncodeToString(h.Sum(nil))[:12]
	dir, err := b.cached("sidecar-images", key, "the images of the sidecars and the stand-ins", func(out string) error {
		for _, im := range imgs {
			if err := runImageTool(filepath.Join(toolDir, "imagetool"), "-tag", im.ref, "-out", filepath.Join(out, im.name+".tar"),
				"-file", im.bin+"=/"+im.name, "-file-mode", "0755", "-entrypoint", "/"+im.name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	bins.Images = map[string]string{}
	for _, im := range imgs {
		bins.Images[im.ref] = filepath.Join(dir, im.name+".tar")
	}
	return nil
}

// cairnBase builds (or finds in the cache) the Cairn image's base layer, a
// Debian root filesystem with CairnImagePackages, and returns the path of
// the gzip-compressed layer tarball. It is built once: its key is what
// goes into it (the packages, the suite, the mirror, debootstrap's version
// and the recipe), not the day's package versions.
func (b *Builder) cairnBase() (string, error) {
	if b.cairnBaseLayer != "" {
		return b.cairnBaseLayer, nil
	}
	key, what, err := b.cairnBaseKey()
	if err != nil {
		return "", err
	}
	deb, tool := b.debootstrap, filepath.Join(b.imagesDir, "imagetool")
	dir, err := b.cached("cairn-base", key, what, func(out string) error {
		return buildCairnBase(deb, tool, out)
	})
	if err != nil {
		return "", err
	}
	b.cairnBaseLayer = filepath.Join(dir, "layer.tar.gz")
	return b.cairnBaseLayer, nil
}

// StartBase builds the Cairn image's base (or finds it in the cache) in
// the background; the channel gets the outcome.
func (b *Builder) StartBase() <-chan error {
	done := make(chan error, 1)
	go func() {
		_, err := b.cairnBase()
		done <- err
	}()
	return done
}

// markBaseUsed tells prune to keep the Cairn image's base of this version,
// built or not.
func (b *Builder) markBaseUsed() error {
	key, _, err := b.cairnBaseKey()
	if err != nil {
		return err
	}
	b.usedMu.Lock()
	defer b.usedMu.Unlock()
	if b.used == nil {
		b.used = map[string]bool{}
	}
	b.used[filepath.Join(b.CacheDir, "bin", "cairn-base-"+key)] = true
	return nil
}

// cairnBaseKey returns the cache key of the Cairn image's base (the
// packages, the suite, the mirror, the recipe and debootstrap's version)
// and its description.
func (b *Builder) cairnBaseKey() (key, what string, err error) {
	if _, err := b.imageTool(); err != nil {
		return "", "", err
	}
	deb, err := exec.LookPath("debootstrap")
	if err != nil {
		return "", "", fmt.Errorf("debootstrap not found (scripts/install-deps.sh --e2e installs it): %w", err)
	}
	ver, err := exec.Command(deb, "--version").Output()
	if err != nil {
		return "", "", fmt.Errorf("debootstrap --version: %w", err)
	}
	b.debootstrap = deb
	h := sha256.New()
	fmt.Fprintf(h, "packages %q\nsuite %s\nmirror %s\nrecipe %s %q\n%s", CairnImagePackages, cairnSuite, cairnMirror, cairnBaseRecipe, cairnBaseTrim, ver)
	key = cairnSuite + "-" + hex.EncodeToString(h.Sum(nil))[:12]
	what = "the Cairn image's base: Debian " + cairnSuite + " (debootstrap minbase) with " + strings.Join(CairnImagePackages, " ") + " (~1.5 min cold; needs root and " + cairnMirror + ")"
	return key, what, nil
}

// buildCairnBase makes the root filesystem with debootstrap under out,
// trims it and packs it into out/layer.tar.gz. debootstrap's output goes
// to out/debootstrap.log (hundreds of lines), kept for reference.
func buildCairnBase(deb, tool, out string) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("debootstrap needs root")
	}
	rootfs := filepath.Join(out, "rootfs")
	// However it ends, the tree goes: it is only the layer's source.
	defer func() {
		if rerr := removeTree(rootfs); rerr != nil && err == nil {
			err = rerr
		}
	}()
	logPath := filepath.Join(out, "debootstrap.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	cmd := exec.Command(deb, "--variant=minbase", "--include="+strings.Join(CairnImagePackages, ","), cairnSuite, rootfs, cairnMirror)
	cmd.Stdout, cmd.Stderr = logf, logf
	err = cmd.Run()
	logf.Close()
	if err != nil {
		return fmt.Errorf("%s: %w; the end of %s:\n%s", strings.Join(cmd.Args, " "), err, logPath, tailFile(logPath, 15))
	}
	// Globs follow symlinks, and an absolute one in the tree points at
	// this machine's files: only paths whose directory is itself inside
	// the tree are removed (or written, below).
	if rootfs, err = filepath.EvalSymlinks(rootfs); err != nil {
		return err
	}
	for _, pat := range cairnBaseTrim {
		matches, err := filepath.Glob(filepath.Join(rootfs, pat))
		if err != nil {
			return err
		}
		for _, m := range matches {
			if filepath.Base(m) == "copyright" && strings.HasPrefix(pat, "usr/share/doc/") {
				continue
			}
			if !dirIsReal(m) {
				continue
			}
			if err := os.RemoveAll(m); err != nil {
				return err
			}
		}
	}
	// debootstrap copies this machine's resolv.conf and hostname into the
	// tree; the runtime mounts a pod's own over them, and the image should
	// not carry this machine's. Removed first: were one a symlink, writing
	// through it would reach this machine's file.
	for _, f := range []string{"etc/resolv.conf", "etc/hostname"} {
		p := filepath.Join(rootfs, f)
		if !dirIsReal(p) {
			return fmt.Errorf("%s: a symlink on the way", p)
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			return err
		}
	}
	return runImageTool(tool, "-rootfs", rootfs, "-layer-out", filepath.Join(out, "layer.tar.gz"))
}

// dirIsReal says whether p's directory is reached without symlinks.
func dirIsReal(p string) bool {
	d := filepath.Dir(p)
	real, err := filepath.EvalSymlinks(d)
	return err == nil && real == d
}

// removeTree removes a chroot tree, after unmounting whatever is mounted
// in it. debootstrap mounts /proc and /sys in the tree while it runs and
// unmounts them when it ends, but not when it is killed; removing through
// such a mount would reach this machine's own files.
func removeTree(dir string) error {
	// mountinfo's paths are absolute and clean.
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := unmountUnder(dir); err != nil {
		return fmt.Errorf("not removing %s: %w", dir, err)
	}
	return os.RemoveAll(dir)
}

// CairnImage writes the image CairnImageRef of the cairn binary cairnBin
// and returns the docker-archive tarball's path. Build cairnBin with
// CGO_ENABLED=0, as the Dockerfile does: linked against this machine's
// libc, it would depend on the image's matching it. The image is
// the cached Debian base layer (see cairnBase; Build makes it, or this
// does on first use) plus a layer with the binary at /usr/local/bin/cairn,
// mode 0755, its entrypoint, like the Dockerfile's. Only that small layer
// is new, so on a warm cache this takes seconds; the image is cached too,
// by the binary's hash, until the next binary or the next Build, which
// prunes it.
func (b *Builder) CairnImage(cairnBin string) (string, error) {
	base, err := b.cairnBase()
	if err != nil {
		return "", err
	}
	toolDir, err := b.imageTool()
	if err != nil {
		return "", err
	}
	sum, err := hashFile(cairnBin)
	if err != nil {
		return "", err
	}
	baseRel, err := filepath.Rel(b.CacheDir, base)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "base %s\nimagetool %s\n", baseRel, b.imagesKey)
	key := sum[:12] + "-" + hex.EncodeToString(h.Sum(nil))[:12]
	dir, err := b.cached("cairn-image", key, "the image "+CairnImageRef+" of "+cairnBin, func(out string) error {
		return runImageTool(filepath.Join(toolDir, "imagetool"), "-tag", CairnImageRef, "-out", filepath.Join(out, "cairn.tar"),
			"-layer", base, "-file", cairnBin+"=/usr/local/bin/cairn", "-file-mode", "0755", "-entrypoint", "/usr/local/bin/cairn")
	})
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, "cairn.tar"), nil
}
