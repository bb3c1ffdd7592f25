"""The page buffer manager: the shared buffer segment, the page directory in
it, accounting and counters.

One segment per server (a memfd the server creates; workers inherit it when
they are forked) holds:

* the *header*: how many umap pages the buffer holds now (``used``), may
  hold (``limit``), the watermarks, the counters and each worker's
  heartbeat;
* a record per region slot: its generation, whether it was released, how
  many of its pages are PRESENT;
* the *page directory*: a descriptor for each page in use (FILLING, PRESENT
  or LEAVING), found from (region, page) through a hash index, and the FIFO
  of PRESENT pages in fill order that evictors take victims from.  A page
  with no descriptor is FREE.  Each descriptor's state word holds the
  page's state and the pid that moved it there, and waiters sleep on it
  with a futex; the C core moves it under the directory's robust mutex,
  with the index and the FIFO; see c/pbm.c.

What the segment costs in memory follows the buffer: it is sized for the
largest buffer the server may have, and only what is written takes memory.
"""
import errno
import mmap
import os

from mpumap import core
from mpumap._core import ffi, lib
from mpumap.stores import files
from mpumap.stores.files import DIRECT, MODE_CODES

BUFFER_MAGIC = 0x4D50424D  # "MPBM"
LAYOUT_VERSION = 7
# Descriptors are numbered in 31 bits (and the limit is a u32).
MAX_CAPACITY = (1 << 31) - 1

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
    "readaround_fills",
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
    "writes",
    "written",
    "lost_writes",
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
    """The buffer segment: accounting, counters, heartbeats and the page
    directory, shared by the server and its workers.

    Invariants (kept by the C core): ``used`` is the number of descriptors
    in use, pages FILLING, PRESENT or LEAVING (the buffer pages taken); the
    limit never exceeds ``capacity``, the number of descriptors there is
    room for.
    """

    def __init__(self, fd, segment):
        self.fd = fd
        self._segment = segment
        self._ref = core.pointer_to(segment)
        self.header = ffi.cast("struct mpu_header *", self._ref)

    @classmethod
    def create(cls, limit, high_percent, low_percent, capacity=None, max_regions=64):
        """A new segment for a buffer of `limit` pages now and at most
        `capacity` (by default, the limit), with `max_regions` region slots."""
        capacity = max(1, min(int(limit if capacity is None else capacity), MAX_CAPACITY))
        buf = cls(*_shared_segment("mpumap-buffer", lib.mpu_pbm_size(capacity, max_regions)))
        try:
            core.check(lib.mpu_pbm_init(buf.header, capacity, max_regions),
                       "setting up the page directory")
        except BaseException:
            buf.close()
            raise
        buf.header.magic = BUFFER_MAGIC
        buf.header.version = LAYOUT_VERSION
        buf.set_limit(limit, high_percent, low_percent)
        return buf

    @classmethod
    def attach(cls, fd):
        fd, segment = _shared_segment(None, os.fstat(fd).st_size, fd)
        buf = cls(fd, segment)
        if buf.header.magic != BUFFER_MAGIC or buf.header.version != LAYOUT_VERSION:
            raise ValueError("not an mpumap buffer segment of this version")
        return buf

    @property
    def capacity(self):
        """Descriptors there is room for: the largest limit the buffer may have."""
        return self.header.capacity

    @property
    def max_regions(self):
        return self.header.max_regions

    def segment_bytes(self):
        """What the segment holds in memory now: the header, the regions'
        records, the descriptors and buckets written so far."""
        return os.fstat(self.fd).st_blocks * 512

    def set_limit(self, limit, high_percent, low_percent):
        """Set the buffer's size in pages and the watermarks derived from it.

        The high mark is at least one page below the limit when the limit
        allows, so that evictors start before fillers have to wait.
        """
        limit = max(1, min(int(limit), self.capacity))
        high = max(1, min(limit, limit * high_percent // 100))
        low = min(high - 1, limit * low_percent // 100) if high > 1 else 0
        h = self.header
        h.high = high
        h.low = max(0, low)
        h.limit = limit
        # Fillers waiting for room re-check against the new limit.
        lib.mpu_futex_wake(ffi.addressof(h, "used"), 2**31 - 1)
        core.check(lib.mpu_pbm_fit_index(h, limit), "sizing the page index")

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
            present=self.counter("present"),
            dirty=self.counter("dirty"),
            descriptors=h.top,
        )
        return snap

    # -- regions and pages -------------------------------------------------------

    def open_region(self, slot, gen, npages):
        core.check(lib.mpu_region_open(self.header, slot, gen, npages), "opening a region")

    def release_region(self, slot, gen):
        """The region is gone: its PRESENT pages go back to the buffer now
        (how many), the others as their fills and evictions end."""
        return core.check(lib.mpu_region_release(self.header, slot, gen), "releasing a region")

    def region_present(self, slot):
        """Pages of the region in `slot` PRESENT now (a counter)."""
        return lib.mpu_region_present(self.header, slot)

    def claim(self, slot, gen, page, owner, timeout_ms, how=lib.MPU_CLAIM_FAULT,
              evict_fds=()):
        """(state, descriptor): FREE when the caller now fills the page (with
        a buffer page for it), PRESENT when it is there, FILLING or LEAVING
        when still so after timeout_ms; None for the state when the buffer
        had no room (in time, for a fault)."""
        desc = ffi.new("uint32_t *")
        fds = ffi.new("int[]", list(evict_fds) or [-1])
        state = lib.mpu_page_claim(self.header, slot, gen, page, owner, how, timeout_ms,
                                   fds, len(evict_fds), desc, ffi.NULL)
        if state == -errno.EAGAIN:
            return None, 0
        return core.check(state, "claiming a page"), desc[0]

    def filled(self, desc, present, flags=0):
        """The end of a fill: PRESENT, or FREE and its buffer page back."""
        lib.mpu_page_filled(self.header, desc, present, flags)

    def page_state(self, slot, gen, page):
        return lib.mpu_page_state(self.header, slot, gen, page)

    def evict(self, count, owner, slots, page_size, clients=None):
        """Up to count of the oldest PRESENT pages punched out and FREE, dirty
        ones written back first: how many (0 also when a region or client
        it needs has a message on its way).  `slots` (RegionSlots) gives
        their memfds and files, `clients` (struct mpu_client_slot[]) the
        writers' userfaultfds."""
        n = lib.mpu_pbm_evict(self.header, count, owner, slots.array, len(slots),
                              ffi.NULL if clients is None else clients,
                              0 if clients is None else len(clients), page_size)
        if n == -errno.EAGAIN:
            return 0
        if n < 0:
            # A punch or a write-back that failed for now: the pages stay,
            # dirty ones dirty, and the next round tries again.  (Those a
            # file will never take are dropped: see write_errors.)
            raise EvictionFailed(-n, f"evicting pages: {os.strerror(-n)}")
        return n

    def in_store(self, worker_slot):
        """(slot, generation) of the region whose store a worker reads or
        writes now, or None."""
        slot, gen = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        if not lib.mpu_worker_in_store(self.header, worker_slot, slot, gen):
            return None
        return slot[0], gen[0]

    def region_stalled(self, slot, gen):
        """Whether the region's store hung a worker (see stall_region)."""
        return bool(lib.mpu_region_stalled(self.header, slot, gen))

    def set_in_store(self, worker_slot, slot=0, gen=0):
        """A worker reads or writes the store of region slot (generation
        gen) from now on; gen 0: none."""
        lib.mpu_set_in_store(self.header, worker_slot, slot, gen)

    def stall_region(self, slot, gen, stalled=True):
        """Its store hangs (stalled), or answers again: the region's faults
        on pages not in the buffer get SIGBUS meanwhile, and its write-backs
        fail (EIO).  False if the slot holds another region."""
        return lib.mpu_region_stall(self.header, slot, gen, stalled) == 0

    def seal_region(self, slot, gen, sealed=True):
        """Nobody maps the region, and its last write-back is to follow
        (sealed), or it is mapped again: no page of it becomes dirty
        meanwhile (see mpu_region_seal).  False if the slot holds another
        region."""
        return lib.mpu_region_seal(self.header, slot, gen, sealed) == 0

    def write_errors(self, slot, gen):
        """(How many write-backs of a region had their dirty pages dropped
        by eviction, because the file would not take them (a full disk,
        say); the errno of the last.)"""
        last = ffi.new("int *")
        count = lib.mpu_region_write_errors(self.header, slot, gen, last)
        return count, last[0]

    def write_back(self, slot, slots, clients, first, count, owner, page_size):
        """Write the dirty pages of [first, first + count) of a region to its
        file and sync it: how many pages (or -errno, as the C side says)."""
        return lib.mpu_region_write_back(self.header, slot, ffi.addressof(slots.array[slot]),
                                         clients, len(clients), first, count, owner,
                                         page_size)

    def add_writer(self, slot, gen, client, client_gen, address, length):
        core.check(lib.mpu_writer_add(self.header, slot, gen, client, client_gen, address,
                                      length), "adding a writable mapping")

    def remove_writer(self, client, client_gen, slot=0, gen=0, address=0):
        """Take one mapping's entry out of the writers' table (the client's,
        of region slot/gen at address), or with address 0 all the client's;
        returns the entries taken."""
        return lib.mpu_writer_remove(self.header, client, client_gen, slot, gen, address)

    def recover(self, owner, slots, page_size):
        """Free the pages a dead worker held FILLING or LEAVING."""
        return lib.mpu_pbm_recover(self.header, owner, slots.array, len(slots), page_size)

    def close(self):
        self.header = None
        ffi.release(self._ref)
        self._segment.close()
        os.close(self.fd)


class EvictionFailed(OSError):
    """Pages could not be evicted (their write-back or punch failed); they
    are where they were."""


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


class RegionSlots:
    """What one process tells the C side of the regions it holds, by slot: a
    struct mpu_region_slot array.  An entry is live from ``set`` until
    ``clear``, and must be cleared before the region's descriptors close.
    Owns the descriptors opened beside a region's: the buffered readers a
    filler's C side opens by a direct store, an evictor's direct writer."""

    def __init__(self, count):
        self.array = ffi.new("struct mpu_region_slot[]", count)

    def __len__(self):
        return len(self.array)

    def set(self, region):
        c = self.array[region.slot]
        c.memfd = region.memfd
        c.store_fd = region.store_fd
        c.store_mode = MODE_CODES[region.store_mode]  # files.MODES is MPU_STORE_*'s order
        if c.live:  # the region again (an evictor told its file), or what the slot held
            self._close_beside(c)
        c.cache_fd = c.scan_fd = c.direct_fd = -1
        c.no_cache = 0
        c.scan_end = c.scan_ns = c.sweeps = 0
        c.gen = region.gen
        c.npages = region.npages
        c.size = region.size
        c.map_length = region.map_length
        c.write_fd = region.write_fd
        c.live = 1

    @staticmethod
    def _close_beside(c):
        for fd in (c.cache_fd, c.scan_fd, c.direct_fd):
            if fd >= 0:
                files.close_aside(fd)  # (a close asks the file system)

    def write_directly(self, region):
        """An evictor's: write a direct store's region back with O_DIRECT,
        from a description of its own (write_fd's flags are the client's).
        Where the file system refuses, it is written through the cache."""
        c = self.array[region.slot]
        if c.direct_fd >= 0 or region.write_fd < 0 or region.store_mode != DIRECT:
            return
        try:
            c.direct_fd = files.reopen(region.write_fd, os.O_WRONLY | os.O_DIRECT)
        except OSError:
            pass

    def clear(self, slot):
        """Forget a region; closes the descriptors opened beside its own."""
        c = self.array[slot]
        c.live = 0
        lib.mpu_scan_done(ffi.addressof(c))
        self._close_beside(c)
        c.memfd = c.store_fd = c.cache_fd = c.scan_fd = c.write_fd = c.direct_fd = -1
