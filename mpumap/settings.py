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
MAX_WORKERS = 64

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
    memory_reserve: int | None = None  # None: default_reserve()

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
        if self.adapt_interval <= 0:
            raise SettingError("the adaptation interval must be positive")

    @property
    def min_buffer_pages(self):
        # Every filler may hold a page while evictors need something to evict.
        return 2 * self.fillers + 2

    @property
    def adaptive(self):
        return self.buffer_pages is None


def default_reserve(total_memory):
    """Memory the adaptive buffer leaves to everything else: 10% of the
    machine, at least 256 MiB and at most 4 GiB."""
    return max(256 << 20, min(4 << 30, total_memory // 10))


def adaptive_limit(used_pages, page_size, available, cgroup_room, reserve, minimum):
    """The buffer's size in pages when it follows the machine's free memory.

    The pages the buffer holds are not counted as available by the kernel,
    so the limit is what it holds plus what is still free (in the machine,
    and in the cgroup when that is tighter), less the reserve.
    """
    spare = available if cgroup_room is None else min(available, cgroup_room)
    return max(minimum, used_pages + (spare - reserve) // page_size)
