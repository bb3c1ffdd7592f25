"""Stores: where page contents come from (the reading itself is the C
core's, in the fillers' hot loop).

The file store reads the client's own file (never one the server opened with
its own rights).  Reading through the kernel's page cache would keep a second
copy of every page the buffer holds, so by default it reads with O_DIRECT
(from a descriptor reopened with that flag, since flags are shared with the
client's), and where the file system refuses O_DIRECT it drops what it read
from the page cache instead.
"""
import os

DIRECT = "direct"  # O_DIRECT reads into aligned buffers
DROP = "drop"  # buffered reads, then POSIX_FADV_DONTNEED
CACHED = "cached"  # buffered reads that stay in the page cache
MODES = (DIRECT, DROP, CACHED)  # in the order of the C core's MPU_STORE_*
MODE_CODES = {mode: code for code, mode in enumerate(MODES)}


def open_store(client_fd, mode):
    """The descriptor and mode to read a client's file with.

    Takes ownership of client_fd.  For O_DIRECT the file is reopened through
    /proc/self/fd: the same inode the client proved it may read."""
    if mode == DIRECT:
        try:
            fd = os.open(f"/proc/self/fd/{client_fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return client_fd, DROP  # tmpfs and friends refuse O_DIRECT
        os.close(client_fd)
        return fd, DIRECT
    return client_fd, mode
