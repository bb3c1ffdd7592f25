"""How big an adaptive buffer may be: the machine's available memory and the
memory cgroup the server runs in.  The arbiter asks once at start, evictor 0
every --adapt-interval seconds."""
import os

import psutil

from mpumap.settings import adaptive_limit


def cgroup_memory(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """(limit, usage) of the memory cgroup that binds this process tightest,
    or None where no limit applies.

    A limit holds along the whole path, so the cgroup with the least room on
    the way to the root counts.  Knows cgroup v2 (memory.max) and v1
    (memory.limit_in_bytes).
    """
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_file, usage_file = root, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = (
                os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(base, *parts[:depth])
            limit = _read_number(os.path.join(folder, limit_file))
            usage = _read_number(os.path.join(folder, usage_file))
            if limit is not None and usage is not None and limit < 1 << 60:
                found.append((limit - usage, limit, usage))
    return min(found)[1:] if found else None


def _read_number(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def machine_limit(buffer, settings):
    """The adaptive buffer's size in pages, now."""
    memory = psutil.virtual_memory()
    return adaptive_limit(
        used_pages=buffer.used,
        page_size=settings.page_size,
        available=memory.available,
        total=memory.total,
        cgroup=cgroup_memory(),
        reserve=settings.memory_reserve,
        minimum=settings.min_buffer_pages,
    )
