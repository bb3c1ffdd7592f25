"""Filler processes: read a page from the store, UFFDIO_COPY it into the
client that faulted, UFFDIO_WAKE every other client that waits on it.

All faults on one page come to the same filler, in the order the monitors saw
them, so a filler never races itself; the page-state word guards against the
evictors."""
import errno
import logging
import mmap

from mpumap import core, protocol
from mpumap.worker import Worker

log = logging.getLogger("mpumap.fillers")

WAIT_MS = 1000  # how long one wait lasts before we look around and wait again

# A fill whose copy fails with one of these lost its client (it died, or
# unmapped): the page goes back to FREE and the next fault on it fills it.
CLIENT_GONE = (errno.ESRCH, errno.ENOENT, errno.EINVAL, errno.EFAULT, errno.EBADF)


class Filler(Worker):
    role = "filler"

    def __init__(self, sock, params, buffer, evict_fds):
        super().__init__(sock, params, buffer, evict_fds)
        # Page aligned, as UFFDIO_COPY and O_DIRECT want it.
        self.page = mmap.mmap(-1, self.page_size)
        self.page_view = memoryview(self.page)
        self.page_ptr = core.pointer_to(self.page)

    def on_faults(self, data):
        for cid, rid, index, address in protocol.FAULT.iter_unpack(memoryview(data)[1:]):
            uffd = self.clients.get(cid)
            region = self.regions.get(rid)
            if uffd is not None and region is not None and index < region.npages:
                self.serve(uffd, region, index, address)

    def serve(self, uffd, region, index, address):
        length = region.fill_length(index)
        while True:
            state = region.table.begin_fill(index, self.pid, WAIT_MS)
            if state == core.PRESENT:
                self.wake(uffd, address, length)
                return
            if state == core.FREE:
                break
            log.warning("region %d page %d still %s after %d ms", region.rid, index,
                        core.STATE_NAMES[state], WAIT_MS)

        while not self.buffer.reserve(self.evict_fds, WAIT_MS):
            log.warning("no buffer page came free in %d ms; waiting on", WAIT_MS)

        present = False
        try:
            present = self.fill(uffd, region, index, address, length)
        finally:
            region.table.end_fill(self.buffer, index, present)
            if not present:
                self.buffer.release()

    def fill(self, uffd, region, index, address, length):
        view = self.page_view[:length]
        got = region.store.read_into(view, index * self.page_size)
        self.buffer.add("bytes_read", got)
        err = core.uffd_copy(uffd, address, self.page_ptr, length)
        if err == errno.EEXIST:
            # The memfd has a page we never filled (our state said FREE): it
            # cannot be trusted.  Punch it out and copy ours in.
            log.warning("region %d page %d was in the buffer unfilled; replacing it",
                        region.rid, index)
            core.punch(region.memfd, index * self.page_size, self.page_size)
            err = core.uffd_copy(uffd, address, self.page_ptr, length)
        if err == 0:
            self.buffer.add("copies")
            return True
        self.buffer.add("fill_errors")
        if err not in CLIENT_GONE:
            log.error("UFFDIO_COPY to region %d page %d: %s", region.rid, index,
                      errno.errorcode.get(err, err))
            # Never leave the client waiting: woken, it faults again.
            self.wake(uffd, address, length)
        return False

    def wake(self, uffd, address, length):
        err = core.uffd_wake(uffd, address, length)
        if err == 0:
            self.buffer.add("wakes")
        elif err not in CLIENT_GONE:
            log.error("UFFDIO_WAKE at %#x: %s", address, errno.errorcode.get(err, err))
