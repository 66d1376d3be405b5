// Package dataplane tests Cairn's replicated data path end to end: a dev
// cluster of real `cairn node` processes on loopback addresses, volumes exported over
// NBD on unix sockets, and a small NBD client of our own that records which
// writes the server acknowledged. Faults are real: SIGKILL of node processes
// (`cairn dev kill`), SIGSTOP/SIGCONT for a node that is cut off and comes
// back. Each test names the faults it injects and the guarantees of
// docs/architecture.md ("Guarantees", items 1 to 3) it checks:
//
//   - no acknowledged write is lost and no acknowledged flush is undone while
//     a healthy replica survives;
//   - a fenced (older-epoch) engine cannot change the volume;
//   - all healthy replicas hold identical data after failure and recovery
//     (`cairn ctl volume verify`).
//
// Set CAIRN_DATAPLANE_RACE=1 to build the node binary with -race as well;
// the tests then fail if any node reports a data race. Set
// CAIRN_DATAPLANE_KEEP_LOGS=DIR to keep every node's log in DIR.
package dataplane

import (
	"os"
	"testing"

	"github.com/cairn-csi/cairn/tests/testbin"
)

// cairnBin is the binary under test, built once in TestMain.
var cairnBin string

// raceNodes is set when the node binary was built with -race.
var raceNodes = os.Getenv("CAIRN_DATAPLANE_RACE") == "1"

func TestMain(m *testing.M) {
	var flags []string
	if raceNodes {
		flags = append(flags, "-race")
	}
	testbin.Main(m, &cairnBin, flags...)
}
