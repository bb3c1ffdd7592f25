"""What every worker process is, and how it starts.

As in gunicorn, one object stands for a worker on both sides of the fork:
the arbiter builds it, forks, and keeps it as its record of the child (pid,
channel, start time); in the child the same object turns into the worker
(``init_process``) and never returns to the arbiter's code.

Workers are forked, not exec'd: the pages of the interpreter and of the
modules stay shared with the server, which keeps each worker's own memory to
what it writes.  A new worker keeps only its socket to the server, the
buffer segment and the evictors' wakeup descriptors; it learns the clients
and regions from the server's messages.
"""
import errno
import gc
import logging
import os
import signal
import time

from mpumap import core, protocol
from mpumap._core import ffi, lib
from mpumap.protocol import W
from mpumap.region import Region

log = logging.getLogger("mpumap.worker")

# Fillers' heartbeat words come first in the buffer segment, evictors' after.
HEARTBEAT_BASE = {"filler": 0, "evictor": lib.MPU_MAX_WORKERS}


class Worker:
    """One filler or evictor.

    In the arbiter: its pid, the arbiter's end of its socketpair
    (``channel``, set once forked), when it started and which heartbeat word
    is its.  In the worker process: the regions and clients the server told
    it about (slot -> Region, slot -> userfaultfd), each with descriptors of
    its own, closed when the server says the region or client is gone; the
    clients also as the C side sees them (``client_slots``, a struct
    mpu_client_slot per slot, cleared before the userfaultfd closes).
    """

    role = "worker"

    def __init__(self, index, settings, buffer, evict_fds, parent_pid):
        self.index = index
        self.settings = settings
        self.buffer = buffer
        self.evict_fds = list(evict_fds)
        self.parent_pid = parent_pid
        self.pid = None
        self.channel = None
        self.started = time.monotonic()
        self.restarted = False  # in place of one that died
        self.hung = 0  # when it was killed for giving no sign of life (monotonic ns)
        self.regions = {}
        self.clients = {}
        self.sock = None
        self.log = logging.getLogger(f"mpumap.{self.name}")

    @property
    def name(self):
        return f"{self.role}{self.index}"

    @property
    def heartbeat_slot(self):
        return HEARTBEAT_BASE[self.role] + self.index

    def __str__(self):
        return f"{self.role} {self.index} (pid {self.pid})"

    # -- in the child ----------------------------------------------------------

    def init_process(self, sock):
        """Become the worker, in a freshly forked child; never returns.

        Every descriptor but ours is the supervisor's (its clients' sockets
        and userfaultfds, the regions' memfds, the listening socket and its
        lock): we close them all at once, and never go back to the code that
        owns their Python objects."""
        status = 1
        try:
            self.pid = os.getpid()
            self.sock = sock
            core.leave_server({0, 1, 2, sock.fileno(), self.buffer.fd, *self.evict_fds},
                              self.parent_pid)
            # Ctrl-C reaches the whole process group: the server decides when we stop.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            gc.enable()
            core.set_process_title(f"mpumap-{self.name}",
                                   f"mpumap-server: {self.role} {self.index} "
                                   f"[{self.settings.socket}]")
            self.beat()
            lib.mpu_pbm_set_worker(self.heartbeat_slot)
            self.client_slots = ffi.new("struct mpu_client_slot[]", lib.MPU_CLIENT_SLOTS)
            for slot in self.client_slots:
                slot.uffd = -1
            self.setup()
            self.run()
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            self.log.exception("failed")
        finally:
            os._exit(status)

    def beat(self):
        self.buffer.beat(self.heartbeat_slot)

    def setup(self):
        """What a role prepares in its process before it runs."""

    def run(self):
        while True:
            self.receive()

    def receive(self):
        data, fds = protocol.receive(self.sock)
        if not data:
            self.log.debug("the server closed the connection")
            raise SystemExit(0)
        self.handle(data, fds)

    # -- messages from the server ----------------------------------------------

    def handle(self, data, fds):
        kind = protocol.worker_kind(data)
        if kind == W.ADD_REGION:
            region = Region.attach(data, fds, self.settings.page_size)
            old = self.regions.pop(region.slot, None)
            if old is not None:  # its DROP_REGION never came: the slot is the new one's
                self.region_dropped(old)
                old.close()
            self.regions[region.slot] = region
            self.region_added(region)
        elif kind == W.DROP_REGION:
            _, slot, gen, *_ = protocol.W_REGION.unpack(data)
            region = self.regions.get(slot)
            if region is not None and region.gen == gen:
                del self.regions[slot]
                self.region_dropped(region)
                region.close()
        elif kind == W.ADD_CLIENT:
            _, slot, gen, _ = protocol.W_CLIENT.unpack(data)
            (uffd,) = fds
            old = self.clients.pop(slot, None)
            if old is not None:  # its DROP_CLIENT never came: the slot is the new one's
                os.close(old[1])
            self.clients[slot] = (gen, uffd)
            self.client_slots[slot].gen = gen
            self.client_slots[slot].uffd = uffd
        elif kind == W.DROP_CLIENT:
            _, slot, gen, _ = protocol.W_CLIENT.unpack(data)
            held = self.clients.get(slot)
            if held is not None and held[0] == gen:
                del self.clients[slot]
                self.client_slots[slot].uffd = -1
                os.close(held[1])
        elif kind in (W.PREFETCH, W.READ_AHEAD, W.READ_AROUND, W.READ_BEHIND):
            self.fill(data)
        elif kind == W.WRITE_FD:
            _, slot, gen, *_ = protocol.W_REGION.unpack_from(data)
            region = self.regions.get(slot)
            if region is None or region.gen != gen or len(fds) != 1:
                protocol.close_all(fds)
            else:
                region.set_write_fd(fds[0])
                self.region_added(region)
        elif kind == W.FLUSH:
            self.flush(data)
        else:
            protocol.close_all(fds)
            self.log.error("unknown message %d from the server", kind)

    def region_added(self, region):
        pass

    def region_dropped(self, region):
        pass

    def fill(self, data):
        pass

    def flush(self, data):
        pass


def check_receive(n):
    """The C receive loop's result: the server closed our socket (stop),
    a message cut short (log, go on), or an error (raise)."""
    if n == -errno.EPIPE:
        raise SystemExit(0)
    if n == -errno.EMSGSIZE:
        log.error("a message from the server was cut short")
        return False
    core.check(n, "receiving from the server")
    return True
