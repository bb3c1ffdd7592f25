"""The wire format between clients and the server (docs/protocol.md), and
between the server and its workers.

Every number and layout here comes from c/mpu_wire.h through the compiled
C core: message types are its MPU_MSG_* and MPU_W_* constants, and the
struct formats are built from its structs, field by field, so that Python
and C cannot disagree.

Every client message is one SOCK_SEQPACKET packet: a 12-byte header, then a
payload of the length the header gives, with descriptors (SCM_RIGHTS) where
the message type says so.  Integers are little-endian.
"""
import enum
import json
import os
import socket
import struct

from mpumap._core import ffi, lib

DEFAULT_SOCKET = ffi.string(lib.MPU_DEFAULT_SOCKET).decode()
MAGIC = b"MPUM"
VERSION = lib.MPU_PROTOCOL_VERSION
HEADER = struct.Struct("<4sHHI")  # magic, version, type, payload length
MAX_PAYLOAD = lib.MPU_MAX_PAYLOAD
MAX_FDS = lib.MPU_MAX_FDS
MAX_SESSION = lib.MPU_MAX_SESSION
MAX_URL = lib.MPU_MAX_URL

_CODES = {"uint8_t": "B", "uint16_t": "H", "uint32_t": "I", "uint64_t": "Q",
          "int32_t": "i", "int64_t": "q"}


def socket_path(explicit=None):
    """The server's socket: explicit, else $MPUMAP_SOCKET, else the default."""
    return explicit or os.environ.get("MPUMAP_SOCKET") or DEFAULT_SOCKET


class Layout:
    """A struct of c/mpu_wire.h as a struct.Struct (pack, unpack, size),
    with its field names."""

    def __init__(self, ctype, order):
        fields, fmt, end = [], order, 0
        for name, field in ffi.typeof(ctype).fields:
            if field.offset != end:
                fmt += f"{field.offset - end}x"
            fmt += _CODES[field.type.cname]
            end = field.offset + ffi.sizeof(field.type)
            fields.append(name)
        if ffi.sizeof(ctype) > end:
            fmt += f"{ffi.sizeof(ctype) - end}x"
        self.struct = struct.Struct(fmt)
        self.ctype = ctype
        self.fields = tuple(fields)
        self.size = self.struct.size
        self.pack = self.struct.pack
        self.unpack = self.struct.unpack
        self.unpack_from = self.struct.unpack_from
        if self.size != ffi.sizeof(ctype):
            raise ImportError(f"{ctype} is {ffi.sizeof(ctype)} bytes in C, {self.size} here")


U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ERROR_HEAD = struct.Struct("<i")
WELCOME = Layout("struct mpu_welcome", "<")
MAPPED = Layout("struct mpu_mapped", "<")
SPAN = Layout("struct mpu_span", "<")  # REGISTER and PREFETCH
ADVICE = Layout("struct mpu_advice", "<")


class Msg(enum.IntEnum):
    """Client protocol message types (MPU_MSG_* of c/mpu_wire.h)."""

    HELLO = lib.MPU_MSG_HELLO
    WELCOME = lib.MPU_MSG_WELCOME
    MAP = lib.MPU_MSG_MAP
    MAPPED = lib.MPU_MSG_MAPPED
    REGISTER = lib.MPU_MSG_REGISTER
    REGISTERED = lib.MPU_MSG_REGISTERED
    UNMAP = lib.MPU_MSG_UNMAP
    UNMAPPED = lib.MPU_MSG_UNMAPPED
    STATS = lib.MPU_MSG_STATS
    STATS_REPLY = lib.MPU_MSG_STATS_REPLY
    PREFETCH = lib.MPU_MSG_PREFETCH
    PREFETCHING = lib.MPU_MSG_PREFETCHING
    ADVISE = lib.MPU_MSG_ADVISE
    ADVISED = lib.MPU_MSG_ADVISED
    ERROR = lib.MPU_MSG_ERROR
    MAP_URL = lib.MPU_MSG_MAP_URL
    FLUSH = lib.MPU_MSG_FLUSH
    FLUSHED = lib.MPU_MSG_FLUSHED


class Advice(enum.IntEnum):
    """ADVISE's words: madvise's, with madvise's numbers (mmap.MADV_*)."""

    NORMAL = lib.MPU_ADVICE_NORMAL
    RANDOM = lib.MPU_ADVICE_RANDOM
    SEQUENTIAL = lib.MPU_ADVICE_SEQUENTIAL
    WILLNEED = lib.MPU_ADVICE_WILLNEED


# What each message must carry: (payload struct or None for free-form, fds)
SHAPES = {
    Msg.HELLO: (None, 1),
    Msg.WELCOME: (WELCOME, 1),
    Msg.MAP: (U32, 1),
    Msg.MAPPED: (MAPPED, 1),
    Msg.REGISTER: (SPAN, 0),
    Msg.REGISTERED: (U64, 0),
    Msg.UNMAP: (U64, 0),
    Msg.UNMAPPED: (U64, 0),
    Msg.STATS: (None, 0),
    Msg.STATS_REPLY: (None, 0),
    Msg.PREFETCH: (SPAN, 0),
    Msg.PREFETCHING: (U64, 0),
    Msg.ADVISE: (ADVICE, 0),
    Msg.ADVISED: (U64, 0),
    Msg.ERROR: (None, 0),
    Msg.MAP_URL: (None, 0),
    Msg.FLUSH: (SPAN, 0),
    Msg.FLUSHED: (U64, 0),
}


class ProtocolError(Exception):
    """A message that does not follow the protocol; the text says how."""


class DescriptorsLost(ProtocolError):
    """A whole message whose descriptors found no room here (RLIMIT_NOFILE):
    `data` is the message, so that what it gave can be given back."""

    def __init__(self, data):
        super().__init__("no descriptor free for what the message carries")
        self.data = data


def pack(kind, payload=b""):
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


def unpack(packet, nfds):
    """Check a packet and return (Msg, payload, values or None)."""
    if len(packet) < HEADER.size:
        raise ProtocolError(f"message of {len(packet)} bytes is shorter than a header")
    magic, version, kind, length = HEADER.unpack_from(packet)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not an mpumap message")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not spoken here (only {VERSION})")
    if length != len(packet) - HEADER.size:
        raise ProtocolError(
            f"header says {length} payload bytes, the packet has {len(packet) - HEADER.size}"
        )
    try:
        kind = Msg(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    body, want_fds = SHAPES[kind]
    if nfds != want_fds:
        raise ProtocolError(f"{kind.name} carries {want_fds} descriptors, not {nfds}")
    payload = packet[HEADER.size:]
    if body is None:
        return kind, payload, None
    if len(payload) != body.size:
        raise ProtocolError(f"{kind.name} payload is {len(payload)} bytes, not {body.size}")
    return kind, payload, body.unpack(payload)


def error_payload(code, message):
    return ERROR_HEAD.pack(code) + message.encode("utf-8", "replace")[:4000]


def parse_error(payload):
    if len(payload) < ERROR_HEAD.size:
        return 0, "malformed error reply"
    (code,) = ERROR_HEAD.unpack_from(payload)
    return code, payload[ERROR_HEAD.size:].decode("utf-8", "replace")


def stats_payload(stats):
    return json.dumps(stats, separators=(",", ":")).encode()


def receive(sock):
    """One packet and its descriptors; b'' at end of stream.

    Raises ProtocolError (after closing any descriptors) for a packet larger
    than the protocol allows or descriptors cut short."""
    data, ancdata, flags, _ = sock.recvmsg(
        HEADER.size + MAX_PAYLOAD,
        socket.CMSG_SPACE(MAX_FDS * 4),
        socket.MSG_CMSG_CLOEXEC,
    )
    fds = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
    if flags & socket.MSG_TRUNC:
        close_all(fds)
        raise ProtocolError("message too large")
    if flags & socket.MSG_CTRUNC:
        close_all(fds)
        raise DescriptorsLost(data)
    return data, fds


def send(sock, kind, payload=b"", fds=()):
    packet = pack(kind, payload)
    if fds:
        socket.send_fds(sock, [packet], list(fds))
    else:
        sock.send(packet)


def close_all(fds):
    """Close descriptors that came with a message (a client's may be of a
    file whose file system hangs: those are closed aside)."""
    from mpumap.stores.files import close_any

    for fd in fds:
        close_any(fd)


# ---- between the server and its workers ---------------------------------
#
# One SOCK_SEQPACKET socketpair per worker; each message starts with a u32
# kind.  These never leave the machine: native byte order.


class W(enum.IntEnum):
    """Worker message kinds (MPU_W_* of c/mpu_wire.h)."""

    ADD_CLIENT = lib.MPU_W_ADD_CLIENT  # W_CLIENT; fds: [userfaultfd]
    DROP_CLIENT = lib.MPU_W_DROP_CLIENT  # W_CLIENT
    ADD_REGION = lib.MPU_W_ADD_REGION  # W_REGION; fds: [memfd, store], or [memfd] + JSON
    DROP_REGION = lib.MPU_W_DROP_REGION  # W_REGION
    FAULTS = lib.MPU_W_FAULTS  # from the monitor thread to the fillers' C loop only
    PREFETCH = lib.MPU_W_PREFETCH  # W_FILL: a client asked
    READ_AHEAD = lib.MPU_W_READ_AHEAD  # W_FILL: the monitor saw a scan
    READ_AROUND = lib.MPU_W_READ_AROUND  # W_FILL: a fault, and the buffer had room
    READ_BEHIND = lib.MPU_W_READ_BEHIND  # W_FILL: the monitor saw a backward scan
    WRITE_FD = lib.MPU_W_WRITE_FD  # W_REGION; fds: [the file, opened for writing]
    FLUSH = lib.MPU_W_FLUSH  # W_FLUSH, to one evictor
    FLUSHED = lib.MPU_W_FLUSHED  # W_FLUSH, from that evictor: done


W_CLIENT = Layout("struct mpu_w_client", "=")
W_REGION = Layout("struct mpu_w_region", "=")
W_FILL = Layout("struct mpu_w_fill", "=")
W_FLUSH = Layout("struct mpu_w_flush", "=")
W_KIND = struct.Struct("=I")


def worker_kind(data):
    """The kind of a message to a worker (an int; W when it is known)."""
    (kind,) = W_KIND.unpack_from(data)
    try:
        return W(kind)
    except ValueError:
        return kind
