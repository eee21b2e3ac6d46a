"""Per-server limits and the pool's queue (issue #17): a server at its max_connections is passed over,
what finds every server full waits in its pool's queue, FIFO, and is sent as soon as a slot frees;
the queue's bounds (size, timeout), a client that leaves, drain, disable and reload while requests
wait, persistence waiting for its own server, and the L4 proxy.

Back-ends are real servers on 127.0.0.1; some have a fixed number of worker slots and answer 503
when more arrive, as an overloaded application server does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from lbproxy import admin, metrics
from lbproxy.limits import Queue, RateLimiter
from lbproxy.persistence import cookie_value
from lbproxy.runtime import Runtime
from tests.support import Backend, Client, Request, Responder, answers_when, eventually, get, port_of, running


def farm(*servers: str, pool: str = "", listener: str = "") -> str:
    """A config text for `running()`: listener `web` and pool `farm` with `servers` (flow mappings);
    `pool` and `listener` are more lines for those blocks."""
    lines = "".join(f"      - {server}\n" for server in servers)
    text = (
        "listeners:\n  - name: web\n    bind: 127.0.0.1:0\n    pool: farm\n"
        + listener
        + "pools:\n  farm:\n"
        + pool
        + "    servers:\n"
        + lines
    )
    return text.replace("{", "{{").replace("}", "}}")  # running() fills `{name}` fields: there are none


class Slots:
    """An application server's worker slots: `size` requests at once, each taking `seconds`; one
    more gets 503, as an overloaded server answers."""

    def __init__(self, size: int, seconds: float) -> None:
        self.size = size
        self.seconds = seconds
        self.busy = 0
        self.most = 0
        self.overloaded = 0

    async def respond(self, request: Request, transport: asyncio.Transport) -> None:
        if self.busy >= self.size:
            self.overloaded += 1
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
            return
        self.busy += 1
        self.most = max(self.most, self.busy)
        try:
            await asyncio.sleep(self.seconds)  # the work the request costs the server
        finally:
            self.busy -= 1
        if not transport.is_closing():
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def queue_of(lb: Runtime, pool: str = "farm") -> Queue[object]:
    queue = lb.pools[pool].queue
    assert queue is not None
    return queue  # type: ignore[return-value]


async def test_a_surge_of_ten_times_the_capacity_never_overloads_a_server(tmp_path: Path) -> None:
    slots = [Slots(4, 0.05), Slots(4, 0.05)]
    backends = [Backend(name, respond=each.respond) for name, each in zip("ab", slots, strict=True)]
    async with backends[0], backends[1]:
        text = farm(
            f'{{name: a, address: "{backends[0].address}", max_connections: 4}}',
            f'{{name: b, address: "{backends[1].address}", max_connections: 4}}',
            pool="    queue: {max_size: 1000, timeout: 5s}\n",
        )
        async with running(text, tmp_path) as lb:
            responses = await asyncio.gather(*(get(port_of(lb), b"/%d" % n) for n in range(80)))
            assert [response.status for response in responses] == [200] * 80
            assert [each.overloaded for each in slots] == [0, 0]
            assert max(each.most for each in slots) <= 4
            queue = queue_of(lb)
            assert queue.length == 0
            assert sum(queue.waits) > 0  # most of them waited
            families = {family.name: family for family in metrics.families(metrics.read(lb))}
            limits = {s.labels["server"]: s.value for s in families["lbproxy_server_max_connections"].samples}
            assert limits == {"a": 4, "b": 4}
            count = [s.value for s in families["lbproxy_pool_queue_wait_seconds"].samples if s.name.endswith("_count")]
            assert count == [sum(queue.waits)]
    # without the limit, the same surge overloads them: the test can fail
    slots = [Slots(4, 0.05), Slots(4, 0.05)]
    backends = [Backend(name, respond=each.respond) for name, each in zip("ab", slots, strict=True)]
    async with backends[0], backends[1]:
        text = farm(*(f'{{name: {b.name}, address: "{b.address}"}}' for b in backends))
        async with running(text, tmp_path) as lb:
            responses = await asyncio.gather(*(get(port_of(lb), b"/%d" % n) for n in range(80)))
            assert sum(each.overloaded for each in slots) > 0


async def test_the_queue_is_first_come_first_served(tmp_path: Path) -> None:
    release = asyncio.Event()
    backend = Backend("a", respond=answers_when(release))
    async with backend:
        text = farm(f'{{name: a, address: "{backend.address}", max_connections: 1}}')
        async with running(text, tmp_path) as lb:
            first = asyncio.ensure_future(get(port_of(lb), b"/0"))
            await eventually(lambda: len(backend.requests) == 1)
            waiting = []
            for n in range(1, 5):
                waiting.append(asyncio.ensure_future(get(port_of(lb), b"/%d" % n)))
                await eventually(lambda n=n: queue_of(lb).length == n)  # type: ignore[misc]
            release.set()
            for response in await asyncio.gather(first, *waiting):
                assert response.status == 200
            assert [request.target for request in backend.requests] == [b"/%d" % n for n in range(5)]


async def test_a_full_queue_and_a_long_wait_get_503(tmp_path: Path) -> None:
    release = asyncio.Event()
    backend = Backend("a", respond=answers_when(release))
    maintenance = tmp_path / "maintenance.html"
    maintenance.write_bytes(b"<p>back soon</p>")
    async with backend:
        text = farm(
            f'{{name: a, address: "{backend.address}", max_connections: 1}}',
            pool="    queue: {max_size: 2, timeout: 1s}\n",
            listener=f"    maintenance_page: {maintenance}\n",
        )
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            held = asyncio.ensure_future(get(port, b"/held"))
            await eventually(lambda: len(backend.requests) == 1)
            loop = asyncio.get_running_loop()
            started = loop.time()
            queued = [asyncio.ensure_future(get(port, b"/q%d" % n)) for n in range(2)]
            await eventually(lambda: queue_of(lb).length == 2)
            full = await get(port, b"/over")  # the queue holds 2: the third is refused at once
            assert full.status == 503
            assert full.body == b"<p>back soon</p>"
            for response in await asyncio.gather(*queued):  # waited their timeout: the maintenance page
                assert response.status == 503
                assert response.body == b"<p>back soon</p>"
            assert 0.9 <= loop.time() - started < 4
            queue = queue_of(lb)
            assert queue.rejections == {"full": 1, "timeout": 2}
            release.set()
            assert (await held).status == 200
            assert [request.target for request in backend.requests] == [b"/held"]  # nothing else went on
            families = {family.name: family for family in metrics.families(metrics.read(lb))}
            rejected = {s.labels["reason"]: s.value for s in families["lbproxy_pool_queue_rejections"].samples}
            assert rejected == {"full": 1, "timeout": 2}


async def test_a_client_that_leaves_leaves_the_queue(tmp_path: Path) -> None:
    release = asyncio.Event()
    backend = Backend("a", respond=answers_when(release))
    async with backend:
        text = farm(f'{{name: a, address: "{backend.address}", max_connections: 1}}')
        async with running(text, tmp_path) as lb:
            held = asyncio.ensure_future(get(port_of(lb), b"/held"))
            await eventually(lambda: len(backend.requests) == 1)
            async with await Client.connect(port_of(lb)) as client:
                await client.send(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
                await eventually(lambda: queue_of(lb).length == 1)
            await eventually(lambda: queue_of(lb).length == 0)
            release.set()
            assert (await held).status == 200
            assert (await get(port_of(lb), b"/after")).status == 200
            assert [request.target for request in backend.requests] == [b"/held", b"/after"]


async def test_drain_and_disable_while_requests_wait(tmp_path: Path) -> None:
    releases = {"a": asyncio.Event(), "b": asyncio.Event()}
    backends = {name: Backend(name, respond=answers_when(releases[name], name.encode())) for name in "ab"}
    async with backends["a"], backends["b"]:
        text = farm(*(f'{{name: {name}, address: "{b.address}", max_connections: 1}}' for name, b in backends.items()))
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            first = [asyncio.ensure_future(get(port, b"/%d" % n)) for n in range(2)]  # one on each
            await eventually(lambda: all(len(b.requests) == 1 for b in backends.values()))
            waiting = [asyncio.ensure_future(get(port, b"/w%d" % n)) for n in range(2)]
            await eventually(lambda: queue_of(lb).length == 2)
            pool = lb.pools["farm"]
            lb.drain(pool.by_name["b"])  # b finishes what it has, and takes nothing new
            releases["b"].set()
            await eventually(lambda: sum(r.status == 200 for r in (f.result() for f in first if f.done())) == 1)
            assert queue_of(lb).length == 2  # b's slot freed, but b is draining: they wait for a
            assert len(backends["b"].requests) == 1
            lb.disable(pool.by_name["a"])  # the only server that could take them is gone: they choose again
            for response in await asyncio.gather(*waiting):
                assert response.status == 503  # no server left to send them to
            assert len(backends["a"].requests) == 1
            assert len(backends["b"].requests) == 1
            releases["a"].set()


async def test_a_persisted_user_waits_for_their_own_server(tmp_path: Path) -> None:
    release = asyncio.Event()
    a = Backend("a", respond=answers_when(release, b"a"))
    b = Backend("b")
    async with a, b:
        text = farm(
            f'{{name: a, address: "{a.address}", max_connections: 1}}',
            f'{{name: b, address: "{b.address}", max_connections: 1}}',
            pool="    persistence: {type: cookie, secret: s}\n",
        )
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            value = cookie_value("farm", "a", b"s")
            held = asyncio.ensure_future(get(port, b"/held", headers=b"Cookie: LBSRV=" + value + b"\r\n"))
            await eventually(lambda: len(a.requests) == 1)
            mine = asyncio.ensure_future(get(port, b"/mine", headers=b"Cookie: LBSRV=" + value + b"\r\n"))
            await eventually(lambda: queue_of(lb).length == 1)  # a is full; b has room, but it is not theirs
            assert (await get(port, b"/new")).body == b"b"  # a new user goes where there is room
            release.set()
            assert (await held).body == b"a"
            assert (await mine).body == b"a"
            assert [request.target for request in a.requests] == [b"/held", b"/mine"]


async def test_a_reload_keeps_the_queue(tmp_path: Path) -> None:
    release = asyncio.Event()
    backend = Backend("a", respond=answers_when(release))
    async with backend:
        text = farm(f'{{name: a, address: "{backend.address}", max_connections: 1}}')
        async with running(text, tmp_path) as lb:
            held = asyncio.ensure_future(get(port_of(lb), b"/held"))
            await eventually(lambda: len(backend.requests) == 1)
            waiting = asyncio.ensure_future(get(port_of(lb), b"/waiting"))
            await eventually(lambda: queue_of(lb).length == 1)
            (tmp_path / "lbproxy.yaml").write_text(
                farm(f'{{name: a, address: "{backend.address}", max_connections: 2}}').format()
            )
            assert await lb.reload() == []
            # the new limit gives the waiting request a slot at once
            await eventually(lambda: len(backend.requests) == 2)
            assert queue_of(lb).length == 0
            release.set()
            assert (await held).status == 200
            assert (await waiting).status == 200


async def test_a_tcp_connection_waits_for_a_slot(tmp_path: Path) -> None:
    backend = Backend("a")
    async with backend:
        text = farm(f'{{name: a, address: "{backend.address}", max_connections: 1}}', listener="    mode: tcp\n")
        async with running(text, tmp_path) as lb:
            async with await Client.connect(port_of(lb)) as first:
                await first.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await first.response()).status == 200
                second = await Client.connect(port_of(lb))
                await second.send(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
                await eventually(lambda: queue_of(lb).length == 1)
                assert len(backend.requests) == 1
            async with second:  # the first is gone: the second connects
                assert (await second.response()).status == 200
            assert [request.target for request in backend.requests] == [b"/1", b"/2"]


def test_queue_tickets_fifo_by_server_and_for_anyone() -> None:
    queue: Queue[str] = Queue(max_size=3, timeout=1.0)
    served: list[tuple[str, str | None]] = []
    tickets = [
        queue.join(lambda s, n=n: served.append((n, s)), target, 0.0)  # type: ignore[misc]
        for n, target in (("1", None), ("2", "a"), ("3", None))
    ]
    assert queue.join(lambda s: None, None, 0.0) is None  # full
    assert queue.rejections["full"] == 1
    assert tickets[0] is not None
    tickets[0].cancel()
    assert queue.length == 2
    one = queue.next_for("b", own=True, anyone=True, now=0.5)  # b serves only tickets for anyone
    assert one is not None
    assert one.number == 3
    two = queue.next_for("a", own=True, anyone=True, now=0.5)
    assert two is not None
    assert two.number == 2
    assert queue.length == 0
    assert sum(queue.waits) == 2


def test_rate_limiter_burst_refill_and_bounded_memory() -> None:
    limiter = RateLimiter(rate=10.0, burst=3.0, capacity=1000)
    assert [limiter.allow(b"x", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.allow(b"x", 0.0)
    assert abs(wait - 0.1) < 1e-9  # a token every 100 ms
    assert limiter.allow(b"x", 0.1) == 0.0
    assert limiter.limited == 1
    for n in range(100_000):
        limiter.allow(b"%d" % n, 1.0)
    assert len(limiter.buckets) == 1000


# -- rate limits and trusted proxies ---------------------------------------------------------------


async def test_a_client_over_its_rate_gets_429_with_retry_after_then_its_tokens_come_back(tmp_path: Path) -> None:
    backend = Backend("a")
    async with backend:
        text = farm(
            f'{{name: a, address: "{backend.address}"}}',
            listener="    rate_limit: {requests: 5/s, burst: 3}\n",
        )
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            assert [(await get(port)).status for _ in range(3)] == [200, 200, 200]  # the burst
            refused = await get(port)
            assert refused.status == 429
            assert refused.header(b"retry-after") == b"1"
            assert len(backend.requests) == 3  # nothing of a refused request goes on
            statuses: list[int] = []

            async def refilled() -> bool:
                statuses.append((await get(port)).status)
                return statuses[-1] == 200

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while not await refilled():  # a token every 200 ms
                assert loop.time() < deadline, statuses
                await asyncio.sleep(0.05)
            families = {family.name: family for family in metrics.families(metrics.read(lb))}
            (sample,) = [s for s in families["lbproxy_listener_rate_limited"].samples if s.name.endswith("_total")]
            assert sample.value == 1 + statuses.count(429)


async def test_a_header_key_counts_each_key_and_no_header_counts_the_address(tmp_path: Path) -> None:
    backend = Backend("a")
    async with backend:
        text = farm(
            f'{{name: a, address: "{backend.address}"}}',
            listener="    rate_limit: {requests: 1/m, burst: 1, key: 'header:X-Api-Key'}\n",
        )
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            assert (await get(port, headers=b"X-Api-Key: alpha\r\n")).status == 200
            assert (await get(port, headers=b"X-Api-Key: beta\r\n")).status == 200
            assert (await get(port, headers=b"x-api-key: alpha\r\n")).status == 429
            assert (await get(port)).status == 200  # keyed by its address: a bucket of its own
            assert (await get(port)).status == 429  # leaving the header out escapes nothing
            # one request reached the server per request let through, framed as lbproxy sends them
            assert [request.header(b"x-api-key") for request in backend.requests] == [b"alpha", b"beta", None]
            assert all(request.raw.endswith(b"\r\n\r\n") for request in backend.requests)


async def test_trusted_proxies_name_the_client_and_nobody_else_does(tmp_path: Path) -> None:
    backend = Backend("a")
    log = tmp_path / "access.log"
    async with backend:
        listener = (
            "    rate_limit: {requests: 1/m, burst: 1}\n"
            "    trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n"
            f"    access_log: {log}\n"
        )
        text = farm(f'{{name: a, address: "{backend.address}"}}', listener=listener)
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            # 127.0.0.1 is a trusted proxy: the client is the rightmost address it does not trust
            assert (await get(port, headers=b"X-Forwarded-For: 192.0.2.1\r\n")).status == 200
            assert (await get(port, headers=b"X-Forwarded-For: 192.0.2.2, 10.1.1.1\r\n")).status == 200
            assert (await get(port, headers=b"X-Forwarded-For: 198.51.100.7, 192.0.2.1\r\n")).status == 429
            assert (await get(port, headers=b"X-Forwarded-For: not-an-address\r\n")).status == 200  # 127.0.0.1's
            await eventually(lambda: log.exists() and len(log.read_text().splitlines()) == 3)  # not the 429
            clients = [line.split('"client": "')[1].split('"')[0] for line in log.read_text().splitlines()]
            assert clients == ["192.0.2.1", "192.0.2.2", "127.0.0.1"]
            # what the server is told is unchanged: the chain, and the peer appended
            assert backend.requests[0].header(b"x-forwarded-for") == b"192.0.2.1, 127.0.0.1"
    backend = Backend("a")
    async with backend:
        listener = "    rate_limit: {requests: 1/m, burst: 1}\n    trusted_proxies: [10.0.0.0/8]\n"
        text = farm(f'{{name: a, address: "{backend.address}"}}', listener=listener)
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            # 127.0.0.1 is not trusted: whatever it writes in X-Forwarded-For, it is the client
            assert (await get(port, headers=b"X-Forwarded-For: 192.0.2.1\r\n")).status == 200
            assert (await get(port, headers=b"X-Forwarded-For: 192.0.2.2\r\n")).status == 429


def test_rate_limit_memory_is_bounded_however_many_clients_come() -> None:
    import tracemalloc

    limiter = RateLimiter(rate=1.0, burst=1.0, capacity=100_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200_000):
            limiter.allow(b"198.51.%d.%d" % (n // 256, n % 256), float(n))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limiter.buckets) == 100_000
    assert used < 40 * 1024 * 1024, used  # about 20 MB for 100,000 clients (docs/configuration.md)


async def test_a_server_going_down_takes_no_waiting_request(tmp_path: Path) -> None:
    release = asyncio.Event()

    def healthy_but_busy(name: bytes) -> Responder:
        held = answers_when(release, name)

        async def respond(request: Request, transport: asyncio.Transport) -> None:
            if request.target == b"/health":  # its probes pass: only its requests are slow
                transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return
            await held(request, transport)  # type: ignore[misc]

        return respond

    a = Backend("a", respond=healthy_but_busy(b"a"))
    b = Backend("b", respond=answers_when(asyncio.Event(), b"b"))  # frozen: its probes time out too
    async with a, b:
        text = farm(
            f'{{name: a, address: "{a.address}", max_connections: 1}}',
            f'{{name: b, address: "{b.address}", max_connections: 1}}',
            pool="    health: {type: http, path: /health, interval: 100ms, timeout: 100ms, rise: 1, fall: 1}\n",
        )
        async with running(text, tmp_path) as lb:
            port = port_of(lb)
            busy = [asyncio.ensure_future(get(port, b"/%d" % n)) for n in range(2)]  # one on each
            await eventually(lambda: queue_of(lb).length == 0 and lb.pools["farm"].by_name["a"].inflight == 1)
            waiting = [asyncio.ensure_future(get(port, b"/w%d" % n)) for n in range(2)]
            await eventually(lambda: queue_of(lb).length == 2)
            state = admin.pool_state(lb.pools["farm"])["queue"]  # what the API and the status page show
            assert (state["length"], state["max_size"]) == (2, 1000)
            server = lb.pools["farm"].by_name["b"]
            await eventually(lambda: not server.up)  # its probe timed out
            release.set()  # a frees its slot; b is down: a takes the waiting requests, one after the other
            answers = await asyncio.gather(*waiting)
            assert [response.body for response in answers] == [b"a", b"a"]
            assert queue_of(lb).length == 0
            for request in busy:  # the one on b waits for ever
                request.cancel()
            await asyncio.gather(*busy, return_exceptions=True)


def test_limit_and_rate_settings_are_checked(tmp_path: Path) -> None:
    from lbproxy.config import ConfigError, parse

    text = (
        "listeners:\n  - name: web\n    bind: 127.0.0.1:8080\n    pool: farm\n"
        "    rate_limit: {requests: fast, key: 'cookie:x'}\n"
        "    trusted_proxies: [10.0.0.0/8, nowhere]\n"
        "pools:\n  farm:\n    queue: {max_size: -1}\n    hedge: {after: soon, max_extra: 150%}\n"
        "    servers:\n      - {name: a, address: 10.0.0.1:80, max_connections: 0}\n"
    )
    try:
        parse(text, "lbproxy.yaml", environ={})
    except ConfigError as error:
        problems = [str(problem) for problem in error.problems]
    else:
        raise AssertionError("accepted")
    assert problems == [
        "lbproxy.yaml:5: listeners[0].rate_limit.requests: expected a rate such as 100/s, 600/m or 10000/h, got 'fast'",
        "lbproxy.yaml:5: listeners[0].rate_limit.key: 'cookie:x' is not source_ip or header:NAME",
        "lbproxy.yaml:6: listeners[0].trusted_proxies[1]: expected an address or a CIDR block such as 10.0.0.0/8 "
        "('nowhere' does not appear to be an IPv4 or IPv6 network)",
        "lbproxy.yaml:9: pools.farm.queue.max_size: expected an integer from 0 to 1000000, got -1",
        "lbproxy.yaml:10: pools.farm.hedge.after: expected a duration such as 500ms, 2s or 1m, got 'soon'",
        "lbproxy.yaml:10: pools.farm.hedge.max_extra: expected a share such as 10% or 0.1 (above 0, at most 100%), "
        "got 1.5",
        "lbproxy.yaml:12: pools.farm.servers[0].max_connections: expected an integer from 1 to 1000000, got 0",
    ]
