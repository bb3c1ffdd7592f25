"""The wire format between clients and the server (see docs/protocol.md).

Every message is one SOCK_SEQPACKET packet: a 12-byte header, then a payload
of the length the header gives, with descriptors (SCM_RIGHTS) where the
message type says so.  Integers are little-endian.
"""
import enum
import json
import socket
import struct

MAGIC = b"MPUM"
VERSION = 1
HEADER = struct.Struct("<4sHHI")  # magic, version, type, payload length
MAX_PAYLOAD = 160 << 10  # what one packet carries within default socket buffers
MAX_FDS = 4


class Msg(enum.IntEnum):
    HELLO = 1  # c->s  payload: u32 flags [+ session tag]  fds: [userfaultfd]
    WELCOME = 2  # s->c  payload: WELCOME_BODY
    MAP = 3  # c->s  payload: u32 flags         fds: [file, opened for reading]
    MAPPED = 4  # s->c  payload: MAPPED_BODY      fds: [memfd]
    REGISTER = 5  # c->s  payload: REGISTER_BODY
    REGISTERED = 6  # s->c  payload: u64 mapping id
    UNMAP = 7  # c->s  payload: u64 mapping id
    UNMAPPED = 8  # s->c  payload: u64 mapping id
    STATS = 9  # c->s  payload: empty
    STATS_REPLY = 10  # s->c  payload: JSON (UTF-8)
    PREFETCH = 11  # c->s  payload: REGISTER_BODY (mapping id, offset, length)
    PREFETCHING = 12  # s->c  payload: u64 pages asked for
    ERROR = 15  # s->c  payload: i32 errno, then a UTF-8 message


U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
# system page size, umap page size, buffer pages (limit now), fillers,
# evictors, high water %, low water %, adaptive (0/1), max fault events
WELCOME_BODY = struct.Struct("<QQQIIIIII")
# mapping id, region id, file size, length to map
MAPPED_BODY = struct.Struct("<QQQQ")
# mapping id, address, length
REGISTER_BODY = struct.Struct("<QQQ")
ERROR_HEAD = struct.Struct("<i")

# What each message must carry: (payload struct or None for free-form, fds)
SHAPES = {
    Msg.HELLO: (None, 1),
    Msg.WELCOME: (WELCOME_BODY, 0),
    Msg.MAP: (U32, 1),
    Msg.MAPPED: (MAPPED_BODY, 1),
    Msg.REGISTER: (REGISTER_BODY, 0),
    Msg.REGISTERED: (U64, 0),
    Msg.UNMAP: (U64, 0),
    Msg.UNMAPPED: (U64, 0),
    Msg.STATS: (None, 0),
    Msg.STATS_REPLY: (None, 0),
    Msg.PREFETCH: (REGISTER_BODY, 0),
    Msg.PREFETCHING: (U64, 0),
    Msg.ERROR: (None, 0),
}


class ProtocolError(Exception):
    """A message that does not follow the protocol; the text says how."""


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
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_all(fds)
        raise ProtocolError("message too large, or too many descriptors")
    return data, fds


def send(sock, kind, payload=b"", fds=()):
    packet = pack(kind, payload)
    if fds:
        socket.send_fds(sock, [packet], list(fds))
    else:
        sock.send(packet)


def close_all(fds):
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- between the server and its workers ---------------------------------
#
# One SOCK_SEQPACKET socketpair per worker.  The first byte says what follows.

# Clients and regions are named by their slots: small numbers, reused, that
# index the fillers' tables in C.
W_ADD_CLIENT = 2  # ADD_CLIENT_BODY; fds: [userfaultfd]
W_DROP_CLIENT = 3  # W_ID: client slot
W_ADD_REGION = 4  # REGION_BODY; fds: [memfd, store file, page table]
W_DROP_REGION = 5  # W_ID: region slot
# 8 bytes (the kind, then zeros), then struct mpu_fault of
# c/fastpath.h, n times: built by the monitor thread, read by the fillers' C
# loop, never by Python.
W_FAULTS = 6

W_ID = struct.Struct("<BI")
ADD_CLIENT_BODY = struct.Struct("<BII")  # kind, client id, client slot
MAX_SESSION = 64
# kind, region id, region slot, file size, pages, store mode
REGION_BODY = struct.Struct("<BIIQQB")
W_PREFETCH = 7  # PREFETCH_BODY: a client asked
W_READ_AHEAD = 8  # PREFETCH_BODY: the monitor saw a scan
PREFETCH_BODY = struct.Struct("<BIQQ")  # kind, region slot, first page, pages
