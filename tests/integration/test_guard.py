"""The fallback guard (c/guard.c) through mpumap._core, without a server: a
socketpair plays the connection, this process registers its own range on its
own userfaultfd, and nobody serves the faults.  When the other end hangs up,
the guard must map the file over the range and wake the faulting thread,
even one that holds the GIL."""
import errno
import os
import subprocess
import sys

import pytest

from mpumap.testing import make_file
from mpumap import core
from mpumap._core import lib

pytestmark = pytest.mark.timeout(60)

SCENARIO = r"""
import errno, mmap, os, socket, subprocess, sys, time
from mpumap import core
from mpumap._core import lib

path = sys.argv[1]
size = os.path.getsize(path)
page = mmap.PAGESIZE
length = (size + page - 1) // page * page

uffd, how = core.uffd_open()
memfd = os.memfd_create("guard-test")
os.ftruncate(memfd, length)
m = mmap.mmap(memfd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
os.close(memfd)
addr = core.address_of(m)
core.uffd_register(uffd, addr, length)     # nobody will serve these faults

ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
guard = lib.mpu_guard_start(ours.fileno(), uffd, -1)
assert guard
fd = os.open(path, os.O_RDONLY)
assert lib.mpu_guard_add(guard, addr, length, fd) == 0
os.close(fd)                                # the guard keeps its own copy
assert lib.mpu_guard_remove(guard, addr + page) == -errno.ENOENT
assert lib.mpu_guard_fell_back(guard) == 0

# The peer goes away in a moment, from another process: this one is about
# to block on a fault while holding the GIL.
peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"],
                        pass_fds=[theirs.fileno()])
theirs.close()
started = time.monotonic()
data = m[:]                                 # faults: blocked until the guard falls back
elapsed = time.monotonic() - started
peer.wait()

assert data == open(path, "rb").read(), "wrong bytes"
assert lib.mpu_guard_fell_back(guard) == 1
fd = os.open(path, os.O_RDONLY)
assert lib.mpu_guard_add(guard, addr, length, fd) == -errno.ENOTCONN
os.close(fd)
with open("/proc/self/maps") as f:
    line = next(l for l in f if int(l.split("-")[0], 16) == addr)
assert line.rstrip().endswith(path), line
assert lib.mpu_guard_remove(guard, addr) == 0
m.close()
lib.mpu_guard_stop(guard)
os.close(uffd)
ours.close()
print(f"ok {elapsed:.3f}", flush=True)
"""


def test_guard_maps_the_file_and_wakes_a_thread_that_holds_the_gil(workdir):
    path = make_file(os.path.join(workdir, "f.bin"), 5 * 4096 + 123, seed=90)
    result = subprocess.run([sys.executable, "-c", SCENARIO, path], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    ok, elapsed = result.stdout.split()
    assert ok == "ok" and 0.3 < float(elapsed) < 20
    lost = [line for line in result.stderr.splitlines() if "lost the server" in line]
    assert lost == ["mpumap: lost the server; 1 mapping(s) now use their file directly"]


def test_guard_stops_quietly(workdir, capfd):
    import socket

    path = make_file(os.path.join(workdir, "g.bin"), 4096)
    fds_before = len(os.listdir("/proc/self/fd"))
    uffd, _ = core.uffd_open()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        guard = lib.mpu_guard_start(a.fileno(), uffd, -1)
        assert guard
        fd = os.open(path, os.O_RDONLY)
        for i in range(20):   # more than the first allocation
            assert lib.mpu_guard_add(guard, 0x10000000 + i * 4096, 4096, fd) == 0
        assert lib.mpu_guard_add(guard, 0x20000000, 0, fd) == -errno.EINVAL
        os.close(fd)
        for i in range(20):
            assert lib.mpu_guard_remove(guard, 0x10000000 + i * 4096) == 0
        assert lib.mpu_guard_remove(guard, 0x10000000) == -errno.ENOENT
        b.send(b"replies do not wake the guard")
        assert lib.mpu_guard_fell_back(guard) == 0
        lib.mpu_guard_stop(guard)
    finally:
        a.close()
        b.close()
        os.close(uffd)
    assert len(os.listdir("/proc/self/fd")) == fds_before   # kept copies closed
    assert "lost the server" not in capfd.readouterr().err
