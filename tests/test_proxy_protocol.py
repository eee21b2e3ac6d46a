"""The PROXY protocol codec (issue #7), sans I/O: `header_v1`, `header_v2` and `parse` on plain bytes.

Expected headers are built here from the specification (haproxy.org/download/2.9/doc/proxy-protocol.txt),
never with lbproxy's own functions: the v1 line by hand, the v2 block with `struct` and
`socket.inet_pton`. Round trips run under hypothesis over IPv4 and IPv6 addresses and ports.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lbproxy.proxy_protocol import Address, HeaderReader, ProxyHeaderError, header_v1, header_v2
from lbproxy.proxy_protocol import parse as parse_header


def parse(data: bytes) -> tuple[int, Address | None] | None:
    """What most of these tests look at: bytes consumed and the client's address."""
    parsed = parse_header(data)
    return None if parsed is None else parsed[:2]


SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # spec §2.2: the 12-byte v2 signature
PROXY = 0x21  # version 2, command PROXY
LOCAL = 0x20  # version 2, command LOCAL
TCP4 = 0x11  # AF_INET, STREAM
TCP6 = 0x21  # AF_INET6, STREAM

ports = st.integers(min_value=0, max_value=65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)


def v1(family: str, source: str, destination: str, source_port: int, destination_port: int) -> bytes:
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


def v2(
    command: int,
    family: int,
    source: str,
    destination: str,
    source_port: int,
    destination_port: int,
    tlvs: bytes = b"",
) -> bytes:
    af = socket.AF_INET if family == TCP4 else socket.AF_INET6
    addresses = socket.inet_pton(af, source) + socket.inet_pton(af, destination)
    addresses += struct.pack("!HH", source_port, destination_port) + tlvs
    return SIGNATURE + bytes((command, family)) + struct.pack("!H", len(addresses)) + addresses


def same_address(parsed: str, expected: str) -> bool:
    """The same IP; an IPv4-mapped IPv6 address may come back as its IPv4 form, and the other way."""
    a, b = ipaddress.ip_address(parsed), ipaddress.ip_address(expected)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


# -- what lbproxy sends -----------------------------------------------------------------------------


def test_header_v1_for_ipv4() -> None:
    assert header_v1(("192.0.2.1", 56324), ("198.51.100.7", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    )


def test_header_v1_for_ipv6() -> None:
    assert header_v1(("2001:db8::1", 1), ("::1", 65535)) == b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n"


def test_header_v1_without_addresses_is_unknown() -> None:
    assert header_v1(("", 0), ("", 0)) == b"PROXY UNKNOWN\r\n"


def test_header_v2_for_ipv4() -> None:
    expected = (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x11\x00\x0c"
        + bytes((192, 0, 2, 1))
        + bytes((198, 51, 100, 7))
        + (56324).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
    )
    assert header_v2(("192.0.2.1", 56324), ("198.51.100.7", 443)) == expected


def test_header_v2_for_ipv6() -> None:
    expected = (
        b"\r\n\r\n\x00\r\nQUIT\n"
        + b"\x21\x21\x00\x24"
        + bytes.fromhex("20010db8000000000000000000000001")
        + bytes.fromhex("00000000000000000000000000000001")
        + (1).to_bytes(2, "big")
        + (65535).to_bytes(2, "big")
    )
    assert header_v2(("2001:db8::1", 1), ("::1", 65535)) == expected


def test_header_v2_without_addresses_is_unspec() -> None:
    # spec §2.2: PROXY command with AF_UNSPEC and no address block; the receiver ignores addresses
    assert header_v2(("", 0), ("", 0)) == SIGNATURE + b"\x21\x00\x00\x00"


@given(source=ipv4, destination=ipv4, source_port=ports, destination_port=ports)
def test_header_v1_ipv4_is_the_spec_line(
    source: str, destination: str, source_port: int, destination_port: int
) -> None:
    assert header_v1((source, source_port), (destination, destination_port)) == v1(
        "TCP4", source, destination, source_port, destination_port
    )


@given(source=ipv4, destination=ipv4, source_port=ports, destination_port=ports)
def test_header_v2_ipv4_is_the_spec_block(
    source: str, destination: str, source_port: int, destination_port: int
) -> None:
    assert header_v2((source, source_port), (destination, destination_port)) == v2(
        PROXY, TCP4, source, destination, source_port, destination_port
    )


# -- round trips ------------------------------------------------------------------------------------


@given(source=ipv4, destination=ipv4, source_port=ports, destination_port=ports, payload=st.binary(max_size=64))
def test_v1_round_trip_ipv4(
    source: str, destination: str, source_port: int, destination_port: int, payload: bytes
) -> None:
    header = header_v1((source, source_port), (destination, destination_port))
    assert parse(header + payload) == (len(header), (source, source_port))


@given(source=ipv4, destination=ipv4, source_port=ports, destination_port=ports, payload=st.binary(max_size=64))
def test_v2_round_trip_ipv4(
    source: str, destination: str, source_port: int, destination_port: int, payload: bytes
) -> None:
    header = header_v2((source, source_port), (destination, destination_port))
    assert parse(header + payload) == (len(header), (source, source_port))


@given(source=ipv6, destination=ipv6, source_port=ports, destination_port=ports, payload=st.binary(max_size=64))
@example(source="::ffff:192.0.2.1", destination="::ffff:198.51.100.7", source_port=1, destination_port=2, payload=b"")
def test_v1_round_trip_ipv6(
    source: str, destination: str, source_port: int, destination_port: int, payload: bytes
) -> None:
    """Any IPv6 pair, the IPv4-mapped ones included (a dual-stack socket reports IPv4 clients so)."""
    header = header_v1((source, source_port), (destination, destination_port))
    parsed = parse(header + payload)
    assert parsed is not None, header
    consumed, address = parsed
    assert consumed == len(header)
    assert address is not None, header
    assert same_address(address[0], source), header
    assert address[1] == source_port


@given(source=ipv6, destination=ipv6, source_port=ports, destination_port=ports, payload=st.binary(max_size=64))
@example(source="::ffff:192.0.2.1", destination="::ffff:198.51.100.7", source_port=1, destination_port=2, payload=b"")
def test_v2_round_trip_ipv6(
    source: str, destination: str, source_port: int, destination_port: int, payload: bytes
) -> None:
    header = header_v2((source, source_port), (destination, destination_port))
    parsed = parse(header + payload)
    assert parsed is not None, header
    consumed, address = parsed
    assert consumed == len(header)
    assert address is not None, header
    assert same_address(address[0], source), header
    assert address[1] == source_port


@pytest.mark.parametrize("build", [header_v1, header_v2])
@given(source=ipv4, destination=ipv6, source_port=ports, destination_port=ports)
def test_mixed_families_give_a_valid_header(
    build: Callable[[Address, Address], bytes], source: str, destination: str, source_port: int, destination_port: int
) -> None:
    """An IPv4 client and an IPv6 destination: a valid header, either UNKNOWN/UNSPEC or both as IPv6."""
    header = build((source, source_port), (destination, destination_port))
    parsed = parse(header)
    assert parsed is not None
    consumed, address = parsed
    assert consumed == len(header)
    if address is not None:
        assert same_address(address[0], source)
        assert address[1] == source_port
    full = parse_header(header)
    assert full is not None
    if full[2] is not None:
        assert same_address(full[2][0], destination)
        assert full[2][1] == destination_port


# -- what lbproxy accepts ---------------------------------------------------------------------------


def test_parse_v1_returns_what_follows_untouched() -> None:
    data = b"PROXY TCP4 203.0.113.9 198.51.100.1 5555 443\r\nGET / HTTP/1.1\r\n\r\n"
    assert parse(data) == (46, ("203.0.113.9", 5555))
    assert data[46:] == b"GET / HTTP/1.1\r\n\r\n"


def test_parse_v1_ipv6_is_normalised() -> None:
    data = v1("TCP6", "2001:0db8:0000:0000:0000:0000:0000:0009", "::1", 40000, 443)
    assert parse(data) == (len(data), ("2001:db8::9", 40000))


def test_parse_v1_of_the_longest_line() -> None:
    # spec §2.1: 107 bytes is the worst case, CRLF included
    line = v1("TCP6", "ffff:" * 7 + "ffff", "ffff:" * 7 + "ffff", 65535, 65535)
    assert len(line) == 104
    assert parse(line) == (104, ("ffff:" * 7 + "ffff", 65535))


def test_parse_v1_unknown() -> None:
    assert parse(b"PROXY UNKNOWN\r\npayload") == (15, None)


def test_parse_v1_unknown_ignores_the_rest_of_its_line() -> None:
    # spec §2.1: after UNKNOWN the receiver must ignore anything up to the CRLF
    full = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 107  # spec §2.1: the worst case
    assert parse(line + b"data") == (107, None)


def test_parse_v2_local_command_gives_no_address() -> None:
    # spec §2.2: LOCAL is the balancer's own connection (a health check): addresses are skipped
    assert parse(SIGNATURE + b"\x20\x00\x00\x00rest") == (16, None)
    header = v2(LOCAL, TCP4, "192.0.2.1", "192.0.2.2", 1, 2)
    assert parse(header + b"rest") == (len(header), None)


def test_parse_v2_unspec_family_gives_no_address() -> None:
    assert parse(SIGNATURE + b"\x21\x00\x00\x00") == (16, None)


def test_parse_v2_skips_tlvs() -> None:
    tlvs = b"\x04\x00\x03abc" + b"\x02\x00\x05hosts"  # PP2_TYPE_NOOP and PP2_TYPE_AUTHORITY
    header = v2(PROXY, TCP4, "192.0.2.1", "192.0.2.2", 1234, 443, tlvs)
    assert parse(header + b"payload") == (len(header), ("192.0.2.1", 1234))
    header = v2(PROXY, TCP6, "2001:db8::1", "2001:db8::2", 1234, 443, tlvs)
    assert parse(header + b"payload") == (len(header), ("2001:db8::1", 1234))


GOOD = [
    pytest.param(v1("TCP4", "192.0.2.1", "192.0.2.2", 1234, 80), id="v1-tcp4"),
    pytest.param(v1("TCP6", "2001:db8::1", "2001:db8::2", 1234, 80), id="v1-tcp6"),
    pytest.param(b"PROXY UNKNOWN\r\n", id="v1-unknown"),
    pytest.param(v2(PROXY, TCP4, "192.0.2.1", "192.0.2.2", 1234, 80), id="v2-tcp4"),
    pytest.param(v2(PROXY, TCP6, "2001:db8::1", "2001:db8::2", 1234, 80), id="v2-tcp6"),
    pytest.param(v2(PROXY, TCP4, "192.0.2.1", "192.0.2.2", 1, 2, b"\x04\x00\x02xy"), id="v2-tlv"),
    pytest.param(SIGNATURE + b"\x20\x00\x00\x00", id="v2-local"),
]


@pytest.mark.parametrize("header", GOOD)
def test_every_strict_prefix_asks_for_more(header: bytes) -> None:
    assert parse(header) is not None
    for size in range(1, len(header)):
        assert parse(header[:size]) is None, f"{header[:size]!r} should ask for more bytes"


def test_nothing_yet_asks_for_more() -> None:
    # The docstring's contract: None while more bytes are needed; with no byte at all, they are.
    assert parse(b"") is None


MALFORMED = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-request"),
    pytest.param(b"POST / HTTP/1.1\r\n", id="starts-with-P"),
    pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", id="tls-client-hello"),
    pytest.param(b"\r\n\r\n\x00\r\nQUIZ\n\x21\x11\x00\x0c", id="v2-bad-signature"),
    pytest.param(b"\r\nGET / HTTP/1.1\r\n", id="cr-then-garbage"),
    pytest.param(b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", id="v1-lowercase"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", id="v1-lf-only"),
    pytest.param(b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n", id="v1-bad-protocol"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", id="v1-extra-field"),
    pytest.param(b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n", id="v1-double-space"),
    pytest.param(b"PROXY TCP4 192.0.2.300 192.0.2.2 1 2\r\n", id="v1-bad-source"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.256 1 2\r\n", id="v1-bad-destination"),
    pytest.param(b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", id="v1-tcp4-with-ipv6-source"),
    pytest.param(b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", id="v1-tcp6-with-ipv4-source"),
    pytest.param(b"PROXY TCP4 192.0.2.1 2001:db8::2 1 2\r\n", id="v1-tcp4-with-ipv6-destination"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n", id="v1-source-port-too-big"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", id="v1-destination-port-too-big"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n", id="v1-negative-source-port"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 +2\r\n", id="v1-signed-destination-port"),
    pytest.param(b"PROXY TCP4 192.0.2.1 192.0.2.2 x 2\r\n", id="v1-port-not-a-number"),
    pytest.param(b"PROXY TCP4 " + b"1" * 100 + b"\r\n", id="v1-line-too-long-with-crlf"),
    pytest.param(b"PROXY TCP4 " + b"1" * 120, id="v1-line-too-long-without-crlf"),
    pytest.param(b"PROXY\r\n", id="v1-nothing-after-proxy"),
    pytest.param(SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), id="v2-version-1"),
    pytest.param(SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), id="v2-version-3"),
    pytest.param(SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), id="v2-unknown-command"),
    pytest.param(SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), id="v2-unknown-family"),
    pytest.param(SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), id="v2-ipv4-block-too-short"),
    pytest.param(SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), id="v2-ipv6-block-too-short"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed_headers_are_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data + b"\r\nmore bytes after it\r\n")


@given(st.binary(min_size=1, max_size=200))
def test_parse_never_fails_otherwise(data: bytes) -> None:
    """Whatever the bytes: a header, a request for more, or ProxyHeaderError, never another error."""
    try:
        parsed = parse(data)
    except ProxyHeaderError:
        return
    if parsed is not None:
        consumed, address = parsed
        assert 0 < consumed <= len(data)
        if address is not None:
            ipaddress.ip_address(address[0])
            assert 0 <= address[1] <= 65535


def test_the_header_reader_takes_a_header_fed_byte_by_byte_and_keeps_what_follows() -> None:
    """proxy_protocol.HeaderReader, the one reader of both proxies, without a socket."""
    for header in (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 80\r\n",
        header_v2(("192.0.2.1", 5000), ("198.51.100.2", 80)),
    ):
        reader = HeaderReader()
        data = header + b"GET / HTTP/1.1\r\n"
        results = [reader.feed(data[index : index + 1]) for index in range(len(header))]
        assert results[:-1] == [None] * (len(header) - 1)
        assert results[-1] == b""
        assert reader.client == ("192.0.2.1", 5000)
        assert reader.destination == ("198.51.100.2", 80)
        assert HeaderReader().feed(data) == b"GET / HTTP/1.1\r\n"
    with pytest.raises(ProxyHeaderError):
        HeaderReader().feed(b"GET / HTTP/1.1\r\n")
