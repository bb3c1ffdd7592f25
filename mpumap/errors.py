"""What mpumap raises.

Every error is an `MpumapError`: an OSError carrying the errno the server
(or the system) gave, and a message that says what happened.  Where Python
has a builtin exception for that errno, the error is also that builtin, as
PyNaCl clones builtin exceptions: a refusal for lack of rights is both
`mpumap.PermissionError` and the builtin `PermissionError`, so that
`except PermissionError`, `except mpumap.MpumapError` and `exc.errno` all
work.
"""
import builtins
import errno


class MpumapError(OSError):
    """A request mpumap could not do; `errno` says why."""


class ServerUnavailable(MpumapError, builtins.ConnectionError):
    """No server answers on the socket, or the connection to it is gone."""


class PermissionError(MpumapError, builtins.PermissionError):
    """Not allowed: the socket, the server's --allow lists, or the file."""


class FileNotFoundError(MpumapError, builtins.FileNotFoundError):
    """No such file (or socket)."""


class FileExistsError(MpumapError, builtins.FileExistsError):
    """Something is there already (a mapping at that address, say)."""


class TimeoutError(MpumapError, builtins.TimeoutError):
    """The server did not answer in time ($MPUMAP_TIMEOUT seconds)."""


_BY_ERRNO = {
    errno.EACCES: PermissionError,
    errno.EPERM: PermissionError,
    errno.ENOENT: FileNotFoundError,
    errno.EEXIST: FileExistsError,
    errno.ETIMEDOUT: TimeoutError,
    errno.ECONNREFUSED: ServerUnavailable,
    errno.ECONNRESET: ServerUnavailable,
    errno.ENOTCONN: ServerUnavailable,
    errno.EPIPE: ServerUnavailable,
}


def error(code, message):
    """The exception for an errno and a message: the class that matches the
    errno (as OSError's constructor picks builtins), else MpumapError."""
    return _BY_ERRNO.get(code, MpumapError)(code, message)
