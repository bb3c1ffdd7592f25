"""Flushes under way: what the server asked an evictor to write back, and
who waits for it.

A region's dirty pages are written back by evictors: as they evict, on
their own, and when the server asks (a client's flush, the last unmap of a
file that was mapped for writing, the server's exit).  Each such request
goes to one evictor, the region's (slot modulo the evictors), which writes
the dirty pages of the span, syncs the file and answers with the request's
token.
"""
import errno
import itertools
import logging

from mpumap import protocol
from mpumap.protocol import W

log = logging.getLogger("mpumap.server")


class Flush:
    __slots__ = ("region", "first", "count", "then", "evictor")

    def __init__(self, region, first, count, then, evictor):
        self.region, self.first, self.count = region, first, count
        self.then, self.evictor = then, evictor


class WriteBack:
    """The flushes asked of evictors and not answered yet, by token.

    Invariant: every pending flush is either in its evictor's socket (or
    channel backlog), or waits for that evictor to be started again: an
    evictor that dies takes the flushes it had with it, and they go again
    to its successor (the pages it was writing are DIRTY again by then, its
    recovery saw to that), so no waiter waits for an answer that cannot
    come.
    """

    def __init__(self, post, evictors):
        self._post = post  # (evictor index, data) -> False when it is not running
        self._evictors = evictors
        self._tokens = itertools.count(1)
        self.pending = {}
        self.stopped = False  # the evictors are gone: nothing can be written back now

    def flush(self, region, first, count, then):
        """Ask for [first, first + count) of a region to be written back and
        synced; then(result) runs with the pages written, or -errno."""
        if self.stopped:
            then(-errno.ECANCELED)
            return
        token = next(self._tokens)
        flush = Flush(region, first, count, then, region.slot % self._evictors)
        self.pending[token] = flush
        self._send(token, flush)

    def _send(self, token, flush):
        data = protocol.W_FLUSH.pack(W.FLUSH, flush.region.slot, flush.region.gen, 0,
                                     flush.first, flush.count, token, 0)
        self._post(flush.evictor, data)

    def answered(self, data):
        """An evictor's FLUSHED."""
        try:
            kind, _, _, _, _, _, token, result = protocol.W_FLUSH.unpack(data)
        except Exception:
            log.error("a worker sent a message of %d bytes that is no FLUSHED", len(data))
            return
        flush = self.pending.pop(token, None) if kind == W.FLUSHED else None
        if flush is None:
            return
        flush.then(result)  # (a failure is the evictor's to log)

    def evictor_started(self, index):
        """An evictor (re)started, after what it must know of regions and
        clients: the flushes that were its go to it now."""
        for token, flush in list(self.pending.items()):
            if flush.evictor == index:
                self._send(token, flush)

    def evictor_gone(self, index):
        """An evictor went while the server stops: nobody will write back
        what it was asked."""
        for token, flush in list(self.pending.items()):
            if flush.evictor == index:
                del self.pending[token]
                flush.then(-errno.ECANCELED)

    def abandon(self):
        """The server stops without waiting any longer."""
        for flush in self.pending.values():
            flush.then(-errno.ECANCELED)
        self.pending.clear()
