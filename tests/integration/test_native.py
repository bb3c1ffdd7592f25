"""Issue 7: native programs.  libmpumapclient (MP-UMap's client API in C), its
fallback guard, and the LD_PRELOAD library, tried with real compiled programs
against real servers.  Programs are compiled into the test's own folder with
the flags `mpumap-client config` prints."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (NOBODY, clean_env, config, page_cache_bytes, pages_served, stalling_fs,
                      uncached_file)
from mpumap.testing import MiB, make_file
from mpumap import native

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = os.path.join(HERE, "native")
EXAMPLE = os.path.join(ROOT, "examples", "read_random.c")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler"),
]


def values(out):
    """key=value lines as a dict of ints (or strings)."""
    result = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        try:
            result[key] = int(value)
        except ValueError:
            result[key] = value
    return result


def fields(line):
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


# ---- (a) the example, built with the printed flags --------------------------

def test_config_prints_usable_flags():
    flags = config("--cflags", "--libs")
    assert "-lmpumapclient" in flags
    assert any(f.startswith("-Wl,-rpath,") for f in flags)
    include = [f[2:] for f in flags if f.startswith("-I")]
    assert os.path.exists(os.path.join(include[0], "umap", "umap-client.h"))
    assert config("--preload") == [native.preload_library()]
    assert os.path.exists(native.client_library())


def test_example_reads_a_64mib_file_in_random_order(start_server, programs, workdir):
    path = make_file(os.path.join(workdir, "data.bin"), 64 * MiB, seed=70)
    server = start_server("--page-size", "64K", "--buffer-size", "32M")
    exe = programs.build(EXAMPLE)
    needed = subprocess.run(["readelf", "-d", exe], capture_output=True, text=True).stdout
    assert "libmpumapclient.so" in needed and ("RUNPATH" in needed or "RPATH" in needed)

    code, out, err = programs.run([exe, path, "3"], clean_env(MPUMAP_SOCKET=server.socket))
    assert code == 0, err
    assert f"{64 * MiB // 4096} pages, {64 * MiB} bytes, 0 wrong" in out
    assert err == ""
    buffer = server.stats()["buffer"]
    assert buffer["faults"] >= 64 * MiB // (64 << 10)
    assert buffer["bytes_read"] >= 64 * MiB
    assert wait_for(lambda: server.stats()["regions"] == [] and not server.stats()["clients"])


def test_two_example_processes_through_a_smaller_buffer(start_server, programs, workdir):
    path = make_file(os.path.join(workdir, "data.bin"), 64 * MiB, seed=71)
    server = start_server("--page-size", "64K", "--buffer-size", "16M", "--fillers", 2)
    exe = programs.build(EXAMPLE)
    env = clean_env(MPUMAP_SOCKET=server.socket)
    procs = [programs.start([exe, path, str(seed)], env) for seed in (1, 2)]
    for proc in procs:
        out, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err
        assert f"{64 * MiB} bytes, 0 wrong" in out
    buffer = server.stats()["buffer"]
    assert buffer["limit"] == 256
    assert buffer["evictions"] > 0
    assert buffer["peak_used"] <= buffer["limit"]
    assert buffer["fills"] >= 1024


# ---- (b) error paths ----------------------------------------------------------

def test_no_server_fails_without_exiting(programs, workdir):
    path = make_file(os.path.join(workdir, "f.bin"), 10000)
    sock = os.path.join(workdir, "nobody-home.sock")
    exe = programs.build(os.path.join(SOURCES, "probe.c"))
    code, out, err = programs.run([exe, "nosrv", sock, path], clean_env())
    assert code == 0, err
    v = values(out)
    assert v["init_errno"] in (errno.ENOENT, errno.ECONNREFUSED)
    assert v["map_null"] == 1 and v["map_errno"] == errno.ENOTCONN
    assert v["page_size_zero"] == 1 and v["page_size_errno"] == errno.ENOTCONN
    assert v["uunmap"] == -1
    assert v["alive"] == 1
    assert f"no mpumap server at {sock}" in err
    assert all(line.startswith("mpumap-client: ") for line in err.splitlines())


def test_a_server_of_another_user_is_trusted_only_when_named(start_server, programs, workdir):
    """A root C client hands a server that nobody runs neither its
    userfaultfd nor its files, unless MPUMAP_SERVER_USER names that user."""
    path = make_file(os.path.join(workdir, "f.bin"), MiB, seed=82)
    os.chmod(path, 0o644)
    server = start_server("--page-size", "4K", "--buffer-size", "8M", user=NOBODY)
    exe = programs.build(os.path.join(SOURCES, "probe.c"))
    code, out, err = programs.run([exe, "nosrv", server.socket, path], clean_env())
    v = values(out)
    assert code == 0 and v["init_errno"] == errno.EPERM and v["map_null"] == 1, (out, err)
    assert f"runs as uid {NOBODY}" in err and f"MPUMAP_SERVER_USER={NOBODY}" in err, err
    code, out, err = programs.run([exe, "nosrv", server.socket, path],
                                  clean_env(MPUMAP_SERVER_USER="nobody"))
    v = values(out)
    assert code == 0 and v["init_errno"] == 0 and v["map_right"] == 1, (out, err)


def test_missing_file_misuse_and_settings(start_server, programs, workdir):
    good = make_file(os.path.join(workdir, "good.bin"), 3 * 65536 + 100, seed=72)
    server = start_server("--page-size", "64K", "--buffer-size", 64, "--fillers", 2,
                          "--evictors", 1, "--high-water", 80, "--low-water", 60)
    exe = programs.build(os.path.join(SOURCES, "probe.c"))
    code, out, err = programs.run(
        [exe, "files", server.socket, os.path.join(workdir, "missing.bin"), good],
        clean_env())
    assert code == 0, err
    v = values(out)
    assert v["init_errno"] == 0
    assert (v["system_page_size"], v["umap_page_size"], v["buffer_pages"]) == (4096, 65536, 64)
    assert (v["fillers"], v["evictors"], v["high_water"], v["low_water"]) == (2, 1, 80, 60)
    assert v["max_fault_events"] > 0
    assert v["missing_null"] == 1 and v["missing_errno"] == errno.ENOENT
    assert v["good_null"] == 0 and v["good_right"] == 1
    assert v["again_errno"] == errno.EEXIST
    assert v["child_status"] == 0 and v["child_inherited"] == 0
    assert v["child_before_init_errno"] == errno.ENOTCONN
    assert v["child_right"] == 1 and v["parent_still_right"] == 1
    assert v["write_null"] == 1 and v["write_errno"] == errno.EINVAL
    assert v["uunmap"] == 0
    assert v["uunmap_again"] == -1 and v["uunmap_again_errno"] == errno.EINVAL
    assert v["fixed_at_addr"] == 1 and v["fixed_right"] == 1
    assert v["taken_null"] == 1 and v["taken_errno"] == errno.EEXIST
    assert v["closed_errno"] == errno.ENOTCONN
    assert v["reconnected_right"] == 1
    assert v["alive"] == 1
    assert "missing.bin: No such file or directory" in err
    assert wait_for(lambda: server.stats()["regions"] == [] and not server.stats()["clients"])


def test_unreadable_file_as_nobody(start_server, programs, workdir):
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody")
    secret = make_file(os.path.join(workdir, "secret.bin"), 100000, seed=73)
    public = make_file(os.path.join(workdir, "public.bin"), 300000, seed=74)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    server = start_server("--page-size", "64K", "--buffer-size", 16)
    os.chmod(server.socket, 0o666)   # nobody may connect, whatever the server's default
    exe = programs.build(os.path.join(SOURCES, "probe.c"))
    os.chmod(exe, 0o755)
    code, out, err = programs.run([exe, "nobody", server.socket, secret, public], clean_env())
    assert code == 0, err
    v = values(out)
    assert v["uid"] == NOBODY and v["init_errno"] == 0
    assert v["secret_null"] == 1 and v["secret_errno"] == errno.EACCES
    assert v["public_null"] == 0 and v["public_right"] == 1
    assert v["alive"] == 1
    assert "secret.bin: Permission denied" in err


# ---- (c) the preload library ----------------------------------------------------

def served(backing, path):
    return backing.startswith("/memfd:mpumap:" + os.path.basename(path))


@pytest.mark.parametrize("mode", ["shared", "private"])
def test_preload_serves_a_c_program(start_server, programs, workdir, mode):
    matched = make_file(os.path.join(workdir, "matched.bin"), 5 * MiB + 1234, seed=75)
    other = make_file(os.path.join(workdir, "other.dat"), 300000, seed=76)
    server = start_server("--page-size", "64K", "--buffer-size", "2M")
    exe = programs.build(os.path.join(SOURCES, "mmap_reader.c"), flags=[])
    env = clean_env(**native.preload_env([os.path.join(workdir, "*.bin")], server.socket))
    before = pages_served(server.stats())
    args = [exe, "--wait"] + (["--private"] if mode == "private" else []) + [matched, other]
    proc = programs.start(args, env, stdin=subprocess.PIPE)
    lines = [proc.stdout.readline() for _ in range(3)]
    assert lines[2].strip() == "mapped", (lines, proc.stderr.read() if proc.poll() else "")
    first, second = fields(lines[0]), fields(lines[1])
    assert first["file"] == matched and first["wrong"] == "0"
    assert served(first["backing"], matched), first
    assert second["file"] == other and second["wrong"] == "0"
    assert second["backing"] == other          # untouched: the kernel's mapping
    stats = server.stats()
    assert [r["file"] for r in stats["regions"]] == [matched]
    assert pages_served(stats) - before >= (5 * MiB) // (64 << 10)
    assert [c["pid"] for c in stats["clients"]] == [proc.pid]

    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err
    assert out.strip().endswith("done")
    assert err == ""
    assert wait_for(lambda: server.stats()["regions"] == [])


def test_read_ahead_follows_each_threads_scan(start_server, programs, workdir):
    """Eight threads scan a stripe each of one mapping at once: each stripe is
    a scan of its own, read ahead, not a random walk."""
    path = make_file(os.path.join(workdir, "striped.bin"), 32 * MiB + 4321, seed=83)
    server = start_server("--page-size", "4K", "--buffer-size", "64M")
    exe = programs.build(os.path.join(SOURCES, "striped_reader.c"), flags=[])
    env = clean_env(**native.preload_env([path], server.socket))
    code, out, err = programs.run([exe, "8", path], env)
    assert code == 0, (out, err)
    assert fields(out)["wrong"] == "0"
    buffer = server.stats()["buffer"]
    pages = (32 * MiB + 4321) // 4096 + 1
    # (The first faults, while the buffer has room, also read around them.)
    assert buffer["readahead_fills"] + buffer["readaround_fills"] > pages * 0.9
    assert buffer["faults"] < pages / 16, buffer["faults"]


def test_a_scan_faster_than_its_read_ahead_leaves_no_copy_in_the_page_cache(
        start_server, programs, workdir):
    """A program that scans faster than its read-ahead windows come (one byte
    a page, in C) faults ahead of them now and then, and the window it
    faulted in is read short: what the scan read is dropped behind it all the
    same.  (It used to leave the scan reader there and copy the rest of the
    file from the page cache, where the kernel's read-ahead kept it: most of
    a 512 MiB file stayed in the cache beside the buffer.)"""
    size = 192 * MiB
    path = uncached_file(os.path.join(workdir, "fast.bin"), size, seed=86)
    server = start_server("--page-size", "4K", "--buffer-size", "256M")
    exe = programs.build(os.path.join(SOURCES, "striped_reader.c"), flags=[])
    env = clean_env(**native.preload_env([path], server.socket))
    proc = programs.start([exe, "1", path, "pause"], env, stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "scanned", proc.communicate(timeout=60)
    cached = page_cache_bytes(path)
    out, err = proc.communicate("\n", timeout=120)
    assert proc.returncode == 0, (out, err)
    assert fields(out)["wrong"] == "0"
    buffer = server.stats()["buffer"]
    assert buffer["readahead_fills"] > size // 4096 * 0.9, buffer
    assert cached <= 16 * MiB, f"{cached / MiB:.0f} MiB of the file in the page cache"


def test_threads_on_the_same_random_pages_read_nothing_ahead(start_server, programs, workdir):
    """Four threads fault on the same pages at once, in random order: each
    page's faults are one fault each, not a scan (the buffer, which holds
    the file, reads around them instead)."""
    path = make_file(os.path.join(workdir, "same.bin"), 8 * MiB, seed=84)
    server = start_server("--page-size", "4K", "--buffer-size", "64M")
    exe = programs.build(os.path.join(SOURCES, "striped_reader.c"), flags=[])
    env = clean_env(**native.preload_env([path], server.socket))
    code, out, err = programs.run([exe, "4", path, "same"], env)
    assert code == 0, (out, err)
    assert fields(out)["wrong"] == "0"
    buffer = server.stats()["buffer"]
    assert pages_served(server.stats()) >= 8 * MiB // 4096
    assert buffer["readahead_fills"] < 8 * MiB // 4096 * 0.05, buffer


def test_preload_munmap_that_cuts_into_a_served_range(start_server, programs, workdir):
    path = make_file(os.path.join(workdir, "cut.bin"), 1 * MiB + 99, seed=81)
    server = start_server("--page-size", "64K", "--buffer-size", "2M")
    exe = programs.build(os.path.join(SOURCES, "mmap_reader.c"), flags=[])
    env = clean_env(**native.preload_env([path], server.socket))
    proc = programs.start([exe, "--wait", "--cut", path], env, stdin=subprocess.PIPE)
    first = fields(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "mapped"
    # what is left reads the file through the kernel, and the server let go
    assert first["wrong"] == "0" and first["backing"] == path, first
    assert wait_for(lambda: server.stats()["regions"] == [])
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and err == "", (out, err)


class CutMapper:
    """native/cut_mapper.c, a program whose mapping the preload library
    serves, told what to do one line at a time."""

    def __init__(self, programs, server, path):
        exe = programs.build(os.path.join(SOURCES, "cut_mapper.c"), flags=[])
        env = clean_env(**native.preload_env([path], server.socket))
        self.proc = programs.start([exe, path], env, stdin=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready", self.failure()

    def failure(self):
        return self.proc.poll() is not None and self.proc.stderr.read()

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self):
        answer = self.proc.stdout.readline().strip()
        assert answer, self.failure()
        return answer

    def __call__(self, line):
        self.send(line)
        return self.answer()

    def end(self):
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0 and err == "", (out, err)


def test_a_write_served_late_while_a_munmap_cuts_its_mapping_reaches_the_file(
        start_server, programs, workdir):
    """A munmap that cuts into a mapping that writes hands the whole of it
    back (its last write-back, then the region's release) and maps the file
    over what is left, while another thread's write fault on that rest is
    still to be served.  Served after the write-back passed its page but
    before the release, the page was opened (dirty, writable), written, and
    dropped with the region: munmap said nothing and the byte was lost.
    The order is forced: the filler and the evictor are stopped, then the
    evictor's write-back runs while the server's main loop is stopped, then
    the filler."""
    page = 65536
    path = make_file(os.path.join(workdir, "cut.bin"), 2 * MiB, seed=85)
    original = open(path, "rb").read()
    offset = 16 * page + 100
    server = start_server("--page-size", "64K", "--buffer-size", "8M", "--fillers", 1,
                          "--evictors", 1, "--worker-timeout", 60)
    workers = {w["role"]: w["pid"] for w in server.stats()["workers"]}
    program = CutMapper(programs, server, path)
    assert program(f"read {offset}") == str(original[offset])  # in the buffer, protected
    stopped = []

    def stop(pid):
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    def go_on(pid, settle=0.5):
        os.kill(pid, signal.SIGCONT)
        stopped.remove(pid)
        time.sleep(settle)

    try:
        stop(workers["filler"])
        stop(workers["evictor"])
        assert program(f"twrite {offset} W") == "writing"
        time.sleep(0.5)  # the write fault waits in the stopped filler's queue
        program.send("cut 0 4096")
        # The mapping is handed back: its region's last write-back is asked
        # of the stopped evictor.
        assert wait_for(lambda: [r["mappings"] for r in server.stats()["regions"]] == [0])
        stop(server.proc.pid)
        go_on(workers["evictor"], settle=1.0)  # the write-back, answered to nobody yet
        go_on(workers["filler"])  # the late write fault
        go_on(server.proc.pid)  # the answer: the release
        assert program.answer() == "ok"
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert program("join") == "ok"
    assert program(f"sync 4096 {2 * MiB - 4096}") == "ok"
    program.end()
    with open(path, "rb") as f:
        data = f.read()
    assert data[offset] == ord("W")
    assert data[:offset] + data[offset + 1:] == original[:offset] + original[offset + 1:]


def test_a_write_back_across_a_mapping_the_program_put_in_its_range_protects_both_sides(
        start_server, programs, workdir):
    """A program puts a mapping of its own over part of its served one by
    the system call (the C library's mmap would hand the range back first);
    a write-back of the dirty pages on both sides of it then write-protects
    across a gap.  One ioctl stops at the gap, and the pages after it stayed
    writable: a write there went unseen, and was lost."""
    page = 65536
    path = make_file(os.path.join(workdir, "gap.bin"), 2 * MiB, seed=87)
    want = bytearray(open(path, "rb").read())
    server = start_server("--page-size", "64K", "--buffer-size", "8M")
    program = CutMapper(programs, server, path)
    for k in range(6):
        assert program(f"write {k * page + 10} A") == "ok"
        want[k * page + 10] = ord("A")
    assert program(f"rawfixed {2 * page} {2 * page}") == "ok"
    assert program(f"sync 0 {2 * MiB}") == "ok"
    assert program(f"write {4 * page + 20} B") == "ok"
    want[4 * page + 20] = ord("B")
    assert program(f"cut 0 {2 * MiB}") == "ok"
    program.end()
    assert wait_for(lambda: not server.stats()["regions"])
    assert open(path, "rb").read() == want


def test_an_mmap_with_map_fixed_over_a_served_mapping_is_a_munmap_first(
        start_server, programs, workdir):
    """As the kernel's MAP_FIXED: what it covers is unmapped (written back),
    the rest of the mapping becomes the file's, and the new mapping is the
    program's; nothing of it stays served."""
    page = 65536
    path = make_file(os.path.join(workdir, "fixed.bin"), 2 * MiB, seed=88)
    want = bytearray(open(path, "rb").read())
    server = start_server("--page-size", "64K", "--buffer-size", "8M")
    program = CutMapper(programs, server, path)
    assert program(f"write {5 * page} A") == "ok"  # a write the munmap writes back
    want[5 * page] = ord("A")
    assert program(f"fixed {2 * page} {2 * page}") == "ok"
    assert wait_for(lambda: server.stats()["regions"] == [])
    assert program(f"read {2 * page}") == str(ord("F"))
    assert program(f"read {5 * page}") == str(ord("A"))  # through the file now
    assert program(f"write {6 * page} B") == "ok"
    want[6 * page] = ord("B")
    assert program(f"sync {4 * page} {2 * MiB - 4 * page}") == "ok"
    program.end()
    assert open(path, "rb").read() == want


def test_preload_serves_numpy_memmap(start_server, programs, workdir):
    pytest.importorskip("numpy")
    path = make_file(os.path.join(workdir, "array.bin"), 3 * MiB + 8, seed=77)
    server = start_server("--page-size", "64K", "--buffer-size", "1M")
    script = """
import json, os, sys, numpy
path = sys.argv[1]

def backing(array):
    address = array.ctypes.data
    for line in open("/proc/self/maps"):
        span, *rest = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return rest[4].strip() if len(rest) > 4 else ""

m = numpy.memmap(path, mode="r")
want = open(path, "rb").read()
result = {"ok": m.tobytes() == want, "size": len(m), "backing": backing(m)}
# a forked child connects anew (the parent's mapping is not inherited)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    c = numpy.memmap(path, mode="r")
    os.write(w, json.dumps([c.tobytes() == want, backing(c)]).encode())
    del c
    os._exit(0)
os.close(w)
result["child"] = json.loads(os.read(r, 65536))
os.waitpid(pid, 0)
print(json.dumps(result), flush=True)
sys.stdin.readline()
del m
print("done", flush=True)
"""
    env = clean_env(**native.preload_env([path], server.socket))
    before = pages_served(server.stats())
    proc = programs.start([sys.executable, "-c", script, path], env, stdin=subprocess.PIPE)
    line = proc.stdout.readline()
    assert line, proc.communicate(timeout=30)[1]
    result = json.loads(line)
    assert result["ok"] is True and result["size"] == 3 * MiB + 8
    assert served(result["backing"], path), result
    child_ok, child_backing = result["child"]
    assert child_ok is True and served(child_backing, path)
    stats = server.stats()
    assert [r["file"] for r in stats["regions"]] == [path]
    assert pages_served(stats) - before >= (3 * MiB) // (64 << 10)
    out, err = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, err
    assert "done" in out
    assert wait_for(lambda: server.stats()["regions"] == [])


def test_preload_without_server_falls_through_with_one_warning(programs, workdir):
    a = make_file(os.path.join(workdir, "a.bin"), 200000, seed=78)
    b = make_file(os.path.join(workdir, "b.bin"), 70000, seed=79)
    sock = os.path.join(workdir, "nobody-home.sock")
    exe = programs.build(os.path.join(SOURCES, "mmap_reader.c"), flags=[])
    env = clean_env(**native.preload_env([os.path.join(workdir, "*")], sock))
    code, out, err = programs.run([exe, a, b], env)
    assert code == 0, err
    lines = out.splitlines()
    for line, path in zip(lines, (a, b)):
        f = fields(line)
        assert f["file"] == path and f["wrong"] == "0" and f["backing"] == path
    warnings = err.splitlines()
    assert len(warnings) == 1, err
    assert warnings[0].startswith("mpumap-preload: no mpumap server at " + sock)


def test_preload_env():
    env = native.preload_env(["/data/*.bin", "*.npy", "rel/x.bin"], "s.sock",
                             environ={"LD_PRELOAD": "/other/lib.so"})
    assert env["LD_PRELOAD"] == native.preload_library() + ":/other/lib.so"
    assert env["MPUMAP_PRELOAD_MAP"] == ":".join(
        ["/data/*.bin", "*.npy", os.path.join(os.getcwd(), "rel/x.bin")])
    assert env["MPUMAP_SOCKET"] == os.path.abspath("s.sock")
    assert "MPUMAP_SOCKET" not in native.preload_env("/x", environ={})
    with pytest.raises(ValueError):
        native.preload_env(["/a:b"])
    with pytest.raises(ValueError):
        native.preload_env([])


# ---- (d) the guard: the server dies under a reading program ----------------------

def threads_in(pid, wchan):
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                count += f.read().strip() == wchan
        except OSError:
            pass
    return count


def test_program_reads_on_when_the_server_is_killed(start_server, programs, workdir):
    path = make_file(os.path.join(workdir, "g.bin"), 16 * MiB, seed=80)
    server = start_server("--page-size", "4K", "--buffer-size", "4M")
    exe = programs.build(os.path.join(SOURCES, "guard_reader.c"))
    proc = programs.start([exe, path, "3"], clean_env(MPUMAP_SOCKET=server.socket),
                          stdin=subprocess.PIPE)
    ready = proc.stdout.readline()
    assert ready.startswith("ready") and fields(ready)["wrong"] == "0", \
        (ready, proc.poll() is not None and proc.stderr.read())

    # Stopped, the server serves nothing: the reading threads block on faults.
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert wait_for(lambda: threads_in(proc.pid, "handle_userfault") == 3, timeout=10)
    finally:
        os.kill(server.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    server.proc.wait(10)
    os.unlink(server.socket)   # a killed server leaves its socket behind

    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - killed
    assert proc.returncode == 0, (out, err)
    done = fields(out.splitlines()[-1])
    assert done["wrong"] == "0"
    assert int(done["pages"]) == 16 * MiB // 4096 // 4 + 3 * 16 * MiB // 4096
    assert elapsed < 30
    lost = [line for line in err.splitlines() if "lost the server" in line]
    assert len(lost) == 1 and "1 mapping(s) now use their file directly" in lost[0], err


def test_a_writer_syncs_its_file_once_the_server_is_killed(start_server, programs, workdir):
    """client_uflush and client_uunmap after the server died: the guard
    wrote the buffer back and mapped the file in its place, so they sync
    the file (not ask a server that is gone), and what was written before
    and after is all in it."""
    path = make_file(os.path.join(workdir, "w.bin"), 4 * MiB, seed=81)
    server = start_server("--page-size", "4K", "--buffer-size", "8M")
    exe = programs.build(os.path.join(SOURCES, "lost_flush.c"))
    proc = programs.start([exe, path], clean_env(MPUMAP_SOCKET=server.socket),
                          stdin=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "wrote", \
        proc.poll() is not None and proc.stderr.read()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    os.unlink(server.socket)   # a killed server leaves its socket behind
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, err)
    assert out.splitlines()[-1] == "flush=0 errno=0 unmap=0 errno=0", (out, err)
    with open(path, "rb") as f:
        assert f.read() == b"a" * (2 * MiB) + b"b" * (2 * MiB)


def test_a_c_writer_hears_eio_from_flush_and_unmap_when_its_file_hangs(start_server, programs,
                                                                       workdir):
    """client_uflush and client_uunmap of a mapping whose file system
    stopped answering writes: each returns -1 with EIO (the evictor caught
    in the write is replaced, the file stalled) instead of waiting for
    ever, or saying 0."""
    server = start_server("--page-size", "4K", "--buffer-size", "8M", "--worker-timeout", 2)
    exe = programs.build(os.path.join(SOURCES, "lost_flush.c"))
    with stalling_fs(os.path.join(workdir, "fs"), f"w.bin:{MiB}:stallwrite") as fs:
        proc = programs.start([exe, os.path.join(fs, "w.bin")],
                              clean_env(MPUMAP_SOCKET=server.socket), stdin=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "wrote", \
            proc.poll() is not None and proc.stderr.read()
        out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, (out, err)
    eio = errno.EIO
    assert out.splitlines()[-1] == f"flush=-1 errno={eio} unmap=-1 errno={eio}", (out, err)
    assert "w.bin: its store hung evictor" in server.output()


def test_the_c_library_gives_up_with_etimedout(start_server, programs, workdir):
    """Against a stopped server, client_umap fails with ETIMEDOUT after
    $MPUMAP_TIMEOUT, the connection takes no more requests, and
    client_uunmap(NULL) is EINVAL."""
    path = make_file(os.path.join(workdir, "c.bin"), MiB, seed=93)
    server = start_server("--buffer-size", 64)
    exe = programs.build(os.path.join(SOURCES, "probe.c"))
    proc = programs.start([exe, "stopped", server.socket, path],
                          {**clean_env(), "MPUMAP_TIMEOUT": "2"},
                          stdin=subprocess.PIPE)
    before = [proc.stdout.readline(), proc.stdout.readline()]
    assert before == ["init_errno=0\n", "ready=1\n"], before
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        out, err = proc.communicate("go\n", timeout=30)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    v = values(out)
    assert v["map_null"] == 1 and v["map_errno"] == errno.ETIMEDOUT
    assert 2 * 1000 - 100 <= v["map_ms"] < (2 + 1) * 1000
    assert v["again_null"] == 1 and v["again_errno"] == errno.ENOTCONN
    assert v["uunmap_null"] == -1 and v["uunmap_null_errno"] == errno.EINVAL
    assert v["alive"] == 1
    assert "did not answer within" in err


@pytest.mark.parametrize("mode", ["api", "mmap"])
def test_a_c_program_writes_and_flushes(start_server, programs, workdir, mode):
    """client_umap(PROT_READ | PROT_WRITE, MAP_SHARED) and client_uflush; or
    an unmodified program's mmap and msync under the preload library."""
    sys.path.insert(0, os.path.dirname(SOURCES))
    from test_writes import bad_pages, read_direct

    path = make_file(os.path.join(workdir, "written.bin"), 4 * MiB, seed=78)
    server = start_server("--page-size", "64K", "--buffer-size", "2M")
    exe = programs.build(os.path.join(SOURCES, "writer.c"))
    if mode == "api":
        env = clean_env(MPUMAP_SOCKET=server.socket)
    else:
        env = clean_env(**native.preload_env([path], server.socket))
    proc = programs.start([exe, mode, path, mode], env, stdin=subprocess.PIPE)
    line = proc.stdout.readline()
    assert fields(line) == {"wrong": "0"}, (line, proc.stderr.read() if proc.poll() else "")
    # Durable while still mapped: on the disk, past the page cache.
    assert bad_pages(read_direct(path), 0, 1024, mode) == []
    stats = server.stats()
    assert [(r["file"], r["writable"]) for r in stats["regions"]] == [(path, True)]
    assert stats["buffer"]["written"] >= 64  # the 2 MiB buffer held a half of it
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and out.strip() == "done", (out, err)
    assert wait_for(lambda: server.stats()["regions"] == [])
