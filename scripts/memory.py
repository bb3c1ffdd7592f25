#!/usr/bin/env python3
"""Bounded memory, measured: client processes read a file in random page
order through a buffer much smaller than the file.  While they read, this
samples the server's memory (USS of all its processes plus what its memfds
hold) and how much of the file sits in the kernel's page cache; at the end it
checks every byte the clients read.

    python scripts/memory.py --size 1G --buffer 128M --clients 4
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil

import mpumap
from mpumap.settings import parse_size
from mpumap.testing import drop_from_page_cache, make_file, running_server

MiB = 1 << 20
READER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "integration",
                      "reader.py")


def page_cache_bytes(path):
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1G")
    p.add_argument("--buffer", default="128M")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--page-size", default="64K")
    p.add_argument("--store-io", default="direct")
    args = p.parse_args()
    size, buffer = parse_size(args.size), parse_size(args.buffer)
    with tempfile.TemporaryDirectory(prefix="mpumap-memory-", dir="/var/tmp") as folder:
        path = make_file(os.path.join(folder, "data.bin"), size, seed=3)
        drop_from_page_cache(path)
        with running_server("--buffer-size", args.buffer, "--page-size", args.page_size,
                            "--store-io", args.store_io) as (sock, proc):
            server = psutil.Process(proc.pid)
            readers = [subprocess.Popen([sys.executable, READER, sock, path, "--order",
                                         "random", "--seed", str(i), "--direct"],
                                        stdout=subprocess.PIPE, text=True)
                       for i in range(args.clients)]
            peak_uss = peak_memfd = peak_total = peak_cache = samples = 0
            started = time.monotonic()
            while any(r.poll() is None for r in readers):
                procs = [server] + server.children()
                uss = sum(q.memory_full_info().uss for q in procs)
                b = mpumap.server_stats(sock)["buffer"]
                memfd = b["memfd_bytes"] + b["segment_bytes"]
                peak_uss, peak_memfd = max(peak_uss, uss), max(peak_memfd, memfd)
                peak_total = max(peak_total, uss + memfd)
                peak_cache = max(peak_cache, page_cache_bytes(path))
                samples += 1
                time.sleep(0.1)
            seconds = time.monotonic() - started
            results = [r.communicate()[0].strip().splitlines()[-1] for r in readers]
            stats = mpumap.server_stats(sock)["buffer"]
        bad = sum('"mismatch_count": 0' not in r for r in results)
    print(f"{args.clients} clients read {size / MiB:.0f} MiB each in random {args.page_size} "
          f"pages through a {buffer / MiB:.0f} MiB buffer in {seconds:.1f} s "
          f"({samples} samples)")
    print(f"  server memory peak: {peak_total / MiB:.1f} MiB = processes' USS "
          f"{peak_uss / MiB:.1f} MiB + shared memory {peak_memfd / MiB:.1f} MiB "
          f"(bound: buffer + 32 MiB = {(buffer + 32 * MiB) / MiB:.0f} MiB)")
    print(f"  file in the page cache, peak: {peak_cache / MiB:.1f} MiB (bound: 16 MiB)")
    print(f"  buffer: peak {stats['peak_used']} of {stats['limit']} pages, "
          f"{stats['fills']} fills, {stats['evictions']} evictions, "
          f"{stats['bytes_read'] / MiB:.0f} MiB read from the file")
    print(f"  bytes: {'all right' if not bad else f'{bad} clients read WRONG bytes'}")
    ok = not bad and peak_total < buffer + 32 * MiB and peak_cache < 16 * MiB
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
