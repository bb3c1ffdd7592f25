#!/usr/bin/env python3
"""Benchmark: N client processes touch one byte of every 4 KiB page of a file,
through mpumap and then through the kernel's own mmap of the same file, in the
same run, in sequential and in random page order.

Every run then checks every byte the clients can see against the file.

    python scripts/bench.py --size 1G --page-size 4K,64K --clients 1,2 --json out.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import mpumap  # noqa: E402
from _common import drop_from_page_cache, make_file, running_server  # noqa: E402
from mpumap.settings import parse_size  # noqa: E402

TOUCH = 4096  # one byte per 4 KiB page, as MP-UMap's benchmarks do


def offsets_for(size, order, seed):
    offsets = np.arange(0, size, TOUCH, dtype=np.int64)
    if order == "random":
        np.random.default_rng(seed).shuffle(offsets)
    return offsets


def my_faults(socket_path):
    """This client's faults so far, as the server counts them."""
    for c in mpumap.server_stats(socket_path)["clients"]:
        if c["pid"] == os.getpid():
            return c["faults"]
    return 0


def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.0005)


def worker(kind, socket_path, path, order, seed, go):
    """One client: map, wait for the start, touch, report; then, once told,
    check every byte."""
    import mmap

    size = os.path.getsize(path)
    offsets = offsets_for(size, order, seed)
    if kind == "mpumap":
        client = mpumap.connect(socket_path)
        m = client.map(path)
    else:
        client = None
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    data = np.frombuffer(m, dtype=np.uint8)
    faults = my_faults(socket_path) if client else 0
    print("ready", flush=True)
    wait_for(go)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    touched = data[offsets]  # the faults happen here, in numpy's gather loop
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    faults = my_faults(socket_path) - faults if client else \
        after.ru_minflt - before.ru_minflt + after.ru_majflt - before.ru_majflt
    print(json.dumps({"seconds": seconds, "faults": faults}), flush=True)
    wait_for(go + "-check")
    # Check: the touched bytes, then every byte, against the file itself.
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


def run_clients(kind, sock, path, order, clients, folder, between=None):
    """Run the clients; `between` is called when they have all touched their
    pages and before they check them."""
    go = os.path.join(folder, f"go-{kind}-{time.monotonic_ns()}")
    procs = [subprocess.Popen([sys.executable, __file__, "--_worker", kind, sock or "-", path,
                               order, str(i), go], stdout=subprocess.PIPE, text=True)
             for i in range(clients)]
    for proc in procs:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"a {kind} client failed to start")
    open(go, "w").close()
    results = []
    for proc in procs:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"a {kind} client failed while touching its pages")
        results.append(json.loads(line))
    extra = between() if between else None
    open(go + "-check", "w").close()
    for proc, result in zip(procs, results):
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode:
            raise SystemExit(f"a {kind} client failed ({proc.returncode})")
        result.update(json.loads(out.strip().splitlines()[-1]))
    os.unlink(go)
    os.unlink(go + "-check")
    return results, extra


def server_cpu(proc):
    import psutil

    total = 0.0
    for p in [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(path, size, page_size, buffer, order, clients, cache, read_ahead, store_io,
            fillers, folder):
    row = {"order": order, "cache": cache, "clients": clients, "page_size": page_size,
           "buffer": buffer, "size": size, "read_ahead": read_ahead, "store_io": store_io}
    touched = clients * (size // TOUCH) * TOUCH  # bytes covered by the touches
    with running_server("--page-size", page_size, "--buffer-size", f"{buffer >> 10}K",
                        "--fillers", fillers, "--read-ahead", read_ahead,
                        "--store-io", store_io) as (sock, proc):
        if cache == "cold":
            drop_from_page_cache(path)
        cpu0 = server_cpu(proc)
        results, cpu = run_clients("mpumap", sock, path, order, clients, folder,
                                   between=lambda: server_cpu(proc) - cpu0)
    faults = sum(r["faults"] for r in results)
    wall = max(r["seconds"] for r in results)
    row["mpumap"] = {
        "gbps": touched / wall / 1e9, "seconds": wall, "faults": faults,
        "faults_per_s": faults / wall, "us_per_fault": wall * 1e6 / max(1, faults / clients),
        "server_cpu_us_per_fault": cpu * 1e6 / max(1, faults),
        "ok": all(r["ok"] for r in results),
    }
    if cache == "cold":
        drop_from_page_cache(path)
    else:
        with open(path, "rb") as f:  # warm: the file in the page cache, as mpumap had it
            while f.read(64 << 20):
                pass
    results, _ = run_clients("mmap", None, path, order, clients, folder)
    wall = max(r["seconds"] for r in results)
    faults = sum(r["faults"] for r in results)
    row["mmap"] = {
        "gbps": touched / wall / 1e9, "seconds": wall, "faults": faults,
        "faults_per_s": faults / wall, "ok": all(r["ok"] for r in results),
    }
    row["ratio"] = row["mpumap"]["gbps"] / row["mmap"]["gbps"]
    return row


def print_table(rows):
    head = (f"{'order':7}{'cache':6}{'io':7}{'ra':>3}{'cl':>3}{'page':>7}{'buffer':>8}  "
            f"{'mpumap GB/s':>11}{'mmap GB/s':>10}{'ratio':>7}  {'mpumap f/s':>11}"
            f"{'mmap f/s':>10}{'us/fault':>9}{'srv us/f':>9}  ok")
    print(head)
    print("-" * len(head))
    for r in rows:
        u, k = r["mpumap"], r["mmap"]
        print(f"{r['order']:7}{r['cache']:6}{r['store_io']:7}{r['read_ahead']:>3}"
              f"{r['clients']:>3}{r['page_size'] >> 10:>6}K"
              f"{r['buffer'] >> 20:>7}M  {u['gbps']:>11.3f}{k['gbps']:>10.3f}{r['ratio']:>7.2f}"
              f"  {u['faults_per_s']:>11.0f}{k['faults_per_s']:>10.0f}{u['us_per_fault']:>9.1f}"
              f"{u['server_cpu_us_per_fault']:>9.1f}  {'yes' if u['ok'] and k['ok'] else 'NO'}",
              flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", help="an existing file to read (default: generate one)")
    p.add_argument("--size", default="256M", help="size of the generated file (256M)")
    p.add_argument("--page-size", default="4K,64K", help="umap page sizes (4K,64K)")
    p.add_argument("--buffer", default="1,0.25",
                   help="buffer sizes as fractions of the file (1,0.25)")
    p.add_argument("--clients", default="1,2", help="client process counts (1,2)")
    p.add_argument("--order", default="seq,random", help="page orders (seq,random)")
    p.add_argument("--cache", default="warm", help="store cache: warm, cold or warm,cold")
    p.add_argument("--read-ahead", default="0", help="read-ahead pages (0; e.g. 0,8)")
    p.add_argument("--store-io", default="cached",
                   help="store reads: cached, drop, direct (cached; e.g. cached,direct)")
    p.add_argument("--fillers", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        kind, sock, path, order, seed, go = args._worker
        return worker(kind, sock, path, order, int(seed), go)

    with tempfile.TemporaryDirectory(prefix="mpumap-bench-", dir="/var/tmp") as folder:
        path = args.file
        if path is None:
            path = make_file(os.path.join(folder, "bench.bin"), parse_size(args.size), seed=7)
        size = os.path.getsize(path)
        rows = []
        print(f"file {path}: {size >> 20} MiB; one byte touched per {TOUCH} B page",
              flush=True)
        for page in (parse_size(x) for x in args.page_size.split(",")):
            for fraction in (float(x) for x in args.buffer.split(",")):
                # "1" is a buffer that holds the whole file below the high
                # watermark: no eviction.
                want = size * fraction / (0.9 if fraction >= 1 else 1)
                buffer = max(page * 16, -(-int(want) // page) * page)
                for clients in (int(x) for x in args.clients.split(",")):
                    for order in args.order.split(","):
                        for cache in args.cache.split(","):
                            for ra in (int(x) for x in args.read_ahead.split(",")):
                                for io in args.store_io.split(","):
                                    rows.append(measure(path, size, page, buffer, order,
                                                        clients, cache, ra, io,
                                                        args.fillers, folder))
        print()
        print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["mpumap"]["ok"] and r["mmap"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
