"""The L7 proxy seen from real sockets: what reaches the servers, what reaches the clients.

Every test starts lbproxy on 127.0.0.1 port 0 in front of recording back-ends (tests.support.Backend)
or of small raw servers written here for what a recording back-end cannot do (answer 100 Continue
before the body, switch protocols and echo). Clients are raw byte clients, so that every framing
detail is visible. Nothing sleeps for a fixed time: waits are on responses, closes or `eventually`.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httptools
import pytest

from lbproxy.pool import AdminState
from lbproxy.runtime import Runtime
from tests.support import LOCALHOST, Backend, Client, Request, Responder, Response, eventually, get, port_of, running

# -- helpers --------------------------------------------------------------------------------------


class Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...


class Dead:
    """A server address where nothing listens: connections to it are refused."""

    def __init__(self, name: str = "dead") -> None:
        self.name = name
        with socket.socket() as sock:
            sock.bind((LOCALHOST, 0))
            port = sock.getsockname()[1]
        self.address = f"{LOCALHOST}:{port}"


def farm(*servers: Named, listener: str = "", pool: str = "") -> str:
    """A config text: listener `web` in front of pool `farm` with `servers`, plus extra YAML lines."""
    lines = ["listeners:", "  - name: web", "    bind: 127.0.0.1:0", "    pool: farm"]
    lines += ["    " + line for line in listener.strip().splitlines()]
    lines += ["pools:", "  farm:"]
    lines += ["    " + line for line in pool.strip().splitlines()]
    lines.append("    servers:")
    for server in servers:
        lines += [f"      - name: {server.name}", f'        address: "{server.address}"']
    # tests.support.running() calls str.format on the text: braces of YAML flow style are escaped
    return "\n".join(lines).replace("{", "{{").replace("}", "}}") + "\n"


def answer(status: bytes = b"200 OK", body: bytes = b"", headers: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, headers, len(body), body)


def echo_target(name: str) -> Responder:
    """200 whose body names the back-end and the request-target: `a /1`."""

    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(answer(body=name.encode() + b" " + request.target))

    return respond


def head_lines(raw: bytes) -> list[bytes]:
    """The request line and the header lines of a raw message head."""
    head, separator, _ = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete head in {raw!r}"
    return head.split(b"\r\n")


def without_forwarded(lines: list[bytes]) -> list[bytes]:
    return [line for line in lines if not line.lower().startswith(b"x-forwarded-")]


def names_in(request: Request) -> set[bytes]:
    return {name.lower() for name, _ in request.headers}


async def read_head(client: Client, timeout: float = 5.0) -> bytes:
    """A response head read raw, without the parser (which cannot know a response is to HEAD)."""
    async with asyncio.timeout(timeout):
        return await client.reader.readuntil(b"\r\n\r\n")


def dechunk(data: bytes) -> bytes:
    """The payload of a complete chunked body; fails on bad framing."""
    out = bytearray()
    rest = data
    for _ in range(100_000):
        size_line, separator, rest = rest.partition(b"\r\n")
        assert separator, f"truncated chunk size line in {data[:200]!r}"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert rest.startswith(b"\r\n"), f"no final CRLF after the last chunk: {rest[:50]!r}"
            return bytes(out)
        out += rest[:size]
        assert rest[size : size + 2] == b"\r\n", "chunk data not followed by CRLF"
        rest = rest[size + 2 :]
    raise AssertionError("too many chunks")


def body_of(received: bytes) -> tuple[bytes, bytes]:
    """(head, payload) of one close-delimited or chunked response received whole."""
    head, separator, rest = received.partition(b"\r\n\r\n")
    assert separator, f"no response head in {received[:200]!r}"
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        return head, dechunk(rest)
    return head, rest


class RawServer:
    """A server on 127.0.0.1 whose connections are `factory(self)` protocols; counts accepts."""

    def __init__(self, name: str, factory: Callable[[RawServer], asyncio.Protocol]) -> None:
        self.name = name
        self.factory = factory
        self.port = 0
        self.accepted = 0
        self.raw: list[bytearray] = []
        self.transports: list[asyncio.Transport] = []
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    async def __aenter__(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: self.factory(self), LOCALHOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for transport in self.transports:
            transport.abort()
        await self._server.wait_closed()


class RawConnection(asyncio.Protocol):
    """Records every byte of one accepted connection; subclasses answer in `received`."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.index = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.index = self.server.accepted
        self.server.accepted += 1
        self.server.raw.append(bytearray())
        self.server.transports.append(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.server.raw[self.index] += data
        self.received(data)

    def received(self, data: bytes) -> None:
        raise NotImplementedError


class ContinueConnection(RawConnection):
    """An HTTP/1.1 server that answers `100 Continue` as soon as it sees `Expect: 100-continue`."""

    def __init__(self, server: RawServer) -> None:
        super().__init__(server)
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()

    def received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.transport is not None
        if any(name.lower() == b"expect" and value.lower() == b"100-continue" for name, value in self.headers):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        assert self.transport is not None
        method = self.parser.get_method()
        self.server.requests.append(Request(b"", method, self.url, self.headers, bytes(self.body), self.index))
        self.transport.write(answer(body=b"got %d" % len(self.body)))


class UpgradeEchoConnection(RawConnection):
    """Answers an `Upgrade: websocket` request with 101, then echoes every byte; other requests get 200."""

    def __init__(self, server: RawServer) -> None:
        super().__init__(server)
        self.buffer = bytearray()
        self.upgraded = False

    def received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.upgraded:
            self.transport.write(data)
            return
        self.buffer += data
        head, separator, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        if not separator:
            return
        self.buffer.clear()
        lines = head.split(b"\r\n")
        headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
        method, target, _ = lines[0].split(b" ")
        self.server.requests.append(
            Request(head + b"\r\n\r\n", method, target, headers, b"", self.index)  # type: ignore[arg-type]
        )
        if any(name.lower() == b"upgrade" and value.lower() == b"websocket" for name, value in headers):
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
            )
            self.upgraded = True
            if rest:
                self.transport.write(rest)
        else:
            self.transport.write(answer(body=b"plain"))


# -- 1. what reaches the server -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        b"/a%2Fb",
        b"/a/../b/./c",
        b"//double//slash//",
        b"/%2e%2E/%2f%2F?%2F=%2f",
        b"/p?q=|{}^`\"<>&x=a+b;c,d!$'()*:@/?%00%ff%zz",
        b"/?",
        b"/path;matrix=1?a=1&a=2&&=",
        b"/%E2%82%AC?%E2%82%AC=%e2%82%ac",
        b"*",
    ],
)
async def test_request_line_reaches_the_server_byte_for_byte(tmp_path: Path, target: bytes) -> None:
    method = b"OPTIONS" if target == b"*" else b"GET"
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"%s %s HTTP/1.1\r\nHost: example.com\r\n\r\n" % (method, target))
            response = await client.response()
        assert response.status == 200
        (request,) = a.requests
        assert head_lines(request.raw)[0] == b"%s %s HTTP/1.1" % (method, target)


@pytest.mark.parametrize(
    "host", [b"ExAmPle.COM", b"ExAmPle.COM:8080", b"example.com:1", b"127.0.0.1:443", b"[::1]:8443", b"a-b.c_d"]
)
async def test_host_header_reaches_the_server_byte_for_byte(tmp_path: Path, host: bytes) -> None:
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        response = await get(port_of(lb), b"/x", host=host)
        assert response.status == 200
        (request,) = a.requests
        assert request.header_lines(b"host") == [host]
        assert head_lines(request.raw)[1] == b"Host: " + host  # still the first header, as sent


async def test_header_names_keep_their_case_and_order(tmp_path: Path) -> None:
    sent = [
        b"GET /order HTTP/1.1",
        b"host: lower.example",
        b"x-lower: 1",
        b"X-UPPER: 2",
        b"MiXeD-CaSe: 3",
        b"Accept: */*",
        b"x-repeated: first",
        b"Cookie: a=1; b=2",
        b"X-Repeated: second",
        b'X-Odd: a,b;c="d e"\tf',
        b"X-Latin: caf\xe9",
        b"User-Agent: test/1.0",
    ]
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"\r\n".join(sent) + b"\r\n\r\n")
            assert (await client.response()).status == 200
        (request,) = a.requests
        assert without_forwarded(head_lines(request.raw)) == sent


@pytest.mark.parametrize(
    ("connection", "keeps_open"),
    [(b"Connection: keep-alive, X-Secret", True), (b"Connection: close, X-Secret", False)],
)
async def test_hop_by_hop_headers_are_removed(tmp_path: Path, connection: bytes, keeps_open: bool) -> None:
    sent = [
        b"GET /hop HTTP/1.1",
        b"Host: h",
        b"X-Before: 1",
        connection,
        b"Keep-Alive: timeout=5, max=100",
        b"Proxy-Connection: keep-alive",
        b"TE: trailers",
        b"Trailer: X-Checksum",
        b"Upgrade: websocket",  # not an upgrade: Connection does not name it
        b"x-secret: named by Connection, in another case",
        b"Connection: X-Other-Secret",  # a second Connection line names one more
        b"X-Other-Secret: also hop-by-hop",
        b"X-After: 2",
    ]
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"\r\n".join(sent) + b"\r\n\r\n")
            response = await client.response()
            assert response.status == 200
            if keeps_open:
                await client.send(b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n")
                assert (await client.response()).status == 200
            else:
                assert await client.closed() == b""
        request = a.requests[0]
        assert without_forwarded(head_lines(request.raw)) == [
            b"GET /hop HTTP/1.1",
            b"Host: h",
            b"X-Before: 1",
            b"X-After: 2",
        ]
        assert not names_in(request) & {
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"upgrade",
            b"x-secret",
            b"x-other-secret",
        }


async def test_forwarded_headers_are_appended_and_set(tmp_path: Path) -> None:
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /1 HTTP/1.1\r\nHost: ExAmPle.COM:8080\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
            assert (await client.response()).status == 200
            await client.send(
                b"GET /2 HTTP/1.1\r\nHost: site.example\r\n"
                b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 5.6.7.8, 9.9.9.9\r\n"
                b"X-Forwarded-Host: evil.example\r\n\r\n"
            )
            assert (await client.response()).status == 200
            await client.send(b"GET /3 HTTP/1.1\r\nHost: plain.example\r\n\r\n")
            assert (await client.response()).status == 200
        first, second, third = a.requests
        assert first.header_lines(b"x-forwarded-for") == [b"1.2.3.4, 127.0.0.1"]
        assert first.header_lines(b"x-forwarded-proto") == [b"http"]
        assert first.header_lines(b"x-forwarded-host") == [b"ExAmPle.COM:8080"]
        assert second.header_lines(b"x-forwarded-for") == [b"1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1"]
        assert second.header_lines(b"x-forwarded-proto") == [b"http"]
        assert second.header_lines(b"x-forwarded-host") == [b"site.example"]
        assert third.header_lines(b"x-forwarded-for") == [b"127.0.0.1"]
        assert third.header_lines(b"x-forwarded-proto") == [b"http"]
        assert third.header_lines(b"x-forwarded-host") == [b"plain.example"]
        for request in (first, second, third):
            assert without_forwarded(head_lines(request.raw))[1].startswith(b"Host: ")


async def test_forwarded_headers_off_passes_the_request_untouched(tmp_path: Path) -> None:
    sent = (
        b"GET /untouched?x=1 HTTP/1.1\r\nHost: Site.Example:81\r\nX-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: https\r\nx-forwarded-for: 5.6.7.8\r\nX-Forwarded-Host: other.example\r\n\r\n"
    )
    async with Backend("a") as a, running(farm(a, listener="forwarded_headers: false"), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(sent)
            assert (await client.response()).status == 200
            await client.send(b"GET /bare HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).status == 200
        first, second = a.requests
        assert first.raw == sent
        assert second.raw == b"GET /bare HTTP/1.1\r\nHost: h\r\n\r\n"


# -- 2, 3, 4. balancing per request, upstream reuse, the stale-upstream race -----------------------


async def test_one_keepalive_client_is_balanced_per_request(tmp_path: Path) -> None:
    backends = [Backend(name) for name in "abcd"]
    for backend in backends:
        await backend.start()
    try:
        async with running(farm(*backends, pool="policy: round_robin"), tmp_path) as lb:
            bodies: collections.Counter[bytes] = collections.Counter()
            async with await Client.connect(port_of(lb)) as client:
                for index in range(40):
                    await client.send(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % index)
                    response = await client.response()
                    assert response.status == 200
                    bodies[response.body] += 1
            assert bodies == {b"a": 10, b"b": 10, b"c": 10, b"d": 10}
            assert [len(backend.requests) for backend in backends] == [10, 10, 10, 10]
    finally:
        for backend in backends:
            await backend.stop()


async def test_upstream_connections_are_reused(tmp_path: Path) -> None:
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            for index in range(50):
                await client.send(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % index)
                assert (await client.response()).status == 200
        assert len(a.requests) == 50
        assert a.accepted == 1
        # and across client connections too: the idle upstream is shared by the listener
        for index in range(10):
            assert (await get(port_of(lb), b"/again/%d" % index)).status == 200
        assert len(a.requests) == 60
        assert a.accepted == 1


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_server_closing_kept_alive_connections_is_never_seen_by_the_client(tmp_path: Path, method: bytes) -> None:
    """Each connection answers one request (no `Connection: close`) and is closed a little later.

    A request that arrives on a connection after its one answer is dropped unanswered (closed or
    reset), as by a server whose idle timer fired as the request was crossing the wire.
    """
    loop = asyncio.get_running_loop()
    delays = (0.001, 0.002, 0.005, 0.0, 0.01, 0.02, 0.05, 0.003)
    answered: set[int] = set()
    timers: list[asyncio.TimerHandle] = []

    def one_per_connection(request: Request, transport: asyncio.Transport) -> None:
        if request.connection in answered:
            if request.connection % 2:
                transport.abort()
            else:
                transport.close()
            return
        answered.add(request.connection)
        transport.write(answer(body=b"fine " + request.body))
        timers.append(loop.call_later(delays[request.connection % len(delays)], transport.close))

    statuses: collections.Counter[int] = collections.Counter()
    try:
        async with Backend("a", one_per_connection) as a, running(farm(a), tmp_path) as lb:
            async with await Client.connect(port_of(lb)) as client:
                for index in range(200):
                    body = b"%d" % index if method == b"POST" else b""
                    await client.send(
                        b"%s /%d HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%s" % (method, index, len(body), body)
                    )
                    response = await client.response()
                    statuses[response.status] += 1
                    assert response.body == b"fine " + body, f"request {index}"
            assert statuses == {200: 200}
            assert lb.listeners["web"].errors == {}
            assert len(answered) == 200
            if method == b"GET":
                assert len(a.requests) > 200, "no request met a closing connection: the race was not exercised"
            else:
                # A non-idempotent request never goes on a reused connection: it cannot meet the race,
                # and no POST reaches the server twice (issue #14).
                assert len(a.requests) == 200
                assert len({request.connection for request in a.requests}) == 200
    finally:
        for timer in timers:
            timer.cancel()


# -- 5, 6, 7. pipelining, 100-continue, bodiless responses ----------------------------------------


async def test_pipelined_requests_are_answered_in_order_and_balanced(tmp_path: Path) -> None:
    async with (
        Backend("a", echo_target("a")) as a,
        Backend("b", echo_target("b")) as b,
        Backend("c", echo_target("c")) as c,
        running(farm(a, b, c), tmp_path) as lb,
    ):
        async with await Client.connect(port_of(lb)) as client:
            await client.send(
                b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
                b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"
            )
            responses = await client.responses(3)
            assert [r.status for r in responses] == [200, 200, 200]
            assert [r.body for r in responses] == [b"a /1", b"b /2", b"c /3"]
            await client.send(b"GET /4 HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).body == b"a /4"
        assert [r.target for r in a.requests] == [b"/1", b"/4"]
        assert [(r.target, r.body) for r in b.requests] == [(b"/2", b"hello")]
        assert [r.target for r in c.requests] == [b"/3"]


async def test_pipelined_requests_ending_with_connection_close(tmp_path: Path) -> None:
    async with Backend("a", echo_target("a")) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(
                b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            )
            responses = await client.responses(3)
            assert [r.body for r in responses] == [b"a /1", b"a /2", b"a /3"]
            assert await client.closed() == b""
        assert [r.target for r in a.requests] == [b"/1", b"/2", b"/3"]


async def test_expect_100_continue(tmp_path: Path) -> None:
    async with RawServer("a", ContinueConnection) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"PUT /upload HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
            interim = await client.response()
            assert interim.status == 100
            assert client.received.startswith(b"HTTP/1.1 100 ")
            assert a.requests == []
            await client.send(b"hello world")
            final = await client.response()
            assert final.status == 200
            assert final.body == b"got 11"
            # the connection goes on
            await client.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).status == 200
        first, second = a.requests
        assert first.body == b"hello world"
        assert (b"Expect", b"100-continue") in first.headers
        assert second.target == b"/next"


@pytest.mark.parametrize(
    ("request_line", "response"),
    [
        (b"HEAD /h HTTP/1.1", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n"),
        (b"HEAD /chunked HTTP/1.1", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
        (b"GET /nothing HTTP/1.1", b"HTTP/1.1 204 No Content\r\nX-Trace: 1\r\n\r\n"),
        (b"GET /cached HTTP/1.1", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 1000\r\n\r\n'),
    ],
)
async def test_bodiless_response_keeps_the_connection_usable(
    tmp_path: Path, request_line: bytes, response: bytes
) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.target == b"/after":
            transport.write(answer(body=b"after"))
        else:
            transport.write(response)

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(request_line + b"\r\nHost: h\r\n\r\n")
            head = await read_head(client)
            status = response.split(b"\r\n", 1)[0].split(b" ")[1]
            assert head.startswith(b"HTTP/1.1 " + status + b" ")
            if b"Content-Length: 1000" in response:
                assert b"\r\nContent-Length: 1000\r\n" in head  # relayed: it describes the representation
            await client.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
            after = await client.response()
            assert after.status == 200
            assert after.body == b"after"
        assert a.accepted == 1  # the server connection was reused too


async def test_interim_1xx_responses_are_relayed_before_the_final_one(tmp_path: Path) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </app.js>; rel=preload; as=script\r\n\r\n"
        )
        transport.write(answer(body=b"page"))

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            hint1, hint2, final = await client.responses(3)
            assert (hint1.status, hint1.header(b"link")) == (103, b"</style.css>; rel=preload; as=style")
            assert (hint2.status, hint2.header(b"link")) == (103, b"</app.js>; rel=preload; as=script")
            assert (final.status, final.body) == (200, b"page")
            await client.send(b"GET /again HTTP/1.1\r\nHost: h\r\n\r\n")
            hints = await client.responses(3)
            assert [r.status for r in hints] == [103, 103, 200]
        assert a.accepted == 1
        assert lb.listeners["web"].responses[2] == 2


# -- 8, 9. close-delimited and chunked bodies ------------------------------------------------------


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK"])
async def test_close_delimited_response_is_relayed_then_the_client_closed(tmp_path: Path, status_line: bytes) -> None:
    payload = bytes(range(256)) * 800  # 200 KiB, more than one read

    def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.target != b"/stream":
            transport.write(answer(body=b"framed"))
            return
        transport.write(status_line + b"\r\nContent-Type: application/octet-stream\r\n\r\n")
        transport.write(payload)
        transport.close()

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
            received = await client.closed()
        head, body = body_of(received)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert len(body) == len(payload)
        assert body == payload
        assert a.accepted == 1
        # the next request needs a new server connection: that one was delimited by its close
        assert (await get(port_of(lb))).body == b"framed"
        assert a.accepted == 2


CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\nhello\r\n1;ext="x"\r\n \r\n10\r\nchunked response\r\n0\r\nX-Trailer: t\r\n\r\n'
)


async def test_chunked_response_to_an_http11_client(tmp_path: Path) -> None:
    async with Backend("a", lambda request, transport: transport.write(CHUNKED_RESPONSE)) as a:
        async with running(farm(a), tmp_path) as lb, await Client.connect(port_of(lb)) as client:
            for _ in range(2):  # framed properly: the connection goes on
                await client.send(b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")
                response = await client.response()
                assert response.status == 200
                assert response.body == b"hello chunked response"
                assert [v for k, v in response.headers if k.lower() == b"transfer-encoding"] == [b"chunked"]
                assert response.header(b"content-length") is None
        assert a.accepted == 1


async def test_transfer_codings_before_chunked_reach_the_client(tmp_path: Path) -> None:
    """`Transfer-Encoding: gzip, chunked` keeps its gzip: lbproxy re-chunks, it never decodes (issue #14)."""
    payload = gzip.compress(b"hello, compressed world\n" * 50)

    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))

    async with (
        Backend("a", respond) as a,
        running(farm(a), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        response = await client.response()
    assert response.header(b"Transfer-Encoding") == b"gzip, chunked"
    assert gzip.decompress(response.body) == b"hello, compressed world\n" * 50


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
async def test_chunked_response_to_an_http10_client(tmp_path: Path, connection: bytes) -> None:
    async with Backend("a", lambda request, transport: transport.write(CHUNKED_RESPONSE)) as a:
        async with running(farm(a), tmp_path) as lb, await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /c HTTP/1.0\r\nHost: h\r\n" + connection + b"\r\n")
            received = await client.closed()
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") or head.startswith(b"HTTP/1.0 200 ")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"hello chunked response"


@pytest.mark.parametrize("in_pieces", [False, True])
async def test_chunked_request_body_reaches_the_server(tmp_path: Path, in_pieces: bool) -> None:
    head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    chunks = [b"5\r\nhello\r\n", b"1;name=value\r\n \r\n", b"b\r\nchunked bod\r\n", b"1\r\ny\r\n", b"0\r\n\r\n"]
    async with Backend("a", echo_target("a")) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            if in_pieces:
                await client.send(head)
                for chunk in chunks:
                    await client.send(chunk)
            else:
                await client.send(head + b"".join(chunks))
            assert (await client.response()).status == 200
            await client.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).body == b"a /after"
        first, second = a.requests
        assert first.body == b"hello chunked body"
        assert first.header_lines(b"transfer-encoding") == [b"chunked"]
        assert first.header_lines(b"content-length") == []
        assert second.target == b"/after"


# -- 10. Connection: close from either side --------------------------------------------------------


async def test_connection_close_from_the_client(tmp_path: Path) -> None:
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            response = await client.response()
            assert response.status == 200
            assert response.header(b"connection") == b"close"
            assert await client.closed() == b""
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /2 HTTP/1.0\r\nHost: h\r\n\r\n")  # HTTP/1.0: close unless keep-alive
            assert (await client.response()).status == 200
            assert await client.closed() == b""
        # the server did not ask to close: its connection served both clients
        assert len(a.requests) == 2
        assert a.accepted == 1


async def _three_requests(port: int) -> list[Response]:
    """Three GETs, one after the other, on one client connection."""
    responses = []
    async with await Client.connect(port) as client:
        for index in range(3):
            await client.send(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % index)
            responses.append(await client.response())
    return responses


@pytest.mark.parametrize("server_closes", [True, False])
async def test_connection_close_from_the_server(tmp_path: Path, server_closes: bool) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(answer(body=b"bye", headers=b"Connection: close\r\n"))
        if server_closes:
            transport.close()

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        for response in await _three_requests(port_of(lb)):
            assert (response.status, response.body) == (200, b"bye")
            assert response.header(b"connection") != b"close"
        assert [r.connection for r in a.requests] == [0, 1, 2]
        assert a.accepted == 3
        await eventually(lambda: all(t.is_closing() for t in a.transports), 2.0, "server connections closed")


# -- response framing at the edges: llhttp reads the head, lbproxy counts a Content-Length body ------


async def test_response_trickling_in_byte_by_byte_is_relayed_whole(tmp_path: Path) -> None:
    body = b"x" * 3000
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3000\r\n\r\n" + body

    async def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.target == b"/after":
            transport.write(answer(body=b"after"))
            return
        head_end = response.index(b"\r\n\r\n") + 4
        pieces = [response[i : i + 1] for i in range(head_end)]  # the head, a byte a segment
        pieces += [response[i : i + 700] for i in range(head_end, len(response), 700)]
        for piece in pieces:
            transport.write(piece)
            await asyncio.sleep(0)  # one write a loop turn: separate reads at lbproxy

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
            relayed = await client.response()
            assert (relayed.status, relayed.body) == (200, body)
            await client.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).body == b"after"
        assert a.accepted == 1  # counted to its end, the connection was fit to reuse


@pytest.mark.parametrize(("connection", "reused"), [(b"", False), (b"Connection: Keep-Alive\r\n", True)])
async def test_http10_server_connection_is_reused_only_when_it_says_keep_alive(
    tmp_path: Path, connection: bytes, reused: bool
) -> None:
    # HTTP/1.0 closes after each response unless the server says keep-alive (RFC 9112 §9.3); the server
    # here never closes, so only lbproxy's reading of the head decides whether the connection is reused.
    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n" + connection + b"\r\nbye")

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        for response in await _three_requests(port_of(lb)):
            assert (response.status, response.body) == (200, b"bye")
        assert a.accepted == (1 if reused else 3)


async def test_bytes_past_the_content_length_are_not_relayed_and_the_connection_not_reused(tmp_path: Path) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.target == b"/after":
            transport.write(answer(body=b"after"))
        else:
            transport.write(answer(body=b"exact") + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmugl")

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).body == b"exact"
            await client.send(b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n")
            after = await client.response()
            assert after.body == b"after"  # not the unasked-for response the server sent
        assert a.accepted == 2


async def test_one_server_connection_reads_responses_framed_every_way_in_turn(tmp_path: Path) -> None:
    """llhttp reads a small Content-Length body with its head, and a new parser takes over after a
    body that came later (issue #19): either way the next response on the connection is read right."""

    def respond(request: Request, transport: asyncio.Transport) -> None:
        target = request.target
        if target == b"/split":  # the body after the head, in a later segment
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            asyncio.get_running_loop().call_later(0.05, transport.write, b"split")
        elif target == b"/empty":
            transport.write(answer(body=b""))
        elif target == b"/chunked":
            transport.write(CHUNKED_RESPONSE)
        elif request.method == b"HEAD":
            transport.write(answer(body=target)[: -len(target)])  # the head of what GET would get
        else:
            transport.write(answer(body=target))

    sequence = [b"/small", b"/split", b"/small2", b"/empty", b"/small3", b"/chunked", b"/split", b"/small4"]
    expected = {b"/split": b"split", b"/empty": b"", b"/chunked": b"hello chunked response"}
    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            for target in sequence:
                await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
                response = await client.response()
                assert (target, response.status, response.body) == (target, 200, expected.get(target, target))
            await client.send(b"HEAD /small HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await read_head(client)).startswith(b"HTTP/1.1 200 ")
            await client.send(b"GET /last HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).body == b"/last"
        assert a.accepted == 1
        assert lb.listeners["web"].responses[2] == len(sequence) + 2


async def test_response_head_over_the_limit_is_a_502(tmp_path: Path) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"y" * 4096 + b"\r\n")  # and never ends

    async with (
        Backend("a", respond) as a,
        running(farm(a, listener="limits: {header_size: 2k}"), tmp_path) as lb,
    ):
        response = await get(port_of(lb))
        assert response.status == 502
        assert lb.listeners["web"].errors == {502: 1}


async def test_interim_and_final_response_in_one_segment_then_a_head_request(tmp_path: Path) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.method == b"HEAD":
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        else:
            transport.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + answer(body=b"final"))

    async with Backend("a", respond) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            hint, final = await client.responses(2)
            assert (hint.status, final.status, final.body) == (103, 200, b"final")
            await client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
            head = await read_head(client)
            assert b"\r\nContent-Length: 5000\r\n" in head
            await client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            assert [r.body for r in await client.responses(2)] == [b"", b"final"]
        assert a.accepted == 1


# -- 11. errors: 502, 503, 504 ---------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 2])
async def test_502_when_the_only_server_refuses(tmp_path: Path, retries: int) -> None:
    async with running(farm(Dead(), pool=f"retries: {retries}"), tmp_path) as lb:
        response = await get(port_of(lb))
        assert response.status == 502
        assert len(response.body) < 200
        assert lb.listeners["web"].errors == {502: 1}
        assert lb.listeners["web"].responses[5] == 1


@pytest.mark.parametrize("retries", [0, 2])
async def test_502_when_the_server_answers_garbage(tmp_path: Path, retries: int) -> None:
    async with (
        Backend("a", lambda request, transport: transport.write(b"NOT HTTP\r\n\r\n")) as a,
        running(farm(a, pool=f"retries: {retries}"), tmp_path) as lb,
    ):
        response = await get(port_of(lb))
        assert response.status == 502
        assert len(response.body) < 200
        assert len(a.requests) == 1  # a response began: not replayed


@pytest.mark.parametrize("retries", [0, 2])
async def test_502_when_the_server_resets(tmp_path: Path, retries: int) -> None:
    async with (
        Backend("a", lambda request, transport: transport.abort()) as a,
        running(farm(a, pool=f"retries: {retries}"), tmp_path) as lb,
    ):
        response = await get(port_of(lb))
        assert response.status == 502
        assert len(response.body) < 200


MAINTENANCE = b"<!doctype html><html><body><h1>Back soon</h1><p>Planned maintenance.</p></body></html>\n"


@pytest.mark.parametrize(("retry_after", "header"), [(None, b"30"), ("5s", b"5"), ("2m", b"120")])
async def test_503_serves_the_maintenance_page(tmp_path: Path, retry_after: str | None, header: bytes) -> None:
    page = tmp_path / "maintenance.html"
    page.write_bytes(MAINTENANCE)
    listener = f'maintenance_page: "{page}"'
    if retry_after is not None:
        listener += f"\nretry_after: {retry_after}"
    async with Backend("a") as a, Backend("b") as b, running(farm(a, b, listener=listener), tmp_path) as lb:
        pool = lb.pools["farm"]
        for server in pool.servers:
            pool.set_admin(server, AdminState.DISABLED)
        response = await get(port_of(lb))
        assert response.status == 503
        assert response.body == MAINTENANCE
        assert response.header(b"retry-after") == header
        assert response.header(b"content-type") is not None
        assert response.header(b"content-type").startswith(b"text/html")  # type: ignore[union-attr]
        assert a.requests == b.requests == []
        pool.set_admin(pool.by_name["b"], AdminState.ENABLED)
        assert (await get(port_of(lb))).body == b"b"


async def test_503_without_maintenance_page_is_short_and_plain(tmp_path: Path) -> None:
    async with Backend("a") as a, running(farm(a), tmp_path) as lb:
        pool = lb.pools["farm"]
        pool.set_admin(pool.by_name["a"], AdminState.DISABLED)
        response = await get(port_of(lb))
        assert response.status == 503
        assert 0 < len(response.body) < 200
        assert b"<html" not in response.body.lower()
        assert (response.header(b"content-type") or b"").startswith(b"text/plain")
        assert lb.listeners["web"].errors == {503: 1}
        assert a.requests == []


async def test_504_when_the_server_never_answers(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with Backend("a", lambda request, transport: None) as a:
        config = farm(a, pool="retries: 0\ntimeouts: {response: 300ms}")
        async with running(config, tmp_path) as lb:
            started = loop.time()
            response = await get(port_of(lb))
            elapsed = loop.time() - started
            assert response.status == 504
            assert len(response.body) < 200
            assert 0.29 <= elapsed < 1.0
            assert len(a.requests) == 1
            await eventually(lambda: a.transports[0].is_closing(), 2.0, "the silent connection dropped")
            assert lb.pools["farm"].by_name["a"].inflight == 0


# -- 12. retries -----------------------------------------------------------------------------------


async def test_requests_are_retried_on_another_server(tmp_path: Path) -> None:
    dead = Dead()
    async with Backend("live") as live, running(farm(dead, live), tmp_path) as lb:
        for index in range(20):
            response = await get(port_of(lb), b"/%d" % index)
            assert (response.status, response.body) == (200, b"live")
        assert len(live.requests) == 20
        listener = lb.listeners["web"]
        servers = lb.pools["farm"].by_name
        assert listener.retries >= 10  # round robin sends every other first try to the dead server
        assert listener.retries == servers["dead"].connect_failures
        assert listener.responses[2] == 20
        assert listener.errors == {}
        assert servers["live"].inflight == servers["dead"].inflight == 0


# -- 13. upgrades ----------------------------------------------------------------------------------


async def test_websocket_upgrade_becomes_a_tunnel(tmp_path: Path) -> None:
    async with RawServer("ws", UpgradeEchoConnection) as ws, running(farm(ws), tmp_path) as lb:
        client = await Client.connect(port_of(lb))
        try:
            upgrade = (
                b"GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await client.send(upgrade + b"EARLY")  # bytes of the new protocol in the same packet
            head = await read_head(client)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"\r\nupgrade: websocket\r\n" in head.lower()
            async with asyncio.timeout(5):
                assert await client.reader.readexactly(5) == b"EARLY"
                for message in (b"ping", b"\x81\x05hello", b"\x00" * 70_000):
                    await client.send(message)
                    assert await client.reader.readexactly(len(message)) == message
            (request,) = ws.requests
            assert request.header(b"upgrade") == b"websocket"
            assert b"upgrade" in (request.header(b"connection") or b"").lower()
            assert ws.raw[0].startswith(b"GET /chat HTTP/1.1\r\n")
            assert ws.raw[0].endswith(b"\r\n\r\nEARLYping\x81\x05hello" + b"\x00" * 70_000)
        finally:
            await client.close()
        await eventually(lambda: ws.transports[0].is_closing(), 2.0, "the tunnel closed at the server")


class UpgradeThenReplyOnEof(UpgradeEchoConnection):
    """After the 101, keeps what it is sent; at the client's half-close, answers with it reversed, then closes."""

    def received(self, data: bytes) -> None:
        if self.upgraded:
            self.buffer += data
            return
        super().received(data)

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.transport.write(bytes(reversed(self.buffer)))
        self.transport.close()
        return True


WEBSOCKET = (
    b"GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_tunnel_half_close_lets_the_server_answer(tmp_path: Path) -> None:
    """The client's FIN reaches the server, whose answer still reaches the client (issue #14)."""
    async with (
        RawServer("ws", UpgradeThenReplyOnEof) as ws,
        running(farm(ws), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        await client.send(WEBSOCKET)
        assert (await read_head(client)).startswith(b"HTTP/1.1 101 ")
        await client.send(b"hello")
        client.writer.write_eof()
        async with asyncio.timeout(5):
            assert await client.reader.read() == b"olleh"  # then the end: the server closed


async def test_silent_tunnel_is_closed_after_the_tunnel_timeout(tmp_path: Path) -> None:
    async with (
        RawServer("ws", UpgradeEchoConnection) as ws,
        running(farm(ws, listener="timeouts:\n  tunnel: 500ms"), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        await client.send(WEBSOCKET)
        assert (await read_head(client)).startswith(b"HTTP/1.1 101 ")
        started = time.monotonic()
        silent = started
        while time.monotonic() - started < 1.0:  # traffic every 200 ms, for two timeouts: it stays open
            await asyncio.sleep(0.2)
            silent = time.monotonic()  # the last byte lbproxy relayed left no later than this
            await client.send(b"ping")
            async with asyncio.timeout(5):
                assert await client.reader.readexactly(4) == b"ping"
        async with asyncio.timeout(5):
            assert await client.reader.read() == b""
        assert 0.5 - 0.05 <= time.monotonic() - silent <= 0.5 + 0.25 + 0.5
        await eventually(lambda: ws.transports[0].is_closing(), 2.0, "the tunnel closed at the server")


async def test_upgrade_declined_by_the_server_is_a_normal_response(tmp_path: Path) -> None:
    async with (
        RawServer("ws", UpgradeEchoConnection) as ws,
        running(farm(ws), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        await client.send(b"GET /chat HTTP/1.1\r\nHost: h\r\nUpgrade: tls/1.2\r\nConnection: Upgrade\r\n\r\n")
        response = await client.response()
        assert (response.status, response.body) == (200, b"plain")


H2C = (
    b"GET /h2c HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


@pytest.mark.parametrize("same_packet", [False, True])
async def test_h2c_upgrade_is_stripped(tmp_path: Path, same_packet: bool) -> None:
    second = b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n"
    async with Backend("a", echo_target("a")) as a, running(farm(a), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            if same_packet:
                await client.send(H2C + second)
                first, following = await client.responses(2)
            else:
                await client.send(H2C)
                first = await client.response()
                await client.send(second)
                following = await client.response()
            assert (first.status, first.body) == (200, b"a /h2c")
            assert (following.status, following.body) == (200, b"a /second")
            await client.send(b"GET /third HTTP/1.1\r\nHost: h\r\n\r\n")
            assert (await client.response()).body == b"a /third"
        h2c, *_ = a.requests
        assert not names_in(h2c) & {b"upgrade", b"http2-settings", b"connection"}
        assert [r.target for r in a.requests] == [b"/h2c", b"/second", b"/third"]


# -- 14. NTLM pinning ------------------------------------------------------------------------------


def ntlm(name: str) -> Responder:
    """A Windows-authenticated application: /login asks for NTLM; the rest answers plainly."""

    def respond(request: Request, transport: asyncio.Transport) -> None:
        auth = request.header(b"authorization") or b""
        if request.target == b"/login" and not auth:
            transport.write(answer(b"401 Unauthorized", headers=b"WWW-Authenticate: NTLM\r\n"))
        elif auth.startswith(b"NTLM TlRMTVNTUAAB"):  # type 1 message: answer with the challenge
            challenge = b"WWW-Authenticate: NTLM TlRMTVNTUAACAAAADAAMADAAAAA1goniQUJDREVGR0g=\r\n"
            transport.write(answer(b"401 Unauthorized", headers=challenge))
        else:
            transport.write(answer(body=b"%s %d" % (name.encode(), request.connection)))

    return respond


async def test_ntlm_pins_the_client_connection_to_one_server_connection(tmp_path: Path) -> None:
    async with (
        Backend("a", ntlm("a")) as a,
        Backend("b", ntlm("b")) as b,
        running(farm(a, b), tmp_path) as lb,
    ):
        port = port_of(lb)
        async with await Client.connect(port) as pinned, await Client.connect(port) as other:

            async def ask(client: Client, target: bytes, who: bytes, auth: bytes = b"") -> int:
                await client.send(b"GET %s HTTP/1.1\r\nHost: h\r\nX-Client: %s\r\n%s\r\n" % (target, who, auth))
                return (await client.response()).status

            assert await ask(pinned, b"/login", b"1") == 401
            assert await ask(pinned, b"/login", b"1", b"Authorization: NTLM TlRMTVNTUAABAAAAB4IIogAAAAA=\r\n") == 401
            assert await ask(pinned, b"/login", b"1", b"Authorization: NTLM TlRMTVNTUAADAAAAGAAYAEgAAAA=\r\n") == 200
            for index in range(4):
                assert await ask(other, b"/page/%d" % index, b"2") == 200
            for index in range(6):
                assert await ask(pinned, b"/page/%d" % index, b"1") == 200
            for index in range(4):
                assert await ask(other, b"/more/%d" % index, b"2") == 200

        def by(client: bytes) -> list[tuple[str, int]]:
            return [
                (backend.name, request.connection)
                for backend in (a, b)
                for request in backend.requests
                if request.header(b"x-client") == client
            ]

        pinned_to = set(by(b"1"))
        assert len(by(b"1")) == 9
        assert len(pinned_to) == 1, f"one server connection for the authenticated client, got {pinned_to}"
        others = by(b"2")
        assert collections.Counter(name for name, _ in others) == {"a": 4, "b": 4}
        assert not pinned_to & set(others), "another client used the pinned server connection"
        # the pinned server connection is closed with its client, never handed to another
        (name, index) = pinned_to.pop()
        backend = a if name == "a" else b
        await eventually(lambda: backend.transports[index].is_closing(), 2.0, "the pinned connection closed")


# -- 15. counters ----------------------------------------------------------------------------------


async def test_counters_after_known_traffic(tmp_path: Path) -> None:
    written: collections.Counter[str] = collections.Counter()

    def counted(name: str) -> Responder:
        def respond(request: Request, transport: asyncio.Transport) -> None:
            if request.target == b"/missing":
                data = answer(b"404 Not Found", b"no such page")
            else:
                data = answer(body=name.encode() * 100)
            written[name] += len(data)
            transport.write(data)

        return respond

    async with (
        Backend("a", counted("a")) as a,
        Backend("b", counted("b")) as b,
        running(farm(a, b), tmp_path) as lb,
    ):
        async with await Client.connect(port_of(lb)) as client:
            for target in (b"/1", b"/2", b"/3", b"/4", b"/5", b"/missing"):
                await client.send(b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % target)
                await client.response()
            await client.send(b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nfield=abc")
            assert (await client.response()).status == 200
        check_counters(lb, a, b, written)


def check_counters(lb: Runtime, a: Backend, b: Backend, written: collections.Counter[str]) -> None:
    listener = lb.listeners["web"]
    assert listener.requests == 7
    assert listener.responses[2] == 6
    assert listener.responses[4] == 1
    assert listener.errors == {}
    assert listener.retries == 0
    assert len(a.requests) + len(b.requests) == 7
    for backend in (a, b):
        server = lb.pools["farm"].by_name[backend.name]
        missing = sum(1 for r in backend.requests if r.target == b"/missing")
        assert server.requests == len(backend.requests)
        assert server.responses[2] == len(backend.requests) - missing
        assert server.responses[4] == missing
        assert server.responses[5] == 0
        assert server.sent_bytes == sum(len(raw) for raw in backend.raw)
        assert server.received_bytes == written[backend.name]
        assert server.inflight == 0
