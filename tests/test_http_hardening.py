"""What lbproxy refuses, limits and times out, checked over real sockets on 127.0.0.1 (issue #3).

Smuggling: every ambiguous or malformed request (RFC 9112 §6.1-6.3, §11.2) gets its error status and
the connection closed, and neither it nor the request sent after it on the same connection reaches
the recording back-end. Then the configured limits (414, 431, 413), the client-side timeouts
(request header, keep-alive, request body), max_connections, TLS termination and the access log.

Deadlines are checked by the runtime's tick (4 times a second), so timing assertions allow one tick
and some scheduling slack on top of the configured timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbproxy.runtime import TICK, Runtime
from tests.support import (
    LOCALHOST,
    Backend,
    Client,
    Request,
    eventually,
    get,
    parse_responses,
    port_of,
    running,
)

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(autouse=True)
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail the test if any callback raised into the event loop (an exception in a protocol callback)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    for _ in range(3):  # let the callbacks of connections closed at the end of the test run
        await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    assert not errors, "exceptions reported to the event loop:\n" + "\n".join(map(_describe, errors))


def _describe(context: dict[str, object]) -> str:
    exception = context.get("exception")
    if isinstance(exception, BaseException):
        return f"{context.get('message')}:\n" + "".join(traceback.format_exception(exception))
    return str(context.get("message"))


def lb_config(server: str, listener: str = "") -> str:
    """A one-listener, one-server config; `listener` holds extra listener keys, indented 4 spaces."""
    return f"""
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
{listener}
pools:
  farm:
    servers:
      - name: a
        address: "{server}"
"""


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path, listener: str = "") -> AsyncIterator[tuple[Runtime, Backend]]:
    """A recording back-end and lbproxy in front of it."""
    async with Backend("a") as backend, running(lb_config(backend.address, listener), tmp_path) as lb:
        yield lb, backend


async def read_until_close(client: Client, timeout: float) -> bytes:
    """Everything `client` receives until lbproxy closes the connection; fails if it stays open."""
    received = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = await client.reader.read(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
    except TimeoutError:
        raise AssertionError(f"still open after {timeout}s, having received {bytes(received)[:300]!r}") from None
    return bytes(received)


async def send_until_close(port: int, data: bytes, timeout: float = 3.0) -> bytes:
    """Send `data` on a new connection in one write; return everything received until lbproxy closes it."""
    async with await Client.connect(port) as client:
        await client.send(data)
        return await read_until_close(client, timeout)


async def barrier(port: int, backend: Backend, index: int) -> None:
    """A normal request through lbproxy: proves it still serves, and orders the back-end's view.

    By the time the back-end has answered it, anything lbproxy wrote upstream for an earlier request
    has been read by the back-end too (same loop, same loopback, written earlier).
    """
    response = await get(port, b"/barrier-%d" % index)
    assert response.status == 200


def assert_backend_saw_only_barriers(backend: Backend, partial_allowed: bool) -> None:
    """Nothing but barrier requests reached `backend`; `partial_allowed`: an incomplete request may have."""
    seen = b"".join(bytes(raw) for raw in backend.raw)
    assert b"/smuggled" not in seen, f"the smuggled request reached the back-end: {seen!r}"
    targets = [request.target for request in backend.requests]
    assert all(target.startswith(b"/barrier-") for target in targets), f"the back-end got requests {targets}"
    if not partial_allowed:
        complete = b"".join(request.raw for request in backend.requests)
        assert seen == complete, f"bytes of the refused request reached the back-end: {seen!r}"


@dataclass(frozen=True)
class Case:
    data: bytes
    statuses: tuple[int, ...] = (400,)
    # True when the flaw is in the body: lbproxy may already have sent the head upstream (streaming),
    # but never a complete request, and never what followed it.
    in_body: bool = False


def _post(headers: bytes, body: bytes, version: bytes = b"1.1") -> bytes:
    return b"POST / HTTP/" + version + b"\r\nHost: x\r\n" + headers + b"\r\n" + body + SMUGGLED


def _get_with(header_lines: bytes) -> bytes:
    return b"GET / HTTP/1.1\r\n" + header_lines + b"\r\n" + SMUGGLED


_CHUNKED = b"Transfer-Encoding: chunked\r\n"

SMUGGLING: dict[str, Case] = {
    # RFC 9112 §6.1, §6.3: framing that two parties could read two ways
    "content-length-and-transfer-encoding": Case(
        _post(b"Content-Length: %d\r\n" % (5 + len(SMUGGLED)) + _CHUNKED, b"0\r\n\r\n")
    ),
    "two-differing-content-lengths": Case(_post(b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLED), b"")),
    "content-length-list": Case(_post(b"Content-Length: 5, 5\r\n", b"hello")),
    "content-length-plus-sign": Case(_post(b"Content-Length: +5\r\n", b"hello")),
    "transfer-encoding-gzip": Case(_post(b"Transfer-Encoding: gzip\r\n", b"")),
    "transfer-encoding-chunked-then-gzip": Case(_post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n")),
    "transfer-encoding-gzip-then-chunked": Case(_post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n")),
    "two-transfer-encoding-lines": Case(_post(_CHUNKED + _CHUNKED, b"0\r\n\r\n")),
    "transfer-encoding-gzip-line-then-chunked-line": Case(
        _post(b"Transfer-Encoding: gzip\r\n" + _CHUNKED, b"0\r\n\r\n")
    ),
    "transfer-encoding-xchunked": Case(_post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    "transfer-encoding-in-http-1.0": Case(_post(_CHUNKED, b"0\r\n\r\n", version=b"1.0")),
    # RFC 9112 §7.1: chunk-size = 1*HEXDIG, lines end in CRLF
    "chunk-size-not-hex": Case(_post(_CHUNKED, b"5x\r\nhello\r\n0\r\n\r\n"), in_body=True),
    "chunk-size-trailing-space": Case(_post(_CHUNKED, b"5 \r\nhello\r\n0\r\n\r\n"), in_body=True),
    "chunk-lines-lf-only": Case(_post(_CHUNKED, b"5\nhello\n0\n\n"), in_body=True),
    "chunk-size-overflow": Case(_post(_CHUNKED, b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"), in_body=True),
    # RFC 9112 §5: field syntax
    "obs-fold": Case(_get_with(b"Host: x\r\nX-A: a\r\n b\r\n")),
    "bare-cr-in-value": Case(_get_with(b"Host: x\r\nX-A: a\rb\r\n")),
    "nul-in-value": Case(_get_with(b"Host: x\r\nX-A: a\x00b\r\n")),
    "soh-in-value": Case(_get_with(b"Host: x\r\nX-A: a\x01b\r\n")),
    "esc-in-value": Case(_get_with(b"Host: x\r\nX-A: a\x1bb\r\n")),
    "del-in-value": Case(_get_with(b"Host: x\r\nX-A: a\x7fb\r\n")),
    "control-char-in-name": Case(_get_with(b"Host: x\r\nX-\x01A: b\r\n")),
    "whitespace-before-colon": Case(_get_with(b"Host : x\r\n")),
    "space-inside-header-name": Case(_get_with(b"Host: x\r\nX Forwarded: a\r\n")),
    # RFC 9112 §3.2: exactly one valid Host in HTTP/1.1
    "missing-host": Case(_get_with(b"")),
    "two-hosts": Case(_get_with(b"Host: x\r\nHost: y\r\n")),
    "host-with-space": Case(_get_with(b"Host: good evil\r\n")),
    "host-with-slash": Case(_get_with(b"Host: good/evil\r\n")),
    "host-with-at": Case(_get_with(b"Host: user@evil\r\n")),
    # versions: a line without one is malformed (400); a well-formed HTTP/x.y not served is 505
    "http-0.9-request": Case(b"GET /\r\n\r\n" + SMUGGLED),
    "no-version-then-header-lines": Case(b"GET /x\r\nHost: a\r\n\r\n" + SMUGGLED),
    "http-2.0-request-line": Case(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n" + SMUGGLED, statuses=(505,)),
    "explicit-http-0.9-version": Case(b"GET / HTTP/0.9\r\nHost: x\r\n\r\n" + SMUGGLED, statuses=(505,)),
    # RFC 9112 §2.2 allows skipping empty lines before a request line: lbproxy refuses them, as bare CRs
    "crlf-before-request-line": Case(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED),
    "crlf-run-before-request-line": Case(b"\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED),
    "bare-cr-before-request-line": Case(b"\rGET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED),
    "bare-lf-before-request-line": Case(b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED),
    "h2-preface": Case(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SMUGGLED),
    # a reverse proxy, never an open one
    "absolute-form-naming-another-host": Case(b"GET http://evil.example/ HTTP/1.1\r\nHost: good\r\n\r\n" + SMUGGLED),
    "connect": Case(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n" + SMUGGLED, statuses=(405,)),
}


@pytest.mark.parametrize("case", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_attempt_is_refused_and_nothing_reaches_the_server(tmp_path: Path, case: Case) -> None:
    async with proxied(tmp_path) as (lb, backend):
        port = port_of(lb)
        received = await send_until_close(port, case.data)  # fails if lbproxy keeps the connection open
        responses = parse_responses(received)
        assert [response.status for response in responses] in [[status] for status in case.statuses], received
        (status,) = [response.status for response in responses]
        assert lb.listeners["web"].errors == {status: 1}
        await barrier(port, backend, 0)
        assert_backend_saw_only_barriers(backend, partial_allowed=case.in_body)


async def test_lbproxy_keeps_serving_after_every_refusal(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (lb, backend):
        port = port_of(lb)
        for case in SMUGGLING.values():
            await send_until_close(port, case.data)
        await barrier(port, backend, 0)
        assert_backend_saw_only_barriers(backend, partial_allowed=True)
        listener = lb.listeners["web"]
        assert sum(listener.errors.values()) == len(SMUGGLING)
        await eventually(lambda: not listener.connections, what="every refused connection forgotten")


async def test_http09_request_gets_400_and_a_close_at_once(tmp_path: Path) -> None:
    """HTTP/0.9 (`GET /x` and nothing more) waits for no header lines: 400 now, not at the header deadline."""
    async with proxied(tmp_path, "    timeouts:\n      request_header: 10s\n") as (lb, backend):
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /x\r\n")
            received = await read_until_close(client, timeout=2.0)
        assert [response.status for response in parse_responses(received)] == [400], received
        assert lb.listeners["web"].errors == {400: 1}
        assert backend.requests == []


async def test_line_break_before_a_kept_alive_request_gets_400(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (lb, backend), await Client.connect(port_of(lb)) as client:
        await client.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200
        await client.send(b"\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        received = await read_until_close(client, timeout=2.0)
        assert [response.status for response in parse_responses(received)] == [400], received
        assert [request.target for request in backend.requests] == [b"/first"]


@pytest.mark.parametrize(
    ("framing", "partial"),
    [(b"Content-Length: 100\r\n", b"x" * 10), (b"Transfer-Encoding: chunked\r\n", b"64\r\n" + b"x" * 10)],
    ids=["content-length", "chunked"],
)
async def test_half_close_with_the_body_unfinished_gives_up_at_once(
    tmp_path: Path, framing: bytes, partial: bytes
) -> None:
    """A client's FIN while its body is short: the server connection and the client's close now (HAProxy, nginx)."""
    listener = "    timeouts:\n      request_body: 30s\n"
    async with proxied(tmp_path, listener) as (lb, backend), await Client.connect(port_of(lb)) as client:
        await client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n" + partial)
        await eventually(lambda: len(backend.raw) == 1 and b"x" * 10 in backend.raw[0], 2.0, "the body streaming")
        started = time.monotonic()
        client.writer.write_eof()
        received = await read_until_close(client, timeout=2.0)
        assert received == b""
        await eventually(lambda: backend.transports[0].is_closing(), 2.0, "the server connection closed")
        assert time.monotonic() - started < 2.0
        assert backend.requests == []  # never a complete request
        await eventually(lambda: not lb.listeners["web"].connections, 2.0, "the client connection forgotten")
        assert all(not server.inflight for server in lb.pools["farm"].servers)


async def test_absolute_form_naming_the_host_is_forwarded_byte_for_byte(tmp_path: Path) -> None:
    target = b"http://Good.example:8080/a%2Fb/../c?x=%41"
    async with proxied(tmp_path) as (lb, backend), await Client.connect(port_of(lb)) as client:
        await client.send(b"GET %s HTTP/1.1\r\nHost: good.EXAMPLE:8080\r\n\r\n" % target)
        response = await client.response()
    assert response.status == 200
    (request,) = backend.requests
    assert request.target == target
    assert request.raw.startswith(b"GET %s HTTP/1.1\r\nHost: good.EXAMPLE:8080\r\n" % target)


@pytest.mark.parametrize("first_at_server", [False, True], ids=["one-write", "first-already-at-server"])
async def test_malformed_request_pipelined_behind_a_good_one_does_not_take_its_answer(
    tmp_path: Path, first_at_server: bool
) -> None:
    """RFC 9112 §9.3.2: responses go in request order; the 400 belongs to the second request, not the first."""
    release = asyncio.Event()

    async def respond(request: Request, transport: asyncio.Transport) -> None:
        await release.wait()
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")

    first = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
    malformed = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n" + SMUGGLED
    async with Backend("a", respond) as backend, running(lb_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            if first_at_server:
                await client.send(first)
                await eventually(lambda: len(backend.requests) == 1, 2.0, "the first request at the server")
                await client.send(malformed)
            else:
                await client.send(first + malformed)
                await eventually(lambda: len(backend.requests) == 1, 2.0, "the first request at the server")
            release.set()
            received = await read_until_close(client, timeout=3.0)
        responses = parse_responses(received)
        assert [(response.status, response.body) for response in responses][:1] == [(200, b"first")], received
        assert [response.status for response in responses][1:] in ([400], []), received
        assert [request.target for request in backend.requests] == [b"/first"]


# -- limits ---------------------------------------------------------------------------------------

LIMITS = """\
    limits:
      header_size: 8KiB
      header_count: 20
      target_size: 1KiB
      max_body_size: 1KiB
"""


async def test_request_target_over_the_limit_gets_414(tmp_path: Path) -> None:
    async with proxied(tmp_path, LIMITS) as (lb, backend):
        target = b"/" + b"a" * 2048
        received = await send_until_close(port_of(lb), b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
        assert [response.status for response in parse_responses(received)] == [414]
        assert lb.listeners["web"].errors == {414: 1}
        await barrier(port_of(lb), backend, 0)
        assert_backend_saw_only_barriers(backend, partial_allowed=False)


def _headers(name: bytes, count: int, size: int) -> bytes:
    return b"".join(b"%s: %03d%s\r\n" % (name, index, b"v" * size) for index in range(count))


# An ordinary field, forwarded; and one that lbproxy drops and writes itself: both count towards the limits.
FIELD_NAMES = pytest.mark.parametrize("name", [b"X-Filler", b"X-Forwarded-Proto"], ids=["ordinary", "replaced"])


@FIELD_NAMES
async def test_header_block_over_the_limit_gets_431(tmp_path: Path, name: bytes) -> None:
    # 10 KiB of headers in 10 lines (under header_count), in one write: one read at lbproxy
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + _headers(name, 10, 1024) + b"\r\n"
    async with proxied(tmp_path, LIMITS) as (lb, backend):
        received = await send_until_close(port_of(lb), head)
        assert [response.status for response in parse_responses(received)] == [431], received[:200]
        assert lb.listeners["web"].errors == {431: 1}
        await barrier(port_of(lb), backend, 0)
        assert_backend_saw_only_barriers(backend, partial_allowed=False)


async def test_unfinished_header_block_over_the_limit_gets_431_at_once(tmp_path: Path) -> None:
    # 64 KiB of head that never ends, in one write: the limit, not the 10 s header timeout, ends it
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 65536
    async with proxied(tmp_path, LIMITS) as (lb, _backend):
        received = await send_until_close(port_of(lb), head, timeout=2.0)
        assert [response.status for response in parse_responses(received)] == [431], received[:200]


@FIELD_NAMES
async def test_too_many_header_fields_get_431(tmp_path: Path, name: bytes) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\n" + _headers(name, 30, 4) + b"\r\n"
    async with proxied(tmp_path, LIMITS) as (lb, backend):
        received = await send_until_close(port_of(lb), head)
        assert [response.status for response in parse_responses(received)] == [431], received[:200]
        assert lb.listeners["web"].errors == {431: 1}
        await barrier(port_of(lb), backend, 0)
        assert_backend_saw_only_barriers(backend, partial_allowed=False)


async def test_content_length_over_max_body_size_gets_413_and_the_body_goes_nowhere(tmp_path: Path) -> None:
    body = b"B" * 2048
    request = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with proxied(tmp_path, LIMITS) as (lb, backend):
        received = await send_until_close(port_of(lb), request)
        assert [response.status for response in parse_responses(received)] == [413], received[:200]
        assert lb.listeners["web"].errors == {413: 1}
        await barrier(port_of(lb), backend, 0)
        assert_backend_saw_only_barriers(backend, partial_allowed=False)


async def test_chunked_body_growing_past_max_body_size_never_reaches_the_server_whole(tmp_path: Path) -> None:
    chunks = b"".join(b"200\r\n" + b"C" * 512 + b"\r\n" for _ in range(8))  # 4 KiB in all
    request = b"POST /upload HTTP/1.1\r\nHost: x\r\n" + _CHUNKED + b"\r\n" + chunks + b"0\r\n\r\n"
    async with proxied(tmp_path, LIMITS) as (lb, backend):
        received = await send_until_close(port_of(lb), request)
        # 413, or the connection cut if a response had begun: never a response of the server's
        assert [response.status for response in parse_responses(received)] in ([413], []), received[:200]
        await barrier(port_of(lb), backend, 0)
        assert [request.target for request in backend.requests] == [b"/barrier-0"]


# -- timeouts -------------------------------------------------------------------------------------

SLACK = TICK + 0.25  # one deadline tick, and scheduling on a busy 2-core machine


async def _read_until_close(client: Client, timeout: float) -> tuple[bytes, float]:
    """Everything received until the close, and when the close came (monotonic seconds)."""
    received = await read_until_close(client, timeout)
    return received, time.monotonic()


async def test_slowloris_head_gets_408_after_request_header_timeout(tmp_path: Path) -> None:
    listener = "    timeouts:\n      request_header: 1s\n"
    async with proxied(tmp_path, listener) as (lb, backend), await Client.connect(port_of(lb)) as client:
        started = time.monotonic()
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
        closing = asyncio.ensure_future(_read_until_close(client, timeout=4.0))
        for byte in b"X-Slow: " + b"a" * 32:  # one byte every 100 ms: 4 s at most
            if closing.done():
                break
            try:
                await client.send(bytes([byte]))
            except ConnectionError:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closing), 0.1)
        received, closed_at = await closing
        assert [response.status for response in parse_responses(received)] == [408], received
        assert 1.0 - 0.05 <= closed_at - started <= 1.0 + SLACK
        assert lb.listeners["web"].errors == {408: 1}
        assert backend.requests == []


async def test_slow_head_after_a_kept_alive_request_gets_408_after_request_header_timeout(tmp_path: Path) -> None:
    # The connection is idle under the long keep-alive timeout when the next head begins: its first
    # bytes, left incomplete by their read, must start the shorter request-header deadline.
    listener = "    timeouts:\n      request_header: 1s\n      keepalive: 10s\n"
    async with proxied(tmp_path, listener) as (lb, backend), await Client.connect(port_of(lb)) as client:
        await client.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200
        started = time.monotonic()
        await client.send(b"GET /second HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        received, closed_at = await _read_until_close(client, timeout=4.0)
        assert [response.status for response in parse_responses(received)] == [408], received
        assert 1.0 - 0.05 <= closed_at - started <= 1.0 + SLACK
        assert [request.target for request in backend.requests] == [b"/first"]


async def test_host_is_checked_on_every_request_of_a_connection(tmp_path: Path) -> None:
    # lbproxy checks a Host value once per connection while the client repeats it: a new value is checked.
    async with proxied(tmp_path) as (lb, backend):
        port = port_of(lb)
        received = await send_until_close(
            port, b"GET /a HTTP/1.1\r\nHost: good\r\n\r\nGET /b HTTP/1.1\r\nHost: good evil\r\n\r\n"
        )
        assert [response.status for response in parse_responses(received)] == [200, 400], received
        assert [request.target for request in backend.requests] == [b"/a"]
        assert lb.listeners["web"].errors == {400: 1}


async def test_idle_keepalive_connection_is_closed_silently(tmp_path: Path) -> None:
    listener = "    timeouts:\n      keepalive: 500ms\n"
    async with proxied(tmp_path, listener) as (lb, _backend), await Client.connect(port_of(lb)) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200
        idle_since = time.monotonic()
        received, closed_at = await _read_until_close(client, timeout=3.0)
        assert received == b""
        assert 0.5 - 0.05 <= closed_at - idle_since <= 0.5 + SLACK
        assert lb.listeners["web"].errors == {}


async def test_connection_that_sends_nothing_is_closed_without_408(tmp_path: Path) -> None:
    listener = "    timeouts:\n      request_header: 1s\n      keepalive: 500ms\n"
    async with proxied(tmp_path, listener) as (lb, _backend), await Client.connect(port_of(lb)) as client:
        started = time.monotonic()
        received, closed_at = await _read_until_close(client, timeout=3.0)
        assert received == b""
        assert closed_at - started <= 1.0 + SLACK
        assert lb.listeners["web"].errors == {}


async def test_trickling_body_gets_408_after_request_body_timeout(tmp_path: Path) -> None:
    listener = "    timeouts:\n      request_header: 5s\n      request_body: 1s\n"
    async with proxied(tmp_path, listener) as (lb, backend), await Client.connect(port_of(lb)) as client:
        await client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        closing = asyncio.ensure_future(_read_until_close(client, timeout=4.0))
        for _ in range(40):  # one byte every 100 ms, 4 s at most: never the whole 100
            if closing.done():
                break
            try:
                await client.send(b"b")
            except ConnectionError:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closing), 0.1)
        received, closed_at = await closing
        assert [response.status for response in parse_responses(received)] in ([408], []), received
        assert closed_at - started <= 1.0 + SLACK
        assert backend.requests == []


# -- max_connections ------------------------------------------------------------------------------


async def test_connections_over_max_connections_are_closed_at_once(tmp_path: Path) -> None:
    async with proxied(tmp_path, "    max_connections: 2\n") as (lb, _backend):
        port = port_of(lb)
        listener = lb.listeners["web"]
        first = await Client.connect(port)
        second = await Client.connect(port)
        try:
            for client in (first, second):
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await client.response()).status == 200
            async with await Client.connect(port) as third:
                assert await third.closed(timeout=1.0) == b""
            assert listener.rejected == 1
            for client in (first, second):  # the two kept connections still serve
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await client.response()).status == 200
            await first.close()
            await eventually(lambda: len(listener.connections) == 1, what="the first connection to go")
            assert (await get(port)).status == 200
        finally:
            await first.close()
            await second.close()


# -- TLS ------------------------------------------------------------------------------------------


async def test_tls_listener_terminates_tls_and_says_https(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    listener = f"    tls:\n      cert: {cert}\n      key: {key}\n"
    context = ssl.create_default_context(cafile=str(cert))
    async with proxied(tmp_path, listener) as (lb, backend):
        assert lb.bound["web"].scheme == "https"
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(lb), ssl=context, server_hostname="localhost")
        async with Client(reader, writer) as client:
            await client.send(b"GET /secure HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = await client.response()
        assert response.status == 200
        (request,) = backend.requests
        assert request.header_lines(b"X-Forwarded-Proto") == [b"https"]


# -- access log -----------------------------------------------------------------------------------


async def test_access_log_has_one_json_line_per_request(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    keys = {"time", "client", "method", "target", "status", "server", "bytes", "duration"}

    def lines() -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    async with proxied(tmp_path, f"    access_log: {path}\n") as (lb, _backend):
        async with await Client.connect(port_of(lb)) as client:
            for url in (b"/one", b"/two?x=1", b"/three"):
                await client.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % url)
                assert (await client.response()).status == 200
        await eventually(lambda: len(lines()) >= 3, what="three access log lines")
        records = [json.loads(line) for line in lines()]
    assert len(records) == 3
    for record, target in zip(records, ("/one", "/two?x=1", "/three"), strict=True):
        assert keys <= record.keys()
        assert record["method"] == "GET"
        assert record["target"] == target
        assert record["status"] == 200
        assert record["client"] == LOCALHOST
        assert record["server"] == "a"
        assert record["bytes"] == len(b"a")
        assert record["duration"] >= 0
