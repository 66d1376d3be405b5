package replica

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/iosched"
)

const (
	fuzzSize   = 64 << 10
	fuzzExtent = 4 << 10
)

// fuzzStream concatenates request frames.
func fuzzStream(reqs ...Request) []byte {
	var b []byte
	for _, r := range reqs {
		b = AppendRequest(b, r)
	}
	return b
}

func fuzzReq(op Op, handle, epoch, off uint64, length uint32, payload []byte) Request {
	return Request{RequestHeader: RequestHeader{Op: op, Handle: handle, Epoch: epoch, Offset: off, Length: length}, Payload: payload}
}

// flagged returns r with flags set.
func flagged(r Request, flags uint8) Request {
	r.Flags = flags
	return r
}

// fuzzServerSeeds are the inputs FuzzServerConn starts from (also committed
// under testdata/fuzz/FuzzServerConn).
func fuzzServerSeeds() [][]byte {
	open := fuzzReq(OpOpen, 1, 0, fuzzSize, 0, []byte("r"))
	return [][]byte{
		fuzzStream(open, fuzzReq(OpPing, 2, 0, 0, 0, nil)),
		fuzzStream(open,
			fuzzReq(OpClaim, 2, 1, 0, 0, nil),
			fuzzReq(OpWrite, 3, 1, 512, 8, []byte("abcdefgh")),
			fuzzReq(OpRead, 4, 1, 0, 1024, nil),
			fuzzReq(OpFlush, 5, 1, 0, 0, nil),
			fuzzReq(OpChecksums, 6, 1, 0, 16, nil),
			fuzzReq(OpReadExtent, 7, 1, 3, 0, nil),
			fuzzReq(OpDirty, 8, 0, 0, 0, nil),
			fuzzReq(OpMarkClean, 9, 1, 1, 0, nil),
			fuzzReq(OpInfo, 10, 0, 0, 0, nil),
			flagged(fuzzReq(OpInfo, 11, 0, 0, 0, nil), FlagGeneration)),
		fuzzStream(open, fuzzReq(OpTrim, 2, 0, 4096, 8192, nil), fuzzReq(OpWriteZeroes, 3, 0, 0, 100, nil)),
		fuzzStream(open, fuzzReq(OpWrite, 2, 7, 0, 4, []byte("late")), fuzzReq(OpClaim, 3, 0, 0, 0, nil)),
		fuzzStream(fuzzReq(OpWrite, 1, 0, 0, 4, []byte("none"))),
		AppendRequestHeader(nil, RequestHeader{Op: OpWrite, Handle: 1, Length: MaxPayload + 1, PayloadLen: MaxPayload + 1}),
		[]byte("GET / HTTP/1.1\r\nHost: cairn\r\n\r\n"),
		fuzzStream(open,
			flagged(fuzzReq(OpWrite, 2, 0, 4096, 4, []byte("bgwr")), FlagRebuild|FlagFUA),
			flagged(fuzzReq(OpChecksums, 3, 0, 0, 2, nil), FlagRebuild),
			flagged(fuzzReq(OpReadExtent, 4, 0, 1, 0, nil), FlagScrub),
			flagged(fuzzReq(OpRead, 5, 0, 0, 512, nil), FlagRebuild|FlagScrub), // two classes: refused
			flagged(fuzzReq(OpClaim, 6, 0, 0, 0, nil), FlagRebuild),            // not a data op: refused
			flagged(fuzzReq(OpFlush, 7, 0, 0, 0, nil), FlagScrub)),
		fuzzStream(open,
			flagged(fuzzReq(OpWrite, 2, 0, 4094, 4, append([]byte("sums"), AppendUint32s(nil, PieceSums(nil, []byte("sums"), 4094))...)), FlagSums),
			flagged(fuzzReq(OpWrite, 3, 0, 0, 4, append([]byte("bad!"), 0, 0, 0, 0)), FlagSums), // wrong checksum: refused
			flagged(fuzzReq(OpWrite, 4, 0, 0, 4, []byte("none")), FlagSums),                     // no checksums: refused
			flagged(fuzzReq(OpRehash, 5, 0, 0, 2, nil), FlagScrub)),
		// The LAYER ops: a snapshot, its layer read; a layer built from
		// one extent held as zeros, a damaged one refused, published at
		// the bottom (the sealed file the replica was created with has no
		// map: it goes), dropped again.
		fuzzStream(open,
			fuzzReq(OpSnapshot, 2, 0, 0, 0, []byte("s")),
			fuzzReq(OpLayers, 3, 0, 0, 0, nil),
			flagged(fuzzReq(OpLayerSums, 4, 0, 0, 2, []byte("s")), FlagRebuild),
			flagged(fuzzReq(OpLayerRead, 5, 0, 1, 0, []byte("s")), FlagRebuild),
			fuzzReq(OpLayerBegin, 6, 0, 0, 0, []byte("t")),
			fuzzReq(OpLayerWrite, 7, 0, 0, 6, []byte{1, 't', 0, 0, 16, 0, 1, 1}),
			fuzzReq(OpLayerWrite, 8, 0, 1, 6, []byte{1, 't', 0, 0, 16, 0, 0, 1}),
			flagged(fuzzReq(OpLayerSums, 9, 0, 0, 1, []byte("t")), FlagLayerBuild),
			fuzzReq(OpLayerSeal, 10, 0, 0, 0, []byte("t")),
			fuzzReq(OpLayerDrop, 11, 0, 0, 0, []byte("t"))),
	}
}

// decodesDataChange reports whether the server, reading in, could have
// executed a request that changes data: a valid WRITE, TRIM or WRITE_ZEROES
// frame before the first frame that breaks the framing.
func decodesDataChange(in []byte) bool {
	for len(in) > 0 {
		req, n, err := DecodeRequest(in)
		if err != nil {
			return false
		}
		switch req.Op {
		case OpWrite, OpTrim, OpWriteZeroes:
			if ValidateRequest(req.RequestHeader) == nil && req.Length > 0 {
				return true
			}
		case OpLayerSeal, OpLayerDrop, OpDeleteSnapshot:
			// They change which files hold the replica's data (the file
			// it was created with may go).
			if ValidateRequest(req.RequestHeader) == nil {
				return true
			}
		}
		in = in[n:]
	}
	return false
}

// FuzzServerConn pushes arbitrary bytes through net.Pipe into a server
// hosting one replica filled with a pattern. The server must not panic, must
// leave the replica openable, and must not change its data unless a valid
// data-changing request was decoded.
func FuzzServerConn(f *testing.F) {
	tmpl := f.TempDir()
	r, err := Open(tmpl, "r", fuzzSize, fuzzExtent)
	if err != nil {
		f.Fatal(err)
	}
	pattern := make([]byte, fuzzSize)
	for i := range pattern {
		pattern[i] = byte(i*7 + 1)
	}
	if err := r.WriteAt(0, pattern, 0, true); err != nil {
		f.Fatal(err)
	}
	if err := r.MarkClean(0, 1); err != nil {
		f.Fatal(err)
	}
	if err := r.Close(); err != nil {
		f.Fatal(err)
	}
	dataT, err := os.ReadFile(filepath.Join(tmpl, "r", dataFileName))
	if err != nil {
		f.Fatal(err)
	}
	metaT, err := os.ReadFile(filepath.Join(tmpl, "r", metaFileName))
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range fuzzServerSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		dir := t.TempDir()
		rdir := filepath.Join(dir, "r")
		if err := os.Mkdir(rdir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(rdir, dataFileName), dataT, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(rdir, metaFileName), metaT, 0o600); err != nil {
			t.Fatal(err)
		}
		// A disk scheduler of depth 1, so that requests also queue in it.
		sched, err := iosched.New(iosched.Config{Depth: 1})
		if err != nil {
			t.Fatal(err)
		}
		defer sched.Close()
		s := NewServerWithConfig(ServerConfig{Logger: zap.NewNop(), DataDir: dir, Sched: sched})
		srvEnd, cliEnd := net.Pipe()
		served := make(chan struct{})
		go func() {
			defer close(served)
			s.handleConn(srvEnd)
		}()
		drained := make(chan struct{})
		go func() {
			defer close(drained)
			_, _ = io.Copy(io.Discard, cliEnd) // replies are not checked here
		}()
		_, _ = cliEnd.Write(in) // fails once the server drops the connection
		_ = cliEnd.Close()
		<-served
		<-drained
		if err := s.Close(); err != nil {
			t.Fatalf("server Close: %v", err)
		}

		got, err := os.ReadFile(filepath.Join(rdir, dataFileName))
		if err != nil && !(errors.Is(err, fs.ErrNotExist) && decodesDataChange(in)) {
			t.Fatal(err)
		}
		if !bytes.Equal(got, dataT) && !decodesDataChange(in) {
			t.Fatal("replica data changed without a valid data-changing request")
		}
		r, err := Open(dir, "r", fuzzSize, fuzzExtent)
		if err != nil {
			t.Fatalf("replica no longer opens: %v", err)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	})
}

// TestDecodesDataChange checks the fuzz oracle itself.
func TestDecodesDataChange(t *testing.T) {
	seeds := fuzzServerSeeds()
	for i, want := range []bool{false, true, true, true, true, false, false, true} {
		if got := decodesDataChange(seeds[i]); got != want {
			t.Errorf("seed %d: %v, want %v", i, got, want)
		}
	}
	if decodesDataChange(AppendRequest(nil, fuzzReq(OpWrite, 1, 0, 0, 5, []byte("four")))) {
		t.Error("an invalid write counted as a data change")
	}
}
