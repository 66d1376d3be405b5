// Command helmrender renders Cairn's Helm chart (deploy/helm/cairn) with
// Helm's own template engine, as `helm template` would, and writes each
// template's output to a file of the same name in -out.
//
// It is its own module, so that Helm and the Kubernetes client libraries it
// brings stay out of the main go.mod. `make manifests` uses it to write
// deploy/kubernetes from the chart, and tests/deploy to check that the two
// agree and that the chart's values take effect.
//
//	go run . -chart ../../../deploy/helm/cairn -manifests -out DIR
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/loader"
	"helm.sh/helm/v4/pkg/engine"
	"helm.sh/helm/v4/pkg/strvals"
)

// manifestsHeader is the first line of each file of deploy/kubernetes.
const manifestsHeader = "# Generated from deploy/helm/cairn by `make manifests`: edit the chart, not this file."

// sets collects repeated -set flags.
type sets []string

func (s *sets) String() string     { return strings.Join(*s, ",") }
func (s *sets) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	chartDir := flag.String("chart", "", "the chart's directory (required)")
	name := flag.String("name", "cairn", "release name")
	namespace := flag.String("namespace", "cairn-system", "release namespace")
	out := flag.String("out", "", "directory to write the rendered files into (required)")
	header := flag.String("header", "", "a line to write first into each file")
	manifests := flag.Bool("manifests", false, "render deploy/kubernetes: namespace cairn-system, createNamespace=true and the generated-file header (make manifests, tests/deploy)")
	var set, valueFiles sets
	flag.Var(&set, "set", "a value, as helm --set has it (repeatable)")
	flag.Var(&valueFiles, "f", "a values file, as helm -f has it (repeatable; -set overrides)")
	flag.Parse()
	if *manifests {
		*namespace, *header = "cairn-system", manifestsHeader
		set = append(sets{"createNamespace=true"}, set...)
	}
	if *chartDir == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "helmrender: -chart and -out are required")
		os.Exit(2)
	}
	if err := render(*chartDir, *name, *namespace, valueFiles, set, *out, *header); err != nil {
		fmt.Fprintln(os.Stderr, "helmrender:", err)
		os.Exit(1)
	}
}

func render(chartDir, name, namespace string, valueFiles, set []string, out, header string) error {
	chrt, err := loader.Load(chartDir)
	if err != nil {
		return err
	}
	vals := map[string]any{}
	for _, f := range valueFiles {
		fv, err := common.ReadValuesFile(f)
		if err != nil {
			return fmt.Errorf("-f %s: %w", f, err)
		}
		vals = util.MergeTables(fv, vals)
	}
	for _, s := range set {
		if err := strvals.ParseInto(s, vals); err != nil {
			return fmt.Errorf("-set %s: %w", s, err)
		}
	}
	// Validates the values against the chart's values.schema.json, as
	// helm install does.
	top, err := util.ToRenderValues(chrt, vals, common.ReleaseOptions{Name: name, Namespace: namespace, IsInstall: true}, nil)
	if err != nil {
		return err
	}
	files, err := engine.Render(chrt, top)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		base := filepath.Base(n)
		// Helpers render to nothing; NOTES.txt is for the user, not a
		// manifest.
		if strings.HasPrefix(base, "_") || base == "NOTES.txt" || strings.TrimSpace(files[n]) == "" {
			continue
		}
		text := files[n]
		if header != "" {
			text = header + "\n" + text
		}
		if err := os.WriteFile(filepath.Join(out, base), []byte(text), 0o644); err != nil {
			return err
		}
	}
	return nil
}
