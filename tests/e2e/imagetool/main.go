// Command imagetool writes a container image as a docker-archive tarball
// (what `ctr images import` reads) from files on this machine, so the e2e
// cluster never pulls from a registry.
//
// Single-binary images and busybox:
//
//	imagetool -tag e2e.local/busybox:1 -out busybox.tar \
//	  -file /bin/busybox=/bin/busybox -busybox /bin/busybox -entrypoint /bin/sh
//
// A root filesystem: -rootfs packs a directory tree as a layer; with
// -layer-out it writes only that layer (gzip), to be cached and reused
// with -layer under a small layer of -file entries, so that a new image
// on the same base costs only its small layer:
//
//	imagetool -rootfs /tmp/rootfs -layer-out base.tar.gz
//	imagetool -tag e2e.local/cairn:dev -out cairn.tar -layer base.tar.gz \
//	  -file bin/cairn=/usr/local/bin/cairn -file-mode 0755 -entrypoint /usr/local/bin/cairn
//
// The layers are, from the bottom: the -layer tarballs in order, the
// -rootfs tree, the -file entries (with /tmp and, for -busybox, its applet
// links; left out when there are no -file entries and another layer).
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// epoch is every entry's modification time: a fixed time keeps a layer's
// digest, and so the image id, the same from one build to the next.
var epoch = time.Unix(0, 0)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var files, layers list
	tag := flag.String("tag", "", "image reference to record in the archive (required unless -layer-out)")
	out := flag.String("out", "", "docker-archive tarball to write (required unless -layer-out)")
	entrypoint := flag.String("entrypoint", "", "the image's entrypoint, a path in the image")
	busybox := flag.String("busybox", "", "path in the image of a busybox binary: add a symlink to it for each of its applets")
	flag.Var(&files, "file", "HOST=IMAGE: copy the host file HOST to IMAGE, keeping its mode (repeatable)")
	fileMode := flag.String("file-mode", "", "octal permission bits for every -file entry (default: each host file's)")
	flag.Var(&layers, "layer", "a prepared layer tarball (gzip or plain) to add, bottom first (repeatable)")
	rootfs := flag.String("rootfs", "", "a directory tree to pack as a layer: files, directories, symlinks and hard links with their modes and owners; device nodes, sockets and FIFOs are left out")
	layerOut := flag.String("layer-out", "", "with -rootfs: write only its layer, gzip-compressed, to this file")
	flag.Parse()
	if flag.NArg() > 0 {
		log.Fatalf("unexpected arguments: %q", flag.Args())
	}
	if *layerOut != "" {
		if *rootfs == "" || *tag != "" || *out != "" || len(files) > 0 || len(layers) > 0 {
			log.Fatal("-layer-out takes only -rootfs")
		}
		if err := writeRootfsLayer(*rootfs, *layerOut); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *tag == "" || *out == "" {
		log.Fatal("-tag and -out are required")
	}
	var mode fs.FileMode
	if *fileMode != "" {
		m, err := strconv.ParseUint(*fileMode, 8, 32)
		if err != nil || m&^0o7777 != 0 {
			log.Fatalf("-file-mode %q: want octal permission bits such as 0755", *fileMode)
		}
		mode = fs.FileMode(m)
	}

	var imgLayers []v1.Layer
	for _, p := range layers {
		l, err := tarball.LayerFromFile(p)
		if err != nil {
			log.Fatalf("-layer %s: %v", p, err)
		}
		imgLayers = append(imgLayers, l)
	}
	if *rootfs != "" {
		tmp, err := os.CreateTemp(filepath.Dir(*out), ".rootfs-*.tar.gz")
		if err != nil {
			log.Fatal(err)
		}
		tmp.Close()
		defer os.Remove(tmp.Name())
		if err := writeRootfsLayer(*rootfs, tmp.Name()); err != nil {
			log.Fatal(err)
		}
		l, err := tarball.LayerFromFile(tmp.Name())
		if err != nil {
			log.Fatal(err)
		}
		imgLayers = append(imgLayers, l)
	}
	// The -file layer carries /tmp too, which a layer of a whole root
	// filesystem already has: without -file entries it is only needed
	// when it is the image's only layer.
	if len(files) > 0 || len(imgLayers) == 0 {
		b, err := layerTar(files, mode, *busybox, len(imgLayers) == 0)
		if err != nil {
			log.Fatal(err)
		}
		l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(b)), nil
		})
		if err != nil {
			log.Fatal(err)
		}
		imgLayers = append(imgLayers, l)
	}
	if err := write(*tag, *out, *entrypoint, imgLayers); err != nil {
		log.Fatal(err)
	}
}

// layerTar builds the layer of the -file entries: the files, their parent
// directories, /tmp if withTmp, and busybox's applet links. mode, if not
// zero, replaces the host files' permission bits.
func layerTar(files []string, mode fs.FileMode, busybox string, withTmp bool) ([]byte, error) {
	type entry struct {
		hdr  *tar.Header
		body []byte
	}
	entries := map[string]entry{}
	var addDirs func(p string)
	addDirs = func(p string) {
		for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; ok {
				continue
			}
			entries[d] = entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: 0o755, ModTime: epoch}}
		}
	}
	if withTmp {
		entries["/tmp"] = entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777, ModTime: epoch}}
	}
	for _, f := range files {
		host, img, ok := strings.Cut(f, "=")
		if !ok || !path.IsAbs(img) {
			return nil, fmt.Errorf("-file %q: want HOST=/path/in/image", f)
		}
		b, err := os.ReadFile(host)
		if err != nil {
			return nil, err
		}
		st, err := os.Stat(host)
		if err != nil {
			return nil, err
		}
		m := tarMode(st.Mode())
		if mode != 0 {
			m = int64(mode)
		}
		addDirs(img)
		entries[img] = entry{hdr: &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(img, "/"), Mode: m, Size: int64(len(b)), ModTime: epoch}, body: b}
	}
	if busybox != "" {
		var host string
		for _, f := range files {
			if h, img, _ := strings.Cut(f, "="); img == busybox {
				host = h
			}
		}
		if host == "" {
			return nil, fmt.Errorf("-busybox %s: not among the -file entries", busybox)
		}
		outb, err := exec.Command(host, "--list-full").Output()
		if err != nil {
			return nil, fmt.Errorf("%s --list-full: %w", host, err)
		}
		for _, applet := range strings.Fields(string(outb)) {
			p := "/" + applet
			if _, ok := entries[p]; ok {
				continue
			}
			addDirs(p)
			entries[p] = entry{hdr: &tar.Header{Typeflag: tar.TypeSymlink, Name: applet, Linkname: busybox, Mode: 0o777, ModTime: epoch}}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	// Sorted: parents before children, and the same bytes every time.
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		if err := tw.WriteHeader(e.hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.body); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// tarMode returns the permission bits of a file mode as a tar header
// wants them, with setuid, setgid and sticky (mount is setuid root).
func tarMode(m fs.FileMode) int64 {
	t := int64(m.Perm())
	if m&fs.ModeSetuid != 0 {
		t |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		t |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		t |= 0o1000
	}
	return t
}

// writeRootfsLayer packs the tree under dir into the gzip-compressed
// layer tarball out, through a temporary file, so that an interrupted run
// leaves no truncated layer behind.
func writeRootfsLayer(dir, out string) error {
	f, err := os.CreateTemp(filepath.Dir(out), "."+filepath.Base(out)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	zw, err := gzip.NewWriterLevel(f, gzip.DefaultCompression)
	if err != nil {
		f.Close()
		return err
	}
	if err := packTree(dir, zw); err != nil {
		f.Close()
		return fmt.Errorf("-rootfs %s: %w", dir, err)
	}
	if err := zw.Close(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(f.Name(), out)
}

// packTree writes the tree under dir as a layer's tar stream: directories,
// regular files, symlinks, and hard links (the second and later names of a
// file, as links to the first). Entries keep their permission bits
// (setuid included) and numeric owners; they go in lexical order, each
// parent before its children, all with the same time, so that the same
// tree gives the same bytes. Left out: device nodes, sockets and FIFOs
// (a container runtime makes /dev itself), extended attributes (nothing
// the images here need carries file capabilities), and whatever is
// mounted below dir (a /proc or /dev left mounted in a chroot must not
// end up in an image).
func packTree(dir string, w io.Writer) error {
	root, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !root.IsDir() {
		return errors.New("not a directory")
	}
	rootDev := root.Sys().(*syscall.Stat_t).Dev
	type inode struct{ dev, ino uint64 }
	firstName := map[inode]string{}
	skipped := 0
	tw := tar.NewWriter(w)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		hdr := &tar.Header{
			Name:    filepath.ToSlash(rel),
			Mode:    tarMode(fi.Mode()),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: epoch,
		}
		var body string
		switch t := fi.Mode().Type(); {
		case t == fs.ModeDir:
			hdr.Typeflag, hdr.Name = tar.TypeDir, hdr.Name+"/"
			if uint64(st.Dev) != uint64(rootDev) {
				// A mount point: keep the (empty) directory,
				// leave out what is mounted on it.
				if err := tw.WriteHeader(hdr); err != nil {
					return err
				}
				log.Printf("leaving out %s: another filesystem is mounted there", p)
				return filepath.SkipDir
			}
		case t == fs.ModeSymlink:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
		case t.IsRegular():
			key := inode{uint64(st.Dev), uint64(st.Ino)}
			if first, ok := firstName[key]; ok && st.Nlink > 1 {
				hdr.Typeflag, hdr.Linkname = tar.TypeLink, first
				break
			}
			if st.Nlink > 1 {
				firstName[key] = hdr.Name
			}
			hdr.Typeflag, hdr.Size, body = tar.TypeReg, fi.Size(), p
		default:
			skipped++
			return nil
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if body == "" {
			return nil
		}
		f, err := os.Open(body)
		if err != nil {
			return err
		}
		defer f.Close()
		// Exactly Size bytes: a file that changed size while packed
		// fails here rather than corrupting the stream.
		if n, err := io.Copy(tw, f); err != nil {
			return fmt.Errorf("%s: %w (after %d bytes)", p, err, n)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if skipped > 0 {
		log.Printf("left out %d device nodes, sockets or FIFOs under %s", skipped, dir)
	}
	return tw.Close()
}

func write(tag, out, entrypoint string, layers []v1.Layer) error {
	ref, err := name.NewTag(tag)
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	if entrypoint != "" {
		cfg.Config.Entrypoint = []string{entrypoint}
	}
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return err
	}
	return tarball.WriteToFile(out, ref, img)
}
