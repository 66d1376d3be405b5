package replica

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every
// server, connection and client must stop what it started.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
