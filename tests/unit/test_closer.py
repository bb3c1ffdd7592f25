"""Closer: descriptors closed aside, by a bounded number of threads."""
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


def test_closes_that_hang_hold_at_most_its_threads_and_the_rest_wait(monkeypatch):
    release = threading.Event()
    closed, hanging = [], set()

    def close(fd):
        if fd in hanging:
            release.wait()
        closed.append(fd)

    monkeypatch.setattr(files.os, "close", close)
    closer = files.Closer(most=3)
    hanging.update(range(100, 103))
    for fd in range(100, 103):  # three closes that never come back (yet)
        closer.close(fd)
    wait_for(lambda: closer.threads == 3)
    for fd in range(200, 210):
        closer.close(fd)
    time.sleep(0.2)
    assert closer.threads == 3 and closed == []  # they wait, no fourth thread
    release.set()
    wait_for(lambda: closer.threads == 0)
    assert sorted(closed) == [*range(100, 103), *range(200, 210)]


def test_a_close_that_fails_is_said_and_the_next_is_closed(caplog):
    closer = files.Closer(most=1)
    r, w = os.pipe()
    closer.close(1 << 30)  # no such descriptor: EBADF
    closer.close(w)
    wait_for(lambda: closer.threads == 0)
    assert os.read(r, 1) == b""  # the write end is closed
    os.close(r)
    assert "Bad file descriptor" in caplog.text
