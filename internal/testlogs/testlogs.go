// Package testlogs generates JSON log lines, as a service writes them: the
// compressible data of the compression tests (generated, never
// downloaded). Every line differs, so no two extents are equal, and LZ4
// stores them in about a third of their size.
package testlogs

import (
	"bytes"
	"fmt"
	"math/rand/v2"
)

// JSON returns n bytes of log lines drawn from r.
func JSON(r *rand.Rand, n int) []byte {
	var b bytes.Buffer
	b.Grow(n + 256)
	paths := []string{"/api/v1/items", "/api/v1/users", "/healthz", "/api/v2/orders", "/metrics"}
	levels := []string{"info", "info", "info", "warn", "debug", "error"}
	for b.Len() < n {
		fmt.Fprintf(&b, `{"ts":"2026-12-06T%02d:%02d:%02d.%03dZ","level":%q,"msg":"request served","path":"%s/%d","status":%d,"latency_ms":%d,"bytes":%d}`+"\n",
			r.IntN(24), r.IntN(60), r.IntN(60), r.IntN(1000), levels[r.IntN(len(levels))], paths[r.IntN(len(paths))], r.IntN(100000),
			[]int{200, 200, 200, 201, 404, 500}[r.IntN(6)], r.IntN(900), r.IntN(1<<20))
	}
	return b.Bytes()[:n]
}

// Fill fills p with log lines drawn from r.
func Fill(p []byte, r *rand.Rand) { copy(p, JSON(r, len(p))) }
