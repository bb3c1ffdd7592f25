"""A client process for the tests that writes: map a file "r+" through the
server, write a stamped pattern into a span of its 4 KiB pages (page p holds
p and the stamp, over and over: see `content`), and check what it reads.

Steps, each optional, in this order: write the span (--first, --count,
--order), say "wrote" (one JSON line) and wait for --go; write a second span
(--then-first, --then-count: after the server was killed, say); check the
spans of --check (what other writers wrote, with their stamps), flush, and
print the result line.  With --kill PID it kills that process (the server)
after the first span and waits until the mapping fell back to the file.
"""
import argparse
import json
import os
import random
import signal
import sys
import time

import mpumap

PAGE = 4096


def content(page, stamp):
    """What page `page` holds once written with `stamp` (8 bytes)."""
    return (page.to_bytes(8, "little") + stamp.encode().ljust(8, b".")[:8]) * (PAGE // 16)


def write_span(m, first, count, stamp, order, seed):
    pages = list(range(first, first + count))
    if order == "random":
        random.Random(seed).shuffle(pages)
    for p in pages:
        m[p * PAGE:(p + 1) * PAGE] = content(p, stamp)


def say(**what):
    print(json.dumps(what), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("file")
    p.add_argument("--stamp", default="w")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--order", choices=["seq", "random"], default="seq")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--go", help="after the first span, wait for this file to exist")
    p.add_argument("--kill", type=int, help="after the first span, SIGKILL this pid")
    p.add_argument("--then-first", type=int, default=0)
    p.add_argument("--then-count", type=int, default=0)
    p.add_argument("--check", action="append", default=[],
                   help="FIRST:COUNT:STAMP, a span to check (repeatable)")
    p.add_argument("--flush", action="store_true", help="flush before closing")
    p.add_argument("--drop-uid", type=int, help="become this user before connecting")
    args = p.parse_args()

    if args.drop_uid is not None:
        os.setgroups([])
        os.setgid(args.drop_uid)
        os.setuid(args.drop_uid)
    try:
        client = mpumap.connect(args.socket)
        m = client.map(args.file, mode="r+")
    except OSError as exc:
        say(error=type(exc).__name__, errno=exc.errno, message=str(exc))
        return 3
    write_span(m, args.first, args.count, args.stamp, args.order, args.seed)
    say(wrote=args.count, pid=os.getpid(), uffd=client.uffd_kind)
    if args.kill:
        os.kill(args.kill, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while not client.fell_back and time.monotonic() < deadline:
            time.sleep(0.01)
    if args.go:
        while not os.path.exists(args.go):
            time.sleep(0.005)
    write_span(m, args.then_first, args.then_count, args.stamp, args.order, args.seed + 1)
    spans = [(args.first, args.count, args.stamp), (args.then_first, args.then_count,
                                                     args.stamp)]
    for spec in args.check:
        first, count, stamp = spec.split(":")
        spans.append((int(first), int(count), stamp))
    bad = [p for first, count, stamp in spans for p in range(first, first + count)
           if m[p * PAGE:(p + 1) * PAGE] != content(p, stamp)]
    flushed = m.flush() if args.flush else None
    fell_back = client.fell_back
    m.close()
    client.close()
    say(pages=sum(count for _, count, _ in spans), bad=bad[:20], bad_count=len(bad),
        flushed=flushed, fell_back=fell_back)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
