package fdhold

import (
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
)

// startHolder serves a Holder on a socket in a new directory.
func startHolder(t *testing.T) (string, *Holder) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "holder.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	h := New(zap.NewNop())
	done := make(chan error, 1)
	go func() { done <- h.Serve(l) }()
	t.Cleanup(func() {
		_ = l.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		_ = h.Close()
	})
	return path, h
}

func dial(t *testing.T, path string) *Client {
	t.Helper()
	c, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// pipe returns a pipe whose reader is closed at the end of the test.
func pipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r, w
}

// open reports whether the pipe read by r still has a writer somewhere:
// a read then waits (here: times out) instead of returning EOF.
func open(t *testing.T, r *os.File) bool {
	t.Helper()
	if err := r.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = r.SetReadDeadline(time.Time{}) }()
	_, err := r.Read(make([]byte, 1))
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return true
	case errors.Is(err, io.EOF):
		return false
	}
	t.Fatalf("read of the pipe: %v, want a timeout or EOF", err)
	return false
}

// TestHeldDescriptorOutlivesItsSender: the holder's duplicate keeps the
// open file alive after the sender closed its own and went away; a new
// client (a restarted agent) lists it and gets it back, as often as it
// asks, with its meta; only Drop lets it go.
func TestHeldDescriptorOutlivesItsSender(t *testing.T) {
	path, _ := startHolder(t)
	r, w := pipe(t)
	agent := dial(t, path)
	meta := json.RawMessage(`{"max_write":1048576}`)
	if err := agent.Put("vol-1", w, meta); err != nil {
		t.Fatal(err)
	}
	_ = w.Close()
	_ = agent.Close() // the agent dies
	if !open(t, r) {
		t.Fatal("the pipe lost its writer when the sender closed its descriptor")
	}

	next := dial(t, path) // the restarted agent
	list, err := next.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "vol-1" || string(list[0].Meta) != string(meta) || list[0].Since.IsZero() {
		t.Fatalf("List: %+v, want vol-1 with its meta", list)
	}
	for i := range 2 { // a Get hands out a duplicate and keeps its own
		f, m, err := next.Get("vol-1")
		if err != nil {
			t.Fatalf("Get %d: %v", i, err)
		}
		if string(m) != string(meta) {
			t.Fatalf("Get %d: meta %s, want %s", i, m, meta)
		}
		if _, err := f.Write([]byte("x")); err != nil {
			t.Fatalf("write through the descriptor got back: %v", err)
		}
		_ = f.Close()
		got := make([]byte, 1)
		if _, err := io.ReadFull(r, got); err != nil || got[0] != 'x' {
			t.Fatalf("read: %q, %v", got, err)
		}
	}
	if !open(t, r) {
		t.Fatal("Get let the holder's descriptor go")
	}
	if err := next.Drop("vol-1"); err != nil {
		t.Fatal(err)
	}
	if open(t, r) {
		t.Fatal("the pipe still has a writer after Drop")
	}
	if list, err := next.List(); err != nil || len(list) != 0 {
		t.Fatalf("List after Drop: %+v, %v", list, err)
	}
}

// TestPutReplaces: a second Put under a name lets the first descriptor go.
func TestPutReplaces(t *testing.T) {
	path, h := startHolder(t)
	c := dial(t, path)
	r1, w1 := pipe(t)
	r2, w2 := pipe(t)
	for _, w := range []*os.File{w1, w2} {
		if err := c.Put("vol-1", w, nil); err != nil {
			t.Fatal(err)
		}
		_ = w.Close()
	}
	if open(t, r1) {
		t.Fatal("the replaced descriptor is still held")
	}
	if !open(t, r2) {
		t.Fatal("the new descriptor is not held")
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if open(t, r2) {
		t.Fatal("Close did not let the held descriptors go")
	}
}

// TestBadRequests: names the holder does not hold, and a Put without a
// descriptor, are errors, and the connection goes on.
func TestBadRequests(t *testing.T) {
	path, _ := startHolder(t)
	c := dial(t, path)
	if _, _, err := c.Get("nope"); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Get of an unknown name: %v, want ErrNotHeld", err)
	}
	if err := c.Drop("nope"); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Drop of an unknown name: %v, want ErrNotHeld", err)
	}
	if err := c.Put("vol-1", nil, nil); err == nil {
		t.Fatal("Put without a descriptor succeeded")
	}
	if _, w := pipe(t); c.Put("", w, nil) == nil {
		t.Fatal("Put without a name succeeded")
	}
	if list, err := c.List(); err != nil || len(list) != 0 {
		t.Fatalf("List after refused requests: %+v, %v", list, err)
	}
}

// TestListen: a socket a live holder answers on is not taken over; one
// left by a holder that is gone is.
func TestListen(t *testing.T) {
	path, _ := startHolder(t)
	if _, err := Listen(path); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Listen on a live holder's socket: %v, want ErrExist", err)
	}
	stale := filepath.Join(t.TempDir(), "stale.sock")
	l, err := Listen(stale)
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false) // as a killed holder leaves it
	_ = l.Close()
	if _, err := os.Stat(stale); err != nil {
		t.Fatalf("the socket file is gone: %v", err)
	}
	l, err = Listen(stale)
	if err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	_ = l.Close()
}
