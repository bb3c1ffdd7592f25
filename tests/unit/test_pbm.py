"""The C core's page states, buffer accounting and counters, in this process
(and forked ones) on real shared memory."""
import errno
import os
import random
import signal
import time

import pytest

from mpumap import core
from mpumap._core import lib
from mpumap.pbm import PageBuffer, RegionSlots


PAGE = 4096


class FakeRegion:
    """What RegionSlots reads of a region: a memfd of npages pages."""

    def __init__(self, slot, gen, npages):
        self.slot, self.gen, self.npages = slot, gen, npages
        self.size = self.map_length = npages * PAGE
        self.memfd = os.memfd_create("t")
        os.ftruncate(self.memfd, self.size)
        self.store_fd, self.store_mode = -1, "direct"
        self.write_fd = -1

    def close(self):
        os.close(self.memfd)


def fill(buf, region, page, owner=1):
    """A filler's steps for one page: claim (and room), write, PRESENT."""
    state, desc = buf.claim(region.slot, region.gen, page, owner, 100)
    assert state == core.FREE
    os.pwrite(region.memfd, bytes([page % 251 + 1]) * PAGE, page * PAGE)
    buf.filled(desc, True)
    return desc


def test_page_states_and_accounting():
    buf = PageBuffer.create(8, 90, 70)
    region = FakeRegion(0, 7, 4)
    slots = RegionSlots(64)
    try:
        buf.open_region(0, 7, 4)
        slots.set(region)
        assert (buf.limit, buf.header.high, buf.header.low) == (8, 7, 5)
        assert buf.page_state(0, 7, 0) == core.FREE  # no descriptor: FREE
        state, desc = buf.claim(0, 7, 0, 42, 10)
        assert state == core.FREE and buf.page_state(0, 7, 0) == core.FILLING
        # a second filler waiting for FILLING times out with the state it saw
        assert buf.claim(0, 7, 0, 43, 10)[0] == core.FILLING
        os.pwrite(region.memfd, b"z" * PAGE, 0)
        buf.filled(desc, True)
        assert buf.page_state(0, 7, 0) == core.PRESENT
        assert buf.claim(0, 7, 0, 43, 10) == (core.PRESENT, desc)
        assert buf.snapshot()["fills"] == 1 and buf.used == 1
        assert buf.region_present(0) == 1 and buf.snapshot()["present"] == 1
        # another generation of the slot is another region: gone, here
        with pytest.raises(OSError) as stale:
            buf.claim(0, 8, 0, 43, 10)
        assert stale.value.errno == errno.ESTALE

        assert buf.evict(4, 44, slots, PAGE) == 1
        assert buf.page_state(0, 7, 0) == core.FREE
        assert os.pread(region.memfd, 4, 0) == b"\0\0\0\0"  # punched out
        assert buf.used == 0 and buf.region_present(0) == 0
        assert buf.evict(4, 44, slots, PAGE) == 0  # nothing PRESENT
        assert buf.snapshot()["evictions"] == 1
        assert lib.mpu_pbm_check(buf.header) == 0
    finally:
        region.close()
        buf.close()


def test_oldest_fill_first_and_release_of_a_dead_region():
    buf = PageBuffer.create(100, 90, 70)
    region = FakeRegion(3, 1, 10)
    slots = RegionSlots(64)
    try:
        buf.open_region(3, 1, 10)
        slots.set(region)
        for page in (5, 2, 8, 1):
            fill(buf, region, page)
        assert buf.evict(2, 9, slots, PAGE) == 2
        assert [buf.page_state(3, 1, p) for p in (5, 2, 8, 1)] == [
            core.FREE, core.FREE, core.PRESENT, core.PRESENT]
        assert buf.region_present(3) == 2
        # a fill that ends after the region was released gives its page back
        state, desc = buf.claim(3, 1, 3, 1, 10)
        assert state == core.FREE
        assert buf.release_region(3, 1) == 2
        assert buf.used == 1
        buf.filled(desc, True)
        assert buf.used == 0 and buf.page_state(3, 1, 3) == core.FREE
        assert lib.mpu_pbm_check(buf.header) == 0
    finally:
        region.close()
        buf.close()


def test_metadata_follows_the_buffer_not_the_data():
    """A thousand pages through a buffer of 16, at page numbers past 2**32:
    descriptors are reused, never more than the buffer holds."""
    buf = PageBuffer.create(16, 90, 50)
    region = FakeRegion(1, 5, 1)
    slots = RegionSlots(64)
    try:
        buf.open_region(1, 5, 1 << 40)
        slots.set(region)
        base = (1 << 32) + 7
        for k in range(1000):
            if buf.used >= buf.header.high:
                buf.evict(buf.used - buf.header.low, 2, slots, PAGE)
            state, desc = buf.claim(1, 5, base + k, 1, 10)
            assert state == core.FREE
            buf.filled(desc, True)
        assert buf.snapshot()["descriptors"] <= 16
        assert buf.page_state(1, 5, base + 999) == core.PRESENT
        assert buf.page_state(1, 5, base) == core.FREE
        assert buf.page_state(1, 5, (base + 999) & 0xFFFFFFFF) == core.FREE
        assert lib.mpu_pbm_check(buf.header) == buf.used
    finally:
        region.close()
        buf.close()


def test_a_worker_killed_inside_the_directory_leaves_it_whole():
    """Workers SIGKILLed at random while they claim, fill and evict: whoever
    takes the lock next finds its owner dead and rebuilds the index, the
    free list and the FIFO from the descriptors; the supervisor's recovery
    then frees what the dead held."""
    buf = PageBuffer.create(64, 90, 50)
    region = FakeRegion(2, 3, 256)
    slots = RegionSlots(64)
    rng = random.Random(5)
    try:
        buf.open_region(2, 3, 256)
        slots.set(region)
        for round_ in range(40):
            pid = os.fork()
            if pid == 0:
                try:
                    me = os.getpid()
                    while True:
                        page = rng.randrange(256)
                        if buf.used >= buf.header.high:
                            buf.evict(8, me, slots, PAGE)
                        state, desc = buf.claim(2, 3, page, me, 0)
                        if state == core.FREE:
                            buf.filled(desc, True)
                finally:
                    os._exit(0)
            time.sleep(rng.uniform(0.001, 0.02))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            buf.recover(pid, slots, PAGE)
            assert lib.mpu_pbm_check(buf.header) >= 0, round_
        assert lib.mpu_pbm_check(buf.header) == buf.used  # no buffer page lost
        for page in range(256):
            assert buf.page_state(2, 3, page) in (core.FREE, core.PRESENT)
    finally:
        region.close()
        buf.close()


def test_full_buffer_waits_and_wakes_the_evictors():
    buf = PageBuffer.create(2, 90, 50)
    region = FakeRegion(0, 1, 8)
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        buf.open_region(0, 1, 8)
        first = buf.claim(0, 1, 0, 1, 10, evict_fds=[ev])
        assert first[0] == core.FREE and buf.claim(0, 1, 1, 1, 10)[0] == core.FREE
        assert buf.claim(0, 1, 2, 1, 50, evict_fds=[ev]) == (None, 0)  # full: times out
        assert os.eventfd_read(ev) >= 1  # and asked the evictors to run
        assert buf.snapshot()["full_waits"] == 1
        # neither read-ahead nor prefetch waits; prefetch stops at the high mark
        assert buf.claim(0, 1, 2, 1, 0, lib.MPU_CLAIM_AHEAD)[0] is None
        buf.filled(first[1], False)  # not filled: FREE, its buffer page back
        assert buf.used == 1
        assert buf.claim(0, 1, 2, 1, 0, lib.MPU_CLAIM_PREFETCH)[0] is None
        assert buf.claim(0, 1, 2, 1, 10, evict_fds=[ev])[0] == core.FREE
        assert buf.snapshot()["peak_used"] == 2
    finally:
        os.close(ev)
        region.close()
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
        buf.open_region(0, 1, 1 << 20)
        pids = []
        for child in range(4):
            pid = os.fork()
            if pid == 0:
                try:
                    for k in range(5000):
                        buf.add("fills")
                        state, desc = buf.claim(0, 1, child << 16 | k, os.getpid(), 1000)
                        if state == core.FREE:
                            buf.filled(desc, False)
                finally:
                    os._exit(0)
            pids.append(pid)
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        snap = buf.snapshot()
        assert snap["fills"] == 20000
        assert snap["used"] == 0 and 1 <= snap["peak_used"] <= 4
        assert lib.mpu_pbm_check(buf.header) == 0
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


def test_an_index_that_shrinks_and_grows_stays_whole():
    """The index follows the limit (16384 buckets, then 1024, and back),
    with pages in use and churning: every chain holds only pages in use
    that hash to it (mpu_pbm_check walks them), and every page is found."""
    buf = PageBuffer.create(16384, 90, 50, capacity=16384)
    region = FakeRegion(1, 5, 1)
    slots = RegionSlots(64)
    rng = random.Random(3)
    try:
        buf.open_region(1, 5, 1 << 20)
        slots.set(region)
        live = set()
        for step in range(4000):
            if buf.used >= 500:
                buf.evict(200, 2, slots, PAGE)
                live = {p for p in live if buf.page_state(1, 5, p) == core.PRESENT}
                buf.set_limit(rng.choice([512, 16384]), 90, 50)
                assert lib.mpu_pbm_check(buf.header) == buf.used
            page = rng.randrange(50_000)
            if buf.page_state(1, 5, page) == core.FREE:
                fill(buf, region, page)
                live.add(page)
        assert lib.mpu_pbm_check(buf.header) == buf.used
        assert all(buf.page_state(1, 5, p) == core.PRESENT for p in live)
    finally:
        region.close()
        buf.close()


def test_a_sealed_region_opens_no_page_for_writing():
    """Sealed (nobody maps it; its last write-back is to follow), no page
    of a region becomes dirty: a write fault is refused (-ESTALE, the
    thread only woken).  Unsealed when mapped again; a new region in the
    slot starts unsealed."""
    from mpumap._core import ffi

    buf = PageBuffer.create(8, 90, 70)
    region = FakeRegion(0, 7, 4)
    descs, count = ffi.new("uint32_t[4]"), ffi.new("uint32_t *")

    def open_write(gen, page):
        return lib.mpu_page_open_write(buf.header, 0, gen, page, 42, 10, 0, descs, count)

    try:
        buf.open_region(0, 7, 4)
        fill(buf, region, 0)
        fill(buf, region, 1)
        assert not buf.seal_region(0, 8)  # another generation: not this region
        assert buf.seal_region(0, 7) and lib.mpu_region_sealed(buf.header, 0, 7)
        assert open_write(7, 0) == -errno.ESTALE
        assert buf.seal_region(0, 7, False)
        assert open_write(7, 1) == core.PRESENT and count[0] == 1
        lib.mpu_page_opened(buf.header, descs, 1, 42)
        assert buf.snapshot()["dirty"] == 1
        buf.seal_region(0, 7)
        buf.release_region(0, 7)
        buf.open_region(0, 8, 4)
        assert not lib.mpu_region_sealed(buf.header, 0, 8)
    finally:
        region.close()
        buf.close()


def test_the_last_write_back_of_a_sealed_region_waits_for_fills_under_way(tmp_path):
    """A page filled for a write is a hole of the memfd until its copy, and
    the write-back's walk goes over the memfd's data: of a sealed region
    (its last write-back), the fills under way are waited for, and what
    they made dirty is written too."""
    import threading

    from mpumap._core import ffi

    buf = PageBuffer.create(8, 90, 70)
    region = FakeRegion(0, 7, 4)
    path = tmp_path / "file"
    path.write_bytes(b"\0" * 4 * PAGE)
    region.write_fd = os.open(path, os.O_RDWR)
    slots = RegionSlots(64)
    clients = ffi.new("struct mpu_client_slot[1]")
    results, desc = [], None
    writing = threading.Thread(target=lambda: results.append(
        buf.write_back(0, slots, clients, 0, 4, 42, PAGE)))
    try:
        buf.open_region(0, 7, 4)
        slots.set(region)
        state, desc = buf.claim(0, 7, 2, 41, 100)  # a write fault's fill, under way
        assert state == core.FREE
        assert buf.seal_region(0, 7)
        writing.start()
        time.sleep(0.5)
        assert writing.is_alive() and results == []  # it waits for that fill
        os.pwrite(region.memfd, b"w" * PAGE, 2 * PAGE)
        buf.filled(desc, True, lib.MPU_FILL_DIRTY)
        desc = None
        writing.join(10)
        assert results == [1]
        assert os.pread(region.write_fd, PAGE, 2 * PAGE) == b"w" * PAGE
    finally:
        if desc is not None:
            buf.filled(desc, False)  # (a waiting write-back must end before the buffer goes)
        if writing.ident is not None:
            writing.join(10)
        os.close(region.write_fd)
        region.close()
        buf.close()
