"""Filler processes: read a page from the store, UFFDIO_COPY it into the
client that faulted, UFFDIO_WAKE every other client that waits on it.

All faults on one page come to the same filler, in the order the monitors saw
them, so a filler never races itself on a fault; the page-state word guards
against the evictors and against read-ahead by other fillers.

Read-ahead and prefetch fill pages that no client waits for: those are
written straight into the region's memfd, where every client finds them
without a fault.
"""
import errno
import logging
import mmap
import os

from mpumap import core, protocol
from mpumap._core import lib
from mpumap.settings import SYSTEM_PAGE_SIZE
from mpumap.worker import Worker

log = logging.getLogger("mpumap.fillers")

WAIT_MS = 1000  # how long one wait lasts before we look around and wait again
PREFETCH_RUN_BYTES = 1 << 20  # one store read for prefetching covers this much

# A fill whose copy fails with one of these lost its client (it died, or
# unmapped): the page goes back to FREE and the next fault on it fills it.
CLIENT_GONE = (errno.ESRCH, errno.ENOENT, errno.EINVAL, errno.EFAULT, errno.EBADF)


class Filler(Worker):
    role = "filler"

    def __init__(self, sock, params, buffer, evict_fds):
        super().__init__(sock, params, buffer, evict_fds)
        self.read_ahead = params["read_ahead"]
        self.max_run = max(1 + self.read_ahead, PREFETCH_RUN_BYTES // self.page_size, 1)
        # Page aligned, as UFFDIO_COPY and O_DIRECT want it.
        self.chunk = mmap.mmap(-1, self.max_run * self.page_size)
        self.chunk_view = memoryview(self.chunk)
        self.chunk_ptr = core.pointer_to(self.chunk)

    def on_faults(self, data):
        for cid, rid, index, address, read_at in protocol.FAULT.iter_unpack(
                memoryview(data)[1:]):
            client = self.clients.get(cid)
            region = self.regions.get(rid)
            if client is not None and region is not None and index < region.npages:
                self.buffer.add("queue_ns", lib.mpu_now_ns() - read_at)
                self.serve(client, region, index, address, read_at)

    def serve(self, client, region, index, address, read_at):
        uffd, slot = client
        table = region.table
        length = region.fill_length(index)
        # A page in FILLING always holds a buffer page, so that whoever frees
        # it (we, or the supervisor after our death) gives one back: the
        # buffer page comes first.
        while not self.buffer.reserve(self.evict_fds, WAIT_MS):
            log.warning("no buffer page came free in %d ms; waiting on", WAIT_MS)
        while True:
            state = table.begin_fill(index, self.pid, WAIT_MS)
            if state == core.PRESENT:
                self.buffer.release()
                if table.take_flags(index) & lib.MPU_READ_AHEAD:
                    self.buffer.add("readahead_hits")
                if self.wake(uffd, address, length):
                    lib.mpu_account(self.buffer.header, slot, read_at, 0, lib.MPU_ANSWER_WAKE)
                return
            if state == core.FREE:
                break
            log.warning("region %d page %d still %s after %d ms", region.rid, index,
                        core.STATE_NAMES[state], WAIT_MS)
        ahead, _ = self.claim_run(region, index + 1, self.read_ahead)
        present = False
        try:
            got = self.read_run(region, index, 1 + len(ahead))
            whole = self.whole_pages(region, index, 1 + len(ahead), got)
            if whole == 0:
                self.past_the_end(uffd, region, index, address, length, got)
                return
            # The pages ahead go in first: woken, the client goes on to them.
            self.write_run(region, ahead[:whole - 1], 1, lib.MPU_READ_AHEAD,
                           "readahead_fills")
            ahead = ahead[whole - 1:]
            present = self.copy(uffd, region, index, address, length)
            if present:
                lib.mpu_account(self.buffer.header, slot, read_at, length, lib.MPU_ANSWER_COPY)
        finally:
            self.abandon(region, ahead)
            table.end_fill(self.buffer, index, present)
            if not present:
                self.buffer.release()

    def prefetch(self, region, first, count):
        """Fill the FREE pages of [first, first+count) that the buffer has
        room for, in runs of contiguous pages, one store read a run."""
        index, end = first, min(first + count, region.npages)
        while index < end:
            run, full = self.claim_run(region, index, min(self.max_run, end - index))
            if full:
                return  # more would only push out what is there
            if not run:
                index += 1  # there already, or on its way
                continue
            index = run[-1] + 1
            try:
                got = self.read_run(region, run[0], len(run))
                whole = self.whole_pages(region, run[0], len(run), got)
                self.write_run(region, run[:whole], 0, 0, "prefetch_fills")
                run = run[whole:]
            finally:
                self.abandon(region, run)

    # -- runs of pages -------------------------------------------------------

    def claim_run(self, region, start, count):
        """Claim up to count FREE pages from start on, stopping at the first
        that is not FREE or when the buffer has no room.  Returns (pages, full)."""
        pages = []
        for index in range(start, min(start + count, region.npages)):
            if not self.buffer.try_reserve(1):
                return pages, not pages
            if region.table.begin_fill(index, self.pid, 0) != core.FREE:
                self.buffer.release()
                break
            pages.append(index)
        return pages, False

    def read_run(self, region, first, npages):
        view = self.chunk_view[:npages * self.page_size]
        started = lib.mpu_now_ns()
        got = region.store.read_into(view, first * self.page_size)
        self.buffer.add("read_ns", lib.mpu_now_ns() - started)
        self.buffer.add("bytes_read", got)
        return got

    def whole_pages(self, region, first, npages, got):
        """How many pages of a run the store gave all their bytes: fewer than
        the run when the file shrank since it was mapped."""
        for k in range(npages):
            start = (first + k) * self.page_size
            if got < k * self.page_size + min(self.page_size, region.size - start):
                return k
        return npages

    def past_the_end(self, uffd, region, index, address, length, got):
        """The file shrank: this page is (partly) past its new end.  As with a
        mapped file, the client gets the bytes still there and SIGBUS past
        them; pages the buffer holds past the end are dropped."""
        start = index * self.page_size
        log.warning("%s shrank to %d bytes: pages past its end raise SIGBUS",
                    region.name, start + got)
        kept = min(length, -(-got // SYSTEM_PAGE_SIZE) * SYSTEM_PAGE_SIZE)
        if kept < length:
            # Poisoned before the client is woken by the copy below: woken
            # first, it could fault past the end again before the poison.
            err = core.uffd_poison(uffd, address + kept, length - kept, wake=not kept)
            if err and err != errno.EEXIST and err not in CLIENT_GONE:
                # No UFFDIO_POISON (an old kernel, or a client that did not
                # ask for it): zeros, as the file's hole would read, then.
                log.error("UFFDIO_POISON: %s; the client reads zeros past the end",
                          errno.errorcode.get(err, err))
                self.chunk_view[kept:length] = bytes(length - kept)
                kept = length
        if kept:
            self.copy(uffd, region, index, address, kept)
        dropped = 0
        for stale in range(index + 1, region.npages):
            if region.table.evict(stale, self.pid, region.memfd,
                                  stale * self.page_size, self.page_size):
                dropped += 1
        if dropped:
            self.buffer.release(dropped)

    def write_run(self, region, pages, slot, flags, counter):
        """Write claimed pages from the chunk (the first at slot) into the
        memfd and mark them PRESENT; failures go back to FREE."""
        done = 0
        for k, index in enumerate(pages, slot):
            start = k * self.page_size
            piece = self.chunk_view[start:start + region.fill_length(index)]
            try:
                ok = os.pwrite(region.memfd, piece, index * self.page_size) == len(piece)
            except OSError as exc:
                log.error("writing region %d page %d: %s", region.rid, index, exc)
                ok = False
            region.table.end_fill(self.buffer, index, ok, flags)
            if ok:
                done += 1
            else:
                self.buffer.release()
        self.buffer.add(counter, done)

    def abandon(self, region, pages):
        """Give back pages claimed for a run that failed before filling them."""
        for index in pages:
            region.table.end_fill(self.buffer, index, False)
            self.buffer.release()

    # -- answering the client ------------------------------------------------

    def copy(self, uffd, region, index, address, length, offset=0):
        """True once the client has the page (and is woken)."""
        started = lib.mpu_now_ns()
        source = self.chunk_ptr + offset
        err = core.uffd_copy(uffd, address, source, length)
        self.buffer.add("copy_ns", lib.mpu_now_ns() - started)
        if err == errno.EEXIST:
            # The memfd has a page we never filled (our state said FREE): it
            # cannot be trusted.  Punch it out and copy ours in.
            log.warning("region %d page %d was in the buffer unfilled; replacing it",
                        region.rid, index)
            core.punch(region.memfd, index * self.page_size, self.page_size)
            err = core.uffd_copy(uffd, address, source, length)
        if err == 0:
            return True
        self.buffer.add("fill_errors")
        if err not in CLIENT_GONE:
            log.error("UFFDIO_COPY to region %d page %d: %s", region.rid, index,
                      errno.errorcode.get(err, err))
            # Never leave the client waiting: woken, it faults again.
            self.wake(uffd, address, length)
        return False

    def wake(self, uffd, address, length):
        started = lib.mpu_now_ns()
        err = core.uffd_wake(uffd, address, length)
        self.buffer.add("wake_ns", lib.mpu_now_ns() - started)
        if err and err not in CLIENT_GONE:
            log.error("UFFDIO_WAKE at %#x: %s", address, errno.errorcode.get(err, err))
        return err == 0
