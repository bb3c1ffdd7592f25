"""Evictor processes: keep the buffer's used pages between the watermarks,
oldest fill first, and (evictor 0) size the buffer to the machine.

A page is evicted by punching it out of its region's memfd (fallocate
PUNCH_HOLE, which is what MADV_REMOVE does on a mapping): the kernel drops it
from every client's page tables, and their next touch faults again.
"""
import heapq
import logging
import os
import selectors

import psutil

from mpumap.settings import adaptive_limit
from mpumap.worker import Worker

log = logging.getLogger("mpumap.evictor")

RELEASE_BATCH = 16  # give pages back to waiting fillers this often
IDLE_SECONDS = 1.0


def cgroup_memory(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """(limit, usage) of the memory cgroup that binds this process tightest,
    or None where no limit applies.

    A limit holds along the whole path, so the cgroup with the least room on
    the way to the root counts.  Knows cgroup v2 (memory.max) and v1
    (memory.limit_in_bytes).
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = (
                os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(base, *parts[:depth])
            limit = _read_number(os.path.join(folder, limit_file))
            usage = _read_number(os.path.join(folder, usage_file))
            if limit is not None and usage is not None and limit < 1 << 60:
                found.append((limit - usage, limit, usage))
    return min(found)[1:] if found else None


def _read_number(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def machine_limit(buffer, settings):
    """The adaptive buffer size in pages, now."""
    memory = psutil.virtual_memory()
    return adaptive_limit(
        used_pages=buffer.used,
        page_size=settings["page_size"],
        available=memory.available,
        total=memory.total,
        cgroup=cgroup_memory(),
        reserve=settings["memory_reserve"],
        minimum=settings["min_buffer_pages"],
    )


class Evictor(Worker):
    role = "evictor"

    def __init__(self, sock, params, buffer, evict_fds):
        super().__init__(sock, params, buffer, evict_fds)
        self.wakeup = self.evict_fds[self.index]
        self.adapts = params["adaptive"] and self.index == 0
        self.interval = params["adapt_interval"] if self.adapts else IDLE_SECONDS

    def run(self):
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, self.receive)
        selector.register(self.wakeup, selectors.EVENT_READ, self.evict_on_request)
        while True:
            events = selector.select(self.interval)
            for key, _ in events:
                key.data()
            if not events and self.adapts:
                self.adapt()
            self.evict()

    def evict_on_request(self):
        try:
            os.eventfd_read(self.wakeup)
        except BlockingIOError:
            pass  # another evictor took this wakeup

    def adapt(self):
        limit = machine_limit(self.buffer, self.params)
        if limit != self.buffer.limit:
            log.info("buffer limit %d -> %d pages", self.buffer.limit, limit)
            self.buffer.set_limit(limit, self.params["high_water"], self.params["low_water"])

    def evict(self):
        """Bring used pages down to the low watermark once they reach the high
        one, or once a filler asked; our share is the pages whose index falls
        to this evictor."""
        h = self.buffer.header
        while True:
            used = self.buffer.used
            if used < h.high and not h.evict_wanted:
                return
            self.buffer.clear_evict_request()
            excess = used - h.low
            if excess <= 0:
                return
            share = -(-excess // self.nevictors)
            if self.evict_oldest(share) == 0:
                return

    def evict_oldest(self, count):
        candidates = []
        for region in self.regions.values():
            for stamp, index in region.table.oldest(count, self.nevictors, self.index):
                candidates.append((stamp, index, region))
        victims = heapq.nsmallest(count, candidates, key=lambda c: c[0])
        evicted = pending = 0
        for _, index, region in victims:
            offset = index * self.page_size
            if region.table.evict(index, self.pid, region.memfd, offset, self.page_size):
                pending += 1
            if pending == RELEASE_BATCH:
                evicted += self._give_back(pending)
                pending = 0
        return evicted + self._give_back(pending)

    def _give_back(self, count):
        if count:
            self.buffer.release(count)
            self.buffer.add("evictions", count)
        return count
