"""Health checks without the proxy: the rise/fall state machine, and each probe against real servers.

`RiseFall` is sans-IO: hypothesis drives it with random histories of probe results and `sync()` calls
and checks it against a one-line reference model (one streak of results that contradict the current
state), plus the properties the issue states in words. The probes (`probe_tcp`, `probe_http`) run
against real servers on 127.0.0.1: recording back-ends from tests.support, a refused port, a server
that accepts and never answers, and a listening socket whose accept queue is full (the kernel then
drops SYNs, so a TCP connect hangs). Nothing sleeps: each probe bounds itself with its timeout.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.config import Address, HealthConfig, PoolConfig, ServerConfig
from lbproxy.health import Result, RiseFall, probe_http, probe_tcp
from lbproxy.pool import Pool, Server
from tests.support import LOCALHOST, Backend, Request

QUICK = settings(max_examples=200, deadline=None)

# -- RiseFall: a reference model and properties ----------------------------------------------------

Event = bool | tuple[str, bool]  # a probe result (True: success), or ("sync", up)


def reference(rise: int, fall: int, up: bool, events: Sequence[Event]) -> list[tuple[bool | None, bool]]:
    """What RiseFall must answer to each event, and its state after it, by the simplest model.

    One counter: consecutive results that contradict the current state. It reaches `fall` (when up) or
    `rise` (when down): the state flips and counting starts over. A result that agrees with the state
    clears the counter; a sync to the other state flips it and clears the counter; a sync to the state
    it is already in changes nothing.
    """
    against = 0
    out: list[tuple[bool | None, bool]] = []
    for event in events:
        verdict: bool | None = None
        if isinstance(event, tuple):
            if event[1] != up:
                up = event[1]
                against = 0
        elif event == up:
            against = 0
        else:
            against += 1
            if against >= (fall if up else rise):
                up = not up
                against = 0
                verdict = up
        out.append((verdict, up))
    return out


def play(machine: RiseFall, events: Sequence[Event]) -> list[tuple[bool | None, bool]]:
    out: list[tuple[bool | None, bool]] = []
    for event in events:
        if isinstance(event, tuple):
            machine.sync(event[1])
            out.append((None, machine.up))
        else:
            out.append((machine.record(event), machine.up))
    return out


thresholds = st.integers(1, 10)
events_strategy = st.lists(st.one_of(st.booleans(), st.tuples(st.just("sync"), st.booleans())), max_size=80)


@QUICK
@given(rise=thresholds, fall=thresholds, up=st.booleans(), events=events_strategy)
def test_risefall_follows_the_reference_model(rise: int, fall: int, up: bool, events: list[Event]) -> None:
    assert play(RiseFall(rise, fall, up), events) == reference(rise, fall, up, events)


@QUICK
@given(rise=thresholds, fall=thresholds)
def test_up_goes_down_exactly_at_the_fall_th_consecutive_failure(rise: int, fall: int) -> None:
    machine = RiseFall(rise, fall, up=True)
    for count in range(1, fall):
        assert machine.record(False) is None, f"went down after {count} of {fall} failures"
        assert machine.up
    assert machine.record(False) is False
    assert not machine.up


@QUICK
@given(rise=thresholds, fall=thresholds)
def test_down_comes_up_exactly_at_the_rise_th_consecutive_success(rise: int, fall: int) -> None:
    machine = RiseFall(rise, fall, up=False)
    for count in range(1, rise):
        assert machine.record(True) is None, f"came up after {count} of {rise} successes"
        assert not machine.up
    assert machine.record(True) is True
    assert machine.up


@QUICK
@given(rise=thresholds, fall=st.integers(2, 10), streaks=st.lists(st.integers(1, 9), min_size=1, max_size=10))
def test_a_success_resets_the_failure_streak(rise: int, fall: int, streaks: list[int]) -> None:
    """Failure streaks each shorter than `fall`, separated by one success, never take a server down."""
    machine = RiseFall(rise, fall, up=True)
    for streak in streaks:
        for _ in range(min(streak, fall - 1)):
            assert machine.record(False) is None
        assert machine.record(True) is None
        assert machine.up


@QUICK
@given(rise=st.integers(2, 10), fall=thresholds, streaks=st.lists(st.integers(1, 9), min_size=1, max_size=10))
def test_a_failure_resets_the_success_streak(rise: int, fall: int, streaks: list[int]) -> None:
    """Success streaks each shorter than `rise`, separated by one failure, never bring a server up."""
    machine = RiseFall(rise, fall, up=False)
    for streak in streaks:
        for _ in range(min(streak, rise - 1)):
            assert machine.record(True) is None
        assert machine.record(False) is None
        assert not machine.up


@QUICK
@given(rise=thresholds, fall=thresholds, before=st.integers(0, 9))
def test_sync_to_the_other_state_restarts_counting(rise: int, fall: int, before: int) -> None:
    # Up with a partial failure streak; passive detection takes it down: coming back needs `rise` successes.
    machine = RiseFall(rise, fall, up=True)
    for _ in range(min(before, fall - 1)):
        machine.record(False)
    machine.sync(False)
    assert not machine.up
    for _ in range(rise - 1):
        assert machine.record(True) is None
    assert machine.record(True) is True
    # Down with a partial success streak; something else brings it up: going down needs `fall` failures.
    machine = RiseFall(rise, fall, up=False)
    for _ in range(min(before, rise - 1)):
        machine.record(True)
    machine.sync(True)
    assert machine.up
    for _ in range(fall - 1):
        assert machine.record(False) is None
    assert machine.record(False) is False


@QUICK
@given(rise=st.integers(2, 10), fall=st.integers(2, 10), up=st.booleans())
def test_sync_to_the_same_state_keeps_the_streak(rise: int, fall: int, up: bool) -> None:
    """The checker syncs before every result: a sync that changes nothing must not reset the count."""
    machine = RiseFall(rise, fall, up)
    needed = fall if up else rise
    for _ in range(needed - 1):
        machine.sync(up)
        assert machine.record(not up) is None
    machine.sync(up)
    assert machine.record(not up) is (not up)


@pytest.mark.parametrize(
    ("rise", "fall", "up", "events", "verdicts"),
    [
        # HAProxy's defaults, rise 2 fall 3: three failures in a row take it down
        (2, 3, True, "FFF", [None, None, False]),
        (2, 3, True, "FFSFF", [None, None, None, None, None]),
        (2, 3, True, "FFSFFF", [None, None, None, None, None, False]),
        # down, then back up after two successes in a row
        (2, 3, False, "SFSS", [None, None, None, True]),
        (2, 3, True, "FFFSS", [None, None, False, None, True]),
        # flapping faster than the thresholds changes nothing
        (2, 2, True, "FSFSFSFS", [None] * 8),
        (2, 2, False, "SFSFSFSF", [None] * 8),
        # rise 1 / fall 1: every contradicting result flips the state
        (1, 1, True, "FSFFS", [False, True, False, None, True]),
        # passing on a threshold: counting starts again after each flip
        (1, 2, True, "FFFFS", [None, False, None, None, True]),
        # a sync to down in the middle of a failure streak: the next successes count from zero
        (3, 2, True, ["F", ("sync", False), "S", "S", "S"], [None, None, None, None, True]),
        (3, 2, False, ["S", "S", ("sync", True), "F", "F"], [None, None, None, None, False]),
    ],
)
def test_risefall_sequences(
    rise: int, fall: int, up: bool, events: str | list[str | tuple[str, bool]], verdicts: list[bool | None]
) -> None:
    machine = RiseFall(rise, fall, up)
    parsed: list[Event] = [event if isinstance(event, tuple) else event == "S" for event in events]
    assert [verdict for verdict, _ in play(machine, parsed)] == verdicts


# -- probes against real servers -------------------------------------------------------------------


def server_at(port: int, host: str = LOCALHOST) -> Server:
    """A Server of a one-server pool at host:port, as the checker probes it."""
    config = PoolConfig(name="farm", servers=(ServerConfig(name="s", address=Address(host, port)),))
    return Pool(config).servers[0]


def refused_port() -> int:
    """A port where nothing listens: bound and closed again."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A listening socket that never accepts, its accept queue full: a new connect hangs (Linux drops the SYN)."""
    listener = socket.socket()
    listener.bind((LOCALHOST, 0))
    listener.listen(0)  # Linux queues backlog + 1 = one connection
    port = int(listener.getsockname()[1])
    queued = socket.create_connection((LOCALHOST, port), timeout=1.0)
    try:
        yield port
    finally:
        queued.close()
        listener.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session as HealthChecks makes one: a new connection per probe."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
        yield client


# Answering servers get a generous timeout: a busy machine must not turn a success into a timeout.
HTTP = HealthConfig(type="http", path="/health", timeout=2.0)


def answering(status: bytes = b"200 OK", body: bytes = b"", headers: bytes = b"") -> Backend:
    def respond(request: Request, transport: asyncio.Transport) -> None:
        payload = b"" if request.method == b"HEAD" else body
        transport.write(b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status, headers, len(body), payload))

    return Backend("probed", respond)


async def test_probe_tcp_succeeds_when_a_connection_opens() -> None:
    async with Backend() as backend:
        result = await probe_tcp(LOCALHOST, backend.port, 0.5)
        assert result.ok
        assert result.weight is None
        assert backend.accepted == 1


async def test_probe_tcp_refused() -> None:
    assert await probe_tcp(LOCALHOST, refused_port(), 0.5) == Result(False, "connection refused")


async def test_probe_tcp_times_out_when_the_connect_hangs(full_backlog: int) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await probe_tcp(LOCALHOST, full_backlog, 0.1)
    elapsed = loop.time() - started
    assert result == Result(False, "timeout after 100ms")
    assert 0.09 <= elapsed < 1.0


async def test_probe_http_succeeds_on_200(session: aiohttp.ClientSession) -> None:
    async with answering() as backend:
        result = await probe_http(session, server_at(backend.port), HTTP)
        assert result == Result(True, "HTTP 200")
        [request] = backend.requests
        assert (request.method, request.target) == (b"GET", b"/health")


async def test_probe_http_refused(session: aiohttp.ClientSession) -> None:
    result = await probe_http(session, server_at(refused_port()), HTTP)
    assert result == Result(False, "connection refused")


@pytest.mark.parametrize(("timeout", "reason"), [(0.1, "timeout after 100ms"), (0.25, "timeout after 250ms")])
async def test_probe_http_times_out_on_a_server_that_never_answers(
    session: aiohttp.ClientSession, timeout: float, reason: str
) -> None:
    loop = asyncio.get_running_loop()
    async with Backend("silent", lambda request, transport: None) as backend:
        started = loop.time()
        result = await probe_http(session, server_at(backend.port), replace(HTTP, timeout=timeout))
        elapsed = loop.time() - started
        assert result == Result(False, reason)
        assert timeout - 0.01 <= elapsed < timeout + 1.0
        assert len(backend.requests) == 1  # the request did reach it: it is the answer that never came


async def test_probe_http_fails_on_500(session: aiohttp.ClientSession) -> None:
    async with answering(b"500 Internal Server Error", b"oops") as backend:
        assert await probe_http(session, server_at(backend.port), HTTP) == Result(False, "HTTP 500")


@pytest.mark.parametrize(
    ("expect", "status", "ok"),
    [
        ((200, 399), b"302 Found", True),
        ((200, 399), b"404 Not Found", False),
        ((200, 299), b"302 Found", False),
        ((200, 200), b"204 No Content", False),
        ((200, 200), b"200 OK", True),
        ((500, 503), b"503 Service Unavailable", True),
        ((500, 503), b"200 OK", False),
        ((400, 499), b"401 Unauthorized", True),
    ],
)
async def test_probe_http_expect_status_range(
    session: aiohttp.ClientSession, expect: tuple[int, int], status: bytes, ok: bool
) -> None:
    async with answering(status) as backend:
        result = await probe_http(session, server_at(backend.port), replace(HTTP, expect_status=expect))
        assert result == Result(ok, "HTTP " + status[:3].decode())


@pytest.mark.parametrize(
    ("expect_body", "body", "reason"),
    [
        ("ALIVE", b"status: ALIVE\n", "HTTP 200"),
        ("ALIVE", b"status: DEAD\n", "body mismatch"),
        ("ALIVE", b"", "body mismatch"),
        ("ALIVE", b"alive", "body mismatch"),  # a substring match, case-sensitive
    ],
)
async def test_probe_http_expect_body(
    session: aiohttp.ClientSession, expect_body: str, body: bytes, reason: str
) -> None:
    async with answering(body=body) as backend:
        result = await probe_http(session, server_at(backend.port), replace(HTTP, expect_body=expect_body))
        assert result == Result(reason == "HTTP 200", reason)


async def test_probe_http_body_mismatch_on_an_error_status_reports_the_status(session: aiohttp.ClientSession) -> None:
    async with answering(b"503 Service Unavailable", b"ALIVE") as backend:
        result = await probe_http(session, server_at(backend.port), replace(HTTP, expect_body="ALIVE"))
        assert result == Result(False, "HTTP 503")


async def test_probe_http_host_header_defaults_to_the_server_address(session: aiohttp.ClientSession) -> None:
    async with answering() as backend:
        assert (await probe_http(session, server_at(backend.port), HTTP)).ok
        [request] = backend.requests
        assert request.header_lines(b"host") == [f"{LOCALHOST}:{backend.port}".encode()]


async def test_probe_http_host_header_override(session: aiohttp.ClientSession) -> None:
    async with answering() as backend:
        config = replace(HTTP, host="app.example.com:8080")
        assert (await probe_http(session, server_at(backend.port), config)).ok
        [request] = backend.requests
        assert request.header_lines(b"host") == [b"app.example.com:8080"]


async def test_probe_http_method_head(session: aiohttp.ClientSession) -> None:
    async with answering(body=b"a body that HEAD does not get") as backend:
        result = await probe_http(session, server_at(backend.port), replace(HTTP, method="HEAD", path="/ping"))
        assert result == Result(True, "HTTP 200")
        [request] = backend.requests
        assert (request.method, request.target) == (b"HEAD", b"/ping")


@pytest.mark.parametrize(
    ("header", "weight"),
    [
        (b"X-LB-Weight: 40\r\n", 40),
        (b"x-lb-weight: 40\r\n", 40),
        (b"X-LB-Weight: 0\r\n", 0),
        (b"X-LB-Weight: 100\r\n", 100),
        (b"", None),
        (b"X-LB-Weight: 101\r\n", None),
        (b"X-LB-Weight: -5\r\n", None),
        (b"X-LB-Weight: 4.5\r\n", None),
        (b"X-LB-Weight: forty\r\n", None),
        (b"X-LB-Weight: \r\n", None),
    ],
)
async def test_probe_http_reads_x_lb_weight(session: aiohttp.ClientSession, header: bytes, weight: int | None) -> None:
    async with answering(headers=header) as backend:
        result = await probe_http(session, server_at(backend.port), HTTP)
        assert result == Result(True, "HTTP 200", weight)
