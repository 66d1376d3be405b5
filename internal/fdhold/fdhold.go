// Package fdhold keeps open file descriptors on behalf of another process,
// so that they outlive it: the first piece of a node agent restart that
// keeps its FUSE volumes (docs/restart.md). A FUSE connection lives as long
// as some process holds its /dev/fuse descriptor; a Holder in a small,
// stable process holds a duplicate of each, and the restarted agent takes
// them back.
//
// The protocol is one request and one reply per message on a unix
// SOCK_SEQPACKET socket, each a JSON object; a descriptor travels beside
// its message as SCM_RIGHTS, which makes it a duplicate of the sender's
// (the same open file). A Get hands out a duplicate and keeps its own: an
// agent that dies again before it has finished taking its descriptors back
// loses nothing. Only Drop, after the agent has unmounted, lets one go.
package fdhold

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// maxMessage bounds a request or reply (a List of many entries included).
const maxMessage = 1 << 20

// ErrNotHeld: Get or Drop of a name the holder does not hold.
var ErrNotHeld = errors.New("not held")

// Entry describes one held descriptor.
type Entry struct {
	Name string          `json:"name"`
	Meta json.RawMessage `json:"meta,omitempty"`
	// Since is when it was put.
	Since time.Time `json:"since"`
}

type request struct {
	Op   string          `json:"op"` // put, get, drop, list
	Name string          `json:"name,omitempty"`
	Meta json.RawMessage `json:"meta,omitempty"`
}

type reply struct {
	Error    string          `json:"error,omitempty"`
	NotHeld  bool            `json:"not_held,omitempty"`
	Meta     json.RawMessage `json:"meta,omitempty"`
	Entries  []Entry         `json:"entries,omitempty"`
	Replaced bool            `json:"replaced,omitempty"`
}

type held struct {
	f     *os.File
	entry Entry
}

// Holder holds descriptors by name. Safe for concurrent use.
type Holder struct {
	log  *zap.Logger
	mu   sync.Mutex
	held map[string]*held
}

// New returns an empty Holder.
func New(log *zap.Logger) *Holder {
	return &Holder{log: log.Named("fdhold"), held: map[string]*held{}}
}

// Listen listens on a SOCK_SEQPACKET unix socket at path. A socket file
// left by a holder that died is removed; one that a live holder answers
// on is not (ErrExist).
func Listen(path string) (*net.UnixListener, error) {
	if c, err := net.DialTimeout("unixpacket", path, 200*time.Millisecond); err == nil {
		_ = c.Close() // only a probe
		return nil, fmt.Errorf("fdhold: a holder already listens on %s: %w", path, fs.ErrExist)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("fdhold: remove stale socket %s: %w", path, err)
	}
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("fdhold: %w", err)
	}
	return l, nil
}

// Serve answers requests on l's connections until l is closed.
func (h *Holder) Serve(l *net.UnixListener) error {
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("fdhold: accept: %w", err)
		}
		go h.serveConn(c)
	}
}

// Close lets every held descriptor go.
func (h *Holder) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var err error
	for name, e := range h.held {
		err = errors.Join(err, e.f.Close())
		delete(h.held, name)
	}
	return err
}

func (h *Holder) serveConn(c *net.UnixConn) {
	defer c.Close()
	buf := make([]byte, maxMessage)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return // the peer closed (a zero-length message is its EOF)
		}
		files, ferr := filesOf(oob[:oobn])
		var req request
		var rep reply
		var out *os.File
		switch {
		case ferr != nil:
			rep.Error = ferr.Error()
		case json.Unmarshal(buf[:n], &req) != nil:
			rep.Error = "fdhold: request is not JSON"
		default:
			rep, out, files = h.handle(req, files)
		}
		for _, f := range files { // any the request brought and nobody kept
			_ = f.Close()
		}
		err = send(c, rep, out)
		if out != nil {
			_ = out.Close() // the peer has its own duplicate now
		}
		if err != nil {
			h.log.Warn("reply not sent", zap.String("op", req.Op), zap.String("name", req.Name), zap.Error(err))
			return
		}
	}
}

// handle runs one request. It returns the reply, a descriptor to send with
// it (closed by the caller), and the request's descriptors it did not keep.
func (h *Holder) handle(req request, files []*os.File) (reply, *os.File, []*os.File) {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch req.Op {
	case "put":
		if req.Name == "" || len(files) != 1 {
			return reply{Error: fmt.Sprintf("fdhold: put needs a name and one descriptor (got %q and %d)", req.Name, len(files))}, nil, files
		}
		old, replaced := h.held[req.Name]
		if replaced {
			_ = old.f.Close()
		}
		h.held[req.Name] = &held{f: files[0], entry: Entry{Name: req.Name, Meta: req.Meta, Since: time.Now().UTC()}}
		h.log.Info("holding a descriptor", zap.String("name", req.Name), zap.Bool("replaced", replaced), zap.Int("held", len(h.held)))
		return reply{Replaced: replaced}, nil, nil
	case "get":
		e, ok := h.held[req.Name]
		if !ok {
			return reply{NotHeld: true, Error: fmt.Sprintf("fdhold: %q: %v", req.Name, ErrNotHeld)}, nil, files
		}
		// A duplicate of our own, closed once sent: the holder keeps e.f.
		fd, err := syscall.Dup(int(e.f.Fd()))
		if err != nil {
			return reply{Error: fmt.Sprintf("fdhold: duplicate %q: %v", req.Name, err)}, nil, files
		}
		h.log.Info("handing a descriptor back", zap.String("name", req.Name))
		return reply{Meta: e.entry.Meta}, os.NewFile(uintptr(fd), req.Name), files
	case "drop":
		e, ok := h.held[req.Name]
		if !ok {
			return reply{NotHeld: true, Error: fmt.Sprintf("fdhold: %q: %v", req.Name, ErrNotHeld)}, nil, files
		}
		delete(h.held, req.Name)
		err := e.f.Close()
		h.log.Info("let a descriptor go", zap.String("name", req.Name), zap.Int("held", len(h.held)), zap.Error(err))
		return reply{}, nil, files
	case "list":
		var rep reply
		for _, e := range h.held {
			rep.Entries = append(rep.Entries, e.entry)
		}
		slices.SortFunc(rep.Entries, func(a, b Entry) int { return strings.Compare(a.Name, b.Name) })
		return rep, nil, files
	}
	return reply{Error: fmt.Sprintf("fdhold: unknown request %q", req.Op)}, nil, files
}

// send writes one message: v as JSON, with f's descriptor if f is set.
func send(c *net.UnixConn, v any, f *os.File) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if len(b) > maxMessage {
		return fmt.Errorf("fdhold: message of %d bytes, at most %d", len(b), maxMessage)
	}
	var oob []byte
	if f != nil {
		oob = syscall.UnixRights(int(f.Fd()))
	}
	n, oobn, err := c.WriteMsgUnix(b, oob, nil)
	if err == nil && (n != len(b) || oobn != len(oob)) {
		err = fmt.Errorf("fdhold: short write (%d of %d bytes, %d of %d control bytes)", n, len(b), oobn, len(oob))
	}
	return err
}

// filesOf turns the SCM_RIGHTS descriptors of a message into files.
func filesOf(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("fdhold: control message: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := syscall.ParseUnixRights(&m)
		if err != nil {
			continue // not SCM_RIGHTS
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "received"))
		}
	}
	return files, nil
}

// Client talks to a holder. One request at a time.
type Client struct {
	mu       sync.Mutex
	c        *net.UnixConn
	buf, oob []byte // for replies, under mu
}

// Dial connects to the holder listening at path.
func Dial(path string) (*Client, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("fdhold: dial %s: %w", path, err)
	}
	return &Client{c: c, buf: make([]byte, maxMessage), oob: make([]byte, syscall.CmsgSpace(4*4))}, nil
}

// Close closes the connection; the holder keeps what it holds.
func (c *Client) Close() error { return c.c.Close() }

// Put has the holder keep a duplicate of f under name, with meta (JSON,
// may be nil) to hand back with it. A descriptor held under name already
// is let go. f stays open for the caller.
func (c *Client) Put(name string, f *os.File, meta json.RawMessage) error {
	_, _, err := c.call(request{Op: "put", Name: name, Meta: meta}, f)
	return err
}

// Get returns a duplicate of the descriptor held under name, and its meta.
// The holder keeps its own until Drop.
func (c *Client) Get(name string) (*os.File, json.RawMessage, error) {
	rep, f, err := c.call(request{Op: "get", Name: name}, nil)
	if err != nil {
		return nil, nil, err
	}
	if f == nil {
		return nil, nil, fmt.Errorf("fdhold: get %q: the reply carried no descriptor", name)
	}
	return f, rep.Meta, nil
}

// Drop has the holder let the descriptor held under name go.
func (c *Client) Drop(name string) error {
	_, _, err := c.call(request{Op: "drop", Name: name}, nil)
	return err
}

// List returns what the holder holds, by name.
func (c *Client) List() ([]Entry, error) {
	rep, _, err := c.call(request{Op: "list"}, nil)
	return rep.Entries, err
}

func (c *Client) call(req request, f *os.File) (reply, *os.File, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := send(c.c, req, f); err != nil {
		return reply{}, nil, fmt.Errorf("fdhold: %s %q: %w", req.Op, req.Name, err)
	}
	buf, oob := c.buf, c.oob
	n, oobn, _, _, err := c.c.ReadMsgUnix(buf, oob)
	if err == nil && n == 0 {
		err = errors.New("the holder closed the connection")
	}
	if err != nil {
		return reply{}, nil, fmt.Errorf("fdhold: %s %q: %w", req.Op, req.Name, err)
	}
	files, err := filesOf(oob[:oobn])
	if err != nil {
		return reply{}, nil, err
	}
	var rep reply
	if err := json.Unmarshal(buf[:n], &rep); err != nil {
		for _, f := range files {
			_ = f.Close()
		}
		return reply{}, nil, fmt.Errorf("fdhold: %s %q: reply is not JSON: %w", req.Op, req.Name, err)
	}
	if rep.Error != "" {
		for _, f := range files {
			_ = f.Close()
		}
		if rep.NotHeld {
			return rep, nil, fmt.Errorf("fdhold: %s %q: %w", req.Op, req.Name, ErrNotHeld)
		}
		return rep, nil, errors.New(rep.Error)
	}
	var out *os.File
	for i, f := range files {
		if i == 0 {
			out = f
			continue
		}
		_ = f.Close()
	}
	return rep, out, nil
}
