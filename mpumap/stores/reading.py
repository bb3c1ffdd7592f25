"""How a filler reads a Python store: requests in flight, timeouts, retries,
and the counters `mpumap top` shows per store."""
import concurrent.futures
import dataclasses
import errno
import random
import time

from mpumap._core import ffi, lib
from mpumap.stores import FINAL

PART_BYTES = 1 << 20  # a read larger than this goes as parts, in parallel
BACKOFF_FIRST = 0.1  # seconds before the first retry; doubles, up to ...
BACKOFF_MOST = 2.0
POLL_SECONDS = 0.1  # the waiting thread beats the heartbeat this often


def as_oserror(exc):
    """What a store raised, as an OSError with an errno (EIO when it had
    none: an unknown failure is worth another try)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc
    if isinstance(exc, TimeoutError):
        return OSError(errno.ETIMEDOUT, str(exc) or "timed out")
    return OSError(errno.EIO, f"{type(exc).__name__}: {exc}")


@dataclasses.dataclass
class _Part:
    offset: int
    length: int
    tries: int = 0
    future: concurrent.futures.Future = None
    started: float = 0.0
    retry_at: float = 0.0
    data: object = None


class StoreReader:
    """Reads store objects for one filler process.

    Owns a pool of `requests` threads.  A read larger than PART_BYTES goes
    as parts, one request each, in parallel; each request is tried up to
    1 + `retries` times, each try given `timeout` seconds, with a backoff
    between tries.  The calling thread waits, beating the filler's
    heartbeat (`beat`), so that a slow store never looks like a hung
    filler.

    Invariant: only the data of tries that finished in time and were not
    given up reach the caller's buffer, and only once every part is in: a
    try abandoned after its timeout may still finish in its thread, and
    its bytes are dropped.
    """

    def __init__(self, header, beat, timeout=30.0, retries=3, requests=8):
        self.header = header
        self.beat = beat
        self.timeout = timeout
        self.retries = retries
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=requests, thread_name_prefix="store")
        self.requests = requests

    def read(self, store, row, url, identity, offset, length, into, whole=False):
        """Reads [offset, offset + length) of the object into `into` (a
        writable buffer of `length` bytes); returns the bytes read, fewer
        only where the object ends (`whole`: the object holds them all, and
        a part that comes back short is a failure, tried again).  Raises
        OSError once a part failed for good.  `row` is the store's row of
        counters."""
        count = max(1, min(self.requests, -(-length // PART_BYTES)))
        size = -(-length // count)
        parts = [_Part(start, min(size, offset + length - start))
                 for start in range(offset, offset + length, size)]
        for part in parts:
            self._try(store, url, identity, part)
        try:
            self._wait(store, row, url, identity, parts, whole)
        except BaseException:
            for part in parts:
                if part.future is not None:
                    part.future.cancel()
            raise
        got = 0
        view = memoryview(into).cast("B")
        for part in parts:
            n = len(part.data)
            view[part.offset - offset:part.offset - offset + n] = part.data
            got += n
            if n < part.length:
                break  # the object ends here
        self._add(row, "bytes", got)
        return got

    def _try(self, store, url, identity, part):
        part.tries += 1
        part.started = time.monotonic()
        part.future = self.pool.submit(store.read, url, identity, part.offset, part.length)

    def _wait(self, store, row, url, identity, parts, whole):
        waiting = list(parts)
        while waiting:
            running = [p.future for p in waiting if p.future is not None]
            if running:
                concurrent.futures.wait(running, timeout=POLL_SECONDS,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            else:
                time.sleep(min(POLL_SECONDS, max(0.0, min(p.retry_at for p in waiting)
                                                 - time.monotonic())))
            self.beat()
            now = time.monotonic()
            for part in list(waiting):
                error = None
                if part.future is None:
                    if now >= part.retry_at:
                        self._try(store, url, identity, part)
                    continue
                if part.future.done():
                    try:
                        part.data = part.future.result()
                        if len(part.data) > part.length or (
                                whole and len(part.data) < part.length):
                            raise OSError(errno.EIO, f"the store answered {len(part.data)} "
                                          f"bytes for {part.length}")
                    except Exception as exc:
                        error = as_oserror(exc)
                    else:
                        self._latency(row, now - part.started)
                        self._add(row, "requests", 1)
                        waiting.remove(part)
                        continue
                elif now - part.started > self.timeout:
                    part.future.cancel()  # if it never started; else it runs out alone
                    error = OSError(errno.ETIMEDOUT, f"no answer in {self.timeout:g} s")
                else:
                    continue
                if error.errno in FINAL or part.tries > self.retries:
                    self._add(row, "errors", 1)
                    raise error
                self._add(row, "retries", 1)
                part.future = None
                backoff = min(BACKOFF_MOST, BACKOFF_FIRST * 2 ** (part.tries - 1))
                part.retry_at = now + backoff * random.uniform(0.8, 1.2)

    def _add(self, row, counter, n):
        lib.mpu_add64(ffi.addressof(self.header.stores[row], counter), n)

    def _latency(self, row, seconds):
        bucket = lib.mpu_latency_bucket(int(seconds * 1e9))
        lib.mpu_add64(ffi.addressof(self.header.stores[row].latency, bucket), 1)

    def close(self):
        # Requests that hang are left to the process's end, not waited for.
        self.pool.shutdown(wait=False, cancel_futures=True)
