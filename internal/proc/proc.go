// Package proc tells, from /proc, whether a process that a tool started and
// recorded by PID is still there: `cairn dev` for its node agents, the e2e
// harness (tests/e2e/localkube) for the processes of a crashed run. A PID
// may have been reused, so the process is recognised by a marker in its
// command line.
//
// A process that is exiting has already released its memory, and with it
// its command line, but it closes its files only after that: until it is a
// zombie it still holds its listening ports, its file locks and devices
// such as /dev/fuse (whose close can wait for a loop device on top). A new
// process started in its place then fails at once. So for a recorded PID,
// "still there" includes exiting.
package proc

import (
	"bytes"
	"os"
	"strconv"
	"strings"
)

// state is what /proc says of a PID.
type state int

const (
	gone    state = iota // no such process, or a zombie whose threads are gone
	other                // a live process without the marker, or a kernel thread
	running              // a live process whose command line has the marker
	exiting              // exiting: command line gone, files maybe still open
)

// pfKthread is PF_KTHREAD in the flags of /proc/PID/stat.
const pfKthread = 0x00200000

// Holds reports whether pid, recorded when a process whose command line
// contains marker was started, is that process still, running or exiting.
func Holds(pid int, marker string) bool {
	s := lookup(pid, marker)
	return s == running || s == exiting
}

// Runs reports whether pid is a running process whose command line
// contains marker; an exiting process, whose command line is gone, cannot
// be told apart from others and does not count. For scanning /proc.
func Runs(pid int, marker string) bool { return lookup(pid, marker) == running }

func lookup(pid int, marker string) state {
	if pid <= 0 {
		return gone
	}
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return gone
	}
	cmdline, err := os.ReadFile(dir + "/cmdline")
	if err != nil {
		return gone
	}
	return classify(stat, cmdline, marker)
}

// classify reads the contents of /proc/PID/stat and /proc/PID/cmdline.
func classify(stat, cmdline []byte, marker string) state {
	// The state and the flags follow the parenthesised command name.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return gone
	}
	fields := strings.Fields(string(stat[i+1:]))
	if len(fields) < 18 {
		return gone
	}
	switch fields[0] {
	case "X":
		return gone
	case "Z":
		// The main thread is a zombie; the process is gone once its
		// other threads are too (num_threads, field 20 of stat).
		if n, err := strconv.Atoi(fields[17]); err == nil && n > 1 {
			return exiting
		}
		return gone
	}
	if len(cmdline) == 0 {
		if flags, err := strconv.ParseUint(fields[6], 10, 64); err == nil && flags&pfKthread == 0 {
			return exiting
		}
		return other
	}
	if bytes.Contains(cmdline, []byte(marker)) {
		return running
	}
	return other
}
