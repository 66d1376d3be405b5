// Package placement picks the storage nodes that hold a volume's replicas.
//
// Place is a pure function of its inputs: it does no I/O, keeps no state and
// returns the same answer for the same nodes and request whatever the order of
// the node slice, so the Raft leader (or any replica of the store) can compute
// a placement and every reader of the log can check it.
//
// The policy:
//
//  1. Eligibility. A node can take a replica when it is up, is not excluded
//     (it already holds a replica of the volume, or is the one being replaced),
//     is in one of the allowed zones (when the request names any), and has room
//     for the full size of the volume under thin provisioning:
//     AllocatedBytes + SizeBytes <= CapacityBytes × OverProvisioningRatio,
//     computed exactly (no float rounding, no uint64 overflow).
//     A request with ReserveIOPS (a guaranteed volume) also needs the node
//     to have that many IOPS unreserved: ReservableIOPS − ReservedIOPS.
//  2. One replica per node. Never two replicas on one node.
//  3. Locality. The preferred node (the node that will attach the volume, for
//     dataLocality=best-effort) is chosen first when it is eligible, and
//     silently skipped when it is not.
//  4. Zone spread, greedily. Each further pick takes, among the eligible nodes
//     not yet chosen, one in the zone that holds the fewest replicas so far —
//     counting the replicas that stay (Request.ExistingZones) and those already
//     chosen — so new replicas go to unused zones first. Nodes without a zone
//     label ("") form one zone of their own: with no topology at all, every
//     node is in that zone and spreading has no effect.
//  5. Balance. Among nodes whose zones tie, the least used node wins, by
//     AllocatedBytes/CapacityBytes compared by exact integer cross
//     multiplication; the last tie-break is the node id, lexicographically.
//
// When fewer nodes are eligible than replicas are wanted, Place fails with an
// error wrapping ErrInsufficientNodes (the driver answers ResourceExhausted)
// whose message counts the eligible nodes and says, in a stable order, why the
// others were not: down, excluded, not in an allowed zone, lacking IOPS to
// reserve, lacking space.
// Region is carried for callers but plays no part in the choice.
package placement

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"math/bits"
	"slices"
	"strconv"
	"strings"
)

// ErrInsufficientNodes means fewer nodes are eligible than replicas are
// wanted. The wrapping error's message gives the reason with counts.
var ErrInsufficientNodes = errors.New("not enough eligible nodes")

// ErrInvalidRequest means the request or the node list is malformed
// (a programming or input error, not a lack of resources).
var ErrInvalidRequest = errors.New("invalid placement request")

// maxExamples bounds how many node ids an error message names per reason.
const maxExamples = 3

// Node is what placement knows of one storage node.
type Node struct {
	ID             string
	Zone           string // topology zone, may be ""
	Region         string // may be ""
	Up             bool   // only up nodes are eligible
	CapacityBytes  uint64 // size of the node's data disk
	AllocatedBytes uint64 // sum of the sizes of replicas already placed on it (thin provisioning)
	// ReservableIOPS is what the node's disks can promise to guaranteed
	// volumes, ReservedIOPS what replicas placed on it were promised
	// (their minIOPS). Only a request with ReserveIOPS looks at them.
	ReservableIOPS, ReservedIOPS uint64
}

// UnreservedIOPS is what n can still promise to a guaranteed volume.
func (n Node) UnreservedIOPS() uint64 {
	if n.ReservedIOPS >= n.ReservableIOPS {
		return 0
	}
	return n.ReservableIOPS - n.ReservedIOPS
}

// Request says what to place.
type Request struct {
	Replicas              int      // how many new replicas to place (>=1)
	SizeBytes             uint64   // full size of the volume
	OverProvisioningRatio float64  // allowed AllocatedBytes+SizeBytes <= Capacity*ratio; 0 means 1.0
	Exclude               []string // node ids that must not be chosen (they already hold a replica of this volume, or are being replaced)
	ExistingZones         []string // zones of the volume's replicas that stay (for spreading a replacement replica)
	AllowedZones          []string // if non-empty, only nodes in these zones (CSI accessibility requirements)
	PreferredNode         string   // if eligible, chosen first (data locality best-effort); "" = none
	// ReserveIOPS, if not 0, admits the volume only on nodes that can
	// still promise it that many IOPS (a guaranteed volume's minIOPS).
	ReserveIOPS uint64
}

// FreeBytes returns how many more bytes can be allocated on n at the given
// over-provisioning ratio (0 means 1.0): floor(CapacityBytes×ratio) −
// AllocatedBytes, never below 0 and capped at math.MaxUint64. It ignores
// n.Up. A negative, NaN or infinite ratio gives 0.
func (n Node) FreeBytes(ratio float64) uint64 {
	r, ok := ratioRat(ratio)
	if !ok {
		return 0
	}
	return freeBytes(n, r)
}

// Place returns req.Replicas node ids, in a deterministic order (the preferred
// node first when it was chosen, then in the order of the greedy picks), or an
// error wrapping ErrInsufficientNodes whose message gives the reason with
// counts, e.g. "need 3 nodes, 2 eligible: node-3 is down; node-4 lacks space
// (needs 1.0 GiB, 512 MiB free at ratio 1.0)". A malformed request or node
// list gives an error wrapping ErrInvalidRequest.
func Place(nodes []Node, req Request) ([]string, error) {
	ratio, err := validate(nodes, req)
	if err != nil {
		return nil, err
	}
	limit, _ := ratioRat(ratio) // validated above

	// Work on a copy sorted by id: from here on nothing depends on the
	// caller's order, and ids are unique (validated).
	sorted := slices.Clone(nodes)
	slices.SortFunc(sorted, func(a, b Node) int { return strings.Compare(a.ID, b.ID) })

	excluded := toSet(req.Exclude)
	allowed := toSet(req.AllowedZones)

	var (
		eligible []Node
		rejected [numReasons][]rejection
	)
	for _, n := range sorted {
		switch {
		case !n.Up:
			rejected[reasonDown] = append(rejected[reasonDown], rejection{node: n})
		case excluded[n.ID]:
			rejected[reasonExcluded] = append(rejected[reasonExcluded], rejection{node: n})
		case len(allowed) > 0 && !allowed[n.Zone]:
			rejected[reasonZone] = append(rejected[reasonZone], rejection{node: n})
		case req.ReserveIOPS > 0 && n.UnreservedIOPS() < req.ReserveIOPS:
			rejected[reasonIOPS] = append(rejected[reasonIOPS], rejection{node: n})
		default:
			if free := freeBytes(n, limit); free < req.SizeBytes {
				rejected[reasonSpace] = append(rejected[reasonSpace], rejection{node: n, free: free})
				continue
			}
			eligible = append(eligible, n)
		}
	}
	if len(eligible) < req.Replicas {
		return nil, fmt.Errorf("%w: %s", ErrInsufficientNodes,
			insufficientReason(req, ratio, len(nodes), len(eligible), &rejected))
	}

	zoneCount := make(map[string]int)
	for _, z := range req.ExistingZones {
		zoneCount[z]++
	}
	chosen := make([]string, 0, req.Replicas)
	take := func(i int) {
		n := eligible[i]
		chosen = append(chosen, n.ID)
		zoneCount[n.Zone]++
		eligible = slices.Delete(eligible, i, i+1)
	}
	if req.PreferredNode != "" {
		if i := slices.IndexFunc(eligible, func(n Node) bool { return n.ID == req.PreferredNode }); i >= 0 {
			take(i)
		}
	}
	for len(chosen) < req.Replicas {
		best := 0
		for i := 1; i < len(eligible); i++ {
			if better(eligible[i], eligible[best], zoneCount) {
				best = i
			}
		}
		take(best)
	}
	return chosen, nil
}

// better reports whether a should be picked before b: fewer replicas in its
// zone, then less used, then the smaller id.
func better(a, b Node, zoneCount map[string]int) bool {
	if ca, cb := zoneCount[a.Zone], zoneCount[b.Zone]; ca != cb {
		return ca < cb
	}
	if c := compareUsage(a, b); c != 0 {
		return c < 0
	}
	return a.ID < b.ID
}

// compareUsage compares a.AllocatedBytes/a.CapacityBytes with
// b.AllocatedBytes/b.CapacityBytes exactly, by 128-bit cross multiplication.
// A node without capacity counts as more used than any node with some
// (it is never eligible anyway).
func compareUsage(a, b Node) int {
	switch {
	case a.CapacityBytes == 0 && b.CapacityBytes == 0:
		return 0
	case a.CapacityBytes == 0:
		return 1
	case b.CapacityBytes == 0:
		return -1
	}
	hiA, loA := bits.Mul64(a.AllocatedBytes, b.CapacityBytes)
	hiB, loB := bits.Mul64(b.AllocatedBytes, a.CapacityBytes)
	switch {
	case hiA != hiB:
		return cmpUint64(hiA, hiB)
	default:
		return cmpUint64(loA, loB)
	}
}

func cmpUint64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// ratioRat turns an over-provisioning ratio into an exact rational
// (0 means 1.0). It reports false for a negative, NaN or infinite ratio.
func ratioRat(ratio float64) (*big.Rat, bool) {
	if ratio < 0 || math.IsNaN(ratio) || math.IsInf(ratio, 0) {
		return nil, false
	}
	if ratio == 0 {
		ratio = 1
	}
	return new(big.Rat).SetFloat64(ratio), true
}

var maxUint64 = new(big.Int).SetUint64(math.MaxUint64)

// freeBytes is floor(CapacityBytes×ratio) − AllocatedBytes clamped to
// [0, MaxUint64]. Since sizes are integers, a volume of size s fits exactly
// when s <= freeBytes: AllocatedBytes+s <= Capacity×ratio ⇔
// AllocatedBytes+s <= floor(Capacity×ratio).
func freeBytes(n Node, ratio *big.Rat) uint64 {
	limit := new(big.Rat).Mul(new(big.Rat).SetUint64(n.CapacityBytes), ratio)
	// Both operands are non-negative, so truncating division is the floor.
	free := new(big.Int).Quo(limit.Num(), limit.Denom())
	free.Sub(free, new(big.Int).SetUint64(n.AllocatedBytes))
	switch {
	case free.Sign() <= 0:
		return 0
	case free.Cmp(maxUint64) > 0:
		return math.MaxUint64
	}
	return free.Uint64()
}

func validate(nodes []Node, req Request) (float64, error) {
	var problems []string
	if req.Replicas < 1 {
		problems = append(problems, fmt.Sprintf("replicas must be at least 1, got %d", req.Replicas))
	}
	if req.SizeBytes == 0 {
		problems = append(problems, "size must be greater than 0")
	}
	ratio := req.OverProvisioningRatio
	if _, ok := ratioRat(ratio); !ok {
		problems = append(problems, fmt.Sprintf("over-provisioning ratio must be a finite number >= 0, got %v", ratio))
	}
	seen := make(map[string]int, len(nodes))
	emptyIDs := 0
	for _, n := range nodes {
		if n.ID == "" {
			emptyIDs++
			continue
		}
		seen[n.ID]++
	}
	if emptyIDs > 0 {
		problems = append(problems, fmt.Sprintf("%d %s with an empty id", emptyIDs, plural(emptyIDs, "node", "nodes")))
	}
	var dups []string
	for id, c := range seen {
		if c > 1 {
			dups = append(dups, strconv.Quote(id))
		}
	}
	if len(dups) > 0 {
		slices.Sort(dups)
		problems = append(problems, "duplicate node ids "+examples(dups, len(dups)))
	}
	if len(problems) > 0 {
		return 0, fmt.Errorf("%w: %s", ErrInvalidRequest, strings.Join(problems, "; "))
	}
	if ratio == 0 {
		ratio = 1
	}
	return ratio, nil
}

// reason is why a node is not eligible; the order of the constants is the
// order of the checks and of the error message.
type reason int

const (
	reasonDown reason = iota
	reasonExcluded
	reasonZone
	reasonIOPS
	reasonSpace
	numReasons
)

type rejection struct {
	node Node
	free uint64 // for reasonSpace
}

func insufficientReason(req Request, ratio float64, total, eligible int, rejected *[numReasons][]rejection) string {
	head := fmt.Sprintf("need %d %s, %d eligible", req.Replicas, plural(req.Replicas, "node", "nodes"), eligible)
	var parts []string
	for r := range numReasons {
		if s := describe(r, rejected[r], req, ratio); s != "" {
			parts = append(parts, s)
		}
	}
	switch {
	case len(parts) > 0:
		return head + ": " + strings.Join(parts, "; ")
	case total == 0:
		return head + ": no nodes known"
	default:
		return head + fmt.Sprintf(": only %d %s known", total, plural(total, "node", "nodes"))
	}
}

// describe renders one reason: the node itself when there is one, else a
// count and the first few ids (they arrive sorted by id).
func describe(r reason, rs []rejection, req Request, ratio float64) string {
	if len(rs) == 0 {
		return ""
	}
	size := req.SizeBytes
	if len(rs) == 1 {
		n := rs[0].node
		switch r {
		case reasonDown:
			return n.ID + " is down"
		case reasonExcluded:
			return n.ID + " is excluded"
		case reasonZone:
			return fmt.Sprintf("%s is not in an allowed zone (zone %q)", n.ID, n.Zone)
		case reasonIOPS:
			return fmt.Sprintf("%s cannot reserve %d IOPS (%d of its %d reservable are unreserved)", n.ID, req.ReserveIOPS, n.UnreservedIOPS(), n.ReservableIOPS)
		case reasonSpace:
			need, free := formatPair(size, rs[0].free)
			return fmt.Sprintf("%s lacks space (needs %s, %s free at ratio %s)", n.ID, need, free, formatRatio(ratio))
		}
		panic(fmt.Sprintf("BUG: unknown placement reason %d", r))
	}
	items := make([]string, 0, maxExamples)
	for _, x := range rs[:min(len(rs), maxExamples)] {
		switch r {
		case reasonZone:
			items = append(items, fmt.Sprintf("%s in %q", x.node.ID, x.node.Zone))
		case reasonIOPS:
			items = append(items, fmt.Sprintf("%s has %d unreserved", x.node.ID, x.node.UnreservedIOPS()))
		case reasonSpace:
			_, free := formatPair(size, x.free)
			items = append(items, fmt.Sprintf("%s has %s free", x.node.ID, free))
		default:
			items = append(items, x.node.ID)
		}
	}
	count := len(rs)
	list := examples(items, count)
	switch r {
	case reasonDown:
		return fmt.Sprintf("%d nodes are down (%s)", count, list)
	case reasonExcluded:
		return fmt.Sprintf("%d nodes are excluded (%s)", count, list)
	case reasonZone:
		return fmt.Sprintf("%d nodes are not in an allowed zone (%s)", count, list)
	case reasonIOPS:
		return fmt.Sprintf("%d nodes cannot reserve %d IOPS (%s)", count, req.ReserveIOPS, list)
	case reasonSpace:
		return fmt.Sprintf("%d nodes lack space (needs %s at ratio %s; %s)", count, formatBytes(size), formatRatio(ratio), list)
	}
	panic(fmt.Sprintf("BUG: unknown placement reason %d", r))
}

// examples joins at most maxExamples of the first items of a list of total
// and says how many were left out.
func examples(items []string, total int) string {
	items = items[:min(len(items), maxExamples)]
	if total <= len(items) {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(items, ", "), total-len(items))
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func toSet(xs []string) map[string]bool {
	if len(xs) == 0 {
		return nil
	}
	s := make(map[string]bool, len(xs))
	for _, x := range xs {
		s[x] = true
	}
	return s
}

// formatRatio prints a ratio with at least one decimal: 1 → "1.0", 2.5 → "2.5".
func formatRatio(r float64) string {
	s := strconv.FormatFloat(r, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// formatPair formats a needed and a free size; when rounding would make them
// look equal (the free space falls short by less than the display precision)
// both are given in exact bytes.
func formatPair(need, free uint64) (string, string) {
	n, f := formatBytes(need), formatBytes(free)
	if n == f && need != free {
		return strconv.FormatUint(need, 10) + " B", strconv.FormatUint(free, 10) + " B"
	}
	return n, f
}

// formatBytes prints a size in IEC units: "512 B", "1.5 KiB", "512 MiB",
// "1.0 GiB" (one decimal below 10, none above). It truncates rather than
// rounds, so free space is never shown larger than it is and a value never
// reads "1024 MiB".
func formatBytes(b uint64) string {
	const unit = 1024
	if b < unit {
		return strconv.FormatUint(b, 10) + " B"
	}
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(b) / unit
	i := 0
	for v >= unit && i < len(units)-1 {
		v /= unit
		i++
	}
	if v < 10 {
		return strconv.FormatFloat(math.Floor(v*10)/10, 'f', 1, 64) + " " + units[i]
	}
	return strconv.FormatFloat(math.Floor(v), 'f', 0, 64) + " " + units[i]
}
