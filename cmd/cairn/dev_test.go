package main

import "testing"

func TestProcAlive(t *testing.T) {
	const marker = "\x00--id\x00node-1\x00"
	agent := []byte("/usr/local/bin/cairn\x00node\x00--id\x00node-1\x00--data-dir\x00/d\x00")
	other := []byte("/usr/local/bin/cairn\x00node\x00--id\x00node-2\x00")
	// state ppid pgrp session tty tpgid flags ...
	stat := func(state, flags string) []byte {
		return []byte("4242 (cairn (x)) " + state + " 1 4242 4242 0 -1 " + flags + " 0 0 0 0")
	}
	for _, tc := range []struct {
		name          string
		stat, cmdline []byte
		want          bool
	}{
		{"running agent", stat("S", "4194560"), agent, true},
		{"another process on the PID", stat("S", "4194560"), other, false},
		{"zombie", stat("Z", "4227084"), nil, false},
		{"dead", stat("X", "4227084"), nil, false},
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
