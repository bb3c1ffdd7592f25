#!/usr/bin/env python3
"""Benchmark: N client processes read random 4 KiB pieces of one S3 object,
through mpumap and through the usual ways of reading an object, in the same
run, against a SeaweedFS S3 service this script starts on loopback (it makes
an object of random bytes and uploads it once).

Modes (--modes, all by default):
  mpumap      a server of our own (--buffer, --page-size); each process maps
              s3://bench/object and reads slices of the mapping
  mpumap-small
              the same through a buffer smaller than the object
              (--small-buffer, a quarter of it by default): the memory
              budget that per-process caches cannot keep to
  s3fs        s3fs.S3FileSystem().open(path): its default cache, seek + read
  s3fs-block  the same with cache_type="blockcache"
  obstore     one ranged GET a read (obstore.get_range)
  download    each process downloads the whole object (obstore.get().bytes())
              and reads from memory
  scan        the second part: one process reads the object from start to end
              in 1 MiB slices through mpumap, then one downloads it whole
              (obstore.get().bytes()); MB/s of both and the ratio

Each process reads --reads 4 KiB pieces at random 4 KiB-aligned offsets (its
own seed), checksums every piece and afterwards checks every checksum against
a local copy of the object.  The processes start together (they wait on a
barrier file after their imports and connections); a mode stops reading after
--max-seconds of reading (the row says how many reads were done).

Columns: MB/s is the bytes the processes read over the wall time from the
barrier until the last process ends (the map, the open and the download
included); p50/p99 the latency of one read; "fetched" the bytes of GET
response bodies that came from the S3 service, counted by a small reverse
proxy in this process that every mode (the mpumap server too) goes through,
and "x" that over the bytes read; "peak mem" the sum over the client
processes of their peak RSS less their shared memory (VmHWM - RssShmem from
/proc/PID/status, just before they exit), plus for mpumap the peak of the
server's processes' USS plus its memfds (buffer and segment, from its
stats), sampled every 0.2 s; "cpu" the CPU seconds of the clients / the S3
service / this process (the proxy) / the mpumap server.  The proxy's own
cost is measured once: a whole-object GET and small ranged GETs, direct and
through it.

    python scripts/bench_remote.py --size 256M --reads 2000
    python scripts/bench_remote.py --procs 4 --modes mpumap,obstore --json out.json
"""
import argparse
import importlib.util
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 1 << 20
PIECE = 4096                 # bytes a read reads, at 4 KiB-aligned offsets
SCAN_SLICE = 1 << 20         # the scan's slices
BUCKET, KEY = "bench", "object.bin"
MODES = ("mpumap", "mpumap-small", "s3fs", "s3fs-block", "obstore", "download", "scan")
SAMPLE_SECONDS = 0.2
# Sets PR_SET_PDEATHSIG (kept across exec) and execs the command: a server of
# ours goes away with this script even if it is killed with SIGKILL.
LAUNCH = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
          "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execvp(sys.argv[2], sys.argv[2:])")


class BenchError(Exception):
    """A mode failed; the text says why and where its logs are."""


# -- the counting proxy ---------------------------------------------------------

class CountingProxy:
    """An HTTP/1.1 reverse proxy on 127.0.0.1 in front of the S3 service: a
    thread per client connection, with its own keep-alive connection
    upstream; requests and responses are relayed as they are (the Host
    header too, so that SigV4 signatures stay valid), bodies streamed
    through a 1 MiB buffer.  It counts requests, GETs and the bytes of GET
    response bodies."""

    def __init__(self, upstream):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "gets": 0, "get_bytes": 0, "upstream_failures": 0,
                       "broken_bodies": 0}
        self.connections = set()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def snapshot(self):
        with self.lock:
            return dict(self.counts)

    def close(self):
        self.listener.close()
        with self.lock:
            conns = list(self.connections)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="proxy", daemon=True).start()

    def _connect(self):
        up = socket.create_connection(self.upstream)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.connections.add(up)
        return up, up.makefile("rb", buffering=1 << 16)

    def _drop(self, *socks):
        for s in socks:
            if s is None:
                continue
            with self.lock:
                self.connections.discard(s)
            try:
                s.close()
            except OSError:
                pass

    def _count_get(self, n):
        with self.lock:
            self.counts["get_bytes"] += n

    def _serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.connections.add(conn)
        up = upin = None
        buf = memoryview(bytearray(1 << 20))
        cin = conn.makefile("rb", buffering=1 << 16)
        try:
            while True:
                head = _read_head(cin)
                if head is None:
                    return
                method = head[:head.index(b" ")].upper()
                headers = _headers(head)
                with self.lock:
                    self.counts["requests"] += 1
                bodiless = ("transfer-encoding" not in headers
                            and int(headers.get("content-length", b"0")) == 0)
                for attempt in (0, 1):
                    if up is None:
                        up, upin = self._connect()
                    try:
                        up.sendall(head)
                        if not bodiless:
                            _relay_body(cin, up, headers, buf)
                        rhead = _read_head(upin)
                        while rhead is not None and rhead[9:10] == b"1":  # 1xx: more to come
                            conn.sendall(rhead)
                            rhead = _read_head(upin)
                        if rhead is None:
                            raise ConnectionResetError("upstream closed")
                        break
                    except OSError:
                        # An idle keep-alive connection the service closed:
                        # a request without a body is sent again, once.
                        self._drop(up)
                        up = upin = None
                        with self.lock:
                            self.counts["upstream_failures"] += 1
                        if attempt or not bodiless:
                            return
                conn.sendall(rhead)
                status = int(rhead.split(b" ", 2)[1])
                rheaders = _headers(rhead)
                count = None
                if method == b"GET":
                    count = self._count_get
                    with self.lock:
                        self.counts["gets"] += 1
                if method == b"HEAD" or status in (204, 304):
                    sent = 0
                else:
                    try:
                        sent = _relay_body(upin, conn, rheaders, buf, until_close=True,
                                           count=count)
                    except (OSError, ValueError):
                        with self.lock:
                            self.counts["broken_bodies"] += 1
                        raise
                if (headers.get("connection", b"").lower() == b"close"
                        or rheaders.get("connection", b"").lower() == b"close"
                        or sent is None):
                    return
        except (OSError, ValueError):
            return
        finally:
            self._drop(conn, up)


def _read_head(f):
    """A request's or response's head (start line and headers, up to the empty
    line) as bytes; None at end of stream before it."""
    lines = []
    while True:
        line = f.readline(65536)
        if not line:
            if lines:
                raise ConnectionResetError("stream ended inside a head")
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _headers(head):
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().lower().decode("latin-1")] = value.strip()
    return out


def _copy(src, dst, n, buf, count=None, counted=None):
    """Relay n bytes; count(k) for the first `counted` of them (all: None)
    as they go."""
    left = n
    counted = n if counted is None else counted
    while left:
        got = src.readinto1(buf[:min(left, len(buf))])
        if not got:
            raise ConnectionResetError("stream ended inside a body")
        dst.sendall(buf[:got])
        if count and counted > 0:
            count(min(got, counted))
            counted -= got
        left -= got


def _relay_body(src, dst, headers, buf, until_close=False, count=None):
    """Relay a message body (Content-Length, chunked, or, for a response
    with neither, up to the end of the stream: then None), calling
    count(k) for its bytes as they go; the body's bytes."""
    if b"chunked" in headers.get("transfer-encoding", b"").lower():
        total = 0
        while True:
            line = src.readline(65536)
            dst.sendall(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = src.readline(65536)
                    if not line:
                        raise ConnectionResetError("stream ended inside trailers")
                    dst.sendall(line)
                    if line in (b"\r\n", b"\n"):
                        return total
            _copy(src, dst, size + 2, buf, count, size)
            total += size
    if "content-length" in headers:
        n = int(headers["content-length"])
        _copy(src, dst, n, buf, count)
        return n
    if not until_close:
        return 0
    while True:
        got = src.readinto1(buf)
        if not got:
            return None
        dst.sendall(buf[:got])
        if count:
            count(got)


# -- the client processes -------------------------------------------------------

def proc_memory():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) * 1024
    return out


def die_with_parent(parent):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(1)


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.0005)


def obstore_store(cfg, endpoint=None):
    from obstore.store import S3Store
    env = os.environ
    return S3Store(BUCKET, endpoint=endpoint or cfg["endpoint"], region=env["AWS_REGION"],
                   access_key_id=env["AWS_ACCESS_KEY_ID"],
                   secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                   virtual_hosted_style_request=False, client_options={"allow_http": True})


def child(mode, cfg, seed, go, out):
    """One client process: set up, print "ready", wait for the barrier, read,
    then check what it read and write its result to `out`."""
    size = cfg["size"]
    result = {"mode": mode, "seed": seed, "pid": os.getpid()}
    if mode.startswith("scan-"):
        pieces = [(off, min(SCAN_SLICE, size - off)) for off in range(0, size, SCAN_SLICE)]
        # the slices checked afterwards: 32 spread over the object, and the last
        checked = set(range(0, len(pieces), max(1, len(pieces) // 32))) | {len(pieces) - 1}
    else:
        rng = random.Random(1000 + seed)
        pieces = [(rng.randrange(size // PIECE) * PIECE, PIECE) for _ in range(cfg["reads"])]
        checked = None  # all
    mapping = client = f = data = None
    if "mpumap" in mode:
        import mpumap
        client = mpumap.connect(cfg["socket"])
    elif mode in ("s3fs", "s3fs-block"):
        import s3fs
        fs = s3fs.S3FileSystem(
            key=os.environ["AWS_ACCESS_KEY_ID"], secret=os.environ["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=cfg["endpoint"], client_kwargs={"region_name": os.environ["AWS_REGION"]},
            config_kwargs={"s3": {"addressing_style": "path"}}, skip_instance_cache=True)
    elif mode in ("obstore", "download", "scan-download"):
        import obstore
        store = obstore_store(cfg)
    print("ready", flush=True)
    wait_for(go)
    start = time.monotonic()
    if "mpumap" in mode:
        mapping = client.map(f"s3://{BUCKET}/{KEY}")

        def read(off, n):
            return mapping[off:off + n]
    elif mode in ("s3fs", "s3fs-block"):
        kwargs = {"cache_type": "blockcache"} if mode == "s3fs-block" else {}
        if cfg["s3fs_block_size"]:
            kwargs["block_size"] = cfg["s3fs_block_size"]
        f = fs.open(f"{BUCKET}/{KEY}", "rb", **kwargs)
        result["s3fs"] = {"block_size": f.blocksize, "cache": type(f.cache).__name__}

        def read(off, n):
            f.seek(off)
            return f.read(n)
    elif mode == "obstore":
        def read(off, n):
            return obstore.get_range(store, KEY, start=off, end=off + n)
    else:  # download, scan-download
        data = memoryview(obstore.get(store, KEY).bytes())

        def read(off, n):
            return bytes(data[off:off + n])
    setup = time.monotonic() - start
    deadline = start + setup + cfg["max_seconds"]  # --max-seconds of reading
    latencies, sums = [], []
    clock = time.perf_counter
    for i, (off, n) in enumerate(pieces):
        if mode.startswith("scan-"):
            got = read(off, n)
            if i in checked:
                sums.append((off, n, zlib.crc32(got), len(got)))
            continue
        if time.monotonic() > deadline:
            break
        t = clock()
        got = read(off, n)
        latencies.append(clock() - t)
        sums.append((off, n, zlib.crc32(got), len(got)))
    end = time.monotonic()
    done = len(pieces) if mode.startswith("scan-") else len(latencies)
    # Check the bytes against the local copy of the object.
    bad = 0
    fd = os.open(cfg["data_path"], os.O_RDONLY)
    try:
        for off, n, crc, length in sums:
            want = os.pread(fd, n, off)
            bad += length != len(want) or crc != zlib.crc32(want)
    finally:
        os.close(fd)
    usage = os.times()
    result.update({"start": start, "end": end, "setup": setup, "reads": done,
                   "bytes": sum(n for _, n in pieces[:done]), "checked": len(sums),
                   "mismatches": bad, "latencies": latencies,
                   "cpu": usage.user + usage.system, "memory": proc_memory()})
    with open(out + ".tmp", "w") as fo:
        json.dump(result, fo)
    os.rename(out + ".tmp", out)
    if mapping is not None:
        mapping.close()
        client.close()
    return 0 if not bad else 3


def probe(cfg, out):
    """The proxy's cost, direct and through the proxy: the object in 16 MiB
    ranged GETs one after the other (twice; the better), 200 ranged 4 KiB
    GETs (twice; the better p50), and one whole-object GET."""
    import obstore
    rng = random.Random(5)
    offsets = [rng.randrange(cfg["size"] // PIECE) * PIECE for _ in range(200)]
    stores = {"direct": obstore_store(cfg, cfg["direct_endpoint"]),
              "proxy": obstore_store(cfg, cfg["endpoint"])}
    result = {name: {"ranges_mbps": 0, "range_p50_ms": float("inf")} for name in stores}
    for store in stores.values():
        obstore.head(store, KEY)  # a connection made
    step = 16 * MiB
    for _ in range(2):
        for name, store in stores.items():
            t = time.perf_counter()
            n = sum(len(obstore.get_range(store, KEY, start=off,
                                          end=min(cfg["size"], off + step)))
                    for off in range(0, cfg["size"], step))
            best = result[name]
            best["ranges_mbps"] = max(best["ranges_mbps"], n / (time.perf_counter() - t) / 1e6)
            lat = []
            for off in offsets:
                t = time.perf_counter()
                obstore.get_range(store, KEY, start=off, end=off + PIECE)
                lat.append(time.perf_counter() - t)
            best["range_p50_ms"] = min(best["range_p50_ms"], statistics.median(lat) * 1e3)
    for name, store in stores.items():
        t = time.perf_counter()
        n = len(obstore.get(store, KEY).bytes())
        result[name]["get_mbps"] = n / (time.perf_counter() - t) / 1e6
    with open(out, "w") as fo:
        json.dump(result, fo)
    return 0


# -- the benchmark process ------------------------------------------------------

class Bench:
    """What one run holds: its folder, the S3 service, the proxy and every
    process it started (all stopped by close())."""

    def __init__(self, args, folder):
        self.args = args
        self.folder = folder
        self.procs = []           # (Popen, log path)
        self.s3 = None
        self.proxy = None
        self.size = args.size
        self.data_path = os.path.join(folder, "object.bin")
        self.logs = []

    # processes

    def start_children(self, mode, count, extra_env=None):
        go = os.path.join(self.folder, f"go-{mode}-{time.monotonic_ns()}")
        env = {**os.environ, **self.child_env(), "BENCH_PARENT": str(os.getpid()),
               **(extra_env or {})}
        cfg_path = os.path.join(self.folder, "config.json")
        children = []
        for i in range(count):
            out = os.path.join(self.folder, f"out-{mode}-{i}.json")
            log = os.path.join(self.folder, f"client-{mode}-{i}.log")
            self.logs.append(log)
            with open(log, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--child", mode,
                     "--config", cfg_path, "--seed", str(i), "--go", go, "--out", out],
                    stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
            self.procs.append(proc)
            children.append((proc, out, log))
        deadline = time.monotonic() + 120
        for proc, _, log in children:
            ready = select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))[0]
            if not ready or proc.stdout.readline().strip() != b"ready":
                raise BenchError(f"a {mode} client did not start; its log: {log}\n"
                                 f"{tail(log)}")
        return go, children

    def child_env(self):
        env = self.s3.env()
        env["AWS_ENDPOINT_URL"] = self.endpoint
        return env

    def write_config(self, sock=None):
        cfg = {"size": self.size, "reads": self.args.reads, "data_path": self.data_path,
               "endpoint": self.endpoint, "direct_endpoint": self.s3.endpoint,
               "socket": sock, "max_seconds": self.args.max_seconds,
               "s3fs_block_size": self.args.s3fs_block_size}
        with open(os.path.join(self.folder, "config.json"), "w") as f:
            json.dump(cfg, f)

    def start_server(self, name, buffer):
        import mpumap
        from mpumap.testing import command
        sock = os.path.join(self.folder, f"{name}.sock")
        log = os.path.join(self.folder, f"server-{name}.log")
        self.logs.append(log)
        args = [*command("mpumap-server"), "--socket", sock,
                "--buffer-size", f"{buffer >> 10}K",
                "--page-size", f"{self.page_size >> 10}K",
                "--allow-remote", f"s3://{BUCKET}/*"]
        env = {**os.environ, **self.child_env()}
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(os.getpid()), *args],
                                    stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise BenchError(f"mpumap-server exited with {proc.returncode}; its log: "
                                 f"{log}\n{tail(log)}")
            try:
                if mpumap.server_stats(sock)["workers"]:
                    return sock, proc, log
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"mpumap-server did not start; its log: {log}")
            time.sleep(0.05)

    def stop(self, proc, grace=10):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self):
        for proc in list(self.procs):
            self.stop(proc, grace=5)
        if self.proxy:
            self.proxy.close()
        if self.s3:
            self.s3.close()

    # the object and the service

    def setup(self):
        from mpumap.testing import make_file
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from s3service import S3Service

        t = time.monotonic()
        make_file(self.data_path, self.size, seed=11)
        made = time.monotonic() - t
        self.s3 = S3Service(os.path.join(self.folder, "s3"))
        self.logs.append(self.s3.log_path)
        self.s3.start()
        self.s3.make_bucket(BUCKET)
        t = time.monotonic()
        with open(self.data_path, "rb") as f:
            payload = f.read()
        self.s3.put(BUCKET, KEY, payload)
        del payload
        uploaded = time.monotonic() - t
        # The proxy's threads start only now, after the S3 service's process:
        # every later process is started with subprocess (fork and exec at
        # once), and the clients and the server set their own parent-death signal.
        self.proxy = None if self.args.no_proxy else CountingProxy(self.s3.endpoint)
        self.endpoint = self.proxy.endpoint if self.proxy else self.s3.endpoint
        print(f"object s3://{BUCKET}/{KEY}: {self.size / MiB:.0f} MiB of random bytes, made in "
              f"{made:.1f} s, uploaded in {uploaded:.1f} s; SeaweedFS at {self.s3.endpoint}"
              + (f", the counting proxy at {self.proxy.endpoint}" if self.proxy else
                 " (no proxy: only mpumap's fetched bytes are known)"), flush=True)

    # measuring

    def cpu_of(self, pid, tree=True):
        import psutil
        total = 0.0
        try:
            p = psutil.Process(pid)
            for q in [p] + (p.children(recursive=True) if tree else []):
                try:
                    t = q.cpu_times()
                    total += t.user + t.system + (t.children_user + t.children_system)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total

    def run_mode(self, mode, count):
        """Run `count` clients of `mode` (a server of our own for mpumap
        modes); the mode's row."""
        import mpumap

        server = sock = log = None
        if "mpumap" in mode:
            buffer = self.small_buffer if mode == "mpumap-small" else self.buffer
            sock, server, log = self.start_server(mode, buffer)
        try:
            self.write_config(sock)
            go, children = self.start_children(mode, count)
            counts0 = self.proxy.snapshot() if self.proxy else None
            store0 = store_row(mpumap.server_stats(sock)) if sock else None
            cpu0 = (self.cpu_of(self.s3.proc.pid), own_cpu(),
                    self.cpu_of(server.pid) if server else 0.0)
            peak_server = 0
            limit = self.args.max_seconds + self.args.grace
            t_go = time.monotonic()
            open(go, "w").close()
            while any(p.poll() is None for p, _, _ in children):
                if time.monotonic() - t_go > limit:
                    raise BenchError(f"the {mode} clients did not finish in {limit:.0f} s; "
                                     f"logs: {children[0][2]} ..."
                                     + (f", server log: {log}" if log else ""))
                if server is not None:
                    if server.poll() is not None:
                        raise BenchError(f"mpumap-server exited with {server.returncode}; "
                                         f"its log: {log}\n{tail(log)}")
                    peak_server = max(peak_server, server_memory(server.pid, sock))
                time.sleep(SAMPLE_SECONDS if server else 0.02)
            if server is not None:
                peak_server = max(peak_server, server_memory(server.pid, sock))
            results = []
            for proc, out, clog in children:
                proc.wait()
                self.stop(proc)
                if not os.path.exists(out):
                    raise BenchError(f"a {mode} client failed ({proc.returncode}); its log: "
                                     f"{clog}\n{tail(clog)}"
                                     + (f"\nserver log: {log}" if log else ""))
                with open(out) as f:
                    results.append(json.load(f))
                results[-1]["returncode"] = proc.returncode
            cpu1 = (self.cpu_of(self.s3.proc.pid), own_cpu(),
                    self.cpu_of(server.pid) if server else 0.0)
            row = summarize(mode, results, t_go)
            row["cpu"] = {"clients": sum(r["cpu"] for r in results),
                          "s3": cpu1[0] - cpu0[0], "proxy": cpu1[1] - cpu0[1],
                          "server": cpu1[2] - cpu0[2]}
            if self.proxy:
                counts = self.proxy.snapshot()
                row["fetched"] = counts["get_bytes"] - counts0["get_bytes"]
                row["gets"] = counts["gets"] - counts0["gets"]
                for k in ("upstream_failures", "broken_bodies"):
                    row[k] = counts[k] - counts0[k]
            if server is not None:
                stats = mpumap.server_stats(sock)
                store1 = store_row(stats)
                row["server"] = {k: store1[k] - store0[k]
                                 for k in ("requests", "bytes", "errors", "retries")}
                row["server"].update(p50_us=store1["p50_us"], p99_us=store1["p99_us"],
                                     bytes_read=stats["buffer"]["bytes_read"],
                                     log=log, log_problems=log_problems(log))
                row["memory_server"] = peak_server
                row["memory"] += peak_server
                if not self.proxy:
                    row["fetched"] = row["server"]["bytes"]
                    row["gets"] = row["server"]["requests"]
            return row
        finally:
            if server is not None:
                self.stop(server)
                if sock and os.path.exists(sock):
                    os.unlink(sock)

    def run_probe(self):
        self.write_config()
        out = os.path.join(self.folder, "out-probe.json")
        log = os.path.join(self.folder, "probe.log")
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                                     "probe", "--config", os.path.join(self.folder, "config.json"),
                                     "--out", out],
                                    stderr=err, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **self.child_env(),
                                         "BENCH_PARENT": str(os.getpid())})
        self.procs.append(proc)
        try:
            proc.wait(self.args.grace)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the proxy check did not finish; its log: {log}") from None
        self.stop(proc)
        if proc.returncode:
            raise BenchError(f"the proxy check failed; its log: {log}\n{tail(log)}")
        with open(out) as f:
            return json.load(f)


def own_cpu():
    t = os.times()
    return t.user + t.system


def store_row(stats):
    for row in stats.get("stores", ()):
        if row["store"] == "s3":
            return row
    return {"requests": 0, "bytes": 0, "errors": 0, "retries": 0, "p50_us": 0, "p99_us": 0}


def server_memory(pid, sock):
    """The server's processes' USS plus its memfds (buffer, segment)."""
    import mpumap
    import psutil
    total = 0
    try:
        server = psutil.Process(pid)
        for p in [server] + server.children(recursive=True):
            try:
                total += p.memory_full_info().uss
            except psutil.NoSuchProcess:
                pass
        b = mpumap.server_stats(sock)["buffer"]
        total += b["memfd_bytes"] + b["segment_bytes"]
    except (psutil.NoSuchProcess, OSError):
        pass
    return total


def log_problems(path):
    """Lines of a server log that say something went wrong."""
    words = ("error", "traceback", "warning", "exception", "sigbus", "failed", "killed")
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip() for line in f if any(w in line.lower() for w in words)]
    except OSError:
        return []


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def summarize(mode, results, t_go):
    wall = max(r["end"] for r in results) - t_go
    lat = sorted(x for r in results for x in r["latencies"])
    total = sum(r["bytes"] for r in results)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None

    row = {"mode": mode, "procs": len(results), "wall": wall, "bytes": total,
           "mbps": total / wall / 1e6, "reads": sum(r["reads"] for r in results),
           "p50_ms": pct(0.5), "p99_ms": pct(0.99),
           "setup_max": max(r["setup"] for r in results),
           "checked": sum(r["checked"] for r in results),
           "mismatches": sum(r["mismatches"] for r in results),
           "ok": all(r["mismatches"] == 0 and r["returncode"] == 0 for r in results),
           # peak RSS less shared memory (mpumap's buffer, counted with the server)
           "memory": sum(r["memory"]["VmHWM"] - r["memory"].get("RssShmem", 0)
                         for r in results),
           "clients": [{k: v for k, v in r.items() if k != "latencies"} for r in results]}
    s3fs = [r["s3fs"] for r in results if "s3fs" in r]
    if s3fs:
        row["s3fs"] = s3fs[0]
    return row


def fmt(value, spec, none="-"):
    return none if value is None else format(value, spec)


def print_table(rows, reads_each, procs):
    head = (f"{'mode':13}{'MB/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'fetched MiB':>13}{'x':>7}"
            f"{'GETs':>8}{'peak mem MiB':>14}{'wall s':>8}{'setup s':>8}{'reads':>8}"
            f"  {'cpu s cl/s3/px/srv':>20}  ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:13}FAILED: {r['error'].splitlines()[0]}")
            continue
        c = r["cpu"]
        cpu = f"{c['clients']:.0f}/{c['s3']:.0f}/{c['proxy']:.0f}/{c['server']:.0f}"
        fetched = r.get("fetched")
        times = fetched / r["bytes"] if fetched is not None and r["bytes"] else None
        print(f"{r['mode']:13}{r['mbps']:>8.2f}{fmt(r['p50_ms'], '.3f'):>9}"
              f"{fmt(r['p99_ms'], '.3f'):>9}"
              f"{fmt(None if fetched is None else fetched / MiB, '.0f'):>13}"
              f"{fmt(times, '.0f'):>7}"
              f"{fmt(r.get('gets'), 'd'):>8}{r['memory'] / MiB:>14.0f}{r['wall']:>8.1f}"
              f"{r['setup_max']:>8.1f}{r['reads']:>8}  {cpu:>20}"
              f"  {'yes' if r['ok'] else 'NO (%d bad)' % r['mismatches']}", flush=True)
    if any(r.get("reads", procs * reads_each) < procs * reads_each for r in rows
           if "error" not in r):
        print(f"  (reads: of {procs} x {reads_each}; fewer where a mode stopped at "
              f"--max-seconds)")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G", help="the object's size (1G; e.g. 256M)")
    p.add_argument("--procs", type=int, default=4, help="client processes (4)")
    p.add_argument("--reads", type=int, default=4096,
                   help="random 4 KiB reads per process (4096)")
    p.add_argument("--buffer", help="mpumap's --buffer-size (default: enough to hold the "
                   "object below the high watermark: its size / 0.9)")
    p.add_argument("--small-buffer", help="the buffer of the mpumap-small mode (default: a "
                   "quarter of the object)")
    p.add_argument("--page-size", default="64K", help="mpumap's --page-size (64K)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma list of {', '.join(MODES)} (all)")
    p.add_argument("--max-seconds", type=float, default=60,
                   help="a mode's processes stop reading after this long, not counting their "
                        "map, open or download (60)")
    p.add_argument("--grace", type=float, default=600,
                   help="seconds past --max-seconds after which a mode's processes are "
                        "killed and it fails (600)")
    p.add_argument("--s3fs-block-size", help="s3fs's block_size (default: s3fs's own, 50 MiB)")
    p.add_argument("--no-proxy", action="store_true",
                   help="no counting proxy: everything talks to SeaweedFS directly (then "
                        "only mpumap's fetched bytes are known, from its stats)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--go", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        die_with_parent(int(os.environ["BENCH_PARENT"]))
        with open(args.config) as f:
            cfg = json.load(f)
        if args.child == "probe":
            return probe(cfg, args.out)
        return child(args.child, cfg, args.seed, args.go, args.out)

    from mpumap.settings import parse_size
    args.size = parse_size(args.size)
    page_size = parse_size(args.page_size)
    # The server evicts from 90% of its buffer: one that is to hold the
    # object is that much larger (as scripts/bench.py sizes its "2x" rows).
    buffer = parse_size(args.buffer) if args.buffer else -(-args.size * 10 // 9 // (1 << 20)) << 20
    buffer = max(16 * page_size, -(-buffer // page_size) * page_size)
    small = parse_size(args.small_buffer) if args.small_buffer else args.size // 4
    small = max(16 * page_size, -(-small // page_size) * page_size)
    args.s3fs_block_size = parse_size(args.s3fs_block_size) if args.s3fs_block_size else None
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes: {', '.join(sorted(unknown))} (known: {', '.join(MODES)})")
    if importlib.util.find_spec("s3fs") is None:
        skipped = [m for m in modes if m.startswith("s3fs")]
        if skipped:
            print(f"note: s3fs is not installed (pip install s3fs): skipping "
                  f"{', '.join(skipped)}")
            modes = [m for m in modes if not m.startswith("s3fs")]

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    folder = tempfile.mkdtemp(prefix="mpumap-bench-remote-", dir="/var/tmp")
    bench = Bench(args, folder)
    bench.buffer, bench.small_buffer, bench.page_size = buffer, small, page_size
    rows, scan, check, failed = [], None, None, False
    started = time.monotonic()
    try:
        bench.setup()
        if bench.proxy:
            check = bench.run_probe()
            d, x = check["direct"], check["proxy"]
            print(f"proxy check (one process, obstore), direct / through the proxy: the "
                  f"object in 16 MiB GETs {d['ranges_mbps']:.0f} / {x['ranges_mbps']:.0f} MB/s, "
                  f"in one GET {d['get_mbps']:.0f} / {x['get_mbps']:.0f} MB/s; 4 KiB GET p50 "
                  f"{d['range_p50_ms']:.2f} / {x['range_p50_ms']:.2f} ms", flush=True)
            if x["ranges_mbps"] < 0.8 * d["ranges_mbps"]:
                print(f"  the proxy limits a stream: {x['ranges_mbps'] / d['ranges_mbps']:.0%} "
                      f"of direct (--no-proxy to go without it)")
        print(f"{args.procs} processes x {args.reads} random {PIECE} B reads; mpumap: buffer "
              f"{buffer / MiB:.0f} MiB (mpumap-small {small / MiB:.0f} MiB), page {page_size >> 10} KiB; at most "
              f"{args.max_seconds:.0f} s of reading a mode", flush=True)
        for mode in modes:
            if mode == "scan":
                continue
            try:
                row = bench.run_mode(mode, args.procs)
            except BenchError as e:
                failed = True
                print(f"{mode}: FAILED: {e}", flush=True)
                row = {"mode": mode, "error": str(e)}
            rows.append(row)
            if "error" not in row:
                print(f"  {mode}: {row['mbps']:.2f} MB/s in {row['wall']:.1f} s", flush=True)
            failed |= not row.get("ok", False)
        if "scan" in modes:
            scan = {}
            for part in ("scan-mpumap", "scan-download"):
                try:
                    scan[part] = bench.run_mode(part, 1)
                except BenchError as e:
                    failed = True
                    print(f"{part}: FAILED: {e}", flush=True)
                    scan[part] = {"mode": part, "error": str(e)}
                failed |= not scan[part].get("ok", False)
        print()
        if rows:
            print(f"random {PIECE} B reads: {args.procs} processes x {args.reads}, object "
                  f"{args.size / MiB:.0f} MiB; mpumap buffer {buffer / MiB:.0f} MiB "
                  f"(mpumap-small {small / MiB:.0f} MiB), page "
                  f"{page_size >> 10} KiB")
            print_table(rows, args.reads, args.procs)
            for r in rows:
                if "s3fs" in r:
                    print(f"  {r['mode']}: {r['s3fs']['cache']}, block size "
                          f"{r['s3fs']['block_size'] / MiB:.0f} MiB")
        for r in rows + list((scan or {}).values()):
            if "server" in r:
                s = r["server"]
                print(f"  {r['mode']} server: s3 row {s['requests']} requests, "
                      f"{s['bytes'] / MiB:.0f} MiB, {s['errors']} errors, {s['retries']} "
                      f"retries, p50 {s['p50_us'] / 1e3:.1f} ms, p99 {s['p99_us'] / 1e3:.1f} "
                      f"ms; server memory peak {r['memory_server'] / MiB:.0f} MiB; "
                      f"log problems: {len(s['log_problems'])}")
                for line in s["log_problems"][:3]:
                    print(f"    {line[:150]}")
                if s["log_problems"]:
                    print(f"    (log: {s['log']})")
            if r.get("upstream_failures"):
                print(f"  {r['mode']}: the proxy re-sent {r['upstream_failures']} requests "
                      f"on closed upstream connections")
            if r.get("broken_bodies"):
                print(f"  {r['mode']}: {r['broken_bodies']} GET responses broke off in the "
                      f"middle (counted up to there)")
        print("  peak mem: clients' VmHWM - RssShmem, summed; mpumap adds its server's "
              "peak USS + memfds")
        if scan:
            print()
            print(f"scan: one process reads the {args.size / MiB:.0f} MiB object from start "
                  f"to end")
            for part, r in scan.items():
                if "error" in r:
                    print(f"  {part:14} FAILED: {r['error'].splitlines()[0]}")
                    continue
                fetched = r.get("fetched")
                print(f"  {part:14}{r['mbps']:>9.1f} MB/s  {r['wall']:>6.1f} s  fetched "
                      f"{fmt(None if fetched is None else fetched / MiB, '.0f')} MiB  peak mem "
                      f"{r['memory'] / MiB:.0f} MiB  "
                      f"{'ok' if r['ok'] else 'WRONG BYTES'}")
            a, b = scan.get("scan-mpumap", {}), scan.get("scan-download", {})
            if "mbps" in a and "mbps" in b:
                print(f"  mpumap / download: {a['mbps'] / b['mbps']:.2f}")
            if check and "mbps" in a:
                ranged = check["proxy"]["ranges_mbps"]
                print(f"  (the proxy check's 16 MiB ranged GETs one after the other: "
                      f"{ranged:.0f} MB/s; mpumap / that: {a['mbps'] / ranged:.2f})")
        print(f"\ntotal time {time.monotonic() - started:.0f} s", flush=True)
    except KeyboardInterrupt:
        failed = True
        print("\ninterrupted: stopping every process", flush=True)
    except BenchError as e:
        failed = True
        print(f"FAILED: {e}", flush=True)
    finally:
        bench.close()
        if args.json and (rows or scan):
            with open(args.json, "w") as f:
                json.dump({"size": args.size, "procs": args.procs, "reads": args.reads,
                           "buffer": buffer, "small_buffer": small, "page_size": page_size,
                           "max_seconds": args.max_seconds, "proxy_check": check,
                           "rows": rows, "scan": scan}, f, indent=2)
        if args.keep:
            print(f"kept {folder}")
        else:
            if failed:
                logs = tempfile.mkdtemp(prefix="mpumap-bench-remote-logs-", dir="/var/tmp")
                for log in bench.logs:
                    if os.path.exists(log):
                        shutil.copy(log, logs)
                print(f"the logs are kept in {logs}")
            shutil.rmtree(folder, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
