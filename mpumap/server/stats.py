"""The server's status, as STATS answers it: a function over the parts that
own the state (settings, the buffer segment, clients, regions, workers).

Users are kept apart: a viewer who is neither root nor the server's user
sees their own clients and regions only (and the totals of everything), so
that nobody learns another user's file names, pids or command lines.
"""
import os

from mpumap.pbm import percentile_us

LISTED = 500  # clients and regions listed at most (busiest first)


def store_stats(buffer, names):
    """What the fillers asked of each store (not files) that was asked
    anything: totals since the server started, and latency percentiles."""
    rows = []
    for index, name in enumerate(names):
        row = buffer.header.stores[index]
        if not (row.requests or row.errors or row.retries):
            continue
        latency = list(row.latency)
        rows.append({"store": name, "requests": row.requests, "bytes": row.bytes,
                     "errors": row.errors, "retries": row.retries,
                     "p50_us": percentile_us(latency, 0.5),
                     "p99_us": percentile_us(latency, 0.99), "buckets": latency})
    return rows


def server_stats(settings, buffer, clients, regions, workers, started, viewer=None,
                 listed=LISTED, stores=()):
    """The status as `viewer` (a uid; None: everything) may see it."""
    def visible(uid):
        return viewer is None or uid == viewer

    held = {r: r.buffer_bytes() for r in regions}  # an fstat each: once
    region_rows = [{"id": r.rid, "file": r.name, "size": r.size, "pages": r.npages,
                    "present": regions.present(r), "mappings": r.mappings, "uid": r.uid,
                    "store_io": r.store_mode, "buffer_bytes": held[r],
                    "page_size": r.unit * r.page_size, "writable": r.write_fd >= 0}
                   for r in held if visible(r.uid)]
    region_rows.sort(key=lambda r: -r["present"])
    shown_clients = sorted((c for c in clients.clients() if visible(c.uid)),
                           key=lambda c: -len(c.mappings))
    latency = buffer.latency()
    return {
        "pid": os.getpid(),
        "started": started,
        "settings": settings.public(),
        "buffer": {**buffer.snapshot(),
                   "memfd_bytes": sum(held.values()),
                   "segment_bytes": buffer.segment_bytes()},
        "workers": [{"role": w.role, "index": w.index, "pid": w.pid} for w in workers],
        "clients_total": len(clients.clients()),
        "clients_shown": len(shown_clients),
        "clients": [{"id": c.cid, "pid": c.pid, "uid": c.uid, "session": c.session,
                     "regions": sorted({m.region.rid for m in c.mappings.values()}),
                     **buffer.client_counters(c.slot)}
                    for c in shown_clients[:listed]],
        "latency": {"buckets": latency, "p50_us": percentile_us(latency, 0.5),
                    "p99_us": percentile_us(latency, 0.99)},
        "stores": store_stats(buffer, stores),
        "regions_total": len(regions),
        "regions_shown": len(region_rows),
        "regions": region_rows[:listed],
    }
