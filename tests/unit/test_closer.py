"""close_aside: descriptors closed on threads of their own."""
import os
import threading
import time

import pytest

from mpumap.stores import files

pytestmark = pytest.mark.timeout(30)


def wait_for(predicate, seconds=10):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_closes_that_hang_keep_no_other_close_waiting(monkeypatch):
    release = threading.Event()
    closed = []

    def close(fd):
        if fd < 200:
            release.wait()  # a close that does not come back (yet)
        closed.append(fd)

    monkeypatch.setattr(files, "_close", close)
    for fd in [*range(100, 120), *range(200, 210)]:
        files.close_aside(fd)
    wait_for(lambda: sorted(closed) == list(range(200, 210)))
    release.set()
    wait_for(lambda: len(closed) == 30)


def test_a_close_that_fails_is_said(caplog):
    r, w = os.pipe()
    files.close_aside(1 << 30)  # no such descriptor: EBADF
    files.close_aside(w)
    assert os.read(r, 1) == b""  # the write end is closed
    os.close(r)
    wait_for(lambda: "Bad file descriptor" in caplog.text)
