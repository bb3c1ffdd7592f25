"""What fillers and evictors share: start-up, and the regions and clients the
server tells them about.  ``python -m mpumap.worker ROLE INDEX PARENT_PID``
runs one worker, talking to the server on descriptor 3."""
import json
import logging
import os
import signal
import socket
import sys

from mpumap import core, protocol
from mpumap.pbm import PageBuffer, PageTable
from mpumap.settings import SYSTEM_PAGE_SIZE
from mpumap.store import FileStore

CONTROL_FD = 3

log = logging.getLogger("mpumap.worker")


def round_up(n, multiple):
    return -(-n // multiple) * multiple


class Region:
    """A worker's view of one region: its buffer memfd, store and page table."""

    def __init__(self, rid, size, npages, page_size, memfd, store_fd, table_fd):
        self.rid = rid
        self.size = size
        self.npages = npages
        self.page_size = page_size
        self.memfd = memfd
        # Clients map the file's size rounded to system pages: a fill of the
        # last umap page must stop where their mapping does.
        self.map_length = round_up(size, SYSTEM_PAGE_SIZE)
        self.store = FileStore(store_fd, size)
        self.table = PageTable.attach(table_fd, npages)

    def fill_length(self, index):
        return min(self.page_size, self.map_length - index * self.page_size)

    def close(self):
        self.table.close()
        self.store.close()
        os.close(self.memfd)


class Worker:
    role = "worker"

    def __init__(self, sock, params, fds):
        self.sock = sock
        self.index = params["index"]
        self.page_size = params["page_size"]
        self.nfillers = params["fillers"]
        self.nevictors = params["evictors"]
        self.params = params
        self.pid = os.getpid()
        self.buffer = PageBuffer.attach(fds[0])
        self.evict_fds = fds[1:]
        self.regions = {}
        self.clients = {}

    # -- messages from the server ------------------------------------------

    def handle(self, data, fds):
        kind = data[0]
        if kind == protocol.W_FAULTS:
            self.on_faults(data)
        elif kind == protocol.W_ADD_REGION:
            _, rid, size, npages = protocol.REGION_BODY.unpack(data)
            memfd, store_fd, table_fd = fds
            self.regions[rid] = Region(
                rid, size, npages, self.page_size, memfd, store_fd, table_fd
            )
        elif kind == protocol.W_DROP_REGION:
            _, rid = protocol.W_ID.unpack(data)
            region = self.regions.pop(rid, None)
            if region:
                region.close()
        elif kind == protocol.W_ADD_CLIENT:
            _, cid = protocol.W_ID.unpack(data)
            self.clients[cid] = fds[0]
        elif kind == protocol.W_DROP_CLIENT:
            _, cid = protocol.W_ID.unpack(data)
            fd = self.clients.pop(cid, None)
            if fd is not None:
                os.close(fd)
        else:
            protocol.close_all(fds)
            log.error("%s %d: unknown message %d from the server", self.role, self.index, kind)

    def on_faults(self, data):
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    role, index, parent = argv[0], int(argv[1]), int(argv[2])
    logging.basicConfig(
        level=os.environ.get("MPUMAP_WORKER_LOG_LEVEL", "WARNING"),
        format=f"mpumap-{role}[%(process)d] %(levelname)s %(message)s",
    )
    try:
        core.die_with_parent(parent)
    except OSError:
        return 1  # the server is gone already
    core.set_process_name(f"mpumap-{role}{index}")
    # Ctrl-C reaches the whole process group: the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=CONTROL_FD)
    data, fds = protocol.receive(sock)
    if not data or data[0] != protocol.W_INIT:
        log.error("%s %d: no start-up message from the server", role, index)
        return 1
    params = json.loads(data[1:])
    if role == "filler":
        from mpumap.fillers import Filler as cls
    else:
        from mpumap.evictor import Evictor as cls
    cls(sock, params, fds).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
