// Command scalebench measures the volume store at scale (issue 16, part 5):
// three real store members and -nodes simulated node agents in this
// process, real TCP on loopback addresses and real bolt Raft logs. A
// simulated node registers, heartbeats every second, and watches the
// volumes placed on it (a Watch filtered to the node, as `cairn node`
// does) to realise each new replica as a record only: it records the
// replica's generation (SetReplicaGeneration), as a real node does once it
// made the replica's files.
//
// Then it creates -volumes volumes through the CSI controller
// (driver/csi) at -concurrency callers, pages through them with
// ListVolumes, and stops the simulated node that holds the most replicas:
// the store marks it down (10 s without a heartbeat), replaces each of its
// replicas after the stale-replica timeout (-stale), and the other nodes
// realise the new ones. Then it deletes every volume through the
// controller and waits for the leader to purge the tombstones (-retention).
// It prints the latencies, the times, the process's CPU and memory, the
// sizes of the leader's Raft log and snapshot (it takes one), and the
// process's CPU per second while nothing happens but the nodes' heartbeats:
// before any volume, with every volume live, with every volume deleted (the
// tombstones), and after the purge. The issue's "no component's work per
// second grows with the number of deleted volumes" is the third against
// the first.
//
//	go run ./tests/bench/scalebench [-nodes 100] [-volumes 10000] [-concurrency 16] [-stale 10s] [-retention 2m] [-idle 10s] [-cpuprofile FILE] [-v]
//
// It never fails on a number; it exits 1 if the cluster does not form or a
// step does not finish within its time limit.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/cairn-csi/cairn/driver/csi"
	"github.com/cairn-csi/cairn/replication/meta"
	"github.com/cairn-csi/cairn/tests/bench/benchkit"
)

const (
	members  = 3
	nodeCap  = uint64(1) << 40 // each simulated node's capacity
	volSize  = int64(1) << 30
	replicas = 3
)

type options struct {
	nodes, volumes, concurrency int
	stale, retention, idle      time.Duration
	verbose                     bool
	cpuProfile                  string
}

func main() {
	var o options
	flag.IntVar(&o.nodes, "nodes", 100, "simulated node agents")
	flag.IntVar(&o.volumes, "volumes", 10000, "volumes to create")
	flag.IntVar(&o.concurrency, "concurrency", 16, "concurrent CreateVolume callers")
	flag.DurationVar(&o.stale, "stale", 10*time.Second, "the store's stale-replica timeout (how long a down node's replicas wait before they are replaced)")
	flag.DurationVar(&o.retention, "retention", 2*time.Minute, "the store's tombstone retention (how long a deleted volume stays before the leader purges it); longer than the deletes and an idle measurement")
	flag.DurationVar(&o.idle, "idle", 10*time.Second, "how long each idle-CPU measurement lasts")
	flag.BoolVar(&o.verbose, "v", false, "log the members' warnings and errors to stderr")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the whole run (members, nodes, controller) to this file")
	flag.Parse()
	if o.nodes < replicas+1 || o.volumes < 1 || o.concurrency < 1 || o.stale < time.Second || o.retention < time.Second || o.idle < time.Second {
		fmt.Fprintf(os.Stderr, "scalebench: -nodes must be at least %d, -volumes and -concurrency at least 1, -stale, -retention and -idle at least 1s\n", replicas+1)
		os.Exit(2)
	}
	ctx, stop := benchkit.SignalContext()
	defer stop()
	if err := run(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "scalebench:", err)
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "scalebench: "+format+"\n", args...)
}

// cluster is the store members and the simulated nodes.
type cluster struct {
	root     string
	agents   []*meta.Agent
	apiAddrs []string
	sims     []*simNode
}

func run(ctx context.Context, o options) error {
	log := zap.NewNop()
	if o.verbose {
		log = zap.Must(zap.NewDevelopmentConfig().Build(zap.IncreaseLevel(zapcore.WarnLevel)))
	}
	cl, err := startMembers(log, o)
	defer cl.close()
	if err != nil {
		return err
	}
	if err := cl.waitLeader(ctx, time.Minute); err != nil {
		return err
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	start := time.Now()

	// The simulated nodes.
	for i := range o.nodes {
		s, err := startSim(ctx, fmt.Sprintf("sim-%03d", i+1), cl.apiAddrs)
		if err != nil {
			return err
		}
		cl.sims = append(cl.sims, s)
	}
	logf("%d simulated nodes registered in %v", o.nodes, time.Since(start).Round(time.Millisecond))
	idleEmpty, err := idleCPU(ctx, "no volume yet", o.idle)
	if err != nil {
		return err
	}
	cpu0 := processCPU() // the create figure counts from here

	// CreateVolume through the CSI controller.
	client, err := meta.NewClient(cl.apiAddrs)
	if err != nil {
		return err
	}
	defer client.Close()
	ctrl := csi.NewController(client)
	lat, createTook, err := createVolumes(ctx, ctrl, o)
	if err != nil {
		return err
	}
	realised, err := cl.waitRealised(ctx, client, "", 10*time.Minute)
	if err != nil {
		return err
	}
	logf("every replica realised %v after the last CreateVolume", realised.Round(time.Millisecond))
	createCPU := processCPU() - cpu0

	// ListVolumes, paged.
	listStart := time.Now()
	pages, listed, err := listAll(ctx, ctrl)
	if err != nil {
		return err
	}
	listTook := time.Since(listStart)

	// A node lost.
	victim, held, err := cl.busiestSim(ctx, client)
	if err != nil {
		return err
	}
	logf("stopping %s, which holds %d replicas", victim.id, held)
	lost := time.Now()
	victim.stop()
	if _, err := cl.waitRealised(ctx, client, victim.id, 10*time.Minute); err != nil {
		return err
	}
	replacedAfter := time.Since(lost)
	quiet, err := cl.waitQuiet(ctx, 2*time.Second, 5*time.Minute)
	if err != nil {
		return err
	}
	quietAfter := time.Since(lost)
	idleLive, err := idleCPU(ctx, fmt.Sprintf("%d live volumes", o.volumes), o.idle)
	if err != nil {
		return err
	}

	leader := cl.leader()
	var raftBytes, snapBytes int64
	var snapTook time.Duration
	if leader != nil {
		// Raft takes a snapshot only every 2 min and after 8192 entries:
		// take one, to print the size of the whole state.
		t0 := time.Now()
		if err := leader.Store().Snapshot(); err != nil {
			return fmt.Errorf("snapshot on the leader: %w", err)
		}
		snapTook = time.Since(t0)
		dir := filepath.Join(cl.root, leader.Store().NodeID())
		raftBytes = fileSize(filepath.Join(dir, "raft.db"))
		snapBytes = dirSize(filepath.Join(dir, "snapshots"))
	}
	heapLive := heapInuse()

	// Every volume deleted, then purged.
	deleteStart := time.Now()
	delLat, deleteTook, err := deleteVolumes(ctx, ctrl, client, o)
	if err != nil {
		return err
	}
	if _, err := cl.waitQuiet(ctx, 2*time.Second, 5*time.Minute); err != nil {
		return err
	}
	idleDeleted, err := idleCPU(ctx, fmt.Sprintf("%d deleted volumes", o.volumes), o.idle)
	if err != nil {
		return err
	}
	// The tombstones are measured alone only if no purge had started.
	tombsAlone := time.Since(deleteStart) < o.retention
	if err := cl.waitPurged(ctx, client, 15*time.Minute); err != nil {
		return err
	}
	purgedAfter := time.Since(deleteStart)
	if _, err := cl.waitQuiet(ctx, 2*time.Second, 5*time.Minute); err != nil {
		return err
	}
	idlePurged, err := idleCPU(ctx, "every volume purged", o.idle)
	if err != nil {
		return err
	}
	heapPurged := heapInuse()

	fmt.Printf("scalebench: the volume store with %d volumes on %d simulated nodes\n", o.volumes, o.nodes)
	fmt.Printf("date:     %s\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Printf("machine:  %s\n", benchkit.Machine())
	fmt.Printf("cluster:  %d store members and %d simulated nodes in this process (real TCP on loopback, bolt Raft logs in %s);\n", members, o.nodes, cl.root)
	fmt.Printf("          volumes of %d replicas, CreateVolume through driver/csi's controller at %d callers; stale-replica timeout %v, node down after 10s\n",
		replicas, o.concurrency, o.stale)
	fmt.Println()
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	p50, p99 := pct(lat, 0.50), pct(lat, 0.99)
	fmt.Fprintf(w, "what\tfigure\ttarget\t\n")
	fmt.Fprintf(w, "CreateVolume p50\t%s\t\t\n", ms3(p50))
	fmt.Fprintf(w, "CreateVolume p99\t%s\t< 50ms at 16 callers: %s\t\n", ms3(p99), verdict(p99 < 50*time.Millisecond && o.concurrency == 16))
	fmt.Fprintf(w, "CreateVolume max\t%s\t\t\n", ms3(lat[len(lat)-1]))
	fmt.Fprintf(w, "creates per second\t%.0f\t\t\n", float64(o.volumes)/createTook.Seconds())
	fmt.Fprintf(w, "all replicas realised after the last create\t%s\t\t\n", realised.Round(time.Millisecond))
	fmt.Fprintf(w, "ListVolumes, all pages\t%s for %d volumes in %d pages\t\t\n", listTook.Round(time.Millisecond), listed, pages)
	fmt.Fprintf(w, "%s lost (%d replicas): all re-placed and realised\t%s\t< 60s: %s\t\n", victim.id, held, replacedAfter.Round(time.Millisecond),
		verdict(replacedAfter < 60*time.Second))
	fmt.Fprintf(w, "  of which waiting for down (10s) and stale (%v)\t%s\t\t\n", o.stale, (10*time.Second + o.stale))
	fmt.Fprintf(w, "  store quiet again (no entry for %v)\t%s after the loss\t\t\n", 2*time.Second, quietAfter.Round(time.Millisecond))
	fmt.Fprintf(w, "  quiet at raft index\t%d\t\t\n", quiet)
	fmt.Fprintf(w, "process CPU, first create to all realised\t%s (%.2f ms per volume)\t\t\n", createCPU.Round(time.Millisecond), float64(createCPU.Microseconds())/1000/float64(o.volumes))
	fmt.Fprintf(w, "process peak RSS (3 members, %d nodes, the controller)\t%s\t< 1 GiB for the leader: %s\t\n", o.nodes, benchkit.HumanBytes(peakRSS()), verdict(peakRSS() < 1<<30))
	fmt.Fprintf(w, "Go heap in use, %d live volumes (after a GC)\t%s\t\t\n", o.volumes, benchkit.HumanBytes(heapLive))
	fmt.Fprintf(w, "leader's Raft log (raft.db)\t%s\t\t\n", benchkit.HumanBytes(uint64(raftBytes)))
	fmt.Fprintf(w, "leader's snapshot of %d volumes\t%s (taken in %s)\t\t\n", o.volumes, benchkit.HumanBytes(uint64(snapBytes)), snapTook.Round(time.Millisecond))
	fmt.Fprintf(w, "DeleteVolume p50, p99\t%s, %s (%.0f per second)\t\t\n", ms3(pct(delLat, 0.50)), ms3(pct(delLat, 0.99)), float64(len(delLat))/deleteTook.Seconds())
	fmt.Fprintf(w, "every tombstone purged (retention %v)\t%s after the first delete\t\t\n", o.retention, purgedAfter.Round(time.Second))
	fmt.Fprintf(w, "Go heap in use after the purge (after a GC)\t%s\t\t\n", benchkit.HumanBytes(heapPurged))
	fmt.Fprintf(w, "idle process CPU (heartbeats only), no volume yet\t%s\t\t\n", perSecond(idleEmpty))
	fmt.Fprintf(w, "  with %d live volumes\t%s\t\t\n", o.volumes, perSecond(idleLive))
	tombVerdict := verdict(idleDeleted <= idleEmpty*3/2)
	if !tombsAlone {
		tombVerdict = "not shown: purges had begun (raise -retention)"
	}
	fmt.Fprintf(w, "  with %d deleted volumes (tombstones)\t%s\tnot above no volume (×1.5 for noise): %s\t\n", o.volumes, perSecond(idleDeleted), tombVerdict)
	fmt.Fprintf(w, "  after the purge\t%s\t\t\n", perSecond(idlePurged))
	return w.Flush()
}

// idleCPU waits for d and returns the process's CPU time per second of
// it: the work of the members and simulated nodes when nobody asks them
// for anything.
func idleCPU(ctx context.Context, what string, d time.Duration) (time.Duration, error) {
	logf("measuring idle CPU for %v (%s)", d, what)
	c0, t0 := processCPU(), time.Now()
	if err := benchkit.Sleep(ctx, d); err != nil {
		return 0, err
	}
	return time.Duration(float64(processCPU()-c0) / time.Since(t0).Seconds()), nil
}

func perSecond(cpu time.Duration) string {
	return fmt.Sprintf("%.1f ms of CPU per second", float64(cpu.Microseconds())/1000)
}

// heapInuse returns the Go heap in use after a collection.
func heapInuse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "not met"
}

// startMembers starts the store members (benchkit.StartMembers), with a
// small disk of their own so that placement leaves them alone.
func startMembers(log *zap.Logger, o options) (*cluster, error) {
	m, err := benchkit.StartMembers(log, "scalebench", members, "member-", func(c *meta.AgentConfig) {
		c.StaleReplicaTimeout = o.stale
		c.TombstoneRetention = o.retention
		c.DiskUsage = func() (uint64, uint64, error) { return 1 << 20, 1 << 20, nil }
	})
	return &cluster{root: m.Root, agents: m.Agents, apiAddrs: m.APIAddrs}, err
}

func (cl *cluster) close() {
	for _, s := range cl.sims {
		s.stop()
	}
	var wg sync.WaitGroup
	for _, a := range cl.agents {
		wg.Go(func() {
			if err := a.Close(); err != nil {
				logf("close %s: %v", a.Store().NodeID(), err)
			}
		})
	}
	wg.Wait()
	if cl.root != "" {
		if err := os.RemoveAll(cl.root); err != nil {
			logf("remove %s: %v", cl.root, err)
		}
	}
}

func (cl *cluster) leader() *meta.Agent {
	for _, a := range cl.agents {
		if a.Store().IsLeader() {
			return a
		}
	}
	return nil
}

func (cl *cluster) waitLeader(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for cl.leader() == nil {
		if time.Now().After(deadline) {
			return fmt.Errorf("no leader within %v", limit)
		}
		if err := benchkit.Sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	return nil
}

// waitRealised waits until every volume has its replicas, none on the
// node gone (if not ""), each with a recorded generation; it returns how
// long that took.
func (cl *cluster) waitRealised(ctx context.Context, c *meta.Client, gone string, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	last := time.Now()
	for {
		st, err := c.State(ctx, false)
		if err != nil {
			return 0, err
		}
		pending := 0
		for _, v := range st.Volumes {
			if len(v.Replicas) != replicas {
				pending++
				continue
			}
			for _, r := range v.Replicas {
				if r.Node == gone || r.Generation == "" {
					pending++
					break
				}
			}
		}
		if pending == 0 {
			return time.Since(start), nil
		}
		if time.Since(last) > 5*time.Second {
			last = time.Now()
			logf("%d volumes still wait for a replica%s", pending, map[bool]string{true: " off " + gone, false: ""}[gone != ""])
		}
		if time.Since(start) > limit {
			return 0, fmt.Errorf("%d volumes still wait for a replica after %v", pending, limit)
		}
		if err := benchkit.Sleep(ctx, 500*time.Millisecond); err != nil {
			return 0, err
		}
	}
}

// waitQuiet waits until the leader has applied no entry for still, and
// returns its applied index.
func (cl *cluster) waitQuiet(ctx context.Context, still, limit time.Duration) (uint64, error) {
	deadline := time.Now().Add(limit)
	var idx uint64
	since := time.Now()
	for {
		l := cl.leader()
		if l != nil {
			if now := l.Store().FSM().AppliedIndex(); now != idx {
				idx, since = now, time.Now()
			} else if time.Since(since) >= still {
				return idx, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("the store did not go quiet within %v", limit)
		}
		if err := benchkit.Sleep(ctx, 100*time.Millisecond); err != nil {
			return 0, err
		}
	}
}

// waitPurged waits until the store holds no volume, not even a tombstone.
func (cl *cluster) waitPurged(ctx context.Context, c *meta.Client, limit time.Duration) error {
	start, last := time.Now(), time.Now()
	for {
		st, err := c.State(ctx, false)
		if err != nil {
			return err
		}
		if len(st.Volumes) == 0 {
			return nil
		}
		if time.Since(last) > 10*time.Second {
			last = time.Now()
			logf("%d deleted volumes not purged yet", len(st.Volumes))
		}
		if time.Since(start) > limit {
			return fmt.Errorf("%d deleted volumes still in the store after %v", len(st.Volumes), limit)
		}
		if err := benchkit.Sleep(ctx, time.Second); err != nil {
			return err
		}
	}
}

// busiestSim returns the running simulated node with the most replicas.
func (cl *cluster) busiestSim(ctx context.Context, c *meta.Client) (*simNode, int, error) {
	st, err := c.State(ctx, true)
	if err != nil {
		return nil, 0, err
	}
	count := map[string]int{}
	for _, v := range st.Volumes {
		for _, r := range v.Replicas {
			count[r.Node]++
		}
	}
	var best *simNode
	for _, s := range cl.sims {
		if best == nil || count[s.id] > count[best.id] {
			best = s
		}
	}
	if best == nil {
		return nil, 0, errors.New("no simulated node")
	}
	return best, count[best.id], nil
}

// createVolumes creates o.volumes volumes at o.concurrency callers and
// returns the sorted latencies and the total time.
func createVolumes(ctx context.Context, ctrl *csi.Controller, o options) ([]time.Duration, time.Duration, error) {
	return callAll(ctx, o.volumes, o.concurrency, "volumes created", func(i int) error {
		_, err := ctrl.CreateVolume(ctx, &csipb.CreateVolumeRequest{
			Name:          fmt.Sprintf("pvc-scale-%05d", i),
			CapacityRange: &csipb.CapacityRange{RequiredBytes: volSize},
			VolumeCapabilities: []*csipb.VolumeCapability{{
				AccessType: &csipb.VolumeCapability_Mount{Mount: &csipb.VolumeCapability_MountVolume{FsType: "ext4"}},
				AccessMode: &csipb.VolumeCapability_AccessMode{Mode: csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			}},
			Parameters: map[string]string{"replicas": fmt.Sprint(replicas)},
		})
		if err != nil {
			return fmt.Errorf("CreateVolume %d: %w", i, err)
		}
		return nil
	})
}

// deleteVolumes deletes every volume through the controller at
// o.concurrency callers and returns the sorted latencies and the total time.
func deleteVolumes(ctx context.Context, ctrl *csi.Controller, c *meta.Client, o options) ([]time.Duration, time.Duration, error) {
	st, err := c.State(ctx, false)
	if err != nil {
		return nil, 0, err
	}
	ids := make([]string, 0, len(st.Volumes))
	for id := range st.Volumes {
		ids = append(ids, id)
	}
	logf("deleting %d volumes", len(ids))
	return callAll(ctx, len(ids), o.concurrency, "volumes deleted", func(i int) error {
		if _, err := ctrl.DeleteVolume(ctx, &csipb.DeleteVolumeRequest{VolumeId: ids[i]}); err != nil {
			return fmt.Errorf("DeleteVolume %s: %w", ids[i], err)
		}
		return nil
	})
}

// callAll makes calls 0..n-1 at conc callers, logging progress as "N
// done" every 5 s, and returns their sorted latencies and the total time.
// It stops at the first error.
func callAll(ctx context.Context, n, conc int, done string, call func(i int) error) ([]time.Duration, time.Duration, error) {
	lat := make([]time.Duration, n)
	var next, finished atomic.Int64
	var firstErr error
	var errOnce sync.Once
	start := time.Now()
	lastLog := time.Now()
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				t0 := time.Now()
				err := call(i)
				lat[i] = time.Since(t0)
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
				f := finished.Add(1)
				mu.Lock()
				if time.Since(lastLog) > 5*time.Second {
					lastLog = time.Now()
					logf("%d %s", f, done)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	if firstErr != nil {
		return nil, 0, firstErr
	}
	slices.Sort(lat)
	return lat, took, ctx.Err()
}

// listAll pages through ListVolumes and returns the pages and entries.
func listAll(ctx context.Context, ctrl *csi.Controller) (pages, entries int, err error) {
	token := ""
	for {
		resp, err := ctrl.ListVolumes(ctx, &csipb.ListVolumesRequest{MaxEntries: 500, StartingToken: token})
		if err != nil {
			return pages, entries, fmt.Errorf("ListVolumes page %d: %w", pages+1, err)
		}
		pages++
		entries += len(resp.Entries)
		if token = resp.NextToken; token == "" {
			return pages, entries, nil
		}
	}
}

// simNode is a simulated node agent.
type simNode struct {
	id     string
	c      *meta.Client
	cancel context.CancelFunc
	done   sync.WaitGroup
}

func startSim(ctx context.Context, id string, addrs []string) (*simNode, error) {
	c, err := meta.NewClient(addrs)
	if err != nil {
		return nil, err
	}
	s := &simNode{id: id, c: c}
	if _, err := c.Apply(ctx, &meta.RegisterNode{Node: meta.Node{ID: id, RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:1", DataAddr: "127.0.0.1:1",
		CapacityBytes: nodeCap, FreeBytes: nodeCap}}); err != nil {
		c.Close()
		return nil, fmt.Errorf("register %s: %w", id, err)
	}
	sctx, cancel := context.WithCancel(ctx)
	s.cancel = cancel
	s.done.Go(func() { s.heartbeat(sctx) })
	s.done.Go(func() { s.realise(sctx) })
	return s, nil
}

func (s *simNode) stop() {
	if s.cancel != nil {
		s.cancel()
		s.done.Wait()
		s.c.Close()
		s.cancel = nil
	}
}

func (s *simNode) heartbeat(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_ = s.c.Heartbeat(hctx, &meta.HeartbeatRequest{NodeID: s.id, CapacityBytes: nodeCap, FreeBytes: nodeCap})
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// realise records a generation for each replica placed on this node that
// has none yet: what a node does once it made the replica's files.
func (s *simNode) realise(ctx context.Context) {
	// The watch may show a replica again before the event of its recorded
	// generation arrives: record each once.
	recorded := map[string]bool{}
	_ = s.c.Watch(ctx, meta.WatchRequest{Node: s.id}, func(ev *meta.WatchEvent) error {
		for _, v := range ev.Volumes {
			for _, r := range v.Replicas {
				if r.Node != s.id || r.Generation != "" || recorded[r.ID] {
					continue
				}
				recorded[r.ID] = true
				var b [16]byte
				_, _ = rand.Read(b[:])
				actx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := s.c.Apply(actx, &meta.SetReplicaGeneration{VolumeID: v.ID, ReplicaID: r.ID, Generation: hex.EncodeToString(b[:])})
				cancel()
				if err != nil && ctx.Err() == nil && !errors.Is(err, meta.ErrNotFound) {
					logf("%s: record the generation of %s: %v", s.id, r.ID, err)
					delete(recorded, r.ID) // the next event tries again
				}
			}
		}
		return ctx.Err()
	})
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func peakRSS() uint64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return uint64(ru.Maxrss) << 10
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func dirSize(dir string) int64 {
	var n int64
	_ = filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

func pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

func ms3(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }
