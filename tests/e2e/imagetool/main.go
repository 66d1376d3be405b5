// Command imagetool writes a single-layer container image as a
// docker-archive tarball (what `ctr images import` reads) from files on
// this machine, so the e2e cluster never pulls from a registry.
//
//	imagetool -tag e2e.local/busybox:1 -out busybox.tar \
//	  -file /bin/busybox=/bin/busybox -busybox /bin/busybox -entrypoint /bin/sh
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var files list
	tag := flag.String("tag", "", "image reference to record in the archive (required)")
	out := flag.String("out", "", "docker-archive tarball to write (required)")
	entrypoint := flag.String("entrypoint", "", "the image's entrypoint, a path in the image")
	busybox := flag.String("busybox", "", "path in the image of a busybox binary: add a symlink to it for each of its applets")
	flag.Var(&files, "file", "HOST=IMAGE: copy the host file HOST to IMAGE, keeping its mode (repeatable)")
	flag.Parse()
	if *tag == "" || *out == "" {
		log.Fatal("-tag and -out are required")
	}
	layer, err := layerTar(files, *busybox)
	if err != nil {
		log.Fatal(err)
	}
	if err := write(*tag, *out, *entrypoint, layer); err != nil {
		log.Fatal(err)
	}
}

// layerTar builds the layer: the files, their parent directories, /tmp,
// and busybox's applet links.
func layerTar(files []string, busybox string) ([]byte, error) {
	type entry struct {
		hdr  *tar.Header
		body []byte
	}
	// A fixed time keeps the image id stable from one build to the next.
	epoch := time.Unix(0, 0)
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
	entries["/tmp"] = entry{hdr: &tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777, ModTime: epoch}}
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
		addDirs(img)
		entries[img] = entry{hdr: &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(img, "/"), Mode: int64(st.Mode().Perm()), Size: int64(len(b)), ModTime: epoch}, body: b}
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

func write(tag, out, entrypoint string, layerBytes []byte) error {
	ref, err := name.NewTag(tag)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	})
	if err != nil {
		return err
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
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
