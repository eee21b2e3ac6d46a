"""Session persistence seen from real sockets: which back-end each client sticks to, and what it sees.

lbproxy runs on 127.0.0.1 in front of recording back-ends (tests.support.Backend) that answer with
their name, so a response body says which server took a request and the back-ends' records show the
head that reached them. Pools use round robin, so that a request that persistence does not steer
visibly alternates between servers. Other client addresses than 127.0.0.1 are given with a PROXY
header on listeners that accept one. The cookie jar and the hashing are tested without I/O in
tests/test_persistence.py; here: the cookie's attributes, stickiness, its removal from the head,
drain, disable, forged cookies, failures, metrics, source_ip over http and tcp, the header key, and
Cookie headers written to confuse. Waits are on responses or `eventually`; loops are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import ssl
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.http_proxy import HttpListener
from lbproxy.persistence import Rendezvous, cookie_value
from lbproxy.runtime import Runtime
from tests.support import LOCALHOST, Backend, Client, Request, Response, port_of, running

COOKIE_LINE = re.compile(rb"LBSRV=([0-9a-f]{16}); Path=/; HttpOnly; SameSite=Lax(; Max-Age=(\d+))?")


# -- helpers --------------------------------------------------------------------------------------


def http_listener(runtime: Runtime, name: str = "web") -> HttpListener:
    listener = runtime.listeners[name]
    assert isinstance(listener, HttpListener)
    return listener


def lbconfig(
    persistence: dict[str, Any],
    servers: dict[str, Backend],
    admin: bool = False,
    listeners: list[dict[str, Any]] | None = None,
) -> str:
    """A config text: pool `farm` of `servers` with `persistence`, behind listener `web` (or `listeners`)."""
    document: dict[str, Any] = {}
    if admin:
        document["admin"] = {"bind": "127.0.0.1:0"}
    document["listeners"] = listeners or [{"name": "web", "bind": "127.0.0.1:0", "pool": "farm"}]
    document["pools"] = {
        "farm": {
            "persistence": persistence,
            "servers": [{"name": name, "address": backend.address} for name, backend in servers.items()],
        }
    }
    # tests.support.running() calls str.format on the text
    return yaml.safe_dump(document, sort_keys=False).replace("{", "{{").replace("}", "}}")


@contextlib.asynccontextmanager
async def backends(*names: str) -> AsyncIterator[dict[str, Backend]]:
    """One recording back-end per name, each answering 200 with its name."""
    async with contextlib.AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(Backend(name)) for name in names}


def value(name: str) -> bytes:
    """The cookie value that names server `name` of pool `farm`."""
    return cookie_value("farm", name)


def set_cookies(response: Response) -> list[bytes]:
    return [v for k, v in response.headers if k.lower() == b"set-cookie"]


def sticks_to(response: Response) -> bytes:
    """The server the response's one Set-Cookie names; checks it is lbproxy's, and names the server that answered."""
    (line,) = set_cookies(response)
    match = COOKIE_LINE.fullmatch(line)
    assert match is not None, line
    assert match.group(1) == value(response.body.decode()), (line, response.body)
    return response.body


async def send(port: int, raw: bytes) -> Response:
    """One request (raw bytes) on a new connection, its response."""
    async with await Client.connect(port) as client:
        await client.send(raw)
        return await client.response()


def request(target: bytes = b"/", cookie: bytes | None = None, fields: bytes = b"") -> bytes:
    cookie_field = b"Cookie: %s\r\n" % cookie if cookie is not None else b""
    return b"GET %s HTTP/1.1\r\nHost: test\r\n%s%s\r\n" % (target, cookie_field, fields)


def last(backend: Backend) -> Request:
    return backend.requests[-1]


def expected_server(key: bytes, names: tuple[str, ...] = ("a", "b")) -> bytes:
    """Where consistent hashing sends `key` while no server is loaded (requests one after another)."""
    ring = Rendezvous(list(names), str, lambda _: 1.0)
    return ring.order(key)[0].encode()


def proxy_v1(client_ip: str) -> bytes:
    return b"PROXY TCP4 %s 127.0.0.1 40000 80\r\n" % client_ip.encode()


def only_whole_requests(backend: Backend) -> None:
    """Every byte a back-end received belongs to one of the requests it parsed: nothing extra, nothing cut."""
    for index, raw in enumerate(backend.raw):
        parsed = b"".join(r.raw for r in backend.requests if r.connection == index)
        assert bytes(raw) == parsed, f"{backend.name}: connection {index} carried more than its requests: {raw!r}"


def without_forwarded(raw: bytes) -> list[bytes]:
    """The head lines of a raw request, X-Forwarded-* left out."""
    head, _, _ = raw.partition(b"\r\n\r\n")
    return [line for line in head.split(b"\r\n") if not line.lower().startswith(b"x-forwarded-")]


# -- cookie ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_age", "seconds"), [(None, None), ("8h", b"28800")])
async def test_the_first_response_sets_the_cookie(tmp_path: Path, max_age: str | None, seconds: bytes | None) -> None:
    persistence: dict[str, Any] = {"type": "cookie"}
    if max_age is not None:
        persistence["max_age"] = max_age
    async with backends("a", "b") as servers, running(lbconfig(persistence, servers), tmp_path) as lb:
        first, second = await send(port_of(lb), request()), await send(port_of(lb), request())
        # two new clients: round robin, each told which server it now sticks to
        assert {first.body, second.body} == {b"a", b"b"}
        for response in (first, second):
            (line,) = set_cookies(response)
            match = COOKIE_LINE.fullmatch(line)
            assert match is not None, line
            assert match.group(1) == value(response.body.decode())
            assert match.group(3) == seconds
        assert len(lb.listeners["web"].connections) <= 2


async def test_a_client_with_the_cookie_sticks_to_its_server(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        port = port_of(lb)
        first = await send(port, request())
        name = sticks_to(first)
        cookie = b"LBSRV=" + value(name.decode())
        served = len(servers[name.decode()].requests)
        bodies: list[bytes] = []
        # 50 on one keep-alive connection, 50 on 10 new connections of 5
        async with await Client.connect(port) as client:
            for index in range(50):
                await client.send(request(b"/k%d" % index, cookie))
                response = await client.response()
                assert set_cookies(response) == [], index
                bodies.append(response.body)
        for connection in range(10):
            async with await Client.connect(port) as client:
                for index in range(5):
                    await client.send(request(b"/n%d/%d" % (connection, index), cookie))
                    response = await client.response()
                    assert set_cookies(response) == [], (connection, index)
                    bodies.append(response.body)
        assert bodies == [name] * 100
        assert len(servers[name.decode()].requests) == served + 100
        # without the cookie, the same client alternates: it was the cookie that held it; each
        # response of a pipeline names its own server
        async with await Client.connect(port) as client:
            await client.send(request() * 4)
            alternating = [sticks_to(r) for r in await client.responses(4)]
        assert set(alternating) == {b"a", b"b"}


COOKIE_CASES = [
    # (the Cookie header lines the client sends, with {v} for the persistence cookie; what the server gets)
    ([b"a=1; LBSRV={v}; b=2"], [b"a=1; b=2"]),
    ([b"LBSRV={v}"], []),
    ([b"LBSRV={v}; a=1"], [b"a=1"]),
    ([b"a=1; LBSRV={v}"], [b"a=1"]),
    ([b"a=1;LBSRV={v};b=2"], [b"a=1;b=2"]),
    ([b"XLBSRV=2; LBSRV={v}; LBSRVX=3; lbsrv=4"], [b"XLBSRV=2; LBSRVX=3; lbsrv=4"]),
    ([b"a=1", b"LBSRV={v}"], [b"a=1"]),
    ([b"LBSRV={v}", b"b=2;  c=3"], [b"b=2;  c=3"]),
]


async def test_the_cookie_never_reaches_the_server_the_others_arrive_byte_exact(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        for lines, expected in COOKIE_CASES:
            for name in ("a", "b"):
                fields = b"".join(b"Cookie: %s\r\n" % line.replace(b"{v}", value(name)) for line in lines)
                raw = b"GET /c?x=1 HTTP/1.1\r\nHost: test\r\nAccept: */*\r\n%sX-After: yes\r\n\r\n" % fields
                response = await send(port_of(lb), raw)
                assert (response.status, response.body, set_cookies(response)) == (200, name.encode(), []), lines
                received = last(servers[name])
                assert received.header_lines(b"cookie") == expected, lines
                assert value(name) not in received.raw, received.raw
                # the rest of the head byte for byte: the request line and the other fields in their order
                kept = [b"Cookie: " + line for line in expected]
                assert without_forwarded(received.raw) == [
                    b"GET /c?x=1 HTTP/1.1",
                    b"Host: test",
                    b"Accept: */*",
                    *kept,
                    b"X-After: yes",
                ], lines


async def test_a_draining_server_keeps_its_cookie_users_and_gets_no_new_ones(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        port = port_of(lb)
        lb.drain(lb.server("farm", "a"))
        for index in range(20):
            response = await send(port, request(b"/old%d" % index, b"LBSRV=" + value("a")))
            assert (response.body, set_cookies(response)) == (b"a", []), index
        for index in range(20):
            response = await send(port, request(b"/new%d" % index))
            assert response.body == b"b", index
            assert sticks_to(response) == b"b"
        assert [r.target for r in servers["a"].requests] == [b"/old%d" % i for i in range(20)]
        # back to enabled: new users are shared again
        lb.enable(lb.server("farm", "a"))
        names = {(await send(port, request())).body for _ in range(4)}
        assert names == {b"a", b"b"}


async def test_disabling_a_server_moves_its_users_with_a_new_cookie(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        port = port_of(lb)
        old = b"LBSRV=" + value("a")
        async with await Client.connect(port) as kept:  # a keep-alive client of a, from before the disable
            await kept.send(request(b"/before", old))
            assert (await kept.response()).body == b"a"
            lb.disable(lb.server("farm", "a"))
            await kept.send(request(b"/after", old))
            moved = await kept.response()
            assert (moved.status, moved.body) == (200, b"b")
            assert sticks_to(moved) == b"b"
        for index in range(10):
            response = await send(port, request(b"/old%d" % index, old))
            assert (response.status, response.body) == (200, b"b")
            assert sticks_to(response) == b"b"  # until the client uses its new cookie
            response = await send(port, request(b"/new%d" % index, b"LBSRV=" + value("b")))
            assert (response.status, response.body, set_cookies(response)) == (200, b"b", [])
        assert [r.target for r in servers["a"].requests] == [b"/before"]
        assert http_listener(lb).errors == {}
        # enabled again, its old cookie leads to it again
        lb.enable(lb.server("farm", "a"))
        response = await send(port, request(b"/back", old))
        assert (response.body, set_cookies(response)) == (b"a", [])


async def test_a_forged_or_foreign_cookie_is_balanced_with_a_new_one(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        forged = [
            b"0000000000000000",
            value("a").upper(),  # the hex is lower case: another spelling is another value
            value("a")[:15],
            b"zzzz",
            b"",
            cookie_value("other", "a"),  # the cookie of another pool's server of the same name
            cookie_value("farm", "a", secret=b"another node's secret"),
            b'"' + value("a") + b'"',
        ]
        bodies = []
        for fake in forged:
            response = await send(port_of(lb), request(b"/", b"LBSRV=" + fake + b"; keep=1"))
            assert response.status == 200, fake
            bodies.append(sticks_to(response))
            received = last(servers[response.body.decode()])
            assert received.header_lines(b"cookie") == [b"keep=1"], fake
        assert set(bodies) == {b"a", b"b"}  # balanced by the policy, not sent to one fallback
        assert http_listener(lb).errors == {}
        persistence = lb.pools["farm"].persistence
        assert persistence is not None
        assert (persistence.hits, persistence.misses, persistence.redispatches) == (0, len(forged), 0)


async def test_a_cookie_of_a_server_a_reload_removed_is_balanced_with_a_new_one(tmp_path: Path) -> None:
    async with backends("a", "b", "c") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        stale = b"LBSRV=" + value("c")
        response = await send(port_of(lb), request(b"/", stale))
        assert (response.body, set_cookies(response)) == (b"c", [])
        text = lbconfig({"type": "cookie"}, {"a": servers["a"], "b": servers["b"]})
        (tmp_path / "lbproxy.yaml").write_text(textwrap.dedent(text).format())
        assert await lb.reload() == []
        for index in range(4):
            response = await send(port_of(lb), request(b"/%d" % index, stale))
            assert response.status == 200
            assert sticks_to(response) in (b"a", b"b")
        # the servers that stayed keep their values: their clients did not move
        response = await send(port_of(lb), request(b"/", b"LBSRV=" + value("b")))
        assert (response.body, set_cookies(response)) == (b"b", [])
        assert len(servers["c"].requests) == 1


async def test_a_failing_server_retries_elsewhere_and_sets_a_new_cookie(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        port = port_of(lb)
        cookie = b"LBSRV=" + value("a")
        response = await send(port, request(b"/warm", cookie))
        assert (response.body, set_cookies(response)) == (b"a", [])
        await servers["a"].stop()  # no health checks: lbproxy learns it from the request itself
        response = await send(port, request(b"/retried", cookie))
        assert (response.status, response.body) == (200, b"b")
        assert sticks_to(response) == b"b"
        assert [r.target for r in servers["b"].requests] == [b"/retried"]
        assert lb.pools["farm"].retried >= 1
        persistence = lb.pools["farm"].persistence
        assert persistence is not None
        assert persistence.redispatches >= 1
        response = await send(port, request(b"/next", b"LBSRV=" + value("b")))
        assert (response.status, response.body, set_cookies(response)) == (200, b"b", [])


async def test_persistence_metrics(tmp_path: Path) -> None:
    async with (
        backends("a", "b") as servers,
        running(lbconfig({"type": "cookie"}, servers, admin=True), tmp_path) as lb,
        aiohttp.ClientSession() as session,
    ):
        port = port_of(lb)
        first = await send(port, request())  # a miss: no cookie
        cookie = b"LBSRV=" + value(sticks_to(first).decode())
        for _ in range(3):  # hits
            assert set_cookies(await send(port, request(b"/", cookie))) == []
        sticks_to(await send(port, request(b"/", b"LBSRV=0000000000000000")))  # a miss: names no server
        lb.disable(lb.server("farm", first.body.decode()))
        moved = await send(port, request(b"/", cookie))  # a redispatch: its server is disabled
        assert moved.body != first.body
        sticks_to(moved)
        bound = lb.bound["admin"]
        async with session.get(f"http://{bound.host}:{bound.port}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        found: dict[str, tuple[str, float]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("lbproxy_pool_persistence_"):
                    assert sample.labels == {"pool": "farm"}
                    found[sample.name] = (family.type, sample.value)
        assert found == {
            "lbproxy_pool_persistence_hits_total": ("counter", 3),
            "lbproxy_pool_persistence_misses_total": ("counter", 2),
            "lbproxy_pool_persistence_redispatches_total": ("counter", 1),
        }


async def test_cookie_persistence_on_a_routed_pool(tmp_path: Path) -> None:
    async with backends("web", "a", "b") as servers:
        document = {
            "listeners": [
                {
                    "name": "web",
                    "bind": "127.0.0.1:0",
                    "pool": "web",
                    "routes": [{"name": "app", "match": {"path_prefix": "/app/"}, "pool": "app"}],
                }
            ],
            "pools": {
                "web": {"servers": [{"name": "web", "address": servers["web"].address}]},
                "app": {
                    "persistence": {"type": "cookie", "cookie": "APPSRV"},
                    "servers": [{"name": n, "address": servers[n].address} for n in ("a", "b")],
                },
            },
        }
        text = yaml.safe_dump(document, sort_keys=False).replace("{", "{{").replace("}", "}}")
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            first = await send(port, request(b"/app/1"))
            (line,) = set_cookies(first)
            name = first.body.decode()
            assert line == b"APPSRV=%s; Path=/; HttpOnly; SameSite=Lax" % cookie_value("app", name)
            cookie = b"APPSRV=" + cookie_value("app", name) + b"; z=9"
            for index in range(6):
                response = await send(port, request(b"/app/%d" % index, cookie))
                assert (response.body, set_cookies(response)) == (name.encode(), [])
                assert last(servers[name]).header_lines(b"cookie") == [b"z=9"]
            # the listener's own pool keeps no sessions: no cookie set, none taken out
            response = await send(port, request(b"/other", cookie))
            assert (response.body, set_cookies(response)) == (b"web", [])
            assert last(servers["web"]).header_lines(b"cookie") == [cookie]
            # a cookie of the listener's pool name space means nothing to the routed pool
            response = await send(port, request(b"/app/x", b"APPSRV=" + cookie_value("web", "web")))
            assert len(set_cookies(response)) == 1


async def test_a_tls_listener_marks_the_cookie_secure(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    listeners: list[dict[str, Any]] = [
        {"name": "web", "bind": "127.0.0.1:0", "pool": "farm", "tls": {"cert": str(cert), "key": str(key)}},
        {"name": "plain", "bind": "127.0.0.1:0", "pool": "farm"},
    ]
    context = ssl.create_default_context(cafile=str(cert))
    async with (
        backends("a", "b") as servers,
        running(lbconfig({"type": "cookie", "max_age": "30m"}, servers, listeners=listeners), tmp_path) as lb,
    ):
        reader, writer = await asyncio.open_connection(LOCALHOST, port_of(lb), ssl=context, server_hostname="localhost")
        async with Client(reader, writer) as client:
            await client.send(request())
            response = await client.response()
        (line,) = set_cookies(response)
        server = response.body.decode()
        assert line == b"LBSRV=%s; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=1800" % value(server)
        response = await send(port_of(lb, "plain"), request())
        (line,) = set_cookies(response)
        assert b"Secure" not in line


# -- source_ip and header ---------------------------------------------------------------------------------


async def test_source_ip_over_http(tmp_path: Path) -> None:
    listeners: list[dict[str, Any]] = [
        {"name": "web", "bind": "127.0.0.1:0", "pool": "farm"},
        {"name": "proxied", "bind": "127.0.0.1:0", "pool": "farm", "accept_proxy": True},
    ]
    async with (
        backends("a", "b") as servers,
        running(lbconfig({"type": "source_ip"}, servers, listeners=listeners), tmp_path) as lb,
    ):
        home = expected_server(b"127.0.0.1")
        bodies = [(await send(port_of(lb), request(b"/%d" % index))).body for index in range(10)]
        async with await Client.connect(port_of(lb)) as client:
            for index in range(10):
                await client.send(request(b"/k%d" % index))
                response = await client.response()
                assert set_cookies(response) == []
                bodies.append(response.body)
        assert bodies == [home] * 20
        # other clients, their addresses given by a PROXY header: each sticks to its own server
        seen: dict[str, set[bytes]] = {}
        for _ in range(2):
            for host in range(1, 31):
                ip = f"10.0.0.{host}"
                response = await send(port_of(lb, "proxied"), proxy_v1(ip) + request())
                assert response.status == 200
                seen.setdefault(ip, set()).add(response.body)
        assert all(bodies == {expected_server(ip.encode())} for ip, bodies in seen.items()), seen
        assert {body for bodies in seen.values() for body in bodies} == {b"a", b"b"}
        for backend in servers.values():
            # the key is the client's address, as the server is told it too
            forwarded = {r.header(b"x-forwarded-for") for r in backend.requests}
            assert all(expected_server(ip) == backend.name.encode() for ip in forwarded if ip is not None)


async def tcp_exchange(port: int, preamble: bytes = b"") -> bytes:
    """One HTTP request through a tcp listener on its own connection: the body of the answer."""
    async with await Client.connect(port) as client:
        await client.send(preamble + request())
        return (await client.response()).body


async def test_source_ip_over_a_tcp_listener(tmp_path: Path) -> None:
    listeners: list[dict[str, Any]] = [
        {"name": "tcp", "bind": "127.0.0.1:0", "pool": "farm", "mode": "tcp"},
        {"name": "proxied", "bind": "127.0.0.1:0", "pool": "farm", "mode": "tcp", "accept_proxy": True},
    ]
    async with (
        backends("a", "b") as servers,
        running(lbconfig({"type": "source_ip"}, servers, listeners=listeners), tmp_path) as lb,
    ):
        home = expected_server(b"127.0.0.1")
        bodies = [await tcp_exchange(port_of(lb, "tcp")) for _ in range(8)]
        assert bodies == [home] * 8
        assert servers[home.decode()].accepted == 8
        assert servers[({"a", "b"} - {home.decode()}).pop()].accepted == 0
        seen: dict[str, list[bytes]] = {}
        for _ in range(2):
            for host in range(1, 21):
                ip = f"192.0.2.{host}"
                seen.setdefault(ip, []).append(await tcp_exchange(port_of(lb, "proxied"), proxy_v1(ip)))
        assert all(bodies == [expected_server(ip.encode())] * 2 for ip, bodies in seen.items()), seen
        assert {body for bodies in seen.values() for body in bodies} == {b"a", b"b"}


async def test_header_key_sticks_spreads_and_falls_back_to_the_policy(tmp_path: Path) -> None:
    persistence = {"type": "header", "header": "X-Session-Id"}
    async with backends("a", "b") as servers, running(lbconfig(persistence, servers), tmp_path) as lb:
        port = port_of(lb)
        chosen: dict[bytes, list[bytes]] = {}
        async with await Client.connect(port) as client:  # one keep-alive connection for all the ids
            for index in range(50):
                session = b"user-%d" % index
                response = await send(port, request(b"/", fields=b"X-Session-Id: %s\r\n" % session))
                await client.send(request(b"/", fields=b"x-session-id: %s\r\n" % session))
                again = await client.response()
                assert set_cookies(response) == set_cookies(again) == []
                chosen[session] = [response.body, again.body]
        for session, bodies in chosen.items():
            assert bodies == [expected_server(session)] * 2, session
        spread = {bodies[0] for bodies in chosen.values()}
        assert spread == {b"a", b"b"}
        # the header goes on to the server as it came
        assert last(servers["a"]).header(b"x-session-id") is not None
        # no header: the pool's policy, round robin
        async with await Client.connect(port) as client:
            await client.send(request() * 6)
            plain = [r.body for r in await client.responses(6)]
        assert all(one != two for one, two in itertools.pairwise(plain)), plain
        persistence_state = lb.pools["farm"].persistence
        assert persistence_state is not None
        assert (persistence_state.hits, persistence_state.misses) == (100, 6)


async def test_a_draining_server_keeps_the_header_keys_it_has_and_gets_no_new_ones(tmp_path: Path) -> None:
    """A hash cannot tell a known user from a new one; the pool's memory of recent keys can."""
    persistence = {"type": "header", "header": "X-Session-Id"}
    async with backends("a", "b") as servers, running(lbconfig(persistence, servers), tmp_path) as lb:
        port = port_of(lb)

        async def served(session: bytes) -> bytes:
            return (await send(port, request(b"/", fields=b"X-Session-Id: %s\r\n" % session))).body

        known = [b"user-%d" % index for index in range(20)]
        on_a = [session for session in known if await served(session) == b"a"]
        assert on_a, "some of 20 keys hash to a"
        lb.drain(lb.server("farm", "a"))
        for session in on_a:
            assert await served(session) == b"a", session  # a known user stays on the draining server
        new = [b"new-%d" % index for index in range(20)]
        assert any(expected_server(session) == b"a" for session in new)  # some would go to a by the hash
        for session in new:
            assert await served(session) == b"b", session  # but a new user never does
        lb.disable(lb.server("farm", "a"))
        for session in on_a:
            assert await served(session) == b"b", session  # disabled: its users move, with no error


# -- Cookie headers written to confuse ----------------------------------------------------------------------


async def test_odd_cookie_headers_give_one_well_framed_request_each(tmp_path: Path) -> None:
    async with backends("a", "b") as servers, running(lbconfig({"type": "cookie"}, servers), tmp_path) as lb:
        va, vb = value("a"), value("b")
        inner = b"GET /admin HTTP/1.1\r\nHost: x\r\nCookie: LBSRV=%s\r\n\r\n" % va
        pipeline = [
            # unknown values, the name twice, odd spacing: balanced, only c=3 goes on
            b"POST /one HTTP/1.1\r\nHost: test\r\nCookie: LBSRV=x;LBSRV=y ;  c=3\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(inner), inner),
            # the name twice with two valid values: the first decides, both go
            b"GET /two HTTP/1.1\r\nHost: test\r\nCookie: LBSRV=%s; LBSRV=%s; d=4\r\n\r\n" % (va, vb),
            # over two Cookie lines
            b"GET /three HTTP/1.1\r\nHost: test\r\nCookie: LBSRV=%s\r\nCookie: e=5; LBSRV=%s\r\n\r\n" % (vb, va),
            # spaces around the value, a chunked body
            b"POST /four HTTP/1.1\r\nHost: test\r\nCookie:   LBSRV =  %s  \r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (vb, len(inner), inner),
        ]
        async with await Client.connect(port_of(lb)) as client:
            await client.send(b"".join(pipeline))
            responses = await client.responses(4)
        assert [r.status for r in responses] == [200] * 4
        assert len(set_cookies(responses[0])) == 1
        sticks_to(responses[0])
        assert [(r.body, set_cookies(r)) for r in responses[1:]] == [(b"a", []), (b"b", []), (b"b", [])]
        received = sorted((r for backend in servers.values() for r in backend.requests), key=lambda r: r.target)
        assert [r.target for r in received] == [b"/four", b"/one", b"/three", b"/two"]
        four, one, three, two = received
        assert (one.header_lines(b"cookie"), one.body) == ([b"c=3"], inner)
        assert (two.header_lines(b"cookie"), two.body) == ([b"d=4"], b"")
        assert (three.header_lines(b"cookie"), three.body) == ([b"e=5"], b"")
        assert (four.header_lines(b"cookie"), four.body) == ([], inner)
        for backend in servers.values():
            only_whole_requests(backend)
            assert all(r.target != b"/admin" for r in backend.requests)


async def test_the_servers_own_set_cookie_is_kept(tmp_path: Path) -> None:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        transport.write(b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=42; Path=/\r\nContent-Length: 1\r\n\r\nx")

    async with (
        Backend("a", respond) as a,
        running(lbconfig({"type": "cookie", "max_age": "1h"}, {"a": a}), tmp_path) as lb,
    ):
        response = await send(port_of(lb), request())
        assert (response.status, response.body) == (200, b"x")
        assert set_cookies(response) == [
            b"sid=42; Path=/",
            b"LBSRV=%s; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600" % value("a"),
        ]
