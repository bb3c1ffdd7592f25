"""The server: one supervisor process that owns the socket, the client
handshakes, the fault monitors and its worker processes.

Shaped like gunicorn's arbiter: signals are queued by their handlers and
dealt with by the main loop; children are known by pid, reaped with
waitpid(-1, WNOHANG) and restarted when they die.
"""
import collections
import errno
import fcntl
import gc
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import stat
import time

from mpumap import core, protocol
from mpumap.evictor import Evictor, machine_limit
from mpumap.fillers import PREFETCH_RUN_BYTES, Filler
from mpumap.monitor import Monitor, Monitors, filler_for
from mpumap._core import lib
from mpumap.pbm import CLIENT_COUNTERS, PageBuffer, PageTable, percentile_us
from mpumap.protocol import Msg, ProtocolError
from mpumap.settings import SYSTEM_PAGE_SIZE
from mpumap.store import MODE_CODES, open_store
from mpumap.worker import become_worker, round_up

log = logging.getLogger("mpumap.server")

WORKER_SOCKET_BUFFER = 4 << 20
STOP_GRACE_SECONDS = 3.0
QUICK_DEATH_SECONDS = 1.0
MAX_QUICK_DEATHS = 5
STATS_LIST_LENGTH = 500
SESSIONS_KEPT = 1000


class RequestError(OSError):
    """A request the server refuses; errno and message go back to the client."""

    def __init__(self, code, message):
        super().__init__(code, message)


class Region:
    """One backing file (by device, inode and owner) and its page buffer."""

    def __init__(self, rid, slot, key, size, page_size, store_fd, store_mode, name):
        self.rid = rid
        self.slot = slot
        self.key = key
        self.size = size
        self.name = name
        self.page_size = page_size
        self.npages = -(-size // page_size)
        self.map_length = round_up(size, SYSTEM_PAGE_SIZE)
        self.store_fd = store_fd
        self.store_mode = store_mode
        self.memfd = self.table = None
        try:
            self.memfd = os.memfd_create(f"mpumap:{os.path.basename(name)}"[:200],
                                         os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, self.npages * page_size)
            self.memfd_ino = os.fstat(self.memfd).st_ino
            self.table = PageTable.create(self.npages)
        except BaseException:
            self.close()
            raise
        self.mappings = 0

    def buffer_bytes(self):
        """What the region's buffer holds in memory now."""
        return os.fstat(self.memfd).st_blocks * 512

    def pages_in(self, offset, length):
        """The umap pages [first, end) that cover a byte range of the file."""
        first = max(0, offset) // self.page_size
        end = min(self.npages, -(-min(offset + length, self.size) // self.page_size))
        return first, max(first, end)

    def close(self):
        if self.table is not None:
            self.table.close()
        if self.memfd is not None:
            os.close(self.memfd)
        os.close(self.store_fd)


class Mapping:
    def __init__(self, mid, region):
        self.mid = mid
        self.region = region
        self.address = None


class Connection:
    """A client: its socket, credentials, userfaultfd, monitor and mappings."""

    def __init__(self, cid, sock):
        self.cid = cid
        self.sock = sock
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        self.pid, self.uid, self.gid = (int.from_bytes(creds[i:i + 4], "little") for i in (0, 4, 8))
        self.uffd = None
        self.monitor = None
        self.mappings = {}
        self.slot = None  # of the per-client counters, once it said HELLO
        self.session = ""
        self.refusal = None  # why it may not use the server

    def __str__(self):
        return f"client {self.cid} (pid {self.pid}, uid {self.uid})"


class Worker:
    def __init__(self, role, index, pid, sock):
        self.role = role
        self.index = index
        self.pid = pid
        self.sock = sock
        self.started = time.monotonic()


class Server:
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)

    def __init__(self, settings, pidfile=None):
        self.settings = settings
        self.pidfile = pidfile
        self.selector = selectors.DefaultSelector()
        self.signal_queue = []
        self.workers = {}  # pid -> Worker
        self.by_role = {}  # (role, index) -> Worker
        self.quick_deaths = {}
        self.connections = {}
        self.regions = {}  # key -> Region
        self.ids = itertools.count(1)
        # Counter slots are reused oldest-freed first, so that fillers are long
        # done with a client's slot before it serves another; a freed slot's
        # counts go to its session's totals when it is taken again.
        self.free_client_slots = collections.deque(range(lib.MPU_CLIENT_SLOTS))
        self.free_region_slots = collections.deque(range(settings.max_regions))
        self.retired_client_slots = {}  # slot -> session
        self.sessions = collections.OrderedDict()  # session -> totals
        self.listener = None
        self.stopping = False
        self.exit_status = 0
        self.started = time.time()
        self.pid = os.getpid()
        raise_descriptor_limit()
        self.evict_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                          for _ in range(settings.evictors)]
        self.buffer = PageBuffer.create(1, settings.high_water, settings.low_water)
        self.buffer.set_limit(self.initial_limit(), settings.high_water, settings.low_water)
        self.monitors = None
        self.handlers = {
            Msg.HELLO: self.on_hello,
            Msg.MAP: self.on_map,
            Msg.REGISTER: self.on_register,
            Msg.UNMAP: self.on_unmap,
            Msg.STATS: self.on_stats,
            Msg.PREFETCH: self.on_prefetch,
        }

    def worker_params(self, role, index):
        s = self.settings
        return {
            "role": role,
            "index": index,
            "page_size": s.page_size,
            "fillers": s.fillers,
            "evictors": s.evictors,
            "high_water": s.high_water,
            "low_water": s.low_water,
            "adaptive": s.adaptive,
            "adapt_interval": s.adapt_interval,
            "memory_reserve": s.memory_reserve,
            "min_buffer_pages": s.min_buffer_pages,
            "read_ahead": s.read_ahead,
            "spin_us": s.spin_us,
            "max_regions": s.max_regions,
        }

    def initial_limit(self):
        if not self.settings.adaptive:
            return self.settings.buffer_pages
        return machine_limit(self.buffer, self.worker_params("server", 0))

    # -- life cycle ----------------------------------------------------------

    def run(self):
        if self.settings.cpus:
            # Before the monitor thread and the workers: they inherit it.
            os.sched_setaffinity(0, self.settings.cpus)
        self.listen()
        self.install_signals()
        s = self.settings
        self.monitors = Monitors(self.buffer, s.page_size, s.read_ahead, s.fillers, s.spin_us)
        if self.pidfile:
            with open(self.pidfile, "w") as f:
                f.write(f"{self.pid}\n")
        for index in range(self.settings.fillers):
            self.spawn("filler", index)
        for index in range(self.settings.evictors):
            self.spawn("evictor", index)
        s = self.settings
        log.info("serving on %s: page %d B, buffer %s pages (%s), %d fillers, %d evictors",
                 s.socket, s.page_size, self.buffer.limit,
                 "adaptive" if s.adaptive else "fixed", s.fillers, s.evictors)
        try:
            while not self.stopping:
                for key, _ in self.selector.select(1.0):
                    key.data(key.fileobj)
                self.handle_signals()
        finally:
            self.shutdown()
        return self.exit_status

    def listen(self):
        path = self.settings.socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # left behind by a server that died
            else:
                raise RuntimeError(f"a server is already running on {path}")
            finally:
                probe.close()
        # Created with no access for others at all, then opened as far as
        # --socket-mode says: no moment where it is wider.
        umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(umask)
        if self.settings.socket_group is not None:
            os.chown(path, -1, self.settings.socket_group)
        os.chmod(path, self.settings.socket_mode)
        sock.listen(128)
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def install_signals(self):
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self.queue_signal)
        self.selector.register(read_end, selectors.EVENT_READ, self.drain_wakeup)

    def queue_signal(self, signum, frame):
        if len(self.signal_queue) < 8:
            self.signal_queue.append(signum)

    def drain_wakeup(self, fd):
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self):
        while self.signal_queue:
            signum = self.signal_queue.pop(0)
            if signum == signal.SIGCHLD:
                self.reap()
            elif self.stopping:
                self.exit_status = 1
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self.stopping = True

    def shutdown(self):
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            try:
                os.unlink(self.settings.socket)
            except FileNotFoundError:
                pass
            self.listener = None
        for conn in list(self.connections.values()):
            self.drop(conn)
        # A worker that reads the end of its socket has done all it was told
        # before: in-flight fills finish, then it exits.
        for worker in self.workers.values():
            try:
                self.selector.unregister(worker.sock)
            except KeyError:
                pass
            if worker.role == "filler":
                self.monitors.set_filler(worker.index, -1)
            worker.sock.close()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.workers and time.monotonic() < deadline:
            self.reap(restart=False)
            if any(sig != signal.SIGCHLD for sig in self.signal_queue):
                log.info("stopping at once")
                break
            time.sleep(0.01)
        for worker in self.workers.values():
            self.kill(worker, signal.SIGKILL)
        while self.workers:
            self.reap(restart=False, block=True)
        if self.monitors is not None:
            self.monitors.stop()
        if self.pidfile:
            try:
                with open(self.pidfile) as f:
                    ours = f.read().strip() == str(self.pid)
                if ours:
                    os.unlink(self.pidfile)
            except OSError:
                pass
        log.info("stopped")

    # -- workers -------------------------------------------------------------

    def spawn(self, role, index):
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (parent_sock, child_sock):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WORKER_SOCKET_BUFFER)
        params = self.worker_params(role, index)
        # Keep the interpreter's pages shared with the child: nothing the
        # child's collector visits is copied for it.
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            parent_sock.detach()
            cls = Filler if role == "filler" else Evictor
            become_worker(cls, child_sock, params, self.buffer, self.evict_fds, self.pid)
        gc.unfreeze()
        child_sock.close()
        worker = Worker(role, index, pid, parent_sock)
        self.workers[pid] = worker
        self.by_role[role, index] = worker
        if role == "filler":
            self.monitors.set_filler(index, parent_sock.fileno())
        self.selector.register(parent_sock, selectors.EVENT_READ, self.on_worker_readable)
        for conn in self.connections.values():
            if conn.uffd is not None and role == "filler":
                self.tell(worker, self.client_message(conn), [conn.uffd])
        for region in self.regions.values():
            self.tell(worker, self.region_message(region),
                      [region.memfd, region.store_fd, region.table.fd])
        log.debug("started %s %d as pid %d", role, index, pid)
        return worker

    def tell(self, worker, data, fds=()):
        """Send a message to a worker; a dead one is restarted once reaped."""
        try:
            if fds:
                socket.send_fds(worker.sock, [data], list(fds))
            else:
                worker.sock.send(data)
        except OSError as exc:
            log.warning("%s %d (pid %d) is not listening: %s",
                        worker.role, worker.index, worker.pid, exc)

    def tell_all(self, data, fds=(), role=None):
        for worker in list(self.by_role.values()):
            if role is None or worker.role == role:
                self.tell(worker, data, fds)

    def on_worker_readable(self, sock):
        # Workers speak only by closing their end: when they die.
        try:
            data = sock.recv(64)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(sock)

    def kill(self, worker, sig):
        try:
            os.kill(worker.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self, restart=True, block=False):
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            try:
                self.selector.unregister(worker.sock)
            except (KeyError, ValueError):
                pass
            if self.by_role.get((worker.role, worker.index)) is worker:
                del self.by_role[worker.role, worker.index]
                if worker.role == "filler":
                    self.monitors.set_filler(worker.index, -1)
            worker.sock.close()
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"status {os.waitstatus_to_exitcode(status)}")
            if not restart or self.stopping:
                log.debug("%s %d (pid %d) ended with %s", worker.role, worker.index, pid, how)
                continue
            log.warning("%s %d (pid %d) died with %s; starting another",
                        worker.role, worker.index, pid, how)
            self.recover(worker)
            self.restart(worker)
            if worker.role == "filler":
                self.wake_all()
            if block:
                return

    def recover(self, worker):
        """Take back the pages a dead worker held in FILLING or LEAVING."""
        freed = sum(r.table.recover(self.buffer, worker.pid, r.memfd, r.page_size)
                    for r in self.regions.values())
        if freed:
            log.info("took back %d pages that %s %d held", freed, worker.role, worker.index)

    def wake_all(self):
        """Wake every client thread waiting on a fault: those a dead filler
        was to answer fault again, and the new filler serves them."""
        for conn in self.connections.values():
            for mapping in conn.mappings.values():
                if mapping.address is not None:
                    core.uffd_wake(conn.uffd, mapping.address, mapping.region.map_length)

    def restart(self, worker):
        slot = (worker.role, worker.index)
        if time.monotonic() - worker.started < QUICK_DEATH_SECONDS:
            self.quick_deaths[slot] = self.quick_deaths.get(slot, 0) + 1
        else:
            self.quick_deaths[slot] = 0
        if self.quick_deaths[slot] >= MAX_QUICK_DEATHS:
            log.error("%s %d died %d times right after starting: giving up and stopping "
                      "the server (its log above says why)", *slot, MAX_QUICK_DEATHS)
            self.stopping = True
            self.exit_status = 1
            return
        self.buffer.add("restarts")
        self.spawn(*slot)

    # -- clients -------------------------------------------------------------

    def on_accept(self, listener):
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("accept: %s", exc)
            return
        sock.setblocking(False)
        conn = Connection(next(self.ids), sock)
        if not self.allowed(conn):
            # Told so in answer to its first request (the reply it waits for),
            # then closed.
            log.warning("refused pid %d: uid %d, gid %d may not use this server",
                        conn.pid, conn.uid, conn.gid)
            conn.refusal = f"uid {conn.uid} may not use this server"
        log.debug("connection from pid %d, uid %d, gid %d", conn.pid, conn.uid, conn.gid)
        self.connections[conn.cid] = conn
        self.selector.register(sock, selectors.EVENT_READ, lambda _s, c=conn: self.on_request(c))

    def allowed(self, conn):
        """--allow-uid / --allow-gid, when given, say who may connect besides
        root and the server's own user; groups count supplementary ones."""
        s = self.settings
        if not (s.allow_uids or s.allow_gids) or conn.uid in (0, os.getuid()):
            return True
        if conn.uid in s.allow_uids or conn.gid in s.allow_gids:
            return True
        return bool(set(s.allow_gids) & supplementary_groups(conn.pid))

    def on_request(self, conn):
        try:
            data, fds = protocol.receive(conn.sock)
        except ProtocolError as exc:
            self.reply_error(conn, errno.EPROTO, str(exc))
            return
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data or conn.refusal:
            protocol.close_all(fds)
            if data:
                self.reply_error(conn, errno.EACCES, conn.refusal)
            self.drop(conn)
            return
        try:
            kind, payload, values = protocol.unpack(data, len(fds))
            handler = self.handlers.get(kind)
            if handler is None:
                raise ProtocolError(f"{kind.name} is not a request")
            if conn.uffd is None and kind not in (Msg.HELLO, Msg.STATS):
                raise ProtocolError("HELLO must come first")
            handler(conn, values, payload, fds)
        except ProtocolError as exc:
            self.reply_error(conn, errno.EPROTO, str(exc))
        except OSError as exc:
            self.reply_error(conn, exc.errno or errno.EIO, exc.strerror or str(exc))
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("%s: request failed", conn)
            self.reply_error(conn, errno.EIO, f"internal error: {exc}")
        finally:
            protocol.close_all(fds)  # what no handler took

    def reply(self, conn, kind, payload=b"", fds=()):
        if conn.sock is None:
            return
        try:
            protocol.send(conn.sock, kind, payload, fds)
        except OSError as exc:
            # Gone, or not reading its replies: either way it is done.
            log.info("%s: dropped (%s)", conn, exc)
            self.drop(conn)

    def reply_error(self, conn, code, message):
        log.info("%s: refused: %s", conn, message)
        self.reply(conn, Msg.ERROR, protocol.error_payload(code, message))

    def on_hello(self, conn, values, payload, fds):
        if conn.uffd is not None:
            raise ProtocolError("HELLO was said already")
        if not 4 <= len(payload) <= 4 + protocol.MAX_SESSION:
            raise ProtocolError(f"HELLO payload is {len(payload)} bytes, not 4 to "
                                f"{4 + protocol.MAX_SESSION}")
        if not core.is_uffd(fds[0]):
            raise RequestError(errno.EINVAL, "the descriptor sent with HELLO is not a userfaultfd")
        if not self.free_client_slots:
            raise RequestError(errno.EUSERS, f"the server serves {lib.MPU_CLIENT_SLOTS} "
                               "clients already")
        conn.session = payload[4:].decode("utf-8", "replace")
        conn.slot = self.take_slot(conn.session)
        conn.uffd = fds.pop()
        os.set_blocking(conn.uffd, False)
        conn.monitor = Monitor(self.monitors, conn.slot, conn.uffd)
        self.tell_all(self.client_message(conn), [conn.uffd], "filler")
        log.info("%s connected", conn)
        s = self.settings
        self.reply(conn, Msg.WELCOME, protocol.WELCOME_BODY.pack(
            SYSTEM_PAGE_SIZE, s.page_size, self.buffer.limit, s.fillers, s.evictors,
            s.high_water, s.low_water, int(s.adaptive), lib.MPU_FAULTS_MAX))

    def on_map(self, conn, values, payload, fds):
        fd = fds[0]
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(errno.EINVAL, "only regular files can be mapped")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & getattr(os, "O_PATH", 0) or (flags & os.O_ACCMODE) == os.O_WRONLY:
            raise RequestError(errno.EBADF, "the file was not opened for reading")
        if st.st_size == 0:
            raise RequestError(errno.EINVAL, "cannot map an empty file")
        # Keyed by owner too: a client can write into a shared buffer through
        # its own userfaultfd (the kernel lets UFFDIO_COPY fill holes), so
        # users never share pages; processes of one user can ptrace each
        # other anyway.
        if len(conn.mappings) >= self.settings.max_client_mappings:
            raise RequestError(errno.EMFILE, f"this client has {len(conn.mappings)} mappings "
                               "already, the most the server allows (--max-client-mappings)")
        key = (st.st_dev, st.st_ino, conn.uid)
        region = self.regions.get(key)
        if region is None:
            if not self.free_region_slots:
                raise RequestError(errno.ENFILE, f"the server serves {len(self.regions)} "
                                   "regions already, the most it may (--max-regions)")
            region = self.create_region(key, st.st_size, fds.pop())
        mapping = Mapping(next(self.ids), region)
        region.mappings += 1
        conn.mappings[mapping.mid] = mapping
        self.reply(conn, Msg.MAPPED, protocol.MAPPED_BODY.pack(
            mapping.mid, region.rid, region.size, region.map_length), [region.memfd])

    def create_region(self, key, size, client_fd):
        try:
            name = os.readlink(f"/proc/self/fd/{client_fd}")
        except OSError:
            name = "?"
        store_fd, mode = open_store(client_fd, self.settings.store_io)
        slot = self.free_region_slots.popleft()
        try:
            region = Region(next(self.ids), slot, key, size, self.settings.page_size,
                            store_fd, mode, name)
        except BaseException:
            self.free_region_slots.appendleft(slot)
            raise
        self.regions[key] = region
        self.tell_all(self.region_message(region),
                      [region.memfd, region.store_fd, region.table.fd])
        log.info("region %d: %s, %d bytes, %d pages", region.rid, name, size, region.npages)
        return region

    @staticmethod
    def client_message(conn):
        return protocol.ADD_CLIENT_BODY.pack(protocol.W_ADD_CLIENT, conn.cid, conn.slot)

    def take_slot(self, session):
        slot = self.free_client_slots.popleft()
        retired = self.retired_client_slots.pop(slot, None)
        if retired is not None:
            totals = self.session_totals(retired)
            for name, value in self.buffer.client_counters(slot).items():
                totals[name] += value
        self.buffer.reset_client(slot)
        self.session_totals(session)["clients"] += 1
        return slot

    def session_totals(self, session):
        totals = self.sessions.get(session)
        if totals is None:
            totals = self.sessions[session] = dict.fromkeys(CLIENT_COUNTERS + ("clients",), 0)
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        return totals

    def session_report(self, session):
        """What the clients of a session used: those gone and those here."""
        report = dict(self.sessions.get(session) or dict.fromkeys(CLIENT_COUNTERS + ("clients",), 0))
        slots = [slot for slot, s in self.retired_client_slots.items() if s == session]
        slots += [c.slot for c in self.connections.values()
                  if c.slot is not None and c.session == session]
        for slot in slots:
            for name, value in self.buffer.client_counters(slot).items():
                report[name] += value
        report["connected"] = sum(1 for c in self.connections.values()
                                  if c.slot is not None and c.session == session)
        return report

    @staticmethod
    def region_message(region):
        return protocol.REGION_BODY.pack(protocol.W_ADD_REGION, region.rid, region.slot,
                                         region.size, region.npages,
                                         MODE_CODES[region.store_mode])

    def on_register(self, conn, values, payload, fds):
        mid, address, length = values
        mapping = conn.mappings.get(mid)
        if mapping is None:
            raise RequestError(errno.EINVAL, f"no mapping {mid} to register")
        if mapping.address is not None:
            raise RequestError(errno.EBUSY, f"mapping {mid} is registered already")
        region = mapping.region
        if length != region.map_length or address % SYSTEM_PAGE_SIZE:
            raise RequestError(errno.EINVAL, f"mapping {mid} must be {region.map_length} "
                               "bytes at a page-aligned address")
        if not maps_memfd(conn.pid, address, length, region.memfd_ino):
            raise RequestError(errno.EINVAL, f"{address:#x} is not where the client "
                               f"mapped region {region.rid}'s buffer")
        core.uffd_register(conn.uffd, address, length)
        mapping.address = address
        conn.monitor.add(address, length, region.slot)
        self.reply(conn, Msg.REGISTERED, protocol.U64.pack(mid))

    def on_unmap(self, conn, values, payload, fds):
        (mid,) = values
        mapping = conn.mappings.pop(mid, None)
        if mapping is None:
            raise RequestError(errno.EINVAL, f"no mapping {mid} to unmap")
        self.forget(conn, mapping)
        self.reply(conn, Msg.UNMAPPED, protocol.U64.pack(mid))

    def on_prefetch(self, conn, values, payload, fds):
        mid, offset, length = values
        mapping = conn.mappings.get(mid)
        if mapping is None:
            raise RequestError(errno.EINVAL, f"no mapping {mid} to prefetch")
        region = mapping.region
        first, end = region.pages_in(offset, length)
        # In runs, each to the filler of its first page, so that fillers share
        # a long prefetch and each reads long runs.
        run = max(1, PREFETCH_RUN_BYTES // region.page_size)
        for start in range(first, end, run):
            worker = self.by_role.get(("filler", filler_for(region.slot, start,
                                                          self.settings.fillers)))
            if worker is not None:
                self.tell(worker, protocol.PREFETCH_BODY.pack(
                    protocol.W_PREFETCH, region.slot, start, min(run, end - start)))
        self.reply(conn, Msg.PREFETCHING, protocol.U64.pack(end - first))

    def on_stats(self, conn, values, payload, fds):
        if len(payload) > protocol.MAX_SESSION:
            raise ProtocolError("STATS payload is a session tag of at most "
                                f"{protocol.MAX_SESSION} bytes")
        session = payload.decode("utf-8", "replace")
        # One packet must hold the reply: long lists are cut, busiest first.
        listed = STATS_LIST_LENGTH
        while True:
            stats = self.stats(listed)
            if session:
                stats["session"] = self.session_report(session)
            body = protocol.stats_payload(stats)
            if len(body) <= protocol.MAX_PAYLOAD or listed == 0:
                break
            listed //= 2
        self.reply(conn, Msg.STATS_REPLY, body)

    def forget(self, conn, mapping):
        if mapping.address is not None:
            conn.monitor.remove(mapping.address)
        region = mapping.region
        region.mappings -= 1
        if region.mappings == 0:
            self.release_region(region)

    def release_region(self, region):
        del self.regions[region.key]
        region.table.release_all(self.buffer)
        self.tell_all(protocol.W_ID.pack(protocol.W_DROP_REGION, region.slot))
        region.close()
        self.free_region_slots.append(region.slot)
        log.info("region %d released", region.rid)

    def drop(self, conn):
        if conn.sock is None:
            return
        if conn.uffd is not None:
            log.info("%s disconnected", conn)
        self.connections.pop(conn.cid, None)
        self.selector.unregister(conn.sock)
        conn.sock.close()
        conn.sock = None
        for mapping in conn.mappings.values():
            self.forget(conn, mapping)
        conn.mappings.clear()
        if conn.uffd is not None:
            conn.monitor.close()
            self.tell_all(protocol.W_ID.pack(protocol.W_DROP_CLIENT, conn.slot), role="filler")
            os.close(conn.uffd)
            conn.uffd = None
        if conn.slot is not None:
            # Reused last of all the free slots: the fillers are long done
            # with this one when it serves another client.
            self.retired_client_slots[conn.slot] = conn.session
            self.free_client_slots.append(conn.slot)
            conn.slot = None

    # -- status ----------------------------------------------------------------

    def stats(self, listed=STATS_LIST_LENGTH):
        """The server's status; the regions with most pages present and the
        clients with most mappings, at most `listed` of each."""
        s = self.settings
        regions = [{"id": r.rid, "file": r.name, "size": r.size, "pages": r.npages,
                    "present": r.table.count(core.PRESENT), "mappings": r.mappings,
                    "store_io": r.store_mode, "buffer_bytes": r.buffer_bytes()}
                   for r in self.regions.values()]
        regions.sort(key=lambda r: -r["present"])
        clients = sorted((c for c in self.connections.values() if c.uffd is not None),
                         key=lambda c: -len(c.mappings))
        latency = self.buffer.latency()
        return {
            "pid": os.getpid(),
            "started": self.started,
            "settings": {
                "socket": s.socket, "page_size": s.page_size, "fillers": s.fillers,
                "evictors": s.evictors, "high_water": s.high_water,
                "low_water": s.low_water, "adaptive": s.adaptive,
                "adapt_interval": s.adapt_interval, "memory_reserve": s.memory_reserve,
                "read_ahead": s.read_ahead, "spin_us": s.spin_us, "store_io": s.store_io,
                "max_regions": s.max_regions, "max_client_mappings": s.max_client_mappings,
                "cpus": list(s.cpus),
            },
            "buffer": {**self.buffer.snapshot(),
                       "memfd_bytes": sum(r["buffer_bytes"] for r in regions)},
            "workers": [{"role": w.role, "index": w.index, "pid": w.pid}
                        for w in self.by_role.values()],
            "clients_total": len(clients),
            "clients": [{"id": c.cid, "pid": c.pid, "uid": c.uid, "session": c.session,
                         "regions": sorted({m.region.rid for m in c.mappings.values()}),
                         **self.buffer.client_counters(c.slot)}
                        for c in clients[:listed]],
            "latency": {"buckets": latency, "p50_us": percentile_us(latency, 0.5),
                        "p99_us": percentile_us(latency, 0.99)},
            "regions_total": len(regions),
            "regions": regions[:listed],
        }


def supplementary_groups(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def raise_descriptor_limit():
    """Every region costs the server and each worker a few descriptors: take
    all the descriptors the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def maps_memfd(pid, address, length, inode):
    """Does the process map [address, address+length) from that memfd inode?

    When /proc tells us nothing (another user's process, no access) the
    registration itself is the only check left."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return (start == address and end >= address + length
                            and int(fields[4]) == inode and int(fields[2], 16) == 0)
    except OSError:
        return True
    return False
