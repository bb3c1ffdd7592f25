"""The server's log: one line per event on stderr, each naming who speaks
(arbiter, requests, monitor, filler0, evictor1, ...), whichever process."""
import logging
import sys

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
