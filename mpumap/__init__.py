"""mpumap: many processes, one bounded page buffer for large files."""

__version__ = "0.1.0"

from mpumap.client import (  # noqa: E402
    Client,
    Mapping,
    ServerSettings,
    connect,
    server_stats,
)
from mpumap.errors import (  # noqa: E402
    FileExistsError,
    FileNotFoundError,
    MpumapError,
    PermissionError,
    ServerUnavailable,
    TimeoutError,
)

__all__ = [
    "Client",
    "FileExistsError",
    "FileNotFoundError",
    "Mapping",
    "MpumapError",
    "PermissionError",
    "ServerSettings",
    "ServerUnavailable",
    "TimeoutError",
    "connect",
    "server_stats",
    "__version__",
]
