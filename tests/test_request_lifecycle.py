"""Defects of issue #14 in the life of a request, each reproduced at real sockets on 127.0.0.1.

Each test failed before its fix: a body after an upgrade request parsed as a request, trailers
without bound, a slow reader blaming the server, closed connections escaping max_connections,
responses produced for a client that reads none of them, a client left paused after an upload, a
pipelined body's deadline replacing the response deadline, a POST sent twice, and NTLM credentials
from the client leaving an authenticated connection in the shared pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import pytest

from lbproxy import flow
from lbproxy.flow import CLOSE_LINGER
from lbproxy.http_proxy import HttpListener, HttpProxy
from lbproxy.runtime import TICK
from tests.support import (
    LOCALHOST,
    Backend,
    Client,
    Request,
    buffered_for_clients,
    eventually,
    get,
    parse_responses,
    port_of,
    running,
)
from tests.test_http_hardening import lb_config, read_until_close, send_until_close

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: internal.example\r\n\r\n"


def farm_config(server: str, pool: str = "", listener: str = "") -> str:
    """lb_config with extra keys for the pool `farm` (`pool`, indented 4 spaces) and the listener."""
    return lb_config(server, listener) + pool


# Passive detection on (one failure takes the server down), with a probe too slow to matter here.
PASSIVE = "    passive:\n      consecutive_failures: 1\n    health:\n      type: tcp\n      interval: 60s\n"


def listener_of(lb: object) -> HttpListener:
    listener = lb.listeners["web"]  # type: ignore[attr-defined]
    assert isinstance(listener, HttpListener)
    return listener


# -- 1. an upgrade request with a body --------------------------------------------------------------


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
    ],
    ids=["h2c", "websocket"],
)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_upgrade_request_with_a_body_is_refused_never_parsed_as_a_request(
    tmp_path: Path, upgrade: bytes, framing: str
) -> None:
    if framing == "chunked":
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        length = b"Transfer-Encoding: chunked\r\n"
    else:
        body, length = SMUGGLED, b"Content-Length: %d\r\n" % len(SMUGGLED)
    attempt = b"POST /x HTTP/1.1\r\nHost: app\r\n" + upgrade + length + b"\r\n" + body
    async with Backend("a") as backend, running(lb_config(backend.address), tmp_path) as lb:
        received = await send_until_close(port_of(lb), attempt)
        assert [response.status for response in parse_responses(received)] == [400], received
        # The next client, on whatever connection lbproxy has to the server, is served whole.
        response = await get(port_of(lb), b"/next")
        assert response.status == 200
        assert [request.target for request in backend.requests] == [b"/next"]
        assert b"/admin" not in b"".join(bytes(raw) for raw in backend.raw)


# -- 2. trailers -------------------------------------------------------------------------------------

LIMITS = "    limits:\n      header_size: 8KiB\n      header_count: 20\n"


async def test_trailer_section_is_bounded_like_a_head(tmp_path: Path) -> None:
    """A trailer value sent in pieces gets 431 once it passes limits.header_size: nothing grows with it."""
    async with Backend("a") as backend, running(lb_config(backend.address, LIMITS), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n")
            await client.send(b"X-Trailer: ")
            closing = asyncio.ensure_future(read_until_close(client, timeout=5.0))
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 4 * 1024 * 1024 and not closing.done():  # 4 MiB at most, 1 KiB a write
                    await client.send(b"a" * 1024)
                    sent += 1024
                    await asyncio.sleep(0)
            received = await closing
        assert [response.status for response in parse_responses(received)] == [431], received[:200]
        assert sent < 256 * 1024, f"lbproxy read {sent} bytes of trailer before refusing"
        assert listener_of(lb).errors == {431: 1}
        assert (await get(port_of(lb))).status == 200


async def test_too_many_trailer_fields_get_431_and_a_few_are_fine(tmp_path: Path) -> None:
    head = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
    async with Backend("a") as backend, running(lb_config(backend.address, LIMITS), tmp_path) as lb:
        many = b"".join(b"X-T%d: v\r\n" % index for index in range(30)) + b"\r\n"
        received = await send_until_close(port_of(lb), head + many)
        assert [response.status for response in parse_responses(received)] == [431], received
        async with await Client.connect(port_of(lb)) as client:
            await client.send(head + b"X-T1: v\r\nX-T2: v\r\n\r\n")
            response = await client.response()
        assert response.status == 200
        assert [request.body for request in backend.requests] == [b"hello"]


# -- 3, 4. a client that does not read ---------------------------------------------------------------

BIG = 16 * 1024 * 1024


def big_response(request: Request, transport: asyncio.Transport) -> None:
    transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
    chunk = b"x" * (1024 * 1024)
    for _ in range(BIG // len(chunk)):
        transport.write(chunk)


async def test_a_client_that_stops_reading_is_blamed_not_the_server(tmp_path: Path) -> None:
    """The server is held back by the client: the response deadline runs out on the client, never the server."""
    config = farm_config("{a}", PASSIVE + "    timeouts:\n      response: 500ms\n")
    async with Backend("a", big_response) as backend, running(config, tmp_path, a=backend.address) as lb:
        server = lb.pools["farm"].servers[0]
        clients = [await Client.connect(port_of(lb)) for _ in range(3)]
        for client in clients:
            await client.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        # none of them reads: each is cut once its response has waited on it for the deadline
        await eventually(lambda: not listener_of(lb).connections, 5.0, "the stalled clients cut")
        assert server.failures == 0
        assert server.up
        assert server.consecutive_failures == 0
        assert listener_of(lb).errors == {}  # no 504: the server was not late
        for client in clients:
            await client.close()
        assert (await get(port_of(lb), b"/small")).status == 200


async def test_a_slow_but_steady_reader_gets_the_whole_response(tmp_path: Path) -> None:
    config = farm_config("{a}", "    timeouts:\n      response: 500ms\n")
    async with Backend("a", big_response) as backend, running(config, tmp_path, a=backend.address) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            received = 0
            started = time.monotonic()
            while received < BIG + 38 and time.monotonic() - started < 20:
                data = await asyncio.wait_for(client.reader.read(1024 * 1024), 5.0)
                if not data:
                    break
                received += len(data)
                await asyncio.sleep(0.05)  # reads at about 20 MiB/s at most: slower than the server writes
        assert received == BIG + len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
        assert lb.pools["farm"].servers[0].failures == 0


async def test_closed_connections_stay_counted_until_gone_and_are_aborted_at_the_linger_deadline(
    tmp_path: Path,
) -> None:
    """lbproxy closes each connection after a 4 MiB page that its client never reads."""
    page = tmp_path / "maintenance.html"
    page.write_bytes(b"<p>" + b"m" * (4 * 1024 * 1024) + b"</p>")
    listener = f"    max_connections: 5\n    maintenance_page: {page}\n"
    closed = socket.socket()  # a port with nothing behind it: no server is available
    closed.bind((LOCALHOST, 0))
    address = f"{LOCALHOST}:{closed.getsockname()[1]}"
    config = lb_config(address, listener) + "    health:\n      type: tcp\n      interval: 100ms\n"
    try:
        async with running(config, tmp_path) as lb:
            await eventually(lambda: not lb.pools["farm"].servers[0].up, 3.0, "the server down")
            web = listener_of(lb)
            clients = []
            for _ in range(5):
                client = await Client.connect(port_of(lb))
                client.writer.transport.pause_reading()  # type: ignore[attr-defined]
                await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                clients.append(client)
            await eventually(lambda: web.errors.get(503) == 5, 3.0, "five 503s")
            # Closed by lbproxy, their pages unread: still open, so still counted, and a sixth is refused.
            assert len(web.connections) == 5
            assert buffered_for_clients(web.connections) > 0
            rejected = web.rejected
            extra = await Client.connect(port_of(lb))
            await eventually(lambda: web.rejected == rejected + 1, 2.0, "the sixth connection refused")
            await extra.close()
            # After the linger deadline they are aborted: nothing is held for them any more.
            await eventually(lambda: not web.connections, CLOSE_LINGER + 4 * TICK + 1.0, "the linger deadline")
            for client in clients:
                client.writer.transport.resume_reading()  # type: ignore[attr-defined]
                with contextlib.suppress(ConnectionError):
                    data = await read_until_close(client, 3.0)
                    assert len(data) < 4 * 1024 * 1024  # cut short: the rest was dropped
                await client.close()
    finally:
        closed.close()


# -- 5. pipelined requests for a client that reads nothing -------------------------------------------


async def test_no_response_is_produced_for_a_client_that_reads_none(tmp_path: Path) -> None:
    body = b"r" * (100 * 1024)

    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async with Backend("a", respond) as backend, running(lb_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            client.writer.transport.pause_reading()  # type: ignore[attr-defined]
            await client.send(b"GET /p HTTP/1.1\r\nHost: a\r\n\r\n" * 1000)
            # The server is asked while the client's buffers fill, then never again until it reads.
            await eventually(
                lambda: listener_of(lb).connections and next(iter(listener_of(lb).connections)).client_busy,
                5.0,
                "the client seen as not reading",
            )
            asked = len(backend.requests)
            await asyncio.sleep(0.5)  # time in which a proxy that ignores the client would go on
            assert len(backend.requests) == asked < 100
            assert buffered_for_clients(listener_of(lb).connections) < 2 * 1024 * 1024
            client.writer.transport.resume_reading()  # type: ignore[attr-defined]
            responses = await client.responses(1000, timeout=30.0)
        assert len(responses) == 1000
        assert len(backend.requests) == 1000


# -- 6. a client paused while its upload filled the server connection --------------------------------


class EarlyAnswer(asyncio.Protocol):
    """Reads nothing until the test makes it answer; then reads (and answers GET /second)."""

    def __init__(self, connections: list[EarlyAnswer]) -> None:
        connections.append(self)
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.pause_reading()  # type: ignore[union-attr]

    def answer(self) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if b"GET /second" in self.received and self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")


async def test_client_is_not_left_paused_after_its_upload_filled_the_server_connection(tmp_path: Path) -> None:
    """The server answers while lbproxy holds more of the (whole) body than the server takes.

    That needs a body whose last read is the one that fills the server connection's buffer: too
    small and it never fills, too large and lbproxy stops reading the client before the body ends.
    The size is found by bisection, each try on new connections, before the behaviour is checked.
    """
    loop = asyncio.get_running_loop()
    connections: list[EarlyAnswer] = []
    listen = socket.socket()
    listen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # inherited, and no autotuning: steady
    listen.bind((LOCALHOST, 0))
    server = await loop.create_server(lambda: EarlyAnswer(connections), sock=listen)
    address = f"{LOCALHOST}:{listen.getsockname()[1]}"
    try:
        async with running(lb_config(address), tmp_path) as lb:
            web = listener_of(lb)

            def state(proxy: HttpProxy) -> str | None:
                """'filled' (the scenario), 'small', 'large', or None while it is unsettled."""
                active = proxy.active
                upstream = active.upstream if active is not None else None
                if active is None or upstream is None:
                    return None
                if active.request_done:
                    assert upstream.transport is not None
                    return "filled" if upstream.transport.get_write_buffer_size() > flow.HIGH_WATER else "small"
                return "large" if proxy.gate is not None and proxy.gate.reasons else None

            low, high = 16 * 1024, 16 * 1024 * 1024
            for _ in range(24):  # bisection over sizes: bounded in count
                size = (low + high) // 2
                before = set(web.connections)
                client = await Client.connect(port_of(lb))
                await client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
                client.writer.write(b"u" * size)
                await eventually(lambda before=before: bool(set(web.connections) - before), 3.0, "the try's connection")
                (proxy,) = set(web.connections) - before
                await eventually(lambda proxy=proxy: state(proxy) is not None, 5.0, "the upload to settle")
                settled = state(proxy)
                if settled == "filled":
                    break
                proxy.cut()  # this try is over: its server connection goes with it
                await client.close()
                if settled == "small":
                    low = size
                else:
                    high = size
            else:
                raise AssertionError("no body size filled the server connection: the scenario was not exercised")
            connections[-1].answer()
            first = await client.response(timeout=5.0)
            assert (first.status, first.body) == (200, b"early")
            await client.send(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
            second = await client.response(timeout=5.0)
            assert second.status == 200
            await client.close()
    finally:
        server.close()
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abort()


# -- a retry onto an idle connection reads the rest of the body -----------------------------------------


async def test_retry_onto_an_idle_connection_reads_the_rest_of_the_body(tmp_path: Path) -> None:
    """Found by the churn soak: the first server refuses, the retry reuses an idle connection, and the
    body still arriving must be read (it hung until the body deadline, 5 minutes by default)."""
    closed = socket.socket()  # a port with nothing behind it
    closed.bind((LOCALHOST, 0))
    config = f"""
listeners:
  - name: web
    bind: 127.0.0.1:0
    pool: farm
    timeouts: {{{{request_body: 4s}}}}
pools:
  farm:
    policy: round_robin
    retries: 2
    servers:
      - {{{{name: dead, address: "{LOCALHOST}:{closed.getsockname()[1]}"}}}}
      - {{{{name: live, address: "{{live}}"}}}}
"""
    try:
        async with Backend("live") as live, running(config, tmp_path, live=live.address) as lb:
            for index in range(4):  # whichever server the rotation starts on, the PUT meets dead first once
                assert (await get(port_of(lb), b"/warm-%d" % index)).status == 200  # an idle connection to live
                async with await Client.connect(port_of(lb)) as client:
                    await client.send(b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n0123456789")
                    # the rest of the body comes once the head is at live: after the retry, if there was one
                    await eventually(
                        lambda index=index: b"".join(live.raw).count(b"PUT /echo") == index + 1, 2.0, "the head at live"
                    )
                    await client.send(b"abcdefghij")
                    response = await client.response(timeout=2.0)
                assert response.status == 200
            puts = [request for request in live.requests if request.method == b"PUT"]
            assert [request.body for request in puts] == [b"0123456789abcdefghij"] * 4
    finally:
        closed.close()


# -- 7. a pipelined body does not replace the response deadline ---------------------------------------


async def test_hung_server_gets_504_even_with_a_pipelined_request_body_waiting(tmp_path: Path) -> None:
    async def hang(request: Request, transport: asyncio.Transport) -> None:
        await asyncio.Event().wait()

    config = farm_config(
        "{a}", PASSIVE + "    timeouts:\n      response: 1s\n", "    timeouts:\n      request_body: 300ms\n"
    )
    async with Backend("a", hang) as backend, running(config, tmp_path, a=backend.address) as lb:
        received = await send_until_close(
            port_of(lb),
            b"GET /hung HTTP/1.1\r\nHost: a\r\n\r\nPOST /next HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            timeout=5.0,
        )
        assert [response.status for response in parse_responses(received)] == [504], received
        assert lb.pools["farm"].servers[0].failures == 1  # passive detection heard of it


# -- 8. a POST is never sent twice -------------------------------------------------------------------


async def test_post_on_a_connection_the_server_closes_is_never_sent_twice(tmp_path: Path) -> None:
    """The server acts on a request that arrives on a used connection, then closes it unanswered."""
    served: set[int] = set()

    def respond(request: Request, transport: asyncio.Transport) -> None:
        if request.connection in served:
            transport.close()  # acted on (recorded), never answered: the kept-alive race, at its worst
            return
        served.add(request.connection)
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with Backend("a", respond) as backend, running(lb_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await client.response()).status == 200
            await client.send(b"POST /pay HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n100")
            response = await client.response()
        assert [request.target for request in backend.requests].count(b"/pay") == 1
        assert response.status == 200


# -- NTLM/Negotiate from the client ------------------------------------------------------------------


async def test_connection_carrying_client_negotiate_credentials_is_never_shared(tmp_path: Path) -> None:
    async with Backend("a") as backend, running(lb_config(backend.address), tmp_path) as lb:
        async with await Client.connect(port_of(lb)) as alice:
            await alice.send(
                b"GET /me HTTP/1.1\r\nHost: a\r\nAuthorization: Negotiate YIIGhgYGKwYBBQUCoIIGejCC\r\n\r\n"
            )
            assert (await alice.response()).status == 200
            for index in range(3):
                assert (await get(port_of(lb), b"/bob-%d" % index)).status == 200
            await alice.send(b"GET /me-again HTTP/1.1\r\nHost: a\r\n\r\n")
            assert (await alice.response()).status == 200
        connection_of = {request.target: request.connection for request in backend.requests}
        alice_connection = connection_of[b"/me"]
        assert connection_of[b"/me-again"] == alice_connection  # pinned to its client
        assert all(connection_of[b"/bob-%d" % index] != alice_connection for index in range(3))
