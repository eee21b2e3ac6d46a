"""A fleet of three lbproxy nodes on one etcd, measured as issue #18 asks: how fast a drain reaches
every node, and what a client that retries on another node sees while the nodes restart one by one.

Everything runs on this machine: one etcd (Debian's, data in a temp dir), one back-end (`lbproxy
demo-backend`), and three `lbproxy run` nodes, lb1 to lb3, on one config file told apart by their
environment (LBPROXY_NODE, LBPROXY_PORT, LBPROXY_ADMIN_PORT), as config/cluster.yaml does. The file
has one listener to a pool of ONE server, probed every 100 ms: drained, a node has no server left
for a new request and answers it 503 ("no server available").

Drain propagation (`--runs`, 20 by default): with every node answering 200, one poller thread per
node sends back-to-back GETs on one keep-alive connection (a new one after an error) and notes the
monotonic time of its first non-200 answer; t0 is taken just before the drain is POSTed to the admin
API of one node, lb1, lb2, lb3 in turn from run to run. A run's propagation is the latest of the
three first refusals, minus t0: from the API call to the last node refusing. Then the server is
enabled through the same node, and the same pollers time the last node's first 200 again (reported
too), before the next run. A node that has not refused 5 s after t0 is reported as such.

Rolling restart: one client thread sends GETs at a fixed pace (`--rate`, 200/s), round robin over the
three nodes, on a keep-alive connection per node; on a connection error, a 2 s timeout or a 5xx it
sends the same request to the next node, at most twice more. A request is a client-visible error
when all its attempts failed. Meanwhile lb1, then lb2, then lb3 get SIGTERM; once one has exited it
is started again, and the next waits until it answers /readyz 200 and another node lists it in
`GET /api/v1/cluster` (and a further second, `--gap`). Reported: requests, those whose first attempt
failed (retried), client-visible errors, the failures by kind and node, and each node's times.

    .venv/bin/python benchmarks/cluster.py [--runs 20] [--quick] [--no-write]

`--quick`: 5 runs and a shorter restart (0.5 s gaps, 100 requests/s). Needs etcd (Debian: apt-get
install etcd-server). Prints a markdown report and writes it to benchmarks/results/cluster-<date>.md
(cluster-<date>-quick.md with --quick). Everything listens on 127.0.0.1 only, and every process
started is stopped when the script ends, however it ends (SIGTERM and Ctrl-C included).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from failover import Lines, Processes, exit_on_sigterm, free_port
from harness import cpu_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NODES = ("lb1", "lb2", "lb3")
POOL, SERVER = "one", "app"
ADMIN_HEADERS = {"X-Lbproxy-Admin": "1"}
START_TIMEOUT = 20.0  # seconds for etcd or a node to be ready
REACH = 5.0  # seconds after t0 a drain or an enable has to reach every node
SHUTDOWN = 5.0  # the nodes' shutdown_timeout: in-flight requests get this long after SIGTERM
POLL_LIMIT = 200_000  # the most requests one poller sends in one run
CLIENT_TIMEOUT = 2.0  # seconds: one attempt of the retrying client, and the pollers' requests
CLIENT_SECONDS = 60.0  # the retrying client's hard bound, whatever the restarts do
RETRIES = 2  # the retrying client's extra attempts, each on the next node

CONFIG = """\
# benchmarks/cluster.py: one file for the three nodes, told apart by their environment.
cluster:
  node: ${{LBPROXY_NODE}}
  etcd:
    endpoints: [http://127.0.0.1:{etcd}]
    prefix: /lbproxy/bench/
admin:
  bind: 127.0.0.1:${{LBPROXY_ADMIN_PORT}}
shutdown_timeout: {shutdown:g}s
listeners:
  - name: web
    bind: 127.0.0.1:${{LBPROXY_PORT}}
    pool: {pool}
pools:
  {pool}:
    health: {{type: http, path: /health, interval: 100ms, timeout: 500ms, rise: 2, fall: 2}}
    servers:
      - {{name: {server}, address: "127.0.0.1:{backend}"}}
"""


# -- HTTP, with nothing between us and 127.0.0.1 (http.client reads no proxy settings) ----------------


def call(port: int, method: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One request on a new connection: (status, body); raises OSError or HTTPException."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=ADMIN_HEADERS if method == "POST" else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def status_of(port: int, path: str, timeout: float = 1.0) -> int:
    """The status of a GET, 0 when nothing answered."""
    try:
        return call(port, "GET", path, timeout)[0]
    except (OSError, http.client.HTTPException):
        return 0


def error_kind(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, ConnectionResetError):
        return "reset"
    if isinstance(error, http.client.RemoteDisconnected):
        return "closed before an answer"
    if isinstance(error, BrokenPipeError):
        return "broken pipe"
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


# -- the fleet -----------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    port: int
    admin: int
    process: subprocess.Popen[bytes] | None = None
    logs: list[Lines] = field(default_factory=list)  # one per process this node has been

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "LBPROXY_NODE": self.name,
            "LBPROXY_PORT": str(self.port),
            "LBPROXY_ADMIN_PORT": str(self.admin),
        }


class Fleet(Processes):
    """etcd, the back-end and the three nodes; `stop_all` (Processes') ends every one of them."""

    def __init__(self, work: Path) -> None:
        super().__init__()
        self.work = work
        self.etcd_port = free_port()
        self.backend_port = free_port()
        self.nodes = [Node(name, free_port(), free_port()) for name in NODES]
        self.config = work / "cluster.yaml"
        self.etcd_lines: Lines | None = None

    def start_env(self, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Lines]:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        self.started.append(process)
        return process, Lines(process)

    def start_fleet(self) -> None:
        """etcd, then the back-end, then the three nodes, each waited for."""
        peer = free_port()
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        etcd, self.etcd_lines = super().start(
            [
                etcd_binary(),
                *("--name", "bench", "--data-dir", str(self.work / "etcd")),
                *("--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url),
                *("--listen-peer-urls", f"http://127.0.0.1:{peer}"),
                *("--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}"),
                *("--initial-cluster", f"bench=http://127.0.0.1:{peer}"),
            ]
        )
        deadline = time.monotonic() + START_TIMEOUT
        while status_of(self.etcd_port, "/health") != 200:
            if etcd.poll() is not None or time.monotonic() > deadline:
                said = " / ".join(line for _, line in self.etcd_lines.snapshot()[-5:])
                raise RuntimeError(f"etcd did not start: {said}")
            time.sleep(0.1)
        backend = [sys.executable, "-m", "lbproxy", "demo-backend", SERVER, f"127.0.0.1:{self.backend_port}"]
        super().start([*backend, "--demo-pid", str(os.getpid())])
        self.config.write_text(
            CONFIG.format(etcd=self.etcd_port, backend=self.backend_port, shutdown=SHUTDOWN, pool=POOL, server=SERVER)
        )
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self.wait_ready(node)
        for node in self.nodes:
            self.wait_listed(node, self.nodes[(self.nodes.index(node) + 1) % len(self.nodes)])

    def start_node(self, node: Node) -> None:
        command = [sys.executable, "-m", "lbproxy", "run", "-c", str(self.config)]
        node.process, lines = self.start_env(command, node.env())
        node.logs.append(lines)

    def wait_ready(self, node: Node) -> None:
        """Until the node's /readyz says 200 (listeners bound, its server probed)."""
        deadline = time.monotonic() + START_TIMEOUT
        while status_of(node.admin, "/readyz", 0.5) != 200:
            assert node.process is not None
            if node.process.poll() is not None or time.monotonic() > deadline:
                said = " / ".join(line for _, line in node.logs[-1].snapshot()[-5:])
                raise RuntimeError(f"{node.name} is not ready (exit code {node.process.poll()}): {said}")
            time.sleep(0.02)

    def wait_listed(self, node: Node, seen_by: Node) -> None:
        """Until `seen_by`'s GET /api/v1/cluster lists `node` (its registration reached etcd and the watch)."""
        deadline = time.monotonic() + START_TIMEOUT
        while node.name not in listed(seen_by):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{seen_by.name} does not list {node.name} after {START_TIMEOUT:g} s")
            time.sleep(0.02)

    def stop_node(self, node: Node) -> float:
        """SIGTERM, and the seconds until the process exited (SIGKILL after the shutdown time and 5 s)."""
        assert node.process is not None
        sent = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        try:
            node.process.wait(timeout=SHUTDOWN + 5)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=5)
        return time.monotonic() - sent

    def stop_all(self) -> None:
        """The nodes first, while etcd still answers, then etcd and the back-end (Processes' way).

        A node given SIGTERM just as etcd goes away can stay up for good (seen on 2026-12-02: its
        cluster task loses the cancellation and keeps retrying etcd); this order avoids the race,
        and SIGKILL ends a node that has not exited after its shutdown time and 5 s anyway."""
        running = [node.process for node in self.nodes if node.process is not None and node.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=SHUTDOWN + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        super().stop_all()

    def log_lines(self, node: Node) -> list[str]:
        return [line for lines in node.logs for _, line in lines.snapshot()]


def listed(node: Node) -> list[str]:
    """The node names `node` says are in the fleet ([] when it does not answer)."""
    try:
        status, body = call(node.admin, "GET", "/api/v1/cluster", 1.0)
    except (OSError, http.client.HTTPException):
        return []
    if status != 200:
        return []
    return [str(entry.get("node")) for entry in json.loads(body).get("nodes", ())]


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise SystemExit("etcd is needed (Debian: apt-get install etcd-server)")
    return found


def etcd_version() -> str:
    try:
        said = subprocess.run([etcd_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "etcd (version unknown)"
    first = said.splitlines()[0] if said else ""
    return f"etcd {first.split(':', 1)[1].strip()}" if ":" in first else "etcd (version unknown)"


# -- drain propagation ---------------------------------------------------------------------------------


class Poller(threading.Thread):
    """Back-to-back GETs to one node on one keep-alive connection until an answer says the change came:
    a non-200 when `refused`, a 200 otherwise. `before` is set at the first answer that does not (the
    state before the change, seen). Bounded by `deadline` (monotonic) and POLL_LIMIT requests."""

    def __init__(self, port: int, refused: bool, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.refused = refused
        self.deadline = deadline
        self.before = threading.Event()
        self.found: float | None = None  # monotonic time of the answer that showed the change
        self.round_trip = 0.0  # seconds that request took: how precise `found` is
        self.status = 0
        self.requests = 0
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT)
        try:
            while self.requests < POLL_LIMIT and time.monotonic() < self.deadline and not self.stop.is_set():
                sent = time.monotonic()
                try:
                    connection.request("GET", "/")
                    response = connection.getresponse()
                    response.read()
                except (OSError, http.client.HTTPException) as error:
                    self.errors[error_kind(error)] += 1
                    connection.close()
                    time.sleep(0.001)
                    continue
                now = time.monotonic()
                self.requests += 1
                if (response.status != 200) == self.refused:
                    self.found, self.status, self.round_trip = now, response.status, now - sent
                    return
                self.before.set()
        finally:
            connection.close()


@dataclass
class Change:
    """One drain or enable, as the three pollers saw it."""

    via: str  # the node whose API took the call
    answered: float  # seconds the API call took to answer
    reached: dict[str, float | None]  # node -> seconds from t0 to its first changed answer (None: not in time)
    statuses: Counter[int]
    requests: int
    errors: Counter[str]
    round_trips: list[float]  # of the requests that showed the change
    problem: str = ""

    @property
    def last(self) -> float | None:
        """Seconds until the last node showed the change; None when one never did."""
        values = list(self.reached.values())
        return None if any(v is None for v in values) else max(v for v in values if v is not None)


def change(fleet: Fleet, via: Node, action: str) -> Change:
    """POST `action` (drain, enable) to `via` while a poller per node watches for its effect."""
    refused = action == "drain"
    pollers = [Poller(node.port, refused, time.monotonic() + REACH + 5) for node in fleet.nodes]
    for poller in pollers:
        poller.start()
    problem = ""
    for node, poller in zip(fleet.nodes, pollers, strict=True):
        if not poller.before.wait(REACH):
            problem = f"{node.name} never answered as before the {action}"
    t0 = time.monotonic()
    try:
        status, body = call(via.admin, "POST", f"/api/v1/pools/{POOL}/servers/{SERVER}/{action}")
        if status != 200:
            problem = f"{action} via {via.name}: {status} {body[:200]!r}"
    except (OSError, http.client.HTTPException) as error:
        problem = f"{action} via {via.name}: {error_kind(error)}"
    answered = time.monotonic() - t0
    for poller in pollers:
        poller.deadline = min(poller.deadline, t0 + REACH)
    for poller in pollers:
        poller.join(REACH + CLIENT_TIMEOUT + 1)
        poller.stop.set()
    reached = {
        node.name: (poller.found - t0 if poller.found is not None else None)
        for node, poller in zip(fleet.nodes, pollers, strict=True)
    }
    early = [name for name, seconds in reached.items() if seconds is not None and seconds < 0]
    if early:
        problem = f"{', '.join(early)} showed the {action} before the call"
    return Change(
        via.name,
        answered,
        reached,
        Counter(poller.status for poller in pollers if poller.found is not None),
        sum(poller.requests for poller in pollers),
        sum((poller.errors for poller in pollers), Counter()),
        [poller.round_trip for poller in pollers if poller.found is not None],
        problem,
    )


def propagation(fleet: Fleet, runs: int) -> list[tuple[Change, Change]]:
    """`runs` drains and the enables after them, the API call sent to lb1, lb2, lb3 in turn."""
    pairs = []
    for run in range(runs):
        via = fleet.nodes[run % len(fleet.nodes)]
        drain = change(fleet, via, "drain")
        enable = change(fleet, via, "enable")
        pairs.append((drain, enable))
        last = drain.last
        print(
            f"run {run + 1}/{runs} via {via.name}: drain on every node after "
            f"{'-' if last is None else f'{last * 1000:.1f} ms'}{' ' + drain.problem if drain.problem else ''}",
            file=sys.stderr,
            flush=True,
        )
        if enable.last is None:  # not every node serves again: the next run would measure nothing
            raise RuntimeError(f"run {run + 1}: the enable did not reach every node: {enable.reached} {enable.problem}")
    return pairs


# -- rolling restart -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    sent: float  # monotonic
    attempts: list[tuple[str, str]]  # (node, "" for an answer under 500, else what failed)

    @property
    def failed(self) -> bool:
        return all(outcome for _, outcome in self.attempts)


class RetryingClient(threading.Thread):
    """GETs at `rate` per second, round robin over the nodes, each retried on the next node (at most
    RETRIES times) after a connection error, a timeout or a 5xx; a keep-alive connection per node."""

    def __init__(self, nodes: list[Node], rate: float, deadline: float) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.rate = rate
        self.deadline = deadline
        self.limit = int(rate * CLIENT_SECONDS)
        self.requests: list[Request] = []
        self.stop = threading.Event()
        self.connections = [
            http.client.HTTPConnection("127.0.0.1", node.port, timeout=CLIENT_TIMEOUT) for node in nodes
        ]

    def attempt(self, index: int) -> str:
        connection = self.connections[index]
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()  # the next attempt on this node opens a new connection
            return error_kind(error)
        return str(response.status) if response.status >= 500 else ""

    def run(self) -> None:
        start = time.monotonic()
        count = len(self.nodes)
        try:
            for number in range(self.limit):
                due = start + number / self.rate
                now = time.monotonic()
                if self.stop.is_set() or now > self.deadline:
                    return
                if due > now:
                    time.sleep(due - now)
                request = Request(time.monotonic(), [])
                for step in range(1 + RETRIES):
                    index = (number + step) % count
                    outcome = self.attempt(index)
                    request.attempts.append((self.nodes[index].name, outcome))
                    if not outcome:
                        break
                self.requests.append(request)
        finally:
            for connection in self.connections:
                connection.close()


@dataclass
class Restart:
    node: str
    seen_by: str
    stopped: float  # SIGTERM -> exited
    ready: float  # started -> /readyz 200
    listed: float  # started -> in seen_by's GET /api/v1/cluster
    start: float  # monotonic: SIGTERM sent
    back: float  # monotonic: listed again


@dataclass
class Rolling:
    requests: list[Request]
    restarts: list[Restart]
    start: float
    end: float


def rolling_restart(fleet: Fleet, rate: float, gap: float) -> Rolling:
    """Restart lb1, lb2, lb3 in turn under the retrying client's load."""
    client = RetryingClient(fleet.nodes, rate, time.monotonic() + CLIENT_SECONDS)
    start = time.monotonic()
    client.start()
    restarts = []
    try:
        time.sleep(gap)
        for index, node in enumerate(fleet.nodes):
            seen_by = fleet.nodes[(index + 1) % len(fleet.nodes)]
            sent = time.monotonic()
            stopped = fleet.stop_node(node)
            started = time.monotonic()
            fleet.start_node(node)
            fleet.wait_ready(node)
            ready = time.monotonic() - started
            fleet.wait_listed(node, seen_by)
            back = time.monotonic()
            restarts.append(Restart(node.name, seen_by.name, stopped, ready, back - started, sent, back))
            print(
                f"{node.name}: exited {stopped:.2f} s after SIGTERM, ready {ready:.2f} s after its start, "
                f"listed by {seen_by.name} after {back - started:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(gap)
    finally:
        client.stop.set()
        client.join(CLIENT_TIMEOUT * (1 + RETRIES) + 1)
    return Rolling(list(client.requests), restarts, start, time.monotonic())


# -- the report ----------------------------------------------------------------------------------------


def ms(value: float | None) -> str:
    return "not in time" if value is None else f"{value * 1000:.1f}"


def spread(values: list[float]) -> str:
    """median / max, in ms."""
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.1f} / {max(values) * 1000:.1f}"


def drain_section(pairs: list[tuple[Change, Change]]) -> str:
    drains = [drain for drain, _ in pairs]
    enables = [enable for _, enable in pairs]
    last = [d.last for d in drains if d.last is not None]
    own = [seconds for d in drains if (seconds := d.reached[d.via]) is not None]
    others = [s for d in drains for name, s in d.reached.items() if name != d.via and s is not None]
    back = [e.last for e in enables if e.last is not None]
    missing = sum(1 for d in drains if d.last is None)
    lines = [
        "| drain, from the API call (ms) | median / max |",
        "|---|---|",
        f"| **to the last node's first refusal** ({len(last)} runs) | **{spread(last)}** |",
        f"| to the first refusal of the node that took the call | {spread(own)} |",
        f"| to the first refusal of each other node (2 per run) | {spread(others)} |",
        f"| the API call's answer | {spread([d.answered for d in drains])} |",
        f"| the round trip of a refused request (the precision of the above) | "
        f"{spread([t for d in drains for t in d.round_trips])} |",
        f"| enable, to the last node's first 200 | {spread(back)} |",
    ]
    if missing:
        lines.append(f"\n**{missing} drain(s) did not reach every node within {REACH:g} s.**")
    slow = [d for d in drains if d.last is not None and d.last > 1.0]
    if slow:
        lines.append(f"\n**{len(slow)} drain(s) took more than 1 s to reach the last node.**")
    statuses = sum((d.statuses for d in drains), Counter())
    errors = sum((d.errors for d in drains), Counter())
    lines.append(
        "\nRefusals seen: "
        + ", ".join(f"{count} x {status}" for status, count in sorted(statuses.items()))
        + f"; requests sent by the pollers during the drains: {sum(d.requests for d in drains):,}"
        + (f"; their connection errors: {dict(errors)}" if errors else ", no connection error")
        + "."
    )
    lines += [
        "",
        "| run | call to | lb1 | lb2 | lb3 | last | API answer | enable, last |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, (drain, enable) in enumerate(pairs, 1):
        cells = " | ".join(ms(drain.reached[name]) for name in NODES)
        lines.append(
            f"| {number} | {drain.via} | {cells} | {ms(drain.last)} | {ms(drain.answered)} | {ms(enable.last)} |"
        )
    problems = [f"- run {n}: {c.problem}" for n, pair in enumerate(pairs, 1) for c in pair if c.problem]
    if problems:
        lines += ["", "Problems:", *problems]
    return "\n".join(lines)


def restart_section(rolling: Rolling) -> str:
    requests = rolling.requests
    retried = [r for r in requests if r.attempts and r.attempts[0][1]]
    visible = [r for r in requests if r.failed]
    seconds = (requests[-1].sent - requests[0].sent) if len(requests) > 1 else 0.0
    lines = [
        "| requests | first attempt failed (retried) | client-visible errors (every attempt failed) | over |",
        "|---|---|---|---|",
        f"| {len(requests):,} | {len(retried):,} | **{len(visible)}** | {seconds:.1f} s |",
        "",
        "| node | SIGTERM -> exited | started -> /readyz 200 | started -> listed by another node | "
        "SIGTERM -> back | first attempts to it that failed |",
        "|---|---|---|---|---|---|",
    ]
    for restart in rolling.restarts:
        failed_here = Counter(r.attempts[0][1] for r in retried if r.attempts[0][0] == restart.node)
        kinds = ", ".join(f"{count} {kind}" for kind, count in failed_here.most_common()) or "none"
        lines.append(
            f"| {restart.node} | {restart.stopped:.2f} s | {restart.ready:.2f} s | {restart.listed:.2f} s "
            f"({restart.seen_by}) | {restart.back - restart.start:.2f} s | {kinds} |"
        )
    second = Counter(outcome for r in retried for _, outcome in r.attempts[1:] if outcome)
    if second:
        lines.append(
            "\nRetries that failed too: " + ", ".join(f"{count} {kind}" for kind, count in second.most_common()) + "."
        )
    for request in visible[:10]:
        at = request.sent - rolling.start
        said = "; ".join(f"{node}: {outcome}" for node, outcome in request.attempts)
        lines.append(f"- a client-visible error at {at:.2f} s: {said}")
    return "\n".join(lines)


def log_section(fleet: Fleet) -> str:
    """The nodes' warnings and errors (lbproxy logs to stderr), counted by their text without the time;
    a traceback by its last line, the exception."""
    lines = []
    for node in fleet.nodes:
        said: Counter[str] = Counter()
        in_traceback = False
        for line in fleet.log_lines(node):
            if line.startswith("Traceback"):
                in_traceback = True
            elif in_traceback and not line.startswith(" "):
                said[f"traceback: {line}"] += 1
                in_traceback = False
            elif not in_traceback and any(f" {level} " in line for level in ("WARNING", "ERROR", "CRITICAL")):
                words = line.split()
                said[" ".join(words[2:])] += 1  # after the date and the time
        for text, count in said.most_common(10):
            lines.append(f"- {node.name}: {count} x `{text[:300]}`")
    return "\n".join(lines) or "- none"


def revision() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "lbproxy"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"lbproxy at {head or 'unknown'}" + (" + uncommitted changes to lbproxy/" if dirty else "")


def report(
    fleet: Fleet, pairs: list[tuple[Change, Change]], rolling: Rolling | None, args: argparse.Namespace, command: str
) -> str:
    restart = restart_section(rolling) if rolling is not None else "Not run."
    return f"""# A fleet on etcd, {time.strftime("%Y-%m-%d %H:%M")}

`{command}` on {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, {etcd_version()},
{revision()}. Every process (etcd, the back-end, the three nodes, this script's threads)
shares those cores: the times include waiting for a CPU.

Three `lbproxy run` nodes (lb1-lb3) on one config file, one etcd, one back-end (`lbproxy demo-backend`).
Each node has one listener to a pool of one server, probed every 100 ms (rise 2, fall 2): drained, a
node answers a new request 503.

## Drain propagation (issue #18)

{len(pairs)} drains, each POSTed to one node's admin API (`/api/v1/pools/{POOL}/servers/{SERVER}/drain`),
lb1, lb2, lb3 in turn. A poller per node sends back-to-back GETs on a keep-alive connection; a node's
time is from just before the call to its first non-200 answer (so within one request's round trip of
the moment the node applied it). After each drain the server is enabled through the same node and
the pollers time the last node's first 200 again.

{drain_section(pairs)}

## Rolling restart (issue #18)

A client sends {args.rate:g} GET/s round robin over the three nodes (a keep-alive connection each),
and on a connection error, a {CLIENT_TIMEOUT:g} s timeout or a 5xx sends the same request to the next
node, at most {RETRIES} more times. lb1, lb2 and lb3 get SIGTERM in turn (`shutdown_timeout:
{SHUTDOWN:g}s`); each is started again once it has exited, and the next one waits until it answers
`/readyz` 200, another node lists it in `GET /api/v1/cluster`, and {args.gap:g} s more.

{restart}

## What the nodes logged (warnings and errors)

{log_section(fleet)}
"""


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="drains to time (default 20; 5 with --quick)")
    parser.add_argument("--rate", type=float, help="the retrying client's requests per second (default 200; 100)")
    parser.add_argument("--gap", type=float, help="seconds between one node back and the next SIGTERM (1; 0.5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5 drains, a shorter restart")
    parser.add_argument("--skip-restart", action="store_true", help="time the drains only")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args()
    defaults = {"runs": 5, "rate": 100.0, "gap": 0.5} if args.quick else {"runs": 20, "rate": 200.0, "gap": 1.0}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not 1 <= args.runs <= 1000 or not 0 < args.rate <= 2000 or not 0 <= args.gap <= 10:
        parser.error("need 1 <= --runs <= 1000, 0 < --rate <= 2000, 0 <= --gap <= 10")
    etcd_binary()

    command = " ".join(["python benchmarks/cluster.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="lbproxy-cluster-"))
    fleet = Fleet(work)
    try:
        print("starting etcd, the back-end and three nodes...", file=sys.stderr, flush=True)
        fleet.start_fleet()
        pairs = propagation(fleet, args.runs)
        rolling = None if args.skip_restart else rolling_restart(fleet, args.rate, args.gap)
        text = report(fleet, pairs, rolling, args, command)
    finally:
        fleet.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    if not args.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        path = results / f"cluster-{time.strftime('%Y-%m-%d')}{'-quick' if args.quick else ''}.md"
        path.write_text(text)
        print(f"written to {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
