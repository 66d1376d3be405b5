//go:build linux

package fuse

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/internal/fdhold"
)

// The mechanism of docs/restart.md, proved on this kernel with go-fuse:
// a FUSE connection outlives its server (SIGKILL) while a holder process
// keeps a duplicate of its /dev/fuse descriptor, and a new server that
// takes the descriptor back, asks the kernel to resend what the dead one
// had read, and serves the connection through go-fuse's /dev/fd/N mount
// point answers the request a reader was blocked in. Not yet what the node
// agent does: it still mounts through go-fuse (Mount).

// handoverChildEnv makes the test binary the server that is killed
// (TestMain): "SOCKET DIR".
const handoverChildEnv = "CAIRN_FUSE_HANDOVER_CHILD"

const (
	handoverSize     = 1 << 20
	handoverMaxWrite = 128 << 10 // the same in both servers: the kernel sized its buffers to it
	handoverNode     = 2         // the file's node id, the same in both servers
)

// handoverFS is a file system of one file, "f", whose byte i is
// handoverByte(i). A blocking one never answers a read: it reports the
// read's offset on stdout and waits to be killed.
type handoverFS struct {
	gofuse.RawFileSystem
	blocking bool
}

func handoverByte(i uint64) byte { return byte(i*7 + i>>12) }

func (fs *handoverFS) attr(node uint64, a *gofuse.Attr) gofuse.Status {
	switch node {
	case gofuse.FUSE_ROOT_ID:
		a.Ino, a.Mode, a.Nlink = node, syscall.S_IFDIR|0o755, 2
	case handoverNode:
		a.Ino, a.Mode, a.Nlink, a.Size = node, syscall.S_IFREG|0o644, 1, handoverSize
	default:
		return gofuse.ENOENT
	}
	return gofuse.OK
}

func (fs *handoverFS) Lookup(_ <-chan struct{}, h *gofuse.InHeader, name string, out *gofuse.EntryOut) gofuse.Status {
	if h.NodeId != gofuse.FUSE_ROOT_ID || name != "f" {
		return gofuse.ENOENT
	}
	out.NodeId = handoverNode
	out.SetEntryTimeout(time.Hour)
	out.SetAttrTimeout(time.Hour)
	return fs.attr(handoverNode, &out.Attr)
}

func (fs *handoverFS) GetAttr(_ <-chan struct{}, in *gofuse.GetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	out.SetTimeout(time.Hour)
	return fs.attr(in.NodeId, &out.Attr)
}

func (fs *handoverFS) Open(_ <-chan struct{}, in *gofuse.OpenIn, out *gofuse.OpenOut) gofuse.Status {
	out.Fh = 1
	out.OpenFlags = gofuse.FOPEN_DIRECT_IO // every read reaches the server
	return gofuse.OK
}

func (fs *handoverFS) Read(_ <-chan struct{}, in *gofuse.ReadIn, buf []byte) (gofuse.ReadResult, gofuse.Status) {
	if fs.blocking {
		fmt.Printf("read %d\n", in.Offset)
		select {} // until SIGKILL
	}
	n := min(uint64(in.Size), handoverSize-min(in.Offset, handoverSize))
	for i := range n {
		buf[i] = handoverByte(in.Offset + i)
	}
	return gofuse.ReadResultData(buf[:n]), gofuse.OK
}

func handoverOptions() *gofuse.MountOptions {
	return &gofuse.MountOptions{MaxWrite: handoverMaxWrite, DisableXAttrs: true, DisableSplice: true, DisableReadDirPlus: true}
}

// handoverChild is the first server: it opens /dev/fuse and mounts DIR
// itself (so that it has the descriptor), gives a duplicate to the holder
// at SOCKET, serves through go-fuse and blocks in the first read.
func handoverChild(arg string) {
	sock, dir, ok := strings.Cut(arg, " ")
	fail := func(err error) {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	if !ok {
		fail(fmt.Errorf("%s=%q: want SOCKET DIR", handoverChildEnv, arg))
	}
	dev, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		fail(err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other,max_read=%d", dev.Fd(), handoverMaxWrite)
	if err := unix.Mount("cairn-handover", dir, "fuse.cairn-handover", 0, data); err != nil {
		fail(fmt.Errorf("mount: %w", err))
	}
	c, err := fdhold.Dial(sock)
	if err != nil {
		fail(err)
	}
	if err := c.Put("vol", dev, nil); err != nil {
		fail(err)
	}
	srv, err := gofuse.NewServer(&handoverFS{RawFileSystem: gofuse.NewDefaultRawFileSystem(), blocking: true},
		"/dev/fd/"+strconv.Itoa(int(dev.Fd())), handoverOptions())
	if err != nil {
		fail(err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		fail(err)
	}
	fmt.Println("mounted")
	select {}
}

// writeResend asks the kernel to put the requests that the connection's
// dead server had read back in the queue (FUSE_NOTIFY_RESEND, Linux 6.9):
// a notification is a fuse_out_header with unique 0 and the code in error.
func writeResend(dev *os.File) error {
	const notifyResend = 7
	var h [16]byte
	binary.LittleEndian.PutUint32(h[0:], 16)
	binary.LittleEndian.PutUint32(h[4:], notifyResend)
	_, err := dev.Write(h[:])
	return err
}

// TestFUSEConnectionSurvivesServerKill: a reader blocked in a read that the
// server had taken when it was killed gets its data from the next server.
func TestFUSEConnectionSurvivesServerKill(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "holder.sock")
	l, err := fdhold.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	holder := fdhold.New(zap.NewNop())
	served := make(chan error, 1)
	go func() { served <- holder.Serve(l) }()
	t.Cleanup(func() {
		_ = l.Close()
		<-served
		_ = holder.Close()
	})
	unmounted := false
	t.Cleanup(func() {
		if !unmounted {
			_ = unix.Unmount(mnt, unix.MNT_DETACH) // a failed test leaves no mount
		}
	})

	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), handoverChildEnv+"="+sock+" "+mnt)
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = child.Process.Kill()
			_ = child.Wait()
		}
	})
	lines := make(chan string, 8)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	expect := func(prefix string) string {
		t.Helper()
		select {
		case line, ok := <-lines:
			if !ok || !strings.HasPrefix(line, prefix) {
				t.Fatalf("first server said %q (open %v), want %q", line, ok, prefix)
			}
			return line
		case <-time.After(30 * time.Second):
			t.Fatalf("first server: no %q within 30 s", prefix)
		}
		return ""
	}
	expect("mounted")

	const off = 3 * 4096
	type result struct {
		b   []byte
		err error
	}
	got := make(chan result, 1)
	go func() {
		f, err := os.Open(filepath.Join(mnt, "f"))
		if err != nil {
			got <- result{err: err}
			return
		}
		b := make([]byte, 4096)
		n, err := f.ReadAt(b, off)
		_ = f.Close() // before the result: the unmount must find it closed
		got <- result{b[:n], err}
	}()
	if line := expect("read "); line != "read "+strconv.Itoa(off) {
		t.Fatalf("first server read %q, want offset %d", line, off)
	}
	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = child.Wait()
	killed = true
	select {
	case r := <-got:
		t.Fatalf("the read ended when its server was killed (%d bytes, %v): the held descriptor did not keep the connection", len(r.b), r.err)
	case <-time.After(300 * time.Millisecond):
	}

	c, err := fdhold.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dev, _, err := c.Get("vol")
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	if err := writeResend(dev); err != nil {
		t.Fatalf("FUSE_NOTIFY_RESEND: %v", err)
	}
	// go-fuse closes the descriptor it serves when its loop ends: it gets
	// a duplicate of its own. NewServer reads the first request (the
	// resent read) before it returns: no INIT comes on a connection that
	// had one.
	own, err := unix.Dup(int(dev.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := gofuse.NewServer(&handoverFS{RawFileSystem: gofuse.NewDefaultRawFileSystem()},
		"/dev/fd/"+strconv.Itoa(own), handoverOptions())
	if err != nil {
		_ = unix.Close(own)
		t.Fatal(err)
	}
	serveDone := make(chan struct{})
	go func() {
		defer close(serveDone)
		srv.Serve()
	}()
	select {
	case r := <-got:
		want := make([]byte, 4096)
		for i := range want {
			want[i] = handoverByte(off + uint64(i))
		}
		if r.err != nil || !bytes.Equal(r.b, want) {
			t.Fatalf("the resent read returned %d bytes, %v; want the second server's 4096 bytes", len(r.b), r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the read was not answered by the second server within 30 s")
	}

	// Unmounting ends the connection; both servers' loops see it.
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatalf("unmount: %v", err)
	}
	unmounted = true
	select {
	case <-serveDone:
	case <-time.After(30 * time.Second):
		t.Fatal("the second server did not stop after the unmount")
	}
	if err := c.Drop("vol"); err != nil {
		t.Fatal(err)
	}
}
