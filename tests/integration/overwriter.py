"""A client process for the tests: map FILE "r+" through the server, write
b"w" over every 4 KiB page, say {"wrote": true}, and once a line comes on
stdin flush twice and unmap.  Prints one JSON line: what each returned
("flush", "again", "close"; -errno for an OSError), the seconds they took,
and with --other PATH whether a mapping of PATH (made after the flushes)
reads PATH's bytes."""
import argparse
import json
import sys
import time

import mpumap

PAGE = 4096


def outcome(call):
    try:
        return call()
    except OSError as exc:
        return -exc.errno


def main():
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("file")
    p.add_argument("--other")
    args = p.parse_args()
    out = {}
    with mpumap.connect(args.socket) as client:
        m = client.map(args.file, mode="r+")
        for page in range(len(m) // PAGE):
            m[page * PAGE:(page + 1) * PAGE] = b"w" * PAGE
        print(json.dumps({"wrote": True}), flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        out["flush"] = outcome(m.flush)
        out["again"] = outcome(m.flush)
        if args.other:
            with client.map(args.other) as o, open(args.other, "rb") as f:
                out["other_right"] = o[:] == f.read()
        out["close"] = outcome(m.close)
        out["seconds"] = time.monotonic() - started
    print(json.dumps(out))


if __name__ == "__main__":
    main()
