package localkube

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	sysproc "github.com/cairn-csi/cairn/internal/proc"
)

// Process is a program the run started in the background, in a session of
// its own, with its output in a log file under the run directory.
type Process struct {
	Name string
	Log  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// Start starts bin with args as a process named name (its log file is
// RUN/logs/NAME.log) and records its PID in the state file before it
// returns. env is added to this process's environment. Every process must
// name the run directory in its arguments: Cleanup finds stragglers by it.
func (r *Run) Start(name, bin string, args, env []string) (*Process, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	logPath := filepath.Join(r.Dir, "logs", name+".log")
	if err := os.MkdirAll(filepath.Dir(logPath), 0o755); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), env...)
	cmd.Dir = r.Dir
	// Its own session: a signal to the test's process group does not
	// reach it, and Cleanup stops it in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, Log: logPath, cmd: cmd, done: make(chan struct{})}
	r.state.Procs = append(r.state.Procs, proc{Name: name, PID: cmd.Process.Pid, Log: logPath})
	if err := r.state.save(r.Dir); err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	// Reap it, so that a dead process does not linger as a zombie that
	// looks alive by its PID.
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	r.procs = append(r.procs, p)
	return p, nil
}

// PID is the process's id.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// Exited reports whether the process has ended, and how.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Stop sends SIGTERM, waits up to grace, then kills the process.
func (p *Process) Stop(grace time.Duration) {
	if done, _ := p.Exited(); done {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Tail returns the last n lines of the process's log.
func (p *Process) Tail(n int) string { return tailFile(p.Log, n) }

func tailFile(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// stopPID stops a process that this Go process may not be the parent of:
// SIGTERM, up to grace for it to go, then SIGKILL. It returns once the
// process is gone, not merely exiting (internal/proc): mounts and loop
// devices it holds can be cleaned up only then.
func stopPID(pid int, marker string, grace time.Duration) {
	if !sysproc.Holds(pid, marker) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !sysproc.Holds(pid, marker) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for i := 0; i < 100 && sysproc.Holds(pid, marker); i++ {
		time.Sleep(50 * time.Millisecond)
	}
}

// pidsWithMarker lists the live processes whose command line contains marker.
func pidsWithMarker(marker string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if sysproc.Runs(pid, marker) {
			out = append(out, pid)
		}
	}
	return out
}
