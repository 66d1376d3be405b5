package proc

import (
	"os/exec"
	"testing"
)

func TestClassify(t *testing.T) {
	const marker = "\x00--id\x00node-1\x00"
	agent := []byte("/usr/local/bin/cairn\x00node\x00--id\x00node-1\x00--data-dir\x00/d\x00")
	another := []byte("/usr/local/bin/cairn\x00node\x00--id\x00node-2\x00")
	// Fields 3 to 20 of /proc/PID/stat: state ppid pgrp session tty_nr
	// tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
	// priority nice num_threads.
	statN := func(state, flags, threads string) []byte {
		return []byte("4242 (cairn (x)) " + state + " 1 4242 4242 0 -1 " + flags + " 0 0 0 0 5 3 0 0 20 0 " + threads + " 0 123")
	}
	stat := func(state, flags string) []byte { return statN(state, flags, "1") }
	for _, tc := range []struct {
		name          string
		stat, cmdline []byte
		want          state
	}{
		{"running agent", stat("S", "4194560"), agent, running},
		{"another process on the PID", stat("S", "4194560"), another, other},
		{"zombie", stat("Z", "4227084"), nil, gone},
		{"dead", stat("X", "4227084"), nil, gone},
		{"zombie main thread, other threads still exiting", statN("Z", "4227084", "3"), nil, exiting},
		// Memory (and the command line) released, files not yet closed.
		{"exiting, files still open", stat("D", "4194564"), nil, exiting},
		{"a kernel thread on the PID", stat("I", "69238880"), nil, other},
		{"garbled stat", []byte("4242 cairn S"), agent, gone},
	} {
		if got := classify(tc.stat, tc.cmdline, marker); got != tc.want {
			t.Errorf("%s: classify = %d, want %d", tc.name, got, tc.want)
		}
	}
}

// TestHoldsAndRuns on a real process (sh, with the marker as its $0):
// found by its marker while it runs,
// not by another marker, gone once it is reaped.
func TestHoldsAndRuns(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 30; :", "proc-test-marker")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	const marker = "\x00proc-test-marker\x00"
	if !Holds(pid, marker) || !Runs(pid, marker) {
		t.Errorf("running child %d: Holds %v, Runs %v; want both", pid, Holds(pid, marker), Runs(pid, marker))
	}
	if Holds(pid, "\x00something-else\x00") {
		t.Error("Holds with another marker: a reused PID would be taken for ours")
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if Holds(pid, marker) || Runs(pid, marker) {
		t.Errorf("reaped child %d still counts as there", pid)
	}
}
