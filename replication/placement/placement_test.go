package placement

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

const (
	kib = uint64(1) << 10
	mib = uint64(1) << 20
	gib = uint64(1) << 30
)

// up is an up node; capacity and allocation in GiB.
func up(id, zone string, capGiB, allocGiB uint64) Node {
	return Node{ID: id, Zone: zone, Up: true, CapacityBytes: capGiB * gib, AllocatedBytes: allocGiB * gib}
}

func down(n Node) Node {
	n.Up = false
	return n
}

// threeZones is 3 zones × 2 nodes where zone a is the emptiest and zone c the
// fullest, so that least-used alone would put every replica in zone a.
func threeZones() []Node {
	return []Node{
		up("a-1", "a", 100, 0),
		up("a-2", "a", 100, 0),
		up("b-1", "b", 100, 50),
		up("b-2", "b", 100, 60),
		up("c-1", "c", 100, 70),
		up("c-2", "c", 100, 80),
	}
}

func replace(nodes []Node, n Node) []Node {
	out := slices.Clone(nodes)
	for i := range out {
		if out[i].ID == n.ID {
			out[i] = n
		}
	}
	return out
}

func TestPlace(t *testing.T) {
	huge := func(id string, capB, allocB uint64) Node {
		return Node{ID: id, Up: true, CapacityBytes: capB, AllocatedBytes: allocB}
	}
	tests := []struct {
		name  string
		nodes []Node
		req   Request
		want  []string
	}{
		{
			name: "least used by ratio, not by bytes",
			nodes: []Node{
				up("a", "", 100, 50), // 0.5
				up("b", "", 200, 60), // 0.3
				up("c", "", 10, 4),   // 0.4
			},
			req:  Request{Replicas: 1, SizeBytes: gib},
			want: []string{"b"},
		},
		{
			name: "all replicas ordered by usage",
			nodes: []Node{
				up("a", "", 100, 50),
				up("b", "", 200, 60),
				up("c", "", 10, 4),
			},
			req:  Request{Replicas: 3, SizeBytes: gib},
			want: []string{"b", "c", "a"},
		},
		{
			name:  "equal usage broken by id",
			nodes: []Node{up("n2", "", 10, 1), up("n3", "", 20, 2), up("n1", "", 30, 3)},
			req:   Request{Replicas: 2, SizeBytes: gib},
			want:  []string{"n1", "n2"},
		},
		{
			name: "usage compared exactly near 1",
			// (M-1)/M > (M-2)/(M-1), which float64 cannot tell apart;
			// the id tie-break would pick "a".
			nodes: []Node{
				huge("a", math.MaxUint64, math.MaxUint64-1),
				huge("b", math.MaxUint64-1, math.MaxUint64-2),
			},
			req:  Request{Replicas: 1, SizeBytes: 1, OverProvisioningRatio: 2},
			want: []string{"b"},
		},
		{
			name:  "zone spread over emptiness",
			nodes: threeZones(),
			req:   Request{Replicas: 3, SizeBytes: gib},
			want:  []string{"a-1", "b-1", "c-1"},
		},
		{
			name:  "fourth replica goes back to the least used zone member",
			nodes: threeZones(),
			req:   Request{Replicas: 4, SizeBytes: gib},
			want:  []string{"a-1", "b-1", "c-1", "a-2"},
		},
		{
			name:  "replacement goes to the zone without a replica",
			nodes: threeZones(),
			req: Request{
				Replicas:      1,
				SizeBytes:     gib,
				Exclude:       []string{"a-1", "b-1", "c-1"}, // a-1, b-1 stay, c-1 is replaced
				ExistingZones: []string{"a", "b"},
			},
			want: []string{"c-2"},
		},
		{
			name:  "existing zones counted with multiplicity",
			nodes: []Node{up("a-2", "a", 100, 0), up("b-2", "b", 100, 90)},
			req: Request{
				Replicas:      1,
				SizeBytes:     gib,
				ExistingZones: []string{"a", "a", "b"},
			},
			want: []string{"b-2"},
		},
		{
			name:  "no topology means plain least used",
			nodes: []Node{up("x", "", 100, 10), up("y", "", 100, 5), up("z", "", 100, 1)},
			req:   Request{Replicas: 2, SizeBytes: gib, ExistingZones: []string{""}},
			want:  []string{"z", "y"},
		},
		{
			name:  "allowed zones",
			nodes: threeZones(),
			req:   Request{Replicas: 2, SizeBytes: gib, AllowedZones: []string{"b", "c"}},
			want:  []string{"b-1", "c-1"},
		},
		{
			name:  "allowed zones, more replicas than zones",
			nodes: threeZones(),
			req:   Request{Replicas: 3, SizeBytes: gib, AllowedZones: []string{"c", "b"}},
			want:  []string{"b-1", "c-1", "b-2"},
		},
		{
			name:  "preferred node first, others spread around it",
			nodes: threeZones(),
			req:   Request{Replicas: 3, SizeBytes: gib, PreferredNode: "c-2"},
			want:  []string{"c-2", "a-1", "b-1"},
		},
		{
			name:  "preferred node that is down is skipped",
			nodes: replace(threeZones(), down(up("c-2", "c", 100, 80))),
			req:   Request{Replicas: 3, SizeBytes: gib, PreferredNode: "c-2"},
			want:  []string{"a-1", "b-1", "c-1"},
		},
		{
			name:  "preferred node that is excluded is skipped",
			nodes: threeZones(),
			req:   Request{Replicas: 1, SizeBytes: gib, PreferredNode: "c-2", Exclude: []string{"c-2"}},
			want:  []string{"a-1"},
		},
		{
			name:  "preferred node outside allowed zones is skipped",
			nodes: threeZones(),
			req:   Request{Replicas: 1, SizeBytes: gib, PreferredNode: "c-2", AllowedZones: []string{"b"}},
			want:  []string{"b-1"},
		},
		{
			name:  "preferred node without room is skipped",
			nodes: replace(threeZones(), up("c-2", "c", 100, 100)),
			req:   Request{Replicas: 1, SizeBytes: gib, PreferredNode: "c-2"},
			want:  []string{"a-1"},
		},
		{
			name:  "unknown preferred node is ignored",
			nodes: threeZones(),
			req:   Request{Replicas: 1, SizeBytes: gib, PreferredNode: "nope"},
			want:  []string{"a-1"},
		},
		{
			name:  "over-provisioning fits at 2.0, exactly at the limit",
			nodes: []Node{up("x", "", 10, 15), up("y", "", 10, 9)},
			req:   Request{Replicas: 2, SizeBytes: 5 * gib, OverProvisioningRatio: 2.0},
			want:  []string{"y", "x"},
		},
		{
			name:  "over-provisioning at 1.5 admits only the node with room",
			nodes: []Node{up("x", "", 10, 15), up("y", "", 10, 9)},
			req:   Request{Replicas: 1, SizeBytes: 5 * gib, OverProvisioningRatio: 1.5},
			want:  []string{"y"},
		},
		{
			name:  "ratio below 1 keeps a reserve",
			nodes: []Node{up("x", "", 10, 4), up("y", "", 10, 3)},
			req:   Request{Replicas: 1, SizeBytes: gib + 1, OverProvisioningRatio: 0.5},
			want:  []string{"y"},
		},
		{
			name:  "full size fits exactly at ratio 1",
			nodes: []Node{up("x", "", 10, 9)},
			req:   Request{Replicas: 1, SizeBytes: gib},
			want:  []string{"x"},
		},
		{
			name:  "no uint64 overflow in allocated+size",
			nodes: []Node{huge("big", math.MaxUint64, math.MaxUint64-1)},
			req:   Request{Replicas: 1, SizeBytes: 10, OverProvisioningRatio: 2},
			want:  []string{"big"},
		},
		{
			name: "down nodes skipped",
			nodes: []Node{
				down(up("a", "", 100, 0)),
				up("b", "", 100, 10),
				up("c", "", 100, 20),
				up("d", "", 100, 30),
			},
			req:  Request{Replicas: 2, SizeBytes: gib},
			want: []string{"b", "c"},
		},
		{
			name: "excluded nodes skipped",
			nodes: []Node{
				up("a", "", 100, 0),
				up("b", "", 100, 10),
				up("c", "", 100, 20),
			},
			req:  Request{Replicas: 1, SizeBytes: gib, Exclude: []string{"b", "a", "not-a-node"}},
			want: []string{"c"},
		},
	}

	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Place(tc.nodes, tc.req)
			if err != nil {
				t.Fatalf("Place: %v", err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("Place = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestPlaceInsufficient(t *testing.T) {
	tests := []struct {
		name  string
		nodes []Node
		req   Request
		want  string // the whole message
	}{
		{
			name: "down and full",
			nodes: []Node{
				up("node-1", "", 100, 0),
				up("node-2", "", 100, 0),
				down(up("node-3", "", 100, 0)),
				{ID: "node-4", Up: true, CapacityBytes: 2 * gib, AllocatedBytes: gib + 512*mib},
			},
			req:  Request{Replicas: 3, SizeBytes: gib},
			want: "not enough eligible nodes: need 3 nodes, 2 eligible: node-3 is down; node-4 lacks space (needs 1.0 GiB, 512 MiB free at ratio 1.0)",
		},
		{
			name:  "over-provisioned at ratio 1.0",
			nodes: []Node{up("x", "", 10, 15), up("y", "", 10, 9)},
			req:   Request{Replicas: 2, SizeBytes: 5 * gib, OverProvisioningRatio: 1.0},
			want:  "not enough eligible nodes: need 2 nodes, 0 eligible: 2 nodes lack space (needs 5.0 GiB at ratio 1.0; x has 0 B free, y has 1.0 GiB free)",
		},
		{
			name:  "ratio 0 means 1.0",
			nodes: []Node{up("x", "", 10, 15), up("y", "", 10, 9)},
			req:   Request{Replicas: 1, SizeBytes: 5 * gib},
			want:  "not enough eligible nodes: need 1 node, 0 eligible: 2 nodes lack space (needs 5.0 GiB at ratio 1.0; x has 0 B free, y has 1.0 GiB free)",
		},
		{
			name:  "free space is truncated, not rounded up",
			nodes: []Node{{ID: "x", Up: true, CapacityBytes: 2*gib - 1, AllocatedBytes: gib}},
			req:   Request{Replicas: 1, SizeBytes: gib},
			want:  "not enough eligible nodes: need 1 node, 0 eligible: x lacks space (needs 1.0 GiB, 1023 MiB free at ratio 1.0)",
		},
		{
			name:  "sizes that print alike are given in bytes",
			nodes: []Node{up("x", "", 2, 1)},
			req:   Request{Replicas: 1, SizeBytes: gib + 50*mib},
			want:  "not enough eligible nodes: need 1 node, 0 eligible: x lacks space (needs 1126170624 B, 1073741824 B free at ratio 1.0)",
		},
		{
			name:  "uint64 limit",
			nodes: []Node{{ID: "x", Up: true, CapacityBytes: math.MaxUint64, AllocatedBytes: math.MaxUint64}},
			req:   Request{Replicas: 1, SizeBytes: 1},
			want:  "not enough eligible nodes: need 1 node, 0 eligible: x lacks space (needs 1 B, 0 B free at ratio 1.0)",
		},
		{
			name: "every reason, in order, with counts",
			nodes: []Node{
				up("z1", "x", 100, 0),
				up("s1", "a", 1, 1),
				down(up("d5", "a", 100, 0)),
				up("e1", "a", 100, 0),
				down(up("d2", "a", 100, 0)),
				down(up("d1", "a", 100, 0)),
				down(up("d4", "a", 100, 0)),
				down(up("d3", "a", 100, 0)),
				up("ok", "a", 100, 0),
			},
			req: Request{Replicas: 2, SizeBytes: gib, Exclude: []string{"e1"}, AllowedZones: []string{"a"}},
			want: "not enough eligible nodes: need 2 nodes, 1 eligible: 5 nodes are down (d1, d2, d3 and 2 more); " +
				"e1 is excluded; z1 is not in an allowed zone (zone \"x\"); s1 lacks space (needs 1.0 GiB, 0 B free at ratio 1.0)",
		},
		{
			name:  "several outside the allowed zones",
			nodes: []Node{up("p", "x", 100, 0), up("q", "", 100, 0)},
			req:   Request{Replicas: 1, SizeBytes: gib, AllowedZones: []string{"a"}},
			want:  "not enough eligible nodes: need 1 node, 0 eligible: 2 nodes are not in an allowed zone (p in \"x\", q in \"\")",
		},
		{
			name:  "exclusion leaves too few",
			nodes: []Node{up("a", "", 100, 0), up("b", "", 100, 0), up("c", "", 100, 0)},
			req:   Request{Replicas: 2, SizeBytes: gib, Exclude: []string{"a", "c"}},
			want:  "not enough eligible nodes: need 2 nodes, 1 eligible: 2 nodes are excluded (a, c)",
		},
		{
			name:  "too few nodes",
			nodes: []Node{up("a", "", 100, 0), up("b", "", 100, 0)},
			req:   Request{Replicas: 3, SizeBytes: gib},
			want:  "not enough eligible nodes: need 3 nodes, 2 eligible: only 2 nodes known",
		},
		{
			name: "no nodes",
			req:  Request{Replicas: 1, SizeBytes: gib},
			want: "not enough eligible nodes: need 1 node, 0 eligible: no nodes known",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Place(tc.nodes, tc.req)
			if !errors.Is(err, ErrInsufficientNodes) {
				t.Fatalf("Place = %v, %v; want an error wrapping ErrInsufficientNodes", got, err)
			}
			if errors.Is(err, ErrInvalidRequest) {
				t.Errorf("error %v also wraps ErrInvalidRequest", err)
			}
			if got != nil {
				t.Errorf("Place returned nodes %v with an error", got)
			}
			if err.Error() != tc.want {
				t.Errorf("message\n got: %s\nwant: %s", err, tc.want)
			}
		})
	}
}

func TestPlaceInvalid(t *testing.T) {
	nodes := []Node{up("a", "", 100, 0), up("b", "", 100, 0)}
	tests := []struct {
		name  string
		nodes []Node
		req   Request
		want  string // a substring of the message
	}{
		{name: "zero replicas", nodes: nodes, req: Request{Replicas: 0, SizeBytes: gib}, want: "replicas must be at least 1, got 0"},
		{name: "negative replicas", nodes: nodes, req: Request{Replicas: -1, SizeBytes: gib}, want: "got -1"},
		{name: "zero size", nodes: nodes, req: Request{Replicas: 1}, want: "size must be greater than 0"},
		{name: "negative ratio", nodes: nodes, req: Request{Replicas: 1, SizeBytes: gib, OverProvisioningRatio: -1}, want: "over-provisioning ratio"},
		{name: "NaN ratio", nodes: nodes, req: Request{Replicas: 1, SizeBytes: gib, OverProvisioningRatio: math.NaN()}, want: "got NaN"},
		{name: "infinite ratio", nodes: nodes, req: Request{Replicas: 1, SizeBytes: gib, OverProvisioningRatio: math.Inf(1)}, want: "got +Inf"},
		{
			name:  "duplicate node ids",
			nodes: []Node{up("b", "", 1, 0), up("a", "", 1, 0), up("b", "", 2, 0), up("a", "", 1, 0), up("c", "", 1, 0)},
			req:   Request{Replicas: 1, SizeBytes: gib},
			want:  `duplicate node ids "a", "b"`,
		},
		{
			name:  "duplicate down nodes count too",
			nodes: []Node{down(up("a", "", 1, 0)), down(up("a", "", 1, 0))},
			req:   Request{Replicas: 1, SizeBytes: gib},
			want:  `duplicate node ids "a"`,
		},
		{name: "empty node id", nodes: []Node{up("", "", 100, 0)}, req: Request{Replicas: 1, SizeBytes: gib}, want: "1 node with an empty id"},
		{
			name: "every problem at once",
			req:  Request{Replicas: 0, SizeBytes: 0, OverProvisioningRatio: -2},
			want: "invalid placement request: replicas must be at least 1, got 0; size must be greater than 0; over-provisioning ratio must be a finite number >= 0, got -2",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Place(tc.nodes, tc.req)
			if !errors.Is(err, ErrInvalidRequest) {
				t.Fatalf("Place = %v, %v; want an error wrapping ErrInvalidRequest", got, err)
			}
			if errors.Is(err, ErrInsufficientNodes) {
				t.Errorf("error %v also wraps ErrInsufficientNodes", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("message %q does not contain %q", err, tc.want)
			}
		})
	}
}

// TestPlaceDeterministic checks that the answer does not depend on the order
// of the node slice, on a cluster with many ties.
func TestPlaceDeterministic(t *testing.T) {
	var nodes []Node
	for i := range 30 {
		zone := fmt.Sprintf("z%d", i%4)
		if i%7 == 0 {
			zone = ""
		}
		n := up(fmt.Sprintf("node-%02d", i), zone, 100, uint64(i%3)*10)
		n.Up = i%11 != 5
		nodes = append(nodes, n)
	}
	requests := []struct {
		name string
		req  Request
	}{
		{"one", Request{Replicas: 1, SizeBytes: gib}},
		{"three", Request{Replicas: 3, SizeBytes: gib}},
		{"five with existing zones", Request{Replicas: 5, SizeBytes: gib, ExistingZones: []string{"z0", "z1"}, Exclude: []string{"node-00", "node-01"}}},
		{"preferred and allowed", Request{Replicas: 3, SizeBytes: gib, PreferredNode: "node-10", AllowedZones: []string{"z2", "z3", ""}}},
		{"over-provisioned", Request{Replicas: 4, SizeBytes: 85 * gib, OverProvisioningRatio: 1.0}},
		{"insufficient", Request{Replicas: 40, SizeBytes: gib}},
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, rc := range requests {
		t.Run(rc.name, func(t *testing.T) {
			want, wantErr := Place(nodes, rc.req)
			for i := range 50 {
				shuffled := slices.Clone(nodes)
				rng.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
				got, err := Place(shuffled, rc.req)
				if !slices.Equal(got, want) || fmt.Sprint(err) != fmt.Sprint(wantErr) {
					t.Fatalf("shuffle %d: Place = %v, %v; want %v, %v", i, got, err, want, wantErr)
				}
			}
		})
	}
}

// TestPlaceDoesNotModifyInput guards the caller's slices.
func TestPlaceDoesNotModifyInput(t *testing.T) {
	nodes := []Node{up("c", "z", 100, 0), up("a", "z", 100, 5), up("b", "y", 100, 9)}
	orig := slices.Clone(nodes)
	req := Request{Replicas: 2, SizeBytes: gib, Exclude: []string{"x"}, ExistingZones: []string{"z"}, AllowedZones: []string{"z", "y"}}
	if _, err := Place(nodes, req); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(nodes, orig) {
		t.Fatalf("nodes changed: %v, was %v", nodes, orig)
	}
}

// TestPlaceRandomized checks the policy's invariants on random clusters
// against a simple oracle for eligibility (small numbers, so plain uint64 and
// float64 arithmetic is exact there).
func TestPlaceRandomized(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	zones := []string{"", "a", "b", "c", "d"}
	ratios := []float64{0, 0.5, 1, 1.5, 2, 3}
	for iter := range 2000 {
		nNodes := rng.IntN(12)
		var nodes []Node
		for i := range nNodes {
			nodes = append(nodes, Node{
				ID:             fmt.Sprintf("n%d", i),
				Zone:           zones[rng.IntN(len(zones))],
				Up:             rng.IntN(6) != 0,
				CapacityBytes:  uint64(rng.IntN(20)),
				AllocatedBytes: uint64(rng.IntN(30)),
			})
		}
		req := Request{
			Replicas:              1 + rng.IntN(5),
			SizeBytes:             1 + uint64(rng.IntN(8)),
			OverProvisioningRatio: ratios[rng.IntN(len(ratios))],
		}
		for _, n := range nodes {
			if rng.IntN(6) == 0 {
				req.Exclude = append(req.Exclude, n.ID)
			}
		}
		if rng.IntN(2) == 0 {
			for range rng.IntN(3) {
				req.ExistingZones = append(req.ExistingZones, zones[rng.IntN(len(zones))])
			}
		}
		if rng.IntN(3) == 0 {
			req.AllowedZones = []string{zones[rng.IntN(len(zones))], zones[rng.IntN(len(zones))]}
		}
		if len(nodes) > 0 && rng.IntN(3) == 0 {
			req.PreferredNode = nodes[rng.IntN(len(nodes))].ID
		}

		ratio := req.OverProvisioningRatio
		if ratio == 0 {
			ratio = 1
		}
		eligible := map[string]Node{}
		for _, n := range nodes {
			if n.Up && !slices.Contains(req.Exclude, n.ID) &&
				(len(req.AllowedZones) == 0 || slices.Contains(req.AllowedZones, n.Zone)) &&
				float64(n.AllocatedBytes+req.SizeBytes) <= float64(n.CapacityBytes)*ratio {
				eligible[n.ID] = n
			}
		}

		got, err := Place(nodes, req)
		desc := fmt.Sprintf("iteration %d: Place(%+v, %+v) = %v, %v", iter, nodes, req, got, err)
		if len(eligible) < req.Replicas {
			if !errors.Is(err, ErrInsufficientNodes) {
				t.Fatalf("%s; want ErrInsufficientNodes (%d eligible)", desc, len(eligible))
			}
			if want := fmt.Sprintf("%d eligible", len(eligible)); !strings.Contains(err.Error(), want) {
				t.Fatalf("%s; message lacks %q", desc, want)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s; want success (%d eligible)", desc, len(eligible))
		}
		if len(got) != req.Replicas {
			t.Fatalf("%s; want %d nodes", desc, req.Replicas)
		}
		seen := map[string]bool{}
		for _, id := range got {
			if seen[id] {
				t.Fatalf("%s; %s chosen twice", desc, id)
			}
			seen[id] = true
			if _, ok := eligible[id]; !ok {
				t.Fatalf("%s; %s is not eligible", desc, id)
			}
		}
		picks := got
		counts := map[string]int{}
		for _, z := range req.ExistingZones {
			counts[z]++
		}
		if _, ok := eligible[req.PreferredNode]; ok {
			if got[0] != req.PreferredNode {
				t.Fatalf("%s; eligible preferred node not first", desc)
			}
			counts[eligible[req.PreferredNode].Zone]++
			picks = got[1:]
		}
		// Invariant: each greedy pick is in a zone with the fewest replicas
		// among the zones that still have an unchosen eligible node.
		chosen := map[string]bool{}
		for _, id := range got[:len(got)-len(picks)] {
			chosen[id] = true
		}
		for _, id := range picks {
			least := math.MaxInt
			for oid, n := range eligible {
				if !chosen[oid] {
					least = min(least, counts[n.Zone])
				}
			}
			if z := eligible[id].Zone; counts[z] != least {
				t.Fatalf("%s; %s picked in zone %q with %d replicas, a zone had %d", desc, id, z, counts[z], least)
			}
			chosen[id] = true
			counts[eligible[id].Zone]++
		}
	}
}

func TestFreeBytes(t *testing.T) {
	tests := []struct {
		name  string
		node  Node
		ratio float64
		want  uint64
	}{
		{"ratio 0 means 1", Node{CapacityBytes: 10, AllocatedBytes: 3}, 0, 7},
		{"ratio 2", Node{CapacityBytes: 10, AllocatedBytes: 3}, 2, 17},
		{"fraction floors", Node{CapacityBytes: 3, AllocatedBytes: 0}, 1.5, 4},
		{"over-allocated", Node{CapacityBytes: 10, AllocatedBytes: 30}, 2, 0},
		{"clamped at max", Node{CapacityBytes: math.MaxUint64}, 2, math.MaxUint64},
		{"down nodes still answer", Node{CapacityBytes: 10, Up: false}, 1, 10},
		{"negative ratio", Node{CapacityBytes: 10}, -1, 0},
		{"NaN ratio", Node{CapacityBytes: 10}, math.NaN(), 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.node.FreeBytes(tc.ratio); got != tc.want {
				t.Fatalf("FreeBytes(%v) = %d, want %d", tc.ratio, got, tc.want)
			}
		})
	}
}

func TestFormatBytes(t *testing.T) {
	tests := []struct {
		in   uint64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{kib, "1.0 KiB"},
		{kib + kib/2, "1.5 KiB"},
		{512 * mib, "512 MiB"},
		{gib, "1.0 GiB"},
		{10 * gib, "10 GiB"},
		{gib - 1, "1023 MiB"},
		{2*gib - 1, "1.9 GiB"},
		{math.MaxUint64, "16 EiB"},
	}
	for _, tc := range tests {
		t.Run(tc.want, func(t *testing.T) {
			if got := formatBytes(tc.in); got != tc.want {
				t.Fatalf("formatBytes(%d) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

// TestReserveIOPS: a request that reserves IOPS goes only to nodes with that
// much unreserved, and says which nodes lacked it; one without a
// reservation ignores reservations.
func TestReserveIOPS(t *testing.T) {
	nodes := []Node{
		{ID: "n1", Up: true, CapacityBytes: 100, ReservableIOPS: 10000, ReservedIOPS: 9500},
		{ID: "n2", Up: true, CapacityBytes: 100, ReservableIOPS: 10000, ReservedIOPS: 2000},
		{ID: "n3", Up: true, CapacityBytes: 100, ReservableIOPS: 10000},
		{ID: "n4", Up: true, CapacityBytes: 100},
	}
	got, err := Place(nodes, Request{Replicas: 2, SizeBytes: 10, ReserveIOPS: 1000})
	if err != nil || !slices.Equal(slices.Sorted(slices.Values(got)), []string{"n2", "n3"}) {
		t.Fatalf("Place = %v, %v; want n2 and n3", got, err)
	}
	_, err = Place(nodes, Request{Replicas: 3, SizeBytes: 10, ReserveIOPS: 1000})
	if !errors.Is(err, ErrInsufficientNodes) || !strings.Contains(err.Error(), "2 nodes cannot reserve 1000 IOPS (n1 has 500 unreserved, n4 has 0 unreserved)") {
		t.Fatalf("three replicas: %v", err)
	}
	if got, err := Place(nodes, Request{Replicas: 4, SizeBytes: 10}); err != nil || len(got) != 4 {
		t.Fatalf("no reservation: %v, %v", got, err)
	}
}
