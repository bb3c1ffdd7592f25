"""Issue: nothing lost, nobody hangs, nobody gets in: crashes, bad input,
untrusted clients."""
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

import stallfs
from conftest import assert_clean, held_in_fuse, stalling_fs
from mpumap.testing import MiB, make_file

pytestmark = pytest.mark.timeout(180)


def test_clients_finish_when_the_server_is_killed(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "data.bin"), 32 * MiB, seed=51)
    server = start_server("--page-size", "64K", "--buffer-size", "4M")
    # Rounds until told to stop, and told only once the server is dead: a
    # scan could finish three rounds before the kill (it did, once, in a
    # CI run) and never hear of it.
    stop = os.path.join(workdir, "stop")
    procs = [readers.start(server.socket, path, order=o, seed=i, rounds=3, stop=stop)
             for i, o in enumerate(["seq", "random", "seq", "random"])]
    for p in procs:
        readers.wait_ready(p)
    deadline = time.monotonic() + 30
    while server.stats()["buffer"]["evictions"] < 200:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    workers = server.workers()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    killed = time.monotonic()
    open(stop, "w").close()
    for p in procs:
        result = readers.result(p, timeout=60)
        assert_clean(result)
        assert result["rounds"] >= 3
        assert result["pages"] == result["rounds"] * 32 * MiB // (64 << 10)
        assert "mpumap: lost the server" in p.error_output
    assert time.monotonic() - killed < 60
    psutil.wait_procs(workers, timeout=5)
    os.unlink(server.socket)  # the dead server's, for the fixture's check


def test_workers_killed_again_and_again(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "data.bin"), 16 * MiB, seed=52)
    server = start_server("--page-size", "4K", "--buffer-size", "2M", "--fillers", 2,
                          "--read-ahead", 4)
    procs = [readers.start(server.socket, path, order=o, seed=i, seconds=15)
             for i, o in enumerate(["seq", "random", "random"])]
    for p in procs:
        readers.wait_ready(p)
    rng = random.Random(5)
    kills = 0
    first_seen = {}
    while kills < 24 and any(p.poll() is None for p in procs):
        # Only workers that have been up a while: a worker dying right after
        # its start is a crash loop, which the server gives up on.
        now = time.monotonic()
        workers = server.workers()
        for w in workers:
            first_seen.setdefault(w.pid, now)
        victims = [w for w in workers if now - first_seen[w.pid] > 1.2]
        if victims:
            rng.choice(victims).send_signal(signal.SIGKILL)
            kills += 1
        time.sleep(0.1)
    assert kills >= 20
    for p in procs:
        assert_clean(readers.result(p, timeout=120))
    # The last worker killed may still be on its way back when the readers
    # end (a fresh clone's run read 23 restarts for 24 kills).
    deadline = time.monotonic() + 15
    while server.stats()["buffer"]["restarts"] < kills:
        assert time.monotonic() < deadline, (server.stats()["buffer"]["restarts"], kills)
        time.sleep(0.05)
    stats = server.stats()
    latency = stats["latency"]["buckets"]
    slowest = max(i for i, n in enumerate(latency) if n)
    from mpumap.pbm import bucket_floor_us
    assert bucket_floor_us(slowest) < 5_000_000, "a fault waited more than 5 s"
    assert server.proc.poll() is None


TOUCH = """
import sys, mpumap
with mpumap.connect(sys.argv[1]) as c:
    m = c.map(sys.argv[2])
    for spec in sys.argv[3:]:
        start, end = (int(x) for x in spec.split(":"))
        sys.stdout.buffer.write(m[start:end])
        sys.stdout.flush()
"""


def touch(server, path, *ranges):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", TOUCH, server.socket, path,
                           *(f"{a}:{b}" for a, b in ranges)], capture_output=True, timeout=60)


def test_truncated_file_gives_sigbus_past_its_end(start_server, workdir):
    import mpumap

    path = make_file(os.path.join(workdir, "shrinking.bin"), 8 * MiB, seed=53)
    original = open(path, "rb").read()
    server = start_server("--page-size", "64K", "--buffer-size", "16M")
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:MiB] == original[:MiB]
        assert m[6 * MiB:6 * MiB + 65536] == original[6 * MiB:6 * MiB + 65536]  # now present
        os.truncate(path, 4 * MiB + 100)
        # Up to the new end: the file's bytes; past it in that page: zeros;
        # past that page: SIGBUS, as with the kernel's own mmap.
        edge = touch(server, path, (4 * MiB, 4 * MiB + 4096), (4 * MiB + 8192, 4 * MiB + 8193))
        assert edge.stdout == original[4 * MiB:4 * MiB + 100] + bytes(4096 - 100)
        assert edge.returncode == -signal.SIGBUS
        # A page the buffer held from before is not served stale.
        stale = touch(server, path, (6 * MiB, 6 * MiB + 1))
        assert stale.returncode == -signal.SIGBUS and stale.stdout == b""
        # What is still in the file reads right.
        head = touch(server, path, (0, 4 * MiB + 100))
        assert head.returncode == 0 and head.stdout == original[:4 * MiB + 100]
    assert server.proc.poll() is None


@pytest.mark.parametrize("page", ["4K", "64K"])
def test_a_scan_reads_ahead_past_where_the_file_now_ends(start_server, workdir, page):
    """The file shrinks after its region was made, before a scan reaches
    its end: the scan reads the file's bytes up to its new end (its
    read-ahead windows get what the file still holds), zeros in the rest
    of that system page, and SIGBUS past it, in that process and in the
    next (whose fault lands past the end of a page whose first bytes the
    buffer holds)."""
    import mpumap

    path = make_file(os.path.join(workdir, "shrinking.bin"), 16 * MiB, seed=54)
    original = open(path, "rb").read()
    end = 6 * MiB + 100
    server = start_server("--page-size", page, "--buffer-size", "64M", "--fillers", 2)
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:1] == original[:1]  # the region: 16 MiB
        os.truncate(path, end)
        scan = touch(server, path, (0, end), (end, 6 * MiB + 4096))
        assert scan.returncode == 0, scan.stderr
        assert scan.stdout == original[:end] + bytes(4096 - 100)
        assert server.stats()["buffer"]["readahead_fills"] > 0
        past = touch(server, path, (6 * MiB + 8192, 6 * MiB + 8193))
        assert past.returncode == -signal.SIGBUS and past.stdout == b""
    assert server.proc.poll() is None


SPLIT_AND_TOUCH = """
import ctypes, sys, mpumap
libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTDUMP = 16
socket_path, path, split_at, at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with mpumap.connect(socket_path) as c:
    m = c.map(path)
    assert libc.madvise(ctypes.c_void_p(m.address + split_at), 4096, MADV_DONTDUMP) == 0
    sys.stdout.buffer.write(m[at:at + 1])
"""


def test_past_the_end_of_a_shrunk_file_in_a_page_its_client_split(start_server, workdir):
    """A client that split its mapping inside the page the file now ends
    in (madvise of a part of it): one poison cannot cover the pieces
    (ENOENT, as for a client that unmapped), and its fault past the end
    waited for ever.  It gets SIGBUS; before the end, the file's byte."""
    import mpumap

    path = make_file(os.path.join(workdir, "split.bin"), 16 * MiB, seed=56)
    original = open(path, "rb").read()
    end = 6 * MiB + 100
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--read-ahead", 0)
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:1] == original[:1]  # the region: 16 MiB
        os.truncate(path, end)
        for at, want in ((6 * MiB + 12288, None), (6 * MiB + 50, original[6 * MiB + 50])):
            touched = subprocess.run([sys.executable, "-c", SPLIT_AND_TOUCH, server.socket,
                                      path, str(6 * MiB + 8192), str(at)],
                                     capture_output=True, timeout=60)
            if want is None:
                assert touched.returncode == -signal.SIGBUS, touched.stderr
            else:
                assert touched.returncode == 0, touched.stderr
                assert touched.stdout == bytes([want])
    assert server.proc.poll() is None


def test_a_read_error_is_not_taken_for_a_file_that_shrank(start_server, workdir):
    import mpumap

    """A store read that fails (a disk going bad) raises SIGBUS on that
    page, and says so; the file did not shrink, so the pages the buffer
    holds, its last one too, stay and read right."""
    size = MiB + 100  # the last 64 KiB page holds 100 bytes of the file
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--read-ahead", 0)
    failing = os.path.join(workdir, "failing")
    with stalling_fs(os.path.join(workdir, "fs"), "--fail-reads-when", failing,
                     f"bad.bin:{size}:eio") as fs:
        path = os.path.join(fs, "bad.bin")
        tail = (MiB, size)
        # Held here (never touched here: a SIGBUS would end the test) so
        # that the region and its pages outlive each reader.
        with mpumap.connect(server.socket) as client, client.map(path):
            assert touch(server, path, tail).stdout == stallfs.pattern(MiB, 100)
            open(failing, "w").close()
            bad = touch(server, path, (0, 1))
            assert bad.returncode == -signal.SIGBUS and bad.stdout == b""
            again = touch(server, path, tail)
            assert again.returncode == 0 and again.stdout == stallfs.pattern(MiB, 100)
    log = server.output()
    assert "reading page 0 of" in log and "EIO" in log, log
    assert "shrank" not in log, log
    assert server.proc.poll() is None


def memfd_of_mapping(length):
    """This process's one mapping of a region's memfd of that length, opened
    through /proc/self/map_files (root only)."""
    with open("/proc/self/maps") as f:
        spans = [line.split()[0] for line in f if "memfd:" in line]
    spans = [s for s in spans if int(s.split("-")[1], 16) - int(s.split("-")[0], 16) == length]
    assert len(spans) == 1, spans
    return os.open(f"/proc/self/map_files/{spans[0]}", os.O_RDWR)


@pytest.mark.skipif(os.geteuid() != 0, reason="opening /proc/self/map_files takes root")
def test_a_page_found_in_part_in_the_buffer_is_filled_whole(start_server, workdir):
    """A system page already in the memfd inside a 64 KiB page being
    filled (a dead filler's copy, or bytes a client of the same user put
    there): the whole page is filled again from its start, not from where
    the copy met it, which left holes that faulted for ever."""
    import mpumap

    path = make_file(os.path.join(workdir, "data.bin"), 4 * MiB, seed=54)
    original = open(path, "rb").read()
    page = 65536
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--fill-by", "copy")
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        memfd = memfd_of_mapping(len(m))
        try:
            os.pwrite(memfd, b"\xee" * 4096, 5 * page + 16384)
        finally:
            os.close(memfd)
        m.prefetch()  # copied in through the fillers' mappings, in runs
        deadline = time.monotonic() + 30
        while server.stats()["regions"][0]["present"] < len(m) // page:
            assert time.monotonic() < deadline, server.stats()["regions"]
            time.sleep(0.05)
        whole = subprocess.run([sys.executable, "-c", TOUCH, server.socket, path,
                                f"{4 * page}:{8 * page}"], capture_output=True, timeout=30)
        assert whole.returncode == 0 and whole.stdout == original[4 * page:8 * page]
    assert "page 5 of" in server.output() and "unfilled: replaced" in server.output()


@pytest.mark.skipif(os.geteuid() != 0, reason="opening /proc/self/map_files takes root")
def test_a_page_a_dead_filler_copied_in_part_is_not_taken_for_written(start_server, workdir):
    """A filler killed while filling a page of a region mapped for writing,
    that page in the memfd in part: recovery leaves it to be filled again.
    Taken for a whole page a client might have written (PRESENT and
    DIRTY), its holes faulted for ever and would have gone to the file as
    zeros."""
    import mpumap

    page, size = 65536, MiB
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--read-ahead", 0,
                          "--fillers", 1, "--worker-timeout", 60)
    with stalling_fs(os.path.join(workdir, "fs"), f"w.bin:{size}:hold") as fs:
        path = os.path.join(fs, "w.bin")
        with mpumap.connect(server.socket) as client, client.map(path, mode="r+") as m:
            filler = next(w["pid"] for w in server.stats()["workers"] if w["role"] == "filler")
            # Page 3 asked for: the filler claims it and waits on the file.
            reader = subprocess.Popen([sys.executable, "-c", TOUCH, server.socket, path,
                                       f"{3 * page + 8192}:{3 * page + 8193}",
                                       f"{3 * page}:{4 * page}"], stdout=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 20
                while not held_in_fuse(filler):
                    assert time.monotonic() < deadline, "the filler never read the file"
                    time.sleep(0.05)
                # What its copy would have put in before it died: one system
                # page of the four.
                memfd = memfd_of_mapping(len(m))
                try:
                    os.pwrite(memfd, b"\xee" * 4096, 3 * page)
                finally:
                    os.close(memfd)
                os.kill(filler, signal.SIGKILL)  # the file system answers EINTR
                out, _ = reader.communicate(timeout=30)
            finally:
                reader.kill()
                reader.wait()
            assert reader.returncode == 0
            assert out == stallfs.pattern(3 * page + 8192, 1) + stallfs.pattern(3 * page, page)
            assert server.stats()["buffer"]["dirty"] == 0
    assert server.proc.poll() is None


def test_a_forked_child_gets_no_silent_zeros(start_server, workdir):
    import multiprocessing

    import mpumap

    path = make_file(os.path.join(workdir, "fork.bin"), 4 * MiB, seed=54)
    want = open(path, "rb").read()
    server = start_server("--page-size", "64K", "--buffer-size", "16M")

    def child_touches(m):
        import faulthandler

        faulthandler.disable()  # the crash is the point: no traceback on the log
        m[2 * MiB]  # not inherited: a segmentation fault, never a zero

    def child_connects(sock, path, conn):
        with mpumap.connect(sock) as c, c.map(path) as m:
            conn.send(m[:] == want)

    def child_uses_parent_client(client, conn):
        try:
            client.map(path)
        except OSError as exc:
            conn.send(str(exc))

    fork = multiprocessing.get_context("fork")
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:MiB] == want[:MiB]
        p = fork.Process(target=child_touches, args=(m,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGSEGV
        here, there = fork.Pipe()
        p = fork.Process(target=child_connects, args=(server.socket, path, there))
        p.start()
        assert here.recv() is True
        p.join(30)
        assert p.exitcode == 0
        p = fork.Process(target=child_uses_parent_client, args=(client, there))
        p.start()
        assert "connect again in the child" in here.recv()
        p.join(30)
        assert m[:] == want  # the parent reads on, right


# In a forked child: take fresh memory of the mapping's size (the kernel
# tends to put it where the parent's mapping was), fill it, then close the
# client and let the collector free the Mapping: the child's memory must be
# untouched.  Exit status 0: intact; 3: changed; a signal: it was unmapped.
CLOSE_IN_CHILD = """
import gc, mmap, os, sys, mpumap
sock, path = sys.argv[1:3]
want = open(path, "rb").read()
client = mpumap.connect(sock)
m = client.map(path)
assert m[:] == want
where = m.address
pid = os.fork()
if pid == 0:
    mine = [mmap.mmap(-1, len(m)) for _ in range(4)]
    for k, x in enumerate(mine):
        x[:] = bytes([k + 1]) * len(x)
    client.close()
    del m
    gc.collect()
    intact = all(x[:] == bytes([k + 1]) * len(x) for k, x in enumerate(mine))
    os._exit(0 if intact else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), m[:] == want, flush=True)
m.close()
client.close()
"""


def test_closing_in_a_forked_child_touches_nothing(start_server, workdir):
    path = make_file(os.path.join(workdir, "f.bin"), MiB, seed=57)
    server = start_server("--page-size", "64K", "--buffer-size", "16M")
    proc = subprocess.run([sys.executable, "-c", CLOSE_IN_CHILD, server.socket, path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "True"], proc.stdout + proc.stderr


# A failure after the server said MAPPED (here: no descriptor left to keep
# the file by) must give the mapping back: the server forgets the region.
MAP_FAILS_LATE = """
import errno, os, sys, mpumap
sock, path = sys.argv[1:3]
client = mpumap.connect(sock)
real_dup = os.dup
os.dup = lambda fd: (_ for _ in ()).throw(OSError(errno.EMFILE, "no descriptors left"))
try:
    client.map(path)
except OSError as exc:
    print("refused", exc.errno == errno.EMFILE, flush=True)
os.dup = real_dup
stats = mpumap.server_stats(sock)
print("regions", stats["regions_total"], flush=True)
with client.map(path) as m:
    print("again", m[:] == open(path, "rb").read(), flush=True)
client.close()
"""


def refused_then_mapped(program, start_server, path):
    """Run a client program that makes a map fail after the server's
    MAPPED, checks the server forgot the region, then maps again."""
    server = start_server("--buffer-size", 64)
    proc = subprocess.run([sys.executable, "-c", program, server.socket, path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["refused True", "regions 0", "again True"], proc.stdout


def test_a_map_that_fails_late_gives_its_region_back(start_server, workdir):
    path = make_file(os.path.join(workdir, "g.bin"), MiB, seed=58)
    refused_then_mapped(MAP_FAILS_LATE, start_server, path)


# A MAPPED whose memfd finds no descriptor free in the client (its limit
# reached by the file it opened) must give the mapping back.
NO_ROOM_FOR_THE_MEMFD = """
import errno, os, resource, sys, mpumap
sock, path = sys.argv[1:3]
client = mpumap.connect(sock)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
# room for the file this map opens, none for the memfd that comes back
resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 2, hard))
try:
    client.map(path)
except OSError as exc:
    print("refused", exc.errno == errno.EMFILE, flush=True)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print("regions", mpumap.server_stats(sock)["regions_total"], flush=True)
with client.map(path) as m:
    print("again", m[:] == open(path, "rb").read(), flush=True)
client.close()
"""


def test_a_memfd_with_no_room_gives_its_mapping_back(start_server, workdir):
    path = make_file(os.path.join(workdir, "h.bin"), MiB, seed=59)
    refused_then_mapped(NO_ROOM_FOR_THE_MEMFD, start_server, path)


# A Client dropped without close() lets go of its connection: the server
# forgets it (and, once the server goes, no guard maps a file over memory
# that is no longer the client's).
DROPPED = """
import gc, sys, time, mpumap
client = mpumap.connect(sys.argv[1])
m = client.map(sys.argv[2])
right = m[:] == open(sys.argv[2], "rb").read()
del m, client  # never closed
gc.collect()
print(right, flush=True)
sys.stdin.read()
"""


def test_a_client_dropped_unclosed_lets_go(start_server, workdir):
    path = make_file(os.path.join(workdir, "i.bin"), MiB, seed=60)
    server = start_server("--buffer-size", 64)
    proc = subprocess.Popen([sys.executable, "-c", DROPPED, server.socket, path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "True"
        deadline = time.monotonic() + 10
        while server.stats()["clients_total"] or server.stats()["regions_total"]:
            assert time.monotonic() < deadline, server.stats()["clients"]
            time.sleep(0.05)
        workers = server.workers()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(10)
        psutil.wait_procs(workers, timeout=5)
        proc.stdin.close()
        proc.wait(10)
        assert "lost the server" not in proc.stderr.read()  # no guard was left
    finally:
        if proc.poll() is None:
            proc.kill()


def test_socket_access(start_server, readers, workdir):
    readable = make_file(os.path.join(workdir, "public.bin"), 100000, seed=55)
    os.chmod(readable, 0o644)
    nobody = 65534
    closed = start_server("--buffer-size", 64)  # the default: 0600
    assert os.stat(closed.socket).st_mode & 0o777 == 0o600
    result = readers.result(readers.start(closed.socket, readable, drop_uid=nobody))
    assert result["error"] == "ServerUnavailable" and "Permission denied" in result["message"]

    picky = start_server("--buffer-size", 64, "--socket-mode", "0666", "--allow-uid", "1")
    assert os.stat(picky.socket).st_mode & 0o777 == 0o666
    result = readers.result(readers.start(picky.socket, readable, drop_uid=nobody))
    assert result["error"] == "PermissionError" and "may not use this server" in result["message"]
    assert "refused pid" in picky.output() and "uid 65534" in picky.output()

    welcoming = start_server("--buffer-size", 64, "--socket-mode", "0666", "--allow-uid", "nobody")
    assert_clean(readers.result(readers.start(welcoming.socket, readable, drop_uid=nobody)))


@pytest.mark.timeout(240)
def test_soak(start_server, readers, workdir):
    """32 clients, 4 regions each, random pages through a buffer of a tenth
    of the data, for a bounded time: no mismatch, memory flat, no fd growth."""
    files = [make_file(os.path.join(workdir, f"soak{i}.bin"), 8 * MiB, seed=70 + i)
             for i in range(8)]
    fillers = 2
    server = start_server("--page-size", "64K", "--buffer-size", "6400K", "--fillers", fillers)
    procs = []
    for k in range(32):
        mine = [files[(k + j) % 8] for j in range(4)]
        procs.append(readers.start(server.socket, *mine, order="random", seed=k, seconds=30))
    for p in procs:
        readers.wait_ready(p, timeout=120)
    samples = []
    while any(p.poll() is None for p in procs):
        workers = [server.ps] + server.workers()
        # Descriptors first: asking for the stats opens a connection.
        fds = sum(len(os.listdir(f"/proc/{w.pid}/fd")) for w in workers)
        memory = sum(w.memory_full_info().uss for w in workers)
        memory += server.stats()["buffer"]["memfd_bytes"]
        # Only while every reader reads: once the first ends, its regions
        # may go (on a busy machine the readers end far apart).
        if all(p.poll() is None for p in procs):
            samples.append((memory, fds))
        time.sleep(1.0)
    for p in procs:
        result = readers.result(p, timeout=60)
        assert_clean(result)
        assert result["rounds"] >= 1
    assert len(samples) >= 10, samples
    second_half = samples[len(samples) // 2:-1] or samples[-1:]
    memory = [m for m, _ in second_half]
    assert max(memory) - min(memory) < 6 * MiB, [m // MiB for m in memory]
    assert max(memory) < 6400 * 1024 + 32 * MiB
    # No growth: a leak grows with the faults (thousands a second).  Some
    # descriptors come and go: each filler opens, the first time it needs
    # them, a buffered reader and a scan reader beside a region's direct
    # store (one region a file), keeps a stopped scan's reader a while,
    # and the stats open a connection.
    fds = [f for _, f in second_half]
    opened_on_demand = fillers * 2 * len(files)
    assert max(fds) - min(fds) <= opened_on_demand + 4, [f for _, f in samples]
    stats = server.stats()["buffer"]
    assert stats["peak_used"] <= 100 and stats["evictions"] > 0
