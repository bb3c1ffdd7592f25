"""Stores: where page contents come from.

Files are the C core's own (`mpumap.stores.files`): a client sends its
descriptor, fillers read it in their hot loop.  Everything else is named by
a URL (``s3://bucket/key``, ``https://host/path``, ``synth://...``) and read
by a `Store`: a Python class for a URL scheme, built in (`mpumap.stores.remote`),
from an installed package's entry points (group ``mpumap.stores``), or
given with ``--store SCHEME=module:Class``.  docs/stores.md is the guide to
writing one.

A store is made once per process that uses it: the server asks it what an
object is (`stat`: its size and identity, off the main loop), each filler
reads from it (`read`, from a few threads at once).  Fillers are processes,
each with its own interpreter, so Python stores never share a GIL.
"""
import dataclasses
import errno
import fnmatch
import importlib
import importlib.metadata
import logging
import re
import urllib.parse

from mpumap._core import lib

log = logging.getLogger("mpumap.stores")

ENTRY_POINTS = "mpumap.stores"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

# The built-in stores: scheme -> "module:Class" (imported when first used, so
# that a server without the remote extra starts all the same).
BUILT_IN = {
    "s3": "mpumap.stores.remote:S3Store",
    "http": "mpumap.stores.remote:HTTPStore",
    "https": "mpumap.stores.remote:HTTPStore",
}
FSSPEC = "mpumap.stores.remote:FsspecStore"  # any other scheme fsspec knows


class StaleObject(OSError):
    """The object is no longer the version the region was pinned to."""

    def __init__(self, url):
        super().__init__(errno.ESTALE, f"{shown(url)} was replaced since it was mapped")


# Failures that trying again cannot mend: they are not retried.
FINAL = (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ESTALE, errno.EINVAL, errno.ENOSYS,
         errno.EPROTONOSUPPORT)


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """What a store says of an object: its size in bytes, and an identity
    (an ETag, a version id, a checksum) that changes when the object does."""

    size: int
    identity: str


@dataclasses.dataclass(frozen=True)
class StoreSettings:
    """The server's settings that a store sees."""

    timeout: float = 30.0  # seconds one request may take
    requests: int = 8  # requests a filler keeps in flight at most


class Store:
    """A kind of store, for the URL schemes in `schemes`.

    Subclasses implement `stat` and `read`; both may be called from several
    threads at once, and raise OSError (FileNotFoundError, PermissionError,
    StaleObject, TimeoutError, ConnectionError, ...) for what went wrong:
    errors in FINAL fail at once, the others are tried again, up to the
    server's --store-retries.  Credentials and endpoints are the server's
    own (its environment, as botocore and fsspec read it): a client names
    an object, nothing else.

    Invariants: `read(url, identity, ...)` returns bytes of that version
    only, or raises StaleObject; never a mix of two versions.
    """

    schemes = ()
    # Bytes a read-ahead window of this store's objects may reach (and a
    # window read around a fault while the buffer has room): a request costs
    # a round trip, so fewer and larger reads, in parts at once.
    window = 8 << 20
    # The page size this store's regions get unless the mapper asks for
    # another (None: the server's): what one fault reads.
    page_size = None
    # Whether a ?query is part of what names an object.  Where it is not (a
    # store that reads the path), a URL with one is refused: a pattern of
    # --allow-remote could match the query and let the path name anything.
    queries = False

    def __init__(self, settings=StoreSettings()):
        self.settings = settings

    def stat(self, url):
        """The object's ObjectInfo, as it is now."""
        raise NotImplementedError

    def read(self, url, identity, offset, length):
        """`length` bytes of the object at `offset` (fewer only where it
        ends), from the version `identity` names: a bytes-like object."""
        raise NotImplementedError

    def close(self):
        """Let go of connections and threads."""


def scheme_of(url):
    """The URL's scheme in lower case, or None when it is no URL (a path)."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def check_url(url):
    """A URL fit to name an object: no credentials, no '..' or '.' path
    segments (a server's allow-list matches the text), no spaces or control
    characters.  Raises OSError(EINVAL) saying what is wrong."""
    if len(url.encode("utf-8", "surrogatepass")) > lib.MPU_MAX_URL:
        raise OSError(errno.EINVAL, f"a URL is at most {lib.MPU_MAX_URL} bytes")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise OSError(errno.EINVAL, "a URL has no spaces or control characters")
    if not scheme_of(url):
        raise OSError(errno.EINVAL, f"{url!r} is not a URL (scheme://...)")
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:
        raise OSError(errno.EINVAL, "a URL must not carry credentials: the server uses its own")
    if any(segment in (".", "..") for segment in parts.path.split("/")):
        raise OSError(errno.EINVAL, "a URL must not have '.' or '..' path segments")
    if parts.fragment:
        raise OSError(errno.EINVAL, "a URL must not have a #fragment")


def shown(url):
    """A URL as messages and logs may show it: without its query string,
    where a signed URL carries its credentials."""
    head, sep, _ = url.partition("?")
    return head + ("?..." if sep else "")


def allowed(url, patterns):
    """Whether the server's --allow-remote patterns (shell-style: ``*``
    matches any text, '/' too) let a client map this URL."""
    return any(fnmatch.fnmatchcase(url, pattern) for pattern in patterns)


def parse_store_option(text):
    """--store SCHEME=module:Class -> (scheme, "module:Class")."""
    scheme, sep, target = str(text).partition("=")
    scheme = scheme.strip().lower()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme) or ":" not in target:
        raise ValueError(f"--store takes SCHEME=module:Class, not {text!r}")
    return scheme, target.strip()


def load(target):
    """The class that "module:Class" names."""
    module, _, name = target.partition(":")
    obj = importlib.import_module(module)
    for attr in name.split("."):
        obj = getattr(obj, attr)
    return obj


class Stores:
    """The stores this server may use, by scheme, each made when first used.

    Owns the Store instances of this process.  The list of `names` (for
    statistics: each has a row of counters in the buffer segment) is the
    same in the server and every filler, since all build it from the same
    settings and installed packages.
    """

    def __init__(self, extra=(), settings=StoreSettings()):
        self.settings = settings
        self.targets = dict(BUILT_IN)
        try:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
                self.targets[ep.name.lower()] = ep.value
        except Exception as exc:  # a broken package must not stop the server
            log.warning("reading the %s entry points: %s", ENTRY_POINTS, exc)
        for scheme, target in extra:
            self.targets[scheme] = target
        # One row of counters each (MPU_STORE_KINDS), the last for the rest.
        self.names = list(self.targets)[:lib.MPU_STORE_KINDS - 1] + ["other"]
        self._made = {}  # target -> Store

    def index(self, scheme):
        """The row of statistics a scheme's requests count in."""
        if scheme in self.names[:-1]:
            return self.names.index(scheme)
        return len(self.names) - 1

    def for_url(self, url):
        """The Store for a URL's scheme; OSError(EPROTONOSUPPORT) when no
        store serves it, or its module cannot be loaded, and OSError(EINVAL)
        for a URL with a query its store does not take."""
        scheme = scheme_of(url)
        target = self.targets.get(scheme)
        if target is None:
            if not self._fsspec_knows(scheme):
                raise OSError(errno.EPROTONOSUPPORT, f"no store serves {scheme}:// URLs here")
            target = FSSPEC
        store = self._made.get(target)
        if store is None:
            try:
                cls = load(target)
            except ImportError as exc:
                raise OSError(errno.EPROTONOSUPPORT, f"the store for {scheme}:// URLs cannot "
                              f"be loaded ({exc}); is mpumap[remote] installed?") from None
            except AttributeError as exc:
                raise OSError(errno.EPROTONOSUPPORT, f"the store for {scheme}:// URLs: "
                              f"{target}: {exc}") from None
            store = self._made[target] = cls(self.settings)
        if "?" in url and not store.queries:
            raise OSError(errno.EINVAL, f"{shown(url)}: a query string is not served (the "
                          f"{scheme}:// store reads the path)")
        return store

    @staticmethod
    def _fsspec_knows(scheme):
        try:
            import fsspec
        except ImportError:
            return False
        return scheme in fsspec.available_protocols() and scheme not in ("file", "local")

    def close(self):
        for store in self._made.values():
            try:
                store.close()
            except Exception as exc:
                log.debug("closing a store: %s", exc)
        self._made.clear()
