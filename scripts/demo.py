#!/usr/bin/env python3
"""mpumap demo: several processes read one file through a buffer smaller than
the file, and every byte they read is checked against the file.

    python scripts/demo.py [--size 256M] [--clients 4] [--buffer 64M]
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import mpumap
from mpumap.settings import parse_size
from mpumap.testing import make_file, running_server


def client(socket_path, path, order, seed):
    """One client process: map the file, read it all, compare with the file."""
    import random

    with mpumap.connect(socket_path) as c, c.map(path) as m, open(path, "rb") as f:
        page = c.settings.page_size
        offsets = list(range(0, len(m), page))
        if order == "random":
            random.Random(seed).shuffle(offsets)
        bad = 0
        digest = hashlib.sha256()
        started = time.monotonic()
        for off in offsets:
            got = m[off:off + page]
            f.seek(off)
            if got != f.read(page):
                bad += 1
            if order == "seq":
                digest.update(got)
        seconds = time.monotonic() - started
    print(f"  client pid {os.getpid():>7}  {order:6}  {len(offsets):>6} pages  "
          f"{seconds:6.2f} s  {'all bytes right' if not bad else f'{bad} PAGES WRONG'}",
          flush=True)
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256M", help="size of the generated file (256M)")
    p.add_argument("--clients", type=int, default=4, help="client processes (4)")
    p.add_argument("--buffer", default=None, help="buffer size (a quarter of the file)")
    p.add_argument("--page-size", default="64K", help="umap page size (64K)")
    p.add_argument("--_client", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._client:
        sock, path, order, seed = args._client
        return client(sock, path, order, int(seed))

    size = parse_size(args.size)
    buffer = args.buffer or f"{max(size // 4, 1 << 20) >> 10}K"
    with tempfile.TemporaryDirectory(prefix="mpumap-demo-") as folder:
        path = os.path.join(folder, "data.bin")
        print(f"writing {size >> 20} MiB of random data to {path}")
        make_file(path, size, seed=1)
        with running_server("--buffer-size", buffer, "--page-size", args.page_size) as (sock, _):
            stats = mpumap.server_stats(sock)
            limit = stats["buffer"]["limit"] * stats["settings"]["page_size"]
            print(f"server up on {sock}: buffer {limit >> 20} MiB for a {size >> 20} MiB file, "
                  f"{stats['settings']['fillers']} fillers")
            print(f"{args.clients} client processes read the whole file:")
            started = time.monotonic()
            procs = [subprocess.Popen([sys.executable, __file__, "--_client", sock, path,
                                       "seq" if i % 2 == 0 else "random", str(i)])
                     for i in range(args.clients)]
            failures = sum(proc.wait() != 0 for proc in procs)
            seconds = time.monotonic() - started
            b = mpumap.server_stats(sock)["buffer"]
        print(f"done in {seconds:.1f} s: {b['faults']} faults, {b['fills']} fills "
              f"({b['bytes_read'] >> 20} MiB read from the file), {b['wakes']} shared by "
              f"UFFDIO_WAKE, {b['evictions']} evictions; the buffer never held more "
              f"than {b['peak_used']} of its {b['limit']} pages")
        if failures:
            print(f"FAILED: {failures} clients read wrong bytes")
            return 1
        print("every byte every client read was the file's byte")
        return 0


if __name__ == "__main__":
    sys.exit(main())
