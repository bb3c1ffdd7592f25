"""Helpers the demo and the benchmarks share: data files, a server to run."""
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import mpumap


def make_file(path, size, seed=0):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def server_command():
    script = os.path.join(os.path.dirname(sys.executable), "mpumap-server")
    if os.path.exists(script):
        return [script]
    return [shutil.which("mpumap-server") or "mpumap-server"]


@contextlib.contextmanager
def running_server(*args, log=None):
    """Start mpumap-server on a fresh socket; yield the socket's path."""
    folder = tempfile.mkdtemp(prefix="mpumap-", dir="/tmp")
    sock = os.path.join(folder, "server.sock")
    proc = subprocess.Popen(server_command() + ["--socket", sock, *map(str, args)],
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


def drop_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
