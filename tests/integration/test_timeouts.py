"""No request can hang: against a stopped server (SIGSTOP), every client-side
call gives up after $MPUMAP_TIMEOUT with a clear error; page faults, which
are not requests, wait and are answered once the server goes on."""
import errno
import os
import signal
import subprocess
import time

import pytest

import mpumap
from mpumap.testing import MiB, command, make_file

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 2


@pytest.fixture
def stopped(start_server):
    """A server, then SIGSTOP; SIGCONT before the fixture stops it."""
    held = []

    def stop(server):
        os.kill(server.proc.pid, signal.SIGSTOP)
        held.append(server)

    yield stop
    for server in held:
        os.kill(server.proc.pid, signal.SIGCONT)


def timed(args, env=None):
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MPUMAP_TIMEOUT": str(TIMEOUT), **(env or {})})
    return proc, time.monotonic() - started


def test_commands_and_connect_give_up_on_a_stopped_server(start_server, stopped, workdir):
    server = start_server("--buffer-size", 64)
    stopped(server)
    top, took = timed(command("mpumap") + ["top", "--once", "--socket", server.socket])
    assert top.returncode != 0 and took < TIMEOUT + 2
    assert top.stderr.strip().splitlines() == [
        f"mpumap top: the server at {server.socket} did not answer in {TIMEOUT} s"]

    run, took = timed(command("mpumap-client") + ["run", "--socket", server.socket, "--",
                                                   "true"])
    assert run.returncode == 1 and took < TIMEOUT + 2
    assert "did not answer" in run.stderr and len(run.stderr.splitlines()) == 1

    started = time.monotonic()
    with pytest.raises(mpumap.TimeoutError) as info:
        mpumap.connect(server.socket, timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT + 1
    assert info.value.errno == errno.ETIMEDOUT
    assert isinstance(info.value, TimeoutError) and "did not answer" in str(info.value)


def test_a_client_whose_request_timed_out_says_so_and_its_mappings_read_on(
        start_server, stopped, workdir):
    path = make_file(os.path.join(workdir, "d.bin"), MiB, seed=91)
    other = make_file(os.path.join(workdir, "e.bin"), MiB, seed=92)
    server = start_server("--buffer-size", 64)
    client = mpumap.connect(server.socket, timeout=TIMEOUT)
    m = client.map(path)
    stopped(server)
    with pytest.raises(mpumap.TimeoutError):
        client.map(other)
    with pytest.raises(mpumap.ServerUnavailable, match="connect again"):
        client.map(other)
    # A fault is no request: it waits, and is served once the server goes on.
    os.kill(server.proc.pid, signal.SIGCONT)
    assert m[:] == open(path, "rb").read()
    m.close()
    client.close()

