"""The control plane: what the arbiter tells its workers, without ever
waiting for them.

A worker that is stuck (a store read that hangs on a dead NFS server) stops
reading its socket; a blocking send to it would stall the main loop, and
with it every client.  So every worker's socket is non-blocking, and what it
has no room for waits in a backlog, in order, until the socket drains or the
worker is replaced.
"""
import collections
import logging
import os
import socket

from mpumap.protocol import close_all

log = logging.getLogger("mpumap.arbiter")


class Channel:
    """The arbiter's end of one worker's socketpair.

    Owns the socket (non-blocking), and the messages that wait for room in
    it, each with the descriptors it carries: duplicates, handed over by
    whoever posted it (the originals may be closed before it leaves: a
    region released meanwhile), and closed once it left.

    Invariants: messages leave in the order they were posted; one waits
    only behind others; every message's `sent` callback is called exactly
    once, when it was written or when the channel closed without it (the
    worker is gone, and its successor gets the whole state anew).
    """

    def __init__(self, sock, on_backlog):
        sock.setblocking(False)
        self.sock = sock
        self._backlog = collections.deque()  # (data, fds, sent)
        self._on_backlog = on_backlog  # (waiting: bool)

    def fileno(self):
        return self.sock.fileno()

    @property
    def waiting(self):
        """Messages that wait for room in the socket."""
        return len(self._backlog)

    def post(self, data, fds=(), sent=None):
        """Send a message, or queue it behind those waiting already.  Its
        descriptors are the channel's from now on (see `duplicates`): a
        post cannot fail half-way for want of a descriptor."""
        fds = list(fds)
        if not self._backlog and self._send(data, fds):
            close_all(fds)
            if sent:
                sent()
            return
        self._backlog.append((data, fds, sent))
        if len(self._backlog) == 1:
            self._on_backlog(True)

    def flush(self):
        """Send what waits, as far as the socket takes it (when writable)."""
        while self._backlog:
            data, fds, sent = self._backlog[0]
            if not self._send(data, fds):
                return
            self._backlog.popleft()
            close_all(fds)
            if sent:
                sent()
        self._on_backlog(False)

    def _send(self, data, fds):
        """True once the message left (or can never leave: the worker is
        gone, which the arbiter learns from SIGCHLD); False when the socket
        is full."""
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            log.debug("a worker is not listening: %s", exc)
        return True

    def close(self):
        """Close the socket; what still waits is dropped (its callbacks run)."""
        backlog, self._backlog = self._backlog, collections.deque()
        if backlog:
            self._on_backlog(False)
        for _, fds, sent in backlog:
            close_all(fds)
            if sent:
                sent()
        self.sock.close()


def duplicates(fds, count):
    """`count` lists of duplicates of `fds`, for a message to as many
    channels: all made before any is used, so that a broadcast that finds
    no descriptor left (EMFILE) fails before a worker has it, and not after
    some have it and others never will."""
    made = []
    try:
        for _ in range(count):
            made.append([])
            for fd in fds:
                made[-1].append(os.dup(fd))
    except BaseException:
        for copies in made:
            close_all(copies)
        raise
    return made


class Countdown:
    """Calls `then` once `count` things are done (at once when count is 0):
    a reply that must wait until every worker was told something."""

    def __init__(self, count, then):
        self._left = count
        self._then = then
        if count == 0:
            then()

    def done(self):
        self._left -= 1
        if self._left == 0:
            self._then()
