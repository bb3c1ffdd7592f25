"""Issue: objects in an S3-compatible store, mapped by URL through the same
shared buffer.  A real S3 service (SeaweedFS) on loopback ports, a real
server, real clients and real page faults."""
import errno
import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mpumap
from conftest import assert_clean
from mpumap.testing import MiB, make_file

pytest.importorskip("obstore")
from s3service import S3Service  # noqa: E402

pytestmark = pytest.mark.timeout(300)

BUCKET = "data"


@pytest.fixture
def s3(workdir):
    service = S3Service(os.path.join(workdir, "s3"))
    service.start()
    service.make_bucket(BUCKET)
    yield service
    service.close()


def put_file(s3, key, path):
    with open(path, "rb") as f:
        s3.put(BUCKET, key, f.read())
    return f"s3://{BUCKET}/{key}"


def serve(start_server, s3, *args):
    return start_server("--allow-remote", f"s3://{BUCKET}/*", *args,
                        env={**os.environ, **s3.env()})


def test_four_clients_read_an_object_through_a_quarter_buffer(start_server, readers, workdir,
                                                              s3):
    path = make_file(os.path.join(workdir, "object.bin"), 256 * MiB, seed=15)
    url = put_file(s3, "object.bin", path)
    server = serve(start_server, s3, "--page-size", "64K", "--buffer-size", "64M")
    procs = [readers.start(server.socket, url, expect=path, order="random", seed=i)
             for i in range(4)]
    for proc in procs:
        result = readers.result(proc, timeout=240)
        assert_clean(result)
        assert result["pages"] == 256 * MiB // (64 << 10)
    stats = server.stats()
    (row,) = [r for r in stats["stores"] if r["store"] == "s3"]
    # Each reader read every page once, through a buffer a quarter of the
    # object: what was fetched is counted, at least the object once.
    assert row["bytes"] >= 256 * MiB
    assert stats["buffer"]["bytes_read"] == row["bytes"]
    assert row["requests"] > 0 and row["errors"] == 0
    assert stats["buffer"]["peak_used"] <= stats["buffer"]["limit"]
    print(f"fetched {row['bytes'] / MiB:.0f} MiB in {row['requests']} requests, "
          f"p50 {row['p50_us']} us, p99 {row['p99_us']} us")


def test_urls_outside_allow_remote_are_refused(start_server, workdir, s3):
    path = make_file(os.path.join(workdir, "object.bin"), 1 * MiB, seed=3)
    url = put_file(s3, "object.bin", path)
    s3.make_bucket("secret")
    s3.put("secret", "object.bin", b"x" * 4096)
    server = serve(start_server, s3)
    with mpumap.connect(server.socket) as client:
        for refused in ("s3://secret/object.bin", "https://example.com/data.bin"):
            with pytest.raises(PermissionError):
                client.map(refused)
        for bad in (f"s3://{BUCKET}/../secret/object.bin", f"s3://user:pw@{BUCKET}/x",
                    "s3://data/a b"):
            with pytest.raises(OSError) as info:
                client.map(bad)
            assert info.value.errno == errno.EINVAL
        with pytest.raises(FileNotFoundError):
            client.map(f"s3://{BUCKET}/missing.bin")
        # The connection goes on, and so does the server.
        with client.map(url) as m, open(path, "rb") as f:
            assert m[:] == f.read()
    # A server with no --allow-remote maps no URL at all.
    plain = start_server()
    with mpumap.connect(plain.socket) as client:
        with pytest.raises(PermissionError):
            client.map(url)


REPLACED = textwrap.dedent("""
    import os, sys, mpumap
    sock, url, first, go = sys.argv[1:5]
    first = open(first, "rb").read()
    client = mpumap.connect(sock)
    m = client.map(url)
    half = len(m) // 2
    assert m[:half] == first[:half], "first half"
    print("read", flush=True)
    while not os.path.exists(go):
        pass
    page = 64 << 10
    for off in range(half, len(m), page):
        got = m[off:off + page]
        if got != first[off:off + page]:
            print("MIXED", off, flush=True)
            sys.exit(1)
    print("ALL OLD", flush=True)
""")


def test_a_replaced_object_never_mixes_versions(start_server, workdir, s3):
    first = make_file(os.path.join(workdir, "v1.bin"), 8 * MiB, seed=1)
    second = make_file(os.path.join(workdir, "v2.bin"), 8 * MiB, seed=2)
    url = put_file(s3, "object.bin", first)
    server = serve(start_server, s3, "--page-size", "64K", "--buffer-size", "64M",
                   "--read-ahead", "0", "--store-retries", "1")
    go = os.path.join(workdir, "go")
    proc = subprocess.Popen([sys.executable, "-c", REPLACED, server.socket, url, first, go],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "read"
        put_file(s3, "object.bin", second)
        open(go, "w").close()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The pages not read before the object changed raise SIGBUS: never the
    # new bytes under the old ones.
    assert "MIXED" not in out, out
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, out, err)
    # Mapped again, the object is its new version.
    with mpumap.connect(server.socket) as client, client.map(url) as m:
        with open(second, "rb") as f:
            assert m[:] == f.read()
    assert "replaced" in server.output()


def test_the_store_dying_ends_readers_with_sigbus_and_the_server_goes_on(
        start_server, readers, workdir, s3):
    path = make_file(os.path.join(workdir, "object.bin"), 32 * MiB, seed=5)
    url = put_file(s3, "object.bin", path)
    timeout, retries = 2, 2
    server = serve(start_server, s3, "--page-size", "64K", "--buffer-size", "8M",
                   "--store-timeout", timeout, "--store-retries", retries)
    go = os.path.join(workdir, "go")
    procs = [readers.start(server.socket, url, expect=path, order="random", seed=i, go=go,
                           rounds=1000) for i in range(2)]
    for proc in procs:
        readers.wait_ready(proc)
    open(go, "w").close()
    time.sleep(1.0)
    s3.kill()
    killed = time.monotonic()
    for proc in procs:
        proc.wait(timeout=timeout * retries + 5 + 5)
        assert time.monotonic() - killed <= timeout * retries + 5
        assert proc.returncode == -signal.SIGBUS, readers.result(proc)
    # The server stays up: it serves files ...
    local = make_file(os.path.join(workdir, "local.bin"), 4 * MiB, seed=6)
    with mpumap.connect(server.socket) as client, client.map(local) as m:
        with open(local, "rb") as f:
            assert m[:] == f.read()
    stats = server.stats()
    (row,) = [r for r in stats["stores"] if r["store"] == "s3"]
    assert row["errors"] > 0 and row["retries"] > 0
    # ... and objects again once the store is back.
    s3.restart()
    with mpumap.connect(server.socket) as client, client.map(url) as m:
        with open(path, "rb") as f:
            assert m[:] == f.read()


def test_the_c_client_maps_urls(start_server, programs, workdir, s3):
    from conftest import clean_env

    path = make_file(os.path.join(workdir, "object.bin"), 3 * MiB + 123, seed=8)
    # A URL longer than the client's requests once had room for.
    url = put_file(s3, "a-key-that-makes-the-url-longer-than-" + "x" * 90 + ".bin", path)
    assert len(url) > 128
    server = serve(start_server, s3)
    exe = programs.build(os.path.join(os.path.dirname(__file__), "native", "url_reader.c"))
    env = clean_env(MPUMAP_SOCKET=server.socket)
    out = os.path.join(workdir, "out.bin")
    code, stdout, stderr = programs.run([exe, url, str(os.path.getsize(path)), out], env)
    assert (code, stdout.strip()) == (0, "ok"), stderr
    with open(path, "rb") as want, open(out, "rb") as got:
        assert got.read() == want.read()
    code, stdout, _ = programs.run([exe, "s3://elsewhere/object.bin", "1", out], env)
    assert (code, stdout.strip()) == (1, f"errno {errno.EACCES}")


def test_http_objects_map_too(start_server, workdir, s3):
    path = make_file(os.path.join(workdir, "object.bin"), 5 * MiB + 7, seed=9)
    put_file(s3, "object.bin", path)
    # SeaweedFS's filer serves the bucket over plain HTTP, with Range and ETag.
    url = f"http://127.0.0.1:{s3.ports['filer']}/buckets/{BUCKET}/object.bin"
    server = start_server("--allow-remote", "http://127.0.0.1:*/buckets/*")
    with mpumap.connect(server.socket) as client, client.map(url) as m:
        with open(path, "rb") as f:
            assert m[:] == f.read()
        stats = client.stats()
        assert [r["store"] for r in stats["stores"]] == ["http"]
        # The store proposes its page size: a fault reads 64 KiB of it.
        assert stats["regions"][0]["page_size"] == 64 << 10
        with client.map(url, page_size=256 << 10) as again:
            assert again[:10] == m[:10]  # the same region: its first page size holds
            assert client.stats()["regions"][0]["page_size"] == 64 << 10


def test_fillers_started_again_read_objects(start_server, workdir, s3):
    """The server asks the store about an object (its size and ETag) before
    any filler reads it; fillers started after that, in place of ones that
    died, read objects as the first ones did (a store's client started in
    the server would be unusable in what it forks later: obstore's was)."""
    path = make_file(os.path.join(workdir, "object.bin"), 4 * MiB, seed=10)
    url = put_file(s3, "object.bin", path)
    server = serve(start_server, s3, "--page-size", "64K", "--buffer-size", "1M")
    with open(path, "rb") as f:
        want = f.read()
    with mpumap.connect(server.socket) as client, client.map(url) as m:
        assert m[:MiB] == want[:MiB]
    time.sleep(1.2)  # up a while: a worker that dies at once is a crash loop
    fillers = [w for w in server.workers() if "filler" in " ".join(w.cmdline())]
    assert len(fillers) == 2
    for w in fillers:
        w.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.stats()["buffer"]["restarts"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # 4 MiB through a 1 MiB buffer, in a child (a fault that fails is a SIGBUS).
    read = textwrap.dedent("""
        import sys, mpumap
        with mpumap.connect(sys.argv[1]) as c, c.map(sys.argv[2]) as m, open(sys.argv[3], "rb") as f:
            sys.exit(0 if m[:] == f.read() else 1)
    """)
    proc = subprocess.run([sys.executable, "-c", read, server.socket, url, path],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


class _IgnoresIfMatch(http.server.BaseHTTPRequestHandler):
    """An HTTP server (a cache, a gateway) that answers from the version it
    has, v2, whatever version a request pins (`answer`: its ETag)."""

    body = bytes(range(256)) * 16
    answer = '"v2"'
    encoding = None

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()

    def do_GET(self):
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{last}/{len(self.body)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("ETag", self.answer)
        if self.encoding:
            self.send_header("Content-Encoding", self.encoding)
        self.end_headers()
        self.wfile.write(self.body[first:last + 1])


def test_bytes_of_another_version_than_the_one_pinned_are_stale():
    from mpumap.stores import StoreSettings
    from mpumap.stores.remote import HTTPStore

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _IgnoresIfMatch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store = HTTPStore(StoreSettings(timeout=5))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/data.bin"
        info = store.stat(url)
        assert info.identity == '"v1"'
        with pytest.raises(OSError) as stale:
            store.read(url, info.identity, 0, 1024)
        assert stale.value.errno == errno.ESTALE
        # The version pinned, weakened on its way (a cache that compresses):
        # the same version.
        _IgnoresIfMatch.answer = 'W/"v1"'
        assert bytes(store.read(url, info.identity, 0, 1024)) == _IgnoresIfMatch.body[:1024]
        # ... unless it changed the bytes on the way.
        _IgnoresIfMatch.encoding = "gzip"
        with pytest.raises(OSError) as stale:
            store.read(url, info.identity, 0, 1024)
        assert stale.value.errno == errno.ESTALE
    finally:
        _IgnoresIfMatch.answer, _IgnoresIfMatch.encoding = '"v2"', None
        store.close()
        server.shutdown()
        server.server_close()
