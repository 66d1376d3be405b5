package localkube

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/mount-utils"
)

// CgroupRoot is kubelet's cgroupRoot: the pods' cgroups are made under it
// in every v1 hierarchy, so Cleanup knows which cgroups are the run's.
const CgroupRoot = "/cairn-e2e"

// Bridge is the CNI bridge the pods are attached to.
const Bridge = "cairne2e0"

// kernelSettings are the /proc/sys entries the run's programs rewrite:
// kubelet's (pkg/kubelet/cm's kernel tunables) and the bridge plugin's.
var kernelSettings = []string{
	"vm/overcommit_memory",
	"vm/panic_on_oom",
	"kernel/panic",
	"kernel/panic_on_oops",
	"kernel/keys/root_maxkeys",
	"kernel/keys/root_maxbytes",
	"net/ipv4/ip_forward",
}

// Cleanup undoes what a run in runDir left, whether it ended well or
// crashed: it stops the processes, unmounts, detaches loop devices, removes
// the pods' cgroups, the bridge, the NAT rules (service.go) and container
// log links, and writes back the kernel settings recorded before the run. It leaves the files in
// runDir (logs stay for a look) but removes the state file once done.
// Cleanup of a directory with no run is a no-op.
func Cleanup(runDir string) error {
	runDir = filepath.Clean(runDir)
	if _, err := os.Stat(runDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	st, err := loadState(runDir)
	if err != nil {
		return err
	}
	var errs []error
	// Containers first: they hold the volumes' mounts busy, and kubelet
	// and containerd are about to stop, so nothing restarts them.
	killCgroupProcs()
	// The recorded processes, newest first: the driver's helpers, kubelet,
	// the control plane, containerd.
	for i := len(st.Procs) - 1; i >= 0; i-- {
		stopPID(st.Procs[i].PID, runDir, 10*time.Second)
	}
	// What the recorded ones started and left: containerd's shims, the
	// node agents of a dev cluster under the run directory.
	for round := 0; round < 5; round++ {
		pids := pidsWithMarker(runDir)
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(200 * time.Millisecond)
	}
	killCgroupProcs()
	// Loop devices before mounts: once the filesystem holding a backing
	// file is unmounted (lazily, for a dead FUSE server), the device's
	// backing path no longer names the run directory. A device still in
	// use (mounted) is only marked to detach when its last user closes it.
	loops, err := detachLoopsUnder(runDir)
	if err != nil {
		errs = append(errs, err)
	}
	if err := unmountUnder(runDir); err != nil {
		errs = append(errs, err)
	}
	if err := waitLoopsGone(loops); err != nil {
		errs = append(errs, err)
	}
	if err := removeCgroups(); err != nil {
		errs = append(errs, err)
	}
	if _, err := net.InterfaceByName(Bridge); err == nil {
		if out, err := exec.Command("ip", "link", "delete", Bridge).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip link delete %s: %v: %s", Bridge, err, out))
		}
	}
	if err := removeServiceRoute(); err != nil {
		errs = append(errs, err)
	}
	if err := removeLogLinks(runDir); err != nil {
		errs = append(errs, err)
	}
	for key, val := range st.Sysctls {
		if err := os.WriteFile(filepath.Join("/proc/sys", key), []byte(val+"\n"), 0o644); err != nil {
			errs = append(errs, fmt.Errorf("restore %s=%s: %w", key, val, err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := os.Remove(filepath.Join(runDir, stateFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// recordSysctls saves each kernel setting's current value in the state, if
// it has none yet: after a crash the state file holds the values from
// before the crashed run, which are the ones to restore.
func (s *state) recordSysctls() error {
	if s.Sysctls == nil {
		s.Sysctls = map[string]string{}
	}
	for _, key := range kernelSettings {
		if _, ok := s.Sysctls[key]; ok {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc/sys", key))
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		s.Sysctls[key] = strings.TrimSpace(string(b))
	}
	return nil
}

// cgroupDirs lists the run's cgroup directories in every hierarchy,
// parents before children.
func cgroupDirs() []string {
	roots, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", CgroupRoot))
	var dirs []string
	for _, root := range roots {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
	}
	return dirs
}

// killCgroupProcs kills every process in the run's cgroups: the pods'
// containers and sandboxes.
func killCgroupProcs() {
	for round := 0; round < 5; round++ {
		found := false
		for _, d := range cgroupDirs() {
			b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			if err != nil {
				continue
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
					_ = syscall.Kill(pid, syscall.SIGKILL)
					found = true
				}
			}
		}
		if !found {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// removeCgroups removes the run's cgroups, children first.
func removeCgroups() error {
	dirs := cgroupDirs()
	slices.Reverse(dirs)
	var errs []error
	for _, d := range dirs {
		var err error
		// A cgroup whose last process just died may still be busy for
		// a moment.
		for i := 0; i < 20; i++ {
			if err = syscall.Rmdir(d); err == nil || errors.Is(err, syscall.ENOENT) {
				err = nil
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("rmdir %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// A Mount is one entry of /proc/self/mountinfo, its paths unescaped.
type Mount struct{ Point, FSType, Source string }

// MountsUnder lists the mounts at or below dir, in mount order. The
// parsing is k8s.io/mount-utils'; it leaves mountinfo's octal escapes
// (\040 for a space) in, so they are undone here.
func MountsUnder(dir string) ([]Mount, error) {
	infos, err := mount.ParseMountInfo("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []Mount
	for _, mi := range infos {
		mp := unescapeMount(mi.MountPoint)
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, Mount{Point: mp, FSType: mi.FsType, Source: unescapeMount(mi.Source)})
		}
	}
	return out, nil
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountUnder unmounts everything at or below dir, newest first, lazily
// where a plain unmount fails.
func unmountUnder(dir string) error {
	var last []string
	for round := 0; round < 10; round++ {
		mounts, err := MountsUnder(dir)
		if err != nil {
			return err
		}
		if len(mounts) == 0 {
			return nil
		}
		last = nil
		slices.Reverse(mounts)
		for _, m := range mounts {
			if err := syscall.Unmount(m.Point, 0); err != nil {
				if err := syscall.Unmount(m.Point, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
					last = append(last, fmt.Sprintf("%s: %v", m.Point, err))
				}
			}
		}
	}
	mounts, _ := MountsUnder(dir)
	if len(mounts) > 0 {
		var points []string
		for _, m := range mounts {
			points = append(points, m.Point)
		}
		return fmt.Errorf("still mounted under %s: %s (%s)", dir, strings.Join(points, ", "), strings.Join(last, "; "))
	}
	return nil
}

// detachLoopsUnder detaches the loop devices whose backing file lies
// under dir, and returns them. The kernel detaches a device that is still
// open or mounted when its last user goes (it sets autoclear).
func detachLoopsUnder(dir string) ([]string, error) {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var errs []error
	var devs []string
	for _, bf := range files {
		back, err := os.ReadFile(bf)
		if err != nil {
			continue
		}
		b := strings.TrimSuffix(strings.TrimSpace(string(back)), " (deleted)")
		if !strings.HasPrefix(b, dir+"/") {
			continue
		}
		dev := "/dev/" + filepath.Base(filepath.Dir(filepath.Dir(bf)))
		devs = append(devs, dev)
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("losetup -d %s (%s): %v: %s", dev, b, err, out))
		}
	}
	return devs, errors.Join(errs...)
}

// waitLoopsGone waits a little for the kernel to detach devs (after the
// unmounts that released them), and names those still attached.
func waitLoopsGone(devs []string) error {
	var left []string
	for i := 0; i < 50; i++ {
		left = left[:0]
		for _, d := range devs {
			if _, err := os.Stat(filepath.Join("/sys/block", filepath.Base(d), "loop", "backing_file")); err == nil {
				left = append(left, d)
			}
		}
		if len(left) == 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("loop devices still attached after the unmounts: %s", strings.Join(left, ", "))
}

// containerLogDir is where kubelet links each container's log (a constant
// in kubelet, not configurable).
const containerLogDir = "/var/log/containers"

// removeLogLinks removes kubelet's links in containerLogDir that point
// into runDir.
func removeLogLinks(runDir string) error {
	ents, err := os.ReadDir(containerLogDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		p := filepath.Join(containerLogDir, e.Name())
		target, err := os.Readlink(p)
		if err != nil || !strings.HasPrefix(target, runDir+"/") {
			continue
		}
		if err := os.Remove(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
