"""A FUSE file system whose reads of some files never come back: a store
that hangs (a dead NFS server, a stuck FUSE daemon), for tests.

    python stallfs.py MOUNTPOINT [--hold-flush-of PIDFILE] [--fail-reads-when PATH]
                      [--hold-writes-in DIR]
                      NAME:SIZE[:stall|:stallwrite|:hold|:eio|:slowwrite] ...

serves each NAME, SIZE bytes of `pattern(offset)`:

- `stall`: reads are never answered, not even when the reader is killed
  (a FUSE daemon that hangs);
- `stallwrite`: reads are answered; the file may be opened for writing, but
  its writes are never answered;
- `hold`: reads wait until one of them is interrupted (its reader killed:
  EINTR), and are answered from then on; writes are taken and forgotten (a
  mount that hangs a while, killably);
- `eio`: reads fail with EIO once the path --fail-reads-when names exists
  (a disk that goes bad);
- `slowwrite`: read and written (kept in memory), but its writes wait while
  DIR/NAME exists, DIR the folder --hold-writes-in names (answered at the
  next request after it is gone: list the mount point to send one);
- unmarked: read, and read-only.

With --hold-flush-of, the FLUSH that a close() sends is never answered for
the process whose pid PIDFILE holds (once it exists) and its descendants.  It
speaks the kernel's FUSE protocol itself over /dev/fuse (root only: it
mounts with mount(2)), so that a test needs no FUSE library; it answers
what reading a file takes and ENOSYS to the rest.  It unmounts when stopped
(SIGTERM), which fails the reads still waiting."""
import contextlib
import ctypes
import errno
import os
import signal
import stat
import struct
import subprocess
import sys

# Opcodes (include/uapi/linux/fuse.h).
LOOKUP, FORGET, GETATTR = 1, 2, 3
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 25, 26, 27, 28, 29
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET = 34, 36, 38, 42
NO_REPLY = (FORGET, BATCH_FORGET, INTERRUPT)

IN_HEADER = struct.Struct("<IIQQIIII")    # len, opcode, unique, nodeid, uid, gid, pid, pad
OUT_HEADER = struct.Struct("<IiQ")        # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr: 88 bytes
ROOT = 1
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
BLOCK = 4096


def pattern(offset, length):
    """The bytes a file holds at [offset, offset + length): each 8-byte word
    is its own offset, so that a wrong page shows."""
    first = offset // 8
    words = struct.pack(f"<{(length + 15) // 8 + 1}Q",
                        *range(first * 8, (first + (length + 15) // 8 + 1) * 8, 8))
    skip = offset - first * 8
    return words[skip:skip + length]


class StallFS:
    """Owns the /dev/fuse descriptor and the files (name -> (node, size,
    stalls)); the reads it leaves unanswered stay in `held` until the
    connection goes, or in `interruptible` until a signal ends one."""

    def __init__(self, mountpoint, files, hold_flush_of=None, fail_reads_when=None,
                 hold_writes_in=None):
        self.mountpoint = mountpoint
        self.hold_flush_of = hold_flush_of
        self.fail_reads_when = fail_reads_when
        self.hold_writes_in = hold_writes_in
        self.content = {}  # node -> bytearray: what a `slowwrite` file holds
        self.held_writes = []  # (unique, node, offset, data) of `slowwrite` files
        self.nodes = {}
        for node, (name, size, stalls) in enumerate(files, start=ROOT + 1):
            self.nodes[node] = (name, size, stalls)  # "", "stall", "stallwrite", "hold", "eio"
        self.names = {name: node for node, (name, _, _) in self.nodes.items()}
        self.held = []
        self.interruptible = set()  # held reads that a signal ends
        self.interrupted = False  # one was: `hold` files read from now on
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        options = (f"fd={self.fd},rootmode={stat.S_IFDIR | 0o755:o},user_id=0,group_id=0,"
                   "allow_other,default_permissions")
        if libc.mount(b"stallfs", mountpoint.encode(), b"fuse.stallfs",
                      ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                      options.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")

    def attr(self, node):
        if node == ROOT:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            _, size, stalls = self.nodes[node]
            writable = stalls in ("stallwrite", "hold", "slowwrite")
            mode, nlink = stat.S_IFREG | (0o644 if writable else 0o444), 1
        return ATTR.pack(node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0,
                         mode, nlink, 0, 0, 0, BLOCK, 0)

    def reply(self, unique, error=0, payload=b""):
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), -error, unique)
                     + payload)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the request was interrupted meanwhile
                raise

    def holds_flush(self, tid):
        """Whether a FLUSH from thread `tid` is one never to answer: one of
        the process PIDFILE names, or of a process it started."""
        try:
            with open(self.hold_flush_of) as f:
                held = int(f.read())
        except (OSError, TypeError, ValueError):
            return False
        pid = tid
        while pid > 1:
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                return False
            if int(fields["Tgid"]) == held:
                return True
            pid = int(fields["PPid"])
        return False

    def answer(self, opcode, unique, node, body, tid=0):
        if opcode == INIT:
            major, minor, readahead = struct.unpack_from("<III", body)
            # fuse_init_out up to flags2 and max_stack_depth, then unused[6]
            return 0, struct.pack("<IIIIHHIIHHII24x", 7, 31, readahead, 0, 16, 12,
                                  1 << 17, 1, 0, 0, 0, 0)
        if opcode == LOOKUP:
            name = body.split(b"\0", 1)[0].decode()
            if node != ROOT or name not in self.names:
                return errno.ENOENT, b""
            found = self.names[name]
            return 0, struct.pack("<QQQQII", found, 0, 3600, 3600, 0, 0) + self.attr(found)
        if opcode == GETATTR:
            if node != ROOT and node not in self.nodes:
                return errno.ENOENT, b""
            return 0, struct.pack("<QII", 3600, 0, 0) + self.attr(node)
        if opcode in (OPEN, OPENDIR):
            return 0, struct.pack("<QII", 0, 0, 0)
        if opcode == READ:
            offset, size = struct.unpack_from("<QQI", body)[1:]
            name, length, stalls = self.nodes[node]
            if stalls == "stall":
                self.held.append(unique)
                return None
            if stalls == "hold" and not self.interrupted:
                self.interruptible.add(unique)
                return None
            if stalls == "slowwrite":
                return 0, bytes(self.contents(node)[offset:offset + size])
            if stalls == "eio" and self.fail_reads_when and os.path.exists(self.fail_reads_when):
                return errno.EIO, b""
            size = max(0, min(size, length - offset))
            return 0, pattern(offset, size)
        if opcode == WRITE:
            stalls = self.nodes.get(node, ("", 0, ""))[2]
            if stalls == "hold":
                return 0, struct.pack("<II", struct.unpack_from("<QQI", body)[2], 0)
            if stalls == "slowwrite":
                _, offset, size = struct.unpack_from("<QQI", body)
                self.held_writes.append((unique, node, offset, body[40:40 + size]))
                self.write_what_may()
                return None
            if stalls != "stallwrite":
                return errno.EROFS, b""
            self.held.append(unique)
            return None
        if opcode == READDIR:
            return 0, b""
        if opcode == STATFS:
            return 0, struct.pack("<QQQQQIII4x24x", 1 << 20, 0, 0, len(self.nodes), 0,
                                  BLOCK, 255, BLOCK)
        if opcode == FLUSH and self.holds_flush(tid):
            self.held.append(unique)
            return None
        if opcode in (RELEASE, RELEASEDIR, FLUSH, FSYNC, ACCESS, DESTROY):
            return 0, b""
        return errno.ENOSYS, b""

    def serve(self):
        while True:
            try:
                request = os.read(self.fd, (1 << 17) + (1 << 12))
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.ENOENT):
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return
                raise
            _, opcode, unique, node, _, _, tid, _ = IN_HEADER.unpack_from(request)
            self.write_what_may()
            if opcode == INTERRUPT:
                (interrupted,) = struct.unpack_from("<Q", request, IN_HEADER.size)
                if interrupted in self.interruptible:
                    self.interruptible.discard(interrupted)
                    self.interrupted = True
                    self.reply(interrupted, errno.EINTR)
                continue
            if opcode in NO_REPLY:
                continue
            answer = self.answer(opcode, unique, node, request[IN_HEADER.size:], tid)
            if answer is not None:
                self.reply(unique, *answer)
            if opcode == DESTROY:
                return

    def contents(self, node):
        if node not in self.content:
            self.content[node] = bytearray(pattern(0, self.nodes[node][1]))
        return self.content[node]

    def write_what_may(self):
        """Answers the held writes of each file whose hold is gone."""
        held = []
        for unique, node, offset, data in self.held_writes:
            if self.hold_writes_in and os.path.exists(
                    os.path.join(self.hold_writes_in, self.nodes[node][0])):
                held.append((unique, node, offset, data))
                continue
            self.contents(node)[offset:offset + len(data)] = data
            self.reply(unique, 0, struct.pack("<II", len(data), 0))
        self.held_writes = held

    def unmount(self):
        ctypes.CDLL(None, use_errno=True).umount2(self.mountpoint.encode(), MNT_DETACH)


class MountFailed(RuntimeError):
    """The file system could not be mounted here (no FUSE, not root, a
    container without the right)."""


@contextlib.contextmanager
def mounted(mountpoint, *specs):
    """This file system on `mountpoint` (made if missing), served by a
    process of its own for the block; unmounted after it, which fails the
    reads it kept waiting."""
    os.makedirs(mountpoint, exist_ok=True)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), mountpoint, *specs],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"ready":
            proc.wait(10)
            said = proc.stderr.read().decode().strip().splitlines()
            raise MountFailed(said[-1] if said else f"exit status {proc.returncode}")
        yield mountpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        ctypes.CDLL(None, use_errno=True).umount2(mountpoint.encode(), MNT_DETACH)


def main(argv):
    mountpoint, specs = argv[0], argv[1:]
    options = {"--hold-flush-of": None, "--fail-reads-when": None, "--hold-writes-in": None}
    while specs[:1] and specs[0] in options:
        options[specs[0]], specs = specs[1], specs[2:]
    files = []
    for spec in specs:
        name, size, *flags = spec.split(":")
        files.append((name, int(size), flags[0] if flags else ""))
    fs = StallFS(mountpoint, files, options["--hold-flush-of"], options["--fail-reads-when"],
                 options["--hold-writes-in"])

    def stop(signum, frame):
        fs.unmount()
        os._exit(0)  # closing /dev/fuse ends the connection: held reads fail

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    fs.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
