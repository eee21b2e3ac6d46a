"""The L7 hot path without sockets: a browser's request head parsed, checked and rebuilt by `HttpProxy`,
sent on a reused `UpstreamConnection`, and the server's response parsed and relayed back.

Stub transports stand in for both sockets, so one iteration is exactly the Python work lbproxy does
per keep-alive request; the event loop's and the kernel's share is left out. llhttp alone on the
same head, and `framing.ResponseHead` alone, show where that work goes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import pytest
from conftest import BROWSER_REQUEST, RESPONSE, RESPONSE_HEAD, StubTransport, make_pool

from lbproxy import framing
from lbproxy.http_proxy import HttpListener, HttpProxy, UpstreamConnection


class _NoLoop:
    """The outbox's loop here: the cycle flushes by hand, and handles scheduled on a loop that never
    runs would pile up (and make the garbage collector's passes longer and longer)."""

    def call_soon(self, callback: Any) -> None:
        pass


class Cycle:
    """A client connection and one idle server connection, wired through stub transports."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes = BROWSER_REQUEST) -> None:
        pool = make_pool("round_robin", 1)
        self.listener = HttpListener("web", pool, loop=loop)
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
