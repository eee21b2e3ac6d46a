"""Routes of an http listener seen from real sockets: which back-end each request reaches, or its 4xx.

Every pool here has its own recording back-end (tests.support.Backend) that answers with its name,
so a response body says which pool a request was routed to, and the back-ends' records show what
reached them byte for byte. The route table itself is tested without I/O in tests/test_routing.py;
this file checks what a user sees: matching, order, the default pool, denies that cannot be walked
around or smuggled past, failover inside the routed pool, reloads under load, metrics and config
errors. Waits are on responses, closes or `eventually`; every load loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config import ConfigError, load, parse
from lbproxy.http_proxy import HttpListener
from lbproxy.runtime import Runtime
from tests.support import LOCALHOST, Backend, Client, Response, eventually, get, parse_responses, port_of, running

# -- helpers --------------------------------------------------------------------------------------


def http_listener(runtime: Runtime, name: str = "web") -> HttpListener:
    listener = runtime.listeners[name]
    assert isinstance(listener, HttpListener)
    return listener


class Dead:
    """A server address where nothing listens: connections to it are refused."""

    def __init__(self, name: str) -> None:
        self.name = name
        with socket.socket() as sock:
            sock.bind((LOCALHOST, 0))
            self.address = f"{LOCALHOST}:{sock.getsockname()[1]}"


Server = Backend | Dead


def pool(*servers: Server, backups: tuple[Server, ...] = (), **options: Any) -> dict[str, Any]:
    """A pool's YAML mapping: `servers`, then `backups` as `backup: true`, then `options`."""
    entries: list[dict[str, Any]] = [{"name": s.name, "address": s.address} for s in servers]
    entries += [{"name": s.name, "address": s.address, "backup": True} for s in backups]
    return {**options, "servers": entries}


def lbconfig(
    pools: dict[str, dict[str, Any]], routes: list[dict[str, Any]], admin: bool = False, **listener: Any
) -> str:
    """A config text: listener `web` on pool `web` with `routes` (the first pool of `pools` is `web`)."""
    document: dict[str, Any] = {}
    if admin:
        document["admin"] = {"bind": "127.0.0.1:0"}
    entry: dict[str, Any] = {"name": "web", "bind": "127.0.0.1:0", "pool": "web", **listener}
    if routes:
        entry["routes"] = routes
    document["listeners"] = [entry]
    document["pools"] = pools
    # tests.support.running() calls str.format on the text
    return yaml.safe_dump(document, sort_keys=False).replace("{", "{{").replace("}", "}}")


@contextlib.asynccontextmanager
async def backends(*names: str) -> AsyncIterator[dict[str, Backend]]:
    """One recording back-end per name, each answering 200 with its name."""
    async with contextlib.AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(Backend(name)) for name in names}


def head(method: bytes, target: bytes, host: bytes = b"test", fields: bytes = b"") -> bytes:
    body_framing = b"Content-Length: 0\r\n" if method in (b"POST", b"PUT") else b""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (method, target, host, fields, body_framing)


async def exchange(port: int, raw: bytes) -> Response:
    """One request (raw bytes) on a new connection, its response."""
    async with await Client.connect(port) as client:
        await client.send(raw)
        return await client.response()


async def refused_and_closed(port: int, raw: bytes) -> tuple[Response, bytes]:
    """Send `raw` on a new connection: the one response, after which lbproxy must close; and all bytes read."""
    async with await Client.connect(port) as client:
        await client.send(raw)
        response = await client.response()
        await client.closed()
        return response, bytes(client.received)


def total(pool_backends: dict[str, Backend]) -> int:
    return sum(len(backend.requests) for backend in pool_backends.values())


def only_whole_requests(backend: Backend) -> None:
    """Every byte a back-end received belongs to one of the requests it parsed: nothing extra, nothing cut."""
    for index, raw in enumerate(backend.raw):
        parsed = b"".join(request.raw for request in backend.requests if request.connection == index)
        assert bytes(raw) == parsed, f"{backend.name}: connection {index} carried more than its requests: {raw!r}"


# -- matching ---------------------------------------------------------------------------------------

POOLS = ("web", "api", "wild", "static", "regex", "canary", "debug", "writes", "combo")

ROUTES: list[dict[str, Any]] = [
    {"name": "canary", "match": {"header": {"X-Canary": "1"}}, "pool": "canary"},
    {"name": "debug", "match": {"header": {"X-Debug": {"present": True}}}, "pool": "debug"},
    {"name": "cart", "match": {"host": "shop.test", "path_prefix": "/cart/", "methods": ["POST"]}, "pool": "combo"},
    {"name": "api-host", "match": {"host": "api.example.com"}, "pool": "api"},
    {"name": "wild-host", "match": {"host": "*.example.com"}, "pool": "wild"},
    {"name": "static", "match": {"path_prefix": ["/static/", "/assets/"]}, "pool": "static"},
    {"name": "versioned", "match": {"path_regex": "^/v[0-9]+/items$"}, "pool": "regex"},
    {"name": "writes", "match": {"methods": ["PUT", "DELETE"]}, "pool": "writes"},
]

# (what it shows, method, target, Host, more header lines, the pool it must reach)
CASES: list[tuple[str, bytes, bytes, bytes, bytes, str]] = [
    ("exact host", b"GET", b"/", b"api.example.com", b"", "api"),
    ("exact host, case and port ignored", b"GET", b"/", b"API.Example.COM:8080", b"", "api"),
    ("exact host, trailing dot", b"GET", b"/", b"api.example.com.", b"", "api"),
    ("wildcard, one label", b"GET", b"/", b"www.example.com", b"", "wild"),
    ("wildcard, two labels", b"GET", b"/", b"a.b.example.com", b"", "wild"),
    ("wildcard, upper case with a port", b"GET", b"/", b"WWW.EXAMPLE.COM:81", b"", "wild"),
    ("wildcard never matches the bare domain", b"GET", b"/", b"example.com", b"", "web"),
    ("wildcard needs a whole label", b"GET", b"/", b"badexample.com", b"", "web"),
    ("a host that only contains the domain", b"GET", b"/", b"example.com.evil.test", b"", "web"),
    ("path prefix, first of a list", b"GET", b"/static/app.js", b"test", b"", "static"),
    ("path prefix, second of a list", b"GET", b"/assets/logo.png", b"test", b"", "static"),
    ("path prefix is not a word prefix", b"GET", b"/staticky", b"test", b"", "web"),
    ("path prefix, query ignored", b"GET", b"/static/?x=/y", b"test", b"", "static"),
    ("path regex", b"GET", b"/v2/items", b"test", b"", "regex"),
    ("path regex, query ignored", b"GET", b"/v12/items?page=3", b"test", b"", "regex"),
    ("path regex, on the normalized path", b"GET", b"/v2/%69tems", b"test", b"", "regex"),
    ("path regex anchored at the end", b"GET", b"/v2/items/7", b"test", b"", "web"),
    ("path regex anchored at the start", b"GET", b"/api/v2/items", b"test", b"", "web"),
    ("header value", b"GET", b"/", b"test", b"X-Canary: 1\r\n", "canary"),
    ("header name case-insensitive", b"GET", b"/", b"test", b"x-CANARY: 1\r\n", "canary"),
    ("header value exact", b"GET", b"/", b"test", b"X-Canary: 10\r\n", "web"),
    ("header present", b"GET", b"/", b"test", b"X-Debug: yes\r\n", "debug"),
    ("header present, empty value", b"GET", b"/", b"test", b"X-Debug:\r\n", "debug"),
    ("method PUT", b"PUT", b"/x", b"test", b"", "writes"),
    ("method DELETE", b"DELETE", b"/x", b"test", b"", "writes"),
    ("method not listed", b"GET", b"/x", b"test", b"", "web"),
    ("combined: all hold", b"POST", b"/cart/add", b"shop.test", b"", "combo"),
    ("combined: other method", b"GET", b"/cart/add", b"shop.test", b"", "web"),
    ("combined: other path", b"POST", b"/other", b"shop.test", b"", "web"),
    ("combined: other host", b"POST", b"/cart/add", b"other.test", b"", "web"),
    (
        "first match: a header route before an exact host",
        b"GET",
        b"/",
        b"api.example.com",
        b"X-Canary: 1\r\n",
        "canary",
    ),
    ("first match: a wildcard before a path prefix", b"GET", b"/static/x", b"www.example.com", b"", "wild"),
    ("no route matches: the listener's pool", b"GET", b"/nothing", b"nowhere.test", b"", "web"),
]


async def test_each_match_key_alone_and_combined(tmp_path: Path) -> None:
    async with (
        backends(*POOLS) as pools,
        running(lbconfig({n: pool(b) for n, b in pools.items()}, ROUTES), tmp_path) as lb,
    ):
        port = port_of(lb)
        for what, method, target, host, fields, expected in CASES:
            before = {name: len(backend.requests) for name, backend in pools.items()}
            response = await exchange(port, head(method, target, host, fields))
            assert (response.status, response.body) == (200, expected.encode()), what
            reached = {name for name, backend in pools.items() if len(backend.requests) != before[name]}
            assert reached == {expected}, what
            (request,) = pools[expected].requests[before[expected] :]
            assert (request.method, request.target) == (method, target), what
        counts = {route["name"]: route["requests"] for route in lb.listener_states()[0]["routes"]}
        assert counts == {
            "canary": 3,
            "debug": 2,
            "cart": 1,
            "api-host": 3,
            "wild-host": 4,
            "static": 3,
            "versioned": 3,
            "writes": 2,
        }


async def test_first_match_wins_a_wildcard_before_an_exact_host(tmp_path: Path) -> None:
    routes: list[dict[str, Any]] = [
        {"name": "wild-api", "match": {"host": "*.example.com", "path_prefix": "/api/"}, "pool": "wild"},
        {"name": "exact", "match": {"host": "api.example.com"}, "pool": "api"},
        {"name": "any-api", "match": {"path_prefix": "/api/"}, "pool": "static"},
    ]
    async with (
        backends("web", "wild", "api", "static") as pools,
        running(lbconfig({n: pool(b) for n, b in pools.items()}, routes), tmp_path) as lb,
    ):
        port = port_of(lb)
        expected = [
            (b"api.example.com", b"/api/x", b"wild"),  # the wildcard is written first
            (b"api.example.com", b"/x", b"api"),
            (b"other.test", b"/api/x", b"static"),
            (b"www.example.com", b"/x", b"web"),
        ]
        for host, target, name in expected:
            response = await get(port, target, host)
            assert (response.status, response.body) == (200, name), (host, target)


async def test_host_and_target_reach_the_server_byte_for_byte(tmp_path: Path) -> None:
    routes = [{"name": "static", "match": {"path_prefix": "/static/"}, "pool": "static"}]
    async with (
        backends("web", "static") as pools,
        running(lbconfig({n: pool(b) for n, b in pools.items()}, routes), tmp_path) as lb,
    ):
        # Routed on its normalized path (/static/~user/x.js), forwarded as it was written.
        target = b"/static/./a/../%7euser//x.js?q=%2F..&r=%41"
        raw = b"GET %s HTTP/1.1\r\nHost: Shop.Test:8443\r\nAccept: */*\r\n\r\n" % target
        response = await exchange(port_of(lb), raw)
        assert (response.status, response.body) == (200, b"static")
        (request,) = pools["static"].requests
        assert request.target == target
        assert request.raw.startswith(b"GET %s HTTP/1.1\r\nHost: Shop.Test:8443\r\nAccept: */*\r\n" % target)
        assert request.header_lines(b"host") == [b"Shop.Test:8443"]
        assert pools["web"].requests == []


# -- deny ---------------------------------------------------------------------------------------------

DENY_ROUTES: list[dict[str, Any]] = [
    {"name": "service-center", "match": {"path_prefix": "/ServiceCenter/"}, "deny": 403},
    {"name": "api", "match": {"path_prefix": "/api/"}, "pool": "api"},
    {"name": "admin-host", "match": {"host": "admin.test"}, "deny": 404},
]

EVASIONS = [
    b"/ServiceCenter/",
    b"/ServiceCenter/login?next=/",
    b"/x/../ServiceCenter/",
    b"/./ServiceCenter/a",
    b"/%53erviceCenter/",
    b"/%53ervice%43enter/a",
    b"//ServiceCenter/",
    b"/%2FServiceCenter/",
    b"/ServiceCenter%2Fa",
    b"/ServiceCenter%2fa",
    b"/api/../ServiceCenter/",
    b"/ServiceCenter//",
    b"http://test/ServiceCenter/",  # absolute-form: its path is what is matched
    b"http://test//%53erviceCenter/x?y",
]


async def test_deny_answers_its_status_however_the_path_is_spelled(tmp_path: Path) -> None:
    async with (
        backends("web", "api") as pools,
        running(lbconfig({n: pool(b) for n, b in pools.items()}, DENY_ROUTES), tmp_path) as lb,
    ):
        port = port_of(lb)
        for target in EVASIONS:
            response, received = await refused_and_closed(port, b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % target)
            assert response.status == 403, target
            assert len(parse_responses(received)) == 1, target
        assert total(pools) == 0, [r.target for b in pools.values() for r in b.requests]
        assert pools["web"].accepted == pools["api"].accepted == 0
        # a path that only starts like the denied one goes on
        for target, name in [(b"/ServiceCenterX", b"web"), (b"/ServiceCenter", b"web"), (b"/api/x", b"api")]:
            response = await get(port, target)
            assert (response.status, response.body) == (200, name), target
        assert [r.target for r in pools["web"].requests] == [b"/ServiceCenterX", b"/ServiceCenter"]
        # a denied host, however written; an absolute-form target cannot name it behind another Host
        for raw, status in [
            (b"GET / HTTP/1.1\r\nHost: ADMIN.test:80\r\n\r\n", 404),
            (b"GET /x HTTP/1.1\r\nHost: admin.test.\r\n\r\n", 404),
            (b"GET http://admin.test/ HTTP/1.1\r\nHost: test\r\n\r\n", 400),
        ]:
            response, _ = await refused_and_closed(port, raw)
            assert response.status == status, raw
        assert total(pools) == 3
        assert http_listener(lb).errors == {403: len(EVASIONS), 404: 2, 400: 1}
        counts = {route["name"]: route["requests"] for route in lb.listener_states()[0]["routes"]}
        assert counts == {"service-center": len(EVASIONS), "api": 1, "admin-host": 2}


INNER = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"  # a whole request, as a body

SMUGGLED = {
    "content-length": b"Content-Length: %d\r\n\r\n%s" % (len(INNER), INNER),
    "chunked": b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(INNER), INNER),
    # the length covers a part of the body only: what follows would be read as the next request
    "content-length short": b"Content-Length: 4\r\n\r\n" + INNER[:4] + INNER,
}


@pytest.mark.parametrize("rest", SMUGGLED.values(), ids=SMUGGLED.keys())
async def test_a_denied_request_with_a_body_reaches_no_server(tmp_path: Path, rest: bytes) -> None:
    async with (
        backends("web", "api") as pools,
        running(lbconfig({n: pool(b) for n, b in pools.items()}, DENY_ROUTES), tmp_path) as lb,
    ):
        raw = b"POST /ServiceCenter/upload HTTP/1.1\r\nHost: test\r\n" + rest
        response, received = await refused_and_closed(port_of(lb), raw)
        assert response.status == 403
        assert [r.status for r in parse_responses(received)] == [403]  # never a second answer, to /admin
        # and pipelined behind a request that goes on: that one is answered, the denied one closes it
        async with await Client.connect(port_of(lb)) as client:
            await client.send(
                b"GET /first HTTP/1.1\r\nHost: test\r\n\r\n" + raw + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n"
            )
            first, denied = await client.responses(2)
            assert (first.status, first.body, denied.status) == (200, b"web", 403)
            await client.closed()
            assert len(parse_responses(bytes(client.received))) == 2
        assert [r.target for r in pools["web"].requests] == [b"/first"]
        assert pools["api"].requests == []
        only_whole_requests(pools["web"])


async def test_a_routing_header_named_in_connection_goes_as_one_request(tmp_path: Path) -> None:
    routes = [{"name": "canary", "match": {"header": {"X-Canary": "1"}}, "pool": "canary"}]
    async with (
        backends("web", "canary") as pools,
        running(lbconfig({n: pool(b) for n, b in pools.items()}, routes), tmp_path) as lb,
    ):
        async with await Client.connect(port_of(lb)) as client:
            await client.send(
                b"GET /one HTTP/1.1\r\nHost: test\r\nConnection: X-Canary\r\nX-Canary: 1\r\n\r\n"
                b"POST /two HTTP/1.1\r\nHost: test\r\nConnection: keep-alive, X-Canary\r\nX-Canary: 1\r\n"
                b"Content-Length: %d\r\n\r\n%s"
                b"GET /three HTTP/1.1\r\nHost: test\r\n\r\n" % (len(INNER), INNER)
            )
            responses = await client.responses(3)
        assert [(r.status, r.body) for r in responses] == [(200, b"canary"), (200, b"canary"), (200, b"web")]
        canary, web = pools["canary"].requests, pools["web"].requests
        assert [(r.method, r.target) for r in canary] == [(b"GET", b"/one"), (b"POST", b"/two")]
        assert [r.target for r in web] == [b"/three"]
        assert canary[0].body == b""
        assert canary[1].body == INNER
        for request in canary:
            # RFC 9110 §7.6.1: a field the client names in Connection is hop-by-hop
            assert request.header(b"x-canary") is None, request.raw
            assert b"x-canary" not in (request.header(b"connection") or b"").lower(), request.raw
        only_whole_requests(pools["canary"])
        only_whole_requests(pools["web"])


# -- failover inside the routed pool ---------------------------------------------------------------

HEALTH = {"type": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 1, "start": "down"}


async def test_a_routed_pool_whose_servers_are_down_fails_over_in_its_own_order(tmp_path: Path) -> None:
    page = tmp_path / "maintenance.html"
    page.write_bytes(b"<h1>back soon</h1>")
    async with backends("web", "api-backup", "spare") as live:
        pools = {
            "web": pool(live["web"]),
            "api": pool(Dead("api-1"), Dead("api-2"), backups=(live["api-backup"],), health=HEALTH),
            "shop": pool(Dead("shop-1"), health=HEALTH, backup_pool="spare"),
            "spare": pool(live["spare"]),
            "gone": pool(Dead("gone-1"), health=HEALTH),
        }
        routes: list[dict[str, Any]] = [
            {"name": "api", "match": {"path_prefix": "/api/"}, "pool": "api"},
            {"name": "shop", "match": {"path_prefix": "/shop/"}, "pool": "shop"},
            {"name": "gone", "match": {"path_prefix": "/gone/"}, "pool": "gone"},
        ]
        config = lbconfig(pools, routes, maintenance_page=str(page))
        async with running(config, tmp_path) as lb:
            backup = lb.server("api", "api-backup")
            await eventually(lambda: backup.up, what="the api pool's backup server up")
            assert not lb.server("api", "api-1").up
            assert not lb.server("api", "api-2").up
            port = port_of(lb)
            for index in range(3):
                response = await get(port, b"/api/%d" % index)
                assert (response.status, response.body) == (200, b"api-backup")
                response = await get(port, b"/shop/%d" % index)
                assert (response.status, response.body) == (200, b"spare")
                response = await get(port, b"/gone/%d" % index)
                assert response.status == 503
                assert response.body == b"<h1>back soon</h1>"
            response = await get(port, b"/other")
            assert (response.status, response.body) == (200, b"web")
            # nothing of the routed pools spilled into the listener's own pool
            assert [r.target for r in live["web"].requests] == [b"/other"]
            assert http_listener(lb).errors.get(503) == 3


async def test_retries_stay_within_the_routed_pool(tmp_path: Path) -> None:
    async with backends("web", "api") as live:
        pools = {"web": pool(live["web"]), "api": pool(Dead("dead"), live["api"], retries=2)}
        routes = [{"name": "api", "match": {"path_prefix": "/api/"}, "pool": "api"}]
        async with running(lbconfig(pools, routes), tmp_path) as lb:
            for index in range(4):
                response = await get(port_of(lb), b"/api/%d" % index)
                assert (response.status, response.body) == (200, b"api")
            assert [r.target for r in live["api"].requests] == [b"/api/%d" % i for i in range(4)]
            assert live["web"].requests == []
            # round robin sends some of them to the dead server first: retried, in pool api only
            assert lb.pools["api"].retried >= 2
            assert lb.pools["web"].retried == 0


# -- reload -------------------------------------------------------------------------------------------


@dataclass
class Load:
    """What a keep-alive load saw: the body of each response by target, and every error."""

    done: int = 0
    seen: dict[bytes, list[bytes]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


TARGETS = (b"/api/x", b"/new/x", b"/other")


async def keep_alive_load(port: int, clients: int, seconds: float, limit: int, load: Load, stop: asyncio.Event) -> None:
    """`clients` keep-alive connections cycling through TARGETS until `stop`, for `seconds` or `limit` each."""
    until = time.monotonic() + seconds

    async def one(offset: int) -> None:
        async with await Client.connect(port) as client:
            for index in range(limit):
                if stop.is_set() or time.monotonic() >= until:
                    break
                target = TARGETS[(index + offset) % len(TARGETS)]
                try:
                    await client.send(b"GET %s HTTP/1.1\r\nHost: test\r\n\r\n" % target)
                    response = await client.response(timeout=5.0)
                except (OSError, TimeoutError) as error:
                    load.errors.append(f"after {load.done} responses: {error!r}")
                    return
                load.done += 1
                if response.status != 200:
                    load.errors.append(f"{target!r}: {response.status} {response.body[:100]!r}")
                load.seen.setdefault(target, []).append(response.body)

    await asyncio.gather(*(one(offset) for offset in range(clients)))


def write_config(directory: Path, text: str) -> None:
    """Replace the config file that `running()` wrote (same dedent and `{name}` rules)."""
    (directory / "lbproxy.yaml").write_text(textwrap.dedent(text).format())


async def test_reload_adds_and_removes_a_route_under_load(tmp_path: Path) -> None:
    async with backends("web", "api", "fresh") as live:
        pools = {name: pool(backend) for name, backend in live.items()}
        api = {"name": "api", "match": {"path_prefix": "/api/"}, "pool": "api"}
        new = {"name": "new", "match": {"path_prefix": "/new/"}, "pool": "fresh"}
        async with running(lbconfig(pools, [api]), tmp_path) as lb:
            port = port_of(lb)
            # a keep-alive connection opened before the reloads: each request on it uses the table of its time
            async with await Client.connect(port) as old:
                await old.send(b"GET /new/a HTTP/1.1\r\nHost: test\r\n\r\n")
                assert (await old.response()).body == b"web"
                load = Load()
                stop = asyncio.Event()
                task = asyncio.ensure_future(
                    keep_alive_load(port, clients=4, seconds=8.0, limit=2000, load=load, stop=stop)
                )
                try:
                    await eventually(lambda: load.done >= 100, what="the load to get going")
                    write_config(tmp_path, lbconfig(pools, [api, new]))
                    assert await lb.reload() == []
                    at_first = load.done
                    await old.send(b"GET /new/b HTTP/1.1\r\nHost: test\r\n\r\n")
                    assert (await old.response()).body == b"fresh"
                    await eventually(lambda: load.done >= at_first + 100, what="the load to go on after the reload")
                    assert b"fresh" in load.seen[b"/new/x"]

                    write_config(tmp_path, lbconfig(pools, [new]))
                    assert await lb.reload() == []
                    at_second = load.done
                    await old.send(b"GET /api/c HTTP/1.1\r\nHost: test\r\n\r\n")
                    assert (await old.response()).body == b"web"
                    api_seen = len(load.seen[b"/api/x"])
                    await eventually(
                        lambda: load.done >= at_second + 100, what="the load to go on after the second reload"
                    )
                    stop.set()
                    await task
                finally:
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            assert load.errors == [], load.errors[:5]
            assert load.done > at_second + 100
            # /new/ went to the listener's pool, then to the new route's pool, never back
            new_bodies = load.seen[b"/new/x"]
            first_fresh = new_bodies.index(b"fresh")
            assert set(new_bodies[:first_fresh]) == {b"web"}
            assert set(new_bodies[first_fresh:]) == {b"fresh"}
            # /api/ went to pool api, then, its route removed, to the listener's pool
            api_bodies = load.seen[b"/api/x"]
            first_web = api_bodies.index(b"web")
            assert first_web <= api_seen
            assert set(api_bodies[:first_web]) == {b"api"}
            assert set(api_bodies[first_web:]) == {b"web"}
            assert set(load.seen[b"/other"]) == {b"web"}
            assert lb.reloads == {"success": 2, "failure": 0}
            (state,) = lb.listener_states()
            (route,) = state["routes"]
            assert route["name"] == "new"
            assert route["requests"] == len([b for b in new_bodies if b == b"fresh"]) + 1  # and /new/b


# -- metrics and the admin API ----------------------------------------------------------------------


async def test_route_requests_in_metrics_and_the_admin_api(tmp_path: Path) -> None:
    routes: list[dict[str, Any]] = [
        {"name": "api", "match": {"path_prefix": "/api/"}, "pool": "api"},
        {"name": "blocked", "match": {"path_prefix": "/blocked/"}, "deny": 403},
        {"name": "idle", "match": {"host": "idle.test"}, "pool": "api"},
    ]
    async with (
        backends("web", "api") as live,
        running(lbconfig({n: pool(b) for n, b in live.items()}, routes, admin=True), tmp_path) as lb,
        aiohttp.ClientSession() as session,
    ):
        port = port_of(lb)
        for index in range(3):
            assert (await get(port, b"/api/%d" % index)).status == 200
        for _ in range(2):
            assert (await get(port, b"/blocked/x")).status == 403
        assert (await get(port, b"/")).body == b"web"
        bound = lb.bound["admin"]
        base = f"http://{bound.host}:{bound.port}"
        async with session.get(f"{base}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, frozenset(sample.labels.items())] = sample.value
                types[sample.name] = family.type
        assert types["lbproxy_route_requests_total"] == "counter"
        routed = {
            dict(labels)["route"]: value
            for (name, labels), value in samples.items()
            if name == "lbproxy_route_requests_total" and dict(labels)["listener"] == "web"
        }
        assert routed == {"api": 3, "blocked": 2, "idle": 0}
        assert samples["lbproxy_listener_errors_total", frozenset({("listener", "web"), ("status", "403")})] == 2
        # a deny is counted as lbproxy's own error, as a malformed request is, not as a request sent on
        assert samples["lbproxy_listener_requests_total", frozenset({("listener", "web")})] == 4

        async with session.get(f"{base}/api/v1/listeners") as response:
            assert response.status == 200
            document = await response.json()
        (listener,) = document["listeners"]
        assert listener["routes"] == [
            {"name": "api", "pool": "api", "deny": None, "requests": 3},
            {"name": "blocked", "pool": None, "deny": 403, "requests": 2},
            {"name": "idle", "pool": "api", "deny": None, "requests": 0},
        ]


# -- config check -------------------------------------------------------------------------------------

CONFIG = """\
listeners:
  - name: web
    bind: 127.0.0.1:8080
    pool: farm
    routes:
{routes}
pools:
  farm:
    servers:
      - name: a
        address: 10.0.0.1:80
  api:
    servers:
      - name: b
        address: 10.0.0.2:80
"""


def problems(routes: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(CONFIG.format(routes=textwrap.indent(textwrap.dedent(routes), "      ")), "lbproxy.yaml", {})
    return [str(problem) for problem in caught.value.problems]


def test_config_route_to_an_unknown_pool() -> None:
    assert problems(
        """\
        - name: r
          match: {path_prefix: /x/}
          pool: nowhere
        """
    ) == ["lbproxy.yaml:8: listeners[0].routes[0].pool: no pool named 'nowhere' (pools: farm, api)"]


def test_config_shadowed_route_names_both_routes() -> None:
    (problem,) = problems(
        """\
        - name: everything-api
          match: {path_prefix: /api/}
          pool: api
        - name: api-v2
          match: {path_prefix: /api/v2/, methods: [GET]}
          pool: farm
        """
    )
    assert problem == (
        "lbproxy.yaml:9: listeners[0].routes[1]: route 1 (api-v2) can never match: "
        "route 0 (everything-api) matches every request it would match first"
    )


def test_config_a_wildcard_shadows_an_exact_host_below_it() -> None:
    (problem,) = problems(
        """\
        - name: wild
          match: {host: "*.example.com"}
          pool: api
        - name: exact
          match: {host: Api.Example.com}
          pool: farm
        """
    )
    assert problem == (
        "lbproxy.yaml:9: listeners[0].routes[1]: route 1 (exact) can never match: "
        "route 0 (wild) matches every request it would match first"
    )


def test_config_invalid_regex() -> None:
    assert problems(
        """\
        - name: bad
          match:
            path_regex: "^/(unclosed"
          pool: api
        """
    ) == [
        "lbproxy.yaml:8: listeners[0].routes[0].match.path_regex: invalid regular expression: "
        "missing ), unterminated subpattern at position 2"
    ]


def test_config_deny_takes_a_4xx_only(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.yaml"
    routes = "- name: old\n  match: {path_prefix: /old/}\n  deny: 302\n"
    path.write_text(CONFIG.format(routes=textwrap.indent(routes, "      ")))
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"{path}:8: listeners[0].routes[0].deny: deny takes a 4xx status (403, 404, 429...), not 302"
    ]


def test_config_accepts_routes_and_denies() -> None:
    config = parse(
        CONFIG.format(
            routes="""\
      - name: api
        match: {host: "*.Example.com", path_prefix: [/api/, /v1/], header: {X-Canary: {present: true}}}
        pool: api
      - match: {path_regex: '^/admin', methods: [GET, POST]}
        deny: 404
"""
        ),
        "lbproxy.yaml",
        {},
    )
    api, admin = config.listeners[0].routes
    assert (api.name, api.pool, api.deny) == ("api", "api", None)
    assert (api.match.host, api.match.path_prefix, api.match.header) == (
        "*.example.com",
        ("/api/", "/v1/"),
        (("x-canary", None),),
    )
    assert (admin.name, admin.pool, admin.deny, admin.match.methods) == ("1", None, 404, frozenset({"GET", "POST"}))
