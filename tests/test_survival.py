"""Issue: nothing lost, nobody hangs, nobody gets in: crashes, bad input,
untrusted clients."""
import os
import random
import signal
import time

import psutil
import pytest

from conftest import make_file

MiB = 1 << 20
pytestmark = pytest.mark.timeout(180)


def assert_clean(result):
    assert "error" not in result, result
    assert result["mismatch_count"] == 0, result["mismatches"]


def test_clients_finish_when_the_server_is_killed(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "data.bin"), 32 * MiB, seed=51)
    server = start_server("--page-size", "64K", "--buffer-size", "4M")
    procs = [readers.start(server.socket, path, order=o, seed=i, rounds=3)
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
    for p in procs:
        result = readers.result(p, timeout=60)
        assert_clean(result)
        assert result["pages"] == 3 * 32 * MiB // (64 << 10)
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
    stats = server.stats()
    assert stats["buffer"]["restarts"] >= kills
    latency = stats["latency"]["buckets"]
    slowest = max(i for i, n in enumerate(latency) if n)
    from mpumap.pbm import bucket_floor_us
    assert bucket_floor_us(slowest) < 5_000_000, "a fault waited more than 5 s"
    assert server.proc.poll() is None
