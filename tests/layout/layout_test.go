// Package layout checks rules about the repository's shape that the compiler
// does not: the top-level folders exist, imports point one way
// (cmd → driver → replication → iosched, with internal/ below them all), no
// package outside cmd imports cmd, nothing outside tests/ imports tests/,
// and no file names a path on the machine it was written on.
package layout

import (
	"bufio"
	"bytes"
	"errors"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// topLevel are the folders docs/architecture.md names ("Layers"), top to
// bottom of the stack where they take part in it.
var topLevel = []string{"cmd", "driver", "replication", "iosched", "deploy", "tests"}

// forbidden says, for a layer, which module layers its files may not import.
// Layers not listed here (cmd, tests, deploy, the module root …) are only held
// to the rules that apply to everyone in importRule (no cmd, no tests).
var forbidden = map[string][]string{
	"driver":      {"cmd", "tests"},
	"replication": {"driver", "cmd", "tests"},
	// iosched is also limited to the standard library; see importRule.
	"iosched": {"driver", "replication", "internal", "cmd", "tests"},
	// internal/ holds small helpers any layer may use (internal/loopback:
	// listen addresses for local clusters, used by cmd and tests): it sits
	// below every layer, so it imports none of them.
	"internal": {"cmd", "driver", "replication", "iosched", "tests"},
}

// stdlibOnly names the pseudo-layer of imports outside the module that are not
// in the standard library.
const stdlibOnly = "packages outside the standard library"

// importRule reports whether a file in layer fileLayer may import imp, and if
// not, which layer the import belongs to. module is the module path from
// go.mod; isTest says whether the file is a _test.go file.
//
// A test file under iosched may import third-party test libraries (goleak, say):
// a test-only import does not become a dependency of iosched's users. It still
// may not import any other layer of this module.
func importRule(module, fileLayer, imp string, isTest bool) (ok bool, importedLayer string) {
	importedLayer, inModule := layerOf(module, imp)
	if !inModule {
		first, _, _ := strings.Cut(imp, "/")
		if !strings.Contains(first, ".") {
			return true, "" // standard library
		}
		if fileLayer == "iosched" && !isTest {
			return false, stdlibOnly
		}
		return true, ""
	}
	if importedLayer == fileLayer {
		return true, ""
	}
	// Rules for everyone: cmd holds only main packages and their flags and
	// commands, so no package outside cmd imports it (what a test or another
	// command needs of it belongs in a package below); and tests/ holds test
	// harnesses that nothing outside tests/ may depend on, the production
	// binary least of all. (A layer importing itself returned above: the
	// harnesses under tests/ may import each other.)
	if importedLayer == "cmd" || importedLayer == "tests" {
		return false, importedLayer
	}
	if fileLayer == "iosched" {
		return false, importedLayer
	}
	for _, f := range forbidden[fileLayer] {
		if f == importedLayer {
			return false, importedLayer
		}
	}
	return true, ""
}

// layerOf returns the top-level folder of a package of this module ("" for the
// module's root package) and whether imp belongs to the module at all.
func layerOf(module, imp string) (layer string, inModule bool) {
	if imp == module {
		return "", true
	}
	rest, found := strings.CutPrefix(imp, module+"/")
	if !found {
		return "", false
	}
	layer, _, _ = strings.Cut(rest, "/")
	return layer, true
}

// fileLayer returns the top-level folder of a slash-separated path relative to
// the repository root, "" for a file at the root.
func fileLayer(rel string) string {
	layer, _, found := strings.Cut(rel, "/")
	if !found {
		return ""
	}
	return layer
}

func TestImportRule(t *testing.T) {
	const mod = "example.com/m"
	tests := []struct {
		name   string
		layer  string
		imp    string
		test   bool
		ok     bool
		layer2 string
	}{
		{"iosched std", "iosched", "container/heap", false, true, ""},
		{"iosched own sub-package", "iosched", mod + "/iosched/bucket", false, true, ""},
		{"iosched third-party", "iosched", "go.uber.org/zap", false, false, stdlibOnly},
		{"iosched test third-party", "iosched", "go.uber.org/goleak", true, true, ""},
		{"iosched replication", "iosched", mod + "/replication/meta", false, false, "replication"},
		{"iosched test replication", "iosched", mod + "/replication/meta", true, false, "replication"},
		{"iosched module root", "iosched", mod, false, false, ""},
		{"replication iosched", "replication", mod + "/iosched", false, true, ""},
		{"replication third-party", "replication", "github.com/hashicorp/raft", false, true, ""},
		{"replication driver", "replication", mod + "/driver", false, false, "driver"},
		{"replication tests", "replication", mod + "/tests/harness", true, false, "tests"},
		{"driver replication", "driver", mod + "/replication/engine", false, true, ""},
		{"driver iosched", "driver", mod + "/iosched", false, true, ""},
		{"driver cmd", "driver", mod + "/cmd/cairn", false, false, "cmd"},
		{"driver tests", "driver", mod + "/tests/e2e", true, false, "tests"},
		{"cmd driver", "cmd", mod + "/driver", false, true, ""},
		{"cmd tests", "cmd", mod + "/tests/harness", false, false, "tests"},
		{"cmd test file tests", "cmd", mod + "/tests/harness", true, false, "tests"},
		{"cmd own sub-package", "cmd", mod + "/cmd/cairn/internal/x", false, true, ""},
		{"cmd internal", "cmd", mod + "/internal/loopback", false, true, ""},
		{"tests driver", "tests", mod + "/driver", true, true, ""},
		{"tests cmd", "tests", mod + "/cmd/cairn", true, false, "cmd"},
		{"tests tests", "tests", mod + "/tests/cluster", false, true, ""},
		{"tests internal", "tests", mod + "/internal/loopback", false, true, ""},
		{"deploy tests", "deploy", mod + "/tests/x", false, false, "tests"},
		{"driver internal", "driver", mod + "/internal/x", false, true, ""},
		{"replication internal", "replication", mod + "/internal/x", false, true, ""},
		{"iosched internal", "iosched", mod + "/internal/x", false, false, "internal"},
		{"internal std", "internal", "net", false, true, ""},
		{"internal own sub-package", "internal", mod + "/internal/y", false, true, ""},
		{"internal iosched", "internal", mod + "/iosched", false, false, "iosched"},
		{"internal replication", "internal", mod + "/replication/meta", false, false, "replication"},
		{"internal driver", "internal", mod + "/driver/csi", false, false, "driver"},
		{"internal cmd", "internal", mod + "/cmd/cairn", false, false, "cmd"},
		{"internal tests", "internal", mod + "/tests/cluster", true, false, "tests"},
		{"module root cmd", "", mod + "/cmd/cairn", false, false, "cmd"},
		{"module root tests", "", mod + "/tests/cluster", false, false, "tests"},
		{"not a prefix match", "iosched", mod + "x/iosched", false, false, stdlibOnly},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ok, layer := importRule(mod, tc.layer, tc.imp, tc.test)
			if ok != tc.ok || layer != tc.layer2 {
				t.Errorf("importRule(%q, %q, test=%v) = %v, %q; want %v, %q",
					tc.layer, tc.imp, tc.test, ok, layer, tc.ok, tc.layer2)
			}
		})
	}
}

// TestTopLevelFolders checks that the folders docs/architecture.md names exist.
func TestTopLevelFolders(t *testing.T) {
	root := repoRoot(t)
	for _, dir := range topLevel {
		fi, err := os.Stat(filepath.Join(root, dir))
		switch {
		case errors.Is(err, fs.ErrNotExist):
			t.Errorf("top-level folder %s/ is missing (docs/architecture.md, section Layers, names %s)", dir, strings.Join(topLevel, ", "))
		case err != nil:
			t.Errorf("top-level folder %s/: %v", dir, err)
		case !fi.IsDir():
			t.Errorf("top-level %s is not a folder", dir)
		}
	}
}

// TestImportDirection parses the imports of every .go file in the module and
// checks that they point one way: cmd → driver → replication → iosched, with
// internal/ below all four; that nothing outside cmd imports cmd; and that
// nothing outside tests/ imports tests/.
func TestImportDirection(t *testing.T) {
	root := repoRoot(t)
	module := modulePath(t, root)

	var files []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if p == root {
				return nil
			}
			name := d.Name()
			// The go tool ignores these folders; bin/ is build output.
			if strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") ||
				name == "testdata" || name == "vendor" || (filepath.Dir(p) == root && name == "bin") {
				return filepath.SkipDir
			}
			if _, err := os.Stat(filepath.Join(p, "go.mod")); err == nil {
				return filepath.SkipDir // a nested module has its own rules
			}
			return nil
		}
		if strings.HasSuffix(d.Name(), ".go") {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking %s: %v", root, err)
	}
	if len(files) == 0 {
		t.Fatalf("found no .go files under %s", root)
	}

	fset := token.NewFileSet()
	for _, p := range files {
		rel := relSlash(t, root, p)
		f, err := parser.ParseFile(fset, p, nil, parser.ImportsOnly)
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		layer := fileLayer(rel)
		isTest := strings.HasSuffix(rel, "_test.go")
		for _, spec := range f.Imports {
			imp, err := strconv.Unquote(spec.Path.Value)
			if err != nil {
				t.Errorf("%s: bad import path %s: %v", rel, spec.Path.Value, err)
				continue
			}
			ok, importedLayer := importRule(module, layer, imp, isTest)
			if ok {
				continue
			}
			who := layer
			if who == "" {
				who = "the module root"
			}
			what := importedLayer
			if what == "" {
				what = "the module root"
			}
			t.Errorf("%s: imports %s, but %s may not import %s", rel, imp, who, what)
		}
	}
}

// machinePath matches an absolute path under the work or root folders where a path
// starts (not inside a URL or a longer path). The pattern is spelled so that
// this file does not match itself.
var machinePath = regexp.MustCompile(`(^|[^A-Za-z0-9_.~$/-])/(work|root)/`)

func TestMachinePathPattern(t *testing.T) {
	w, r := "/"+"work/", "/"+"root/"
	tests := []struct {
		line string
		want bool
	}{
		{"cd " + w + "main", true},
		{`root := "` + r + `go"`, true},
		{w + "x at line start", true},
		{"PATH=$PATH:" + r + "go/bin", true},
		{"https://example.com" + w + "x", false},
		{"relative/dir" + r + "x", false},
		{"/usr/local/go/bin", false},
		{"$(HOME)/go/bin", false},
	}
	for _, tc := range tests {
		if got := machinePath.MatchString(tc.line); got != tc.want {
			t.Errorf("machinePath.MatchString(%q) = %v, want %v", tc.line, got, tc.want)
		}
	}
}

// TestNoMachinePaths checks that no text file of the repository names a path on
// a particular machine: the repository must build and test from any clone.
func TestNoMachinePaths(t *testing.T) {
	root := repoRoot(t)
	files := textFiles(t, root)
	if len(files) == 0 {
		t.Fatalf("found no text files to scan under %s", root)
	}
	for _, rel := range files {
		data, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(rel)))
		if errors.Is(err, fs.ErrNotExist) {
			continue // tracked but deleted in the work tree
		}
		if err != nil {
			t.Errorf("%s: %v", rel, err)
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(data))
		sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
		for n := 1; sc.Scan(); n++ {
			if machinePath.Match(sc.Bytes()) {
				t.Errorf("%s:%d: names a path on one machine: %s", rel, n, strings.TrimSpace(sc.Text()))
			}
		}
		if err := sc.Err(); err != nil {
			t.Errorf("%s: %v", rel, err)
		}
	}
}

// textFiles lists, relative to root with slashes, the files TestNoMachinePaths
// scans: those git tracks or would track (not ignored), or, without git, every
// file outside .git, bin and other hidden folders.
func textFiles(t *testing.T, root string) []string {
	t.Helper()
	var all []string
	out, err := exec.Command("git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output()
	if err == nil {
		for _, f := range strings.Split(string(out), "\x00") {
			if f != "" {
				all = append(all, f)
			}
		}
	} else {
		t.Logf("git ls-files failed (%v); walking the tree instead", err)
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() {
				name := d.Name()
				if p != root && (name == "bin" || name == ".git" || (strings.HasPrefix(name, ".") && name != ".ci")) {
					return filepath.SkipDir
				}
				return nil
			}
			all = append(all, relSlash(t, root, p))
			return nil
		})
		if err != nil {
			t.Fatalf("walking %s: %v", root, err)
		}
	}

	var files []string
	for _, f := range all {
		if strings.HasPrefix(f, ".git/") || strings.HasPrefix(f, "bin/") {
			continue
		}
		if isScannedText(f) {
			files = append(files, f)
		}
	}
	sort.Strings(files)
	return files
}

// isScannedText says whether a slash-separated path is a kind of text file that
// TestNoMachinePaths reads.
func isScannedText(rel string) bool {
	base := path.Base(rel)
	switch path.Ext(base) {
	case ".go", ".md", ".sh", ".yaml", ".yml", ".tpl":
		return true
	}
	return base == "Makefile" || strings.HasPrefix(base, "Dockerfile") || strings.HasPrefix(rel, ".ci/")
}

// repoRoot finds the repository root: the nearest folder at or above the
// working directory that holds go.mod.
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod found at or above the working directory")
		}
		dir = parent
	}
}

// modulePath reads the module path from root/go.mod.
func modulePath(t *testing.T, root string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) >= 2 && fields[0] == "module" {
			if p, err := strconv.Unquote(fields[1]); err == nil {
				return p
			}
			return fields[1]
		}
	}
	t.Fatal("go.mod has no module line")
	return ""
}

func relSlash(t *testing.T, root, p string) string {
	t.Helper()
	rel, err := filepath.Rel(root, p)
	if err != nil {
		t.Fatal(err)
	}
	return filepath.ToSlash(rel)
}
