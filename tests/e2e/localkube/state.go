package localkube

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cairn-csi/cairn/internal/atomicfile"
)

// stateFile is the run directory's record of what a run changed outside
// of it. It is written before each change, so that it is complete however
// the run ends.
const stateFile = "state.json"

// state is the content of the state file.
type state struct {
	// Procs are the processes the run started, in start order.
	Procs []proc `json:"procs"`
	// Sysctls holds each kernel setting's value from before the run, by
	// its /proc/sys path relative to /proc/sys.
	Sysctls map[string]string `json:"sysctls,omitempty"`
}

// proc is one started process.
type proc struct {
	Name string `json:"name"`
	PID  int    `json:"pid"`
	Log  string `json:"log"`
}

func loadState(runDir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(runDir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return &state{}, nil
	}
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(runDir, stateFile), err)
	}
	return &s, nil
}

// save writes the state file atomically and durably: a crash right after
// a start must still find the PID.
func (s *state) save(runDir string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(runDir, stateFile, append(b, '\n'))
}
