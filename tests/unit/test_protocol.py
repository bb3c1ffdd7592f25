"""The wire format: framing checks, oversized packets."""
import errno
import socket

import pytest

from mpumap import protocol
from mpumap.protocol import Msg, ProtocolError


def test_frames_are_checked():
    good = protocol.pack(Msg.UNMAP, protocol.U64.pack(7))
    assert protocol.unpack(good, 0)[2] == (7,)
    cases = {
        b"": "shorter",
        b"XXXX" + good[4:]: "magic",
        good[:4] + b"\x09\x00" + good[6:]: "version",
        good + b"x": "payload bytes",
        protocol.pack(99): "unknown message type",
        protocol.pack(Msg.UNMAP, b"123"): "payload is 3 bytes",
    }
    for packet, message in cases.items():
        with pytest.raises(ProtocolError, match=message):
            protocol.unpack(packet, 0)
    with pytest.raises(ProtocolError, match="descriptors"):
        protocol.unpack(good, 1)
    code, text = protocol.parse_error(protocol.error_payload(errno.EACCES, "no"))
    assert (code, text) == (errno.EACCES, "no")


def test_oversized_packets_are_refused_and_their_fds_closed():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        a.send(b"x" * (protocol.HEADER.size + protocol.MAX_PAYLOAD + 1))
        with pytest.raises(ProtocolError, match="too large"):
            protocol.receive(b)
