package main

import "testing"

func TestProcAlive(t *testing.T) {
	const marker = "\x00--id\x00node-1\x00"
	agent := []byte("/usr/local/bin/cairn\x00node\x00--id\x00node-1\x00--data-dir\x00/d\x00")
	other := []byte("/usr/local/bin/cairn\x00node\x00--id\x00node-2\x00")
	// state ppid pgrp session tty tpgid flags ...
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
		want          bool
	}{
		{"running agent", stat("S", "4194560"), agent, true},
		{"another process on the PID", stat("S", "4194560"), other, false},
		{"zombie", stat("Z", "4227084"), nil, false},
		{"dead", stat("X", "4227084"), nil, false},
		{"zombie main thread, other threads still exiting", statN("Z", "4227084", "3"), nil, true},
		// Exiting: memory (and the command line) released, files not
		// yet closed: the ports and locks are still held.
		{"exiting, files still open", stat("D", "4194564"), nil, true},
		{"a kernel thread on the PID", stat("I", "69238880"), nil, false},
		{"garbled stat", []byte("4242 cairn S"), agent, false},
	} {
		if got := procAlive(tc.stat, tc.cmdline, marker); got != tc.want {
			t.Errorf("%s: procAlive = %v, want %v", tc.name, got, tc.want)
		}
	}
}
