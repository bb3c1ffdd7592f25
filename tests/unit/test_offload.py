"""in_child: a step run in a child forked for it (a store's client, which
the server must not start itself)."""
import errno
import os
import time

import pytest

from mpumap.server.offload import in_child

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def reap():
    yield
    time.sleep(0.05)
    try:  # what the arbiter does in the server
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def test_the_result_comes_back_and_the_work_was_done_elsewhere():
    assert in_child(lambda: [os.getpid(), "etag"], 10)[1] == "etag"
    assert in_child(os.getpid, 10) != os.getpid()


def test_an_oserror_comes_back_with_its_errno():
    def missing():
        raise FileNotFoundError(errno.ENOENT, "s3://data/x: no such object")

    with pytest.raises(FileNotFoundError, match="no such object"):
        in_child(missing, 10)
    with pytest.raises(OSError) as exc:
        in_child(lambda: 1 / 0, 10)
    assert exc.value.errno == errno.EIO and "ZeroDivisionError" in str(exc.value)


def test_a_child_that_does_not_answer_is_killed():
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        in_child(lambda: time.sleep(60), 0.5)
    assert time.monotonic() - started < 5


def test_a_job_that_finds_no_thread_waits_for_one_and_is_not_lost(monkeypatch):
    import select
    import threading

    from mpumap.server.offload import Offload

    offload = Offload(total=4, per_user=4)
    answers = []
    start = threading.Thread.start

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    try:
        monkeypatch.setattr(threading.Thread, "start", no_thread)
        for n in range(3):
            offload.submit(1000, lambda n=n: n, lambda result, error: answers.append(result),
                           30)
        assert answers == [] and offload.next_deadline() is not None
        monkeypatch.setattr(threading.Thread, "start", start)
        offload.submit(1000, lambda: 3, lambda result, error: answers.append(result), 30)
        deadline = time.monotonic() + 10
        while len(answers) < 4 and time.monotonic() < deadline:
            select.select([offload], [], [], 0.5)
            offload.finished()
        assert sorted(answers) == [0, 1, 2, 3]
        assert offload.next_deadline() is None
    finally:
        offload.close()
