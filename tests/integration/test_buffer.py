"""Issue: a page buffer that respects the machine: bounded memory, no second
copy in the page cache, read-ahead, prefetch, many regions, adaptive size."""
import contextlib
import ctypes
import errno
import mmap
import os
import random
import shutil
import subprocess
import sys
import time

import pytest

import mpumap
from conftest import assert_clean, page_cache_bytes, uncached_file
from mpumap.testing import MiB, make_file

pytestmark = pytest.mark.timeout(240)


def server_memory(server):
    """USS of the server's processes plus what its memfds hold."""
    procs = [server.ps] + server.workers()
    uss = sum(p.memory_full_info().uss for p in procs)
    return uss + server.stats()["buffer"]["memfd_bytes"]


def test_bounded_memory_and_no_second_copy(start_server, readers, workdir):
    path = uncached_file(os.path.join(workdir, "big.bin"), 128 * MiB, seed=21)
    buffer = 16 * MiB
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--fillers", 2)
    procs = [readers.start(server.socket, path, order="random", seed=i, direct="")
             for i in range(4)]
    peak_memory = peak_cache = 0
    while any(p.poll() is None for p in procs):
        peak_memory = max(peak_memory, server_memory(server))
        peak_cache = max(peak_cache, page_cache_bytes(path))
        time.sleep(0.05)
    for p in procs:
        assert_clean(readers.result(p))
    stats = server.stats()
    assert stats["regions"] == [] or stats["regions"][0]["store_io"] == "direct"
    assert stats["buffer"]["peak_used"] <= buffer // (64 << 10)
    assert peak_memory < buffer + 32 * MiB, f"server used {peak_memory / MiB:.1f} MiB"
    assert peak_cache < 16 * MiB, f"{peak_cache / MiB:.1f} MiB of the file in the page cache"
    assert stats["buffer"]["evictions"] > 0


FILL_WAYS = pytest.mark.parametrize("fill_by", ["copy", "write"])


@FILL_WAYS
def test_a_scan_reads_through_the_page_cache_and_drops_behind(start_server, readers, workdir,
                                                              fill_by):
    """A direct store reads a scan's full windows buffered, with the kernel's
    read-ahead, and drops each behind it: the scan leaves the page cache as
    it found it (copied in, or spliced into the memfd)."""
    path = uncached_file(os.path.join(workdir, "scan.bin"), 64 * MiB, seed=29)
    server = start_server("--page-size", "4K", "--buffer-size", "128M", "--fill-by", fill_by)
    p = readers.start(server.socket, path, order="seq", chunk=1 << 20, direct="")
    assert_clean(readers.result(p))
    b = server.stats()["buffer"]
    assert b["readahead_fills"] > 0.9 * (64 * MiB // 4096), b["readahead_fills"]
    assert page_cache_bytes(path) <= 4 * MiB, page_cache_bytes(path) / MiB
    # A scan that stops half-way: what the kernel read ahead past it goes
    # once the scan has been still for a moment.
    other = uncached_file(os.path.join(workdir, "half.bin"), 64 * MiB, seed=30)
    p = readers.start(server.socket, other, order="seq", chunk=1 << 20, pages=32, direct="")
    assert_clean(readers.result(p))
    deadline = time.monotonic() + 10
    while page_cache_bytes(other) > 4 * MiB:
        assert time.monotonic() < deadline, page_cache_bytes(other) / MiB
        time.sleep(0.05)


def test_drop_mode_keeps_the_page_cache_clean(start_server, readers, workdir):
    path = uncached_file(os.path.join(workdir, "drop.bin"), 32 * MiB, seed=22)
    server = start_server("--page-size", "64K", "--buffer-size", "8M", "--store-io", "drop")
    p = readers.start(server.socket, path, order="random", direct="")
    assert_clean(readers.result(p))
    assert page_cache_bytes(path) < 4 * MiB


@contextlib.contextmanager
def half_cached_file(path, size, seed):
    """A file whose first half is in the page cache, locked there while the
    context lasts, and whose second half is not.

    The lock is what makes "in the page cache" hold for the whole test: this
    machine runs DAMON with a pageout scheme that reclaims page cache it
    thinks cold, and a CI run lost a tenth of the cached half that way."""
    uncached_file(path, size, seed)
    length = size // 2
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.mlock.argtypes = libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap")
    try:
        # No read-ahead into the second half while mlock reads the first in.
        if libc.madvise(address, length, mmap.MADV_RANDOM) or libc.mlock(address, length):
            raise OSError(ctypes.get_errno(), "madvise/mlock of the cached half")
        yield path
    finally:
        libc.munmap(address, length)


def test_what_the_page_cache_holds_is_copied_from_there(start_server, readers, workdir):
    size = 32 * MiB + 12345  # the last page ends mid-way, cached and cold alike
    with half_cached_file(os.path.join(workdir, "half.bin"), size, seed=23) as path:
        # Without read-ahead: a window that takes in a cold page is read from
        # the disk whole, cached pages and all.
        server = start_server("--page-size", "64K", "--buffer-size", "64M", "--read-ahead", 0)
        p = readers.start(server.socket, path, order="random", direct="")
        assert_clean(readers.result(p))
        buffer = server.stats()["buffer"]
        assert buffer["bytes_read"] >= size
        # The cached half came from the cache, the cold half from the disk
        # (and the 64K page that straddles them too).  A cached page the
        # kernel holds locked at that moment is read from the disk too:
        # RWF_NOWAIT does not wait (one run in five here missed a few pages
        # of 256).
        assert 0.9 * (size // 2) <= buffer["cache_bytes"] <= size // 2
        # Nothing was added to the cache, and nothing taken out: we would
        # drop windows of pages, and the test holds the cached half locked.
        cached = page_cache_bytes(path)
        assert size // 2 <= cached <= size // 2 + 4 * 4096, cached


def faults_for_read(start_server, readers, path, read_ahead=None, order="seq"):
    read_ahead = () if read_ahead is None else ("--read-ahead", read_ahead)
    server = start_server("--page-size", "4K", "--buffer-size", "32M", "--fillers", 2,
                          *read_ahead)
    p = readers.start(server.socket, path, order=order, chunk=4096)
    assert_clean(readers.result(p))
    return server.stats()["buffer"]


def test_read_ahead_saves_faults(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "scan.bin"), 16 * MiB, seed=23)
    plain = faults_for_read(start_server, readers, path, 0)
    ahead = faults_for_read(start_server, readers, path, 8)
    default = faults_for_read(start_server, readers, path)  # 1 MiB windows
    pages = 16 * MiB // 4096
    assert plain["faults"] >= pages
    assert ahead["faults"] < plain["faults"] / 4, (ahead["faults"], plain["faults"])
    assert ahead["readahead_fills"] > pages / 2
    assert plain["readahead_fills"] == 0
    assert default["faults"] < pages / 32, default["faults"]


def test_random_faults_read_around_while_the_buffer_has_room(start_server, readers, workdir):
    """A data set that fits is read in windows whatever the order; in a full
    buffer a random fault reads its page alone."""
    pages = 16 * MiB // 4096
    path = make_file(os.path.join(workdir, "random.bin"), 16 * MiB, seed=26)
    roomy = faults_for_read(start_server, readers, path, order="random")  # a 32 MiB buffer
    # The region fits: windows grow from 1 MiB to 8 MiB.  A fault that lands
    # in a window still being read reads its page itself (about 450 here).
    assert roomy["faults"] < pages / 4, roomy["faults"]
    assert roomy["readaround_fills"] > 3 * pages / 4, roomy["readaround_fills"]
    server = start_server("--page-size", "4K", "--buffer-size", "1M", "--read-ahead", 63)
    p = readers.start(server.socket, path, order="random", chunk=4096)
    assert_clean(readers.result(p))
    full = server.stats()["buffer"]
    # Read around only while two windows fit below the high watermark: the
    # first few faults.  The monitor decides on the pages in use, which lag
    # the windows it posted and the fillers have not claimed yet, so on a
    # busy machine up to a buffer's worth (256 pages) is read around before
    # it sees the buffer full; never again after.  A random fault now and
    # then lands right after the last one and is taken for a scan; no more
    # than that is read ahead.
    assert full["faults"] >= 0.95 * pages
    assert full["readaround_fills"] < 256, full["readaround_fills"]
    assert full["readahead_fills"] < 0.05 * pages, full["readahead_fills"]


def test_a_buffer_that_just_holds_the_file_reads_it_around(start_server, readers, workdir):
    """A buffer that holds the file below its high watermark with two pages
    to spare reads it in windows, as a roomy one does: a page being filled
    is in use and missing both, and counted twice, the pages in flight made
    the file look too large for the buffer."""
    pages = 16 * MiB // 4096
    path = make_file(os.path.join(workdir, "random.bin"), 16 * MiB, seed=28)
    server = start_server("--page-size", "4K", "--buffer-size", pages * 10 // 9 + 2)
    p = readers.start(server.socket, path, order="random", chunk=4096)
    assert_clean(readers.result(p))
    b = server.stats()["buffer"]
    assert pages <= b["high"] < pages + 8, b["high"]  # what the test is about
    assert b["evictions"] == 0, b["evictions"]
    assert b["faults"] < pages / 4, b["faults"]
    assert b["readaround_fills"] > 3 * pages / 4, b["readaround_fills"]


def test_slow_random_faults_in_a_full_buffer_read_nothing_around(start_server, readers,
                                                                  workdir):
    """Evictions keep a full buffer between its watermarks: the room below
    the high one is theirs, not room to read around in, even when faults
    come too slowly (a cold disk) for the evictors to run often.  Here the
    climb from the low watermark to the high one takes about a second."""
    path = make_file(os.path.join(workdir, "random.bin"), 16 * MiB, seed=27)
    server = start_server("--page-size", "4K", "--buffer-size", 1024, "--read-ahead", 15)
    p = readers.start(server.socket, path, order="random", chunk=4096, take=3072, pause=0.003)
    assert_clean(readers.result(p))
    b = server.stats()["buffer"]
    assert b["evictions"] > 1000, b["evictions"]
    # The first faults read around until the buffer is near its low
    # watermark (716 pages), and the monitor lags what the fillers claim:
    # up to a buffer's worth.  Never again after.
    assert b["readaround_fills"] <= 1024, b["readaround_fills"]


def test_a_scan_goes_on_while_the_client_maps_more(start_server, workdir):
    """A data loader maps the next files while it scans one: the scan keeps
    its read-ahead across the new mappings."""
    path = make_file(os.path.join(workdir, "scan.bin"), 16 * MiB, seed=27)
    small = [make_file(os.path.join(workdir, f"small{i}.bin"), 4096, seed=100 + i)
             for i in range(64)]
    server = start_server("--page-size", "4K", "--buffer-size", "32M")
    want = open(path, "rb").read()
    chunk = len(want) // len(small)
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        others = []
        for i, other in enumerate(small):
            assert m[i * chunk:(i + 1) * chunk] == want[i * chunk:(i + 1) * chunk]
            others.append(client.map(other))
        for o in others:
            o.close()
    # 4,096 pages: a scan that started afresh at each mapping took about 230, this 15.
    faults = server.stats()["buffer"]["faults"]
    assert faults < 60, faults


def test_advice_says_how_a_mapping_is_read(start_server, workdir):
    """madvise's words: RANDOM reads each faulting page alone, even in a
    scan; SEQUENTIAL reads full windows ahead from the first fault;
    WILLNEED prefetches; NORMAL goes back to following scans."""
    pages = 4 * MiB // 4096
    paths = [make_file(os.path.join(workdir, f"advised{i}.bin"), 4 * MiB, seed=40 + i)
             for i in range(3)]
    server = start_server("--page-size", "4K", "--buffer-size", "32M", "--read-ahead", 63)

    def counters():
        b = server.stats()["buffer"]
        return {k: b[k] for k in ("faults", "readahead_fills", "readaround_fills",
                                  "prefetch_fills")}

    def grown(before, key, want):
        deadline = time.monotonic() + 20
        while counters()[key] - before[key] < want:
            assert time.monotonic() < deadline, (key, counters(), before)
            time.sleep(0.02)
        return {k: v - before[k] for k, v in counters().items()}

    with mpumap.connect(server.socket) as client:
        with client.map(paths[0]) as m:
            assert m.advise(mmap.MADV_RANDOM) == 0
            before = counters()
            assert m[:] == open(paths[0], "rb").read()  # a scan, page by page
            used = {k: v - before[k] for k, v in counters().items()}
            assert used["faults"] == pages, used
            assert used["readahead_fills"] == used["readaround_fills"] == 0, used
            assert m.advise(mmap.MADV_NORMAL) == 0
        with client.map(paths[1]) as m:
            m.advise(mmap.MADV_SEQUENTIAL)
            before = counters()
            assert m[pages // 2 * 4096] == open(paths[1], "rb").read()[pages // 2 * 4096]
            # One fault read its page and 63 more, and asked for 64 after those.
            used = grown(before, "readahead_fills", 127)
            assert used["faults"] == 1 and used["readaround_fills"] == 0, used
        with client.map(paths[2]) as m:
            before = counters()
            assert m.advise(mmap.MADV_WILLNEED, 1 * MiB, 1 * MiB) == 256
            grown(before, "prefetch_fills", 256)
            before = counters()
            want = open(paths[2], "rb").read()
            assert m[1 * MiB:2 * MiB] == want[1 * MiB:2 * MiB]
            assert counters()["faults"] == before["faults"]  # all there
            with pytest.raises(ValueError, match="whole mapping"):
                m.advise(mmap.MADV_RANDOM, 4096)
            with pytest.raises(ValueError, match="none of"):
                m.advise(mmap.MADV_DONTNEED)
            with pytest.raises(ValueError, match="outside"):
                m.advise(mmap.MADV_WILLNEED, len(m) - 1, 2)


@FILL_WAYS
def test_read_ahead_stays_within_the_buffer(start_server, readers, workdir, fill_by):
    path = make_file(os.path.join(workdir, "scan.bin"), 32 * MiB, seed=24)
    server = start_server("--page-size", "4K", "--buffer-size", 256, "--read-ahead", 32,
                          "--fill-by", fill_by)
    p = readers.start(server.socket, path, order="seq")
    assert_clean(readers.result(p))
    b = server.stats()["buffer"]
    assert b["peak_used"] <= 256 and b["readahead_fills"] > 0 and b["evictions"] > 0


@FILL_WAYS
def test_prefetch_fills_ahead_of_use(start_server, workdir, fill_by):
    path = make_file(os.path.join(workdir, "pre.bin"), 8 * MiB + 100, seed=25)
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--fill-by", fill_by)
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        started = time.monotonic()
        assert m.prefetch() == 129
        assert time.monotonic() - started < 1.0  # it returns at once
        deadline = time.monotonic() + 20
        while server.stats()["buffer"]["prefetch_fills"] < 129:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = server.stats()["buffer"]["faults"]
        assert m[:] == open(path, "rb").read()
        assert server.stats()["buffer"]["faults"] == before  # every page was there
        with pytest.raises(ValueError):
            m.prefetch(len(m) - 10, 11)


def test_prefetch_respects_the_buffer(start_server, workdir):
    path = make_file(os.path.join(workdir, "pre.bin"), 16 * MiB, seed=26)
    server = start_server("--page-size", "64K", "--buffer-size", 64)
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        m.prefetch()
        time.sleep(0.5)
        b = server.stats()["buffer"]
        assert 0 < b["prefetch_fills"] <= 64 and b["peak_used"] <= 64
        assert m[:] == open(path, "rb").read()


def test_two_thousand_regions(start_server, readers, workdir):
    folder = os.path.join(workdir, "many")
    os.mkdir(folder)
    paths = [make_file(os.path.join(folder, f"f{i:04}.bin"), 8192 + i, seed=1000 + i)
             for i in range(2000)]
    server = start_server("--page-size", "4K", "--buffer-size", 8192)
    go = os.path.join(workdir, "go")
    procs = []
    for k in range(4):
        listing = os.path.join(workdir, f"list{k}")
        with open(listing, "w") as f:
            f.write("\n".join(paths[k * 500:(k + 1) * 500]))
        procs.append(readers.start(server.socket, list=listing, go=go, order="random"))
    for p in procs:
        readers.wait_ready(p, timeout=120)
    stats = server.stats()
    assert stats["regions_total"] == 2000
    assert len(stats["regions"]) == 500  # the status lists the busiest
    assert len(stats["clients"]) == 4
    open(go, "w").close()
    for p in procs:
        result = readers.result(p)
        assert_clean(result)
        assert len(result["regions"]) == 500
    assert server.stats()["regions"] == []


def test_a_mapping_registered_where_one_unmapped_was_reads_its_own_file(start_server, workdir):
    # A threaded client: one thread's munmap, before its UNMAP reaches the
    # server; another thread's mmap gets the address again, and registers.
    from mpumap import protocol
    from mpumap.protocol import Msg

    first = make_file(os.path.join(workdir, "first.bin"), 2 << 20, seed=71)
    second = make_file(os.path.join(workdir, "second.bin"), 1 << 20, seed=72)
    server = start_server("--page-size", "64K", "--buffer-size", 64)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    with mpumap.connect(server.socket) as client:
        old = client.map(first)
        address = old.address
        mmap.mmap.close(old)
        fd = os.open(second, os.O_RDONLY)
        try:
            (memfd,), (mid, _, size, length), _ = client._call(
                Msg.MAP, protocol.U32.pack(0), [fd], expect=Msg.MAPPED)
        finally:
            os.close(fd)
        try:
            assert libc.mmap(address, length, mmap.PROT_READ,
                             mmap.MAP_SHARED | 0x10, memfd, 0) == address  # MAP_FIXED
        finally:
            os.close(memfd)
        try:
            client._call(Msg.REGISTER, protocol.SPAN.pack(mid, address, length),
                         expect=Msg.REGISTERED)
            assert ctypes.string_at(address, size) == open(second, "rb").read()
        finally:
            libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(length))
            client._call(Msg.UNMAP, protocol.U64.pack(mid), expect=Msg.UNMAPPED)
        old.close()


def test_a_file_the_kernel_makes_for_its_reader_is_refused(start_server, workdir):
    # The server would read it as itself: root's view, not the client's.
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.isfile(path) or not os.path.getsize(path):
        pytest.skip(f"no {path} here")
    server = start_server("--buffer-size", 64)
    with mpumap.connect(server.socket) as client:
        with pytest.raises(OSError, match="files of sysfs are not served") as info:
            client.map(path)
        assert info.value.errno == errno.EINVAL
        mine = make_file(os.path.join(workdir, "mine.bin"), 5000, seed=5)
        with client.map(mine) as m:
            assert m[:] == open(mine, "rb").read()
    # From a mount namespace of its own (a container), where the file's
    # mount has another id, just the same.
    if shutil.which("unshare") and os.geteuid() == 0:
        program = ("import errno, sys, mpumap\n"
                   "try:\n"
                   "    mpumap.connect(sys.argv[1]).map(sys.argv[2])\n"
                   "except OSError as exc:\n"
                   "    print(exc.errno == errno.EINVAL, exc)\n")
        out = subprocess.run(["unshare", "--mount", sys.executable, "-c", program,
                              server.socket, path], capture_output=True, text=True, timeout=30)
        assert out.stdout.startswith("True") and "sysfs" in out.stdout, out


def test_past_the_limits_a_clean_refusal(start_server, workdir):
    paths = [make_file(os.path.join(workdir, f"f{i}.bin"), 5000, seed=i) for i in range(12)]
    server = start_server("--buffer-size", 64, "--max-regions", 10,
                          "--max-client-mappings", 6)
    with mpumap.connect(server.socket) as a, mpumap.connect(server.socket) as b:
        held = [a.map(p) for p in paths[:6]]
        with pytest.raises(OSError, match="max-client-mappings") as info:
            a.map(paths[6])
        assert info.value.errno == errno.EMFILE
        held += [b.map(p) for p in paths[6:10]]
        with pytest.raises(OSError, match="max-regions") as info:
            b.map(paths[10])
        assert info.value.errno == errno.ENFILE
        held.append(b.map(paths[0]))  # a region served already is no new region
        for m, path in zip(held, paths[:10] + paths[:1]):
            assert m[:] == open(path, "rb").read()
        held.pop().close()
        held.pop().close()
        m = b.map(paths[11])  # room again
        assert m[:] == open(paths[11], "rb").read()
        m.close()
        for m in held:
            m.close()


def test_adaptive_size_follows_a_memory_cgroup(cgroup, start_server, readers, workdir):
    cgroup.set_limit(1024 * MiB)
    page = 64 << 10
    # The server joins the cgroup before it starts (its workers follow).
    # Without read-ahead: the pages fillers read ahead or around a fault are
    # written by them and charged to their cgroup, and cgroup v1 refuses a
    # limit below what it cannot reclaim (EBUSY); those a fault brings are
    # charged to the client's.
    server = start_server("--page-size", "64K", "--adapt-interval", "0.5",
                          "--memory-reserve", "64M", "--read-ahead", 0, cgroup=cgroup.procs)
    assert server.proc.pid in cgroup.pids()
    limit = server.stats()["buffer"]["limit"]
    assert limit * page <= 1024 * MiB - 64 * MiB
    assert limit * page > 512 * MiB

    path = make_file(os.path.join(workdir, "data.bin"), 448 * MiB, seed=31)
    procs = [readers.start(server.socket, path, order="random", seed=i, rounds=3)
             for i in range(2)]
    deadline = time.monotonic() + 60
    while server.stats()["buffer"]["used"] * page < 300 * MiB:
        assert time.monotonic() < deadline, server.stats()["buffer"]
        assert all(p.poll() is None for p in procs), "readers finished too soon"
        time.sleep(0.05)

    cgroup.set_limit(256 * MiB)
    lowered = time.monotonic()
    while True:
        b = server.stats()["buffer"]
        if b["used"] * page <= 256 * MiB - 64 * MiB and b["limit"] * page <= 192 * MiB:
            break
        assert time.monotonic() - lowered < 2 * 0.5 + 1.0, b
        time.sleep(0.05)
    for p in procs:
        assert_clean(readers.result(p))
    assert cgroup.oom_kills() == 0
    assert server.proc.poll() is None


def test_a_region_page_larger_than_the_servers_is_read_whole(start_server, workdir):
    """Client.map(page_size=...): one fault reads the whole region page it
    falls in, however the buffer's (server) pages come and go."""
    path = make_file(os.path.join(workdir, "big-pages.bin"), 16 * MiB, seed=31)
    with open(path, "rb") as f:
        want = f.read()
    pages = list(range(0, len(want), 4096))
    random.Random(3).shuffle(pages)
    for buffer, most in (("32M", 16 * MiB // (64 << 10) + 8), ("2M", None)):
        server = start_server("--page-size", "4K", "--buffer-size", buffer)
        with mpumap.connect(server.socket) as client:
            for bad in (2048, 8 << 20):
                with pytest.raises(OSError) as info:
                    client.map(path, page_size=bad)
                assert info.value.errno == errno.EINVAL
            with pytest.raises(ValueError):
                client.map(path, page_size=3000)
            with client.map(path, page_size=64 << 10) as m:
                m.advise(mmap.MADV_RANDOM)  # no read-ahead, no read-around: pages only
                for off in pages:
                    assert m[off:off + 4096] == want[off:off + 4096], off
                stats = client.stats()
        (region,) = stats["regions"]
        assert region["page_size"] == 64 << 10
        faults = stats["buffer"]["faults"]
        if most:  # the buffer holds it all: one fault per region page
            assert 256 <= faults <= most, faults
        assert stats["buffer"]["peak_used"] <= stats["buffer"]["limit"]
