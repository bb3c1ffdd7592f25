#!/usr/bin/env python3
"""Benchmark: N client processes touch one byte of every 4 KiB page of a file,
through mpumap and then through the kernel's own mmap of the same file, in the
same run, in sequential and in random page order; every client then checks
every byte it can see against the file.

Each row prints GB/s (bytes the touches cover, over the slowest client's
time), faults per second and µs per fault (from the server's count for those
clients; the kernel's minor and major faults for mmap), the server's CPU time
per fault, and the ratio mpumap/mmap.  Where the buffer is smaller than the
file, "k-budget" is the kernel's mmap again with its clients in a memory
cgroup of the buffer's size plus 8 MiB a client for its own memory (the same
memory budget; root only), and "x" mpumap's throughput over it; a kernel
that thrashes there is stopped after ten times mpumap's time (">N s"), and
not run there again for that row.  "disk1" and
"disk2" are what the disk itself gives for the pattern: O_DIRECT reads of one
umap page each in the same order, one and two at a time (the floor for a
fault that goes to the disk), to set beside "read", what mpumap read from
the file a second.  Where the buffer is smaller than the file, "fill" is
what the machine gives, without mpumap, for the work of the random rows'
faults (scripts/bench_floor.c: as many threads as clients, each reading a
page at random with O_DIRECT and copying it with UFFDIO_COPY into a memfd
mapping over the oldest page, punched out first): a floor for "read" that
counts the copying and evicting too.  Clients are written in Python
(numpy's gather does the touching) or in C (scripts/bench_client.c, built
against libmpumapclient).  --cache cold drops the file from the page cache before
every run, of mpumap and of the kernel alike.

--parts writes (or reads,writes) adds the write rows: one C process
(scripts/bench_writer.c) writes one byte of every 4 KiB page of the file
through a mapping that writes, in sequential and in random order, then
makes it durable (client_uflush; for the kernel, msync(MS_SYNC) of its
shared mapping of the same file), from a cold page cache, with a buffer of a
quarter of the file: GB/s of the writes and the sync together, each part's
seconds, and the ratio.  A "present" row first reads every page into a
buffer that holds the file (--read-ahead 0, warm cache: one fault a page),
then writes each: µs per read fault against µs per write fault on a page
that is there.  After every run the file is read back with O_DIRECT and
every written byte checked.

    python scripts/bench.py --size 1G --page-size 4K,64K --clients 1,2 --json out.json
    python scripts/bench.py --cache cold --read-ahead 0,63,auto --store-io direct
    python scripts/bench.py --parts writes --size 1G
"""
import argparse
import contextlib
import itertools
import json
import mmap
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

import mpumap
from mpumap.settings import FILL_WAYS, parse_size
from mpumap.testing import (MemoryCgroup, NoCgroup, build_c_program, drop_from_page_cache,
                            make_file, running_server)

TOUCH = 4096  # one byte per 4 KiB page, as MP-UMap's benchmarks do
PROCESS_ALLOWANCE = 8 << 20  # a client's own memory, on top of the budget (kernel-budget)
HERE = os.path.dirname(os.path.abspath(__file__))


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.0005)


def python_client(kind, socket_path, path, order, seed, go):
    """The Python client: as bench_client.c does, with numpy's gather."""
    import mmap

    size = os.path.getsize(path)
    offsets = np.arange(0, size, TOUCH, dtype=np.int64)
    if order == "random":
        np.random.default_rng(seed).shuffle(offsets)
    if kind == "mpumap":
        client = mpumap.connect(socket_path)
        m = client.map(path)
    else:
        client = None
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    data = np.frombuffer(m, dtype=np.uint8)
    print("ready", flush=True)
    wait_for(go)
    started = time.perf_counter()
    touched = data[offsets]  # the faults happen here, in numpy's gather loop
    print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
    wait_for(go + "-check")
    want = np.fromfile(path, dtype=np.uint8)
    ok = bool(np.array_equal(touched, want[offsets]))
    step = 64 << 20
    for start in range(0, size, step):
        ok &= bool(np.array_equal(data[start:start + step], want[start:start + step]))
    del data, touched
    m.close()
    if client:
        client.close()
    print(json.dumps({"ok": ok}), flush=True)


def build_c_client(folder):
    return build_c_program(os.path.join(HERE, "bench_client.c"), folder)


def mp_umap_parts(build):
    """MP-UMap's server and client library in its build tree (LLNL's umap,
    branch mpumap, built with cmake): their paths, or SystemExit."""
    server = os.path.join(build, "tests", "umap-service", "umap-server")
    libdir = os.path.join(build, "src", "umap")
    for needed in (server, os.path.join(libdir, "libmpumapclient.so")):
        if not os.path.isfile(needed):
            raise SystemExit(f"--mp-umap {build}: no {needed} (build LLNL umap's mpumap branch "
                             f"there with cmake)")
    return server, libdir


def build_mp_umap_client(folder, libdir):
    """bench_client.c linked against MP-UMap's client library: the same API
    (our header declares it), the same program."""
    return build_c_program(os.path.join(HERE, "bench_client.c"), folder,
                           name="bench_client_mp_umap",
                           libs=[f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lmpumapclient",
                                 "-lstdc++", "-lpthread"])


@contextlib.contextmanager
def running_mp_umap(server, page_size, buffer, fillers):
    """MP-UMap's server on a fresh socket, configured as ours is (its
    variables: page size, buffer in pages, fillers, one evictor); yields the
    socket's path.  Killed at the end: it may have died already (it does
    when a client leaves while another is connected)."""
    folder = tempfile.mkdtemp(prefix="mp-umap-", dir="/tmp")
    sock = os.path.join(folder, "server.sock")
    env = {**os.environ, "UMAP_PAGESIZE": str(page_size), "UMAP_BUFSIZE": str(buffer // page_size),
           "UMAP_PAGE_FILLERS": str(fillers), "UMAP_PAGE_EVICTORS": "1"}
    proc = subprocess.Popen([server, sock], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"MP-UMap's server did not start ({proc.poll()})")
            time.sleep(0.05)
        yield sock
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def kernel_faults(pid):
    """Minor plus major page faults of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]) + int(fields[9])


def bytes_read(sock):
    """What the server has read from stores so far."""
    return mpumap.server_stats(sock)["buffer"]["bytes_read"]


def client_faults(sock, pids):
    """The server's fault count of each client, by pid."""
    by_pid = {c["pid"]: c["faults"] for c in mpumap.server_stats(sock)["clients"]}
    return [by_pid.get(pid, 0) for pid in pids]


def said(lines, deadline):
    """A client's next word, from the queue its stdout's lines go to:
    "ready", or a JSON line (what a client library prints besides is
    skipped); None once it ended, TimeoutError past the deadline."""
    while True:
        try:
            line = lines.get(timeout=max(0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError from None
        if line is None:
            return None
        line = line.strip()
        if line == "ready":
            return line
        if line.startswith("{"):
            return json.loads(line)


def lines_of(stream):
    """A queue of the stream's lines (None at its end), filled by a thread:
    select() on a pipe does not see what its reader has buffered already."""
    lines = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def run_clients(language, kind, sock, path, order, clients, folder, c_binary,
                server=None, pin=None, cgroup=None, timeout=1800):
    """Run the clients (in a memory cgroup, if given); returns their
    results, with the faults each took while touching, and the server's CPU
    seconds meanwhile.  Clients still at it after `timeout` seconds are
    killed, and subprocess.TimeoutExpired raised."""
    deadline = time.monotonic() + timeout
    go = os.path.join(folder, f"go-{kind}-{time.monotonic_ns()}")
    env = {**os.environ, "MPUMAP_SOCKET": sock or ""}
    through = "mpumap" if kind == "mp-umap" else kind  # its client library, MP-UMap's
    commands = [([c_binary, through, path, order, str(i), go] if language == "c" else
                 [sys.executable, __file__, "--_client", kind, sock or "-", path, order,
                  str(i), go]) for i in range(clients)]
    if pin:
        commands = [["taskset", "-c", pin, *cmd] for cmd in commands]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env,
                              preexec_fn=cgroup.join if cgroup else None)
             for cmd in commands]

    # Their lines are read by threads (lines_of): only wait() here.
    lines = {proc: lines_of(proc.stdout) for proc in procs}

    def kill_all():
        for p in procs:
            p.kill()
            p.wait()

    def next_word(proc, when):
        try:
            word = said(lines[proc], deadline)
        except TimeoutError:
            kill_all()
            raise subprocess.TimeoutExpired(commands[0], timeout) from None
        if word is None:
            kill_all()
            raise SystemExit(f"a {language} {kind} client failed {when} ({proc.returncode})")
        return word

    for proc in procs:
        if next_word(proc, "to start") != "ready":
            raise SystemExit(f"a {language} {kind} client failed to start")
    pids = [p.pid for p in procs]
    # The server's count for mpumap; the kernel's (all page faults) for the others.
    faults0 = client_faults(sock, pids) if kind == "mpumap" else list(map(kernel_faults, pids))
    read0 = bytes_read(sock) if kind == "mpumap" else 0
    cpu0 = server_cpu(server) if server else 0
    open(go, "w").close()
    results = [next_word(proc, "while touching its pages") for proc in procs]
    cpu = server_cpu(server) - cpu0 if server else 0
    faults1 = client_faults(sock, pids) if kind == "mpumap" else list(map(kernel_faults, pids))
    read = bytes_read(sock) - read0 if kind == "mpumap" else None
    for result, before, after in zip(results, faults0, faults1):
        result["faults"] = after - before
        result["read"] = read
    open(go + "-check", "w").close()
    for proc, result in zip(procs, results):
        result.update(next_word(proc, "while checking"))
    open(go + "-done", "w").close()
    for proc, result in zip(procs, results):
        proc.wait(timeout=max(1, deadline - time.monotonic()))
        if proc.returncode or not result["ok"]:
            raise SystemExit(f"a {language} {kind} client found wrong bytes or failed "
                             f"({proc.returncode})")
    for name in (go, go + "-check", go + "-done"):
        os.unlink(name)
    return results, cpu


def server_cpu(proc):
    total = 0.0
    server = psutil.Process(proc.pid)
    for p in [server] + server.children():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def summary(results, touched, clients, cpu=None):
    wall = max(r["seconds"] for r in results)
    faults = sum(r["faults"] for r in results)
    row = {"gbps": touched / wall / 1e9, "seconds": wall, "faults": faults,
           "faults_per_s": faults / wall, "us_per_fault": wall * 1e6 / max(1, faults / clients),
           "ok": all(r["ok"] for r in results)}
    if cpu is not None:
        row["server_cpu_us_per_fault"] = cpu * 1e6 / max(1, faults)
    if results[0].get("read") is not None:  # the disk's share: what the store gave
        row["read_gbps"] = results[0]["read"] / wall / 1e9
    return row


def disk_floor(path, page_size, order, readers, seconds=2.0):
    """What the disk itself delivers for the pattern, in GB/s: O_DIRECT
    reads of one umap page each, in the clients' page order (sequential, or
    the pages shuffled), `readers` at a time (threads: preadv lets go of the
    GIL), for up to `seconds` or the whole file.  None where the file
    system refuses O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    pages = list(range(max(1, os.fstat(fd).st_size // page_size)))
    if order == "random":
        random.Random(3).shuffle(pages)
    taken = iter(pages)
    lock = threading.Lock()
    done = [0]
    deadline = time.perf_counter() + seconds

    def read():
        buf = mmap.mmap(-1, page_size)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    page = next(taken, None)
                if page is None:
                    return
                n = os.preadv(fd, [buf], page * page_size)
                with lock:
                    done[0] += n
        finally:
            buf.close()

    try:
        started = time.perf_counter()
        threads = [threading.Thread(target=read) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return done[0] / (time.perf_counter() - started) / 1e9
    finally:
        os.close(fd)


def fill_floor(binary, path, page_size, threads):
    """GB/s read by scripts/bench_floor.c: `threads` threads doing the work
    of random faults through a full buffer, with no server and no fault.
    None where it cannot run here (no O_DIRECT, no userfaultfd)."""
    count = max(2000, (64 << 20) // page_size)
    proc = subprocess.run([binary, path, str(page_size), str(threads), str(count)],
                          capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout)["read_gbps"] if proc.returncode == 0 else None


def set_page_cache(path, cache):
    """The file out of the page cache ("cold") or read into it ("warm"),
    just before a run: the kernel reclaims page cache it sees idle (this
    machine's DAMON takes some within seconds), so a file warmed rows
    before may be warm no longer."""
    if cache == "cold":
        drop_from_page_cache(path)
        return
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def measure(path, size, case, server_args, folder, c_binary, pin=None, kernel_budget=True,
            floor_binary=None, mp_umap=None):
    page_size, buffer, clients, order, cache, read_ahead, store_io, language = case
    row = {"client": language, "order": order, "cache": cache, "clients": clients,
           "page_size": page_size, "buffer": buffer, "size": size,
           "read_ahead": read_ahead, "store_io": store_io}
    touched = clients * (size // TOUCH) * TOUCH  # bytes the touches cover
    pinned = ["--cpus", pin] if pin else []
    ahead = [] if read_ahead == "auto" else ["--read-ahead", read_ahead]
    with running_server("--page-size", page_size, "--buffer-size", f"{buffer >> 10}K",
                        *server_args, "--store-io", store_io, *ahead,
                        *pinned) as (sock, proc):
        set_page_cache(path, cache)
        results, cpu = run_clients(language, "mpumap", sock, path, order, clients, folder,
                                   c_binary, server=proc, pin=pin)
        row["mpumap"] = summary(results, touched, clients, cpu)
    if mp_umap and language == "c":
        server, binary, fillers = mp_umap
        with running_mp_umap(server, page_size, buffer, fillers) as sock:
            set_page_cache(path, cache)
            results, _ = run_clients(language, "mp-umap", sock, path, order, clients, folder,
                                     binary, pin=pin)
            row["mp_umap"] = summary(results, touched, clients)
    set_page_cache(path, cache)
    results, _ = run_clients(language, "mmap", None, path, order, clients, folder, c_binary,
                             pin=pin)
    row["mmap"] = summary(results, touched, clients)
    row["ratio"] = row["mpumap"]["gbps"] / row["mmap"]["gbps"]
    row["kernel_budget"] = (mmap_in_budget(path, size, buffer, cache, language, order, clients,
                                           folder, c_binary, pin, touched,
                                           max(60.0, 10 * row["mpumap"]["seconds"]))
                            if kernel_budget else None)
    row["disk"] = {readers: disk_floor(path, page_size, order, readers) for readers in (1, 2)}
    row["fill"] = (fill_floor(floor_binary, path, page_size, clients)
                   if floor_binary and order == "random" and buffer < size else None)
    return row


def mmap_in_budget(path, size, buffer, cache, language, order, clients, folder, c_binary,
                   pin, touched, give_up):
    """The kernel's mmap with the memory mpumap had: its clients in a memory
    cgroup limited to the buffer's size (plus PROCESS_ALLOWANCE a client
    for its own memory: mpumap's server needs none of its budget for
    them), the page cache they fill charged
    there (warm: filled by a reader in the cgroup, up to what fits).  None
    where the buffer holds the whole file (no budget to keep), or where no
    cgroup can be made (not root, no memory controller).  Squeezed so, the
    kernel may thrash (re-read what it read ahead before the client got to
    it): a run that takes ten times mpumap's, or a minute at least, is
    stopped and reported as such ("gbps" None)."""
    if buffer >= size:
        return None
    try:
        group = MemoryCgroup()
    except NoCgroup:
        return None
    try:
        group.set_limit(buffer + PROCESS_ALLOWANCE * clients)
        drop_from_page_cache(path)
        if cache == "warm":
            subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True,
                           preexec_fn=group.join)
        try:
            results, _ = run_clients(language, "mmap", None, path, order, clients, folder,
                                     c_binary, pin=pin, cgroup=group, timeout=give_up)
        except subprocess.TimeoutExpired:
            return {"gbps": None, "seconds": give_up, "ok": True}
        return summary(results, touched, clients)
    finally:
        group.remove()


def median_row(rows):
    """The run with the median mpumap throughput, with every run's figure."""
    rows = sorted(rows, key=lambda r: r["mpumap"]["gbps"])
    row = dict(rows[len(rows) // 2])
    row["runs"] = [{"mpumap_gbps": r["mpumap"]["gbps"], "mmap_gbps": r["mmap"]["gbps"],
                    "mp_umap_gbps": r.get("mp_umap", {}).get("gbps"),
                    "us_per_fault": r["mpumap"]["us_per_fault"]} for r in rows]
    shown = [r["mp_umap"]["gbps"] for r in rows if r.get("mp_umap")]
    if shown:  # its own median, beside ours
        row["mp_umap"] = dict(row.get("mp_umap") or {}, gbps=sorted(shown)[len(shown) // 2])
    return row


def budget_text(b):
    if b is None:
        return "-"
    if b["gbps"] is None:
        return f">{b['seconds']:.0f}s"
    return f"{b['gbps']:.3f}"


def gbps_text(value):
    return "-" if value is None else f"{value:.3f}"


def print_table(rows):
    head = (f"{'client':7}{'order':7}{'cache':6}{'io':7}{'ra':>5}{'cl':>3}{'page':>6}"
            f"{'buffer':>8}  {'mpumap':>8}{'mmap':>8}{'ratio':>7}{'k-budget':>9}{'x':>7}"
            f"{'MP-UMap':>8}"
            f"{'read':>7}{'disk1':>7}{'disk2':>7}{'fill':>7}  {'mpumap f/s':>11}{'mmap f/s':>10}{'us/fault':>9}"
            f"{'srv us/f':>9}  ok")
    print("GB/s; k-budget: the kernel's mmap in a memory cgroup of the buffer's size, x: "
          "mpumap over it; read: what mpumap read from the file; disk1, disk2: O_DIRECT reads of "
          "one page in the same order, 1 and 2 at a time; fill: the random faults' work "
          "without mpumap (bench_floor), a thread a client; MP-UMap: LLNL's, with --mp-umap")
    print(head)
    print("-" * len(head))
    for r in rows:
        u, k, b = r["mpumap"], r["mmap"], r["kernel_budget"]
        if not b:
            times = "-"
        elif b["gbps"] is None:  # stopped: at least this many times slower
            times = f">{b['seconds'] / u['seconds']:.0f}"
        else:
            times = f"{u['gbps'] / b['gbps']:.1f}"
        print(f"{r['client']:7}{r['order']:7}{r['cache']:6}{r['store_io']:7}"
              f"{r['read_ahead']:>5}{r['clients']:>3}{r['page_size'] >> 10:>5}K"
              f"{r['buffer'] >> 20:>7}M  {u['gbps']:>8.3f}{k['gbps']:>8.3f}{r['ratio']:>7.2f}"
              f"{budget_text(b):>9}{times:>7}"
              f"{gbps_text(r.get('mp_umap', {}).get('gbps')):>8}"
              f"{gbps_text(u.get('read_gbps')):>7}{gbps_text(r['disk'][1]):>7}{gbps_text(r['disk'][2]):>7}"
              f"{gbps_text(r.get('fill')):>7}"
              f"  {u['faults_per_s']:>11.0f}{k['faults_per_s']:>10.0f}{u['us_per_fault']:>9.1f}"
              f"{u['server_cpu_us_per_fault']:>9.1f}"
              f"  {'yes' if u['ok'] and k['ok'] and (b is None or b['ok']) else 'NO'}",
              flush=True)


# ---- write rows ------------------------------------------------------------------


def check_written(path, value):
    """Every page's byte 1, as the disk has it (O_DIRECT), is what
    bench_writer wrote with `value`: the pages that are not."""
    size = os.path.getsize(path)
    chunk = 64 << 20
    buf = mmap.mmap(-1, chunk)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bad = 0
    try:
        for off in range(0, size - size % TOUCH, chunk):
            n = os.preadv(fd, [buf], off)
            got = np.frombuffer(buf, dtype=np.uint8, count=n)[1::TOUCH]
            pages = np.arange(off // TOUCH, off // TOUCH + len(got), dtype=np.int64)
            bad += int(np.count_nonzero(got != ((pages * 31 + value) & 0xFF)))
    finally:
        os.close(fd)
    return bad


def run_writer(binary, kind, sock, path, order, value, present, timeout=1800):
    env = {**os.environ, "MPUMAP_SOCKET": sock or ""}
    proc = subprocess.run([binary, kind, path, order, "1", str(value), str(int(present))],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"bench_writer ({kind}) failed ({proc.returncode}): {proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["bad"] = check_written(path, value)
    return result


def holding_buffer(size, page):
    """A buffer that holds size bytes below the high watermark (90%), with
    a page to spare: the evictors start once the pages in use reach it."""
    return (-(-size // page) * 10 // 9 + 2) * page


def write_rows(path, size, pages_sizes, orders, runs, folder):
    binary = build_c_program(os.path.join(HERE, "bench_writer.c"), folder)
    rows, value = [], 0
    for page, order in itertools.product(pages_sizes, orders):
        buffer = max(page * 16, size // 4 // page * page)
        row = {"page": page, "order": order, "buffer": buffer, "mpumap": [], "mmap": []}
        for _ in range(runs):
            for kind in ("mpumap", "mmap"):
                value += 1
                drop_from_page_cache(path)
                if kind == "mpumap":
                    with running_server("--page-size", page, "--buffer-size",
                                        f"{buffer >> 10}K") as (sock, _):
                        r = run_writer(binary, kind, sock, path, order, value, False)
                        b = mpumap.server_stats(sock)["buffer"]
                        r.update(written=b["written"], writes=b["writes"], faults=b["faults"])
                else:
                    r = run_writer(binary, kind, None, path, order, value, False)
                r["gbps"] = size / (r["write_seconds"] + r["sync_seconds"]) / 1e9
                row[kind].append(r)
        for kind in ("mpumap", "mmap"):
            row[kind] = sorted(row[kind], key=lambda r: r["gbps"])[len(row[kind]) // 2]
        print(f"  writes {page >> 10}K {order}: mpumap {row['mpumap']['gbps']:.3f} GB/s, "
              f"mmap+msync {row['mmap']['gbps']:.3f} GB/s", flush=True)
        rows.append(row)
    # Faults on present pages: read every page, then write it.
    page = min(pages_sizes)
    present = {"page": page, "mpumap": [], "mmap": []}
    for _ in range(runs):
        for kind in ("mpumap", "mmap"):
            value += 1
            set_page_cache(path, "warm")  # the faults, not the disk
            if kind == "mpumap":
                with running_server("--page-size", page, "--buffer-size",
                                    f"{holding_buffer(size, page) >> 10}K",
                                    "--read-ahead", 0) as (sock, _):
                    r = run_writer(binary, kind, sock, path, "random", value, True)
            else:
                r = run_writer(binary, kind, None, path, "random", value, True)
            pages = size // TOUCH
            r["read_us"] = r["read_seconds"] * 1e6 / pages
            r["write_us"] = r["write_seconds"] * 1e6 / pages
            present[kind].append(r)
    for kind in ("mpumap", "mmap"):
        present[kind] = sorted(present[kind], key=lambda r: r["write_us"])[runs // 2]
    return rows, present


def print_write_rows(rows, present, size):
    print(f"writes: one byte of every 4 KiB page of a {size >> 20} MiB file, then made "
          f"durable (client_uflush / msync), cold page cache, buffer a quarter of the file")
    head = (f"{'page':>6}{'order':>8}{'mpumap GB/s':>13}{'write s':>9}{'flush s':>9}"
            f"{'written':>9}{'mmap GB/s':>11}{'write s':>9}{'msync s':>9}{'ratio':>7}  ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        m, k = r["mpumap"], r["mmap"]
        print(f"{r['page'] >> 10:>5}K{r['order']:>8}{m['gbps']:>13.3f}{m['write_seconds']:>9.2f}"
              f"{m['sync_seconds']:>9.2f}{m['written']:>9}{k['gbps']:>11.3f}"
              f"{k['write_seconds']:>9.2f}{k['sync_seconds']:>9.2f}{m['gbps'] / k['gbps']:>7.2f}"
              f"  {'yes' if not m['bad'] and not k['bad'] else 'NO'}")
    m, k = present["mpumap"], present["mmap"]
    print(f"present pages ({present['page'] >> 10}K, random, warm, --read-ahead 0): mpumap "
          f"{m['read_us']:.1f} us a read fault, {m['write_us']:.1f} us a write fault "
          f"({m['write_us'] / m['read_us']:.2f}x); the kernel {k['read_us']:.2f} / "
          f"{k['write_us']:.2f} us")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", help="an existing file to read (default: generate one)")
    p.add_argument("--size", default="256M", help="size of the generated file (256M)")
    p.add_argument("--page-size", default="4K,64K", help="umap page sizes (4K,64K)")
    p.add_argument("--buffer", default="1,0.25",
                   help="buffer sizes as fractions of the file; 1 holds it all below the "
                        "high watermark (1,0.25)")
    p.add_argument("--clients", default="1,2", help="client process counts (1,2)")
    p.add_argument("--order", default="seq,random", help="page orders (seq,random)")
    p.add_argument("--cache", default="warm,cold",
                   help="the file in the page cache or not, before each run (warm,cold)")
    p.add_argument("--read-ahead", default="auto",
                   help="the server's --read-ahead: pages, or auto for its default "
                        "(auto; e.g. 0,63,auto)")
    p.add_argument("--store-io", default="cached,direct",
                   help="store reads: cached, drop, direct (cached,direct)")
    p.add_argument("--client", default="c,python", help="client languages (c,python)")
    p.add_argument("--runs", type=int, default=1, help="runs of each row; the median is shown")
    p.add_argument("--fillers", type=int, default=2, help="the server's --fillers (2)")
    p.add_argument("--fill-by", choices=FILL_WAYS,
                   help="the server's --fill-by (its default)")
    p.add_argument("--no-kernel-budget", dest="kernel_budget", action="store_false",
                   help="skip the kernel's mmap in a memory cgroup of the buffer's size "
                        "(slow: squeezed so, it thrashes; stopped after 10x mpumap's time, "
                        "and not run again for the row)")
    p.add_argument("--pin", metavar="CPUS",
                   help="run the server (--cpus) and the clients (taskset) on these CPUs")
    p.add_argument("--parts", default="reads",
                   help="reads (the matrix above), writes (the write rows), or both (reads)")
    p.add_argument("--mp-umap", metavar="BUILD",
                   help="also run the C client rows through LLNL's MP-UMap (umap's mpumap "
                        "branch, built with cmake in BUILD): its server with the same page "
                        "size, buffer and fillers, the same client program linked against "
                        "its client library")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--_client", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._client:
        kind, sock, path, order, seed, go = args._client
        return python_client(kind, sock, path, order, int(seed), go)

    split = lambda text: text.split(",")  # noqa: E731
    server_args = ["--fillers", args.fillers, *(["--fill-by", args.fill_by] if args.fill_by
                                                else [])]
    parts = split(args.parts)
    if set(parts) - {"reads", "writes"}:
        p.error(f"--parts is reads, writes or both, not {args.parts}")
    with tempfile.TemporaryDirectory(prefix="mpumap-bench-", dir="/var/tmp") as folder:
        if args.file and not os.path.isfile(args.file):
            p.error(f"--file {args.file}: no such file")
        size = os.path.getsize(args.file) if args.file else parse_size(args.size)
        rows = []
        if "writes" in parts:
            # The file is written: a copy of its own, never --file itself.
            copy = os.path.join(folder, "written.bin")
            make_file(copy, size, seed=8)
            writes, present = write_rows(copy, size, list(map(parse_size,
                                                              split(args.page_size))),
                                         split(args.order), args.runs, folder)
            print()
            print_write_rows(writes, present, size)
            if args.json:
                with open(args.json + ".writes", "w") as f:
                    json.dump({"rows": writes, "present": present}, f, indent=2)
            if any(r["mpumap"]["bad"] or r["mmap"]["bad"] for r in writes):
                return 1
            os.unlink(copy)
        if "reads" in parts:
            path = args.file or make_file(os.path.join(folder, "bench.bin"), size, seed=7)
            c_binary = build_c_client(folder) if "c" in split(args.client) else None
            floor_binary = build_c_program(os.path.join(HERE, "bench_floor.c"), folder)
            mp_umap = None
            if args.mp_umap:
                server, libdir = mp_umap_parts(args.mp_umap)
                mp_umap = (server, build_mp_umap_client(folder, libdir), args.fillers)
            print(f"file {path}: {size >> 20} MiB; one byte touched per {TOUCH} B page; "
                  f"{args.runs} run(s) a row", flush=True)
            for case in itertools.product(
                    map(parse_size, split(args.page_size)), map(float, split(args.buffer)),
                    map(int, split(args.clients)), split(args.order), split(args.cache),
                    split(args.read_ahead), split(args.store_io), split(args.client)):
                page, fraction = case[:2]
                part = -(-int(size * fraction) // page) * page
                buffer = max(page * 16, holding_buffer(part, page) if fraction >= 1 else part)
                case = (page, buffer, *case[2:])
                # The kernel that thrashed in the budget once is not run
                # there again: each such run goes on to its cut-off.
                runs, thrashed = [], None
                for _ in range(args.runs):
                    run = measure(path, size, case, server_args, folder, c_binary, args.pin,
                                  args.kernel_budget and thrashed is None, floor_binary,
                                  mp_umap)
                    budget = run["kernel_budget"]
                    if budget is not None and budget["gbps"] is None:
                        thrashed = budget
                    runs.append(run)
                row = median_row(runs)
                if thrashed:
                    row["kernel_budget"] = thrashed
                rows.append(row)
            print()
            print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["mpumap"]["ok"] and r["mmap"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
