package replica

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// childEnv names what a re-executed test binary does instead of running
// the tests: "delete-snapshot DIR ID", the child of
// TestKillDuringSnapshotDeletion, "flatten DIR REPLICA LAYER", the child of
// TestKillDuringFlatten, or "write-unflushed DIR", the child of
// TestKillKeepsUnflushedWrites.
const childEnv = "CAIRN_REPLICA_TEST_CHILD"

// runChild plays the child process of a crash test and returns its exit
// code. It prints "step N" after each step, for the parent to kill it at.
func runChild(what string) int {
	f := strings.Fields(what)
	if len(f) == 2 && f[0] == "write-unflushed" {
		return writeUnflushed(f[1])
	}
	if len(f) == 4 && f[0] == "flatten" {
		return flattenChild(f[1], f[2], f[3])
	}
	if len(f) != 3 || f[0] != "delete-snapshot" {
		fmt.Fprintln(os.Stderr, "unknown child:", what)
		return 2
	}
	r, err := Open(f[1], "r1", 0, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return childDone(r.DeleteSnapshot(1, f[2], printSteps()))
}

// printSteps returns a progress function that prints "step N" at each call,
// then pauses, leaving the parent time to kill the child mid-way.
func printSteps() func(done, total uint64) {
	step := 0
	return func(done, total uint64) {
		step++
		fmt.Printf("step %d\n", step)
		time.Sleep(20 * time.Millisecond)
	}
}

// childDone reports how a child's work ended, as its exit code.
func childDone(err error) int {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("done")
	return 0
}

// flattenChild flattens replica id under dir into layer layerID, printing
// "step N" after each step (the child of TestKillDuringFlatten).
func flattenChild(dir, id, layerID string) int {
	r, err := Open(dir, id, 0, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return childDone(r.Flatten(context.Background(), layerID, printSteps()))
}

// killChildAt runs a child of this test binary doing what (see childEnv)
// and kills it (SIGKILL) once it prints the line at.
func killChildAt(t *testing.T, what, at string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+what)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := bufio.NewScanner(out)
	killed := false
	for lines.Scan() {
		if lines.Text() == at {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed = true
			break
		}
	}
	err = cmd.Wait()
	if !killed {
		t.Fatalf("the child did not reach %q (%v): %s", at, err, stderr.String())
	}
}

// TestKillDuringSnapshotDeletion: a process deleting a snapshot is killed
// (SIGKILL) partway; the replica, opened again, reads as before (the head
// and the other snapshot), the snapshot is no longer listed but its layer
// is still there, and a new deletion finishes the work.
func TestKillDuringSnapshotDeletion(t *testing.T) {
	const size = 64 << 20 // 16 merge steps
	dir := t.TempDir()
	r, err := OpenWith(dir, "r1", size, 0, CreateOptions{Checksums: true})
	if err != nil {
		t.Fatal(err)
	}
	claimed(t, r, 1)
	head := make([]byte, size)
	write := func(p []byte, off int) {
		if err := r.WriteAt(1, p, uint64(off), false); err != nil {
			t.Fatal(err)
		}
		copy(head[off:], p)
	}
	write(randBytes(size, 40), 0)
	if err := r.Snapshot(1, "a"); err != nil {
		t.Fatal(err)
	}
	write(randBytes(size/2, 41), size/4+100)
	if err := r.Snapshot(1, "b"); err != nil {
		t.Fatal(err)
	}
	snapB := bytes.Clone(head)
	write(randBytes(size/4, 42), 3*size/4-7)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	killChildAt(t, "delete-snapshot "+dir+" a", "step 5")

	r, err = Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatalf("reopen after the kill: %v", err)
	}
	defer r.Close()
	check := func(when string) {
		t.Helper()
		if i := firstDiff(readAll(t, r, 1), head); i >= 0 {
			t.Fatalf("%s: the volume differs at byte %d", when, i)
		}
		if i := firstDiff(readSnap(t, r, "b"), snapB); i >= 0 {
			t.Fatalf("%s: snapshot b differs at byte %d", when, i)
		}
	}
	check("after the kill")
	// The deletion was recorded before anything was freed: "a" is gone
	// for readers although its layer is still there.
	if got := r.Snapshots(); strings.Join(got, ",") != "b" {
		t.Fatalf("after the kill: Snapshots() = %v, want b", got)
	}
	if got := r.chain.Len(); got != 3 {
		t.Fatalf("after the kill the chain has %d layers, want 3 (a, b, the head: the deletion did not finish)", got)
	}
	if err := r.DeleteSnapshot(1, "a", nil); err != nil {
		t.Fatalf("resumed deletion: %v", err)
	}
	check("after the resumed deletion")
	if got := r.Snapshots(); strings.Join(got, ",") != "b" {
		t.Fatalf("Snapshots() = %v, want b", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "r1", dataFileName)); !os.IsNotExist(err) {
		t.Fatalf("the deleted bottom layer's data file is still there: %v", err)
	}
}
