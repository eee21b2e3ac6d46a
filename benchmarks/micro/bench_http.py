"""The L7 hot path without sockets: a browser's request head parsed, checked and rebuilt by `HttpProxy`,
sent on a reused `UpstreamConnection`, and the server's response parsed and relayed back.

Stub transports stand in for both sockets, so one iteration is exactly the Python work lbproxy does
per keep-alive request; the event loop's and the kernel's share is left out. llhttp alone on the
same head, and `framing.ResponseHead` alone, show where that work goes.

The cycle can also run through a listener that steers (issue #15): with 10 host routes, the one the
request's Host matches written last, to a second pool (`routes`), or with a pool that keeps sessions
by cookie and a request that carries its server's cookie (`cookie`). benchmarks/instructions.py
counts all three; the plain one must keep working with checkouts that predate routing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import pytest
from conftest import BROWSER_REQUEST, RESPONSE, RESPONSE_HEAD, StubTransport, make_pool

from lbproxy import framing
from lbproxy.http_proxy import HttpListener, HttpProxy, UpstreamConnection
from lbproxy.pool import Pool


class _NoLoop:
    """The outbox's loop here: the cycle flushes by hand, and handles scheduled on a loop that never
    runs would pile up (and make the garbage collector's passes longer and longer)."""

    def call_soon(self, callback: Any) -> None:
        pass


LISTENERS = ("plain", "routes", "cookie")
# As benchmarks/macro.py's routed listener: hosts that neither request here sends, then a wildcard.
DECOY_HOSTS = (*(f"app{index}.example.com" for index in range(1, 9)), "*.apps.example.com")
COOKIE = "LBSRV"  # the default persistence cookie


def with_cookie(request: bytes, pair: bytes) -> bytes:
    """`request` carrying the cookie `pair` too: after the others on its Cookie line, or on a line of its own."""
    head, found, rest = request.partition(b"\r\nCookie: ")
    if found:
        line, crlf, after = rest.partition(b"\r\n")
        return head + found + line + b"; " + pair + crlf + after
    return request[:-2] + b"Cookie: " + pair + b"\r\n\r\n"


def routed_listener(loop: asyncio.AbstractEventLoop, request: bytes) -> tuple[HttpListener, Pool]:
    """A listener with 10 host routes, the last for the Host of `request`, and the pool that route leads to."""
    from lbproxy.routing import Match, RouteSpec, RouteTable, host_key  # absent before issue #15

    host = host_key(request.split(b"\r\nHost: ", 1)[1].split(b"\r\n", 1)[0]).decode()
    default, routed = make_pool("round_robin", 1), make_pool("round_robin", 1, name="routed")
    specs = [RouteSpec(f"decoy{index}", Match(host=h), pool="farm") for index, h in enumerate(DECOY_HOSTS, 1)]
    specs.append(RouteSpec("match", Match(host=host), pool="routed"))
    table = RouteTable(specs)
    pools = {"farm": default, "routed": routed}
    for route in table.routes:
        route.target = pools[route.pool_name]  # as runtime._route_table does
    return HttpListener("web", default, loop=loop, routes=table), routed


class Cycle:
    """A client connection and one idle server connection, wired through stub transports.

    `listener`: "plain" (no routes, no persistence), "routes" or "cookie" (see the module docstring).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, request: bytes = BROWSER_REQUEST, listener: str = "plain"
    ) -> None:
        if listener == "plain":
            pool = make_pool("round_robin", 1)
            self.listener = HttpListener("web", pool, loop=loop)
        elif listener == "routes":
            self.listener, pool = routed_listener(loop, request)
        elif listener == "cookie":
            from lbproxy.config import PersistenceConfig  # absent from checkouts before issue #15
            from lbproxy.persistence import cookie_value

            pool = make_pool("round_robin", 1, persistence=PersistenceConfig(type="cookie", cookie=COOKIE))
            request = with_cookie(request, COOKIE.encode() + b"=" + cookie_value("farm", pool.servers[0].name))
            self.listener = HttpListener("web", pool, loop=loop)
        else:
            raise ValueError(f"listener {listener!r}: one of {', '.join(LISTENERS)}")
        self.pool = pool  # the pool the request goes to
        self.listener.outbox.loop = _NoLoop()  # type: ignore[assignment]
        self.request = request
        self.client = StubTransport()
        self.proxy = HttpProxy(self.listener)
        self.proxy.connection_made(self.client)  # type: ignore[arg-type]
        self.server = pool.servers[0]
        self.upstream_transport = StubTransport()
        self.upstream = UpstreamConnection(self.server, self.listener)
        self.upstream.connection_made(self.upstream_transport)  # type: ignore[arg-type]
        self.listener.idle_for(self.server).put(self.upstream, loop.time())

    def __call__(self) -> None:
        outbox = self.listener.outbox  # writes wait for the end of a loop iteration: one per read here
        self.proxy.data_received(self.request)  # parse, check, rebuild, pick, write to the server
        outbox.flush()
        self.upstream.data_received(RESPONSE)  # parse, cut hop-by-hop, relay, back to the idle stack
        outbox.flush()


@pytest.mark.benchmark(group="http: request + response through HttpProxy")
def test_request_response_cycle(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    cycle = Cycle(loop)
    cycle()
    assert cycle.upstream_transport.last.startswith(b"GET /static/js/app.3f2a1c.js?v=124 HTTP/1.1\r\n")
    assert b"X-Forwarded-For: 192.0.2.10\r\n" in cycle.upstream_transport.last
    assert cycle.client.last.endswith(b"\r\n\r\nhello world\n")
    assert b"Connection: keep-alive" not in cycle.client.last
    benchmark(cycle)
    assert cycle.server.responses[2] == cycle.listener.requests  # every request answered 2xx...
    assert len(cycle.listener.idle_for(cycle.server)) == 1  # ...on the one reused server connection


@pytest.mark.benchmark(group="http: request + response through HttpProxy")
@pytest.mark.parametrize("listener", ["routes", "cookie"])
def test_request_response_cycle_steered(benchmark: Any, loop: asyncio.AbstractEventLoop, listener: str) -> None:
    """As test_request_response_cycle, through 10 host routes or a pool's cookie persistence (issue #15)."""
    cycle = Cycle(loop, listener=listener)
    cycle()
    sent = cycle.upstream_transport.last
    assert sent.startswith(b"GET /static/js/app.3f2a1c.js?v=124 HTTP/1.1\r\n")
    assert b"consent=yes\r\n" in sent
    assert COOKIE.encode() not in sent  # the persistence cookie is taken out before the server
    assert cycle.client.last.endswith(b"\r\n\r\nhello world\n")
    benchmark(cycle)
    assert cycle.server.responses[2] == cycle.listener.requests  # every request to the route's pool's server
    persistence = cycle.pool.persistence
    if persistence is not None:
        assert persistence.hits == cycle.listener.requests


class _Ignore:
    """A parser protocol with no callbacks: httptools then only runs llhttp."""


@pytest.mark.benchmark(group="http: request + response through HttpProxy")
def test_request_llhttp_alone(benchmark: Any) -> None:
    parser = httptools.HttpRequestParser(_Ignore())
    benchmark(parser.feed_data, BROWSER_REQUEST)


@pytest.mark.benchmark(group="http: response head")
def test_response_head(benchmark: Any) -> None:
    head = benchmark(framing.ResponseHead, RESPONSE_HEAD, False)
    assert b"Connection" not in head.head
    assert head.content_length
