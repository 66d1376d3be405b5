package logcheck

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestNodeLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "node.log")
	log := strings.Join([]string{
		`{"level":"info","msg":"fine","node_id":"node-1","volume_id":"v"}`,
		`{"level":"info","msg":"twice","node_id":"node-1","node_id":"node-1"}`,
		`{"level":"info","msg":"other node","node_id":"node-2"}`,
		`{"level":"info","msg":"none"}`,
		`panic: not json`,
		`{"level":"info","msg":"cut off","node_id":"node-1"`,
	}, "\n") + "\n"
	if err := os.WriteFile(path, []byte(log), 0o644); err != nil {
		t.Fatal(err)
	}
	lines, problems, err := NodeLog(path, "node-1")
	if err != nil {
		t.Fatal(err)
	}
	if lines != 6 {
		t.Errorf("%d lines, want 6", lines)
	}
	want := []string{`field "node_id" twice`, `node_id "node-2", want "node-1"`, "no node_id", "not a JSON object", "not a JSON object"}
	if len(problems) != len(want) {
		t.Fatalf("problems %q, want %d of them", problems, len(want))
	}
	for i, w := range want {
		if !strings.HasPrefix(problems[i], w) {
			t.Errorf("problem %d is %q, want it to start with %q", i, problems[i], w)
		}
	}
}

func TestRefusals(t *testing.T) {
	log := `{"level":"info","msg":"volume attached"}
{"level":"warn","msg":"meta API call refused","method":"Join"}
{"level":"warn","msg":"replica connection refused","error":"WRITE needs a node certificate (permission denied)"}
{"level":"warn","msg":"claim refused","epoch":9}
`
	got := Refusals(log)
	if len(got) != 3 {
		t.Fatalf("Refusals found %d lines, want the 3 refusals (one line naming two only once):\n%q", len(got), got)
	}
	if Refusals(`{"msg":"volume attached"}`) != nil {
		t.Error("a log without refusals gave some")
	}
}
