"""Work that may block, done off the main loop.

Opening a client's file for the store can wait (a hung NFS server); so can
reading another process's /proc/<pid>/maps, or registering a range of its
address space.  Such steps run in threads, bounded in number and in time,
and their results come back to the main loop, which alone touches the
server's tables.  What must not run in the server's process at all (a
store's client) runs in a child forked for it (`in_child`).
"""
import collections
import errno
import json
import os
import queue
import select
import signal
import threading
import time

from mpumap import core


class Job:
    __slots__ = ("uid", "fn", "done", "abandon", "discard", "deadline", "result", "error",
                 "state")

    def __init__(self, uid, fn, done, abandon, discard, deadline):
        self.uid = uid
        self.fn = fn
        self.done = done
        self.abandon = abandon
        self.discard = discard
        self.deadline = deadline
        self.result = self.error = None
        self.state = "waiting"  # -> running -> (finished | given up)


class Offload:
    """Threads that run blocking steps, and the way back to the main loop.

    Owns a pipe whose read end the main loop watches (`fileno`), and the jobs
    waiting or under way.  A job runs `fn()` in a thread; the main loop then
    calls `done(result, error)`.  A job not finished by its deadline is
    given up: `done(None, TimeoutError)` at once, and whatever `fn` returns
    later goes to `abandon(result)` (to close what it opened); one given up
    before it ran calls `discard()` (to close what it was given).

    Bounds: at most `per_user` threads of one user and `total` threads at
    once (a job given up holds its thread until the thread ends); a job
    beyond them waits its turn, users taking turns.  So threads stuck on a
    dead file system are few, and one user's cannot keep another's from
    running.
    """

    def __init__(self, total=32, per_user=4):
        self.total = total
        self.per_user = per_user
        self._waiting = collections.deque()
        self._running = set()
        self._users = collections.Counter()  # uid -> threads
        self._finished = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self):
        return self._wake_read

    def submit(self, uid, fn, done, seconds, abandon=None, discard=None):
        self._waiting.append(Job(uid, fn, done, abandon, discard, time.monotonic() + seconds))
        self._start()

    def _start(self):
        """Start the waiting jobs there is room for, oldest first."""
        skipped = collections.deque()
        try:
            while self._waiting and len(self._running) < self.total:
                job = self._waiting.popleft()
                if self._users[job.uid] >= self.per_user:
                    skipped.append(job)
                    continue
                try:
                    threading.Thread(target=self._run, args=(job,), name="mpumap-offload",
                                     daemon=True).start()
                except RuntimeError:
                    # No thread to be had (the process's limit): the job
                    # waits for one to end, or for its deadline.
                    self._waiting.appendleft(job)
                    break
                # (Its end is handed over by `finished`, on this thread too.)
                job.state = "running"
                self._running.add(job)
                self._users[job.uid] += 1
        finally:
            skipped.extend(self._waiting)
            self._waiting = skipped

    def _run(self, job):
        try:
            job.result = job.fn()
        except BaseException as exc:  # handed to the main loop, which says what
            job.error = exc
        self._finished.put(job)
        try:
            os.write(self._wake_write, b"x")
        except OSError:
            pass  # full: the main loop is awake already

    def finished(self):
        """Hand the main loop what finished (call when fileno is readable)."""
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                job = self._finished.get_nowait()
            except queue.Empty:
                break
            self._running.discard(job)
            self._users[job.uid] -= 1
            if self._users[job.uid] <= 0:
                del self._users[job.uid]
            if job.state == "running":
                job.state = "finished"
                job.done(job.result, job.error)
            elif job.abandon and job.error is None:
                job.abandon(job.result)
        self._start()

    def expire(self, now):
        """Give up the jobs past their deadline, waiting or running."""
        late = [j for j in list(self._waiting) + list(self._running)
                if j.state in ("waiting", "running") and j.deadline <= now]
        for job in late:
            if job.state == "waiting":
                self._waiting.remove(job)
                if job.discard:
                    job.discard()
            job.state = "given up"
            job.done(None, TimeoutError("it took too long (a file system that does "
                                        "not answer?)"))

    def next_deadline(self):
        jobs = [j for j in list(self._waiting) + list(self._running)
                if j.state in ("waiting", "running")]
        return min((j.deadline for j in jobs), default=None)

    def close(self):
        os.close(self._wake_read)
        os.close(self._wake_write)


def in_child(fn, seconds):
    """fn() run in a child process forked for it: its result (what JSON
    carries), or the OSError it raised, raised here; TimeoutError, with
    the child killed, after `seconds`.

    For a store's client library, which the server must not run itself: it
    may start threads that a fork does not copy (obstore's tokio runtime),
    and a worker the server forks later would find it unusable, each of its
    reads hanging.  Call it from an offload thread: it waits.  The arbiter
    reaps the child, as it reaps every child that ends."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # pragma: no cover (the child's coverage is not collected)
        _child(fn, write_end, parent, seconds)
    os.close(write_end)
    deadline = time.monotonic() + seconds
    data = b""
    poller = select.poll()  # (select.select takes no descriptor past 1023)
    poller.register(read_end, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                # No end of the pipe, which only the child holds: it has not
                # exited, so the pid is still its own.
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"no answer in {seconds:g} s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
    try:
        reply = json.loads(data)
    except ValueError:
        raise OSError(errno.EIO, "the child that asked died without a word") from None
    if "errno" in reply:
        raise OSError(reply["errno"], reply["message"])
    return reply["result"]


def _child(fn, write_end, parent, seconds):
    status = 1
    try:
        # (Nor another call's pipe, whose end it would hold open.)
        core.leave_server({0, 1, 2, write_end}, parent)
        signal.alarm(max(1, int(seconds + 1)))  # a deadline of its own, too
        try:
            reply = {"result": fn()}
        except OSError as exc:
            reply = {"errno": exc.errno or errno.EIO, "message": exc.strerror or str(exc)}
        except Exception as exc:
            reply = {"errno": errno.EIO, "message": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(reply).encode()
        while data:
            data = data[os.write(write_end, data):]
        # Closed here, not by the exit: a close of a store's descriptor that
        # hangs on a thread (leave_server) keeps the exit from closing it,
        # and the parent reads to its end.
        os.close(write_end)
        status = 0
    finally:
        os._exit(status)  # nothing of the server's to clean up: it is the parent's
