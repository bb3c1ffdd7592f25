"""An unprivileged user (nobody) doing its worst to a server another user
relies on, for tests/integration/test_shared_node.py.

    attacker.py MODE SOCKET FOLDER [N]

Started as root: it raises its descriptor limit, then becomes uid/gid 65534
for good.  FOLDER is writable by nobody.  It prints one JSON line when the
attack holds ({"holding": ...}), keeps it up until stdin closes (or its N is
done), then prints a last JSON line of what it saw and exits.
"""
import errno
import fcntl
import json
import os
import random
import resource
import signal
import socket
import sys
import time

# Everything it needs is imported as root: root's home, where this Python
# lives, is closed to nobody.
import mpumap
from mpumap import core, protocol
from mpumap.protocol import Msg

NOBODY = 65534


def become_nobody(descriptors=1024):
    """As many descriptors as asked, or as the hard limit allows (raising
    that needs CAP_SYS_RESOURCE, which not every machine's root has)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        descriptors = min(descriptors, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors, descriptors))
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def report(**what):
    print(json.dumps(what), flush=True)


def hold():
    """Until the test closes our stdin."""
    sys.stdin.read()


def lease(sock_path, folder, count):
    """Files of its own under a write lease, each handed to the server: a
    server that reopened them would wait for the lease to break (45 s)."""
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease-break notice
    client = mpumap.connect(sock_path)
    held, mapped, refused = [], 0, 0
    for i in range(count):
        path = os.path.join(folder, f"leased{i}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(65536))
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        held.append(fd)
        try:
            # Its own leased descriptor: opening the file again would break
            # its own lease.
            held.append(client._map(path, fd))
            mapped += 1
        except OSError:
            refused += 1
        if i == 0:
            report(holding="lease")
    report(done="lease", mapped=mapped, refused=refused)
    hold()


def flood(sock_path, folder, count):
    """Connections that never speak, as many as it can hold."""
    socks, failed = [], 0
    for i in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.setblocking(False)
        try:
            s.connect(sock_path)
            socks.append(s)
        except OSError:
            s.close()
            failed += 1
        if i == 100:
            report(holding="flood")
    report(done="flood", opened=len(socks), failed=failed)
    hold()


def hellos(sock_path, folder, count):
    """HELLO after HELLO with one userfaultfd: a client slot each."""
    uffd, _ = core.uffd_open()
    socks, welcomed, refusals = [], 0, {}
    for i in range(count):
        if i == 50:
            report(holding="hellos")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.settimeout(5)
            s.connect(sock_path)
            protocol.send(s, Msg.HELLO, protocol.U32.pack(0), [uffd])
            data, fds = protocol.receive(s)
            protocol.close_all(fds)
            kind, payload, _ = protocol.unpack(data, len(fds))
            if kind == Msg.WELCOME:
                welcomed += 1
                socks.append(s)
                continue
            code, _ = protocol.parse_error(payload)
            refusals[errno.errorcode.get(code, code)] = refusals.get(
                errno.errorcode.get(code, code), 0) + 1
        except OSError as exc:
            key = errno.errorcode.get(exc.errno, str(exc))
            refusals[key] = refusals.get(key, 0) + 1
        s.close()
    report(done="hellos", welcomed=welcomed, refusals=refusals)
    hold()


def map_many(sock_path, mode, count, path_of, how="r", per_client=500):
    """Maps of path_of(i) for i in range(count), a new client every
    per_client of them (within --max-client-mappings); reports that the
    attack holds after 50, then what was mapped and refused, and holds."""
    clients, maps, refusals = [], [], {}
    for i in range(count):
        if not clients or len(maps) % per_client == per_client - 1:
            clients.append(mpumap.connect(sock_path))
        try:
            maps.append(clients[-1].map(path_of(i), how))
        except OSError as exc:
            key = errno.errorcode.get(exc.errno, str(exc))
            refusals[key] = refusals.get(key, 0) + 1
        if i == 50:
            report(holding=mode)
    report(done=mode, mapped=len(maps), refusals=refusals)
    hold()


def regions(sock_path, folder, count):
    """Maps of one-byte files: a region each."""
    def tiny(i):
        path = os.path.join(folder, f"tiny{i}")
        with open(path, "wb") as f:
            f.write(b"x")
        return path

    map_many(sock_path, "regions", count, tiny)


def writers(sock_path, folder, count):
    """Mappings that write, of one page each: an entry each in the table of
    writers the server keeps for every user."""
    path = os.path.join(folder, "page.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(4096))
    map_many(sock_path, "writers", count, lambda i: path, "r+")


def shrink(sock_path, folder, count):
    """A terabyte file, mapped, shrunk to 4 KiB; then children touch pages
    past its new end, again and again."""
    path = os.path.join(folder, "huge.bin")
    with open(path, "wb") as f:
        f.truncate(1 << 40)
    client = mpumap.connect(sock_path)
    m = client.map(path)
    for offset in range(0, 1 << 40, 1 << 36):  # a few pages, far apart
        m[offset]
    os.truncate(path, 4096)
    report(holding="shrink")
    touched = bus_errors = 0
    deadline = time.monotonic() + count
    while time.monotonic() < deadline:
        pid = os.fork()
        if pid == 0:
            try:
                with mpumap.connect(sock_path) as c:
                    mm = c.map(path)  # the region the server knows: a terabyte
                    rng = random.Random(os.getpid())
                    for _ in range(64):
                        mm[rng.randrange(4096, 1 << 40)]  # SIGBUS: past the end
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        touched += 1
        bus_errors += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
    report(done="shrink", children=touched, bus_errors=bus_errors)
    hold()


def main():
    mode, sock_path, folder = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    # A mapping that writes holds a few descriptors of the client's.
    per_count = 5 if mode == "writers" else 1
    become_nobody(max(1024, per_count * count + 256))
    {"lease": lease, "flood": flood, "hellos": hellos, "regions": regions,
     "shrink": shrink, "writers": writers}[mode](sock_path, folder, count)


if __name__ == "__main__":
    main()
