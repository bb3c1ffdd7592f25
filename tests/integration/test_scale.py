"""What the server costs follows the buffer, not the data: terabyte files
through a small buffer, one fault per page, and many clients at once."""
import os
import subprocess
import tempfile
import time

import pytest

import mpumap
from conftest import assert_clean
from mpumap.testing import MiB, make_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TiB = 1 << 40

pytestmark = pytest.mark.timeout(300)


def server_memory(server):
    """USS of the server's processes, the buffer segment (the page directory
    among it) and what the regions' memfds hold."""
    procs = [server.ps] + server.workers()
    uss = sum(p.memory_full_info().uss for p in procs)
    b = server.stats()["buffer"]
    return uss + b["segment_bytes"] + b["memfd_bytes"]


@pytest.fixture
def sparse_file():
    """A sparse file on tmpfs (ext4 stops at 16 TiB - 4 KiB): removed after."""
    made = []

    def make(size, blocks):
        fd, path = tempfile.mkstemp(prefix="mpu-sparse-", dir="/dev/shm")
        made.append(path)
        os.ftruncate(fd, size)
        for offset, data in blocks.items():
            os.pwrite(fd, data, offset)
        os.close(fd)
        os.chmod(path, 0o644)
        return path

    yield make
    for path in made:
        os.unlink(path)


def test_a_16_tib_file_reads_right_at_its_start_middle_and_end(start_server, sparse_file):
    """2**32 pages of 4 KiB: page numbers past 32 bits, in C, Python and on
    the wire; the server's memory stays that of its buffer."""
    size = 16 * TiB
    middle = size // 2 + 12345
    blocks = {0: b"first page", middle: b"the middle", size - 9: b"last byte"}
    path = sparse_file(size, blocks)
    # Read-ahead off: only the pages read are filled (no window around them).
    server = start_server("--page-size", "4K", "--buffer-size", "32M", "--read-ahead", 0)
    before = server_memory(server)
    with mpumap.connect(server.socket) as client, client.map(path) as m:
        assert len(m) == size
        for offset, data in blocks.items():
            assert m[offset:offset + len(data)] == data
        assert m[size - 1:] == b"e"
        assert m[size // 2 - 4096:size // 2 - 4096 + 16] == bytes(16)  # a hole reads zeros
        assert m[(1 << 32) * 4096 - 8:] == b"ast byte"
        # Four pages read; a page counts as present just after its copy
        # woke the reader.
        deadline = time.monotonic() + 10
        while ((region := server.stats()["regions"][0])["present"] < 4
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert region["pages"] == 1 << 32 and region["size"] == size
        assert region["present"] == 4
    grown = server_memory(server) - before
    assert grown < 32 * MiB, grown


def test_a_scan_through_a_smaller_buffer_faults_once_per_page(start_server, readers, workdir):
    """Read-ahead off: every page faults once, no page is evicted before
    its reader had it, and the buffer never holds more than its size."""
    pages = 512
    path = make_file(os.path.join(workdir, "scan.bin"), pages * 4096, seed=51)
    server = start_server("--page-size", "4K", "--buffer-size", 32, "--read-ahead", 0,
                          "--fillers", 2, "--evictors", 2)
    p = readers.start(server.socket, path, order="seq", chunk=4096)
    assert_clean(readers.result(p))
    # The fill of the last page is counted just after its copy woke the reader.
    deadline = time.monotonic() + 10
    while (b := server.stats()["buffer"])["fills"] < pages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b["faults"] == pages, b
    assert b["fills"] == pages and b["readahead_fills"] == 0, b
    assert b["peak_used"] <= 32 and b["evictions"] >= pages - 32
    assert b["present"] <= 32 and b["descriptors"] <= 32


def test_128_clients_read_at_once(start_server, programs, workdir):
    """128 C clients connected and reading at once (scripts/scale_client.c,
    on MP-UMap's client API): every byte right, and each costs the server
    its socket and its userfaultfd."""
    clients = 128
    path = make_file(os.path.join(workdir, "shared.bin"), 16 * MiB, seed=52)
    server = start_server("--page-size", "4K", "--buffer-size", "8M")
    client = programs.build(os.path.join(ROOT, "scripts", "scale_client.c"))
    env = dict(os.environ, MPUMAP_SOCKET=server.socket)
    fds_before = server.ps.num_fds()
    procs = [programs.start([client, path, "200", str(k)], env, stdin=subprocess.PIPE)
             for k in range(clients)]
    for proc in procs:
        line = proc.stdout.readline()
        assert line.strip() == "ready", (line, proc.poll() is not None and proc.stderr.read())
    assert server.stats()["clients_total"] == clients
    per_client = (server.ps.num_fds() - fds_before) / clients
    assert per_client <= 2.5, per_client
    for word in ("go", "done"):  # read, check; then unmap and end
        for proc in procs:
            proc.stdin.write(word + "\n")
            proc.stdin.flush()
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, (out, err)
        assert '{"ok": true}' in out
    b = server.stats()["buffer"]
    assert b["faults"] > 0 and b["peak_used"] <= 2048
