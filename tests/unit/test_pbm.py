"""The C core's page states, buffer accounting and counters, in this process
(and forked ones) on real shared memory."""
import os

from mpumap import core
from mpumap.pbm import PageBuffer, PageTable


def test_page_states_and_accounting():
    buf = PageBuffer.create(8, 90, 70)
    table = PageTable.create(4)
    try:
        assert (buf.limit, buf.header.high, buf.header.low) == (8, 7, 5)
        assert table.begin_fill(0, 42, 10) == core.FREE
        assert table.state(0) == core.FILLING
        # a second filler waiting for FILLING times out with the state it saw
        assert table.begin_fill(0, 43, 10) == core.FILLING
        assert buf.reserve([], 10)
        table.end_fill(buf, 0, True)
        assert table.state(0) == core.PRESENT
        assert table.begin_fill(0, 43, 10) == core.PRESENT
        assert buf.snapshot()["fills"] == 1 and buf.used == 1

        fd = os.memfd_create("t")
        os.ftruncate(fd, 4 * 4096)
        os.pwrite(fd, b"z" * 4096, 0)
        assert table.evict(0, 44, fd, 0, 4096)
        assert table.state(0) == core.FREE
        assert os.pread(fd, 4, 0) == b"\0\0\0\0"  # the page was punched out
        assert not table.evict(0, 44, fd, 0, 4096)  # not PRESENT: nothing to do
        buf.release()
        assert buf.used == 0
        os.close(fd)
    finally:
        table.close()
        buf.close()


def test_oldest_pages_first_and_release_of_a_dead_region():
    buf = PageBuffer.create(100, 90, 70)
    table = PageTable.create(10)
    try:
        for index in (5, 2, 8, 1):
            assert table.begin_fill(index, 1, 10) == core.FREE
            assert buf.reserve([], 10)
            table.end_fill(buf, index, True)
        assert [i for _, i in sorted(table.oldest(2))] == [5, 2]
        assert [i for _, i in sorted(table.oldest(10, stride=2, phase=0))] == [2, 8]
        assert table.present == 4
        # a fill that ends after the region was released gives its page back
        assert table.begin_fill(3, 1, 10) == core.FREE
        assert buf.reserve([], 10)
        assert table.release_all(buf) == 4
        assert buf.used == 1
        table.end_fill(buf, 3, True)
        assert table.state(3) == core.FREE
        assert buf.used == 0
    finally:
        table.close()
        buf.close()


def test_full_buffer_waits_and_wakes_the_evictors():
    buf = PageBuffer.create(2, 90, 50)
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert buf.reserve([ev], 10) and buf.reserve([ev], 10)
        assert not buf.reserve([ev], 50)  # full: times out
        assert os.eventfd_read(ev) >= 1  # and asked the evictors to run
        assert buf.snapshot()["full_waits"] == 1
        buf.release()
        assert buf.reserve([ev], 10)
        assert buf.snapshot()["peak_used"] == 2
    finally:
        os.close(ev)
        buf.close()


def test_userfaultfd_is_recognised():
    fd, how = core.uffd_open()
    try:
        assert core.is_uffd(fd)
        assert how in core.UFFD_HOW.values()
    finally:
        os.close(fd)
    r, w = os.pipe()
    assert not core.is_uffd(r)
    os.close(r)
    os.close(w)


def test_counters_are_exact_across_processes():
    buf = PageBuffer.create(1000, 90, 70)
    try:
        pids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    for _ in range(20000):
                        buf.add("fills")
                        if buf.reserve([], 1000):
                            buf.release()
                finally:
                    os._exit(0)
            pids.append(pid)
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        snap = buf.snapshot()
        assert snap["fills"] == 80000
        assert snap["used"] == 0 and 1 <= snap["peak_used"] <= 4
    finally:
        buf.close()


def test_system_page_arithmetic_at_64k():
    """Kernels with 64 KiB system pages (arm64, ppc64le): the C side's sizes
    follow the page it is given (sysconf at run time), not 4 KiB."""
    from mpumap._core import lib

    big = 64 << 10
    assert lib.mpu_round_up(1, big) == big
    assert lib.mpu_round_up(big, big) == big
    assert lib.mpu_round_up(big + 1, big) == 2 * big
    assert lib.mpu_system_pages(0, big) == 0
    assert lib.mpu_system_pages(4096, big) == 1
    assert lib.mpu_system_pages(3 * big + 1, big) == 4
    assert lib.mpu_system_pages(3 * big + 1, 4096) == 3 * 16 + 1


def test_no_c_source_assumes_a_4k_page():
    import re

    folder = os.path.join(os.path.dirname(__file__), "..", "..", "c")
    page_like = re.compile(r"\b(4096u?|4095|0x1000|0xfff)\b", re.IGNORECASE)
    allowed = ("MPU_CLIENT_SLOTS", "path[4096]")  # a count and a buffer, not pages
    for name in sorted(os.listdir(folder)):
        if name.endswith((".c", ".h")):
            with open(os.path.join(folder, name)) as f:
                for number, line in enumerate(f, 1):
                    if page_like.search(line) and not any(a in line for a in allowed):
                        raise AssertionError(f"c/{name}:{number} {line.strip()}")
