package replica

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cairn-csi/cairn/iosched"
	"github.com/cairn-csi/cairn/iosched/ioschedtest"
)

// grant is one request the scheduler let go.
type grant struct {
	volume string
	class  iosched.Class
}

// grantLog records, in order, the requests a scheduler let go.
type grantLog struct {
	iosched.NopObserver
	mu     sync.Mutex
	grants []grant
}

// QueueWait is reported once per request, as it is granted.
func (g *grantLog) QueueWait(volume string, c iosched.Class, _ time.Duration) {
	g.mu.Lock()
	g.grants = append(g.grants, grant{volume, c})
	g.mu.Unlock()
}

func (g *grantLog) list() []grant {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.grants)
}

// newDiskSched returns a disk scheduler of depth 1 on a frozen clock that
// logs its grants, and a function that holds its one slot until called
// again: requests sent meanwhile queue up, and the release lets them go in
// the scheduler's order. On the frozen clock requests sent together arrive
// at the same instant, so that order depends on classes, shares and
// reservations only, never on how fast the test's goroutines ran.
func newDiskSched(t *testing.T) (*iosched.Scheduler, *grantLog, func() func()) {
	sched, log, hold, _ := newDiskSchedClock(t)
	return sched, log, hold
}

// newDiskSchedClock is newDiskSched that also returns the clock.
func newDiskSchedClock(t *testing.T) (*iosched.Scheduler, *grantLog, func() func(), *ioschedtest.FrozenClock) {
	t.Helper()
	log := &grantLog{}
	clock := ioschedtest.NewFrozenClock(time.Unix(1e9, 0))
	sched, err := iosched.New(iosched.Config{Depth: 1, Clock: clock, Observer: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sched.Close)
	hold := func() func() {
		t.Helper()
		if err := sched.SetLimits("hold", iosched.Limits{}); err != nil {
			t.Fatal(err)
		}
		tk, err := sched.Acquire(context.Background(), iosched.Request{Volume: "hold", Op: iosched.Read})
		if err != nil {
			t.Fatal(err)
		}
		return tk.Done
	}
	return sched, log, hold, clock
}

// schedServer starts a server whose disk I/O goes through sched.
func schedServer(t *testing.T, sched *iosched.Scheduler) (*Server, string) {
	t.Helper()
	return startServerWithConfig(t, ServerConfig{DataDir: t.TempDir(), Sched: sched})
}

// waitQueued waits until n data operations wait for s's disk scheduler.
func waitQueued(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := int(metricValue(t, s.metrics.waiting))
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d requests wait for the disk scheduler, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// after returns the grants that followed the holder's.
func after(t *testing.T, log *grantLog) []grant {
	t.Helper()
	gs := log.list()
	if len(gs) == 0 || gs[0].volume != "hold" {
		t.Fatalf("first grant %v, want the holder's", gs)
	}
	return gs[1:]
}

// TestServerAdmitsByClass: a request's class travels as its flag over TCP
// (and in its context in process) to the server's disk scheduler, so a
// rebuild request sent first still waits behind foreground requests sent
// after it, and a scrub request behind both.
func TestServerAdmitsByClass(t *testing.T) {
	sched, log, hold := newDiskSched(t)
	s, addr := schedServer(t, sched)
	r := mustCreate(t, s, "vol1-r0")
	c := dial(t, addr, "vol1-r0", testSize)
	ctx := testCtx(t)
	if err := c.Claim(ctx, 1); err != nil {
		t.Fatal(err)
	}

	release := hold()
	errs := make(chan error, 5)
	read := func(ctx context.Context) {
		errs <- c.ReadAt(ctx, 1, make([]byte, 4096), 0)
	}
	go read(WithClass(ctx, iosched.Rebuild))
	waitQueued(t, s, 1)
	for i := 0; i < 3; i++ {
		go read(ctx)
	}
	waitQueued(t, s, 4)
	// The engine's in-process path takes its turn in the same queue.
	go func() {
		tk, err := r.Admit(WithClass(ctx, iosched.Scrub), OpChecksums, 1)
		if err == nil {
			tk.Done()
		}
		errs <- err
	}()
	waitQueued(t, s, 5)
	release()
	for i := 0; i < 5; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	want := []grant{
		{"vol1-r0", iosched.Foreground}, {"vol1-r0", iosched.Foreground}, {"vol1-r0", iosched.Foreground},
		{"vol1-r0", iosched.Rebuild}, {"vol1-r0", iosched.Scrub},
	}
	if got := after(t, log); !slices.Equal(got, want) {
		t.Fatalf("grants %v, want %v", got, want)
	}
	if n := metricValue(t, s.metrics.waiting); n != 0 {
		t.Errorf("%v requests still counted as waiting", n)
	}

	// Control operations do not wait for the disk: a claim goes through
	// while the slot is held.
	release = hold()
	defer release()
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := c.Claim(WithClass(cctx, iosched.Rebuild), 2); err != nil {
		t.Fatalf("claim while the disk is busy: %v", err)
	}
	if _, err := c.DirtyExtents(cctx); err != nil {
		t.Fatalf("dirty extents while the disk is busy: %v", err)
	}
}

// TestServerSharesDiskAcrossVolumes: a flood of requests for one volume
// does not hold up another volume's request behind it: the disk scheduler
// lets the second volume's request go among the first few.
func TestServerSharesDiskAcrossVolumes(t *testing.T) {
	sched, log, hold := newDiskSched(t)
	s, addr := startServerWithConfig(t, ServerConfig{DataDir: t.TempDir(), Sched: sched,
		VolumeOf: func(id string) string { return strings.TrimSuffix(id, "-r0") }})
	ctx := testCtx(t)
	clients := map[string]*Client{}
	for _, id := range []string{"flood-r0", "quiet-r0"} {
		if _, err := s.Create(id, testSize); err != nil {
			t.Fatal(err)
		}
		clients[id] = dial(t, addr, id, testSize)
		if err := clients[id].Claim(ctx, 1); err != nil {
			t.Fatal(err)
		}
	}
	const flood = 40
	release := hold()
	errs := make(chan error, flood+1)
	read := func(c *Client) { errs <- c.ReadAt(ctx, 1, make([]byte, 4096), 0) }
	for i := 0; i < flood; i++ {
		go read(clients["flood-r0"])
	}
	waitQueued(t, s, flood)
	go read(clients["quiet-r0"])
	waitQueued(t, s, flood+1)
	release()
	for i := 0; i < flood+1; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	gs := after(t, log)
	pos := slices.Index(gs, grant{"quiet", iosched.Foreground})
	if pos < 0 || len(gs) != flood+1 {
		t.Fatalf("grants %v: want %d of volume flood and one of volume quiet", gs, flood)
	}
	// With equal weights the quiet volume's request goes once the flood has
	// used its share: after one or two of the flood's, not after forty.
	if pos > 2 {
		t.Fatalf("the quiet volume's request went after %d of the flood's", pos)
	}
	t.Logf("the quiet volume's request went %s", ordinal(pos+1))
}

func ordinal(n int) string {
	switch n {
	case 1:
		return "first"
	case 2:
		return "second"
	case 3:
		return "third"
	}
	return fmt.Sprintf("%dth", n)
}

// TestDeletedReplicaLeavesTheScheduler: deleting a replica fails the
// requests still queued for it with ErrClosed, instead of running them
// against a replica that is gone, and frees its volume in the scheduler.
func TestDeletedReplicaLeavesTheScheduler(t *testing.T) {
	sched, _, hold := newDiskSched(t)
	s, _ := schedServer(t, sched)
	r := mustCreate(t, s, "gone-r0")
	release := hold()
	defer release()
	errc := make(chan error, 1)
	go func() {
		tk, err := r.Admit(testCtx(t), OpWrite, 4096)
		if err == nil {
			tk.Done()
		}
		errc <- err
	}()
	waitQueued(t, s, 1)
	if err := s.Delete("gone-r0"); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Fatalf("queued request of a deleted replica: %v, want ErrClosed", err)
	}
	if err := sched.SetLimits("gone-r0", iosched.Limits{MinIOPS: 1}); err != nil {
		t.Fatal(err) // registering it again works: the server removed it
	}
}

// TestAdmitWithoutScheduler: a replica of a server without a disk
// scheduler, or opened without a server, admits at once.
func TestAdmitWithoutScheduler(t *testing.T) {
	s, _ := startServer(t, t.TempDir())
	r := mustCreate(t, s, "free-r0")
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, rr := range []*Replica{r, openTest(t, t.TempDir(), testSize, 0)} {
		tk, err := rr.Admit(canceled, OpWrite, 4096)
		if err != nil {
			t.Fatalf("Admit without a scheduler: %v", err)
		}
		tk.Done()
	}
}

// TestReservationsReachTheScheduler: a volume given a reservation with
// SetReservations goes ahead of a backlogged volume that has none, and
// falls back in line once the reservation is taken away.
func TestReservationsReachTheScheduler(t *testing.T) {
	sched, log, hold, clock := newDiskSchedClock(t)
	s, _ := schedServer(t, sched)
	busy := mustCreate(t, s, "busy-r0")
	reserved := mustCreate(t, s, "reserved-r0")
	ctx := testCtx(t)
	admit := func(r *Replica, errs chan<- error) {
		tk, err := r.Admit(ctx, OpRead, 4096)
		if err == nil {
			tk.Done()
		}
		errs <- err
	}
	// position queues five requests of busy, then one of reserved, and
	// returns where reserved's went among the six.
	position := func() int {
		t.Helper()
		log.mu.Lock()
		log.grants = nil
		log.mu.Unlock()
		release := hold()
		errs := make(chan error, 6)
		for i := 0; i < 5; i++ {
			go admit(busy, errs)
		}
		waitQueued(t, s, 5)
		go admit(reserved, errs)
		waitQueued(t, s, 6)
		release()
		for i := 0; i < 6; i++ {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		return slices.Index(after(t, log), grant{"reserved-r0", iosched.Foreground})
	}
	if pos := position(); pos == 0 {
		t.Fatal("a volume without a reservation went ahead of a backlogged one")
	}
	s.SetReservations(map[string]uint64{"reserved-r0": 100, "not-here": 5})
	if pos := position(); pos != 0 {
		t.Fatalf("a volume under its reservation went %s, want first", ordinal(pos+1))
	}
	// A second later the volume would be owed I/Os again, if it still had
	// its reservation.
	clock.Advance(time.Second)
	s.SetReservations(nil)
	if pos := position(); pos == 0 {
		t.Fatal("a volume whose reservation was taken away still went first")
	}
}

// TestClientMarksDataOpsWithTheClass: under WithClass a client sets the
// class's flag on data operations, next to FUA, and on nothing else.
func TestClientMarksDataOpsWithTheClass(t *testing.T) {
	c, requests, reply := fakeServer(t)
	bg := WithClass(context.Background(), iosched.Rebuild)
	scrub := WithClass(context.Background(), iosched.Scrub)
	for _, tc := range []struct {
		name string
		call func() error
		op   Op
		want uint8
	}{
		{"foreground write", func() error { return c.WriteAt(context.Background(), 1, []byte("x"), 0, true) }, OpWrite, FlagFUA},
		{"rebuild write", func() error { return c.WriteAt(bg, 1, []byte("x"), 0, true) }, OpWrite, FlagFUA | FlagRebuild},
		{"rebuild read", func() error { return c.ReadAt(bg, 1, nil, 0) }, OpRead, FlagRebuild},
		{"scrub checksums", func() error { _, err := c.Checksums(scrub, 1, 0, 0); return err }, OpChecksums, FlagScrub},
		{"rebuild flush", func() error { return c.Flush(bg, 1) }, OpFlush, FlagRebuild},
		{"rebuild trim", func() error { return c.Trim(bg, 1, 0, 512) }, OpTrim, FlagRebuild},
		{"rebuild claim", func() error { return c.Claim(bg, 2) }, OpClaim, 0},
		{"rebuild mark clean", func() error { return c.MarkClean(bg, 2, 1) }, OpMarkClean, 0},
		{"rebuild ping", func() error { return c.Ping(bg) }, OpPing, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			errc := make(chan error, 1)
			go func() { errc <- tc.call() }()
			h := <-requests
			reply(ReplyHeader{Handle: h.Handle}, nil) // no call here expects reply data
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if h.Op != tc.op || h.Flags != tc.want {
				t.Fatalf("sent %v with flags %#02x, want %v with %#02x", h.Op, h.Flags, tc.op, tc.want)
			}
			if err := ValidateRequest(h); err != nil {
				t.Fatalf("the client sent an invalid request: %v", err)
			}
		})
	}
}

// TestClientFallsBackForOlderServers: a server that predates the class
// flags refuses a marked request as a bad request; the client sends it again
// unmarked, and marks nothing more on that connection.
func TestClientFallsBackForOlderServers(t *testing.T) {
	c, requests, reply := fakeServer(t)
	bg := WithClass(context.Background(), iosched.Rebuild)
	errc := make(chan error, 1)
	go func() { errc <- c.Flush(bg, 1) }()
	h := <-requests
	if h.Flags != FlagRebuild {
		t.Fatalf("first try has flags %#02x", h.Flags)
	}
	reply(ReplyHeader{Handle: h.Handle, Status: StatusBadRequest}, []byte("flush: flags 0x02 not allowed"))
	h = <-requests
	if h.Op != OpFlush || h.Flags != 0 {
		t.Fatalf("second try is %v with flags %#02x, want an unmarked flush", h.Op, h.Flags)
	}
	reply(ReplyHeader{Handle: h.Handle}, nil)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	go func() { errc <- c.Flush(bg, 1) }()
	h = <-requests
	if h.Flags != 0 {
		t.Fatalf("after the fallback a request has flags %#02x", h.Flags)
	}
	reply(ReplyHeader{Handle: h.Handle}, nil)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestClientKeepsMarkingAfterOtherRefusals: a marked request refused for
// another reason is refused again unmarked; the connection keeps marking.
func TestClientKeepsMarkingAfterOtherRefusals(t *testing.T) {
	c, requests, reply := fakeServer(t)
	bg := WithClass(context.Background(), iosched.Rebuild)
	errc := make(chan error, 1)
	go func() { errc <- c.Flush(bg, 1) }()
	for i := 0; i < 2; i++ {
		h := <-requests
		reply(ReplyHeader{Handle: h.Handle, Status: StatusBadRequest}, []byte("no"))
	}
	if err := <-errc; !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("got %v, want ErrInvalidArgument", err)
	}
	go func() { errc <- c.Flush(bg, 1) }()
	h := <-requests
	reply(ReplyHeader{Handle: h.Handle}, nil)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if h.Flags != FlagRebuild {
		t.Fatalf("flags %#02x after an unrelated refusal, want FlagRebuild", h.Flags)
	}
}

// TestAdmitAllocatesNothing: the turn every in-process I/O takes costs no
// allocation once the scheduler is warm, and neither does reading the
// class of an unmarked context.
func TestAdmitAllocatesNothing(t *testing.T) {
	sched, err := iosched.New(iosched.Config{Depth: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sched.Close)
	s, _ := schedServer(t, sched)
	r := mustCreate(t, s, "hot-r0")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	allocs := testing.AllocsPerRun(200, func() {
		tk, err := r.Admit(ctx, OpWrite, 4096)
		if err != nil {
			t.Fatal(err)
		}
		tk.Done()
	})
	if allocs != 0 {
		t.Fatalf("Admit allocates %v times per I/O", allocs)
	}
}

// TestClosedConnectionDropsQueuedRequests: writes waiting for the disk
// scheduler when their connection closes are dropped, not run later. Their
// client was told the connection failed; if they ran once the disk was
// free, they could land on top of a newer write that an engine reconnecting
// at the same epoch had sent meanwhile (the scheduler lets foreground work
// pass queued rebuild writes), and the acknowledged newer data would be
// lost. With more writes queued than a connection may have in flight
// ("busy"), the server's reader waits for a slot and reads nothing, so only
// the socket can tell that the peer has gone.
func TestClosedConnectionDropsQueuedRequests(t *testing.T) {
	for _, tc := range []struct {
		name string
		sent int // writes sent on the connection that closes
	}{{"one queued", 1}, {"busy", maxInFlight + 4}} {
		t.Run(tc.name, func(t *testing.T) {
			sched, _, hold := newDiskSched(t)
			s, addr := schedServer(t, sched)
			r := mustCreate(t, s, "vol1-r0")
			ctx := testCtx(t)
			c1 := dial(t, addr, "vol1-r0", testSize)
			if err := c1.Claim(ctx, 1); err != nil {
				t.Fatal(err)
			}
			release := hold()
			errs := make(chan error, tc.sent)
			for range tc.sent {
				go func() {
					errs <- c1.WriteAt(WithClass(ctx, iosched.Rebuild), 1, bytes.Repeat([]byte{'O'}, 4096), 0, false)
				}()
			}
			queued := min(tc.sent, maxInFlight)
			waitQueued(t, s, queued) // busy: the reader now waits for a slot
			c1.Close()
			for range tc.sent {
				if err := <-errs; !errors.Is(err, ErrClosed) {
					t.Fatalf("write on the closed connection: %v, want ErrClosed", err)
				}
			}
			if tc.sent == 1 {
				waitQueued(t, s, 0) // the reader saw the end: dropped at once
				queued = 0
			}

			c2 := dial(t, addr, "vol1-r0", testSize)
			done2 := make(chan error, 1)
			go func() { done2 <- c2.WriteAt(ctx, 1, bytes.Repeat([]byte{'N'}, 4096), 0, false) }()
			waitQueued(t, s, queued+1)
			release()
			if err := <-done2; err != nil {
				t.Fatal(err)
			}
			waitQueued(t, s, 0)
			for range 50 { // give a stale handler every chance to run, then look
				if err := c2.Ping(ctx); err != nil {
					t.Fatal(err)
				}
			}
			got := make([]byte, 4096)
			if err := r.ReadAt(1, got, 0); err != nil {
				t.Fatal(err)
			}
			if got[0] != 'N' {
				t.Fatalf("replica holds %q: a write of the closed connection landed after the acknowledged newer one", got[:1])
			}
			if n := testutil.CollectAndCount(s.metrics.errors); n != 0 {
				t.Errorf("the dropped requests counted as failed ones (%d error series)", n)
			}
		})
	}
}

// TestBackgroundWorkWaitsForTheDiskScheduler: a snapshot deletion's merge
// and a flatten go through the server's disk scheduler, a step at a time:
// while the disk is held by another request, each waits there, and it
// finishes once the disk is free.
func TestBackgroundWorkWaitsForTheDiskScheduler(t *testing.T) {
	sched, _, hold := newDiskSched(t)
	s, _ := schedServer(t, sched)
	r := mustCreate(t, s, "bg-r0")
	claimed(t, r, 1)
	for i, id := range []string{"s1", "s2", "s3"} {
		if err := r.WriteAt(1, randBytes(testSize/2, uint64(i)), uint64(i)*testExtent, false); err != nil {
			t.Fatal(err)
		}
		if err := r.Snapshot(1, id); err != nil {
			t.Fatal(err)
		}
	}
	want := readAll(t, r, 1)
	for _, work := range []struct {
		name string
		run  func() error
	}{
		{"delete s1", func() error { return s.DeleteSnapshot(r, 1, "s1") }},
		{"flatten into s3", func() error { return r.Flatten(testCtx(t), "s3", nil) }},
	} {
		release := hold()
		errc := make(chan error, 1)
		go func() { errc <- work.run() }()
		waitQueued(t, s, 1) // waiting for the disk: it has not finished
		p, deleting := s.Deleting("bg-r0")
		if want := work.name == "delete s1"; deleting != want || want && (p.Snapshot != "s1" || p.TotalBytes != testSize) {
			t.Fatalf("%s: Deleting = %+v, %v", work.name, p, deleting)
		}
		release()
		if err := <-errc; err != nil {
			t.Fatalf("%s: %v", work.name, err)
		}
		if _, deleting := s.Deleting("bg-r0"); deleting {
			t.Fatalf("%s: a deletion is still shown once it is done", work.name)
		}
		if i := firstDiff(readAll(t, r, 1), want); i >= 0 {
			t.Fatalf("after %s the volume differs at byte %d", work.name, i)
		}
	}
	if got := r.LayerIDs(); !slices.Equal(got, []string{"s3"}) {
		t.Fatalf("layers %v, want [s3]", got)
	}
}
