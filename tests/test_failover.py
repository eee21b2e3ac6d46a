"""Health-based failover end to end: lbproxy on 127.0.0.1 in front of back-ends that the tests break.

Back-ends are recording servers (tests.support.Backend) wrapped in `Node`, whose answers the test
switches at run time: the probe path answers 500, hangs or closes; the whole server is stopped and
restarted on its port, freezes (accepts, reads, never answers), or resets every request. The SIGKILL
test runs its back-ends in their own processes (tests/backends/http_server.py) on listening sockets
this process binds and hands down, so a restarted back-end comes back on the same port.

Probes run every 100 ms (timeout 100 ms, rise 2, fall 2), so that each transition takes a few tenths
of a second. Waits are on conditions with deadlines (`eventually`); the deadlines that are asserted
are the issue's bounds: down within fall x interval + timeout, up within rise x interval, each with
the 10% jitter and a fixed slack for scheduling. Every load loop is bounded in time and in count.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy.http_proxy import HttpListener
from lbproxy.pool import AdminState
from lbproxy.runtime import Runtime
from tests.support import LOCALHOST, Backend, Client, Request, Response, eventually, get, port_of, running

INTERVAL = 0.1
TIMEOUT = 0.1
RISE = 2
FALL = 2
JITTER = 1.1  # probes are spaced by interval ±10%
SLACK = 0.3  # scheduling, the 10 ms polling of `eventually`, the first probe's own round trip
HEALTH: dict[str, Any] = {
    "type": "http",
    "path": "/health",
    "interval": "100ms",
    "timeout": "100ms",
    "rise": RISE,
    "fall": FALL,
}
DOWN_WITHIN = FALL * INTERVAL * JITTER + TIMEOUT + SLACK
UP_WITHIN = RISE * INTERVAL * JITTER + TIMEOUT + SLACK  # + TIMEOUT: a probe may be hanging at the switch

SCRIPT = Path(__file__).parent / "backends" / "http_server.py"


# -- back-ends the test can break ------------------------------------------------------------------


class Node:
    """A recording back-end whose behaviour the test switches at run time.

    `/health` answers by `health`: "ok" (200, with `weight_header` as X-LB-Weight if set), "500",
    "hang" (never answers) or "close" (closes the connection). Other requests get 200 with the name
    as body, after `delay` seconds (`slow` seconds for targets starting with /slow). `frozen` makes it
    answer nothing at all; `resets` makes it reset every non-probe request once it has read it whole;
    `status` is the status line of answers to real traffic.
    """

    def __init__(self, name: str, delay: float = 0.0, slow: float = 1.0) -> None:
        self.name = name
        self.health = "ok"
        self.weight_header: bytes | None = None
        self.delay = delay
        self.slow = slow
        self.frozen = False
        self.resets = False
        self.status = b"200 OK"  # the status of answers to real traffic
        self.probes: list[float] = []  # loop time of every probe's arrival
        self.backend = Backend(name, self.respond)

    @property
    def address(self) -> str:
        return self.backend.address

    @property
    def served(self) -> list[bytes]:
        """The targets of every request that reached it, probes excepted."""
        return [request.target for request in self.backend.requests if request.target != b"/health"]

    async def start(self) -> Node:
        await self.backend.start(self.backend.port)  # the same port when restarted
        return self

    async def stop(self) -> None:
        await self.backend.stop()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def respond(self, request: Request, transport: asyncio.Transport) -> Awaitable[None] | None:
        if self.frozen:
            return None
        if request.target == b"/health":
            self.probes.append(asyncio.get_running_loop().time())
            if self.health == "500":
                transport.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops")
            elif self.health == "close":
                transport.close()
            elif self.health == "ok":
                weight = b"X-LB-Weight: %s\r\n" % self.weight_header if self.weight_header is not None else b""
                transport.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % weight)
            return None
        if self.resets:
            transport.abort()
            return None
        delay = self.slow if request.target.startswith(b"/slow") else self.delay
        if delay:
            return self._later(transport, delay)
        transport.write(self._answer())
        return None

    def _answer(self) -> bytes:
        return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (self.status, len(self.name), self.name.encode())

    async def _later(self, transport: asyncio.Transport, delay: float) -> None:
        await asyncio.sleep(delay)  # the server's own latency, not a wait of the test
        if not transport.is_closing():
            transport.write(self._answer())


class Child:
    """tests/backends/http_server.py in its own process, on a port that outlives the process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"{LOCALHOST}:{self.port}"

    async def start(self) -> Child:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((LOCALHOST, self.port))
            sock.listen(128)
            self.port = sock.getsockname()[1]
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(SCRIPT),
                self.name,
                str(sock.fileno()),
                pass_fds=(sock.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
            )
        finally:
            sock.close()  # only the child holds it now: once the child dies, connections are refused
        async with await Client.connect(self.port) as client:  # ready: it answers
            await client.send(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            response = await client.response(timeout=10.0)
            assert response.body == self.name.encode()
        return self

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def reap(self) -> None:
        process = self.process
        if process is not None:
            if process.returncode is None:
                process.kill()
            async with asyncio.timeout(5.0):
                await process.wait()
            self.process = None

    async def __aenter__(self) -> Child:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.reap()


# -- config and traffic ----------------------------------------------------------------------------


def pool(
    *servers: Node | Child, backups: tuple[Node, ...] = (), health: dict[str, Any] | None = HEALTH, **options: Any
) -> dict[str, Any]:
    """A pool's YAML mapping: `servers`, then `backups` as `backup: true`, the probes and `options`."""
    entries: list[dict[str, Any]] = [{"name": s.name, "address": s.address} for s in servers]
    entries += [{"name": s.name, "address": s.address, "backup": True} for s in backups]
    mapping: dict[str, Any] = dict(options)
    if health is not None:
        mapping["health"] = health
    mapping["servers"] = entries
    return mapping


def lbconfig(pools: dict[str, dict[str, Any]], **listener: Any) -> str:
    """A config text: listener `web` on the first pool of `pools`."""
    first = next(iter(pools))
    document = {"listeners": [{"name": "web", "bind": "127.0.0.1:0", "pool": first, **listener}], "pools": pools}
    # tests.support.running() calls str.format on the text
    return yaml.safe_dump(document, sort_keys=False).replace("{", "{{").replace("}", "}}")


@dataclass
class Tally:
    """What a load saw: bodies (the back-ends' names) and statuses of responses, and every error."""

    bodies: Counter[bytes] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    total: int = 0

    def share(self, name: str) -> float:
        return self.bodies[name.encode()] / self.total if self.total else 0.0


async def load(
    port: int, clients: int, seconds: float, limit: int, tally: Tally | None = None, stop: asyncio.Event | None = None
) -> Tally:
    """`clients` keep-alive clients sending GETs back to back for `seconds`, or `limit` requests in all,
    or until `stop` is set."""
    loop = asyncio.get_running_loop()
    tally = tally if tally is not None else Tally()
    deadline = loop.time() + seconds
    sent = 0

    async def one() -> None:
        nonlocal sent
        client: Client | None = None
        try:
            while loop.time() < deadline and sent < limit and not (stop is not None and stop.is_set()):
                sent += 1
                if client is None:
                    client = await Client.connect(port)
                await client.send(b"GET /load HTTP/1.1\r\nHost: test\r\n\r\n")
                try:
                    response = await client.response(timeout=5.0)
                except (ConnectionError, TimeoutError) as error:
                    tally.errors.append(repr(error))
                    await client.close()
                    client = None
                    continue
                tally.total += 1
                tally.statuses[response.status] += 1
                tally.bodies[response.body] += 1
                if response.status != 200:
                    tally.errors.append(f"{response.status} {response.body[:80]!r}")
        finally:
            if client is not None:
                await client.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return tally


async def names(port: int, count: int) -> list[bytes]:
    """The bodies of `count` sequential GETs on one keep-alive connection (all must be 200)."""
    bodies = []
    async with await Client.connect(port) as client:
        for index in range(count):
            await client.send(b"GET /n%d HTTP/1.1\r\nHost: test\r\n\r\n" % index)
            response = await client.response()
            assert response.status == 200, response
            bodies.append(response.body)
    return bodies


async def request(port: int, raw: bytes) -> Response:
    async with await Client.connect(port) as client:
        await client.send(raw)
        return await client.response()


async def timed_get(port: int, target: bytes) -> tuple[Response, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await get(port, target)
    return response, loop.time() - started


def states(lb: Runtime) -> list[str]:
    """Every server's state and last transition, for assertion messages."""
    return [
        f"{pool.name}/{s.name} up={s.up} {s.transitions} {s.transition_reason!r} checks={s.checks}"
        for pool in lb.pools.values()
        for s in pool.servers
    ]


def transition_logs(caplog: pytest.LogCaptureFixture, name: str, state: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"server {name} is {state}" in r.getMessage()]


# -- 1. transitions and their timing ---------------------------------------------------------------


async def _break(node: Node, how: str) -> None:
    if how == "stopped":
        await node.stop()
    else:
        node.health = how


async def _mend(node: Node, how: str) -> None:
    if how == "stopped":
        await node.start()
    else:
        node.health = "ok"


@pytest.mark.parametrize(
    ("how", "reasons"),
    [
        ("500", {"HTTP 500"}),
        ("stopped", {"connection refused"}),
        ("hang", {"timeout after 100ms"}),
        ("close", {"connection closed", "connection reset"}),
    ],
)
async def test_transition_timing_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str, reasons: set[str]
) -> None:
    loop = asyncio.get_running_loop()
    async with Node("a") as a, Node("b") as b, running(lbconfig({"farm": pool(a, b)}), tmp_path) as lb:
        await lb.health.first_round()
        server = lb.server("farm", "a")
        assert server.up
        assert (server.check_ok, server.check_reason) == (True, "HTTP 200")
        failures_before = server.checks[0]

        started = loop.time()
        await _break(a, how)
        await eventually(lambda: not server.up, DOWN_WITHIN, f"a down ({how}) within {DOWN_WITHIN:.2f}s")
        took = loop.time() - started
        assert server.transition_reason in reasons
        assert server.transitions == {"up": 0, "down": 1}
        assert server.checks[0] - failures_before >= FALL, f"down after fewer than {FALL} failed probes ({took:.3f}s)"
        # the last check is kept for the API
        assert server.check_ok is False
        assert server.check_reason in reasons
        assert abs(time.time() - server.check_time) < DOWN_WITHIN
        assert 0 < server.check_duration < 1.0
        # from the very next pick, nothing new reaches it
        served = len(a.served)
        assert await names(port_of(lb), 6) == [b"b"] * 6
        assert len(a.served) == served

        successes_before = server.checks[1]
        started = loop.time()
        await _mend(a, how)
        await eventually(lambda: server.up, UP_WITHIN, f"a up again within {UP_WITHIN:.2f}s")
        assert server.transition_reason == "HTTP 200"
        assert server.transitions == {"up": 1, "down": 1}
        assert server.checks[1] - successes_before >= RISE
        assert set(await names(port_of(lb), 6)) == {b"a", b"b"}

    downs = transition_logs(caplog, "a", "DOWN")
    ups = transition_logs(caplog, "a", "UP")
    assert len(downs) == 1, downs
    assert any(reason in downs[0] for reason in reasons), downs
    assert len(ups) == 1, ups
    assert "HTTP 200" in ups[0]


async def test_start_down_waits_for_rise_successful_probes(tmp_path: Path) -> None:
    health = {**HEALTH, "start": "down"}
    async with Node("a") as a, running(lbconfig({"farm": pool(a, health=health)}), tmp_path) as lb:
        a.health = "500"
        server = lb.server("farm", "a")
        assert not server.up
        await eventually(lambda: len(a.probes) >= 3, 2.0, "three probes")
        assert not server.up
        response = await get(port_of(lb))
        assert response.status == 503
        assert a.served == []
        a.health = "ok"
        await eventually(lambda: server.up, UP_WITHIN, "a up after its probes succeed")
        assert server.checks[1] >= RISE
        assert (await get(port_of(lb))).body == b"a"


async def test_never_two_probes_in_flight_for_one_server(tmp_path: Path) -> None:
    # interval 50 ms, timeout 200 ms: overlapping probes would arrive every 50 ms; one at a time, every 200 ms
    health = {**HEALTH, "interval": "50ms", "timeout": "200ms", "fall": 100}
    async with Node("a") as a, running(lbconfig({"farm": pool(a, health=health)}), tmp_path):
        a.health = "hang"
        start = len(a.probes)
        await eventually(lambda: len(a.probes) >= start + 4, 3.0, "four hanging probes")
        arrivals = a.probes[start:]
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert min(gaps) >= 0.15, gaps


async def test_a_request_in_flight_finishes_when_its_server_goes_down(tmp_path: Path) -> None:
    async with (
        Node("a", slow=1.0) as a,
        Node("b", slow=1.0) as b,
        running(lbconfig({"farm": pool(a, b)}), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        await lb.health.first_round()
        slow = await _slow_request(client, (a, b))
        server = lb.server("farm", slow.name)
        slow.health = "500"
        await eventually(lambda: not server.up, DOWN_WITHIN, "the busy server down")
        assert server.inflight == 1
        response = await client.response(timeout=3.0)
        assert (response.status, response.body) == (200, slow.name.encode())
        assert server.inflight == 0


# -- 2. a back-end SIGKILLed under load ------------------------------------------------------------


async def test_no_client_error_while_a_backend_process_is_killed_and_restarted(tmp_path: Path) -> None:
    # Probes time out after 1 s here, not 100 ms: four back-end processes under load on a busy machine
    # may be slow to answer, and this test is about the killed one. Passive detection takes it out.
    health = {**HEALTH, "timeout": "1s"}
    async with contextlib.AsyncExitStack() as stack:
        children = [await stack.enter_async_context(Child(f"s{index}")) for index in range(4)]
        config = lbconfig({"farm": pool(*children, health=health, passive={"consecutive_failures": 1})})
        lb = await stack.enter_async_context(running(config, tmp_path))
        await lb.health.first_round()
        port = port_of(lb)
        victim = children[1]
        server = lb.server("farm", "s1")

        tally = Tally()
        stop = asyncio.Event()
        traffic = asyncio.create_task(load(port, 20, 10.0, 40_000, tally, stop))
        try:
            await eventually(lambda: tally.bodies[b"s1"] >= 50, 5.0, "s1 to take its share of the load")
            killed = time.time()
            victim.kill()
            await eventually(lambda: not server.up, 1.0, "the killed back-end to be taken out")
            out_after = server.transition_time - killed
            requests_when_out = server.requests
            total_when_out = tally.total
            await eventually(lambda: tally.total >= total_when_out + 1000, 5.0, "1000 more responses after the kill")
        finally:
            stop.set()
            await traffic
        assert tally.errors == [], (tally.errors[:3], len(tally.errors), states(lb))
        assert set(tally.statuses) == {200}
        assert server.requests == requests_when_out, "the killed back-end was sent requests after it was out"
        assert out_after < 0.25, f"{out_after * 1000:.1f} ms from SIGKILL to out of rotation"
        assert server.transition_reason.startswith("passive"), server.transition_reason
        await victim.reap()

        await victim.start()  # the same port again; returns once it answers
        await eventually(lambda: server.up, UP_WITHIN, "the restarted back-end to come back after rise probes")
        assert server.transition_reason == "HTTP 200"
        again = await load(port, 20, 1.0, 20_000)
        assert again.errors == [], (again.errors[:3], len(again.errors), states(lb))
        assert again.share("s1") > 0.1, again.bodies


# -- 3. retries ------------------------------------------------------------------------------------


async def test_a_retry_goes_to_a_different_server(tmp_path: Path) -> None:
    async with Node("a") as a, Node("b") as b, Node("c") as c:
        a.resets = b.resets = True
        config = lbconfig({"farm": pool(a, b, c, health=None, retries=2)})
        async with running(config, tmp_path) as lb:
            for index in range(9):
                target = b"/r%d" % index
                response = await get(port_of(lb), target)
                assert (response.status, response.body) == (200, b"c")
                saw = [node.name for node in (a, b, c) for served in node.served if served == target]
                assert len(saw) == len(set(saw)), f"{target!r} went twice to the same server: {saw}"
                assert saw[-1] == "c"
            listener = lb.listeners["web"]
            assert isinstance(listener, HttpListener)
            assert listener.retries == lb.pools["farm"].retried > 0
            assert listener.errors == {}


async def test_a_post_that_reached_the_server_is_not_retried_but_a_get_is(tmp_path: Path) -> None:
    async with Node("a") as a, Node("b") as b:
        a.resets = True
        async with running(lbconfig({"farm": pool(a, b, health=None, retries=2)}), tmp_path) as lb:
            port = port_of(lb)
            posts_to_a = gets_to_a = 0
            for index in range(4):
                target = b"/post%d" % index
                body = b"payload %d" % index
                response = await request(
                    port, b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s" % (target, len(body), body)
                )
                if target in a.served:
                    posts_to_a += 1
                    [reached] = [r for r in a.backend.requests if r.target == target]
                    assert reached.body == body  # the body did reach a before it reset
                    assert response.status == 502, f"a POST whose body reached the server was retried: {response}"
                    assert target not in b.served
                else:
                    assert (response.status, response.body) == (200, b"b")
            for index in range(4):
                target = b"/get%d" % index
                response = await get(port, target)
                assert (response.status, response.body) == (200, b"b")
                if target in a.served:
                    gets_to_a += 1
                    assert target in b.served
            assert posts_to_a >= 1
            assert gets_to_a >= 1


async def test_a_post_that_never_reached_a_server_is_retried(tmp_path: Path) -> None:
    async with Node("a") as a, Node("b") as b:
        config = lbconfig({"farm": pool(a, b, health=None, retries=2)})
        await a.stop()  # refused: nothing of the request can reach it
        async with running(config, tmp_path) as lb:
            for index in range(4):
                response = await request(
                    port_of(lb), b"POST /p%d HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi" % index
                )
                assert (response.status, response.body) == (200, b"b")
            assert lb.server("farm", "a").connect_failures >= 1
            assert lb.pools["farm"].retried >= 1


@pytest.mark.parametrize(("size", "replayed"), [(1024, True), (256 * 1024, False)])
async def test_an_idempotent_body_is_replayed_only_while_it_is_held(tmp_path: Path, size: int, replayed: bool) -> None:
    """A small PUT body is kept and sent again whole to the next server; a large one streamed is not."""
    async with Node("a") as a, Node("b") as b:
        a.resets = True
        async with running(lbconfig({"farm": pool(a, b, health=None, retries=2)}), tmp_path) as lb:
            hits = 0
            for index in range(4):
                target = b"/put%d" % index
                body = bytes([65 + index]) * size
                response = await request(
                    port_of(lb), b"PUT %s HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s" % (target, size, body)
                )
                if target not in a.served:
                    assert (response.status, response.body) == (200, b"b")
                    continue
                hits += 1
                if replayed:
                    assert (response.status, response.body) == (200, b"b")
                    [again] = [r for r in b.backend.requests if r.target == target]
                    assert again.body == body
                else:
                    assert response.status == 502, response
                    assert target not in b.served
            assert hits >= 1


# -- 4-6. backups, backup pool, min_up, maintenance page -------------------------------------------


async def test_backup_servers_then_backup_pool_take_over_and_hand_back(tmp_path: Path) -> None:
    async with Node("a") as a, Node("b") as b, Node("c") as c, Node("d") as d:
        pools = {"farm": pool(a, b, backups=(c,), backup_pool="dr"), "dr": pool(d)}
        async with running(lbconfig(pools), tmp_path) as lb:
            await lb.health.first_round()
            port = port_of(lb)
            farm = lb.pools["farm"]
            server = lb.server
            assert set(await names(port, 8)) == {b"a", b"b"}

            a.health = b.health = "500"
            await eventually(lambda: not server("farm", "a").up and not server("farm", "b").up, 2.0, "a, b down")
            assert set(await names(port, 8)) == {b"c"}
            assert farm.failovers >= 1

            c.health = "500"
            await eventually(lambda: not server("farm", "c").up, 2.0, "backup c down")
            assert set(await names(port, 8)) == {b"d"}

            c.health = "ok"
            await eventually(lambda: server("farm", "c").up, 2.0, "backup c up")
            assert set(await names(port, 8)) == {b"c"}, "the backup pool did not hand back to the backup server"

            served_by_c, served_by_d = len(c.served), len(d.served)
            a.health = "ok"
            await eventually(lambda: server("farm", "a").up, 2.0, "primary a up")
            assert set(await names(port, 8)) == {b"a"}, "the backups did not hand back to the primary"
            b.health = "ok"
            await eventually(lambda: server("farm", "b").up, 2.0, "primary b up")
            assert set(await names(port, 8)) == {b"a", b"b"}
            assert (len(c.served), len(d.served)) == (served_by_c, served_by_d)


def tier_logs(caplog: pytest.LogCaptureFixture, pool_name: str) -> list[str]:
    """The messages that say where the pool's new requests go, in order (issue #13: logs that tell the truth)."""
    marks = ("failing over", "failback", "no server left", "serve beside")
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"pool {pool_name}: ") and any(mark in r.getMessage() for mark in marks)
    ]


async def test_failover_is_logged_and_counted_only_when_traffic_moves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="lbproxy.pool")
    async with Node("a") as a, Node("b") as b, Node("c") as c, Node("d") as d:
        pools = {"farm": pool(a, backups=(b,), backup_pool="dr"), "dr": pool(c), "alone": pool(d)}
        async with running(lbconfig(pools), tmp_path) as lb:
            await lb.health.first_round()
            farm, dr, alone = lb.pools["farm"], lb.pools["dr"], lb.pools["alone"]
            assert tier_logs(caplog, "farm") == []

            # A pool with no backup of any kind has nowhere to fail over to: it says so, and counts nothing.
            d.health = "500"
            await eventually(lambda: alone.tier.value == "none", 2.0, "alone out of servers")
            assert tier_logs(caplog, "alone") == [
                "pool alone: no server left (0 of 1 primaries available, no backup server): "
                "requests get 503, with the maintenance page if set"
            ]
            assert alone.failovers == 0
            d.health = "ok"
            await eventually(lambda: alone.tier.value == "primaries", 2.0, "alone serving again")
            assert tier_logs(caplog, "alone")[1:] == [
                "pool alone: failback: 1 of 1 primaries available, the primaries serve again"
            ]
            assert alone.failovers == 0

            # Primaries, then the backup server, then the backup pool, then nothing, and back.
            a.health = "500"
            await eventually(lambda: farm.tier.value == "backups", 2.0, "farm on its backup server")
            b.health = "500"
            await eventually(lambda: farm.tier.value == "backup_pool", 2.0, "farm on its backup pool")
            c.health = "500"
            await eventually(lambda: farm.tier.value == "none" and dr.tier.value == "none", 2.0, "nothing left")
            assert farm.failovers == 2
            c.health = "ok"
            await eventually(lambda: farm.tier.value == "backup_pool", 2.0, "the backup pool back")
            a.health = "ok"
            await eventually(lambda: farm.tier.value == "primaries", 2.0, "farm on its primaries")
            assert tier_logs(caplog, "farm") == [
                "pool farm: 0 of 1 primaries available, below min_up 1: failing over to the backup servers",
                "pool farm: 0 of 1 primaries available, below min_up 1: failing over to backup pool dr",
                "pool farm: no server left (0 of 1 primaries available, no backup server, none in backup pool dr): "
                "requests get 503, with the maintenance page if set",
                "pool farm: 0 of 1 primaries available, below min_up 1: failing over to backup pool dr",
                "pool farm: failback: 1 of 1 primaries available, the primaries serve again",
            ]
            assert farm.failovers == 3


async def test_min_up_brings_the_backup_in_beside_the_remaining_primaries(tmp_path: Path) -> None:
    nodes = [Node(f"p{index}") for index in range(1, 5)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        backup = await stack.enter_async_context(Node("bk"))
        config = lbconfig({"farm": pool(*nodes, backups=(backup,), min_up=3)})
        lb = await stack.enter_async_context(running(config, tmp_path))
        await lb.health.first_round()
        port = port_of(lb)
        p1, p2 = (lb.server("farm", name) for name in ("p1", "p2"))
        assert set(await names(port, 16)) == {b"p1", b"p2", b"p3", b"p4"}

        nodes[0].health = "500"
        await eventually(lambda: not p1.up, 2.0, "p1 down")
        assert set(await names(port, 12)) == {b"p2", b"p3", b"p4"}, "3 primaries left is not below min_up 3"

        nodes[1].health = "500"
        await eventually(lambda: not p2.up, 2.0, "p2 down")
        counts = Counter(await names(port, 30))
        assert set(counts) == {b"p3", b"p4", b"bk"}, counts
        assert min(counts.values()) >= 5, counts

        nodes[0].health = nodes[1].health = "ok"
        await eventually(lambda: p1.up and p2.up, 2.0, "p1, p2 up")
        assert set(await names(port, 16)) == {b"p1", b"p2", b"p3", b"p4"}


MAINTENANCE = b"<!doctype html><html><body><h1>Back soon</h1><p>Restoring the farm.</p></body></html>\n"


async def test_maintenance_page_when_the_pool_and_its_backup_pool_are_down(tmp_path: Path) -> None:
    page = tmp_path / "maintenance.html"
    page.write_bytes(MAINTENANCE)
    async with Node("a") as a, Node("dr1") as dr1:
        pools = {"farm": pool(a, backup_pool="dr"), "dr": pool(dr1)}
        config = lbconfig(pools, maintenance_page=str(page), retry_after="7s")
        async with running(config, tmp_path) as lb:
            await lb.health.first_round()
            a.health = dr1.health = "500"
            await eventually(
                lambda: not lb.server("farm", "a").up and not lb.server("dr", "dr1").up, 2.0, "everything down"
            )
            response = await get(port_of(lb))
            assert response.status == 503
            assert response.body == MAINTENANCE
            assert response.header(b"retry-after") == b"7"
            assert (response.header(b"content-type") or b"").startswith(b"text/html")
            assert a.served == dr1.served == []
            dr1.health = "ok"
            await eventually(lambda: lb.server("dr", "dr1").up, 2.0, "the DR site up")
            assert (await get(port_of(lb))).body == b"dr1"


# -- 7. drain and disable --------------------------------------------------------------------------


async def _new_requests_go_to(lb: Runtime, other: Node, slow: Node, count: int) -> None:
    """`count` requests, each on a new connection, are all answered by `other`; `slow` serves none."""
    served = len(slow.served)
    for index in range(count):
        response = await get(port_of(lb), b"/new%d" % index)
        assert (response.status, response.body) == (200, other.name.encode())
    assert len(slow.served) == served


async def _slow_request(client: Client, nodes: tuple[Node, ...]) -> Node:
    """Send GET /slow on `client`; the node that receives it."""
    await client.send(b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n")
    await eventually(lambda: any(b"/slow" in node.served for node in nodes), 2.0, "the slow request to arrive")
    [node] = [node for node in nodes if b"/slow" in node.served]
    return node


async def test_drain_lets_the_slow_request_finish_and_sends_nothing_new(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with (
        Node("a", slow=1.0) as a,
        Node("b", slow=1.0) as b,
        running(lbconfig({"farm": pool(a, b, health=None)}), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        started = loop.time()
        slow = await _slow_request(client, (a, b))
        other = b if slow is a else a
        server = lb.server("farm", slow.name)
        lb.drain(server)
        assert server.admin is AdminState.DRAINING
        assert server.inflight == 1
        await _new_requests_go_to(lb, other, slow, 10)
        response = await client.response(timeout=3.0)
        assert (response.status, response.body) == (200, slow.name.encode())
        assert loop.time() - started >= 0.9
        assert server.inflight == 0
        lb.enable(server)
        assert lb.server("farm", slow.name).admin is AdminState.ENABLED
        assert set(await names(port_of(lb), 4)) == {b"a", b"b"}


async def test_disable_cuts_what_outlives_the_grace_time(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with (
        Node("a", slow=5.0) as a,
        Node("b", slow=5.0) as b,
        running(lbconfig({"farm": pool(a, b, health=None, disable_grace="300ms")}), tmp_path) as lb,
        await Client.connect(port_of(lb)) as client,
    ):
        slow = await _slow_request(client, (a, b))
        other = b if slow is a else a
        server = lb.server("farm", slow.name)
        disabled = loop.time()
        lb.disable(server)
        assert server.admin is AdminState.DISABLED
        await _new_requests_go_to(lb, other, slow, 5)
        rest = await client.closed(timeout=3.0)
        cut_after = loop.time() - disabled
        assert rest == b"", f"a response came before the cut: {rest!r}"
        assert 0.28 <= cut_after < 0.3 + 0.5, cut_after
        await eventually(lambda: all(t.is_closing() for t in slow.backend.transports), 2.0, "server side cut")
        assert server.inflight == 0
        lb.enable(server)
        assert set(await names(port_of(lb), 4)) == {b"a", b"b"}


# -- 8. slow start ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["ratio", "round_robin", "least_connections"])
async def test_slow_start_ramps_a_returning_server(tmp_path: Path, policy: str) -> None:
    # 5 ms of server latency and 8 clients keep requests in flight, which least_connections weighs
    async with Node("a", delay=0.005) as a, Node("b", delay=0.005) as b:
        config = lbconfig({"farm": pool(a, b, policy=policy, slow_start="1s")})
        async with running(config, tmp_path) as lb:
            await lb.health.first_round()
            port = port_of(lb)
            server = lb.server("farm", "b")
            b.health = "500"
            await eventually(lambda: not server.up, 2.0, "b down")
            b.health = "ok"
            await eventually(lambda: server.up, 2.0, "b up")
            early = await load(port, 8, 0.2, 5_000)
            assert server.weight < server.full_weight
            await eventually(lambda: server.weight == server.full_weight, 2.0, "the ramp to end")
            late = await load(port, 8, 0.4, 10_000)
            assert early.errors == late.errors == []
            assert early.total >= 50, early.total
            assert late.total >= 100, late.total
            assert early.share("b") < 0.3, (early.bodies, late.bodies)
            assert 0.35 < late.share("b") < 0.65, (early.bodies, late.bodies)


# -- 9. passive detection --------------------------------------------------------------------------


async def test_passive_detection_takes_a_server_out_before_the_next_probe(tmp_path: Path) -> None:
    health = {**HEALTH, "interval": "5s"}  # the probes stay out of the way
    async with Node("a") as a, Node("b") as b:
        config = lbconfig({"farm": pool(a, b, health=health, passive={"consecutive_failures": 2})})
        async with running(config, tmp_path) as lb:
            await lb.health.first_round()
            server = lb.server("farm", "a")
            checks = list(server.checks)
            await a.stop()
            statuses = []
            for index in range(10):
                if not server.up:
                    break
                response = await get(port_of(lb), b"/p%d" % index)
                statuses.append((response.status, response.body))
            assert not server.up
            assert statuses == [(200, b"b")] * len(statuses)
            assert len(statuses) <= 4
            assert server.connect_failures == 2, "down after exactly 2 failures seen by real traffic"
            assert server.transition_reason.startswith("passive"), server.transition_reason
            assert server.checks == checks, "a probe ran: this was not passive detection"
            assert lb.pools["farm"].retried == 2
            assert await names(port_of(lb), 4) == [b"b"] * 4
            assert server.connect_failures == 2


@pytest.mark.parametrize("on_5xx", [True, False])
async def test_passive_detection_counts_5xx_only_when_asked(tmp_path: Path, on_5xx: bool) -> None:
    health = {**HEALTH, "interval": "5s"}
    passive = {"consecutive_failures": 2, "on_5xx": on_5xx}
    async with (
        Node("a") as a,
        Node("b") as b,
        running(lbconfig({"farm": pool(a, b, health=health, passive=passive)}), tmp_path) as lb,
    ):
        await lb.health.first_round()
        server = lb.server("farm", "a")
        a.status = b"503 Service Unavailable"
        statuses = []
        for index in range(8):
            if not server.up:
                break
            response = await get(port_of(lb), b"/x%d" % index)
            statuses.append((response.status, response.body))
        if on_5xx:
            assert not server.up
            assert statuses.count((503, b"a")) == 2, statuses  # a response came back: not retried
            assert server.transition_reason.startswith("passive"), server.transition_reason
            assert await names(port_of(lb), 4) == [b"b"] * 4
        else:
            assert server.up
            assert statuses.count((503, b"a")) == 4, statuses


# -- 10. depool guard ------------------------------------------------------------------------------


async def test_depool_guard_keeps_servers_in_rotation(tmp_path: Path) -> None:
    nodes = [Node(f"s{index}") for index in range(4)]
    async with contextlib.AsyncExitStack() as stack:
        for node in nodes:
            await stack.enter_async_context(node)
        config = lbconfig({"farm": pool(*nodes, max_down_fraction=0.5)})
        lb = await stack.enter_async_context(running(config, tmp_path))
        await lb.health.first_round()
        farm = lb.pools["farm"]
        failing = nodes[:3]
        for node in failing:
            node.health = "500"
        await eventually(lambda: farm.depool_refusals >= 3, 3.0, "the guard to refuse a few downs")
        down = [server.name for server in farm.servers if not server.up]
        assert len(down) == 2, f"{down} are down: the guard allows 2 of 4"
        [kept] = [node.name for node in failing if node.name not in down]
        assert lb.server("farm", kept).up
        counts = Counter(await names(port_of(lb), 20))
        assert set(counts) == {kept.encode(), b"s3"}, counts


# -- 11. dynamic ratio -----------------------------------------------------------------------------


async def test_x_lb_weight_sets_the_live_weight_and_the_share(tmp_path: Path) -> None:
    async with Node("a") as a, Node("b") as b:
        b.weight_header = b"25"
        async with running(lbconfig({"farm": pool(a, b, policy="dynamic_ratio")}), tmp_path) as lb:
            server_a, server_b = lb.server("farm", "a"), lb.server("farm", "b")
            await eventually(lambda: server_b.weight == 25, 2.0, "b's live weight from its probe")
            assert server_a.weight == 100
            counts = Counter(await names(port_of(lb), 100))
            assert 15 <= counts[b"b"] <= 25, counts  # 25:100 is 1:4
            b.weight_header = b"100"
            await eventually(lambda: server_b.weight == 100, 2.0, "b back to its full weight")
            counts = Counter(await names(port_of(lb), 20))
            assert counts[b"a"] == counts[b"b"] == 10, counts


# -- 12. a frozen server ---------------------------------------------------------------------------


async def test_frozen_server_gets_retried_then_taken_out(tmp_path: Path) -> None:
    async with Node("a") as a, Node("b") as b, Node("c") as c:
        health = {**HEALTH, "interval": "200ms"}
        config = lbconfig(
            {
                "farm": pool(
                    a,
                    b,
                    c,
                    health=health,
                    retries=2,
                    timeouts={"response": "300ms"},
                    passive={"consecutive_failures": 1},
                )
            }
        )
        async with running(config, tmp_path) as lb:
            await lb.health.first_round()
            port = port_of(lb)
            server = lb.server("farm", "a")
            a.frozen = True  # still accepts and reads: only a timeout shows it
            results = await asyncio.gather(*(timed_get(port, b"/f%d" % index) for index in range(6)))
            for response, _ in results:
                assert response.status == 200, response
                assert response.body in (b"b", b"c"), response
            retried = [elapsed for index, (_, elapsed) in enumerate(results) if b"/f%d" % index in a.served]
            assert retried, "no request reached the frozen server"
            for elapsed in retried:
                assert 0.29 <= elapsed < 0.3 + 0.25 + SLACK, retried  # response timeout, checked on a 0.25 s tick
            await eventually(lambda: not server.up, 2.0, "the frozen server taken out")
            assert server.transition_reason.startswith(("passive", "timeout after")), server.transition_reason
            served = len(a.served)
            assert set(await names(port, 10)) == {b"b", b"c"}
            assert len(a.served) == served
