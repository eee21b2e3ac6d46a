"""Failover as clients see it: lbproxy and HAProxy while one of four back-ends is killed or frozen.

A fixed-rate GET load (500 requests/s, keep-alive) goes through each target to four back-ends, each
its own process (benchmarks/backend.py). Scenario `kill`: at 3 s one back-end gets SIGKILL, and a new
one is started on its port at 8 s. Scenario `freeze`: SIGSTOP at 3 s, SIGCONT at 8 s (the kernel still
accepts connections to a frozen server; nothing answers them). The run lasts 12 s. Every (target,
scenario) pair runs on fresh processes, one after the other, in the same invocation.

Targets, configured alike (health probe GET /health every 1 s, 500 ms timeout, down after 2 failures,
up after 2 successes, connect timeout 1 s):
  - lbproxy with passive detection (3 consecutive failures), `retries: 2`, response timeout 1 s;
  - the same with passive detection after 1 failure (nginx's default);
  - the same with `hedge: {after: 200ms, max_extra: 10%}` (issue #17: a GET with no response byte
    after 200 ms also goes to a second server, the first response wins; goal in the freeze scenario:
    no answer slower than 0.5 s and zero errors). An lbproxy whose `lbproxy check` refuses the key
    skips this target with a note, printed and in the report;
  - HAProxy as it comes (its default `retries 3` on the same server, no redispatch, `timeout server 30s`);
  - HAProxy with `retries 2`, `option redispatch` and `timeout server 1s`;
  - the same plus `retry-on all-retryable-errors` (HAProxy also retries a response timeout then, as
    lbproxy does for a GET).

The load generator is in this script: asyncio, an open-loop schedule (request i leaves at i/rate
whatever happened to the others), a pool of keep-alive connections that grows as requests wait, a 2 s
client timeout, and no retry of its own. Per request it keeps the send time, the status or the error,
and the back-end that answered (`X-Served-By`). Reported per run:

  - client errors: non-2xx responses, connection errors and client timeouts;
  - traffic off: from the signal until the proxy marks the back-end down (its own log line, read as
    it is written); from then on it gets no new request. Beside it, the send time of the last request
    the failure visibly hurt (an error, or an answer slower than 0.5 s);
  - back: from the moment the back-end can answer again (the restarted process listens, or SIGCONT)
    until the first request sent after it is answered by it.

    .venv/bin/python benchmarks/failover.py [--quick] [--rate 500] [--targets lbproxy,haproxy,...]

Needs haproxy (Debian: apt-get install haproxy). Prints a markdown table and writes it to
benchmarks/results/failover-<date>.md (failover-<date>-quick.md with --quick). Everything listens on
127.0.0.1 only, and every process started is stopped when the script ends, however it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httptools
from harness import checkout_python, cpu_model, lbproxy_command, wait_listening

HERE = Path(__file__).resolve().parent
BACKEND = HERE / "backend.py"
SERVERS = ("s1", "s2", "s3", "s4")
VICTIM = "s2"
SLOW = 0.5  # seconds: an answer this slow was held up by the failure (baseline latency is about 1 ms)
START_TIMEOUT = 10.0  # seconds to wait for a process to listen
SETTLE = 1.5  # seconds between the proxy listening and the load: the first round of probes is done

LBPROXY = """\
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm}}
pools:
  farm:
    policy: round_robin
    retries: 2
    timeouts: {{connect: 1s, response: 1s}}
    passive: {{consecutive_failures: {passive}}}
    health: {{type: http, path: /health, interval: 1s, timeout: 500ms, rise: 2, fall: 2}}
{pool_extra}    servers:
{servers}
"""

HAPROXY = """\
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server {server_timeout}
  timeout check 500ms
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
  option httpchk GET /health
  default-server check inter 1s fall 2 rise 2
{extra}{servers}
"""


@dataclass(frozen=True)
class Target:
    name: str
    key: str  # for --targets
    kind: str  # "lbproxy" or "haproxy"
    server_timeout: str = "30s"
    extra: tuple[str, ...] = ()
    pool: tuple[str, ...] = ()  # lbproxy: more keys of the pool, one YAML line each (a newer feature's)

    def lbproxy_config(self, work: Path, port: int, backends: list[int], filename: str = "") -> Path:
        servers = "\n".join(
            f'      - {{name: {name}, address: "127.0.0.1:{backend}"}}'
            for name, backend in zip(SERVERS, backends, strict=True)
        )
        path = work / (filename or f"{self.key}.yaml")
        passive = self.extra[0] if self.extra else "3"  # for lbproxy, extra is the passive threshold
        pool_extra = "".join(f"    {line}\n" for line in self.pool)
        path.write_text(LBPROXY.format(port=port, servers=servers, passive=passive, pool_extra=pool_extra))
        return path

    def command(self, work: Path, port: int, backends: list[int]) -> list[str]:
        if self.kind == "lbproxy":
            path = self.lbproxy_config(work, port, backends)
            return lbproxy_command(path)
        servers = "".join(
            f"  server {name} 127.0.0.1:{backend}\n" for name, backend in zip(SERVERS, backends, strict=True)
        )
        extra = "".join(f"  {line}\n" for line in self.extra)
        path = work / f"{self.key}.cfg"
        path.write_text(HAPROXY.format(port=port, server_timeout=self.server_timeout, extra=extra, servers=servers))
        return [haproxy_binary(), "-f", str(path)]


# Hedging (issue #17): a GET with no response byte after 200 ms goes to a second server as well, the
# first response wins. Skipped, with a note, by an lbproxy that does not accept the key yet.
HEDGE = Target("lbproxy, hedge 200 ms", "lbproxy-hedge", "lbproxy", pool=("hedge: {after: 200ms, max_extra: 10%}",))
HEDGE_GOAL = "no answer slower than 0.5 s and zero errors"  # in the freeze scenario
TARGETS = (
    Target("lbproxy", "lbproxy", "lbproxy"),
    # nginx's default (max_fails=1): the first refused connection takes the server out.
    Target("lbproxy, passive 1", "lbproxy-passive1", "lbproxy", extra=("1",)),
    HEDGE,
    Target("HAProxy", "haproxy", "haproxy"),
    Target(
        "HAProxy, retries 2 + redispatch",
        "haproxy-redispatch",
        "haproxy",
        server_timeout="1s",
        extra=("retries 2", "option redispatch"),
    ),
    Target(
        "HAProxy, retries 2 + redispatch + retry-on all",
        "haproxy-retry-on",
        "haproxy",
        server_timeout="1s",
        extra=("retries 2", "option redispatch", "retry-on all-retryable-errors"),
    ),
)
SCENARIOS = {"kill": "SIGKILL, restart", "freeze": "SIGSTOP, SIGCONT"}


def lbproxy_refuses(target: Target, work: Path) -> str | None:
    """Why this checkout's lbproxy cannot run `target` (its `lbproxy check` on the target's config),
    or None. Only targets that use pool keys of a newer feature (`pool`) are checked."""
    if target.kind != "lbproxy" or not target.pool:
        return None
    path = target.lbproxy_config(work, free_port(), [free_port() for _ in SERVERS], f"{target.key}-check.yaml")
    command = [*checkout_python(), "-m", "lbproxy", "check", "-c", str(path), "--no-resolve"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode == 0:
        return None
    said = " / ".join(line.replace(str(path), "CONFIG") for line in (done.stdout + done.stderr).splitlines()[:3])
    return f"`lbproxy check` refuses its config ({said or f'exit status {done.returncode}'})"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        raise SystemExit("haproxy is not installed (Debian: apt-get install haproxy)")
    return found


def exit_on_sigterm() -> None:
    """Make SIGTERM (run.py's, on a timeout) raise SystemExit, so that the `finally` blocks stop every
    process this script started; by default it would end the script at once and leave them running."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_listening(port: int, process: subprocess.Popen[bytes], lines: Lines) -> None:
    """Wait until the proxy listens on `port`; fail at once, with its last words, if it exits first."""

    def gone() -> str | None:
        if process.poll() is None:
            return None
        said = " / ".join(line for _, line in lines.snapshot()[-5:])
        return f"the proxy exited with {process.returncode} before listening on {port}: {said}"

    wait_listening(port, START_TIMEOUT, gone)


# -- processes ---------------------------------------------------------------------------------------


class Lines:
    """A process's output, each line with the monotonic time it was read (a thread reads until EOF)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for raw in stream:  # type: ignore[attr-defined]
            line = raw.decode(errors="replace").rstrip()
            with self._lock:
                self.lines.append((time.monotonic(), line))

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, prefix: str, deadline: float) -> str:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for _, line in self.snapshot():
                if line.startswith(prefix):
                    return line
            time.sleep(0.01)
        raise RuntimeError(f"no {prefix!r} line after {deadline:g}s: {self.snapshot()[-5:]}")


class Processes:
    """Every process one run starts; `stop_all` ends each of them, frozen ones included."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str]) -> tuple[subprocess.Popen[bytes], Lines]:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started.append(process)
        return process, Lines(process)

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                try:
                    process.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.started:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.started.clear()


# -- the load generator ------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    sent: float  # monotonic time the request was started (its connection taken or opened)
    latency: float  # seconds until the whole response, or until the error
    status: int = 0  # 0: no response
    server: str = ""  # X-Served-By
    error: str = ""  # "timeout", "refused", "reset", "closed", ...


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection of the load generator: one request at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, str, bool]] | None = None
        self.status = 0
        self.server = ""
        self.keep = True
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client.open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.open -= 1
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if self.status:  # a head came: the close ended a close-delimited body
                waiter.set_result((self.status, self.server, False))
            else:
                waiter.set_exception(ConnectionResetError() if exc is not None else EOFError())

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(ValueError("invalid response"))
            self.abort()

    def on_message_begin(self) -> None:
        self.status = 0
        self.server = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-served-by":
            self.server = value.decode()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.status, self.server, self.keep))
        self.status = 0

    def request(self, data: bytes) -> asyncio.Future[tuple[int, str, bool]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Client:
    """Sends requests over a pool of keep-alive connections, opening one more whenever none is idle."""

    def __init__(self, port: int, timeout: float, max_connections: int) -> None:
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self.idle: list[ClientConnection] = []
        self.open = 0
        self.request_bytes = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: failover-bench\r\n\r\n" % port

    async def one(self) -> Sample:
        loop = asyncio.get_running_loop()
        sent = time.monotonic()
        connection: ClientConnection | None = None
        while self.idle and connection is None:
            candidate = self.idle.pop()
            if not candidate.closed:
                connection = candidate
        if connection is None and self.open >= self.max_connections:
            return Sample(sent, 0.0, error="client connection limit")
        try:
            async with asyncio.timeout(self.timeout):
                if connection is None:
                    _, connection = await loop.create_connection(lambda: ClientConnection(self), "127.0.0.1", self.port)
                status, server, keep = await connection.request(self.request_bytes)
        except TimeoutError:
            if connection is not None:
                connection.abort()
            return Sample(sent, time.monotonic() - sent, error="timeout")
        except (OSError, EOFError, ValueError) as error:
            if connection is not None:
                connection.abort()
            return Sample(sent, time.monotonic() - sent, error=_error_kind(error))
        sample = Sample(sent, time.monotonic() - sent, status, server)
        if keep and not connection.closed:
            self.idle.append(connection)
        else:
            connection.abort()
        return sample

    def close(self) -> None:
        for connection in self.idle:
            connection.abort()
        self.idle.clear()


def _error_kind(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, EOFError):
        return "closed"
    if isinstance(error, ValueError):
        return "invalid response"
    return type(error).__name__


async def drive(
    port: int,
    rate: float,
    duration: float,
    timeout: float,
    actions: list[tuple[float, Callable[[], None]]],
    max_connections: int = 4000,
) -> tuple[float, list[Sample], float]:
    """Send rate x duration requests on schedule and run `actions` at their times (seconds from start).

    Returns the start time, the samples and the worst lateness of a request against its schedule.
    (benchmarks/overload.py drives its load with this too.)
    """
    client = Client(port, timeout, max_connections=max_connections)
    start = time.monotonic() + 0.05

    async def timeline() -> None:
        for at, action in actions:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            action()

    loop = asyncio.get_running_loop()
    events = loop.create_task(timeline())
    tasks: list[asyncio.Task[Sample]] = []
    late = 0.0
    for index in range(round(rate * duration)):
        due = start + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        late = max(late, time.monotonic() - due)
        tasks.append(loop.create_task(client.one()))
    await events
    samples = list(await asyncio.gather(*tasks))  # each ends within the client timeout
    client.close()
    return start, samples, late


def run_load(
    port: int,
    rate: float,
    duration: float,
    timeout: float,
    actions: list[tuple[float, Callable[[], None]]],
    max_connections: int = 4000,
) -> tuple[float, list[Sample], float]:
    load = drive(port, rate, duration, timeout, actions, max_connections)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load)
    return uvloop.run(load)


# -- one run -----------------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    scenario: str
    samples: list[Sample]
    start: float
    signalled: float  # when the back-end was killed or stopped
    back: float | None  # when it could answer again: the restarted one listens, or SIGCONT
    proxy_lines: list[tuple[float, str]]
    late: float
    notes: list[str] = field(default_factory=list)

    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error or not 200 <= s.status < 300]

    def marked(self, state: str, after: float | None) -> float | None:
        """Seconds from `after` to the proxy's log line saying the victim is `state` (DOWN or UP)."""
        if after is None:
            return None
        pattern = re.compile(rf"[Ss]erver (?:\S+/)?{VICTIM} is {state}\b")
        for when, line in self.proxy_lines:
            if when >= after and pattern.search(line):
                return when - after
        return None

    def last_hurt(self) -> float | None:
        """Seconds from the signal to the send time of the last request the failure hurt.

        Hurt: failed, slower than SLOW, or answered by the victim although sent while it was out (a
        frozen one answers what it was given once it is continued).
        """
        end = self.back if self.back is not None else float("inf")
        hurt = [
            s.sent
            for s in self.samples
            if self.signalled <= s.sent < end
            and (s.error or not 200 <= s.status < 300 or s.latency > SLOW or s.server == VICTIM)
        ]
        return max(hurt) - self.signalled if hurt else None

    def back_after(self) -> float | None:
        if self.back is None:
            return None
        first = [s.sent for s in self.samples if s.sent >= self.back and s.server == VICTIM and 200 <= s.status < 300]
        return min(first) - self.back if first else None


def run_once(target: Target, scenario: str, args: argparse.Namespace, work: Path) -> Run:
    processes = Processes()
    ports = [free_port() for _ in SERVERS]
    proxy_port = free_port()
    try:
        backends = {}
        for name, port in zip(SERVERS, ports, strict=True):
            backends[name] = processes.start([sys.executable, str(BACKEND), name, str(port)])
        for _, lines in backends.values():
            lines.wait_for("ready ", START_TIMEOUT)
        proxy, proxy_lines = processes.start(target.command(work, proxy_port, ports))
        proxy_listening(proxy_port, proxy, proxy_lines)
        time.sleep(SETTLE)

        victim, _ = backends[VICTIM]
        victim_port = ports[SERVERS.index(VICTIM)]
        times: dict[str, float] = {}
        restarted: list[Lines] = []

        def fail() -> None:
            times["signal"] = time.monotonic()
            victim.send_signal(signal.SIGKILL if scenario == "kill" else signal.SIGSTOP)

        def recover() -> None:
            times["recover"] = time.monotonic()
            if scenario == "kill":
                _, lines = processes.start([sys.executable, str(BACKEND), VICTIM, str(victim_port)])
                restarted.append(lines)
            else:
                victim.send_signal(signal.SIGCONT)

        start, samples, late = run_load(
            proxy_port,
            args.rate,
            args.duration,
            args.client_timeout,
            [(args.fail_at, fail), (args.recover_at, recover)],
        )
        notes = []
        back: float | None = times["recover"]
        if restarted:
            try:
                back = float(restarted[0].wait_for("ready ", START_TIMEOUT).split()[1])
                notes.append(f"restarted back-end listening {back - times['recover']:.3f} s after its launch")
            except RuntimeError:
                back = None
                notes.append("the restarted back-end never listened")
        if proxy.poll() is not None:
            notes.append(f"the proxy exited with {proxy.returncode} during the run")
        return Run(target.name, scenario, samples, start, times["signal"], back, proxy_lines.snapshot(), late, notes)
    finally:
        processes.stop_all()


# -- the report --------------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def table(runs: list[Run]) -> str:
    rows = [
        "| target | scenario | requests | client errors | 5xx / conn. / timeout | answers > 0.5 s | p99 ms "
        "| marked down after s | last hurt request sent at s | back after s | marked up after s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        errors = run.errors()
        http = sum(1 for s in errors if s.status)
        timeouts = sum(1 for s in errors if s.error == "timeout")
        connection = len(errors) - http - timeouts
        slow = sum(1 for s in run.samples if not s.error and s.latency > SLOW)
        latencies = sorted(s.latency for s in run.samples)
        p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else 0.0
        rows.append(
            f"| {run.target} | {run.scenario} ({SCENARIOS[run.scenario]}) | {len(run.samples)} | {len(errors)} "
            f"| {http} / {connection} / {timeouts} | {slow} | {p99:.1f} | {seconds(run.marked('DOWN', run.signalled))} "
            f"| {seconds(run.last_hurt())} | {seconds(run.back_after())} | {seconds(run.marked('UP', run.back))} |"
        )
    return "\n".join(rows)


def details(runs: list[Run]) -> str:
    lines = []
    for run in runs:
        kinds: dict[str, int] = {}
        for sample in run.errors():
            kind = sample.error or f"HTTP {sample.status}"
            kinds[kind] = kinds.get(kind, 0) + 1
        shown = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
        extra = "; ".join(run.notes)
        lines.append(
            f"- {run.target}, {run.scenario}: errors: {shown}; generator at most {run.late * 1000:.1f} ms late"
            + (f"; {extra}" if extra else "")
        )
    return "\n".join(lines)


def goal_lines(runs: list[Run]) -> list[str]:
    """Whether the hedging target met its goal in the freeze scenario."""
    lines = []
    for run in runs:
        if run.target == HEDGE.name and run.scenario == "freeze":
            errors = len(run.errors())
            slow = sum(1 for s in run.samples if not s.error and s.latency > SLOW)
            met = "met" if not errors and not slow else "**not met**"
            lines.append(
                f"- goal for {run.target}, freeze ({HEDGE_GOAL}): {met}: {slow} answers over {SLOW:g} s, "
                f"{errors} errors"
            )
    return lines


def haproxy_version() -> str:
    try:
        out = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError, SystemExit):
        return "HAProxy (unknown version)"
    match = re.search(r"version (\S+)", out)
    return f"HAProxy {match.group(1)}" if match else "HAProxy"


def report(runs: list[Run], args: argparse.Namespace, command: str, skipped: list[str]) -> str:
    cpu = cpu_model()
    hedging = (
        f"- **{HEDGE.name}**: the lbproxy target with `{HEDGE.pool[0]}` on its pool: a GET with no response "
        "byte after 200 ms is sent to a second server too, the first response wins (issue #17). Its goal in "
        f"the freeze scenario: {HEDGE_GOAL}.\n"
        if any(run.target == HEDGE.name for run in runs) or any(line.startswith(HEDGE.name) for line in skipped)
        else ""
    )
    notes = goal_lines(runs) + [f"- {line}" for line in skipped]
    return f"""# Failover, {time.strftime("%Y-%m-%d %H:%M")}

`{command}` on {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {haproxy_version()}.

Load: {args.rate:g} GET/s on a fixed schedule for {args.duration:g} s, keep-alive, client timeout
{args.client_timeout:g} s, through the target to four back-ends (one process each). Back-end `{VICTIM}` is
signalled at {args.fail_at:g} s and recovers at {args.recover_at:g} s (kill: restarted on its port; freeze:
SIGCONT). Probes: GET /health every 1 s, timeout 500 ms, fall 2, rise 2; connect timeout 1 s.

{table(runs)}

- **client errors**: responses other than 2xx, connection errors, and requests with no answer
  within {args.client_timeout:g} s; split as 5xx / connection errors / client timeouts.
- **marked down after**: from the signal to the proxy's own log line taking `{VICTIM}` out; from then on
  it gets no new request. **last hurt request sent at**: the send time, from the signal, of the last
  request that failed, took over {SLOW:g} s, or was answered by `{VICTIM}` although sent while it was out
  (— when the failure was invisible to clients).
- **back after**: from the moment `{VICTIM}` can answer again (the restarted process listens, or SIGCONT)
  to the first request sent after it that `{VICTIM}` answered; **marked up after**: to the proxy's log
  line putting it back.
{hedging}
{details(runs)}
""" + ("\n".join(notes) + "\n" if notes else "")


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run: 100 req/s, 8 s, fail at 2 s, recover at 5 s"
    )
    parser.add_argument("--rate", type=float, help="requests per second (default 500; 100 with --quick)")
    parser.add_argument("--duration", type=float, help="seconds of load per run (default 12; 8 with --quick)")
    parser.add_argument("--fail-at", type=float, help="seconds into the run (default 3; 2 with --quick)")
    parser.add_argument("--recover-at", type=float, help="seconds into the run (default 8; 5 with --quick)")
    parser.add_argument("--client-timeout", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--targets", default=",".join(t.key for t in TARGETS), help="comma-separated")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: kill,freeze")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    defaults = (100.0, 8.0, 2.0, 5.0) if args.quick else (500.0, 12.0, 3.0, 8.0)
    for name, default in zip(("rate", "duration", "fail_at", "recover_at"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not 0 < args.fail_at < args.recover_at < args.duration:
        parser.error("need 0 < --fail-at < --recover-at < --duration")
    targets = [t for key in args.targets.split(",") for t in TARGETS if t.key == key.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",")]
    if not targets or any(s not in SCENARIOS for s in scenarios):
        parser.error(f"targets: {', '.join(t.key for t in TARGETS)}; scenarios: {', '.join(SCENARIOS)}")
    if any(t.kind == "haproxy" for t in targets):
        haproxy_binary()

    command = " ".join(["python benchmarks/failover.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="lbproxy-failover-"))
    runs: list[Run] = []
    skipped: list[str] = []
    try:
        for target in list(targets):
            why = lbproxy_refuses(target, work)
            if why is not None:
                targets.remove(target)
                skipped.append(f"{target.name} (`{target.key}`): skipped: {why}")
                print(f"note: {skipped[-1]}", file=sys.stderr, flush=True)
        if not targets:
            print("no target left to run", file=sys.stderr)
            return 0
        for scenario in scenarios:
            for target in targets:
                print(f"{target.name}, {scenario}...", file=sys.stderr, flush=True)
                runs.append(run_once(target, scenario, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(runs, args, command, skipped)
    print(text)
    if not args.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        path = results / f"failover-{time.strftime('%Y-%m-%d')}{'-quick' if args.quick else ''}.md"
        path.write_text(text)
        print(f"written to {path.relative_to(HERE.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
