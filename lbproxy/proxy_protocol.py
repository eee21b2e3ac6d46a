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


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def header_v1(source: Address, destination: Address) -> bytes:
    pair = _pair(source[0], destination[0])
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    a, b = pair
    return b"PROXY %s %s %s %d %d\r\n" % (
        b"TCP4" if a.version == 4 else b"TCP6",
        str(a).encode(),
        str(b).encode(),
        source[1],
        destination[1],
    )


def header_v2(source: Address, destination: Address) -> bytes:
    pair = _pair(source[0], destination[0])
    if pair is None:
        return V2_SIGNATURE + b"\x21\x00\x00\x00"  # PROXY command, UNSPEC family, no address
    a, b = pair
    addresses = a.packed + b.packed + struct.pack("!HH", source[1], destination[1])
    return (
        V2_SIGNATURE + bytes((0x21, 0x11 if a.version == 4 else 0x21)) + struct.pack("!H", len(addresses)) + addresses
    )


def _pair(source: str, destination: str) -> tuple[IP, IP] | None:
    """Both addresses in one family: IPv4-mapped IPv6 (::ffff:a.b.c.d) is written as IPv4, and an
    IPv4 address beside an IPv6 one as IPv4-mapped; None when either is not an IP address."""
    try:
        a = _unmapped(ipaddress.ip_address(source))
        b = _unmapped(ipaddress.ip_address(destination))
    except ValueError:
        return None
    if a.version != b.version:
        a, b = _mapped(a), _mapped(b)
    return a, b


def _unmapped(address: IP) -> IP:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _mapped(address: IP) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{address}")
    return address


Parsed = tuple[int, Address | None, Address | None]


def parse(data: bytes) -> Parsed | None:
    """Read a PROXY header at the start of `data`.

    Returns (bytes consumed, source, destination), the addresses None for UNKNOWN/LOCAL, or None
    when more bytes are needed; raises ProxyHeaderError when `data` does not start with a header.
    """
    if not data:
        return None
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY header")


class HeaderReader:
    """Takes the PROXY header off the first bytes of one accepted connection, read by read.

    Both proxies' client legs use it (`accept_proxy`): `feed` returns what follows the header once
    it is whole, None while it is not, and raises ProxyHeaderError for anything else. `client` and
    `destination` are the header's addresses (None for UNKNOWN/LOCAL).
    """

    __slots__ = ("buffered", "client", "destination")

    def __init__(self) -> None:
        self.buffered = b""
        self.client: Address | None = None
        self.destination: Address | None = None

    def feed(self, data: bytes) -> bytes | None:
        buffered = self.buffered + data if self.buffered else data
        parsed = parse(buffered)
        if parsed is None:
            if len(buffered) > V2_MAX_PAYLOAD + 16:  # belt and braces: parse bounds both versions
                raise ProxyHeaderError("PROXY header too long")
            self.buffered = buffered
            return None
        consumed, self.client, self.destination = parsed
        self.buffered = b""
        return buffered[consumed:]


def _parse_v1(data: bytes) -> Parsed | None:
    if not V1_PREFIX.startswith(data[:6]):
        raise ProxyHeaderError("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data:
            raise ProxyHeaderError("malformed PROXY v1 line")
        return None
    line = data[:end]
    if b"\n" in line or b"\r" in line:
        raise ProxyHeaderError("malformed PROXY v1 line")
    parts = line.split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == b"UNKNOWN":
        return end + 2, None, None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyHeaderError("malformed PROXY v1 line")
    version = 4 if parts[1] == b"TCP4" else 6
    try:
        source = ipaddress.ip_address(parts[2].decode("ascii"))
        destination = ipaddress.ip_address(parts[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("malformed PROXY v1 addresses") from None
    if source.version != version or destination.version != version:
        raise ProxyHeaderError("PROXY v1 addresses do not match their family")
    ports = []
    for part in parts[4:6]:
        if not part.isdigit() or len(part) > 5 or int(part) > 65535 or (len(part) > 1 and part[:1] == b"0"):
            raise ProxyHeaderError("malformed PROXY v1 port")
        ports.append(int(part))
    return end + 2, (str(source), ports[0]), (str(destination), ports[1])


def _parse_v2(data: bytes) -> Parsed | None:
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
        return consumed, None, None
    if family == 0x11 and length >= 12:
        source_port, destination_port = struct.unpack("!HH", payload[8:12])
        source = str(ipaddress.IPv4Address(payload[0:4]))
        return consumed, (source, source_port), (str(ipaddress.IPv4Address(payload[4:8])), destination_port)
    if family == 0x21 and length >= 36:
        source_port, destination_port = struct.unpack("!HH", payload[32:36])
        source = str(ipaddress.IPv6Address(payload[0:16]))
        return consumed, (source, source_port), (str(ipaddress.IPv6Address(payload[16:32])), destination_port)
    if family == 0x00:
        return consumed, None, None
    raise ProxyHeaderError("unsupported PROXY v2 address family")
