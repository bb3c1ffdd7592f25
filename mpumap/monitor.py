"""Fault monitors: one per client, in the server's parent process.

A monitor reads its client's userfaultfd, turns each fault address (a CVA)
into (region, umap page), and hands it to the filler that owns that page, so
that every fault on one page is served by one filler, in order.

The reading and dispatching run in one C thread of the server
(mpu_monitor_*), asleep in epoll on every client's userfaultfd: a fault
meets no Python and no GIL on its way to a filler.  The classes here keep
that thread's tables: which clients, which ranges, which fillers' sockets.
"""
import bisect

from mpumap import core
from mpumap._core import ffi, lib


def filler_for(region_slot, index, nfillers):
    """The filler that serves every fault on this page."""
    return lib.mpu_filler_for(region_slot, index, nfillers)


class Monitors:
    """The monitor thread."""

    def __init__(self, buffer, page_size, read_ahead, nfillers, spin_us=0):
        self.c = lib.mpu_monitor_start(buffer.header, page_size, read_ahead, nfillers,
                                       spin_us * 1000)
        if self.c == ffi.NULL:
            raise OSError(ffi.errno, "starting the fault monitor thread")

    def set_filler(self, index, fd):
        lib.mpu_monitor_set_filler(self.c, index, fd)

    def stop(self):
        if self.c is not None:
            lib.mpu_monitor_stop(self.c)
            self.c = None


class Monitor:
    """One client's monitor: its userfaultfd and the ranges it maps."""

    def __init__(self, monitors, slot, uffd):
        self.monitors = monitors
        self.slot = slot
        self._ranges = []  # (start, end, region slot), sorted
        core.check(lib.mpu_monitor_add_client(monitors.c, slot, uffd),
                   "watching the userfaultfd")

    def add(self, start, length, region_slot):
        bisect.insort(self._ranges, (start, start + length, region_slot))
        self._publish()

    def remove(self, start):
        self._ranges = [r for r in self._ranges if r[0] != start]
        self._publish()

    def _publish(self):
        ranges = ffi.new("struct mpu_range[]", max(1, len(self._ranges)))
        for c, (start, end, region) in zip(ranges, self._ranges):
            c.start, c.end, c.region = start, end, region
        core.check(lib.mpu_monitor_set_ranges(self.monitors.c, self.slot, ranges,
                                              len(self._ranges)), "setting a client's ranges")

    def close(self):
        """Stop watching; the userfaultfd may be closed once this returns."""
        lib.mpu_monitor_remove_client(self.monitors.c, self.slot)
