"""The arbiter's channels to its workers: descriptors handed over, and
broadcasts that fail before anyone has them (real sockets)."""
import os
import socket
import subprocess
import sys

from mpumap.server.control import Channel, duplicates


def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def channel_pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return Channel(ours, lambda waiting: None), theirs


def test_a_message_sent_at_once_closes_what_it_was_handed():
    channel, theirs = channel_pair()
    r, w = os.pipe()
    sent = []
    try:
        channel.post(b"hello", [r], lambda: sent.append(1))
        assert sent == [1] and not is_open(r)
        data, fds, _, _ = socket.recv_fds(theirs, 64, 4)
        assert data == b"hello" and len(fds) == 1
        os.close(fds[0])
    finally:
        os.close(w)
        channel.close()
        theirs.close()


def test_a_message_that_waits_keeps_its_descriptors_until_it_leaves():
    channel, theirs = channel_pair()
    try:
        while channel.waiting == 0:  # fill the socket
            channel.post(b"x" * 1024)
        r, w = os.pipe()
        os.close(w)
        sent = []
        channel.post(b"with a pipe", [r], lambda: sent.append(1))
        assert not sent and is_open(r)
        theirs.setblocking(False)
        while channel.waiting:
            try:
                while True:
                    _, fds, _, _ = socket.recv_fds(theirs, 2048, 4)
                    for fd in fds:
                        os.close(fd)
            except BlockingIOError:
                pass
            channel.flush()
        assert sent == [1] and not is_open(r)
    finally:
        channel.close()
        theirs.close()


def test_closing_a_channel_closes_what_waits_and_calls_back():
    channel, theirs = channel_pair()
    while channel.waiting == 0:
        channel.post(b"x" * 1024)
    r, w = os.pipe()
    os.close(w)
    sent = []
    channel.post(b"never read", [r], lambda: sent.append(1))
    channel.close()
    theirs.close()
    assert sent == [1] and not is_open(r)


DUPLICATES_WITHOUT_ROOM = """
import errno, os, resource
from mpumap.server.control import duplicates
r, w = os.pipe()
before = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + 4, hard))  # room for 4, not 6
try:
    duplicates([r, w], 3)
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
else:
    raise SystemExit("made 6 duplicates in room for 3")
after = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
assert after == before, (before, after)
print("ok")
"""


def test_duplicates_are_all_made_or_none():
    copies = duplicates([0, 1], 3)
    assert len(copies) == 3 and all(len(c) == 2 for c in copies)
    for c in copies:
        for fd in c:
            os.close(fd)
    done = subprocess.run([sys.executable, "-c", DUPLICATES_WITHOUT_ROOM], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


TELL_WITHOUT_ROOM = """
import errno, os, resource, socket, types
from mpumap.server.arbiter import Arbiter
from mpumap.server.control import Channel

def worker(backed_up):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    channel = Channel(ours, lambda waiting: None)
    while backed_up and not channel.waiting:
        channel.post(b"x" * 1024)
    theirs.setblocking(False)
    return types.SimpleNamespace(role="filler", channel=channel), theirs

# One worker's socket has room, two are full: those keep what waits.
workers = [worker(False), worker(True), worker(True)]
arbiter = types.SimpleNamespace(by_slot={i: w for i, (w, _) in enumerate(workers)})
waiting = [w.channel.waiting for w, _ in workers]
r, w = os.pipe()
before = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + 3, hard))  # room for 3, not 6
told = []
try:
    Arbiter.tell(arbiter, b"region", [r, w], None, lambda: told.append(1))
except OSError as exc:
    assert exc.errno == errno.EMFILE, exc
else:
    raise SystemExit("told 3 workers of 2 descriptors in room for 3")
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
assert not told
assert sorted(int(fd) for fd in os.listdir("/proc/self/fd")) == before
assert [w.channel.waiting for w, _ in workers] == waiting
for i, (_, theirs) in enumerate(workers):
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(theirs, 2048, 4)
            assert data != b"region", f"worker {i} was told"
    except BlockingIOError:
        pass
print("ok")
"""


def test_a_broadcast_without_descriptors_for_all_tells_none():
    """Before: the worker with room had the message, a full one's copy
    failed (EMFILE) and the last never heard of it."""
    done = subprocess.run([sys.executable, "-c", TELL_WITHOUT_ROOM], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
