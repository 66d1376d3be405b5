package replica

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// metaV1 encodes m as a version-1 meta file (no generation), as replicas
// made before generations have them.
func metaV1(m metaState) []byte {
	m.Generation = "x" // encodeMeta wants one; it is cut out below
	b := encodeMeta(&m)
	body := b[:len(b)-4]
	at := metaFixedLen - 4 + len(m.ID) // the generation's length byte, after the id
	body = append(body[:at:at], body[at+1+len(m.Generation):]...)
	body[5] = 1
	return append(body, crcBytes(body)...)
}

// TestGenerationSurvivesOnlyWithTheData: a new replica draws a generation;
// it stays the same through every rewrite of the meta file and a reopen;
// the replica created again under the same id after removal has another.
func TestGenerationSurvivesOnlyWithTheData(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(dir, "r1", testSize, testExtent)
	if err != nil {
		t.Fatal(err)
	}
	gen := r.Generation()
	if err := validateGeneration(gen); err != nil || len(gen) != 32 {
		t.Fatalf("new replica's generation %q: %v, want 32 hex digits", gen, err)
	}
	if got := r.Info().Generation; got != gen {
		t.Fatalf("Info().Generation = %q, want %q", got, gen)
	}
	// Claim, writes (dirty bits) and a clean point each rewrite the meta file.
	claimed(t, r, 2)
	if err := r.WriteAt(2, []byte("data"), 3*testExtent, false); err != nil {
		t.Fatal(err)
	}
	if got := decodeMetaFile(t, filepath.Join(dir, "r1", metaFileName)).Generation; got != gen {
		t.Fatalf("meta file after a write holds generation %q, want %q", got, gen)
	}
	if err := r.MarkClean(2, 1); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	r, err = Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Generation(); got != gen {
		t.Fatalf("reopened replica has generation %q, want %q", got, gen)
	}
	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	r = openTest(t, dir, testSize, testExtent)
	if got := r.Generation(); got == gen || validateGeneration(got) != nil {
		t.Fatalf("replica created again under the same id has generation %q (the lost one had %q)", got, gen)
	}
}

// TestVersion1MetaGetsAGeneration: a replica whose meta file predates
// generations opens with everything it had, gets a generation, and keeps
// it: the meta file is rewritten as version 2 at once.
func TestVersion1MetaGetsAGeneration(t *testing.T) {
	dir := t.TempDir()
	rdir := filepath.Join(dir, "r1")
	if err := os.Mkdir(rdir, 0o700); err != nil {
		t.Fatal(err)
	}
	old := metaState{ID: "r1", Size: testSize, ExtentSize: testExtent, Epoch: 5, CleanEpoch: 4, CleanGeneration: 9,
		Dirty: make(bitmap, bitmapLen(testSize/testExtent))}
	old.Dirty.set(3)
	v1 := metaV1(old)
	if m, err := decodeMeta(v1); err != nil || m.Generation != "" || m.Epoch != 5 {
		t.Fatalf("version-1 file decodes as %+v, %v", m, err)
	}
	if err := os.WriteFile(filepath.Join(rdir, metaFileName), v1, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rdir, dataFileName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(rdir, dataFileName), testSize); err != nil {
		t.Fatal(err)
	}
	r, err := Open(dir, "r1", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	gen := r.Generation()
	if validateGeneration(gen) != nil {
		t.Fatalf("generation %q after opening a version-1 replica", gen)
	}
	info := r.Info()
	if info.Epoch != 5 || info.CleanEpoch != 4 || info.CleanGeneration != 9 || !slices.Equal(r.DirtyExtents(), []uint64{3}) {
		t.Fatalf("version-1 replica opened as %+v, dirty %v", info, r.DirtyExtents())
	}
	raw := fileBytes(t, filepath.Join(rdir, metaFileName))
	if v := uint16(raw[4])<<8 | uint16(raw[5]); v != metaVersion {
		t.Fatalf("meta file is version %d after the open, want %d", v, metaVersion)
	}
	if m := decodeMetaFile(t, filepath.Join(rdir, metaFileName)); m.Generation != gen || m.Epoch != 5 || !m.Dirty.has(3) {
		t.Fatalf("meta file after the open: %+v, want generation %q and the old state", m, gen)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if got := openTest(t, dir, 0, 0).Generation(); got != gen {
		t.Fatalf("reopened: generation %q, want %q", got, gen)
	}
}

func TestInfoGenerationCodec(t *testing.T) {
	in := Info{ID: "pvc-1.r0", Generation: "00112233445566778899aabbccddeeff", Size: 1 << 30, ExtentSize: 4 << 20, Epoch: 3}
	b := AppendInfoGeneration(nil, in)
	if got, err := DecodeInfo(b); err != nil || got != in {
		t.Fatalf("DecodeInfo = %+v, %v; want %+v", got, err, in)
	}
	// Without the generation it is the Info an older server sends, to the
	// byte, and decodes with an unknown generation.
	old := AppendInfo(nil, in)
	if !slices.Equal(b[:len(old)], old) {
		t.Fatal("AppendInfoGeneration does not start with AppendInfo's encoding")
	}
	want := in
	want.Generation = ""
	if got, err := DecodeInfo(old); err != nil || got != want {
		t.Fatalf("DecodeInfo(old form) = %+v, %v; want %+v", got, err, want)
	}
	for n := len(old) + 1; n < len(b); n++ {
		if _, err := DecodeInfo(b[:n]); !errors.Is(err, ErrProtocol) {
			t.Fatalf("generation cut at %d bytes: got %v, want ErrProtocol", n, err)
		}
	}
	if _, err := DecodeInfo(append(b, 0)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("trailing byte: got %v, want ErrProtocol", err)
	}
}

// TestClientInfoCarriesGeneration: INFO over the network reports the
// replica's generation.
func TestClientInfoCarriesGeneration(t *testing.T) {
	s, addr := startServer(t, t.TempDir())
	r := mustCreate(t, s, "vol1-r0")
	c := dial(t, addr, "vol1-r0", testSize)
	info, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Generation == "" || info.Generation != r.Generation() {
		t.Fatalf("Info over the network has generation %q, want %q", info.Generation, r.Generation())
	}
}

// TestClientInfoFallsBackForOlderServers: a server that predates
// generations refuses INFO with FlagGeneration as a bad request; the client
// asks again without it, reports the generation as unknown, and does not
// ask for it again on that connection.
func TestClientInfoFallsBackForOlderServers(t *testing.T) {
	c, requests, reply := fakeServer(t)
	old := Info{ID: "r1", Size: testSize, ExtentSize: testExtent, Epoch: 4}
	type result struct {
		info Info
		err  error
	}
	res := make(chan result, 1)
	info := func() { in, err := c.Info(context.Background()); res <- result{in, err} }
	go info()
	h := <-requests
	if h.Op != OpInfo || h.Flags != FlagGeneration {
		t.Fatalf("first INFO is %v with flags %#02x, want FlagGeneration", h.Op, h.Flags)
	}
	reply(ReplyHeader{Handle: h.Handle, Status: StatusBadRequest}, []byte("info: flags 0x08 not allowed"))
	h = <-requests
	if h.Op != OpInfo || h.Flags != 0 {
		t.Fatalf("second INFO is %v with flags %#02x, want none", h.Op, h.Flags)
	}
	reply(ReplyHeader{Handle: h.Handle}, AppendInfo(nil, old))
	if r := <-res; r.err != nil || r.info != old {
		t.Fatalf("Info = %+v, %v; want %+v", r.info, r.err, old)
	}
	go info()
	h = <-requests
	if h.Flags != 0 {
		t.Fatalf("after the fallback INFO has flags %#02x", h.Flags)
	}
	reply(ReplyHeader{Handle: h.Handle}, AppendInfo(nil, old))
	if r := <-res; r.err != nil || r.info != old {
		t.Fatalf("Info = %+v, %v; want %+v", r.info, r.err, old)
	}
}
