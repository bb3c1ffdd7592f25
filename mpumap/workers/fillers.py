"""Filler processes: read a page from the store, UFFDIO_COPY it into the
client that faulted, UFFDIO_WAKE every other client that waits on it.

Faults on one page come to the same filler, in the order the monitor saw
them, unless that filler is busy (then to a free one); the page-state word
orders fillers on one page, and guards against the evictors.  Read-ahead and
prefetch fill pages no client waits for: those go straight into the region's
memfd, where every client finds them without a fault, copied with UFFDIO_COPY
through a mapping of the filler's own (`--fill-by copy`) or written.

The serving itself is the C core's (c/fastpath.c), once per batch of faults;
this class keeps the C tables of clients and regions in step with the
server's messages, and logs what the C side reports.
"""
import collections
import errno
import logging
import mmap
import os
import socket
import struct

from mpumap import core
from mpumap._core import ffi, lib
from mpumap.logs import Quiet
from mpumap.pbm import RegionSlots
from mpumap.stores import Store, StoreSettings, Stores, scheme_of, shown
from mpumap.stores.files import CALL
from mpumap.stores.reading import StoreReader
from mpumap.workers.base import Worker, check_receive

PREFETCH_RUN_BYTES = 1 << 20  # one store read for prefetching covers this much
STORE_WINDOW_BYTES = Store.window  # the largest read a store's window asks for
QUIET_SECONDS = 10.0  # one log line per kind of event and region this often

EVENTS = {
    lib.MPU_EV_STUCK: (logging.WARNING, "page {page} of {name} is still {state} after 1 s"),
    lib.MPU_EV_NO_ROOM: (logging.WARNING, "no buffer page came free in 1 s; waiting on"),
    lib.MPU_EV_UNFILLED: (logging.WARNING, "page {page} of {name} was in the buffer "
                                           "unfilled: replaced"),
    lib.MPU_EV_COPY_FAILED: (logging.ERROR, "UFFDIO_COPY of page {page} of {name}: {err}"),
    lib.MPU_EV_WAKE_FAILED: (logging.ERROR, "UFFDIO_WAKE on page {page} of {name}: {err}"),
    lib.MPU_EV_STORE_FAILED: (logging.ERROR, "reading page {page} of {name}: {err}; "
                                             "the client gets SIGBUS there"),
    lib.MPU_EV_SHRANK: (logging.WARNING, "{name} shrank to {value} bytes: pages past "
                                         "its end raise SIGBUS"),
    lib.MPU_EV_NO_POISON: (logging.ERROR, "UFFDIO_POISON: {err}; the client reads zeros "
                                          "past the end of {name}"),
    lib.MPU_EV_WRITE_FAILED: (logging.ERROR, "writing page {page} of {name} into the "
                                             "buffer: {err}"),
    lib.MPU_EV_NO_FILL_MAP: (logging.WARNING, "cannot fill {name} through a mapping any "
                                              "more ({err}); writing its buffer pages instead"),
}


def prefetch_run(page_size):
    """Pages of one prefetch run: each goes to one filler, in one read."""
    return max(1, PREFETCH_RUN_BYTES // page_size)


class Filler(Worker):
    """A filler process.

    Owns, besides what every worker holds: the C filler state (struct
    mpu_filler) with its tables of region and client slots, a page-aligned
    chunk to read into, a userfaultfd of its own with, for each region, a
    mapping of the memfd registered with it (made and unmapped by the C
    side as regions come and go), and for objects (regions with no
    descriptor) the stores that read them and the threads that wait on those
    (a StoreReader, made with the first object).
    The C tables point at the descriptors of the regions and clients dicts:
    an entry is cleared before its descriptors are closed.
    """

    role = "filler"

    def setup(self):
        s = self.settings
        run = prefetch_run(s.page_size)
        # A store's windows (Store.window) are read whole: up to 8 MiB.
        max_run = max(1 + s.read_ahead, run, STORE_WINDOW_BYTES // s.page_size)
        # Page aligned, as UFFDIO_COPY and O_DIRECT want it.
        self.chunk = mmap.mmap(-1, max_run * s.page_size)
        self.region_slots = RegionSlots(self.buffer.max_regions)
        self._keep = [core.pointer_to(self.chunk),
                      ffi.new("int[]", self.evict_fds or [-1]),
                      ffi.new("uint32_t[]", max_run)]
        chunk, evict_fds, descs = self._keep
        f = self.c = ffi.new("struct mpu_filler *")
        f.h = self.buffer.header
        f.sock = self.sock.fileno()
        f.evict_fds = evict_fds
        f.nevict = len(self.evict_fds)
        f.pid = self.pid
        f.worker = self.heartbeat_slot
        f.index = self.index
        f.nfillers = s.fillers
        f.system_page = mmap.PAGESIZE
        f.page_size = s.page_size
        f.read_ahead = s.read_ahead
        f.fill_uffd = self._fill_uffd() if s.fill_by == "copy" else -1
        self.stores = Stores(s.stores, StoreSettings(s.store_timeout, s.store_requests))
        self.objects = {}  # region slot -> (store, its row of counters), or the OSError
        self.store_reader = None
        self._read_store = ffi.callback("mpu_read_store", self.read_store, error=-errno.EIO,
                                        onerror=self._read_store_failed)
        f.read_store = self._read_store
        f.spinner.spin_ns = s.spin_us * 1000
        f.chunk = ffi.cast("char *", chunk)
        f.descs = descs
        f.max_run = max_run
        f.regions = self.region_slots.array
        f.nregions = len(self.region_slots)
        f.clients = self.client_slots
        f.nclients = lib.MPU_CLIENT_SLOTS
        for leftover in f.leftovers:
            leftover.fd = -1
        self.fills = collections.deque()  # prefetch and read-ahead, in order
        self.quiet = Quiet(self.log, QUIET_SECONDS)  # by (event, region slot)
        # Idle, the C loop wakes this often to beat its heartbeat and drop
        # what the kernel read ahead past a scan that stopped.
        seconds = min(0.25, s.worker_timeout / 4)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                             struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))

    def region_added(self, region):
        if region.store_mode == CALL:
            try:
                store = self.stores.for_url(region.url)
            except OSError as exc:
                self.log.error("%s: %s", shown(region.url), exc.strerror)
                self.objects[region.slot] = exc  # each read fails with it
            else:
                self.objects[region.slot] = (store, self.stores.index(scheme_of(region.url)))
        slot = ffi.addressof(self.region_slots.array[region.slot])
        if slot.live:  # what the slot held goes first: its mapping with it
            lib.mpu_filler_region_gone(self.c, slot)
        self.region_slots.set(region)
        err = lib.mpu_filler_region_added(self.c, slot)
        if err:
            self.log.warning("%s: cannot fill it through a mapping (%s); writing its "
                             "buffer pages instead", region.name, os.strerror(-err))

    def _fill_uffd(self):
        """A userfaultfd of the filler's own, with which it fills pages no
        client waits for (mpu_filler_region_added); -1 where none can be
        had, and the filler writes them into the memfd instead."""
        try:
            fd, _ = core.uffd_open()
        except OSError as exc:
            self.log.warning("no userfaultfd of its own (%s): read-ahead is written "
                             "into the buffer instead", exc.strerror)
            return -1
        self._keep.append(fd)  # for the life of the process
        return fd

    def region_dropped(self, region):
        lib.mpu_filler_region_gone(self.c, ffi.addressof(self.region_slots.array[region.slot]))
        self.region_slots.clear(region.slot)
        self.objects.pop(region.slot, None)

    def read_store(self, slot, offset, buf, length):
        """The C loop's read of an object (mpu_read_store): the bytes read,
        or -errno once the store failed for good (the C side then answers
        with SIGBUS)."""
        region = self.regions.get(slot)
        entry = self.objects.get(slot)
        if region is None or entry is None:
            return -errno.ESTALE
        if isinstance(entry, OSError):
            return -(entry.errno or errno.EIO)
        store, row = entry
        # The C side reads whole umap pages; the object ends where it ends.
        asked = min(length, region.size - offset)
        if asked <= 0:
            return 0
        if self.store_reader is None:
            s = self.settings
            self.store_reader = StoreReader(self.buffer.header, self.beat, s.store_timeout,
                                            s.store_retries, s.store_requests)
        try:
            return self.store_reader.read(store, row, region.url, region.identity, offset,
                                          asked, ffi.buffer(buf, asked), whole=True)
        except OSError as exc:
            self.quiet.say(("store", slot), logging.ERROR, "reading %s at %d: %s",
                           shown(region.url), offset, exc.strerror or exc)
            return -(exc.errno or errno.EIO)

    def _read_store_failed(self, exc_type, exc, tb):
        self.log.error("reading an object failed", exc_info=(exc_type, exc, tb))

    def run(self):
        """Fault packets are served inside the C loop; it comes back to us for
        everything else, and when it has something to log.  Fills (prefetch,
        read-ahead) go on between messages: a fill stops for any message
        that waits, and goes on once that is taken."""
        size = 1 << 16
        buf = ffi.new("char[]", size)
        fds = ffi.new("int[]", 16)
        nfds = ffi.new("int *")
        sock = self.sock.fileno()
        while True:
            if self.fills:
                if not lib.mpu_filler_fill(self.c, self.fills[0]):
                    self.fills.popleft()
                self.log_events()
                if not self.waiting():
                    continue
            n = lib.mpu_filler_run(self.c, sock, buf, size, fds, nfds, 16)
            if n == 0:
                self.log_events()
            elif check_receive(n):
                self.handle(ffi.buffer(buf, n)[:], list(fds[0:nfds[0]]))

    def waiting(self):
        """Whether a message waits on our socket."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False
        except OSError:
            return True  # the receive loop says what

    def fill(self, data):
        fill = ffi.new("struct mpu_w_fill *")
        ffi.memmove(fill, data, ffi.sizeof(fill[0]))
        self.fills.append(fill)

    def log_events(self):
        """Log what the C side reported: each kind of event once per
        QUIET_SECONDS and region at most, with a count of the rest, so that
        a client that faults on a broken file again and again cannot fill
        the log."""
        c = self.c
        for event in c.events[0:c.nevents]:
            level, text = EVENTS.get(event.code, (logging.ERROR, "event {code}"))
            region = self.regions.get(event.region)
            self.quiet.say((event.code, event.region), level, "%s", text.format(
                code=event.code, page=event.page, value=event.value,
                name=region.name if region else f"region slot {event.region}",
                err=errno.errorcode.get(event.err, event.err),
                state=core.STATE_NAMES.get(event.value, event.value)))
        if c.lost:
            self.log.warning("%d more events like these were not logged", c.lost)
            self.buffer.add("events_lost", c.lost)
        c.nevents = c.lost = 0
