"""The page buffer manager: shared page-state tables, accounting, counters.

Two kinds of shared segment, each a memfd that the server creates and hands to
its workers:

* the *buffer* segment (one per server): how many umap pages the buffer holds
  now (``used``), may hold (``limit``), the watermarks, the counters, and
  each worker's heartbeat;
* a *page table* per region: one entry per umap page, whose state word is
  both the page's state and its lock.  Transitions are compare-and-swap steps
  in the C core (FREE -> FILLING -> PRESENT -> LEAVING -> FREE), and waiters
  sleep on that word with a futex.
"""
import mmap
import os

from mpumap import core
from mpumap._core import ffi, lib

BUFFER_MAGIC = 0x4D50424D  # "MPBM"
TABLE_MAGIC = 0x4D505442  # "MPTB"
LAYOUT_VERSION = 2

COUNTERS = (
    "faults",
    "fills",
    "copies",
    "wakes",
    "evictions",
    "bytes_read",
    "fill_errors",
    "full_waits",
    "restarts",
    "readahead_fills",
    "readahead_hits",
    "prefetch_fills",
    "monitor_ns",
    "queue_ns",
    "read_ns",
    "copy_ns",
    "wake_ns",
    "cache_bytes",
    "queued_faults",
    "stale_faults",
    "events_lost",
    "hangs",
)
CLIENT_COUNTERS = ("faults", "copies", "wakes", "bytes", "wait_ns")


def _shared_segment(name, size, fd=None):
    """Map a memfd (created when fd is None) read-write and shared."""
    if fd is None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
    segment = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return fd, segment


class PageBuffer:
    """The buffer segment: accounting, counters and heartbeats, shared by the
    server and its workers (a memfd each maps; the server creates it, workers
    inherit it when they are forked)."""

    SIZE = ffi.sizeof("struct mpu_header")

    def __init__(self, fd, segment):
        self.fd = fd
        self._segment = segment
        self._ref = core.pointer_to(segment)
        self.header = ffi.cast("struct mpu_header *", self._ref)

    @classmethod
    def create(cls, limit, high_percent, low_percent):
        fd, segment = _shared_segment("mpumap-buffer", cls.SIZE)
        buf = cls(fd, segment)
        buf.header.magic = BUFFER_MAGIC
        buf.header.version = LAYOUT_VERSION
        buf.set_limit(limit, high_percent, low_percent)
        return buf

    @classmethod
    def attach(cls, fd):
        fd, segment = _shared_segment(None, cls.SIZE, fd)
        buf = cls(fd, segment)
        if buf.header.magic != BUFFER_MAGIC or buf.header.version != LAYOUT_VERSION:
            raise ValueError("not an mpumap buffer segment of this version")
        return buf

    def set_limit(self, limit, high_percent, low_percent):
        """Set the buffer's size in pages and the watermarks derived from it.

        The high mark is at least one page below the limit when the limit
        allows, so that evictors start before fillers have to wait.
        """
        limit = max(1, int(limit))
        high = max(1, min(limit, limit * high_percent // 100))
        low = min(high - 1, limit * low_percent // 100) if high > 1 else 0
        h = self.header
        h.high = high
        h.low = max(0, low)
        h.limit = limit
        # Fillers waiting for room re-check against the new limit.
        lib.mpu_futex_wake(ffi.addressof(h, "used"), 2**31 - 1)

    @property
    def used(self):
        return lib.mpu_load32(ffi.addressof(self.header, "used"))

    @property
    def limit(self):
        return self.header.limit

    def add(self, counter, n=1):
        lib.mpu_add64(ffi.addressof(self.header, counter), n)

    def counter(self, name):
        return lib.mpu_load64(ffi.addressof(self.header, name))

    def beat(self, worker_slot):
        """A worker's sign of life."""
        lib.mpu_beat(self.header, worker_slot)

    def heartbeat(self, worker_slot):
        """CLOCK_MONOTONIC ns (time.monotonic_ns()) of a worker's last sign
        of life."""
        return lib.mpu_load64(self.header.heartbeat + worker_slot)

    def reserve(self, evict_fds, timeout_ms):
        """Take a page of the buffer; False when none came free in time."""
        ret = lib.mpu_reserve(self.header, evict_fds, len(evict_fds), timeout_ms)
        if ret == -core.ETIMEDOUT:
            return False
        core.check(ret, "reserving a buffer page")
        return True

    def release(self, count=1):
        lib.mpu_release(self.header, count)

    def client_counters(self, slot):
        c = self.header.clients[slot]
        return {name: getattr(c, name) for name in CLIENT_COUNTERS}

    def reset_client(self, slot):
        c = self.header.clients[slot]
        for name in CLIENT_COUNTERS:
            setattr(c, name, 0)

    def latency(self):
        return list(self.header.latency)

    def clear_evict_request(self):
        self.header.evict_wanted = 0

    def snapshot(self):
        h = self.header
        snap = {name: getattr(h, name) for name in COUNTERS}
        snap.update(
            used=self.used,
            limit=h.limit,
            high=h.high,
            low=h.low,
            peak_used=h.peak_used,
        )
        return snap

    def close(self):
        self.header = None
        ffi.release(self._ref)
        self._segment.close()
        os.close(self.fd)


def bucket_floor_us(bucket):
    """The smallest latency (us) that falls into a histogram bucket."""
    if bucket < 8:
        return bucket
    octave, sub = divmod(bucket - 8, 8)
    return (8 + sub) << octave


def percentile_us(buckets, fraction):
    """The latency under which `fraction` of the counted faults fell, from a
    histogram of the C core's buckets; None when it counted nothing."""
    total = sum(buckets)
    if not total:
        return None
    seen = 0
    for bucket, count in enumerate(buckets):
        seen += count
        if seen >= fraction * total:
            return bucket_floor_us(bucket + 1)  # an upper bound of that bucket
    return bucket_floor_us(len(buckets))


class PageTable:
    """One region's page states, shared by the server and its workers (a
    memfd each maps).  The table is sparse: its entries for pages never
    filled are holes that cost no memory, and the C walks over it skip them.
    """

    def __init__(self, fd, segment, npages):
        self.fd = fd
        self.npages = npages
        self._segment = segment
        self._ref = core.pointer_to(segment)
        self.table = ffi.cast("struct mpu_table *", self._ref)
        self.pages = self.table.pages

    @staticmethod
    def segment_size(npages):
        return ffi.sizeof("struct mpu_table") + npages * ffi.sizeof("struct mpu_page")

    @classmethod
    def create(cls, npages):
        fd, segment = _shared_segment("mpumap-table", cls.segment_size(npages))
        table = cls(fd, segment, npages)
        table.table.magic = TABLE_MAGIC
        table.table.npages = npages
        table.table.covered = npages
        return table

    @classmethod
    def attach(cls, fd, npages):
        fd, segment = _shared_segment(None, cls.segment_size(npages), fd)
        table = cls(fd, segment, npages)
        if table.table.magic != TABLE_MAGIC or table.table.npages != npages:
            raise ValueError("not an mpumap page table of this size")
        return table

    def state(self, index):
        return lib.mpu_load32(ffi.addressof(self.pages[index], "state")) & 3

    @property
    def present(self):
        """Pages PRESENT now (a counter: no walk over the table)."""
        return lib.mpu_load64(ffi.addressof(self.table, "present"))

    def begin_fill(self, index, owner, timeout_ms):
        """FREE: the caller now fills the page; PRESENT: it is there already;
        FILLING or LEAVING: still so after waiting timeout_ms."""
        return lib.mpu_page_begin_fill(self.pages + index, owner, timeout_ms)

    def end_fill(self, buffer, index, present, flags=0):
        lib.mpu_page_end_fill(buffer.header, self.table, self.pages + index, present, flags)

    def evict(self, index, owner, memfd, offset, length):
        """True when the page was PRESENT and is now FREE."""
        return bool(core.check(
            lib.mpu_page_evict(self.table, self.pages + index, owner, memfd, offset, length),
            "evicting a page",
        ))

    def oldest(self, count, stride=1, phase=0):
        """Up to count (stamp, index) pairs of the oldest PRESENT pages."""
        idx = ffi.new("uint64_t[]", count)
        stamps = ffi.new("uint64_t[]", count)
        n = lib.mpu_table_oldest(self.table, self.fd, stride, phase, count, idx, stamps)
        return list(zip(ffi.unpack(stamps, n), ffi.unpack(idx, n)))

    def recover(self, buffer, owner, memfd, page_size):
        """Free the pages a dead worker held FILLING or LEAVING."""
        return lib.mpu_table_recover(buffer.header, self.table, self.fd, owner, memfd,
                                     page_size)

    def release_all(self, buffer):
        """Mark the region dead and give its PRESENT pages back to the buffer."""
        return lib.mpu_table_release(buffer.header, self.table, self.fd)

    def close(self):
        self.table = self.pages = None
        ffi.release(self._ref)
        self._segment.close()
        os.close(self.fd)
