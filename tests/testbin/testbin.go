// Package testbin builds the cairn binary once per test binary, for the
// tests that run it as real processes.
package testbin

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Main builds cairn into a temporary directory, stores its path in *bin,
// runs the tests and removes the directory. Call it from TestMain.
// buildFlags go to `go build` (e.g. -race).
func Main(m *testing.M, bin *string, buildFlags ...string) {
	dir, err := os.MkdirTemp("", "cairn-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*bin = filepath.Join(dir, "cairn")
	args := append([]string{"build", "-o", *bin}, buildFlags...)
	build := exec.Command("go", append(args, "github.com/cairn-csi/cairn/cmd/cairn")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build cairn:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
