"""Untrusted input: many malformed messages and descriptor combinations while
a well-behaved client reads.  The server stays up, the good client's bytes
stay right, and no descriptor leaks."""
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpumap import core, protocol
from mpumap.protocol import Msg
from mpumap.testing import MiB, make_file

MESSAGES_PER_EXAMPLE = 25
EXAMPLES = 420  # 10,500 messages


def open_descriptors(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Kit:
    """Descriptors of every kind a client could send."""

    def __init__(self, folder):
        self.fds = {}
        readable = make_file(os.path.join(folder, "fuzz-readable.bin"), 70000, seed=60)
        self.fds["file"] = os.open(readable, os.O_RDONLY)
        self.fds["write-only"] = os.open(os.path.join(folder, "fuzz-wo.bin"),
                                         os.O_WRONLY | os.O_CREAT, 0o600)
        self.fds["empty"] = os.open(os.path.join(folder, "fuzz-empty.bin"),
                                    os.O_RDONLY | os.O_CREAT, 0o600)
        self.fds["directory"] = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        a, b = socket.socketpair()
        self.sockets = (a, b)
        self.fds["socket"] = a.fileno()
        r, w = os.pipe()
        self.fds["pipe"], self.fds["pipe-w"] = r, w
        self.fds["devnull"] = os.open(os.devnull, os.O_RDONLY)
        self.fds["eventfd"] = os.eventfd(0)
        self.fds["memfd"] = os.memfd_create("fuzz")
        self.fds["uffd"], _ = core.uffd_open()

    def close(self):
        for name, fd in self.fds.items():
            if name != "socket":
                os.close(fd)
        for s in self.sockets:
            s.close()


KINDS = ["file", "write-only", "empty", "directory", "socket", "pipe", "pipe-w", "devnull",
         "eventfd", "memfd", "uffd"]

header_fields = st.tuples(
    st.sampled_from([protocol.MAGIC, b"MPUX", b"\0\0\0\0"]),
    st.sampled_from([protocol.VERSION, 0, 2, 65535]),
    st.one_of(st.sampled_from([int(m) for m in Msg]), st.integers(0, 65535)),
)
u64 = st.integers(0, 2**64 - 1)
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda a: struct.pack("<Q", a), u64),
    st.builds(lambda a, b, c: struct.pack("<QQQ", a, b, c),
              st.integers(0, 64), st.sampled_from([0, 4096, 0x7f0000000000, 2**64 - 4096]), u64),
    st.builds(lambda a: struct.pack("<I", a), st.integers(0, 2**32 - 1)),
)


@st.composite
def messages(draw):
    shape = draw(st.sampled_from(["garbage", "framed", "framed", "framed", "lying-length"]))
    if shape == "garbage":
        data = draw(st.binary(max_size=200))
    else:
        magic, version, kind = draw(header_fields)
        payload = draw(payloads)
        length = len(payload)
        if shape == "lying-length":
            length = draw(st.integers(0, 2**32 - 1))
        data = protocol.HEADER.pack(magic, version, kind, length) + payload
    fds = draw(st.lists(st.sampled_from(KINDS), max_size=5))
    reconnect = draw(st.integers(0, 9)) == 0
    return data, fds, reconnect


class Fuzzer:
    def __init__(self, socket_path, kit):
        self.path = socket_path
        self.kit = kit
        self.sock = None
        self.sent = 0

    def connect(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(self.path)
        self.sock.settimeout(5)

    def send(self, data, kinds, reconnect):
        if self.sock is None or reconnect:
            self.connect()
        fds = [self.kit.fds[k] for k in kinds]
        try:
            if fds:
                socket.send_fds(self.sock, [data or b"\0"], fds)
            else:
                self.sock.send(data or b"\0")
            reply, rfds = protocol.receive(self.sock)
        except (OSError, protocol.ProtocolError):
            self.sock.close()
            self.sock = None
            return
        finally:
            self.sent += 1
        protocol.close_all(rfds)
        if not reply:  # the server closed on us: a fair answer
            self.sock.close()
            self.sock = None

    def close(self):
        if self.sock is not None:
            self.sock.close()


@pytest.mark.timeout(600)
def test_fuzzed_messages_do_not_hurt(start_server, readers, workdir):
    path = make_file(os.path.join(workdir, "good.bin"), 16 * MiB, seed=61)
    server = start_server("--page-size", "64K", "--buffer-size", "4M")
    pids = [server.proc.pid] + [w.pid for w in server.workers()]
    time.sleep(0.3)
    before = {pid: open_descriptors(pid) for pid in pids}
    stop = os.path.join(workdir, "stop")
    good = readers.start(server.socket, path, order="random", stop=stop)
    readers.wait_ready(good)
    kit = Kit(workdir)
    fuzzer = Fuzzer(server.socket, kit)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(messages(), min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE))
    def fuzz(batch):
        for data, kinds, reconnect in batch:
            fuzzer.send(data, kinds, reconnect)
        assert server.proc.poll() is None

    try:
        fuzz()
    finally:
        fuzzer.close()
        kit.close()
    assert fuzzer.sent >= 10000
    assert server.proc.poll() is None
    assert good.poll() is None, "the good client stopped"
    open(stop, "w").close()
    result = readers.result(good)
    assert "error" not in result and result["mismatch_count"] == 0, result
    assert result["rounds"] >= 2
    stats = server.stats()
    assert stats["buffer"]["faults"] > 0
    # A filler keeps a region's scan reader for 12.4 s after the region
    # goes, dropping what the kernel read ahead for it that landed late
    # (fastpath.c, SCAN_SWEEPS): the descriptors are back after that.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = {pid: open_descriptors(pid) for pid in pids}
        if after == before:
            break
        time.sleep(0.1)
    assert after == before, f"descriptors before {before}, after {after}"
