"""Stores: where page contents come from (the reading itself is the C
core's, in the fillers' hot loop).

The file store reads the client's own file (never one the server opened with
its own rights).  Reading through the kernel's page cache would keep a second
copy of every page the buffer holds, so by default it reads with O_DIRECT
(from a descriptor reopened with that flag, since flags are shared with the
client's), and where the file system refuses O_DIRECT it drops what it read
from the page cache instead.  Pages that are in the page cache already, for
whatever reason, are copied from there in every mode: that is 30 to 50 times
cheaper than the disk and adds nothing to memory.
"""
import os

DIRECT = "direct"  # O_DIRECT reads into aligned buffers
DROP = "drop"  # buffered reads, then POSIX_FADV_DONTNEED
CACHED = "cached"  # buffered reads that stay in the page cache
MODES = (DIRECT, DROP, CACHED)  # in the order of the C core's MPU_STORE_*
MODE_CODES = {mode: code for code, mode in enumerate(MODES)}


def open_store(client_fd, mode):
    """The descriptor and mode to read a client's file with.

    Takes ownership of client_fd.  For direct and drop the file is reopened
    through /proc/self/fd: the same inode the client proved it may read."""
    if mode == DIRECT:
        try:
            fd = os.open(f"/proc/self/fd/{client_fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            mode = DROP  # tmpfs and friends refuse O_DIRECT
        else:
            os.close(client_fd)
            return fd, DIRECT
    if mode == DROP:
        # Our own open file, whose read-ahead we can turn off: pages read
        # ahead would stay in the cache, since only what was read is dropped.
        try:
            fd = os.open(f"/proc/self/fd/{client_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return client_fd, DROP
        os.close(client_fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd, DROP
    return client_fd, mode


def open_cache_reader(store_fd, mode):
    """A buffered descriptor beside a direct store, for the pages the kernel's
    page cache holds anyway (the C core asks cachestat first); None for the
    other modes, or where the reopen fails."""
    if mode != DIRECT:
        return None
    try:
        fd = os.open(f"/proc/self/fd/{store_fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    # Its reads must not start read-ahead into the cache.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd
