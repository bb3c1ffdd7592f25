"""The Python client: connect to a server, map files through it.

    import mpumap, numpy
    with mpumap.connect() as client, client.map("graph.bin") as m:
        edges = numpy.frombuffer(m, dtype=numpy.uint32)

A Mapping is an ``mmap.mmap`` of the region's shared buffer, read-only: it
offers the buffer protocol, so memoryview and numpy use it without a copy.
Its pages are filled by the server on first touch.
"""
import builtins
import collections
import errno
import json
import logging
import mmap
import os
import pwd
import socket
import stat
import struct
import threading
import time
import urllib.parse
import weakref

from mpumap import core, protocol
from mpumap._core import ffi, lib
from mpumap.errors import MpumapError, ServerUnavailable, TimeoutError, error
from mpumap.protocol import Advice, Msg
from mpumap.stores import scheme_of

log = logging.getLogger("mpumap.client")
PAGE = mmap.PAGESIZE

# What WELCOME says, field for field (struct mpu_welcome of c/mpu_wire.h).
ServerSettings = collections.namedtuple("ServerSettings", protocol.WELCOME.fields)


DEFAULT_TIMEOUT = float(lib.MPU_REQUEST_SECONDS)
FLUSH_SECONDS = float(lib.MPU_FLUSH_SECONDS)  # a flush waits for the disk


def request_timeout(explicit=None):
    """Seconds a request may wait for the server: `explicit`, else
    $MPUMAP_TIMEOUT, else 10.  Page faults are not requests: they wait."""
    if explicit is not None:
        value, source = explicit, "timeout"
    elif os.environ.get("MPUMAP_TIMEOUT"):
        value, source = os.environ["MPUMAP_TIMEOUT"], "MPUMAP_TIMEOUT"
    else:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{source} must be a positive number of seconds, not {value!r}")
    return seconds


def connect(socket_path=None, timeout=None):
    """Connect to the server on socket_path (else $MPUMAP_SOCKET, else the
    default) and return a Client.  Its requests give up after `timeout`
    seconds (else $MPUMAP_TIMEOUT, else 10) with mpumap.TimeoutError."""
    return Client(socket_path, timeout)


def _trusted_uids():
    """Whose server a client hands its memory: root's, its own user's, and
    the user $MPUMAP_SERVER_USER names (a name or a uid)."""
    uids = {0, os.geteuid()}
    named = os.environ.get("MPUMAP_SERVER_USER", "").strip()
    if named.isdigit():
        uids.add(int(named))
    elif named:
        try:
            uids.add(pwd.getpwnam(named).pw_uid)
        except KeyError:
            pass
    return uids


def _check_server_user(sock, path):
    """Refuse a server run by a user not trusted with this process's
    memory: HELLO hands it our userfaultfd, with which it writes into us,
    and each MAP a descriptor of ours.  Anyone may bind a socket in /tmp
    while the real server is down."""
    _, uid, _ = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("iII")))
    if uid not in _trusted_uids():
        raise PermissionError(errno.EPERM, f"the server at {path} runs as uid {uid}, neither "
                              f"root nor this process's user: not handing it this process's "
                              f"memory (MPUMAP_SERVER_USER={uid} trusts that user)")


def _open_socket(path, timeout):
    """A connection to the server, made within `timeout` seconds: a full
    accept queue makes a Unix socket's connect wait, or fail at once with
    EAGAIN when it must not wait, so it is tried again until the deadline."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(path)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"the mpumap server at {path} accepts "
                                       f"no connection (waited {timeout:g} s)") from None
                time.sleep(0.01)
            except OSError as exc:
                raise ServerUnavailable(exc.errno, f"no mpumap server at {path}: "
                                        f"{exc.strerror}") from None
        sock.settimeout(max(0.001, deadline - time.monotonic()))
    except BaseException:
        sock.close()
        raise
    return sock


def _exchange(sock, path, timeout, kind, payload=b"", fds=()):
    """Send a request and read its reply, each within the socket's timeout;
    returns (data, fds) of the reply, b'' if the server closed."""
    try:
        protocol.send(sock, kind, payload, fds)
    except builtins.TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"the server at {path} took no request "
                           f"in {timeout:g} s") from None
    except OSError as exc:
        # A server that refuses us says why, then closes: read that.
        sent = exc
    else:
        sent = None
    try:
        data, rfds = protocol.receive(sock)
    except builtins.TimeoutError:
        raise TimeoutError(errno.ETIMEDOUT, f"the server at {path} did not answer in "
                           f"{timeout:g} s") from None
    except OSError as exc:
        sent = sent or exc
        data, rfds = b"", []
    if not data and sent is not None:
        raise ServerUnavailable(sent.errno, f"lost the server at {path}: "
                                f"{sent.strerror}") from None
    if not data:
        raise ServerUnavailable(errno.ECONNRESET, f"the server at {path} closed the "
                                "connection")
    return data, rfds


def _reply(data, rfds, expect):
    """Check a reply; an ERROR reply becomes the exception for its errno."""
    try:
        kind, payload, values = protocol.unpack(data, len(rfds))
    except protocol.ProtocolError as exc:
        protocol.close_all(rfds)
        raise MpumapError(errno.EPROTO, f"bad reply from the server: {exc}") from None
    if kind == Msg.ERROR:
        protocol.close_all(rfds)
        raise error(*protocol.parse_error(payload))
    if expect is not None and kind != expect:
        protocol.close_all(rfds)
        raise MpumapError(errno.EPROTO, f"expected {expect.name}, got {kind.name}")
    return payload, values


def server_stats(socket_path=None, timeout=None, *, session=None):
    """The server's status, asked without mapping anything (and so without a
    userfaultfd): settings, buffer counters, workers, clients, regions; with
    a session tag, also what the clients of that session used.  A user who
    is neither root nor the server's user sees their own clients and regions
    only."""
    path = protocol.socket_path(socket_path)
    timeout = request_timeout(timeout)
    with _open_socket(path, timeout) as sock:
        data, fds = _exchange(sock, path, timeout, Msg.STATS,
                              (session or "").encode()[:protocol.MAX_SESSION])
    payload, _ = _reply(data, fds, Msg.STATS_REPLY)
    return json.loads(payload)


# A fork waits while a mapping is set up or taken down: between its mmap and
# MADV_DONTFORK a child would inherit a range no userfaultfd watches, where a
# read plants a zero page in the buffer every client sees; between the guard
# letting go of a range and its munmap, the child would get no placeholder
# there (see c/guard.c).  Only local calls run under it, never a request.
_FORK_LOCK = threading.Lock()
_LIVE_CLIENTS = weakref.WeakSet()


def _after_fork_in_child():
    _FORK_LOCK.release()
    # A forked child has none of the parent's mappings (MADV_DONTFORK; the
    # guard's fork handler left placeholders there) and no guard thread: let
    # go of the guards' descriptors without touching anything else.
    for client in list(_LIVE_CLIENTS):
        client._abandon_guard()


os.register_at_fork(before=_FORK_LOCK.acquire, after_in_parent=_FORK_LOCK.release,
                    after_in_child=_after_fork_in_child)


def _forsaken(guard, uffd):
    """What a Client dropped without close() must still do, before its
    socket's own finalizer closes the descriptor: stop the guard that polls
    it.  Left running, the guard would keep the connection open (closing a
    descriptor does not wake a poll on it) and, once the server went, map
    files over ranges that are no longer the client's.  (weakref callbacks
    run before the socket's finalizer.)"""
    lib.mpu_guard_stop(guard)
    os.close(uffd)


class Client:
    """A connection to the server, and the mappings made through it.

    Owns the socket, this process's userfaultfd (kept open for as long as
    any mapping lives) and the fallback guard thread.  One request at a time
    (a lock), each within `timeout` seconds; a request that timed out leaves
    the connection unfit for more (its reply could still come, and be taken
    for the next one's), though its mappings stay readable.
    """

    def __init__(self, socket_path=None, timeout=None):
        self.socket_path = protocol.socket_path(socket_path)
        self.timeout = request_timeout(timeout)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._mappings = {}
        self._guard = None
        self._uffd = None
        self._unfit = None  # why requests may no longer be made
        self._sock = _open_socket(self.socket_path, self.timeout)
        try:
            _check_server_user(self._sock, self.socket_path)
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(self.timeout)
        # We keep our userfaultfd open for as long as any mapping lives: were
        # the server's copy the last one, its death would unregister our
        # ranges and the kernel would fill their holes with zeros.
        try:
            self._uffd, self.uffd_kind = core.uffd_open()
        except OSError:
            self._sock.close()
            raise
        try:
            # A launcher (mpumap-client run) tags its command's clients, so
            # that it can ask the server what they used.
            session = os.environ.get("MPUMAP_SESSION", "").encode()[:protocol.MAX_SESSION]
            (server,), values, _ = self._call(Msg.HELLO, protocol.U32.pack(0) + session,
                                              [self._uffd], expect=Msg.WELCOME)
            # Should the server die, a C thread (it needs no GIL, which a
            # thread blocked on a fault may hold) maps the files themselves
            # over our mappings and wakes the threads that wait on them.
            # The server's pidfd tells it a server that died from one that
            # dropped us.
            try:
                guard = lib.mpu_guard_start(self._sock.fileno(), self._uffd, server)
            finally:
                os.close(server)
            if guard == ffi.NULL:
                raise OSError(ffi.errno, f"starting the fallback guard: "
                              f"{os.strerror(ffi.errno)}")
            self._guard = guard
        except BaseException:
            self._close_descriptors()
            raise
        self._forsaken = weakref.finalize(self, _forsaken, self._guard, self._uffd)
        _LIVE_CLIENTS.add(self)
        self.settings = ServerSettings(*values)
        if self.uffd_kind == "user-mode-only":
            log.info("userfaultfd in user-mode-only mode: system calls that read a "
                     "mapping's pages before the program touched them fail with EFAULT")

    # -- requests --------------------------------------------------------------

    def _call(self, kind, payload=b"", fds=(), expect=None, timeout=None):
        if self._sock is None:
            raise ServerUnavailable(errno.ENOTCONN, "the client is closed")
        if os.getpid() != self._pid:
            raise MpumapError(errno.ECHILD, "this client belongs to process "
                              f"{self._pid}: connect again in the child")
        with self._lock:
            if self._unfit:
                raise ServerUnavailable(errno.ENOTCONN, f"{self._unfit}: this connection "
                                        "takes no more requests; connect again")
            try:
                # (A request that writes back waits longer than others.)
                self._sock.settimeout(timeout or self.timeout)
                data, rfds = _exchange(self._sock, self.socket_path,
                                       timeout or self.timeout, kind, payload, fds)
            except TimeoutError as exc:
                self._unfit = f"a request timed out ({exc.strerror})"
                raise
            except (KeyboardInterrupt, SystemExit) as exc:
                # Its reply may yet come, and would be taken for the next
                # request's: as after a timeout.
                self._unfit = f"a request was interrupted ({type(exc).__name__})"
                raise
            except protocol.DescriptorsLost as exc:
                self._give_back(exc.data)
                raise MpumapError(errno.EMFILE, "a descriptor the server sent found no room "
                                  "in this process (its RLIMIT_NOFILE)") from None
        payload, values = _reply(data, rfds, expect)
        return rfds, values, payload

    def _give_back(self, data):
        """A MAPPED whose memfd found no descriptor here: the server holds
        the mapping all the same, so say UNMAP.  (Under the request lock.)"""
        try:
            kind, _, values = protocol.unpack(data, 1)
            if kind != Msg.MAPPED:
                return
            _exchange(self._sock, self.socket_path, self.timeout, Msg.UNMAP,
                      protocol.U64.pack(values[0]))
        except (OSError, protocol.ProtocolError) as exc:
            log.debug("giving back a mapping: %s", exc)

    def map(self, source, mode="r", page_size=None):
        """Map a file, or an object named by URL, through the server;
        returns a Mapping.

        `mode` is numpy.memmap's word: "r" (the default) maps read-only, "r+"
        maps a file for reading and writing, shared: every process that maps
        the file through the server sees a write at once, and what is
        written reaches the file (``Mapping.flush`` says when it has; the
        last unmap, and the server's stop, write everything back).  The file
        is opened read-write here, so PermissionError comes from this
        process's rights.  Objects named by URL are read-only.

        `page_size` is what one fault reads of this region: a power of two
        from the server's page size to 4 MiB (by default the store's
        proposal for objects, the server's page size for files).  The first
        mapping of a region sets it for as long as the region lives.

        A file is opened here, with this process's rights: FileNotFoundError
        and PermissionError come from this call, before the server hears of
        it.  An empty file cannot be mapped (ValueError), as with mmap.

        A URL (``s3://bucket/key``, ``https://host/path``, any scheme the
        server has a store for) is read by the server with its own
        credentials, if its --allow-remote lets this URL be mapped
        (PermissionError otherwise).  The mapping holds the object as it was
        when it was first mapped: should it be replaced meanwhile, reading
        a page not yet read raises SIGBUS, as reading past the end of a
        mapped file does, never a mix of two versions.
        """
        if mode not in ("r", "r+"):
            raise ValueError(f'mode is "r" or "r+", not {mode!r}')
        writable = mode == "r+"
        flags = _page_flags(page_size) | (lib.MPU_MAP_WRITE if writable else 0)
        scheme = scheme_of(source) if isinstance(source, str) else None
        if scheme == "file":
            source = urllib.parse.unquote(urllib.parse.urlsplit(source).path)
        elif scheme:
            return self._map_url(source, flags)
        path = os.fspath(source)
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            if st.st_size == 0:
                raise ValueError(f"cannot map an empty file: {path}")
            return self._map(path, fd, payload=protocol.U32.pack(flags))
        finally:
            os.close(fd)

    def _map_url(self, url, flags):
        payload = url.encode("utf-8")
        if len(payload) > protocol.MAX_URL:
            raise ValueError(f"a URL is at most {protocol.MAX_URL} bytes")
        return self._map(url, None, Msg.MAP_URL, protocol.U32.pack(flags) + payload)

    def _map(self, path, fd, kind=Msg.MAP, payload=protocol.U32.pack(0)):
        """Ask for a mapping (MAP with the file's descriptor, or MAP_URL)
        and map, guard and register what the server gives."""
        rfds, values, _ = self._call(kind, payload, [fd] if fd is not None else [],
                                     expect=Msg.MAPPED)
        mid, rid, size, length = values
        (memfd,) = rfds
        writable = bool(protocol.U32.unpack_from(payload)[0] & lib.MPU_MAP_WRITE)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # From here on the server holds a mapping for us: whatever fails
        # gives it back (and undoes what was done here), in reverse order.
        m = None
        guarded = False
        try:
            with _FORK_LOCK:
                try:
                    m = Mapping(memfd, size, flags=mmap.MAP_SHARED, prot=prot)
                    m._attach(self, mid, rid, path, fd, memfd if writable else None)
                    # A forked child must not inherit this range: nothing
                    # would watch its faults, and a read there would plant
                    # a zero page in the buffer that every other client
                    # then sees.
                    m.madvise(mmap.MADV_DONTFORK)
                    # Guarded before it is registered: no registered range
                    # is ever without its way back to the file (and for one
                    # that writes, its way to write the buffer there first).
                    self._guard_mapping(m)
                    guarded = True
                finally:
                    os.close(memfd)
            self._call(Msg.REGISTER, protocol.SPAN.pack(mid, m.address, length),
                       expect=Msg.REGISTERED)
        except BaseException:
            with _FORK_LOCK:
                if guarded:
                    self._unguard(m.address)
                if m is not None:
                    mmap.mmap.close(m)
            if m is not None:
                m._close_descriptors()
            self._release(mid)
            raise
        self._mappings[mid] = m
        return m

    def _release(self, mid):
        """Tell the server mapping mid is unmapped here.  Nothing is said
        where nobody can be told (a closed client, a forked child): the
        server lets go of a connection's mappings when it closes."""
        m = self._mappings.pop(mid, None)
        if self._sock is None or os.getpid() != self._pid:
            return
        # A mapping that wrote is unmapped once its writes are in the file;
        # should they not get there (a full disk), the caller hears of it.
        writable = getattr(m, "writable", False)
        try:
            self._call(Msg.UNMAP, protocol.U64.pack(mid), expect=Msg.UNMAPPED,
                       timeout=FLUSH_SECONDS if writable else None)
        except ServerUnavailable as exc:
            # A server that is gone: the guard wrote the pages to the file
            # itself.  A connection that takes no more requests (one timed
            # out) cannot tell whether they got there: the caller hears.
            if writable and self._unfit and not self.fell_back:
                raise
            log.debug("unmapping %d: %s", mid, exc)
        except OSError as exc:
            if writable:
                raise
            log.debug("unmapping %d: %s", mid, exc)

    def stats(self):
        """The server's status: settings, buffer counters, clients, regions."""
        _, _, payload = self._call(Msg.STATS, expect=Msg.STATS_REPLY)
        return json.loads(payload)

    # -- closing ---------------------------------------------------------------

    def close(self):
        """Unmap every mapping and disconnect.  Raises BufferError, leaving
        everything open, while a memoryview or array still uses a mapping."""
        if self._sock is None:
            return
        # The server hears nothing of each: closing the connection lets go of
        # them all there, and a close must not wait for a server.  But for
        # a mapping that wrote: what it wrote is in the file when close
        # returns (the server writes it back before it answers).
        failed = None
        for m in list(self._mappings.values()):
            try:
                m._close(tell=m.writable)
            except BufferError:
                raise
            except OSError as exc:
                failed = failed or exc
        self._close_descriptors()
        if failed is not None:
            raise failed

    def _guard_mapping(self, m):
        length = len(m) + (-len(m)) % PAGE  # the whole pages the mapping spans
        core.check(lib.mpu_guard_add_writable(self._guard, m.address, length, m._file_fd,
                                              m._memfd), "guarding the mapping")

    def _unguard(self, address):
        if self._guard is not None:
            lib.mpu_guard_remove(self._guard, address)

    @property
    def fell_back(self):
        """True once the server was lost and the mappings were replaced by
        the kernel's own mappings of the files."""
        return self._guard is not None and bool(lib.mpu_guard_fell_back(self._guard))

    def _abandon_guard(self):
        if self._guard is not None and os.getpid() != self._pid:
            self._forsaken.detach()
            lib.mpu_guard_abandon(self._guard)
            self._guard = None

    def _close_descriptors(self):
        if self._guard is not None:
            if hasattr(self, "_forsaken"):
                self._forsaken.detach()
            lib.mpu_guard_stop(self._guard)
            self._guard = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._uffd is not None:
            os.close(self._uffd)
            self._uffd = None

    @property
    def closed(self):
        return self._sock is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else f"{len(self._mappings)} mappings"
        return f"<mpumap.Client {self.socket_path} {state}>"


def _page_flags(page_size):
    """MAP's flags for a page size asked for (log2 in the low byte)."""
    if page_size is None:
        return 0
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, not {page_size}")
    return page_size.bit_length() - 1


class Mapping(mmap.mmap):
    """A file mapped through the server: shared, read-only unless mapped
    "r+", len() is the file's size.  Use it as a buffer (memoryview,
    numpy.frombuffer) or as an mmap (slicing, find, ...)."""

    def _attach(self, client, mid, rid, path, file_fd, memfd=None):
        self._client = client
        self._file_fd = self._memfd = -1
        # For the guard, while the mapping lives; an object has no file (-1),
        # and becomes inaccessible should the server go.  A mapping that
        # writes keeps its buffer too: should the server go, the guard writes
        # what the buffer holds to the file first.
        self._file_fd = os.dup(file_fd) if file_fd is not None else -1
        self._memfd = os.dup(memfd) if memfd is not None else -1
        self.writable = memfd is not None
        self.mapping_id = mid
        self.region_id = rid
        self.path = path
        self.address = core.address_of(self)

    def flush(self, offset=0, length=None):
        """Write what was written in [offset, offset+length) of the file
        (all of it by default) to the file, and return once it is there and
        synced, as msync(MS_SYNC) does; the mapping stays as it is.  Returns
        the server pages written.  A read-only mapping has nothing to write
        (but the bytes other processes wrote to the file through the server
        are written all the same)."""
        offset, length = self._span("flush", offset, length)
        if length == 0:
            return 0
        _, (pages,), _ = self._client._call(
            Msg.FLUSH, protocol.SPAN.pack(self.mapping_id, offset, length),
            expect=Msg.FLUSHED, timeout=FLUSH_SECONDS)
        return pages

    def prefetch(self, offset=0, length=None):
        """Ask the server to fill [offset, offset+length) of the file ahead of
        use (all of it by default) and return at once, with the number of
        umap pages asked for.  Pages already there, and pages the buffer has
        no room for, are left as they are."""
        offset, length = self._span("prefetch", offset, length)
        _, (pages,), _ = self._client._call(
            Msg.PREFETCH, protocol.SPAN.pack(self.mapping_id, offset, length),
            expect=Msg.PREFETCHING)
        return pages

    def advise(self, advice, offset=0, length=None):
        """Tell the server how this mapping will be read, in madvise's words
        (``mmap.MADV_*``): ``MADV_RANDOM``, each fault reads its own page;
        ``MADV_SEQUENTIAL``, every fault reads ahead in full windows;
        ``MADV_NORMAL``, back to following scans and reading around while
        the buffer has room.  These hold for the whole mapping.
        ``MADV_WILLNEED`` is ``prefetch(offset, length)``.  Returns the umap
        pages asked for (0 but for WILLNEED)."""
        if self.closed:
            raise ValueError("advise on a closed mapping")
        try:
            advice = Advice(advice)
        except ValueError:
            raise ValueError(f"advice {advice!r} is none of mmap.MADV_NORMAL, MADV_RANDOM, "
                             "MADV_SEQUENTIAL, MADV_WILLNEED") from None
        if advice == Advice.WILLNEED:
            offset, length = self._span("advise", offset, length)
        elif offset != 0 or length not in (None, 0, len(self)):
            raise ValueError(f"{advice.name} advice holds for the whole mapping: "
                             "give no offset or length")
        else:
            length = len(self)
        _, (pages,), _ = self._client._call(
            Msg.ADVISE, protocol.ADVICE.pack(self.mapping_id, offset, length, advice, 0),
            expect=Msg.ADVISED)
        return pages

    def _span(self, what, offset, length):
        if self.closed:
            raise ValueError(f"{what} on a closed mapping")
        if length is None:
            length = len(self) - offset
        if offset < 0 or length < 0 or offset + length > len(self):
            raise ValueError(f"{what} range {offset}+{length} is outside the mapping "
                             f"({len(self)} bytes)")
        return offset, length

    def close(self):
        """Unmap.  Raises BufferError while views of it are alive."""
        self._close(tell=True)

    def _close(self, tell):
        if self.closed:
            return
        client = getattr(self, "_client", None)
        # The guard forgets the range before it is unmapped (it must never map
        # over an address that may be someone else's by then) and takes it
        # back if the unmap is refused.  The server hears of it last: while
        # the range exists, its faults must be served.
        with _FORK_LOCK:
            if client is not None:
                client._unguard(self.address)
            try:
                super().close()
            except BufferError:
                if client is not None:
                    client._guard_mapping(self)
                raise BufferError(
                    f"cannot unmap {self.path}: a memoryview or numpy array still "
                    "points into it; delete those first") from None
        self._close_descriptors()
        if client is not None:
            if tell:
                client._release(self.mapping_id)
            else:
                client._mappings.pop(self.mapping_id, None)

    def _close_descriptors(self):
        for name in ("_file_fd", "_memfd"):
            fd = getattr(self, name, -1)
            if fd is not None and fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.closed:
            return f"<mpumap.Mapping {getattr(self, 'path', '?')} closed>"
        return f"<mpumap.Mapping {self.path} {len(self)} bytes at {self.address:#x}>"
