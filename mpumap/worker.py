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
from mpumap.store import MODES, FileStore

log = logging.getLogger("mpumap.worker")


def round_up(n, multiple):
    return -(-n // multiple) * multiple


class Region:
    """A worker's view of one region: its buffer memfd, store and page table."""

    def __init__(self, rid, size, npages, page_size, memfd, store_fd, table_fd, mode):
        self.rid = rid
        try:
            self.name = os.readlink(f"/proc/self/fd/{store_fd}")
        except OSError:
            self.name = f"region {rid}"
        self.size = size
        self.npages = npages
        self.page_size = page_size
        self.memfd = memfd
        # Clients map the file's size rounded to system pages: a fill of the
        # last umap page must stop where their mapping does.
        self.map_length = round_up(size, SYSTEM_PAGE_SIZE)
        self.store = FileStore(store_fd, size, mode)
        self.table = PageTable.attach(table_fd, npages)

    def fill_length(self, index):
        return min(self.page_size, self.map_length - index * self.page_size)

    def close(self):
        self.table.close()
        self.store.close()
        os.close(self.memfd)


class Worker:
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
        self.regions = {}
        self.clients = {}

    # -- messages from the server ------------------------------------------

    def handle(self, data, fds):
        kind = data[0]
        if kind == protocol.W_FAULTS:
            self.on_faults(data)
        elif kind == protocol.W_ADD_REGION:
            _, rid, size, npages, mode = protocol.REGION_BODY.unpack(data)
            memfd, store_fd, table_fd = fds
            self.regions[rid] = Region(
                rid, size, npages, self.page_size, memfd, store_fd, table_fd, MODES[mode]
            )
        elif kind == protocol.W_PREFETCH:
            _, rid, first, count = protocol.PREFETCH_BODY.unpack(data)
            region = self.regions.get(rid)
            if region is not None:
                self.prefetch(region, first, count)
        elif kind == protocol.W_DROP_REGION:
            _, rid = protocol.W_ID.unpack(data)
            region = self.regions.pop(rid, None)
            if region:
                region.close()
        elif kind == protocol.W_ADD_CLIENT:
            _, cid, slot = protocol.ADD_CLIENT_BODY.unpack(data)
            self.clients[cid] = (fds[0], slot)
        elif kind == protocol.W_DROP_CLIENT:
            _, cid = protocol.W_ID.unpack(data)
            client = self.clients.pop(cid, None)
            if client is not None:
                os.close(client[0])
        else:
            protocol.close_all(fds)
            log.error("%s %d: unknown message %d from the server", self.role, self.index, kind)

    def on_faults(self, data):
        pass

    def prefetch(self, region, first, count):
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
