"""mpumap top: a live view of a server, from its counters and psutil."""
import json
import os
import select
import shutil
import sys
import termios
import time
import tty

import psutil

import mpumap
from mpumap.pbm import percentile_us

RATES = ("faults", "fills", "copies", "wakes", "evictions", "writes", "written",
         "readahead_fills", "prefetch_fills")
BREAKDOWN = ("monitor_ns", "queue_ns", "read_ns", "copy_ns", "wake_ns")


def _process(pid):
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _cpu(proc):
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


def _memory(proc):
    """USS where we may read it (our own or root's view), else RSS."""
    try:
        return proc.memory_full_info().uss, "uss"
    except psutil.AccessDenied:
        pass
    except psutil.Error:
        return None, None
    try:
        return proc.memory_info().rss, "rss"
    except psutil.Error:
        return None, None


def _cmdline(pid):
    try:
        return " ".join(psutil.Process(pid).cmdline()) or "?"
    except psutil.Error:
        return "?"


class Sampler:
    """Two readings of the server make a snapshot with rates."""

    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.previous = None

    def read(self):
        stats = mpumap.server_stats(self.socket_path)
        procs = [{"role": "server", "index": 0, "pid": stats["pid"]}] + stats["workers"]
        cpu = {}
        for p in procs:
            proc = _process(p["pid"])
            cpu[p["pid"]] = _cpu(proc) if proc else None
        return time.monotonic(), stats, cpu

    def snapshot(self):
        now = self.read()
        before, self.previous = self.previous or now, now
        return build_snapshot(before, now)


def build_snapshot(before, now):
    t0, s0, cpu0 = before
    t1, s1, cpu1 = now
    dt = max(t1 - t0, 1e-9)
    b0, b1 = s0["buffer"], s1["buffer"]
    rates = {name: (b1[name] - b0[name]) / dt for name in RATES}
    rates["store_mb_s"] = (b1["bytes_read"] - b0["bytes_read"]) / dt / 1e6
    rates["page_cache_mb_s"] = (b1["cache_bytes"] - b0["cache_bytes"]) / dt / 1e6
    faults = b1["faults"] - b0["faults"]
    breakdown = {name[:-3] + "_us": ((b1[name] - b0[name]) / faults / 1000 if faults else None)
                 for name in BREAKDOWN}
    buckets = [a - b for a, b in zip(s1["latency"]["buckets"], s0["latency"]["buckets"])]
    if not any(buckets):  # nothing in this interval: the server's whole life
        buckets = s1["latency"]["buckets"]
    processes = []
    for p in [{"role": "server", "index": 0, "pid": s1["pid"]}] + s1["workers"]:
        proc = _process(p["pid"])
        memory, kind = _memory(proc) if proc else (None, None)
        c0, c1 = cpu0.get(p["pid"]), cpu1.get(p["pid"])
        processes.append({**p, "cpu_percent": (100 * (c1 - c0) / dt
                                               if c0 is not None and c1 is not None else None),
                          "memory": memory, "memory_kind": kind})
    earlier = {c["id"]: c for c in s0["clients"]}
    clients = []
    for c in s1["clients"]:
        faults_before = earlier.get(c["id"], c)["faults"]
        clients.append({"pid": c["pid"], "uid": c["uid"], "command": _cmdline(c["pid"]),
                        "regions": c["regions"], "faults": c["faults"],
                        "faults_per_s": (c["faults"] - faults_before) / dt,
                        "wait_s": c["wait_ns"] / 1e9})
    settings = s1["settings"]
    stores = []
    earlier = {row["store"]: row for row in s0.get("stores", ())}
    for row in s1.get("stores", ()):
        was = earlier.get(row["store"], {})
        buckets = [a - b for a, b in zip(row["buckets"], was.get("buckets", [0] * 999))]
        if not any(buckets):
            buckets = row["buckets"]
        stores.append({"store": row["store"],
                       "requests_per_s": (row["requests"] - was.get("requests", 0)) / dt,
                       "mb_per_s": (row["bytes"] - was.get("bytes", 0)) / dt / 1e6,
                       "p50_us": percentile_us(buckets, 0.5),
                       "p99_us": percentile_us(buckets, 0.99),
                       "errors": row["errors"], "retries": row["retries"]})
    return {
        "time": time.time(),
        "interval": dt,
        "socket": settings["socket"],
        "server": {"pid": s1["pid"], "uptime": time.time() - s1["started"]},
        "processes": processes,
        "buffer": {"used_pages": b1["used"], "limit_pages": b1["limit"],
                   "page_size": settings["page_size"], "high_pages": b1["high"],
                   "low_pages": b1["low"], "high_water": settings["high_water"],
                   "low_water": settings["low_water"],
                   "mode": "adaptive" if settings["adaptive"] else "fixed",
                   "peak_pages": b1["peak_used"], "present_pages": b1["present"],
                   "dirty_pages": b1["dirty"],
                   "memfd_bytes": b1["memfd_bytes"], "segment_bytes": b1["segment_bytes"]},
        "rates": rates,
        "latency": {"p50_us": percentile_us(buckets, 0.5),
                    "p99_us": percentile_us(buckets, 0.99)},
        "breakdown": breakdown,
        "totals": {name: b1[name] for name in ("faults", "fills", "copies", "wakes",
                                               "evictions", "bytes_read", "restarts")},
        "stores": stores,
        "clients_total": s1["clients_total"],
        "clients": clients,
        "regions_total": s1["regions_total"],
        "regions": [{"id": r["id"], "file": r["file"], "size": r["size"], "pages": r["pages"],
                     "present": r["present"], "mappings": r["mappings"]}
                    for r in s1["regions"]],
    }


def _size(n):
    if n is None:
        return "?"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def _num(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def render(snap, width=100, height=None):
    b, r = snap["buffer"], snap["rates"]
    page = b["page_size"]
    lines = [
        f"mpumap top — {snap['socket']}  server pid {snap['server']['pid']}  "
        f"up {snap['server']['uptime']:.0f}s  every {snap['interval']:.1f}s  (q quits)",
        "",
        f"buffer   {b['used_pages']}/{b['limit_pages']} pages of {_size(page)} "
        f"({_size(b['used_pages'] * page)} of {_size(b['limit_pages'] * page)}, {b['mode']}), "
        f"watermarks {b['low_water']}%/{b['high_water']}%, peak {b['peak_pages']}, "
        f"dirty {b['dirty_pages']}, "
        f"memfds {_size(b['memfd_bytes'])}, shared segment {_size(b['segment_bytes'])}",
        f"rates/s  faults {r['faults']:.0f}  fills {r['fills']:.0f}  copies {r['copies']:.0f}  "
        f"wakes {r['wakes']:.0f}  evictions {r['evictions']:.0f}  writes {r['writes']:.0f}  "
        f"written back {r['written']:.0f}  read-ahead "
        f"{r['readahead_fills']:.0f}  store {r['store_mb_s']:.1f} MB/s "
        f"({r['page_cache_mb_s']:.1f} from the page cache)",
        f"latency  p50 {_num(snap['latency']['p50_us'])} us  p99 "
        f"{_num(snap['latency']['p99_us'])} us   per fault: "
        + "  ".join(f"{k[:-3]} {_num(v, '{:.1f}')}" for k, v in snap["breakdown"].items())
        + " us",
        "",
        f"{'ROLE':10}{'PID':>8}{'CPU%':>7}{'MEM':>9}",
    ]
    for p in snap["processes"]:
        name = p["role"] if p["role"] == "server" else f"{p['role']}{p['index']}"
        lines.append(f"{name:10}{p['pid']:>8}{_num(p['cpu_percent'], '{:.1f}'):>7}"
                     f"{_size(p['memory']):>9}")
    if snap["stores"]:
        lines += ["", f"{'STORE':10}{'REQ/S':>9}{'MB/S':>9}{'P50 ms':>9}{'P99 ms':>9}"
                      f"{'ERRORS':>8}{'RETRIES':>9}"]
        for st in snap["stores"]:
            p50 = None if st["p50_us"] is None else st["p50_us"] / 1000
            p99 = None if st["p99_us"] is None else st["p99_us"] / 1000
            lines.append(f"{st['store']:10}{st['requests_per_s']:>9.0f}{st['mb_per_s']:>9.1f}"
                         f"{_num(p50, '{:.2f}'):>9}{_num(p99, '{:.2f}'):>9}"
                         f"{st['errors']:>8}{st['retries']:>9}")
    lines += ["", f"CLIENTS ({snap['clients_total']})",
              f"{'PID':>8}{'UID':>6}{'REGIONS':>8}{'FAULTS/S':>10}{'WAIT s':>8}  COMMAND"]
    for c in snap["clients"]:
        lines.append(f"{c['pid']:>8}{c['uid']:>6}{len(c['regions']):>8}"
                     f"{c['faults_per_s']:>10.0f}{c['wait_s']:>8.2f}  {c['command']}")
    lines += ["", f"REGIONS ({snap['regions_total']})",
              f"{'ID':>6}{'SIZE':>9}{'PRESENT':>9}{'MAPS':>6}  FILE"]
    for reg in snap["regions"]:
        lines.append(f"{reg['id']:>6}{_size(reg['size']):>9}"
                     f"{_size(reg['present'] * page):>9}{reg['mappings']:>6}  {reg['file']}")
    lines = [line[:width] for line in lines]
    return lines[:height] if height else lines


def run(socket_path, interval, once, as_json):
    sampler = Sampler(socket_path)
    sampler.snapshot()
    if once:
        time.sleep(interval)
        snap = sampler.snapshot()
        if as_json:
            print(json.dumps(snap, indent=2))
        else:
            print("\n".join(render(snap, width=shutil.get_terminal_size().columns)))
        return 0
    interactive = sys.stdin.isatty()
    saved = termios.tcgetattr(sys.stdin) if interactive else None
    try:
        if interactive:
            tty.setcbreak(sys.stdin)
        while True:
            if interactive:
                ready, _, _ = select.select([sys.stdin], [], [], interval)
                if ready and os.read(sys.stdin.fileno(), 1) in (b"q", b"Q"):
                    return 0
            else:
                time.sleep(interval)
            snap = sampler.snapshot()
            if as_json:
                print(json.dumps(snap), flush=True)
                continue
            size = shutil.get_terminal_size()
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(render(snap, size.columns,
                                                                  size.lines - 1)))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        if saved is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
