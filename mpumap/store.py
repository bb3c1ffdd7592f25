"""Stores: where page contents come from.

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
MODES = (DIRECT, DROP, CACHED)
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


class FileStore:
    def __init__(self, fd, size, mode=CACHED):
        self.fd = fd
        self.size = size
        self.mode = mode

    def read_into(self, view, offset):
        """Fill view (page aligned, whole pages for O_DIRECT) from offset;
        bytes past the end of the file are zeros.  Returns the bytes read."""
        total = 0
        want = len(view)
        while total < want:
            n = os.preadv(self.fd, [view[total:]], offset + total)
            if n == 0:
                break
            total += n
            if self.mode == DIRECT and total % 512:
                break  # a short O_DIRECT read ends at the end of the file
        if total < want:
            view[total:] = bytes(want - total)
        if self.mode == DROP and total:
            os.posix_fadvise(self.fd, offset, total, os.POSIX_FADV_DONTNEED)
        return total

    def close(self):
        os.close(self.fd)
