package meta

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cairn-csi/cairn/internal/pki"
)

// streamLayer is raft's TCP stream layer with two additions:
//
//   - every connection starts with a preamble naming the dialer's advertised
//     raft address, so the accepting side knows which peer it talks to;
//   - links to chosen peers can be cut (Partition) and restored (Heal). Fault
//     tests use this to partition real TCP members without root; production
//     never calls it.
type streamLayer struct {
	ln        net.Listener
	advertise net.Addr
	// tls, if set, wraps every connection in mutual TLS: only node
	// certificates of the cluster CA speak Raft.
	tls *pki.Credentials
	// admitPeer, if set, says whether the node a certificate names may
	// speak Raft to this member (Store: a member of its configuration).
	// A node certificate alone is not enough: raft checks who may vote,
	// but follows any AppendEntries with a newer term, so a node outside
	// the store could otherwise pose as its leader.
	admitPeer func(node string) error

	// Accept's hand-off from admit (see Accept).
	acceptOnce sync.Once
	ready      chan net.Conn
	acceptErr  chan error // holds the listener's error once it closed

	mu      sync.Mutex
	blocked map[string]bool     // raft addresses we refuse to talk to
	conns   map[net.Conn]string // open connections and their peer
}

// maxPreamble bounds the peer address a dialer may announce.
const maxPreamble = 255

func newStreamLayer(bind, advertise string, creds *pki.Credentials) (*streamLayer, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("raft listen on %s: %w", bind, err)
	}
	if advertise == "" {
		advertise = ln.Addr().String()
	}
	adv, err := net.ResolveTCPAddr("tcp", advertise)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("raft advertise address %q: %w", advertise, err)
	}
	if adv.IP == nil || adv.IP.IsUnspecified() {
		ln.Close()
		return nil, fmt.Errorf("raft advertise address %q is not one peers can dial", advertise)
	}
	return &streamLayer{ln: ln, advertise: adv, tls: creds, blocked: map[string]bool{}, conns: map[net.Conn]string{}}, nil
}

// Dial opens a connection to a peer and announces ourselves.
func (s *streamLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if s.isBlocked(string(addr)) {
		return nil, fmt.Errorf("link to %s is cut (partition)", addr)
	}
	c, err := net.DialTimeout("tcp", string(addr), timeout)
	if err != nil {
		return nil, err
	}
	if s.tls != nil {
		tc := tls.Client(c, s.tls.ClientConfig())
		if err := handshake(tc, timeout); err != nil {
			c.Close()
			return nil, fmt.Errorf("raft TLS to %s: %w", addr, err)
		}
		c = tc
	}
	self := s.advertise.String()
	pre := append([]byte{byte(len(self))}, self...)
	if _, err := c.Write(pre); err != nil {
		c.Close()
		return nil, err
	}
	return s.track(c, string(addr)), nil
}

// Accept returns the next connection from a peer that is not cut off. The
// handshake and the preamble of each connection run in a goroutine of
// their own (admit), so that a peer that connects and then says nothing
// holds up no other: raft calls Accept in one loop.
func (s *streamLayer) Accept() (net.Conn, error) {
	s.acceptOnce.Do(func() {
		s.ready = make(chan net.Conn)
		s.acceptErr = make(chan error, 1)
		go s.acceptLoop()
	})
	select {
	case c := <-s.ready:
		return c, nil
	case err := <-s.acceptErr:
		s.acceptErr <- err // for the next call
		return nil, err
	}
}

// acceptLoop accepts raw connections until the listener closes.
func (s *streamLayer) acceptLoop() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			s.acceptErr <- err
			return
		}
		go s.admit(c)
	}
}

// admit completes one connection's handshake and preamble and hands it to
// Accept, or closes it.
func (s *streamLayer) admit(c net.Conn) {
	if s.tls != nil {
		var err error
		if c, err = s.acceptTLS(c); err != nil {
			return
		}
	}
	peer, err := readPreamble(c)
	if err != nil || s.isBlocked(peer) {
		c.Close()
		return
	}
	t := s.track(c, peer)
	select {
	case s.ready <- t:
	case err := <-s.acceptErr:
		s.acceptErr <- err // closed: nobody takes it
		t.Close()
	}
}

// acceptTLS completes the server side of the handshake and admits node
// certificates only.
func (s *streamLayer) acceptTLS(c net.Conn) (net.Conn, error) {
	tc := tls.Server(c, s.tls.ServerConfig())
	if err := handshake(tc, 5*time.Second); err != nil {
		c.Close()
		return nil, err
	}
	id, err := pki.PeerIdentity(tc.ConnectionState())
	if err == nil {
		err = pki.Allow(id, "speak Raft", pki.RoleNode)
	}
	if err == nil {
		s.mu.Lock()
		admit := s.admitPeer
		s.mu.Unlock()
		if admit != nil {
			err = admit(id.Name)
		}
	}
	if err != nil {
		c.Close()
		return nil, err
	}
	return tc, nil
}

// setAdmitPeer installs the membership check of acceptTLS.
func (s *streamLayer) setAdmitPeer(f func(node string) error) {
	s.mu.Lock()
	s.admitPeer = f
	s.mu.Unlock()
}

// handshake runs a TLS handshake within timeout.
func handshake(tc *tls.Conn, timeout time.Duration) error {
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return tc.HandshakeContext(ctx)
}

func readPreamble(c net.Conn) (string, error) {
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return "", err
	}
	var n [1]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return "", err
	}
	if n[0] == 0 || n[0] > maxPreamble {
		return "", errors.New("bad raft preamble")
	}
	buf := make([]byte, n[0])
	if _, err := io.ReadFull(c, buf); err != nil {
		return "", err
	}
	return string(buf), c.SetReadDeadline(time.Time{})
}

// Close stops accepting and closes every open connection, dialed or
// accepted. raft's NetworkTransport.Close only closes the listener: without
// this, the goroutine serving each accepted connection would stay blocked in
// a read for as long as the peer keeps its end open (forever, in one process).
func (s *streamLayer) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	open := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		open = append(open, c)
	}
	s.mu.Unlock()
	for _, c := range open {
		c.Close()
	}
	return err
}

func (s *streamLayer) Addr() net.Addr { return s.advertise }

func (s *streamLayer) isBlocked(peer string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.blocked[peer]
}

func (s *streamLayer) track(c net.Conn, peer string) net.Conn {
	t := &trackedConn{Conn: c, layer: s}
	s.mu.Lock()
	s.conns[t] = peer
	s.mu.Unlock()
	return t
}

// Partition cuts the links to the given peers (raft addresses), closing the
// open connections at once.
func (s *streamLayer) Partition(peers ...string) {
	s.mu.Lock()
	var toClose []net.Conn
	for _, p := range peers {
		s.blocked[p] = true
	}
	for c, p := range s.conns {
		if s.blocked[p] {
			toClose = append(toClose, c)
		}
	}
	s.mu.Unlock()
	for _, c := range toClose {
		c.Close()
	}
}

// Heal restores every cut link.
func (s *streamLayer) Heal() {
	s.mu.Lock()
	s.blocked = map[string]bool{}
	s.mu.Unlock()
}

type trackedConn struct {
	net.Conn
	layer *streamLayer
	once  sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.layer.mu.Lock()
		delete(c.layer.conns, c)
		c.layer.mu.Unlock()
	})
	return c.Conn.Close()
}
