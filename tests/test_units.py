"""Unit tests of pure logic: settings, the sizing rule, framing, and the C
core's page-state transitions (in this process, on real shared memory)."""
import errno
import os
import socket
import subprocess
import sys

import pytest

from mpumap import core, protocol
from mpumap import settings as S
from mpumap.evictor import cgroup_memory
from mpumap.pbm import PageBuffer, PageTable
from mpumap.protocol import Msg, ProtocolError


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("64K", 65536), ("64k", 65536), ("2M", 2 << 20), ("1G", 1 << 30),
    ("256MiB", 256 << 20), ("3 KB", 3072),
])
def test_parse_size(text, value):
    assert S.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "-1", "1.5M", "12Q"])
def test_parse_size_refuses(text):
    with pytest.raises(S.SettingError):
        S.parse_size(text)


def test_page_size_must_be_a_multiple_of_the_system_page():
    assert S.parse_page_size("64K") == 65536
    for bad in ("1000", "0", "6K" if S.SYSTEM_PAGE_SIZE == 4096 else "1"):
        with pytest.raises(S.SettingError, match="multiple"):
            S.parse_page_size(bad)


def test_buffer_size_in_pages_or_bytes():
    assert S.parse_buffer_pages("100", 65536) == 100
    assert S.parse_buffer_pages("16M", 65536) == 256
    with pytest.raises(S.SettingError):
        S.parse_buffer_pages("1K", 65536)


def test_settings_validation():
    with pytest.raises(S.SettingError, match="watermarks"):
        S.Settings(high_water=70, low_water=70)
    with pytest.raises(S.SettingError, match="too small"):
        S.Settings(buffer_pages=3, fillers=2)
    assert S.Settings(buffer_pages=6, fillers=2).buffer_pages == 6
    assert S.Settings().adaptive


def test_default_read_ahead_is_a_megabyte_within_the_buffer():
    assert S.Settings(page_size=4096).read_ahead == 255
    assert S.Settings(page_size=65536).read_ahead == 15
    assert S.Settings(page_size=2 << 20).read_ahead == 0
    assert S.Settings(page_size=4096, buffer_pages=100).read_ahead == 24
    assert S.Settings(page_size=4096, buffer_pages=6, fillers=2).read_ahead == 0
    assert S.Settings(page_size=4096, read_ahead=7).read_ahead == 7


def test_socket_path_order(monkeypatch):
    monkeypatch.delenv("MPUMAP_SOCKET", raising=False)
    assert S.socket_path() == S.DEFAULT_SOCKET
    monkeypatch.setenv("MPUMAP_SOCKET", "/tmp/env.sock")
    assert S.socket_path() == "/tmp/env.sock"
    assert S.socket_path("/tmp/flag.sock") == "/tmp/flag.sock"


def test_adaptive_limit_counts_what_the_buffer_holds():
    page, MiB, GiB = 1 << 20, 1 << 20, 1 << 30
    total = 24 * GiB
    # 1 GiB available, 256 MiB reserve, nothing held: 768 pages
    assert S.adaptive_limit(0, page, GiB, total, None, 256 * MiB, 10) == 768
    # holding 500 pages, which the kernel no longer counts as available
    assert S.adaptive_limit(500, page, GiB, total, None, 256 * MiB, 10) == 1268
    # a cgroup of 1 GiB using 700 MiB, 200 of them the buffer's: 1024 - 500 - 256
    assert S.adaptive_limit(200, page, 8 * GiB, total, (GiB, 700 * MiB), 256 * MiB, 10) == 268
    # ... and if the buffer's pages are charged elsewhere, the cgroup's limit
    # still bounds it
    assert S.adaptive_limit(600, page, 8 * GiB, total, (GiB, 50 * MiB), 256 * MiB, 10) == 768
    # never below the minimum, even when memory is short
    assert S.adaptive_limit(0, page, 100 * MiB, total, None, 256 * MiB, 10) == 10
    # the default reserve follows the memory there is: RAM, or a tighter cgroup
    assert S.adaptive_limit(0, page, 8 * GiB, total, (GiB, 0), None, 10) == (GiB - GiB // 10) // MiB == 921
    assert S.default_reserve(24 * GiB) == (24 * GiB) // 10
    assert S.default_reserve(GiB) == GiB // 10
    assert S.default_reserve(128 * MiB) == 32 * MiB


def test_cgroup_room_takes_the_tightest_limit(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("5:memory:/a/b\n0::/x\n")
    mem = tmp_path / "memory"
    (mem / "a" / "b").mkdir(parents=True)
    (mem / "a" / "b" / "memory.limit_in_bytes").write_text(str(1 << 62) + "\n")
    (mem / "a" / "b" / "memory.usage_in_bytes").write_text("100\n")
    (mem / "a" / "memory.limit_in_bytes").write_text("1000\n")
    (mem / "a" / "memory.usage_in_bytes").write_text("400\n")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "memory.max").write_text("max\n")
    (tmp_path / "x" / "memory.current").write_text("5\n")
    assert cgroup_memory(str(proc), str(tmp_path)) == (1000, 400)
    proc.write_text("0::/x\n")
    assert cgroup_memory(str(proc), str(tmp_path)) is None


def test_frames_are_checked():
    good = protocol.pack(Msg.UNMAP, protocol.U64.pack(7))
    assert protocol.unpack(good, 0)[2] == (7,)
    cases = {
        b"": "shorter",
        b"XXXX" + good[4:]: "magic",
        good[:4] + b"\x09\x00" + good[6:]: "version",
        good + b"x": "payload bytes",
        protocol.pack(99): "unknown message type",
        protocol.pack(Msg.UNMAP, b"123"): "payload is 3 bytes",
    }
    for packet, message in cases.items():
        with pytest.raises(ProtocolError, match=message):
            protocol.unpack(packet, 0)
    with pytest.raises(ProtocolError, match="descriptors"):
        protocol.unpack(good, 1)
    code, text = protocol.parse_error(protocol.error_payload(errno.EACCES, "no"))
    assert (code, text) == (errno.EACCES, "no")


def test_oversized_packets_are_refused_and_their_fds_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        a.send(b"x" * (protocol.HEADER.size + protocol.MAX_PAYLOAD + 1))
        with pytest.raises(ProtocolError, match="too large"):
            protocol.receive(b)


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
        assert table.count(core.PRESENT) == 4
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


def test_server_help_explains_every_setting():
    out = subprocess.run([sys.executable, "-m", "mpumap.cli", "--help"],
                         capture_output=True, text=True, timeout=30).stdout
    for flag, env in [("--page-size", "UMAP_PAGESIZE"), ("--buffer-size", "UMAP_BUFSIZE"),
                      ("--fillers", "UMAP_PAGE_FILLERS"), ("--evictors", "UMAP_PAGE_EVICTORS"),
                      ("--high-water", "UMAP_EVICT_HIGH_WATER_THRESHOLD"),
                      ("--low-water", "UMAP_EVICT_LOW_WATER_THRESHOLD"),
                      ("--adapt-interval", "UMAP_BUFADAPT_FREQ"), ("--socket", "MPUMAP_SOCKET")]:
        assert flag in out and env in out


@pytest.mark.parametrize("args,env,message", [
    (["--page-size", "1000"], {}, "multiple of the system page size"),
    (["--fillers", "0"], {}, "between 1 and"),
    (["--bogus"], {}, "No such option"),
    (["--high-water", "50", "--low-water", "60"], {}, "watermarks"),
    ([], {"UMAP_PAGESIZE": "12345"}, "UMAP_PAGESIZE"),
    (["--buffer-size", "lots"], {}, "not a size"),
    (["--buffer-size", "2", "--fillers", "2"], {}, "too small"),
    (["--spin", "-1"], {}, "--spin"),
    ([], {"UMAP_SPIN_US": "forever"}, "UMAP_SPIN_US"),
])
def test_bad_settings_fail_in_one_line(args, env, message):
    proc = subprocess.run([sys.executable, "-m", "mpumap.cli", "--socket", "/tmp/unused.sock",
                           *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not os.path.exists("/tmp/unused.sock")


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
