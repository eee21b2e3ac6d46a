"""Requests/s of lbproxy with 1 and with 2 worker processes (`lbproxy run --workers N`), side by side.

One nginx worker answers a 12-byte body; wrk (two threads) drives lbproxy L7 with each worker count
in turn, interleaved over several rounds, and the medians are reported with the CPU time the whole
lbproxy process tree spent per request. Nothing is pinned here: the workers need every core, so the
load generator and the back-end share them too, and on a 2-core machine the second worker competes
with wrk and nginx: read the ratio, not the absolute figures.

    python benchmarks/workers.py [--rounds 3] [--seconds 5] [--connections 100]

Needs nginx and wrk (Debian: apt-get install nginx-light wrk). Prints a markdown table and writes it
to benchmarks/results/workers-<date>.md.
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

LBPROXY = """
listeners:
  - {{name: web, bind: "127.0.0.1:{port}", pool: farm}}
pools:
  farm:
    servers:
      - {{name: s1, address: "127.0.0.1:{backend}"}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its children (the workers)."""
    total = 0.0
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(child) for child in (task / "children").read_text().split()]
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_wrk(port: int, seconds: int, connections: int, pid: int) -> tuple[float, float]:
    before = tree_cpu_seconds(pid)
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = tree_cpu_seconds(pid)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, (after - before) * 1e6 / max(requests, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=100)
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed (Debian: apt-get install nginx-light wrk)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="lbproxy-workers-"))
    backend = free_port()
    ports = {1: free_port(), 2: free_port()}
    (work / "nginx.conf").write_text(NGINX.format(dir=work, port=backend))
    processes = [subprocess.Popen(["nginx", "-c", str(work / "nginx.conf")])]
    trees: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for count, port in ports.items():
            path = work / f"lbproxy-{count}.yaml"
            path.write_text(LBPROXY.format(port=port, backend=backend))
            command = [sys.executable, "-m", "lbproxy", "run", "-c", str(path), "--log-level", "warning"]
            trees[count] = subprocess.Popen([*command, "--workers", str(count)], stdout=subprocess.DEVNULL)
            processes.append(trees[count])
        for port in (backend, *ports.values()):
            wait_listening(port)
        results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for count, port in ports.items():
                results[count].append(run_wrk(port, args.seconds, args.connections, trees[count].pid))
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    one = statistics.median(rps for rps, _ in results[1])
    lines = [
        f"lbproxy L7, small keep-alive responses, wrk -t2 -c{args.connections} -d{args.seconds}s, median of "
        f"{args.rounds} interleaved rounds, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, nothing pinned",
        "",
        "| workers | requests/s | x 1 worker | CPU µs/request (all processes) |",
        "|---|---|---|---|",
    ]
    for count in (1, 2):
        rps = statistics.median(rps for rps, _ in results[count])
        cpu = statistics.median(cpu for _, cpu in results[count])
        lines.append(f"| {count} | {rps:,.0f} | {rps / one:.2f} | {cpu:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"workers-{time.strftime('%Y-%m-%d')}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
