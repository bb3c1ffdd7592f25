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


def close_aside(fd):
    """Close a descriptor of a file on a thread of its own.  Closing asks
    the file system (FUSE sends FLUSH, NFS its server), and one that hangs
    must cost a thread, not the caller's loop.  (A bounded pool would do
    worse: once its threads all hang on one dead mount, no descriptor of any
    file is closed again.)"""
    try:
        threading.Thread(target=_close, args=(fd,), name="close", daemon=True).start()
    except RuntimeError as exc:  # no thread to be had: better a descriptor left open
        log.error("cannot close a store's descriptor aside (%s): left open", exc)


def close_any(fd):
    """Close a descriptor of any kind, if open: at once where closing asks no
    file system (a socket, a pipe, a memfd, a userfaultfd), else aside.  For
    descriptors whose kind is not known: those a client sent, those a child
    inherits."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")  # asks no file system
    except FileNotFoundError:
        return  # not open (say, the descriptor that listed /proc/self/fd)
    except OSError:
        target = "/"
    if target.startswith("/") and not target.startswith("/memfd:"):
        close_aside(fd)
        return
    try:
        os.close(fd)
    except OSError:
        pass


def _close(fd):
    try:
        os.close(fd)
    except OSError as exc:  # the descriptor is gone all the same
        log.warning("closing a store's descriptor: %s", exc.strerror)


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
            close_aside(client_fd)
            return fd, DIRECT
    if mode == DROP:
        try:
            fd = reopen(client_fd, os.O_RDONLY)
        except OSError:
            return client_fd, DROP
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            close_aside(fd)
            return client_fd, DROP
        close_aside(client_fd)
        return fd, DROP
    return client_fd, mode
