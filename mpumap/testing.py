"""What the tests and the scripts (demo, benchmarks) both need: data files,
mpumap's own commands, a server to run.

Not part of the client API; it is in the package so that both find it
without path tricks."""
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20

ENTRY_POINTS = {"mpumap-server": "server_main", "mpumap-client": "client_main",
                "mpumap": "mpumap_main"}


def make_file(path, size, seed=0):
    """A file of pseudo-random bytes, different for each seed."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def command(name):
    """The command line of one of mpumap's commands: the installed script
    beside this Python, else on PATH, else its entry point run directly."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(script):
        return [script]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"from mpumap.cli import {ENTRY_POINTS[name]} as main; main()"]


def drop_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def running_server(*args, log=None):
    """Start mpumap-server on a fresh socket; yield (socket path, process)."""
    import mpumap

    folder = tempfile.mkdtemp(prefix="mpumap-", dir="/tmp")
    sock = os.path.join(folder, "server.sock")
    proc = subprocess.Popen(command("mpumap-server") + ["--socket", sock, *map(str, args)],
                            stderr=log or subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mpumap-server exited with status {proc.returncode}")
            try:
                if mpumap.server_stats(sock)["workers"]:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("mpumap-server did not start") from None
                time.sleep(0.05)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
