"""Mappings that write: shared writes through one buffer, flush, write-back
on eviction and at the last unmap, and nothing lost when a client, a
worker or the server dies.  Every check of the file reads it with O_DIRECT,
past any page cache."""
import errno
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import mpumap
from conftest import OVERWRITER, page_cache_bytes
from mpumap.testing import make_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from writer import PAGE, content, write_span  # noqa: E402

MiB = 1 << 20
NOBODY = 65534

pytestmark = pytest.mark.timeout(180)


def read_direct(path):
    """The file as the disk has it (O_DIRECT: past the page cache)."""
    size = os.path.getsize(path)
    buf = mmap.mmap(-1, -(-size // PAGE) * PAGE)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    return buf[:n]


def bad_pages(data, first, count, stamp):
    return [p for p in range(first, first + count)
            if data[p * PAGE:(p + 1) * PAGE] != content(p, stamp)]


def read_in_another_process(server, path, pages):
    """The first pages of the file, as a new client of the server reads them."""
    script = ("import sys, mpumap\n"
              "m = mpumap.connect(sys.argv[1]).map(sys.argv[2])\n"
              "sys.stdout.buffer.write(m[:int(sys.argv[3]) * 4096])\n")
    child = subprocess.run([sys.executable, "-c", script, server.socket, path, str(pages)],
                           capture_output=True, timeout=60)
    assert child.returncode == 0, child.stderr.decode()
    return child.stdout


def wait_for(what, timeout=30, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out")


@pytest.mark.parametrize("page_size", ["4K", "64K"])
def test_two_writers_share_a_file_through_a_small_buffer(start_server, writers, workdir,
                                                         page_size):
    """Two processes map a 64 MiB file r+ through a 16 MiB buffer, each writes
    its half in random page order, then each reads the other's half; once
    both unmapped, the disk holds every byte."""
    path = make_file(os.path.join(workdir, "shared.bin"), 64 * MiB, seed=60)
    pages = 64 * MiB // PAGE
    half = pages // 2
    server = start_server("--page-size", page_size, "--buffer-size", "16M")
    go = os.path.join(workdir, "go")
    procs = [writers.start(server.socket, path, stamp=f"half{i}", first=i * half,
                           count=half, order="random", seed=i, go=go,
                           check=f"{(1 - i) * half}:{half}:half{1 - i}")
             for i in range(2)]
    for proc in procs:
        assert writers.wait_ready(proc)["wrote"] == half
    open(go, "w").close()
    for proc in procs:
        result = writers.result(proc)
        assert result["bad_count"] == 0, result
    data = read_direct(path)
    assert bad_pages(data, 0, half, "half0") == []
    assert bad_pages(data, half, half, "half1") == []
    b = server.stats()["buffer"]
    # The buffer held a quarter of the file: most pages were written back
    # as they were evicted, the rest at the last unmap.
    server_page = {"4K": 4096, "64K": 65536}[page_size]
    assert b["written"] >= (64 * MiB - 16 * MiB) // server_page, b
    assert b["writes"] > 0 and b["dirty"] == 0 and not server.stats()["regions"]


def test_writers_that_unmap_at_once_both_hear_their_writes_are_in(start_server, workdir):
    """Two last unmaps of one file at once, each waiting on a write-back of
    it: both hear that their pages are in the file.  (Where the first
    write-back ends and releases the region before the evictor starts the
    second, that one finds the region gone: a race this test hits only
    now and then, and the full suite once; the server then says the pages
    are in the file, as they are, not ESTALE.)"""
    path = make_file(os.path.join(workdir, "at-once.bin"), 32 * MiB, seed=65)
    pages = 32 * MiB // PAGE
    server = start_server("--page-size", "64K", "--buffer-size", "64M")
    for attempt in range(3):
        clients = [mpumap.connect(server.socket) for _ in range(2)]
        maps = [c.map(path, mode="r+") for c in clients]
        for i, m in enumerate(maps):
            for p in range(i, pages, 2):
                m[p * PAGE:(p + 1) * PAGE] = content(p, f"at-once{attempt}")
        barrier = threading.Barrier(2)
        errors = []

        def close(m):
            barrier.wait()
            try:
                m.close()
            except OSError as exc:
                errors.append(exc)
        threads = [threading.Thread(target=close, args=(m,)) for m in maps]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()
        assert errors == []
        assert bad_pages(read_direct(path), 0, pages, f"at-once{attempt}") == []


def test_flush_makes_writes_durable_while_the_mapping_stays(start_server, workdir):
    path = make_file(os.path.join(workdir, "flush.bin"), 4 * MiB, seed=61)
    server = start_server("--page-size", "4K", "--buffer-size", "16M")
    with mpumap.connect(server.socket) as client, client.map(path, mode="r+") as m:
        m[0:PAGE] = content(0, "first")
        m[100 * PAGE:101 * PAGE] = content(100, "first")
        wait_for(lambda: server.stats()["buffer"]["dirty"] == 2, timeout=5)
        assert m.flush(0, PAGE) == 1  # only the span asked for
        data = read_direct(path)
        assert data[:PAGE] == content(0, "first")
        assert data[100 * PAGE:101 * PAGE] != content(100, "first")
        assert m.flush() == 1
        assert read_direct(path)[100 * PAGE:101 * PAGE] == content(100, "first")
        assert m.flush() == 0  # nothing dirty
        # Written again after a flush: protected again, so dirty again.
        m[0:PAGE] = content(0, "second")
        assert m.flush() == 1
        assert read_direct(path)[:PAGE] == content(0, "second")
        assert m[100 * PAGE:101 * PAGE] == content(100, "first")
    with pytest.raises(ValueError):
        mpumap.connect(server.socket).map(path, mode="w")


def test_long_runs_are_written_back_past_the_page_cache(start_server, workdir):
    """A flush writes runs of dirty pages with O_DIRECT: the bytes reach the
    disk, none is left in the page cache (the file's pages read into the
    cache before are dropped), and the file's last, partial page is
    written too."""
    size = 32 * MiB + 1000
    path = make_file(os.path.join(workdir, "direct.bin"), size, seed=64)
    assert page_cache_bytes(path) // mmap.PAGESIZE > 0  # just written: the cache holds it
    server = start_server("--page-size", "64K", "--buffer-size", "64M")
    pages = size // PAGE
    with mpumap.connect(server.socket) as client, client.map(path, mode="r+") as m:
        write_span(m, 0, pages, "direct", "seq", 0)
        m[pages * PAGE:size] = b"\x5a" * (size - pages * PAGE)
        assert m.flush() == -(-size // (64 << 10))
        cached = page_cache_bytes(path) // mmap.PAGESIZE  # but the last, partial page
        assert cached <= 1, f"{cached} pages of the file still in the page cache"
        data = read_direct(path)
        assert bad_pages(data, 0, pages, "direct") == []
        assert data[pages * PAGE:size] == b"\x5a" * (size - pages * PAGE)


def test_a_read_only_mapping_of_the_same_file_cannot_write(start_server, workdir):
    """One buffer: a reader sees a writer's bytes at once, and cannot write
    them itself, through Python or through raw memory (SIGSEGV)."""
    path = make_file(os.path.join(workdir, "ro.bin"), 1 * MiB, seed=62)
    server = start_server("--page-size", "4K", "--buffer-size", "16M")
    with mpumap.connect(server.socket) as client:
        w = client.map(path, mode="r+")
        r = client.map(path)
        assert r.region_id == w.region_id
        w[PAGE:2 * PAGE] = content(1, "seen")
        assert r[PAGE:2 * PAGE] == content(1, "seen")
        with pytest.raises(TypeError):
            r[0:4] = b"nope"
        raw = ("import ctypes, sys, mpumap\n"
               "m = mpumap.connect(sys.argv[1]).map(sys.argv[2])\n"
               "ctypes.memmove(m.address, b'nope', 4)\n")
        child = subprocess.run([sys.executable, "-c", raw, server.socket, path],
                               capture_output=True, timeout=60)
        assert child.returncode == -signal.SIGSEGV, child.stderr.decode()
        assert r[0:4] == open(path, "rb").read(4)
        w.close()
        r.close()


def test_a_writer_killed_after_writing_loses_nothing(start_server, writers, workdir):
    path = make_file(os.path.join(workdir, "killed.bin"), 8 * MiB, seed=63)
    server = start_server("--page-size", "4K", "--buffer-size", "16M")
    proc = writers.start(server.socket, path, stamp="dying", first=0, count=2048,
                         order="random", go=os.path.join(workdir, "never"))
    assert writers.wait_ready(proc)["wrote"] == 2048
    # (A page written as it was filled counts once the fill is over: soon.)
    wait_for(lambda: server.stats()["buffer"]["dirty"] == 2048, timeout=5)
    proc.kill()
    proc.wait()
    # Its last mapping gone, the region is written back, then released.
    wait_for(lambda: not server.stats()["regions"])
    assert bad_pages(read_direct(path), 0, 2048, "dying") == []


def test_the_server_killed_between_two_halves_loses_nothing(start_server, writers, workdir):
    """The writer's guard writes the buffer to the file before it maps the
    file in its place; the second half goes to the file directly."""
    path = make_file(os.path.join(workdir, "lost.bin"), 16 * MiB, seed=64)
    pages = 16 * MiB // PAGE
    server = start_server("--page-size", "4K", "--buffer-size", "8M")
    proc = writers.start(server.socket, path, stamp="both", first=0, count=pages // 2,
                         order="random", kill=server.proc.pid, then_first=pages // 2,
                         then_count=pages // 2)
    assert writers.wait_ready(proc)["wrote"] == pages // 2
    result = writers.result(proc)
    assert result["fell_back"] and result["bad_count"] == 0, result
    assert bad_pages(read_direct(path), 0, pages, "both") == []
    os.unlink(server.socket)  # the dead server's, for the fixture's check


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="no pidfds: a lost server is "
                    "taken for a dead one")
def test_a_writer_the_server_drops_takes_nothing_from_the_others(start_server, workdir):
    """A writer whose connection the server closes while both live (here it
    hangs up half-way; a client that stops reading its replies is dropped
    too) falls back to its file with its writes in it; the pages stay in
    the buffer for the other clients, who read them on (none is punched
    out from under them), and reach the file through the server too."""
    path = make_file(os.path.join(workdir, "dropped.bin"), 4 * MiB, seed=66)
    server = start_server("--page-size", "4K", "--buffer-size", "16M")
    with mpumap.connect(server.socket) as writer, mpumap.connect(server.socket) as other:
        w = writer.map(path, mode="r+")
        r = other.map(path)
        for p in range(256):
            w[p * PAGE:(p + 1) * PAGE] = content(p, "dropped")
        assert r[0:PAGE] == content(0, "dropped")
        writer._sock.shutdown(socket.SHUT_WR)  # the server sees it go
        wait_for(lambda: writer.fell_back, timeout=10)
        assert bad_pages(w[0:256 * PAGE], 0, 256, "dropped") == []
        # Pages the other client never touched, read by a third process:
        # a page punched out under its descriptor would fault forever.
        assert bad_pages(read_in_another_process(server, path, 256), 0, 256, "dropped") == []
        assert bad_pages(r[0:256 * PAGE], 0, 256, "dropped") == []
        r.close()
    wait_for(lambda: not server.stats()["regions"])
    assert bad_pages(read_direct(path), 0, 256, "dropped") == []


# The writer of the test below, in a pid namespace of its own: the server's
# pid means nothing there, so only the server can say when it is gone.
DROPPED_IN_A_NAMESPACE = """
import json, socket, sys, time
sys.path.insert(0, sys.argv[3])
import mpumap
from writer import PAGE, content
with mpumap.connect(sys.argv[1]) as writer:
    w = writer.map(sys.argv[2], mode="r+")
    for p in range(256):
        w[p * PAGE:(p + 1) * PAGE] = content(p, "nsdrop")
    print("wrote", flush=True)
    sys.stdin.readline()
    writer._sock.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 10
    while not writer.fell_back and time.monotonic() < deadline:
        time.sleep(0.02)
    bad = [p for p in range(256) if w[p * PAGE:(p + 1) * PAGE] != content(p, "nsdrop")]
    print(json.dumps({"fell_back": writer.fell_back, "bad": bad}), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a pid namespace needs root here")
def test_a_writer_in_another_pid_namespace_the_server_drops_takes_nothing_from_the_others(
        start_server, workdir):
    """As above, with the writer in a pid namespace where the server's pid
    is not seen (a client in a container): its guard must still tell a
    server that dropped it from one that died, and leave the buffer's
    pages to the others."""
    path = make_file(os.path.join(workdir, "nsdropped.bin"), 4 * MiB, seed=68)
    server = start_server("--page-size", "4K", "--buffer-size", "16M")
    child = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", DROPPED_IN_A_NAMESPACE,
         server.socket, path, HERE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "wrote"
        with mpumap.connect(server.socket) as other, other.map(path) as r:
            assert r[0:PAGE] == content(0, "nsdrop")
            child.stdin.write("drop\n")
            child.stdin.flush()
            result = json.loads(child.stdout.readline())
            assert result == {"fell_back": True, "bad": []}
            assert child.wait(timeout=30) == 0
            assert bad_pages(read_in_another_process(server, path, 256), 0, 256,
                             "nsdrop") == []
            assert bad_pages(r[0:256 * PAGE], 0, 256, "nsdrop") == []
        wait_for(lambda: not server.stats()["regions"])
        assert bad_pages(read_direct(path), 0, 256, "nsdrop") == []
    finally:
        child.kill()
        child.wait()


SPLITTER = """
import ctypes, sys
import mpumap
libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTDUMP, P, SYSTEM = 16, 65536, 4096
socket_path, path = sys.argv[1:3]
want = bytearray(open(path, "rb").read())

def split(m, page, how):
    at = ctypes.c_void_p(m.address + page * P + SYSTEM)
    r = libc.mlock(at, SYSTEM) if how == "mlock" else libc.madvise(at, SYSTEM, MADV_DONTDUMP)
    assert r == 0, ctypes.get_errno()

with mpumap.connect(socket_path) as client:
    with client.map(path) as m:
        split(m, 1, "mlock")   # mlock faults the page in itself
        split(m, 3, "madvise")
        assert m[P:2 * P] == want[P:2 * P] and m[3 * P:4 * P] == want[3 * P:4 * P]
    with client.map(path, mode="r+") as m:
        for page in (5, 6):
            split(m, page, "madvise")
        assert m[5 * P:6 * P] == want[5 * P:6 * P]  # lands write-protected
        for at in (5 * P + 10, 5 * P + SYSTEM + 10, 5 * P + 2 * SYSTEM + 10,  # each piece
                   6 * P + 2 * SYSTEM + 10, 6 * P + 10):  # a write on a missing page
            m[at] = 0x41
            want[at] = 0x41
        assert m[:] == want
print("ok")
"""


def test_a_client_that_splits_its_mapping_inside_a_page_is_served(start_server, workdir):
    """mlock or madvise of a part of a mapping split it in two inside a
    page, and one UFFDIO_COPY cannot fill a page across mappings: its fault
    waited for ever.  Reads are served, and writes to every
    piece of such a page reach the file."""
    path = make_file(os.path.join(workdir, "split.bin"), 1 * MiB, seed=69)
    want = bytearray(open(path, "rb").read())
    for at in (5 * 65536 + 10, 5 * 65536 + 4096 + 10, 5 * 65536 + 8192 + 10,
               6 * 65536 + 8192 + 10, 6 * 65536 + 10):
        want[at] = 0x41
    server = start_server("--page-size", "64K", "--buffer-size", "8M", "--read-ahead", "0")
    child = subprocess.run([sys.executable, "-c", SPLITTER, server.socket, path],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 0 and child.stdout == "ok\n", child.stderr
    assert read_direct(path) == want


def test_an_evictor_killed_in_the_middle_of_a_write_back(start_server, workdir):
    """The flush it was writing goes to its successor; the pages it was
    writing are dirty again, and written again."""
    path = make_file(os.path.join(workdir, "evictor.bin"), 256 * MiB, seed=65)
    pages = 256 * MiB // PAGE
    server = start_server("--page-size", "64K", "--buffer-size", "512M")
    with mpumap.connect(server.socket) as client, client.map(path, mode="r+") as m:
        for p in range(pages):
            m[p * PAGE:(p + 1) * PAGE] = content(p, "again")
        dirty = 256 * MiB // (64 * 1024)
        wait_for(lambda: server.stats()["buffer"]["dirty"] == dirty, timeout=5)
        evictor = next(w for w in server.workers() if "evictor" in w.name())
        result = {}
        flusher = threading.Thread(target=lambda: result.update(pages=m.flush()))
        flusher.start()
        written = wait_for(lambda: server.stats()["buffer"]["written"], step=0.002)
        evictor.kill()
        flusher.join(120)
        assert not flusher.is_alive()
        assert written < dirty, "the flush was over before the evictor was killed"
        b = server.stats()["buffer"]
        assert b["restarts"] == 1 and b["dirty"] == 0
        assert b["written"] >= dirty  # what was in flight was written twice
    assert bad_pages(read_direct(path), 0, pages, "again") == []


def test_an_unprivileged_client_writes(start_server, writers, workdir):
    """As nobody, through user-mode-only userfaultfd; a file it may not
    write is refused by its own rights."""
    path = make_file(os.path.join(workdir, "nobody.bin"), 4 * MiB, seed=66)
    os.chmod(path, 0o666)
    locked = make_file(os.path.join(workdir, "locked.bin"), 4 * MiB, seed=67)
    os.chmod(locked, 0o644)
    server = start_server("--page-size", "4K", "--buffer-size", "16M",
                          "--socket-mode", "0666")
    proc = writers.start(server.socket, path, stamp="nobody", first=0, count=1024,
                         order="random", drop_uid=NOBODY)
    ready = writers.wait_ready(proc)
    if os.geteuid() == 0:
        assert ready["uffd"] in ("/dev/userfaultfd", "user-mode-only")
    assert writers.result(proc)["bad_count"] == 0
    assert bad_pages(read_direct(path), 0, 1024, "nobody") == []
    proc = writers.start(server.socket, locked, count=1, drop_uid=NOBODY)
    assert writers.wait_ready(proc)["error"] == "PermissionError"


def test_a_file_written_by_one_user_is_not_mapped_by_another(start_server, writers, readers,
                                                             workdir):
    """Regions are per user: two users' buffers of one file would each write
    back what the other never saw, so the server refuses the second user
    (EBUSY) while the first writes, whichever maps first."""
    path = make_file(os.path.join(workdir, "busy.bin"), 1 * MiB, seed=68)
    os.chmod(path, 0o666)
    server = start_server("--page-size", "4K", "--buffer-size", "16M",
                          "--socket-mode", "0666")
    with mpumap.connect(server.socket) as client, client.map(path, mode="r+") as m:
        m[:PAGE] = content(0, "root")
        p = readers.start(server.socket, path, drop_uid=NOBODY)
        result = readers.result(p)
        assert result["error"] == "MpumapError" and result["errno"] == errno.EBUSY, result
    # Unmapped (and written back): the other user maps it, and sees the write.
    p = readers.start(server.socket, path, drop_uid=NOBODY, pages=1)
    assert readers.result(p)["mismatch_count"] == 0
    proc = writers.start(server.socket, path, count=1, stamp="nobody", drop_uid=NOBODY,
                         go=os.path.join(workdir, "go"))
    assert writers.wait_ready(proc)["wrote"] == 1
    with mpumap.connect(server.socket) as client:
        with pytest.raises(OSError) as refused:
            client.map(path)
        assert refused.value.errno == errno.EBUSY
    open(os.path.join(workdir, "go"), "w").close()
    assert writers.result(proc)["bad_count"] == 0


def test_writes_a_full_disk_will_not_take_are_dropped_and_said_so(start_server, workdir):
    """Dirty pages that their file's full file system will not take are
    dropped, as the kernel drops them, rather than kept until the buffer is
    all dirty and every client of every file waits for room for ever; the
    pages it does take are written.  The writer's next flush says ENOSPC,
    though the disk has room again by then and that flush's own pages are
    written; the one after says nothing.  The server serves on."""
    small = os.path.join(workdir, "small-fs")
    os.mkdir(small)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", small],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        path = os.path.join(small, "sparse.bin")
        with open(path, "wb") as f:
            f.truncate(8 * MiB)  # 8 MiB that the file system has room for one of
        other = make_file(os.path.join(workdir, "other.bin"), 4 * MiB, seed=84)
        server = start_server("--page-size", "4K", "--buffer-size", "2M")
        proc = subprocess.Popen([sys.executable, OVERWRITER, server.socket, path,
                                 "--other", other], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and json.loads(proc.stdout.readline()) == {"wrote": True}, \
                proc.poll() is not None and proc.stderr.read()
            subprocess.run(["mount", "-o", "remount,size=16M", small], check=True)
            out, err = proc.communicate("go\n", timeout=60)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, err
        result = json.loads(out)
        assert result["flush"] == -errno.ENOSPC and result["again"] >= 0, result
        assert result["other_right"], result
        assert server.stats()["buffer"]["lost_writes"] > 0
        assert "dirty pages dropped" in server.output()
        with open(path, "rb") as f:
            data = f.read()
        pages = [data[p:p + PAGE] for p in range(0, len(data), PAGE)]
        written = sum(page == b"w" * PAGE for page in pages)
        assert written + sum(page == bytes(PAGE) for page in pages) == len(pages)
        # What the disk had room for before, and what was in the buffer after.
        assert 1 * MiB // PAGE // 2 < written < len(pages), written
    finally:
        subprocess.run(["umount", "-l", small], capture_output=True)


# Maps FILE "r+", writes BYTE over page PAGE, says "wrote", and once a line
# comes on stdin unmaps: prints "closed" (or the errno close raised).
WRITE_ONE_PAGE = """
import sys, mpumap
sock, path, page, byte = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
with mpumap.connect(sock) as c:
    m = c.map(path, mode="r+")
    m[page * 4096:(page + 1) * 4096] = byte * 4096
    print("wrote", flush=True)
    sys.stdin.readline()
    try:
        m.close()
        print("closed", flush=True)
    except OSError as exc:
        print(exc.errno, flush=True)
"""


def test_a_region_mapped_again_during_its_last_write_back_keeps_what_was_written(
        start_server, workdir):
    """The last mapping goes (write-back W1 of the whole region, to end in
    its release), another maps it meanwhile, writes a page W1 has passed
    already, and goes too (W2).  W1, ending first, released the region and
    dropped that dirty page, and W2 found the region gone and said it was
    written.  The last write-back to end decides now.  The order is held
    in the file system: W1 waits in its write of a page after that one,
    and a write-back of another file waits between W1 and W2 until the
    server has heard W1's answer."""
    from conftest import held_in_fuse, stalling_fs

    server = start_server("--page-size", "4K", "--buffer-size", "8M", "--evictors", 1,
                          "--worker-timeout", 60)
    evictor = next(w["pid"] for w in server.stats()["workers"] if w["role"] == "evictor")
    holds = os.path.join(workdir, "holds")
    os.mkdir(holds)
    for name in ("r.bin", "s.bin"):
        open(os.path.join(holds, name), "w").close()
    procs = []

    def writer(name, page, byte):
        proc = subprocess.Popen([sys.executable, "-c", WRITE_ONE_PAGE, server.socket,
                                 os.path.join(fs, name), str(page), byte],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "wrote"
        return proc

    def unmap(proc):
        proc.stdin.write("\n")
        proc.stdin.flush()

    def let_write(name):
        os.unlink(os.path.join(holds, name))
        os.listdir(fs)  # a request: the held writes are answered

    with stalling_fs(os.path.join(workdir, "fs"), "--hold-writes-in", holds,
                     f"r.bin:{1 << 20}:slowwrite", f"s.bin:{1 << 20}:slowwrite") as fs:
        try:
            first, other, second = writer("r.bin", 200, "A"), writer("s.bin", 0, "C"), None
            unmap(first)  # W1: page 200, held
            deadline = time.monotonic() + 20
            while not held_in_fuse(evictor):
                assert time.monotonic() < deadline, "the write-back never reached the file"
                time.sleep(0.05)
            unmap(other)  # s.bin's write-back, behind W1
            second = writer("r.bin", 10, "B")  # a page W1 has passed
            unmap(second)  # W2, behind that
            time.sleep(0.5)
            let_write("r.bin")  # W1 ends; the evictor waits in s.bin's write
            assert first.stdout.readline().strip() == "closed"  # W1's answer was heard
            let_write("s.bin")
            assert [p.communicate(timeout=30)[0].strip() for p in (other, second)] == \
                ["closed", "closed"]
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
        with open(os.path.join(fs, "r.bin"), "rb") as f:
            data = f.read()
    assert data[200 * 4096:201 * 4096] == b"A" * 4096
    assert data[10 * 4096:11 * 4096] == b"B" * 4096


def test_a_register_refused_takes_nothing_from_the_clients_mapping_that_writes(
        start_server, workdir):
    from mpumap import protocol
    from mpumap._core import lib
    from mpumap.protocol import Msg

    path = make_file(os.path.join(workdir, "w.bin"), 1 << 20, seed=61)
    server = start_server("--page-size", "64K", "--buffer-size", 64)
    with mpumap.connect(server.socket) as client, client.map(path, "r+") as m:
        fd = os.open(path, os.O_RDWR)
        try:
            rfds, (mid, _, _, length), _ = client._call(
                Msg.MAP, protocol.U32.pack(lib.MPU_MAP_WRITE), [fd], expect=Msg.MAPPED)
        finally:
            os.close(fd)
        protocol.close_all(rfds)
        # Address 0 once named every entry of the client in the table of
        # writers: refused, it took the first mapping's out with it.
        with pytest.raises(OSError) as refused:
            client._call(Msg.REGISTER, protocol.SPAN.pack(mid, 0, length),
                         expect=Msg.REGISTERED)
        assert refused.value.errno == errno.EINVAL
        # A second mapping over the first's range (an address the kernel
        # gave again before the first's UNMAP came) has an entry of its
        # own: its UNMAP takes that one only.
        client._call(Msg.REGISTER, protocol.SPAN.pack(mid, m.address, length),
                     expect=Msg.REGISTERED)
        client._call(Msg.UNMAP, protocol.U64.pack(mid), expect=Msg.UNMAPPED)
        # Still protected once written back: the second write is seen too.
        m[:5] = b"first"
        m.flush()
        m[:5] = b"again"
        m.flush()
    with open(path, "rb") as f:
        assert f.read(5) == b"again"


def test_a_flush_waits_for_the_file_past_the_clients_request_timeout(start_server, workdir):
    from conftest import stalling_fs

    holds = os.path.join(workdir, "holds")
    os.mkdir(holds)
    open(os.path.join(holds, "r.bin"), "w").close()  # its writes wait while this is there
    server = start_server("--page-size", "64K", "--buffer-size", 64)
    with stalling_fs(os.path.join(workdir, "fs"), "--hold-writes-in", holds,
                     f"r.bin:{1 << 20}:slowwrite") as fs:
        path = os.path.join(fs, "r.bin")

        def let_write():
            os.unlink(os.path.join(holds, "r.bin"))
            os.listdir(fs)  # a request: the held writes are answered

        timer = threading.Timer(3.0, let_write)
        with mpumap.connect(server.socket, timeout=1) as client, client.map(path, "r+") as m:
            m[:5] = b"later"
            timer.start()
            try:
                started = time.monotonic()
                m.flush()  # a flush waits for the disk, not the 1 s of a request
                assert time.monotonic() - started >= 2.0
            finally:
                timer.cancel()
                timer.join()
        with open(path, "rb") as f:
            assert f.read(5) == b"later"
