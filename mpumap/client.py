"""The Python client: connect to a server, map files through it.

    import mpumap, numpy
    with mpumap.connect() as client, client.map("graph.bin") as m:
        edges = numpy.frombuffer(m, dtype=numpy.uint32)

A Mapping is an ``mmap.mmap`` of the region's shared buffer, read-only: it
offers the buffer protocol, so memoryview and numpy use it without a copy.
Its pages are filled by the server on first touch.
"""
import collections
import errno
import json
import logging
import mmap
import os
import socket
import stat
import threading
import weakref

from mpumap import core, protocol
from mpumap._core import ffi, lib
from mpumap.protocol import Msg
from mpumap.settings import socket_path as resolve_socket_path

log = logging.getLogger("mpumap.client")
PAGE = mmap.PAGESIZE

# What WELCOME says, field for field (struct mpu_welcome of c/mpu_wire.h).
ServerSettings = collections.namedtuple("ServerSettings", protocol.WELCOME.fields)


class MpumapError(OSError):
    """The server refused a request, or could not be reached."""


class ServerUnavailable(MpumapError, ConnectionError):
    """No server answers on the socket."""


def connect(socket_path=None):
    """Connect to the server on socket_path (else $MPUMAP_SOCKET, else the
    default) and return a Client."""
    return Client(socket_path)


def _open_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ServerUnavailable(exc.errno, f"no mpumap server at {path}: {exc.strerror}") from None
    return sock


def server_stats(socket_path=None, session=None):
    """The server's status, asked without mapping anything (and so without a
    userfaultfd): settings, buffer counters, workers, clients, regions; with
    a session tag, also what the clients of that session used."""
    path = resolve_socket_path(socket_path)
    with _open_socket(path) as sock:
        protocol.send(sock, Msg.STATS, (session or "").encode()[:protocol.MAX_SESSION])
        data, fds = protocol.receive(sock)
    protocol.close_all(fds)
    if not data:
        raise MpumapError(errno.ECONNRESET, f"the server at {path} closed the connection")
    kind, payload, _ = protocol.unpack(data, len(fds))
    if kind != Msg.STATS_REPLY:
        raise MpumapError(errno.EPROTO, f"expected STATS_REPLY, got {kind.name}")
    return json.loads(payload)


_LIVE_CLIENTS = weakref.WeakSet()


def _forget_guards_in_child():
    # A forked child has none of the parent's mappings (MADV_DONTFORK) and no
    # guard thread; let go of the guards' descriptors without touching them.
    for client in list(_LIVE_CLIENTS):
        client._abandon_guard()


os.register_at_fork(after_in_child=_forget_guards_in_child)


class Client:
    def __init__(self, socket_path=None):
        self.socket_path = resolve_socket_path(socket_path)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._mappings = {}
        self._guard = None
        self._uffd = None
        self._sock = _open_socket(self.socket_path)
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
            _, values, _ = self._call(Msg.HELLO, protocol.U32.pack(0) + session, [self._uffd],
                                      expect=Msg.WELCOME)
            # Should the server die, a C thread (it needs no GIL, which a
            # thread blocked on a fault may hold) maps the files themselves
            # over our mappings and wakes the threads that wait on them.
            guard = lib.mpu_guard_start(self._sock.fileno(), self._uffd)
            if guard == ffi.NULL:
                raise OSError(ffi.errno, f"starting the fallback guard: "
                              f"{os.strerror(ffi.errno)}")
            self._guard = guard
        except BaseException:
            self._close_descriptors()
            raise
        _LIVE_CLIENTS.add(self)
        self.settings = ServerSettings(*values)
        if self.uffd_kind == "user-mode-only":
            log.info("userfaultfd in user-mode-only mode: system calls that read a "
                     "mapping's pages before the program touched them fail with EFAULT")

    # -- requests --------------------------------------------------------------

    def _call(self, kind, payload=b"", fds=(), expect=None):
        if self._sock is None:
            raise MpumapError(errno.ENOTCONN, "the client is closed")
        if os.getpid() != self._pid:
            raise MpumapError(errno.ECHILD, "this client belongs to process "
                              f"{self._pid}: connect again in the child")
        with self._lock:
            try:
                protocol.send(self._sock, kind, payload, fds)
            except OSError as exc:
                # A server that refuses us says why, then closes: read that.
                sent = exc
            else:
                sent = None
            try:
                data, rfds = protocol.receive(self._sock)
            except OSError as exc:
                sent = sent or exc
                data, rfds = b"", []
            if not data and sent is not None:
                raise MpumapError(sent.errno, f"lost the server at {self.socket_path}: "
                                  f"{sent.strerror}") from None
        if not data:
            raise MpumapError(errno.ECONNRESET, f"the server at {self.socket_path} closed "
                              "the connection")
        try:
            rkind, payload, values = protocol.unpack(data, len(rfds))
        except protocol.ProtocolError as exc:
            protocol.close_all(rfds)
            raise MpumapError(errno.EPROTO, f"bad reply from the server: {exc}") from None
        if rkind == Msg.ERROR:
            code, message = protocol.parse_error(payload)
            raise OSError(code, message)
        if expect is not None and rkind != expect:
            protocol.close_all(rfds)
            raise MpumapError(errno.EPROTO, f"expected {expect.name}, got {rkind.name}")
        return rfds, values, payload

    def map(self, path):
        """Map a file read-only through the server; returns a Mapping.

        The file is opened here, with this process's rights: FileNotFoundError
        and PermissionError come from this call, before the server hears of
        it.  An empty file cannot be mapped (ValueError), as with mmap.
        """
        path = os.fspath(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, f"{path} is not a regular file")
            if st.st_size == 0:
                raise ValueError(f"cannot map an empty file: {path}")
            return self._map(path, fd)
        finally:
            os.close(fd)

    def _map(self, path, fd):
        rfds, values, _ = self._call(Msg.MAP, protocol.U32.pack(0), [fd], expect=Msg.MAPPED)
        mid, rid, size, length = values
        (memfd,) = rfds
        try:
            m = Mapping(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            os.close(memfd)
            self._release(mid)
            raise
        os.close(memfd)
        m._attach(self, mid, rid, path, fd)
        guarded = False
        try:
            # A forked child must not inherit this range: nothing would watch
            # its faults, and a read there would plant a zero page in the
            # buffer that every other client then sees.
            m.madvise(mmap.MADV_DONTFORK)
            # Guarded before it is registered: no registered range is ever
            # without its way back to the file.
            self._guard_mapping(m)
            guarded = True
            self._call(Msg.REGISTER, protocol.SPAN.pack(mid, m.address, length),
                       expect=Msg.REGISTERED)
        except BaseException:
            if guarded:
                self._unguard(m.address)
            mmap.mmap.close(m)
            os.close(m._file_fd)
            self._release(mid)
            raise
        self._mappings[mid] = m
        return m

    def _release(self, mid):
        self._mappings.pop(mid, None)
        try:
            self._call(Msg.UNMAP, protocol.U64.pack(mid), expect=Msg.UNMAPPED)
        except OSError as exc:
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
        for m in list(self._mappings.values()):
            m.close()
        self._close_descriptors()

    def _guard_mapping(self, m):
        length = len(m) + (-len(m)) % PAGE  # the whole pages the mapping spans
        core.check(lib.mpu_guard_add(self._guard, m.address, length, m._file_fd),
                   "guarding the mapping")

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
            lib.mpu_guard_abandon(self._guard)
            self._guard = None

    def _close_descriptors(self):
        if self._guard is not None:
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


class Mapping(mmap.mmap):
    """A file mapped through the server: read-only, shared, len() is the
    file's size.  Use it as a buffer (memoryview, numpy.frombuffer) or as an
    mmap (slicing, find, ...)."""

    def _attach(self, client, mid, rid, path, file_fd):
        self._client = client
        self._file_fd = os.dup(file_fd)  # for the guard, while the mapping lives
        self.mapping_id = mid
        self.region_id = rid
        self.path = path
        self.address = core.address_of(self)

    def prefetch(self, offset=0, length=None):
        """Ask the server to fill [offset, offset+length) of the file ahead of
        use (all of it by default) and return at once, with the number of
        umap pages asked for.  Pages already there, and pages the buffer has
        no room for, are left as they are."""
        if self.closed:
            raise ValueError("prefetch on a closed mapping")
        if length is None:
            length = len(self) - offset
        if offset < 0 or length < 0 or offset + length > len(self):
            raise ValueError(f"prefetch range {offset}+{length} is outside the mapping "
                             f"({len(self)} bytes)")
        _, (pages,), _ = self._client._call(
            Msg.PREFETCH, protocol.SPAN.pack(self.mapping_id, offset, length),
            expect=Msg.PREFETCHING)
        return pages

    def close(self):
        """Unmap.  Raises BufferError while views of it are alive."""
        if self.closed:
            return
        client = getattr(self, "_client", None)
        # The guard forgets the range before it is unmapped (it must never map
        # over an address that may be someone else's by then) and takes it
        # back if the unmap is refused.  The server hears of it last: while
        # the range exists, its faults must be served.
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
        os.close(self._file_fd)
        if client is not None and not client.closed:
            client._release(self.mapping_id)

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.closed:
            return f"<mpumap.Mapping {getattr(self, 'path', '?')} closed>"
        return f"<mpumap.Mapping {self.path} {len(self)} bytes at {self.address:#x}>"
