"""Issue: run it like a real service: launcher, status view, clean start and
stop."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

import mpumap
from conftest import pages_served
from mpumap.testing import MiB, command as tool, make_file

pytestmark = pytest.mark.timeout(120)



def test_run_passes_the_status_and_counts_the_commands_faults(start_server, workdir):
    path = make_file(os.path.join(workdir, "d.bin"), 4 * MiB, seed=41)
    # Without read-ahead: every page is a fault the summary counts.
    server = start_server("--page-size", "64K", "--buffer-size", 16, "--read-ahead", 0)
    program = (
        "import mpumap, os, sys\n"
        f"assert os.environ['MPUMAP_SOCKET'] == {server.socket!r}\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "with mpumap.connect() as c, c.map(sys.argv[1]) as m:\n"
        "    # A page at a time: one copy of the whole mapping may touch its\n"
        "    # last page first, and fault on it again once it was evicted.\n"
        "    assert all(m[i:i + 65536] == data[i:i + 65536] for i in range(0, len(m), 65536))\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run(tool("mpumap-client") + ["run", "--stats", "--socket", server.socket,
                                                   "--", sys.executable, "-c", program, path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mpumap: 1 client(s) of the command: 64 faults"), line
    assert "64 served" in line and "4.0 MiB filled" in line


def test_run_without_a_server_says_so(workdir):
    sock = os.path.join(workdir, "none.sock")
    proc = subprocess.run(tool("mpumap-client") + ["run", "--socket", sock, "--", "true"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"mpumap-client: no mpumap server at {sock}: No such file or directory"]


def test_run_forwards_signals(start_server, workdir):
    server = start_server("--buffer-size", 64)
    program = ("import signal, sys, time\n"
               "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
               "print('ready', flush=True)\n"
               "time.sleep(100)\n")
    proc = subprocess.Popen(tool("mpumap-client") + ["run", "--socket", server.socket, "--",
                                                     sys.executable, "-c", program],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    try:
        # A bound for a loaded machine only: a signal not passed on leaves
        # the command asleep for 100 s.
        assert proc.wait(60) == 42
    except subprocess.TimeoutExpired:
        masks = signal_masks(proc.pid)
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        pytest.fail("the signal did not reach the command:\n" + masks)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def signal_masks(pid):
    """The signal lines of /proc/PID/status of a process and its children."""
    lines = []
    for p in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
        with open(f"/proc/{p.pid}/status") as f:
            lines += [f"{p.pid} {line.strip()}" for line in f if line.startswith("Sig")]
    return "\n".join(lines)


def busy_readers(readers, server, path, n=2):
    procs = [readers.start(server.socket, path, order="random", seed=i, rounds=10000)
             for i in range(n)]
    for p in procs:
        readers.wait_ready(p)
    return procs


def test_top_once_json(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "t.bin"), 8 * MiB, seed=42)
    server = start_server("--page-size", "64K", "--buffer-size", 32, "--store-io", "cached")
    procs = busy_readers(readers, server, path)
    out = subprocess.run(tool("mpumap") + ["top", "--socket", server.socket, "--once",
                                           "--json", "--interval", "0.5"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert sorted(c["pid"] for c in snap["clients"]) == sorted(p.pid for p in procs)
    assert all(len(c["regions"]) == 1 for c in snap["clients"])
    assert all(c["faults_per_s"] > 0 for c in snap["clients"])
    assert snap["rates"]["faults"] > 0 and snap["latency"]["p50_us"] is not None
    roles = sorted((p["role"], p["index"]) for p in snap["processes"])
    fillers = mpumap.server_stats(server.socket)["settings"]["fillers"]
    assert roles == sorted([("evictor", 0), ("server", 0)]
                           + [("filler", i) for i in range(fillers)])
    assert all(p["cpu_percent"] is not None and p["memory"] for p in snap["processes"])
    assert snap["regions"][0]["file"] == path
    assert snap["buffer"]["limit_pages"] == 32 and snap["buffer"]["mode"] == "fixed"


def test_top_without_a_server(workdir):
    sock = os.path.join(workdir, "none.sock")
    out = subprocess.run(tool("mpumap") + ["top", "--socket", sock, "--once"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"mpumap top: no mpumap server at {sock}: "
                                  "No such file or directory")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_top_live_in_a_terminal(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "t.bin"), 8 * MiB, seed=43)
    server = start_server("--page-size", "64K", "--buffer-size", 32, "--store-io", "cached")
    procs = busy_readers(readers, server, path)
    name = f"mpumap-top-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", name]
    command = " ".join(tool("mpumap") + ["top", "--socket", server.socket, "--interval", "0.2"])
    subprocess.run(tmux + ["new-session", "-d", "-s", name, "-x", "160", "-y", "50", command],
                   check=True, timeout=10)
    try:
        screen = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            screen = subprocess.run(tmux + ["capture-pane", "-p", "-t", name],
                                    capture_output=True, text=True, timeout=10).stdout
            if all(str(p.pid) in screen for p in procs) and "filler0" in screen:
                break
            time.sleep(0.2)
        assert "CLIENTS (2)" in screen, screen
        assert all(str(p.pid) in screen for p in procs), screen
        assert path in screen
        subprocess.run(tmux + ["send-keys", "-t", name, "q"], timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = subprocess.run(tmux + ["has-session", "-t", name],
                                   capture_output=True, timeout=10)
            if alive.returncode != 0:
                break  # q ended top, and with it the session
            time.sleep(0.1)
        assert alive.returncode != 0, "top did not quit on q"
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, timeout=10)


def test_sigterm_during_reads_stops_cleanly(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "s.bin"), 16 * MiB, seed=44)
    pidfile = os.path.join(workdir, "server.pid")
    server = start_server("--page-size", "64K", "--buffer-size", 32, "--pidfile", pidfile)
    assert open(pidfile).read().strip() == str(server.proc.pid)
    busy_readers(readers, server, path)
    workers = server.workers()
    assert len(workers) >= 2
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(5) == 0
    assert time.monotonic() - started < 5
    gone, alive = psutil.wait_procs(workers, timeout=2)
    assert not alive, f"workers outlived the server: {alive}"
    assert not os.path.exists(server.socket)
    assert not os.path.exists(pidfile)


def test_after_sigkill_no_worker_survives_and_a_new_server_starts(start_server, workdir):
    server = start_server("--buffer-size", 64)
    workers = server.workers()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(5)
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers outlived the server: {alive}"
    assert os.path.exists(server.socket)  # stale, and taken over by the next server
    third = subprocess.Popen(tool("mpumap-server") + ["--socket", server.socket, "--buffer-size",
                                                 "64"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if mpumap.server_stats(server.socket)["pid"] == third.pid:
                    break
            except OSError:
                pass
            assert third.poll() is None, third.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(10) == 0
        third.stderr.close()
    assert not os.path.exists(server.socket)


def test_a_second_server_on_a_live_socket_is_refused(start_server):
    server = start_server("--buffer-size", 64)
    proc = subprocess.run(tool("mpumap-server") + ["--socket", server.socket,
                                                   "--buffer-size", "64"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert mpumap.server_stats(server.socket)["pid"] == server.proc.pid


@pytest.mark.parametrize("command", [["mpumap-server"], ["mpumap"], ["mpumap", "top"],
                                     ["mpumap-client"], ["mpumap-client", "run"]])
def test_help_has_examples_and_version(command):
    out = subprocess.run(tool(command[0]) + command[1:] + ["--help"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and "Example" in out.stdout
    version = subprocess.run(tool(command[0]) + ["--version"], capture_output=True,
                             text=True, timeout=30)
    assert version.returncode == 0 and mpumap.__version__ in version.stdout


def test_run_map_serves_numpy_memmap(start_server, workdir):
    pytest.importorskip("numpy")
    path = make_file(os.path.join(workdir, "data.bin"), 8 * MiB + 12, seed=45)
    other = make_file(os.path.join(workdir, "other.dat"), MiB, seed=46)
    server = start_server("--page-size", "64K", "--buffer-size", "4M", "--socket-mode", "0666")
    program = (
        "import numpy, sys\n"
        "a = numpy.memmap(sys.argv[1], mode='r')\n"
        "b = numpy.memmap(sys.argv[2], mode='r')\n"
        "want = numpy.fromfile(sys.argv[1], dtype=numpy.uint8)\n"
        "assert numpy.array_equal(a, want), 'wrong bytes'\n"
        "assert numpy.array_equal(b, numpy.fromfile(sys.argv[2], dtype=numpy.uint8))\n"
        "maps = open('/proc/self/maps').read()\n"
        "assert 'memfd:mpumap' in maps and sys.argv[2] in maps\n"
        "print('ok', flush=True)\n"
    )
    before = server.stats()
    proc = subprocess.run(tool("mpumap-client") + ["run", "--stats", "--socket", server.socket,
                                                   "--map", "*.bin", "--",
                                                   sys.executable, "-c", program, path, other],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    after = server.stats()
    served = pages_served(after) - pages_served(before)
    assert served >= (8 * MiB + 12) // (64 << 10)  # every page went through mpumap
    faults = after["buffer"]["faults"] - before["buffer"]["faults"]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mpumap: 1 client(s) of the command: "), line
    assert f"{faults} faults" in line


def test_cpus_pins_the_server(start_server, workdir):
    path = make_file(os.path.join(workdir, "p.bin"), 2 * MiB, seed=47)
    server = start_server("--buffer-size", 256, "--cpus", "0")
    assert server.ps.cpu_affinity() == [0]
    assert all(w.cpu_affinity() == [0] for w in server.workers())
    assert mpumap.server_stats(server.socket)["settings"]["cpus"] == [0]
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:] == open(path, "rb").read()


def test_each_process_and_log_line_names_its_role(start_server, workdir):
    path = make_file(os.path.join(workdir, "t.bin"), MiB, seed=48)
    server = start_server("--buffer-size", 64, "--fillers", 2, "--log-level", "debug")
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert m[:4096] == open(path, "rb").read(4096)
    # A worker names itself once it runs: under load, the last one forked
    # may not have run yet.
    expected = ["mpumap-evictor0", "mpumap-filler0", "mpumap-filler1"]
    deadline = time.monotonic() + 10
    while sorted(w.name() for w in server.workers()) != expected \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    names = sorted(w.name() for w in server.workers())
    assert names == expected
    try:
        import setproctitle  # noqa: F401
    except ImportError:
        pass
    else:
        titles = sorted(" ".join(w.cmdline()).strip() for w in server.workers())
        assert titles[1] == f"mpumap-server: filler 0 [{server.socket}]", titles
    server.stop()
    whos = {line.split()[3] for line in server.output().splitlines() if "mpumap-server[" in line}
    assert {"arbiter", "requests", "regions"} <= whos, whos
    assert any(w.startswith("filler") or w.startswith("evictor") for w in whos), whos
