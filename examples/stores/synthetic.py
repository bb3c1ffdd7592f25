"""An mpumap store that computes its data on demand: a data set of any size
that exists nowhere, the same bytes for the same URL on every node.

    synth://NAME?size=64G&seed=7

is SIZE bytes, block by block of 64 KiB, each block the SHAKE-256 stream of
(seed, name, block number).  Useful to try a pipeline at scale, or to
benchmark mpumap, with no storage behind it; and a short model of a store
(docs/stores.md).

Served by a server started with

    PYTHONPATH=examples/stores mpumap-server \\
        --store synth=synthetic:SyntheticStore --allow-remote 'synth://*'

and read by any client: ``mpumap.connect().map("synth://demo?size=1G&seed=7")``.
"""
import errno
import hashlib
import urllib.parse

from mpumap.settings import SettingError, parse_size
from mpumap.stores import ObjectInfo, Store

BLOCK = 1 << 16


def parse(url):
    """(name, size, seed) of a synth:// URL; OSError(EINVAL) when it is not one."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    try:
        size = parse_size(query["size"][0])
        seed = int(query.get("seed", ["0"])[0])
    except (KeyError, ValueError, SettingError):
        raise OSError(errno.EINVAL, f"{url}: give ?size=SIZE[&seed=N]") from None
    return parts.netloc + parts.path, size, seed


def block(name, seed, number):
    """Block `number` of the data set (BLOCK bytes)."""
    return hashlib.shake_256(f"{seed}:{name}:{number}".encode()).digest(BLOCK)


def data(url, offset, length):
    """Bytes [offset, offset + length) of the data set the URL names."""
    name, size, seed = parse(url)
    end = min(offset + length, size)
    if offset >= end:
        return b""
    first, last = offset // BLOCK, (end - 1) // BLOCK
    joined = b"".join(block(name, seed, n) for n in range(first, last + 1))
    return joined[offset - first * BLOCK:end - first * BLOCK]


class SyntheticStore(Store):
    """synth:// data sets, computed when read.  Nothing changes, so the
    identity is the recipe (size and seed), and no read is ever stale."""

    schemes = ("synth",)
    queries = True  # the recipe: ?size=...&seed=...

    def stat(self, url):
        name, size, seed = parse(url)
        if size <= 0:
            raise OSError(errno.EINVAL, f"{url}: an empty data set cannot be mapped")
        return ObjectInfo(size, f"{size}:{seed}")

    def read(self, url, identity, offset, length):
        name, size, seed = parse(url)
        if identity != f"{size}:{seed}":
            raise OSError(errno.ESTALE, f"{url} is not the data set mapped")
        return data(url, offset, length)
