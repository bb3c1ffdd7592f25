"""Fault monitors: one per client, in the server's parent process.

A monitor reads its client's userfaultfd, turns each fault address (a CVA)
into (region, umap page), and hands it to the filler that owns that page, so
that every fault on one page is served by one filler, in order.
"""
import bisect
import logging
import time

from mpumap import core, protocol
from mpumap.settings import SYSTEM_PAGE_SIZE

log = logging.getLogger("mpumap.monitor")

MAX_FAULTS_PER_MESSAGE = 2048


def filler_for(rid, index, nfillers):
    """The filler that serves every fault on this page (Fibonacci hashing
    spreads neighbouring pages of one region over the fillers)."""
    return ((rid * 0x9E3779B1) ^ index) % nfillers


class Monitor:
    def __init__(self, cid, uffd, page_size, nfillers, reader):
        self.cid = cid
        self.uffd = uffd
        self.page_size = page_size
        self.nfillers = nfillers
        self.reader = reader
        self._starts = []  # sorted CVAs
        self._ranges = []  # (start, end, region id) in the same order

    def add(self, start, length, rid):
        i = bisect.bisect(self._starts, start)
        self._starts.insert(i, start)
        self._ranges.insert(i, (start, start + length, rid))

    def remove(self, start):
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start:
            del self._starts[i]
            del self._ranges[i]

    def drain(self):
        """Read every pending fault; return ({filler index: [faults]}, count)."""
        batches = {}
        count = 0
        while True:
            addresses = self.reader.read(self.uffd)
            if not addresses:
                return batches, count
            now = time.monotonic_ns()
            count += len(addresses)
            for address in addresses:
                fault = self.locate(address)
                if fault is None:
                    # Not (or no longer) a mapping we serve: waking it lets the
                    # kernel retry, so the thread never hangs on us.
                    page = address - address % SYSTEM_PAGE_SIZE
                    core.uffd_wake(self.uffd, page, SYSTEM_PAGE_SIZE)
                    continue
                rid, index, dst = fault
                batches.setdefault(filler_for(rid, index, self.nfillers), []).append(
                    protocol.FAULT.pack(self.cid, rid, index, dst, now))

    def locate(self, address):
        i = bisect.bisect(self._starts, address) - 1
        if i < 0:
            return None
        start, end, rid = self._ranges[i]
        if address >= end:
            return None
        index = (address - start) // self.page_size
        return rid, index, start + index * self.page_size


def fault_messages(faults):
    """Pack faults for one filler into as few messages as the socket takes."""
    for i in range(0, len(faults), MAX_FAULTS_PER_MESSAGE):
        yield bytes([protocol.W_FAULTS]) + b"".join(faults[i:i + MAX_FAULTS_PER_MESSAGE])
