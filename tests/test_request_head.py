"""The request reader without a loop or a socket: llhttp's callbacks in, checked heads out.

The real-socket tests (test_http_proxy, test_http_hardening, test_connection_tokens) prove the same
behaviour end to end; these pin the rebuilt head byte for byte, and the refusals, at the source.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httptools
import pytest

from lbproxy.config import Address, PoolConfig, ServerConfig
from lbproxy.framing import BadRequest
from lbproxy.http_proxy import HttpListener
from lbproxy.pool import Pool
from lbproxy.request_head import RequestHead, RequestReader


def listener() -> HttpListener:
    """The reader's settings, from a real listener (the reader's `Settings` is a compiled trait, which
    only lbproxy's own classes implement): forwarded fields on, small head limits, no routes or
    persistence, and a pool whose first server (the Host of a request without one) is 10.0.0.1:80."""
    pool = Pool(PoolConfig("farm", (ServerConfig("a", Address("10.0.0.1", 80)),)))
    loop = asyncio.new_event_loop()  # kept by the listener, never run: the reader does no I/O
    try:
        return HttpListener("web", pool, loop=loop, max_header_size=8192, max_header_count=10, max_target=1024)
    finally:
        loop.close()


@dataclass
class Owner:
    heads: list[RequestHead] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    complete: int = 0
    reader: RequestReader[RequestHead] | None = None

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1
        if self.reader is not None and self.reader.in_body:
            self.reader.body_ended()

    def on_chunk_header(self) -> None:
        pass


def read(data: bytes, settings: HttpListener | None = None, upgrading: bool = False) -> Owner:
    """Feed `data` to a reader from a client at 192.0.2.7; fails the test on any parser error.

    `upgrading`: llhttp stops after the head of a request that asks to upgrade, as it must.
    """
    owner = Owner()
    reader = RequestReader(
        settings or listener(),
        RequestHead,
        owner.heads.append,
        owner.on_body,
        owner.on_message_complete,
        owner.on_chunk_header,
    )
    owner.reader = reader
    parser = reader.parser
    reader.client_is(b"192.0.2.7")
    if upgrading:
        with pytest.raises(httptools.HttpParserUpgrade):
            parser.feed_data(data)
    else:
        parser.feed_data(data)
    return owner


def refusal(data: bytes, settings: HttpListener | None = None) -> BadRequest:
    with pytest.raises(httptools.HttpParserCallbackError) as raised:
        read(data, settings)
    cause = raised.value.__context__
    assert isinstance(cause, BadRequest), raised.value
    return cause


def test_the_head_is_rebuilt_byte_for_byte_with_the_forwarded_fields() -> None:
    owner = read(
        b"GET /a%2Fb?x=1 HTTP/1.1\r\nHost: App.Example:8080\r\nAccept: */*\r\nKeep-Alive: 5\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: gopher\r\nX-Custom:  spaced \r\n\r\n"
    )
    (head,) = owner.heads
    assert head.forward == (
        b"GET /a%2Fb?x=1 HTTP/1.1\r\nHost: App.Example:8080\r\nAccept: */*\r\nX-Custom: spaced\r\n"
        b"X-Forwarded-For: 198.51.100.1, 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: App.Example:8080\r\n\r\n"
    )
    assert (head.method, head.target, head.client_11, head.keep_alive, head.has_body) == (
        b"GET",
        b"/a%2Fb?x=1",
        True,
        True,
        False,
    )


def test_connection_removes_what_it_may_name_and_never_the_end_to_end_fields() -> None:
    owner = read(
        b"POST /p HTTP/1.1\r\nHost: h\r\nConnection: X-Secret, Content-Length, Host\r\nX-Secret: s\r\n"
        b"Content-Length: 3\r\n\r\nabc"
    )
    (head,) = owner.heads
    assert b"X-Secret" not in head.forward
    assert b"\r\nHost: h\r\n" in head.forward
    assert b"\r\nContent-Length: 3\r\n" in head.forward
    assert bytes(owner.body) == b"abc"


def test_an_http10_request_without_host_gets_the_default_and_closes() -> None:
    (head,) = read(b"GET / HTTP/1.0\r\n\r\n").heads
    assert b"\r\nHost: 10.0.0.1:80\r\n" in head.forward
    assert not head.keep_alive
    assert not head.client_11


def test_client_negotiate_credentials_pin_the_connection() -> None:
    (head,) = read(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Negotiate YII=\r\n\r\n").heads
    assert head.pin
    (plain,) = read(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer x\r\n\r\n").heads
    assert not plain.pin


@pytest.mark.parametrize(
    "framing", [b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
)
def test_an_upgrade_request_with_a_body_is_refused(framing: bytes) -> None:
    cause = refusal(b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + framing)
    assert cause.status == 400


def test_an_upgrade_without_a_body_goes_on_and_h2c_is_stripped() -> None:
    websocket = b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    (head,) = read(websocket, upgrading=True).heads
    assert head.upgrade
    assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n" in head.forward
    h2c = b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n"
    (stripped,) = read(h2c, upgrading=True).heads
    assert not stripped.upgrade
    assert b"pgrade" not in stripped.forward


def test_trailer_fields_count_against_the_head_limit() -> None:
    head = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
    few = read(head + b"X-T1: v\r\nX-T2: v\r\n\r\n")
    assert few.complete == 1
    assert bytes(few.body) == b"a"
    assert refusal(head + b"".join(b"X-T%d: v\r\n" % n for n in range(20)) + b"\r\n").status == 431


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET http://other/ HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 405),
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % n for n in range(20)) + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    ],
)
def test_refusals(data: bytes, status: int) -> None:
    assert refusal(data).status == status
