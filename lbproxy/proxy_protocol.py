"""The PROXY protocol (HAProxy's, versions 1 and 2): the client's address ahead of a connection's bytes.

`header_v1` and `header_v2` build what lbproxy sends to a server (`send_proxy` on a pool); `parse`
reads what a load balancer in front of lbproxy sends (`accept_proxy` on a listener). Plain functions
on bytes: no I/O. Reference: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included (spec §2.1)
V2_MAX_PAYLOAD: Final = 2048  # what we accept of a v2 header's addresses and TLVs

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """A missing or malformed PROXY header: the connection is closed."""


def header_v1(source: Address, destination: Address) -> bytes:
    family = _family(source[0], destination[0])
    if family is None:
        return b"PROXY UNKNOWN\r\n"
    return b"PROXY %s %s %s %d %d\r\n" % (
        b"TCP4" if family == 4 else b"TCP6",
        source[0].encode(),
        destination[0].encode(),
        source[1],
        destination[1],
    )


def header_v2(source: Address, destination: Address) -> bytes:
    family = _family(source[0], destination[0])
    if family is None:
        return V2_SIGNATURE + b"\x21\x00\x00\x00"  # PROXY command, UNSPEC family, no address
    packed_source = ipaddress.ip_address(source[0]).packed
    packed_destination = ipaddress.ip_address(destination[0]).packed
    addresses = packed_source + packed_destination + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes((0x21, 0x11 if family == 4 else 0x21)) + struct.pack("!H", len(addresses)) + addresses


def _family(source: str, destination: str) -> int | None:
    try:
        a = ipaddress.ip_address(source)
        b = ipaddress.ip_address(destination)
    except ValueError:
        return None
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a.version if a.version == b.version else None


def parse(data: bytes) -> tuple[int, Address | None] | None:
    """Read a PROXY header at the start of `data`.

    Returns (bytes consumed, the client's address or None for UNKNOWN/LOCAL), or None when more bytes
    are needed; raises ProxyHeaderError when `data` does not start with a valid header.
    """
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header")


def _parse_v1(data: bytes) -> tuple[int, Address | None] | None:
    if not V1_PREFIX.startswith(data[:6]):
        raise ProxyHeaderError("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 line too long")
        return None
    parts = data[:end].split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == b"UNKNOWN":
        return end + 2, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        port = int(parts[4])
        int(parts[5])
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed PROXY v1 addresses") from None
    if (source.version == 4) != (parts[1] == b"TCP4") or not 0 <= port <= 65535 or not parts[4].isdigit():
        raise ProxyHeaderError("malformed PROXY v1 addresses")
    return end + 2, (str(source), port)


def _parse_v2(data: bytes) -> tuple[int, Address | None] | None:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyHeaderError("no PROXY header")
    if len(data) < 16:
        return None
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError("PROXY v2 header too long")
    if len(data) < 16 + length:
        return None
    payload = data[16 : 16 + length]
    consumed = 16 + length
    if version_command & 0x0F == 0:  # LOCAL: a health check from the balancer itself
        return consumed, None
    if family == 0x11 and length >= 12:
        return consumed, (str(ipaddress.IPv4Address(payload[0:4])), struct.unpack("!H", payload[8:10])[0])
    if family == 0x21 and length >= 36:
        return consumed, (str(ipaddress.IPv6Address(payload[0:16])), struct.unpack("!H", payload[32:34])[0])
    if family == 0x00:
        return consumed, None
    raise ProxyHeaderError("unsupported PROXY v2 address family")
