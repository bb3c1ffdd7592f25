"""The request handler's bookkeeping when a step fails half-way, on real
sockets and a real userfaultfd, with a fault monitor that refuses."""
import errno
import os
import selectors
import socket

import pytest

from mpumap import core, protocol
from mpumap import settings as S
from mpumap._core import lib
from mpumap.pbm import PageBuffer
from mpumap.protocol import Msg
from mpumap.server.clients import ClientTable
from mpumap.server.regions import RegionTable
from mpumap.server.requests import RequestHandler


class RefusingMonitor:
    """A fault monitor whose epoll set is full (ENOSPC: max_user_watches)."""

    def watch(self, slot, gen, uffd):
        raise OSError(errno.ENOSPC, "watching the userfaultfd: No space left on device")

    def forget(self, slot):
        raise AssertionError("nothing was watched")


@pytest.fixture
def handler():
    settings = S.Settings(buffer_pages=64, fillers=1)
    buffer = PageBuffer.create(64, 90, 70, max_regions=settings.max_regions)
    selector = selectors.DefaultSelector()
    told = []
    h = RequestHandler(settings, buffer, selector, ClientTable(buffer),
                       RegionTable(buffer, settings.page_size), RefusingMonitor(),
                       lambda data, fds, role, then=None: told.append(data) or
                       (then and then()), lambda: [], 0.0, None)
    h.told = told
    yield h
    h.close()
    buffer.close()


def hello(handler, ours, theirs, uffd, session=b""):
    """A connection says HELLO to the handler; its connection."""
    theirs.setblocking(False)
    handler.accept(theirs)
    (conn,) = list(handler.clients)
    protocol.send(ours, Msg.HELLO, protocol.U32.pack(0) + session, [uffd])
    handler.readable(conn)
    return conn


def test_a_hello_that_fails_half_way_leaves_nothing_behind(handler):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    uffd, _ = core.uffd_open()
    try:
        conn = hello(handler, ours, theirs, uffd)
        data, fds = protocol.receive(ours)
        kind, payload, _ = protocol.unpack(data, len(fds))
        assert kind == Msg.ERROR
        assert protocol.parse_error(payload)[0] == errno.ENOSPC
        # No slot held, no descriptor kept, no worker told; the server goes on.
        assert conn.uffd is None and conn.slot is None
        assert handler.clients.slots_left == lib.MPU_CLIENT_SLOTS
        assert not handler.clients.clients_per_user
        assert handler.told == []
        ours.close()
        handler.readable(conn)  # the client leaves: dropped without a word
        assert len(handler.clients) == 0
    finally:
        os.close(uffd)


class FullSelector(selectors.DefaultSelector):
    """An epoll set with no room for more (max_user_watches reached)."""

    def register(self, fileobj, events, data=None):
        if isinstance(fileobj, socket.socket):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().register(fileobj, events, data)


def test_a_connection_the_server_cannot_watch_is_closed_not_the_server():
    settings = S.Settings(buffer_pages=64, fillers=1)
    buffer = PageBuffer.create(64, 90, 70, max_regions=settings.max_regions)
    h = RequestHandler(settings, buffer, FullSelector(), ClientTable(buffer),
                       RegionTable(buffer, settings.page_size), RefusingMonitor(),
                       lambda *args: None, lambda: [], 0.0, None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        h.accept(theirs)
        assert len(h.clients) == 0 and theirs.fileno() == -1
        assert ours.recv(16) == b""  # closed: it knows at once
    finally:
        ours.close()
        h.close()
        buffer.close()


def test_a_failed_hello_counts_in_no_session(handler):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    uffd, _ = core.uffd_open()
    try:
        hello(handler, ours, theirs, uffd, b"job-7")
        assert protocol.receive(ours)[0]
        assert handler.clients.session_report("job-7")["clients"] == 0
    finally:
        ours.close()
        os.close(uffd)


def test_one_users_session_tags_do_not_push_out_anothers():
    from mpumap.server.clients import SESSIONS_KEPT, ClientTable

    buffer = PageBuffer.create(64, 90, 70)
    try:
        table = ClientTable(buffer)
        table._totals(("root-job", 0))["clients"] += 1
        for i in range(SESSIONS_KEPT + 50):
            table._totals((f"junk-{i}", 65534))["clients"] += 1
        assert table.session_report("root-job")["clients"] == 1
        assert table.session_report("root-job", uid=65534)["clients"] == 0
        assert table.session_report("junk-0")["clients"] == 0  # its own oldest went
    finally:
        buffer.close()


def test_an_empty_packet_is_refused_and_the_connection_goes_on(handler):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    handler.accept(theirs)
    (conn,) = list(handler.clients)
    ours.send(b"")
    handler.readable(conn)
    data, fds = protocol.receive(ours)
    kind, payload, _ = protocol.unpack(data, len(fds))
    assert kind == Msg.ERROR and protocol.parse_error(payload)[0] == errno.EPROTO
    assert len(handler.clients) == 1
    ours.close()
    handler.readable(conn)  # now the end of the stream: dropped
    assert len(handler.clients) == 0
