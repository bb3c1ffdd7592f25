"""A client process for the tests: map a file (or an object's URL) through
the server, read it page by page in the given order, and check every byte
against the file (or the --expect file).

Prints one JSON line: {"pages": n, "mismatches": [...], "region": id, ...}.
"""
import argparse
import json
import os
import random
import sys
import time

import mpumap


class Direct:
    """pread through O_DIRECT: an aligned buffer, whole blocks."""

    def __init__(self, size):
        import mmap

        self.size = -(-size // 4096) * 4096
        self.buf = mmap.mmap(-1, self.size)

    def pread(self, fd, length, offset):
        n = os.preadv(fd, [self.buf], offset)
        return self.buf[:min(n, length)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("files", nargs="*")
    p.add_argument("--list", help="a file naming more files to map, one a line")
    p.add_argument("--expect", help="check against this file (what a URL's object holds)")
    p.add_argument("--direct", action="store_true",
                   help="check against O_DIRECT reads (leaves the page cache alone)")
    p.add_argument("--prefetch", action="store_true", help="prefetch every mapping first")
    p.add_argument("--order", choices=["seq", "random"], default="seq")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=0, help="bytes per read (default: page)")
    p.add_argument("--go", help="wait for this file to exist before reading")
    p.add_argument("--pages", type=int, default=0, help="read only the first N chunks")
    p.add_argument("--take", type=int, default=0,
                   help="read only N chunks (after --order has ordered them)")
    p.add_argument("--pause", type=float, default=0, help="seconds to wait after each read")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seconds", type=float, default=0,
                   help="go on with more rounds until this much time has passed")
    p.add_argument("--stop", help="... or until this file exists (checked between rounds)")
    p.add_argument("--drop-uid", type=int, help="become this user before connecting")
    p.add_argument("--latency", action="store_true",
                   help="time each read; report percentiles, and how long connect and map took")
    args = p.parse_args()

    if args.drop_uid is not None:
        os.setgroups([])
        os.setgid(args.drop_uid)
        os.setuid(args.drop_uid)

    began = time.monotonic()
    try:
        client = mpumap.connect(args.socket)
    except OSError as exc:
        print(json.dumps({"error": type(exc).__name__, "errno": exc.errno,
                          "message": str(exc)}), flush=True)
        return 3
    mappings = []
    files = list(args.files)
    if args.list:
        with open(args.list) as f:
            files += f.read().split()
    for path in files:
        try:
            mappings.append(client.map(path))
        except OSError as exc:
            print(json.dumps({"error": type(exc).__name__, "errno": exc.errno,
                              "message": str(exc)}), flush=True)
            return 3
    chunk = args.chunk or client.settings.page_size
    if args.prefetch:
        for m in mappings:
            m.prefetch()
    read = Direct(chunk).pread if args.direct else os.pread
    print(json.dumps({"ready": os.getpid(), "uffd": client.uffd_kind,
                      "setup_seconds": time.monotonic() - began}), flush=True)
    if args.go:
        while not os.path.exists(args.go):
            time.sleep(0.001)

    rng = random.Random(args.seed)
    times = []
    mismatches = []
    pages = 0
    started = time.monotonic()
    rounds = 0
    def more():
        if args.stop:
            return not os.path.exists(args.stop) or rounds < args.rounds
        return rounds < args.rounds or time.monotonic() - started < args.seconds

    while more():
        rounds += 1
        for m in mappings:
            fd = os.open(args.expect or m.path, os.O_RDONLY | (os.O_DIRECT if args.direct else 0))
            offsets = list(range(0, len(m), chunk))
            if args.pages:
                offsets = offsets[:args.pages]
            if args.order == "random":
                rng.shuffle(offsets)
            if args.take:
                offsets = offsets[:args.take]
            for off in offsets:
                t = time.monotonic()
                got = m[off:off + chunk]
                if args.latency:
                    times.append(time.monotonic() - t)
                want = read(fd, chunk, off)
                pages += 1
                if got != want:
                    mismatches.append([m.path, off])
                if args.pause:
                    time.sleep(args.pause)
            os.close(fd)
    elapsed = time.monotonic() - started
    result = {
        "pages": pages,
        "rounds": rounds,
        "mismatches": mismatches[:20],
        "mismatch_count": len(mismatches),
        "regions": [m.region_id for m in mappings],
        "sizes": [len(m) for m in mappings],
        "seconds": elapsed,
    }
    if times:
        times.sort()
        result["latency"] = {q: times[min(len(times) - 1, int(f * len(times)))]
                             for q, f in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}
    for m in mappings:
        m.close()
    client.close()
    print(json.dumps(result), flush=True)
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
