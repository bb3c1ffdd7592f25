"""The built-in remote stores: S3-compatible object stores and HTTP(S)
servers through obstore (one ranged GET per read, each pinned to the
object's ETag with If-Match), and any other protocol fsspec knows.

They need the remote extra: ``pip install 'mpumap[remote]'``.  Endpoints
and credentials are the server's environment, as botocore and fsspec read
it (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_PROFILE's files are not read); nothing of them is ever logged.
"""
import errno
import os
import threading
import urllib.parse

from mpumap.stores import ObjectInfo, StaleObject, Store, shown

CONNECT_SECONDS = 5


def _obstore_error(exc, url):
    """An obstore exception as the OSError the fillers understand."""
    from obstore import exceptions as E

    if isinstance(exc, E.PreconditionError):
        return StaleObject(url)
    # (obstore raises Python's FileNotFoundError for a missing object.)
    if isinstance(exc, (E.NotFoundError, FileNotFoundError)):
        return FileNotFoundError(errno.ENOENT, f"{shown(url)}: no such object")
    if isinstance(exc, (E.PermissionDeniedError, E.UnauthenticatedError, PermissionError)):
        return PermissionError(errno.EACCES,
                               f"{shown(url)}: the store refused the server's access")
    if isinstance(exc, (E.InvalidPathError, E.NotSupportedError)):
        return OSError(errno.EINVAL, f"{shown(url)}: {_first_line(exc)}")
    if isinstance(exc, TimeoutError):
        return OSError(errno.ETIMEDOUT, f"{shown(url)}: {_first_line(exc)}")
    if isinstance(exc, OSError) and exc.errno:
        return exc
    return OSError(errno.EIO, f"{shown(url)}: {_first_line(exc)}")


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class _ClientPerKey(Store):
    """A store that keeps one client per key (a bucket, a host, a
    protocol), made when first used, from any of the threads that read."""

    def __init__(self, settings):
        super().__init__(settings)
        self._clients = {}
        self._lock = threading.Lock()

    def _client(self, key):
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self.make_client(key)
            return client

    def make_client(self, key):
        raise NotImplementedError


class _ObstoreBacked(_ClientPerKey):
    """A store that keeps one obstore client per (scheme, host or bucket);
    obstore's own retries are off (the fillers retry, with the server's
    settings).  A request costs a round trip (about 1 ms on loopback, tens
    over a network) where 64 KiB more cost little: a fault reads 64 KiB."""

    page_size = 64 << 10

    def client_options(self):
        return {"timeout": f"{max(1, int(self.settings.timeout))}s",
                "connect_timeout": f"{CONNECT_SECONDS}s"}

    def locate(self, url):
        """(client key, path within it)."""
        raise NotImplementedError

    def stat(self, url):
        import obstore

        key, path = self.locate(url)
        try:
            meta = obstore.head(self._client(key), path)
        except Exception as exc:
            raise _obstore_error(exc, url) from None
        identity = meta.get("e_tag") or meta.get("version")
        if not identity:
            raise OSError(errno.ENOTSUP, f"{shown(url)}: the store gives no ETag or version, so a "
                          "replaced object could not be told apart")
        return ObjectInfo(int(meta["size"]), identity)

    def read(self, url, identity, offset, length):
        import obstore

        key, path = self.locate(url)
        try:
            got = obstore.get(self._client(key), path,
                              options={"range": (offset, offset + length), "if_match": identity})
            named = (got.meta.get("e_tag"), got.meta.get("version"))
            encoded = "Content-Encoding" in (got.attributes or {})
            data = got.bytes()
        except Exception as exc:
            raise _obstore_error(exc, url) from None
        # If-Match is the server's to honour; one that does not (a proxy, a
        # cache, a gateway) answers from whatever version it has.  A cache
        # may weaken the tag it passes on (W/): the same bytes, unless it
        # encoded them.
        if any(named) and identity not in named and (
                encoded or _tag(identity) not in map(_tag, named)):
            raise StaleObject(url)
        return data


def _tag(text):
    """An ETag's value, weak (W/) or strong."""
    if text is None:
        return None
    text = text[2:] if text.startswith("W/") else text
    return text.strip('"')


class S3Store(_ObstoreBacked):
    """``s3://bucket/key`` from an S3-compatible service (AWS, Ceph RGW,
    MinIO, SeaweedFS): AWS_ENDPOINT_URL names it, path-style requests."""

    schemes = ("s3",)

    def locate(self, url):
        parts = urllib.parse.urlsplit(url)
        key = parts.path.lstrip("/")
        if not parts.netloc or not key:
            raise OSError(errno.EINVAL, f"{shown(url)}: an S3 URL is s3://bucket/key")
        return parts.netloc, key

    def make_client(self, bucket):
        from obstore.store import S3Store as Client

        options = self.client_options()
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and endpoint.startswith("http://"):
            options["allow_http"] = True
        config = {"virtual_hosted_style_request": False}
        if endpoint:
            config["endpoint"] = endpoint
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            config["region"] = "us-east-1"
        return Client(bucket, config=config, client_options=options,
                      retry_config={"max_retries": 0})


class HTTPStore(_ObstoreBacked):
    """``http://`` and ``https://`` objects, read with Range requests from
    servers that give an ETag."""

    schemes = ("http", "https")

    def locate(self, url):
        parts = urllib.parse.urlsplit(url)
        path = parts.path.lstrip("/")
        if not path:
            raise OSError(errno.EINVAL, f"{shown(url)}: names no object")
        return f"{parts.scheme}://{parts.netloc}", urllib.parse.unquote(path)

    def make_client(self, base):
        from obstore.store import HTTPStore as Client

        options = self.client_options()
        if base.startswith("http://"):
            options["allow_http"] = True
        return Client.from_url(base, client_options=options, retry_config={"max_retries": 0})


class FsspecStore(_ClientPerKey):
    """Any other protocol fsspec knows (and the server allows): its
    filesystem's info() gives the identity (ETag, checksum or mtime), which
    is checked again after every read, since fsspec has no conditional
    read: bytes read before a replacement are that version's, and one
    during or before the read shows in the check (but for a replacement
    undone in between, or an info() its filesystem cached)."""

    def make_client(self, protocol):
        import fsspec

        return fsspec.filesystem(protocol)

    def _fs(self, url):
        return self._client(url.split("://", 1)[0].lower())

    def stat(self, url):
        try:
            info = self._fs(url).info(url)
        except Exception as exc:
            raise _fsspec_error(exc, url) from None
        identity = next((str(info[k]) for k in ("ETag", "etag", "checksum", "mtime",
                                                "LastModified", "last_modified")
                         if info.get(k)), None)
        if identity is None or info.get("type", "file") != "file":
            raise OSError(errno.EINVAL,
                          f"{shown(url)}: not a file with an ETag, checksum or mtime")
        return ObjectInfo(int(info["size"]), identity)

    def read(self, url, identity, offset, length):
        try:
            data = self._fs(url).cat_file(url, start=offset, end=offset + length)
        except Exception as exc:
            raise _fsspec_error(exc, url) from None
        if self.stat(url).identity != identity:
            raise StaleObject(url)
        return data


def _fsspec_error(exc, url):
    if isinstance(exc, OSError) and exc.errno:
        return exc
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{shown(url)}: no such object")
    if isinstance(exc, PermissionError):
        return PermissionError(errno.EACCES, f"{shown(url)}: access refused")
    return OSError(errno.EIO, f"{shown(url)}: {_first_line(exc)}")
