"""Macro benchmarks: lbproxy beside HAProxy, nginx and a plain aiohttp proxy, on the same machine, as ratios.

    python benchmarks/macro.py [--quick] [--rounds N] [--seconds S] [--only S,..] [--targets T,..] [--json FILE]

Prints the markdown report of what it measured (report.py's, as `make bench` writes it, without the
micro-benchmarks, failover and overload); `--json FILE` writes the results as run.py does (FILE)
and the report (FILE.md): `python benchmarks/report.py FILE` re-renders them, the chart included.

Back-ends: one nginx (`worker_processes 1`) with four `server` blocks, each answering `/` with a
12-byte body and `/64k`, `/1m` with files of that size. Targets: one back-end directly (the
ceiling), lbproxy L7 and L4 (`mode: tcp`), HAProxy `mode http` and `mode tcp` (`nbthread 1`,
`http-reuse always`, roundrobin), nginx `proxy_pass` with upstream keep-alive (`worker_processes 1`),
and a plain aiohttp proxy on uvloop (benchmarks/aiohttp_proxy.py, the floor). Every proxy balances
over the four back-ends and adds X-Forwarded-For. wrk (`-t1 --latency`) and the back-ends run on one
core, the proxies on another (`taskset`), where the machine has two.

Every scenario runs every target once per round, targets interleaved (their order rotates from one
round to the next), so that a noisy minute hits them all; the report takes medians. The CPU time of
the proxy's process (from /proc) per request is the steadiest figure on a shared machine.

Scenarios: keep-alive small responses with 50 and 500 connections; a new connection per request
(`Connection: close`); 64 KiB and 1 MiB responses; latency with everything on one core and one
connection (the latency a proxy adds); and L4 bulk, 1 GiB through one connection (benchmarks/bulk.py).

Two more lbproxy L7 targets run in the keep-alive 50-connection scenario only (issue #15), each its
own lbproxy process with the plain target's http listener and four back-ends: lbproxy-http-routes,
a listener with 10 host routes (8 exact hosts and a wildcard that wrk never sends, then the route for
wrk's `Host: 127.0.0.1`, last, to a second pool of the same back-ends), and lbproxy-http-cookie, a
pool with cookie persistence and wrk sending the cookie of one server (every request a persistence
hit, the cookie taken out). The report sets their CPU per request beside the plain L7 target's.

Compiled and pure Python (issue #19): every lbproxy target runs this checkout's compiled build (mypyc,
`make build`) but two, lbproxy-http-pure and lbproxy-tcp-pure: the plain target's listeners in a
process of their own started with LBPROXY_PURE=1, in every scenario but the TLS ones. All run the
package of this checkout (harness.lbproxy_command: PYTHONPATH and -P), wherever the script is started
from. Once they listen, the build each lbproxy process runs is read from the files it mapped
(/proc/PID/maps: lbproxy's compiled extensions, or none) and checked: a compiled target that runs
pure Python (a .py changed since the build, or no build) or a pure one that runs compiled stops the
run before anything is measured, with lbproxy's own word on why. The builds go into the results.

TLS (issue #16): a self-signed RSA 2048 certificate for localhost and 127.0.0.1 is made at start;
lbproxy-https (lbproxy L7, `tls: {cert, key}`) and haproxy-https (`mode http`, `bind ... ssl crt
PEM alpn http/1.1`, `nbthread 1`, `http-reuse always`) each run as a process of their own over the
same four back-ends, and only in the TLS scenarios, which nothing else runs in: keep-alive over TLS
with 50 connections (tls-keepalive) and a new TLS connection per request (tls-resumed). wrk resumes
sessions: on `Connection: close` it calls SSL_shutdown and SSL_clear on the connection's SSL, which
keeps its SSL_SESSION, and offers it on the next connect; both servers issue TLS 1.3 session tickets,
so every handshake after a connection's first is resumed. For full handshakes (tls-full), two more
targets, lbproxy-https-notickets and haproxy-https-notickets, run the same proxies with OPENSSL_CONF
naming a file that sets `NumTickets = 0` (OpenSSL's system default for every SSL_CTX): no ticket is
issued, so nothing can be resumed. Each TLS run records how many handshakes were full and how many
resumed, by each proxy's own count (HAProxy: `show stat` on its stats socket, ssl_sess and
ssl_reused_sess; lbproxy: lbproxy_listener_tls_handshakes_total and lbproxy_listener_tls_resumed_total
on its admin port, where the checkout counts them): over 99% resumed in tls-resumed (all but each
connection's first), 0% in tls-full.

`--base DIR` measures another checkout's lbproxy as well (`git worktree add DIR REV`): targets
lbproxy-http@base and lbproxy-tcp@base (and, for TLS, lbproxy-https@base and
lbproxy-https-notickets@base, with the `tls: {cert, key}` form every checkout with TLS reads),
interleaved in every round with the others, run by the same Python and venv with DIR first on the
import path (the routes, cookie and pure targets have no twin: they run this checkout only); a base
runs its compiled build if DIR has one that matches its source, else pure Python (recorded, not
checked). The report gets a table "this checkout vs base": each scenario's ratios to HAProxy, before
and after.
`--targets` runs some targets alone, e.g. `--targets haproxy-http,lbproxy-http,lbproxy-http@base`
or `--targets haproxy-https,lbproxy-https,haproxy-https-notickets,lbproxy-https-notickets`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import bulk
import report
from harness import (
    DEBIAN_PACKAGES,
    REPO,
    Processes,
    WrkResult,
    checkout_python,
    cores,
    cpu_model,
    cpu_seconds,
    find_tool,
    free_port,
    haproxy_ssl_sessions,
    lbproxy_build,
    lbproxy_command,
    lbproxy_servers,
    missing_tools,
    run_wrk,
    set_affinity,
    wait_listening,
)

HERE = Path(__file__).resolve().parent
SMALL_BODY = "hello world\n"  # 12 bytes

BACKEND_NGINX = """
worker_processes 1;
daemon off;
pid {dir}/backend.pid;
error_log {dir}/backend.err;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000000;
  open_file_cache max=16;
  client_body_temp_path {dir}/backend-body;
  proxy_temp_path {dir}/backend-proxy;
  default_type application/octet-stream;
{servers}
}}
"""
BACKEND_SERVER = """  server {{
    listen 127.0.0.1:{port};
    root {dir}/files;
    location = / {{ return 200 "{body}"; }}
  }}"""


def backend_nginx(work: Path, backends: Sequence[int]) -> str:
    """The nginx config of the back-ends: one server a port, the small body at `/`, files under work/files."""
    body = SMALL_BODY.replace("\n", "\\n")
    servers = "\n".join(BACKEND_SERVER.format(port=port, dir=work, body=body) for port in backends)
    return BACKEND_NGINX.format(dir=work, servers=servers)


PROXY_NGINX = """
worker_processes 1;
daemon off;
pid {dir}/proxy.pid;
error_log {dir}/proxy.err;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/proxy-body;
  proxy_temp_path {dir}/proxy-temp;
  upstream farm {{
{servers}
    keepalive 1024;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://farm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_max_temp_file_size 0;  # stream large responses instead of spooling them to disk
    }}
  }}
}}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 8000
defaults
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel 60s
frontend http_in
  mode http
  bind 127.0.0.1:{http_port}
  option forwardfor
  default_backend http_farm
backend http_farm
  mode http
  balance roundrobin
  http-reuse always
{servers}
frontend tcp_in
  mode tcp
  bind 127.0.0.1:{tcp_port}
  default_backend tcp_farm
backend tcp_farm
  mode tcp
  balance roundrobin
{servers}
frontend bulk_in
  mode tcp
  bind 127.0.0.1:{bulk_port}
  default_backend bulk_source
backend bulk_source
  mode tcp
  server source 127.0.0.1:{source}
"""

LBPROXY = """
listeners:
  - {{name: web, bind: "127.0.0.1:{http_port}", pool: farm}}
  - {{name: l4, mode: tcp, bind: "127.0.0.1:{tcp_port}", pool: farm}}
  - {{name: bulk, mode: tcp, bind: "127.0.0.1:{bulk_port}", pool: bulk}}
pools:
  farm:
    policy: round_robin
    servers:
{servers}
  bulk:
    servers:
      - {{name: source, address: "127.0.0.1:{source}"}}
"""

# The plain target's http listener with 10 host routes: none but the last matches wrk's requests
# (routes ignore the Host's port), so a request passes the table as far as a host route can take it;
# its pool has the same four back-ends as the default one, so the work behind it is the same.
LBPROXY_ROUTES = """
listeners:
  - name: web
    bind: "127.0.0.1:{port}"
    pool: farm
    routes:
{routes}
pools:
  farm:
    policy: round_robin
    servers:
{servers}
  routed:
    policy: round_robin
    servers:
{servers}
"""
# As micro/bench_http.py's routed listener: hosts that wrk never sends, then one wildcard.
DECOY_HOSTS = (*(f"app{index}.example.com" for index in range(1, 9)), "*.apps.example.com")
WRK_HOST = "127.0.0.1"  # wrk sends `Host: 127.0.0.1:PORT`

# The plain target's http listener, its pool keeping sessions by cookie; wrk sends the cookie.
LBPROXY_COOKIE = """
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm}}
pools:
  farm:
    policy: round_robin
    persistence: {{type: cookie, cookie: {cookie}}}
    servers:
{servers}
"""
COOKIE = "LBSRV"

# TLS (issue #16): one https frontend over the four back-ends, a process of its own (as lbproxy's).
HAPROXY_HTTPS = """
global
  nbthread 1
  maxconn 8000
  stats socket {stats}
defaults
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend https_in
  mode http
  bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1
  option forwardfor
  default_backend http_farm
backend http_farm
  mode http
  balance roundrobin
  http-reuse always
{servers}
"""
# The old one-certificate form: every checkout with TLS listeners reads it (@base too).
LBPROXY_HTTPS = """
admin: {{bind: "127.0.0.1:{admin}"}}
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm, tls: {{cert: "{cert}", key: "{key}"}}}}
pools:
  farm:
    policy: round_robin
    servers:
{servers}
"""
# OPENSSL_CONF of the no-tickets targets: OpenSSL applies `system_default` to every SSL_CTX the process
# makes, HAProxy's and Python's alike; no TLS 1.3 ticket, so no handshake can be resumed. Debian's own
# openssl.cnf sets no `system_default`: this file changes nothing else.
NO_TICKETS_CONF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_configuration
[ssl_configuration]
system_default = tls_defaults
[tls_defaults]
NumTickets = 0
"""


@dataclass(frozen=True)
class Target:
    key: str
    name: str
    port: int
    process: str | None  # the name of the proxy's process in Processes; None: direct
    mode: str  # "direct", "http", "tcp", "https" or "https-notickets": HAProxy of the same mode is the reference
    bulk_port: int | None = None  # where the L4 bulk source is reached through this target
    headers: tuple[str, ...] = ()  # sent with every request, besides the scenario's
    only: tuple[str, ...] = ()  # the scenarios this target runs in; empty: all of its kind (TLS or not)

    @property
    def tls(self) -> bool:
        return self.mode.startswith("https")

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def runs_in(self, scenario: Scenario) -> bool:
        """A TLS target runs in the TLS scenarios only, and a plain one in the others only."""
        return self.tls == scenario.tls and (not self.only or scenario.key in self.only)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str
    connections: int
    headers: tuple[str, ...] = ()
    one_core: bool = False  # load generator, back-end and proxy on one core
    seconds_factor: float = 1.0
    tls: bool = False  # https: for the TLS targets only


SCENARIOS = (
    Scenario("keepalive-c50", "Keep-alive, 12-byte responses, 50 connections", "/", 50),
    Scenario("keepalive-c500", "Keep-alive, 12-byte responses, 500 connections", "/", 500),
    Scenario(
        "close", "A new connection per request (Connection: close), 50 connections", "/", 50, ("Connection: close",)
    ),
    Scenario("64k", "64 KiB responses, keep-alive, 16 connections", "/64k", 16),
    Scenario("1m", "1 MiB responses, keep-alive, 16 connections", "/1m", 16),
    Scenario(
        "one-core",
        "Latency on one core (wrk, back-end and proxy), 1 connection",
        "/",
        1,
        one_core=True,
        seconds_factor=0.75,
    ),
    Scenario("tls-keepalive", "TLS: keep-alive, 12-byte responses, 50 connections", "/", 50, tls=True),
    Scenario(
        "tls-resumed",
        "TLS: a new connection per request (Connection: close), resumed handshakes, 50 connections",
        "/",
        50,
        ("Connection: close",),
        tls=True,
    ),
    Scenario(
        "tls-full",
        "TLS: a new connection per request (Connection: close), full handshakes (no session tickets), 50 connections",
        "/",
        50,
        ("Connection: close",),
        tls=True,
    ),
)
# The targets, in report order; with --base each lbproxy target has a twin running the base checkout.
TARGET_KEYS = (
    "direct",
    "lbproxy-http",
    "lbproxy-http-pure",
    "haproxy-http",
    "nginx",
    "aiohttp",
    "lbproxy-tcp",
    "lbproxy-tcp-pure",
    "haproxy-tcp",
)
# The pure-Python build of this checkout (issue #19): the plain lbproxy's listeners, one process of its
# own started with LBPROXY_PURE=1, in every scenario but TLS. The others run the compiled build.
PURE = "lbproxy-pure"  # its process, which serves lbproxy-http-pure and lbproxy-tcp-pure (report.PURE)
# The TLS targets (issue #16), after the others: each a process of its own, started only when measured.
TLS_KEYS = ("lbproxy-https", "haproxy-https", "lbproxy-https-notickets", "haproxy-https-notickets")
LBPROXY_KEYS = ("lbproxy-http", "lbproxy-tcp", "lbproxy-https", "lbproxy-https-notickets")
TLS_NAMES = {
    "lbproxy-https": "lbproxy L7 TLS",
    "haproxy-https": "HAProxy mode http TLS",
    "lbproxy-https-notickets": "lbproxy L7 TLS, no tickets",
    "haproxy-https-notickets": "HAProxy mode http TLS, no tickets",
}
# The mode of each lbproxy target (its twin's too): HAProxy of that mode is its reference.
LBPROXY_MODES = {
    "lbproxy-http": "http",
    "lbproxy-http-pure": "http",
    "lbproxy-tcp": "tcp",
    "lbproxy-tcp-pure": "tcp",
    "lbproxy-https": "https",
    "lbproxy-https-notickets": "https-notickets",
}
# lbproxy L7 with routes, with cookie persistence: in VARIANT_SCENARIO only, after lbproxy-http (and
# its twin), this checkout only.
VARIANTS = tuple(report.VARIANTS)
VARIANT_SCENARIO = "keepalive-c50"
# The scenarios of the targets that run in some only (a twin's are its plain target's).
ONLY = {key: (VARIANT_SCENARIO,) for key in VARIANTS} | {
    "lbproxy-https": ("tls-keepalive", "tls-resumed"),
    "haproxy-https": ("tls-keepalive", "tls-resumed"),
    "lbproxy-https-notickets": ("tls-full",),
    "haproxy-https-notickets": ("tls-full",),
}
BASE = report.BASE  # "@base": the suffix of the base checkout's targets
BULK = "bulk"
BULK_TITLE = "L4 bulk: {size} through one connection"
GIB = 1024**3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s: a smoke run")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 4; 2 with --quick)")
    parser.add_argument("--json", type=Path, help="write the results here (as run.py does), the report to FILE.md")
    parser.add_argument("--only", help="comma-separated scenario keys (bulk included), e.g. keepalive-c50,1m")
    parser.add_argument(
        "--targets",
        help="comma-separated target keys, e.g. haproxy-http,lbproxy-http "
        f"(all: {','.join((*TARGET_KEYS, *VARIANTS, *TLS_KEYS))})",
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="another checkout (git worktree add DIR REV): its lbproxy measured too, as lbproxy-http@base, "
        "lbproxy-tcp@base, lbproxy-https@base and lbproxy-https-notickets@base, and the report compares them",
    )
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        print(f"not installed: {', '.join(missing)} (Debian: {DEBIAN_PACKAGES})", file=sys.stderr)
        return 2
    keys = args.targets.split(",") if args.targets else None
    if keys is not None:
        known = target_keys(args.base is not None)
        unknown = [key for key in keys if key not in known]
        if unknown:
            parser.error(f"unknown targets {', '.join(unknown)}; known: {', '.join(known)}")
        for key in keys:
            reference = report.REFERENCE[LBPROXY_MODES.get(key.removesuffix(BASE), "http")]
            if key.startswith("lbproxy") and reference not in keys:
                print(f"warning: {key} without {reference}: no ratio to HAProxy", file=sys.stderr)
            if key in VARIANTS and report.VARIANTS[key].plain not in keys:
                print(f"warning: {key} without {report.VARIANTS[key].plain}: no ratio to it", file=sys.stderr)
    only = args.only.split(",") if args.only else None
    if only is not None:
        for key in keys if keys is not None else ():
            scenarios = ONLY.get(key.removesuffix(BASE), ())
            if scenarios and not set(scenarios) & set(only):
                print(f"warning: {key} runs in {', '.join(scenarios)} only", file=sys.stderr)
    if args.base is not None and not (args.base / "lbproxy" / "__init__.py").is_file():
        parser.error(f"{args.base} holds no lbproxy package")
    # The results in run.py's shape, so that report.py renders (and re-renders) them.
    compared: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "benchmarks/macro.py", *sys.argv[1:]]),
        "quick": args.quick,
        "machine": machine(),
    }
    compared["macro"] = run(args.quick, args.rounds, args.seconds, only, keys, args.base)
    text = report.markdown(compared)
    if args.json is not None:
        args.json.write_text(json.dumps(compared, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(text)
    print(text)
    return 0


def run(
    quick: bool,
    rounds: int | None = None,
    seconds: float | None = None,
    only: list[str] | None = None,
    keys: list[str] | None = None,
    base: Path | None = None,
) -> dict[str, object]:
    """Start everything, run every scenario over every target, stop everything; the results as a dict.

    `only` names the scenarios to run (keys of SCENARIOS, and "bulk"); None runs them all. `keys`
    names the targets to measure (see target_keys); None measures them all. `base`: another
    checkout, whose lbproxy is measured too (targets with the @base suffix).
    """
    scenarios = [s for s in SCENARIOS if only is None or s.key in only]
    base = base.resolve() if base is not None else None
    rounds = rounds or (1 if quick else 3)
    seconds = seconds or (2.0 if quick else 4.0)
    bulk_size = GIB // 4 if quick else GIB
    load_core, proxy_core = cores()
    affinity = os.sched_getaffinity(0)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})  # this process receives the bulk transfer: the load side
    work = Path(tempfile.mkdtemp(prefix="lbproxy-macro-"))
    try:
        with Processes() as processes:
            this = checkout(REPO)
            checkouts = None if base is None else {"this": this, "base": checkout(base)}
            # the processes of the routes, cookie and TLS targets start only when they are to be measured
            wanted = [
                key
                for key in optional_keys(base is not None)
                if (keys is None or key in keys) and any(s.key in ONLY[key.removesuffix(BASE)] for s in scenarios)
            ]
            targets = start(processes, work, load_core, proxy_core, base, wanted)
            builds = check_builds(processes, work, targets)
            targets = [target for target in targets if keys is None or target.key in keys]
            warm_up(targets, load_core, 1.0)
            runs: dict[str, dict[str, list[dict[str, object]]]] = {}
            started = time.monotonic()
            for round_index in range(rounds):
                for scenario in scenarios:
                    order = rotated([target for target in targets if target.runs_in(scenario)], round_index)
                    for target in order:
                        processes.check_alive()
                        before = handshakes(work, target)
                        result = measure(processes, target, scenario, seconds, load_core, proxy_core)
                        record = result.as_dict()
                        after = handshakes(work, target)
                        if before is not None and after is not None:
                            record |= resumed_share(before, after)
                        runs.setdefault(scenario.key, {}).setdefault(target.key, []).append(record)
                        log(round_index, rounds, scenario.key, target, result, record.get("resumed_pct"))
                bulk_targets = [t for t in targets if t.bulk_port is not None and (only is None or BULK in only)]
                for target in rotated(bulk_targets, round_index):
                    measured = measure_bulk(processes, target, bulk_size)
                    runs.setdefault(BULK, {}).setdefault(target.key, []).append(measured)
                    print(
                        f"[{round_index + 1}/{rounds}] {BULK} {target.name}: {measured['gib_s']:.2f} GiB/s",
                        file=sys.stderr,
                    )
            results: dict[str, object] = {
                "rounds": rounds,
                "seconds": seconds,
                "bulk_bytes": bulk_size,
                "pinning": {"load_core": load_core, "proxy_core": proxy_core},
                "wall_seconds": round(time.monotonic() - started, 1),
                "targets": [
                    {"key": t.key, "name": t.name, "mode": t.mode}
                    | ({"build": str(builds[t.process]["build"])} if t.process in builds else {})
                    for t in targets
                ],
                "lbproxy": {"checkout": this, "builds": builds},
                "scenarios": [
                    {"key": s.key, "title": s.title, "connections": s.connections, "path": s.path} for s in scenarios
                ]
                + [{"key": BULK, "title": BULK_TITLE.format(size=_size(bulk_size)), "connections": 1, "path": ""}],
                "versions": versions(),
                "runs": runs,
                "medians": medians(runs),
            }
            if checkouts is not None:
                results["checkouts"] = checkouts
            return results
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sched_setaffinity(0, affinity)


def start(
    processes: Processes,
    work: Path,
    load_core: int | None,
    proxy_core: int | None,
    base: Path | None = None,
    wanted: Sequence[str] | None = None,
) -> list[Target]:
    """Write the configs, start the back-ends and every proxy; the targets, in report order (target_keys).

    lbproxy runs this checkout's package (harness.lbproxy_command), compiled, and pure Python in a
    process of its own (PURE); with `base`, one more runs that checkout's package.
    `wanted`: which of the targets that start on demand (optional_keys: the routes, cookie and TLS
    targets, and the TLS twins) to start, each a process of its own; None: all of them.
    """
    nginx, haproxy = find_tool("nginx"), find_tool("haproxy")
    assert nginx is not None
    assert haproxy is not None
    wanted = optional_keys(base is not None) if wanted is None else list(wanted)
    work.chmod(0o755)  # nginx's workers run as another user when started by root: they read the files
    files = work / "files"
    files.mkdir()
    (files / "64k").write_bytes(b"x" * 64 * 1024)
    (files / "1m").write_bytes(b"x" * 1024 * 1024)
    backends = [free_port() for _ in range(4)]
    source = free_port()
    ports = {name: free_port() for name in ("haproxy-http", "haproxy-tcp", "haproxy-bulk", "nginx", "aiohttp")}
    # lbproxy's processes that run the plain listeners: this checkout compiled (""), pure, and the base
    suffixes = ("", "-pure", BASE) if base is not None else ("", "-pure")
    ports |= {
        name + suffix: free_port() for name in ("lbproxy-http", "lbproxy-tcp", "lbproxy-bulk") for suffix in suffixes
    }
    ports |= {key: free_port() for key in wanted}

    (work / "backend.conf").write_text(backend_nginx(work, backends))
    upstreams = "\n".join(f"    server 127.0.0.1:{port};" for port in backends)
    (work / "proxy.conf").write_text(PROXY_NGINX.format(dir=work, servers=upstreams, port=ports["nginx"]))
    haproxy_servers = "\n".join(f"  server s{index} 127.0.0.1:{port}" for index, port in enumerate(backends, 1))
    (work / "haproxy.cfg").write_text(
        HAPROXY.format(
            http_port=ports["haproxy-http"],
            tcp_port=ports["haproxy-tcp"],
            bulk_port=ports["haproxy-bulk"],
            servers=haproxy_servers,
            source=source,
        )
    )
    for suffix in suffixes:
        (work / f"lbproxy{suffix}.yaml").write_text(
            LBPROXY.format(
                http_port=ports["lbproxy-http" + suffix],
                tcp_port=ports["lbproxy-tcp" + suffix],
                bulk_port=ports["lbproxy-bulk" + suffix],
                servers=lbproxy_servers(backends),
                source=source,
            )
        )

    extra: dict[str, tuple[str, ...]] = {}  # the headers of each variant's requests
    if "lbproxy-http-routes" in wanted:
        (work / "lbproxy-http-routes.yaml").write_text(
            LBPROXY_ROUTES.format(
                port=ports["lbproxy-http-routes"], routes=lbproxy_routes(), servers=lbproxy_servers(backends)
            )
        )
        extra["lbproxy-http-routes"] = ()
    if "lbproxy-http-cookie" in wanted:
        (work / "lbproxy-http-cookie.yaml").write_text(
            LBPROXY_COOKIE.format(port=ports["lbproxy-http-cookie"], cookie=COOKIE, servers=lbproxy_servers(backends))
        )
        extra["lbproxy-http-cookie"] = (f"Cookie: {COOKIE}={server_cookie('farm', 's1')}",)  # the first server
    tls = [key for key in optional_keys(base is not None) if key in wanted and key.removesuffix(BASE) in TLS_KEYS]
    if tls:
        cert, key, pem = write_certificate(work)
        (work / "openssl-notickets.cnf").write_text(NO_TICKETS_CONF)
        for name in tls:
            if name.startswith("haproxy"):
                stats = work / f"{name}.sock"  # handshakes counted, full and resumed: see handshakes()
                config = HAPROXY_HTTPS.format(port=ports[name], pem=pem, servers=haproxy_servers, stats=stats)
                (work / f"{name}.cfg").write_text(config)
            else:
                servers = lbproxy_servers(backends)
                admin = free_port()  # its metrics count the handshakes: see handshakes()
                (work / f"{name}.admin").write_text(str(admin))
                (work / f"{name}.yaml").write_text(
                    LBPROXY_HTTPS.format(port=ports[name], cert=cert, key=key, servers=servers, admin=admin)
                )

    def nginx_command(config: str) -> list[str]:
        return [nginx, "-p", str(work), "-e", str(work / f"{config}.startup.err"), "-c", str(work / config)]

    processes.start("backend", nginx_command("backend.conf"), load_core, work / "backend.out")
    processes.start("source", [sys.executable, str(HERE / "bulk.py"), "serve", str(source)], load_core)
    processes.start("haproxy", [haproxy, "-f", str(work / "haproxy.cfg")], proxy_core, work / "haproxy.out")
    processes.start("nginx", nginx_command("proxy.conf"), proxy_core, work / "proxy.out")
    processes.start("lbproxy", lbproxy_command(work / "lbproxy.yaml"), proxy_core, work / "lbproxy.out")
    processes.start(PURE, lbproxy_command(work / f"{PURE}.yaml", pure=True), proxy_core, work / f"{PURE}.out")
    if base is not None:
        command = lbproxy_command(work / f"lbproxy{BASE}.yaml", base)
        processes.start("lbproxy" + BASE, command, proxy_core, work / f"lbproxy{BASE}.out")
    for name in [key for key in VARIANTS if key in wanted] + tls:
        if name.startswith("haproxy"):
            command = [haproxy, "-f", str(work / f"{name}.cfg")]
        else:
            command = lbproxy_command(work / f"{name}.yaml", base if name.endswith(BASE) else REPO)
        if name.removesuffix(BASE).endswith("-notickets"):  # the same proxy, told by OpenSSL to issue no ticket
            command = ["env", f"OPENSSL_CONF={work / 'openssl-notickets.cnf'}", *command]
        processes.start(name, command, proxy_core, work / f"{name}.out")
    aiohttp = [sys.executable, str(HERE / "aiohttp_proxy.py"), str(ports["aiohttp"]), *map(str, backends)]
    processes.start("aiohttp", aiohttp, proxy_core, work / "aiohttp.out")
    for port in [*backends, source, *ports.values()]:
        try:
            wait_listening(port)
        except RuntimeError:
            for output in sorted(work.glob("*.out")) + sorted(work.glob("*.err")):
                print(f"--- {output.name}\n{output.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            raise
    targets = [
        Target("direct", "direct (one nginx back-end)", backends[0], None, "direct", source),
        *(
            Target(key, report.VARIANTS[key].name, ports[key], key, "http", headers=extra[key], only=ONLY[key])
            for key in VARIANTS
            if key in wanted
        ),
        Target("haproxy-http", "HAProxy mode http", ports["haproxy-http"], "haproxy", "http"),
        Target("nginx", "nginx proxy_pass", ports["nginx"], "nginx", "http"),
        Target("aiohttp", "aiohttp proxy (floor)", ports["aiohttp"], "aiohttp", "http"),
        Target("haproxy-tcp", "HAProxy mode tcp", ports["haproxy-tcp"], "haproxy", "tcp", ports["haproxy-bulk"]),
    ]
    lbproxies = [("", "lbproxy", " (mypyc)"), ("-pure", PURE, " (pure Python)")]
    if base is not None:
        lbproxies.append((BASE, "lbproxy" + BASE, " " + BASE))
    for suffix, process, label in lbproxies:
        port = ports["lbproxy-http" + suffix]
        targets.append(Target("lbproxy-http" + suffix, "lbproxy L7" + label, port, process, "http"))
        targets.append(
            Target(
                "lbproxy-tcp" + suffix,
                "lbproxy L4" + label,
                ports["lbproxy-tcp" + suffix],
                process,
                "tcp",
                ports["lbproxy-bulk" + suffix],
            )
        )
    for name in tls:
        plain = name.removesuffix(BASE)
        label = TLS_NAMES[plain] + (" " + BASE if name != plain else "")
        mode = "https-notickets" if plain.endswith("-notickets") else "https"
        targets.append(Target(name, label, ports[name], name, mode, only=ONLY[plain]))
    by_key = {target.key: target for target in targets}
    return [by_key[key] for key in target_keys(base is not None, wanted)]


def target_keys(base: bool, wanted: Sequence[str] | None = None) -> list[str]:
    """The keys of the targets `start` returns, in its order: with `base`, each lbproxy key then its
    twin; after lbproxy-http (and its twin), the variants (see VARIANTS); the TLS targets last. Of the
    targets that start on demand (optional_keys), those in `wanted` only; None: all of them."""
    optional = optional_keys(base)
    wanted = optional if wanted is None else wanted
    keys: list[str] = []
    for key in (*TARGET_KEYS, *TLS_KEYS):
        keys.append(key)
        if base and key in LBPROXY_KEYS:
            keys.append(key + BASE)
        if key == "lbproxy-http":
            keys += VARIANTS
    return [key for key in keys if key not in optional or key in wanted]


def optional_keys(base: bool) -> list[str]:
    """The targets that start only when they are measured, each a process of its own, in report order:
    the routes and cookie variants, and the TLS targets (with `base`, the lbproxy ones' twins)."""
    keys = list(VARIANTS)
    for key in TLS_KEYS:
        keys += [key, key + BASE] if base and key in LBPROXY_KEYS else [key]
    return keys


def write_certificate(work: Path) -> tuple[Path, Path, Path]:
    """A self-signed RSA 2048 certificate for localhost and 127.0.0.1, valid for a year, in `work`:
    (certificate, key, both in one PEM as HAProxy's `ssl crt` wants them)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(private, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    cert, key, pem = work / "tls-cert.pem", work / "tls-key.pem", work / "tls-both.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    pem.write_bytes(cert_pem + key_pem)
    return cert, key, pem


def lbproxy_routes() -> str:
    """The `routes:` entries of LBPROXY_ROUTES: the decoys to `farm`, then wrk's host to `routed`."""
    entries = [
        f'      - {{name: decoy{index}, match: {{host: "{host}"}}, pool: farm}}'
        for index, host in enumerate(DECOY_HOSTS, 1)
    ]
    entries.append(f'      - {{name: wrk, match: {{host: "{WRK_HOST}"}}, pool: routed}}')
    return "\n".join(entries)


def server_cookie(pool: str, server: str) -> str:
    """The persistence cookie's value for `server` of `pool`, as this checkout's lbproxy computes it."""
    from lbproxy.persistence import cookie_value  # this checkout's: the cookie target never runs @base

    return cookie_value(pool, server).decode()


def checkout(root: Path) -> dict[str, str]:
    """Where checkout_python(root) imports lbproxy from, checked to be `root`'s, and its revision."""
    root = root.resolve()
    probe = [*checkout_python(root), "-c", "import lbproxy; print(lbproxy.__file__)"]
    imported = Path(subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()).resolve()
    if imported.parent != root / "lbproxy":
        raise RuntimeError(f"{' '.join(probe)} imports {imported}, not the package of {root}")
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    revision = head.stdout.strip() if head.returncode == 0 else "?"
    changed = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "lbproxy"], check=False)
    if changed.returncode == 1:
        revision += " + uncommitted changes to lbproxy/"
    return {"path": str(root), "revision": revision, "lbproxy": str(imported)}


def _size(count: int) -> str:
    return f"{count // GIB} GiB" if count % GIB == 0 else f"{count // 1024**2} MiB"


def rotated(targets: list[Target], shift: int) -> list[Target]:
    shift %= max(len(targets), 1)
    return targets[shift:] + targets[:shift]


def warm_up(targets: list[Target], core: int | None, seconds: float) -> None:
    """One short unrecorded run per target: connection pools filled, caches warm."""
    for target in targets:
        run_wrk(f"{target.scheme}://127.0.0.1:{target.port}/", seconds, 50, core, None, target.headers)


def measure(
    processes: Processes,
    target: Target,
    scenario: Scenario,
    seconds: float,
    load_core: int | None,
    proxy_core: int | None,
) -> WrkResult:
    pid = processes.pid(target.process) if target.process is not None else None
    moved = scenario.one_core and pid is not None and load_core is not None and proxy_core is not None
    if moved:
        assert pid is not None
        assert load_core is not None
        set_affinity(pid, {load_core})
    try:
        return run_wrk(
            f"{target.scheme}://127.0.0.1:{target.port}{scenario.path}",
            round(seconds * scenario.seconds_factor, 1),
            scenario.connections,
            load_core,
            pid,
            scenario.headers + target.headers,
        )
    finally:
        if moved:
            assert pid is not None
            assert proxy_core is not None
            set_affinity(pid, {proxy_core})


def handshakes(work: Path, target: Target) -> tuple[int, int] | None:
    """(full, resumed) TLS handshakes so far, for a TLS target: HAProxy's stats socket, lbproxy's
    metrics (a checkout from before lbproxy counted them, as a base may be: None); else None."""
    if not target.tls:
        return None
    if target.key.startswith("haproxy"):
        return haproxy_ssl_sessions(work / f"{target.key}.sock")
    return lbproxy_handshakes(int((work / f"{target.key}.admin").read_text()))


def lbproxy_handshakes(admin: int) -> tuple[int, int] | None:
    """(full, resumed) finished handshakes of lbproxy's listener `web`, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    finished = re.search(r'^lbproxy_listener_tls_handshakes_total\{listener="web",result="ok"\} (\S+)$', text, re.M)
    resumed = re.search(r'^lbproxy_listener_tls_resumed_total\{listener="web"\} (\S+)$', text, re.M)
    if finished is None or resumed is None:
        return None
    done, again = round(float(finished.group(1))), round(float(resumed.group(1)))
    return done - again, again


def check_builds(processes: Processes, work: Path, targets: Sequence[Target]) -> dict[str, dict[str, object]]:
    """The build each lbproxy process runs (harness.lbproxy_build: what it loaded), by process name.

    Checked, so that a stale build cannot pass for the compiled one: every process of this checkout
    must run the compiled build but PURE, which must run pure Python; else the run stops here, with
    lbproxy's own word on why from its log (a `.py` changed since the build, no build at all). A base
    checkout's process runs whichever build it has, recorded only. Where a process has an admin port
    (the TLS targets), its `lbproxy_build_info` must say what it loaded.
    """
    builds: dict[str, dict[str, object]] = {}
    for name in processes.started:
        if not name.startswith("lbproxy"):
            continue
        found = lbproxy_build(processes.pid(name))
        expected = None if name.endswith(BASE) else ("pure" if name == PURE else "mypyc")
        admin = work / f"{name}.admin"
        if admin.exists():
            said = lbproxy_build_info(int(admin.read_text()))
            if said is not None and said != found["build"]:
                raise RuntimeError(f"{name} loaded the {found['build']} build, and its lbproxy_build_info says {said}")
            found["build_info"] = said
        if expected is not None and found["build"] != expected:
            served = ", ".join(target.key for target in targets if target.process == name)
            raise RuntimeError(wrong_build(f"{name} (targets {served})", expected, work / f"{name}.out"))
        builds[name] = found | {"expected": expected}
    return builds


def wrong_build(name: str, expected: str, log: Path) -> str:
    """Why the process `name` did not run the `expected` build, in words, for the error that stops the run."""
    if expected == "pure":
        return f"{name} was started with LBPROXY_PURE=1 and still loaded lbproxy's compiled modules"
    warning = "lbproxy runs as pure Python: "  # lbproxy.build's, when a compiled build exists but may not run
    said = [line for line in log.read_text(errors="replace").splitlines() if warning in line]
    why = said[0].split(warning, 1)[1] if said else f"there is no compiled build in {REPO / 'lbproxy'}; `make build`"
    return f"{name} runs pure Python, not the compiled build it is there to measure: {why}"


def lbproxy_build_info(admin: int) -> str | None:
    """The `build` label of lbproxy_build_info on lbproxy's admin port; None from a checkout without it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r'^lbproxy_build_info\{[^}]*build="(\w+)"', text, re.M)
    return found.group(1) if found else None


def resumed_share(before: tuple[int, int], after: tuple[int, int]) -> dict[str, object]:
    """The handshakes of one run, from the counts before and after it, and the share that was resumed."""
    full, resumed = after[0] - before[0], after[1] - before[1]
    return {
        "handshakes_full": full,
        "handshakes_resumed": resumed,
        "resumed_pct": 100 * resumed / (full + resumed) if full + resumed else 0.0,
    }


def measure_bulk(processes: Processes, target: Target, size: int) -> dict[str, object]:
    assert target.bulk_port is not None
    pid = processes.pid(target.process) if target.process is not None else None
    before = cpu_seconds(pid) if pid else 0.0
    seconds = bulk.receive(target.bulk_port, size)
    cpu = cpu_seconds(pid) - before if pid else 0.0
    return {
        "seconds": seconds,
        "gib_s": size / GIB / seconds,
        "cpu_s": cpu,
        "cpu_s_per_gib": cpu / (size / GIB),
    }


def log(
    round_index: int, rounds: int, scenario: str, target: Target, result: WrkResult, resumed: object = None
) -> None:
    errors = f" errors {result.errors}" if result.errors else ""
    handshakes = f", {resumed:.0f}% of handshakes resumed" if isinstance(resumed, float) else ""
    print(
        f"[{round_index + 1}/{rounds}] {scenario} {target.name}: {result.rps:,.0f} req/s, "
        f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, CPU {result.cpu_us:.1f} µs/req{handshakes}{errors}",
        file=sys.stderr,
    )


def medians(runs: dict[str, dict[str, list[dict[str, object]]]]) -> dict[str, dict[str, dict[str, float]]]:
    """The median of every numeric figure, per scenario and target."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scenario, by_target in runs.items():
        for target, results in by_target.items():
            figures = {
                name: statistics.median(float(result[name]) for result in results)  # type: ignore[arg-type]
                for name, value in results[0].items()
                if isinstance(value, int | float)
            }
            figures["errors"] = float(sum(sum(result.get("errors", {}).values()) for result in results))  # type: ignore[union-attr]
            out.setdefault(scenario, {})[target] = figures
    return out


def machine() -> dict[str, object]:
    """The machine, as run.py records it (report.setup_text shows it)."""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": " ".join(f"{value:.1f}" for value in os.getloadavg()),
    }


def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for tool, flag in (("haproxy", "-v"), ("nginx", "-v"), ("wrk", "-v")):
        path = find_tool(tool)
        if path is None:
            continue
        done = subprocess.run([path, flag], capture_output=True, text=True, check=False)
        first = ((done.stdout or done.stderr).strip().splitlines() or [""])[0]
        number = re.search(r"\d+\.\d+(?:\.\d+)?", first)
        found[tool] = f"{'HAProxy' if tool == 'haproxy' else tool} {number.group(0) if number else '?'}"
    return found


if __name__ == "__main__":
    raise SystemExit(main())
