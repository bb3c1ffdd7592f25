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

from mpumap import core, protocol
from mpumap.protocol import Msg
from mpumap.settings import socket_path as resolve_socket_path

log = logging.getLogger("mpumap.client")

ServerSettings = collections.namedtuple(
    "ServerSettings",
    "system_page_size page_size buffer_pages fillers evictors high_water low_water "
    "adaptive max_fault_events",
)


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


class Client:
    def __init__(self, socket_path=None):
        self.socket_path = resolve_socket_path(socket_path)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._mappings = {}
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
        except BaseException:
            self._close_descriptors()
            raise
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
                data, rfds = protocol.receive(self._sock)
            except OSError as exc:
                raise MpumapError(exc.errno, f"lost the server at {self.socket_path}: "
                                  f"{exc.strerror}") from None
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
            rfds, values, _ = self._call(Msg.MAP, protocol.U32.pack(0), [fd],
                                         expect=Msg.MAPPED)
        finally:
            os.close(fd)
        mid, rid, size, length = values
        (memfd,) = rfds
        try:
            m = Mapping(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            os.close(memfd)
            self._release(mid)
            raise
        os.close(memfd)
        m._attach(self, mid, rid, path)
        try:
            # A forked child must not inherit this range: nothing would watch
            # its faults, and a read there would plant a zero page in the
            # buffer that every other client then sees.
            m.madvise(mmap.MADV_DONTFORK)
            self._call(Msg.REGISTER, protocol.REGISTER_BODY.pack(mid, m.address, length),
                       expect=Msg.REGISTERED)
        except BaseException:
            mmap.mmap.close(m)
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

    def _close_descriptors(self):
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

    def _attach(self, client, mid, rid, path):
        self._client = client
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
            Msg.PREFETCH, protocol.REGISTER_BODY.pack(self.mapping_id, offset, length),
            expect=Msg.PREFETCHING)
        return pages

    def close(self):
        """Unmap.  Raises BufferError while views of it are alive."""
        if self.closed:
            return
        try:
            # Unmap before telling the server: while the range exists, its
            # faults must be served.
            super().close()
        except BufferError:
            raise BufferError(
                f"cannot unmap {self.path}: a memoryview or numpy array still "
                "points into it; delete those first") from None
        client = getattr(self, "_client", None)
        if client is not None and not client.closed:
            client._release(self.mapping_id)

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        if self.closed:
            return f"<mpumap.Mapping {getattr(self, 'path', '?')} closed>"
        return f"<mpumap.Mapping {self.path} {len(self)} bytes at {self.address:#x}>"
