"""mpumap: many processes, one bounded page buffer for large files."""

__version__ = "0.1.0"

from mpumap.client import (  # noqa: E402
    Client,
    Mapping,
    ServerSettings,
    connect,
    server_stats,
)
from mpumap.errors import (  # noqa: E402, F401  (the builtin-named ones: see __all__)
    FileExistsError,
    FileNotFoundError,
    MpumapError,
    PermissionError,
    ServerUnavailable,
    TimeoutError,
)

# Not the classes named after builtins (mpumap.PermissionError, ...): a
# `from mpumap import *` must not shadow the builtins in the caller's module.
__all__ = [
    "Client",
    "Mapping",
    "MpumapError",
    "ServerSettings",
    "ServerUnavailable",
    "connect",
    "server_stats",
    "__version__",
]
