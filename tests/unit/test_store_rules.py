"""Stores: URL checks, the allow-list, the registry, and how a filler reads
a store (parts, timeouts, retries).  Pure logic: the stores here are small
fakes; test_remote and test_stores run real ones."""
import errno
import os
import threading
import time

import pytest

from mpumap._core import ffi
from mpumap.stores import (ObjectInfo, StaleObject, Store, Stores, allowed,
                           check_url, parse_store_option, scheme_of)
from mpumap.stores.reading import StoreReader


@pytest.mark.parametrize("url", ["s3://bucket/key", "https://host/a/b.bin",
                                 "synth://x?size=1G", "s3://b/dir/..hidden"])
def test_good_urls_pass(url):
    check_url(url)


@pytest.mark.parametrize("url", ["s3://bucket/../other/key", "s3://b/./k", "https://u:p@host/x",
                                 "s3://b/a b", "s3://b/k\n", "/tmp/file", "s3://b/k#frag",
                                 "s3://b/" + "k" * 3000])
def test_bad_urls_are_einval(url):
    with pytest.raises(OSError) as info:
        check_url(url)
    assert info.value.errno == errno.EINVAL


def test_a_url_with_a_query_its_store_reads_no_query_of_is_refused_without_showing_it():
    # A pattern that constrains the text after a '*' would match the query,
    # and the store read the path: another key.
    assert allowed("s3://shared/alice/private/key?/public/x", ["s3://shared/*/public/*"])
    stores = Stores([])
    for url in ("s3://shared/alice/private/key?/public/x",
                "https://host/x.bin?X-Amz-Signature=secret"):
        with pytest.raises(OSError) as info:
            stores.for_url(url)
        assert info.value.errno == errno.EINVAL
        assert "?" in str(info.value) and "secret" not in str(info.value)
        assert "public" not in str(info.value)
    assert stores.for_url("s3://shared/alice/public/x").queries is False


def test_the_allow_list_matches_whole_urls():
    patterns = ["s3://data/*", "https://host/public/*.bin"]
    assert allowed("s3://data/a/b/c", patterns)
    assert allowed("https://host/public/x/y.bin", patterns)
    assert not allowed("s3://data2/a", patterns)
    assert not allowed("https://host/private/y.bin", patterns)
    assert not allowed("s3://data/a", [])
    assert scheme_of("S3://x/y") == "s3" and scheme_of("/a/b") is None


def test_store_options_and_rows():
    assert parse_store_option("Zst=pkg.mod:Cls") == ("zst", "pkg.mod:Cls")
    for bad in ("zst", "zst=mod", "=mod:Cls", "1x=mod:Cls"):
        with pytest.raises(ValueError):
            parse_store_option(bad)
    stores = Stores([("zst", "pkg.mod:Cls")])
    assert stores.names[-1] == "other" and "zst" in stores.names
    assert stores.names[stores.index("s3")] == "s3"
    assert stores.index("whatever") == len(stores.names) - 1
    with pytest.raises(OSError) as info:
        stores.for_url("zst://x")
    assert info.value.errno == errno.EPROTONOSUPPORT


class Flaky(Store):
    """Bytes i % 251; fails (or hangs) the first `failures` tries of each offset."""

    def __init__(self, failures=0, error=None, hang=0.0, size=1 << 30):
        super().__init__()
        self.failures, self.error, self.hang, self.size = failures, error, hang, size
        self.tries = {}
        self.lock = threading.Lock()

    def stat(self, url):
        return ObjectInfo(self.size, "v1")

    def read(self, url, identity, offset, length):
        with self.lock:
            n = self.tries[offset] = self.tries.get(offset, 0) + 1
        if n <= self.failures:
            if self.hang:
                time.sleep(self.hang)
                return b"\xff" * length  # late: must never be seen
            raise self.error
        end = min(offset + length, self.size)
        return bytes(i % 251 for i in range(offset, end))


def reader(**options):
    header = ffi.new("struct mpu_header *")
    beats = []
    r = StoreReader(header, lambda: beats.append(1), **options)
    return r, header, beats


def test_a_large_read_goes_as_parts_and_comes_back_whole():
    r, header, _ = reader(requests=4)
    store = Flaky()
    buf = bytearray(3 << 20)
    assert r.read(store, 0, "x://y", "v1", 1000, len(buf), buf) == len(buf)
    assert bytes(buf) == bytes(i % 251 for i in range(1000, 1000 + len(buf)))
    assert len(store.tries) == 3  # parts of 1 MiB
    assert header.stores[0].requests == 3 and header.stores[0].bytes == len(buf)
    r.close()


def test_the_end_of_an_object_is_a_short_read():
    r, _, _ = reader()
    buf = bytearray(8192)
    assert r.read(Flaky(size=5000), 0, "x://y", "v1", 4096, 8192, buf) == 904
    r.close()


class Talkative(Flaky):
    """Answers its first try of each offset with more bytes than asked."""

    def read(self, url, identity, offset, length):
        with self.lock:
            n = self.tries[offset] = self.tries.get(offset, 0) + 1
        data = super().read(url, identity, offset, length)
        return data + b"\xff" * 100 if n == 1 else data


class WrongFirst(Flaky):
    """Answers its first try of each offset with wrong(the right bytes)."""

    def __init__(self, wrong):
        super().__init__()
        self.wrong = wrong
        self.answered = set()

    def read(self, url, identity, offset, length):
        data = super().read(url, identity, offset, length)
        with self.lock:
            first = offset not in self.answered
            self.answered.add(offset)
        return self.wrong(data) if first else data


@pytest.mark.parametrize("wrong", [lambda data: data[:len(data) // 2],
                                   lambda data: data + b"\xff" * 100],
                         ids=["short", "long"])
def test_an_answer_of_another_length_than_asked_is_tried_again(wrong):
    r, header, _ = reader(retries=2)
    buf = bytearray(4096)
    assert r.read(WrongFirst(wrong), 0, "x://y", "v1", 0, 4096, buf, whole=True) == 4096
    assert bytes(buf) == bytes(i % 251 for i in range(4096))
    assert header.stores[0].retries == 1
    r.close()


def test_failures_are_retried_with_backoff_then_given_up():
    r, header, beats = reader(retries=2)
    buf = bytearray(4096)
    assert r.read(Flaky(failures=2, error=ConnectionError("reset")), 1, "x://y", "v1", 0,
                  4096, buf) == 4096
    assert header.stores[1].retries == 2 and header.stores[1].errors == 0
    with pytest.raises(OSError) as info:
        r.read(Flaky(failures=5, error=ConnectionError("reset")), 1, "x://y", "v1", 0, 4096,
               buf)
    assert info.value.errno == errno.EIO
    assert header.stores[1].errors == 1
    assert beats  # the waiting thread showed life
    r.close()


@pytest.mark.parametrize("error", [StaleObject("x://y"), FileNotFoundError(errno.ENOENT, "no"),
                                   PermissionError(errno.EACCES, "no")])
def test_final_failures_are_not_retried(error):
    r, header, _ = reader(retries=3)
    store = Flaky(failures=1, error=error)
    with pytest.raises(OSError) as info:
        r.read(store, 0, "x://y", "v1", 0, 4096, bytearray(4096))
    assert info.value.errno == error.errno
    assert store.tries == {0: 1} and header.stores[0].retries == 0
    r.close()


def test_a_try_that_takes_too_long_is_tried_again_and_its_bytes_are_dropped():
    r, header, _ = reader(timeout=0.3, retries=1)
    buf = bytearray(4096)
    started = time.monotonic()
    assert r.read(Flaky(failures=1, hang=1.0), 0, "x://y", "v1", 0, 4096, buf) == 4096
    assert time.monotonic() - started < 0.9
    assert bytes(buf) == bytes(i % 251 for i in range(4096))
    time.sleep(0.8)  # the late try ends now: nothing of it may land
    assert bytes(buf) == bytes(i % 251 for i in range(4096))
    assert header.stores[0].retries == 1
    r.close()


def test_an_fsspec_object_replaced_is_stale_not_another_versions_bytes(tmp_path):
    pytest.importorskip("fsspec")
    from mpumap.stores import StoreSettings
    from mpumap.stores.remote import FsspecStore

    path = tmp_path / "object.bin"
    path.write_bytes(b"a" * 8192)
    url = f"file://{path}"
    store = FsspecStore(StoreSettings())
    info = store.stat(url)
    assert info.size == 8192 and bytes(store.read(url, info.identity, 4096, 10)) == b"a" * 10
    path.write_bytes(b"b" * 8192)
    os.utime(path, (1, 1))  # another mtime for sure: the identity of a file
    with pytest.raises(OSError) as stale:
        store.read(url, info.identity, 0, 10)
    assert stale.value.errno == errno.ESTALE
