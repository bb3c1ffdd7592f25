"""The answers to clients' requests, and the connections they come on."""
import collections
import errno
import fcntl
import itertools
import logging
import os
import select
import selectors
import stat
import time

from mpumap import core, protocol
from mpumap._core import lib
from mpumap.logs import Quiet
from mpumap.protocol import Advice, Msg, ProtocolError, W
from mpumap.server.clients import ClientMapping, Connection
from mpumap.server.offload import Offload, in_child
from mpumap.server.stats import LISTED, server_stats
from mpumap.settings import SYSTEM_PAGE_SIZE
from mpumap.stores import ObjectInfo, StoreSettings, Stores, allowed, check_url, shown
from mpumap.stores.files import CALL, close_aside, open_store
from mpumap.workers.fillers import STORE_WINDOW_BYTES, prefetch_run

log = logging.getLogger("mpumap.requests")

HANDSHAKE_SECONDS = 5.0  # to say HELLO (or ask STATS) after connecting
OFFLOAD_SECONDS = 8.0  # for a store to open, a range to register (below the clients' 10)
MAX_IDENTITY = 1024  # bytes of an object's version (ETag): real ones are tens
RETRY_WRITE_BACK_SECONDS = 5.0  # between write-backs of a region nobody maps that failed
QUIET_SECONDS = 60.0  # one log line per kind of refusal and user this often
# A region's page is at most half a filler's longest read (claim_behind
# takes no more than that before a fault): 4 MiB.
MAX_PAGE_SHIFT = (STORE_WINDOW_BYTES // 2).bit_length() - 1


class RequestError(OSError):
    """A request the server refuses; errno and message go back to the client."""

    def __init__(self, code, message):
        super().__init__(code, message)


class RequestHandler:
    """Connections and their requests, from accept to the last reply.

    Reads one request of a connection at a time, checks it, acts through the
    client and region tables, the workers (`tell`) and the fault monitor,
    and replies: at once, or once what the request needs is done (every
    filler told of a new client or region; a store opened, a range
    registered, off the main loop).  Owns the connections' place in the
    selector and the jobs it hands to threads; the descriptors themselves
    are the tables'.

    Invariants: a client hears WELCOME, and a mapper MAPPED, only once every
    filler's socket holds the news of that client or region, so that no
    fault reaches a filler before what it names; a connection is `busy`
    (out of the selector) while one of its requests waits.
    """

    def __init__(self, settings, buffer, selector, clients, regions, monitor, tell, workers,
                 started, writeback):
        self.settings = settings
        self.buffer = buffer
        self.selector = selector
        self.clients = clients
        self.regions = regions
        self.monitor = monitor
        self.tell = tell  # tell(data, fds, role, then): to every live worker of a role
        self.workers = workers  # () -> the live workers
        self.started = started
        self.writeback = writeback  # flushes asked of the evictors
        # Handed to every client with WELCOME: its guard polls it to tell a
        # server that died from one that dropped it and serves on, which
        # the server's pid cannot do from another pid namespace.
        try:
            self.pidfd = os.pidfd_open(os.getpid())
        except OSError as exc:
            raise OSError(exc.errno, "no pidfd of the server's own process (Linux 5.3 or later "
                          "has them), which clients need to tell a server that died: "
                          f"{exc.strerror}") from None
        self.ids = itertools.count(1)  # connections, mappings and regions: unique ids
        self.offload = Offload()
        self.selector.register(self.offload, selectors.EVENT_READ,
                               lambda mask: self.offload.finished())
        self.announcing = {}  # rid -> replies that wait until its workers know it
        self.writers_per_user = collections.Counter()  # uid -> entries in the writers table
        self.maps_under_way = collections.Counter()  # uid -> maps whose file is opening
        self.unwritten = {}  # rid -> (when to try again, region): write-backs that failed
        self.stores = Stores(settings.stores, StoreSettings(settings.store_timeout,
                                                            settings.store_requests))
        self._quiet = Quiet(log, QUIET_SECONDS)  # by (what, uid)
        self.handlers = {
            Msg.HELLO: self.on_hello,
            Msg.MAP: self.on_map,
            Msg.MAP_URL: self.on_map_url,
            Msg.FLUSH: self.on_flush,
            Msg.REGISTER: self.on_register,
            Msg.UNMAP: self.on_unmap,
            Msg.STATS: self.on_stats,
            Msg.PREFETCH: self.on_prefetch,
            Msg.ADVISE: self.on_advise,
        }

    # -- who may do what ---------------------------------------------------------

    @staticmethod
    def privileged(uid):
        """Root and the server's own user: no quotas, and they see everything."""
        return uid in (0, os.getuid())

    def allowed(self, conn):
        """--allow-uid / --allow-gid, when given, say who may connect besides
        root and the server's own user; groups count supplementary ones."""
        s = self.settings
        if not (s.allow_uids or s.allow_gids) or self.privileged(conn.uid):
            return True
        if conn.uid in s.allow_uids or conn.gid in s.allow_gids:
            return True
        return bool(set(s.allow_gids) & supplementary_groups(conn.pid))

    def quota(self, conn, count, limit, what, flag):
        """Refuse (EDQUOT) a user who has `limit` of something already."""
        if self.privileged(conn.uid) or count < limit:
            return
        raise RequestError(errno.EDQUOT, f"uid {conn.uid} has {count} {what} "
                           f"already, the most one user may ({flag})")

    # -- connections -------------------------------------------------------------

    def accept(self, sock):
        try:
            conn = Connection(next(self.ids), sock)
        except OSError:
            sock.close()  # gone before we could ask who it was
            return
        if not self.allowed(conn):
            # Told so in answer to its first request (the reply it waits
            # for), then closed.
            self.say_once("refused", conn.uid, "refused pid %d: uid %d, gid %d may not use "
                          "this server", conn.pid, conn.uid, conn.gid)
            conn.refusal = f"uid {conn.uid} may not use this server"
        elif (not self.privileged(conn.uid)
              and self.clients.per_user[conn.uid] >= self.settings.max_user_connections):
            message = (f"uid {conn.uid} has {self.clients.per_user[conn.uid]} connections "
                       "open already, the most one user may (--max-user-connections)")
            self.say_once("connections", conn.uid, "%s", message)
            try:  # the answer to whatever it asks first
                protocol.send(sock, Msg.ERROR, protocol.error_payload(errno.EDQUOT, message))
            except OSError:
                pass
            sock.close()
            return
        log.debug("connection from pid %d, uid %d, gid %d", conn.pid, conn.uid, conn.gid)
        self.clients.add(conn)
        self.listen(conn)

    def readable(self, conn):
        try:
            data, fds = protocol.receive(conn.sock)
        except ProtocolError as exc:
            self.refuse(conn, errno.EPROTO, str(exc))
            return
        except BlockingIOError:
            return
        except OSError:  # reset, or worse: the conversation is over either way
            self.drop(conn)
            return
        if not data and not conn.refusal and not hung_up(conn.sock):
            # A packet of no bytes reads as the end of the stream does.
            protocol.close_all(fds)
            self.refuse(conn, errno.EPROTO, "an empty message")
            return
        if not data or conn.refusal:
            protocol.close_all(fds)
            if data:
                self.refuse(conn, errno.EACCES, conn.refusal)
            self.drop(conn)
            return
        try:
            kind, payload, values = protocol.unpack(data, len(fds))
            handler = self.handlers.get(kind)
            if handler is None:
                raise ProtocolError(f"{kind.name} is not a request")
            if not conn.is_client and kind not in (Msg.HELLO, Msg.STATS):
                raise ProtocolError("HELLO must come first")
            handler(conn, values, payload, fds)
        except ProtocolError as exc:
            self.refuse(conn, errno.EPROTO, str(exc))
        except OSError as exc:
            self.refuse(conn, exc.errno or errno.EIO, exc.strerror or str(exc))
        except Exception as exc:  # a bug must cost one request, not the server
            log.exception("%s: request failed", conn)
            self.refuse(conn, errno.EIO, f"internal error: {exc}")
        finally:
            protocol.close_all(fds)  # what no handler took

    def expire(self, now):
        """Close connections that did not say HELLO in time; give up work
        that took too long."""
        self.offload.expire(now)
        self.retry_write_backs(now)
        for conn in self.clients:
            if (not conn.is_client and not conn.busy
                    and now - conn.accepted > HANDSHAKE_SECONDS):
                log.debug("%s: no HELLO within %.0f s: closed", conn, HANDSHAKE_SECONDS)
                self.drop(conn)

    def next_deadline(self):
        waiting = [c.accepted + HANDSHAKE_SECONDS for c in self.clients if not c.is_client]
        offload = self.offload.next_deadline()
        retries = [when for when, _ in self.unwritten.values()]
        return min(waiting + retries + ([offload] if offload else []), default=None)

    def drop(self, conn):
        """Forget a connection: its mappings, its client slot, its socket."""
        if conn.sock is None or conn.sock.fileno() < 0:
            return
        if conn.is_client:
            log.debug("%s disconnected", conn)
        try:
            self.selector.unregister(conn.sock)
        except KeyError:
            pass  # busy, or never watched
        for mid in list(conn.mappings):
            self.forget(conn, self.clients.remove_mapping(conn, mid))
        if conn.is_client:
            # Out of the monitor's tables first: then its uffd may be closed.
            self.monitor.forget(conn.slot)
            self.remove_writer(conn)
            self.tell(protocol.W_CLIENT.pack(W.DROP_CLIENT, conn.slot, conn.gen, 0), ())
        self.clients.remove(conn)
        conn.sock = None

    def pause(self, conn):
        """Stop reading a connection while one of its requests waits."""
        conn.busy = True
        self.selector.unregister(conn.sock)

    def resume(self, conn):
        conn.busy = False
        if conn.sock is not None:
            self.listen(conn)

    def listen(self, conn):
        """Read a connection's requests as they come; one the server cannot
        watch (epoll out of room: max_user_watches) is closed, not the
        server."""
        try:
            self.selector.register(conn.sock, selectors.EVENT_READ,
                                   lambda mask: self.readable(conn))
        except OSError as exc:
            self.say_once("watch", conn.uid, "%s: cannot watch its connection: %s",
                          conn, exc.strerror)
            self.drop(conn)

    # -- replies -------------------------------------------------------------------

    def reply(self, conn, kind, payload=b"", fds=()):
        if conn.sock is None:
            return
        try:
            protocol.send(conn.sock, kind, payload, fds)
        except OSError as exc:
            # Gone, or not reading its replies: either way it is done.
            log.debug("%s: dropped (%s)", conn, exc)
            self.drop(conn)

    def refuse(self, conn, code, message):
        self.say_once(f"refused {code}", conn.uid, "%s: refused: %s", conn, message)
        self.reply(conn, Msg.ERROR, protocol.error_payload(code, message))

    def finish(self, conn, then):
        """The end of a request that waited: reply (unless the connection
        went meanwhile), and read the connection again."""
        if conn.sock is None:
            return
        self.resume(conn)
        try:
            then()
        except OSError as exc:
            self.refuse(conn, exc.errno or errno.EIO, exc.strerror or str(exc))

    def say_once(self, what, uid, fmt, *args):
        """Log a refusal, but for each kind and user once a minute at most: a
        user who asks thousands of times must not fill the log."""
        self._quiet.say((what, uid), logging.WARNING, fmt, *args)

    # -- requests -------------------------------------------------------------------

    def on_hello(self, conn, values, payload, fds):
        if conn.is_client:
            raise ProtocolError("HELLO was said already")
        if not 4 <= len(payload) <= 4 + protocol.MAX_SESSION:
            raise ProtocolError(f"HELLO payload is {len(payload)} bytes, not 4 to "
                                f"{4 + protocol.MAX_SESSION}")
        if not core.is_uffd(fds[0]):
            raise RequestError(errno.EINVAL, "the descriptor sent with HELLO is not a userfaultfd")
        self.quota(conn, self.clients.clients_per_user[conn.uid],
                   self.settings.max_user_clients, "clients", "--max-user-clients")
        if not self.clients.slots_left:
            raise RequestError(errno.EUSERS, f"the server serves {lib.MPU_CLIENT_SLOTS} "
                               "clients already")
        uffd = fds.pop()
        os.set_blocking(uffd, False)
        self.clients.make_client(conn, uffd, payload[4:].decode("utf-8", "replace"))
        try:
            self.monitor.watch(conn.slot, conn.gen, uffd)
        except BaseException:
            self.clients.unmake_client(conn)
            raise
        s = self.settings
        welcome = protocol.WELCOME.pack(
            SYSTEM_PAGE_SIZE, s.page_size, self.buffer.limit, s.fillers, s.evictors,
            s.high_water, s.low_water, int(s.adaptive), lib.MPU_FAULTS_MAX)
        self.pause(conn)
        # Every worker: fillers answer its faults, evictors protect the pages
        # it may write before they write them back.
        try:
            self.tell(client_message(conn), [uffd], None,
                      lambda: self.finish(conn, lambda: self.reply(conn, Msg.WELCOME, welcome,
                                                                   [self.pidfd])))
        except OSError:
            # No worker knows it (tell: all or none): nobody's client, and
            # refused (readable), not left waiting.
            self.monitor.forget(conn.slot)
            self.clients.unmake_client(conn)
            self.resume(conn)
            raise
        self.clients.welcomed(conn)
        log.debug("%s connected", conn)

    def may_map(self, conn):
        """Refuse a map past what a client or user may hold."""
        s = self.settings
        if len(conn.mappings) >= s.max_client_mappings:
            raise RequestError(errno.EMFILE, f"this client has {len(conn.mappings)} mappings "
                               "already, the most the server allows (--max-client-mappings)")
        # Maps under way count too: each of a user's connections may have one
        # waiting for its file, and all would pass a check of what is mapped.
        mappings = self.clients.mappings_per_user[conn.uid] + self.maps_under_way[conn.uid]
        self.quota(conn, mappings, s.max_user_mappings, "mappings", "--max-user-mappings")

    def page_size_asked(self, flags):
        """The region page size a map's flags ask for (None: no choice)."""
        if flags & ~(lib.MPU_MAP_PAGE_SHIFT | lib.MPU_MAP_WRITE):
            raise RequestError(errno.EINVAL, f"unknown map flags {flags:#x}")
        shift = flags & lib.MPU_MAP_PAGE_SHIFT
        if not shift:
            return None
        size, page = 1 << shift, self.settings.page_size
        if shift > MAX_PAGE_SHIFT or size < page or size % page:
            raise RequestError(errno.EINVAL, f"a region's page size is a power of two from the "
                               f"server's page ({page}) to {1 << MAX_PAGE_SHIFT} bytes, not {size}")
        return size

    def on_map(self, conn, values, payload, fds):
        asked = self.page_size_asked(values[0])
        writable = bool(values[0] & lib.MPU_MAP_WRITE)
        self.may_map(conn)
        client_fd = fds.pop()
        store_io = self.settings.store_io
        self.open_for(conn, lambda: open_for_map(client_fd, store_io, asked, writable),
                      discard=lambda: close_aside(client_fd))

    def on_map_url(self, conn, values, payload, fds):
        if len(payload) < 4:
            raise ProtocolError("MAP_URL payload is u32 flags, then a URL")
        flags = protocol.U32.unpack_from(payload)[0]
        asked = self.page_size_asked(flags)
        if flags & lib.MPU_MAP_WRITE:
            raise RequestError(errno.EROFS, "objects are mapped read-only: no store "
                               "writes back yet")
        try:
            url = payload[4:].decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(errno.EINVAL, "a URL must be UTF-8") from None
        check_url(url)
        if not allowed(url, self.settings.allow_remote):
            raise RequestError(errno.EACCES, f"{shown(url)} is not among the URLs this server "
                               "may map (its --allow-remote)")
        store = self.stores.for_url(url)
        self.may_map(conn)
        page_size = asked or store.page_size
        self.open_for(conn, lambda: OpenedObject(url, object_info(store, url), store.window,
                                                 page_size))

    def open_for(self, conn, open_, discard=None):
        """Open what a map names off the main loop (a file's fstat may wait
        on a network file system, an object's on its store), then go on in
        `mapped`."""
        self.pause(conn)
        self.maps_under_way[conn.uid] += 1
        self.offload.submit(conn.uid, open_, lambda opened, error: self.mapped(conn, opened, error),
                            OFFLOAD_SECONDS, abandon=lambda opened: opened.close(),
                            discard=discard)

    def mapped(self, conn, opened, error):
        """A map's file or object, opened off the main loop: find or make
        its region."""
        self.maps_under_way[conn.uid] -= 1
        if self.maps_under_way[conn.uid] <= 0:
            del self.maps_under_way[conn.uid]
        if conn.sock is None:
            if opened:
                opened.close()
            return
        self.resume(conn)
        if error is not None:
            code, text = failure(error)
            self.refuse(conn, code, f"opening it: {text}")
            return
        key = opened.key(conn.uid)
        region = self.regions.get(key)
        write_fd = opened.take_write_fd()
        # Regions are per user: two users' buffers of one file would each
        # write back what the other never saw.  While a user maps a file
        # for writing, nobody else maps it, and the other way round.
        other = self.regions.other_user(key, writable=write_fd >= 0)
        if other is not None:
            opened.close()
            if write_fd >= 0:
                close_aside(write_fd)
            self.refuse(conn, errno.EBUSY, f"{opened.name} is mapped "
                        f"{'for writing ' if write_fd < 0 else ''}by another user through "
                        "this server")
            return
        try:
            if region is None:
                region = self.new_region(conn, key, opened)
            else:
                opened.close()
        except OSError as exc:
            opened.close()
            if write_fd >= 0:
                close_aside(write_fd)
            self.refuse(conn, exc.errno or errno.EIO, exc.strerror or str(exc))
            return
        if write_fd >= 0:
            if region.write_fd < 0:
                # The first writer's descriptor: evictors write back through it.
                self.regions.set_write_fd(region, write_fd)
                try:
                    self.tell(*region.write_fd_message(), "evictor")
                except OSError as exc:
                    # No evictor has it: nobody may write the region yet.
                    self.regions.set_write_fd(region, -1)  # (closed)
                    if not region.mappings:
                        self.release(region)
                    self.refuse(conn, exc.errno or errno.EIO,
                                f"telling the evictors of it: {exc.strerror or exc}")
                    return
            else:
                close_aside(write_fd)
        mapping = ClientMapping(next(self.ids), region, writable=write_fd >= 0,
                                seen_errors=self.buffer.write_errors(region.slot,
                                                                     region.gen)[0])
        region.mappings += 1
        if region.mappings == 1 and region.write_fd >= 0:
            self.buffer.seal_region(region.slot, region.gen, False)  # mapped again
        self.clients.add_mapping(conn, mapping)
        reply = (protocol.MAPPED.pack(mapping.mid, region.rid, region.size, region.map_length),
                 [region.memfd])
        waiting = self.announcing.get(region.rid)
        if waiting is None:
            self.reply(conn, Msg.MAPPED, *reply)
        else:
            self.pause(conn)
            waiting.append(lambda: self.finish(conn, lambda: self.reply(conn, Msg.MAPPED,
                                                                          *reply)))

    def new_region(self, conn, key, opened):
        s = self.settings
        # Keyed by owner too: a client can write into a shared buffer through
        # its own userfaultfd (the kernel lets UFFDIO_COPY fill holes), so
        # users never share pages; processes of one user can ptrace each
        # other anyway.
        if self.regions.full:
            raise RequestError(errno.ENFILE, f"the server serves {len(self.regions)} regions "
                               "already, the most it may (--max-regions)")
        self.quota(conn, self.regions.per_user[conn.uid], s.max_user_regions, "regions",
                   "--max-user-regions")
        region = self.regions.create(key, next(self.ids), opened.size, s.page_size,
                                     opened.take_store(), opened.mode, opened.name,
                                     opened.url, opened.identity)
        if opened.url is not None:
            # A store's own read-ahead window, never less than the server's.
            region.window = max(s.read_ahead + 1, opened.window // s.page_size) \
                if s.read_ahead else 0
        # The first mapper's page size (or the store's) holds while the
        # region lives: a fault reads a whole region page.
        region.unit = max(1, (opened.page_size or s.page_size) // s.page_size)
        # Until every worker knows it, whoever maps it waits.
        self.announcing[region.rid] = []

        def announced():
            for then in self.announcing.pop(region.rid, ()):
                then()

        data, fds = region.message()
        try:
            self.tell(data, fds, None, announced)
        except OSError:
            # No worker has it (tell: all or none): as if it was never made.
            del self.announcing[region.rid]
            self.regions.release(region)
            raise
        return region

    def on_register(self, conn, values, payload, fds):
        mid, address, length = values
        mapping = conn.mappings.get(mid)
        if mapping is None:
            raise RequestError(errno.EINVAL, f"no mapping {mid} to register")
        if mapping.address is not None:
            raise RequestError(errno.EBUSY, f"mapping {mid} is registered already")
        region = mapping.region
        if length != region.map_length or address % SYSTEM_PAGE_SIZE or not address:
            raise RequestError(errno.EINVAL, f"mapping {mid} must be {region.map_length} "
                               "bytes at a page-aligned address")
        inode = region.memfd_inode
        if mapping.writable:
            self.quota(conn, self.writers_per_user[conn.uid], self.settings.max_user_writers,
                       "mappings that write", "--max-user-writers")
            # In the table before the client can write: whoever writes a page
            # back from now on protects it in this mapping first.
            try:
                self.add_writer(conn, region, address, length)
            except OSError:
                raise RequestError(errno.ENOSPC, "the server has the most mappings that "
                                   f"write it may ({lib.MPU_MAX_WRITERS})") from None
        uffd = os.dup(conn.uffd)  # the job's own: the connection may go meanwhile
        writable = mapping.writable
        # Mappings of the client's whose range this one's overlaps: unmapped,
        # their UNMAP still on its way (a threaded client's munmap and mmap
        # race; the kernel gives an address again), or still there in part.
        overlapping = [(other, other.address, other.region.map_length,
                        other.region.memfd_inode)
                       for other in conn.mappings.values()
                       if other is not mapping and other.address is not None
                       and other.address < address + length
                       and address < other.address + other.region.map_length]

        def register():
            try:
                if not maps_memfd(conn.pid, address, length, inode):
                    raise RequestError(errno.EINVAL, f"{address:#x} is not where the client "
                                       f"mapped region {region.rid}'s buffer")
                core.uffd_register(uffd, address, length, writable)
            finally:
                os.close(uffd)
            return [other for other, start, size, node in overlapping
                    if not maps_any_of(conn.pid, start, size, node)]

        def registered(gone, error):
            if conn.sock is None or mid not in conn.mappings:
                return
            self.resume(conn)
            if error is not None:
                if writable:
                    self.remove_writer(conn, region, address)
                self.refuse(conn, *failure(error))
                return
            for other in gone:
                # Served no more: its faults would go to its region, its
                # protection to this one's pages.
                if other.address is not None and conn.mappings.get(other.mid) is other:
                    if other.writable:
                        self.remove_writer(conn, other.region, other.address)
                    other.address = None
            mapping.address = address
            self.monitor.set_ranges(conn.slot, conn.ranges())
            self.reply(conn, Msg.REGISTERED, protocol.U64.pack(mid))

        self.pause(conn)
        self.offload.submit(conn.uid, register, registered, OFFLOAD_SECONDS,
                            discard=lambda: os.close(uffd))

    def add_writer(self, conn, region, address, length):
        """A mapping that writes goes in the buffer's table of writers,
        counted for its user (--max-user-writers)."""
        self.buffer.add_writer(region.slot, region.gen, conn.slot, conn.gen, address, length)
        self.writers_per_user[conn.uid] += 1

    def remove_writer(self, conn, region=None, address=0):
        """One mapping's entry out of the table (none if it went already),
        or with no address all the client's."""
        taken = self.buffer.remove_writer(conn.slot, conn.gen, region.slot if region else 0,
                                          region.gen if region else 0, address)
        self.writers_per_user[conn.uid] -= taken
        if self.writers_per_user[conn.uid] <= 0:
            del self.writers_per_user[conn.uid]

    def on_unmap(self, conn, values, payload, fds):
        (mid,) = values
        mapping = self.clients.remove_mapping(conn, mid)
        if mapping is None:
            raise RequestError(errno.EINVAL, f"no mapping {mid} to unmap")
        if mapping.address is not None:
            self.monitor.set_ranges(conn.slot, conn.ranges())
        if not mapping.writable:
            self.forget(conn, mapping)
            self.reply(conn, Msg.UNMAPPED, protocol.U64.pack(mid))
            return
        # A range the client unmapped before UNMAP needs no protecting while
        # its pages are written back, and would cost the evictor a
        # write-protect a page (mpu_uffd_writeprotect tries a range that is
        # gone page by page): four times the write-back.  One it keeps (the
        # C client's munmap that cuts into a mapping maps the file over the
        # rest only after UNMAPPED) stays protected: its writes go on.
        # /proc/PID/maps is read off the main loop (the client's mmap lock).
        region, address = mapping.region, mapping.address
        self.pause(conn)

        def write_back():
            # What it wrote is in the file when the client hears UNMAPPED,
            # as after munmap a read of the file sees what was written.
            self.forget(conn, mapping, self.answer_when_written(
                conn, mapping, Msg.UNMAPPED, lambda result: protocol.U64.pack(mid),
                f"unmapped, but writing back {region.name} failed (the server tries again)"))

        if address is None:
            write_back()
            return
        inode = region.memfd_inode

        def checked(mapped, error):
            # (Not known in time: kept, as when /proc says nothing.)
            if error is None and not mapped and conn.sock is not None:
                self.remove_writer(conn, region, address)
            write_back()

        self.offload.submit(conn.uid,
                            lambda: maps_any_of(conn.pid, address, region.map_length, inode),
                            checked, OFFLOAD_SECONDS)

    def answer_when_written(self, conn, mapping, kind, body, failed):
        """What a paused connection hears once a write-back it waits on is
        over: `kind` with body(result), or an ERROR saying `failed`; or,
        where pages of the mapping's region were dropped since it last
        heard (its file would not take them), an ERROR saying so."""
        def answer(result):
            if conn.sock is None:
                return
            self.resume(conn)
            region = mapping.region
            count, last = self.buffer.write_errors(region.slot, region.gen)
            if result < 0:
                self.refuse(conn, -result, f"{failed}: {os.strerror(-result)}")
            elif count > mapping.seen_errors:  # (0: released meanwhile)
                self.refuse(conn, last, f"pages written to {region.name} were dropped: the "
                            f"file would not take them ({os.strerror(last)})")
            else:
                self.reply(conn, kind, body(result))
            mapping.seen_errors = max(count, mapping.seen_errors)
        return answer

    def forget(self, conn, mapping, then=None):
        """A mapping is gone: the region goes too when it was the last.  The
        dirty pages of its region are written back first when it was the
        last or it could write; then(result) runs once that is done (the
        pages written, or -errno: then the region stays, and is written
        back again later, until that works)."""
        region = mapping.region
        region.mappings -= 1
        if region.write_fd < 0 or (region.mappings and not mapping.writable):
            if not region.mappings:
                self.release(region)
            if then:
                then(0)
            return

        def written(result):
            # A writer leaves the table only now: until its pages are
            # written back, they are protected in its range too, so that
            # nothing it writes meanwhile goes unseen.
            if mapping.writable and mapping.address is not None and conn.sock is not None:
                self.remove_writer(conn, mapping.region, mapping.address)
            if then:
                then(result)
        self.write_back_and_release(region, written)

    def write_back_and_release(self, region, then=None):
        """Write a region's dirty pages back; then(result) runs when that is
        over.  Released then if nobody maps it (mapped again meanwhile, it
        stays, with whatever is still dirty); if the write-back failed,
        tried again later (retry_write_backs)."""
        def written(result):
            region.write_backs -= 1
            released = self.regions.get(region.key) is not region
            if result == -errno.ESTALE and released:
                # Another write-back of it ended first and released it,
                # which only one of all of it that worked does, once
                # nobody maps it: these pages are in the file.
                result = 0
            if then:
                then(result)
            # The last write-back to end decides: one that ends earlier may
            # have passed pages that a mapping made since (mapped and gone
            # again meanwhile) wrote, which a later one writes.
            if region.mappings or released or region.write_backs:
                return
            if result >= 0:
                self.release(region)
            elif not self.writeback.stopped:
                self.unwritten[region.rid] = (time.monotonic() + RETRY_WRITE_BACK_SECONDS,
                                              region)
        if not region.mappings:
            # Released once written back: a page made dirty behind this
            # write-back (a late write fault, a thread writing as its
            # client's mapping goes) would be dropped with the region.
            self.buffer.seal_region(region.slot, region.gen)
        region.write_backs += 1
        self.writeback.flush(region, 0, region.npages, written)

    def retry_write_backs(self, now):
        """Regions whose last write-back failed (a full disk, an I/O error):
        tried again, and released once their pages are in their files."""
        for rid, (when, region) in list(self.unwritten.items()):
            if when <= now:
                del self.unwritten[rid]
                self.write_back_and_release(region)

    def release(self, region):
        drop = region.drop_message()
        self.regions.release(region)
        self.tell(drop, (), None)

    def on_flush(self, conn, values, payload, fds):
        mid, offset, length = values
        mapping = self.mapping_of(conn, mid, "flush")
        region = mapping.region
        if region.write_fd < 0:
            # Never mapped for writing: nothing to write back.
            self.reply(conn, Msg.FLUSHED, protocol.U64.pack(0))
            return
        first, end = region.pages_in(offset, length or region.size)
        self.pause(conn)
        self.writeback.flush(region, first, end - first, self.answer_when_written(
            conn, mapping, Msg.FLUSHED, protocol.U64.pack, f"writing back {region.name}"))

    def write_back_all(self):
        """Ask for every dirty page to be written back (the server stops):
        True when something was asked."""
        asked = False
        for region in self.regions:
            if region.write_fd >= 0:
                self.writeback.flush(region, 0, region.npages, lambda result: None)
                asked = True
        return asked

    def on_prefetch(self, conn, values, payload, fds):
        mid, offset, length = values
        mapping = self.mapping_of(conn, mid, "prefetch")
        self.reply(conn, Msg.PREFETCHING,
                   protocol.U64.pack(self.prefetch(mapping.region, offset, length)))

    def on_advise(self, conn, values, payload, fds):
        mid, offset, length, advice, _ = values
        mapping = self.mapping_of(conn, mid, "advise")
        try:
            advice = Advice(advice)
        except ValueError:
            raise RequestError(errno.EINVAL, f"unknown advice {advice}") from None
        region = mapping.region
        if advice == Advice.WILLNEED:
            pages = self.prefetch(region, offset, length)
        else:
            if offset != 0 or length not in (0, region.size):
                raise RequestError(errno.EINVAL, f"{advice.name} advice is for a whole "
                                   f"mapping (offset 0, length 0 or {region.size})")
            mapping.advice = advice
            if mapping.address is not None:
                self.monitor.set_ranges(conn.slot, conn.ranges())
            pages = 0
        self.reply(conn, Msg.ADVISED, protocol.U64.pack(pages))

    @staticmethod
    def mapping_of(conn, mid, what):
        mapping = conn.mappings.get(mid)
        if mapping is None:
            raise RequestError(errno.EINVAL, f"no mapping {mid} to {what}")
        return mapping

    def prefetch(self, region, offset, length):
        """Ask the fillers for [offset, offset + length) of a region, no
        more than the buffer has room for below the high watermark (what a
        prefetch costs follows the buffer, not the file); returns the umap
        pages asked for."""
        first, end = region.pages_in(offset, length)
        count = min(end - first, max(0, self.buffer.header.high - self.buffer.used))
        if count:
            # One message per filler: each fills the runs that fall to it.
            self.tell(protocol.W_FILL.pack(W.PREFETCH, region.slot, region.gen,
                                           prefetch_run(region.page_size), first, count),
                      (), "filler")
        return count

    def on_stats(self, conn, values, payload, fds):
        if len(payload) > protocol.MAX_SESSION:
            raise ProtocolError("STATS payload is a session tag of at most "
                                f"{protocol.MAX_SESSION} bytes")
        session = payload.decode("utf-8", "replace")
        viewer = None if self.privileged(conn.uid) else conn.uid
        # One packet must hold the reply: long lists are cut, busiest first.
        listed = LISTED
        while True:
            stats = server_stats(self.settings, self.buffer, self.clients, self.regions,
                                 self.workers(), self.started, viewer, listed,
                                 self.stores.names)
            if session:
                stats["session"] = self.clients.session_report(session, viewer)
            body = protocol.stats_payload(stats)
            if len(body) <= protocol.MAX_PAYLOAD or listed == 0:
                break
            listed //= 2
        self.reply(conn, Msg.STATS_REPLY, body)

    # -- for the arbiter ----------------------------------------------------------------

    def state_messages(self, role):
        """What a new worker must be told of the clients and regions there are."""
        messages = [(client_message(c), [c.uffd]) for c in self.clients.clients()]
        messages += [r.message() for r in self.regions]
        if role == "evictor":
            messages += [r.write_fd_message() for r in self.regions if r.write_fd >= 0]
        return messages

    def wake_all(self):
        """Wake every client thread waiting on a fault: those a dead filler
        was to answer fault again, and its successor serves them."""
        for conn in self.clients.clients():
            for mapping in conn.mappings.values():
                if mapping.address is not None:
                    core.uffd_wake(conn.uffd, mapping.address, mapping.region.map_length)

    def close(self):
        for conn in self.clients:
            self.drop(conn)
        self.selector.unregister(self.offload)
        self.offload.close()
        self.stores.close()
        os.close(self.pidfd)


def failure(error):
    """(errno, text) for a step that failed off the main loop."""
    if isinstance(error, TimeoutError):
        return errno.ETIMEDOUT, str(error)
    code = getattr(error, "errno", None) or errno.EIO
    return code, getattr(error, "strerror", None) or str(error)


def client_message(conn):
    return protocol.W_CLIENT.pack(W.ADD_CLIENT, conn.slot, conn.gen, 0)


class OpenedFile:
    """A client's file, checked and opened for the store off the main loop."""

    url = identity = None

    def __init__(self, dev, ino, size, name, store_fd, mode, page_size=None, write_fd=-1):
        self.dev, self.ino, self.size, self.name = dev, ino, size, name
        self.store_fd, self.mode, self.page_size = store_fd, mode, page_size
        self.write_fd = write_fd  # the client's descriptor, for a mapping that writes

    def key(self, uid):
        return (self.dev, self.ino, uid)

    def take_store(self):
        fd, self.store_fd = self.store_fd, None
        return fd

    def take_write_fd(self):
        fd, self.write_fd = self.write_fd, -1
        return fd

    def close(self):
        if self.store_fd is not None:
            close_aside(self.store_fd)
            self.store_fd = None
        if self.write_fd >= 0:
            close_aside(self.write_fd)
            self.write_fd = -1


def object_info(store, url):
    """What the store says of the object at url, asked in a child: the
    server never starts a store's client itself (see in_child); the fillers
    read through their own."""
    def ask():
        info = store.stat(url)
        return [info.size, info.identity]

    return ObjectInfo(*in_child(ask, OFFLOAD_SECONDS))


class OpenedObject:
    """An object a client named by URL, as its store says it is now: the
    region made for it is pinned to that identity."""

    mode = CALL

    def __init__(self, url, info, window, page_size):
        if info.size <= 0:
            raise RequestError(errno.EINVAL, f"cannot map an empty object: {shown(url)}")
        identity = str(info.identity)
        if len(identity.encode("utf-8", "surrogatepass")) > MAX_IDENTITY:
            # It goes to every worker with the region, in one message.
            raise RequestError(errno.EINVAL, f"{shown(url)}: the store's version of it (ETag) is "
                               f"longer than {MAX_IDENTITY} bytes")
        self.url, self.name = url, shown(url)
        self.size, self.identity = info.size, identity
        self.window, self.page_size = window, page_size

    def key(self, uid):
        return (self.url, self.identity, uid)

    def take_store(self):
        return -1

    def take_write_fd(self):
        return -1

    def close(self):
        pass


def open_for_map(fd, store_io, page_size=None, writable=False):
    """Check a descriptor a client sent with MAP and open its store; takes
    over fd (kept, for a mapping that writes, as the file to write back to).
    Runs in an offload thread: fstat may wait on a network file system."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(errno.EINVAL, "only regular files can be mapped")
        file_system = core.pseudo_fs_of(fd)
        if file_system:  # the server would read them as itself
            raise RequestError(errno.EINVAL, f"files of {file_system} are not served: what "
                               "they read depends on who reads them")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        if flags & getattr(os, "O_PATH", 0) or (flags & os.O_ACCMODE) == os.O_WRONLY:
            raise RequestError(errno.EBADF, "the file was not opened for reading")
        if writable and (flags & os.O_ACCMODE) != os.O_RDWR:
            raise RequestError(errno.EBADF, "a mapping that writes needs the file opened "
                               "for reading and writing")
        if writable and flags & os.O_APPEND:
            raise RequestError(errno.EACCES, "a file opened for appending cannot be "
                               "mapped for writing")
        if st.st_size == 0:
            raise RequestError(errno.EINVAL, "cannot map an empty file")
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = "?"
    except BaseException:
        close_aside(fd)
        raise
    write_fd = os.dup(fd) if writable else -1
    try:
        store_fd, mode = open_store(fd, store_io)
    except BaseException:
        if write_fd >= 0:
            close_aside(write_fd)
        raise
    return OpenedFile(st.st_dev, st.st_ino, st.st_size, name, store_fd, mode, page_size,
                      write_fd)


def supplementary_groups(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def hung_up(sock):
    """Whether the peer closed its end (after an empty read)."""
    poll = select.poll()
    poll.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR)
               for _, events in poll.poll(0))


def mappings_of(pid):
    """(start, end, offset, inode) of each mapping of the process, from
    /proc; OSError where it tells us nothing (another user's process, no
    access, gone)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            yield start, end, int(fields[2], 16), int(fields[4])


def maps_memfd(pid, address, length, inode):
    """Does the process map [address, address+length) from that memfd inode?

    When /proc tells us nothing the registration itself is the only check
    left."""
    try:
        for start, end, offset, node in mappings_of(pid):
            if start <= address < end:
                return start == address and end >= address + length and node == inode \
                    and offset == 0
    except OSError:
        return True
    return False


def maps_any_of(pid, address, length, inode):
    """Does any of [address, address+length) still map that memfd inode in
    the process?  True when /proc tells us nothing."""
    try:
        return any(start < address + length and end > address and node == inode
                   for start, end, _, node in mappings_of(pid))
    except OSError:
        return True
