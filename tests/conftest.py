"""Fixtures that start real servers and real client processes.

Every server gets its own short socket path (Unix socket paths are limited to
108 bytes) and is stopped, with its workers, when the test ends."""
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

import mpumap
from mpumap.testing import MemoryCgroup, NoCgroup, command, drop_from_page_cache, make_file
import stallfs

HERE = os.path.dirname(os.path.abspath(__file__))
READER = os.path.join(HERE, "integration", "reader.py")
WRITER = os.path.join(HERE, "integration", "writer.py")
OVERWRITER = os.path.join(HERE, "integration", "overwriter.py")
NOBODY = 65534  # the unprivileged user tests become


# mpumap-server as another user (a uid): the switch comes after the imports,
# for root's home, where this Python may live, is closed to other users.
SERVER_AS_USER = (
    "import os, sys, mpumap.cli, mpumap.server, mpumap.workers.fillers, mpumap.workers.evictor\n"
    "uid = int(sys.argv[1])\n"
    "os.setgroups([]); os.setgid(uid); os.setuid(uid)\n"
    "sys.argv[:2] = ['mpumap-server']\n"
    "mpumap.cli.server_main()\n")


class ServerProcess:
    def __init__(self, socket_path, args, log_path, env=None, cgroup=None, user=None):
        self.socket = socket_path
        self.log_path = log_path
        self.log = open(log_path, "wb")

        def join_cgroup():
            with open(cgroup, "w") as f:
                f.write(str(os.getpid()))

        server = (command("mpumap-server") if user is None
                  else [sys.executable, "-c", SERVER_AS_USER, str(user)])
        self.proc = subprocess.Popen(
            server + ["--socket", socket_path, *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=join_cgroup if cgroup else None)
        self.wait_ready()
        self.ps = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if len(mpumap.server_stats(self.socket)["workers"]) >= 2:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not come up:\n{self.output()}")

    def output(self):
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stats(self):
        return mpumap.server_stats(self.socket)

    def workers(self):
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self):
        workers = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        gone, alive = psutil.wait_procs(workers, timeout=5)
        for p in alive:
            p.kill()
        self.log.close()
        return alive


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="mpu-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(workdir):
    servers = []

    def start(*args, env=None, cgroup=None, user=None):
        """A server; user: the uid it runs as (root only), its socket in a
        folder of that user's."""
        folder = workdir
        if user is not None:
            folder = os.path.join(workdir, f"home{len(servers)}")
            os.mkdir(folder)
            os.chown(folder, user, user)
        sock = os.path.join(folder, f"s{len(servers)}.sock")
        server = ServerProcess(sock, [str(a) for a in args],
                               os.path.join(workdir, f"server{len(servers)}.log"), env, cgroup,
                               user)
        servers.append(server)
        return server

    yield start
    leftovers = []
    for server in servers:
        leftovers += server.stop()
        assert not os.path.exists(server.socket), "the server left its socket behind"
    assert not leftovers, f"workers outlived their server: {leftovers}"


class ClientProcesses:
    """Client processes running one of the tests' client scripts
    (integration/reader.py, integration/writer.py): each prints JSON lines,
    the last its result."""

    def __init__(self, script):
        self.script = script
        self.name = os.path.splitext(os.path.basename(script))[0]
        self.procs = []

    def start(self, socket_path, *files, cgroup=None, **options):
        """A client; options are its flags (value "" for a bare flag, a
        list for a flag given once per item); cgroup: the cgroup.procs file
        it joins before it starts."""
        args = [sys.executable, self.script, socket_path, *files]
        for key, values in options.items():
            flag = f"--{key.replace('_', '-')}"
            for value in values if isinstance(values, list) else [values]:
                args += [flag] if value == "" else [flag, str(value)]

        def join_cgroup():
            with open(cgroup, "w") as f:
                f.write(str(os.getpid()))

        # Unbuffered: wait_ready reads one line, and communicate() in
        # result reads the descriptor; a buffer between would keep lines
        # from it.
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                bufsize=0, preexec_fn=join_cgroup if cgroup else None)
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc, timeout=20):
        """The first line the client says (once ready, or once written)."""
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout)
            raise AssertionError(f"{self.name} failed ({proc.returncode}): "
                                 f"{proc.stderr.read().decode()}")
        return json.loads(line)

    def result(self, proc, timeout=120):
        out, err = proc.communicate(timeout=timeout)
        proc.error_output = err.decode(errors="replace")
        lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        if not lines or "pages" not in lines[-1] and "error" not in lines[-1]:
            raise AssertionError(f"{self.name} exited {proc.returncode} without a result:\n"
                                 f"{err.decode()}")
        return lines[-1]

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


@pytest.fixture
def readers():
    r = ClientProcesses(READER)
    yield r
    r.cleanup()


@pytest.fixture
def writers():
    w = ClientProcesses(WRITER)
    yield w
    w.cleanup()


def uncached_file(path, size, seed):
    """make_file, then out of the kernel's page cache."""
    make_file(path, size, seed)
    drop_from_page_cache(path)
    return path


def page_cache_bytes(path):
    """How much of the file the kernel's page cache holds (fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def pages_served(stats):
    """Pages the server gave clients: on their faults, or read ahead of them
    (or around them)."""
    b = stats["buffer"]
    return b["faults"] + b["readahead_fills"] + b["readaround_fills"]


def assert_clean(result):
    """A reader's result: no error, and every byte it read was the file's."""
    assert "error" not in result, result
    assert result["mismatch_count"] == 0, result["mismatches"]



@pytest.fixture
def cgroup():
    try:
        group = MemoryCgroup()
    except NoCgroup as exc:
        pytest.skip(str(exc))
    yield group
    group.remove()


# -- native programs ---------------------------------------------------------

def config(*flags):
    out = subprocess.run(command("mpumap-client") + ["config", *flags], check=True,
                         capture_output=True, text=True, timeout=30).stdout
    return shlex.split(out)


def clean_env(**extra):
    """The environment without anything that would find the library for us."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD", "MPUMAP_SOCKET",
                        "MPUMAP_PRELOAD_MAP")}
    env.update(extra)
    return env


class Programs:
    """Compiles test programs into the test's folder and runs them; kills
    whatever is still running when the test ends."""

    def __init__(self, folder):
        self.folder = folder
        self.procs = []

    def build(self, source, name=None, flags=None):
        name = name or os.path.splitext(os.path.basename(source))[0]
        out = os.path.join(self.folder, name)
        if flags is None:
            flags = config("--cflags", "--libs")
        result = subprocess.run(["cc", "-O2", "-Wall", "-o", out, source, *flags, "-pthread"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return out

    def start(self, args, env, stdin=subprocess.DEVNULL):
        proc = subprocess.Popen(args, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def run(self, args, env, timeout=120):
        proc = self.start(args, env)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err

    def cleanup(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def programs(workdir):
    p = Programs(workdir)
    yield p
    p.cleanup()


def held_in_fuse(pid):
    """Threads of process pid waiting for a FUSE daemon's answer."""
    tasks = f"/proc/{pid}/task"
    waiting = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/wchan") as f:
                if f.read() == "request_wait_answer":
                    waiting.append(int(tid))
        except OSError:
            pass
    return waiting


@contextlib.contextmanager
def stalling_fs(mountpoint, *specs):
    """stallfs.mounted, or the test skipped where FUSE cannot be mounted."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("mounting FUSE takes root and /dev/fuse")
    mount = stallfs.mounted(mountpoint, *specs)
    try:
        fs = mount.__enter__()
    except stallfs.MountFailed as exc:
        pytest.skip(f"cannot mount FUSE here: {exc}")
    with contextlib.ExitStack() as stack:
        stack.push(mount)
        yield fs
