"""What the tests and the scripts (demo, benchmarks) both need: data files,
mpumap's own commands, a server to run, a C client to build, a memory
cgroup.

Not part of the client API; it is in the package so that both find it
without path tricks."""
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

MiB = 1 << 20

ENTRY_POINTS = {"mpumap-server": "server_main", "mpumap-client": "client_main",
                "mpumap": "mpumap_main"}


def make_file(path, size, seed=0):
    """A file of pseudo-random bytes, different for each seed."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(rng.randbytes(n))
            left -= n
    return path


def command(name):
    """The command line of one of mpumap's commands: the installed script
    beside this Python, else on PATH, else its entry point run directly."""
    script = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.exists(script):
        return [script]
    found = shutil.which(name)
    if found:
        return [found]
    return [sys.executable, "-c", f"from mpumap.cli import {ENTRY_POINTS[name]} as main; main()"]


def drop_from_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@contextlib.contextmanager
def running_server(*args, log=None):
    """Start mpumap-server on a fresh socket; yield (socket path, process)."""
    import mpumap

    folder = tempfile.mkdtemp(prefix="mpumap-", dir="/tmp")
    sock = os.path.join(folder, "server.sock")
    proc = subprocess.Popen(command("mpumap-server") + ["--socket", sock, *map(str, args)],
                            stderr=log or subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mpumap-server exited with status {proc.returncode}")
            try:
                if mpumap.server_stats(sock)["workers"]:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("mpumap-server did not start") from None
                time.sleep(0.05)
        yield sock, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def build_c_program(source, folder, name=None, libs=None):
    """Compile a C client program with our client header into folder,
    linked against libmpumapclient (or `libs`); the path of the binary
    (named after the source, or `name`)."""
    from mpumap import native

    binary = os.path.join(folder, name or os.path.splitext(os.path.basename(source))[0])
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("no C compiler: run scripts/setup-system.sh")
    subprocess.run([cc, "-O2", "-o", binary, source, *native.cflags(),
                    *(native.libs() if libs is None else libs)], check=True)
    return binary


class NoCgroup(Exception):
    """No memory cgroup can be made here; the text says why."""


class MemoryCgroup:
    """A fresh child of this process's memory cgroup (v1, or v2 where the
    memory controller is on), removed at the end; processes join it through
    `procs`."""

    def __init__(self):
        self.v2 = False
        base = None
        try:
            with open("/proc/self/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            raise NoCgroup("no /proc/self/cgroup") from None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                base = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
                break
        else:
            for line in lines:
                _, controllers, path = line.split(":", 2)
                folder = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
                if controllers == "" and "memory" in self._read(folder, "cgroup.controllers"):
                    base, self.v2 = folder, True
        if base is None:
            raise NoCgroup("no memory cgroup controller here (v1 or v2)")
        self.path = os.path.join(base, f"mpumap-{uuid.uuid4().hex[:8]}")
        try:
            if self.v2:
                with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            os.mkdir(self.path)
        except OSError as exc:
            raise NoCgroup(f"cannot create a memory cgroup ({exc.strerror})") from None
        self.procs = os.path.join(self.path, "cgroup.procs")

    def join(self):
        """For preexec_fn: the starting process joins the cgroup."""
        with open(self.procs, "w") as f:
            f.write(str(os.getpid()))

    @staticmethod
    def _read(folder, name):
        try:
            with open(os.path.join(folder, name)) as f:
                return f.read()
        except OSError:
            return ""

    def set_limit(self, size):
        name = "memory.max" if self.v2 else "memory.limit_in_bytes"
        with open(os.path.join(self.path, name), "w") as f:
            f.write(str(size))

    def usage(self):
        return int(self._read(self.path, "memory.current" if self.v2 else
                              "memory.usage_in_bytes"))

    def peak(self):
        """The most the cgroup was charged since it was made (0: unknown)."""
        text = self._read(self.path, "memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(text) if text.strip().isdigit() else 0

    def pids(self):
        return {int(p) for p in self._read(self.path, "cgroup.procs").split()}

    def oom_kills(self):
        text = self._read(self.path, "memory.events" if self.v2 else "memory.oom_control")
        for line in text.splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def remove(self):
        parent = os.path.dirname(self.path)
        for _ in range(100):
            try:
                for pid in self.pids():
                    with open(os.path.join(parent, "cgroup.procs"), "w") as out:
                        out.write(str(pid))
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
