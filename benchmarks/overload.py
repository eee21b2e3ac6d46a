"""Overload: four back-ends of 8 worker slots each, offered twice what they can serve (issue #17).

Each back-end is a process of its own (benchmarks/slots_backend.py) that behaves like an app server
with a pool of 8 threads: a request holds a slot for 20 ms (a timer, no CPU), and one that arrives
while all 8 slots are busy is answered 503 at once; each counts what it answered. The farm's
capacity is 4 x 8 / 20 ms = 1600 requests/s; the load is twice that, 3200 GET/s on a fixed schedule
(open loop: request i leaves at i/rate whatever happened to the others) for 8 s, keep-alive, with
failover.py's load generator (a pool of keep-alive connections that grows as requests wait, at most
8000 open; a 6 s client timeout; no retry of its own). Targets, each run on fresh processes (the
back-ends too), one after the other in the same invocation:

  - lbproxy, no limit: the four servers, round robin, nothing else;
  - lbproxy with `max_connections: 8` per server and the pool's queue `{max_size: 1000, timeout: 5s}`;
  - HAProxy, no maxconn (roundrobin, `nbthread 1`, `http-reuse always`);
  - HAProxy with `maxconn 8` per server, `timeout queue 5s` (its queue is unbounded in size);
  - the same with the queue capped at 1000 as lbproxy's is: `http-request return status 503 if
    { queue(be) ge 1000 }` in the frontend (HAProxy has no size limit for a backend's queue).

No health checks: every server stays in. Reported per target: requests sent, 2xx, 5xx seen by the
clients (split: from the back-ends, which sign theirs with `X-Served-By`, and from the proxy), the
503s the back-ends say they sent, client timeouts and connection errors, the requests the generator
could not send (its 8000 connections all open and waiting: HAProxy's unbounded queue gets there),
p50/p99/max latency of the 2xx, and the 2xx per second over the load's window against the farm's
capacity; beside them the proxy's own queue figures (lbproxy's metrics, HAProxy's `show stat`) and
its CPU time.

    .venv/bin/python benchmarks/overload.py [--quick] [--targets lbproxy,lbproxy-queue,...] [--json FILE]

`--quick`: 3 s of load per target instead of 8. Needs haproxy for the HAProxy targets (Debian:
apt-get install haproxy). Prints a markdown report and writes it to
benchmarks/results/overload-<date>.md (overload-<date>-quick.md with --quick). Everything listens on
127.0.0.1 only, and every process started is stopped when the script ends, however it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from failover import (
    Processes,
    Sample,
    exit_on_sigterm,
    free_port,
    haproxy_binary,
    haproxy_version,
    proxy_listening,
    run_load,
)
from harness import cpu_model, cpu_seconds, haproxy_stat, lbproxy_command

HERE = Path(__file__).resolve().parent
BACKEND = HERE / "slots_backend.py"
SERVERS = ("s1", "s2", "s3", "s4")
SLOTS = 8  # worker slots per back-end
SERVICE_MS = 20.0  # milliseconds a request holds its slot
QUEUE_SIZE = 1000  # lbproxy's queue max_size, and the cap of the capped HAProxy target
QUEUE_SECONDS = 5  # lbproxy's queue timeout and HAProxy's `timeout queue`
QUEUE_TIMEOUT = f"{QUEUE_SECONDS}s"
CLIENT_CONNECTIONS = 8000  # the most connections the load generator keeps open
UNSENT = "client connection limit"  # failover.Client's error for a request it could not send: none idle, all open
HAPROXY_MAXCONN = 9000  # HAProxy's global maxconn: above the client's connections, within 20,000 fds
START_TIMEOUT = 10.0
SETTLE = 0.3  # seconds between the proxy listening and the load (no probes to wait for)

LBPROXY = """\
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm}}
admin: {{bind: "127.0.0.1:{admin}"}}
pools:
  farm:
    policy: round_robin
{queue}    servers:
{servers}
"""

HAPROXY = """\
global
  nbthread 1
  maxconn {maxconn}
  stats socket {socket} level user
defaults
  mode http
  maxconn {maxconn}
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout queue {queue_timeout}
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
{cap}  default_backend be
backend be
  balance roundrobin
{servers}
"""


@dataclass(frozen=True)
class Target:
    name: str
    key: str  # for --targets
    kind: str  # "lbproxy" or "haproxy"
    limit: bool = False  # max_connections (maxconn) of SLOTS per server
    cap: bool = False  # HAProxy: 503 at once when QUEUE_SIZE requests wait

    def command(self, work: Path, port: int, admin: int, backends: list[int]) -> list[str]:
        per_server = f", max_connections: {SLOTS}" if self.limit else ""
        if self.kind == "lbproxy":
            servers = "\n".join(
                f'      - {{name: {name}, address: "127.0.0.1:{backend}"{per_server}}}'
                for name, backend in zip(SERVERS, backends, strict=True)
            )
            queue = f"    queue: {{max_size: {QUEUE_SIZE}, timeout: {QUEUE_TIMEOUT}}}\n" if self.limit else ""
            path = work / f"{self.key}.yaml"
            path.write_text(LBPROXY.format(port=port, admin=admin, queue=queue, servers=servers))
            return lbproxy_command(path)
        maxconn = f" maxconn {SLOTS}" if self.limit else ""
        servers = "".join(
            f"  server {name} 127.0.0.1:{backend}{maxconn}\n" for name, backend in zip(SERVERS, backends, strict=True)
        )
        cap = (
            f'  http-request return status 503 content-type text/plain string "queue full" '
            f"if {{ queue(be) ge {QUEUE_SIZE} }}\n"
            if self.cap
            else ""
        )
        path = work / f"{self.key}.cfg"
        path.write_text(
            HAPROXY.format(
                maxconn=HAPROXY_MAXCONN,
                socket=self.stats_socket(work),
                queue_timeout=QUEUE_TIMEOUT,
                port=port,
                cap=cap,
                servers=servers,
            )
        )
        return [haproxy_binary(), "-f", str(path)]

    def stats_socket(self, work: Path) -> Path:
        return work / f"{self.key}.sock"


TARGETS = (
    Target("lbproxy, no limit", "lbproxy", "lbproxy"),
    Target(f"lbproxy, max_connections {SLOTS} + queue", "lbproxy-queue", "lbproxy", limit=True),
    Target("HAProxy, no maxconn", "haproxy", "haproxy"),
    Target(f"HAProxy, maxconn {SLOTS}", "haproxy-maxconn", "haproxy", limit=True),
    Target(f"HAProxy, maxconn {SLOTS}, queue capped at {QUEUE_SIZE}", "haproxy-maxconn-cap", "haproxy", True, True),
)


# -- one run -----------------------------------------------------------------------------------------


@dataclass
class Run:
    target: Target
    samples: list[Sample]
    start: float
    duration: float
    late: float
    backends: dict[str, dict[str, int]]  # each back-end's own counts (slots_backend.py's /_stats)
    proxy: dict[str, float]  # the proxy's own queue figures
    cpu: float  # the proxy's CPU seconds during the load
    notes: list[str] = field(default_factory=list)

    def ok(self) -> list[Sample]:
        return [s for s in self.samples if 200 <= s.status < 300]

    def row(self, capacity: float) -> dict[str, object]:
        """The figures of the table, by column."""
        ok = self.ok()
        latencies = sorted(s.latency for s in ok)
        end = self.start + self.duration
        in_window = sum(1 for s in ok if s.sent + s.latency <= end)
        errors = [s for s in self.samples if s.error and s.error != UNSENT]
        unsent = sum(1 for s in self.samples if s.error == UNSENT)
        return {
            "target": self.target.name,
            "key": self.target.key,
            "sent": len(self.samples) - unsent,
            "unsent": unsent,
            "ok": len(ok),
            "5xx_backend": sum(1 for s in self.samples if s.status >= 500 and s.server),
            "5xx_proxy": sum(1 for s in self.samples if s.status >= 500 and not s.server),
            "other_status": sum(1 for s in self.samples if s.status and not 200 <= s.status < 300 and s.status < 500),
            "backend_503": sum(counts.get("rejected", 0) for counts in self.backends.values()),
            "backend_ok": sum(counts.get("ok", 0) for counts in self.backends.values()),
            "backend_abandoned": sum(counts.get("abandoned", 0) for counts in self.backends.values()),
            "timeouts": sum(1 for s in errors if s.error == "timeout"),
            "errors": sum(1 for s in errors if s.error != "timeout"),
            "p50_ms": _quantile(latencies, 50) * 1000,
            "p99_ms": _quantile(latencies, 99) * 1000,
            "max_ms": latencies[-1] * 1000 if latencies else 0.0,
            "ok_per_s": in_window / self.duration,
            "x_capacity": in_window / self.duration / capacity,
            "proxy": self.proxy,
            "proxy_cpu_s": round(self.cpu, 2),
            "late_ms": round(self.late * 1000, 1),
            "notes": self.notes,
        }


def _quantile(values: list[float], percent: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def backend_counts(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as response:
        return dict(json.loads(response.read()))


def lbproxy_queue(admin: int) -> dict[str, float]:
    """The pool's queue figures from lbproxy's /metrics: rejections by reason, served waits."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    figures: dict[str, float] = {}
    for reason, value in re.findall(
        r'^lbproxy_pool_queue_rejections_total\{pool="farm",reason="(\w+)"\} (\S+)$', text, re.M
    ):
        figures[f"rejected_{reason}"] = float(value)
    count = re.search(r'^lbproxy_pool_queue_wait_seconds_count\{pool="farm"\} (\S+)$', text, re.M)
    total = re.search(r'^lbproxy_pool_queue_wait_seconds_sum\{pool="farm"\} (\S+)$', text, re.M)
    if count and total:
        figures["waited"] = float(count.group(1))
        figures["wait_mean_ms"] = float(total.group(1)) / float(count.group(1)) * 1000 if float(count.group(1)) else 0
    return figures


def haproxy_queue(stats_socket: Path) -> dict[str, float]:
    """The backend's queue figures from HAProxy's `show stat`: its longest queue, its 5xx."""
    figures: dict[str, float] = {}
    for values in haproxy_stat(stats_socket):
        if values.get("pxname") == "be" and values.get("svname") == "BACKEND":
            figures["qmax"] = float(values.get("qmax") or 0)
            figures["qtime_ms"] = float(values.get("qtime") or 0)  # average over the last 1024 requests
        if values.get("pxname") == "fe" and values.get("svname") == "FRONTEND":
            figures["frontend_5xx"] = float(values.get("hrsp_5xx") or 0)
    return figures


def run_once(target: Target, args: argparse.Namespace, work: Path) -> Run:
    processes = Processes()
    ports = [free_port() for _ in SERVERS]
    proxy_port, admin_port = free_port(), free_port()
    try:
        backends = []
        for name, port in zip(SERVERS, ports, strict=True):
            command = [sys.executable, str(BACKEND), name, str(port), "--slots", str(SLOTS)]
            backends.append(processes.start([*command, "--service-ms", f"{args.service_ms:g}"]))
        for _, lines in backends:
            lines.wait_for("ready ", START_TIMEOUT)
        proxy, proxy_lines = processes.start(target.command(work, proxy_port, admin_port, ports))
        proxy_listening(proxy_port, proxy, proxy_lines)
        time.sleep(SETTLE)
        before = cpu_seconds(proxy.pid)
        start, samples, late = run_load(
            proxy_port, args.rate, args.duration, args.client_timeout, [], max_connections=CLIENT_CONNECTIONS
        )
        cpu = cpu_seconds(proxy.pid) - before
        notes = []
        counts = {}
        for name, port in zip(SERVERS, ports, strict=True):
            try:
                counts[name] = backend_counts(port)
            except OSError as error:
                notes.append(f"back-end {name}'s counts unread: {error}")
        proxy_figures: dict[str, float] = {}
        try:
            if target.kind == "lbproxy":
                proxy_figures = lbproxy_queue(admin_port) if target.limit else {}
            else:
                proxy_figures = haproxy_queue(target.stats_socket(work))
        except OSError as error:
            notes.append(f"the proxy's figures unread: {error}")
        if proxy.poll() is not None:
            notes.append(f"the proxy exited with {proxy.returncode} during the run")
        said = [line for _, line in proxy_lines.snapshot() if "ALERT" in line or "rror" in line]
        if said:
            notes.append("the proxy said: " + " / ".join(said[:3]))
        return Run(target, samples, start, args.duration, late, counts, proxy_figures, cpu, notes)
    finally:
        processes.stop_all()


# -- the report --------------------------------------------------------------------------------------


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| target | sent | 2xx | 2xx/s | x capacity | 5xx at clients: from back-ends / from proxy "
        "| 503s the back-ends sent | client timeouts / errors / unsent | 2xx p50 ms | 2xx p99 ms | 2xx max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['target']} | {row['sent']} | {row['ok']} | {row['ok_per_s']:,.0f} | {row['x_capacity']:.2f} "
        f"| {row['5xx_backend']} / {row['5xx_proxy']} | {row['backend_503']} "
        f"| {row['timeouts']} / {row['errors']} / {row['unsent']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
        f"| {row['max_ms']:.1f} |"
        for row in rows
    ]
    return "\n".join(lines)


def details(rows: list[dict[str, object]], runs: list[Run]) -> str:
    lines = []
    for row, run in zip(rows, runs, strict=True):
        proxy = run.proxy
        parts = []
        if "rejected_full" in proxy or "rejected_timeout" in proxy:
            parts.append(
                f"queue refused {proxy.get('rejected_full', 0):.0f} (full) + {proxy.get('rejected_timeout', 0):.0f} "
                f"(timeout), {proxy.get('waited', 0):.0f} served after waiting {proxy.get('wait_mean_ms', 0):.0f} ms "
                "on average"
            )
        if "qmax" in proxy:
            parts.append(
                f"longest queue {proxy['qmax']:.0f}, 5xx sent by its frontend {proxy.get('frontend_5xx', 0):.0f} "
                "(passed on or its own)"
            )
        peak = max((counts.get("peak_busy", 0) for counts in run.backends.values()), default=0)
        parts.append(
            f"back-ends served {row['backend_ok']} ({row['backend_abandoned']} to a client gone), "
            f"most slots busy {peak}"
        )
        if row["other_status"]:
            parts.append(f"{row['other_status']} other non-2xx")
        kinds: dict[str, int] = {}
        for sample in run.samples:
            if sample.error:
                kinds[sample.error] = kinds.get(sample.error, 0) + 1
        if kinds:
            parts.append("client errors: " + ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())))
        parts.append(f"proxy CPU {run.cpu:.2f} s ({run.cpu / run.duration:.0%} of a core over the load)")
        parts.append(f"generator at most {run.late * 1000:.1f} ms late")
        parts += run.notes
        lines.append(f"- {row['target']}: " + "; ".join(parts))
    return "\n".join(lines)


def goal(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    """Issue #17's goal for lbproxy with max_connections and the queue; "" when that target did not run.

    The p99 of the 2xx is bounded by the queue: a request waits at most max_size / the farm's rate (the
    queue full), and never longer than the queue's timeout, then takes its slot for the service time.
    """
    row = next((row for row in rows if row["key"] == "lbproxy-queue"), None)
    if row is None:
        return ""
    rate = float(row["ok_per_s"])  # type: ignore[arg-type]
    expected = (QUEUE_SIZE / rate if rate else 0.0) * 1000 + args.service_ms
    hard = QUEUE_SECONDS * 1000 + args.service_ms
    p99 = float(row["p99_ms"])  # type: ignore[arg-type]
    met = row["backend_503"] == 0 and row["ok"] and p99 <= hard
    return (
        f"Goal (issue #17), {row['target']}: no 503 from the back-ends ({row['backend_503']}) and a p99 of the 2xx "
        f"bounded by the queue ({p99:.0f} ms; about {expected:.0f} ms expected, {QUEUE_SIZE} waiting at "
        f"{rate:,.0f}/s plus the {args.service_ms:g} ms of service; at most {hard / 1000:g} s in any case, the "
        f"queue's timeout plus the service): {'met' if met else '**not met**'}."
    )


def report(rows: list[dict[str, object]], runs: list[Run], args: argparse.Namespace, command: str) -> str:
    capacity = capacity_of(args)
    return f"""# Overload, {time.strftime("%Y-%m-%d %H:%M")}

`{command}` on {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, {haproxy_version()}.

{setting(args)}

{table(rows)}

{goal(rows, args)}

- **2xx/s**: the 2xx answered within the {args.duration:g} s of load, per second; **x capacity**: over the
  farm's {capacity:,.0f} requests/s. **5xx at clients**: from the back-ends (signed `X-Served-By`) / made by
  the proxy itself (its queue full or timed out). **503s the back-ends sent**: their own count.
  **client timeouts / errors / unsent**: no answer within {args.client_timeout:g} s / connection errors / requests
  the generator could not send, its {CLIENT_CONNECTIONS:,} connections all open and waiting (not in **sent**).

{details(rows, runs)}
"""


def capacity_of(args: argparse.Namespace) -> float:
    return len(SERVERS) * SLOTS / (args.service_ms / 1000)


def setting(args: argparse.Namespace) -> str:
    return (
        f"Four back-ends (one process each), each with {SLOTS} worker slots of {args.service_ms:g} ms and a 503 "
        f"at once when all are busy: {capacity_of(args):,.0f} requests/s in all. Load: {args.rate:,.0f} GET/s "
        f"({args.rate / capacity_of(args):.1f}x that) on a fixed schedule for {args.duration:g} s, keep-alive, "
        f"client timeout {args.client_timeout:g} s. Queues: lbproxy `max_connections: {SLOTS}` per server, "
        f"`queue: {{max_size: {QUEUE_SIZE}, timeout: {QUEUE_TIMEOUT}}}`; HAProxy `maxconn {SLOTS}` per server, "
        f"`timeout queue {QUEUE_TIMEOUT}`, unbounded, or capped at {QUEUE_SIZE} waiting by `http-request return "
        f"status 503 if {{ queue(be) ge {QUEUE_SIZE} }}`. Round robin everywhere, no health checks."
    )


def main() -> int:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run: 3 s of load per target")
    parser.add_argument("--rate", type=float, help="requests per second (default: twice the farm's capacity)")
    parser.add_argument("--duration", type=float, help="seconds of load per target (default 8; 3 with --quick)")
    parser.add_argument("--service-ms", type=float, default=SERVICE_MS, help="a request's time in its slot")
    parser.add_argument("--client-timeout", type=float, default=6.0, help="seconds (default 6)")
    parser.add_argument("--targets", default=",".join(t.key for t in TARGETS), help="comma-separated")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args()
    if args.rate is None:
        args.rate = 2 * capacity_of(args)
    if args.duration is None:
        args.duration = 3.0 if args.quick else 8.0
    if args.rate <= 0 or args.duration <= 0 or args.rate * args.duration > 100_000:
        parser.error("need a positive --rate and --duration, at most 100,000 requests per target")
    targets = [t for key in args.targets.split(",") for t in TARGETS if t.key == key.strip()]
    if not targets:
        parser.error(f"targets: {', '.join(t.key for t in TARGETS)}")
    if any(t.kind == "haproxy" for t in targets):
        haproxy_binary()

    command = " ".join(["python benchmarks/overload.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="lbproxy-overload-"))
    runs: list[Run] = []
    try:
        for target in targets:
            print(f"{target.name}...", file=sys.stderr, flush=True)
            runs.append(run_once(target, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [run.row(capacity_of(args)) for run in runs]
    text = report(rows, runs, args, command)
    print(text)
    if args.json is not None:
        figures = {
            "command": command,
            "quick": args.quick,
            "setting": setting(args),
            "capacity": capacity_of(args),
            "rate": args.rate,
            "duration": args.duration,
            "table": table(rows),
            "goal": goal(rows, args),
            "details": details(rows, runs),
            "rows": rows,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.no_write:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        path = results / f"overload-{time.strftime('%Y-%m-%d')}{'-quick' if args.quick else ''}.md"
        path.write_text(text)
        print(f"written to {path.relative_to(HERE.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
