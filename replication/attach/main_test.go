package attach_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that the tests leave no goroutine behind: every engine,
// export and store they start must be stopped.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// hashicorp/raft#498 (see tests/meta/main_test.go): a meta API
		// handler inside Store.Apply of a closed store may wait forever.
		goleak.IgnoreTopFunction("github.com/hashicorp/raft.(*deferError).Error"),
	)
}
