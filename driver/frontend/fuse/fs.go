//go:build linux

package fuse

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofuse "github.com/hanwen/go-fuse/v2/fuse"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/cairn-csi/cairn/driver/frontend"
)

// volumeFS is the FUSE file system: one flat root directory holding one
// regular file per volume, of the volume's size (resize grows it). It
// speaks go-fuse's raw protocol interface, which exposes what the mapping
// needs (the WRITE flags that carry O_DSYNC, the fallocate mode) and keeps
// the per-request path short.
type volumeFS struct {
	// RawFileSystem answers ENOSYS for everything not served here.
	gofuse.RawFileSystem

	// ctx is the context of every backend call; it ends after Unmount.
	// FUSE interrupts are not passed on: the loop driver's requests are
	// asynchronous and never interrupted, and a backend call that has
	// started is left to finish (the engine bounds its own calls).
	ctx     context.Context
	log     *zap.Logger
	mounted time.Time

	// gate holds requests back once the server is left to a successor
	// (Server.Leave).
	gate gate

	mu      sync.RWMutex
	byName  map[string]*volumeFile
	byIno   map[uint64]*volumeFile
	handles map[uint64]*handle
	nextFh  uint64
	closed  bool
	// resumed: this server took over a connection from an earlier
	// process, whose file handles the kernel may still use (adopt).
	resumed bool
}

// volumeFile is one served volume.
type volumeFile struct {
	name string
	ino  uint64
	b    frontend.Backend
	// size is the file's size: the backend's when the file was added,
	// raised by resize after the volume grew. Requests read it without
	// fs.mu.
	size    atomic.Uint64
	created time.Time

	// Guarded by volumeFS.mu.
	lookups uint64 // the kernel's references (LOOKUP minus FORGET)
	opens   int    // open handles
	removed bool
}

// handle is one open file description.
type handle struct {
	f *volumeFile
	// dirty is set by a write, trim or zeroing since the last Flush through
	// this handle; releasing a dirty handle flushes.
	dirty atomic.Bool
}

func newVolumeFS(ctx context.Context, log *zap.Logger) *volumeFS {
	return &volumeFS{
		RawFileSystem: gofuse.NewDefaultRawFileSystem(),
		gate:          newGate(),
		ctx:           ctx,
		log:           log,
		mounted:       time.Now(),
		byName:        make(map[string]*volumeFile),
		byIno:         make(map[uint64]*volumeFile),
		handles:       make(map[uint64]*handle),
		// Handles are numbered from the clock, so that those of a
		// server that resumed an earlier one's connection never equal
		// the ones the kernel still holds from it: the earlier process
		// handed out one per open, far fewer than nanoseconds passed.
		nextFh: max(uint64(time.Now().UnixNano()), 1),
	}
}

func (fs *volumeFS) String() string { return fsName }

// add starts serving a file.
func (fs *volumeFS) add(name string, b frontend.Backend, size uint64) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if fs.closed {
		return ErrClosed
	}
	if _, ok := fs.byName[name]; ok {
		return ErrAlreadyExists
	}
	f := &volumeFile{name: name, ino: fs.inoFor(name), b: b, created: time.Now()}
	f.size.Store(size)
	fs.byName[name] = f
	fs.byIno[f.ino] = f
	return nil
}

// inoFor gives a new file its node id: a hash of its name, so that an
// agent that resumes the connection of an earlier one (Resume) gives each
// volume the node id the kernel already knows it by. Ids of live files
// and of removed files the kernel still references are never given
// again, so no stale reference reaches another file; a collision (a
// removed file of the same name still referenced, or a 64-bit hash
// clash) moves to the next free id. Called with fs.mu held.
func (fs *volumeFS) inoFor(name string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(name))
	ino := h.Sum64()
	for ino <= gofuse.FUSE_ROOT_ID || ino == pollHackIno || fs.byIno[ino] != nil {
		ino++
	}
	return ino
}

// pollHackIno is the node id go-fuse answers for itself (its poll hack).
const pollHackIno = ^uint64(0)

// resize takes the backend's current size as the file's size (the volume
// grew) and returns the file's inode with its old and new sizes. A smaller
// backend size is refused: the kernel and a loop device may already use
// the larger one.
func (fs *volumeFS) resize(name string) (ino, old, size uint64, err error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.byName[name]
	if !ok {
		return 0, 0, 0, ErrNotFound
	}
	old, size = f.size.Load(), f.b.Size()
	switch {
	case size < old:
		return f.ino, old, old, fmt.Errorf("%w: the volume is %d bytes, its file already %d", ErrInvalidSize, size, old)
	case size%512 != 0:
		return f.ino, old, old, fmt.Errorf("%w: %d is not a multiple of 512", ErrInvalidSize, size)
	}
	f.size.Store(size)
	return f.ino, old, size, nil
}

// remove stops serving a file, waiting up to wait for its handles to close.
func (fs *volumeFS) remove(name string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		fs.mu.Lock()
		f, ok := fs.byName[name]
		if !ok {
			fs.mu.Unlock()
			return ErrNotFound
		}
		if f.opens == 0 {
			delete(fs.byName, name)
			f.removed = true
			fs.maybeForgetLocked(f)
			fs.mu.Unlock()
			return nil
		}
		opens := f.opens
		fs.mu.Unlock()
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: still open (%d handles)", ErrBusy, opens)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitClosed waits up to wait for every handle to be released.
func (fs *volumeFS) waitClosed(wait time.Duration) {
	deadline := time.Now().Add(wait)
	for {
		fs.mu.RLock()
		n := len(fs.handles)
		fs.mu.RUnlock()
		if n == 0 || time.Now().After(deadline) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openNames lists the files that have open handles.
func (fs *volumeFS) openNames() []string {
	fs.mu.RLock()
	defer fs.mu.RUnlock()
	var names []string
	for _, f := range fs.byIno {
		if f.opens > 0 {
			names = append(names, f.name)
		}
	}
	slices.Sort(names)
	return names
}

// close refuses further Adds.
func (fs *volumeFS) close() {
	fs.mu.Lock()
	fs.closed = true
	fs.mu.Unlock()
}

// maybeForgetLocked drops a removed file nobody references any more.
func (fs *volumeFS) maybeForgetLocked(f *volumeFile) {
	if f.removed && f.lookups == 0 && f.opens == 0 {
		delete(fs.byIno, f.ino)
	}
}

func (fs *volumeFS) file(ino uint64) *volumeFile {
	fs.mu.RLock()
	f := fs.byIno[ino]
	fs.mu.RUnlock()
	return f
}

// handle returns the open handle fh of node ino. After a resume, a handle
// the earlier process opened (the loop device's, typically) is unknown
// here: it is adopted as if opened now, since requests name their node
// too. Its count of opens then covers the handles seen, which is what
// remove needs: the loop device's handle is seen at its first I/O.
func (fs *volumeFS) handle(ino, fh uint64) *handle {
	fs.mu.RLock()
	h := fs.handles[fh]
	resumed := fs.resumed
	fs.mu.RUnlock()
	if h != nil || !resumed {
		return h
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if h := fs.handles[fh]; h != nil {
		return h
	}
	f, ok := fs.byIno[ino]
	if !ok || f.removed {
		return nil
	}
	h = &handle{f: f}
	fs.handles[fh] = h
	f.opens++
	fs.log.Debug("file handle of the earlier server adopted", zap.String("volume_id", f.name), zap.Uint64("fh", fh))
	return h
}

func (fs *volumeFS) rootAttr(a *gofuse.Attr) {
	*a = gofuse.Attr{Ino: gofuse.FUSE_ROOT_ID, Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Blksize: 4096}
	setTimes(a, fs.mounted)
}

// fileAttr fills a; the caller holds fs.mu (either way).
func fileAttr(f *volumeFile, a *gofuse.Attr) {
	*a = gofuse.Attr{
		Ino:     f.ino,
		Size:    f.size.Load(),
		Blocks:  f.size.Load() / 512,
		Mode:    syscall.S_IFREG | 0o600,
		Nlink:   1,
		Blksize: 4096,
	}
	if f.removed {
		a.Nlink = 0
	}
	setTimes(a, f.created)
}

func setTimes(a *gofuse.Attr, t time.Time) {
	sec, nsec := uint64(t.Unix()), uint32(t.Nanosecond())
	a.Atime, a.Mtime, a.Ctime = sec, sec, sec
	a.Atimensec, a.Mtimensec, a.Ctimensec = nsec, nsec, nsec
}

func (fs *volumeFS) Lookup(_ <-chan struct{}, h *gofuse.InHeader, name string, out *gofuse.EntryOut) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	if h.NodeId != gofuse.FUSE_ROOT_ID {
		return gofuse.ENOTDIR
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.byName[name]
	if !ok {
		return gofuse.ENOENT
	}
	f.lookups++
	out.NodeId = f.ino
	out.Generation = 1
	out.SetEntryTimeout(attrTimeout)
	out.SetAttrTimeout(attrTimeout)
	fileAttr(f, &out.Attr)
	return gofuse.OK
}

func (fs *volumeFS) Forget(nodeid, nlookup uint64) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.byIno[nodeid]
	if !ok {
		return
	}
	if nlookup > f.lookups {
		nlookup = f.lookups
	}
	f.lookups -= nlookup
	fs.maybeForgetLocked(f)
}

func (fs *volumeFS) GetAttr(_ <-chan struct{}, in *gofuse.GetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	out.SetTimeout(attrTimeout)
	if in.NodeId == gofuse.FUSE_ROOT_ID {
		fs.rootAttr(&out.Attr)
		return gofuse.OK
	}
	fs.mu.RLock()
	defer fs.mu.RUnlock()
	f, ok := fs.byIno[in.NodeId]
	if !ok {
		return gofuse.ENOENT
	}
	fileAttr(f, &out.Attr)
	return gofuse.OK
}

// SetAttr accepts (and ignores) mode, owner and time changes, so tools that
// touch the file work, and refuses size changes: a volume is resized by the
// engine, not by truncate.
func (fs *volumeFS) SetAttr(_ <-chan struct{}, in *gofuse.SetAttrIn, out *gofuse.AttrOut) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	out.SetTimeout(attrTimeout)
	if in.NodeId == gofuse.FUSE_ROOT_ID {
		fs.rootAttr(&out.Attr)
		return gofuse.OK
	}
	fs.mu.RLock()
	defer fs.mu.RUnlock()
	f, ok := fs.byIno[in.NodeId]
	if !ok {
		return gofuse.ENOENT
	}
	if in.Valid&gofuse.FATTR_SIZE != 0 && in.Size != f.size.Load() {
		return gofuse.EPERM
	}
	fileAttr(f, &out.Attr)
	return gofuse.OK
}

func (fs *volumeFS) Open(_ <-chan struct{}, in *gofuse.OpenIn, out *gofuse.OpenOut) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	fs.mu.Lock()
	defer fs.mu.Unlock()
	f, ok := fs.byIno[in.NodeId]
	if !ok || f.removed {
		return gofuse.ENOENT
	}
	if in.Flags&syscall.O_TRUNC != 0 {
		return gofuse.EPERM
	}
	fh := fs.nextFh
	fs.nextFh++
	fs.handles[fh] = &handle{f: f}
	f.opens++
	out.Fh = fh
	// No page cache for volume data (all of it lives in the engine), and
	// direct writes need not hold the inode lock against each other.
	//
	// No FLUSH on close: close(2) waits for the FLUSH answer, so a process
	// that is killed while it has a volume file open (the agent itself,
	// between AttachLoop's open and close) would hang in exit waiting for
	// its own dead server, holding /dev/fuse open and every volume with
	// it. RELEASE, sent asynchronously, flushes a dirty handle instead.
	out.OpenFlags = gofuse.FOPEN_DIRECT_IO | gofuse.FOPEN_PARALLEL_DIRECT_WRITES | gofuse.FOPEN_NOFLUSH
	return gofuse.OK
}

func (fs *volumeFS) Read(_ <-chan struct{}, in *gofuse.ReadIn, buf []byte) (gofuse.ReadResult, gofuse.Status) {
	if !fs.gate.enter() {
		return nil, gofuse.EIO
	}
	defer fs.gate.exit()
	h := fs.handle(in.NodeId, in.Fh)
	if h == nil {
		return nil, gofuse.EBADF
	}
	size := h.f.size.Load()
	if in.Offset >= size {
		return gofuse.ReadResultData(nil), gofuse.OK
	}
	n := min(uint64(in.Size), size-in.Offset, uint64(len(buf)))
	p := buf[:n]
	if err := h.f.b.ReadAt(fs.ctx, p, in.Offset); err != nil {
		return nil, fs.ioStatus("read", h.f, err)
	}
	return gofuse.ReadResultData(p), gofuse.OK
}

// Writev serves WRITE; go-fuse hands the payload as it came off the device,
// in one piece unless splicing split it.
func (fs *volumeFS) Writev(_ <-chan struct{}, in *gofuse.WriteIn, data [][]byte) (uint32, gofuse.Status) {
	if !fs.gate.enter() {
		return 0, gofuse.EIO
	}
	defer fs.gate.exit()
	h := fs.handle(in.NodeId, in.Fh)
	if h == nil {
		return 0, gofuse.EBADF
	}
	var p []byte
	if len(data) == 1 {
		p = data[0]
	} else {
		for _, d := range data {
			p = append(p, d...)
		}
	}
	if size := h.f.size.Load(); uint64(len(p)) > size || in.Offset > size-uint64(len(p)) {
		// The file is the volume: like a block device, it cannot grow.
		return 0, gofuse.Status(syscall.ENOSPC)
	}
	// The kernel sets O_DSYNC in the flags of a write that must be
	// durable when it returns (O_DSYNC/O_SYNC file, RWF_DSYNC); O_SYNC
	// includes the O_DSYNC bit.
	fua := in.Flags&syscall.O_DSYNC != 0
	h.dirty.Store(true)
	if err := h.f.b.WriteAt(fs.ctx, p, in.Offset, fua); err != nil {
		return 0, fs.ioStatus("write", h.f, err)
	}
	return uint32(len(p)), gofuse.OK
}

// Write is only reached if Writev is bypassed; it shares its path.
func (fs *volumeFS) Write(cancel <-chan struct{}, in *gofuse.WriteIn, data []byte) (uint32, gofuse.Status) {
	return fs.Writev(cancel, in, [][]byte{data})
}

// Fsync serves fsync and fdatasync of the file, and the loop driver's
// REQ_OP_FLUSH (which it turns into vfs_fsync): both are Flush.
func (fs *volumeFS) Fsync(_ <-chan struct{}, in *gofuse.FsyncIn) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	var f *volumeFile
	h := fs.handle(in.NodeId, in.Fh)
	if h != nil {
		f = h.f
	} else if f = fs.file(in.NodeId); f == nil {
		return gofuse.EBADF
	}
	return fs.flush(h, f, "fsync")
}

// Flush serves FUSE FLUSH, which the kernel does not send for files opened
// with FOPEN_NOFLUSH (all of ours); if one comes anyway, a dirty handle
// flushes.
func (fs *volumeFS) Flush(_ <-chan struct{}, in *gofuse.FlushIn) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	h := fs.handle(in.NodeId, in.Fh)
	if h == nil || !h.dirty.Load() {
		return gofuse.OK
	}
	return fs.flush(h, h.f, "flush on close")
}

// flush calls Backend.Flush; h may be nil.
func (fs *volumeFS) flush(h *handle, f *volumeFile, op string) gofuse.Status {
	if h != nil {
		// Cleared before the call: a write that lands during the call
		// sets it again and is flushed by the next one.
		h.dirty.Store(false)
	}
	if err := f.b.Flush(fs.ctx); err != nil {
		if h != nil {
			h.dirty.Store(true)
		}
		return fs.ioStatus(op, f, err)
	}
	return gofuse.OK
}

// Release drops a handle once its last reference is gone (the loop driver
// detached, or the last descriptor of a process closed). A handle that is
// still dirty flushes first, so detaching a loop device makes everything
// written through it durable.
func (fs *volumeFS) Release(_ <-chan struct{}, in *gofuse.ReleaseIn) {
	if !fs.gate.enter() {
		return
	}
	defer fs.gate.exit()
	h := fs.handle(in.NodeId, in.Fh)
	if h == nil {
		return
	}
	if h.dirty.Load() {
		if st := fs.flush(h, h.f, "flush on release"); !st.Ok() {
			fs.log.Warn("flush on release failed: writes through this handle may not be durable",
				zap.String("volume_id", h.f.name), zap.Stringer("status", st))
		}
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	delete(fs.handles, in.Fh)
	h.f.opens--
	fs.maybeForgetLocked(h.f)
}

// Fallocate maps the loop driver's discard and write-zeroes (and fallocate
// on the file): PUNCH_HOLE → Trim, ZERO_RANGE → WriteZeroes. Ranges past the
// end are clipped; the file cannot grow, and plain allocation (mode 0) is
// refused because the engine cannot reserve space.
func (fs *volumeFS) Fallocate(_ <-chan struct{}, in *gofuse.FallocateIn) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	h := fs.handle(in.NodeId, in.Fh)
	if h == nil {
		return gofuse.EBADF
	}
	size := h.f.size.Load()
	keepSize := in.Mode&unix.FALLOC_FL_KEEP_SIZE != 0
	mode := in.Mode &^ unix.FALLOC_FL_KEEP_SIZE
	end := in.Offset + in.Length
	if end < in.Offset {
		return gofuse.EINVAL
	}
	if !keepSize && end > size {
		return gofuse.Status(syscall.ENOSPC)
	}
	if in.Offset >= size {
		return gofuse.OK
	}
	length := min(end, size) - in.Offset
	var err error
	switch mode {
	case unix.FALLOC_FL_PUNCH_HOLE:
		h.dirty.Store(true)
		err = h.f.b.Trim(fs.ctx, in.Offset, length)
	case unix.FALLOC_FL_ZERO_RANGE:
		h.dirty.Store(true)
		err = h.f.b.WriteZeroes(fs.ctx, in.Offset, length, false)
	default:
		return gofuse.Status(syscall.EOPNOTSUPP)
	}
	if err != nil {
		return fs.ioStatus("fallocate", h.f, err)
	}
	return gofuse.OK
}

// StatFs must succeed: the loop driver enables discard only on a backing file
// whose file system answers statfs, and uses f_bsize as discard granularity.
func (fs *volumeFS) StatFs(_ <-chan struct{}, _ *gofuse.InHeader, out *gofuse.StatfsOut) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	fs.mu.RLock()
	defer fs.mu.RUnlock()
	var total uint64
	for _, f := range fs.byName {
		total += f.size.Load()
	}
	*out = gofuse.StatfsOut{
		Blocks:  total / 4096,
		Files:   uint64(len(fs.byName)),
		Bsize:   4096,
		Frsize:  4096,
		NameLen: 255,
	}
	return gofuse.OK
}

func (fs *volumeFS) OpenDir(_ <-chan struct{}, in *gofuse.OpenIn, _ *gofuse.OpenOut) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	if in.NodeId != gofuse.FUSE_ROOT_ID {
		return gofuse.ENOTDIR
	}
	return gofuse.OK
}

// ReadDir lists ".", ".." and the files in name order; the offset of an
// entry is its index plus one.
func (fs *volumeFS) ReadDir(_ <-chan struct{}, in *gofuse.ReadIn, out *gofuse.DirEntryList) gofuse.Status {
	if !fs.gate.enter() {
		return gofuse.EIO
	}
	defer fs.gate.exit()
	if in.NodeId != gofuse.FUSE_ROOT_ID {
		return gofuse.ENOTDIR
	}
	fs.mu.RLock()
	entries := []gofuse.DirEntry{
		{Name: ".", Ino: gofuse.FUSE_ROOT_ID, Mode: syscall.S_IFDIR},
		{Name: "..", Ino: gofuse.FUSE_ROOT_ID, Mode: syscall.S_IFDIR},
	}
	names := make([]string, 0, len(fs.byName))
	for name := range fs.byName {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		entries = append(entries, gofuse.DirEntry{Name: name, Ino: fs.byName[name].ino, Mode: syscall.S_IFREG})
	}
	fs.mu.RUnlock()
	for i := in.Offset; i < uint64(len(entries)); i++ {
		e := entries[i]
		e.Off = i + 1
		if !out.AddDirEntry(e) {
			break
		}
	}
	return gofuse.OK
}

// The namespace belongs to Add and Remove.
func (fs *volumeFS) Create(<-chan struct{}, *gofuse.CreateIn, string, *gofuse.CreateOut) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Mknod(<-chan struct{}, *gofuse.MknodIn, string, *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Mkdir(<-chan struct{}, *gofuse.MkdirIn, string, *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Unlink(<-chan struct{}, *gofuse.InHeader, string) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Rmdir(<-chan struct{}, *gofuse.InHeader, string) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Rename(<-chan struct{}, *gofuse.RenameIn, string, string) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Link(<-chan struct{}, *gofuse.LinkIn, string, *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}
func (fs *volumeFS) Symlink(<-chan struct{}, *gofuse.InHeader, string, string, *gofuse.EntryOut) gofuse.Status {
	return gofuse.EPERM
}

// ioStatus turns a backend error into the errno the kernel passes up: a
// syscall.Errno as is (ENOSPC, EROFS …), anything else EIO.
func (fs *volumeFS) ioStatus(op string, f *volumeFile, err error) gofuse.Status {
	fs.log.Debug("backend I/O failed", zap.String("op", op), zap.String("volume_id", f.name), zap.Error(err))
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return gofuse.Status(errno)
	}
	return gofuse.EIO
}
