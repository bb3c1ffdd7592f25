"""The fault monitor: one C thread of the server for every client.

It sleeps in epoll on every client's userfaultfd, turns each fault address
(a CVA) into (region, umap page), and hands it to the filler that owns that
page, or to a free one while that one is busy (c/fastpath.c: route).
The reading and dispatching (c/fastpath.c) meet no Python and no GIL; this
class keeps the thread's tables: which clients, which ranges, which fillers'
sockets.
"""
import logging
import os

from mpumap import core
from mpumap._core import ffi, lib

log = logging.getLogger("mpumap.monitor")


class FaultMonitor:
    """The monitor thread and what it is told.

    Owns the C monitor (its thread, epoll set and the fillers' queues).  It
    holds no descriptor of its own: the userfaultfds are the client table's
    and the fillers' sockets the arbiter's, and each may be closed only once
    the call that removes it here has returned.
    """

    def __init__(self, buffer, settings):
        self.c = lib.mpu_monitor_start(buffer.header, settings.page_size, settings.read_ahead,
                                       settings.fillers, settings.spin_us * 1000)
        if self.c == ffi.NULL:
            raise OSError(ffi.errno, "starting the fault monitor thread")

    def watch(self, slot, gen, uffd):
        """Start watching a client's userfaultfd; its faults count in slot."""
        core.check(lib.mpu_monitor_add_client(self.c, slot, gen, uffd),
                   "watching the userfaultfd")

    def set_ranges(self, slot, ranges):
        """A client's mappings: (start, end, region slot, region generation,
        advice, largest read-ahead window in pages or 0, the region's page in
        server pages, 1 for a mapping that may write) sorted by start."""
        c = ffi.new("struct mpu_client_range[]", max(1, len(ranges)))
        for entry, (start, end, region, gen, advice, window, unit, writable) in zip(c, ranges):
            entry.start, entry.end, entry.region, entry.region_gen = start, end, region, gen
            entry.advice, entry.window, entry.unit = advice, window, unit
            entry.writable = writable
        core.check(lib.mpu_monitor_set_ranges(self.c, slot, c, len(ranges)),
                   "setting a client's ranges")

    def forget(self, slot):
        """Stop watching a client; its userfaultfd may be closed then."""
        lib.mpu_monitor_remove_client(self.c, slot)

    def set_filler(self, index, fd, heartbeat_slot=-1):
        """Where filler `index` takes its faults (-1: nowhere, for now), and
        its heartbeat slot, where it says how busy it is."""
        lib.mpu_monitor_set_filler(self.c, index, fd, heartbeat_slot)

    def stop(self):
        if self.c is None:
            return
        err = lib.mpu_monitor_stop(self.c)
        if err < 0:
            log.error("the fault monitor thread could not be told to stop: %s",
                      os.strerror(-err))
        self.c = None
