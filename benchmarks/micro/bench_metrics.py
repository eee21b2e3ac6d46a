"""What metrics cost: a counter bump on the hot path is a plain int on a `Server`; a scrape builds every
family from those ints, here for 400 servers.

prometheus_client's own `Counter.inc()` (a lock and a float) is measured beside the plain bump to
show what lbproxy avoids by counting in ints and collecting at scrape time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from conftest import make_pool
from prometheus_client import CollectorRegistry, Counter, generate_latest

from lbproxy import metrics
from lbproxy.http_proxy import HttpListener
from lbproxy.pool import Pool
from lbproxy.tcp_proxy import TcpListener

BUMPS = 1000  # per benchmark call: one bump is below the timer's resolution


@pytest.mark.benchmark(group="metrics: 1000 counter increments")
def test_server_counter_bump(benchmark: Any) -> None:
    server = make_pool("round_robin", 1).servers[0]

    def bump() -> None:
        for _ in range(BUMPS):
            server.requests += 1

    benchmark(bump)
    assert isinstance(server.requests, int)
    assert server.requests >= BUMPS


@pytest.mark.benchmark(group="metrics: 1000 counter increments")
def test_prometheus_counter_inc(benchmark: Any) -> None:
    counter = Counter("bench_requests", "what lbproxy does not do per request", registry=CollectorRegistry())

    def inc() -> None:
        for _ in range(BUMPS):
            counter.inc()

    benchmark(inc)


class Source:
    """A stand-in for the runtime: what `metrics.Collector` reads."""

    def __init__(self, pools: Mapping[str, Pool], listeners: Mapping[str, HttpListener | TcpListener]) -> None:
        self.pools = pools
        self.listeners = listeners
        self.reloads = {"success": 3, "failure": 1}
        self.last_reload_ok = True


@pytest.mark.benchmark(group="metrics: scrape")
def test_scrape_400_servers(benchmark: Any, loop: asyncio.AbstractEventLoop) -> None:
    pool = make_pool("round_robin", 400)
    for index, server in enumerate(pool.servers):  # counters with realistic magnitudes
        server.requests = 1_000_000 + index
        server.responses = [0, 0, 990_000 + index, 5_000, 4_000, 1_000]
        server.sent_bytes = 800_000_000 + index
        server.received_bytes = 12_000_000_000 + index
    listeners: dict[str, HttpListener | TcpListener] = {
        "web": HttpListener("web", pool, loop=loop),
        "l4": TcpListener("l4", pool, loop=loop),
    }
    registry = metrics.registry(Source({"farm": pool}, listeners))
    text = benchmark(generate_latest, registry)
    assert text.count(b'lbproxy_server_up{pool="farm"') == 400
