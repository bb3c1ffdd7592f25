#!/usr/bin/env python3
"""Scale: what the server costs follows its buffer, not the data, nor the
number of clients and regions.

1. Sizes.  Random 4 KiB faults in sparse files of each --sizes (a few known
   blocks written in each) through the same buffer, one server, one run.
   Per file: µs per fault (a C client, one byte per page), the peak of the
   server's shared memory (buffer segment and region memfds) and of its
   processes' USS, and the time of a status snapshot: `mpumap top --once
   --json` as a command (a Python start included) and the STATS request
   itself, both while the file is mapped and the buffer full (the command
   with --interval 0.05: it reads twice, an interval apart, for its rates).
2. Clients.  --clients C clients connected and reading at once: descriptors
   and memory each costs the server, µs per fault, bytes right.
3. Regions.  --regions small files mapped at once (by 4 clients): the
   server's descriptors and memory per region, the status time.  A region
   holds 2 descriptors in the server (its memfd and its file), so its
   RLIMIT_NOFILE bounds them: the run maps what the limit allows.

    python scripts/scale.py
    python scripts/scale.py --sizes 1G,4T,16T --faults 50000 --clients 512 --regions 10000
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time

import psutil

import mpumap
from mpumap.server.arbiter import REGION_DESCRIPTORS
from mpumap.settings import parse_size
from mpumap.testing import build_c_program, command, make_file, running_server

HERE = os.path.dirname(os.path.abspath(__file__))
READER = os.path.join(HERE, "..", "tests", "integration", "reader.py")
MiB = 1 << 20
KNOWN_BLOCKS = 16


def human(n):
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def sparse_file(folder, size, seed):
    """A sparse file of `size` bytes with KNOWN_BLOCKS pages of random bytes
    at random places (the first and last page among them); their offsets."""
    path = os.path.join(folder, f"sparse-{human(size)}.bin")
    rng = random.Random(seed)
    pages = size // 4096
    offsets = sorted({0, (pages - 1) * 4096,
                      *(rng.randrange(pages) * 4096 for _ in range(KNOWN_BLOCKS - 2))})
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in offsets:
            os.pwrite(f.fileno(), rng.randbytes(4096), offset)
    return path, offsets


class Sampler:
    """Samples the server's memory every `every` seconds on a thread: peak
    shared memory (the buffer segment and the regions' memfds, from the
    status) and peak USS of its processes."""

    def __init__(self, sock, pid, every=0.05):
        self.sock, self.server, self.every = sock, psutil.Process(pid), every
        self.peak_shared = self.peak_uss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self):
        b = mpumap.server_stats(self.sock)["buffer"]
        self.peak_shared = max(self.peak_shared, b["segment_bytes"] + b["memfd_bytes"])
        self.peak_uss = max(self.peak_uss, server_uss(self.server))

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.sample()
            except (OSError, psutil.Error):
                pass

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def server_uss(server):
    return sum(p.memory_full_info().uss for p in [server] + server.children())


def status_times(sock, runs=5):
    """(seconds of `mpumap top --once --json --interval 0.05`, of a STATS
    request), medians.  The command takes two readings an interval apart
    (for its rates; 1 s unless told) and starts a Python: 0.05 s and about
    0.15 s of its time are those."""
    env = {**os.environ, "MPUMAP_SOCKET": sock}
    commands, requests = [], []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command("mpumap") + ["top", "--once", "--json", "--interval", "0.05"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        commands.append(time.perf_counter() - started)
        started = time.perf_counter()
        mpumap.server_stats(sock)
        requests.append(time.perf_counter() - started)
    return median(commands), median(requests)


def read_line(proc, timeout):
    """The client's next line; it is killed if none comes in time."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        watchdog.cancel()
    if not line:
        proc.kill()
        raise SystemExit(f"a client failed: {proc.communicate()[1]}")
    return line


def run_clients(binary, sock, paths, faults, checks=()):
    """One scale_client per path, all at once: their results, once every
    one has touched and checked (and still maps its file), and what ends
    them (the count of those that failed)."""
    env = {**os.environ, "MPUMAP_SOCKET": sock}
    procs = []
    for k, path in enumerate(paths):
        args = [binary, path, str(faults), str(k + 1)]
        if checks:
            args.append(",".join(map(str, checks)))
        procs.append(subprocess.Popen(args, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        assert read_line(proc, 120).strip() == "ready"
    say(procs, "go")
    results = [json.loads(read_line(proc, 3600)) for proc in procs]
    for proc, result in zip(procs, results):
        result.update(json.loads(read_line(proc, 3600)))
    return results, lambda: finish(procs)


def say(procs, word):
    for proc in procs:
        proc.stdin.write(word + "\n")
        proc.stdin.flush()


def finish(procs):
    say(procs, "done")
    bad = 0
    for proc in procs:
        proc.wait(120)
        bad += proc.returncode != 0
    return bad


def sizes_section(args, binary, folder):
    print(f"\n1. Random 4 KiB faults, {args.faults} per file, through one "
          f"{human(args.buffer)} buffer; median of {args.runs} runs, sizes taking turns")
    print(f"{'file':>6} {'us/fault':>9} {'shared MiB':>11} {'USS MiB':>8} "
          f"{'top --once s':>13} {'STATS s':>8} {'bytes':>6}")
    files = [sparse_file(folder, size, seed=n) for n, size in enumerate(args.sizes)]
    runs = {size: [] for size in args.sizes}
    with running_server("--page-size", "4K", "--buffer-size", human(args.buffer),
                        "--read-ahead", 0) as (sock, proc):
        for _ in range(args.runs):
            for size, (path, offsets) in zip(args.sizes, files):
                with Sampler(sock, proc.pid) as sampler:
                    results, end = run_clients(binary, sock, [path], args.faults, offsets)
                    top, stats = status_times(sock)
                    bad = end()
                r = results[0]
                runs[size].append({"us_per_fault": r["seconds"] * 1e6 / r["faults"],
                                   "peak_shared": sampler.peak_shared,
                                   "peak_uss": sampler.peak_uss, "top_seconds": top,
                                   "stats_seconds": stats, "ok": r["ok"] and not bad})
    for path, _ in files:
        os.unlink(path)
    rows = []
    for size in args.sizes:
        taken = runs[size]
        row = {key: median([t[key] for t in taken])
               for key in ("us_per_fault", "top_seconds", "stats_seconds")}
        row.update(size=size, peak_shared=max(t["peak_shared"] for t in taken),
                   peak_uss=max(t["peak_uss"] for t in taken),
                   ok=all(t["ok"] for t in taken))
        rows.append(row)
        print(f"{human(size):>6} {row['us_per_fault']:9.1f} "
              f"{row['peak_shared'] / MiB:11.1f} {row['peak_uss'] / MiB:8.1f} "
              f"{row['top_seconds']:13.3f} {row['stats_seconds']:8.4f} "
              f"{'right' if row['ok'] else 'WRONG':>6}")
    first, last = rows[0], rows[-1]
    ratio = last["us_per_fault"] / first["us_per_fault"]
    most = max(r["peak_shared"] + r["peak_uss"] for r in rows)
    print(f"   µs per fault at {human(last['size'])} / at {human(first['size'])}: "
          f"{ratio:.2f} (target <= 1.2); server memory at most {most / MiB:.1f} MiB "
          f"(target <= buffer + 32 MiB = {(args.buffer + 32 * MiB) / MiB:.0f} MiB)")
    return rows


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def clients_section(args, binary, folder):
    count = args.clients
    print(f"\n2. {count} C clients connected and reading at once, "
          f"{args.client_faults} random pages each of one 1 GiB file")
    path = make_file(os.path.join(folder, "shared.bin"), 64 * MiB, seed=7)
    big = os.path.join(folder, "shared-1G.bin")
    with open(big, "wb") as f:  # 16 copies of 64 MiB: cheap to make
        for _ in range(16):
            with open(path, "rb") as part:
                f.write(part.read())
    os.unlink(path)
    with running_server("--page-size", "4K", "--buffer-size", human(args.buffer),
                        "--max-user-clients", count + 16,
                        "--max-user-connections", 2 * count + 32) as (sock, proc):
        server = psutil.Process(proc.pid)
        fds0, uss0 = server.num_fds(), server_uss(server)
        results, end = run_clients(binary, sock, [big] * count, args.client_faults)
        fds1, uss1 = server.num_fds(), server_uss(server)
        clients_seen = mpumap.server_stats(sock)["clients_total"]
        top, stats = status_times(sock, runs=3)
        bad = end()
    os.unlink(big)
    us = sorted(r["seconds"] * 1e6 / r["faults"] for r in results)
    ok = all(r["ok"] for r in results) and not bad
    print(f"   connected at once: {clients_seen}; bytes: {'right' if ok else 'WRONG'}")
    print(f"   per client, in the server: {(fds1 - fds0) / count:.2f} descriptors, "
          f"{(uss1 - uss0) / count / 1024:.1f} KiB of USS (all its processes)")
    print(f"   µs per fault: median {us[len(us) // 2]:.0f}, slowest client {us[-1]:.0f} "
          f"(2 CPUs for {count} clients and the server)")
    print(f"   status with {count} clients: top --once {top:.3f} s, STATS {stats:.4f} s")


def regions_section(args, folder):
    # The server raises its soft limit to the hard one.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fit = (hard - 256) // REGION_DESCRIPTORS
    count = min(args.regions, fit)
    print(f"\n3. {count} regions mapped at once"
          + (f" ({args.regions} asked; RLIMIT_NOFILE {hard} holds {fit})"
             if count < args.regions else ""))
    many = os.path.join(folder, "many")
    os.mkdir(many)
    paths = [make_file(os.path.join(many, f"f{i:05}.bin"), 4096, seed=i) for i in range(count)]
    per = -(-count // 4)
    with running_server("--page-size", "4K", "--buffer-size", human(args.buffer),
                        "--max-regions", count + 16, "--max-user-regions", count + 16,
                        "--max-client-mappings", per + 16,
                        "--max-user-mappings", count + 16) as (sock, proc):
        server = psutil.Process(proc.pid)
        fds0, uss0 = server.num_fds(), server_uss(server)
        seg0 = mpumap.server_stats(sock)["buffer"]["segment_bytes"]
        go = os.path.join(folder, "regions-go")
        readers = []
        for k in range(4):
            listing = os.path.join(folder, f"list{k}")
            with open(listing, "w") as f:
                f.write("\n".join(paths[k * per:(k + 1) * per]))
            readers.append(subprocess.Popen(
                [sys.executable, READER, sock, "--list", listing, "--go", go],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for r in readers:
            read_line(r, 600)
        stats_now = mpumap.server_stats(sock)
        fds1, uss1 = server.num_fds(), server_uss(server)
        seg1 = stats_now["buffer"]["segment_bytes"]
        top, stats = status_times(sock, runs=3)
        open(go, "w").close()
        results = [json.loads(r.communicate(timeout=600)[0].strip().splitlines()[-1])
                   for r in readers]
    ok = all(r.get("mismatch_count") == 0 and "error" not in r for r in results)
    print(f"   regions: {stats_now['regions_total']}; bytes: {'right' if ok else 'WRONG'}")
    print(f"   per region, in the server: {(fds1 - fds0) / count:.2f} descriptors, "
          f"{(uss1 - uss0) / count / 1024:.1f} KiB of USS (all its processes), "
          f"{(seg1 - seg0) / count:.0f} B of the buffer segment")
    print(f"   status with {count} regions: top --once {top:.3f} s, STATS {stats:.4f} s")


def main():
    sys.stdout.reconfigure(line_buffering=True)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1G,4T", help="sparse file sizes (1G,4T)")
    p.add_argument("--buffer", default="32M", help="the buffer (32M)")
    p.add_argument("--faults", type=int, default=20000, help="random faults per file (20000)")
    p.add_argument("--runs", type=int, default=3, help="runs of each size; the median (3)")
    p.add_argument("--clients", type=int, default=128, help="clients at once (128; 0: skip)")
    p.add_argument("--client-faults", type=int, default=500,
                   help="random pages each client reads (500)")
    p.add_argument("--regions", type=int, default=2000, help="regions at once (2000; 0: skip)")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the files go (ext4 holds up to 16T - 4K; tmpfs more)")
    args = p.parse_args()
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.buffer = parse_size(args.buffer)
    with tempfile.TemporaryDirectory(prefix="mpumap-scale-", dir=args.dir) as folder:
        binary = build_c_program(os.path.join(HERE, "scale_client.c"), folder)
        sizes_section(args, binary, folder)
        if args.clients:
            clients_section(args, binary, folder)
        if args.regions:
            regions_section(args, folder)


if __name__ == "__main__":
    main()
