"""Evictor processes: keep the buffer's used pages between the watermarks,
oldest fill first, and (evictor 0) size the buffer to the machine.

A page is evicted by punching it out of its region's memfd (fallocate
PUNCH_HOLE, which is what MADV_REMOVE does on a mapping): the kernel drops it
from every client's page tables, and their next touch faults again.  A dirty
page is written to its file first; evictors also write back what the server
asks them to flush (a client's flush, the last unmap of a file, the server's
exit).
"""
import errno
import logging
import os
import selectors
import time

from mpumap import protocol
from mpumap.logs import Quiet
from mpumap.pbm import EvictionFailed, RegionSlots
from mpumap.protocol import W
from mpumap.sizing import sizing_now
from mpumap.workers.base import Worker

IDLE_SECONDS = 1.0
# Between re-sizings, an adaptive buffer's evictor looks this often whether
# the memory left to it went down by more than a quarter of the reserve: a
# program beside it that grows fast (256 MiB/s) would eat the reserve, and
# then the cgroup's OOM killer would come, before the next interval.
WATCH_SECONDS = 0.05


class Evictor(Worker):
    """An evictor process.

    Owns, besides what every worker holds: the memfds of the regions, as
    the C side sees them (RegionSlots), its eventfd (fillers write it when
    they want room), and for evictor 0 of an adaptive buffer the buffer's
    limit, re-evaluated on a deadline whatever else it is doing, and
    lowered at once when the memory left to it went down by more than a
    quarter of the reserve.
    """

    role = "evictor"

    def setup(self):
        s = self.settings
        self.wakeup = self.evict_fds[self.index]
        self.region_slots = RegionSlots(self.buffer.max_regions)
        self.adapts = s.adaptive and self.index == 0
        self.next_adapt = time.monotonic() + s.adapt_interval
        self.next_watch = time.monotonic() + WATCH_SECONDS
        # Asleep, it still wakes this often to beat its heartbeat.
        self.idle = min(IDLE_SECONDS, s.worker_timeout / 4)
        self.quiet = Quiet(self.log, 60.0)  # failures: a line a minute of each

    def run(self):
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, self.receive)
        selector.register(self.wakeup, selectors.EVENT_READ, self.evict_on_request)
        while True:
            timeout = self.idle
            if self.adapts:
                timeout = max(0.0, min(timeout, self.next_adapt - time.monotonic(),
                                       self.next_watch - time.monotonic()))
            for key, _ in selector.select(timeout):
                key.data()
            self.beat()
            # On deadlines, not when the loop is idle: under steady faulting
            # the evictors are woken more often than the interval, and the
            # limit must follow the memory all the same.
            now = time.monotonic()
            if self.adapts and now >= self.next_adapt:
                self.adapt()
                self.next_adapt = now + self.settings.adapt_interval
                self.next_watch = now + WATCH_SECONDS
            elif self.adapts and now >= self.next_watch:
                if self.buffer.used:  # (an empty buffer has nothing to give back)
                    self.adapt(shrink_only=True)
                self.next_watch = now + WATCH_SECONDS
            self.evict()

    def evict_on_request(self):
        try:
            os.eventfd_read(self.wakeup)
        except BlockingIOError:
            pass  # another evictor took this wakeup

    def adapt(self, shrink_only=False):
        """Size the buffer to the memory there is; between intervals
        (shrink_only), only when it must shrink by more than a quarter of the
        reserve: smaller moves wait for the interval, so that the limit (and
        with it the watermarks) does not jitter with every reading."""
        s = self.settings
        limit, reserve = sizing_now(self.buffer, s)
        if shrink_only and self.buffer.limit - limit <= reserve // 4:
            return
        if limit != self.buffer.limit:
            self.log.info("buffer limit %d -> %d pages", self.buffer.limit, limit)
            self.buffer.set_limit(limit, s.high_water, s.low_water)

    def region_added(self, region):
        region.drop_store()
        self.region_slots.set(region)
        # Opening the file again asks its store: it may hang there, and a
        # store that hung a worker is not asked (the file's own descriptor
        # writes, once the store is tried again).
        if self.buffer.region_stalled(region.slot, region.gen):
            return
        self.buffer.set_in_store(self.heartbeat_slot, region.slot, region.gen)
        self.region_slots.write_directly(region)
        self.buffer.set_in_store(self.heartbeat_slot)

    def region_dropped(self, region):
        self.region_slots.clear(region.slot)

    def flush(self, data):
        """Write back what the server asked, and tell it: the only message
        a worker sends.  A region we do not hold has nothing of ours to
        write (-ESTALE)."""
        _, slot, gen, _, first, count, token, _ = protocol.W_FLUSH.unpack_from(data)
        region = self.regions.get(slot)
        if region is None or region.gen != gen:
            result = -errno.ESTALE
        else:
            # (Every writer's client came before: the server tells a
            # client's userfaultfd to every worker at its HELLO.)
            result = self.buffer.write_back(slot, self.region_slots, self.client_slots,
                                            first, count, self.pid, self.settings.page_size)
            self.beat()
            if result < 0:  # (a release the file refuses is tried every few seconds)
                self.quiet.say(("flush", slot, gen, result), logging.ERROR, "writing back %s: %s",
                               region.name, os.strerror(-result))
        self.sock.send(protocol.W_FLUSH.pack(W.FLUSHED, slot, gen, 0, first, count, token,
                                             result))
    def evict(self):
        """Bring used pages down to the low watermark once they reach the high
        one, or once a filler asked.  Victims come from the head of the
        shared FIFO of PRESENT pages, oldest fill first, however many
        evictors take from it; each takes its share of the excess."""
        h = self.buffer.header
        while True:
            used = self.buffer.used
            if used < h.high and not h.evict_wanted:
                return
            self.buffer.clear_evict_request()
            excess = used - h.low
            if excess <= 0:
                return
            share = -(-excess // self.settings.evictors)
            lost = self.buffer.counter("lost_writes")
            try:
                evicted = self.buffer.evict(share, self.pid, self.region_slots,
                                            self.settings.page_size, self.client_slots)
            except EvictionFailed as exc:
                self.quiet.say("evict", logging.ERROR, "%s; dirty pages stay in the buffer "
                               "until they can be written", exc.strerror)
                return
            dropped = self.buffer.counter("lost_writes") - lost
            if dropped:
                self.log.error("%d dirty pages dropped: their file would not take them (a "
                               "full disk, a quota, an I/O error); its next flush or unmap "
                               "says which error", dropped)
            # 0: nothing to take, or the oldest page is of a region whose
            # message waits on our socket: the loop reads it first.
            if evicted == 0:
                return
            self.beat()
