"""The fault monitor's queues, in this process: threads fault on a range of
our own userfaultfd, the monitor thread reads them and sends them to a
"filler" socket that has room for a few packets only, and that we read
slowly.  It must never block, and lose nothing."""
import ctypes
import mmap
import os
import socket
import threading
import time

import pytest

from mpumap import core, protocol, settings as S
from mpumap.pbm import PageBuffer
from mpumap.server.monitor import FaultMonitor

PAGE = mmap.PAGESIZE
FAULT = protocol.Layout("struct mpu_fault", "=")
HEAD = protocol.Layout("struct mpu_w_faults", "=")

pytestmark = pytest.mark.timeout(60)


def test_a_full_filler_socket_queues_faults_in_order_and_loses_none():
    pages = 24
    buffer = PageBuffer.create(64, 90, 70)
    monitor = FaultMonitor(buffer, S.Settings(buffer_pages=64, fillers=1, read_ahead=0,
                                              spin_us=0))
    ours, filler = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # room for a few packets
    ours.setblocking(False)
    memfd = os.memfd_create("monitor-test")
    os.ftruncate(memfd, pages * PAGE)
    area = mmap.mmap(memfd, pages * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
    address = core.address_of(area)
    uffd, _ = core.uffd_open()
    threads = []
    try:
        core.uffd_register(uffd, address, pages * PAGE)
        monitor.set_filler(0, ours.fileno())
        monitor.watch(7, 77, uffd)
        monitor.set_ranges(7, [(address, address + pages * PAGE, 3, 33, 0, 0, 1, 0)])

        def touch(page):
            sink = ctypes.create_string_buffer(1)
            ctypes.memmove(sink, address + page * PAGE, 1)  # faults, GIL released

        for page in range(pages):
            t = threading.Thread(target=touch, args=(page,), daemon=True)
            t.start()
            threads.append(t)
            time.sleep(0.01)  # one fault a packet, mostly
        deadline = time.monotonic() + 10
        while buffer.counter("faults") < pages:
            assert time.monotonic() < deadline, buffer.counter("faults")
            time.sleep(0.01)
        # The monitor read them all while the socket had room for a few: the
        # rest wait in its queue (it did not block: it read on).
        assert buffer.counter("queued_faults") > 0
        seen = []
        while len(seen) < pages:
            filler.settimeout(5)
            packet = filler.recv(1 << 16)
            kind, count = HEAD.unpack_from(packet)
            assert kind == protocol.W.FAULTS
            for k in range(count):
                client, client_gen, region, region_gen, page, at, *_ = FAULT.unpack_from(
                    packet, HEAD.size + k * FAULT.size)
                assert (client, client_gen, region, region_gen) == (7, 77, 3, 33)
                assert at == address + page * PAGE
                seen.append(page)
            time.sleep(0.01)  # a slow filler
        assert sorted(seen) == list(range(pages))  # every one, once
    finally:
        monitor.forget(7)
        monitor.set_filler(0, -1)
        os.close(uffd)  # wakes the threads: they read the memfd's holes
        for t in threads:
            t.join(5)
        monitor.stop()
        ours.close()
        filler.close()
        area.close()
        os.close(memfd)
        buffer.close()
