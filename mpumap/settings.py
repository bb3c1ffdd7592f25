"""The server's settings, each declared once in SPECS.

A spec says where a setting comes from (a flag of mpumap-server, and the
environment variable MP-UMap uses for it), how its text is parsed, its
default and what it means.  From the table come the click options
(mpumap/cli.py), the Settings class the server and its workers read, what
the server's status reports (`Settings.public`), and the README's table
(`python -m mpumap.settings --markdown`).  Adding a setting is one entry
here, and its use.

Parsing and validation live here, apart from click, so that the rules are the
same for every entry point and can be tested as pure functions.
"""
import dataclasses
import os
import re
import sys
from typing import Any, Callable

from mpumap._core import lib
from mpumap.protocol import DEFAULT_SOCKET, socket_path  # noqa: F401  (mpumap-server's too)

SYSTEM_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_READ_AHEAD_BYTES = 1 << 20
MAX_WORKERS = lib.MPU_MAX_WORKERS
MAX_WRITERS = lib.MPU_MAX_WRITERS
MAX_READ_AHEAD = 1024
MAX_SPIN_US = 10_000
STORE_MODES = ("direct", "drop", "cached")
FILL_WAYS = ("copy", "write")
LOG_LEVELS = ("debug", "info", "warning", "error")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


class SettingError(ValueError):
    """A setting's value is not acceptable; the message says why."""


# ---- parsers: text -> value, or SettingError -------------------------------


def parse_size(text):
    """'4096', '64K', '256M', '2GiB' -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise SettingError(f"{text!r} is not a size (try 65536, 64K, 256M or 2G)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_socket(text):
    """A Unix socket's path: not empty, and short enough for sun_path."""
    if not text or len(os.fsencode(text)) > 107:
        raise SettingError(f"a socket path must be 1 to 107 bytes long, not {len(text)}")
    return text


def parse_page_size(text):
    size = parse_size(text)
    if size <= 0 or size % SYSTEM_PAGE_SIZE:
        raise SettingError(
            f"page size {text} must be a positive multiple of the system page size "
            f"({SYSTEM_PAGE_SIZE})"
        )
    return size


class Bytes(int):
    """A buffer size given in bytes (with a unit), to be made pages once the
    page size is known."""


def parse_buffer_size(text):
    """A bare number counts umap pages (as UMAP_BUFSIZE does); a number with
    a unit is a size in bytes, rounded down to whole pages later."""
    text = str(text).strip()
    return int(text) if text.isdigit() else Bytes(parse_size(text))


def parse_buffer_pages(text, page_size):
    """The buffer's size in pages, from what --buffer-size takes."""
    value = parse_buffer_size(text)
    pages = value // page_size if isinstance(value, Bytes) else value
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


def parse_pattern(text):
    """An --allow-remote pattern: a URL pattern with a scheme."""
    text = str(text).strip()
    if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.*-]*://", text):
        raise SettingError(f"{text!r} is not a URL pattern (try 's3://bucket/*')")
    return text


def parse_store(text):
    """--store SCHEME=module:Class -> (scheme, "module:Class")."""
    from mpumap.stores import parse_store_option

    try:
        return parse_store_option(text)
    except ValueError as exc:
        raise SettingError(str(exc)) from None


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


def parse_seconds(text, what, low=0.0):
    try:
        value = float(str(text).strip())
    except ValueError:
        raise SettingError(f"{what} must be a number of seconds, not {text!r}") from None
    if not value > low:
        raise SettingError(f"{what} must be more than {low:g} seconds, not {value:g}")
    return value


def parse_choice(text, choices, what):
    value = str(text).strip().lower()
    if value not in choices:
        raise SettingError(f"{what} must be one of {', '.join(choices)}, not {text!r}")
    return value


def _count(what, low=1, high=MAX_WORKERS):
    return lambda text: parse_count(text, what, low, high)


# ---- the table -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One setting: its attribute of Settings, its flag and variable, how its
    text is parsed, its default, and what it means.

    `default` None means computed (or none): `shown_default` says what.
    `summary` is the README's one line; `help` the longer --help text.
    `in_stats` False keeps it out of what every client may read."""

    name: str
    flag: str
    variable: str | None
    parse: Callable[[str], Any]
    summary: str
    default: Any = None
    shown_default: str | None = None
    help: str | None = None
    metavar: str | None = None
    multiple: bool = False
    in_stats: bool = True

    @property
    def default_text(self):
        if self.shown_default is not None:
            return self.shown_default
        return "" if self.default in (None, ()) else str(self.default)


SPECS = (
    Spec("socket", "--socket", "MPUMAP_SOCKET", parse_socket, default=DEFAULT_SOCKET,
         metavar="PATH", shown_default=f"`{DEFAULT_SOCKET}`",
         summary="the Unix socket (clients read the same variable)",
         help="Unix socket to listen on."),
    Spec("page_size", "--page-size", "UMAP_PAGESIZE", parse_page_size,
         default=SYSTEM_PAGE_SIZE, shown_default=f"system page ({SYSTEM_PAGE_SIZE // 1024}K)",
         metavar="SIZE",
         summary="umap page, the unit of filling and eviction; a multiple of the system page",
         help="Size of a umap page, the unit of filling and eviction: a multiple of the "
              "system page size (64K, 2M, ...)."),
    Spec("buffer_pages", "--buffer-size", "UMAP_BUFSIZE", parse_buffer_size,
         shown_default="adaptive", metavar="PAGES|SIZE",
         summary="buffer size in umap pages, or a size like `256M`; fixed sizes turn "
                 "adaptation off",
         help="Buffer size: a number of umap pages (as UMAP_BUFSIZE), or a size such as 256M "
              "or 4G.  Default: follow the memory the machine can spare, re-evaluated every "
              "--adapt-interval seconds."),
    Spec("fillers", "--fillers", "UMAP_PAGE_FILLERS", _count("the number of fillers"),
         default=max(1, min(4, os.cpu_count() or 1)), shown_default="min(4, CPUs)",
         metavar="N", summary="filler processes",
         help="Filler processes: they read pages from files and hand them to clients."),
    Spec("evictors", "--evictors", "UMAP_PAGE_EVICTORS", _count("the number of evictors"),
         default=1, metavar="N", summary="evictor processes",
         help="Evictor processes: they keep the buffer between the watermarks."),
    Spec("high_water", "--high-water", "UMAP_EVICT_HIGH_WATER_THRESHOLD",
         _count("a watermark", 0, 100), default=90, metavar="PERCENT",
         summary="start evicting at this % of the buffer",
         help="Start evicting when the buffer is this full (percent)."),
    Spec("low_water", "--low-water", "UMAP_EVICT_LOW_WATER_THRESHOLD",
         _count("a watermark", 0, 100), default=70, metavar="PERCENT",
         summary="evict down to this %", help="Evict down to this fill level (percent)."),
    Spec("adapt_interval", "--adapt-interval", "UMAP_BUFADAPT_FREQ",
         lambda text: parse_seconds(text, "the adaptation interval", 0.05),
         default=3.0, shown_default="3", metavar="SECONDS",
         summary="seconds between re-sizings of an adaptive buffer",
         help="Seconds between re-evaluations of an adaptive buffer's size."),
    Spec("memory_reserve", "--memory-reserve", "UMAP_MEMORY_RESERVE", parse_size,
         shown_default="10% of RAM or of the cgroup's limit (64M..4G)", metavar="SIZE",
         summary="what an adaptive buffer leaves to the machine",
         help="Memory an adaptive buffer leaves to the rest of the machine.  Default: 10% "
              "of the RAM (or of the memory cgroup's limit, when smaller), at least 64M, "
              "at most 4G."),
    Spec("read_ahead", "--read-ahead", "UMAP_READ_AHEAD",
         _count("read-ahead", 0, MAX_READ_AHEAD), metavar="PAGES",
         shown_default="1 MiB of pages (255 at 4K), at most a quarter of a fixed buffer",
         summary="largest read-ahead window, in pages; 0: none. Scans read ahead, other "
                 "faults around them while the buffer has room (see below)",
         help="Largest read-ahead window, in pages after the faulting one; 0: none.  Faults "
              "that follow one another through a file are a scan: windows of pages after "
              "them are read, in the background and growing from 4 pages, so that the "
              "client finds them there and the disk gets large reads.  Other faults read "
              "their page, and while the buffer has room the window around it, as a "
              "prefetch (never pushing a page out).  Default: 1 MiB of pages, at most a quarter of a fixed "
              "buffer."),
    Spec("spin_us", "--spin", "UMAP_SPIN_US", _count("--spin", 0, MAX_SPIN_US), default=100,
         metavar="USEC",
         summary="µs the fault monitor and the fillers poll for their next work before "
                 "they sleep; 0: never (see below)",
         help="Microseconds the fault monitor and the fillers keep polling for their next "
              "work before they sleep, yielding the CPU meanwhile; 0: never.  Where waking a "
              "sleeping CPU is slow (virtual machines) this more than halves the time of a "
              "fault served from memory.  When work comes slower than that (faults that "
              "wait for the disk), they back off and sleep at once."),
    Spec("store_io", "--store-io", "UMAP_STORE_IO",
         lambda text: parse_choice(text, STORE_MODES, "store I/O"), default="direct",
         metavar="[" + "|".join(STORE_MODES) + "]",
         summary="`direct` (O_DIRECT, but what the page cache holds anyway is copied from "
                 "there; `drop` where refused), `drop` (buffered, then dropped from the page "
                 "cache), `cached` (buffered, kept)",
         help="How fillers read files: direct (O_DIRECT, no second copy in the page cache; "
              "'drop' where the file system refuses it), drop (buffered, then dropped from "
              "the page cache), cached (buffered, left in the page cache)."),
    Spec("fill_by", "--fill-by", "UMAP_FILL_BY",
         lambda text: parse_choice(text, FILL_WAYS, "--fill-by"), default="copy",
         metavar="[" + "|".join(FILL_WAYS) + "]",
         summary="how fillers put pages no client waits for (read-ahead, prefetch) into the "
                 "buffer: `copy` (UFFDIO_COPY through a mapping of their own), `write` "
                 "(write or splice into the memfd)",
         help="How fillers put pages no client waits for into the buffer: copy (UFFDIO_COPY "
              "through a mapping of the memfd of their own; 'write' where no userfaultfd "
              "can be had) or write (write, and splice for scans, into the memfd: one copy "
              "fewer for a scan, but every write takes the memfd's inode lock, which the "
              "other fillers and the evictors' punches take too)."),
    Spec("allow_remote", "--allow-remote", "UMAP_ALLOW_REMOTE", parse_pattern, default=(),
         multiple=True, metavar="PATTERN", in_stats=False,
         summary="URLs clients may map (`s3://bucket/*`); repeatable, the variable holds "
                 "patterns separated by spaces; none by default",
         help="Let clients map the objects whose URLs match this pattern (shell-style: * "
              "matches anything, / too), read with the server's own credentials (its "
              "environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...); repeatable.  "
              "Default: none, no URL may be mapped."),
    Spec("stores", "--store", "UMAP_STORES", parse_store, default=(), multiple=True,
         metavar="SCHEME=MODULE:CLASS", in_stats=False,
         summary="a store for a URL scheme, run in the fillers (docs/stores.md); repeatable",
         help="Serve URLs of SCHEME with the store class MODULE:CLASS, run in the fillers "
              "(see docs/stores.md); repeatable.  Installed packages add theirs through the "
              "entry point group mpumap.stores."),
    Spec("store_timeout", "--store-timeout", "UMAP_STORE_TIMEOUT",
         lambda text: parse_seconds(text, "--store-timeout"), default=30.0,
         shown_default="30", metavar="SECONDS",
         summary="seconds one request to a store (not files) may take before it is tried "
                 "again",
         help="Seconds one request to a store (an object store, a store users wrote; not "
              "files) may take before it is given up and tried again."),
    Spec("store_retries", "--store-retries", "UMAP_STORE_RETRIES",
         _count("--store-retries", 0, 100), default=3, metavar="N",
         summary="tries after the first, with backoff; then the pages' readers get SIGBUS",
         help="Times a failed or timed-out store request is tried again, with a growing "
              "backoff; after that every thread that waits on those pages gets SIGBUS."),
    Spec("store_requests", "--store-requests", "UMAP_STORE_REQUESTS",
         _count("--store-requests", 1, 256), default=8, metavar="N",
         summary="requests each filler keeps in flight to a store: a large read goes as "
                 "that many parts",
         help="Requests each filler keeps in flight to a store at most: a large read (read "
              "ahead, read around) goes as up to that many parts at once."),
    Spec("max_regions", "--max-regions", "UMAP_MAX_REGIONS", _count("--max-regions", 1, 1 << 20),
         default=4096, metavar="N",
         summary="files served at once; a map past it fails with `ENFILE`",
         help="Files the server serves at once; a map past it is refused."),
    Spec("max_client_mappings", "--max-client-mappings", "UMAP_MAX_CLIENT_MAPPINGS",
         _count("--max-client-mappings", 1, 1 << 20), default=1024, metavar="N",
         summary="mappings one client may hold; past it `EMFILE`",
         help="Mappings one client may hold at once."),
    Spec("max_user_connections", "--max-user-connections", "UMAP_MAX_USER_CONNECTIONS",
         _count("--max-user-connections", 1, 1 << 20), default=1024, metavar="N",
         summary="connections one user may hold open (root and the server's user: no limit); "
                 "past it `EDQUOT`, as for the three below",
         help="Connections one user may hold open at once; root and the server's own user "
              "are exempt."),
    Spec("max_user_clients", "--max-user-clients", "UMAP_MAX_USER_CLIENTS",
         _count("--max-user-clients", 1, lib.MPU_CLIENT_SLOTS), default=512, metavar="N",
         summary="clients (connections that said HELLO) one user may have",
         help="Clients (connections that said HELLO) one user may have at once, of the "
              f"{lib.MPU_CLIENT_SLOTS} the server serves; root and the server's own user are "
              "exempt."),
    Spec("max_user_regions", "--max-user-regions", "UMAP_MAX_USER_REGIONS",
         _count("--max-user-regions", 1, 1 << 20), default=512, metavar="N",
         summary="files one user may have served at once",
         help="Files one user may have served at once, of --max-regions; root and the "
              "server's own user are exempt."),
    Spec("max_user_mappings", "--max-user-mappings", "UMAP_MAX_USER_MAPPINGS",
         _count("--max-user-mappings", 1, 1 << 30), default=8192, metavar="N",
         summary="mappings all of one user's clients may hold",
         help="Mappings all of one user's clients may hold at once; root and the server's "
              "own user are exempt."),
    Spec("max_user_writers", "--max-user-writers", "UMAP_MAX_USER_WRITERS",
         _count("--max-user-writers", 1, MAX_WRITERS), default=MAX_WRITERS // 4, metavar="N",
         summary=f"mappings that write all of one user's clients may hold, of the server's "
                 f"{MAX_WRITERS}",
         help=f"Mappings that write all of one user's clients may hold at once, of the "
              f"{MAX_WRITERS} the server tracks; root and the server's own user are exempt."),
    Spec("worker_timeout", "--worker-timeout", "UMAP_WORKER_TIMEOUT",
         lambda text: parse_seconds(text, "--worker-timeout"), default=30.0, shown_default="30",
         metavar="SECONDS",
         summary="a filler or evictor that gives no sign of life this long (a read that "
                 "hangs) is killed and replaced",
         help="Seconds a filler or evictor may give no sign of life (a store read that "
              "hangs, a stopped process) before it is killed and replaced.  Workers show "
              "life around every read and write, so a slow one does not count.  A worker "
              "caught in a read or write of a file stalls that file: its pages the buffer "
              "does not hold raise SIGBUS, and its write-backs fail (EIO), until the store "
              "is tried again (see the README)."),
    Spec("cpus", "--cpus", "UMAP_CPUS", parse_cpus, default=(), shown_default="any",
         metavar="LIST",
         summary="CPUs for the server's monitor and workers (see below)",
         help="Run the server's monitor and workers on these CPUs only (0, 0-1, 0,2-3): to "
              "keep it off the cores an application's ranks are pinned to, or to keep it "
              "near them."),
    Spec("socket_mode", "--socket-mode", "UMAP_SOCKET_MODE", parse_mode, default=0o600,
         shown_default="0600", metavar="MODE", summary="the socket's permissions",
         help="Permissions of the socket: who may connect.  0600: the server's user (and "
              "root); 0660 with --socket-group: a group; 0666: everybody."),
    Spec("socket_group", "--socket-group", "UMAP_SOCKET_GROUP", parse_group, metavar="GROUP",
         summary="the socket's group", help="Group of the socket (a name or a gid)."),
    Spec("allow_uids", "--allow-uid", None, parse_user, default=(), multiple=True,
         metavar="USER", in_stats=False,
         summary="accept only these users (and root and the server's user); repeatable",
         help="Accept connections only from these users (and root and the server's own "
              "user); repeatable.  A name or a uid."),
    Spec("allow_gids", "--allow-gid", None, parse_group, default=(), multiple=True,
         metavar="GROUP", in_stats=False,
         summary="accept these groups too (primary or supplementary); repeatable",
         help="Accept connections from these groups too (primary or supplementary); "
              "repeatable."),
    Spec("pidfile", "--pidfile", None, str, metavar="FILE", in_stats=False,
         summary="write the server's pid there while it runs",
         help="Write the server's pid to this file while it runs."),
    Spec("log_level", "--log-level", "UMAP_LOG_LEVEL",
         lambda text: parse_choice(text, LOG_LEVELS, "the log level"), default="info",
         metavar="[" + "|".join(LOG_LEVELS) + "]", summary="logging on stderr",
         help="How much to log on stderr."),
)

SPEC = {spec.name: spec for spec in SPECS}


class _Checks:
    """What holds between settings, and what follows from them."""

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: only here, while it is being made
        for spec in SPECS:
            if spec.multiple:
                set_(self, spec.name, tuple(getattr(self, spec.name)))
        if isinstance(self.buffer_pages, Bytes):
            set_(self, "buffer_pages", self.buffer_pages // self.page_size)
            if self.buffer_pages <= 0:
                raise SettingError(f"the buffer size holds no page of {self.page_size} bytes")
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
            set_(self, "read_ahead", default_read_ahead(self.page_size, self.buffer_pages))
        if self.adapt_interval <= 0:
            raise SettingError("the adaptation interval must be positive")
        if self.worker_timeout <= 0:
            raise SettingError("--worker-timeout must be positive")
        if self.store_io not in STORE_MODES:
            raise SettingError(f"store I/O must be direct, drop or cached, not {self.store_io!r}")
        if self.buffer_pages is not None and self.read_ahead >= self.buffer_pages // 2:
            raise SettingError(f"read-ahead of {self.read_ahead} pages needs a buffer of more "
                               f"than {2 * self.read_ahead} pages")

    @classmethod
    def from_options(cls, options):
        """Settings from what the command line gave (None: not given)."""
        return cls(**{name: value for name, value in options.items()
                      if name in SPEC and value is not None
                      and not (SPEC[name].multiple and not value)})

    @property
    def min_buffer_pages(self):
        # Every filler may hold a page while evictors need something to evict.
        return 2 * self.fillers + 2

    @property
    def adaptive(self):
        return self.buffer_pages is None

    def public(self):
        """What the server's status tells any client of its settings."""
        shown = {spec.name: getattr(self, spec.name) for spec in SPECS if spec.in_stats}
        shown["cpus"] = list(self.cpus)
        shown["adaptive"] = self.adaptive
        return shown


Settings = dataclasses.make_dataclass(
    "Settings",
    [(spec.name, Any, dataclasses.field(default=spec.default)) for spec in SPECS],
    bases=(_Checks,),
    frozen=True,
    namespace={"__doc__": "The server's settings: one attribute per entry of SPECS, "
                          "checked together when made.",
               "__module__": __name__},
)


def markdown_table():
    """The README's table of settings."""
    rows = ["| flag | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for spec in SPECS:
        variable = f"`{spec.variable}`" if spec.variable else ""
        rows.append(f"| `{spec.flag}` | {variable} | {spec.default_text} | {spec.summary} |")
    return "\n".join(rows)


def default_read_ahead(page_size, buffer_pages=None):
    """Pages a scan reads after a faulting page, at most: a window of 1 MiB
    (none for pages that big), and no more than a quarter of a fixed buffer."""
    pages = DEFAULT_READ_AHEAD_BYTES // page_size - 1
    if buffer_pages is not None:
        pages = min(pages, buffer_pages // 4 - 1)
    return max(0, min(pages, MAX_READ_AHEAD))


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m mpumap.settings --markdown")
    print(markdown_table())
