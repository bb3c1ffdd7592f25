"""The file store: the C core reads it, in the fillers' hot loop.

The file store reads the client's own file (never one the server opened with
its own rights).  Reading through the kernel's page cache would keep a second
copy of every page the buffer holds, so by default it reads with O_DIRECT
(from a descriptor reopened with that flag, since flags are shared with the
client's), and where the file system refuses O_DIRECT it drops what it read
from the page cache instead.  A direct store copies the pages that are in
the page cache already, for whatever reason, from there: that is 30 to 50
times cheaper than the disk and adds nothing to memory.
"""
import collections
import logging
import os
import threading

log = logging.getLogger("mpumap.stores")

DIRECT = "direct"  # O_DIRECT reads into aligned buffers
DROP = "drop"  # buffered reads, then POSIX_FADV_DONTNEED
CACHED = "cached"  # buffered reads that stay in the page cache
CALL = "python"  # no descriptor: a Python store reads it (mpumap.stores)
MODES = (DIRECT, DROP, CACHED, CALL)  # in the order of the C core's MPU_STORE_*
MODE_CODES = {mode: code for code, mode in enumerate(MODES)}


CLOSING_THREADS = 8  # the most threads closes that never come back can hold


class Closer:
    """Closes descriptors off the caller's thread: closing asks the file
    system (FUSE sends FLUSH, NFS its server), and one that hangs must cost
    a thread, not the server's main loop.

    Owns the descriptors waiting to be closed and the count of its threads.
    Invariants: at most `most` threads, each of which closes what waits
    until nothing does, then ends; a descriptor waits only while that many
    are busy (say, each in a close that hangs)."""

    def __init__(self, most=CLOSING_THREADS):
        self.most = most
        self.forget()
        # A child forked while a thread held the lock would wait on it for
        # ever, and it has none of the threads.
        os.register_at_fork(after_in_child=self.forget)

    def forget(self):
        self._lock = threading.Lock()
        self._waiting = collections.deque()
        self.threads = 0

    def close(self, fd):
        with self._lock:
            self._waiting.append(fd)
            if self.threads >= self.most:
                return
            self.threads += 1
        threading.Thread(target=self._run, name="close", daemon=True).start()

    def _run(self):
        while True:
            with self._lock:
                if not self._waiting:
                    self.threads -= 1
                    return
                fd = self._waiting.popleft()
            try:
                os.close(fd)
            except OSError as exc:  # the descriptor is gone all the same
                log.warning("closing a store's descriptor: %s", exc.strerror)


close_aside = Closer().close


def reopen(fd, flags):
    """The file open on fd, opened again through /proc/self/fd with flags:
    the same inode, a description of our own.

    Never waits: an open that would wait for a lease to be broken (the
    file's owner holds one) fails with EWOULDBLOCK at once, thanks to
    O_NONBLOCK, which is cleared again once the file is open."""
    new = os.open(f"/proc/self/fd/{fd}", flags | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.set_blocking(new, True)
    except OSError:
        os.close(new)
        raise
    return new


def open_store(client_fd, mode):
    """The descriptor and mode to read a client's file with.

    Takes ownership of client_fd.  For O_DIRECT the file is reopened: the
    same inode the client proved it may read.  Where that is refused (tmpfs
    and friends refuse O_DIRECT; a lease), it is read buffered and its pages
    dropped from the page cache.  A dropping store reads through a
    description of its own where it can, told POSIX_FADV_RANDOM: the
    kernel's read-ahead would put pages in the cache past what the store
    reads, and drops, and the advice must not touch the client's reads."""
    if mode == DIRECT:
        try:
            fd = reopen(client_fd, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            mode = DROP
        else:
            os.close(client_fd)
            return fd, DIRECT
    if mode == DROP:
        try:
            fd = reopen(client_fd, os.O_RDONLY)
        except OSError:
            return client_fd, DROP
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            os.close(fd)
            return client_fd, DROP
        os.close(client_fd)
        return fd, DROP
    return client_fd, mode
