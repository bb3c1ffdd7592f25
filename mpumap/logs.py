"""The server's log: one line per event on stderr, each naming who speaks
(arbiter, requests, monitor, filler0, evictor1, ...), whichever process."""
import logging
import sys
import time

FORMAT = "%(asctime)s mpumap-server[%(process)d] %(who)s %(levelname)s: %(message)s"


class _Who(logging.Filter):
    """Adds `who`: the logger's name without the package's prefix."""

    def filter(self, record):
        record.who = record.name.removeprefix("mpumap.")
        return True


def configure(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_Who())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class Quiet:
    """Says each kind of thing (a key) once per `seconds` at most, and with
    the next line how many like it were not said: a cause that repeats
    thousands of times a second must not fill the log.  Keeps the keys of
    the last `seconds` only, once there are more than `most`."""

    def __init__(self, log, seconds, most=10000):
        self.log, self.seconds, self.most = log, seconds, most
        self._until = {}  # key -> (when to speak again, lines not said since)

    def say(self, key, level, fmt, *args):
        now = time.monotonic()
        until, quiet = self._until.get(key, (0.0, 0))
        if now < until:
            self._until[key] = (until, quiet + 1)
            return
        if quiet:
            fmt += f" (and {quiet} more like it in the last {self.seconds:.0f} s)"
        self.log.log(level, fmt, *args)
        self._until[key] = (now + self.seconds, 0)
        if len(self._until) > self.most:
            self._until = {k: v for k, v in self._until.items() if v[0] > now}
