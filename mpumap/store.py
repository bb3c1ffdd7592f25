"""Stores: where page contents come from.  The file store reads a client's
own descriptor, so the server never opens a file with its own rights."""
import os


class FileStore:
    def __init__(self, fd, size):
        self.fd = fd
        self.size = size

    def read_into(self, view, offset):
        """Fill view from offset; bytes past the end of the file are zeros.

        Returns how many bytes came from the file."""
        total = 0
        want = len(view)
        while total < want:
            n = os.preadv(self.fd, [view[total:]], offset + total)
            if n == 0:
                break
            total += n
        if total < want:
            view[total:] = bytes(want - total)
        return total

    def close(self):
        os.close(self.fd)
