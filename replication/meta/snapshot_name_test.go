package meta

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestCheckUserSnapshotName(t *testing.T) {
	scheduled := ScheduledSnapshotName("vol-1", time.Date(2026, 12, 5, 6, 0, 0, 0, time.UTC))
	for _, c := range []struct {
		vol, name, err string
	}{
		{"vol-1", "before-upgrade", ""},
		{"vol-1", "sched-nightly", ""},
		{"vol-2", scheduled, ""}, // another volume's form: retention of vol-2 would not take it
		{"vol-1", "", "without leading or trailing spaces"},
		{"vol-1", " x", "without leading or trailing spaces"},
		{"", "x", "volume id is empty"},
		{"vol-1", HiddenSnapshotPrefix + "clone-x", "Cairn's own"},
		{"vol-1", scheduled, "scheduled snapshots"},
	} {
		err := CheckUserSnapshotName(c.vol, c.name)
		if c.err == "" && err != nil || c.err != "" && (!errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), c.err)) {
			t.Errorf("CheckUserSnapshotName(%q, %q) = %v; want InvalidArgument with %q", c.vol, c.name, err, c.err)
		}
	}
}
