package volspec

import (
	"fmt"
	"strconv"
	"strings"
)

// units are the suffixes ParseQuantity accepts, in the style of Kubernetes
// quantities: binary (Ki = 1024 …) and decimal (k = 1000 …). K is accepted
// as k. Two-letter suffixes come first, so "Mi" is not read as "M".
var units = []struct {
	suffix string
	mult   uint64
}{
	{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"Pi", 1 << 50},
	{"k", 1e3}, {"K", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12}, {"P", 1e15},
}

// unitList names the units in errors.
const unitList = "Ki, Mi, Gi, Ti, Pi, k or K, M, G, T, P"

// ParseQuantity parses a byte count or rate: a whole number with an optional
// unit ("4096", "64Mi", "500M", "1Gi"), spaces around it ignored. It is the
// one unit parser of the project: volume sizes, maxBandwidth and rates all
// use it.
func ParseQuantity(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	num, mult := s, uint64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			num, mult = strings.TrimSuffix(s, u.suffix), u.mult
			break
		}
	}
	n, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q: want a whole number with an optional unit (%s)", s, unitList)
	}
	if n != 0 && mult > ^uint64(0)/n {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return n * mult, nil
}
