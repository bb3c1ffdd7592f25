"""Issue: stores users write, registered by scheme and run in the fillers.
The example store (examples/stores/synthetic.py) through a real server."""
import errno
import os
import random
import subprocess
import sys

import pytest

import mpumap
from mpumap.testing import MiB, command as tool

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "stores")
sys.path.insert(0, EXAMPLES)
import synthetic  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def serve(start_server, *args):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(EXAMPLES)}
    return start_server("--store", "synth=synthetic:SyntheticStore",
                        "--allow-remote", "synth://*", *args, env=env)


def test_the_synthetic_example_store_serves_its_data_set(start_server):
    server = serve(start_server, "--page-size", "64K", "--buffer-size", "8M")
    url = "synth://training/shard-3?size=48M&seed=7"
    with mpumap.connect(server.socket) as client, client.map(url) as m:
        assert len(m) == 48 * MiB
        rng = random.Random(1)
        for off in rng.sample(range(0, len(m) - 5000), 300):
            assert m[off:off + 5000] == synthetic.data(url, off, 5000), off
        assert m[:] == synthetic.data(url, 0, len(m))  # through a buffer of a sixth
        # An odd size: the last page is cut where the data set ends.
        odd = "synth://odd?size=100001&seed=1"
        with client.map(odd) as small:
            assert small[:] == synthetic.data(odd, 0, 100001)
        # A store that does not write is read-only: a clear error, and on.
        with pytest.raises(OSError) as refused:
            client.map(url, mode="r+")
        assert refused.value.errno == errno.EROFS
        stats = client.stats()
    (row,) = [r for r in stats["stores"] if r["store"] == "synth"]
    assert row["bytes"] >= 48 * MiB and row["errors"] == 0
    # mpumap top has a row for the store.
    out = subprocess.run(tool("mpumap") + ["top", "--socket", server.socket, "--once",
                                           "--interval", "0.2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("STORE"))
    assert lines[header + 1].split()[0] == "synth"
    assert lines[header + 1].split()[-2:] == ["0", "0"]  # errors, retries


def test_a_store_that_cannot_be_loaded_is_a_clear_error(start_server):
    server = start_server("--store", "nope=no_such_module:Store", "--allow-remote", "nope://*")
    with mpumap.connect(server.socket) as client:
        with pytest.raises(OSError) as info:
            client.map("nope://x")
        assert info.value.errno == errno.EPROTONOSUPPORT
        assert "cannot be loaded" in str(info.value)
        with pytest.raises(OSError) as info:
            client.map("gopher://host/x")  # allowed by nothing, served by nothing
        assert info.value.errno == errno.EACCES
    assert server.stats()["regions_total"] == 0


def test_an_installed_package_registers_its_store_by_entry_point(start_server, workdir):
    """A package that declares `mpumap.stores` entry points serves its
    schemes with no flag: here a dist-info folder on the server's path, as
    pip would leave it, naming the example store under another scheme."""
    site = os.path.join(workdir, "site")
    info = os.path.join(site, "mpumap_example_stores-1.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: mpumap-example-stores\nVersion: 1.0\n")
    with open(os.path.join(info, "entry_points.txt"), "w") as f:
        f.write("[mpumap.stores]\ngen = synthetic:SyntheticStore\n")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([site, os.path.abspath(EXAMPLES)])}
    server = start_server("--allow-remote", "gen://*", env=env)
    url = "gen://numbers?size=3M&seed=4"
    with mpumap.connect(server.socket) as client, client.map(url) as m:
        assert m[:] == synthetic.data(url, 0, 3 * MiB)
        assert [r["store"] for r in client.stats()["stores"]] == ["gen"]


BIG_TAG_STORE = '''
from mpumap.stores import ObjectInfo, Store


class BigTagStore(Store):
    """Objects of a page of zeros whose version is 200 kB long."""

    schemes = ("bigtag",)

    def stat(self, url):
        return ObjectInfo(4096, "v" * 200_000)

    def read(self, url, identity, offset, length):
        return bytes(length)
'''


def test_an_object_whose_version_is_too_long_to_tell_the_workers_is_refused(
        start_server, workdir):
    with open(os.path.join(workdir, "bigtag.py"), "w") as f:
        f.write(BIG_TAG_STORE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([workdir, os.path.abspath(EXAMPLES)])}
    server = start_server("--store", "bigtag=bigtag:BigTagStore", "--store",
                          "synth=synthetic:SyntheticStore", "--allow-remote", "bigtag://*",
                          "--allow-remote", "synth://*", env=env)
    with mpumap.connect(server.socket) as client:
        with pytest.raises(OSError) as refused:
            client.map("bigtag://o")
        assert refused.value.errno == errno.EINVAL and "longer than" in str(refused.value)
        # Every worker still there, and serving.
        url = "synth://after?size=1M&seed=3"
        with client.map(url) as m:
            assert m[:] == synthetic.data(url, 0, MiB)
    assert server.proc.poll() is None
