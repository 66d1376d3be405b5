package csi

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestFSOnDevice reads the size of real ext4 and xfs file systems, made
// by mkfs on image files, from their superblocks.
func TestFSOnDevice(t *testing.T) {
	for _, tc := range []struct {
		fsType string
		size   int64
		mkfs   []string
	}{
		{"ext4", 64 << 20, []string{"mkfs.ext4", "-q", "-F"}},
		{"xfs", 320 << 20, []string{"mkfs.xfs", "-q", "-f"}},
	} {
		t.Run(tc.fsType, func(t *testing.T) {
			if _, err := exec.LookPath(tc.mkfs[0]); err != nil {
				t.Skipf("%s is not installed (make test installs it): %v", tc.mkfs[0], err)
			}
			img := filepath.Join(t.TempDir(), "img")
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, tc.size); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command(tc.mkfs[0], append(tc.mkfs[1:], img)...).CombinedOutput(); err != nil {
				t.Fatalf("%v: %v\n%s", tc.mkfs, err, out)
			}
			fsType, size, err := fsOnDevice(img)
			if err != nil || fsType != tc.fsType || size == 0 || int64(size) > tc.size || int64(size) < tc.size*9/10 {
				t.Fatalf("fsOnDevice = %q, %d, %v; want %s of about %d bytes", fsType, size, err, tc.fsType, tc.size)
			}
			// The image grows; the file system has not yet.
			if err := os.Truncate(img, 2*tc.size); err != nil {
				t.Fatal(err)
			}
			if _, again, _ := fsOnDevice(img); again != size {
				t.Fatalf("size after the image grew: %d, want the file system's %d", again, size)
			}
		})
	}
	blank := filepath.Join(t.TempDir(), "blank")
	if err := os.WriteFile(blank, make([]byte, 8192), 0o600); err != nil {
		t.Fatal(err)
	}
	if fsType, _, err := fsOnDevice(blank); err != nil || fsType != "" {
		t.Fatalf("a blank device: %q, %v; want no file system", fsType, err)
	}
}
