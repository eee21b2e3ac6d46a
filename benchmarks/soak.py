"""A churn soak (issue #13): lbproxy under steady load for minutes while its farm is knocked about.

A real lbproxy process (`lbproxy run`, with its admin server) balances four back-ends, each its own
process (`soak.py backend`: aiohttp, so that WebSocket upgrades work too). For the whole run, asyncio
clients in this process send a steady mix through it: GET, POST and PUT with bodies of every size,
on kept-alive and on new connections, every body checked, and short WebSocket sessions that echo a
few messages. Meanwhile a driver acts every few seconds, in turn: SIGKILL a back-end, restart it,
SIGSTOP one, SIGCONT it, drain one through the admin API, enable it with `lbproxy ctl`, reload with
SIGHUP, and reload a config that changes a ratio (every other time the policy too) with POST
/api/v1/reload or `lbproxy ctl reload`. The pool probes GET /health every 500 ms and has retries and
passive detection, so all of this should be invisible to clients, except what no proxy can save: a
POST, or a WebSocket session, that a back-end had in hand when it died or froze. lbproxy never sends
a POST that may have reached a server to another one, and a tunnel cannot move.

Reported (printed, and written to benchmarks/results/soak-DATE.md; soak-DATE-quick.md when shorter
than the default 10 minutes):
  - client-visible errors by kind: non-2xx responses, connection errors, client timeouts, wrong
    bodies, WebSocket failures. An error is *explained* when the request could not be retried (a
    POST, a WebSocket past its handshake), lbproxy ended it as it should (a 502 or 504, or a cut
    connection; never a client timeout) and the back-end that had it was killed or frozen while it
    was in flight: the back-ends log the id of every request they receive (a killed process's writes
    survive it), and lbproxy's own log line names the server when the back-end never saw it. Every
    other error is *unexplained*: the goal is none;
  - requests and WebSocket sessions done, and lbproxy's own counters;
  - lbproxy's RSS and open file descriptors, read from /proc every second, and their least-squares
    slopes after the warm-up and over the second half (KiB/min and fds/min: the goal is flat; a
    leak climbs in both, a heap still settling only in the first), with how long its loop's thread
    waited for a CPU (/proc/PID/schedstat), which tells a busy machine from a slow lbproxy;
  - the event loop's longest stall as a probe process sees it: GET /healthz on the admin server,
    which runs on lbproxy's loop, every 100 ms on one kept-alive connection (lbproxy exposes no loop
    lag of its own).

    .venv/bin/python benchmarks/soak.py [--duration SECONDS | --quick] [--rate 300] [--step 4]

Exits 1 when a client saw an unexplained error, a driver action failed or lbproxy died. Everything
listens on 127.0.0.1 only, every loop is bounded in time, and every process started is stopped when
the script ends, however it ends (`--keep` leaves the logs, the receipt files and soak.json, with
every sample, driver action and failure, in the work folder for a post-mortem).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from harness import Processes, cpu_model, cpu_seconds, free_port, lbproxy_command, wait_listening

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
SERVERS = ("s1", "s2", "s3", "s4")
POOL = "farm"
DEFAULT_DURATION = 600.0
QUICK_DURATION = 60.0
CLIENT_TIMEOUT = 10.0  # seconds: far above anything lbproxy may take (3 attempts of 1 s + connects)
WS_MESSAGES = 5
WS_GAP = 0.05  # seconds between two messages of a session
PROBE_EVERY = 0.1  # seconds between two stall probes
SLOW = 1.0  # seconds: a successful answer this slow is counted (a response timeout then a retry)
START_TIMEOUT = 10.0
PATTERN = bytes(range(256)) * 4096  # 1 MiB: the bodies of GET /data are its prefixes
BLOB = os.urandom(1 << 20)  # request bodies are slices of it
# The action of each step, in turn; the victims rotate over the servers from one cycle to the next.
SCHEDULE = ("kill", "restart", "freeze", "thaw", "drain", "enable", "reload", "reload-change")
VICTIM_OFFSET = {"freeze": 1, "thaw": 1, "drain": 2, "enable": 2, "reload-change": 3}

CONFIG = """\
admin: {{bind: "127.0.0.1:{admin_port}"}}
shutdown_timeout: 5s
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: {pool}}}
pools:
  {pool}:
    policy: {policy}
    retries: 2
    timeouts: {{connect: 500ms, response: 1s}}
    keepalive: {{max_idle: 64, idle_timeout: 10s}}
    passive: {{consecutive_failures: 3}}
    health: {{type: http, path: /health, interval: 500ms, timeout: 300ms, rise: 2, fall: 2}}
    servers:
{servers}
"""


# -- the back-end: `soak.py backend NAME PORT RECEIPTS LIFETIME` -------------------------------------


def backend_app(name: str, receipts: int) -> web.Application:
    """GET /data?size=N (N bytes of PATTERN), POST|PUT /echo (the body back), GET /ws (echo), /health.

    `delay=S` holds the answer S seconds. The id of every request (`id=N`) is appended to the
    receipts file when its head arrives, before anything else: what the process wrote survives a
    SIGKILL, so the soak can tell which back-end had a request that failed.
    """
    served = {"X-Served-By": name}

    def receipt(request: web.Request) -> None:
        ident = request.query.get("id")
        if ident is not None:
            os.write(receipts, f"{ident} {time.monotonic():.6f}\n".encode())

    async def pause(request: web.Request) -> None:
        delay = float(request.query.get("delay", "0"))
        if delay > 0:
            await asyncio.sleep(min(delay, 5.0))

    async def data(request: web.Request) -> web.Response:
        receipt(request)
        await pause(request)
        return web.Response(body=PATTERN[: int(request.query.get("size", "0"))], headers=served)

    async def echo(request: web.Request) -> web.Response:
        receipt(request)
        body = await request.read()
        await pause(request)
        return web.Response(body=body, headers=served)

    async def websocket(request: web.Request) -> web.StreamResponse:
        receipt(request)
        ws = web.WebSocketResponse()
        ws.headers.update(served)
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # Thawed after a freeze, answering a connection that lbproxy has given up on: aiohttp
            # drops a plain response to a closed connection quietly, a half-made WebSocket it does not.
            return web.Response(status=503)
        try:
            async for message in ws:  # ends when the client closes
                if message.type is aiohttp.WSMsgType.TEXT:
                    await ws.send_str(message.data)
                elif message.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
        except ConnectionResetError:
            pass  # the same, mid-session
        return ws

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n", headers=served)

    app = web.Application(client_max_size=4 << 20)
    app.router.add_get("/data", data)
    app.router.add_post("/echo", echo)
    app.router.add_put("/echo", echo)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/health", health)
    return app


async def serve_backend(name: str, port: int, receipts: Path, lifetime: float) -> None:
    fd = os.open(receipts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    runner = web.AppRunner(backend_app(name, fd), access_log=None, handle_signals=False)
    await runner.setup()
    # SO_REUSEADDR: a restarted back-end takes the port of a killed one at once
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=511).start()
    await asyncio.sleep(lifetime)  # the soak stops it long before; this only bounds an orphan's life
    await runner.cleanup()


# -- the stall probe: `soak.py probe PORT SECONDS OUT` -----------------------------------------------


def run_probe(port: int, seconds: float, out: Path) -> None:
    """GET /healthz every PROBE_EVERY on one kept-alive connection; writes [sent, latency, late, error].

    Blocking sockets in a process of its own, so that the load generator's loop cannot delay it;
    `late` is how late the probe itself woke (the machine was busy), to tell that apart.
    """
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    samples: list[tuple[float, float, float, str]] = []
    sock: socket.socket | None = None
    end = time.monotonic() + seconds
    due = time.monotonic()
    while (now := time.monotonic()) < end:
        if due > now:
            time.sleep(due - now)
        sent = time.monotonic()
        late = max(0.0, sent - due)
        due = max(due + PROBE_EVERY, sent)
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
            sock.sendall(request)
            _read_response(sock)
            samples.append((sent, time.monotonic() - sent, late, ""))
        except OSError as error:
            samples.append((sent, time.monotonic() - sent, late, f"{type(error).__name__}: {error}"))
            if sock is not None:
                sock.close()
            sock = None
    if sock is not None:
        sock.close()
    out.write_text(json.dumps(samples))


def _read_response(sock: socket.socket) -> None:
    """Read one response with a Content-Length body (aiohttp's answer to /healthz)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed by the admin server")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    length = int(found.group(1)) if found else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("closed by the admin server")
        body += chunk


# -- the farm and the proxy --------------------------------------------------------------------------


class Farm:
    """The four back-end processes; a killed one is started again on its port."""

    def __init__(self, processes: Processes, work: Path, lifetime: float) -> None:
        self.processes = processes
        self.work = work
        self.lifetime = lifetime
        self.ports = {name: free_port() for name in SERVERS}
        self.incarnations: Counter[str] = Counter()

    def start(self, name: str) -> None:
        self.incarnations[name] += 1
        argv = [
            sys.executable,
            str(SCRIPT),
            "backend",
            name,
            str(self.ports[name]),
            str(self.receipts(name)),
            str(self.lifetime),
        ]
        self.processes.start(name, argv, None, self.work / f"{name}-{self.incarnations[name]}.log")

    def receipts(self, name: str) -> Path:
        return self.work / f"{name}.receipts"

    def signal(self, name: str, signum: int) -> None:
        self.processes.started[name].send_signal(signum)

    def reap(self, name: str) -> None:
        self.processes.started[name].wait(timeout=5)

    def thaw_all(self) -> None:
        """SIGCONT to every back-end: a stopped process would not act on the SIGTERM that ends it."""
        for name in SERVERS:
            process = self.processes.started.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)


@dataclass
class ProxyConfig:
    """The generated config file; `write` replaces it atomically (a reload never reads half a file)."""

    path: Path
    port: int
    admin_port: int
    backends: dict[str, int]
    policy: str = "ratio"
    ratios: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVERS, 1))

    def write(self) -> None:
        servers = "\n".join(
            f'      - {{name: {name}, address: "127.0.0.1:{port}", ratio: {self.ratios[name]}}}'
            for name, port in self.backends.items()
        )
        text = CONFIG.format(admin_port=self.admin_port, port=self.port, pool=POOL, policy=self.policy, servers=servers)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, self.path)


# -- the load ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Failure:
    """One client-visible error."""

    ident: int
    what: str  # GET, POST, PUT or WS
    fresh: bool  # on a new client connection (False: a kept-alive one)
    kind: str  # see KINDS
    detail: str
    sent: float  # monotonic
    ended: float
    size: int = 0  # bytes of the request body
    explanation: str = ""


KINDS = {
    "http": "non-2xx responses",
    "connection": "connection errors",
    "timeout": "client timeouts",
    "body": "wrong bodies",
    "ws": "WebSocket failures",
}


class Load:
    """The clients' tallies, shared by every worker of the one event loop."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.next_ident = 0
        self.done: Counter[str] = Counter()  # successes by GET/POST/PUT (+ " new" on a new connection)
        self.served: Counter[str] = Counter()  # successes by X-Served-By
        self.latencies: list[float] = []
        self.slow = 0
        self.ws_sessions = 0
        self.ws_messages = 0
        self.ws_stalled = 0  # sessions with an echo slower than SLOW (a frozen back-end)
        self.failures: list[Failure] = []

    def ident(self) -> int:
        self.next_ident += 1
        return self.next_ident

    def fail(self, ident: int, what: str, fresh: bool, kind: str, detail: str, sent: float, size: int = 0) -> None:
        self.failures.append(Failure(ident, what, fresh, kind, detail, sent, time.monotonic(), size))

    async def request(self, session: aiohttp.ClientSession, fresh: bool, rng: random.Random) -> None:
        method, path, body, expected = self.pick(rng)
        ident = self.ident()
        size = len(body) if body else 0
        url = f"{self.base}{path}{'&' if '?' in path else '?'}id={ident}"
        sent = time.monotonic()
        try:
            async with session.request(method, url, data=body) as response:
                payload = await response.read()
                status = response.status
                server = response.headers.get("X-Served-By", "")
        except TimeoutError:
            self.fail(ident, method, fresh, "timeout", f"no answer within {CLIENT_TIMEOUT:g} s", sent, size)
            return
        except (aiohttp.ClientError, OSError) as error:
            self.fail(ident, method, fresh, "connection", _describe(error), sent, size)
            return
        ended = time.monotonic()
        if not 200 <= status < 300:
            text = payload[:80].decode(errors="replace").strip()
            self.fail(ident, method, fresh, "http", f"HTTP {status}: {text}", sent, size)
        elif payload != expected:
            self.fail(ident, method, fresh, "body", f"{len(payload)} bytes, {len(expected)} expected", sent, size)
        else:
            self.done[method + (" new" if fresh else "")] += 1
            self.served[server] += 1
            self.latencies.append(ended - sent)
            self.slow += ended - sent > SLOW

    @staticmethod
    def pick(rng: random.Random) -> tuple[str, str, bytes | None, bytes]:
        """(method, path, body, expected response body): GET 55%, POST 30%, PUT 15%; 15% held 20-100 ms."""
        delay = f"&delay={rng.uniform(0.02, 0.1):.3f}" if rng.random() < 0.15 else ""
        draw = rng.random()
        if draw < 0.55:
            size_draw = rng.random()
            size = (
                1 << 20
                if size_draw < 0.02
                else rng.randint(0, 128 << 10)
                if size_draw < 0.2
                else rng.randint(0, 16 << 10)
            )
            return "GET", f"/data?size={size}{delay}", None, PATTERN[:size]
        if draw < 0.85:
            size_draw = rng.random()
            size = (
                256 << 10
                if size_draw < 0.05
                else rng.randint(1, 64 << 10)
                if size_draw < 0.3
                else rng.randint(1, 16 << 10)
            )
            method = "POST"
        else:
            size = rng.randint(1, 32 << 10)  # under lbproxy's 64 KiB replay limit: a PUT can always be retried
            method = "PUT"
        offset = rng.randint(0, len(BLOB) - size)
        body = BLOB[offset : offset + size]
        return method, f"/echo?{delay[1:]}" if delay else "/echo", body, body

    async def websocket(self, session: aiohttp.ClientSession, rng: random.Random) -> None:
        """One session: WS_MESSAGES echoed messages WS_GAP apart, then a clean close."""
        ident = self.ident()
        sent = time.monotonic()
        stalled = False
        try:
            async with (
                asyncio.timeout(3 * CLIENT_TIMEOUT),  # the whole session, whatever happens
                session.ws_connect(
                    f"{self.base}/ws?id={ident}", timeout=aiohttp.ClientWSTimeout(ws_close=CLIENT_TIMEOUT)
                ) as ws,
            ):
                for number in range(WS_MESSAGES):
                    text = f"{ident}:{number}:" + "x" * rng.randint(0, 2000)
                    began = time.monotonic()
                    await ws.send_str(text)
                    message = await ws.receive(timeout=CLIENT_TIMEOUT)
                    if message.type is not aiohttp.WSMsgType.TEXT:
                        extra = f" ({message.extra})" if message.extra else ""
                        detail = f"{message.type.name} after {number} echoes, close code {ws.close_code}{extra}"
                        self.fail(ident, "WS", True, "ws", detail, sent)
                        return
                    if message.data != text:
                        self.fail(ident, "WS", True, "ws", f"wrong echo of message {number}", sent)
                        return
                    stalled = stalled or time.monotonic() - began > SLOW
                    self.ws_messages += 1
                    await asyncio.sleep(WS_GAP)
                await ws.close()
        except aiohttp.WSServerHandshakeError as error:
            self.fail(ident, "WS", True, "ws", f"handshake: HTTP {error.status}", sent)
            return
        except TimeoutError:
            self.fail(ident, "WS", True, "ws", f"timeout: no echo within {CLIENT_TIMEOUT:g} s", sent)
            return
        except (aiohttp.ClientError, OSError) as error:
            self.fail(ident, "WS", True, "ws", _describe(error), sent)
            return
        self.ws_sessions += 1
        self.ws_stalled += stalled


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _session(fresh: bool) -> aiohttp.ClientSession:
    # One connection per worker, kept alive, or a new connection for every request.
    connector = aiohttp.TCPConnector(limit=1, force_close=fresh)
    session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT))
    # aiohttp >= 3.10 silently sends an idempotent request again when a kept-alive connection breaks
    # under it; the soak counts every failure that lbproxy lets through, so it turns that off.
    session._retry_connection = False
    return session


async def http_worker(load: Load, fresh: bool, rate: float, end: float, rng: random.Random) -> None:
    """Requests at `rate` per second until `end`, one at a time (a late one does not cause a burst)."""
    interval = 1.0 / rate
    async with _session(fresh) as session:
        due = time.monotonic() + rng.uniform(0, interval)
        while (now := time.monotonic()) < end:
            if due > now:
                await asyncio.sleep(due - now)
            due = max(due + interval, time.monotonic())
            await load.request(session, fresh, rng)


async def ws_worker(load: Load, end: float, rng: random.Random) -> None:
    async with _session(fresh=True) as session:
        while time.monotonic() < end:
            await load.websocket(session, rng)
            await asyncio.sleep(rng.uniform(0.1, 0.5))


# -- the driver --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Event:
    at: float  # monotonic
    action: str
    server: str
    ok: bool
    detail: str


class Driver:
    """Every `step` seconds, the next action of SCHEDULE; victims rotate over the servers by cycle."""

    def __init__(self, farm: Farm, config: ProxyConfig, proxy_pid: int, admin: str, step: float) -> None:
        self.farm = farm
        self.config = config
        self.proxy_pid = proxy_pid
        self.admin = admin
        self.step = step
        self.events: list[Event] = []
        self.session: aiohttp.ClientSession | None = None

    async def run(self, start: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as self.session:
            number = 0
            # the last action leaves a step for its effect to show while the load still runs
            while (due := start + (number + 1) * self.step) < end - self.step:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                cycle, index = divmod(number, len(SCHEDULE))
                action = SCHEDULE[index]
                victim = SERVERS[(cycle + VICTIM_OFFSET.get(action, 0)) % len(SERVERS)]
                at = time.monotonic()
                try:
                    ok, detail = await self.act(loop, action, victim, cycle)
                except (
                    aiohttp.ClientError,
                    OSError,
                    TimeoutError,
                    ValueError,
                    KeyError,
                    subprocess.SubprocessError,
                ) as error:
                    ok, detail = False, _describe(error)
                self.events.append(Event(at, action, victim if action != "reload" else "", ok, detail))
                number += 1
        self.session = None

    async def act(self, loop: asyncio.AbstractEventLoop, action: str, victim: str, cycle: int) -> tuple[bool, str]:
        farm = self.farm
        if action == "kill":
            farm.signal(victim, signal.SIGKILL)
            await loop.run_in_executor(None, farm.reap, victim)
            return True, "SIGKILL"
        if action == "restart":
            began = time.monotonic()
            await loop.run_in_executor(None, farm.start, victim)
            listening = await _listening(farm.ports[victim], START_TIMEOUT)
            return (
                listening,
                f"listening {time.monotonic() - began:.2f} s after the start" if listening else "never listened",
            )
        if action == "freeze":
            farm.signal(victim, signal.SIGSTOP)
            return True, "SIGSTOP"
        if action == "thaw":
            farm.signal(victim, signal.SIGCONT)
            return True, "SIGCONT"
        if action == "drain":
            state = await self.call("POST", f"/api/v1/pools/{POOL}/servers/{victim}/drain")
            return state["admin"] == "draining", f"API: {state['admin']}, {state['inflight']} in flight"
        if action == "enable":
            return await self.ctl("enable", POOL, victim)
        if action == "reload":
            before = await self.reloads()
            os.kill(self.proxy_pid, signal.SIGHUP)
            for _ in range(40):  # up to 2 s
                await asyncio.sleep(0.05)
                if await self.reloads() > before:
                    return True, "SIGHUP, unchanged config"
            return False, "SIGHUP: no successful reload counted within 2 s"
        # reload-change: a ratio, and every other cycle the policy, through the API or `lbproxy ctl`
        config = self.config
        config.ratios[victim] = 3 if config.ratios[victim] == 1 else 1
        if cycle % 2:
            config.policy = "least_connections" if config.policy == "ratio" else "ratio"
        config.write()
        if cycle % 2:
            ok, how = await self.ctl("reload")
            if not ok:
                return ok, how
        else:
            await self.call("POST", "/api/v1/reload")
            how = "API"
        pool = await self.call("GET", f"/api/v1/pools/{POOL}")
        ratio = next(s["ratio"] for s in pool["servers"] if s["name"] == victim)
        applied = pool["policy"] == config.policy and ratio == config.ratios[victim]
        detail = f"{how}: {victim} ratio {config.ratios[victim]}, policy {config.policy}"
        return applied, detail + ("" if applied else f"; the API shows ratio {ratio}, policy {pool['policy']}")

    async def call(self, method: str, path: str) -> dict[str, object]:
        assert self.session is not None
        # X-Lbproxy-Admin: what the admin API wants of writes without a token (issue #14, defect 12).
        async with self.session.request(method, self.admin + path, headers={"X-Lbproxy-Admin": "1"}) as response:
            body = await response.json()
            if response.status != 200:
                raise ValueError(f"{method} {path}: {response.status} {body}")
            return body  # type: ignore[no-any-return]

    async def reloads(self) -> float:
        assert self.session is not None
        async with self.session.get(self.admin + "/metrics") as response:
            text = await response.text()
        found = re.search(r'^lbproxy_config_reloads_total\{result="success"\} (\S+)', text, re.M)
        return float(found.group(1)) if found else 0.0

    async def ctl(self, *words: str) -> tuple[bool, str]:
        """`lbproxy ctl WORDS` against the admin server; (exit status 0, its output)."""
        command = [sys.executable, "-m", "lbproxy", "ctl", "--admin", self.admin, *words]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(20):
                out, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            return False, f"lbproxy ctl {' '.join(words)}: no answer within 20 s"
        text = out.decode(errors="replace").strip().replace("\n", " / ")
        return process.returncode == 0, f"lbproxy ctl {' '.join(words)}: {text}"


async def _listening(port: int, deadline: float) -> bool:
    """Whether 127.0.0.1:`port` accepts within `deadline` seconds (polled, without blocking the loop)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


# -- sampling lbproxy --------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """lbproxy, read from /proc once a second."""

    at: float  # monotonic
    rss_kib: int
    fds: int
    waited: float  # seconds its loop's thread has waited for a CPU since it started (schedstat)


def process_sample(pid: int) -> Sample:
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    try:  # the main thread's: on a CPU, waiting for one (ns), time slices
        waited = int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        waited = 0.0  # a kernel without schedstats
    return Sample(time.monotonic(), rss, fds, waited)


async def sample_every_second(pid: int, end: float, samples: list[Sample]) -> None:
    due = time.monotonic()
    while due < end:
        try:
            samples.append(process_sample(pid))
        except OSError:
            return  # lbproxy is gone: the report says so
        due += 1.0
        await asyncio.sleep(max(0.0, due - time.monotonic()))


async def loop_lag(end: float, worst: list[float]) -> None:
    """The load generator's own lateness: if it is large, the clients' latencies are suspect."""
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.1)
        worst[0] = max(worst[0], time.monotonic() - before - 0.1)


# -- one soak ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    start: float  # monotonic
    load: Load
    events: list[Event]
    samples: list[Sample]
    lag: float
    cpu_s: float
    api: dict[str, object]
    reloads: float
    proxy_exit: int | None  # None: lbproxy was still running at the end of the load


async def soak(args: argparse.Namespace, farm: Farm, config: ProxyConfig, proxy_pid: int) -> Outcome:
    admin = f"http://127.0.0.1:{config.admin_port}"
    load = Load(config.port)
    driver = Driver(farm, config, proxy_pid, admin, args.step)
    start = time.monotonic()
    end = start + args.duration
    samples: list[Sample] = []
    lag = [0.0]
    rng = random.Random(args.seed)
    cpu_before = cpu_seconds(proxy_pid)
    workers: list[Awaitable[None]] = []
    for _ in range(args.keepalive):
        rate = args.rate * (1 - args.new_share) / args.keepalive
        workers.append(http_worker(load, False, rate, end, random.Random(rng.random())))
    for _ in range(args.new):
        rate = args.rate * args.new_share / args.new
        workers.append(http_worker(load, True, rate, end, random.Random(rng.random())))
    workers += [ws_worker(load, end, random.Random(rng.random())) for _ in range(args.websockets)]
    await asyncio.gather(
        *workers,
        driver.run(start, end),
        sample_every_second(proxy_pid, end, samples),
        loop_lag(end, lag),
    )
    cpu = cpu_seconds(proxy_pid) - cpu_before
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        try:
            async with session.get(f"{admin}/api/v1/pools/{POOL}") as response:
                api = await response.json()
            driver.session = session
            reloads = await driver.reloads()
        except (aiohttp.ClientError, OSError, TimeoutError):
            api, reloads = {}, 0.0
    exit_status = farm.processes.started["lbproxy"].poll()
    return Outcome(start, load, driver.events, samples, lag[0], cpu, api, reloads, exit_status)


def run_soak(args: argparse.Namespace, work: Path) -> tuple[Outcome, list[tuple[float, float, float, str]], Farm]:
    with Processes() as processes:
        farm = Farm(processes, work, lifetime=args.duration + 300)
        try:
            for name in SERVERS:
                farm.start(name)
            for name in SERVERS:
                wait_listening(farm.ports[name], START_TIMEOUT, _gone(processes, name))
            config = ProxyConfig(work / "lbproxy.yaml", free_port(), free_port(), farm.ports)
            config.write()
            processes.start("lbproxy", lbproxy_command(config.path), None, work / "lbproxy.log")
            wait_listening(config.port, START_TIMEOUT, _gone(processes, "lbproxy", work / "lbproxy.log"))
            _wait_ready(config.admin_port)
            probe_out = work / "probe.json"
            probe = [sys.executable, str(SCRIPT), "probe", str(config.admin_port), str(args.duration), str(probe_out)]
            processes.start("probe", probe, None, work / "probe.log")
            try:
                import uvloop
            except ImportError:
                outcome = asyncio.run(soak(args, farm, config, processes.pid("lbproxy")))
            else:
                outcome = uvloop.run(soak(args, farm, config, processes.pid("lbproxy")))
            try:
                processes.started["probe"].wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # its result is missing: the report says so
            probes = json.loads(probe_out.read_text()) if probe_out.exists() else []
        finally:
            farm.thaw_all()
    return outcome, probes, farm


def _gone(processes: Processes, name: str, log: Path | None = None) -> Callable[[], str | None]:
    def gone() -> str | None:
        process = processes.started[name]
        if process.poll() is None:
            return None
        said = log.read_text(errors="replace").strip().splitlines()[-5:] if log is not None and log.exists() else []
        return f"{name} exited with {process.returncode} before listening: {' / '.join(said)}"

    return gone


def _wait_ready(admin_port: int) -> None:
    """Wait until /readyz says every server has been probed once (bounded)."""
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", admin_port), timeout=1.0) as sock:
                sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"lbproxy's /readyz did not answer 200 within {START_TIMEOUT:g} s")


# -- explaining the failures -------------------------------------------------------------------------


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) (\S+): (.*)$")
_SERVER_FAILED = re.compile(r"server (\S+)/(\S+) failed(?: mid-response)?: (.*)$")


@dataclass(slots=True)
class LogLine:
    at: float  # monotonic
    level: str
    logger: str
    message: str


def read_proxy_log(path: Path) -> tuple[list[LogLine], list[str]]:
    """lbproxy's log lines with their time on the monotonic clock, and the lines that are not log lines."""
    offset = time.time() - time.monotonic()
    lines: list[LogLine] = []
    other: list[str] = []
    for raw in path.read_text(errors="replace").splitlines() if path.exists() else []:
        found = _LOG_LINE.match(raw)
        if found is None:
            other.append(raw)
            continue
        stamp = time.mktime(time.strptime(found.group(1), "%Y-%m-%d %H:%M:%S")) + int(found.group(2)) / 1000
        lines.append(LogLine(stamp - offset, found.group(3), found.group(4), found.group(5)))
    return lines, other


def read_receipts(farm: Farm, wanted: set[int]) -> dict[int, list[tuple[str, float]]]:
    """For each request id in `wanted`, the back-ends that received it and when."""
    found: dict[int, list[tuple[str, float]]] = {}
    for name in SERVERS:
        path = farm.receipts(name)
        if not path.exists():
            continue
        with path.open() as file:
            for line in file:
                ident, _, at = line.partition(" ")
                if ident.isdigit() and int(ident) in wanted:
                    found.setdefault(int(ident), []).append((name, float(at)))
    return found


def explain(
    failures: list[Failure], events: list[Event], receipts: dict[int, list[tuple[str, float]]], log: list[LogLine]
) -> None:
    """Set `explanation` on each failure that no proxy could have saved (see the module docstring)."""
    kills = [(e.at, e.server) for e in events if e.action == "kill"]
    freezes: list[tuple[float, float, str]] = []
    for event in events:
        if event.action == "freeze":
            thaw = next(
                (e.at for e in events if e.action == "thaw" and e.server == event.server and e.at > event.at), None
            )
            freezes.append((event.at, thaw if thaw is not None else float("inf"), event.server))
    failed_lines = [(line.at, _SERVER_FAILED.search(line.message)) for line in log]
    server_failed = [(at, found.group(2), found.group(3)) for at, found in failed_lines if found is not None]
    for failure in failures:
        if failure.what not in ("POST", "WS"):
            continue  # GET and PUT are retried on another server: nothing excuses their failure
        if failure.kind in ("timeout", "body") or failure.detail.startswith(("handshake", "timeout")):
            # lbproxy answers within its own timeouts (response: 1 s): a client left waiting 10 s was
            # left hanging, whoever had its request. A wrong body is never excused, and a WebSocket
            # handshake is a GET, retried like any other.
            continue
        for server, received in receipts.get(failure.ident, []):
            for at, killed in kills:
                if killed == server and failure.sent <= at <= failure.ended:
                    failure.explanation = (
                        f"{server} received it {1000 * (received - failure.sent):.0f} ms after it was sent and was "
                        f"SIGKILLed {1000 * (at - received):.0f} ms later"
                    )
            for stopped, thawed, frozen in freezes:
                if frozen == server and stopped <= failure.ended and thawed >= failure.sent:
                    failure.explanation = f"{server} had it and was frozen (SIGSTOP) while it was in flight"
        if failure.explanation or failure.what != "POST":
            continue
        # No back-end logged it: lbproxy's own line names the server it gave up on.
        for at, server, reason in server_failed:
            if abs(at - failure.ended) > 0.25:
                continue
            for killed_at, killed in kills:
                if killed == server and failure.sent - 0.5 <= killed_at <= failure.ended:
                    failure.explanation = (
                        f"sent to {server} {1000 * (failure.sent - killed_at):+.0f} ms from its SIGKILL: it logged "
                        f"no receipt, but lbproxy cannot know that nothing was processed; lbproxy: {reason}"
                    )
            for stopped, thawed, frozen in freezes:
                if frozen == server and stopped <= failure.ended and thawed >= failure.sent:
                    failure.explanation = f"sent to {server} while it was frozen (SIGSTOP); lbproxy: {reason}"


# -- the report --------------------------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """The least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Findings:
    """What the files left behind say, read once the processes are gone."""

    log: list[LogLine]  # lbproxy's log lines
    other_output: list[str]  # lbproxy's output that is not a log line (a traceback, say)
    backend_errors: Counter[str]  # back-end tracebacks, by their last line
    probes: list[tuple[float, float, float, str]]  # the stall probe's [sent, latency, late, error]


def report(outcome: Outcome, findings: Findings, args: argparse.Namespace, command: str) -> str:
    sections = (
        _heading(outcome, args, command),
        _errors(outcome),
        _traffic(outcome),
        _memory(outcome, args),
        _stalls(outcome, findings),
        _driver(outcome),
        _proxy(outcome, findings),
        _failures(outcome, findings),
    )
    return "\n\n".join(section for section in sections if section) + "\n"


def _heading(outcome: Outcome, args: argparse.Namespace, command: str) -> str:
    return (
        f"# Churn soak, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{command}` on {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, "
        f"lbproxy at {args.revision}.\n\n"
        f"{args.duration:g} s of load (warm-up {args.warmup:g} s): about {args.rate:g} requests/s, "
        f"{100 * (1 - args.new_share):.0f}% from {args.keepalive} clients on a kept-alive connection each, "
        f"the rest from {args.new} clients on a new connection per request (GET 55%, POST 30%, PUT 15%, bodies "
        f"up to 1 MiB, 15% held 20-100 ms by the back-end), and {args.websockets} WebSocket clients in sessions "
        f"of {WS_MESSAGES} echoes, through one lbproxy to four back-ends (one process each). Every "
        f"{args.step:g} s the driver acts, in turn: {', '.join(SCHEDULE)}. Pool: HTTP probe every 500 ms "
        "(timeout 300 ms, rise 2, fall 2), passive detection after 3 failures, retries 2, connect timeout "
        f"500 ms, response timeout 1 s. Client timeout {CLIENT_TIMEOUT:g} s; the clients never retry."
    )


def _errors(outcome: Outcome) -> str:
    failures = outcome.load.failures
    rows = ["## Client-visible errors", "", "| kind | count | explained | unexplained |", "|---|---|---|---|"]
    for kind, title in KINDS.items():
        of_kind = [f for f in failures if f.kind == kind]
        explained = sum(1 for f in of_kind if f.explanation)
        rows.append(f"| {title} | {len(of_kind)} | {explained} | {len(of_kind) - explained} |")
    explained = sum(1 for f in failures if f.explanation)
    rows += [
        f"| **total** | **{len(failures)}** | **{explained}** | **{len(failures) - explained}** |",
        "",
        "*Explained*: a POST, or a WebSocket session past its handshake, that a back-end had in hand when it was "
        "SIGKILLed or frozen, ended by lbproxy with a 502 or 504 or a cut connection. lbproxy may not send such a "
        "POST to another server (it may have been processed), and a tunnel cannot move. A client timeout is never "
        "explained: lbproxy's own timeouts are far shorter. Nothing else should ever reach a client.",
    ]
    shapes = Counter((f.kind, f.what, _shorten(f.detail, 100), bool(f.explanation)) for f in failures)
    if shapes:
        rows += ["", "| kind | request | detail | explained | count |", "|---|---|---|---|---|"]
        for (kind, what, detail, explained_one), count in shapes.most_common(30):
            mark = "yes" if explained_one else "**no**"
            rows.append(f"| {kind} | {what} | {detail.replace('|', '/')} | {mark} | {count} |")
    return "\n".join(rows)


def _traffic(outcome: Outcome) -> str:
    load = outcome.load
    done = load.done
    latencies = load.latencies
    served = ", ".join(f"{name} {count}" for name, count in sorted(load.served.items()))
    return "\n".join(
        [
            "## Traffic",
            "",
            "| requests answered 2xx | GET / POST / PUT, kept alive | GET / POST / PUT, new connection "
            "| p50 / p99 / max ms | answers > 1 s | WS sessions / echoes | WS sessions with an echo > 1 s |",
            "|---|---|---|---|---|---|---|",
            f"| {sum(done.values())} | {done['GET']} / {done['POST']} / {done['PUT']} "
            f"| {done['GET new']} / {done['POST new']} / {done['PUT new']} "
            f"| {1000 * quantile(latencies, 0.5):.1f} / {1000 * quantile(latencies, 0.99):.1f} / "
            f"{1000 * max(latencies, default=0):.0f} | {load.slow} | {load.ws_sessions} / {load.ws_messages} "
            f"| {load.ws_stalled} |",
            "",
            f"Answered by: {served}. Answers over 1 s are requests that met a frozen back-end and were retried "
            f"after the response timeout. The load generator's own loop was at most {1000 * outcome.lag:.0f} ms "
            "late.",
        ]
    )


def _memory(outcome: Outcome, args: argparse.Namespace) -> str:
    samples = outcome.samples
    if not samples:
        return "## lbproxy's memory and file descriptors\n\nNo sample: lbproxy was gone."
    after = [sample for sample in samples if sample.at >= outcome.start + args.warmup] or samples[-1:]
    rss_slope = slope_per_minute([(s.at, s.rss_kib) for s in after])
    fd_slope = slope_per_minute([(s.at, s.fds) for s in after])
    # A leak climbs in both halves; a heap still settling after the warm-up, only in the first.
    half = samples[len(samples) // 2 :]
    rss_late = slope_per_minute([(s.at, s.rss_kib) for s in half])
    fd_late = slope_per_minute([(s.at, s.fds) for s in half])
    first, warm, last = samples[0], after[0], samples[-1]
    rss = [s.rss_kib / 1024 for s in after]
    fds = [s.fds for s in after]
    waits = [later.waited - earlier.waited for earlier, later in itertools.pairwise(samples)]
    return "\n".join(
        [
            "## lbproxy's memory and file descriptors",
            "",
            "| | start | after warm-up | end | min / max after warm-up | slope after warm-up "
            "| slope over the second half |",
            "|---|---|---|---|---|---|---|",
            f"| RSS MiB | {first.rss_kib / 1024:.1f} | {warm.rss_kib / 1024:.1f} | {last.rss_kib / 1024:.1f} "
            f"| {min(rss):.1f} / {max(rss):.1f} | **{rss_slope:+.1f} KiB/min** | {rss_late:+.1f} KiB/min |",
            f"| open fds | {first.fds} | {warm.fds} | {last.fds} | {min(fds)} / {max(fds)} "
            f"| **{fd_slope:+.2f} fds/min** | {fd_late:+.2f} fds/min |",
            "",
            f"{len(samples)} samples, one a second from /proc/PID; slopes by least squares over the {len(after)} "
            f"after the warm-up. lbproxy used {outcome.cpu_s:.1f} s of CPU "
            f"({100 * outcome.cpu_s / args.duration:.0f}% of one core); its loop's thread waited for a CPU "
            f"{sum(waits):.2f} s in all, at most {1000 * max(waits, default=0):.0f} ms in one second "
            "(/proc/PID/schedstat: time runnable but not running, as on a shared machine).",
        ]
    )


def _stalls(outcome: Outcome, findings: Findings) -> str:
    probes = findings.probes
    answered = [(sent, latency, late) for sent, latency, late, error in probes if not error]
    errors = [(sent, error) for sent, _, _, error in probes if error]
    if not answered:
        return "## Event loop stalls\n\nThe stall probe recorded nothing."
    ms = [1000 * latency for _, latency, _ in answered]
    rows = [
        "## Event loop stalls",
        "",
        "| probes | errors | p50 ms | p99 ms | p99.9 ms | **longest ms** | the probe's own worst lateness ms |",
        "|---|---|---|---|---|---|---|",
        f"| {len(probes)} | {len(errors)} | {quantile(ms, 0.5):.1f} | {quantile(ms, 0.99):.1f} "
        f"| {quantile(ms, 0.999):.1f} | **{max(ms):.0f}** | {1000 * max(late for _, _, late in answered):.0f} |",
        "",
        "GET /healthz on the admin server, which runs on lbproxy's loop, every 100 ms on one kept-alive "
        "connection, from a process of its own. The five slowest, with the driver's last action before each "
        "and how much of the delay the machine explains:",
        "",
    ]
    for sent, latency, late in sorted(answered, key=lambda p: p[1], reverse=True)[:5]:
        rows.append(
            f"- {1000 * latency:.0f} ms at {sent - outcome.start:.1f} s, {_last_action(outcome.events, sent)}; "
            f"lbproxy waited {1000 * _cpu_wait(outcome.samples, sent):.0f} ms for a CPU in that second, "
            f"the probe woke {1000 * late:.0f} ms late"
        )
    rows += [f"- probe error at {sent - outcome.start:.1f} s: {error}" for sent, error in errors[:5]]
    return "\n".join(rows)


def _driver(outcome: Outcome) -> str:
    events = outcome.events
    done = Counter(event.action for event in events)
    failed = [event for event in events if not event.ok]
    restarts = [event.detail for event in events if event.action == "restart" and event.ok]
    rows = [
        "## Driver",
        "",
        "| " + " | ".join(SCHEDULE) + " | failed |",
        "|" + "---|" * (len(SCHEDULE) + 1),
        "| " + " | ".join(str(done[action]) for action in SCHEDULE) + f" | {len(failed)} |",
        "",
        f"lbproxy counted {outcome.reloads:.0f} successful reloads."
        + (f" Restarted back-ends: {restarts[0]} (first), {restarts[-1]} (last)." if restarts else ""),
    ]
    rows += [f"- **failed** at {e.at - outcome.start:.1f} s: {e.action} {e.server}: {e.detail}" for e in failed[:20]]
    return "\n".join(rows)


def _proxy(outcome: Outcome, findings: Findings) -> str:
    rows = ["## lbproxy", ""]
    if outcome.proxy_exit is not None:
        rows += [f"**lbproxy exited during the run, with status {outcome.proxy_exit}.**", ""]
    api = outcome.api
    if api:
        counters = ", ".join(f"{name} {value}" for name, value in api["counters"].items())  # type: ignore[attr-defined]
        rows += [
            f"Its counters at the end (pool: {counters}):",
            "",
            "| server | state | admin | requests | 5xx | connect failures | failures | went down | came up |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for server in api["servers"]:  # type: ignore[attr-defined]
            c = server["counters"]
            rows.append(
                f"| {server['name']} | {server['state']} | {server['admin']} | {c['requests']} "
                f"| {c['responses']['5xx']} | {c['connect_failures']} | {c['failures']} "
                f"| {c['transitions'].get('down', 0)} | {c['transitions'].get('up', 0)} |"
            )
        rows.append("")
    log = findings.log
    levels = Counter(line.level for line in log)
    rows.append("Its log: " + (", ".join(f"{n} {level}" for level, n in levels.most_common()) or "nothing") + ".")
    shapes = Counter((line.level, _shorten(re.sub(r"\d+", "N", line.message), 110)) for line in log)
    if shapes:
        rows += ["", "| level | message (digits as N) | count |", "|---|---|---|"]
        for (level, shape), count in shapes.most_common(15):
            rows.append(f"| {level} | {shape.replace('|', '/')} | {count} |")
    strange = [line for line in findings.other_output if line.strip() and not line.startswith(_BANNER)]
    if strange:
        rows += ["", f"{len(strange)} more lines of output, not log lines; the first ones:", "", "```"]
        rows += [*strange[:20], "```"]
    if findings.backend_errors:
        rows += ["", "Tracebacks of the back-ends (the soak's own code, not lbproxy), by their last line:", ""]
        rows += [f"- {count} x {last}" for last, count in findings.backend_errors.most_common(10)]
    return "\n".join(rows)


_BANNER = ("web: send traffic to", "admin: metrics, API", "Ctrl-C stops lbproxy")


def _failures(outcome: Outcome, findings: Findings) -> str:
    failures = outcome.load.failures
    explained = [f for f in failures if f.explanation]
    unexplained = [f for f in failures if not f.explanation]
    rows: list[str] = []
    if explained:
        rows += ["## Explained errors", ""]
        rows += [f"- {_describe_failure(f, outcome.start)}: {f.explanation}" for f in explained[:20]]
        if len(explained) > 20:
            rows.append(f"- ... and {len(explained) - 20} more")
    if unexplained:
        rows += ["", "## Unexplained errors", ""] if rows else ["## Unexplained errors", ""]
        for failure in unexplained[:40]:
            said = [
                f"{line.level} {line.message}"
                for line in findings.log
                if failure.sent - 0.05 <= line.at <= failure.ended + 0.25
            ][:3]
            rows.append(
                f"- {_describe_failure(failure, outcome.start)}; {_last_action(outcome.events, failure.sent)}"
                + (f"; lbproxy said: {' / '.join(said)}" if said else "")
            )
        if len(unexplained) > 40:
            rows.append(f"- ... and {len(unexplained) - 40} more")
    return "\n".join(rows)


def _cpu_wait(samples: list[Sample], at: float) -> float:
    """Seconds lbproxy's loop thread waited for a CPU in the sampling second around `at`."""
    for earlier, later in itertools.pairwise(samples):
        if earlier.at <= at < later.at:
            return later.waited - earlier.waited
    return 0.0


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _describe_failure(failure: Failure, start: float) -> str:
    where = "a new connection" if failure.fresh else "a kept-alive connection"
    body = f" ({failure.size}-byte body)" if failure.size else ""
    return (
        f"{failure.what} #{failure.ident}{body} on {where}, sent at {failure.sent - start:.3f} s, "
        f"failed after {1000 * (failure.ended - failure.sent):.0f} ms: {failure.kind}: {failure.detail}"
    )


def _last_action(events: list[Event], at: float) -> str:
    before = [event for event in events if event.at <= at]
    if not before:
        return "before the driver's first action"
    event = before[-1]
    return f"{1000 * (at - event.at):.0f} ms after {event.action} {event.server}".rstrip()


def backend_errors(work: Path) -> Counter[str]:
    """The back-ends' tracebacks, by their last line (the exception)."""
    found: Counter[str] = Counter()
    for path in sorted(work.glob("s*-*.log")):
        last = ""
        in_traceback = False
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("Traceback"):
                in_traceback = True
            elif in_traceback and line and not line.startswith(" "):
                found[line] += 1
                in_traceback = False
            last = line
        if in_traceback:
            found[last] += 1
    return found


def source_fingerprint() -> list[tuple[str, int, int]]:
    """lbproxy's files as they are on disk: (name, size, mtime)."""
    files = sorted((HERE.parent / "lbproxy").rglob("*"))
    return [
        (str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file() and "__pycache__" not in str(f)
    ]


def revision() -> str:
    """The commit lbproxy is at, and whether lbproxy/ has uncommitted changes (from git; "unknown" without)."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "lbproxy"], capture_output=True, text=True
        )
    except OSError:
        return "an unknown revision"
    if head.returncode != 0:
        return "an unknown revision"
    return head.stdout.strip() + (" with uncommitted changes to lbproxy/" if dirty.stdout.strip() else "")


# -- main --------------------------------------------------------------------------------------------


def main() -> int:
    if sys.argv[1:2] == ["backend"]:
        name, port, receipts, lifetime = sys.argv[2:6]
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve_backend(name, int(port), Path(receipts), float(lifetime)))
        else:
            uvloop.run(serve_backend(name, int(port), Path(receipts), float(lifetime)))
        return 0
    if sys.argv[1:2] == ["probe"]:
        run_probe(int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, help=f"seconds of load (default {DEFAULT_DURATION:g})")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_DURATION:g} s run")
    parser.add_argument("--warmup", type=float, help="seconds left out of the slopes (default: a fifth, at most 60)")
    parser.add_argument("--rate", type=float, default=300.0, help="HTTP requests per second, all clients (default 300)")
    parser.add_argument("--keepalive", type=int, default=8, help="clients on a kept-alive connection (default 8)")
    parser.add_argument("--new", type=int, default=4, help="clients opening a connection per request (default 4)")
    parser.add_argument("--new-share", type=float, default=0.25, help="their share of --rate (default 0.25)")
    parser.add_argument("--websockets", type=int, default=2, help="WebSocket clients (default 2)")
    parser.add_argument("--step", type=float, default=4.0, help="seconds between the driver's actions (default 4)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, receipts) and print its path")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else DEFAULT_DURATION
    if args.warmup is None:
        args.warmup = min(60.0, args.duration / 5)
    if args.duration < 4 * args.step or args.rate <= 0 or args.keepalive < 1 or args.new < 1:
        parser.error("need --duration >= 4 x --step, a positive --rate, --keepalive and --new >= 1")

    command = " ".join(["python benchmarks/soak.py", *sys.argv[1:]])
    args.revision = revision()  # now: the tree may change while the soak runs
    fingerprint = source_fingerprint()
    work = Path(tempfile.mkdtemp(prefix="lbproxy-soak-"))
    try:
        print(f"soak: {args.duration:g} s, work folder {work}", file=sys.stderr, flush=True)
        outcome, probes, farm = run_soak(args, work)
        if source_fingerprint() != fingerprint:
            args.revision += " (its files changed on disk during the run: the process kept what it had loaded)"
        log, other = read_proxy_log(work / "lbproxy.log")
        failures = outcome.load.failures
        receipts = read_receipts(farm, {f.ident for f in failures})
        explain(failures, outcome.events, receipts, log)
        text = report(outcome, Findings(log, other, backend_errors(work), probes), args, command)
        if args.keep:  # for a post-mortem, beside the logs and receipts
            start = outcome.start
            kept = {
                "samples": [[s.at - start, s.rss_kib, s.fds, s.waited] for s in outcome.samples],
                "events": [[e.at - start, e.action, e.server, e.ok, e.detail] for e in outcome.events],
                "failures": [
                    [f.ident, f.what, f.fresh, f.kind, f.detail, f.sent - start, f.ended - start, f.size, f.explanation]
                    for f in failures
                ],
            }
            (work / "soak.json").write_text(json.dumps(kept))
    finally:
        if args.keep:
            print(f"soak: logs and receipts kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(text)
    if not args.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        quick = "-quick" if args.duration < DEFAULT_DURATION else ""
        path = results / f"soak-{time.strftime('%Y-%m-%d')}{quick}.md"
        path.write_text(text + "\n")
        print(f"written to {path.relative_to(HERE.parent)}", file=sys.stderr)
    unexplained = sum(1 for f in failures if not f.explanation)
    broken = outcome.proxy_exit is not None or any(not e.ok for e in outcome.events)
    return 1 if unexplained or broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
