"""One settings object, from command-line flags and MP-UMap's UMAP_* variables.

Parsing and validation live here, apart from click, so that the rules are the
same for every entry point and can be tested as pure functions.
"""
import dataclasses
import os
import re

SYSTEM_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_SOCKET = "/tmp/mpumap.sock"
DEFAULT_PAGE_SIZE = SYSTEM_PAGE_SIZE
DEFAULT_FILLERS = max(1, min(4, os.cpu_count() or 1))
DEFAULT_EVICTORS = 1
DEFAULT_HIGH_WATER = 90
DEFAULT_LOW_WATER = 70
DEFAULT_ADAPT_INTERVAL = 3.0
DEFAULT_READ_AHEAD_BYTES = 1 << 20
DEFAULT_SPIN_US = 100
MAX_SPIN_US = 10_000
DEFAULT_STORE_IO = "direct"
DEFAULT_MAX_REGIONS = 4096
DEFAULT_MAX_CLIENT_MAPPINGS = 1024
DEFAULT_SOCKET_MODE = 0o600
MAX_WORKERS = 64
MAX_READ_AHEAD = 1024

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class SettingError(ValueError):
    """A setting's value is not acceptable; the message says why."""


def socket_path(explicit=None):
    """--socket, else MPUMAP_SOCKET, else the default."""
    return explicit or os.environ.get("MPUMAP_SOCKET") or DEFAULT_SOCKET


def parse_size(text):
    """'4096', '64K', '256M', '2GiB' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise SettingError(f"{text!r} is not a size (try 65536, 64K, 256M or 2G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_page_size(text):
    size = parse_size(text)
    if size <= 0 or size % SYSTEM_PAGE_SIZE:
        raise SettingError(
            f"page size {text} must be a positive multiple of the system page size "
            f"({SYSTEM_PAGE_SIZE})"
        )
    return size


def parse_buffer_pages(text, page_size):
    """A bare number counts umap pages (as UMAP_BUFSIZE does); a number with a
    unit is a size in bytes, rounded down to whole pages."""
    text = str(text).strip()
    if text.isdigit():
        pages = int(text)
    else:
        pages = parse_size(text) // page_size
    if pages <= 0:
        raise SettingError(f"buffer size {text} holds no page of {page_size} bytes")
    return pages


def parse_mode(text):
    """An octal file mode such as 0660 or 660."""
    try:
        mode = int(str(text), 8)
    except ValueError:
        raise SettingError(f"{text!r} is not an octal mode (try 0600, 0660 or 0666)") from None
    if not 0 <= mode <= 0o777:
        raise SettingError(f"mode {text} is out of range")
    return mode


def _name_or_id(text, lookup, what):
    text = str(text).strip()
    if text.isdigit():
        return int(text)
    try:
        return lookup(text)
    except KeyError:
        raise SettingError(f"no {what} {text!r} here") from None


def parse_user(text):
    """A user name or a uid."""
    import pwd

    return _name_or_id(text, lambda name: pwd.getpwnam(name).pw_uid, "user")


def parse_group(text):
    """A group name or a gid."""
    import grp

    return _name_or_id(text, lambda name: grp.getgrnam(name).gr_gid, "group")


def parse_cpus(text):
    """A CPU list such as 0, 0-1 or 0,2-3, as taskset takes it."""
    cpus = set()
    try:
        for part in str(text).split(","):
            first, _, last = part.strip().partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise SettingError(f"{text!r} is not a CPU list (try 0, 0-1 or 0,2-3)") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise SettingError(f"CPUs {text} are not all among this machine's {sorted(allowed)}")
    return tuple(sorted(cpus))


def parse_count(text, what, low=1, high=MAX_WORKERS):
    try:
        value = int(str(text).strip())
    except ValueError:
        raise SettingError(f"{what} must be a whole number, not {text!r}") from None
    if not low <= value <= high:
        raise SettingError(f"{what} must be between {low} and {high}, not {value}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    socket: str = DEFAULT_SOCKET
    page_size: int = DEFAULT_PAGE_SIZE
    buffer_pages: int | None = None  # None: follow the machine's free memory
    fillers: int = DEFAULT_FILLERS
    evictors: int = DEFAULT_EVICTORS
    high_water: int = DEFAULT_HIGH_WATER
    low_water: int = DEFAULT_LOW_WATER
    adapt_interval: float = DEFAULT_ADAPT_INTERVAL
    memory_reserve: int | None = None  # None: default_reserve() of the memory there is
    read_ahead: int | None = None  # None: default_read_ahead()
    spin_us: int = DEFAULT_SPIN_US
    store_io: str = DEFAULT_STORE_IO
    max_regions: int = DEFAULT_MAX_REGIONS
    max_client_mappings: int = DEFAULT_MAX_CLIENT_MAPPINGS
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: int | None = None
    allow_uids: tuple = ()
    allow_gids: tuple = ()
    cpus: tuple = ()  # empty: wherever the scheduler likes
    pidfile: str | None = None
    worker_timeout: float = 30.0
    max_user_connections: int = 1024
    max_user_clients: int = 512
    max_user_regions: int = 512
    max_user_mappings: int = 8192

    def __post_init__(self):
        if not 0 <= self.low_water < self.high_water <= 100:
            raise SettingError(
                f"the watermarks need 0 <= low < high <= 100 "
                f"(low {self.low_water}, high {self.high_water})"
            )
        if self.buffer_pages is not None and self.buffer_pages < self.min_buffer_pages:
            raise SettingError(
                f"a buffer of {self.buffer_pages} pages is too small for "
                f"{self.fillers} fillers: give it at least {self.min_buffer_pages}"
            )
        if self.read_ahead is None:
            object.__setattr__(self, "read_ahead",
                               default_read_ahead(self.page_size, self.buffer_pages))
        if self.adapt_interval <= 0:
            raise SettingError("the adaptation interval must be positive")
        if self.store_io not in ("direct", "drop", "cached"):
            raise SettingError(f"store I/O must be direct, drop or cached, not {self.store_io!r}")
        if self.buffer_pages is not None and self.read_ahead >= self.buffer_pages // 2:
            raise SettingError(f"read-ahead of {self.read_ahead} pages needs a buffer of more "
                               f"than {2 * self.read_ahead} pages")

    @property
    def min_buffer_pages(self):
        # Every filler may hold a page while evictors need something to evict.
        return 2 * self.fillers + 2

    @property
    def adaptive(self):
        return self.buffer_pages is None

    def public(self):
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name not in ("allow_uids", "allow_gids", "pidfile")}
        shown["cpus"] = list(self.cpus)
        shown["adaptive"] = self.adaptive
        return shown


def default_read_ahead(page_size, buffer_pages=None):
    """Pages a scan reads after a faulting page, at most: a window of 1 MiB
    (none for pages that big), and no more than a quarter of a fixed buffer."""
    pages = DEFAULT_READ_AHEAD_BYTES // page_size - 1
    if buffer_pages is not None:
        pages = min(pages, buffer_pages // 4 - 1)
    return max(0, min(pages, MAX_READ_AHEAD))


def default_reserve(total_memory):
    """Memory the adaptive buffer leaves to everything else: 10% of the
    memory there is, at least 64 MiB (or a quarter, when that is less) and
    at most 4 GiB."""
    return max(min(64 << 20, total_memory // 4), min(4 << 30, total_memory // 10))


def adaptive_limit(used_pages, page_size, available, total, cgroup, reserve, minimum):
    """The buffer's size in pages when it follows the machine's free memory.

    The kernel does not count the buffer's pages as available, so on the
    machine the limit is what the buffer holds plus what is still available,
    less the reserve.  In a memory cgroup (limit, usage) the buffer may use
    the limit less everything else charged there, less the reserve: whether
    the buffer's pages are charged to the cgroup or not (a page is charged to
    the process whose fault allocated it), that keeps it under the limit.
    reserve None is default_reserve() of the smaller of RAM and the cgroup.
    """
    held = used_pages * page_size
    if reserve is None:
        reserve = default_reserve(total if cgroup is None else min(total, cgroup[0]))
    room = held + available - reserve
    if cgroup is not None:
        limit, usage = cgroup
        room = min(room, limit - max(0, usage - held) - reserve)
    return max(minimum, room // page_size)
