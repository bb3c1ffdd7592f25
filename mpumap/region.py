"""A region: one store object and its page buffer, as the server and its
workers both hold it.

The server makes a region when a client first maps a file (``Region.create``)
and tells every worker about it with ``message()``; a worker builds its own
from that message (``Region.attach``).  Each process then holds its own
descriptors of the same three things, and closes them when the region goes.
"""
import functools
import json
import os

from mpumap import protocol
from mpumap.protocol import W
from mpumap.settings import SYSTEM_PAGE_SIZE
from mpumap.stores.files import CALL, MODE_CODES, MODES, close_aside


def round_up(n, multiple):
    return -(-n // multiple) * multiple


MEMFD_NAME_BYTES = 249  # the kernel's most, "memfd:" and the NUL aside


def memfd_name(name):
    """The memfd's name for a region of `name` (as /proc/PID/maps and
    `ls -l /proc/PID/fd` show it): the base name, cut to what the kernel
    takes, whole characters only."""
    data = f"mpumap:{os.path.basename(name)}".encode("utf-8", "surrogateescape")
    return data[:MEMFD_NAME_BYTES].decode("utf-8", "ignore")


class Region:
    """One store object (a file, by device, inode and user; an object, by
    URL, identity and user) with its buffer.

    Owns, in each process that holds it: the buffer memfd (the pages clients
    map) and, for a file, the store descriptor (what fillers read); an
    object has none (store_fd -1, store_mode CALL): fillers read it by
    its `url`, pinned to its `identity`.  Its pages' states are
    the page directory's (pbm), found by slot and generation.  ``slot``
    names it to the C side (an index into the fillers' tables, reused once
    the region is gone); ``rid`` is unique for the server's life and is the
    slot's generation: a message that names the slot with another rid is
    about a region that is gone.  The server also keeps its key (device,
    inode, uid) and how many client mappings refer to it.
    """

    def __init__(self, rid, slot, size, page_size, memfd, store_fd, store_mode, name,
                 url=None, identity=None):
        self.rid = rid
        self.name = name
        self.slot = slot
        self.size = size
        self.page_size = page_size
        self.npages = -(-size // page_size)
        # Clients map the file's size rounded to system pages: a fill of the
        # last umap page must stop where their mapping does.
        self.map_length = round_up(size, SYSTEM_PAGE_SIZE)
        self.memfd = memfd
        self.store_fd = store_fd
        self.store_mode = store_mode
        self.url = url
        self.identity = identity
        self.window = 0  # the largest read-ahead window in pages (0: the server's)
        self.unit = 1  # the region's page, in server pages: a fault reads all of it
        self.key = None
        self.mappings = 0
        self.write_backs = 0  # the server's: whole write-backs asked and not answered yet
        # The file opened for writing, by the first client that mapped it
        # so (-1: nobody did): evictors write dirty pages back through it.
        self.write_fd = -1

    @classmethod
    def create(cls, key, rid, slot, size, page_size, store_fd, store_mode, name,
               url=None, identity=None):
        """A new region over a store descriptor (which it takes over; -1
        for an object): a fresh memfd sized to whole umap pages."""
        memfd = None
        try:
            memfd = os.memfd_create(memfd_name(name), os.MFD_CLOEXEC)
            npages = -(-size // page_size)
            os.ftruncate(memfd, npages * page_size)
        except BaseException:
            if memfd is not None:
                os.close(memfd)
            if store_fd >= 0:
                os.close(store_fd)
            raise
        region = cls(rid, slot, size, page_size, memfd, store_fd, store_mode, name, url,
                     identity)
        region.key = key
        return region

    def message(self):
        """What tells a worker about this region: (data, descriptors)."""
        data = protocol.W_REGION.pack(W.ADD_REGION, self.slot, self.gen,
                                      MODE_CODES[self.store_mode], self.size, self.npages)
        if self.store_mode == CALL:
            return data + json.dumps({"url": self.url, "identity": self.identity}).encode(), \
                [self.memfd]
        return data, [self.memfd, self.store_fd]

    def drop_message(self):
        return protocol.W_REGION.pack(W.DROP_REGION, self.slot, self.gen, 0, 0, 0)

    @classmethod
    def attach(cls, data, fds, page_size):
        """A worker's region, from the server's message (and its fds)."""
        _, slot, gen, mode, size, npages = protocol.W_REGION.unpack_from(data)
        if MODES[mode] == CALL:
            if len(fds) != 1:
                protocol.close_all(fds)
                raise ValueError(f"an object's region comes with 1 descriptor, not {len(fds)}")
            about = json.loads(data[protocol.W_REGION.size:])
            return cls(gen, slot, size, page_size, fds[0], -1, CALL, about["url"],
                       about["url"], about["identity"])
        try:
            memfd, store_fd = fds
        except ValueError:
            protocol.close_all(fds)
            raise ValueError(f"a region comes with 2 descriptors, not {len(fds)}") from None
        try:
            name = os.readlink(f"/proc/self/fd/{store_fd}")
        except OSError:
            name = f"region {gen}"
        return cls(gen, slot, size, page_size, memfd, store_fd, MODES[mode], name)

    @property
    def gen(self):
        """The rid as the C side's u32 generation of the slot."""
        return self.rid & 0xFFFFFFFF

    @property
    def uid(self):
        return self.key[2]

    @functools.cached_property
    def memfd_inode(self):
        """The memfd's inode: how /proc/PID/maps names a client's mapping of it."""
        return os.fstat(self.memfd).st_ino

    def buffer_bytes(self):
        """What the region's buffer holds in memory now."""
        return os.fstat(self.memfd).st_blocks * 512

    def pages_in(self, offset, length):
        """The umap pages [first, end) that cover a byte range of the file."""
        first = max(0, offset) // self.page_size
        end = min(self.npages, -(-min(offset + length, self.size) // self.page_size))
        return first, max(first, end)

    def drop_store(self):
        """Close the store descriptor in a process that never reads the
        store (an evictor): a descriptor per region is what bounds how
        many regions a process can hold (RLIMIT_NOFILE)."""
        if self.store_fd >= 0:
            close_aside(self.store_fd)
            self.store_fd = -1

    def set_write_fd(self, fd):
        if self.write_fd >= 0:
            close_aside(self.write_fd)
        self.write_fd = fd

    def write_fd_message(self):
        """What gives the evictors the file to write back to: (data, fds)."""
        return protocol.W_REGION.pack(W.WRITE_FD, self.slot, self.gen, 0, 0, 0), \
            [self.write_fd]

    def close(self):
        os.close(self.memfd)
        self.drop_store()
        if self.write_fd >= 0:
            close_aside(self.write_fd)
            self.write_fd = -1
