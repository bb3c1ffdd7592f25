"""The server's socket, and the lock that makes one server its only owner."""
import errno
import fcntl
import logging
import os
import resource
import socket
import stat
import time

log = logging.getLogger("mpumap.arbiter")

BACKLOG = 128
# Out of descriptors, accept() fails at once and the socket stays readable:
# wait before trying again, longer each time.
BACKOFF_FIRST = 0.05
BACKOFF_MOST = 1.0
# A user who holds connections until they are closed as silent, and opens
# more at once, brings a spell without descriptors every few seconds: the
# log hears of one spell a minute at most.
SPELL_LOG_SECONDS = 60.0


class ServerRunning(RuntimeError):
    """Another server serves on this socket, or is starting there."""


class Listener:
    """The listening socket and `<socket>.lock`.

    Owns the socket, and the lock file with an flock held for the server's
    life: of two servers started at once on one stale socket, exactly one
    gets the lock and serves; the other stops, saying so.  A socket left by
    a server that died (nobody answers it) is taken over.

    While accept() fails for lack of descriptors the listener is paused
    (`paused_until`), so that the main loop neither spins nor logs every try;
    such spells are logged once a minute at most.
    """

    def __init__(self, path, mode, group=None):
        self.path = path
        self.lock_path = path + ".lock"
        self.paused_until = 0.0
        self._backoff = 0.0
        self._refused = 0  # tries that failed in this spell
        self._spell_logged = False
        self._unlogged_spells = 0
        self._log_again = 0.0  # when the next spell may be logged
        self._lock = self._take_lock()
        try:
            self.sock = self._bind(mode, group)
        except BaseException:
            self._release_lock()
            raise

    def fileno(self):
        return self.sock.fileno()

    def _take_lock(self):
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ServerRunning(f"a server is already running on {self.path} "
                                    f"(or starting: {self.lock_path} is locked)") from None
            except BaseException:
                os.close(fd)
                raise
            # The server before us may have removed the file between our open
            # and our lock: then the lock is on a file nobody else will find.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)

    def _bind(self, mode, group):
        if os.path.lexists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise RuntimeError(f"{self.path} is there and is not a socket: "
                                   "choose another --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            probe.settimeout(2.0)
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)  # left behind by a server that died
            except OSError:
                pass  # its queue is full (a flood), or it is odd: bind says
            else:
                raise ServerRunning(f"a server is already running on {self.path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Created with no access for others at all, then opened as far as
            # --socket-mode says: no moment where it is wider.
            umask = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(umask)
            if group is not None:
                os.chown(self.path, -1, group)
            os.chmod(self.path, mode)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ServerRunning(f"a server is already running on {self.path}") from None
            raise
        return sock

    def accept(self):
        """A new connection's socket, or None (nothing there, or paused)."""
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            # Out of descriptors or memory (or anything else): the socket
            # stays readable, and trying again at once would spin.
            self._pause(exc)
            return None
        if self._refused:
            if self._spell_logged:
                log.warning("accepting again, after %d tries failed", self._refused)
            self._refused = 0
            self._backoff = 0.0
        sock.setblocking(False)
        return sock

    def _pause(self, exc):
        now = time.monotonic()
        if not self._refused:  # a spell begins
            self._spell_logged = now >= self._log_again
            if self._spell_logged:
                more = (f" ({self._unlogged_spells} more spells like it since the last "
                        "one logged)" if self._unlogged_spells else "")
                # (Counting the descriptors open would take one.)
                log.error("accept: %s: no more connections for now (the limit is %d "
                          "descriptors); trying again in a while%s", exc.strerror,
                          resource.getrlimit(resource.RLIMIT_NOFILE)[0], more)
                self._log_again = now + SPELL_LOG_SECONDS
                self._unlogged_spells = 0
            else:
                self._unlogged_spells += 1
        self._refused += 1
        self._backoff = min(BACKOFF_MOST, max(BACKOFF_FIRST, 2 * self._backoff))
        self.paused_until = now + self._backoff

    def close(self):
        """Remove the socket and the lock file (the lock still held, so that
        no other server can have taken either), then let the lock go."""
        self.sock.close()
        for path in (self.path, self.lock_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._release_lock()

    def _release_lock(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
