"""Small keep-alive requests through lbproxy and HAProxy, side by side, as ratios.

One nginx worker answers a 12-byte body; wrk drives each target in turn, interleaved over several
rounds, and the median of each is reported with the CPU time the proxy process spent per request
(read from /proc, so it does not depend on how busy the load generator's core was). Where the
machine has two cores, wrk and nginx are pinned to core 0 and the proxy under test to core 1.

    python benchmarks/keepalive.py [--rounds 3] [--seconds 5] [--connections 50]

Needs nginx, haproxy and wrk on the PATH (Debian: apt-get install nginx-light haproxy wrk); the
full suite with its own set-up is `make bench` (#6). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # CPU time of the target's process per request; 0 for direct


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(core: int | None) -> list[str]:
    return ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []


def run_wrk(port: int, seconds: int, connections: int, core: int | None, pid: int | None) -> Result:
    before = cpu_seconds(pid) if pid else 0.0
    command = [*pinned(core), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    out = subprocess.run([*command, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    after = cpu_seconds(pid) if pid else 0.0
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors is not None:
        print(f"warning: port {port}: {errors.group(0)}", file=sys.stderr)
    return Result(
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        p50_ms=latency(out, "50%"),
        p99_ms=latency(out, "99%"),
        cpu_us=(after - before) * 1e6 / requests if pid else 0.0,
    )


def latency(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed (Debian: apt-get install nginx-light haproxy wrk)", file=sys.stderr)
            return 2
    two_cores = (os.cpu_count() or 1) >= 2
    load_core, proxy_core = (0, 1) if two_cores else (None, None)
    work = Path(tempfile.mkdtemp(prefix="lbproxy-bench-"))
    backend, haproxy_port, lbproxy_port = free_port(), free_port(), free_port()
    (work / "nginx.conf").write_text(NGINX.format(dir=work, port=backend))
    (work / "haproxy.cfg").write_text(HAPROXY.format(port=haproxy_port, backend=backend))
    (work / "lbproxy.yaml").write_text(LBPROXY.format(port=lbproxy_port, backend=backend))
    lbproxy = [sys.executable, "-m", "lbproxy", "run", "-c", str(work / "lbproxy.yaml"), "--log-level", "warning"]
    processes = [
        subprocess.Popen([*pinned(load_core), "nginx", "-c", str(work / "nginx.conf")]),
        subprocess.Popen([*pinned(proxy_core), "haproxy", "-f", str(work / "haproxy.cfg")]),
        subprocess.Popen([*pinned(proxy_core), *lbproxy], stdout=subprocess.DEVNULL),
    ]
    try:
        for port in (backend, haproxy_port, lbproxy_port):
            wait_listening(port)
        targets = {
            "direct (nginx)": (backend, None),
            "HAProxy": (haproxy_port, processes[1].pid),
            "lbproxy": (lbproxy_port, processes[2].pid),
        }
        results: dict[str, list[Result]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, (port, pid) in targets.items():
                results[name].append(run_wrk(port, args.seconds, args.connections, load_core, pid))
        report(results, args)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[Result]], args: argparse.Namespace) -> None:
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
