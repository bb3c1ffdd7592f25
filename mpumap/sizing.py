"""How big an adaptive buffer may be: the machine's available memory and the
memory cgroup the server runs in.  The arbiter asks once at start, evictor 0
every --adapt-interval seconds, and in between whenever the memory left
went down by a quarter of the reserve."""
import functools
import os

import psutil



def default_reserve(total_memory):
    """Memory the adaptive buffer leaves to everything else: 10% of the
    memory there is, at least 64 MiB (or a quarter, when that is less) and
    at most 4 GiB."""
    return max(min(64 << 20, total_memory // 4), min(4 << 30, total_memory // 10))


def adaptive_limit(used_pages, page_size, available, total, cgroup, reserve, minimum):
    """The buffer's size in pages when it follows the machine's free memory.

    The kernel does not count the buffer's pages as available, so on the
    machine the limit is what the buffer holds plus what is still available,
    less the reserve.  In a memory cgroup (limit, usage) the buffer may use
    the limit less everything else charged there, less the reserve: whether
    the buffer's pages are charged to the cgroup or not (a page is charged to
    the process whose fault allocated it), that keeps it under the limit.
    reserve None is default_reserve() of the smaller of RAM and the cgroup.
    """
    held = used_pages * page_size
    if reserve is None:
        reserve = default_reserve(total if cgroup is None else min(total, cgroup[0]))
    room = held + available - reserve
    if cgroup is not None:
        limit, usage = cgroup
        room = min(room, limit - max(0, usage - held) - reserve)
    return max(minimum, room // page_size)


def cgroup_memory(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """(limit, usage) of the memory cgroup that binds this process tightest,
    or None where no limit applies.

    A limit holds along the whole path, so the cgroup with the least room on
    the way to the root counts.  Knows cgroup v2 (memory.max) and v1
    (memory.limit_in_bytes).
    """
    try:
        with open(proc_cgroup) as f:
            text = f.read()
    except OSError:
        return None
    found = []
    for limit_file, usage_file in _cgroup_files(text, root):
        limit = _read_number(limit_file)
        usage = _read_number(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            found.append((limit - usage, limit, usage))
    return min(found)[1:] if found else None


@functools.lru_cache(maxsize=8)
def _cgroup_files(text, root):
    """The (limit, usage) files of every memory cgroup on the way from this
    process's cgroups (as /proc/self/cgroup says them) to the root: looked
    for once, then only read (evictor 0 asks ten times a second)."""
    files = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            # v2: mounted at the root, or beside v1 ("hybrid") at unified/
            base = root
            unified = os.path.join(root, "unified")
            if (not os.path.exists(os.path.join(root, "cgroup.controllers"))
                    and os.path.exists(os.path.join(unified, "cgroup.controllers"))):
                base = unified
            limit_file, usage_file = "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit_file, usage_file = (
                os.path.join(root, "memory"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(base, *parts[:depth])
            if os.path.exists(os.path.join(folder, limit_file)):
                files.append((os.path.join(folder, limit_file),
                              os.path.join(folder, usage_file)))
    return tuple(files)


def _read_number(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text == "max" else int(text)


def buffer_capacity(settings):
    """The most pages the buffer may ever hold: its fixed size, or for an
    adaptive buffer the machine's memory (the limit never passes what is
    there).  The page directory has a descriptor's room for each."""
    if not settings.adaptive:
        return settings.buffer_pages
    return max(psutil.virtual_memory().total // settings.page_size, settings.min_buffer_pages)


def machine_limit(buffer, settings):
    """The adaptive buffer's size in pages, now."""
    return sizing_now(buffer, settings)[0]


def sizing_now(buffer, settings):
    """(the adaptive buffer's size, the memory it leaves to the rest), both
    in pages, now."""
    memory = psutil.virtual_memory()
    cgroup = cgroup_memory()
    reserve = settings.memory_reserve
    if reserve is None:
        reserve = default_reserve(memory.total if cgroup is None
                                  else min(memory.total, cgroup[0]))
    limit = adaptive_limit(
        used_pages=buffer.used,
        page_size=settings.page_size,
        available=memory.available,
        total=memory.total,
        cgroup=cgroup,
        reserve=reserve,
        minimum=settings.min_buffer_pages,
    )
    return limit, reserve // settings.page_size
