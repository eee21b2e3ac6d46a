"""Active health checks: probes and the rise/fall state machine that turns them into up and down.

`RiseFall` is plain data and logic (HAProxy's model: `fall` consecutive failures take an up server
down, `rise` consecutive successes bring a down one up), testable without a loop. `Checker` is the
asyncio glue: one probe loop per server, never two probes in flight for one server, each probe
bounded by its timeout, repeated every interval with a little jitter. A probe's verdict goes to the
pool through `Pool.set_health`; what it saw (result, reason, time, duration) is kept on the server for
the API. Probes use aiohttp for HTTP and a plain connection for TCP; they never touch the proxy's
protocols.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from lbproxy.config import HealthConfig
from lbproxy.pool import Pool, Server

log = logging.getLogger("lbproxy.health")

JITTER = 0.1  # each interval is drawn within ±10%, so that probes to a farm do not march in step
MAX_BODY = 64 * 1024  # what an expect_body check reads of a probe response
WEIGHT_HEADER = "X-LB-Weight"


class RiseFall:
    """The up/down state of one server as its probes see it."""

    __slots__ = ("rise", "fall", "up", "successes", "failures")

    def __init__(self, rise: int, fall: int, up: bool) -> None:
        self.rise = rise
        self.fall = fall
        self.up = up
        self.successes = 0  # consecutive, counted while down
        self.failures = 0  # consecutive, counted while up

    def record(self, ok: bool) -> bool | None:
        """Count one probe result; returns the new state when this result changes it, else None."""
        if ok:
            self.failures = 0
            if not self.up:
                self.successes += 1
                if self.successes >= self.rise:
                    self.up = True
                    self.successes = 0
                    return True
        else:
            self.successes = 0
            if self.up:
                self.failures += 1
                if self.failures >= self.fall:
                    self.up = False
                    self.failures = 0
                    return False
        return None

    def sync(self, up: bool) -> None:
        """Follow a change made elsewhere (passive detection, the depool guard): counting starts over."""
        if up != self.up:
            self.up = up
            self.successes = 0
            self.failures = 0


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    reason: str  # "HTTP 200", "HTTP 500", "connection refused", "timeout after 1s", "body mismatch"
    weight: int | None = None  # X-LB-Weight, when the response carried a valid one


async def probe_tcp(host: str, port: int, timeout: float) -> Result:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(asyncio.Protocol, host, port)
    except TimeoutError:
        return Result(False, f"timeout after {_seconds(timeout)}")
    except OSError as error:
        return Result(False, _os_reason(error))
    transport.close()
    return Result(True, "connected")


async def probe_http(session: aiohttp.ClientSession, server: Server, config: HealthConfig) -> Result:
    endpoint = server.endpoint  # where the proxies' connections go too, over TLS when the pool's do
    scheme = "https" if endpoint.tls is not None else "http"
    url = f"{scheme}://{endpoint.url_host()}:{endpoint.port}{config.path}"
    headers = {"Host": config.host or str(server.address), "User-Agent": "lbproxy-health-check"}
    tls: dict[str, Any] = {}
    if endpoint.tls is not None:
        tls = {"ssl": endpoint.tls, "server_hostname": endpoint.server_name}
    try:
        async with asyncio.timeout(config.timeout):
            async with session.request(
                config.method,
                url,
                headers=headers,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding",),
                **tls,
            ) as response:
                status = response.status
                weight = _weight(response.headers.get(WEIGHT_HEADER))
                body = await response.content.read(MAX_BODY) if config.expect_body is not None else b""
    except TimeoutError:
        return Result(False, f"timeout after {_seconds(config.timeout)}")
    except aiohttp.ClientConnectorCertificateError as error:
        certificate_error = error.certificate_error
        detail = getattr(certificate_error, "verify_message", None) or str(certificate_error)
        return Result(False, f"certificate verify failed: {detail}")
    except aiohttp.ClientConnectorError as error:
        return Result(False, _os_reason(error.os_error))
    except (aiohttp.ClientError, OSError) as error:
        return Result(False, _client_reason(error))
    low, high = config.expect_status
    if not low <= status <= high:
        return Result(False, f"HTTP {status}", weight)
    if config.expect_body is not None and config.expect_body.encode() not in body:
        return Result(False, "body mismatch", weight)
    return Result(True, f"HTTP {status}", weight)


def _weight(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip().rstrip("%")
    if not value.isdigit() or int(value) > 100:
        return None
    return int(value)


def _seconds(value: float) -> str:
    return f"{value:g}s" if value >= 1 else f"{value * 1000:g}ms"


def _os_reason(error: OSError) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    return error.strerror or type(error).__name__


def _client_reason(error: BaseException) -> str:
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "connection closed"
    if isinstance(error, ConnectionResetError | aiohttp.ClientOSError):
        return "connection reset"
    if isinstance(error, aiohttp.ClientResponseError):
        return f"invalid response: {error.message}"
    return str(error) or type(error).__name__


class Checker:
    """The probe loop of one server."""

    __slots__ = ("pool", "server", "config", "session", "state", "task", "probed")

    def __init__(self, pool: Pool, server: Server, config: HealthConfig, session: aiohttp.ClientSession | None) -> None:
        self.pool = pool
        self.server = server
        self.config = config
        self.session = session
        self.state = RiseFall(config.rise, config.fall, server.up)
        self.task: asyncio.Task[None] | None = None
        self.probed = asyncio.Event()  # set after the first probe: the runtime's readiness waits on it

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"health {self.pool.name}/{self.server.name}"
        )

    def cancel(self) -> None:
        """Stop the probe loop now, without waiting for it to end: a probe in flight is abandoned at its
        next await, before its verdict is applied, so nothing this checker saw changes a pool from here
        on. `stop()` then waits for the end."""
        if self.task is not None:
            self.task.cancel()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None

    async def run(self) -> None:
        interval = self.config.interval
        await asyncio.sleep(random.uniform(0, min(interval, 1.0)))  # spread the first round
        while True:
            started = time.monotonic()
            await self.check()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, interval * random.uniform(1 - JITTER, 1 + JITTER) - elapsed))

    async def check(self) -> Result:
        """One probe, and what follows from it."""
        server = self.server
        config = self.config
        started = time.monotonic()
        if config.type == "http":
            assert self.session is not None
            result = await probe_http(self.session, server, config)
        else:
            result = await probe_tcp(server.endpoint.host, server.endpoint.port, config.timeout)
        server.check_duration = time.monotonic() - started
        server.check_time = time.time()
        server.check_ok = result.ok
        server.check_reason = result.reason
        server.checks[result.ok] += 1
        self.state.sync(server.up)
        verdict = self.state.record(result.ok)
        if verdict is not None and not self.pool.set_health(server, verdict, result.reason):
            self.state.sync(server.up)  # the depool guard kept it up
        if result.weight is not None and self.pool.policy_name == "dynamic_ratio":
            self.pool.set_weight(server, result.weight)
        self.probed.set()
        return result


class HealthChecks:
    """Every checker of a runtime, with the one HTTP client session they share."""

    def __init__(self) -> None:
        self.checkers: list[Checker] = []
        self._session: aiohttp.ClientSession | None = None

    def add(self, pool: Pool, config: HealthConfig) -> None:
        if config.type == "none":
            return
        if config.type == "http" and self._session is None:
            # A new connection per probe (force_close): a probe must prove a server accepts connections.
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        for server in pool.servers:
            self.checkers.append(Checker(pool, server, config, self._session))

    def start(self) -> None:
        for checker in self.checkers:
            checker.start()

    def probed_all(self) -> bool:
        return all(checker.probed.is_set() for checker in self.checkers)

    async def first_round(self) -> None:
        """Wait until every server has been probed once."""
        for checker in self.checkers:
            await checker.probed.wait()

    def cancel(self) -> None:
        """Stop every probe loop now (see `Checker.cancel`); the controller's commit calls this, so that
        no probe loop outlives the pools it was started for."""
        for checker in self.checkers:
            checker.cancel()

    async def stop(self) -> None:
        for checker in self.checkers:
            await checker.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None
