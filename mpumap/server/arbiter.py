"""The arbiter: the server process's main loop and its children.

Shaped like gunicorn's arbiter.  Signals are queued by their handlers and
dealt with by the main loop; worker processes are known by pid, reaped with
waitpid(-1, WNOHANG) and started again when they die, or killed and started
again when their heartbeat stops.  Requests, clients, regions and statistics
are other parts' (requests.py, clients.py, regions.py, stats.py); the arbiter
builds them, runs the loop they live in, and supervises.
"""
import collections
import gc
import logging
import os
import resource
import selectors
import signal
import socket
import time

from mpumap.pbm import PageBuffer
from mpumap.protocol import close_all
from mpumap.server.clients import ClientTable
from mpumap.server.control import Channel, Countdown, duplicates
from mpumap.server.listener import Listener
from mpumap.server.monitor import FaultMonitor
from mpumap.server.regions import RegionTable
from mpumap.server.requests import RequestHandler
from mpumap.server.writeback import WriteBack
from mpumap.sizing import buffer_capacity, machine_limit
from mpumap.workers import ROLES

log = logging.getLogger("mpumap.arbiter")

WORKER_SOCKET_BUFFER = 4 << 20
STOP_GRACE_SECONDS = 2.0  # for workers to finish what they were given (stop: < 3 s)
# For the dirty pages to reach their files when the server stops (a second
# stop signal cuts it short).
WRITE_BACK_SECONDS = 300.0
QUICK_DEATH_SECONDS = 1.0
MAX_QUICK_DEATHS = 5
LOOP_SECONDS = 1.0  # the main loop wakes at least this often
RESPAWN_SECONDS = 1.0  # between tries to start a worker whose start failed
RESPAWN_GIVE_UP_SECONDS = 30.0  # ... and how long such tries go on: then the server stops
ABANDON_SECONDS = 5.0  # a hung worker that SIGKILL did not end by then is replaced anyway
ACCEPTS_PER_PASS = 32


class SpawnFailed(OSError):
    """No worker process could be made (fork, socketpair): nothing was."""


class Arbiter:
    """The server's supervisor.

    Owns: the listener (socket and lock), the selector, the signal wakeup
    pipe and the queue of signals; the worker processes, by pid, each with
    the arbiter's end of its socketpair (a Channel); the buffer segment and
    the evictors' eventfds; the fault monitor thread.  Builds the client and
    region tables and the request handler, which own what they hold.

    Invariants: a live worker is in `workers` (by pid) and `by_slot` (by
    role and index) until it is reaped, or abandoned (then it is in
    `abandoned` until reaped, and has no slot); the fault monitor sends a
    filler faults only once that filler was told every client and region
    that existed when it started (`_ready`); a worker whose heartbeat is
    older than --worker-timeout is killed, once, and replaced when reaped
    or abandoned.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD)

    # The system calls supervision goes through (unit tests replace them).
    fork = staticmethod(os.fork)
    waitpid = staticmethod(os.waitpid)
    kill = staticmethod(os.kill)

    def __init__(self, settings):
        self.settings = settings
        self.pid = os.getpid()
        self.started = time.time()
        self.selector = selectors.DefaultSelector()
        self.signals = collections.deque()
        self.workers = {}  # pid -> Worker
        self.abandoned = {}  # pid -> Worker: hung, killed, not ended, replaced
        self.by_slot = {}  # (role, index) -> Worker
        self.quick_deaths = collections.Counter()
        self.unstarted = {}  # (role, index) -> (when to try again, when it first failed)
        self.stopping = False
        self.stop_now = False
        self.exit_status = 0
        self.listener = self.monitor = self.handler = None
        self.writeback = WriteBack(self.post_to_evictor, settings.evictors)
        raise_descriptor_limit(settings.max_regions)
        self.evict_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                          for _ in range(settings.evictors)]
        self.buffer = PageBuffer.create(1, settings.high_water, settings.low_water,
                                        capacity=buffer_capacity(settings),
                                        max_regions=settings.max_regions)
        limit = settings.buffer_pages if not settings.adaptive else machine_limit(
            self.buffer, settings)
        self.buffer.set_limit(limit, settings.high_water, settings.low_water)
        self.clients = ClientTable(self.buffer)
        self.regions = RegionTable(self.buffer, settings.page_size)

    # -- life cycle ---------------------------------------------------------------

    def run(self):
        s = self.settings
        if s.cpus:
            # Before the monitor thread and the workers: they inherit it.
            os.sched_setaffinity(0, s.cpus)
        self.listener = Listener(s.socket, s.socket_mode, s.socket_group)
        try:
            self.selector.register(self.listener, selectors.EVENT_READ, self.on_listener)
            self.install_signals()
            self.monitor = FaultMonitor(self.buffer, s)
            self.handler = RequestHandler(s, self.buffer, self.selector, self.clients,
                                          self.regions, self.monitor, self.tell,
                                          lambda: list(self.by_slot.values()), self.started,
                                          self.writeback)
            if s.pidfile:
                with open(s.pidfile, "w") as f:
                    f.write(f"{self.pid}\n")
            for index in range(s.fillers):
                self.spawn("filler", index)
            for index in range(s.evictors):
                self.spawn("evictor", index)
            log.info("serving on %s: page %d B, buffer %s pages (%s), %d fillers, %d evictors",
                     s.socket, s.page_size, self.buffer.limit,
                     "adaptive" if s.adaptive else "fixed", s.fillers, s.evictors)
            while not self.stopping:
                for key, mask in self.selector.select(self.timeout()):
                    try:
                        key.data(mask)
                    except Exception:  # a bug must cost one event, not the server
                        log.exception("handling an event")
                self.handle_signals()
                self.housekeeping()
        finally:
            self.shutdown()
        return self.exit_status

    def timeout(self):
        """Until the main loop must look at the clock again."""
        now = time.monotonic()
        wake = [now + min(LOOP_SECONDS, self.settings.worker_timeout / 4)]
        deadline = self.handler.next_deadline() if self.handler is not None else None
        if deadline is not None:
            wake.append(deadline)
        if self.listener.paused_until > now:
            wake.append(self.listener.paused_until)
        return max(0.0, min(wake) - now)

    def housekeeping(self):
        now = time.monotonic()
        self.respawn_due(now)
        self.check_heartbeats()
        self._wake_if(self.regions.unstall_due(now))
        self.handler.expire(now)
        listening = self.selector.get_map().get(self.listener.fileno()) is not None
        if not listening and now >= self.listener.paused_until and not self.stopping:
            self.selector.register(self.listener, selectors.EVENT_READ, self.on_listener)

    def on_listener(self, mask):
        # Several at a time (a flood must not cost a pass of the loop per
        # connection), but a bounded number: requests come in between.
        for _ in range(ACCEPTS_PER_PASS):
            sock = self.listener.accept()
            if sock is None:
                break
            self.handler.accept(sock)
        if self.listener.paused_until > time.monotonic():
            self.selector.unregister(self.listener)

    # -- signals ------------------------------------------------------------------

    def install_signals(self):
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = (read_end, write_end)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            signal.signal(sig, self.queue_signal)
        self.selector.register(read_end, selectors.EVENT_READ, self.drain_wakeup)

    def queue_signal(self, signum, frame):
        # SIGCHLDs are one "reap" however many came; every other signal
        # counts (a second SIGINT stops at once).
        if signum != signal.SIGCHLD or signal.SIGCHLD not in self.signals:
            self.signals.append(signum)

    def drain_wakeup(self, mask):
        try:
            while os.read(self.wakeup[0], 512):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self):
        while self.signals:
            signum = self.signals.popleft()
            if signum == signal.SIGCHLD:
                self.reap()
            elif self.stopping:
                self.exit_status = 1
                self.stop_now = True
            else:
                log.info("%s: stopping", signal.Signals(signum).name)
                self.stopping = True

    def stop_at_once(self):
        """A second stop signal came while stopping (handled, or queued)."""
        return self.stop_now or any(sig != signal.SIGCHLD for sig in self.signals)

    # -- workers ------------------------------------------------------------------

    def spawn(self, role, index, restarted=False):
        """Start a worker for a slot; OSError (no memory or descriptors for
        it) leaves nothing behind."""
        state = []  # (data, its descriptors' duplicates), made while a failure costs nothing
        parent_sock = child_sock = None
        try:
            for data, fds in self.handler.state_messages(role):
                state.append((data, duplicates(fds, 1)[0]))
            parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for sock in (parent_sock, child_sock):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WORKER_SOCKET_BUFFER)
            worker = ROLES[role](index, self.settings, self.buffer, self.evict_fds, self.pid)
            self.buffer.beat(worker.heartbeat_slot)  # a fresh worker has a fresh heartbeat
            self.buffer.set_in_store(worker.heartbeat_slot)  # ... and is in no store
            # Keep the interpreter's pages shared with the child: nothing the
            # child's collector visits is copied for it.
            gc.freeze()
            try:
                pid = self.fork()
            finally:
                if os.getpid() == self.pid:
                    gc.unfreeze()
            if pid == 0:
                parent_sock.detach()
                worker.init_process(child_sock)  # never returns
        except BaseException as exc:
            for sock in (parent_sock, child_sock):
                if sock is not None:
                    sock.close()
            for _, fds in state:
                close_all(fds)
            if isinstance(exc, OSError):
                raise SpawnFailed(exc.errno, exc.strerror) from exc
            raise
        child_sock.close()
        worker.pid = pid
        worker.channel = Channel(parent_sock,
                                 lambda waiting: self._backlog_changed(worker, waiting))
        worker.restarted = restarted
        self.workers[pid] = worker
        self.by_slot[role, index] = worker
        self.selector.register(parent_sock, selectors.EVENT_READ,
                               lambda mask: self.on_worker(worker, mask))
        # What exists goes to it first; then (for a filler) the monitor may
        # send it faults, which can only name what it has heard of.
        done = Countdown(len(state), lambda: self._ready(worker))
        for data, fds in state:
            worker.channel.post(data, fds, done.done)
        log.debug("started %s", worker)
        return worker

    def _ready(self, worker):
        if self.workers.get(worker.pid) is not worker:
            return
        if worker.role == "evictor":
            self.writeback.evictor_started(worker.index)
            return
        self.monitor.set_filler(worker.index, worker.channel.fileno(), worker.heartbeat_slot)
        if worker.restarted:
            # Faults its predecessor was to answer, or that had nowhere to
            # go meanwhile: woken, the threads fault again, and it serves them.
            self.handler.wake_all()

    def tell(self, data, fds=(), role=None, then=None):
        """Post a message to every live worker (of a role); `then` runs once
        every one of them has it in its socket.  All or none: an OSError
        (no descriptor left to send `fds` with) comes before any has it."""
        targets = [w for w in self.by_slot.values() if role is None or w.role == role]
        copies = duplicates(fds, len(targets))
        done = Countdown(len(targets), then or (lambda: None))
        for worker, mine in zip(targets, copies):
            worker.channel.post(data, mine, done.done)

    def post_to_evictor(self, index, data):
        """A message for evictor `index` alone; False when none runs now
        (a successor is being started)."""
        worker = self.by_slot.get(("evictor", index))
        if worker is None:
            return False
        worker.channel.post(data)
        return True

    def _backlog_changed(self, worker, waiting):
        """A worker's channel has (or no longer has) messages waiting for
        room: watch its socket for writing too (or no longer)."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if waiting else 0)
        try:
            key = self.selector.get_key(worker.channel.sock)
            self.selector.modify(key.fileobj, events, key.data)
        except (KeyError, ValueError):
            pass  # being reaped

    def on_worker(self, worker, mask):
        if mask & selectors.EVENT_WRITE:
            worker.channel.flush()
        if mask & selectors.EVENT_READ:
            # Workers speak when an evictor has written back what it was
            # asked to, and by closing their end when they die.
            try:
                data = worker.channel.sock.recv(256)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.selector.unregister(worker.channel.sock)
            elif worker.role == "evictor":
                self.writeback.answered(data)

    def reap(self):
        while self.workers:
            try:
                pid, status = self.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                self._reap_abandoned(pid)
                continue
            self._forget(worker)
            how = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"status {os.waitstatus_to_exitcode(status)}")
            if self.stopping:
                log.debug("%s ended with %s", worker, how)
                self._gone_while_stopping(worker)
                continue
            log.warning("%s died with %s; starting another", worker, how)
            freed = self.regions.recover(pid)
            self._wake_if(self.regions.worker_ended(pid, False, time.monotonic()))
            if freed:
                log.info("took back %d pages that %s held", freed, worker)
            if worker.role == "evictor":
                # Write faults on the pages it was writing back wait for
                # them, parked when their file is stalled: those pages are
                # DIRTY again, to be opened.
                self.handler.wake_all()
            self.restart(worker)

    def _reap_abandoned(self, pid):
        worker = self.abandoned.pop(pid, None)
        if worker is None:
            return
        freed = self.regions.recover(pid)
        self._wake_if(self.regions.worker_ended(pid, True, time.monotonic()))
        log.warning("%s, left behind hung, has ended at last%s", worker,
                    f"; took back {freed} buffer pages it held" if freed else "")

    def _wake_if(self, unstalled):
        # Threads a stalled region's faults left waiting (no UFFDIO_POISON)
        # fault again, and are served.
        if unstalled:
            self.handler.wake_all()

    def _forget(self, worker):
        try:
            self.selector.unregister(worker.channel.sock)
        except (KeyError, ValueError):
            pass
        if self.by_slot.get((worker.role, worker.index)) is worker:
            del self.by_slot[worker.role, worker.index]
            if worker.role == "filler":
                self.monitor.set_filler(worker.index, -1)
        worker.channel.close()

    def restart(self, worker):
        slot = (worker.role, worker.index)
        if time.monotonic() - worker.started < QUICK_DEATH_SECONDS:
            self.quick_deaths[slot] += 1
        else:
            self.quick_deaths[slot] = 0
        if self.quick_deaths[slot] >= MAX_QUICK_DEATHS:
            log.error("%s %d died %d times right after starting: giving up and stopping "
                      "the server (its log above says why)", *slot, MAX_QUICK_DEATHS)
            self.stopping = True
            self.exit_status = 1
            return
        self.restart_slot(slot)

    def respawn_due(self, now):
        for slot, (when, _) in list(self.unstarted.items()):
            if now >= when and not self.stopping:
                self.restart_slot(slot)

    def restart_slot(self, slot):
        """A worker for a slot whose worker died.  If none can be made now
        (fork or socketpair failed: memory, descriptors), the slot is tried
        again every RESPAWN_SECONDS while the server serves on; after
        RESPAWN_GIVE_UP_SECONDS of that, the server stops, and its clients
        read their files themselves (a filler's share of the faults has
        nobody to serve it meanwhile)."""
        now = time.monotonic()
        _, since = self.unstarted.pop(slot, (None, now))
        try:
            self.spawn(*slot, restarted=True)
        except SpawnFailed as exc:
            if now - since >= RESPAWN_GIVE_UP_SECONDS:
                log.error("cannot start %s %d again (%s) for %.0f s: stopping the server",
                          *slot, exc.strerror, now - since)
                self.stopping = True
                self.exit_status = 1
                return
            log.error("cannot start %s %d again (%s): trying again in %g s", *slot,
                      exc.strerror, RESPAWN_SECONDS)
            self.unstarted[slot] = (now + RESPAWN_SECONDS, since)
            return
        self.buffer.add("restarts")

    def check_heartbeats(self):
        """Kill the workers that gave no sign of life for --worker-timeout
        seconds (a store read that hangs, a stopped process); they are
        replaced once reaped, through the path a crash takes.

        A worker caught in a read or write of a store first stalls that
        file (RegionTable.stall), so that no successor is caught in the same
        store, and every other file's clients are served on.  A worker that
        SIGKILL has not ended after ABANDON_SECONDS (a read the kernel does
        not interrupt: a FUSE daemon that hangs, some parallel file
        systems) is left behind and replaced all the same; the pages it
        claimed stay taken until it ends."""
        limit = int(self.settings.worker_timeout * 1e9)
        now = time.monotonic_ns()
        for worker in list(self.workers.values()):
            if worker.hung:
                if now - worker.hung >= ABANDON_SECONDS * 1e9:
                    self.abandon(worker)
                continue
            beat = self.buffer.heartbeat(worker.heartbeat_slot)
            silent = now - beat
            if silent <= limit:
                continue
            busy = self.buffer.in_store(worker.heartbeat_slot)
            if self.buffer.heartbeat(worker.heartbeat_slot) != beat:
                continue  # it went on meanwhile: `busy` may be a store that answers
            log.error("%s gave no sign of life for %.1f s (--worker-timeout): killing it",
                      worker, silent / 1e9)
            name = self.regions.stall(busy, worker.pid)
            if name is not None:
                log.error("%s: its store hung %s; until the store is tried again, the "
                          "file's pages that the buffer does not hold raise SIGBUS and its "
                          "write-backs fail (EIO), in every mapping of it", name, worker)
            worker.hung = now
            self.buffer.add("hangs")
            try:
                self.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def abandon(self, worker):
        log.error("%s has not ended %.0f s after SIGKILL (stuck in the kernel, in a store "
                  "that hangs): starting another beside it", worker, ABANDON_SECONDS)
        del self.workers[worker.pid]
        self.abandoned[worker.pid] = worker
        self._forget(worker)
        if self.stopping:
            self._gone_while_stopping(worker)
        else:
            self.restart(worker)

    def _gone_while_stopping(self, worker):
        if worker.role == "evictor":
            self.writeback.evictor_gone(worker.index)

    # -- stopping -----------------------------------------------------------------

    def write_back_all(self):
        """Every dirty page to its file before the server goes: the loop runs
        on (clients are served meanwhile) until the evictors have answered,
        for at most WRITE_BACK_SECONDS, or until a second stop signal."""
        if not self.handler.write_back_all():
            return
        log.info("writing dirty pages back before stopping")
        deadline = time.monotonic() + WRITE_BACK_SECONDS
        while self.writeback.pending and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.1):
                try:
                    key.data(mask)
                except Exception:
                    log.exception("handling an event")
            self.handle_signals()
            self.check_heartbeats()  # (a hung evictor is killed, and then not waited for)
            if self.stop_at_once() or not any(w.role == "evictor"
                                              for w in self.workers.values()):
                break
        if self.writeback.pending:
            log.error("stopping with %d write-backs unanswered", len(self.writeback.pending))
            self.writeback.abandon()

    def shutdown(self):
        """Stop accepting, write every dirty page back, let the workers
        finish what they were given and go (a worker that does not end in
        STOP_GRACE_SECONDS is killed), then release every client: their
        mappings fall back to the files, and what was written since the
        write-back their guards write there.  The workers go first: a
        write-back or a fill racing with a guard's copy could put stale
        bytes over what the guard wrote."""
        self.stopping = True
        if self.listener is not None:
            try:
                self.selector.unregister(self.listener)
            except (KeyError, ValueError):
                pass
            self.listener.close()
        if self.handler is not None:
            self.write_back_all()
        self.writeback.stopped = True
        self.stop_workers()
        if self.handler is not None:
            self.handler.close()
        if self.monitor is not None:
            self.monitor.stop()
        self.remove_pidfile()
        log.info("stopped")

    def stop_workers(self):
        # A worker that reads the end of its socket has done all it was told
        # before: in-flight fills finish, then it exits.
        for worker in self.workers.values():
            self._forget(worker)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.workers and time.monotonic() < deadline and not self.stop_at_once():
            self.reap()
            time.sleep(0.01)
        if self.stop_at_once():
            log.info("stopping at once")
            self.exit_status = 1
        for worker in self.workers.values():
            try:
                self.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # SIGKILL does not end a worker that the kernel keeps waiting (on a
        # FUSE daemon that hangs): such a one is left behind, not waited for.
        deadline = time.monotonic() + ABANDON_SECONDS
        while self.workers and time.monotonic() < deadline and not self.stop_at_once():
            try:
                pid, _ = self.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.01)
            self.workers.pop(pid, None)
        for worker in self.workers.values():
            log.error("%s has not ended %.0f s after SIGKILL (stuck in the kernel): left "
                      "behind", worker, ABANDON_SECONDS)

    def remove_pidfile(self):
        if self.settings.pidfile:
            try:
                with open(self.settings.pidfile) as f:
                    ours = f.read().strip() == str(self.pid)
                if ours:
                    os.unlink(self.settings.pidfile)
            except OSError:
                pass


# Descriptors a region holds in the server (its memfd and its file) and in
# a filler (the same two, and a buffered reader once the page cache has some).
REGION_DESCRIPTORS = 2


def raise_descriptor_limit(max_regions):
    """Every region costs the server and each worker descriptors: take all
    the descriptors the hard limit allows, and say so when that is too few
    for --max-regions (a map past the limit is refused, cleanly)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = REGION_DESCRIPTORS * max_regions + 256
    if hard < needed:
        log.warning("RLIMIT_NOFILE is %d: about %d regions fit, not --max-regions %d; "
                    "raise it to %d (ulimit -Hn, LimitNOFILE=) to serve them all",
                    hard, (hard - 256) // REGION_DESCRIPTORS, max_regions, needed)
