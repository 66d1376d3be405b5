package main

import (
	"fmt"
	"strings"

	"github.com/cairn-csi/cairn/replication/volspec"
)

// parseSize parses "64Mi", "1Gi", "500M" or a plain number of bytes: the
// units of volspec.ParseQuantity, the same as a StorageClass's maxBandwidth.
func parseSize(s string) (uint64, error) { return volspec.ParseQuantity(s) }

// formatSize prints bytes in binary units, exactly when possible.
func formatSize(b uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	i := 0
	v := float64(b)
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", b)
	}
	return strings.TrimSuffix(strings.TrimSuffix(fmt.Sprintf("%.1f", v), "0"), ".") + " " + units[i]
}
