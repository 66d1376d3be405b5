// Package logcheck checks the log files of `cairn node` processes in tests:
// every line a JSON object that names its node exactly once.
package logcheck

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
)

// Check fails t for each line of the log of the node agent node at path
// that NodeLog finds wrong (the first five are shown).
func Check(t testing.TB, path, node string) {
	t.Helper()
	lines, problems, err := NodeLog(path, node)
	if err != nil {
		t.Errorf("check log of %s: %v", node, err)
		return
	}
	for i, p := range problems {
		if i == 5 {
			t.Errorf("%s: %d more such lines", path, len(problems)-i)
			break
		}
		t.Errorf("%s: %s", path, p)
	}
	if len(problems) == 0 {
		t.Logf("%s: %d lines, each JSON with node_id %s once", path, lines, node)
	}
}

// NodeLog reads the log of the node agent node at path and returns how many
// lines it has and what is wrong with them: a line that is not a JSON
// object, a field that appears twice (zap writes a field as often as
// loggers add it; a log pipeline then keeps one value at random or drops
// the line), or a node_id missing or naming another node.
func NodeLog(path, node string) (lines int, problems []string, err error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, nil, err
	}
	text := strings.TrimSpace(string(raw))
	if text == "" {
		return 0, nil, nil
	}
	for _, line := range strings.Split(text, "\n") {
		lines++
		keys, vals, err := topLevelFields(line)
		if err != nil {
			problems = append(problems, fmt.Sprintf("not a JSON object (%v): %s", err, line))
			continue
		}
		seen := map[string]bool{}
		for i, k := range keys {
			if seen[k] {
				problems = append(problems, fmt.Sprintf("field %q twice: %s", k, line))
			}
			seen[k] = true
			if k == "node_id" && vals[i] != node {
				problems = append(problems, fmt.Sprintf("node_id %q, want %q: %s", vals[i], node, line))
			}
		}
		if !seen["node_id"] {
			problems = append(problems, "no node_id: "+line)
		}
	}
	return lines, problems, nil
}

// topLevelFields returns the keys of a JSON object in their order, with the
// values of the string-valued ones ("" for the others).
func topLevelFields(line string) (keys, vals []string, err error) {
	dec := json.NewDecoder(strings.NewReader(line))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, nil, fmt.Errorf("does not start with {: %v", err)
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, err
		}
		var v any
		if err := dec.Decode(&v); err != nil {
			return nil, nil, err
		}
		str, _ := v.(string)
		keys, vals = append(keys, tok.(string)), append(vals, str)
	}
	if _, err := dec.Token(); err != nil {
		return nil, nil, err
	}
	if dec.More() {
		return nil, nil, fmt.Errorf("more after the object")
	}
	return keys, vals, nil
}
