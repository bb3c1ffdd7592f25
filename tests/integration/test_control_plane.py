"""The control plane never blocks: a stuck filler stalls nobody else and is
replaced; a prefetch of any size leaves the main loop free."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import mpumap
import stallfs
from conftest import OVERWRITER, assert_clean, held_in_fuse, stalling_fs
from mpumap._core import lib
from mpumap.testing import MiB, make_file

pytestmark = pytest.mark.timeout(120)

# Reads the given pages of a file through the server, each timed; prints the
# slowest read and whether every byte was the file's.
READ_PAGES = """
import json, sys, time, mpumap
sock, path, page, pages = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
data = open(path, "rb").read()
slowest, right = 0.0, True
with mpumap.connect(sock) as c, c.map(path) as m:
    for p in pages:
        t = time.monotonic()
        got = m[p * page:(p + 1) * page]
        slowest = max(slowest, time.monotonic() - t)
        right = right and got == data[p * page:(p + 1) * page]
print(json.dumps({"slowest": slowest, "right": right}))
"""


def worker_pid(server, role, index):
    for w in server.stats()["workers"]:
        if (w["role"], w["index"]) == (role, index):
            return w["pid"]
    return None


def test_a_stopped_filler_stalls_nobody_else_and_is_replaced(start_server, readers, workdir):
    page = 4096
    path = make_file(os.path.join(workdir, "data.bin"), 8 * MiB, seed=81)
    server = start_server("--page-size", page, "--buffer-size", "64M", "--fillers", 2,
                          "--read-ahead", 0, "--worker-timeout", 2)
    busy = readers.start(server.socket, path, order="random", seed=1, seconds=12)
    readers.wait_ready(busy)
    time.sleep(0.5)  # serving
    stuck = worker_pid(server, "filler", 0)
    os.kill(stuck, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # The file is the server's first region: slot 0.  Pages filler 1 serves
        # are answered while filler 0 is stopped.
        theirs = [p for p in range(8 * MiB // page) if lib.mpu_filler_for(0, p, 2) == 1]
        other = subprocess.run([sys.executable, "-c", READ_PAGES, server.socket, path,
                                str(page), json.dumps(theirs[::7])],
                               capture_output=True, text=True, timeout=60)
        assert other.returncode == 0, other.stderr
        result = json.loads(other.stdout)
        assert result["right"]
        assert result["slowest"] < 1.0, result  # it did not wait for filler 0
        deadline = stopped + 2 + 3  # --worker-timeout, then a loop or two
        while worker_pid(server, "filler", 0) in (stuck, None):
            assert time.monotonic() < deadline, "the stopped filler was not replaced"
            time.sleep(0.05)
        replaced = time.monotonic() - stopped
    finally:
        try:
            os.kill(stuck, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert not psutil.pid_exists(stuck) or psutil.Process(stuck).status() == "zombie"
    stats = server.stats()["buffer"]
    assert stats["hangs"] == 1 and stats["restarts"] >= 1
    assert "gave no sign of life" in server.output()
    assert_clean(readers.result(busy))  # its waits on filler 0 were answered too
    print(f"replaced {replaced:.2f} s after SIGSTOP")

    # Stopping the server does not wait for a stopped worker either.
    os.kill(worker_pid(server, "filler", 1), signal.SIGSTOP)
    workers = server.workers()
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(10)
    took = time.monotonic() - started
    assert took < 3.0, f"SIGTERM took {took:.2f} s"
    gone, alive = psutil.wait_procs(workers, timeout=2)
    assert not alive


def test_a_filler_busy_with_one_read_leaves_the_next_faults_to_an_idle_one(start_server,
                                                                          readers, workdir):
    """A fault goes to a filler with nothing in hand, not to one whose read
    has not come back: while a filler waits for a read that never ends
    (and the server has not given it up: --worker-timeout), a reader of
    another file gets every page from the other filler, those of its pages
    that hash to the caught filler too."""
    other = make_file(os.path.join(workdir, "other.bin"), 4 * MiB, seed=84)
    server = start_server("--buffer-size", "64M", "--fillers", 2, "--read-ahead", 0,
                          "--worker-timeout", 90)
    go = os.path.join(workdir, "go")
    with stalling_fs(os.path.join(workdir, "fs"), f"slow.bin:{MiB}:stall") as fs:
        # Mapped first: a filler caught in a read takes no news of regions.
        reader = readers.start(server.socket, other, order="random", go=go)
        readers.wait_ready(reader)
        caught = subprocess.Popen([sys.executable, "-c", TOUCH_PAGE, server.socket,
                                   os.path.join(fs, "slow.bin"), "0"],
                                  stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not server.stats()["buffer"]["faults"]:
                assert time.monotonic() < deadline, "the fault never came"
                assert caught.poll() is None
                time.sleep(0.05)
            time.sleep(0.5)  # a filler took it up, and waits in the read
            started = time.monotonic()
            open(go, "w").close()
            assert_clean(readers.result(reader, timeout=60))
            took = time.monotonic() - started
            # Half its pages hash to the caught filler: sent there, the first
            # would wait for the caught filler's successor (90 s).
            assert took < 30, f"the reader took {took:.1f} s"
            assert caught.poll() is None  # still caught: it proved the point
        finally:
            for proc in (caught, reader):
                proc.kill()
                proc.communicate()


TOUCH_PAGE = """
import sys, mpumap
with mpumap.connect(sys.argv[1]) as client:
    m = client.map(sys.argv[2])
    if sys.argv[3] == "prefetch":
        m.prefetch()
        print("asked", flush=True)
        sys.stdin.read()
    else:
        m[int(sys.argv[3]) * 4096]
"""


def test_a_store_that_hangs_fails_its_own_pages_and_stalls_nobody_else(start_server, readers,
                                                                        workdir):
    """A file system whose reads never come back (a FUSE daemon that hangs;
    not even SIGKILL ends the filler caught in it): that file's missing
    pages raise SIGBUS, at once once the server knows, also for faults that
    waited on a page the caught filler holds, every other file is served
    on, and the caught fillers are replaced beside themselves."""
    size = 1 * MiB
    expected = os.path.join(workdir, "expected.bin")
    with open(expected, "wb") as f:
        f.write(stallfs.pattern(0, size))
    other = make_file(os.path.join(workdir, "other.bin"), 8 * MiB, seed=82)
    server = start_server("--buffer-size", "64M", "--fillers", 3, "--worker-timeout", 2)
    fillers = {worker_pid(server, "filler", i) for i in range(3)}
    # A daemon that hangs answers no FLUSH either: not the server's, nor its
    # workers'.  (The clients' closes are answered: they must end to be seen.)
    held_for = os.path.join(workdir, "hold-flush-of")
    with open(held_for, "w") as f:
        f.write(str(server.proc.pid))
    with stalling_fs(os.path.join(workdir, "fs"), "--hold-flush-of", held_for,
                     f"slow.bin:{size}:stall", f"fine.bin:{size}") as fs:
        slow = os.path.join(fs, "slow.bin")
        # The file system serves mpumap: a file of it that answers reads right.
        assert_clean(readers.result(readers.start(server.socket, os.path.join(fs, "fine.bin"),
                                                  expect=expected), timeout=30))
        clients = []

        def touch(what, **io):
            clients.append(subprocess.Popen([sys.executable, "-c", TOUCH_PAGE, server.socket,
                                             slow, what], stderr=subprocess.DEVNULL, **io))
            return clients[-1]

        try:
            # A prefetch: a filler claims a run of pages, reads, and never
            # comes back.
            prefetching = touch("prefetch", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert prefetching.stdout.readline() == b"asked\n"
            time.sleep(0.5)
            # Faults on pages of that run: the other fillers wait for them.
            caught = touch("9")
            touching = [touch(str(page)) for page in range(10, 40, 3)]
            started = time.monotonic()
            assert_clean(readers.result(readers.start(server.socket, other, order="random"),
                                        timeout=60))
            # It waited at most for the caught fillers' successors
            # (--worker-timeout, then the arbiter's ABANDON_SECONDS), not for ever.
            assert time.monotonic() - started < 30
            assert caught.wait(timeout=60) == -signal.SIGBUS
            assert [t.wait(timeout=60) for t in touching] == [-signal.SIGBUS] * len(touching)
        finally:
            for client in clients:
                client.kill()
                client.wait()
                if client.stdin:
                    client.stdin.close()
                    client.stdout.close()
        hangs = server.stats()["buffer"]["hangs"]
        assert hangs in (1, 2, 3)  # the fillers caught before the server knew
        stuck = [pid for pid in fillers
                 if psutil.pid_exists(pid) and psutil.Process(pid).status() == "disk-sleep"]
        assert 1 <= len(stuck) <= hangs
        assert {worker_pid(server, "filler", i) for i in range(3)}.isdisjoint(stuck)

        # Known now: the next reader of that file gets SIGBUS without a wait,
        # and no other filler is caught.
        again = readers.start(server.socket, slow, expect=expected)
        readers.wait_ready(again)
        asked = time.monotonic()
        assert again.wait(timeout=30) == -signal.SIGBUS
        assert time.monotonic() - asked < 5
        assert server.stats()["buffer"]["hangs"] == hangs
    # Unmounted: the caught fillers' reads fail, they end and are reaped.
    deadline = time.monotonic() + 20
    while (server.output().count("has ended at last")
           < server.output().count("starting another beside it")):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    log = server.output()
    assert "slow.bin: its store hung filler" in log
    assert "starting another beside it" in log


def test_a_store_that_hangs_on_writes_fails_their_flush_and_stalls_nobody_else(
        start_server, readers, workdir):
    """Writes that never come back: the evictor caught in one is replaced
    beside itself, the writer's flushes and its close say EIO instead of
    waiting for ever, other files are served on, and once the store
    answers (here: it is gone) the file is written to again."""
    other = make_file(os.path.join(workdir, "other.bin"), 8 * MiB, seed=83)
    server = start_server("--buffer-size", "64M", "--evictors", 1, "--worker-timeout", 2)
    with stalling_fs(os.path.join(workdir, "fs"), f"w.bin:{MiB}:stallwrite") as fs:
        writer = subprocess.Popen([sys.executable, OVERWRITER, server.socket,
                                   os.path.join(fs, "w.bin")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert json.loads(writer.stdout.readline()) == {"wrote": True}, \
                writer.poll() is not None and writer.stderr.read()
            writer.stdin.write("flush\n")
            writer.stdin.flush()
            started = time.monotonic()
            assert_clean(readers.result(readers.start(server.socket, other, order="random"),
                                        timeout=30))
            assert time.monotonic() - started < 30
            out, err = writer.communicate(timeout=60)
        finally:
            writer.kill()
            writer.wait()
        assert writer.returncode == 0, err
        result = json.loads(out)
        eio = -errno.EIO
        assert (result["flush"], result["again"], result["close"]) == (eio, eio, eio), result
        assert result["seconds"] < 30, result  # (not for ever)
        assert server.stats()["buffer"]["hangs"] == 1
    deadline = time.monotonic() + 10
    while "has ended at last" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)
    log = server.output()
    assert "w.bin: its store hung evictor 0" in log
    assert "w.bin): its store is read and written again" in log


def test_a_file_system_that_hangs_on_close_does_not_stop_the_server(start_server, readers,
                                                                     workdir):
    """Closing a descriptor asks its file system (FUSE sends FLUSH, NFS its
    server).  The server closes the descriptors of a region it releases
    aside: a close that never comes back costs a thread, and the server
    serves on."""
    size = MiB
    expected = os.path.join(workdir, "expected.bin")
    with open(expected, "wb") as f:
        f.write(stallfs.pattern(0, size))
    other = make_file(os.path.join(workdir, "other.bin"), 8 * MiB, seed=84)
    server = start_server("--buffer-size", "64M")
    held_for = os.path.join(workdir, "hold-flush-of")
    with stalling_fs(os.path.join(workdir, "fs"), "--hold-flush-of", held_for,
                     f"f.bin:{size}") as fs:
        # Mapped and read while the file system answers; released (the
        # reader gone) once the server's closes are held.
        reader = readers.start(server.socket, os.path.join(fs, "f.bin"), expect=expected,
                               go=os.path.join(workdir, "go"))
        readers.wait_ready(reader)
        with open(held_for, "w") as f:
            f.write(str(server.proc.pid))
        open(os.path.join(workdir, "go"), "w").close()
        assert_clean(readers.result(reader, timeout=30))
        deadline = time.monotonic() + 10
        while not held_in_fuse(server.proc.pid):
            assert time.monotonic() < deadline, "the server closed nothing on that file"
            time.sleep(0.05)
        started = time.monotonic()
        assert_clean(readers.result(readers.start(server.socket, other, order="random"),
                                    timeout=30))
        assert time.monotonic() - started < 20
        assert server.stats()["buffer"]["hangs"] == 0
        assert held_in_fuse(server.proc.pid)  # still waiting, aside


def test_a_terabyte_prefetch_leaves_the_main_loop_free(start_server, workdir):
    huge = os.path.join(workdir, "huge.bin")
    with open(huge, "wb") as f:
        f.truncate(1 << 40)  # sparse: reads are zeros, fast
    small = make_file(os.path.join(workdir, "small.bin"), MiB, seed=82)
    server = start_server("--page-size", "4K", "--buffer-size", "256M", "--read-ahead", 0)
    with mpumap.connect(server.socket) as a, a.map(huge) as m:
        asked = m.prefetch()
        # What a prefetch costs follows the buffer: never more than its room.
        assert 0 < asked <= 256 * MiB // 4096
        took = []
        with mpumap.connect(server.socket) as b:
            for _ in range(20):
                t = time.monotonic()
                mpumap.server_stats(server.socket)
                with b.map(small) as s:
                    assert s[:4096] == open(small, "rb").read(4096)
                took.append(time.monotonic() - t)
        took.sort()
        # Each round is three requests and a fault.  (The 90th percentile:
        # on a 2-CPU machine that runs other tests too, one round in twenty
        # may lose the CPU for a while, which says nothing of the server.)
        assert took[17] < 0.1, [round(t * 1000) for t in took]
        assert took[-1] < 1.0, [round(t * 1000) for t in took]
        print(f"a round of requests during the prefetch: median {took[10] * 1000:.1f} ms, "
              f"slowest {took[-1] * 1000:.1f} ms")
        assert m[(1 << 40) - 4096:] == bytes(4096)
    stats = server.stats()["buffer"]
    assert stats["prefetch_fills"] > 0
