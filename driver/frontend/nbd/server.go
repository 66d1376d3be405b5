// Package nbd is Cairn's NBD frontend: it serves a volume's engine as one
// export over the Network Block Device protocol, so that nbdcopy, qemu-img,
// fio's nbd engine and (where the module is loaded) the kernel's nbd client
// can use it as a block device.
//
// The server speaks the fixed newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO,
// NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT) and simple replies. It
// serves READ, WRITE, FLUSH, TRIM and WRITE_ZEROES, honours FUA, and
// advertises CAN_MULTI_CONN: the engine serialises every connection's I/O, so
// a FLUSH on one connection covers writes acknowledged on another.
//
// Requests on one connection are served concurrently, up to
// Options.MaxInFlight; replies may leave out of order, as the protocol allows.
package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/cairn-csi/cairn/driver/frontend"
)

// Options tune a Server. The zero value is usable.
type Options struct {
	// ReadOnly advertises a read-only export and refuses WRITE, TRIM and
	// WRITE_ZEROES with EPERM.
	ReadOnly bool
	// MaxRequestBytes is the largest READ or WRITE served; longer ones get
	// EINVAL. 0 means 32 MiB; values are raised to at least 4096 and capped
	// at 1 GiB. It is announced as the maximum block size.
	MaxRequestBytes uint32
	// MaxInFlight bounds the requests served at once on one connection
	// (and so the buffer memory: MaxInFlight × MaxRequestBytes at worst).
	// 0 means 64.
	MaxInFlight int
	// MetricLabels are constant labels added to the server's metrics
	// (besides export), e.g. the volume, so that the servers of several
	// volumes can share one registry.
	MetricLabels map[string]string
}

const (
	defaultMaxRequestBytes = 32 << 20
	defaultMaxInFlight     = 64
	// minDrainBytes: an oversized WRITE up to this length (or
	// MaxRequestBytes, if larger) is read and discarded and answered with
	// EINVAL; a longer one closes the connection.
	minDrainBytes = 64 << 20
	// handshakeTimeout bounds negotiation, so a client that connects and
	// says nothing does not hold a connection for ever.
	handshakeTimeout = 30 * time.Second
	// readBufferSize is the buffered reader in front of each connection:
	// request headers and small WRITE payloads are read in batches.
	readBufferSize = 256 << 10
)

func (o Options) withDefaults() Options {
	if o.MaxRequestBytes == 0 {
		o.MaxRequestBytes = defaultMaxRequestBytes
	}
	o.MaxRequestBytes = max(o.MaxRequestBytes, preferredBlockSz)
	o.MaxRequestBytes = min(o.MaxRequestBytes, 1<<maxBufClass)
	if o.MaxInFlight <= 0 {
		o.MaxInFlight = defaultMaxInFlight
	}
	return o
}

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves one export of a Backend over NBD.
type Server struct {
	log     *zap.Logger
	name    string
	backend frontend.Backend
	opts    Options
	metrics *Metrics

	// ctx is passed to every backend call and cancelled by Close.
	ctx    context.Context
	cancel context.CancelFunc

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	wg        sync.WaitGroup // connection goroutines; each waits for its requests
}

// NewServer returns a server for the export exportName, backed by b. A nil
// log discards logs.
func NewServer(log *zap.Logger, exportName string, b frontend.Backend, opts Options) *Server {
	if log == nil {
		log = zap.NewNop()
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		log:       log.With(zap.String("export", exportName)),
		name:      exportName,
		backend:   b,
		opts:      opts.withDefaults(),
		metrics:   newMetrics(exportName, opts.MetricLabels),
		ctx:       ctx,
		cancel:    cancel,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
	}
}

// Metrics returns the server's metrics, for the caller to register.
func (s *Server) Metrics() *Metrics { return s.metrics }

// Serve accepts connections on l and serves each in its own goroutine. It
// returns nil when l is closed or Close is called, ErrServerClosed if the
// server was already closed, and otherwise the error Accept failed with.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = l.Close() // Serve owns l from here on
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || s.isClosed() {
				return nil
			}
			if !retryableAccept(err) {
				return fmt.Errorf("nbd: accept: %w", err)
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("nbd accept failed; retrying", zap.Error(err), zap.Duration("backoff", backoff))
			select {
			case <-time.After(backoff):
			case <-s.ctx.Done():
				return nil
			}
			continue
		}
		backoff = 0
		c := s.newConn(nc)
		if c == nil {
			return nil
		}
		go func() {
			defer s.wg.Done()
			c.serve()
		}()
	}
}

// retryableAccept reports accept errors that pass: out of file descriptors,
// a connection reset before it was accepted.
func retryableAccept(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EINTR)
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close stops accepting, closes every connection, cancels the context of
// in-flight backend calls and waits until every request and goroutine the
// server started has finished. It is safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var errs []error
	for l := range s.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for c := range s.conns {
		c.abort()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return errors.Join(errs...)
}

// newConn registers nc, or closes it and returns nil if the server is closed.
// The caller must run c.serve and then s.wg.Done.
func (s *Server) newConn(nc net.Conn) *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		_ = nc.Close() // never served
		return nil
	}
	s.wg.Add(1)
	c := &conn{
		s:    s,
		nc:   nc,
		log:  s.log.With(zap.String("remote", remoteName(nc))),
		sem:  make(chan struct{}, s.opts.MaxInFlight),
		jobs: make(chan job),
	}
	s.conns[c] = struct{}{}
	return c
}

// conn is one client connection.
type conn struct {
	s   *Server
	nc  net.Conn
	log *zap.Logger
	lim limits

	// sem holds one token per request from reading its payload until its
	// reply is sent; it bounds a connection's buffers to MaxInFlight.
	sem chan struct{}
	// Requests are served by up to MaxInFlight workers, started as needed
	// and kept until the connection ends: a long-lived goroutine keeps its
	// grown stack, where one per request would grow a new one each time.
	jobs    chan job
	workers int            // started; only the reader touches it
	reqs    sync.WaitGroup // workers

	// Replies are sent by whichever goroutine finds no one else sending
	// (see send): it takes every queued reply and writes them with one
	// writev, so replies never interleave and a burst of completions costs
	// one system call. wmu guards the queue, not the socket write.
	wmu     sync.Mutex
	queue   []reply // replies waiting to be sent
	sending bool    // a goroutine owns the socket's write side
	werr    error   // first write error; later replies are dropped
	// Owned by the sending goroutine.
	batch []reply
	iov   net.Buffers
	wiov  net.Buffers // WriteTo consumes its receiver; a field, so it does not escape

	closeOnce     sync.Once
	warnedBackend atomic.Bool
}

// abort closes the socket, which ends the reader and fails pending replies.
func (c *conn) abort() {
	c.closeOnce.Do(func() {
		_ = c.nc.Close() // nothing more can be sent or lost on this connection
	})
}

// serve runs one connection: handshake, then requests until the client
// disconnects, breaks the protocol, or the server closes.
func (c *conn) serve() {
	defer func() {
		c.s.mu.Lock()
		delete(c.s.conns, c)
		c.s.mu.Unlock()
	}()
	exp := exportInfo{
		name:     c.s.name,
		size:     c.s.backend.Size(),
		tflags:   tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn,
		maxBlock: c.s.opts.MaxRequestBytes,
	}
	if c.s.opts.ReadOnly {
		exp.tflags |= tflagReadOnly
	}
	c.lim = limits{
		size:       exp.size,
		readOnly:   c.s.opts.ReadOnly,
		maxPayload: c.s.opts.MaxRequestBytes,
		maxDrain:   max(c.s.opts.MaxRequestBytes, minDrainBytes),
	}

	_ = c.nc.SetDeadline(time.Now().Add(handshakeTimeout)) // best effort: a pipe may not support it
	if err := handshake(c.nc, exp); err != nil {
		c.abort()
		if errors.Is(err, errAborted) || errors.Is(err, io.EOF) || c.s.isClosed() {
			c.log.Debug("nbd negotiation ended", zap.Error(err))
		} else {
			c.log.Warn("nbd negotiation failed", zap.Error(err))
		}
		return
	}
	_ = c.nc.SetDeadline(time.Time{})
	c.log.Info("nbd client connected", zap.Uint64("size", exp.size), zap.Bool("read_only", c.s.opts.ReadOnly))

	err := c.receive()
	close(c.jobs) // the reader was the only sender
	clean := err == nil || errors.Is(err, io.EOF)
	if !clean {
		// A broken frame or a server shutdown: stop now, in-flight replies
		// will fail to send.
		c.abort()
	}
	c.reqs.Wait()
	c.abort()
	switch {
	case clean:
		c.log.Info("nbd client disconnected")
	case c.s.isClosed():
		c.log.Info("nbd connection closed by server shutdown")
	default:
		c.log.Warn("nbd connection closed on protocol error", zap.Error(err))
	}
}

// receive reads requests and hands those to serve to workers. It
// returns nil on NBD_CMD_DISC, io.EOF when the client hangs up between
// requests, and otherwise the reason to drop the connection.
func (c *conn) receive() error {
	br := bufio.NewReaderSize(c.nc, readBufferSize)
	var hdr [requestHeaderLen]byte
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return errShortFrame
			}
			return err
		}
		start := time.Now()
		r, err := parseRequestHeader(hdr[:])
		if err != nil {
			return err
		}
		v, errno := checkRequest(r, c.lim)
		switch v {
		case disconnect:
			c.s.metrics.byOp[opDisc].requests.Inc()
			return nil
		case hangUp:
			c.s.metrics.byOp[opWrite].requests.Inc()
			c.s.metrics.byOp[opWrite].errors.Inc()
			return fmt.Errorf("nbd: write of %d bytes is too large to drain", r.length)
		case refuse:
			if r.typ == cmdWrite {
				if _, err := br.Discard(int(r.length)); err != nil {
					return errShortFrame
				}
			}
			c.finish(r, getBuffer(0), errno, start, false)
			continue
		}

		// Wait for a slot before buffering the payload, so a connection
		// holds at most MaxInFlight payloads.
		select {
		case c.sem <- struct{}{}:
		case <-c.s.ctx.Done():
			return c.s.ctx.Err()
		}
		var n uint32
		if r.typ == cmdRead || r.typ == cmdWrite {
			n = r.length
		}
		buf := getBuffer(n)
		if r.typ == cmdWrite {
			if _, err := io.ReadFull(br, (*buf)[replyHeaderLen:]); err != nil {
				putBuffer(buf)
				<-c.sem
				return errShortFrame
			}
		}
		c.dispatch(job{r: r, buf: buf, start: start})
	}
}

// job is a checked request with its buffer (holding a WRITE's payload).
type job struct {
	r     request
	buf   *[]byte
	start time.Time
}

// dispatch hands j to an idle worker, or starts one. With MaxInFlight
// workers all busy it waits: j holds a sem token, so at most MaxInFlight-1
// other requests are unanswered and some worker is about to come back for
// more (at the latest once it has sent the replies queued behind it).
func (c *conn) dispatch(j job) {
	select {
	case c.jobs <- j:
		return
	default:
	}
	if c.workers < cap(c.sem) {
		c.workers++
		c.reqs.Add(1)
		go c.worker(j)
		return
	}
	c.jobs <- j
}

// worker serves jobs until the reader closes c.jobs.
func (c *conn) worker(first job) {
	defer c.reqs.Done()
	c.run(first)
	for j := range c.jobs {
		c.run(j)
	}
}

// run serves one checked request and sends its reply.
func (c *conn) run(j job) {
	r, buf, start := j.r, j.buf, j.start
	ctx := c.s.ctx
	b := c.s.backend
	fua := r.flags&cmdFlagFUA != 0
	var err error
	if r.length > 0 || r.typ == cmdFlush {
		switch r.typ {
		case cmdRead:
			err = b.ReadAt(ctx, (*buf)[replyHeaderLen:], r.offset)
		case cmdWrite:
			err = b.WriteAt(ctx, (*buf)[replyHeaderLen:], r.offset, fua)
		case cmdFlush:
			err = b.Flush(ctx)
		case cmdTrim:
			err = b.Trim(ctx, r.offset, uint64(r.length))
			if err == nil && fua {
				err = b.Flush(ctx)
			}
		case cmdWriteZeroes:
			// NBD_CMD_FLAG_NO_HOLE asks that the range stay allocated;
			// the backend interface has no such knob, so the engine's
			// WriteZeroes decides how zeroes are stored.
			err = b.WriteZeroes(ctx, r.offset, uint64(r.length), fua)
		default:
			panic(fmt.Sprintf("BUG: nbd: run of unchecked command %d", r.typ))
		}
	}
	var errno uint32
	if err != nil {
		errno = errnoOf(err)
		c.logBackendError(r, err)
	}
	c.finish(r, buf, errno, start, true)
}

// reply is a reply waiting to be sent.
type reply struct {
	buf  *[]byte // pooled; header first, then read data if any
	n    int     // bytes of buf to send
	slot bool    // holds a token of conn.sem, given back once sent
}

// finish records the request's metrics and queues its reply in buf, whose
// ownership passes to the sender. Metrics come first so that a client that
// has its reply also sees it counted.
func (c *conn) finish(r request, buf *[]byte, errno uint32, start time.Time, slot bool) {
	m := &c.s.metrics.byOp[opOf(r.typ)]
	m.requests.Inc()
	if errno != 0 {
		m.errors.Inc()
	}
	m.duration.Observe(time.Since(start).Seconds())

	putReplyHeader(*buf, errno, r.handle)
	n := replyHeaderLen
	if r.typ == cmdRead && errno == 0 {
		n = len(*buf)
	}
	c.send(reply{buf: buf, n: n, slot: slot})
}

// send queues rep and, unless another goroutine is already sending, sends
// everything queued until the queue is empty. The caller never waits for
// another request's reply to be written.
func (c *conn) send(rep reply) {
	c.wmu.Lock()
	c.queue = append(c.queue, rep)
	if c.sending {
		c.wmu.Unlock()
		return
	}
	c.sending = true
	for len(c.queue) > 0 {
		c.batch, c.queue = c.queue, c.batch[:0]
		err := c.werr
		c.wmu.Unlock()

		if err == nil {
			c.iov = c.iov[:0]
			for _, r := range c.batch {
				c.iov = append(c.iov, (*r.buf)[:r.n])
			}
			c.wiov = c.iov
			_, err = c.wiov.WriteTo(c.nc)
			if err != nil {
				c.abort() // the reader stops; queued replies are dropped
			}
		}
		for i, r := range c.batch {
			putBuffer(r.buf)
			if r.slot {
				<-c.sem
			}
			c.batch[i] = reply{}
		}
		clear(c.iov)

		c.wmu.Lock()
		if err != nil && c.werr == nil {
			c.werr = err
		}
	}
	c.sending = false
	c.wmu.Unlock()
}

// logBackendError logs the first backend failure of a connection as a
// warning and the rest at debug level: when the engine loses its replicas
// every request fails, and the metric counts them.
func (c *conn) logBackendError(r request, err error) {
	if errors.Is(err, context.Canceled) && c.s.isClosed() {
		return
	}
	if c.warnedBackend.CompareAndSwap(false, true) {
		c.log.Warn("nbd backend error", zap.String("op", opNames[opOf(r.typ)]),
			zap.Uint64("offset", r.offset), zap.Uint32("length", r.length), zap.Error(err))
		return
	}
	if ce := c.log.Check(zap.DebugLevel, "nbd backend error"); ce != nil {
		ce.Write(zap.String("op", opNames[opOf(r.typ)]),
			zap.Uint64("offset", r.offset), zap.Uint32("length", r.length), zap.Error(err))
	}
}

// errnoOf maps a backend error to an NBD error value. The protocol asks for
// ENOSPC on EDQUOT and EFBIG too, and EPERM for writes to something
// read-only. A cancelled call (server shutdown) and everything else is EIO;
// in particular a backend EINVAL is not passed on, since the client would
// take it to mean its request was malformed.
func errnoOf(err error) uint32 {
	switch {
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	case errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS):
		return errPerm
	default:
		return errIO
	}
}
