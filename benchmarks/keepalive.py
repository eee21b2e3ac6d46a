"""Small keep-alive requests through lbproxy and HAProxy, side by side, as ratios.

One nginx worker answers a 12-byte body; wrk drives each target in turn, interleaved over several
rounds, and the median of each is reported with the CPU time the proxy process spent per request
(read from /proc, so it does not depend on how busy the load generator's core was). Where the
machine has two cores, wrk and nginx are pinned to core 0 and the proxy under test to core 1.

    python benchmarks/keepalive.py [--rounds 3] [--seconds 5] [--connections 50]

Needs nginx, haproxy and wrk (Debian: apt-get install nginx-light haproxy wrk); the full suite,
which installs them, is `make bench`. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    DEBIAN_PACKAGES,
    Processes,
    WrkResult,
    cores,
    find_tool,
    free_port,
    lbproxy_command,
    missing_tools,
    run_wrk,
    wait_listening,
)

NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "hello world\\n"; }} }}
}}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
  server s1 127.0.0.1:{backend}
"""

LBPROXY = """
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm}}
pools:
  farm:
    servers:
      - {{name: s1, address: "127.0.0.1:{backend}"}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    missing = missing_tools()
    if missing:
        print(f"not installed: {', '.join(missing)} (Debian: {DEBIAN_PACKAGES})", file=sys.stderr)
        return 2
    load_core, proxy_core = cores()
    work = Path(tempfile.mkdtemp(prefix="lbproxy-bench-"))
    backend, haproxy_port, lbproxy_port = free_port(), free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX.format(dir=work, port=backend))
    (work / "haproxy.cfg").write_text(HAPROXY.format(port=haproxy_port, backend=backend))
    (work / "lbproxy.yaml").write_text(LBPROXY.format(port=lbproxy_port, backend=backend))
    nginx, haproxy = find_tool("nginx"), find_tool("haproxy")
    assert nginx is not None
    assert haproxy is not None
    try:
        with Processes() as processes:
            processes.start("nginx", [nginx, "-e", str(work / "nginx.err"), "-c", str(work / "nginx.conf")], load_core)
            processes.start("HAProxy", [haproxy, "-f", str(work / "haproxy.cfg")], proxy_core)
            processes.start("lbproxy", lbproxy_command(work / "lbproxy.yaml"), proxy_core)
            for port in (backend, haproxy_port, lbproxy_port):
                wait_listening(port)
            targets = {
                "direct (nginx)": (backend, None),
                "HAProxy": (haproxy_port, processes.pid("HAProxy")),
                "lbproxy": (lbproxy_port, processes.pid("lbproxy")),
            }
            results: dict[str, list[WrkResult]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (port, pid) in targets.items():
                    result = run_wrk(f"http://127.0.0.1:{port}/", args.seconds, args.connections, load_core, pid)
                    if result.errors:
                        print(f"warning: {name}: {result.errors}", file=sys.stderr)
                    results[name].append(result)
            report(results, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[WrkResult]], args: argparse.Namespace) -> None:
    def median(name: str, field: str) -> float:
        return statistics.median(getattr(result, field) for result in results[name])

    haproxy_rps = median("HAProxy", "rps")
    haproxy_cpu = median("HAProxy", "cpu_us")
    print(
        f"Small keep-alive responses, wrk -t1 -c{args.connections} -d{args.seconds}s, "
        f"median of {args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores\n"
    )
    print("| target | requests/s | x HAProxy | p50 ms | p99 ms | CPU µs/request | x HAProxy CPU |")
    print("|---|---|---|---|---|---|---|")
    for name in results:
        rps, cpu = median(name, "rps"), median(name, "cpu_us")
        print(
            f"| {name} | {rps:,.0f} | {rps / haproxy_rps:.2f} | {median(name, 'p50_ms'):.2f} | "
            f"{median(name, 'p99_ms'):.2f} | {cpu:.1f} | {cpu / haproxy_cpu if cpu else 0:.2f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
