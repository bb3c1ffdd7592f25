"""mpumap: many processes, one bounded page buffer for large files."""

__version__ = "0.1.0"

from mpumap.client import (  # noqa: E402
    Client,
    Mapping,
    MpumapError,
    ServerSettings,
    ServerUnavailable,
    connect,
    server_stats,
)

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
