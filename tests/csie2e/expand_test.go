package csie2e

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// expandCase is one volume grown online: a file system (ext4, xfs) or a
// raw block device.
type expandCase struct {
	name     string
	fsType   string // "" for raw block
	from, to int64
	vc       *csipb.VolumeCapability

	id, staging, target string
	sums                map[string][32]byte // files, for a file system
	model               []byte              // the device's first bytes, for raw block
	// fsStays: the file system cannot grow while mounted here (ext4
	// without CAP_SYS_RESOURCE, see canGrowMounted): only its device is
	// checked to grow, and NodeExpandVolume to say why the rest did not.
	fsStays bool
}

// canGrowMounted reports whether a mounted file system of type fsType can
// grow in this environment. ext4 grows online only for a process with
// CAP_SYS_RESOURCE (the kernel answers EPERM otherwise, root or not); some
// containers run without it.
func canGrowMounted(fsType string) bool {
	if fsType != "ext4" {
		return true
	}
	var data [2]unix.CapUserData
	if err := unix.Capget(&unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}, &data[0]); err != nil {
		return false
	}
	return data[unix.CAP_SYS_RESOURCE/32].Effective&(1<<(unix.CAP_SYS_RESOURCE%32)) != 0
}

// mountedDevice returns the device mounted at path (/proc/self/mountinfo).
func mountedDevice(t *testing.T, path string) string {
	t.Helper()
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		for i, x := range f {
			if x == "-" && len(f) > i+2 && len(f) > 4 && f[4] == path {
				return f[i+2]
			}
		}
	}
	t.Fatalf("nothing is mounted at %s", path)
	return ""
}

func fsCap(fsType string) *csipb.VolumeCapability {
	return &csipb.VolumeCapability{
		AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}
}

var blockCap = &csipb.VolumeCapability{
	AccessType: &csipb.VolumeCapability_Block{Block: &csipb.VolumeCapability_BlockVolume{}},
	AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
}

// attachAs publishes, stages and publishes volume id on node with vc; it
// returns the staging and target paths.
func (c *cluster) attachAs(id, node string, vc *csipb.VolumeCapability) (staging, target string) {
	c.t.Helper()
	return c.attachWith(id, node, vc, nil)
}

// attachWith is attachAs with the CSI secrets of NodeStageVolume (an
// encrypted volume's passphrase).
func (c *cluster) attachWith(id, node string, vc *csipb.VolumeCapability, secrets map[string]string) (staging, target string) {
	t := c.t
	t.Helper()
	staging = filepath.Join(c.dir, "kubelet", node, "staging", id)
	target = filepath.Join(c.dir, "kubelet", node, "target", id)
	if _, err := c.controller.ControllerPublishVolume(ctx(t), &csipb.ControllerPublishVolumeRequest{VolumeId: id, NodeId: node, VolumeCapability: vc}); err != nil {
		t.Fatalf("ControllerPublishVolume on %s: %v", node, err)
	}
	if _, err := c.nodes[node].NodeStageVolume(ctx(t), &csipb.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc, Secrets: secrets}); err != nil {
		t.Fatalf("NodeStageVolume on %s: %v", node, err)
	}
	if _, err := c.nodes[node].NodePublishVolume(ctx(t), &csipb.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
		t.Fatalf("NodePublishVolume on %s: %v", node, err)
	}
	return staging, target
}

// deviceSize is the size of the block device at path (BLKGETSIZE64), what
// blockdev --getsize64 prints.
func deviceSize(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // read-only: nothing to lose
	var size uint64
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size))); errno != 0 {
		t.Fatalf("BLKGETSIZE64 %s: %v", path, errno)
	}
	return int64(size)
}

// fsSize is the size statfs (df) gives the file system at path.
func fsSize(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// checkSize fails unless the volume as its user sees it has grown to about
// want: the device exactly, a file system to within its own overhead.
func (x *expandCase) checkSize(t *testing.T, want int64) {
	t.Helper()
	if x.fsType == "" || x.fsStays {
		dev := x.target
		if x.fsStays {
			dev = mountedDevice(t, x.staging)
		}
		if got := deviceSize(t, dev); got != want {
			t.Fatalf("%s: block device %s is %d bytes, want %d", x.name, dev, got, want)
		}
		if !x.fsStays {
			return
		}
		want = x.from // the file system itself keeps its size
	}
	// A small file system keeps a fifth or so for itself (ext4 at 128 MiB:
	// inode tables, journal), xfs less; every size here at least doubles.
	got := fsSize(t, x.target)
	if got > want || got < want*3/4 {
		t.Fatalf("%s: file system is %d bytes (df), want about %d", x.name, got, want)
	}
}

// readDirect reads n bytes at off of the device at path past the page
// cache (O_DIRECT), so that what the volume holds is what is compared.
func readDirect(t *testing.T, path string, off, n int64) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close() // read-only
	buf := alignedBuf(int(n))
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatalf("read %d bytes at %d of %s: %v", n, off, path, err)
	}
	return buf
}

// alignedBuf returns n bytes aligned to 4 KiB, as O_DIRECT wants.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	skip := int((4096 - uintptr(unsafe.Pointer(&b[0]))%4096) % 4096)
	return b[skip : skip+n]
}

// writer keeps writing while a volume grows: small fsynced files on a file
// system, 64 KiB blocks below the old end of a raw device. It records
// what it wrote in x.
type writer struct {
	stop chan struct{}
	done chan error
	n    int
}

func (x *expandCase) startWriter(t *testing.T, seed uint64) *writer {
	w := &writer{stop: make(chan struct{}), done: make(chan error, 1)}
	var mu sync.Mutex
	go func() {
		rng := rand.New(rand.NewPCG(seed, seed))
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				w.done <- nil
				return
			default:
			}
			b := make([]byte, 64<<10)
			for j := range b {
				b[j] = byte(rng.Uint32())
			}
			var err error
			if x.fsType != "" {
				name := fmt.Sprintf("during-%04d", i)
				err = writeFile(filepath.Join(x.target, name), b)
				if err == nil {
					mu.Lock()
					x.sums[name] = sha256.Sum256(b)
					mu.Unlock()
				}
			} else {
				off := int64(rng.IntN(int(x.from/int64(len(b))))) * int64(len(b))
				err = writeAt(x.target, b, off)
				if err == nil {
					copy(x.model[off:], b)
				}
			}
			if err != nil {
				w.done <- fmt.Errorf("%s: write %d while growing: %w", x.name, i, err)
				return
			}
			w.n++
		}
	}()
	return w
}

func (w *writer) finish(t *testing.T) {
	t.Helper()
	close(w.stop)
	if err := <-w.done; err != nil {
		t.Fatal(err)
	}
	if w.n == 0 {
		t.Fatal("the writer wrote nothing while the volume grew: the test proves nothing")
	}
}

// writeFile creates the file at path holding b, durably.
func writeFile(path string, b []byte) error {
	return writeSynced(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, b, 0)
}

// writeAt writes b at off of the raw device at path, durably.
func writeAt(path string, b []byte, off int64) error {
	return writeSynced(path, os.O_RDWR, b, off)
}

// writeSynced opens path with flag, writes b at off and fsyncs.
func writeSynced(path string, flag int, b []byte, off int64) error {
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(b, off); err != nil {
		_ = f.Close() // the write error is the one to report
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

// checkData fails unless everything written before and during the growth
// reads back as written.
func (x *expandCase) checkData(t *testing.T) {
	t.Helper()
	if x.fsType != "" {
		checkFiles(t, x.target, x.sums)
		return
	}
	if got := readDirect(t, x.target, 0, x.from); !bytes.Equal(got, x.model) {
		t.Fatalf("%s: the device's first %d bytes changed", x.name, x.from)
	}
}

// checkNewRange writes past the old end: a file larger than the whole old
// volume (fallocate: the blocks are the file system's, no data moves), or
// the device's last MiB.
func (x *expandCase) checkNewRange(t *testing.T) {
	t.Helper()
	if x.fsStays {
		return
	}
	if x.fsType != "" {
		p := filepath.Join(x.target, "past-the-old-end")
		if out, err := exec.Command("fallocate", "-l", fmt.Sprint(x.from), p).CombinedOutput(); err != nil {
			t.Fatalf("%s: fallocate %d bytes after growing from %d: %v\n%s", x.name, x.from, x.from, err, out)
		}
		return
	}
	b := bytes.Repeat([]byte{0xc3}, 1<<20)
	if err := writeAt(x.target, b, x.to-int64(len(b))); err != nil {
		t.Fatal(err)
	}
	if got := readDirect(t, x.target, x.to-int64(len(b)), int64(len(b))); !bytes.Equal(got, b) {
		t.Fatalf("%s: the device's last MiB does not read back", x.name)
	}
}

// TestExpandOnline grows an ext4, an xfs and a raw block volume while a
// writer runs on each, through CSI as the resizer and kubelet do
// (ControllerExpandVolume, then NodeExpandVolume on the node that has it
// mounted). The new size is visible (df, BLKGETSIZE64), the new range
// takes data, everything written before and during the growth is intact,
// and a restart of the node agent keeps the new size (an ext4 that could
// not grow mounted grows as it is staged again). Shrinking is refused and
// changes nothing.
func TestExpandOnline(t *testing.T) {
	c := startCluster(t)
	cases := []*expandCase{
		{name: "ext4", fsType: "ext4", from: 128 << 20, to: 384 << 20},
		{name: "xfs", fsType: "xfs", from: 320 << 20, to: 640 << 20}, // mkfs.xfs wants 300 MiB at least
		{name: "block", from: 64 << 20, to: 192 << 20},
	}
	for i, x := range cases {
		x.vc = blockCap
		if x.fsType != "" {
			x.vc = fsCap(x.fsType)
		}
		if !canGrowMounted(x.fsType) {
			x.fsStays = true
			t.Logf("%s: this process lacks CAP_SYS_RESOURCE, without which the kernel refuses to grow a mounted ext4: "+
				"the replicas, the engine, the FUSE file and the loop device are checked to grow, the file system to stay intact", x.name)
		}
		resp, err := c.controller.CreateVolume(ctx(t), &csipb.CreateVolumeRequest{
			Name: "e2e-expand-" + x.name, CapacityRange: &csipb.CapacityRange{RequiredBytes: x.from},
			VolumeCapabilities: []*csipb.VolumeCapability{x.vc}, Parameters: map[string]string{"replicas": "3"},
		})
		if err != nil {
			t.Fatal(err)
		}
		x.id = resp.GetVolume().GetVolumeId()
		x.staging, x.target = c.attachAs(x.id, "node-1", x.vc)
		x.sums = map[string][32]byte{}
		if x.fsType != "" {
			writeFiles(t, x.target, "before", 8, uint64(10+i), x.sums)
		} else {
			x.model = make([]byte, x.from)
			rng := rand.New(rand.NewPCG(uint64(20+i), 1))
			for j := range x.model[:16<<20] {
				x.model[j] = byte(rng.Uint32())
			}
			if err := writeAt(x.target, x.model[:16<<20], 0); err != nil {
				t.Fatal(err)
			}
		}
		x.checkSize(t, x.from)
	}

	for _, x := range cases {
		t.Run(x.name, func(t *testing.T) {
			w := x.startWriter(t, uint64(len(x.name)))
			time.Sleep(200 * time.Millisecond)
			cr, err := c.controller.ControllerExpandVolume(ctx(t), &csipb.ControllerExpandVolumeRequest{
				VolumeId: x.id, CapacityRange: &csipb.CapacityRange{RequiredBytes: x.to}, VolumeCapability: x.vc})
			if err != nil {
				t.Fatalf("ControllerExpandVolume: %v", err)
			}
			if cr.GetCapacityBytes() != x.to || !cr.GetNodeExpansionRequired() {
				t.Fatalf("ControllerExpandVolume: %v; want %d bytes and node expansion", cr, x.to)
			}
			nr, err := c.nodes["node-1"].NodeExpandVolume(ctx(t), &csipb.NodeExpandVolumeRequest{
				VolumeId: x.id, VolumePath: x.target, StagingTargetPath: x.staging,
				CapacityRange: &csipb.CapacityRange{RequiredBytes: x.to}, VolumeCapability: x.vc})
			switch {
			case x.fsStays:
				if err == nil || !strings.Contains(err.Error(), "CAP_SYS_RESOURCE") {
					t.Fatalf("NodeExpandVolume of a mounted ext4 without CAP_SYS_RESOURCE: %v, want an error that names it", err)
				}
			case err != nil:
				t.Fatalf("NodeExpandVolume: %v", err)
			case nr.GetCapacityBytes() != x.to:
				t.Fatalf("NodeExpandVolume: %v, want %d bytes", nr, x.to)
			}
			time.Sleep(200 * time.Millisecond)
			w.finish(t)
			x.checkSize(t, x.to)
			x.checkData(t)
			x.checkNewRange(t)

			// Shrinking: refused with a clear error, nothing changes.
			_, err = c.controller.ControllerExpandVolume(ctx(t), &csipb.ControllerExpandVolumeRequest{
				VolumeId: x.id, CapacityRange: &csipb.CapacityRange{RequiredBytes: x.from, LimitBytes: x.from}})
			if status.Code(err) != codes.OutOfRange {
				t.Fatalf("ControllerExpandVolume to the old size with that limit: %v, want OutOfRange", err)
			}
			out, err := cairnCmd("ctl", "--server", c.agents, "volume", "expand", x.id, "--size", fmt.Sprint(x.from)).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "never shrink") {
				t.Fatalf("ctl volume expand to a smaller size: %v\n%s\nwant a refusal that says volumes never shrink", err, out)
			}
			x.checkSize(t, x.to)

			if x.fsType == "" {
				// Grown by the operator: the engine follows the store at
				// once; the device at the next NodeExpandVolume.
				more := x.to + 64<<20
				out := cairn(t, "ctl", "--server", c.agents, "volume", "expand", x.id, "--size", fmt.Sprint(more))
				if !strings.Contains(out, "expanded volume "+x.id) {
					t.Fatalf("ctl volume expand: %s", out)
				}
				if _, err := c.nodes["node-1"].NodeExpandVolume(ctx(t), &csipb.NodeExpandVolumeRequest{
					VolumeId: x.id, VolumePath: x.target, CapacityRange: &csipb.CapacityRange{RequiredBytes: more}}); err != nil {
					t.Fatalf("NodeExpandVolume after ctl volume expand: %v", err)
				}
				x.to = more
				x.checkSize(t, x.to)
				x.checkData(t)
			}
		})
	}
	if t.Failed() {
		return
	}

	// The node agent restarts: staged again, every volume has its new size
	// and its data.
	for _, x := range cases {
		c.detach(x.id, "node-1", x.staging, x.target)
	}
	cairn(t, "dev", "kill", "--dir", c.dir, "node-1")
	cairn(t, "dev", "start", "--dir", c.dir, "node-1")
	for _, x := range cases {
		x.staging, x.target = c.attachAs(x.id, "node-1", x.vc)
		// An ext4 that could not grow mounted grows when staged: before
		// it is mounted, which needs no CAP_SYS_RESOURCE
		// (driver/csi/fsgrow.go).
		x.fsStays = false
		x.checkSize(t, x.to)
		x.checkData(t)
	}
	for _, x := range cases {
		c.detach(x.id, "node-1", x.staging, x.target)
		cairn(t, "ctl", "--server", c.agents, "volume", "verify", x.id)
	}
}
