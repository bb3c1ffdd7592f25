"""The arbiter's supervision, with fork, waitpid and kill replaced by a table
of make-believe processes: reaping, restarting, giving up on a crash loop,
heartbeats, the signal queue.  (Real workers dying and hanging are in
tests/integration.)"""
import os
import signal
import time

import pytest

from mpumap import settings as S
from mpumap.server import arbiter as arbiter_module
from mpumap.server.arbiter import (ABANDON_SECONDS, MAX_QUICK_DEATHS, RESPAWN_GIVE_UP_SECONDS,
                                   Arbiter)


class Processes:
    """Children that exist only here: fork hands out pids, kill ends them,
    waitpid reports those that ended."""

    def __init__(self):
        self.next_pid = 1000
        self.alive = set()
        self.ended = []  # (pid, wait status)
        self.killed = []
        self.unkillable = set()  # stuck in the kernel: SIGKILL waits

    def fork(self):
        self.next_pid += 1
        self.alive.add(self.next_pid)
        return self.next_pid

    def kill(self, pid, sig):
        self.killed.append((pid, sig))
        if pid not in self.unkillable:
            self.end(pid, sig)  # a wait status whose low bits are a signal: killed by it

    def end(self, pid, status):
        if pid in self.alive:
            self.alive.remove(pid)
            self.ended.append((pid, status))

    def waitpid(self, pid, options):
        if self.ended:
            return self.ended.pop(0)
        if not self.alive:
            raise ChildProcessError
        assert options & os.WNOHANG, "the arbiter must never block on its children"
        return 0, 0


class Monitor:
    def __init__(self):
        self.fillers = {}

    def set_filler(self, index, fd, heartbeat_slot=-1):
        self.fillers[index] = fd


class Handler:
    def __init__(self):
        self.wakes = 0

    def state_messages(self, role):
        return [(b"\x04\0\0\0state", [])]  # one message: ready once it is sent

    def wake_all(self):
        self.wakes += 1


@pytest.fixture
def arbiter(monkeypatch):
    procs = Processes()
    monkeypatch.setattr(Arbiter, "fork", staticmethod(procs.fork))
    monkeypatch.setattr(Arbiter, "waitpid", staticmethod(procs.waitpid))
    monkeypatch.setattr(Arbiter, "kill", staticmethod(procs.kill))
    a = Arbiter(S.Settings(buffer_pages=64, fillers=2, evictors=1, worker_timeout=5))
    a.monitor, a.handler = Monitor(), Handler()
    a.procs = procs
    for index in range(2):
        a.spawn("filler", index)
    a.spawn("evictor", 0)
    yield a
    for worker in list(a.workers.values()):
        worker.channel.close()
    a.buffer.close()


def slot(arbiter, role, index):
    return arbiter.by_slot[role, index]


def test_workers_start_and_fillers_get_faults_once_told(arbiter):
    assert sorted(arbiter.by_slot) == [("evictor", 0), ("filler", 0), ("filler", 1)]
    assert set(arbiter.workers) == arbiter.procs.alive
    for index in range(2):
        assert arbiter.monitor.fillers[index] == slot(arbiter, "filler", index).channel.fileno()
    assert arbiter.handler.wakes == 0  # nothing to wake at the start


def test_a_dead_filler_is_reaped_replaced_and_its_clients_woken(arbiter):
    old = slot(arbiter, "filler", 0)
    old.started -= 10  # not a crash loop
    arbiter.procs.end(old.pid, 9)
    arbiter.reap()
    new = slot(arbiter, "filler", 0)
    assert new.pid != old.pid and new.pid in arbiter.workers and old.pid not in arbiter.workers
    assert new.restarted
    assert arbiter.monitor.fillers[0] == new.channel.fileno()
    assert arbiter.handler.wakes == 1
    assert arbiter.buffer.counter("restarts") == 1
    assert old.channel.sock.fileno() == -1  # its socket is closed


def test_a_worker_that_cannot_be_started_again_is_tried_again_later(arbiter, monkeypatch):
    old = slot(arbiter, "filler", 1)
    old.started -= 10
    fork = arbiter.procs.fork

    def no_memory():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(Arbiter, "fork", staticmethod(no_memory))
    arbiter.procs.end(old.pid, 9)
    arbiter.reap()
    assert not arbiter.stopping  # the server serves on without it
    assert ("filler", 1) not in arbiter.by_slot and arbiter.monitor.fillers[1] == -1
    arbiter.respawn_due(time.monotonic() + 10)  # fails again: still waiting
    assert list(arbiter.unstarted) == [("filler", 1)]
    monkeypatch.setattr(Arbiter, "fork", staticmethod(fork))
    arbiter.respawn_due(time.monotonic())  # not due yet
    assert ("filler", 1) not in arbiter.by_slot
    arbiter.respawn_due(time.monotonic() + 10)
    new = slot(arbiter, "filler", 1)
    assert new.restarted and new.pid in arbiter.procs.alive and not arbiter.unstarted
    assert arbiter.monitor.fillers[1] == new.channel.fileno()
    assert arbiter.buffer.counter("restarts") == 1
    assert not arbiter.stopping


def test_a_worker_that_cannot_be_started_for_long_stops_the_server(arbiter, monkeypatch):
    old = slot(arbiter, "evictor", 0)
    old.started -= 10

    def no_memory():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(Arbiter, "fork", staticmethod(no_memory))
    arbiter.procs.end(old.pid, 9)
    arbiter.reap()
    when, since = arbiter.unstarted["evictor", 0]
    monkeypatch.setattr(time, "monotonic", lambda: since + RESPAWN_GIVE_UP_SECONDS + 1)
    arbiter.respawn_due(since + RESPAWN_GIVE_UP_SECONDS + 1)
    assert arbiter.stopping and arbiter.exit_status == 1


def test_a_worker_that_dies_at_once_again_and_again_stops_the_server(arbiter):
    for death in range(MAX_QUICK_DEATHS):
        assert not arbiter.stopping
        worker = slot(arbiter, "evictor", 0)
        arbiter.procs.end(worker.pid, 1 << 8)  # exit status 1, right after starting
        arbiter.reap()
    assert arbiter.stopping and arbiter.exit_status == 1
    assert ("evictor", 0) not in arbiter.by_slot


def test_a_silent_worker_is_killed_once_and_replaced(arbiter):
    quiet = slot(arbiter, "filler", 1)
    quiet.started -= 10
    ten_seconds_ago = time.monotonic_ns() - 10 * 10**9
    arbiter.buffer.header.heartbeat[quiet.heartbeat_slot] = ten_seconds_ago
    others = [w for w in arbiter.workers.values() if w is not quiet]
    for w in others:
        arbiter.buffer.beat(w.heartbeat_slot)
    arbiter.check_heartbeats()
    assert arbiter.procs.killed == [(quiet.pid, signal.SIGKILL)]
    arbiter.check_heartbeats()
    assert len(arbiter.procs.killed) == 1  # once
    assert arbiter.buffer.counter("hangs") == 1
    arbiter.reap()
    assert slot(arbiter, "filler", 1).pid != quiet.pid
    assert all(w.pid in arbiter.workers for w in others)


def test_a_hung_worker_that_sigkill_cannot_end_is_replaced_beside_it(arbiter, monkeypatch):
    stuck = slot(arbiter, "filler", 0)
    stuck.started -= 10
    arbiter.procs.unkillable.add(stuck.pid)
    arbiter.buffer.header.heartbeat[stuck.heartbeat_slot] = time.monotonic_ns() - 10 * 10**9
    for w in arbiter.workers.values():
        if w is not stuck:
            arbiter.buffer.beat(w.heartbeat_slot)
    arbiter.check_heartbeats()
    arbiter.reap()
    assert slot(arbiter, "filler", 0) is stuck  # killed, not ended: it still holds the slot
    later = time.monotonic_ns() + int(ABANDON_SECONDS * 1e9) + 1
    monkeypatch.setattr(time, "monotonic_ns", lambda: later)
    for w in arbiter.workers.values():
        if w is not stuck:
            arbiter.buffer.header.heartbeat[w.heartbeat_slot] = later
    arbiter.check_heartbeats()
    new = slot(arbiter, "filler", 0)
    assert new is not stuck and new.restarted and new.pid in arbiter.workers
    assert stuck.pid not in arbiter.workers and arbiter.abandoned == {stuck.pid: stuck}
    assert arbiter.monitor.fillers[0] == new.channel.fileno()
    assert arbiter.procs.killed == [(stuck.pid, signal.SIGKILL)]  # once
    # Its read ends at last: reaped, nothing replaced again.
    arbiter.procs.unkillable.discard(stuck.pid)
    arbiter.procs.end(stuck.pid, signal.SIGKILL)
    arbiter.reap()
    assert not arbiter.abandoned and slot(arbiter, "filler", 0) is new
    assert arbiter.buffer.counter("restarts") == 1


def test_stopping_does_not_wait_for_a_worker_sigkill_cannot_end(arbiter, monkeypatch):
    monkeypatch.setattr(arbiter_module, "STOP_GRACE_SECONDS", 0.05)
    monkeypatch.setattr(arbiter_module, "ABANDON_SECONDS", 0.2)
    stuck = slot(arbiter, "evictor", 0)
    arbiter.procs.unkillable.add(stuck.pid)
    arbiter.stopping = True
    started = time.monotonic()
    arbiter.stop_workers()
    assert time.monotonic() - started < 2
    assert list(arbiter.workers) == [stuck.pid]  # left behind
    assert (stuck.pid, signal.SIGKILL) in arbiter.procs.killed


def test_stopping_reaps_without_replacing(arbiter):
    arbiter.stopping = True
    worker = slot(arbiter, "filler", 0)
    arbiter.procs.end(worker.pid, 0)
    arbiter.reap()
    assert ("filler", 0) not in arbiter.by_slot
    assert arbiter.buffer.counter("restarts") == 0


def test_signals_wait_in_a_queue_and_sigchld_counts_once(arbiter):
    for _ in range(20):
        arbiter.queue_signal(signal.SIGCHLD, None)
    arbiter.queue_signal(signal.SIGINT, None)
    arbiter.queue_signal(signal.SIGCHLD, None)  # one is queued already
    assert list(arbiter.signals) == [signal.SIGCHLD, signal.SIGINT]
    arbiter.handle_signals()
    assert arbiter.stopping and arbiter.exit_status == 0
    arbiter.queue_signal(signal.SIGHUP, None)
    assert arbiter.stop_at_once()
    arbiter.handle_signals()
    assert arbiter.exit_status == 1  # a second signal while stopping
    assert arbiter.stop_at_once()  # even once it was handled
