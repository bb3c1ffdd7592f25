"""What fillers and evictors share: start-up, and the regions and clients the
server tells them about.

Workers are forked from the server: the pages of the interpreter and of the
modules stay shared with it, which keeps each worker's own memory to what it
writes.  A new worker keeps only its socket to the server, the buffer segment
and the evictors' wakeup descriptors; it learns the rest from messages."""
import gc
import logging
import os
import signal

from mpumap import core, protocol
from mpumap.pbm import PageTable
from mpumap.settings import SYSTEM_PAGE_SIZE

log = logging.getLogger("mpumap.worker")


def round_up(n, multiple):
    return -(-n // multiple) * multiple


class Region:
    """A worker's view of one region: its buffer memfd, store and page table."""

    def __init__(self, rid, slot, size, npages, memfd, store_fd, table_fd, mode):
        self.rid = rid
        self.slot = slot
        self.size = size
        self.npages = npages
        self.memfd = memfd
        self.store_fd = store_fd
        self.mode = mode
        # Clients map the file's size rounded to system pages: a fill of the
        # last umap page must stop where their mapping does.
        self.map_length = round_up(size, SYSTEM_PAGE_SIZE)
        self.table = PageTable.attach(table_fd, npages)

    @property
    def name(self):
        try:
            return os.readlink(f"/proc/self/fd/{self.store_fd}")
        except OSError:
            return f"region {self.rid}"

    def close(self):
        self.table.close()
        os.close(self.store_fd)
        os.close(self.memfd)


class Worker:
    """The messages every worker takes from the server; the hooks below are
    for what a role does with them."""

    role = "worker"

    def __init__(self, sock, params, buffer, evict_fds):
        self.sock = sock
        self.index = params["index"]
        self.page_size = params["page_size"]
        self.nfillers = params["fillers"]
        self.nevictors = params["evictors"]
        self.params = params
        self.pid = os.getpid()
        self.buffer = buffer
        self.evict_fds = list(evict_fds)
        self.regions = {}  # slot -> Region
        self.clients = {}  # slot -> userfaultfd

    # -- messages from the server ------------------------------------------

    def handle(self, data, fds):
        kind = data[0]
        if kind == protocol.W_FAULTS:
            self.on_faults(data)
        elif kind == protocol.W_ADD_REGION:
            _, rid, slot, size, npages, mode = protocol.REGION_BODY.unpack(data)
            memfd, store_fd, table_fd = fds
            region = Region(rid, slot, size, npages, memfd, store_fd, table_fd, mode)
            self.regions[slot] = region
            self.region_added(region)
        elif kind in (protocol.W_PREFETCH, protocol.W_READ_AHEAD):
            _, slot, first, count = protocol.PREFETCH_BODY.unpack(data)
            self.prefetch(slot, first, count, kind == protocol.W_READ_AHEAD)
        elif kind == protocol.W_DROP_REGION:
            _, slot = protocol.W_ID.unpack(data)
            region = self.regions.pop(slot, None)
            if region:
                self.region_dropped(region)
                region.close()
        elif kind == protocol.W_ADD_CLIENT:
            _, cid, slot = protocol.ADD_CLIENT_BODY.unpack(data)
            self.clients[slot] = fds[0]
            self.client_added(slot, fds[0])
        elif kind == protocol.W_DROP_CLIENT:
            _, slot = protocol.W_ID.unpack(data)
            fd = self.clients.pop(slot, None)
            if fd is not None:
                self.client_dropped(slot)
                os.close(fd)
        else:
            protocol.close_all(fds)
            log.error("%s %d: unknown message %d from the server", self.role, self.index, kind)

    def region_added(self, region):
        pass

    def region_dropped(self, region):
        pass

    def client_added(self, slot, uffd):
        pass

    def client_dropped(self, slot):
        pass

    def on_faults(self, data):
        pass

    def prefetch(self, slot, first, count, read_ahead=False):
        pass

    def receive(self):
        data, fds = protocol.receive(self.sock)
        if not data:
            log.debug("%s %d: the server closed the connection", self.role, self.index)
            raise SystemExit(0)
        self.handle(data, fds)

    def run(self):
        while True:
            self.receive()


def become_worker(cls, sock, params, buffer, evict_fds, parent):
    """Turn a freshly forked child of the server into a worker; never returns.

    Every descriptor but ours is the supervisor's (its clients' sockets and
    userfaultfds, the regions' memfds): we close them all at once, and never
    go back to the code that owns their Python objects."""
    status = 1
    try:
        keep = {0, 1, 2, sock.fileno(), buffer.fd, *evict_fds}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C reaches the whole process group: the server decides when we stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        gc.enable()
        core.die_with_parent(parent)
        core.set_process_name(f"mpumap-{params['role']}{params['index']}")
        cls(sock, params, buffer, evict_fds).run()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("%s %d failed", params["role"], params["index"])
    finally:
        os._exit(status)
