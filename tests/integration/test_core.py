"""Issue: one server serves the page faults of many processes from one
shared, bounded buffer.  Real server, real clients, real page faults."""
import os
import signal
import time

import pytest

import mpumap
from conftest import NOBODY, assert_clean
from mpumap.testing import MiB, make_file

pytestmark = pytest.mark.timeout(180)


def test_four_clients_share_a_quarter_sized_buffer(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "data.bin"), 64 * MiB, seed=1)
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--fillers", 2)
    procs = [readers.start(server.socket, path, order=order, seed=i)
             for i, order in enumerate(["seq", "seq", "random", "random"])]
    results = [readers.result(p) for p in procs]
    for result in results:
        assert_clean(result)
        assert result["pages"] == 64 * MiB // (64 << 10)
    buffer = server.stats()["buffer"]
    assert buffer["limit"] == 256
    assert buffer["evictions"] > 0
    assert buffer["peak_used"] <= buffer["limit"]
    assert buffer["fills"] >= 1024  # each page at least once
    assert buffer["bytes_read"] >= 64 * MiB


def test_two_processes_on_the_same_pages_share_fills(start_server, readers, workdir):
    """Two processes fault on the same pages at once: one gets the page by
    UFFDIO_COPY, the other by UFFDIO_WAKE (or, arriving later, straight from
    the shared buffer without a fault)."""
    page = 4096
    server = start_server("--page-size", page, "--buffer-size", 4096, "--fillers", 2,
                          "--read-ahead", 0)  # every page a fault of both
    copies = wakes = 0
    for attempt in range(5):
        path = make_file(os.path.join(workdir, f"same{attempt}.bin"), 1000 * page, seed=attempt)
        go = os.path.join(workdir, f"go{attempt}")
        procs = [readers.start(server.socket, path, go=go) for _ in range(2)]
        for p in procs:
            readers.wait_ready(p)
        open(go, "w").close()
        for p in procs:
            result = readers.result(p)
            assert_clean(result)
            assert result["pages"] == 1000
        buffer = server.stats()["buffer"]
        copies, wakes = buffer["copies"], buffer["wakes"]
        if copies and wakes:
            break
    assert copies >= 1000
    assert wakes > 0, "no fault was resolved by UFFDIO_WAKE"


def test_two_files_never_mix_and_hard_links_share(start_server, readers, workdir):
    a = make_file(os.path.join(workdir, "a.bin"), 8 * MiB, seed=10)
    b = make_file(os.path.join(workdir, "b.bin"), 8 * MiB, seed=11)
    link = os.path.join(workdir, "a-link.bin")
    os.link(a, link)
    server = start_server("--page-size", "64K", "--buffer-size", "4M")
    p1 = readers.start(server.socket, a, order="random", seed=1)
    p2 = readers.start(server.socket, b, order="random", seed=2)
    r1, r2 = readers.result(p1), readers.result(p2)
    assert_clean(r1)
    assert_clean(r2)
    assert r1["regions"] != r2["regions"]

    with mpumap.connect(server.socket) as client:
        m1, m2 = client.map(a), client.map(link)
        assert m1.region_id == m2.region_id
        regions = server.stats()["regions"]
        assert len(regions) == 1 and regions[0]["mappings"] == 2
        with open(a, "rb") as f:
            want = f.read()
        assert m1[:] == want and m2[:] == want
        m1.close()
        m2.close()
    assert server.stats()["regions"] == []


@pytest.mark.parametrize("size", [1, 4095, 3 * 65536 + 123, 65536 + 4096])
def test_odd_sizes_read_to_the_last_byte(start_server, workdir, size):
    path = make_file(os.path.join(workdir, "odd.bin"), size, seed=size)
    server = start_server("--page-size", "64K", "--buffer-size", 16)
    with open(path, "rb") as f:
        want = f.read()
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert len(m) == size
        assert memoryview(m)[size - 1] == want[-1]
        assert m[:] == want
        assert bytes(memoryview(m)[::-1]) == want[::-1]


def test_empty_missing_and_unreadable_files(start_server, workdir):
    server = start_server("--buffer-size", 64)
    empty = os.path.join(workdir, "empty.bin")
    open(empty, "w").close()
    with mpumap.connect(server.socket) as client:
        with pytest.raises(ValueError, match="empty"):
            client.map(empty)
        with pytest.raises(FileNotFoundError):
            client.map(os.path.join(workdir, "missing.bin"))
        with pytest.raises(OSError, match="regular file"):
            client.map(workdir)
        # the connection goes on after refusals
        ok = make_file(os.path.join(workdir, "ok.bin"), 10000)
        with client.map(ok) as m:
            assert m[:] == open(ok, "rb").read()


def test_no_server_names_the_socket(workdir):
    path = os.path.join(workdir, "nobody-home.sock")
    with pytest.raises(mpumap.ServerUnavailable, match=path):
        mpumap.connect(path)


def test_numpy_reads_through_the_buffer_protocol(start_server, workdir):
    np = pytest.importorskip("numpy")
    path = make_file(os.path.join(workdir, "n.bin"), 4 * MiB, seed=3)
    server = start_server("--page-size", "64K", "--buffer-size", 16)
    with mpumap.connect(server.socket) as client:
        assert client.settings.page_size == 65536
        assert client.settings.buffer_pages == 16
        m = client.map(path)
        arr = np.frombuffer(m, dtype=np.uint32)
        want = np.fromfile(path, dtype=np.uint32)
        assert np.array_equal(arr, want)
        with pytest.raises(BufferError, match="delete those first"):
            m.close()
        del arr
        m.close()
        assert m.closed


def fds_of(pid, kind):
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == kind:
                count += 1
        except OSError:
            pass
    return count


def test_a_killed_client_is_dropped_and_the_others_finish(start_server, readers, workdir):
    shared = make_file(os.path.join(workdir, "shared.bin"), 32 * MiB, seed=5)
    own = make_file(os.path.join(workdir, "own.bin"), 32 * MiB, seed=6)
    server = start_server("--page-size", "4K", "--buffer-size", "2M")
    victim = readers.start(server.socket, own, shared, order="random", rounds=50)
    readers.wait_ready(victim)
    others = [readers.start(server.socket, shared, order=o, seed=i)
              for i, o in enumerate(["seq", "random"])]
    deadline = time.monotonic() + 30
    while server.stats()["buffer"]["evictions"] < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    for p in others:
        assert_clean(readers.result(p))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = server.stats()
        if not stats["clients"] or all(c["pid"] != victim.pid for c in stats["clients"]):
            break
        time.sleep(0.05)
    assert all(c["pid"] != victim.pid for c in stats["clients"])
    assert [r for r in stats["regions"] if r["file"] == own] == []
    assert stats["regions"] == []
    assert fds_of(server.proc.pid, "anon_inode:[userfaultfd]") == 0
    assert stats["buffer"]["used"] == 0


def test_a_client_that_is_not_root(start_server, readers, workdir):
    """As nobody: the plain userfaultfd syscall is refused here, so the client
    goes through /dev/userfaultfd or user-mode-only, and the server serves it."""
    readable = make_file(os.path.join(workdir, "public.bin"), 2 * MiB, seed=7)
    secret = make_file(os.path.join(workdir, "secret.bin"), 1 * MiB, seed=8)
    os.chmod(readable, 0o644)
    os.chmod(secret, 0o600)
    server = start_server("--page-size", "64K", "--buffer-size", 16, "--socket-mode", "0666")
    p = readers.start(server.socket, readable, order="random", drop_uid=NOBODY)
    ready = readers.wait_ready(p)
    if os.geteuid() == 0:
        assert ready["uffd"] in ("/dev/userfaultfd", "user-mode-only") or \
            open("/proc/sys/vm/unprivileged_userfaultfd").read().strip() == "1"
    assert_clean(readers.result(p))
    p = readers.start(server.socket, secret, drop_uid=NOBODY)
    result = readers.result(p)
    assert result["error"] == "PermissionError"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_a_server_that_is_not_root(start_server, readers, workdir, monkeypatch):
    """A user's own server, run as that user: each filler gets a userfaultfd
    of its own the way a client does (here the plain syscall and
    /dev/userfaultfd are refused to nobody, so user-mode-only) and fills
    read-ahead through it; a client of that user reads the file's bytes."""
    path = make_file(os.path.join(workdir, "mine.bin"), 16 * MiB, seed=9)
    os.chmod(path, 0o644)
    server = start_server("--page-size", "64K", "--buffer-size", 64, "--fillers", 2,
                          user=NOBODY)

    def filler_uffds():  # the socket is there before the workers have started
        fillers = [p for p in server.workers() if p.name().startswith("mpumap-filler")]
        return [fds_of(p.pid, "anon_inode:[userfaultfd]") for p in fillers]

    deadline = time.monotonic() + 30
    while filler_uffds() != [1, 1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert filler_uffds() == [1, 1]
    assert {p.uids().real for p in [server.ps, *server.workers()]} == {NOBODY}
    for order in ("seq", "random"):
        p = readers.start(server.socket, path, order=order, drop_uid=NOBODY)
        assert_clean(readers.result(p))
    buffer = server.stats()["buffer"]
    assert buffer["readahead_fills"] > 0 and buffer["evictions"] > 0, buffer
    log = server.output()
    assert "no userfaultfd of its own" not in log, log
    assert "cannot fill it through a mapping" not in log, log
    # This process is root's: it hands nobody's server nothing of its own,
    # unless told to trust that user.
    with pytest.raises(PermissionError, match=f"MPUMAP_SERVER_USER={NOBODY}"):
        mpumap.connect(server.socket)
    monkeypatch.setenv("MPUMAP_SERVER_USER", "nobody")
    with mpumap.connect(server.socket) as client, client.map(path) as m, open(path, "rb") as f:
        assert m[:] == f.read()


def test_an_idle_server_does_not_spin(start_server, workdir):
    """The monitor polls for a while after each fault, then sleeps."""
    path = make_file(os.path.join(workdir, "idle.bin"), 8 * MiB, seed=48)
    server = start_server("--page-size", "4K", "--buffer-size", "16M", "--spin", "1000")
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:] == open(path, "rb").read()
        time.sleep(0.2)
        processes = [server.ps] + server.workers()
        before = sum(sum(p.cpu_times()[:2]) for p in processes)
        time.sleep(1)
        after = sum(sum(p.cpu_times()[:2]) for p in processes)
    assert after - before < 0.1, f"{after - before:.2f} s of CPU in an idle second"
